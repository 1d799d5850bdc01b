"""Publishing mailworker's tasks from a web process (shared by the integrations).

Tasks are published by name (``send_task``), so the web process needs neither the task
code nor the SMTP profiles: those live with ``mailworker worker``. Messages are always JSON.

The Celery app that publishes is either the project's own (its broker, its routes) or one
made here for a broker URL, configured like mailworker's worker (:func:`configure`), once
per URL and process. Celery's ``current_app`` is never used: it is thread-local, and in a
request thread it is Celery's fallback app (``amqp://guest@localhost``), not the project's.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

import redis
from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from mailworker.contrib import PublishError
from mailworker.errors import ConfigError
from mailworker.settings import Settings

__all__ = ["Producer", "load_celery_app", "producer_app"]

#: Seconds to wait for a TCP connection to the broker or result store before giving up.
CONNECT_TIMEOUT = 5.0
#: How the Redis result store retries a lost connection while a task is published
#: (Celery's default retries 20 times, one second apart: a request would hang 20 s).
RESULT_RETRY_POLICY = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}

_apps: dict[str, Celery] = {}
_apps_lock = threading.Lock()


def producer_app(broker_url: str) -> Celery:
    """A Celery app of mailworker's own that publishes to ``broker_url`` (one per URL)."""
    from mailworker.celery_app import configure  # noqa: PLC0415 -- importing it builds an app

    with _apps_lock:
        app = _apps.get(broker_url)
        if app is None:
            # fixups=[]: no Django fix-up, this app only publishes.
            app = Celery("mailworker-producer", set_as_current=False, fixups=[])
            configure(app, Settings(broker_url=broker_url))
            conf = app.conf
            conf.broker_transport_options = {
                **conf.broker_transport_options,
                "socket_connect_timeout": CONNECT_TIMEOUT,
            }
            conf.result_backend_transport_options = {
                **conf.result_backend_transport_options,
                "retry_policy": RESULT_RETRY_POLICY,
            }
            conf.redis_socket_connect_timeout = CONNECT_TIMEOUT
            _apps[broker_url] = app
        return app


def load_celery_app(value: object, setting: str) -> Celery:
    """The Celery app ``value`` names: an app, or ``"pkg.module:app"`` / ``"pkg.module.app"``.

    Raises:
        ConfigError: it cannot be imported or is not a Celery app; the message names
            ``setting``.
    """
    if isinstance(value, Celery):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(
            f"{setting}: give a Celery app or its import path, e.g. 'proj.celery:app', "
            f"not {value!r}"
        )
    module_name, sep, attr = value.strip().partition(":")
    if not sep:
        module_name, _, attr = module_name.rpartition(".")
    try:
        found: object = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{setting}: cannot import {value!r} ({exc})") from None
    if not isinstance(found, Celery):
        raise ConfigError(f"{setting}: {value!r} is a {type(found).__name__}, not a Celery app")
    return found


#: What a failed publish raises: kombu wraps broker errors in OperationalError; the Redis
#: result store raises RuntimeError once its retries for the result subscription ran out.
_PUBLISH_ERRORS = (OperationalError, OSError, redis.RedisError, RuntimeError)


class Producer:
    """Publishes mailworker tasks through one Celery app, optionally to one queue."""

    def __init__(self, app: Celery, *, queue: str | None = None) -> None:
        self.app = app
        self.queue = queue

    def publish(
        self,
        task: str,
        kwargs: dict[str, Any],
        *,
        store_result: bool = True,
        task_id: str | None = None,
    ) -> AsyncResult[Any]:
        """Publish ``task(**kwargs)`` as JSON.

        Args:
            task: the task name, e.g. ``"mailworker.send_mail"``.
            kwargs: JSON-safe keyword arguments.
            store_result: whether the worker keeps the result for ``AsyncResult.get()``;
                False also skips subscribing to it (nothing will wait for it).
            task_id: the task id; Celery makes one by default.

        Raises:
            PublishError: the broker or result store is unreachable.
        """
        options: dict[str, Any] = {"serializer": "json"}
        if self.queue:
            options["queue"] = self.queue
        try:
            return self.app.send_task(
                task, kwargs=kwargs, task_id=task_id, ignore_result=not store_result, **options
            )
        except _PUBLISH_ERRORS as exc:
            where = maybe_sanitize_url(str(self.app.conf.broker_url))
            raise PublishError(f"could not publish {task} to {where}: {exc}") from exc
