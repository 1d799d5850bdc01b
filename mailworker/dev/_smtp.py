"""aiosmtpd plumbing of :mod:`mailworker.dev.server`: one protocol object per connection,
the hooks that decide and deliver, and the certificate made at start.

Everything that decides (recipient verdicts, credentials, the maildir) lives in
:class:`~mailworker.dev.server.DevServer`; this module only adapts aiosmtpd to it.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
from typing import TYPE_CHECKING, Any

#: The command that installs what the development server needs.
INSTALL_HINT = 'pip install "mailworker[devserver]"'

try:
    import trustme
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import (
        SMTP,
        AuthResult,
        Envelope,
        LoginPassword,
        Session,
        TLSSetupException,
    )
except ImportError as exc:  # pragma: no cover - only without the extra
    raise ImportError(
        f"the development SMTP server needs aiosmtpd and trustme: {INSTALL_HINT}",
        name=exc.name,
    ) from exc

if TYPE_CHECKING:
    from mailworker.dev.server import DevServer


def tls_context(names: list[str], common_name: str, ca_file: str) -> ssl.SSLContext:
    """A server context with a new certificate for ``names``, signed by a new CA whose
    certificate is written to ``ca_file`` (PEM) for clients to trust."""
    ca = trustme.CA(organization_name="mailworker devserver")
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = ca.issue_cert(
        *names,
        common_name=common_name,
        organization_name="mailworker devserver",
        not_before=now - datetime.timedelta(minutes=5),
        not_after=now + datetime.timedelta(days=90),
    )
    ca.cert_pem.write_to_path(ca_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    return context


class _QuietSession(Session):
    """aiosmtpd sets the deprecated ``login_data`` after every AUTH and logs a warning
    each time; this session keeps quiet."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class Protocol(SMTP):
    """One client connection; counts connections and TLS handshakes."""

    def __init__(self, handler: Handler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.owner = handler.owner
        #: 1 for the first connection since start, and so on.
        self.number = 0
        # Set directly: aiosmtpd warns when AUTH is required but STARTTLS is not, which
        # is the point of tls="none" and of implicit TLS.
        self._auth_required = self.owner.auth is not None

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    def connection_made(self, transport: Any) -> None:
        upgrade = self._original_transport is not None
        super().connection_made(transport)
        if not upgrade:
            self.number = self.owner.count(connections=1).connections
            self.owner.active.add(self)
        if transport.get_extra_info("ssl_object") is not None:
            self.owner.count(tls_sessions=1)

    def connection_lost(self, error: Exception | None) -> None:
        self.owner.active.discard(self)
        super().connection_lost(error)

    def abort(self) -> None:
        """Cut the connection now (call in the server's loop)."""
        for transport in (self.transport, self._original_transport):
            if isinstance(transport, asyncio.Transport):
                transport.abort()

    def tls_version(self) -> str | None:
        """The TLS version of this connection; None in clear text."""
        transport = self.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        return ssl_object.version() if ssl_object is not None else None


class Handler:
    """aiosmtpd hooks: EHLO keywords, recipient verdicts, delivery, QUIT, AUTH."""

    def __init__(self, owner: DevServer) -> None:
        self.owner = owner

    async def handle_EHLO(
        self, server: SMTP, session: Session, env: Envelope, name: str, lines: list[str]
    ) -> list[str]:
        session.host_name = name  # the 5-argument hook must set it itself
        lines = [x for x in lines if not (x[4:].startswith("AUTH") and not self.owner.auth)]
        return [*lines[:-1], "250-PIPELINING", "250-ENHANCEDSTATUSCODES", lines[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, env: Envelope, address: str, options: list[str]
    ) -> str:
        env.mail_from = address
        env.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, env: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = self.owner.verdict(address)
        if refusal is not None:
            return refusal
        env.rcpt_tos.append(address)
        env.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Protocol, session: Session, env: Envelope) -> str:
        content = env.content
        if isinstance(content, str):  # only with decode_data, which is off
            content = content.encode("utf-8", "surrogateescape")
        peer: Any = session.peer
        key = self.owner.deliver(
            env.mail_from or "",
            list(env.rcpt_tos),
            content or b"",
            peer=str(peer[0] if isinstance(peer, tuple) else peer),
            helo=session.host_name,
            tls=server.tls_version(),
            user=session.auth_data if session.authenticated else None,
            connection=server.number,
        )
        return f"250 2.0.0 OK: queued as {key}"

    async def handle_QUIT(self, server: SMTP, session: Session, env: Envelope) -> str:
        self.owner.count(quits=1)
        return "221 2.0.0 Bye"

    async def handle_exception(self, error: Exception) -> str:
        """Report a failure in one line (aiosmtpd would log a traceback)."""
        if isinstance(error, TLSSetupException):
            self.owner.count(tls_failures=1)
            self.owner.event(f"TLS handshake failed: {error.__cause__ or error}")
        else:
            self.owner.event(f"error: {type(error).__name__}: {error}")
        return f"451 4.3.0 Local error in the devserver ({type(error).__name__})"

    def authenticate(
        self, server: SMTP, session: Session, env: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        """aiosmtpd ``authenticator`` for PLAIN and LOGIN."""
        if isinstance(data, LoginPassword) and self.owner.authenticate(data.login, data.password):
            return AuthResult(success=True, auth_data=data.login.decode("utf-8", "replace"))
        return AuthResult(success=False, handled=False)


class ThreadedServer(Controller):
    """aiosmtpd's threaded controller, making a :class:`Protocol` per connection."""

    def __init__(self, owner: DevServer, port: int, context: ssl.SSLContext | None) -> None:
        handler = Handler(owner)
        kwargs: dict[str, Any] = {
            "hostname": owner.host,
            "port": port,
            "server_hostname": owner.hostname,
            "authenticator": handler.authenticate,
            "auth_exclude_mechanism": () if owner.auth else ("LOGIN", "PLAIN"),
            # aiosmtpd knows only STARTTLS as TLS: implicit TLS must not require it.
            "auth_require_tls": owner.tls == "starttls",
            "decode_data": False,
            "enable_SMTPUTF8": True,
        }
        if owner.tls == "starttls":
            kwargs["tls_context"] = context
        elif owner.tls == "implicit":
            kwargs["ssl_context"] = context
        super().__init__(handler, **kwargs)

    def factory(self) -> SMTP:
        return Protocol(self.handler, **self.SMTP_kwargs)

    def abort_all(self, timeout: float = 5.0) -> None:
        """Cut every client connection (a loop stopped under open transports leaves
        them unclosed)."""

        async def abort() -> None:
            for protocol in list(self.handler.owner.active):
                protocol.abort()
            await asyncio.sleep(0.01)  # let connection_lost run

        asyncio.run_coroutine_threadsafe(abort(), self.loop).result(timeout)
