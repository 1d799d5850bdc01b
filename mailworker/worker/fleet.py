"""A provider's limits as one worker process applies them for the whole fleet.

The state lives in Redis (:mod:`mailworker.store.limits`); this module decides when
to consult it, so that a profile without limits costs no Redis round trip at all:

- **rate** — one token per SMTP attempt from the profile's fleet-wide bucket;
- **throttle** — after the server answered ``421`` at the greeting or a ``4.7.x``
  (or ``4.3.2``) reply, the whole fleet backs off the profile for a short, growing
  interval. A process looks the back-off up when it opens a connection and whenever
  it has met one itself;
- **breaker and fallbacks** — for a profile that names fallbacks, consecutive
  connection-level or transient failures open a breaker shared by the fleet, and
  messages go out through the first fallback whose breaker is closed.

A wait of up to :data:`MAX_WAIT` seconds (and inside the send's deadline) is spent
here; a longer one raises :class:`WaitFor`, and the delivery puts the message back
on the Redis retry schedule — not an attempt, never a dead letter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
import structlog

from mailworker.errors import SMTPError, SMTPRecipientsRefused
from mailworker.smtp.profile import Profile
from mailworker.store.limits import Breaker, RateLimiter, Throttle
from mailworker.worker import metrics

log = structlog.get_logger("mailworker.worker.fleet")

#: Longest wait for a token, a connection lease or a throttle back-off spent inside
#: a task; longer waits go to the Redis retry schedule.
MAX_WAIT = 5.0
#: How long a breaker seen closed is taken as closed without asking Redis again.
_CLOSED_CACHE = 1.0


class WaitFor(Exception):
    """The message must wait ``seconds`` for a fleet limit (``reason``): rescheduled,
    not counted as an attempt."""

    def __init__(self, seconds: float, reason: str) -> None:
        super().__init__(f"waiting {seconds:.3f} s ({reason})")
        self.seconds = seconds
        self.reason = reason


def pause(seconds: float, reason: str, deadline: float, sleep: Callable[[float], None]) -> None:
    """Sleep a short wait; raise WaitFor for a long one or one past ``deadline``."""
    if seconds > MAX_WAIT or time.monotonic() + seconds >= deadline:
        raise WaitFor(seconds, reason)
    sleep(seconds)


def throttling(exc: SMTPError) -> bool:
    """Whether the server said "too many connections" or "slow down"."""
    enhanced = exc.enhanced_code or ""
    if enhanced.startswith("4.7.") or enhanced == "4.3.2":
        return True
    return exc.code == 421 and exc.stage == "connect"


def breaking(exc: SMTPError) -> bool:
    """Whether a failure says the provider, not the message, is in trouble: the
    connection, TLS or AUTH failing transiently, a 421. Refused recipients and
    permanent failures never count (a fallback would refuse them too)."""
    if isinstance(exc, SMTPRecipientsRefused) or exc.stage == "rcpt":
        return False
    return exc.is_transient or exc.code == 421


class Fleet:
    """Routing, rate and throttling per profile for one worker process."""

    def __init__(
        self,
        client: redis.Redis,
        resolve: Callable[[str], Profile],
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rate = RateLimiter(client)
        self.throttle = Throttle(client)
        self.breaker = Breaker(client)
        self._resolve = resolve
        self._sleep = sleep
        self._closed_until: dict[str, float] = {}
        self._throttled_until: dict[str, float] = {}
        #: Profiles this process saw fail (or probe) since their last success.
        self._failing: set[str] = set()
        self._success_reported: dict[str, float] = {}

    def route(self, requested: str) -> str:
        """The profile to send through now: ``requested``, or its first fallback whose
        breaker is closed (or due for its one probe). With every breaker open, the
        requested one: its failure schedules a retry like any other."""
        fallbacks = self._resolve(requested).fleet.fallback
        if not fallbacks:
            return requested
        for name in (requested, *fallbacks):
            if self._allowed(self._resolve(name)):
                if name != requested:
                    log.info("fleet.fallback", requested_profile=requested, profile=name)
                return name
        return requested

    def _allowed(self, profile: Profile) -> bool:
        now = time.monotonic()
        if self._closed_until.get(profile.name, 0.0) > now:
            return True
        verdict = self.breaker.allow(profile.name, reset=profile.fleet.breaker_reset)
        if verdict == "closed":
            self._closed_until[profile.name] = now + _CLOSED_CACHE
        elif verdict == "probe":
            log.info("fleet.breaker_probe", profile=profile.name)
            self._failing.add(profile.name)  # its success must close the breaker
        return verdict != "open"

    def admit(self, profile: Profile, *, deadline: float, connecting: bool) -> None:
        """Wait out the profile's throttle back-off and take a rate token.

        Raises:
            WaitFor: the wait is longer than MAX_WAIT or runs past ``deadline``.
        """
        name = profile.name
        if connecting or name in self._throttled_until:
            wait = self.throttle.wait(name)
            if wait > 0:
                pause(wait, "throttled", deadline, self._sleep)
            else:
                self._throttled_until.pop(name, None)
        rate = profile.fleet.rate
        if rate is None:
            return
        while (wait := self.rate.acquire(name, rate)) > 0:
            metrics.rate_limit_wait(name)
            pause(wait, "rate", deadline, self._sleep)

    def failed(self, profile: Profile, exc: SMTPError) -> None:
        """Count a failure against the profile's throttle and breaker."""
        limits = profile.fleet
        if throttling(exc):
            backoff = self.throttle.hit(
                profile.name, limits.throttle_backoff, limits.throttle_backoff_max
            )
            self._throttled_until[profile.name] = time.monotonic() + backoff
            log.warning("fleet.throttled", profile=profile.name, backoff=backoff, code=exc.code)
        if limits.fallback and breaking(exc):
            self._failing.add(profile.name)
            self._closed_until.pop(profile.name, None)
            opened = self.breaker.failure(
                profile.name,
                failures=limits.breaker_failures,
                window=limits.breaker_window,
                reset=limits.breaker_reset,
            )
            if opened:
                log.warning("fleet.breaker_open", profile=profile.name, reset=limits.breaker_reset)

    def succeeded(self, profile: Profile) -> None:
        """The server accepted a message: close what this process saw failing."""
        name = profile.name
        if name in self._throttled_until:
            self.throttle.clear(name)
            self._throttled_until.pop(name, None)
        if not profile.fleet.fallback:
            return
        # Failures count when consecutive across the fleet: a success anywhere resets
        # them. Reported at once after a failure seen here, else once a second.
        now = time.monotonic()
        if name in self._failing or now - self._success_reported.get(name, 0.0) >= _CLOSED_CACHE:
            self._failing.discard(name)
            self._success_reported[name] = now
            if self.breaker.success(name):
                log.info("fleet.breaker_closed", profile=name)
