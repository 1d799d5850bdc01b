"""mailworker's own Celery app, and the settings any app needs to run its tasks.

``mailworker worker`` runs this app. To run the tasks in an existing app instead,
import :mod:`mailworker.tasks` there and call :func:`configure` on it (or set the
same options in your own configuration).
"""

from __future__ import annotations

from celery import Celery

from mailworker.settings import Settings


def configure(app: Celery, settings: Settings | None = None, *, broker: bool = True) -> Celery:
    """Apply the settings mailworker's delivery guarantees depend on.

    - JSON only, never pickle (a broker message can't run code in the worker);
    - a prefetch of one, and the Redis ``visibility_timeout`` above twice the
      tasks' hard time limit: a message is never redelivered while it still runs
      or waits in a worker;
    - kombu looks for a killed worker's messages within the visibility timeout.

    ``acks_late``, ``reject_on_worker_lost`` and the time limits are options of
    mailworker's tasks themselves, so an existing app keeps its own defaults for
    its other tasks.

    Args:
        app: the Celery app to configure.
        settings: defaults to :meth:`Settings.from_env`.
        broker: also point the app's broker and result backend at
            ``MAILWORKER_BROKER_URL``; pass False for an app with its own broker.
    """
    settings = settings or Settings.from_env()
    transport = {
        "visibility_timeout": int(settings.visibility_timeout),
        # kombu looks for unacknowledged messages every interval x throttle seconds
        # (10 x 10 by default): without this a killed worker's messages come back up
        # to 100 s after the visibility timeout instead of within it.
        "unacked_restore_interval": max(1, min(10, int(settings.visibility_timeout / 5))),
        "unacked_restore_throttle": 1,
    }
    updates: dict[str, object] = {
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_serializer": "json",
        "result_serializer": "json",
        "worker_prefetch_multiplier": 1,
        "broker_transport_options": {**(app.conf.broker_transport_options or {}), **transport},
        "result_backend_transport_options": {
            **(app.conf.result_backend_transport_options or {}),
            **transport,
        },
        "broker_connection_retry_on_startup": True,
    }
    # The time limits of mailworker's tasks follow these settings (the tasks take
    # theirs from the environment at import, which may be another configuration).
    limits = {
        "time_limit": settings.task_time_limit,
        "soft_time_limit": settings.task_time_limit * 0.9,
    }
    annotations = app.conf.task_annotations
    updates["task_annotations"] = [
        {"mailworker.send_mail": limits, "mailworker.send_message": limits},
        *(
            annotations
            if isinstance(annotations, (list, tuple))
            else [annotations]
            if annotations
            else []
        ),
    ]
    if getattr(app, "finalized", False):
        # Annotations reach tasks when they are bound; these already are.
        for name in ("mailworker.send_mail", "mailworker.send_message"):
            task = app.tasks.get(name)
            if task is not None:
                # celery-types says int; Celery takes seconds as a float.
                task.time_limit = limits["time_limit"]  # type: ignore[assignment]
                task.soft_time_limit = limits["soft_time_limit"]  # type: ignore[assignment]
    if broker:
        updates["broker_url"] = settings.broker_url
        updates["result_backend"] = settings.broker_url
    app.conf.update(updates)
    return app


#: This process's settings, read from the environment once.
SETTINGS = Settings.from_env()
app = configure(Celery("mailworker", include=["mailworker.tasks"], set_as_current=False), SETTINGS)
# Our own worker's process: structlog renders Celery's records too (mailworker.logs).
app.conf.update(worker_hijack_root_logger=False, result_expires=86400)
