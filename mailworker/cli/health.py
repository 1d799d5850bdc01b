"""``mailworker health``: a cheap check for container health checks and probes.

What it proves, in about a second of CPU and two round trips: the configuration the
worker runs with still loads (settings, every SMTP profile, secret files readable), and
the broker and the store answer from here. It opens no SMTP connection (a provider
counts connections, and ``mailworker check`` is the tool for that), imports no Celery
and asks no worker anything (``celery inspect ping`` broadcasts to the whole fleet and
waits for every reply).

Exit status 0 (healthy) or 1 (unhealthy, with a one-line reason), never anything else:
Docker reserves status 2 of a ``HEALTHCHECK``.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Callable

import click

from mailworker.errors import ConfigError
from mailworker.smtp.profile import Profile, profile_names
from mailworker.store.client import redis_client
from mailworker.worker.settings import Settings

#: Broker URL schemes answered with a Redis PING; any other broker is reached through
#: kombu.
_REDIS_SCHEMES = frozenset({"redis", "rediss", "unix", "sentinel"})
#: The password of a URL's user information: ``//user:password@``.
_PASSWORD = re.compile(r"(//[^/:@;]*:)[^/@;]*@")


def redacted(url: str) -> str:
    """``url`` with every password replaced by ``**`` (each part of a Sentinel URL too)."""
    return _PASSWORD.sub(r"\1**@", url)


def ping_redis(url: str, timeout: float, *, sentinel_master: str | None, setting: str) -> None:
    """PING the Redis at ``url`` through the store's client factory (plain, TLS or
    Sentinel, as the worker connects); raises ``redis.RedisError`` or ``OSError``."""
    client = redis_client(
        url,
        sentinel_master=sentinel_master,
        setting=setting,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
    )
    try:
        client.ping()
    finally:
        client.close()


def connect_broker(url: str, timeout: float) -> None:
    """Open (and close) a connection to a broker other than Redis, e.g. ``amqp://``."""
    from kombu import Connection  # noqa: PLC0415 -- only for brokers other than Redis

    with Connection(url, connect_timeout=timeout) as connection:
        connection.ensure_connection(
            max_retries=1, interval_start=0, timeout=max(1, round(timeout))
        )


def timed(check: Callable[[], None]) -> float:
    """Run ``check()``; milliseconds it took."""
    started = time.perf_counter()
    check()
    return (time.perf_counter() - started) * 1000


def run_checks(timeout: float) -> str:
    """Every check, in order; the summary line, or ``ConfigError``/``OSError``/
    ``redis.RedisError`` (or kombu's error) from the first that fails."""
    settings = Settings.from_env()
    names = profile_names()
    if not names:
        raise ConfigError("no SMTP profile configured: set MAILWORKER_SMTP_URL")
    for name in names:
        Profile.from_env(name)  # reads the secret files, as the worker does at start
    broker, store, master = settings.broker_url, settings.redis_url, settings.sentinel_master
    if urllib.parse.urlsplit(broker).scheme.lower() in _REDIS_SCHEMES:
        took = timed(
            lambda: ping_redis(
                broker, timeout, sentinel_master=master, setting="MAILWORKER_BROKER_URL"
            )
        )
    else:
        took = timed(lambda: connect_broker(broker, timeout))
    parts = [f"broker {redacted(broker)} answered in {took:.1f} ms"]
    if store != broker:
        took = timed(
            lambda: ping_redis(
                store, timeout, sentinel_master=master, setting="MAILWORKER_REDIS_URL"
            )
        )
        parts.append(f"store {redacted(store)} in {took:.1f} ms")
    profiles = ", ".join(names)
    return f"healthy: {'; '.join(parts)}; SMTP profiles: {profiles}"


@click.command()
@click.option(
    "--timeout",
    default=2.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    metavar="SECONDS",
    help="How long the broker and the store each have to answer.",
)
def health(timeout: float) -> None:
    """Check cheaply that this worker can work: for HEALTHCHECK and probes.

    Loads the settings and every SMTP profile as `mailworker worker` does at start
    (secret files included), then PINGs the broker (or connects, for a broker other
    than Redis) and the store (MAILWORKER_REDIS_URL) when it is another one. No SMTP
    connection is opened and no worker is asked anything.

    Exits 0 when healthy, else 1 with a one-line reason (never 2, which Docker reserves).
    """
    try:
        summary = run_checks(timeout)
    except ConfigError as exc:
        click.echo(f"unhealthy: configuration: {exc}", err=True)
        raise SystemExit(1) from None
    except Exception as exc:  # any failure to reach them is the answer
        reason = " ".join(str(exc).split()) or type(exc).__name__
        click.echo(f"unhealthy: {type(exc).__name__}: {reason}", err=True)
        raise SystemExit(1) from None
    click.echo(summary)


if __name__ == "__main__":  # python -m mailworker.cli.health, before it is registered
    health()
