"""Delayed retries kept in Redis, not as ETA tasks in a worker's memory.

A Celery ETA task sits unacknowledged in the worker that prefetched it; with the
Redis broker it is delivered again after ``visibility_timeout`` and lost from
that worker's view on restart (celery #7009, #2599, #3270). So a retry is a
record in a sorted set scored by due time; every worker runs a
:class:`~mailworker.worker.mover.RetryMover` that claims due records atomically
and publishes them as ordinary tasks.

Claiming pushes a record's due time forward by ``claim_timeout`` instead of
deleting it; the record is deleted only after the task was published. A mover
that dies in between leaves it to be claimed again: at worst the task is
published twice with the same task id and message key, and the per-message lock
and idempotency record stop a second delivery.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from mailworker.store import keys

_CLAIM = """
local due = redis.call('zrangebyscore', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, id in ipairs(due) do
    redis.call('zadd', KEYS[1], ARGV[3], id)
    table.insert(out, id)
    table.insert(out, redis.call('hget', KEYS[2], id) or '')
end
return out
"""


@dataclass(frozen=True)
class ScheduledTask:
    """A task to publish when due."""

    id: str
    task: str
    kwargs: dict[str, Any]


class RetrySchedule:
    """The sorted set of delayed retries."""

    def __init__(self, client: redis.Redis, *, prefix: str = keys.PREFIX) -> None:
        self._redis = client
        self._due = keys.retry_due(prefix)
        self._data = keys.retry_task(prefix)
        self._claim = client.register_script(_CLAIM)

    def add(self, id: str, task: str, kwargs: dict[str, Any], due: float) -> None:
        """Schedule ``task(**kwargs)`` for ``due`` (unix seconds); ``id`` becomes its task id."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.hset(self._data, id, json.dumps({"task": task, "kwargs": kwargs}))
        pipe.zadd(self._due, {id: due})
        pipe.execute()

    def claim_due(
        self, now: float | None = None, limit: int = 100, claim_timeout: float = 60.0
    ) -> list[ScheduledTask]:
        """Take up to ``limit`` due tasks; call :meth:`done` once each is published."""
        now = time.time() if now is None else now
        flat = self._claim(keys=[self._due, self._data], args=[now, limit, now + claim_timeout])
        claimed = []
        for id_raw, data_raw in zip(flat[::2], flat[1::2], strict=True):
            id = id_raw.decode() if isinstance(id_raw, bytes) else str(id_raw)
            if not data_raw:
                self.done(id)  # data lost (manual edit): nothing to publish
                continue
            data = json.loads(data_raw)
            claimed.append(ScheduledTask(id, data["task"], data["kwargs"]))
        return claimed

    def done(self, id: str) -> None:
        """Forget a published task."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.zrem(self._due, id)
        pipe.hdel(self._data, id)
        pipe.execute()

    def pending(self) -> int:
        """How many retries are waiting."""
        return int(self._redis.zcard(self._due))

    def next_due(self) -> float | None:
        """When the earliest retry is due, if any."""
        first = self._redis.zrange(self._due, 0, 0, withscores=True)
        return float(first[0][1]) if first else None
