"""Profile URLs (``MAILWORKER_SMTP_URL``) that point at the test servers."""

from __future__ import annotations

import os
import urllib.parse
from typing import TYPE_CHECKING, Any

from tests.servers.base import WRONG_PASSWORD

if TYPE_CHECKING:
    from tests.servers.smtp import SMTPServer

#: URL scheme by :class:`~tests.servers.SMTPServer` TLS mode.
SCHEMES = {"none": "smtp", "starttls": "smtp+starttls", "implicit": "smtps"}


def smtp_url(
    port: int,
    *,
    user: str | None = None,
    password: str | None = None,
    ca_file: str | os.PathLike[str] | None = None,
    scheme: str = "smtp+starttls",
    host: str = "localhost",
    **options: Any,
) -> str:
    """A profile URL for a test server; user and password are percent-encoded, options
    URL-encoded (booleans as ``true``/``false``)."""
    auth = ""
    if user is not None:
        auth = urllib.parse.quote(user, safe="")
        if password is not None:
            auth += ":" + urllib.parse.quote(password, safe="")
        auth += "@"
    query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in options.items()}
    if ca_file is not None:
        query["ca_file"] = str(ca_file)
    tail = f"?{urllib.parse.urlencode(query)}" if query else ""
    return f"{scheme}://{auth}{host}:{port}{tail}"


def profile_urls(
    server: SMTPServer,
    ca_file: str | os.PathLike[str],
    *,
    wrong_auth: str = "PLAIN",
    **options: Any,
) -> dict[str, str]:
    """Profile name -> URL for ``server``, as :func:`tests.worker_process.worker_env`
    takes them: the scheme by its TLS mode, ``ca_file`` with TLS, and ``options``.

    ``default`` logs in with the server's credentials (AUTH PLAIN) when it offers AUTH;
    then ``wrong`` is there too, the same with :data:`WRONG_PASSWORD` (AUTH
    ``wrong_auth``).
    """
    scheme = SCHEMES[server.tls]
    ca = ca_file if server.tls != "none" else None
    if not server.auth:
        return {"default": smtp_url(server.port, scheme=scheme, ca_file=ca, **options)}
    if server.tls == "none":
        options["allow_insecure_auth"] = True
    user = server.handler.user
    return {
        name: smtp_url(
            server.port,
            scheme=scheme,
            ca_file=ca,
            user=user,
            password=password,
            auth=auth,
            **options,
        )
        for name, password, auth in (
            ("default", server.handler.password, "PLAIN"),
            ("wrong", WRONG_PASSWORD, wrong_auth),
        )
    }
