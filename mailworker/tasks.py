"""The Celery tasks: ``send_mail`` (build the message) and ``send_message`` (prebuilt).

Both are ``shared_task``s: they run in mailworker's own worker and in any Celery
app that imports this module (configure that app with
:func:`mailworker.celery_app.configure`).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

import redis
import structlog
from celery import Task, current_app, shared_task, signals
from celery import _state as celery_state
from celery.exceptions import Reject, SoftTimeLimitExceeded

from mailworker.celery_app import SETTINGS as celery_settings
from mailworker.celery_app import app as celery_app
from mailworker.config import Profile
from mailworker.deadletter import DeadLetterStore
from mailworker.delivery import SEND_MAIL, SEND_MESSAGE, Delivery
from mailworker.errors import DeadLetteredError
from mailworker.schedule import RetryMover, RetrySchedule, ScheduledTask
from mailworker.sessions import SessionPool
from mailworker.settings import Settings

log = structlog.get_logger("mailworker.tasks")


class _ProcessState:
    """This process's delivery machinery and, in the main process, the retry mover."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.delivery: Delivery | None = None
        self.pid = 0
        self.mover: RetryMover | None = None


_state = _ProcessState()
#: Outcomes that are the message's fault, already logged and dead-lettered:
#: Celery logs them as a one-line failure, without a traceback.
_EXPECTED = (DeadLetteredError,)
#: Delivery guarantees live on the tasks, not in the app, so that an existing app
#: running them keeps its own defaults for its other tasks.
_SETTINGS = celery_settings
_TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    # Below half the visibility timeout (Settings checks): see celery_app.configure.
    "time_limit": _SETTINGS.task_time_limit,
    "soft_time_limit": _SETTINGS.task_time_limit * 0.9,
    "acks_late": True,
    "reject_on_worker_lost": True,
    # A task killed by the hard time limit goes back to the queue (the poison guard
    # bounds how often), instead of being acknowledged and lost.
    "acks_on_timeout": False,
    "throws": _EXPECTED,
}


@functools.lru_cache(maxsize=64)
def _profile(name: str) -> Profile:
    return Profile.from_env(name)


def delivery() -> Delivery:
    """This process's delivery machinery, created on first use after the fork."""
    with _state.lock:
        if _state.delivery is None or _state.pid != os.getpid():
            settings = _SETTINGS
            client = _redis(settings)
            _state.delivery = Delivery(
                settings, client, SessionPool(_profile), interrupts=(SoftTimeLimitExceeded,)
            )
            _state.pid = os.getpid()
        return _state.delivery


def _redis(settings: Settings) -> redis.Redis:
    # Bounded waits: a hung Redis must fail a task well inside its time limit.
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


def _route(task: Task[Any, Any]) -> tuple[str | None, str | None]:
    """Where this task message came from — exchange (None for the default one) and
    routing key (the queue's name on the default exchange) — so its retries go back
    there."""
    info = task.request.delivery_info or {}
    exchange, key = info.get("exchange"), info.get("routing_key")
    return (str(exchange) if exchange else None, str(key) if key else None)


