"""Flask integration (``pip install "mailworker[flask]"``).

.. code-block:: python

    from flask import Flask
    from mailworker.contrib.flask import MailWorker

    mail = MailWorker()

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["MAILWORKER_BROKER_URL"] = "redis://localhost:6379/0"
        app.config["MAILWORKER_DEFAULT_FROM"] = "App <app@example.com>"
        mail.init_app(app)
        return app

    # in a view or a CLI command:
    result = mail.send(to="ann@example.org", subject="Welcome", text="Hi Ann",
                       html="<p>Hi Ann</p>", attachments=[("terms.pdf", pdf_bytes)])

``app.config`` keys (the same names as the worker's environment variables):

==============================  ===========================================================
``MAILWORKER_BROKER_URL``       where to publish (default: env ``MAILWORKER_BROKER_URL``,
                                then ``redis://localhost:6379/0``)
``MAILWORKER_CELERY_APP``       or publish through this Celery app (an app or
                                ``"module:app"``); not together with the broker URL
``MAILWORKER_DEFAULT_FROM``     ``from_email`` when :meth:`MailWorker.send` gets none
                                (else the worker's ``MAILWORKER_DEFAULT_FROM``)
``MAILWORKER_PROFILE``          the worker's SMTP profile (default ``"default"``)
``MAILWORKER_QUEUE``            the Celery queue (default: the app's routing, ``celery``)
==============================  ===========================================================

The SMTP profiles are the worker's business: ``mailworker worker`` reads them from its own
environment (``MAILWORKER_SMTP_URL``...).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from mailworker.contrib import import_extra

import_extra("flask", "flask")

from celery import Celery  # noqa: E402
from celery.result import AsyncResult  # noqa: E402
from flask import Flask, current_app  # noqa: E402

from mailworker.errors import ConfigError  # noqa: E402
from mailworker.message import MailPayload  # noqa: E402
from mailworker.queue.names import DEFAULT_BROKER_URL, SEND_MAIL  # noqa: E402
from mailworker.queue.producer import Producer, load_celery_app, producer_app  # noqa: E402

__all__ = ["AttachmentSpec", "MailWorker"]

#: An attachment for :meth:`MailWorker.send`: a file path, ``(filename, content)``,
#: ``(filename, content, mimetype)``, or a dict with ``filename``, ``content`` and
#: optionally ``mimetype`` and ``content_id`` (an inline image for ``<img src="cid:...">``).
#: ``content`` is bytes, or str for text (sent as UTF-8).
AttachmentSpec: TypeAlias = (
    str | os.PathLike[str] | tuple[str, Any] | tuple[str, Any, str] | Mapping[str, Any]
)
#: Extension key in ``app.extensions``.
EXTENSION = "mailworker"
#: A stand-in sender for checking a message in the web process when the worker's
#: ``MAILWORKER_DEFAULT_FROM`` will provide the real one.
_WORKER_DEFAULT_FROM = "worker-default@example.invalid"


@dataclass(frozen=True)
class _State:
    """What one Flask app publishes with."""

    producer: Producer
    profile: str
    default_from: str | None


class MailWorker:
    """Queues mail for ``mailworker worker`` from a Flask app.

    Bind it to one app (``MailWorker(app)``) or create it unbound and call
    :meth:`init_app` in an app factory; :meth:`send` then uses the current app's
    configuration (it works in requests, CLI commands and ``app.app_context()``).
    """

    def __init__(self, app: Flask | None = None) -> None:
        self.app = app
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Read ``app.config["MAILWORKER_*"]`` and register the extension.

        Raises:
            ConfigError: a setting is malformed (the message names it).
        """
        config = app.config
        for key in ("MAILWORKER_BROKER_URL", "MAILWORKER_DEFAULT_FROM", "MAILWORKER_QUEUE"):
            _optional_str(config, key)
        if config.get("MAILWORKER_CELERY_APP") is not None and config.get("MAILWORKER_BROKER_URL"):
            raise ConfigError(
                'app.config["MAILWORKER_CELERY_APP"]: set either it or MAILWORKER_BROKER_URL, '
                "not both (the Celery app publishes to its own broker)"
            )
        app.extensions[EXTENSION] = None  # resolved at first use: the Celery app may import us

    def _state(self) -> _State:
        app = self.app if self.app is not None else current_app
        if EXTENSION not in app.extensions:
            raise RuntimeError(
                "MailWorker is not initialised for this Flask app; call mail.init_app(app)"
            )
        state = app.extensions[EXTENSION]
        if isinstance(state, _State):
            return state
        config = app.config
        queue = _optional_str(config, "MAILWORKER_QUEUE")
        celery_app: Celery
        if config.get("MAILWORKER_CELERY_APP") is not None:
            setting = 'app.config["MAILWORKER_CELERY_APP"]'
            celery_app = load_celery_app(config["MAILWORKER_CELERY_APP"], setting)
        else:
            url = _optional_str(config, "MAILWORKER_BROKER_URL")
            celery_app = producer_app(
                url or os.environ.get("MAILWORKER_BROKER_URL") or DEFAULT_BROKER_URL
            )
        state = _State(
            producer=Producer(celery_app, queue=queue),
            profile=_optional_str(config, "MAILWORKER_PROFILE") or "default",
            default_from=_optional_str(config, "MAILWORKER_DEFAULT_FROM"),
        )
        app.extensions[EXTENSION] = state
        return state

    def send(
        self,
        to: str | Iterable[str],
        subject: str,
        text: str | None = None,
        html: str | None = None,
        *,
        from_email: str | None = None,
        cc: str | Iterable[str] | None = None,
        bcc: str | Iterable[str] | None = None,
        reply_to: str | Iterable[str] | None = None,
        headers: Mapping[str, str] | None = None,
        attachments: Iterable[AttachmentSpec] | None = None,
        profile: str | None = None,
        idempotency_key: str | None = None,
        task_id: str | None = None,
        list_unsubscribe: str | Iterable[str] | None = None,
        list_unsubscribe_post: bool = False,
        dsn: Mapping[str, Any] | None = None,
    ) -> AsyncResult[Any]:
        """Queue one message as a ``mailworker.send_mail`` task.

        The message is checked here first, so a bad address or header fails in the
        request rather than in the dead-letter store.

        Args:
            to: an address or addresses (``"Ann <ann@example.org>"`` is fine).
            subject: the subject.
            text: the plain-text body.
            html: the HTML body (with ``text``: multipart/alternative).
            from_email: the sender; default ``MAILWORKER_DEFAULT_FROM`` of the app, else
                of the worker.
            cc: more visible recipients.
            bcc: hidden recipients.
            reply_to: Reply-To addresses.
            headers: extra header fields.
            attachments: see :data:`AttachmentSpec`; bytes are base64-encoded for you.
            profile: the worker's SMTP profile (default ``MAILWORKER_PROFILE``).
            idempotency_key: the message is sent at most once per key (default: task id).
            task_id: the Celery task id (default: a new UUID).
            list_unsubscribe: ``https:``/``mailto:`` URIs for List-Unsubscribe.
            list_unsubscribe_post: add one-click List-Unsubscribe-Post (RFC 8058);
                needs an https URI.
            dsn: delivery status notifications to ask for, e.g.
                ``{"notify": ["FAILURE", "DELAY"], "ret": "HDRS", "envid": "order-42"}``.

        Returns:
            The task's ``AsyncResult``: ``.id`` is the task id; ``.get(timeout=...)``
            waits for the outcome (``{"status": "sent", "message_id": ..., ...}``).

        Raises:
            InvalidMessageError: the message is invalid; ``field`` names the argument.
            PublishError: the broker is unreachable.
            RuntimeError: no app context, or :meth:`init_app` was not called.
        """
        state = self._state()
        kwargs: dict[str, Any] = {
            "to": _addresses(to),
            "subject": subject,
            "text": text,
            "html": html,
            "from_email": from_email or state.default_from,
            "cc": _addresses(cc),
            "bcc": _addresses(bcc),
            "reply_to": _addresses(reply_to),
            "headers": dict(headers) if headers is not None else None,
            "attachments": [_attachment(i, a) for i, a in enumerate(attachments or ())] or None,
            "profile": profile or state.profile,
            "idempotency_key": idempotency_key,
            "list_unsubscribe": _addresses(list_unsubscribe),
            "list_unsubscribe_post": list_unsubscribe_post or None,
            "dsn": dict(dsn) if dsn is not None else None,
        }
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        MailPayload.from_task_kwargs(
            kwargs, default_from=state.default_from or _WORKER_DEFAULT_FROM
        )
        return state.producer.publish(SEND_MAIL, kwargs, task_id=task_id)


