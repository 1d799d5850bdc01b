"""The dead-letter store: messages mailworker gave up on, kept in Redis for operators.

A message lands here when its payload is invalid (``reason="invalid"``), the server
refused it for good (``"permanent"``), its retries ran out (``"exhausted"``) or it kept
killing its worker (``"poison"``). Each record keeps the original task kwargs, so it
can be re-queued as it was, together with the last error, the transcript of the last
attempt and the attempt history.

Layout (see :mod:`mailworker.store.keys`), as dramatiq keeps its dead letters:

- ``{prefix}dlq:index`` — sorted set, record id -> time it was added (unix seconds);
- ``{prefix}dlq:record`` — hash, record id -> the record as JSON.

Both are always changed together, in one ``MULTI`` transaction or one Lua script, so
an id is in the index exactly when its record is in the hash.

Ids are time-based (milliseconds since the epoch in 12 hex digits, then 8 random hex
digits; increasing within a process), so they sort by the time they were added, and
records added in the same millisecond list in a stable order.

Retention: after every :meth:`DeadLetterStore.add` (and on :meth:`~DeadLetterStore.prune`)
records older than ``ttl`` seconds are dropped, then the oldest records beyond
``max_records`` — always oldest first. ``ttl=0`` or ``max_records=0`` switches that
limit off. The worker reads both from ``MAILWORKER_DLQ_TTL`` (default 30 days) and
``MAILWORKER_DLQ_MAX`` (default 100000).

The record type, :class:`DeadLetter`, and its summaries live in
:mod:`mailworker.store._dlq_record` and are re-exported here.
"""

from __future__ import annotations

import builtins
import dataclasses
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import redis

from mailworker.store import keys
from mailworker.store._dlq_record import (
    KEPT_META,
    REASONS,
    DeadLetter,
    DeadLetterReason,
    code_matcher,
    payload_summary,
)

__all__ = [
    "KEPT_META",
    "REASONS",
    "DeadLetter",
    "DeadLetterReason",
    "DeadLetterStore",
    "code_matcher",
    "payload_summary",
]

#: Records read or removed per Redis round trip.
_BATCH = 500

