"""mailworker: transactional email from Celery workers over held-open SMTP sessions."""

from typing import TYPE_CHECKING, Any

from mailworker.config import Profile, Timeouts
from mailworker.errors import (
    ConfigError,
    DeadLetteredError,
    InvalidMessageError,
    MailworkerError,
    SMTPAuthError,
    SMTPError,
    SMTPNotSupportedError,
    SMTPProtocolError,
    SMTPRecipientsRefused,
    SMTPReplyError,
    SMTPServerDisconnected,
    SMTPTimeoutError,
    SMTPTLSError,
)
from mailworker.smtp import RecipientResult, Reply, SendResult, SessionInfo, SMTPSession

if TYPE_CHECKING:
    from mailworker.tasks import send_mail, send_message

__version__ = "0.1.0"

#: Loaded on first use, so that using the SMTP layer alone never imports Celery.
_TASKS = ("send_mail", "send_message")


def __getattr__(name: str) -> Any:
    if name in _TASKS:
        from mailworker import tasks  # noqa: PLC0415

        return getattr(tasks, name)
    raise AttributeError(f"module 'mailworker' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DeadLetteredError",
    "InvalidMessageError",
    "MailworkerError",
    "Profile",
    "RecipientResult",
    "Reply",
    "SMTPAuthError",
    "SMTPError",
    "SMTPNotSupportedError",
    "SMTPProtocolError",
    "SMTPRecipientsRefused",
    "SMTPReplyError",
    "SMTPServerDisconnected",
    "SMTPSession",
    "SMTPTLSError",
    "SMTPTimeoutError",
    "SendResult",
    "SessionInfo",
    "Timeouts",
    "send_mail",
    "send_message",
]
