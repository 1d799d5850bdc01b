"""Prometheus metrics of a worker, at ``http://<MAILWORKER_METRICS_ADDR>:<port>/metrics``.

Off unless ``MAILWORKER_METRICS_PORT`` is set: then every function here is a no-op that
imports nothing, and a worker without the ``mailworker[metrics]`` extra never loads
``prometheus_client``. :func:`install` connects an app's worker signals; when its worker
starts, the main process serves the metrics:

- prefork pool: ``prometheus_client``'s multiprocess mode. Each pool process writes its
  values to files in ``MAILWORKER_METRICS_DIR`` (default: a new private temporary
  directory), which the main process sums per scrape. The directory is set in
  ``PROMETHEUS_MULTIPROC_DIR`` and emptied in ``worker_init``, before prometheus_client
  is imported and before the pool forks: prometheus_client chooses file-backed values
  from that variable when it is *imported* (``values.ValueClass``), and the children
  inherit the metric objects and the variable. One worker per directory (a lock file
  says so), or the counts of two workers mix. No ``process_*`` metrics then.
- threads, solo (and other one-process pools): the default registry, ``process_*``
  included.

====================================================  ======================================
metric                                                meaning
====================================================  ======================================
``mailworker_messages_total{profile,outcome}``        messages by outcome: ``sent``,
                                                      ``deferred``, ``dead_lettered``
``mailworker_recipients_total{profile,outcome}``      recipients: ``accepted``, ``deferred``,
                                                      ``rejected``
``mailworker_send_duration_seconds{profile}``         one send attempt (histogram, 5 ms-60 s)
``mailworker_smtp_connections_total{profile}``        SMTP sessions opened
``mailworker_smtp_sessions_open{profile}``            SMTP sessions open now (live processes)
``mailworker_smtp_replies_total{profile,code}``       server reply codes seen (``other``: not
                                                      2xx-5xx)
``mailworker_retries_scheduled_total``                delayed retries scheduled in Redis
``mailworker_rate_limit_waits_total{profile}``        waits for the fleet's rate limit
``mailworker_dead_letters``                           records in the dead-letter store (Redis,
                                                      read per scrape)
``mailworker_breaker_open{profile}``                  1 while the profile's circuit breaker is
                                                      open or half open (Redis, per scrape)
====================================================  ======================================

A metrics problem never stops delivery: an endpoint that cannot start is logged
(``metrics.unavailable``) and the worker runs on without it; a Redis that cannot be read
at scrape time leaves out the two Redis gauges (``metrics.store_unreadable``).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import structlog

from mailworker.errors import ConfigError
from mailworker.worker._metrics_collect import (
    _ProcessFiles,
    _StoreCollector,
)

if TYPE_CHECKING:
    from celery import Celery
    from prometheus_client import Counter, Gauge, Histogram
    from prometheus_client.registry import Collector, CollectorRegistry

    from mailworker.worker.settings import Settings

__all__ = [
    "INSTALL_HINT",
    "MESSAGE_OUTCOMES",
    "RECIPIENT_OUTCOMES",
    "SEND_DURATION_BUCKETS",
    "connection_opened",
    "install",
    "message",
    "rate_limit_wait",
    "replies",
    "retry_scheduled",
    "session_open",
]

log = structlog.get_logger("mailworker.worker.metrics")

#: ``outcome`` of :func:`message`.
MESSAGE_OUTCOMES: Final = frozenset({"sent", "deferred", "dead_lettered"})
#: Keys of :func:`message`'s ``recipients``.
RECIPIENT_OUTCOMES: Final = frozenset({"accepted", "deferred", "rejected"})
#: Seconds: a local relay answers in milliseconds, a provider in tenths, a slow one in
#: seconds; the top is above the per-stage timeouts a message usually meets.
SEND_DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
#: What to run when ``MAILWORKER_METRICS_PORT`` is set without the extra.
INSTALL_HINT: Final = "pip install 'mailworker[metrics]'"
#: Takes the directory: held by the worker's processes, so a second worker can't use it.
_LOCK_FILE: Final = ".mailworker-metrics.lock"


@dataclass
class _Metrics:
    """The metric objects, made once per worker in its main process."""

    messages: Counter
    recipients: Counter
    duration: Histogram
    connections: Counter
    sessions: Gauge
    replies: Counter
    retries: Counter
    rate_limit_waits: Counter


@dataclass
class _Running:
    """What :func:`_start` set up, for :func:`_stop` to take down."""

    #: The worker's main process.
    pid: int
    registry: CollectorRegistry
    #: prefork: the processes' metric files; None: one process, the default registry.
    directory: str | None = None
    #: Made by mkdtemp: removed when the main process exits.
    owned_directory: bool = False
    lock_fd: int | None = None
    registered: list[Collector] = field(default_factory=list)
    stop_server: Callable[[], None] = lambda: None
    #: Undo the changes to the environment and to prometheus_client.
    restore: list[Callable[[], None]] = field(default_factory=list)


#: This process's metrics; None: off (every call returns at once).
_metrics: _Metrics | None = None
_running: _Running | None = None
_lock = threading.Lock()
#: Apps :func:`install` has connected -> their signal handlers (kept alive here: the
#: signals hold them weakly, so they go when the app goes).
_installed: weakref.WeakKeyDictionary[Celery, tuple[Callable[..., None], ...]] = (
    weakref.WeakKeyDictionary()
)
_failed_write = False


def install(app: Celery, settings: Settings) -> None:
    """Serve metrics from ``app``'s worker when ``settings.metrics_port`` is set.

    Connects Celery's signals (once per app): ``worker_init`` starts the metrics in the
    worker's main process (the directory, the HTTP server), ``worker_process_shutdown``
    tells prometheus_client that a pool process is gone, ``worker_shutdown`` stops the
    server. Does nothing without a port.

    Raises:
        ConfigError: the port is set but prometheus_client is not installed.
    """
    if settings.metrics_port is None:
        return
    if importlib.util.find_spec("prometheus_client") is None:
        raise ConfigError(
            "MAILWORKER_METRICS_PORT is set, and Prometheus metrics need prometheus_client: "
            f"{INSTALL_HINT}, or unset MAILWORKER_METRICS_PORT"
        )
    from celery import signals  # noqa: PLC0415 -- this module must import without Celery

    with _lock:
        if app in _installed:
            return
        app_ref = weakref.ref(app)

        def on_worker_init(sender: Any = None, **_: Any) -> None:
            if getattr(sender, "app", None) is app_ref():
                _start(settings, prefork=_is_prefork(getattr(sender, "pool_cls", None)))

        def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
            if getattr(sender, "app", None) is app_ref():
                _stop(remove_directory=False)  # pool processes may still write: at exit

        handlers = (on_worker_init, _on_process_shutdown, on_worker_shutdown)
        _installed[app] = handlers
    signals.worker_init.connect(on_worker_init)
    signals.worker_process_shutdown.connect(_on_process_shutdown)
    signals.worker_shutdown.connect(on_worker_shutdown)


def message(
    profile: str,
    outcome: str,
    *,
    recipients: Mapping[str, int] | None = None,
    duration: float | None = None,
) -> None:
    """Count a message's terminal outcome for this attempt.

    Args:
        profile: the SMTP profile's name.
        outcome: ``sent``, ``deferred`` or ``dead_lettered``.
        recipients: how many recipients were ``accepted``, ``deferred``, ``rejected``.
        duration: seconds the send attempt took, whatever its outcome.

    Raises:
        ValueError: an outcome outside the vocabulary (also while metrics are off).
    """
    if outcome not in MESSAGE_OUTCOMES:
        raise ValueError(f"outcome={outcome!r}: use one of {sorted(MESSAGE_OUTCOMES)}")
    if recipients and not RECIPIENT_OUTCOMES.issuperset(recipients):
        raise ValueError(f"recipients={dict(recipients)!r}: keys are {sorted(RECIPIENT_OUTCOMES)}")
    m = _metrics
    if m is None:
        return
    with _guard():
        m.messages.labels(profile, outcome).inc()
        for kind, count in (recipients or {}).items():
            if count:
                m.recipients.labels(profile, kind).inc(count)
        if duration is not None:
            m.duration.labels(profile).observe(duration)


def connection_opened(profile: str) -> None:
    """Count an SMTP session opened (connected, before TLS and AUTH)."""
    m = _metrics
    if m is not None:
        with _guard():
            m.connections.labels(profile).inc()


def session_open(profile: str, delta: int) -> None:
    """Add ``delta`` to the sessions open: +1 when a session connects, -1 when it closes."""
    m = _metrics
    if m is not None:
        with _guard():
            m.sessions.labels(profile).inc(delta)


def replies(profile: str, codes: Iterable[int]) -> None:
    """Count the server's reply ``codes`` seen in one transaction."""
    m = _metrics
    if m is not None:
        with _guard():
            for code in codes:
                # Bounded label values: a broken server's 999 is "other".
                m.replies.labels(profile, str(code) if 200 <= code < 600 else "other").inc()


