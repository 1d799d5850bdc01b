"""aiosmtpd plumbing of :mod:`mailworker.dev.server`: one protocol object per connection,
the hooks that decide and deliver, and the certificate made at start.

Everything that decides (recipient verdicts, credentials, the maildir) lives in
:class:`~mailworker.dev.server.DevServer`; this module only adapts aiosmtpd to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

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

_C = TypeVar("_C", bound=Controller)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (aiosmtpd's ``port=0`` does not work)."""
    return bindable(host, 0)


def bindable(host: str, port: int) -> int:
    """``port`` (or, for 0, the one the system picks) if it can be bound on ``host`` now.

    aiosmtpd only notices a taken port after its start-up timeout (5 s); this says so
    at once.

    Raises:
        OSError: it cannot (e.g. EADDRINUSE).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio does
        sock.bind((host, port))
        bound: int = sock.getsockname()[1]
        return bound


def start_controller(make: Callable[[int], _C], host: str, port: int) -> _C:
    """Start and return the controller ``make(port)`` builds; port 0 picks a free one.

    A free port can be taken between :func:`free_port` and the start: then another is
    tried, five in all.

    Raises:
        OSError: ``port`` (or, with 0, the fifth free port) cannot be listened on.
    """
    for attempt in range(5):
        controller = make(free_port(host) if port == 0 else bindable(host, port))
        try:
            controller.start()
        except OSError:
            controller.stop(no_assert=True)
            controller.loop.close()
            if port != 0 or attempt == 4:
                raise
            continue
        return controller
    raise AssertionError("unreachable")  # pragma: no cover


def controller_options(
    tls: str, context: ssl.SSLContext | None, *, auth_require_tls: bool, **options: Any
) -> dict[str, Any]:
    """aiosmtpd ``Controller`` keyword arguments for a server in TLS mode ``tls``
    (``"none"``, ``"starttls"`` or ``"implicit"``) presenting ``context``, plus
    ``options``: messages as bytes, SMTPUTF8 offered.

    aiosmtpd knows only STARTTLS as TLS: an implicit-TLS session has no TLS protocol of
    its own, so there AUTH must not require TLS or it is never offered.
    """
    kwargs: dict[str, Any] = {"decode_data": False, "enable_SMTPUTF8": True, **options}
    kwargs["auth_require_tls"] = auth_require_tls and tls != "implicit"
    if tls == "starttls":
        kwargs["tls_context"] = context
    elif tls == "implicit":
        kwargs["ssl_context"] = context
    return kwargs


def abort_all(
    loop: asyncio.AbstractEventLoop,
    protocols: Iterable[BaseProtocol],
    reply: str | None = None,
    timeout: float = 5.0,
) -> None:
    """Cut ``protocols`` now, from another thread than the server's ``loop`` (a loop
    stopped under open transports leaves them unclosed); ``reply`` is sent first.

    Raises:
        TimeoutError: the loop did not get to it within ``timeout`` seconds.
    """

    async def abort() -> None:
        for protocol in list(protocols):
            protocol.abort(reply)
        await asyncio.sleep(0.01)  # let connection_lost run

    asyncio.run_coroutine_threadsafe(abort(), loop).result(timeout)


def ehlo_keyword(line: str) -> str:
    """The keyword of an EHLO line without its code (``"SIZE 1000"`` -> ``"SIZE"``)."""
    return line.split(" ", 1)[0].upper()


def edit_ehlo(
    responses: list[str], *, remove: Iterable[str] = (), add: Iterable[str] = ()
) -> list[str]:
    """aiosmtpd's EHLO reply lines (``250-...``, ``250 ...``) without the keywords in
    ``remove`` and with the lines of ``add`` (e.g. ``"SIZE 1000"``) before the last,
    each replacing the line of its keyword."""
    head, *keywords = [response[4:] for response in responses]
    dropped = {keyword.upper() for keyword in remove}
    keywords = [line for line in keywords if ehlo_keyword(line) not in dropped]
    for extra in add:
        keywords = [line for line in keywords if ehlo_keyword(line) != ehlo_keyword(extra)]
        keywords.insert(max(len(keywords) - 1, 0), extra)
    lines = [head, *keywords]
    return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]


def server_context(leaf: trustme.LeafCert) -> ssl.SSLContext:
    """A server-side context presenting ``leaf``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    return context


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
    return server_context(leaf)


