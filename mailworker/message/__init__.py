"""Messages: the task payloads, their validation, and the MIME message built from them.

Standard library only — no Celery, Redis or SMTP session code — so a web process can
validate a message before it publishes it. :mod:`mailworker.message.payload` holds the
schema; the private modules beside it hold the parts (fields, addresses, headers,
attachments, MIME building).
"""

from mailworker.message._address import to_ascii_domain
from mailworker.message._headers import check_date, check_message_id
from mailworker.message._mime import pin_header
from mailworker.message.payload import (
    DEFAULT_LIMITS,
    MAIL_FIELDS,
    MAX_KEY_LENGTH,
    MAX_MESSAGE_BYTES,
    MAX_RECIPIENTS,
    RAW_FIELDS,
    TASK_OPTIONS,
    Attachment,
    Limits,
    MailPayload,
    RawPayload,
    build_message,
    message_bytes,
)

__all__ = [
    "DEFAULT_LIMITS",
    "MAIL_FIELDS",
    "MAX_KEY_LENGTH",
    "MAX_MESSAGE_BYTES",
    "MAX_RECIPIENTS",
    "RAW_FIELDS",
    "TASK_OPTIONS",
    "Attachment",
    "Limits",
    "MailPayload",
    "RawPayload",
    "build_message",
    "check_date",
    "check_message_id",
    "message_bytes",
    "pin_header",
    "to_ascii_domain",
]
