"""Shared fixtures: real SMTP, scripted and Redis servers on 127.0.0.1.

Every server gets a free port; everything is torn down after use. Under
pytest-xdist each worker process runs its own session fixtures, so each
worker has its own ``redis-server``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from mailworker.store.deadletter import DeadLetterStore
from mailworker.store.schedule import RetrySchedule
from tests.servers import RedisServer, ScriptedServer, SMTPServer, TLSMaterials
from tests.servers.base import Service
from tests.servers.sink import SinkFactory, sink_factory

#: Databases handed out by ``redis_url`` in turn (0 is left alone).
_REDIS_DBS = itertools.cycle(range(1, 16))

_S = TypeVar("_S", bound=Service)


def pytest_configure(config: pytest.Config) -> None:
    """Register this conftest's marker."""
    config.addinivalue_line(
        "markers",
        "smtpd_options(**options): SMTPServer options for the `smtpd` fixture",
    )


@pytest.fixture(scope="session")
def tls_ca(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterials:
    """The session's test CA and certificates; ``tls_ca.ca_file`` is the CA PEM path."""
    return TLSMaterials(tmp_path_factory.mktemp("tls"))


def _starter(build: Callable[..., _S], started: list[_S]) -> Callable[..., _S]:
    """A factory fixture's function: builds a server with ``build``, notes it in
    ``started`` (for the fixture to stop at teardown) and starts it."""

    def create(*args: Any, **options: Any) -> _S:
        server = build(*args, **options)
        started.append(server)
        return server.start()

    return create


def _stop_all(servers: list[_S]) -> None:
    """Stop ``servers``, the last started first."""
    for server in reversed(servers):
        server.stop()


@pytest.fixture
def smtp_server(tls_ca: TLSMaterials) -> Iterator[Callable[..., SMTPServer]]:
    """Factory: ``smtp_server(**options)`` starts an :class:`SMTPServer`.

    ``tls_materials`` defaults to ``tls_ca``; every server is stopped after the test.
    """
    servers: list[SMTPServer] = []
    yield _starter(functools.partial(SMTPServer, tls_materials=tls_ca), servers)
    _stop_all(servers)


@pytest.fixture
def smtpd(request: pytest.FixtureRequest, smtp_server: Callable[..., SMTPServer]) -> SMTPServer:
    """A running :class:`SMTPServer` configured by ``@pytest.mark.smtpd_options(...)``."""
    marker = request.node.get_closest_marker("smtpd_options")
    options: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    return smtp_server(**options)


@pytest.fixture
def scripted_server(tls_ca: TLSMaterials) -> Iterator[Callable[..., ScriptedServer]]:
    """Factory: ``scripted_server(script, **options)`` starts a :class:`ScriptedServer`.

    At teardown every server is stopped (threads joined), then the first
    exception a script raised (other than the connection ending) fails the test.
    """
    servers: list[ScriptedServer] = []
    yield _starter(functools.partial(ScriptedServer, tls_materials=tls_ca), servers)
    _stop_all(servers)
    for server in servers:
        server.check()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """This worker's own ``redis-server``. Don't stop it; use ``redis_server_factory``."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """URL of an empty database of the session server, flushed (FLUSHDB) before and after."""
    db = next(_REDIS_DBS)
    if not redis_server.running:  # a test stopped it after all
        redis_server.start()
    client = redis_server.client(db)
    try:
        client.flushdb()
        yield redis_server.url_for(db)
        if not redis_server.running:
            redis_server.start()
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A ``redis.Redis`` on the test's own database (``redis_url``)."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    """Factory: ``redis_server_factory(**options)`` starts a private :class:`RedisServer`.

    For tests that stop or restart Redis; all are stopped after the test.
    """
    servers: list[RedisServer] = []
    yield _starter(RedisServer, servers)
    _stop_all(servers)


@pytest.fixture
def schedule(redis_client: redis.Redis) -> RetrySchedule:
    """The delayed-retry schedule in the test's database."""
    return RetrySchedule(redis_client)


@pytest.fixture
def dlq(redis_client: redis.Redis) -> DeadLetterStore:
    """The dead-letter store in the test's database (where workers write)."""
    return DeadLetterStore(redis_client)


@pytest.fixture
def start_sink(tmp_path: Path) -> Iterator[SinkFactory]:
    """Factory: ``start_sink(*options)`` starts a Postfix smtp-sink on a free port
    (``-N`` hides DSN, ``-p`` PIPELINING); every one is stopped at teardown."""
    start, stop_all = sink_factory(tmp_path)
    yield start
    stop_all()
