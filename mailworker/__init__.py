"""mailworker: transactional email from Celery workers over held-open SMTP sessions."""

from mailworker.config import Profile, Timeouts
from mailworker.errors import (
    ConfigError,
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

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
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
]
