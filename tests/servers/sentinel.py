"""Redis Sentinel for the tests: one sentinel process (:class:`SentinelServer`) and a
whole group on 127.0.0.1 (:class:`SentinelGroup`): a primary, a replica and three
sentinels watching them, with a failover on demand.

Sentinels are ``redis-server <conf> --sentinel`` (Debian's ``redis-server``; the
``redis-sentinel`` package adds only a service around the same program).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from tests.servers.base import Service, wait_for
from tests.servers.redis_server import RedisServer

#: The master's name in every test group (``sentinel monitor <name> …``).
MASTER_NAME = "mailworker-test"
#: A replica syncs at once, not after the default 5 s wait for more replicas.
_FAST_SYNC = ("--repl-diskless-sync-delay", "0")


class SentinelServer(RedisServer):
    """One sentinel on a free port of 127.0.0.1, watching one master.

    Args:
        master: the primary to watch (its host and port, at start).
        master_name: the name it is known by.
        quorum: sentinels that must agree the master is down before a failover.
        down_after: milliseconds without a reply before a sentinel thinks it is down.
        failover_timeout: milliseconds a failover may take (and between two).
    """

    def __init__(
        self,
        master: RedisServer,
        *,
        master_name: str = MASTER_NAME,
        quorum: int = 2,
        down_after: int = 1000,
        failover_timeout: int = 10_000,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.master = master
        self.master_name = master_name
        self.quorum = quorum
        self.down_after = down_after
        self.failover_timeout = failover_timeout

    def __repr__(self) -> str:
        return f"<SentinelServer {self.host}:{self.port} {self.master_name}>"

    def _arguments(self, directory: Path) -> list[str]:
        # A sentinel rewrites its configuration file: it must be its own, writable.
        config = directory / "sentinel.conf"
        name = self.master_name
        config.write_text(
            f"port {self.port}\n"
            f"bind {self.host}\n"
            f"dir {directory}\n"
            f"logfile {directory / 'redis.log'}\n"
            "daemonize no\n"
            "loglevel notice\n"
            f"sentinel monitor {name} {self.master.host} {self.master.port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {name} {self.down_after}\n"
            f"sentinel failover-timeout {name} {self.failover_timeout}\n"
        )
        return [str(config), "--sentinel"]

    def master_address(self) -> tuple[str, int]:
        """The master's address as this sentinel knows it now."""
        with contextlib.closing(self.client()) as client:
            host, port = client.execute_command(  # type: ignore[no-untyped-call]
                "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
            )
        return (host.decode(), int(port))

    def knows_replica(self, replica: RedisServer) -> bool:
        """Whether this sentinel lists ``replica`` as a healthy replica of the master."""
        with contextlib.closing(self.client()) as client:
            replicas = client.sentinel_slaves(self.master_name)
        return any(
            r["port"] == replica.port
            and r.get("master-link-status") == "ok"
            and not r.get("is_disconnected")
            and not r.get("is_sdown")
            for r in replicas
        )


class SentinelGroup(Service):
    """A primary, a replica and three sentinels on 127.0.0.1, clear text, no password.

    :attr:`url` is Celery's Sentinel URL (``sentinel://127.0.0.1:P1;…;…/0``), used with
    ``MAILWORKER_SENTINEL_MASTER`` = :attr:`master_name`. :meth:`failover` asks the
    sentinels to promote the replica (``SENTINEL FAILOVER``) and waits until all of
    them name it.
    """

    def __init__(self, *, sentinels: int = 3, master_name: str = MASTER_NAME) -> None:
        self.master_name = master_name
        self.primary = RedisServer(extra_args=_FAST_SYNC)
        self.replica = RedisServer(extra_args=_FAST_SYNC)
        self.sentinels = [
            SentinelServer(self.primary, master_name=master_name) for _ in range(sentinels)
        ]
        self._started: list[RedisServer] = []

    def __repr__(self) -> str:
        return f"<SentinelGroup {self.master_name} {self.url}>"

    @property
    def url(self) -> str:
        """``sentinel://127.0.0.1:P1;sentinel://127.0.0.1:P2;sentinel://127.0.0.1:P3/0``."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """The Sentinel URL of database ``db`` (given on every part, as Celery reads it
        from the first)."""
        return ";".join(f"sentinel://{s.host}:{s.port}/{db}" for s in self.sentinels)

    @property
    def servers(self) -> Sequence[RedisServer]:
        """The two data servers, primary first (as started: roles change on failover)."""
        return (self.primary, self.replica)

    def start(self, timeout: float = 20.0) -> SentinelGroup:
        """Start the primary, the replica (synced) and the sentinels, and wait until every
        sentinel knows the replica and the other sentinels; return self."""
        try:
            self._start(self.primary)
            primary = (self.primary.host, str(self.primary.port))
            self.replica.extra_args = (*_FAST_SYNC, "--replicaof", *primary)
            self._start(self.replica)
            wait_for(self._replica_synced, timeout, "the replica's initial sync")
            for sentinel in self.sentinels:
                self._start(sentinel)
            wait_for(self._sentinels_ready, timeout, "the sentinels to find everyone")
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, server: RedisServer) -> None:
        self._started.append(server)
        server.start()

    def _replica_synced(self) -> bool:
        with contextlib.closing(self.replica.client()) as client:
            return client.info("replication").get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        others = len(self.sentinels) - 1
        for sentinel in self.sentinels:
            with contextlib.closing(sentinel.client()) as client:
                known: list[dict[str, Any]] = client.sentinel_sentinels(self.master_name)  # type: ignore[assignment]
                if len(known) < others:
                    return False
            if not sentinel.knows_replica(self.replica):
                return False
        return True

    def stop(self) -> None:
        """Stop the sentinels first (no failover on the way out), then the servers."""
        for server in reversed(self._started):
            server.stop()
        self._started.clear()

    def master(self) -> RedisServer:
        """The data server the first sentinel names master now."""
        address = self.sentinels[0].master_address()
        return next(s for s in self.servers if (s.host, s.port) == address)

    def failover(self, timeout: float = 10.0) -> RedisServer:
        """``SENTINEL FAILOVER``: promote the replica; wait until every sentinel names the
        new master, and return it. The old primary keeps answering as a master until a
        sentinel turns it into a replica, some ten seconds later
        (:meth:`wait_replicating`)."""
        old = self.master()
        new = next(s for s in self.servers if s is not old)
        wait_for(lambda: self.sentinels[0].knows_replica(new), timeout, f"{new!r} as a replica")
        with contextlib.closing(self.sentinels[0].client()) as client:
            client.execute_command("SENTINEL", "FAILOVER", self.master_name)  # type: ignore[no-untyped-call]
        address = (new.host, new.port)
        wait_for(
            lambda: all(s.master_address() == address for s in self.sentinels),
            timeout,
            f"every sentinel to name {new!r}",
        )
        return new

    def wait_replicating(self, server: RedisServer, timeout: float = 30.0) -> None:
        """Wait until ``server`` is a replica with its link to the master up."""

        def replicating() -> bool:
            with contextlib.closing(server.client()) as client:
                info = client.info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        wait_for(replicating, timeout, f"{server!r} to replicate")


def sentinel_client(group: SentinelGroup, **kwargs: Any) -> redis.Redis:
    """A client for ``group``'s current master, found through its sentinels (it follows a
    failover)."""
    from mailworker.store.client import redis_client  # noqa: PLC0415

    kwargs.setdefault("socket_timeout", 2.0)
    kwargs.setdefault("socket_connect_timeout", 2.0)
    return redis_client(group.url, sentinel_master=group.master_name, **kwargs)