# Drop up to ARGV[3] records older than ARGV[1]; with room left in that batch, also the
# oldest beyond ARGV[2] records (0: no limit). Returns how many were dropped; the caller
# repeats while a full batch went, so a large expired backlog never blocks Redis long.
_PRUNE = """
local batch = tonumber(ARGV[3])
local max = tonumber(ARGV[2])
local function drop(ids)
    if #ids > 0 then
        redis.call('ZREM', KEYS[1], unpack(ids))
        redis.call('HDEL', KEYS[2], unpack(ids))
    end
    return #ids
end
local n = drop(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0, batch))
if n < batch and max > 0 then
    local excess = redis.call('ZCARD', KEYS[1]) - max
    if excess > 0 then
        n = n + drop(redis.call('ZRANGE', KEYS[1], 0, math.min(excess, batch - n) - 1))
    end
end
return n
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class DeadLetterStore:
    """Dead-letter records in Redis: add, read, filter, re-queue, purge, prune.

    Args:
        redis: the client; ``decode_responses`` may be on or off.
        max_records: keep at most this many records (0: no limit).
        ttl: drop records older than this many seconds (0: no limit).
        prefix: key prefix (see :mod:`mailworker.store.keys`).
        clock: the time source, unix seconds (tests pass a fake one).

    Raises:
        ValueError: ``max_records`` or ``ttl`` is negative.
    """

    def __init__(
        self,
        redis: redis.Redis,
        *,
        max_records: int = 100_000,
        ttl: float = 30 * 86400,
        prefix: str = keys.PREFIX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_records < 0:
            raise ValueError(f"max_records={max_records}: must not be negative")
        if ttl < 0:
            raise ValueError(f"ttl={ttl}: must not be negative")
        self.redis = redis
        self.max_records = max_records
        self.ttl = ttl
        self._clock = clock
        self._index = keys.dlq_index(prefix)
        self._records = keys.dlq_record(prefix)
        self._prune = redis.register_script(_PRUNE)

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> DeadLetterStore:
        """A store on the Redis at ``url``; ``kw`` as for the constructor."""
        return cls(redis.Redis.from_url(url), **kw)

    def add(self, record: DeadLetter) -> str:
        """Store ``record`` under a new id (its ``id`` and ``created_at`` are replaced).

        Index and record are written in one transaction; then the store is pruned.

        Returns:
            The new record's id.
        """
        now = self._clock()
        id_ = _new_id(now)
        stored = dataclasses.replace(record, id=id_, created_at=now)
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(self._index, {id_: now})
        pipe.hset(self._records, id_, stored.to_json())
        pipe.execute()
        self.prune()
        return id_

    def get(self, id: str) -> DeadLetter | None:
        """The record ``id``, or None if there is none."""
        raw = self.redis.hget(self._records, id)
        return None if raw is None else _decode(id, raw)

    def ids(
        self,
        *,
        reason: str | None = None,
        code: str | None = None,
        profile: str | None = None,
        since: float | None = None,
        older_than: float | None = None,
        limit: int | None = None,
    ) -> list[str]:
        """Ids of the matching records, newest first (arguments as for :meth:`list`)."""
        if reason is None and code is None and profile is None:
            return self._index_ids(since, older_than, limit)
        return [
            r.id
            for r in self._select(
                reason=reason,
                code=code,
                profile=profile,
                since=since,
                older_than=older_than,
                limit=limit,
            )
        ]

    def list(
        self,
        *,
        reason: str | None = None,
        code: str | None = None,
        profile: str | None = None,
        since: float | None = None,
        older_than: float | None = None,
        limit: int | None = None,
    ) -> list[DeadLetter]:
        """The matching records, newest first.

        Args:
            reason: only this reason.
            code: only this reply code (``"550"``), class (``"5xx"``) or enhanced
                status code (``"5.1.1"``).
            profile: only this SMTP profile.
            since: only records added at or after this unix time.
            older_than: only records added more than this many seconds ago.
            limit: at most this many records (None: all).

        Raises:
            ValueError: ``code`` is not a code, class or enhanced code.
        """
        return list(
            self._select(
                reason=reason,
                code=code,
                profile=profile,
                since=since,
                older_than=older_than,
                limit=limit,
            )
        )

    def count(self) -> int:
        """How many records the store holds."""
        return int(self.redis.zcard(self._index))

    def remove(self, ids: Iterable[str]) -> int:
        """Delete the records ``ids`` (index entry and record together, per id).

        Returns:
            How many of them existed.
        """
        removed = 0
        for chunk in _chunks(ids):
            pipe = self.redis.pipeline(transaction=True)
            for id_ in chunk:
                pipe.zrem(self._index, id_)
                pipe.hdel(self._records, id_)
            results = pipe.execute()
            removed += sum(1 for z, h in zip(results[::2], results[1::2], strict=True) if z or h)
        return removed

    def requeue(self, id: str, publish: Callable[[str, dict[str, Any]], str]) -> str | None:
        """Send the record ``id`` again and remove it once that succeeded.

        ``publish(task, kwargs)`` must enqueue the task and return its id. The record
        is removed only after ``publish`` returned: if it raises, the record stays and
        the exception propagates. If removing then fails the record stays too, and may
        be re-queued twice — never lost.

        Returns:
            The new task id, or None if there is no record ``id``.
        """
        record = self.get(id)
        if record is None:
            return None
        task_id = publish(record.task, record.requeue_kwargs())
        self.remove([id])
        return task_id

    def purge(
        self,
        *,
        ids: Iterable[str] | None = None,
        older_than: float | None = None,
        reason: str | None = None,
        code: str | None = None,
        profile: str | None = None,
        since: float | None = None,
    ) -> int:
        """Delete records: the given ``ids``, or every record matching the filters.

        With ``ids`` the filters are ignored; without ids and filters, every record goes.

        Args:
            ids: exactly these records.
            older_than: records added more than this many seconds ago.
            reason: as for :meth:`list`.
            code: as for :meth:`list`.
            profile: as for :meth:`list`.
            since: as for :meth:`list`.

        Returns:
            How many records were deleted.
        """
        if ids is None:
            ids = self.ids(
                reason=reason, code=code, profile=profile, since=since, older_than=older_than
            )
        return self.remove(ids)

    def prune(self) -> int:
        """Drop records older than ``ttl``, then the oldest beyond ``max_records``.

        Returns:
            How many records were dropped.
        """
        cutoff = self._clock() - self.ttl if self.ttl else float("-inf")
        dropped = 0
        while True:
            n = int(
                cast(
                    int,
                    self._prune(
                        keys=[self._index, self._records],
                        args=[repr(cutoff), self.max_records, _BATCH],
                    ),
                )
            )
            dropped += n
            if n < _BATCH:
                return dropped

    def stats(self) -> dict[str, dict[str, int]]:
        """Record counts by ``reason``, ``code`` (``"none"`` without one) and ``profile``."""
        by: dict[str, Counter[str]] = {"reason": Counter(), "code": Counter(), "profile": Counter()}
        for record in self._records_for(self._index_ids(None, None, None)):
            by["reason"][record.reason] += 1
            by["code"][str(record.code) if record.code is not None else "none"] += 1
            by["profile"][record.profile] += 1
        return {name: dict(counter.most_common()) for name, counter in by.items()}

    def _index_ids(
        self, since: float | None, older_than: float | None, limit: int | None
    ) -> builtins.list[str]:
        high: float | str = "+inf"
        if older_than is not None:
            high = f"({self._clock() - older_than!r}"
        low: float | str = "-inf" if since is None else since
        if limit is None:
            raw = self.redis.zrevrangebyscore(self._index, high, low)
        else:
            raw = self.redis.zrevrangebyscore(self._index, high, low, start=0, num=limit)
        return [_text(i) for i in cast("list[bytes | str]", raw)]

    def _select(
        self,
        *,
        reason: str | None,
        code: str | None,
        profile: str | None,
        since: float | None,
        older_than: float | None,
        limit: int | None,
    ) -> Iterator[DeadLetter]:
        tests: builtins.list[Callable[[DeadLetter], bool]] = []
        if code is not None:
            tests.append(code_matcher(code))
        if reason is not None:
            tests.append(lambda r: r.reason == reason)
        if profile is not None:
            tests.append(lambda r: r.profile == profile)
        if limit is not None and limit <= 0:
            return
        # A snapshot of the ids first, so paging is not disturbed by concurrent changes.
        ids = self._index_ids(since, older_than, None if tests else limit)
        found = 0
        for record in self._records_for(ids):
            if all(test(record) for test in tests):
                yield record
                found += 1
                if limit is not None and found >= limit:
                    return

    def _records_for(self, ids: builtins.list[str]) -> Iterator[DeadLetter]:
        """The records of ``ids`` in that order; ids removed meanwhile are skipped."""
        for chunk in _chunks(ids):
            raws = cast("list[bytes | None]", self.redis.hmget(self._records, chunk))
            for id_, raw in zip(chunk, raws, strict=True):
                if raw is not None:
                    yield _decode(id_, raw)


_last_id = 0
_id_lock = threading.Lock()


def _new_id(now: float) -> str:
    """20 hex digits: milliseconds, then 32 random bits; increasing within this process."""
    global _last_id  # noqa: PLW0603 - one sequence per process, like a ULID generator
    with _id_lock:
        value = max((int(now * 1000) << 32) | secrets.randbits(32), _last_id + 1)
        _last_id = value
    return f"{value:020x}"


def _decode(id_: str, raw: bytes | str) -> DeadLetter:
    try:
        return DeadLetter.from_json(raw)
    except ValueError as exc:
        raise ValueError(f"dead-letter record {id_} is unreadable: {exc}") from None


def _chunks(items: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= _BATCH:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
