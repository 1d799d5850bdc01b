"""The Celery tasks: ``send_mail`` (build the message) and ``send_message`` (prebuilt).

Both are ``shared_task``s: they run in mailworker's own worker and in any Celery app
that includes ``mailworker.tasks`` (configure that app with
:func:`mailworker.celery_app.configure`). The names exported here publish through the
app :func:`~mailworker.worker.app.publishing_app` gives — the app you configured, or
mailworker's own for ``MAILWORKER_BROKER_URL`` — from any thread; Celery's thread-local
current app is not consulted.

Importing this module reads no settings and builds no client: a worker reads them when
it starts, a publisher when it publishes its first message.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

import redis
import structlog
from celery import Celery, Task, shared_task, signals
from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.local import Proxy

from mailworker.errors import DeadLetteredError
from mailworker.queue.names import SEND_MAIL, SEND_MAIL_BATCH, SEND_MESSAGE, SEND_MESSAGE_BATCH
from mailworker.queue.producer import Producer, publish_error, publish_errors
from mailworker.smtp.profile import Profile
from mailworker.store.client import (
    REPLICA_TIMEOUT,
    NotReplicatedError,
    confirm_replicated,
    redis_client,
)
from mailworker.store.deadletter import DeadLetterStore
from mailworker.store.limits import Leases
from mailworker.store.schedule import RetrySchedule, ScheduledTask
from mailworker.worker.app import ensure_limits, publishing_app, settings_of
from mailworker.worker.batch import MAX_BATCH, run_batch
from mailworker.worker.delivery import Delivery
from mailworker.worker.mover import RetryMover
from mailworker.worker.outcome import TaskResult
from mailworker.worker.sessions import SessionPool
from mailworker.worker.settings import Settings

log = structlog.get_logger("mailworker.worker.tasks")


class _ProcessState:
    """This process's delivery machinery and, in the main process, the retry mover."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.delivery: Delivery | None = None
        #: The Redis client ``delivery`` writes through.
        self.redis: redis.Redis | None = None
        self.pid = 0
        self.mover: RetryMover | None = None


_state = _ProcessState()
#: Outcomes that are the message's fault, already logged and dead-lettered:
#: Celery logs them as a one-line failure, without a traceback.
_EXPECTED = (DeadLetteredError,)
#: Delivery guarantees live on the tasks, not in the app, so that an existing app
#: running them keeps its own defaults for its other tasks. The time limits come from
#: the settings, when the app is configured or its worker starts (app.configure).
_TASK_OPTIONS: dict[str, Any] = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    # A task killed by the hard time limit goes back to the queue (the poison guard
    # bounds how often), instead of being acknowledged and lost.
    "acks_on_timeout": False,
    "throws": _EXPECTED,
}


def delivery(settings: Settings) -> Delivery:
    """This process's delivery machinery, created on first use after the fork."""
    with _state.lock:
        current = _state.delivery
        if current is None or _state.pid != os.getpid() or current.settings is not settings:
            client = _redis(settings)
            current = Delivery(
                settings,
                client,
                SessionPool(
                    _profiles(settings), leases=Leases(client), lease_ttl=settings.lease_ttl
                ),
                interrupts=(SoftTimeLimitExceeded,),
            )
            _state.delivery, _state.redis, _state.pid = current, client, os.getpid()
        return current


def _profiles(settings: Settings) -> Callable[[str], Profile]:
    """Profiles by name from the settings' environment, each read once."""
    environ = settings.environ or None

    @functools.lru_cache(maxsize=64)
    def profile(name: str) -> Profile:
        return Profile.from_env(name, environ)

    return profile


def _redis(settings: Settings) -> redis.Redis:
    # Bounded waits: a hung Redis must fail a task well inside its time limit.
    return redis_client(
        settings.redis_url,
        sentinel_master=settings.sentinel_master,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=30,
    )


