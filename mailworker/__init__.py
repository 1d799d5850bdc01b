"""mailworker: transactional email from Celery workers over held-open SMTP sessions."""

from typing import TYPE_CHECKING, Any

from mailworker.errors import (
    ConfigError,
    DeadLetteredError,
    InvalidMessageError,
    MailworkerError,
    PublishError,
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
from mailworker.smtp import (
    Profile,
    RecipientResult,
    Reply,
    SendResult,
    SessionInfo,
    SMTPSession,
    Timeouts,
)

if TYPE_CHECKING:
    from mailworker.worker.tasks import send_mail, send_message

__version__ = "0.1.0"

#: Loaded on first use, so that using the SMTP layer alone never imports Celery.
_TASKS = ("send_mail", "send_message")


def __getattr__(name: str) -> Any:
    if name in _TASKS:
        from mailworker.worker import tasks  # noqa: PLC0415

        return getattr(tasks, name)
    raise AttributeError(f"module 'mailworker' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DeadLetteredError",
    "InvalidMessageError",
    "MailworkerError",
    "Profile",
    "PublishError",
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