def _run(task: Task[Any, Any], name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    task_id = task.request.id or f"eager-{time.time_ns()}"
    try:
        exchange, routing_key = _route(task)
        return delivery().run(
            name,
            task_id,
            kwargs,
            queue=routing_key,
            exchange=exchange,
            time_limit=task.time_limit,
        )
    except redis.RedisError as exc:
        # Nothing could be recorded: hand the message back unacknowledged.
        log.warning("mail.redis_unavailable", task_id=task_id, error=str(exc))
        time.sleep(1)
        raise Reject(str(exc), requeue=True) from exc


@shared_task(name=SEND_MAIL, **_TASK_OPTIONS)
def send_mail(  # noqa: PLR0917 -- the task's signature is the public API
    self: Task[Any, Any],
    to: str | list[str],
    subject: str,
    text: str | None = None,
    html: str | None = None,
    from_email: str | None = None,
    cc: str | list[str] | None = None,
    bcc: str | list[str] | None = None,
    reply_to: str | list[str] | None = None,
    headers: dict[str, str] | None = None,
    attachments: list[dict[str, str]] | None = None,
    profile: str = "default",
    idempotency_key: str | None = None,
    _meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build and send one message through the worker's held-open session.

    Example::

        from mailworker import send_mail
        send_mail.delay(to="ann@example.org", subject="Welcome", text="Hi Ann",
                        html="<p>Hi Ann</p>")

    Returns (as the task result) ``status`` ("sent" or "deferred"), ``message_id``,
    ``accepted``, ``refused`` (per recipient: code, reply), ``reply`` and ``attempts``.
    Invalid input, permanent failures and exhausted retries raise
    ``DeadLetteredError`` after the message was stored in the dead-letter store.
    """
    kwargs: dict[str, Any] = {
        "to": to,
        "subject": subject,
        "text": text,
        "html": html,
        "from_email": from_email,
        "cc": cc,
        "bcc": bcc,
        "reply_to": reply_to,
        "headers": headers,
        "attachments": attachments,
        "profile": profile,
        "idempotency_key": idempotency_key,
    }
    if _meta:
        kwargs["_meta"] = _meta
    return _run(self, SEND_MAIL, kwargs)


@shared_task(name=SEND_MESSAGE, **_TASK_OPTIONS)
def send_message(  # noqa: PLR0917 -- the task's signature is the public API
    self: Task[Any, Any],
    raw_b64: str,
    envelope_from: str,
    recipients: list[str],
    profile: str = "default",
    idempotency_key: str | None = None,
    _meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Send a prebuilt RFC 5322 message (base64 of its bytes) as given.

    Line endings are normalised to CRLF; nothing else is changed.
    """
    kwargs: dict[str, Any] = {
        "raw_b64": raw_b64,
        "envelope_from": envelope_from,
        "recipients": recipients,
        "profile": profile,
        "idempotency_key": idempotency_key,
    }
    if _meta:
        kwargs["_meta"] = _meta
    return _run(self, SEND_MESSAGE, kwargs)


def enqueue(task_name: str, kwargs: dict[str, Any], task_id: str | None = None) -> str:
    """Publish ``task_name(**kwargs)`` with the current Celery app, where the message
    first came from (kept in its ``_meta``); returns the task id."""
    return str(
        current_app.send_task(task_name, kwargs=kwargs, task_id=task_id, **_route_of(kwargs)).id
    )


def _route_of(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``send_task`` routing options for a message's recorded origin."""
    meta = kwargs.get("_meta")
    if not isinstance(meta, dict) or not meta.get("queue"):
        return {}
    if meta.get("exchange"):
        return {"exchange": str(meta["exchange"]), "routing_key": str(meta["queue"])}
    return {"queue": str(meta["queue"])}


# -- worker life cycle -------------------------------------------------------------


@signals.worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # Sessions and Redis connections are made after the fork, never inherited.
    _state.delivery = None


@signals.worker_process_shutdown.connect
def _process_shutdown(**_: Any) -> None:
    if _state.delivery is not None and _state.pid == os.getpid():
        closed = _state.delivery.pool.close_all()
        log.info("worker.sessions_closed", sessions=closed, pid=os.getpid())


@signals.worker_ready.connect
def _start_mover(sender: Any = None, **_: Any) -> None:
    app = sender.app if sender is not None else None
    if app is None:
        return
    settings = _SETTINGS
    client = _redis(settings)
    dlq = DeadLetterStore(client, max_records=settings.dlq_max, ttl=settings.dlq_ttl)

    def publish(task: ScheduledTask) -> None:
        app.send_task(task.task, kwargs=task.kwargs, task_id=task.id, **_route_of(task.kwargs))

    # Records past MAILWORKER_DLQ_TTL go even when no new dead letter arrives.
    _state.mover = RetryMover(RetrySchedule(client), publish, housekeeping=dlq.prune)
    _state.mover.start()


@signals.worker_shutdown.connect
def _worker_shutdown(**_: Any) -> None:
    if _state.mover is not None:
        _state.mover.stop()
    _process_shutdown()


def _adopt_default_app() -> None:
    """Make mailworker's app the current one when the program has none of its own,
    so ``send_mail.delay(...)`` in a plain script reaches MAILWORKER_BROKER_URL."""
    tls = getattr(celery_state, "_tls", None)
    if getattr(celery_state, "default_app", None) is None and (
        getattr(tls, "current_app", None) is None
    ):
        # set_current() is per thread; the default app is what other threads
        # (a web server's request threads) fall back to.
        celery_app.set_default()
        celery_app.set_current()


_adopt_default_app()
