"""A provider's limits, as a profile states them (the ``rate``, ``max_connections``,
``fallback``, ``breaker_*`` and ``throttle_*`` URL options); the worker enforces them
for the whole fleet (:mod:`mailworker.worker.fleet`, state in
:mod:`mailworker.store.limits`)."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

from mailworker.errors import ConfigError

#: A rate option: a positive count per second, minute or hour.
_RATE = re.compile(r"((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)/([smh])", re.IGNORECASE)
#: Rate unit -> seconds.
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def normalize_profile_name(name: str | None) -> str:
    """The canonical form of a profile name: stripped and lower-cased; ``default`` if empty.

    Names are matched case-insensitively (they become ``MAILWORKER_SMTP_URL_<NAME>``,
    upper-cased, anyway), so ``Bulk`` and ``bulk`` must share one profile and one session:
    normalise a name once, where it enters (the task's ``profile``), and key on the result.
    """
    return (name or "").strip().lower() or "default"


@dataclass(frozen=True)
class Rate:
    """``count`` messages per ``per`` seconds, e.g. ``Rate.parse("10/s", "option rate")``."""

    count: float
    per: float

    def __post_init__(self) -> None:
        for name in ("count", "per"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"rate: {name} must be a positive number, not {value!r}")

    @classmethod
    def parse(cls, text: str, where: str) -> Rate:
        """Read ``<n>/s``, ``<n>/m`` or ``<n>/h`` (``n`` positive, fractions allowed).

        Args:
            text: the rate as written, e.g. ``10/s``, ``0.5/s``, ``600/m``.
            where: what gave it, named in the error (e.g. ``"option rate"``).

        Raises:
            ConfigError: ``text`` is not such a rate; names ``where`` and the forms.
        """
        match = _RATE.fullmatch(text.strip())
        count = float(match[1]) if match else 0.0
        if match is None or not 0 < count < math.inf:
            raise ConfigError(
                f"{where}: {text!r} is not a rate; write <n>/s, <n>/m or <n>/h with n a "
                "positive number, e.g. 10/s, 0.5/s or 600/m"
            )
        return cls(count, _RATE_UNITS[match[2].lower()])

    @property
    def per_second(self) -> float:
        """Messages per second."""
        return self.count / self.per

    def __str__(self) -> str:
        for unit, seconds in _RATE_UNITS.items():
            if self.per == seconds:
                return f"{_number(self.count)}/{unit}"
        return f"{_number(self.per_second)}/s"


@dataclass(frozen=True)
class FleetLimits:
    """A provider's limits for one profile, held by the whole fleet through Redis.

    Attributes:
        rate: messages per time across every worker (token bucket); None: no limit.
        max_connections: SMTP sessions open at once across the fleet (leases); None: no
            limit.
        fallback: profiles to send through, in order, while this one's breaker is open.
        breaker_failures: consecutive connection-level or transient failures, all within
            ``breaker_window`` seconds, that open the circuit breaker.
        breaker_window: see ``breaker_failures``.
        breaker_reset: seconds after opening (or a failed probe) before one probe
            message may test the server again.
        throttle_backoff: seconds nobody in the fleet connects after a throttling reply
            (421, 4.7.x); doubles per consecutive throttle up to ``throttle_backoff_max``.
        throttle_backoff_max: see ``throttle_backoff``.
    """

    rate: Rate | None = None
    max_connections: int | None = None
    fallback: tuple[str, ...] = ()
    breaker_failures: int = 5
    breaker_window: float = 60.0
    breaker_reset: float = 30.0
    throttle_backoff: float = 2.0
    throttle_backoff_max: float = 60.0

    def __post_init__(self) -> None:
        names = tuple(normalize_profile_name(n) for n in self.fallback)
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"fallback lists {', '.join(twice)} twice; list each profile once")
        object.__setattr__(self, "fallback", names)
        for option in ("max_connections", "breaker_failures"):
            value = getattr(self, option)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ConfigError(f"{option} must be a whole number, not {value!r}")
            if value is not None and value < 1:
                raise ConfigError(f"{option} must be at least 1")
        for option in ("breaker_window", "breaker_reset", "throttle_backoff"):
            _check_seconds(option, getattr(self, option))
        _check_seconds("throttle_backoff_max", self.throttle_backoff_max)
        if self.throttle_backoff_max < self.throttle_backoff:
            raise ConfigError(
                f"throttle_backoff_max ({self.throttle_backoff_max:g} s) is below "
                f"throttle_backoff ({self.throttle_backoff:g} s); raise throttle_backoff_max "
                f"to at least {self.throttle_backoff:g}"
            )

    def options(self) -> list[tuple[str, str]]:
        """The URL options that give these limits (those that differ from the default)."""
        default = FleetLimits()
        out: list[tuple[str, str]] = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value == getattr(default, f.name):
                continue
            if isinstance(value, tuple):
                out.append((f.name, ",".join(value)))
            elif isinstance(value, float):
                out.append((f.name, _number(value)))
            else:
                out.append((f.name, str(value)))
        return out


def _check_seconds(option: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{option} must be a positive number of seconds, not {value!r}")


def _number(value: float) -> str:
    """``value`` as short text that reads back as the same number: ``10``, ``0.5``."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))
