"""The SMTP client layer: usable on its own, knows nothing of Celery or Redis."""

from mailworker.smtp._setup import SessionInfo
from mailworker.smtp.reply import Reply
from mailworker.smtp.result import RecipientResult, SendResult
from mailworker.smtp.session import SMTPSession
from mailworker.smtp.transcript import Transcript, TranscriptLine

__all__ = [
    "RecipientResult",
    "Reply",
    "SMTPSession",
    "SendResult",
    "SessionInfo",
    "Transcript",
    "TranscriptLine",
]
