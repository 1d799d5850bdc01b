"""The recording, fault-injecting aiosmtpd handler of the test SMTP server, and the
messages it records."""

from __future__ import annotations

import asyncio
import email.policy
import itertools
import secrets
import threading
from collections import Counter
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, TLSSetupException

from mailworker.dev._smtp import BaseProtocol, edit_ehlo, ehlo_keyword
from tests.servers.auth import AuthAttempt, check_credentials
from tests.servers.base import DEFAULT_PASSWORD, DEFAULT_TOKEN, DEFAULT_USER


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
        greeting_reply: If set, new connections are greeted with this reply
            instead of ``220`` (e.g. ``"421 4.3.2 try later"``, which closes).
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
        self.greeting_reply: str | None = None
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

    def copies(self) -> Counter[str]:
        """How many accepted copies each envelope recipient got."""
        return Counter(rcpt for message in list(self.messages) for rcpt in message.rcpt_tos)

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

    async def _answer(self, command: str, enhanced: str, plain: str) -> str:
        """Count ``command``, wait its delay, and give the reply fitting the EHLO keywords."""
        self._count(command)
        await self._delay(command)
        return enhanced if self._enhanced else plain

    @property
    def _enhanced(self) -> bool:
        return any(ehlo_keyword(line) == "ENHANCEDSTATUSCODES" for line in self.ehlo_extra)

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
        remove = set(self.ehlo_remove)
        if not getattr(server, "offers_auth", True):
            remove.add("AUTH")
        return edit_ehlo(responses, remove=remove, add=self.ehlo_extra)

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
            tls=isinstance(server, BaseProtocol) and server.tls_version() is not None,
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
        return await self._answer("RSET", "250 2.0.0 OK", "250 OK")

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        """Count NOOP."""
        return await self._answer("NOOP", "250 2.0.0 OK", "250 OK")

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Count QUIT."""
        return await self._answer("QUIT", "221 2.0.0 Bye", "221 Bye")

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
        user, ok = check_credentials(auth_data, self.user, self.password, self.token)
        with self._cond:
            self.counts["auth_attempts"] += 1
            self.counts["auth_successes"] += ok
            self.logins.append(AuthAttempt(mechanism, user, ok))
            self._cond.notify_all()
        if ok:
            return AuthResult(success=True, auth_data=user)
        return AuthResult(success=False, handled=False)
