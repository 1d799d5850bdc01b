"""``EMAIL_BACKEND = "mailworker.contrib.django.EmailBackend"``: Django's mail, queued.

Every ``django.core.mail`` path ends in :meth:`EmailBackend.send_messages`, which queues one
``mailworker.send_message`` task per message. The task carries the message exactly as
Django's SMTP backend would put it on the wire — ``message.message().as_bytes(linesep="\\r\\n")``
— and the same envelope (``sanitize_address``, then the bare address smtplib sends), so
the server receives the same bytes; only the transport differs (a held-open session,
retries, dead letters).

So header fields pass through as Django writes them: ``EmailMessage(headers={
"List-Unsubscribe": "<https://example.com/unsub?u=42>, <mailto:unsub@example.com>",
"List-Unsubscribe-Post": "List-Unsubscribe=One-Click"})`` arrives with both, unchanged
(and DKIM-signed when the worker's profile signs). Delivery status notifications belong
to the envelope, not the message: ask for them per connection,
``get_connection(dsn={"notify": ["FAILURE", "DELAY"], "ret": "HDRS"})``.
"""

from __future__ import annotations

import base64
import importlib
import smtplib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mailworker.contrib import PublishError
from mailworker.contrib.django import conf
from mailworker.message import RawPayload
from mailworker.message.payload import check_dsn
from mailworker.queue.names import SEND_MESSAGE, SEND_MESSAGE_BATCH

#: Messages per send_message_batch task when send_messages() gets several (Django's
#: send_mass_mail, a loop of EmailMessages sent over one connection).
BATCH_SIZE = 100

if TYPE_CHECKING:  # Django has no type information; its classes are opaque to mypy.
    _BaseEmailBackend = object
else:
    _BaseEmailBackend = importlib.import_module("django.core.mail.backends.base").BaseEmailBackend

__all__ = ["EmailBackend", "task_kwargs"]


def _bare(address: str) -> str:
    """The address smtplib puts in ``MAIL FROM:<...>`` / ``RCPT TO:<...>`` for ``address``."""
    quoted = smtplib.quoteaddr(address)
    return quoted[1:-1] if quoted.startswith("<") and quoted.endswith(">") else quoted


def task_kwargs(
    message: Any, profile: str = "default", dsn: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The ``send_message`` arguments for a Django ``EmailMessage``; None if it has no recipients.

    ``dsn`` (the task's option, e.g. ``{"notify": ["FAILURE"]}``) is added when given.

    Raises:
        InvalidMessageError: the message cannot be sent (e.g. larger than 25 MiB), or
            ``dsn`` is malformed.
        ValueError: Django refuses an address (as its SMTP backend would).
    """
    if not message.recipients():
        return None
    settings = importlib.import_module("django.conf").settings
    sanitize_address = importlib.import_module("django.core.mail.message").sanitize_address
    # As django.core.mail.backends.smtp.EmailBackend._send does:
    encoding = message.encoding or settings.DEFAULT_CHARSET
    from_email = sanitize_address(message.from_email, encoding)
    recipients = [sanitize_address(addr, encoding) for addr in message.recipients()]
    data: bytes = message.message().as_bytes(linesep="\r\n")
    # Checked here, so a bad message fails in the caller instead of in the dead-letter store.
    payload = RawPayload(
        message=data,
        envelope_from=_bare(from_email),
        recipients=tuple(_bare(r) for r in recipients),
    )
    kwargs: dict[str, Any] = {
        "raw_b64": base64.b64encode(data).decode("ascii"),
        "envelope_from": payload.envelope_from,
        "recipients": list(payload.recipients),
        "profile": profile,
    }
    if dsn is not None:
        check_dsn("dsn", dsn)
        kwargs["dsn"] = dsn
    return kwargs


class EmailBackend(_BaseEmailBackend):
    """A Django email backend that queues each message for ``mailworker worker``.

    Use it for all mail with ``EMAIL_BACKEND = "mailworker.contrib.django.EmailBackend"``,
    or for some with ``get_connection("mailworker.contrib.django.EmailBackend",
    profile="bulk")``. After a message is queued, its task id is in
    ``message.mailworker_task_id``.

    Args:
        fail_silently: if the broker is unreachable, return the number queued so far
            instead of raising :class:`~mailworker.contrib.PublishError`. Invalid messages
            and settings always raise.
        profile: the worker's SMTP profile for these messages (default
            ``MAILWORKER["PROFILE"]``, else ``"default"``).
        queue: the Celery queue (default ``MAILWORKER["QUEUE"]``).
        dsn: delivery status notifications to ask for, for every message, e.g.
            ``{"notify": ["FAILURE", "DELAY"], "ret": "HDRS"}`` (RFC 3461; left out
            where the worker's server does not offer DSN).
        kwargs: other ``get_connection()`` arguments (``host``, ``port``, ...) are
            accepted and ignored: the worker's profile decides where mail goes.
    """

    def __init__(
        self,
        fail_silently: bool = False,
        *,
        profile: str | None = None,
        queue: str | None = None,
        dsn: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # BaseEmailBackend.__init__ only stores fail_silently.
        self.fail_silently = fail_silently
        self.profile = profile
        self.queue = queue
        self.dsn = dsn

    def send_messages(self, email_messages: Sequence[Any]) -> int:
        """Queue every message that has recipients; return how many were queued.

        Raises:
            PublishError: the broker is unreachable (unless ``fail_silently``).
            ConfigError: ``settings.MAILWORKER`` is malformed (the message names the key).
            InvalidMessageError: a message cannot be sent.
        """
        if not email_messages:
            return 0
        producer = conf.producer(queue=self.queue)
        profile = self.profile or conf.profile_name()
        prepared = [(m, task_kwargs(m, profile, self.dsn)) for m in email_messages]
        ready = [(m, kwargs) for m, kwargs in prepared if kwargs is not None]
        queued = 0
        # One message, one send_message task; more go in send_message_batch tasks of
        # BATCH_SIZE, each message handled in the worker exactly as if alone.
        size = 1 if len(ready) == 1 else BATCH_SIZE
        for start in range(0, len(ready), size):
            chunk = ready[start : start + size]
            try:
                if size == 1:
                    result = producer.publish(SEND_MESSAGE, chunk[0][1], store_result=False)
                    ids = [result.id]
                else:
                    messages = [kwargs for _, kwargs in chunk]
                    result = producer.publish(
                        SEND_MESSAGE_BATCH, {"messages": messages}, store_result=False
                    )
                    # The worker keys each message of a batch as <task id>-<n>.
                    ids = [f"{result.id}-{n}" for n in range(len(chunk))]
            except PublishError:
                if self.fail_silently:
                    # The broker is down: the rest would wait for it and fail the same way.
                    return queued
                raise
            for (message, _), task_id in zip(chunk, ids, strict=True):
                message.mailworker_task_id = task_id
            queued += len(chunk)
        return queued
