"""The dead-letter store: messages mailworker gave up on, kept in Redis for operators.

A message lands here when its payload is invalid (``reason="invalid"``), the server
refused it for good (``"permanent"``), its retries ran out (``"exhausted"``) or it kept
killing its worker (``"poison"``). Each record keeps the original task kwargs, so it
can be re-queued as it was, together with the last error, the transcript of the last
attempt and the attempt history.

Layout (see :mod:`mailworker.store.keys`), as dramatiq keeps its dead letters, with the
payload kept apart so that listing and counting never load it:

- ``{prefix}dlq:index`` — sorted set, record id -> time it was added (unix seconds);
- ``{prefix}dlq:record`` — hash, record id -> the record as JSON, its ``kwargs`` replaced
  by a compact summary (attachments as name and size, long strings cut);
- ``{prefix}dlq:payload`` — hash, record id -> the payload (the task ``kwargs``) as JSON;
- ``{prefix}dlq:payload_index`` — sorted set, the ids in ``dlq:payload`` -> time added;
- ``{prefix}dlq:bytes`` — the bytes ``dlq:record`` and ``dlq:payload`` hold together.

They are always changed together, in one Lua script, so an id is in the index exactly
when its record is in the hash, its payload (if any) goes with it, and the byte count
stays exact.

Ids are time-based (milliseconds since the epoch in 12 hex digits, then 8 random hex
digits; increasing within a process), so they sort by the time they were added, and
records added in the same millisecond list in a stable order.

Retention: after every :meth:`DeadLetterStore.add` (and on :meth:`~DeadLetterStore.prune`)
records older than ``ttl`` seconds are dropped, then the oldest records beyond
``max_records`` — always oldest first. Then, while the store holds more than
``max_bytes``, the oldest *payloads* are evicted first, and only when no payload is left
the oldest whole records: what failed, for whom, the server's reply and the transcript
are worth more to an operator than the bytes to resend an old message, and they take a
few KiB where a payload may take MiB. ``ttl=0``, ``max_records=0`` or ``max_bytes=0``
switches that limit off. The worker reads them from ``MAILWORKER_DLQ_TTL`` (default 30
days), ``MAILWORKER_DLQ_MAX`` (default 100000) and ``MAILWORKER_DLQ_MAX_BYTES`` (default
256 MiB).

A payload larger than ``max_payload_bytes`` (``MAILWORKER_DLQ_MAX_PAYLOAD_BYTES``, default
34 MiB: the largest payload a message within the 25 MiB limit can have, base64 and all)
or than the whole budget is not stored at all: the record keeps everything else, says
why in ``payload_dropped``, and cannot be re-queued (:class:`PayloadNotKeptError`).

The record type, :class:`DeadLetter`, and its summaries live in
:mod:`mailworker.store._dlq_record` and are re-exported here.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import redis

from mailworker.message.payload import MAX_MESSAGE_BYTES
from mailworker.store import keys
from mailworker.store._dlq_record import (
    KEPT_META,
    REASONS,
    DeadLetter,
    DeadLetterReason,
    PayloadNotKeptError,
    code_matcher,
    compact_summary,
    payload_summary,
)
from mailworker.store._dlq_scripts import ADD, PRUNE, REMOVE

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "EVICTED",
    "KEPT_META",
    "REASONS",
    "DeadLetter",
    "DeadLetterReason",
    "DeadLetterStore",
    "PayloadNotKeptError",
    "code_matcher",
    "compact_summary",
    "payload_summary",
]

_MIB = 1024 * 1024

#: Default byte budget of the whole store: a quarter of a 1 GiB Redis, room for seven
#: payloads at the per-record cap or some 100,000 records of a few KiB.
DEFAULT_MAX_BYTES = 256 * _MIB

#: Default cap of one record's payload: a message within ``MAX_MESSAGE_BYTES`` (25 MiB)
#: travels base64-encoded (33.3 MiB), so 34 MiB keeps every payload that could be
#: re-sent, and drops those refused for their size, which re-sending would not help.
DEFAULT_MAX_PAYLOAD_BYTES = (MAX_MESSAGE_BYTES * 4 // 3 // _MIB + 1) * _MIB

#: ``payload_dropped`` of a record whose payload was evicted for the byte budget.
EVICTED = "evicted, oldest first, to keep the dead letters within MAILWORKER_DLQ_MAX_BYTES"

#: Records read or removed per Redis round trip.
_BATCH = 500


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class DeadLetterStore:
    """Dead-letter records in Redis: add, read, filter, re-queue, purge, prune.

    Args:
        redis: the client; ``decode_responses`` may be on or off.
        max_records: keep at most this many records (0: no limit).
        ttl: drop records older than this many seconds (0: no limit).
        max_bytes: keep at most this many bytes of records and payloads together,
            evicting the oldest payloads first (0: no limit).
        max_payload_bytes: keep no payload larger than this (0: no limit).
        prefix: key prefix (see :mod:`mailworker.store.keys`).
        clock: the time source, unix seconds (tests pass a fake one).

    Raises:
        ValueError: a limit is negative.
    """

    def __init__(
        self,
        redis: redis.Redis,
        *,
        max_records: int = 100_000,
        ttl: float = 30 * 86400,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        prefix: str = keys.PREFIX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        limits = {
            "max_records": max_records,
            "ttl": ttl,
            "max_bytes": max_bytes,
            "max_payload_bytes": max_payload_bytes,
        }
        for name, value in limits.items():
            if value < 0:
                raise ValueError(f"{name}={value}: must not be negative")
        self.redis = redis
        self.max_records = max_records
        self.ttl = ttl
        self.max_bytes = max_bytes
        self.max_payload_bytes = max_payload_bytes
        self._clock = clock
        self._index = keys.dlq_index(prefix)
        self._records = keys.dlq_record(prefix)
        self._payloads = keys.dlq_payload(prefix)
        self._keys = [
            self._index,
            self._records,
            self._payloads,
            keys.dlq_payload_index(prefix),
            keys.dlq_bytes(prefix),
        ]
        self._add = redis.register_script(ADD)
        self._remove = redis.register_script(REMOVE)
        self._prune = redis.register_script(PRUNE)

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> DeadLetterStore:
        """A store on the Redis at ``url``; ``kw`` as for the constructor."""
        return cls(redis.Redis.from_url(url), **kw)

    def add(self, record: DeadLetter) -> str:
        """Store ``record`` under a new id (its ``id`` and ``created_at`` are replaced).

        The payload (``record.kwargs``) is stored apart from the rest, unless it is larger
        than ``max_payload_bytes`` or ``max_bytes``: then the record says why in
        ``payload_dropped``. Everything is written in one script; then the store is
        pruned (which may evict older payloads to stay within ``max_bytes``).

        Returns:
            The new record's id.
        """
        now = self._clock()
        id_ = _new_id(now)
        payload = json.dumps(record.kwargs, ensure_ascii=False, separators=(",", ":"))
        if record.payload_complete:
            size = len(payload.encode())
            dropped = self._not_kept(size)
        else:  # a record read without its payload: there is none to keep
            size = record.payload_bytes
            dropped = record.payload_dropped or "the record was stored again without it"
        stored = dataclasses.replace(
            record,
            id=id_,
            created_at=now,
            kwargs=compact_summary(record.kwargs),
            payload_bytes=size,
            payload_dropped=dropped,
            payload_complete=False,
        )
        self._add(
            keys=self._keys,
            args=[id_, repr(now), stored.to_json(), "" if stored.payload_dropped else payload],
        )
        self.prune()
        return id_

    def _not_kept(self, size: int) -> str | None:
        """Why a payload of ``size`` bytes is not kept, or None if it is."""
        for limit, name in (
            (self.max_payload_bytes, "the per-record cap, MAILWORKER_DLQ_MAX_PAYLOAD_BYTES"),
            (self.max_bytes, "the whole store's budget, MAILWORKER_DLQ_MAX_BYTES"),
        ):
            if limit and size > limit:
                return f"at {_size(size)} it was over {name} ({_size(limit)})"
        return None

    def get(self, id: str) -> DeadLetter | None:
        """The record ``id`` with its payload, or None if there is none.

        If the payload is no longer kept, ``kwargs`` is its summary, ``payload_complete``
        is False and ``payload_dropped`` says why.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(self._records, id)
        pipe.hget(self._payloads, id)
        raw, payload = cast("list[bytes | str | None]", pipe.execute())
        if raw is None:
            return None
        record = _decode(id, raw)
        if payload is not None:
            return dataclasses.replace(
                record, kwargs=_decode_payload(id, payload), payload_complete=True
            )
        if record.payload_complete:  # written before payloads were kept apart
            return record
        return dataclasses.replace(record, payload_dropped=record.payload_dropped or EVICTED)

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
        """The matching records, newest first, without their payloads.

        Each record's ``kwargs`` is a summary of its payload (``payload_complete`` is
        False; read one with :meth:`get` to re-queue it by hand); ``payload_dropped`` says
        whether and why the store no longer holds the payload.

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
        """Delete the records ``ids`` (index entry, record and payload together, per id).

        Returns:
            How many of them existed.
        """
        removed = 0
        for chunk in _chunks(ids):
            removed += int(cast(int, self._remove(keys=self._keys, args=chunk)))
        return removed

    def size(self) -> int:
        """How many bytes the records and payloads take (what ``max_bytes`` limits)."""
        return int(self.redis.get(self._keys[4]) or 0)

    def requeue(self, id: str, publish: Callable[[str, dict[str, Any]], str]) -> str | None:
        """Send the record ``id`` again and remove it once that succeeded.

        ``publish(task, kwargs)`` must enqueue the task and return its id. The record
        is removed only after ``publish`` returned: if it raises, the record stays and
        the exception propagates. If removing then fails the record stays too, and may
        be re-queued twice — never lost.

        Returns:
            The new task id, or None if there is no record ``id``.

        Raises:
            PayloadNotKeptError: the store no longer holds the record's payload (it was
                over the per-record cap or evicted for the byte budget); nothing is
                published and the record stays.
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
        """Drop records older than ``ttl``, then the oldest beyond ``max_records``; then,
        while over ``max_bytes``, evict the oldest payloads, then the oldest records.

        Returns:
            How many records were dropped (evicted payloads not counted).
        """
        cutoff = self._clock() - self.ttl if self.ttl else float("-inf")
        dropped = 0
        while True:
            n, work = cast(
                "list[int]",
                self._prune(
                    keys=self._keys,
                    args=[repr(cutoff), self.max_records, _BATCH, self.max_bytes],
                ),
            )
            dropped += int(n)
            if int(work) < _BATCH:
                return dropped

    def stats(self) -> dict[str, dict[str, int]]:
        """Record counts by ``reason``, ``code`` (``"none"`` without one) and ``profile``."""
        by: dict[str, Counter[str]] = {"reason": Counter(), "code": Counter(), "profile": Counter()}
        ids = self._index_ids(None, None, None)
        for record in self._records_for(ids, payload_state=False):
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
            wanted = profile.lower()
            tests.append(lambda r: r.profile.lower() == wanted)
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

    def _records_for(
        self, ids: builtins.list[str], *, payload_state: bool = True
    ) -> Iterator[DeadLetter]:
        """The records of ``ids`` in that order, without payloads; ids removed meanwhile
        are skipped. With ``payload_state``, ``payload_dropped`` tells evicted payloads
        too (asking whether each is kept, not loading it)."""
        for chunk in _chunks(ids):
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(self._records, chunk)
            if payload_state:
                for id_ in chunk:
                    pipe.zscore(self._keys[3], id_)
            raws, *scores = pipe.execute()
            kept = scores or [True] * len(chunk)
            for id_, raw, score in zip(chunk, raws, kept, strict=True):
                if raw is None:
                    continue
                record = _decode(id_, raw)
                if score is None and not record.payload_complete and not record.payload_dropped:
                    record = dataclasses.replace(record, payload_dropped=EVICTED)
                yield record


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


def _decode_payload(id_: str, raw: bytes | str) -> dict[str, Any]:
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"dead-letter payload {id_} is unreadable: {exc}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"dead-letter payload {id_} is unreadable: not a JSON object")
    return payload


def _size(n: int) -> str:
    return f"{n} bytes" if n < _MIB else f"{n / _MIB:.1f} MiB"


def _chunks(items: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= _BATCH:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
