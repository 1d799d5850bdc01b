"""What a scrape of the worker's metrics reads besides the counters it keeps: the pool
processes' files (prefork) and the fleet's state in Redis. Runs in the worker's main
process, at scrape time; imports prometheus_client and redis only there."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Final

import structlog

if TYPE_CHECKING:
    import redis
    from prometheus_client.metrics_core import Metric

    from mailworker.store.deadletter import DeadLetterStore
    from mailworker.worker.settings import Settings

log = structlog.get_logger("mailworker.worker.metrics")

#: Seconds a scrape waits for Redis (Prometheus gives a scrape 10 s by default).
_SCRAPE_REDIS_TIMEOUT: Final = 2.0
#: prometheus_client's files of a process's ``live*`` gauges: ``gauge_livesum_<pid>.db``.
_LIVE_FILE: Final = re.compile(r"gauge_live\w*?_(\d+)\.db\Z")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _mark_dead_processes(directory: str) -> list[int]:
    """Mark dead the processes whose ``live*`` gauge files remain: a pool process killed
    by the hard time limit or the OOM killer sends no ``worker_process_shutdown``.

    Returns:
        The process ids marked dead.
    """
    from prometheus_client import multiprocess  # noqa: PLC0415

    dead = set()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            found = _LIVE_FILE.match(entry.name)
            if found and not _alive(int(found.group(1))):
                dead.add(int(found.group(1)))
    for pid in sorted(dead):
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    return sorted(dead)


# -- collectors, run at scrape time in the main process ------------------------------


class _ProcessFiles:
    """The pool processes' values (prometheus_client's ``MultiProcessCollector``), after
    marking dead the processes that died without saying so."""

    def __init__(self, directory: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector  # noqa: PLC0415

        self.directory = directory
        self._inner = MultiProcessCollector(None, directory)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterable[Metric]:
        _mark_dead_processes(self.directory)
        found: Iterable[Metric] = self._inner.collect()  # type: ignore[no-untyped-call]
        return found


class _StoreCollector:
    """``mailworker_dead_letters`` and ``mailworker_breaker_open``, read from Redis."""

    def __init__(self, settings: Settings, profiles: list[str]) -> None:
        self.settings = settings
        self.profiles = profiles
        self._store: DeadLetterStore | None = None
        self._redis: redis.Redis | None = None

    def describe(self) -> Iterable[Metric]:
        # Names only: registering must not reach Redis.
        return self._families()

    def collect(self) -> Iterable[Metric]:
        import redis  # noqa: PLC0415

        from mailworker.store.limits import Breaker  # noqa: PLC0415

        try:
            count = self.dead_letters().count()
            breaker = Breaker(self.client())
            states = {profile: breaker.status(profile).state for profile in self.profiles}
        except redis.RedisError as exc:
            # Absent, not 0: "no dead letters" would be a lie. Alert on absent().
            log.warning("metrics.store_unreadable", error=str(exc))
            return []
        return self._families(count, states)

    def _families(
        self, count: int | None = None, states: Mapping[str, str] | None = None
    ) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily  # noqa: PLC0415

        dead = GaugeMetricFamily(
            "mailworker_dead_letters", "Records in the dead-letter store.", value=count
        )
        breaker = GaugeMetricFamily(
            "mailworker_breaker_open",
            "1 while the profile's circuit breaker is open (or half open).",
            labels=["profile"],
        )
        for profile, state in sorted((states or {}).items()):
            breaker.add_metric([profile], float(state != "closed"))
        return [dead, breaker]

    def client(self) -> redis.Redis:
        if self._redis is None:
            from mailworker.store.client import redis_client  # noqa: PLC0415

            self._redis = redis_client(
                self.settings.redis_url,
                sentinel_master=self.settings.sentinel_master,
                socket_timeout=_SCRAPE_REDIS_TIMEOUT,
                socket_connect_timeout=_SCRAPE_REDIS_TIMEOUT,
            )
        return self._redis

    def dead_letters(self) -> DeadLetterStore:
        if self._store is None:
            from mailworker.store.deadletter import DeadLetterStore  # noqa: PLC0415

            self._store = DeadLetterStore(self.client(), **self.settings.dlq_limits)
        return self._store
