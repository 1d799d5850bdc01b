"""Provider limits held by the whole fleet in Redis: rate, connections, throttling, breaker.

Every worker process on every machine shares these, so a provider's limits hold for the
fleet, not for each process (DESIGN.md, "A fleet"). Each primitive is one key per profile
(:mod:`mailworker.store.keys`) changed by one Lua script, and every script reads the time
from Redis (``TIME``): machines' clocks may disagree, Redis has one.

:class:`RateLimiter` — ``{p}rate:<profile>``, a hash ``{tokens, ts}``
    A token bucket. It holds up to ``burst`` tokens (default ``max(1, count)`` for a
    ``/s`` rate, else 1, so the fleet never bursts far above the rate) and refills at
    ``count / per`` tokens a second. ``acquire`` takes one token or says how long until
    one is free, and takes nothing then. The key expires once the bucket would be full
    again, which loses nothing.

:class:`Leases` — ``{p}leases:<profile>``, a sorted set holder -> expiry
    A semaphore of leases: at most ``limit`` holders (one per SMTP session) whose expiry
    is in the future. Expired leases are removed before every grant, so a process that
    died without releasing frees its slot after ``ttl``; a holder renews its lease well
    within ``ttl`` while the session is open. The key expires with its last lease.

:class:`Throttle` — ``{p}throttle:<profile>``, a hash ``{until, backoff}``
    After a throttling reply (421, 4.7.x) nobody in the fleet connects until ``until``.
    A hit while a back-off is in force counts for nothing (many processes see the same
    421); the first hit after it doubles ``backoff`` (from ``base``, up to ``cap``).
    ``clear`` (a success) forgets the doubling, not the back-off in force: a session
    that was open before still succeeding says nothing of new connections. The key
    expires ``cap`` seconds after the back-off ends.

:class:`Breaker` — ``{p}breaker:<profile>``, a hash
    ``{state, failures, recent, opened_at, retry_at}``; no key means closed with no
    failures. ``failures`` counts consecutive failures; ``recent`` keeps the times of the
    last ones within ``window`` (space-separated). ``failures`` of them within ``window``
    open the breaker until ``retry_at = opened_at + reset``. From then on the first
    :meth:`Breaker.allow` gets ``"probe"`` and pushes ``retry_at`` on by ``reset``
    (``half_open``), so exactly one caller per ``reset`` probes; a success closes the
    breaker (deletes the key), a failure re-opens it for another ``reset``. A closed
    breaker's key expires ``window`` after its last failure; an open one is kept.

Times in Redis are unix seconds of the Redis server's clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import redis

from mailworker.smtp.limits import Rate
from mailworker.store import keys

__all__ = [
    "Breaker",
    "BreakerState",
    "BreakerStatus",
    "Leases",
    "RateLimiter",
    "Throttle",
    "default_burst",
]

BreakerState = Literal["closed", "open", "half_open"]

#: Shared by every script: the Redis server's time in seconds, and numbers written back
#: with every digit (Lua's tostring keeps 14, which would cut the time to 10 ms).
_LUA_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local function fmt(x) return string.format('%.17g', x) end
"""

#: KEYS: bucket. ARGV: refill per second, capacity, take (1) or only look (0).
#: Returns the seconds to wait (0: a token was taken), or the tokens left when looking.
_RATE = (
    _LUA_PRELUDE
    + """
local refill, capacity = tonumber(ARGV[1]), tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens, ts = tonumber(state[1]), tonumber(state[2])
if tokens == nil or ts == nil then tokens, ts = capacity, now end
-- A clock that went back (a failover to another machine) refills nothing, stalls nothing.
if now > ts then tokens = tokens + (now - ts) * refill end
ts = now
tokens = math.min(capacity, tokens)
if ARGV[3] == '0' then return fmt(tokens) end
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / refill end
redis.call('HSET', KEYS[1], 'tokens', fmt(tokens), 'ts', fmt(ts))
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - tokens) / refill * 1000) + 1000)
return fmt(wait)
"""
)

