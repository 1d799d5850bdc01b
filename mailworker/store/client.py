"""The store's Redis client, made from a URL: plain, TLS or Sentinel — one function.

=========================================================  ==============================
URL (``MAILWORKER_REDIS_URL``)                              client
=========================================================  ==============================
``redis://[[user]:password@]host[:port][/db]``              ``redis.Redis.from_url``
``unix:///path/redis.sock?db=N``                            ``redis.Redis.from_url``
``rediss://[[user]:password@]host[:port][/db]?ssl_ca_certs= TLS; the certificate is
/path/ca.pem[&ssl_cert_reqs=required][&ssl_certfile=        verified (``required``) unless
…&ssl_keyfile=…]``                                          the URL says otherwise
``sentinel://[[user]:password@]h1:26379;sentinel://h2:      the master named by
26379/db``                                                  ``MAILWORKER_SENTINEL_MASTER``,
                                                            found through the sentinels
                                                            (``Sentinel.master_for``)
=========================================================  ==============================

``ssl_cert_reqs`` takes redis-py's spelling (``required``, ``optional``, ``none``) and
Celery's (``CERT_REQUIRED``, …), so one URL serves the broker, the result backend and the
store. A Sentinel URL is Celery's own syntax: the user name, password and database of its
first part are the master's (the sentinels themselves are asked without a password).

Replication is asynchronous: a write the primary acknowledged may not have reached a
replica when Sentinel promotes one, and a primary that Sentinel replaced keeps taking
writes until it is turned into a replica, which then drops them. The worker calls
:func:`confirm_replicated` (``WAIT``) before it sends a message and before it
acknowledges its task message.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

from mailworker.errors import ConfigError, MailworkerError
from mailworker.store import keys

__all__ = [
    "REPLICA_TIMEOUT",
    "NotReplicatedError",
    "confirm_replicated",
    "describe",
    "redis_client",
]

#: Seconds :func:`confirm_replicated` waits for the replicas' acknowledgement by default
#: (the worker waits at most a twentieth of its task time limit).
REPLICA_TIMEOUT: Final = 1.0
#: What :func:`confirm_replicated` publishes to: a channel, not a key; nobody listens.
REPLICATED_CHANNEL: Final = f"{keys.PREFIX}replicated"
#: ``ssl_cert_reqs`` spellings (Celery's and redis-py's) -> redis-py's.
_CERT_REQS: Final = {
    "cert_required": "required",
    "cert_optional": "optional",
    "cert_none": "none",
    "required": "required",
    "optional": "optional",
    "none": "none",
}
_SCHEMES: Final = ("redis", "rediss", "unix", "sentinel")


class NotReplicatedError(MailworkerError, redis.ConnectionError):
    """Fewer replicas than required confirmed the writes in time: they may be lost in a
    failover (this primary may already have been replaced)."""


def redis_client(
    url: str,
    *,
    sentinel_master: str | None = None,
    setting: str = "MAILWORKER_REDIS_URL",
    **options: Any,
) -> redis.Redis:
    """A client for the Redis at ``url``: plain, TLS (``rediss://``) or the current
    master of a Sentinel group (``sentinel://``).

    Example::

        client = redis_client(
            "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0",
            sentinel_master="mymaster",
            socket_timeout=5,
        )

    Args:
        url: the Redis URL (see the module's table).
        sentinel_master: the master's name; required for a ``sentinel://`` URL.
        setting: the setting ``url`` came from, named in errors.
        options: more ``redis.Redis`` keyword arguments (timeouts, health checks); for
            Sentinel they apply to the master's connections and, for ``socket_*``, to
            the sentinels' too.

    Raises:
        ConfigError: the URL is malformed, or a Sentinel URL has no master name.
    """
    url = url.strip()
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        raise ConfigError(
            f"{setting}: use redis://, rediss://, unix:// or sentinel://, not {scheme!r}"
        )
    if scheme == "sentinel":
        return _sentinel_client(url, sentinel_master, setting, options)
    try:
        return redis.Redis.from_url(_redis_py_url(url, setting), **options)
    except ValueError as exc:
        raise ConfigError(f"{setting}: {exc}") from None


def confirm_replicated(client: redis.Redis, replicas: int, timeout: float = REPLICA_TIMEOUT) -> int:
    """Wait until ``replicas`` replicas have every write made so far, on any of the
    client's connections (``WAIT``); returns how many confirmed.

    A ``PUBLISH`` on the same connection goes first: ``WAIT`` waits for its connection's
    own latest write, and replication is one ordered stream, so a replica that has the
    ``PUBLISH`` has every write before it. ``WAIT`` and ``PUBLISH`` need no
    ``@admin``/``@dangerous`` permission.

    On a shortfall the client asks Sentinel where the master is (a replaced primary
    keeps answering until Sentinel turns it into a replica, ten seconds or so, which
    then drops what it was sent): idle connections to a replaced one are closed, so the
    next command goes to the new master.

    Raises:
        NotReplicatedError: fewer replicas confirmed within ``timeout`` seconds.
        redis.RedisError: Redis failed (no master known, among others).
    """
    if replicas <= 0:
        return 0
    pipe = client.pipeline(transaction=False)
    # A write that touches no key.
    pipe.publish(REPLICATED_CHANNEL, "")
    pipe.wait(replicas, max(1, int(timeout * 1000)))
    confirmed = int(pipe.execute()[-1])
    if confirmed < replicas:
        moved = _master_moved(client)
        raise NotReplicatedError(
            f"{confirmed} of {replicas} replica(s) confirmed the writes within {timeout:g} s"
            + (": Sentinel has promoted another master, they are lost" if moved else "")
        )
    return confirmed


def _master_moved(client: redis.Redis) -> bool:
    """Whether Sentinel names another master than the one the client last connected to
    (asking it also closes the idle connections to the old one)."""
    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool):
        return False
    used = pool.master_address
    return used is not None and pool.get_master_address() != used  # type: ignore[no-untyped-call]


def describe(client: redis.Redis) -> str:
    """Where the client connects, for messages: never its password."""
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        sentinels = ", ".join(
            "{host}:{port}".format_map(s.connection_pool.connection_kwargs)
            for s in pool.sentinel_manager.sentinels
        )
        return f"Redis master {pool.service_name!r} via Sentinel {sentinels}"
    kw = pool.connection_kwargs
    if "path" in kw:
        return f"Redis at unix:{kw['path']}"
    where = f"Redis at {kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"
    return where + (" (TLS)" if issubclass(pool.connection_class, redis.SSLConnection) else "")


def _redis_py_url(url: str, setting: str) -> str:
    """``url`` with ``ssl_cert_reqs`` spelt as redis-py wants it (a ``rediss://`` URL
    without one verifies: redis-py's default is ``required``)."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = parse_qsl(parts.query, keep_blank_values=True)
    fixed = [(k, _cert_reqs(v, setting) if k == "ssl_cert_reqs" else v) for k, v in query]
    return urlunsplit(parts._replace(query=urlencode(fixed)))


def _cert_reqs(value: str, setting: str) -> str:
    try:
        return _CERT_REQS[value.strip().lower()]
    except KeyError:
        raise ConfigError(
            f"{setting}: ssl_cert_reqs={value!r}: use required, optional or none"
        ) from None


def _sentinel_client(
    url: str, master: str | None, setting: str, options: dict[str, Any]
) -> redis.Redis:
    if not master:
        raise ConfigError(
            f"{setting} is a sentinel:// URL: set MAILWORKER_SENTINEL_MASTER to the "
            "master's name (as in the sentinels' 'sentinel monitor <name> …')"
        )
    hosts: list[tuple[str, int]] = []
    credentials: dict[str, Any] = {}
    db = 0
    for n, chunk in enumerate(c.strip() for c in url.split(";") if c.strip()):
        parts = urlsplit(chunk)
        if parts.scheme.lower() != "sentinel" or not parts.hostname or parts.query:
            raise ConfigError(
                f"{setting}: give each sentinel as sentinel://host:port (no options), "
                "separated by ';', e.g. sentinel://h1:26379;sentinel://h2:26379/0"
            )
        try:
            hosts.append((parts.hostname, parts.port or 26379))
            path = parts.path.strip("/")
            number = int(path) if path else None
        except ValueError as exc:
            raise ConfigError(f"{setting}: {exc}") from None
        if n == 0:
            # Celery and kombu read the credentials and the database from the first part.
            db = number or 0
            if parts.username:
                credentials["username"] = unquote(parts.username)
            if parts.password:
                credentials["password"] = unquote(parts.password)
        elif number is not None and number != db:
            raise ConfigError(
                f"{setting}: database /{number} differs from the first sentinel's /{db} "
                "(Celery reads it from the first): give it there"
            )
    sentinels = Sentinel(hosts, **options)  # type: ignore[no-untyped-call]
    client: redis.Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
        master, redis_class=redis.Redis, db=db, **credentials
    )
    return client
