"""The one exception hierarchy of mailworker.

Whether a failure is worth retrying is decided here, once, and carried on the
error as ``is_transient`` — callers never re-derive it from codes.

Every ``__str__`` tells the whole story (stage, server reply, cause) and never
contains a secret: AUTH payloads are never put into an exception.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

#: The stages of an SMTP session an error can come from.
Stage = Literal["connect", "tls", "ehlo", "auth", "mail", "rcpt", "data", "quit", "reset"]


class MailworkerError(Exception):
    """Base class of every error mailworker raises on purpose."""


class ConfigError(MailworkerError, ValueError):
    """A setting is missing or malformed; the message names it and the fix."""


class InvalidMessageError(MailworkerError, ValueError):
    """The message payload is invalid; fix the named field. Never retried."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class DeadLetteredError(MailworkerError):
    """The message was moved to the dead-letter store; it will not be retried."""


class PublishError(MailworkerError, ConnectionError):
    """The task could not be published: the broker (or the result store) is unreachable."""


class SMTPError(MailworkerError):
    """An SMTP exchange failed; carries the reply, the stage and whether to retry.

    Attributes:
        code: the server's reply code (from the last line of its reply), or None when
            the failure had no reply (connection dropped, timeout, TLS failure).
        enhanced_code: the RFC 3463 status (``"5.1.1"``) when the server gave one.
        stage: where in the session it happened (connect, tls, ehlo, auth, mail, rcpt,
            data, quit, reset).
        reply: the server's reply text (all lines joined with newlines), if any.
        is_transient: True if trying again later may succeed (4xx, dropped
            connection, timeout); False for 5xx and trust failures.
        transcript: ``C: ...`` / ``S: ...`` lines of the failed exchange, credentials
            redacted.
        in_doubt: the whole message was sent but no reply came back (connection
            lost, timeout): the server may have accepted it.
    """

    #: Used when there is no reply code to decide from.
    default_transient = True

    def __init__(
        self,
        message: str,
        *,
        stage: Stage,
        code: int | None = None,
        enhanced_code: str | None = None,
        reply: str = "",
        transient: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.stage: Stage = stage
        self.code = code
        self.enhanced_code = enhanced_code
        self.reply = reply
        self._transient = transient
        self.transcript: list[str] = []
        self.in_doubt = False

    @property
    def is_transient(self) -> bool:
        """Whether a later attempt may succeed."""
        if self._transient is not None:
            return self._transient
        if self.code is not None and self.code >= 400:
            return self.code < 500
        return self.default_transient

    def __str__(self) -> str:
        parts = [f"[{self.stage}] {self.message}"]
        if self.code is not None:
            status = f"{self.code} {self.enhanced_code}" if self.enhanced_code else str(self.code)
            text = first_line(self.reply)
            if self.enhanced_code and text.startswith(self.enhanced_code):
                text = text[len(self.enhanced_code) :].lstrip()
            parts.append(f"server said: {status} {text}".rstrip())
        cause = self.__cause__
        if cause is not None and not isinstance(cause, SMTPError):
            parts.append(f"cause: {type(cause).__name__}: {cause}")
        if self.in_doubt:
            parts.append("in doubt: the whole message was sent, the server may have accepted it")
        parts.append("transient" if self.is_transient else "permanent")
        return " — ".join(parts)

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe description, for logs and dead-letter records."""
        return {
            "type": type(self).__name__,
            "message": str(self),
            "stage": self.stage,
            "code": self.code,
            "enhanced_code": self.enhanced_code,
            "reply": self.reply,
            "transient": self.is_transient,
            "in_doubt": self.in_doubt,
        }


class SMTPReplyError(SMTPError):
    """The server answered a command with an error reply."""


class SMTPServerDisconnected(SMTPError, ConnectionError):
    """The connection was closed or could not be established; transient."""


class SMTPTimeoutError(SMTPError, TimeoutError):
    """The server did not answer within the stage's timeout; transient."""


class SMTPProtocolError(SMTPError):
    """The server's reply could not be parsed; the session is closed. Transient."""


class SMTPTLSError(SMTPError):
    """TLS could not be established as required (untrusted or mismatched
    certificate, STARTTLS not offered); permanent until configuration changes."""

    default_transient = False


class SMTPAuthError(SMTPError):
    """Server refused our AUTH request; may be caused by invalid credentials."""

    default_transient = False


class SMTPNotSupportedError(SMTPError):
    """The message needs an extension the server lacks (SIZE, SMTPUTF8, 8BITMIME,
    AUTH); permanent."""

    default_transient = False


class SMTPRecipientsRefused(SMTPReplyError):
    """Every recipient was refused; transient if any refusal was transient.

    Attributes:
        refused: ``{address: (code, enhanced_code, reply)}`` for every recipient.
    """

    def __init__(
        self,
        message: str,
        *,
        refused: dict[str, tuple[int, str | None, str]],
        stage: Stage = "rcpt",
    ) -> None:
        transient = transient_codes([code for code, _, _ in refused.values()])
        last = next(reversed(refused.values()))
        super().__init__(
            message,
            stage=stage,
            code=last[0],
            enhanced_code=last[1],
            reply=last[2],
            transient=transient,
        )
        self.refused = refused


def first_line(text: str) -> str:
    """The first line of a (possibly multi-line) reply text."""
    return text.split("\n", 1)[0]


def transient_codes(codes: Sequence[int]) -> bool:
    """True if any code in ``codes`` is a 4xx (temporary) reply."""
    return any(400 <= c < 500 for c in codes)
