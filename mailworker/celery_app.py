"""mailworker's own Celery app, and the settings any app needs to run its tasks.

``mailworker worker`` runs this app. To run the tasks in an existing app instead,
import :mod:`mailworker.tasks` there and call :func:`configure` on it (or set the
same options in your own configuration).
"""

from __future__ import annotations

from celery import Celery

from mailworker.settings import Settings


def configure(app: Celery, settings: Settings | None = None) -> Celery:
    """Apply the settings mailworker's delivery guarantees depend on.

    - JSON only, never pickle (a broker message can't run code in the worker);
    - ``acks_late`` + ``reject_on_worker_lost``: a killed worker loses nothing;
    - prefetch of one and a hard time limit below half the Redis
      ``visibility_timeout``: a message is never redelivered while it still runs.
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
    app.conf.update(
        broker_url=settings.broker_url,
        result_backend=settings.broker_url,
        accept_content=["json"],
        result_accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=settings.task_time_limit * 0.9,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        result_expires=86400,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


app = configure(Celery("mailworker", include=["mailworker.tasks"], set_as_current=False))