def _replicated(settings: Settings) -> None:
    """Wait until ``MAILWORKER_REDIS_REPLICAS`` replicas have every Redis write so far.

    Before a delivery: no message is sent while its idempotency record could not be
    kept (no replica online, or a primary Sentinel is replacing). After it, before
    Celery acknowledges the task message: its idempotency record, scheduled retry or
    dead letter survives a failover. A shortfall is a NotReplicatedError, handled as
    Redis being down: the message goes back to the queue.
    """
    if settings.redis_replicas and _state.redis is not None:
        # Two waits and the pause before a hand-back fit in the soft time limit.
        timeout = min(REPLICA_TIMEOUT, settings.task_time_limit / 20)
        try:
            confirm_replicated(_state.redis, settings.redis_replicas, timeout)
        except SoftTimeLimitExceeded:
            # Out of time while waiting is a shortfall too, not a failed task (which
            # Celery would acknowledge).
            raise NotReplicatedError("the soft time limit came while waiting") from None


def _route(task: Task[Any, Any]) -> tuple[str | None, str | None]:
    """Where this task message came from — exchange (None for the default one) and
    routing key (the queue's name on the default exchange) — so its retries go back
    there."""
    info = task.request.delivery_info or {}
    exchange, key = info.get("exchange"), info.get("routing_key")
    return (str(exchange) if exchange else None, str(key) if key else None)


def _run(task: Task[Any, Any], name: str, kwargs: dict[str, Any]) -> TaskResult:
    def run(work: Delivery, **where: Any) -> TaskResult:
        return work.run(name, _task_id(task), kwargs, **where)

    return _guarded(task, run)


def _run_batch(
    task: Task[Any, Any], name: str, messages: object, profile: str | None
) -> list[TaskResult]:
    def run(work: Delivery, **where: Any) -> list[TaskResult]:  # noqa: RET503 -- give_up raises
        task_id = _task_id(task)
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            problem = "must be a list of objects, each the arguments of one message"
        elif not 0 < len(messages) <= MAX_BATCH:
            problem = f"must hold 1 to {MAX_BATCH} messages, not {len(messages)}"
        else:
            given = [m if profile is None else {"profile": profile, **m} for m in messages]
            return run_batch(work, name, task_id, given, **where)
        # The batch as a whole is malformed: dead-lettered as it came, as the batch.
        attempt = work.attempt(task.name, task_id, {"messages": messages, "profile": profile})
        attempt.give_up(
            "invalid",
            {"type": "InvalidMessageError", "message": f"messages {problem}", "field": "messages"},
        )

    return _guarded(task, run)


def _task_id(task: Task[Any, Any]) -> str:
    return task.request.id or f"eager-{time.time_ns()}"


_R = TypeVar("_R")


def _guarded(task: Task[Any, Any], run: Callable[..., _R]) -> _R:
    """``run(delivery, queue=…, exchange=…, time_limit=…)`` with the replication waits
    around it, and a Redis failure turned into a hand-back to the broker."""
    task_id = _task_id(task)
    try:
        exchange, routing_key = _route(task)
        settings = settings_of(task.app)
        work = delivery(settings)
        _replicated(settings)
        try:
            result = run(work, queue=routing_key, exchange=exchange, time_limit=task.time_limit)
        except DeadLetteredError:
            _replicated(settings)
            raise
        _replicated(settings)
        return result
    except redis.RedisError as exc:
        # Nothing could be recorded: hand the message back unacknowledged.
        log.warning("mail.redis_unavailable", task_id=task_id, error=str(exc))
        # The soft time limit must not turn the hand-back into a failure, which Celery
        # would acknowledge.
        with contextlib.suppress(SoftTimeLimitExceeded):
            time.sleep(1)
        raise Reject(str(exc), requeue=True) from exc


#: The single task each batch task's messages are handled as.
_BATCH_OF = {SEND_MAIL_BATCH: SEND_MAIL, SEND_MESSAGE_BATCH: SEND_MESSAGE}


def _signature(run: Callable[..., Any]) -> inspect.Signature:
    # inspect.signature() costs tens of microseconds a call: once per task function.
    function = getattr(run, "__func__", run)
    found: inspect.Signature | None = _SIGNATURES.get(function)
    if found is None:
        found = _SIGNATURES[function] = inspect.signature(run)
    return found


