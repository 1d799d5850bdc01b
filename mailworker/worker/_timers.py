"""Keep the worker's event-loop timer heap free of cancelled entries.

Celery's prefork pool arms a soft and a hard time-limit timer in the worker's main
process for every task and cancels them when the task ends; a cancelled entry
stays in kombu's timer heap until it would have fired (the hard limit: minutes).
At hundreds of messages a second that is a heap of hundreds of thousands of dead
entries, and memory that grows with rate x time limit. A bootstep drops them every
few seconds.
"""

from __future__ import annotations

import heapq
from typing import Any

from celery import bootsteps

#: Seconds between compactions.
INTERVAL = 5.0


def compact(timer: Any) -> int:
    """Drop cancelled entries from a kombu ``Timer``'s heap; returns how many."""
    queue = timer._queue  # kombu keeps the heap here, a list of scheduled(eta, prio, entry)
    live = [item for item in queue if not item.entry.canceled]
    dropped = len(queue) - len(live)
    if dropped:
        heapq.heapify(live)
        queue[:] = live  # in place: the hub holds a reference to this list
    return dropped


class TimerCompaction(bootsteps.StartStopStep):
    """Compacts the event loop's timer heap (the prefork pool's time-limit timers)."""

    requires = ("celery.worker.components:Hub",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        hub = getattr(parent, "hub", None)
        if hub is None:  # no event loop (solo, threads pools): no such timers
            return
        self.tref = hub.call_repeatedly(INTERVAL, compact, hub.timer)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
