"""The retry policy, in one place: what is retried, how soon, and for how long.

Two layers, as an MTA does it:

1. in-process (tenacity): a transient failure is retried at once on a fresh
   connection, a few times with short exponential back-off and jitter — a few
   seconds at most, the worker never sleeps for minutes;
2. delayed: then the message is scheduled in Redis after the next delay of
   ``MAILWORKER_RETRY_DELAYS`` (the last one repeating) until ``MAILWORKER_MAX_AGE``
   after its first attempt, and then dead-lettered as ``exhausted``.

Permanent failures (5xx, untrusted certificate, 535, message too large) go to
the dead-letter store at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import tenacity

from mailworker.errors import SMTPError, SMTPRecipientsRefused
from mailworker.worker.settings import Settings


def retry_now(exc: BaseException) -> bool:
    """Whether a failure is worth an immediate retry on a fresh connection.

    Refused recipients are not: greylisting and full mailboxes do not clear up
    within seconds, so they wait for the delayed schedule. Nor is a message whose
    fate is in doubt (sent, but no reply): it may have been accepted, and a retry
    seconds later would almost certainly deliver it twice.
    """
    return (
        isinstance(exc, SMTPError)
        and exc.is_transient
        and not exc.in_doubt
        and not isinstance(exc, SMTPRecipientsRefused)
    )


class _StopAt(tenacity.stop.stop_base):
    """Stop when the next attempt would start after a ``time.monotonic()`` deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline

    def __call__(self, retry_state: tenacity.RetryCallState) -> bool:
        # The coming sleep is known here with tenacity >= 9 (0 before: then the
        # check is only as good as "now").
        return time.monotonic() + (retry_state.upcoming_sleep or 0) >= self.deadline


@dataclass(frozen=True)
class RetryPolicy:
    """Delays and limits of both retry layers."""

    delays: tuple[float, ...]
    max_age: float
    inprocess_attempts: int = 3
    inprocess_max_wait: float = 4.0
    #: Each delayed retry's delay varies by up to this fraction, either way: after
    #: an outage, messages deferred in the same second do not all return at once.
    jitter: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy configured by ``MAILWORKER_RETRY_DELAYS`` and ``MAILWORKER_MAX_AGE``."""
        return cls(
            settings.retry_delays,
            settings.max_age,
            settings.inprocess_attempts,
            settings.inprocess_max_wait,
            settings.retry_jitter,
        )

    def retrying(
        self, before_retry: Callable[[], None], *, deadline: float | None = None
    ) -> tenacity.Retrying:
        """In-process retries; ``before_retry`` runs before each (drop the session).

        No retry starts after ``deadline`` (a ``time.monotonic()`` time): past it
        every attempt would fail at once and hide the failure that mattered.
        """
        stop = tenacity.stop_after_attempt(self.inprocess_attempts) | tenacity.stop_after_delay(
            self.inprocess_max_wait
        )
        if deadline is not None:
            stop = stop | _StopAt(deadline)
        return tenacity.Retrying(
            stop=stop,
            wait=tenacity.wait_exponential(multiplier=0.2, max=1.5) + tenacity.wait_random(0, 0.2),
            retry=tenacity.retry_if_exception(retry_now),
            before_sleep=lambda _state: before_retry(),
            reraise=True,
        )

    def delay(self, retry_number: int) -> float:
        """Seconds before delayed retry ``retry_number`` (1 = the first), jittered."""
        delay = self.delays[min(retry_number, len(self.delays)) - 1]
        if self.jitter:
            # Spreading retries is not a security matter: random is fine here.
            delay *= 1 + random.uniform(-self.jitter, self.jitter)  # noqa: S311
        return delay

    def due(self, retry_number: int, first_attempt_at: float, now: float) -> float | None:
        """When to run delayed retry ``retry_number``, or None once the maximum age
        has passed (the message is then exhausted). A delay that would overshoot
        the maximum age is cut short, so the last attempt happens right at it."""
        deadline = first_attempt_at + self.max_age
        if now >= deadline:
            return None
        return min(now + self.delay(retry_number), deadline)
