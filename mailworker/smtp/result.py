"""The outcome of sending one message."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mailworker.smtp.reply import Reply
from mailworker.smtp.transcript import TranscriptLine

#: Per-recipient status: accepted (250 to RCPT and to the data), deferred (4xx:
#: try again later), rejected (5xx: do not try again).
RecipientStatus = Literal["accepted", "deferred", "rejected"]


@dataclass(frozen=True)
class RecipientResult:
    """What the server said about one recipient."""

    recipient: str
    status: RecipientStatus
    code: int
    reply: str
    enhanced_code: str | None = None

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
        }


@dataclass(frozen=True)
class SendResult:
    """The outcome of :meth:`SMTPSession.send` for a message the server accepted.

    Attributes:
        recipients: every recipient's outcome, in the order given.
        reply: the server's final reply to the data (e.g. ``250 2.0.0 Ok: queued as X``).
        size: bytes of message content sent (after normalisation).
        transcript: the exchange for this message (content left out).
    """

    recipients: tuple[RecipientResult, ...]
    reply: Reply
    size: int
    transcript: tuple[TranscriptLine, ...] = field(default=(), repr=False)

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
