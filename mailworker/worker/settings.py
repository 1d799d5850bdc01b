"""Worker settings from the environment (12-factor), validated once.

====================================  ==========================================
``MAILWORKER_BROKER_URL``             Celery broker (default ``redis://localhost:6379/0``)
``MAILWORKER_REDIS_URL``              dead letters, retries, idempotency (default: the broker
                                      when it is Redis; required with any other broker, e.g.
                                      RabbitMQ, whose worker also keeps its results there)
``MAILWORKER_SENTINEL_MASTER``        the master's name, for ``sentinel://`` broker and store
                                      URLs (``sentinel://h1:26379;sentinel://h2:26379/0``)
``MAILWORKER_REDIS_REPLICAS``         replicas that must confirm a task's Redis writes
                                      (``WAIT``) before its message is acknowledged
                                      (default 1 with a ``sentinel://`` store, else 0)
``MAILWORKER_DEFAULT_FROM``           ``from_email`` when a task gives none
``MAILWORKER_RETRY_DELAYS``           seconds between delayed retries, last repeats
                                      (default ``60,300,900,3600,14400``)
``MAILWORKER_RETRY_JITTER``           each delay varies by up to this fraction (default 0.1), so
                                      messages deferred together do not return together
``MAILWORKER_MAX_AGE``                give up this many seconds after the first attempt
                                      (default 86400)
``MAILWORKER_VISIBILITY_TIMEOUT``     Redis broker redelivery timeout (default 600)
``MAILWORKER_TASK_TIME_LIMIT``        hard limit per task (default: 2/5 of the above); below
                                      half of the visibility timeout, or with RabbitMQ
                                      below half of its consumer timeout
``MAILWORKER_CONSUMER_TIMEOUT``       RabbitMQ's ``consumer_timeout`` as set on the server,
                                      in seconds (default 1800, RabbitMQ's own default)
``MAILWORKER_MAX_REDELIVERIES``       worker-lost redeliveries before "poison" (default 3)
``MAILWORKER_DLQ_MAX``                dead-letter records kept (default 100000)
``MAILWORKER_DLQ_TTL``                seconds a dead-letter record is kept (default 30 days)
``MAILWORKER_DLQ_MAX_BYTES``          bytes all dead letters may take in Redis, payloads
                                      included (default 268435456, 256 MiB); beyond it the
                                      oldest payloads go first, then the oldest records
``MAILWORKER_DLQ_MAX_PAYLOAD_BYTES``  largest payload a dead letter keeps (default 35651584,
                                      34 MiB: a 25 MiB message, base64-encoded); a record
                                      over it keeps its error and transcript but cannot
                                      be re-queued
``MAILWORKER_MAX_MESSAGE_BYTES``      largest message as sent (default 26214400, 25 MiB);
                                      a larger one is dead-lettered ``invalid`` before its
                                      attachments are decoded
``MAILWORKER_MAX_RECIPIENTS``         most envelope recipients of one message (default 1000)
``MAILWORKER_PUBLISH_TIMEOUT``        seconds ``send_mail.delay`` waits for an unreachable
                                      broker before it fails (default 5)
``MAILWORKER_LOG_FORMAT``             ``json`` or ``console`` (default: console on a TTY)
``MAILWORKER_LEASE_TTL``             seconds a connection lease (``max_connections``) lives
                                      unrenewed: a crashed worker's sessions free up after
                                      it (default 30)
``MAILWORKER_RESULTS``                ``1``: keep task results for ``AsyncResult.get()``
                                      (default ``0``: ``.delay()`` does not subscribe and
                                      the worker stores nothing nobody reads)
``MAILWORKER_METRICS_PORT``           serve Prometheus metrics at ``/metrics`` on this port
                                      (default: none; needs ``mailworker[metrics]``)
``MAILWORKER_METRICS_ADDR``           the address it listens on (default ``0.0.0.0``)
``MAILWORKER_METRICS_DIR``            prefork pool: the processes' metric files, one worker
                                      per directory (default: a new temporary directory)
====================================  ==========================================

``0`` switches any of the ``MAILWORKER_DLQ_*`` limits off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from mailworker.errors import ConfigError
from mailworker.message.payload import MAX_MESSAGE_BYTES, MAX_RECIPIENTS, Limits
from mailworker.queue.names import DEFAULT_BROKER_URL

DEFAULT_RETRY_DELAYS = (60.0, 300.0, 900.0, 3600.0, 14400.0)
#: Broker URL schemes of kombu's Redis transports (as in
#: :mod:`mailworker.queue.producer`, which a settings reader must not import: Celery).
_REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")
#: Broker URL schemes of RabbitMQ (kombu's py-amqp transport).
_AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")

#: The dead-letter store's byte budget and per-record payload cap, as in
#: :mod:`mailworker.store.deadletter` (repeated, so that reading settings — which a Django
#: web process does in its checks — imports no Redis store).
DEFAULT_DLQ_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_DLQ_MAX_PAYLOAD_BYTES = 34 * 1024 * 1024


@dataclass(frozen=True)
class Settings:
    """Everything a worker process needs besides the SMTP profiles."""

    # URLs may hold a Redis password: kept out of repr().
    broker_url: str = field(default=DEFAULT_BROKER_URL, repr=False)
    redis_url: str = field(default="", repr=False)
    sentinel_master: str | None = None
    #: -1: 1 with a ``sentinel://`` store, else 0.
    redis_replicas: int = -1
    default_from: str | None = None
    retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    retry_jitter: float = 0.1
    max_age: float = 86400.0
    visibility_timeout: float = 600.0
    task_time_limit: float = 0.0
    #: RabbitMQ's ``consumer_timeout``: what stands in for the visibility timeout there.
    consumer_timeout: float = 1800.0
    max_redeliveries: int = 3
    dlq_max: int = 100_000
    dlq_ttl: float = 30 * 86400.0
    dlq_max_bytes: int = DEFAULT_DLQ_MAX_BYTES
    dlq_max_payload_bytes: int = DEFAULT_DLQ_MAX_PAYLOAD_BYTES
    log_format: str | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_recipients: int = MAX_RECIPIENTS
    publish_timeout: float = 5.0
    #: Short in-process retries (tenacity) before a delayed retry is scheduled.
    inprocess_attempts: int = 3
    #: Upper bound of all in-process waits together, in seconds.
    inprocess_max_wait: float = 4.0
    #: Keep task results (``MAILWORKER_RESULTS=1``); off, ``.delay()`` neither
    #: subscribes to a result nor does the worker store one.
    store_results: bool = False
    #: Connection leases (profiles with ``max_connections``) expire unrenewed after this.
    lease_ttl: float = 30.0
    #: Prometheus metrics (:mod:`mailworker.worker.metrics`): off without a port.
    metrics_port: int | None = None
    metrics_addr: str = "0.0.0.0"  # noqa: S104 -- scraped from other hosts by design
    metrics_dir: str | None = None
    environ: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.redis_url:
            if not _shares_redis(self.broker_url):
                raise ConfigError(
                    f"MAILWORKER_REDIS_URL: the broker is {_scheme(self.broker_url)}://, and "
                    "mailworker keeps its dead letters, retry schedule and idempotency "
                    "records in Redis: set MAILWORKER_REDIS_URL, e.g. redis://localhost:6379/0"
                )
            object.__setattr__(self, "redis_url", self.broker_url)
        if self.redis_replicas < 0:
            object.__setattr__(self, "redis_replicas", int(_is_sentinel(self.redis_url)))
        if not self.task_time_limit:
            object.__setattr__(self, "task_time_limit", self.visibility_timeout * 0.4)
        if not self.retry_delays or any(d < 1 for d in self.retry_delays):
            raise ConfigError(
                "MAILWORKER_RETRY_DELAYS: give comma-separated seconds of at least 1, "
                "e.g. 60,300,900"
            )
        # A prefetched message waits at most one task time limit before it runs,
        # then runs at most one: both must fit in the visibility timeout, or Redis
        # hands the message to a second worker while the first still has it. RabbitMQ
        # redelivers at once when a worker's connection closes and has no visibility
        # timeout; it closes the channel of a consumer that holds a message unacknowledged
        # longer than its consumer_timeout, and redelivers all of the channel's messages.
        if _scheme(self.broker_url) in _AMQP_SCHEMES:
            if self.task_time_limit * 2 >= self.consumer_timeout:
                raise ConfigError(
                    "MAILWORKER_TASK_TIME_LIMIT must be below half of RabbitMQ's consumer "
                    f"timeout, MAILWORKER_CONSUMER_TIMEOUT (now {self.task_time_limit:g} s "
                    f"and {self.consumer_timeout:g} s)"
                )
        elif self.task_time_limit * 2 >= self.visibility_timeout:
            raise ConfigError(
                "MAILWORKER_TASK_TIME_LIMIT must be below half of MAILWORKER_VISIBILITY_TIMEOUT "
                f"(now {self.task_time_limit:g} s and {self.visibility_timeout:g} s)"
            )
        if not 0 <= self.retry_jitter < 1:
            raise ConfigError(
                "MAILWORKER_RETRY_JITTER: give a fraction from 0 to below 1, e.g. 0.1"
            )
        for var, value in (
            ("MAILWORKER_MAX_MESSAGE_BYTES", self.max_message_bytes),
            ("MAILWORKER_MAX_RECIPIENTS", self.max_recipients),
            ("MAILWORKER_PUBLISH_TIMEOUT", self.publish_timeout),
        ):
            if value <= 0:
                raise ConfigError(f"{var}: must be above 0")
        if self.log_format not in (None, "json", "console"):
            raise ConfigError("MAILWORKER_LOG_FORMAT: use 'json' or 'console'")
        if self.metrics_port is not None and not 0 < self.metrics_port < 65536:
            raise ConfigError(
                f"MAILWORKER_METRICS_PORT={self.metrics_port}: give a TCP port, 1 to 65535"
            )

    @property
    def result_backend(self) -> str:
        """Where a worker keeps task results: a Redis broker, else (RabbitMQ: Celery has
        no ``amqp://`` result backend) the store's Redis, ``MAILWORKER_REDIS_URL``."""
        return self.broker_url if _shares_redis(self.broker_url) else self.redis_url

    @property
    def message_limits(self) -> Limits:
        """What one message may hold (size, recipients)."""
        return Limits(self.max_message_bytes, self.max_recipients)

    @property
    def dlq_limits(self) -> dict[str, Any]:
        """The dead-letter store's limits, as keyword arguments of ``DeadLetterStore``."""
        return {
            "max_records": self.dlq_max,
            "ttl": self.dlq_ttl,
            "max_bytes": self.dlq_max_bytes,
            "max_payload_bytes": self.dlq_max_payload_bytes,
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read ``MAILWORKER_*`` variables; unset ones keep their defaults."""
        env = dict(os.environ if environ is None else environ)
        kwargs: dict[str, object] = {"environ": env}
        text = {
            "MAILWORKER_BROKER_URL": "broker_url",
            "MAILWORKER_REDIS_URL": "redis_url",
            "MAILWORKER_SENTINEL_MASTER": "sentinel_master",
            "MAILWORKER_DEFAULT_FROM": "default_from",
            "MAILWORKER_LOG_FORMAT": "log_format",
            "MAILWORKER_METRICS_ADDR": "metrics_addr",
            "MAILWORKER_METRICS_DIR": "metrics_dir",
        }
        for var, name in text.items():
            if env.get(var):
                kwargs[name] = env[var]
        numbers = {
            "MAILWORKER_MAX_AGE": "max_age",
            "MAILWORKER_VISIBILITY_TIMEOUT": "visibility_timeout",
            "MAILWORKER_TASK_TIME_LIMIT": "task_time_limit",
            "MAILWORKER_CONSUMER_TIMEOUT": "consumer_timeout",
            "MAILWORKER_DLQ_TTL": "dlq_ttl",
            "MAILWORKER_RETRY_JITTER": "retry_jitter",
            "MAILWORKER_PUBLISH_TIMEOUT": "publish_timeout",
            "MAILWORKER_LEASE_TTL": "lease_ttl",
        }
        for var, name in numbers.items():
            if env.get(var):
                kwargs[name] = _number(var, env[var], float)
        for var, name in {
            "MAILWORKER_MAX_REDELIVERIES": "max_redeliveries",
            "MAILWORKER_DLQ_MAX": "dlq_max",
            "MAILWORKER_DLQ_MAX_BYTES": "dlq_max_bytes",
            "MAILWORKER_DLQ_MAX_PAYLOAD_BYTES": "dlq_max_payload_bytes",
            "MAILWORKER_MAX_MESSAGE_BYTES": "max_message_bytes",
            "MAILWORKER_MAX_RECIPIENTS": "max_recipients",
            "MAILWORKER_REDIS_REPLICAS": "redis_replicas",
            "MAILWORKER_METRICS_PORT": "metrics_port",
        }.items():
            if env.get(var):
                kwargs[name] = int(_number(var, env[var], int))
        if env.get("MAILWORKER_RESULTS"):
            kwargs["store_results"] = _flag("MAILWORKER_RESULTS", env["MAILWORKER_RESULTS"])
        if env.get("MAILWORKER_RETRY_DELAYS"):
            raw = env["MAILWORKER_RETRY_DELAYS"]
            kwargs["retry_delays"] = tuple(
                _number("MAILWORKER_RETRY_DELAYS", part.strip(), float)
                for part in raw.split(",")
                if part.strip()
            )
        return cls(**kwargs)  # type: ignore[arg-type]


def _is_sentinel(url: str) -> bool:
    return url.strip().lower().startswith("sentinel://")


def _scheme(url: str) -> str:
    return urlsplit(url.strip()).scheme.lower()


def _shares_redis(broker_url: str) -> bool:
    """Whether the store may default to the broker: it is Redis (or kombu's in-process
    ``memory://`` transport of tests, which no worker runs on)."""
    return _scheme(broker_url) in (*_REDIS_SCHEMES, "memory")


def _flag(var: str, value: str) -> bool:
    word = value.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{var}={value!r}: expected 1 or 0 (true/false, yes/no, on/off)")


def _number(var: str, value: str, kind: type[int] | type[float]) -> float:
    try:
        number = kind(value)
    except ValueError:
        raise ConfigError(f"{var}={value!r}: expected a number") from None
    if number < 0:
        raise ConfigError(f"{var}={value!r}: must not be negative")
    return number
