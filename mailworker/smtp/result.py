"""The outcome of sending one message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mailworker.smtp.dsn import DSNStatus
from mailworker.smtp.reply import Reply
from mailworker.smtp.transcript import TranscriptLine

#: Per-recipient status: accepted (250 to RCPT and to the data), deferred (4xx:
#: try again later), rejected (5xx: do not try again).
RecipientStatus = Literal["accepted", "deferred", "rejected"]


@dataclass(frozen=True)
class RecipientResult:
    """What the server said about one recipient.

    Attributes:
        code: the server's reply code; ``-1`` when the recipient's transaction
            failed without a reply (connection lost, timeout), ``reply`` says how.
        in_doubt: the content went out for this recipient but no verdict came back:
            the server may have delivered it (only in a later transaction of a
            message split for the server's recipient limit; status is deferred).
    """

    recipient: str
    status: RecipientStatus
    code: int
    reply: str
    enhanced_code: str | None = None
    in_doubt: bool = False

    @property
    def is_transient(self) -> bool:
        """True for a deferred recipient (worth another attempt)."""
        return self.status == "deferred"

    def to_dict(self) -> dict[str, object]:
        """A JSON-safe form."""
        return {
            "status": self.status,
            "code": self.code,
            "enhanced_code": self.enhanced_code,
            "reply": self.reply,
            "in_doubt": self.in_doubt,
        }


@dataclass(frozen=True)
class SendResult:
    """The outcome of :meth:`SMTPSession.send` for a message the server accepted.

    A server that takes fewer recipients per transaction than the message has
    (452 "too many recipients") gets the rest in further transactions on the same
    session (RFC 5321 §4.5.3.1.10); every recipient still appears once, and if a
    later transaction failed, its recipients are deferred or rejected here while
    the ones delivered before stay accepted.

    Attributes:
        recipients: every recipient's outcome, in the order given.
        reply: the server's final reply to the data (e.g. ``250 2.0.0 Ok: queued as X``);
            of the first transaction when there were several.
        size: bytes of message content sent (after normalisation).
        transcript: the exchange for this message (content left out).
        replies: the final reply of every transaction that delivered the message.
        dsn: for a send that asked for delivery status notifications, ``"requested"``
            (the MAIL and RCPT parameters went out) or ``"not_offered"`` (the server
            does not offer DSN: the message went without them); None otherwise.
    """

    recipients: tuple[RecipientResult, ...]
    reply: Reply
    size: int
    transcript: tuple[TranscriptLine, ...] = field(default=(), repr=False)
    replies: tuple[Reply, ...] = ()
    dsn: DSNStatus | None = None

    @property
    def accepted(self) -> list[str]:
        """Recipients the message was delivered to."""
        return [r.recipient for r in self.recipients if r.status == "accepted"]

    @property
    def refused(self) -> dict[str, RecipientResult]:
        """Recipients the server refused, with its reply."""
        return {r.recipient: r for r in self.recipients if r.status != "accepted"}

    @property
    def deferred(self) -> list[str]:
        """Refused recipients worth another attempt (4xx)."""
        return [r.recipient for r in self.recipients if r.status == "deferred"]

    @property
    def queue_id(self) -> str | None:
        """The server's queue id, when its reply names one."""
        return self.reply.queue_id
