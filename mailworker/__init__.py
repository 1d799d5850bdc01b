"""mailworker: transactional email from Celery workers over held-open SMTP sessions."""

import importlib
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

if TYPE_CHECKING:
    from mailworker.smtp import (
        DSN,
        Profile,
        RecipientResult,
        Reply,
        SendResult,
        SessionInfo,
        SMTPSession,
        Timeouts,
    )
    from mailworker.worker.tasks import send_mail, send_message

__version__ = "0.1.0"

#: Loaded on first use: the SMTP layer alone never imports Celery, and a process that
#: only builds messages (``mailworker.message``) loads the standard library only.
_LAZY = {
    "send_mail": "mailworker.worker.tasks",
    "send_message": "mailworker.worker.tasks",
    **dict.fromkeys(
        (
            "DSN",
            "Profile",
            "RecipientResult",
            "Reply",
            "SendResult",
            "SessionInfo",
            "SMTPSession",
            "Timeouts",
        ),
        "mailworker.smtp",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mailworker' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "DSN",
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
