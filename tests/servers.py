"""Real servers on 127.0.0.1 for tests and the development server.

Four pieces, all bound to 127.0.0.1 on a free port chosen at start:

- :class:`TLSMaterials`: a throw-away ``trustme`` CA, a good server
  certificate and three bad ones (wrong host name, untrusted CA, expired).
- :class:`SMTPServer`: an aiosmtpd server in a thread with a
  :class:`RecordingHandler` that records every message and connection and
  injects faults (per-recipient replies, 4xx once, slow replies, extra EHLO
  keywords), plus AUTH LOGIN, PLAIN, CRAM-MD5 and XOAUTH2.
- :class:`ScriptedServer`: a raw TCP server driven by a Python function, for
  faults a real server never produces (garbage, 421 at greeting, dropping
  the connection mid-DATA, never answering).
- :class:`RedisServer`: a private ``redis-server`` subprocess.

Nothing here imports pytest, so ``mailworker devserver`` can reuse it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime
import email.policy
import hashlib
import hmac
import itertools
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, AnyStr, Final, Literal, NamedTuple, TypeVar

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import (
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    auth_mechanism,
    syntax,
)

if TYPE_CHECKING:
    import redis

__all__ = [
    "ALL_MECHANISMS",
    "DEFAULT_PASSWORD",
    "DEFAULT_TOKEN",
    "DEFAULT_USER",
    "LOCALHOST",
    "SERVER_HOSTNAME",
    "WRONG_HOSTNAME",
    "XOAUTH2_ERROR",
    "XOAUTH2_FAILURE_REPLY",
    "AuthAttempt",
    "CertChoice",
    "ClientClosed",
    "ReceivedMessage",
    "RecordingHandler",
    "RedisServer",
    "SMTPServer",
    "ScriptConnection",
    "ScriptedServer",
    "TLSMaterials",
    "TLSMode",
    "free_port",
    "xoauth2_string",
]

#: The only address servers bind to.
LOCALHOST: Final = "127.0.0.1"
#: Name the SMTP servers announce, and a name the good certificate is valid for.
SERVER_HOSTNAME: Final = "localhost"
#: The only name the ``"wrong_host"`` certificate is valid for.
WRONG_HOSTNAME: Final = "wrong.example"
#: Credentials an :class:`SMTPServer` accepts unless told otherwise.
DEFAULT_USER: Final = "user@example.com"
DEFAULT_PASSWORD: Final = "correct horse battery staple"
DEFAULT_TOKEN: Final = "ya29.test-access-token"
#: Every AUTH mechanism an :class:`SMTPServer` can offer.
ALL_MECHANISMS: Final = ("CRAM-MD5", "LOGIN", "PLAIN", "XOAUTH2")
#: The JSON object Gmail sends (base64, in a 334 reply) when XOAUTH2 fails.
XOAUTH2_ERROR: Final = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}
#: Gmail's final reply to a failed XOAUTH2 exchange (two lines).
XOAUTH2_FAILURE_REPLY: Final = (
    "535-5.7.8 Username and Password not accepted. For more information, go to\r\n"
    "535 5.7.8  https://support.google.com/mail/?p=BadCredentials"
)

TLSMode = Literal["none", "starttls", "implicit"]
CertChoice = Literal["good", "wrong_host", "untrusted", "expired"]
_TLS_MODES: Final = ("none", "starttls", "implicit")
_CERT_CHOICES: Final = ("good", "wrong_host", "untrusted", "expired")

_T = TypeVar("_T")


def free_port(host: str = LOCALHOST) -> int:
    """Return a TCP port that was free on ``host`` a moment ago.

    aiosmtpd's ``Controller(port=0)`` is broken (it connects to port 0 to
    check it started), so we bind port 0 ourselves, read the port and close.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_until(predicate: Callable[[], _T], timeout: float, what: str) -> _T:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def xoauth2_string(user: str, token: str) -> str:
    """Return the base64 XOAUTH2 initial response for ``user`` and ``token``."""
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(raw).decode("ascii")


# --------------------------------------------------------------------------- TLS