#: Drop expired leases, then make the key live as long as its longest lease.
_LEASES_PRELUDE = (
    _LUA_PRELUDE
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(now))
local function keep(expiry)
    local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    local until_ = math.max(expiry, tonumber(last[2] or expiry))
    redis.call('PEXPIRE', KEYS[1], math.ceil((until_ - now) * 1000) + 1000)
end
"""
)

#: KEYS: leases. ARGV: holder, limit, ttl. Returns 1 when granted (or renewed), else 0.
_LEASE_ACQUIRE = (
    _LEASES_PRELUDE
    + """
local expiry = now + tonumber(ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1])
        or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('ZADD', KEYS[1], fmt(expiry), ARGV[1])
    keep(expiry)
    return 1
end
return 0
"""
)

#: KEYS: leases. ARGV: holder, ttl. Returns 1 when renewed, 0 when the lease had expired.
_LEASE_RENEW = (
    _LEASES_PRELUDE
    + """
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
local expiry = now + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', fmt(expiry), ARGV[1])
keep(expiry)
return 1
"""
)

#: KEYS: leases. Returns the number of live leases.
_LEASE_HELD = (
    _LUA_PRELUDE
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(now), '+inf')
"""
)

#: KEYS: throttle. ARGV: base, cap. Returns the seconds left of the back-off in force.
_THROTTLE_HIT = (
    _LUA_PRELUDE
    + """
local state = redis.call('HMGET', KEYS[1], 'until', 'backoff')
local until_, backoff = tonumber(state[1]), tonumber(state[2])
if until_ and now < until_ then return fmt(until_ - now) end
local base, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
if backoff then backoff = math.min(cap, math.max(base, backoff * 2)) else backoff = base end
redis.call('HSET', KEYS[1], 'until', fmt(now + backoff), 'backoff', fmt(backoff))
redis.call('PEXPIRE', KEYS[1], math.ceil((backoff + cap) * 1000))
return fmt(backoff)
"""
)

#: KEYS: throttle. Returns the seconds left of the back-off in force, 0 if none.
_THROTTLE_WAIT = (
    _LUA_PRELUDE
    + """
local until_ = tonumber(redis.call('HGET', KEYS[1], 'until'))
if until_ and now < until_ then return fmt(until_ - now) end
return '0'
"""
)

#: KEYS: breaker. ARGV: reset. Returns closed, probe or open.
_BREAKER_ALLOW = (
    _LUA_PRELUDE
    + """
local state = redis.call('HMGET', KEYS[1], 'state', 'retry_at')
if not state[1] or state[1] == 'closed' then return 'closed' end
if now < tonumber(state[2]) then return 'open' end
redis.call('HSET', KEYS[1], 'state', 'half_open', 'retry_at', fmt(now + tonumber(ARGV[1])))
return 'probe'
"""
)

#: KEYS: breaker. ARGV: failures, window, reset. Returns 1 when this call opened it.
_BREAKER_FAILURE = (
    _LUA_PRELUDE
    + """
local threshold, window, reset = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'state', 'failures', 'recent')
local count = (tonumber(state[2]) or 0) + 1
if state[1] == 'open' then
    redis.call('HSET', KEYS[1], 'failures', count)
    return 0
end
if state[1] == 'half_open' then
    redis.call('HSET', KEYS[1], 'state', 'open', 'failures', count,
               'retry_at', fmt(now + reset))
    return 1
end
local recent = {}
for stamp in string.gmatch(state[3] or '', '%S+') do
    if tonumber(stamp) > now - window then table.insert(recent, stamp) end
end
table.insert(recent, fmt(now))
while #recent > threshold do table.remove(recent, 1) end
if #recent >= threshold then
    redis.call('DEL', KEYS[1])
    redis.call('HSET', KEYS[1], 'state', 'open', 'failures', count,
               'opened_at', fmt(now), 'retry_at', fmt(now + reset))
    return 1
end
redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', count,
           'recent', table.concat(recent, ' '))
redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000))
return 0
"""
)