def retry_scheduled() -> None:
    """Count a delayed retry scheduled in Redis."""
    m = _metrics
    if m is not None:
        with _guard():
            m.retries.inc()


def rate_limit_wait(profile: str) -> None:
    """Count a wait for the profile's fleet-wide rate limit."""
    m = _metrics
    if m is not None:
        with _guard():
            m.rate_limit_waits.labels(profile).inc()


@contextlib.contextmanager
def _guard() -> Iterator[None]:
    """A metric file that cannot be written (its directory deleted, a full disk) must not
    fail a delivery: log it once and go on."""
    global _failed_write  # noqa: PLW0603
    try:
        yield
    except OSError as exc:
        if not _failed_write:
            _failed_write = True
            log.error("metrics.write_failed", error=str(exc), pid=os.getpid())


# -- the worker's side: start, stop, processes ---------------------------------------


def _start(settings: Settings, *, prefork: bool) -> None:
    """Make the metrics and serve them (the worker's main process, at ``worker_init``)."""
    global _metrics, _running
    with _lock:
        if _running is not None:
            return
        running: _Running | None = None
        try:
            running = _multiprocess(settings) if prefork else _single_process()
            metrics = _make_metrics(running, settings)
            _serve(running, settings)
        except (ConfigError, OSError) as exc:
            if running is not None:
                _teardown(running, remove_directory=True)
            log.error("metrics.unavailable", error=str(exc))
            return
        _metrics, _running = metrics, running
    atexit.register(_at_exit, running)
    log.info(
        "metrics.listening",
        url=f"http://{settings.metrics_addr}:{settings.metrics_port}/metrics",
        mode="multiprocess" if prefork else "single process",
        directory=running.directory,
    )


