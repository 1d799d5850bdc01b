"""mailworker's own Celery app, and the settings any app needs to run its tasks.

``mailworker worker`` runs the app :func:`create_app` makes. To run the tasks in an
existing app instead, include ``mailworker.tasks`` there and call :func:`configure` on it
(or set the same options in your own configuration).

Nothing here runs at import: settings are read and apps are made when a worker starts or
the first message is published.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from celery import Celery

from mailworker.queue.names import TASK_NAMES
from mailworker.queue.producer import JSON_ONLY, fail_fast, sentinel_options, verified_url
from mailworker.worker import metrics
from mailworker.worker._timers import TimerCompaction
from mailworker.worker.settings import Settings

#: The settings each configured app's tasks deliver with (kept off ``app.conf``: they
#: hold the environment, SMTP passwords included, and ``celery inspect conf`` prints conf).
_settings: weakref.WeakKeyDictionary[Celery, Settings] = weakref.WeakKeyDictionary()
#: The app ``send_mail.delay(...)`` publishes through: the last one configured.
_publishing: list[Celery] = []
_lock = threading.RLock()
_env_settings: list[Settings] = []


def configure(app: Celery, settings: Settings | None = None, *, broker: bool = True) -> Celery:
    """Apply the settings mailworker's delivery guarantees depend on.

    - JSON only, never pickle (a broker message can't run code in the worker);
    - a prefetch of one, and the Redis ``visibility_timeout`` (with RabbitMQ, its
      ``consumer_timeout``, ``MAILWORKER_CONSUMER_TIMEOUT``) above twice the tasks'
      hard time limit: a message is never redelivered while it still runs or waits in
      a worker;
    - kombu looks for a killed worker's messages within the visibility timeout;
    - mailworker's tasks run in this app with ``settings`` (their time limits,
      retries, Redis, dead-letter store), and ``send_mail.delay(...)`` publishes
      through this app from any thread.

    ``acks_late``, ``reject_on_worker_lost`` and the time limits are options of
    mailworker's tasks themselves, so an existing app keeps its own defaults for
    its other tasks.

    Example::

        app = Celery("proj", include=["mailworker.tasks"])
        configure(app, broker=False)  # keep the project's own broker

    Args:
        app: the Celery app to configure.
        settings: defaults to :meth:`Settings.from_env`, read now.
        broker: also point the app's broker at ``MAILWORKER_BROKER_URL`` and its
            result backend at :attr:`Settings.result_backend` (the broker when it is
            Redis, else ``MAILWORKER_REDIS_URL``); pass False for an app with its own
            broker.
    """
    settings = settings or Settings.from_env()
    transport = {
        "visibility_timeout": int(settings.visibility_timeout),
        # kombu looks for unacknowledged messages every interval x throttle seconds
        # (10 x 10 by default): without this a killed worker's messages come back up
        # to 100 s after the visibility timeout instead of within it.
        "unacked_restore_interval": max(1, min(10, int(settings.visibility_timeout / 5))),
        "unacked_restore_throttle": 1,
        # One worker at a time sweeps for unacknowledged messages, under a Redis lock
        # that expires after 300 s by default: a worker killed mid-sweep (OOM, SIGKILL)
        # held up every restore in the fleet for five minutes. A sweep takes
        # milliseconds and restores each message in a WATCHed transaction, so a short
        # lock is safe.
        "unacked_mutex_expire": max(1, min(300, int(settings.visibility_timeout / 10))),
        # master_name, for a sentinel:// broker and result backend.
        **(sentinel_options(settings.broker_url, settings.sentinel_master) if broker else {}),
    }
    updates: dict[str, object] = {
        **JSON_ONLY,
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {**(app.conf.broker_transport_options or {}), **transport},
        "result_backend_transport_options": {
            **(app.conf.result_backend_transport_options or {}),
            **transport,
            # With RabbitMQ the result backend is the store's Redis: maybe sentinel:// too.
            **(
                sentinel_options(settings.result_backend, settings.sentinel_master)
                if broker
                else {}
            ),
        },
        "broker_connection_retry_on_startup": True,
    }
    app.conf.update(updates)
    # Merged into the transport options just set.
    updates = fail_fast(app, settings.publish_timeout)
    annotations = app.conf.task_annotations
    updates["task_annotations"] = [
        dict.fromkeys(TASK_NAMES, _limits(settings)),
        *(
            annotations
            if isinstance(annotations, (list, tuple))
            else [annotations]
            if annotations
            else []
        ),
    ]
    if broker:
        updates["broker_url"] = verified_url(settings.broker_url)
        # A Redis broker keeps the results; with RabbitMQ (Celery has no amqp:// result
        # backend) the store's Redis does.
        updates["result_backend"] = verified_url(settings.result_backend)
    app.conf.update(updates)
    _apply_limits(app, settings)
    app.steps["worker"].add(TimerCompaction)
    metrics.install(app, settings)
    with _lock:
        _settings[app] = settings
        _publishing[:] = [app]
    return app


def create_app(settings: Settings | None = None) -> Celery:
    """mailworker's own worker app: :func:`configure`'d, with the tasks included, its
    logs rendered by structlog (:mod:`mailworker.worker.logs`)."""
    app = Celery("mailworker", include=["mailworker.tasks"], set_as_current=False)
    configure(app, settings)
    app.conf.update(worker_hijack_root_logger=False, result_expires=86400)
    return app


def settings_of(app: Celery) -> Settings:
    """The settings ``app`` was configured with, else the environment's (read once)."""
    with _lock:
        found = _settings.get(app)
    return found if found is not None else env_settings()


def env_settings() -> Settings:
    """``Settings.from_env()``, read on first use and kept for the process."""
    with _lock:
        if not _env_settings:
            _env_settings.append(Settings.from_env())
        return _env_settings[0]


def publishing_app() -> Celery:
    """The app ``send_mail.delay(...)`` publishes through: the last one passed to
    :func:`configure`, else mailworker's own for ``MAILWORKER_BROKER_URL`` (made now)."""
    with _lock:
        if not _publishing:
            create_app(env_settings())  # configure() makes it the publishing app
        return _publishing[0]


def ensure_limits(app: Celery) -> None:
    """Give mailworker's tasks in an app nobody :func:`configure`'d the time limits of
    the environment's settings (called when its worker starts)."""
    with _lock:
        configured = app in _settings
    if not configured:
        _apply_limits(app, env_settings())


def _limits(settings: Settings) -> dict[str, Any]:
    # The soft limit interrupts a send in time for it to be rescheduled; the hard one
    # (below half the visibility timeout, Settings checks) kills a stuck task.
    return {
        "time_limit": settings.task_time_limit,
        "soft_time_limit": settings.task_time_limit * 0.9,
        # Opt-in: a result nobody reads costs a SUBSCRIBE per .delay() and a store
        # per task.
        "ignore_result": not settings.store_results,
    }


def _apply_limits(app: Celery, settings: Settings) -> None:
    """Annotations reach tasks when they are bound: set them on tasks already bound."""
    if not getattr(app, "finalized", False):
        return
    limits = _limits(settings)
    for name in TASK_NAMES:
        task: Any = app.tasks.get(name)
        if task is not None:
            task.time_limit = limits["time_limit"]
            task.soft_time_limit = limits["soft_time_limit"]
            task.ignore_result = limits["ignore_result"]
