"""The worker's event loop does not keep the cancelled time-limit timers of
finished tasks until they would have fired."""

from __future__ import annotations

import heapq

from celery import Celery
from kombu.asynchronous.timer import Timer

from mailworker.worker import app as worker_app
from mailworker.worker._timers import TimerCompaction, compact
from mailworker.worker.settings import Settings


def test_compaction_drops_cancelled_entries_and_keeps_the_heap() -> None:
    timer = Timer()
    fired: list[int] = []
    entries = [timer.call_after(100 + i, fired.append, (i,)) for i in range(1000)]
    for entry in entries[::2]:  # the tasks that finished: their timers cancelled
        timer.cancel(entry)
    queue = timer._queue

    assert compact(timer) == 500
    assert timer._queue is queue  # the same list the hub iterates
    assert len(queue) == 500
    assert all(not item.entry.canceled for item in queue)
    ordered = [heapq.heappop(queue).entry.args[0] for _ in range(len(queue))]
    assert ordered == list(range(1, 1000, 2))


def test_configured_apps_run_the_compaction_step() -> None:
    previous = list(worker_app._publishing)
    app = Celery("timers", set_as_current=False)
    try:
        worker_app.configure(app, Settings(), broker=False)
        assert TimerCompaction in app.steps["worker"]
    finally:
        worker_app._publishing[:] = previous
