"""``mailworker status``: each SMTP profile's fleet-wide limits as they stand in Redis.

For every profile configured (``MAILWORKER_SMTP_URL``, ``MAILWORKER_SMTP_URL_<NAME>``):
its rate and the tokens left, its connection limit and the leases held, the throttling
back-off left, the circuit breaker (state, consecutive failures, when the next probe may
go) and its fallbacks. It reads the store (``MAILWORKER_REDIS_URL``) and changes nothing;
times are measured against the Redis server's clock, as the limits themselves are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import click
import redis

from mailworker.errors import ConfigError
from mailworker.smtp.limits import normalize_profile_name
from mailworker.smtp.profile import Profile, profile_names
from mailworker.store import keys
from mailworker.store.client import describe, redis_client
from mailworker.store.limits import Breaker, BreakerStatus, Leases, RateLimiter, Throttle
from mailworker.worker.settings import Settings

__all__ = ["profile_status", "status", "status_table"]

#: Column headers of the table, in order.
_COLUMNS = ("PROFILE", "RATE", "TOKENS", "CONNECTIONS", "THROTTLE", "BREAKER", "FALLBACK")


def redis_time(client: redis.Redis) -> float:
    """The Redis server's clock, in unix seconds."""
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1_000_000


def profile_status(
    client: redis.Redis, profile: Profile, *, known: Sequence[str], prefix: str = keys.PREFIX
) -> dict[str, Any]:
    """What the fleet holds of ``profile``'s limits now, as JSON-ready data.

    Args:
        client: the store's Redis.
        profile: the profile.
        known: the names of every configured profile (a fallback not among them is
            listed under ``unknown_fallback``).
        prefix: the store's key prefix.
    """
    name, fleet = profile.name, profile.fleet
    rate = fleet.rate
    breaker = Breaker(client, prefix=prefix).status(name)
    return {
        "name": name,
        "rate": str(rate) if rate else None,
        "tokens": RateLimiter(client, prefix=prefix).tokens(name, rate) if rate else None,
        "max_connections": fleet.max_connections,
        "connections": Leases(client, prefix=prefix).held(name),
        "throttle_wait": Throttle(client, prefix=prefix).wait(name),
        "breaker": _breaker_data(breaker),
        "fallback": list(fleet.fallback),
        "unknown_fallback": [f for f in fleet.fallback if f not in known],
    }


def _breaker_data(status: BreakerStatus) -> dict[str, Any]:
    return {
        "state": status.state,
        "failures": status.failures,
        "opened_at": status.opened_at,
        "retry_at": status.retry_at,
    }


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 60 else f"{value / 60:.1f} min"


def _breaker_text(data: dict[str, Any], now: float) -> str:
    state, failures, retry_at = data["state"], data["failures"], data["retry_at"]
    parts = [state.replace("_", "-")]
    if failures:
        parts.append(f"{failures} failure{'s' if failures != 1 else ''}")
    if state != "closed" and retry_at is not None:
        left = retry_at - now
        parts.append(f"probe in {_seconds(left)}" if left > 0 else "probe due")
    return ", ".join(parts)


def status_table(rows: Sequence[dict[str, Any]], now: float) -> list[str]:
    """The table printed for people: a header line, then one line per profile."""
    table = [_COLUMNS]
    for row in rows:
        limit = row["max_connections"]
        fallback = [
            f"{f} (not configured)" if f in row["unknown_fallback"] else f for f in row["fallback"]
        ]
        table.append(
            (
                row["name"],
                row["rate"] or "-",
                "-" if row["tokens"] is None else f"{row['tokens']:.1f}",
                f"{row['connections']}/{limit}" if limit else f"{row['connections']}/-",
                _seconds(row["throttle_wait"]) if row["throttle_wait"] > 0 else "-",
                _breaker_text(row["breaker"], now),
                ", ".join(fallback) or "-",
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in table
    ]


def _client(redis_url: str | None) -> redis.Redis:
    try:
        settings = Settings.from_env()
        return redis_client(
            redis_url or settings.redis_url,
            sentinel_master=settings.sentinel_master,
            setting="--redis-url" if redis_url else "MAILWORKER_REDIS_URL",
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click.option(
    "--redis-url",
    metavar="URL",
    help="The store's Redis. Default: MAILWORKER_REDIS_URL, else MAILWORKER_BROKER_URL, "
    "else redis://localhost:6379/0.",
)
@click.option(
    "--profile",
    "only",
    multiple=True,
    metavar="NAME",
    help="Show this profile only (repeatable). Default: every configured profile.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for machines.")
def status(redis_url: str | None, only: tuple[str, ...], as_json: bool) -> None:
    """Show each SMTP profile's fleet-wide limits as they stand now.

    For every profile (MAILWORKER_SMTP_URL, MAILWORKER_SMTP_URL_<NAME>): its rate and
    the tokens left in the fleet's bucket, connections held / max_connections, the
    back-off left after a throttling reply, the circuit breaker (closed, open or
    half-open while a probe is out; consecutive failures; when the next probe may go)
    and the fallback profiles. Nothing is changed.

    With --json: {"redis", "time", "profiles": [{"name", "rate", "tokens",
    "max_connections", "connections", "throttle_wait", "breaker": {"state", "failures",
    "opened_at", "retry_at"}, "fallback", "unknown_fallback"} or {"name", "error"}]};
    times are unix seconds of the Redis server's clock.

    Exits 1 when a profile's configuration cannot be read (the others are shown).

    \b
    Examples:
      mailworker status
      mailworker status --profile bulk --json | jq .profiles[0].breaker
    """
    known = profile_names()
    names = sorted({normalize_profile_name(n) for n in only}) if only else known
    if not names:
        raise click.ClickException("no SMTP profile configured: set MAILWORKER_SMTP_URL")
    client = _client(redis_url)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    try:
        now = redis_time(client)
        for name in names:
            try:
                profile = Profile.from_env(name)
            except ConfigError as exc:
                errors.append({"name": name, "error": str(exc)})
                continue
            rows.append(profile_status(client, profile, known=known))
    except redis.RedisError as exc:
        raise click.ClickException(f"{describe(client)}: {type(exc).__name__}: {exc}") from None
    finally:
        client.close()
    if as_json:
        data = {"redis": describe(client), "time": now, "profiles": rows + errors}
        click.echo(json.dumps(data, indent=2))
    else:
        if rows:
            for line in status_table(rows, now):
                click.echo(line)
        for error in errors:
            click.echo(f"profile {error['name']!r}: {error['error']}", err=True)
    if errors:
        raise SystemExit(1)