def _single_process() -> _Running:
    from prometheus_client import REGISTRY  # noqa: PLC0415

    return _Running(pid=os.getpid(), registry=REGISTRY)


def _multiprocess(settings: Settings) -> _Running:
    """The directory taken and emptied, then prometheus_client in multiprocess mode."""
    directory, owned = _directory(settings.metrics_dir)
    try:
        lock_fd = _lock_directory(directory)
    except ConfigError:
        if owned:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    from prometheus_client import CollectorRegistry  # noqa: PLC0415

    running = _Running(
        pid=os.getpid(),
        registry=CollectorRegistry(),
        directory=directory,
        owned_directory=owned,
        lock_fd=lock_fd,
    )
    # Another worker's leftovers, or this one's before a restart: counts start at 0.
    for entry in os.scandir(directory):
        if entry.name.endswith(".db") and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    running.restore.append(lambda: _restore_env("PROMETHEUS_MULTIPROC_DIR", previous))
    from prometheus_client import values  # noqa: PLC0415

    if values.ValueClass is values.MutexValue:
        # prometheus_client was imported before the variable was set (by the app itself,
        # say) and chose in-memory values: file-backed ones from here on, as an import
        # after it would have chosen.
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        running.restore.append(lambda: setattr(values, "ValueClass", values.MutexValue))
    return running


def _directory(configured: str | None) -> tuple[str, bool]:
    """``MAILWORKER_METRICS_DIR``, made if missing; else a new private one (owned)."""
    if not configured:
        return tempfile.mkdtemp(prefix="mailworker-metrics-"), True
    path = os.path.abspath(configured)
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"MAILWORKER_METRICS_DIR={configured!r}: {exc.strerror}") from None
    return path, False


