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
    from mailworker.smtp.limits import FleetLimits, Rate
    from mailworker.worker.tasks import (
        send_mail,
        send_mail_batch,
        send_message,
        send_message_batch,
    )

__version__ = "0.1.0"

#: Loaded on first use: the SMTP layer alone never imports Celery, and a process that
#: only builds messages (``mailworker.message``) loads the standard library only.
_LAZY = {
    **dict.fromkeys(
        ("send_mail", "send_mail_batch", "send_message", "send_message_batch"),
        "mailworker.worker.tasks",
    ),
    **dict.fromkeys(("FleetLimits", "Rate"), "mailworker.smtp.limits"),
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
    "FleetLimits",
    "InvalidMessageError",
    "MailworkerError",
    "Profile",
    "PublishError",
    "Rate",
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
    "send_mail_batch",
    "send_message",
    "send_message_batch",
]