class TLSMaterials:
    """A test CA with one good and three bad server certificates.

    Attributes:
        ca: The trusted ``trustme.CA``; its PEM is written to :attr:`ca_file`.
        ca_file: Path of the trusted CA's PEM (clients use ``ca_file=``).
        untrusted_ca: A second CA that nobody trusts.
        certs: Leaf certificates by :data:`CertChoice`: ``"good"`` (for
            ``localhost`` and IP ``127.0.0.1``), ``"wrong_host"`` (only
            ``wrong.example``), ``"untrusted"`` (right names, untrusted CA),
            ``"expired"`` (right names and CA, expired yesterday).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        """Create the CAs and certificates and write ``ca.pem`` into ``directory``."""
        self.ca = trustme.CA()
        self.untrusted_ca = trustme.CA()
        now = datetime.datetime.now(datetime.timezone.utc)
        self.certs: dict[CertChoice, trustme.LeafCert] = {
            "good": self.ca.issue_cert(SERVER_HOSTNAME, LOCALHOST),
            "wrong_host": self.ca.issue_cert(WRONG_HOSTNAME),
            "untrusted": self.untrusted_ca.issue_cert(SERVER_HOSTNAME, LOCALHOST),
            "expired": self.ca.issue_cert(
                SERVER_HOSTNAME,
                LOCALHOST,
                not_before=now - datetime.timedelta(days=30),
                not_after=now - datetime.timedelta(days=1),
            ),
        }
        self.ca_file = self.write_ca_file(Path(directory) / "ca.pem")
        self._contexts: dict[CertChoice, ssl.SSLContext] = {}
        self._lock = threading.Lock()

    def write_ca_file(self, path: str | os.PathLike[str]) -> Path:
        """Write the trusted CA certificate (PEM) to ``path`` and return it."""
        target = Path(path)
        self.ca.cert_pem.write_to_path(target)
        return target

    def server_context(self, cert: CertChoice = "good") -> ssl.SSLContext:
        """Return a (cached) server-side context presenting the chosen certificate."""
        if cert not in _CERT_CHOICES:
            raise ValueError(f"cert must be one of {_CERT_CHOICES}, not {cert!r}")
        with self._lock:
            if cert not in self._contexts:
                context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
                self.certs[cert].configure_cert(context)
                self._contexts[cert] = context
            return self._contexts[cert]

    def client_context(self) -> ssl.SSLContext:
        """Return a new verifying client context that trusts only :attr:`ca`."""
        return ssl.create_default_context(cafile=str(self.ca_file))


# ----------------------------------------------------------------- SMTP records


@dataclass(frozen=True)
class ReceivedMessage:
    """One DATA transaction as the server saw it.

    ``content`` holds the exact bytes after DATA (line endings untouched),
    minus the final ``.\\r\\n`` and with dot-stuffing removed.
    """

    mail_from: str
    rcpt_tos: tuple[str, ...]
    content: bytes
    mail_options: tuple[str, ...]
    rcpt_options: tuple[str, ...]
    #: Server-side number of the TCP connection (1, 2, ...; per handler).
    connection_id: int
    #: Whether the connection was encrypted (STARTTLS or implicit TLS).
    tls: bool
    #: User name that authenticated on this connection, if any.
    auth_user: str | None
    #: The queue id put in the reply, e.g. ``"250 OK: queued as 3F2A9C01B4"``.
    queue_id: str
    #: The reply sent after the end of DATA.
    reply: str

    @property
    def accepted(self) -> bool:
        """Whether the end-of-DATA reply was 2xx."""
        return self.reply.startswith("2")

    def parsed(self) -> EmailMessage:
        """Parse :attr:`content` with ``email.policy.default``."""
        return BytesParser(policy=email.policy.default).parsebytes(self.content)


class AuthAttempt(NamedTuple):
    """One completed AUTH exchange: mechanism, claimed user name, outcome."""

    mechanism: str
    user: str
    success: bool


class _CramMD5Response(NamedTuple):
    user: str
    challenge: bytes
    digest: str


class _XOAuth2Response(NamedTuple):
    user: str
    token: str


class _QuietSession(Session):
    """aiosmtpd Session whose deprecated ``login_data`` does not log warnings.

    aiosmtpd itself sets ``login_data`` after every successful AUTH.
    """

    @property
    def login_data(self) -> Any:
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:
        self._login_data = value


def _keyword(ehlo_line: str) -> str:
    return ehlo_line.split(" ", 1)[0].upper()


class RecordingHandler:
    """aiosmtpd handler that records everything and injects faults.

    Fault attributes may be changed at any time, also while a client is
    connected; an address key matches case-insensitively.

    Attributes:
        rcpt_replies: Address -> reply for every RCPT TO of that address,
            e.g. ``{"bad@x": "550 5.1.1 no such user"}``.
        rcpt_replies_once: Address -> reply for the next RCPT TO of that
            address only; later ones are accepted.
        mail_reply, mail_reply_once: Reply to every / the next MAIL FROM.
        data_reply, data_reply_once: Reply to every / the next end of DATA.
            A message refused this way goes to :attr:`rejected`.
        ehlo_reply: If set, EHLO gets this reply instead of the keywords.
        ehlo_extra: Keyword lines to add to EHLO, e.g. ``"PIPELINING"``,
            ``"ENHANCEDSTATUSCODES"``, ``"SIZE 1000"`` (replaces aiosmtpd's
            ``SIZE`` line: only advertised, not enforced).
        ehlo_remove: Keywords to drop from EHLO, e.g. ``{"SMTPUTF8"}``.
        reply_delay: Seconds to wait before every reply line (greeting too).
        command_delays: Extra seconds before the reply to one command, by
            name: ``GREETING``, ``EHLO``, ``HELO``, ``MAIL``, ``RCPT``,
            ``DATA`` (the reply after the final dot; the message is recorded
            before the delay, so a client that gives up still delivered it), ``RSET``, ``NOOP``,
            ``QUIT``.
        user, password, token: Credentials AUTH accepts (token: XOAUTH2).

    Any injected reply starting with ``421`` also closes the connection, as
    a real server does.

    Records, appended to from the server thread (take a copy with ``list()``
    before iterating while traffic flows): :attr:`messages`, :attr:`rejected`,
    :attr:`logins`, :attr:`counts`, :attr:`errors`.
    """

    def __init__(
        self,
        *,
        user: str = DEFAULT_USER,
        password: str = DEFAULT_PASSWORD,
        token: str = DEFAULT_TOKEN,
    ) -> None:
        """Create a handler accepting ``user``/``password`` and XOAUTH2 ``token``."""
        self.user = user
        self.password = password
        self.token = token
        self.rcpt_replies: dict[str, str] = {}
        self.rcpt_replies_once: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.mail_reply_once: str | None = None
        self.data_reply: str | None = None
        self.data_reply_once: str | None = None
        self.ehlo_reply: str | None = None
        self.ehlo_extra: list[str] = []
        self.ehlo_remove: set[str] = set()
        self.reply_delay: float = 0.0
        self.command_delays: dict[str, float] = {}
        #: Counters: ``connections`` (TCP accepts), ``tls_handshakes``
        #: (successful, STARTTLS or implicit), ``tls_failures`` (failed
        #: STARTTLS handshakes), ``auth_attempts``, ``auth_successes``, and
        #: one per command that reached the handler: ``EHLO``, ``HELO``,
        #: ``AUTH``, ``MAIL``, ``RCPT``, ``DATA`` (completed transfers),
        #: ``RSET``, ``NOOP``, ``QUIT``. Commands aiosmtpd refuses itself
        #: (bad syntax, SIZE too big, 530 before AUTH/STARTTLS) are not counted.
        self.counts: Counter[str] = Counter()
        #: Unexpected exceptions raised while serving (TLS failures included).
        self.errors: list[BaseException] = []
        # Plain lists, not copying properties: aiosmtpd runs
        # inspect.getmembers(handler) on every connection.
        #: Messages whose DATA was accepted, oldest first (live list).
        self.messages: list[ReceivedMessage] = []
        #: Messages fully received but refused at end of DATA (live list).
        self.rejected: list[ReceivedMessage] = []
        #: Every completed AUTH exchange, oldest first (live list).
        self.logins: list[AuthAttempt] = []
        self._connection_ids = itertools.count(1)
        self._cond = threading.Condition()

    # ---- records -------------------------------------------------------

    @property
    def connections(self) -> int:
        """TCP connections accepted so far."""
        return self.counts["connections"]

    @property
    def tls_handshakes(self) -> int:
        """Successful TLS handshakes (STARTTLS or implicit) so far."""
        return self.counts["tls_handshakes"]

    def wait_for_messages(self, count: int, timeout: float = 5.0) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages were accepted; return them all.

        Raises:
            TimeoutError: Fewer than ``count`` arrived within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(
                    f"{len(self.messages)} of {count} messages arrived within {timeout}s"
                )
            return list(self.messages)

    def wait_for_count(self, name: str, value: int, timeout: float = 5.0) -> None:
        """Block until ``counts[name] >= value``.

        Raises:
            TimeoutError: It did not get there within ``timeout`` seconds.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self.counts[name] >= value, timeout):
                raise TimeoutError(
                    f"counts[{name!r}] is {self.counts[name]}, not >= {value} after {timeout}s"
                )

    def clear(self) -> None:
        """Forget recorded messages, logins, counters and errors (not faults)."""
        with self._cond:
            self.messages.clear()
            self.rejected.clear()
            self.logins.clear()
            self.counts.clear()
            self.errors.clear()

    # ---- plumbing used by the SMTP protocol ----------------------------

    def _count(self, name: str) -> None:
        with self._cond:
            self.counts[name] += 1
            self._cond.notify_all()

    def _new_connection_id(self) -> int:
        with self._cond:
            self.counts["connections"] += 1
            self._cond.notify_all()
            return next(self._connection_ids)

    def _take_once(self, attribute: str) -> str | None:
        with self._cond:
            reply: str | None = getattr(self, attribute)
            setattr(self, attribute, None)
            return reply

    def _rcpt_fault(self, address: str) -> str | None:
        key = address.lower()
        with self._cond:
            for mapping, once in ((self.rcpt_replies_once, True), (self.rcpt_replies, False)):
                for candidate in list(mapping):
                    if candidate.lower() == key:
                        return mapping.pop(candidate) if once else mapping[candidate]
        return None

    async def _delay(self, command: str) -> None:
        delay = self.command_delays.get(command, 0.0)
        if delay > 0:
            await asyncio.sleep(delay)

    @property
    def _enhanced(self) -> bool:
        return any(_keyword(line) == "ENHANCEDSTATUSCODES" for line in self.ehlo_extra)

    def _edit_ehlo(self, responses: list[str], *, auth_enabled: bool) -> list[str]:
        lines = [response[4:] for response in responses]
        head, keywords = lines[0], lines[1:]
        remove = {keyword.upper() for keyword in self.ehlo_remove}
        if not auth_enabled:
            remove.add("AUTH")
        keywords = [line for line in keywords if _keyword(line) not in remove]
        for extra in self.ehlo_extra:
            keywords = [line for line in keywords if _keyword(line) != _keyword(extra)]
            keywords.insert(max(len(keywords) - 1, 0), extra)
        everything = [head, *keywords]
        return [f"250-{line}" for line in everything[:-1]] + [f"250 {everything[-1]}"]

    # ---- aiosmtpd hooks ------------------------------------------------

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Answer EHLO with aiosmtpd's keywords edited by the fault settings."""
        self._count("EHLO")
        await self._delay("EHLO")
        if self.ehlo_reply is not None:
            return [self.ehlo_reply]
        session.host_name = hostname  # the 5-argument hook must set it itself
        offers_auth = getattr(server, "offers_auth", True)
        return self._edit_ehlo(responses, auth_enabled=offers_auth)

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        """Accept HELO."""
        self._count("HELO")
        await self._delay("HELO")
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Accept MAIL FROM unless a MAIL fault is set."""
        self._count("MAIL")
        await self._delay("MAIL")
        fault = self._take_once("mail_reply_once") or self.mail_reply
        if fault is not None:
            return fault
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK" if self._enhanced else "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Accept RCPT TO unless a fault is set for this address."""
        self._count("RCPT")
        await self._delay("RCPT")
        fault = self._rcpt_fault(address)
        if fault is not None:
            return fault
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK" if self._enhanced else "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the message; accept it unless a DATA fault is set."""
        self._count("DATA")
        queue_id = secrets.token_hex(5).upper()
        fault = self._take_once("data_reply_once") or self.data_reply
        if fault is not None:
            reply = fault
        elif self._enhanced:
            reply = f"250 2.0.0 OK: queued as {queue_id}"
        else:
            reply = f"250 OK: queued as {queue_id}"
        content = envelope.content
        if isinstance(content, str):  # only if someone enabled decode_data
            content = content.encode("utf-8", errors="surrogateescape")
        message = ReceivedMessage(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            content=content or b"",
            mail_options=tuple(envelope.mail_options),
            rcpt_options=tuple(envelope.rcpt_options),
            connection_id=getattr(server, "connection_id", 0),
            tls=getattr(server, "tls_active", False),
            auth_user=session.auth_data if session.authenticated else None,
            queue_id=queue_id,
            reply=reply,
        )
        with self._cond:
            (self.messages if message.accepted else self.rejected).append(message)
            self._cond.notify_all()
        # Delay only after recording: a client that times out waiting for this
        # reply leaves a delivered message behind, as with a real server.
        await self._delay("DATA")
        return reply

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Count RSET."""
        self._count("RSET")
        await self._delay("RSET")
        return "250 2.0.0 OK" if self._enhanced else "250 OK"

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        """Count NOOP."""
        self._count("NOOP")
        await self._delay("NOOP")
        return "250 2.0.0 OK" if self._enhanced else "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Count QUIT."""
        self._count("QUIT")
        await self._delay("QUIT")
        return "221 2.0.0 Bye" if self._enhanced else "221 Bye"

    async def handle_exception(self, error: Exception) -> str:
        """Record an exception raised while serving; count failed STARTTLS."""
        with self._cond:
            self.errors.append(error)
            if isinstance(error, TLSSetupException):
                self.counts["tls_failures"] += 1
            self._cond.notify_all()
        return f"500 Error: ({type(error).__name__}) {error}"

    def authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> AuthResult:
        """aiosmtpd ``authenticator``: check credentials for any mechanism."""
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", errors="replace")
            ok = hmac.compare_digest(auth_data.login, self.user.encode()) and (
                hmac.compare_digest(auth_data.password, self.password.encode())
            )
        elif isinstance(auth_data, _CramMD5Response):
            user = auth_data.user
            expected = hmac.new(self.password.encode(), auth_data.challenge, hashlib.md5)
            ok = user == self.user and hmac.compare_digest(
                expected.hexdigest(), auth_data.digest.lower()
            )
        elif isinstance(auth_data, _XOAuth2Response):
            user = auth_data.user
            ok = user == self.user and hmac.compare_digest(auth_data.token, self.token)
        else:  # pragma: no cover - only our mechanisms call this
            user, ok = "", False
        with self._cond:
            self.counts["auth_attempts"] += 1
            self.counts["auth_successes"] += ok
            self.logins.append(AuthAttempt(mechanism, user, ok))
            self._cond.notify_all()
        if ok:
            return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)


