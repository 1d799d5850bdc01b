"""Per-message bookkeeping in Redis: what was sent, what runs now, what keeps dying.

Together with ``acks_late`` these give "exactly once" delivery everywhere except
the instant between the server's 250 and :meth:`Ledger.record_sent`.

A delivery talks to Redis twice in the common case: :meth:`Ledger.begin` before the
send (the sent check, the start count and the lock, atomically in one script) and
:meth:`Ledger.finish` after it (the idempotency record, the lock's release and the
start count's removal, in one script).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Literal, cast

import redis

from mailworker.store import keys

# Delete the lock only if it still holds our token: an expired lock may have
# been taken by a redelivery since.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


# KEYS: sent, runs, lock. ARGV: token, runs ttl (s), lock ttl (ms), most starts.
# A sent message whose follow-up is done is neither counted nor locked: it is never
# poison and nothing runs for it. Otherwise one more start is counted; past the most
# allowed, no lock is taken (the caller dead-letters it as poison).
_BEGIN = """
local sent = redis.call('get', KEYS[1])
if sent then
    local record = cjson.decode(sent)
    local refused = record['refused']
    local pending = type(refused) == 'table' and next(refused) ~= nil
    if not pending or record['follow_up_done'] == true then
        return {'done', 0, sent}
    end
end
local starts = redis.call('incr', KEYS[2])
redis.call('expire', KEYS[2], ARGV[2])
if starts > tonumber(ARGV[4]) then
    return {'poison', starts, sent or false}
end
if not redis.call('set', KEYS[3], ARGV[1], 'NX', 'PX', ARGV[3]) then
    return {'locked', starts, false}
end
return {'ok', starts, sent or false}
"""

# KEYS: sent, runs, lock. ARGV: token, record JSON ('' for none), record ttl (s).
_FINISH = """
if ARGV[2] ~= '' then
    redis.call('set', KEYS[1], ARGV[2], 'EX', ARGV[3])
end
redis.call('del', KEYS[2])
if redis.call('get', KEYS[3]) == ARGV[1] then
    redis.call('del', KEYS[3])
end
return 1
"""

#: What :meth:`Ledger.begin` found: ``ok`` (locked for us), ``done`` (sent, follow-up
#: done: nothing to do), ``poison`` (started too often; not locked), ``locked`` (a
#: delivery runs now).
BeginStatus = Literal["ok", "done", "poison", "locked"]


@dataclass(frozen=True)
class Begun:
    """The outcome of :meth:`Ledger.begin`.

    Attributes:
        status: see :data:`BeginStatus`.
        starts: starts of the message counted so far (0 when ``done``).
        token: the lock's token when ``status`` is ``ok``.
        sent: the sent record, when the server accepted the message before.
    """

    status: BeginStatus
    starts: int
    token: str | None
    sent: dict[str, Any] | None


def _begun(reply: Any, token: str) -> Begun:
    status, starts, raw = reply
    status = status.decode() if isinstance(status, bytes) else str(status)
    return Begun(
        status=cast(BeginStatus, status),
        starts=int(starts),
        token=token if status == "ok" else None,
        sent=cast(dict[str, Any], json.loads(raw)) if raw else None,
    )


class Ledger:
    """Idempotency records, per-message locks and delivery counters."""

    def __init__(self, client: redis.Redis, *, prefix: str = keys.PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        self._release = client.register_script(_RELEASE)
        self._begin = client.register_script(_BEGIN)
        self._finish = client.register_script(_FINISH)

    def begin(
        self, message_key: str, origin: str, *, lock_ttl: float, runs_ttl: float, max_starts: int
    ) -> Begun:
        """Before a delivery, in one round trip: is it sent already; count one more
        start of its first task message (``origin``); take its lock.

        The lock is taken only when the status is ``ok``; the start is counted unless
        the status is ``done``.
        """
        return self.begin_many(
            [(message_key, origin)], lock_ttl=lock_ttl, runs_ttl=runs_ttl, max_starts=max_starts
        )[0]

    def begin_many(
        self,
        messages: list[tuple[str, str]],
        *,
        lock_ttl: float,
        runs_ttl: float,
        max_starts: int,
    ) -> list[Begun]:
        """:meth:`begin` for each ``(message key, origin)``, pipelined: one round trip
        (two the first time the script runs on a connection)."""
        args = [int(runs_ttl), int(lock_ttl * 1000), max_starts]
        tokens = [secrets.token_hex(8) for _ in messages]
        if len(messages) == 1:
            replies = [self._begin(keys=self._keys(*messages[0]), args=[tokens[0], *args])]
        else:
            pipe = self._redis.pipeline(transaction=False)
            for (key, origin), token in zip(messages, tokens, strict=True):
                self._begin(keys=self._keys(key, origin), args=[token, *args], client=pipe)
            replies = pipe.execute()
        return [_begun(reply, token) for reply, token in zip(replies, tokens, strict=True)]

    def finish(
        self,
        message_key: str,
        origin: str,
        token: str,
        *,
        record: dict[str, Any] | None = None,
        ttl: float = 0,
    ) -> None:
        """After a delivery, in one round trip: keep ``record`` as the sent record (if
        given, for ``ttl`` seconds), forget the start count, release the lock if it
        is still ours."""
        self._finish(
            keys=self._keys(message_key, origin),
            args=[token, json.dumps(record) if record is not None else "", int(ttl)],
        )

    def finish_many(
        self, finished: list[tuple[str, str, str, dict[str, Any]]], *, ttl: float
    ) -> None:
        """:meth:`finish` with a record for each ``(message key, origin, token, record)``,
        pipelined: one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for message_key, origin, token, record in finished:
            self._finish(
                keys=self._keys(message_key, origin),
                args=[token, json.dumps(record), int(ttl)],
                client=pipe,
            )
        pipe.execute()

    def _keys(self, message_key: str, origin: str) -> list[str]:
        return [
            keys.sent(message_key, self._prefix),
            keys.runs(origin, self._prefix),
            keys.lock(message_key, self._prefix),
        ]

    def sent(self, message_key: str) -> dict[str, Any] | None:
        """The recorded result if this message was already accepted, else None."""
        raw = self._redis.get(keys.sent(message_key, self._prefix))
        return cast(dict[str, Any], json.loads(raw)) if raw else None

    def record_sent(self, message_key: str, result: dict[str, Any], ttl: float) -> None:
        """Remember that the server accepted this message (call right after its 250)."""
        self._redis.set(keys.sent(message_key, self._prefix), json.dumps(result), ex=int(ttl))

    def acquire(self, message_key: str, ttl: float) -> str | None:
        """Take the message's lock; returns a token, or None if a delivery holds it."""
        token = secrets.token_hex(8)
        taken = self._redis.set(
            keys.lock(message_key, self._prefix), token, nx=True, px=int(ttl * 1000)
        )
        return token if taken else None

    def release(self, message_key: str, token: str) -> None:
        """Give the lock back if it is still ours."""
        self._release(keys=[keys.lock(message_key, self._prefix)], args=[token])

    def count_start(self, task_id: str, ttl: float) -> int:
        """Count one more start of this task message; returns the count so far."""
        key = keys.runs(task_id, self._prefix)
        pipe = self._redis.pipeline()
        pipe.incr(key)
        pipe.expire(key, int(ttl))
        count, _ = pipe.execute()
        return int(count)

    def forget_starts(self, task_id: str) -> None:
        """The task message finished (acknowledged): its counter is no longer needed."""
        self._redis.delete(keys.runs(task_id, self._prefix))