#: KEYS: breaker. Returns 1 when this call closed an open or half-open breaker.
_BREAKER_SUCCESS = """
local state = redis.call('HGET', KEYS[1], 'state')
redis.call('DEL', KEYS[1])
if state == 'open' or state == 'half_open' then return 1 end
return 0
"""


def default_burst(rate: Rate) -> float:
    """The bucket's capacity when none is given: ``max(1, count)`` for a rate per second
    (``10/s`` may send 10 at once), else 1 (``600/m`` sends 10 a second, evenly)."""
    return max(1.0, rate.count) if rate.per == 1 else 1.0


def _text(value: Any) -> str:
    """A script's reply as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else str(value)


class RateLimiter:
    """Messages per time for each profile, across the fleet (token bucket)."""

    def __init__(self, client: redis.Redis, *, prefix: str = keys.PREFIX) -> None:
        self._prefix = prefix
        self._script = client.register_script(_RATE)

    def acquire(self, profile: str, rate: Rate, *, burst: float | None = None) -> float:
        """Take one token for ``profile``.

        Args:
            profile: the profile's (normalised) name.
            rate: its rate; ``rate.count / rate.per`` tokens a second refill the bucket.
            burst: the bucket's capacity (at least 1); default :func:`default_burst`.

        Returns:
            0.0 when a token was taken, else the seconds until one will be free (nothing
            was taken: wait that long, then call again).
        """
        return float(self._run(profile, rate, burst, take=True))

    def tokens(self, profile: str, rate: Rate, *, burst: float | None = None) -> float:
        """The tokens left now (up to the capacity), taking none; for ``mailworker status``."""
        return float(self._run(profile, rate, burst, take=False))

    def _run(self, profile: str, rate: Rate, burst: float | None, *, take: bool) -> str:
        capacity = default_burst(rate) if burst is None else burst
        if not (math.isfinite(capacity) and capacity >= 1):
            raise ValueError(f"burst must be a number of at least 1, not {burst!r}")
        args: list[str | int] = [repr(rate.per_second), repr(float(capacity)), int(take)]
        return _text(self._script(keys=[keys.rate(profile, self._prefix)], args=args))


class Leases:
    """Concurrent SMTP sessions for each profile, across the fleet (a lease semaphore).

    A holder is any string unique to one session, e.g. ``f"{hostname}:{pid}:{n}"``.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = keys.PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        self._acquire = client.register_script(_LEASE_ACQUIRE)
        self._renew = client.register_script(_LEASE_RENEW)
        self._held = client.register_script(_LEASE_HELD)

    def acquire(self, profile: str, limit: int, holder: str, ttl: float) -> bool:
        """Take a lease for ``ttl`` seconds if fewer than ``limit`` are live.

        Expired leases are reclaimed first; a holder that has one already renews it (and
        gets True even when the limit has been lowered below the leases held).
        """
        args: list[str | int] = [holder, limit, repr(float(ttl))]
        return bool(self._acquire(keys=[keys.leases(profile, self._prefix)], args=args))

    def renew(self, profile: str, holder: str, ttl: float) -> bool:
        """Extend ``holder``'s lease to ``ttl`` seconds from now.

        Returns:
            False when the lease had expired: it may have been taken by another; stop
            (close the session) or :meth:`acquire` again.
        """
        args = [holder, repr(float(ttl))]
        return bool(self._renew(keys=[keys.leases(profile, self._prefix)], args=args))

    def release(self, profile: str, holder: str) -> None:
        """Give the lease back (nothing happens if it is not held)."""
        self._redis.zrem(keys.leases(profile, self._prefix), holder)

    def held(self, profile: str) -> int:
        """How many leases are live now."""
        return int(self._held(keys=[keys.leases(profile, self._prefix)]))


