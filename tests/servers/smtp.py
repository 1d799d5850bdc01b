"""The test SMTP server: aiosmtpd in a thread on 127.0.0.1, recording every message
and connection into a :class:`~tests.servers.recording.RecordingHandler`.

Built on the development server's plumbing (:mod:`mailworker.dev._smtp`): the same
protocol base and quiet session, port picking and controller start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, AnyStr

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, syntax

from mailworker.dev._smtp import BaseProtocol, abort_all, controller_options, start_controller
from mailworker.dev.server import TLS_MODES, TLSMode
from tests.servers.auth import ALL_MECHANISMS, MoreMechanisms
from tests.servers.base import LOCALHOST, SERVER_HOSTNAME, Service
from tests.servers.recording import RecordingHandler
from tests.servers.tls import CertChoice, TLSMaterials, check_cert


class _RecordingSMTP(MoreMechanisms, BaseProtocol):
    """aiosmtpd SMTP protocol (one per connection) with counting and more AUTH."""

    def __init__(self, handler: RecordingHandler, *, owner: SMTPServer, **kwargs: Any) -> None:
        super().__init__(handler, auth_required=owner.auth_required, **kwargs)
        self.recorder = handler
        self.owner = owner
        # Not named auth_*: aiosmtpd treats every auth_* member as a mechanism.
        self.offers_auth = owner.auth
        self.counted = not owner._suspend_counting
        self.connection_id = handler._new_connection_id() if self.counted else 0
        self._greeted = False

    def opened(self) -> None:
        self.owner._active.add(self)

    def tls_started(self) -> None:
        if self.counted:
            self.recorder._count("tls_handshakes")

    def closed(self) -> None:
        self.owner._active.discard(self)

    async def push(self, status: AnyStr) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        reply: str | bytes = status
        if not self._greeted:
            self._greeted = True
            await self.recorder._delay("GREETING")
            if self.recorder.greeting_reply is not None:
                reply = text = self.recorder.greeting_reply
        if self.recorder.reply_delay > 0:
            await asyncio.sleep(self.recorder.reply_delay)
        await super().push(reply)
        if text.startswith("421") and self.transport is not None:
            self.transport.close()

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if self.counted:
            self.recorder._count("AUTH")
        await super().smtp_AUTH(arg)


class _Controller(Controller):
    """aiosmtpd Controller whose protocol is :class:`_RecordingSMTP`."""

    def __init__(self, owner: SMTPServer, handler: RecordingHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.owner = owner

    def factory(self) -> SMTP:
        return _RecordingSMTP(self.handler, owner=self.owner, **self.SMTP_kwargs)

    def _trigger_server(self) -> None:
        # Controller.start() connects once to check the server works; that
        # connection must not show up in the handler's counters.
        self.owner._suspend_counting = True
        try:
            super()._trigger_server()  # type: ignore[no-untyped-call]
        finally:
            self.owner._suspend_counting = False


class SMTPServer(Service):
    """An aiosmtpd SMTP server in a thread on 127.0.0.1, recording into :attr:`handler`.

    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        *,
        tls: TLSMode = "none",
        tls_materials: TLSMaterials | None = None,
        cert: CertChoice = "good",
        auth: bool = False,
        auth_required: bool | None = None,
        auth_require_tls: bool | None = None,
        require_starttls: bool = False,
        mechanisms: Sequence[str] | None = None,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        size_limit: int | None = 2**25,
        idle_timeout: float = 300.0,
        handler: RecordingHandler | None = None,
        host: str = LOCALHOST,
        port: int | None = None,
        hostname: str = SERVER_HOSTNAME,
    ) -> None:
        """Configure the server (nothing starts until :meth:`start`).

        Args:
            tls: ``"none"``, ``"starttls"`` (offers STARTTLS) or ``"implicit"``
                (TLS from the first byte, like port 465).
            tls_materials: Certificates; required unless ``tls="none"``.
            cert: Which certificate to present: ``"good"``, ``"wrong_host"``,
                ``"untrusted"`` or ``"expired"``.
            auth: Offer AUTH (LOGIN, PLAIN, CRAM-MD5, XOAUTH2 unless
                ``mechanisms`` says otherwise). Without it, no AUTH keyword
                is advertised and every mechanism gets 504.
            auth_required: Refuse MAIL/RCPT/DATA with 530 until AUTH
                succeeded; defaults to ``auth``.
            auth_require_tls: Offer and accept AUTH only over TLS; AUTH
                before STARTTLS gets 538. Default: True for ``"starttls"``,
                False for ``"none"`` (True there means AUTH is never offered).
                Implicit TLS is always TLS.
            require_starttls: Refuse everything but EHLO/NOOP/QUIT/STARTTLS
                with 530 before STARTTLS (needs ``tls="starttls"``).
            mechanisms: AUTH mechanisms to offer, from :data:`ALL_MECHANISMS`.
            user, password, token: Accepted credentials (token: XOAUTH2);
                default :data:`DEFAULT_USER`, :data:`DEFAULT_PASSWORD`,
                :data:`DEFAULT_TOKEN`, or the given handler's.
            size_limit: Advertised and enforced SIZE (None: no limit).
            idle_timeout: Seconds of client silence before the server hangs up.
            handler: A handler to share (e.g. across restarts); default new.
            host: Address to bind.
            port: Port to bind; default a free one (kept across restarts).
            hostname: Name in the greeting and EHLO reply.

        Raises:
            ValueError: Unknown or conflicting options.
        """
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {TLS_MODES}, not {tls!r}")
        check_cert(cert)
        if tls != "none" and tls_materials is None:
            raise ValueError(f"tls={tls!r} needs tls_materials")
        if require_starttls and tls != "starttls":
            raise ValueError("require_starttls needs tls='starttls'")
        offered = tuple(m.upper() for m in (ALL_MECHANISMS if mechanisms is None else mechanisms))
        unknown = set(offered) - set(ALL_MECHANISMS)
        if unknown:
            raise ValueError(f"unknown mechanisms {sorted(unknown)}; known: {ALL_MECHANISMS}")
        self.tls: TLSMode = tls
        self.tls_materials = tls_materials
        self.cert: CertChoice = cert
        self.auth = auth
        self.auth_required = auth if auth_required is None else auth_required
        self.auth_require_tls = tls == "starttls" if auth_require_tls is None else auth_require_tls
        self.require_starttls = require_starttls
        self.mechanisms = offered if auth else ()
        self.size_limit = size_limit
        self.idle_timeout = idle_timeout
        self.handler = handler if handler is not None else RecordingHandler()
        if user is not None:
            self.handler.user = user
        if password is not None:
            self.handler.password = password
        if token is not None:
            self.handler.token = token
        self.host = host
        self.port = port if port is not None else 0
        self.hostname = hostname
        self._controller: _Controller | None = None
        self._active: set[_RecordingSMTP] = set()
        self._suspend_counting = False

    def __repr__(self) -> str:
        return f"<SMTPServer {self.host}:{self.port} tls={self.tls} auth={self.auth}>"

    @property
    def running(self) -> bool:
        """Whether the server is accepting connections."""
        return self._controller is not None

    @property
    def active_connections(self) -> int:
        """Client connections open right now."""
        return len(self._active)

    def _make_controller(self, port: int) -> _Controller:
        context = None
        if self.tls != "none":
            assert self.tls_materials is not None
            context = self.tls_materials.server_context(self.cert)
        options = controller_options(
            self.tls,
            context,
            auth_require_tls=self.auth_require_tls,
            hostname=self.host,
            port=port,
            server_hostname=self.hostname,
            authenticator=self.handler.authenticate,
            auth_exclude_mechanism=[m for m in ALL_MECHANISMS if m not in self.mechanisms],
            data_size_limit=self.size_limit,
            timeout=self.idle_timeout,
            require_starttls=self.require_starttls,
        )
        return _Controller(self, self.handler, **options)

    def start(self) -> SMTPServer:
        """Start listening; return self. Retries another port if taken (unless fixed)."""
        if self._controller is not None:
            raise RuntimeError(f"{self!r} is already running")
        self._controller = start_controller(self._make_controller, self.host, self.port)
        self.port = self._controller.port  # restart() comes back on the same port
        return self

    def drop_connections(self, reply: str | None = None, timeout: float = 5.0) -> None:
        """Cut every open client connection (server keeps listening).

        Args:
            reply: A line to send first (e.g. ``"421 4.4.2 bye"``); default none.
            timeout: Seconds to wait for the connections to be gone.
        """
        controller = self._controller
        if controller is None:
            return
        # Clients may reconnect at once; only the connections open now are cut.
        abort_all(controller.loop, set(self._active), reply, timeout)

    def stop(self) -> None:
        """Close client connections and stop listening (idempotent)."""
        controller = self._controller
        if controller is None:
            return
        listener = controller.server
        if listener is not None:
            # Stop accepting first, so no client reconnects while we drop the others.
            controller.loop.call_soon_threadsafe(listener.close)
        try:
            self.drop_connections()
        finally:
            self._controller = None
            controller.stop()
            self._active.clear()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop (dropping connections), wait ``down_for`` seconds, start on the same port."""
        self.stop()
        if down_for > 0:
            time.sleep(down_for)
        self.start()
