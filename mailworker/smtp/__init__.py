"""The SMTP client layer and its profile (URL): usable on its own, knows nothing of Celery
or Redis (standard library only)."""

from mailworker.smtp._setup import SessionInfo
from mailworker.smtp.dsn import DSN
from mailworker.smtp.profile import Profile, Timeouts
from mailworker.smtp.reply import Reply
from mailworker.smtp.result import RecipientResult, SendResult
from mailworker.smtp.session import SMTPSession
from mailworker.smtp.transcript import Transcript, TranscriptLine

__all__ = [
    "DSN",
    "Profile",
    "RecipientResult",
    "Reply",
    "SMTPSession",
    "SendResult",
    "SessionInfo",
    "Timeouts",
    "Transcript",
    "TranscriptLine",
]
