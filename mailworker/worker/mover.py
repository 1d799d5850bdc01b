"""The thread in every worker's main process that moves due retries onto the queue.

The schedule itself (claim, done, and why claiming is safe to repeat) is
:mod:`mailworker.store.schedule`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from mailworker.store.schedule import RetrySchedule, ScheduledTask

log = structlog.get_logger("mailworker.worker.mover")


#: Publishes a task; returns nothing, raises on failure.
Publisher = Callable[[ScheduledTask], None]


class RetryMover:
    """A daemon thread that moves due retries onto the Celery queue.

    ``housekeeping`` (e.g. pruning the dead-letter store) runs every
    ``housekeeping_interval`` seconds on the same thread.
    """

    def __init__(
        self,
        schedule: RetrySchedule,
        publish: Publisher,
        *,
        interval: float = 1.0,
        housekeeping: Callable[[], object] | None = None,
        housekeeping_interval: float = 600.0,
    ) -> None:
        self._schedule = schedule
        self._publish = publish
        self._interval = interval
        self._housekeeping = housekeeping
        self._housekeeping_interval = housekeeping_interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start polling in the background."""
        self._thread = threading.Thread(
            target=self._run, name="mailworker-retry-mover", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def move_due(self) -> int:
        """Publish every due retry once; returns how many were published."""
        moved = 0
        for task in self._schedule.claim_due():
            self._publish(task)
            self._schedule.done(task.id)
            moved += 1
        return moved

    def _run(self) -> None:
        next_housekeeping = time.monotonic()
        while not self._stop.is_set():
            try:
                self.move_due()
                if self._housekeeping is not None and time.monotonic() >= next_housekeeping:
                    next_housekeeping = time.monotonic() + self._housekeeping_interval
                    self._housekeeping()
            except Exception as exc:  # a Redis or broker outage must not kill the thread
                log.warning("retry.mover_failed", error=f"{type(exc).__name__}: {exc}")
            self._stop.wait(self._interval)
