"""The one way mailworker publishes a task: web processes, the CLI, the demo, the retry
mover and ``send_mail.delay`` all come through here.

Tasks are published by name (``send_task``), so a publisher needs neither the task code
nor the SMTP profiles: those live with ``mailworker worker``. Messages are always JSON.

The Celery app that publishes is either the project's own (its broker, its routes) or one
made here for a broker URL (:func:`producer_app`), once per URL and process. Celery's
thread-local ``current_app`` is never consulted: in a web server's request thread it is
Celery's fallback app (``amqp://guest@localhost``), not the project's.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from celery import Celery
from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from mailworker.errors import ConfigError, PublishError
from mailworker.queue.names import route_options

__all__ = [
    "JSON_ONLY",
    "Producer",
    "fail_fast",
    "load_celery_app",
    "producer_app",
    "publish_error",
    "publish_errors",
    "sentinel_options",
    "verified_url",
]

#: Celery settings that keep pickle out: a broker message can't run code in a worker.
JSON_ONLY: Final[dict[str, Any]] = {
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "task_serializer": "json",
    "result_serializer": "json",
}
#: Seconds to wait for a TCP connection to the broker or result store before giving up.
CONNECT_TIMEOUT = 5.0
#: How the Redis result store retries a lost connection while a task is published
#: (Celery's default retries 20 times, one second apart: a request would hang 20 s).
RESULT_RETRY_POLICY: Final = {
    "max_retries": 2,
    "interval_start": 0,
    "interval_step": 0.5,
    "interval_max": 1,
}
#: What a failed publish raises: kombu wraps broker errors in OperationalError; the Redis
#: result store raises RuntimeError once its retries for the result subscription ran out,
#: or redis-py's own errors (see :func:`_publish_errors`).
_PUBLISH_ERRORS = (OperationalError, OSError, RuntimeError)

#: Broker URL schemes of kombu's Redis transports: a producer for such a broker reads
#: task results from it.
_REDIS_SCHEMES: Final = ("redis", "rediss", "redis+socket", "sentinel")

_apps: dict[tuple[str, str | None], Celery] = {}
_apps_lock = threading.Lock()


def producer_app(broker_url: str, *, sentinel_master: str | None = None) -> Celery:
    """A Celery app of mailworker's own that publishes to ``broker_url`` (one per URL and
    process): JSON only, and a broker that fails in seconds rather than hanging.

    Its result backend is the broker when that is Redis. For any other broker (RabbitMQ:
    Celery has no ``amqp://`` result backend) it has none: it publishes, and a result is
    kept by the worker in ``MAILWORKER_REDIS_URL``, but ``AsyncResult.get()`` here raises.

    Args:
        broker_url: ``redis://``, ``rediss://`` (see :func:`verified_url`),
            ``sentinel://h1:26379;sentinel://h2:26379/0`` or another Celery broker URL.
        sentinel_master: the master's name for a ``sentinel://`` URL; default
            ``MAILWORKER_SENTINEL_MASTER``.

    Raises:
        ConfigError: a ``sentinel://`` URL without a master name.
    """
    options = sentinel_options(broker_url, sentinel_master)
    key = (broker_url, options.get("master_name"))
    with _apps_lock:
        app = _apps.get(key)
        if app is None:
            # fixups=[]: no Django fix-up, this app only publishes.
            app = Celery("mailworker-producer", set_as_current=False, fixups=[])
            url = verified_url(broker_url)
            app.conf.update(
                JSON_ONLY,
                broker_url=url,
                # Celery has no amqp:// result backend: a producer for RabbitMQ keeps
                # none and waits for no result (the worker stores it in its Redis).
                result_backend=url if _is_redis(broker_url) else None,
                broker_connection_retry_on_startup=True,
                broker_transport_options=dict(options),
                result_backend_transport_options=dict(options),
            )
            app.conf.update(fail_fast(app, CONNECT_TIMEOUT))
            _apps[key] = app
        return app


def _is_redis(broker_url: str) -> bool:
    return urlsplit(broker_url.strip()).scheme.lower() in _REDIS_SCHEMES


def verified_url(url: str) -> str:
    """``url``, with ``ssl_cert_reqs=required`` added to a ``rediss://`` URL that has
    none: kombu would not verify the server's certificate without it, and Celery's
    result backend refuses such a URL (redis-py, for the store, verifies by default)."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "rediss" or "ssl_cert_reqs" in dict(parse_qsl(parts.query)):
        return url
    return url + ("&" if parts.query else "?") + "ssl_cert_reqs=required"


def sentinel_options(url: str, sentinel_master: str | None = None) -> dict[str, Any]:
    """The broker (and result backend) transport options a ``sentinel://`` URL needs:
    ``master_name``, from ``sentinel_master`` or ``MAILWORKER_SENTINEL_MASTER``; none
    for other URLs.

    Raises:
        ConfigError: a ``sentinel://`` URL and no master name.
    """
    if not url.strip().lower().startswith("sentinel://"):
        return {}
    master = sentinel_master or os.environ.get("MAILWORKER_SENTINEL_MASTER")
    if not master:
        raise ConfigError(
            "the broker is a sentinel:// URL: set MAILWORKER_SENTINEL_MASTER to the "
            "master's name (as in the sentinels' 'sentinel monitor <name> …')"
        )
    return {"master_name": master}


def fail_fast(app: Celery, timeout: float) -> dict[str, Any]:
    """``app.conf`` updates that make publishing to an unreachable broker or result store
    fail within about ``timeout`` seconds (Celery's defaults retry for ~20 s)."""
    conf = app.conf
    return {
        "broker_transport_options": {
            **(conf.broker_transport_options or {}),
            "socket_connect_timeout": timeout,
        },
        "result_backend_transport_options": {
            **(conf.result_backend_transport_options or {}),
            "retry_policy": RESULT_RETRY_POLICY,
        },
        "redis_socket_connect_timeout": timeout,
        "broker_connection_timeout": timeout,  # amqp
    }


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


class Producer:
    """Publishes mailworker tasks through one Celery app, optionally to one queue.

    Example::

        Producer(producer_app("redis://localhost:6379/0")).publish(
            "mailworker.send_mail", {"to": "ann@example.org", "subject": "Hi", "text": "Hi"}
        )
    """

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

        It goes to this producer's queue if it has one, else back where the message
        first came from (a retry, a re-queued dead letter), else to the app's default
        route.

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
        options.update({"queue": self.queue} if self.queue else route_options(kwargs))
        try:
            return self.app.send_task(
                task, kwargs=kwargs, task_id=task_id, ignore_result=not store_result, **options
            )
        except publish_errors() as exc:
            raise publish_error(self.app, task, exc) from exc


def publish_error(app: Celery, task: str, exc: BaseException) -> PublishError:
    """The error for a failed publish of ``task``: it names the broker, password hidden."""
    where = maybe_sanitize_url(str(app.conf.broker_url))
    return PublishError(f"could not publish {task} to {where}: {exc}")


def publish_errors() -> tuple[type[BaseException], ...]:
    """The errors of a broker or result store that is unreachable.

    redis-py's errors count when the Redis transport has loaded it; a process that
    publishes to another broker never imports it.
    """
    redis = sys.modules.get("redis")
    if redis is None:
        return _PUBLISH_ERRORS
    return (*_PUBLISH_ERRORS, redis.RedisError)
