"""Names both sides of the broker agree on; cheap to import (no Celery)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

#: Builds a message from fields and sends it.
SEND_MAIL: Final = "mailworker.send_mail"
#: Sends a prebuilt RFC 5322 message.
SEND_MESSAGE: Final = "mailworker.send_message"
#: Sends a batch of messages for one profile (``send_mail`` arguments each).
SEND_MAIL_BATCH: Final = "mailworker.send_mail_batch"
#: Sends a batch of prebuilt messages for one profile (``send_message`` arguments each).
SEND_MESSAGE_BATCH: Final = "mailworker.send_message_batch"
#: Every task mailworker's worker runs.
TASK_NAMES: Final = (SEND_MAIL, SEND_MESSAGE, SEND_MAIL_BATCH, SEND_MESSAGE_BATCH)
#: Where producers and workers meet unless MAILWORKER_BROKER_URL says otherwise.
DEFAULT_BROKER_URL: Final = "redis://localhost:6379/0"


def route_options(kwargs: Mapping[str, Any]) -> dict[str, str]:
    """``send_task`` routing options that send a message back where it first came from.

    A retried or re-queued message carries its origin in ``kwargs["_meta"]``: the queue
    (routing key) and, when not the default one, the exchange.
    """
    meta = kwargs.get("_meta")
    if not isinstance(meta, Mapping) or not meta.get("queue"):
        return {}
    if meta.get("exchange"):
        return {"exchange": str(meta["exchange"]), "routing_key": str(meta["queue"])}
    return {"queue": str(meta["queue"])}