def _optional_str(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f'app.config["{key}"]: must be a non-empty string, not {value!r}')
    return value.strip()


def _addresses(value: str | Iterable[str] | None) -> str | list[str] | None:
    if value is None or isinstance(value, str):
        return value
    return list(value)


def _content(index: int, content: object) -> str:
    if isinstance(content, str):
        content = content.encode("utf-8")
    if not isinstance(content, (bytes, bytearray, memoryview)):
        raise TypeError(
            f"attachments[{index}]: content must be bytes or str, not {type(content).__name__}"
        )
    return base64.b64encode(bytes(content)).decode("ascii")


def _attachment(index: int, spec: AttachmentSpec) -> dict[str, str]:
    """The task's JSON form of one attachment: content base64-encoded."""
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        return {"filename": path.name, "content": _content(index, path.read_bytes())}
    if isinstance(spec, tuple):
        if len(spec) not in (2, 3):
            raise TypeError(
                f"attachments[{index}]: give (filename, content) or (filename, content, mimetype)"
            )
        result = {"filename": str(spec[0]), "content": _content(index, spec[1])}
        if len(spec) == 3:
            result["mimetype"] = str(spec[2])
        return result
    if isinstance(spec, Mapping):
        result = {str(k): v for k, v in spec.items() if v is not None}
        result["content"] = _content(index, spec.get("content"))
        return result
    raise TypeError(
        f"attachments[{index}]: give a path, a (filename, content[, mimetype]) tuple or a dict, "
        f"not {type(spec).__name__}"
    )
