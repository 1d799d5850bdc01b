"""Messages: the task payloads, their validation, and the MIME message built from them.

Standard library only — no Celery, Redis or SMTP session code — so a web process can
validate a message before it publishes it. :mod:`mailworker.message.payload` holds the
schema; the private modules beside it hold the parts (fields, addresses, headers,
attachments, MIME building).
"""

from mailworker.message.payload import (
    MAIL_FIELDS,
    MAX_MESSAGE_BYTES,
    RAW_FIELDS,
    TASK_OPTIONS,
    Attachment,
    MailPayload,
    RawPayload,
    build_message,
    message_bytes,
)

__all__ = [
    "MAIL_FIELDS",
    "MAX_MESSAGE_BYTES",
    "RAW_FIELDS",
    "TASK_OPTIONS",
    "Attachment",
    "MailPayload",
    "RawPayload",
    "build_message",
    "message_bytes",
]