class Throttle:
    """The fleet's back-off after a server said "too many connections" or throttled."""

    def __init__(self, client: redis.Redis, *, prefix: str = keys.PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        self._hit = client.register_script(_THROTTLE_HIT)
        self._wait = client.register_script(_THROTTLE_WAIT)

    def wait(self, profile: str) -> float:
        """Seconds left of the back-off in force, 0.0 if none."""
        return float(_text(self._wait(keys=[keys.throttle(profile, self._prefix)])))

    def hit(self, profile: str, base: float, cap: float) -> float:
        """Record one throttling reply.

        A hit while a back-off is in force counts for nothing; otherwise a back-off
        starts: ``base`` seconds after :meth:`clear` (or the first time), else twice the
        previous one, at most ``cap``.

        Returns:
            The seconds left of the back-off now in force: its whole length when this hit
            started it.
        """
        args = [repr(float(base)), repr(float(max(cap, base)))]
        return float(_text(self._hit(keys=[keys.throttle(profile, self._prefix)], args=args)))

    def clear(self, profile: str) -> None:
        """A success: the next back-off starts at ``base`` again (the one in force, if
        any, runs out: a session opened before it proves nothing of new ones)."""
        self._redis.hdel(keys.throttle(profile, self._prefix), "backoff")


@dataclass(frozen=True)
class BreakerStatus:
    """A breaker as stored now; times are unix seconds (Redis's clock).

    Attributes:
        state: ``closed``, ``open``, or ``half_open`` (a probe was let through).
        failures: consecutive failures (forgotten ``window`` after the last one while
            closed).
        opened_at: when it opened, if open or half-open.
        retry_at: when the next probe may go, if open or half-open (may be past: the
            next :meth:`Breaker.allow` gets the probe).
    """

    state: BreakerState
    failures: int
    opened_at: float | None
    retry_at: float | None


class Breaker:
    """A circuit breaker per profile, shared by the fleet."""

    def __init__(self, client: redis.Redis, *, prefix: str = keys.PREFIX) -> None:
        self._redis = client
        self._prefix = prefix
        self._allow = client.register_script(_BREAKER_ALLOW)
        self._failure = client.register_script(_BREAKER_FAILURE)
        self._success = client.register_script(_BREAKER_SUCCESS)

    def allow(self, profile: str, *, reset: float) -> Literal["closed", "probe", "open"]:
        """May this caller send through ``profile``?

        Returns:
            ``closed``: send. ``open``: don't (use a fallback). ``probe``: the breaker is
            open but its ``retry_at`` has come: this caller, exactly one across the fleet
            per ``reset`` seconds, may send one probe message and report its outcome
            with :meth:`success` or :meth:`failure`.
        """
        key = keys.breaker(profile, self._prefix)
        answer = _text(self._allow(keys=[key], args=[repr(float(reset))]))
        if answer == "probe":
            return "probe"
        return "open" if answer == "open" else "closed"

    def failure(self, profile: str, *, failures: int, window: float, reset: float) -> bool:
        """Record a connection-level or transient failure.

        Opens the breaker after ``failures`` consecutive ones within ``window`` seconds;
        a failed probe (half-open) re-opens it for another ``reset`` seconds.

        Returns:
            True when this call opened (or re-opened) the breaker.
        """
        key = keys.breaker(profile, self._prefix)
        args: list[str | int] = [int(failures), repr(float(window)), repr(float(reset))]
        return bool(self._failure(keys=[key], args=args))

    def success(self, profile: str) -> bool:
        """A message went through: close the breaker, forget the failures.

        Returns:
            True when this call closed an open or half-open breaker.
        """
        return bool(self._success(keys=[keys.breaker(profile, self._prefix)]))

    def status(self, profile: str) -> BreakerStatus:
        """The breaker as stored now."""
        raw = self._redis.hmget(
            keys.breaker(profile, self._prefix), ["state", "failures", "opened_at", "retry_at"]
        )
        state, failures, opened_at, retry_at = (None if v is None else _text(v) for v in raw)
        known: BreakerState = "open" if state == "open" else "closed"
        if state == "half_open":
            known = "half_open"
        return BreakerStatus(
            state=known,
            failures=int(failures or 0),
            opened_at=float(opened_at) if opened_at else None,
            retry_at=float(retry_at) if retry_at else None,
        )