class QuietSession(Session):
    """aiosmtpd sets the deprecated ``login_data`` after every AUTH and logs a warning
    each time; this session keeps quiet."""

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


class BaseProtocol(SMTP):
    """aiosmtpd's protocol (one per client connection) with a :class:`QuietSession`,
    hooks that tell a new connection from its STARTTLS upgrade, and :meth:`abort`.

    Args:
        auth_required: refuse MAIL, RCPT and DATA before AUTH. Set directly: aiosmtpd
            warns when AUTH is required but STARTTLS is not, which is the point of
            clear-text servers and of implicit TLS.
    """

    def __init__(self, handler: Any, *, auth_required: bool = False, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._auth_required = auth_required

    def opened(self) -> None:
        """Called once per TCP connection (not again after STARTTLS)."""

    def tls_started(self) -> None:
        """Called after each successful TLS handshake (STARTTLS or implicit)."""

    def closed(self) -> None:
        """Called when the connection is gone (perhaps twice: see :meth:`abort`)."""

    def _create_session(self) -> Session:
        return QuietSession(self.loop)

    def connection_made(self, transport: Any) -> None:
        upgrade = self._original_transport is not None
        super().connection_made(transport)
        if not upgrade:
            self.opened()
        if transport.get_extra_info("ssl_object") is not None:
            self.tls_started()

    def connection_lost(self, error: Exception | None) -> None:
        self.closed()
        super().connection_lost(error)

    def abort(self, reply: str | None = None) -> None:
        """Cut the connection now, after sending ``reply`` if given (call in the server's
        loop)."""
        if reply is not None and isinstance(self.transport, asyncio.WriteTransport):
            self.transport.write(reply.encode() + b"\r\n")
        for transport in (self.transport, self._original_transport):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        # asyncio does not report the loss of a connection still in its TLS handshake
        # to the protocol, so connection_lost() may never run for it.
        self.closed()

    def tls_version(self) -> str | None:
        """The TLS version of this connection; None in clear text."""
        transport = self.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
        return ssl_object.version() if ssl_object is not None else None


class Protocol(BaseProtocol):
    """One client connection of a :class:`~mailworker.dev.server.DevServer`; counts
    connections and TLS handshakes."""

    def __init__(self, handler: Handler, **kwargs: Any) -> None:
        super().__init__(handler, auth_required=handler.owner.auth is not None, **kwargs)
        self.owner = handler.owner
        #: 1 for the first connection since start, and so on.
        self.number = 0

    def opened(self) -> None:
        self.number = self.owner.count(connections=1).connections
        self.owner.active.add(self)

    def tls_started(self) -> None:
        self.owner.count(tls_sessions=1)

    def closed(self) -> None:
        self.owner.active.discard(self)


class Handler:
    """aiosmtpd hooks: EHLO keywords, recipient verdicts, delivery, QUIT, AUTH."""

    def __init__(self, owner: DevServer) -> None:
        self.owner = owner

    async def handle_EHLO(
        self, server: SMTP, session: Session, env: Envelope, name: str, lines: list[str]
    ) -> list[str]:
        session.host_name = name  # the 5-argument hook must set it itself
        remove = () if self.owner.auth else ("AUTH",)
        return edit_ehlo(lines, remove=remove, add=("PIPELINING", "ENHANCEDSTATUSCODES"))

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
        options = controller_options(
            owner.tls,
            context,
            auth_require_tls=owner.tls == "starttls",
            hostname=owner.host,
            port=port,
            server_hostname=owner.hostname,
            authenticator=handler.authenticate,
            auth_exclude_mechanism=() if owner.auth else ("LOGIN", "PLAIN"),
        )
        super().__init__(handler, **options)

    def factory(self) -> SMTP:
        return Protocol(self.handler, **self.SMTP_kwargs)

    def abort_all(self, timeout: float = 5.0) -> None:
        """Cut every client connection (see :func:`abort_all`)."""
        abort_all(self.loop, self.handler.owner.active, timeout=timeout)