# ------------------------------------------------------------------ SMTP server


class _RecordingSMTP(SMTP):
    """aiosmtpd SMTP protocol (one per connection) with counting and more AUTH."""

    def __init__(self, handler: RecordingHandler, *, owner: SMTPServer, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.recorder = handler
        self.owner = owner
        # Not named auth_*: aiosmtpd treats every auth_* member as a mechanism.
        self.offers_auth = owner.auth
        # Set here, not through aiosmtpd, which warns (an error under pytest)
        # when AUTH is required without TLS being required.
        self._auth_required = owner.auth_required
        self.tls_active = False
        self.counted = not owner._suspend_counting
        self.connection_id = handler._new_connection_id() if self.counted else 0
        self._greeted = False

    def _create_session(self) -> Session:
        return _QuietSession(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        upgrade = self._original_transport is not None
        super().connection_made(transport)
        if transport.get_extra_info("ssl_object") is not None:
            self.tls_active = True
            if self.counted:
                self.recorder._count("tls_handshakes")
        if not upgrade:
            self.owner._active.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.owner._active.discard(self)
        super().connection_lost(error)

    def _drop(self, reply: str | None) -> None:
        """Close the connection at once (runs in the server's loop)."""
        transport = self.transport
        if transport is not None:
            if reply is not None and isinstance(transport, asyncio.WriteTransport):
                transport.write(reply.encode() + b"\r\n")
            if isinstance(transport, asyncio.Transport):
                transport.abort()
        if self._original_transport is not None and isinstance(
            self._original_transport, asyncio.Transport
        ):
            self._original_transport.abort()
        # asyncio does not report the loss of a connection still in its TLS
        # handshake to the protocol, so connection_lost() may never run for it.
        self.owner._active.discard(self)

    async def push(self, status: AnyStr) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if not self._greeted:
            self._greeted = True
            await self.recorder._delay("GREETING")
        if self.recorder.reply_delay > 0:
            await asyncio.sleep(self.recorder.reply_delay)
        await super().push(status)
        if text.startswith("421") and self.transport is not None:
            self.transport.close()

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        if self.counted:
            self.recorder._count("AUTH")
        await super().smtp_AUTH(arg)

    @auth_mechanism("CRAM-MD5")
    async def auth_CRAM_MD5(self, _: SMTP, args: list[str]) -> AuthResult:
        """RFC 2195 CRAM-MD5: base64 challenge, answer ``user hex(hmac-md5)``."""
        if len(args) > 1:
            await self.push("501 5.5.2 CRAM-MD5 takes no initial response")
            return AuthResult(success=False)
        challenge = f"<{secrets.randbelow(10**9)}.{int(time.time())}@{self.hostname}>".encode()
        response = await self.challenge_auth(challenge)
        if not isinstance(response, bytes):
            return AuthResult(success=False)  # '*' or bad base64; already answered
        user, _sep, digest = response.decode("utf-8", errors="replace").rpartition(" ")
        return self._authenticate("CRAM-MD5", _CramMD5Response(user, challenge, digest))

    @auth_mechanism("XOAUTH2")
    async def auth_XOAUTH2(self, _: SMTP, args: list[str]) -> AuthResult:
        """Google's XOAUTH2; on failure a 334 JSON error, then 535 after the client's empty line."""
        if len(args) > 1:
            try:
                raw = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False)
        else:
            answer = await self.challenge_auth(b"")
            if not isinstance(answer, bytes):
                return AuthResult(success=False)
            raw = answer
        fields = dict(
            part.split("=", 1)
            for part in raw.decode("utf-8", errors="replace").split("\x01")
            if "=" in part
        )
        bearer = fields.get("auth", "")
        token = bearer[7:] if bearer[:7].lower() == "bearer " else ""
        result = self._authenticate("XOAUTH2", _XOAuth2Response(fields.get("user", ""), token))
        if result.success:
            return result
        error = json.dumps(XOAUTH2_ERROR, separators=(",", ":")).encode()
        if not isinstance(await self.challenge_auth(error), bytes):
            return AuthResult(success=False)  # client sent '*'; already answered
        return AuthResult(success=False, handled=False, message=XOAUTH2_FAILURE_REPLY)


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


class SMTPServer:
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
        if tls not in _TLS_MODES:
            raise ValueError(f"tls must be one of {_TLS_MODES}, not {tls!r}")
        if cert not in _CERT_CHOICES:
            raise ValueError(f"cert must be one of {_CERT_CHOICES}, not {cert!r}")
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
        self._port_fixed = port is not None
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

    def _make_controller(self) -> _Controller:
        kwargs: dict[str, Any] = {
            "hostname": self.host,
            "port": self.port,
            "server_hostname": self.hostname,
            "authenticator": self.handler.authenticate,
            "auth_exclude_mechanism": [m for m in ALL_MECHANISMS if m not in self.mechanisms],
            "auth_require_tls": self.auth_require_tls,
            "data_size_limit": self.size_limit,
            "timeout": self.idle_timeout,
            "decode_data": False,
            "enable_SMTPUTF8": True,
        }
        if self.tls != "none":
            assert self.tls_materials is not None
            context = self.tls_materials.server_context(self.cert)
            if self.tls == "starttls":
                kwargs["tls_context"] = context
                kwargs["require_starttls"] = self.require_starttls
            else:
                kwargs["ssl_context"] = context
                # aiosmtpd only knows STARTTLS: an implicit-TLS session has
                # no _tls_protocol and would never be offered AUTH.
                kwargs["auth_require_tls"] = False
        return _Controller(self, self.handler, **kwargs)

    def start(self) -> SMTPServer:
        """Start listening; return self. Retries another port if taken (unless fixed)."""
        if self._controller is not None:
            raise RuntimeError(f"{self!r} is already running")
        for attempt in range(5):
            if not self._port_fixed:
                self.port = free_port(self.host)
            controller = self._make_controller()
            try:
                controller.start()
            except OSError:
                controller.stop(no_assert=True)
                controller.loop.close()
                if self._port_fixed or attempt == 4:
                    raise
                continue
            self._controller = controller
            self._port_fixed = True  # restart() comes back on the same port
            return self
        raise AssertionError("unreachable")  # pragma: no cover

    def drop_connections(self, reply: str | None = None, timeout: float = 5.0) -> None:
        """Cut every open client connection (server keeps listening).

        Args:
            reply: A line to send first (e.g. ``"421 4.4.2 bye"``); default none.
            timeout: Seconds to wait for the connections to be gone.
        """
        controller = self._controller
        if controller is None:
            return
        dropped = set(self._active)
        for protocol in dropped:
            controller.loop.call_soon_threadsafe(protocol._drop, reply)
        # Clients may reconnect at once; only the connections cut here are waited for.
        _wait_until(lambda: not (dropped & self._active), timeout, "connections to close")

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

    def __enter__(self) -> SMTPServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ------------------------------------------------------------- scripted server


class ClientClosed(ConnectionError):
    """The client closed the connection (or the server is stopping)."""


class ScriptConnection:
    """One client connection of a :class:`ScriptedServer`, as seen by the script.

    Attributes:
        index: 0 for the server's first connection, 1 for the next, ...
        received: Every line the client sent (decoded, without CRLF).
        data: Every DATA payload read by :meth:`read_until_data_end`.
        transcript: ``("C" | "S", bytes)`` pairs: exactly what went each way.
        ended_by: The I/O error that ended the script, if any.
    """

    def __init__(self, server: ScriptedServer, sock: socket.socket, index: int) -> None:
        """Wrap an accepted socket (for :class:`ScriptedServer` only)."""
        self.index = index
        self.received: list[str] = []
        self.data: list[bytes] = []
        self.transcript: list[tuple[str, bytes]] = []
        self.ended_by: BaseException | None = None
        self._server = server
        self._sock = sock
        self._buffer = bytearray()
        self._closed = False

    # ---- output --------------------------------------------------------

    def send(self, line: str | bytes) -> None:
        """Send one reply line; CRLF is added unless already there."""
        data = line.encode("utf-8") if isinstance(line, str) else line
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        self.send_raw(data)

    def send_raw(self, data: bytes) -> None:
        """Send bytes exactly as given."""
        self.transcript.append(("S", data))
        self._sock.sendall(data)

    # ---- input ---------------------------------------------------------

    def _fill(self, deadline: float) -> None:
        """Receive more bytes into the buffer, watching the stop flag."""
        while True:
            if self._server._stopping.is_set():
                raise ClientClosed("server stopping")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("client sent nothing in time")
            self._sock.settimeout(min(remaining, 0.05))
            try:
                chunk = self._sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            if not chunk:
                raise ClientClosed("client closed the connection")
            self.transcript.append(("C", chunk))
            self._buffer += chunk
            return

    def readline(self, timeout: float | None = None) -> str:
        """Read one line (CRLF or LF ended) and return it without the ending.

        Raises:
            ClientClosed: The client hung up (or the server is stopping).
            TimeoutError: No full line within ``timeout`` (default: server's).
        """
        deadline = time.monotonic() + (self._server.timeout if timeout is None else timeout)
        while (end := self._buffer.find(b"\n")) < 0:
            self._fill(deadline)
        raw = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        line = raw.rstrip(b"\r\n").decode("utf-8", errors="surrogateescape")
        self.received.append(line)
        return line

    def expect(self, command: str, reply: str | None = None) -> str:
        """Read a line, assert it starts with ``command`` (any case), optionally reply.

        Raises:
            AssertionError: The client sent something else.
        """
        line = self.readline()
        assert line.upper().startswith(command.upper()), f"expected {command!r}, got {line!r}"
        if reply is not None:
            self.send(reply)
        return line

    def read_until_data_end(self, timeout: float | None = None) -> bytes:
        """Read DATA content up to and excluding ``CRLF.CRLF``; return it unstuffed-as-sent.

        The returned bytes are exactly what the client sent (dot-stuffing
        kept), ending with the CRLF before the final dot. Also appended to
        :attr:`data`.
        """
        deadline = time.monotonic() + (self._server.timeout if timeout is None else timeout)
        while True:
            if self._buffer.startswith(b".\r\n"):
                end, skip = 0, 3
                break
            end = self._buffer.find(b"\r\n.\r\n")
            if end >= 0:
                end, skip = end + 2, 3
                break
            self._fill(deadline)
        payload = bytes(self._buffer[:end])
        del self._buffer[: end + skip]
        self.data.append(payload)
        return payload

    def wait_for_close(self, timeout: float | None = None) -> None:
        """Never answer: swallow input until the client hangs up, timeout or stop.

        Use to play a server slower than the client's timeout.
        """
        deadline = time.monotonic() + (self._server.timeout if timeout is None else timeout)
        with contextlib.suppress(ClientClosed, TimeoutError):
            while True:
                self._fill(deadline)
                self._buffer.clear()

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early if the server stops (use instead of time.sleep)."""
        if self._server._stopping.wait(seconds):
            raise ClientClosed("server stopping")

    # ---- helpers ------------------------------------------------------

    def greet_and_ehlo(
        self,
        extensions: Sequence[str] = ("PIPELINING", "8BITMIME"),
        greeting: str = f"220 {SERVER_HOSTNAME} ESMTP scripted",
    ) -> str:
        """Send the greeting, read EHLO (or HELO), answer it; return the client's line."""
        self.send(greeting)
        line = self.readline()
        assert line.upper().startswith(("EHLO", "HELO")), f"expected EHLO, got {line!r}"
        lines = [SERVER_HOSTNAME, *extensions]
        for position, text in enumerate(lines):
            self.send(f"250{' ' if position == len(lines) - 1 else '-'}{text}")
        return line

    def starttls(self, cert: CertChoice = "good") -> None:
        """Send ``220 Ready`` and switch this connection to TLS (server side).

        Call after reading the client's STARTTLS line.
        """
        self.send("220 2.0.0 Ready to start TLS")
        self._buffer.clear()  # RFC 3207: discard anything pipelined before TLS
        self._wrap_tls(cert)

    def _wrap_tls(self, cert: CertChoice) -> None:
        materials = self._server.tls_materials
        if materials is None:
            raise ValueError("this ScriptedServer has no tls_materials")
        context = materials.server_context(cert)
        tls = context.wrap_socket(self._sock, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(self._server.timeout)
        self._sock = tls
        tls.do_handshake()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _interrupt(self) -> None:
        """Unblock any I/O from another thread (server stop)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


Script = Callable[[ScriptConnection], None]


class ScriptedServer:
    """A raw TCP server that runs ``script(conn)`` for each client connection.

    The script drives the conversation through a :class:`ScriptConnection`;
    I/O errors (client hung up, timeouts, TLS failures) end it quietly,
    any other exception is collected in :attr:`errors` and re-raised by
    :meth:`check`. Threads are joined by :meth:`stop`.
    """

    def __init__(
        self,
        script: Script,
        *,
        tls: Literal["none", "implicit"] = "none",
        tls_materials: TLSMaterials | None = None,
        cert: CertChoice = "good",
        timeout: float = 5.0,
        host: str = LOCALHOST,
        port: int | None = None,
    ) -> None:
        """Configure the server (nothing starts until :meth:`start`).

        Args:
            script: Called with a :class:`ScriptConnection` per connection,
                in its own thread; the connection is closed when it returns.
            tls: ``"implicit"`` wraps each connection in TLS before the script
                runs (use ``conn.starttls()`` for STARTTLS).
            tls_materials: Certificates, needed for any TLS.
            cert: Certificate for implicit TLS.
            timeout: Default seconds a read waits for the client.
            host: Address to bind.
            port: Port to bind; default a free one.
        """
        if tls == "implicit" and tls_materials is None:
            raise ValueError("tls='implicit' needs tls_materials")
        self.script = script
        self.tls = tls
        self.tls_materials = tls_materials
        self.cert: CertChoice = cert
        self.timeout = timeout
        self.host = host
        self.port = port if port is not None else 0
        #: Connections so far, in order of arrival.
        self.connections: list[ScriptConnection] = []
        #: Non-I/O exceptions raised by scripts.
        self.errors: list[BaseException] = []
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<ScriptedServer {self.host}:{self.port} tls={self.tls}>"

    @property
    def received(self) -> list[str]:
        """Every line clients sent, across all connections in arrival order."""
        with self._lock:
            connections = list(self.connections)
        return [line for conn in connections for line in conn.received]

    def start(self) -> ScriptedServer:
        """Start listening; return self."""
        if self._listener is not None:
            raise RuntimeError(f"{self!r} is already running")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(16)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stopping.clear()
        accept = threading.Thread(target=self._accept_loop, name=f"scripted-{self.port}")
        accept.daemon = True
        self._threads.append(accept)
        accept.start()
        return self

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                sock, _addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed by stop()
            sock.settimeout(self.timeout)
            with self._lock:
                conn = ScriptConnection(self, sock, len(self.connections))
                self.connections.append(conn)
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name=f"scripted-{self.port}-{conn.index}"
                )
                thread.daemon = True
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: ScriptConnection) -> None:
        try:
            if self.tls == "implicit":
                conn._wrap_tls(self.cert)
            self.script(conn)
        except OSError as error:  # hung up, timed out, TLS failed: the connection ended
            conn.ended_by = error
        except Exception as error:  # collected; re-raised by check()
            if self._stopping.is_set():
                conn.ended_by = error  # I/O cut under the script's feet by stop()
            else:
                with self._lock:
                    self.errors.append(error)
        finally:
            conn.close()

    def wait_for_connections(self, count: int, timeout: float = 5.0) -> list[ScriptConnection]:
        """Block until ``count`` connections arrived; return them all."""
        _wait_until(lambda: len(self.connections) >= count, timeout, f"{count} connections")
        with self._lock:
            return list(self.connections)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, cut connections and join every thread (idempotent).

        Raises:
            RuntimeError: A script thread did not finish (it slept with
                ``time.sleep`` instead of ``conn.sleep``?).
        """
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            connections = list(self.connections)
            threads = list(self._threads)
            self._threads.clear()
        for conn in connections:
            conn._interrupt()
        deadline = time.monotonic() + timeout
        stuck = []
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                stuck.append(thread.name)
        if stuck:
            raise RuntimeError(f"scripted server threads did not stop: {stuck}")

    def check(self) -> None:
        """Re-raise the first exception a script raised (other than I/O ends)."""
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> ScriptedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------- Redis server


class RedisServer:
    """A private ``redis-server`` subprocess on 127.0.0.1 (no persistence)."""

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = LOCALHOST,
        executable: str = "redis-server",
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Configure the server (nothing starts until :meth:`start`).

        Args:
            port: Port to bind; default a free one (kept across restarts).
            host: Address to bind.
            executable: ``redis-server`` name or path.
            startup_timeout: Seconds to wait for PING to answer.
            extra_args: More ``redis-server`` arguments, e.g. ``("--maxmemory", "1mb")``.
        """
        self.host = host
        self.port = port if port is not None else 0
        self.executable = executable
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self._port_fixed = port is not None
        self._process: subprocess.Popen[bytes] | None = None
        self._directory: Path | None = None

    def __repr__(self) -> str:
        return f"<RedisServer {self.url}>"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """URL of database ``db`` on this server."""
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def running(self) -> bool:
        """Whether the subprocess is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running server."""
        return self._process.pid if self._process is not None else None

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        """Return a new ``redis.Redis`` for database ``db`` (close it when done)."""
        import redis  # noqa: PLC0415 - only Redis users need redis-py

        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 5.0)
        return redis.Redis(host=self.host, port=self.port, db=db, **kwargs)

    def _log_tail(self) -> str:
        if self._directory is None:
            return ""
        with contextlib.suppress(OSError):
            return (self._directory / "redis.log").read_text(errors="replace")[-2000:]
        return ""

    def _launch(self) -> bool:
        """Start the process and wait for PING; False if it died (port taken?)."""
        import redis  # noqa: PLC0415

        executable = shutil.which(self.executable)
        if executable is None:
            raise FileNotFoundError(f"{self.executable!r} not found; apt-get install redis-server")
        self._directory = Path(tempfile.mkdtemp(prefix="mailworker-redis-"))
        command = [
            executable,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._directory),
            "--daemonize", "no",
            "--databases", "16",
            "--loglevel", "warning",
            "--logfile", str(self._directory / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        probe = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self._process.poll() is not None:
                    return False
                try:
                    if probe.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"redis-server did not answer PING in {self.startup_timeout}s\n"
                        f"{self._log_tail()}"
                    )
                time.sleep(0.01)
        finally:
            probe.close()

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; return self.

        Raises:
            FileNotFoundError: No ``redis-server`` executable.
            RuntimeError: It exited (log tail in the message).
            TimeoutError: It did not answer in ``startup_timeout`` seconds.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        for attempt in range(5):
            if not self._port_fixed:
                self.port = free_port(self.host)
            try:
                started = self._launch()
            except BaseException:
                self.stop()
                raise
            if started:
                self._port_fixed = True
                return self
            log = self._log_tail()
            self.stop()
            if self._port_fixed or attempt == 4:
                raise RuntimeError(f"redis-server exited during start:\n{log}")
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Terminate the server and delete its directory (idempotent)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, wait ``down_for`` seconds, start again on the same port (data is lost)."""
        self.stop()
        if down_for > 0:
            time.sleep(down_for)
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