_SIGNATURES: dict[Callable[..., Any], inspect.Signature] = {}
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


class _MailTask(Task):  # type: ignore[type-arg]
    """Runs arguments the task does not take through validation instead of failing.

    A producer that publishes by name (``send_task``, as every producer that does not
    import the task does) may misspell an argument; Celery would fail calling the
    function with a bare TypeError and no dead letter. Validation names the field and
    suggests the right one, and the message is dead-lettered as ``invalid``.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        signature = _signature(self.run)
        try:
            signature.bind(*args, **kwargs)
        except TypeError:
            # Extra positional arguments are named after positional parameters only.
            names = [n for n, p in signature.parameters.items() if p.kind in _POSITIONAL]
            given = {names[i] if i < len(names) else f"args[{i}]": a for i, a in enumerate(args)}
            given.update(kwargs)
            if self.name in _BATCH_OF:
                # Whatever else came, a batch without a list of messages is invalid.
                messages = given.get("messages") if len(given) <= 2 else None
                return _run_batch(self, _BATCH_OF[self.name], messages, given.get("profile"))
            return _run(self, self.name, given)
        return super().__call__(*args, **kwargs)

    def apply_async(self, *args: Any, **kwargs: Any) -> Any:
        """Publish (``delay`` comes here too); an unreachable broker is a PublishError
        naming it, within MAILWORKER_PUBLISH_TIMEOUT."""
        try:
            return super().apply_async(*args, **kwargs)
        except publish_errors() as exc:
            if self.app.conf.task_always_eager:
                raise  # the task ran here: its own error, not the broker's
            raise publish_error(self.app, self.name, exc) from exc


_TASK_OPTIONS["base"] = _MailTask


@shared_task(name=SEND_MAIL, **_TASK_OPTIONS)
def _send_mail(  # noqa: PLR0917 -- the task's signature is the public API
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
    *,
    list_unsubscribe: str | list[str] | None = None,
    list_unsubscribe_post: bool = False,
    dsn: dict[str, Any] | None = None,
) -> TaskResult:
    """Build and send one message through the worker's held-open session.

    Example::

        from mailworker import send_mail
        send_mail.delay(to="ann@example.org", subject="Welcome", text="Hi Ann",
                        html="<p>Hi Ann</p>")

    Returns (as the task result) a :class:`~mailworker.worker.outcome.TaskResult`: the
    same keys whatever the ``status`` (``sent``, ``deferred`` or ``dead_lettered``) —
    ``message_id``, ``accepted``, ``refused``, ``reply``, ``queue_id``, ``attempts``,
    ``retry_at``, ``retry_task_id``, ``error`` and the rest, None where they do not
    apply. Invalid input, permanent failures and exhausted retries raise
    ``DeadLetteredError`` after the message was stored in the dead-letter store.

    Keyword-only: ``list_unsubscribe`` (``https:``/``mailto:`` URIs) and
    ``list_unsubscribe_post`` add List-Unsubscribe and one-click List-Unsubscribe-Post
    (RFC 2369, RFC 8058); ``dsn`` (``{"notify": [...], "ret": ..., "envid": ...}``)
    asks the server for delivery status notifications (RFC 3461) when it offers them.
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
    _optional(kwargs, list_unsubscribe=list_unsubscribe, dsn=dsn)
    if list_unsubscribe_post is not False:
        kwargs["list_unsubscribe_post"] = list_unsubscribe_post
    if _meta:
        kwargs["_meta"] = _meta
    return _run(self, SEND_MAIL, kwargs)


@shared_task(name=SEND_MESSAGE, **_TASK_OPTIONS)
def _send_message(  # noqa: PLR0917 -- the task's signature is the public API
    self: Task[Any, Any],
    raw_b64: str,
    envelope_from: str,
    recipients: list[str],
    profile: str = "default",
    idempotency_key: str | None = None,
    _meta: dict[str, Any] | None = None,
    *,
    dsn: dict[str, Any] | None = None,
) -> TaskResult:
    """Send a prebuilt RFC 5322 message (base64 of its bytes) as given.

    Line endings are normalised to CRLF; nothing else is changed. ``dsn`` (keyword-only)
    as for ``send_mail``.
    """
    kwargs: dict[str, Any] = {
        "raw_b64": raw_b64,
        "envelope_from": envelope_from,
        "recipients": recipients,
        "profile": profile,
        "idempotency_key": idempotency_key,
    }
    _optional(kwargs, dsn=dsn)
    if _meta:
        kwargs["_meta"] = _meta
    return _run(self, SEND_MESSAGE, kwargs)


