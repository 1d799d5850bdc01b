"""One SMTP session, held open and reused for message after message."""

from __future__ import annotations

import contextlib
import smtplib
import ssl
import time
from collections.abc import Iterator, Sequence
from types import TracebackType

import structlog

from mailworker.errors import (
    InvalidMessageError,
    SMTPAuthError,
    SMTPError,
    SMTPNotSupportedError,
    SMTPProtocolError,
    SMTPReplyError,
    SMTPServerDisconnected,
    SMTPTimeoutError,
    SMTPTLSError,
    Stage,
)
from mailworker.smtp import auth, oauth
from mailworker.smtp._batch import Batch, Item, checked_dsn, prepare
from mailworker.smtp._client import Client
from mailworker.smtp._setup import SessionInfo, classify, ehlo_name, tls_context
from mailworker.smtp.dsn import DSN
from mailworker.smtp.envelope import build_envelope, mail_params
from mailworker.smtp.profile import Profile
from mailworker.smtp.reply import Reply
from mailworker.smtp.result import SendResult
from mailworker.smtp.transcript import Transcript

log = structlog.get_logger("mailworker.smtp")


class SMTPSession:
    """A client session that connects once and sends many messages.

    Example::

        profile = Profile.from_url("smtps://app:secret@smtp.example.com")
        with SMTPSession(profile) as session:
            result = session.send("app@example.com", ["ann@example.org"], message_bytes)
            print(result.reply, result.accepted)

    ``send`` connects on first use, checks an idle session with NOOP, reconnects
    when the server has closed it, and starts a new session after
    ``profile.max_messages``. ``close`` always sends QUIT while the socket is open.
    A session is not thread-safe: use one per thread.
    """

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.info: SessionInfo | None = None
        #: Connection-level lines (greeting, EHLO, AUTH, NOOP, QUIT) of the session.
        self.transcript = Transcript()
        #: Sessions opened so far (1 plus every reconnect).
        self.connections = 0
        self._client: Client | None = None
        self._sent = 0
        self._last_used = 0.0
        self._deadline: float | None = None
        #: Use CHUNKING when offered; off for good once a server offered it and then
        #: did not recognise BDAT.
        self._chunking = True

    def __repr__(self) -> str:
        state = "open" if self.connected else "closed"
        return f"<SMTPSession {self.profile.redacted_url()} {state}, {self._sent} sent>"

    def __enter__(self) -> SMTPSession:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether a connection is open (the server may still have gone away)."""
        return self._client is not None and self._client.alive

    # -- connecting ------------------------------------------------------------

    def connect(self) -> None:
        """Connect, read the greeting, EHLO, STARTTLS and AUTH as the profile says.

        Does nothing when already connected.

        Raises:
            SMTPError: with ``stage`` and ``is_transient`` set; the session is closed.
        """
        if self.connected:
            return
        try:
            self._open()
        except BaseException:
            # Never leave a session half set up (greeted but without STARTTLS or AUTH
            # yet) for the next send to use: whatever stopped us, it goes.
            self._drop(send_quit=False)
            raise

    def _open(self) -> None:
        profile = self.profile
        context = None
        if profile.uses_tls:
            try:
                context = tls_context(
                    profile.verify, profile.ca_file, profile.client_cert, profile.client_key
                )
            except (ssl.SSLError, OSError) as exc:
                # A ca_file that is not PEM, a key that does not match its certificate.
                reason = getattr(exc, "reason", None) or exc.strerror or type(exc).__name__
                raise SMTPTLSError(
                    f"cannot set up TLS from the profile's ca_file/client_cert/client_key: "
                    f"{reason}",
                    stage="tls",
                ) from None
            if not profile.verify:
                log.warning("smtp.tls_unverified", profile=profile.name, host=profile.host)
        self.transcript = Transcript()
        self._client = client = Client(
            local_hostname=profile.local_hostname or "localhost",
            connect_timeout=self._budget(profile.timeouts.connect, "connect"),
            greeting_timeout=self._budget(profile.timeouts.greeting, "connect"),
            implicit_tls=context if profile.security == "tls" else None,
        )
        client.transcript = self.transcript
        self.connections += 1
        self._sent = 0
        with self._stage("connect"):
            client.connect(profile.host, profile.port)
        greeting = client.last_reply
        if greeting.code != 220:
            raise self._fail(SMTPReplyError, "server refused the session", "connect", greeting)
        client.local_hostname = ehlo_name(profile, client.sock)
        capabilities = self._hello()
        if profile.security == "starttls":
            assert context is not None
            capabilities = self._starttls(context)
        mechanism = self._authenticate() if profile.wants_auth else None
        self.info = SessionInfo(
            peer=f"{profile.host}:{profile.port}",
            greeting=greeting.text,
            capabilities=capabilities,
            tls=client.tls_info(),
            auth_mechanism=mechanism,
        )
        self._last_used = time.monotonic()
        log.info(
            "smtp.connected",
            profile=profile.name,
            peer=self.info.peer,
            greeting=self.info.greeting,
            capabilities=list(capabilities),
            auth_mechanism=mechanism,
            **self.info.tls,
        )

    def _hello(self) -> tuple[str, ...]:
        client = self._require()
        with self._stage("ehlo"):
            client.ehlo()
            reply = client.last_reply
            # HELO only when EHLO itself is refused (5xx), never on a 4xx or 421.
            if 500 <= reply.code < 600:
                client.helo()
                reply = client.last_reply
        if reply.code != 250:
            raise self._fail(SMTPReplyError, "server refused EHLO and HELO", "ehlo", reply)
        return tuple(line for line in reply.lines[1:] if line) if client.does_esmtp else ()

    def _starttls(self, context: ssl.SSLContext) -> tuple[str, ...]:
        client = self._require()
        if not client.has_extn("starttls"):
            raise self._fail(
                SMTPTLSError,
                "server does not offer STARTTLS; refusing to continue in clear text "
                "(the profile requires STARTTLS)",
                "tls",
            )
        with self._stage("tls"):
            reply = client.command("STARTTLS")
        if reply.code != 220:
            raise self._fail(SMTPTLSError, "server refused STARTTLS", "tls", reply)
        with self._stage("tls", self.profile.timeouts.connect):
            client.start_tls(context, self.profile.host)
        return self._hello()

    def _authenticate(self) -> str:
        client = self._require()
        if not client.has_extn("auth"):
            raise self._fail(SMTPNotSupportedError, "server does not offer AUTH", "auth")
        offered = client.esmtp_features["auth"].split()
        try:
            mechanism = auth.choose_mechanism(self.profile, offered)
        except SMTPNotSupportedError as exc:
            raise self._fail(SMTPNotSupportedError, exc.message, "auth") from None
        token = self._oauth_token(refresh=False) if mechanism == "XOAUTH2" else None
        reply = self._auth_exchange(mechanism, token)
        if token is not None and auth.token_refused(reply):
            # The token expired early or was revoked: one fresh token, one more AUTH on
            # this connection, never a loop. The same token again would get the same no.
            fresh = self._oauth_token(refresh=True)
            if fresh != token:
                log.info("smtp.oauth_token_refused", profile=self.profile.name, retry=True)
                reply = self._auth_exchange(mechanism, fresh)
        if reply.code != 235:
            raise self._fail(SMTPAuthError, f"server refused AUTH {mechanism}", "auth", reply)
        return mechanism

    def _auth_exchange(self, mechanism: str, token: str | None) -> Reply:
        client = self._require()
        answer, initial = auth.authobject(mechanism, self.profile, token=token)
        with self._stage("auth"), client.redacting():
            return auth.authenticate(client, mechanism, answer, initial=initial)

    def _oauth_token(self, *, refresh: bool) -> str:
        assert self.profile.oauth_token_provider is not None
        try:
            return oauth.get_token(self.profile.oauth_token_provider, refresh=refresh)
        except oauth.OAuthTokenError as exc:
            # Ours name the endpoint and the fix, never a secret; a refused grant
            # (invalid_grant) is permanent, an unreachable endpoint transient.
            message = f"no OAuth token: {exc}"
            transient = exc.is_transient
        except Exception as exc:
            # A provider of the user's: its text may quote the credentials. Say what
            # failed, not how; the next try may work.
            message = f"the OAuth token provider failed: {type(exc).__name__}"
            transient = True
        raise self._fail(SMTPAuthError, message, "auth", transient=transient)

    # -- sending ---------------------------------------------------------------

    def send(
        self,
        envelope_from: str,
        recipients: Sequence[str],
        message: bytes,
        *,
        deadline: float | None = None,
        dsn: DSN | None = None,
    ) -> SendResult:
        """Send one message; returns the per-recipient outcome.

        Args:
            envelope_from: the MAIL FROM address (``""`` for the null sender).
            recipients: RCPT TO addresses.
            message: the RFC 5322 message; line endings are normalised to CRLF and,
                with DATA, leading dots stuffed, so nothing in it can end the data
                early (with CHUNKING it goes as a counted BDAT chunk, one round trip
                with PIPELINING).
            deadline: a ``time.monotonic()`` time by which the send must be over,
                connecting included; every stage's timeout (which bounds a whole
                reply, however slowly it comes) is cut to fit it.
            dsn: delivery status notifications to ask for (RFC 3461). When the server
                does not offer DSN the message goes without the parameters, and the
                result's ``dsn`` is ``"not_offered"``.

        Returns:
            The result when at least one recipient accepted the message; refused
            recipients are listed there as deferred (4xx) or rejected (5xx). When
            the server takes fewer recipients per transaction (452), the rest go in
            further transactions at once; if one of those fails, its recipients
            are deferred or rejected in the result rather than raised, for the
            others already have the message.

        Raises:
            SMTPRecipientsRefused: no recipient was accepted.
            SMTPError: any other failure, with ``stage`` and ``is_transient``.
        """
        item = prepare(0, envelope_from, recipients, message, prefix="")
        [result] = self._batch([item], deadline, checked_dsn(dsn))
        if isinstance(result, SMTPError):
            raise result
        return result

    def send_many(
        self,
        items: Sequence[tuple[str, Sequence[str], bytes]],
        *,
        deadline: float | None = None,
        dsn: DSN | None = None,
    ) -> list[SendResult | SMTPError]:
        """Send several messages, their transactions pipelined into each other.

        With CHUNKING and PIPELINING the next message's commands and content are
        written before the replies to the previous ones are read, within bounded
        windows; with DATA the next message follows the previous one's end of data.
        Each message is treated exactly as :meth:`send` treats it.

        Args:
            items: ``(envelope_from, recipients, message)`` for each message, as
                :meth:`send` takes them.
            deadline: a ``time.monotonic()`` time by which the whole batch must be
                over; messages not sent by then get an ``SMTPTimeoutError``.
            dsn: delivery status notifications to ask for, for every message.

        Returns:
            One entry per item, in order: the :class:`SendResult` ``send`` would have
            returned, or the :class:`SMTPError` it would have raised. A message whose
            content went out without a verdict (connection lost) has an error with
            ``in_doubt`` set; messages that never went out (the connection was lost
            before and could not be opened again) have a transient error.

        Raises:
            InvalidMessageError: an item is malformed (the field names its index, as
                ``items[3].message``); nothing was sent.
        """
        if not isinstance(items, (list, tuple)):
            raise InvalidMessageError("items", "must be a list of (from, recipients, message)")
        prepared = []
        for index, entry in enumerate(items):
            if not isinstance(entry, tuple) or len(entry) != 3:
                raise InvalidMessageError(
                    f"items[{index}]", "must be a tuple (envelope_from, recipients, message)"
                )
            sender, recipients, message = entry
            prepared.append(prepare(index, sender, recipients, message, prefix=f"items[{index}]."))
        return self._batch(prepared, deadline, checked_dsn(dsn))

    def _batch(
        self, items: list[Item], deadline: float | None, dsn: DSN | None
    ) -> list[SendResult | SMTPError]:
        self._deadline = deadline
        try:
            return Batch(self, items, dsn).run()
        finally:
            self._deadline = None
            if self._client is not None:
                self._client.deadline = None

    def _after_failure(self, exc: SMTPError) -> None:
        """End a failed transaction: RSET, or drop a session the server is closing."""
        if exc.code == 421:
            self._drop(send_quit=False)
        elif self.connected:
            self._reset()

    def _ensure_ready(self) -> bool:
        """Connect or check the held session; True if a new session was opened."""
        if not self.connected:
            self.connect()
            return True
        if self._require().stale():
            # Closed by the server while idle (maybe with a 421 first): found before
            # a pipelined group is written into a connection that is gone.
            log.info("smtp.reconnect", profile=self.profile.name, reason="closed while idle")
            self._drop(send_quit=False)
            self.connect()
            return True
        if self._sent >= self.profile.max_messages:
            log.info("smtp.recycle", profile=self.profile.name, sent=self._sent)
            self.close()
            self.connect()
            return True
        if time.monotonic() - self._last_used >= self.profile.noop_after:
            try:
                # A half-open connection (a NAT that forgot it) must not cost minutes.
                with self._stage("connect", min(self.profile.timeouts.command, 30.0)):
                    reply = self._require().command("NOOP")
                if reply.code != 250:
                    raise SMTPReplyError("NOOP refused", stage="connect", code=reply.code)
            except SMTPError:
                self._drop(send_quit=False)
                self.connect()
                return True
        return False

    def probe(self, envelope_from: str = "") -> Reply:
        """Check that the server would take mail from ``envelope_from``: MAIL FROM,
        then RSET, no message. A server that wants AUTH first says so here (530).

        Raises:
            SMTPReplyError: the sender was refused (``stage="mail"``).
            SMTPError: connecting or the exchange failed.
        """
        envelope = build_envelope(envelope_from, ["postmaster"], b"\r\n")
        self._ensure_ready()
        client = self._require()
        params = [p for p in mail_params(envelope, client.esmtp_features) if p == "SMTPUTF8"]
        client.command_encoding = "utf-8" if envelope.utf8 else "ascii"
        try:
            with self._stage("mail", self.profile.timeouts.mail):
                reply = client.command(" ".join([f"MAIL FROM:<{envelope_from}>", *params]))
        finally:
            client.command_encoding = "ascii"
        if not reply.ok:
            raise self._fail(SMTPReplyError, "server refused the sender", "mail", reply)
        self._reset()
        return reply

    # -- closing ---------------------------------------------------------------

    def close(self) -> None:
        """Send QUIT if the socket is open, then close it. Never raises."""
        self._drop(send_quit=True)

    def abort(self) -> None:
        """Close the socket at once, without QUIT: for an exchange cut off midway
        (e.g. by a time limit), where the server's next reply would answer a
        command of the past. Never raises."""
        self._drop(send_quit=False)

    def _drop(self, *, send_quit: bool) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        client.transcript = self.transcript
        client.deadline = self._deadline  # QUIT too ends by the send's deadline
        send_quit = send_quit and client.alive
        if send_quit:
            with contextlib.suppress(OSError, smtplib.SMTPException, ValueError):
                client.set_timeout(self.profile.timeouts.quit)
                client.command("QUIT")
        with contextlib.suppress(OSError):
            client.close()
        log.info("smtp.closed", profile=self.profile.name, sent=self._sent, quit=send_quit)

    def _reset(self) -> None:
        """RSET after a failed transaction; a session that refuses it is dropped."""
        try:
            with self._stage("reset"):
                reply = self._require().command("RSET")
            if reply.code != 250:
                self._drop(send_quit=True)
        except SMTPError:
            self._drop(send_quit=False)

    # -- errors ------------------------------------------------------------------

    def _require(self) -> Client:
        if self._client is None:
            raise SMTPServerDisconnected("the session is not connected", stage="connect")
        return self._client

    def _fail(
        self,
        cls: type[SMTPError],
        message: str,
        stage: Stage,
        reply: Reply | None = None,
        *,
        transient: bool | None = None,
    ) -> SMTPError:
        """Build an error for a refused connection step and close the session."""
        exc = cls(
            message,
            stage=stage,
            code=reply.code if reply else None,
            enhanced_code=reply.enhanced_code if reply else None,
            reply=reply.text if reply else "",
            transient=transient,
        )
        exc.transcript = self.transcript.as_strings()
        # A refused greeting or a 421 means the server closes; otherwise say QUIT.
        self._drop(send_quit=not (reply and reply.code in (421, 554) and stage == "connect"))
        return exc

    def _budget(self, timeout: float, stage: Stage) -> float:
        """``timeout`` cut to what is left before the send's deadline."""
        if self._deadline is None:
            return timeout
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise SMTPTimeoutError("the send's deadline has passed", stage=stage)
        return min(timeout, left)

    @contextlib.contextmanager
    def _stage(self, stage: Stage, timeout: float | None = None) -> Iterator[None]:
        """Run one step under its timeout; socket, TLS and smtplib failures become
        SMTPError (the session is dropped) carrying the session transcript."""
        client = self._client
        budget = self._budget(self.profile.timeouts.command if timeout is None else timeout, stage)
        if client is not None:
            # The budget bounds each reply as a whole; the deadline, everything.
            client.deadline = self._deadline
            if client.alive:
                client.set_timeout(budget)
        try:
            yield
        except SMTPError:
            raise
        except Exception as exc:
            error = classify(exc, stage, self.profile.host)
            if error is None:
                raise
            error.transcript = self.transcript.as_strings()
            # smtplib closes the socket itself after a failed read; where it is still
            # open (garbage, a stalled write) say QUIT — unless we stopped inside the
            # message content, where QUIT would be read as one more line of it.
            stuck = isinstance(error, (SMTPTimeoutError, SMTPProtocolError))
            self._drop(send_quit=stuck and not (client is not None and client.in_content))
            raise error from exc