def _lock_directory(path: str) -> int | None:
    """Lock ``path`` for this worker (the pool processes inherit the lock)."""
    try:
        import fcntl  # noqa: PLC0415 -- POSIX only; so is the prefork pool
    except ImportError:  # pragma: no cover
        return None
    fd = os.open(os.path.join(path, _LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(
            f"MAILWORKER_METRICS_DIR={path!r} is in use by another worker; give each "
            "worker its own directory (or leave it unset for a private one)"
        ) from None
    return fd


def _make_metrics(running: _Running, settings: Settings) -> _Metrics:
    from prometheus_client import Counter, Gauge, Histogram  # noqa: PLC0415

    # prefork: registered nowhere, their values live in the directory's files, which
    # the MultiProcessCollector reads. Else in the default registry.
    registry = None if running.directory else running.registry

    def counter(name: str, doc: str, *labels: str) -> Counter:
        return Counter(name, doc, labels, registry=registry)

    metrics = _Metrics(
        messages=counter(
            "mailworker_messages",
            "Messages by outcome of the attempt: sent, deferred (retry scheduled), dead_lettered.",
            "profile",
            "outcome",
        ),
        recipients=counter(
            "mailworker_recipients",
            "Envelope recipients by outcome: accepted, deferred, rejected.",
            "profile",
            "outcome",
        ),
        duration=Histogram(
            "mailworker_send_duration_seconds",
            "Seconds one send attempt took, whatever its outcome.",
            ["profile"],
            buckets=SEND_DURATION_BUCKETS,
            registry=registry,
        ),
        connections=counter("mailworker_smtp_connections", "SMTP sessions opened.", "profile"),
        sessions=Gauge(
            "mailworker_smtp_sessions_open",
            "SMTP sessions open now.",
            ["profile"],
            multiprocess_mode="livesum",
            registry=registry,
        ),
        replies=counter(
            "mailworker_smtp_replies",
            "SMTP reply codes seen in transactions.",
            "profile",
            "code",
        ),
        retries=counter("mailworker_retries_scheduled", "Delayed retries scheduled in Redis."),
        rate_limit_waits=counter(
            "mailworker_rate_limit_waits",
            "Waits for a profile's fleet-wide rate limit.",
            "profile",
        ),
    )
    if registry is not None:
        running.registered.extend(vars(metrics).values())
    # Every series of a configured profile exists from the start, at 0: rate() and
    # alerts see the first increase.
    for profile in _profiles(settings):
        for outcome in sorted(MESSAGE_OUTCOMES):
            metrics.messages.labels(profile, outcome)
        for outcome in sorted(RECIPIENT_OUTCOMES):
            metrics.recipients.labels(profile, outcome)
        metrics.duration.labels(profile)
        metrics.connections.labels(profile)
        metrics.sessions.labels(profile)
        metrics.rate_limit_waits.labels(profile)
    return metrics


def _serve(running: _Running, settings: Settings) -> None:
    from prometheus_client import start_http_server  # noqa: PLC0415

    collectors: list[Collector] = [_StoreCollector(settings, _profiles(settings))]
    if running.directory:
        collectors.insert(0, _ProcessFiles(running.directory))
    for collector in collectors:
        running.registry.register(collector)
        running.registered.append(collector)
    assert settings.metrics_port is not None
    try:
        server, thread = start_http_server(
            settings.metrics_port, settings.metrics_addr, running.registry
        )
    except OSError as exc:
        raise ConfigError(
            f"MAILWORKER_METRICS_PORT={settings.metrics_port}: cannot listen on "
            f"{settings.metrics_addr}:{settings.metrics_port} ({exc.strerror or exc})"
        ) from None

    def stop_server() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    running.stop_server = stop_server


def _stop(*, remove_directory: bool = True) -> None:
    """Stop serving and turn the metrics off in this process."""
    global _metrics, _running
    with _lock:
        running, _running, _metrics = _running, None, None
        if running is not None and running.pid == os.getpid():
            _teardown(running, remove_directory=remove_directory)


def _teardown(running: _Running, *, remove_directory: bool) -> None:
    running.stop_server()
    running.stop_server = lambda: None
    for collector in running.registered:
        with contextlib.suppress(KeyError):
            running.registry.unregister(collector)
    running.registered.clear()
    for undo in reversed(running.restore):
        undo()
    running.restore.clear()
    if remove_directory:
        _remove_directory(running)


def _remove_directory(running: _Running) -> None:
    """Let go of the directory; remove it if it was made for this worker."""
    if running.lock_fd is not None:
        os.close(running.lock_fd)
        running.lock_fd = None
    if running.directory and running.owned_directory:
        shutil.rmtree(running.directory, ignore_errors=True)


def _at_exit(running: _Running) -> None:
    """The main process exits, after its pool: the private directory can go."""
    if os.getpid() == running.pid:
        _stop()
        _remove_directory(running)


def _on_process_shutdown(pid: int | None = None, **_: Any) -> None:
    """A pool process exits: its ``livesum`` gauge values (sessions open) stop counting."""
    running = _running
    if running is None or not running.directory:
        return
    from prometheus_client import multiprocess  # noqa: PLC0415

    multiprocess.mark_process_dead(pid or os.getpid(), running.directory)  # type: ignore[no-untyped-call]


def _is_prefork(pool: object) -> bool:
    """Whether the worker's pool (a class, an alias like ``"threads"`` or a path) forks."""
    import celery.concurrency  # noqa: PLC0415

    aliases: dict[str, str | None] = celery.concurrency.ALIASES  # type: ignore[attr-defined]
    if pool is None:  # Celery's default
        return True
    if isinstance(pool, str):
        path = aliases.get(pool) or pool
        if path.startswith("celery.concurrency."):  # not importing eventlet's or gevent's
            return path == aliases["prefork"]
        pool = celery.concurrency.get_implementation(path)
    from celery.concurrency.prefork import TaskPool  # noqa: PLC0415

    return isinstance(pool, type) and issubclass(pool, TaskPool)


def _profiles(settings: Settings) -> list[str]:
    """The configured profiles' names (``MAILWORKER_SMTP_URL[_<NAME>]``)."""
    from mailworker.smtp.profile import profile_names  # noqa: PLC0415

    return profile_names(settings.environ or None)


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