@shared_task(name=SEND_MAIL_BATCH, **_TASK_OPTIONS)
def _send_mail_batch(
    self: Task[Any, Any], messages: list[dict[str, Any]], profile: str | None = None
) -> list[TaskResult]:
    """Send several messages in one task: ``send_mail`` arguments each.

    Example::

        from mailworker import send_mail_batch
        send_mail_batch.delay(messages=[
            {"to": "ann@example.org", "subject": "Hi", "text": "Hi Ann"},
            {"to": "bob@example.org", "subject": "Hi", "text": "Hi Bob"},
        ])

    Each message is handled exactly as if sent alone — its own idempotency record
    (``idempotency_key``, else ``<task id>-<n>``), retries and dead letter — but they
    share one pipelined SMTP exchange and Redis round trip. ``profile`` is the
    default for messages that name none. Returns one result per message, in order;
    a dead-lettered message's result says so (nothing is raised for one message).
    At most 1,000 messages per task.
    """
    return _run_batch(self, SEND_MAIL, messages, profile)


@shared_task(name=SEND_MESSAGE_BATCH, **_TASK_OPTIONS)
def _send_message_batch(
    self: Task[Any, Any], messages: list[dict[str, Any]], profile: str | None = None
) -> list[TaskResult]:
    """Send several prebuilt messages in one task: ``send_message`` arguments each
    (``raw_b64``, ``envelope_from``, ``recipients``, …); see ``send_mail_batch``."""
    return _run_batch(self, SEND_MESSAGE, messages, profile)


def _optional(kwargs: dict[str, Any], **options: Any) -> None:
    """Add the options that were given, only those: the retries and dead letters of a
    message that uses none of them stay readable by an older worker (a rolling deploy)."""
    kwargs.update({name: value for name, value in options.items() if value is not None})


_T = TypeVar("_T")


def _published(task: _T, name: str) -> _T:
    """``task``, resolved by name in the publishing app when used."""
    return cast("_T", Proxy(lambda: publishing_app().tasks[name]))


#: ``send_mail.delay(...)``: see the task's docstring.
send_mail = _published(_send_mail, SEND_MAIL)
#: ``send_message.delay(raw_b64, envelope_from, recipients)``: see the task's docstring.
send_message = _published(_send_message, SEND_MESSAGE)
#: ``send_mail_batch.delay(messages=[{…send_mail arguments…}, …])``.
send_mail_batch = _published(_send_mail_batch, SEND_MAIL_BATCH)
#: ``send_message_batch.delay(messages=[{…send_message arguments…}, …])``.
send_message_batch = _published(_send_message_batch, SEND_MESSAGE_BATCH)


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


@signals.worker_init.connect
def _worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if isinstance(app, Celery):
        ensure_limits(app)


@signals.worker_ready.connect
def _start_mover(sender: Any = None, **_: Any) -> None:
    app = sender.app if sender is not None else None
    if app is None:
        return
    settings = settings_of(app)
    client = _redis(settings)
    dlq = DeadLetterStore(client, **settings.dlq_limits)
    producer = Producer(app)

    def publish(task: ScheduledTask) -> None:
        producer.publish(task.task, task.kwargs, task_id=task.id)

    # Records past MAILWORKER_DLQ_TTL go even when no new dead letter arrives.
    _state.mover = RetryMover(RetrySchedule(client), publish, housekeeping=dlq.prune)
    _state.mover.start()


@signals.worker_shutdown.connect
def _worker_shutdown(**_: Any) -> None:
    if _state.mover is not None:
        _state.mover.stop()
    _process_shutdown()
