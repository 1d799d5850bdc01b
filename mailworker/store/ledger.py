"""Per-message bookkeeping in Redis: what was sent, what runs now, what keeps dying.

Together with ``acks_late`` these give "exactly once" delivery everywhere except
the instant between the server's 250 and :meth:`Ledger.record_sent`.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, cast

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


class Ledger:
    """Idempotency records, per-message locks and delivery counters."""

    def __init__(self, client: redis.Redis, *, prefix: str = keys.PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        self._release = client.register_script(_RELEASE)

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
