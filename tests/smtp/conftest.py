"""Fixtures for the SMTP session tests: profiles pointing at the test servers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailworker import Profile
from tests.servers import (
    DEFAULT_PASSWORD,
    DEFAULT_USER,
    ScriptedServer,
    SMTPServer,
    TLSMaterials,
    smtp_url,
)
from tests.servers.chunking import ChunkingServer
from tests.smtp.helpers import ProfileFactory


@pytest.fixture
def make_profile(tls_ca: TLSMaterials) -> ProfileFactory:
    """Factory: ``make_profile(server, scheme="smtps", **options)`` builds a Profile via a URL.

    TLS schemes get the test CA and the default credentials unless told otherwise
    (``credentials=False``, ``user=``, ``password=``, ``token=`` for XOAUTH2);
    ``smtp://`` gets no credentials. Query options (``timeout`` defaults to 5) are
    URL-encoded; the host is ``localhost`` so certificates can be checked.
    """

    def build(
        server: SMTPServer | ScriptedServer | int,
        scheme: str = "smtps",
        *,
        credentials: bool | None = None,
        user: str = DEFAULT_USER,
        password: str | None = DEFAULT_PASSWORD,
        token: str | None = None,
        host: str = "localhost",
        **options: Any,
    ) -> Profile:
        port = server if isinstance(server, int) else server.port
        if credentials is None:
            credentials = scheme != "smtp"
        options.setdefault("timeout", 5)
        if scheme != "smtp":
            options.setdefault("ca_file", str(tls_ca.ca_file))
        url = smtp_url(
            port,
            user=user if credentials else None,
            password=password if token is None else None,
            scheme=scheme,
            host=host,
            **options,
        )
        provider = (lambda: token) if token is not None else None
        return Profile.from_url(url, oauth_token_provider=provider)

    return build


#: The type of the ``chunking_server`` fixture.
ChunkingFactory = Callable[..., ChunkingServer]


@pytest.fixture
def chunking_server() -> Iterator[ChunkingFactory]:
    """Factory: ``chunking_server(**options)`` starts a ChunkingServer (PIPELINING and
    CHUNKING, with fault switches), stopped at teardown."""
    servers: list[ChunkingServer] = []

    def start(**options: bool) -> ChunkingServer:
        servers.append(ChunkingServer(**options).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
