"""The store's Redis client factory (plain, TLS, Sentinel) and the replication check,
against real servers: a TLS-only ``redis-server`` with an ACL user, and a Sentinel group."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.sentinel import SentinelConnectionPool

from mailworker.errors import ConfigError
from mailworker.store.client import (
    NotReplicatedError,
    confirm_replicated,
    describe,
)
from mailworker.store.client import redis_client as make_client
from tests.servers import RedisServer, SentinelGroup, TLSMaterials

USER, PASSWORD = "mailworker", "s3cret/pa:ss@word"


@pytest.fixture(scope="module")
def tls_redis(tls_ca: TLSMaterials) -> Iterator[RedisServer]:
    """A TLS-only Redis with an ACL user (the default user is off)."""
    with RedisServer(tls=tls_ca, user=USER, password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    """A primary, a replica and three sentinels (failed over by one test: keep last)."""
    with SentinelGroup() as started:
        yield started


class TestPlainURLs:
    """redis:// and unix:// URLs are redis-py's own."""

    def test_redis_url_selects_its_database(
        self, redis_url: str, redis_client: redis.Redis
    ) -> None:
        """A redis:// URL reaches the database it names, with the options given."""
        with contextlib.closing(make_client(redis_url, socket_timeout=3)) as client:
            client.set("k", "v")
            assert client.connection_pool.connection_kwargs["socket_timeout"] == 3
        assert redis_client.get("k") == b"v"

    def test_unknown_scheme_names_the_setting(self) -> None:
        """A URL of another scheme is refused, naming the setting it came from."""
        with pytest.raises(ConfigError, match=r"^--redis-url: use redis://"):
            make_client("amqp://guest@localhost//", setting="--redis-url")

    def test_describe_hides_the_password(self) -> None:
        """describe() names host, port and database, never the password."""
        client = make_client("redis://:hunter2@127.0.0.1:6390/4")
        assert describe(client) == "Redis at 127.0.0.1:6390/4"


class TestTLS:
    """rediss:// URLs verify the server and log in, as Celery's do."""

    def test_acl_user_over_verified_tls(self, tls_redis: RedisServer) -> None:
        """The server's URL (ssl_cert_reqs=required, ssl_ca_certs, user and password)
        connects, as that user, over TLS."""
        with contextlib.closing(make_client(tls_redis.url_for(2))) as client:
            assert client.acl_whoami() in (USER, USER.encode())
            assert describe(client).endswith("/2 (TLS)")
            assert PASSWORD not in describe(client)

    @pytest.mark.parametrize("spelling", ["CERT_REQUIRED", "required", "Cert_Required"])
    def test_celery_spelling_of_cert_reqs(self, tls_redis: RedisServer, spelling: str) -> None:
        """ssl_cert_reqs may be spelt as Celery documents it (CERT_REQUIRED)."""
        url = tls_redis.url.replace("ssl_cert_reqs=required", f"ssl_cert_reqs={spelling}")
        with contextlib.closing(make_client(url)) as client:
            assert client.ping()

    def test_verifies_without_cert_reqs(self, tls_redis: RedisServer, tmp_path: Path) -> None:
        """Without ssl_cert_reqs the certificate is still verified: a CA that did not
        sign it fails the connection."""
        other_ca = TLSMaterials(tmp_path).ca_file
        url = f"rediss://{USER}:x@127.0.0.1:{tls_redis.port}/0?ssl_ca_certs={other_ca}"
        with (
            contextlib.closing(make_client(url)) as client,
            pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"),
        ):
            client.ping()

    def test_wrong_password_is_refused(self, tls_redis: RedisServer) -> None:
        """A wrong password fails with redis-py's AuthenticationError."""
        url = tls_redis.url.replace("s3cret", "wrong")
        with (
            contextlib.closing(make_client(url)) as client,
            pytest.raises(redis.AuthenticationError),
        ):
            client.ping()

    def test_bad_cert_reqs_names_the_setting(self) -> None:
        """An unknown ssl_cert_reqs is a ConfigError naming the setting and the choices."""
        with pytest.raises(ConfigError, match="MAILWORKER_REDIS_URL: ssl_cert_reqs='maybe'"):
            make_client("rediss://localhost/0?ssl_cert_reqs=maybe")


class TestSentinelURLs:
    """sentinel:// URLs in Celery's syntax, read without connecting."""

    def test_hosts_credentials_and_database(self) -> None:
        """Every part is a sentinel; user, password and database come from the first."""
        client = make_client(
            "sentinel://u:p%40ss@10.0.0.1:26379/3;sentinel://10.0.0.2/3",
            sentinel_master="main",
        )
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
        assert [(s["host"], s["port"]) for s in sentinels] == [
            ("10.0.0.1", 26379),
            ("10.0.0.2", 26379),
        ]
        assert all(s.get("password") is None for s in sentinels)  # sentinels: none
        kwargs = pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("u", "p@ss", 3)
        assert describe(client) == (
            "Redis master 'main' via Sentinel 10.0.0.1:26379, 10.0.0.2:26379"
        )

    def test_master_name_is_required(self) -> None:
        """Without a master name the error says which setting to add."""
        with pytest.raises(ConfigError, match="set MAILWORKER_SENTINEL_MASTER"):
            make_client("sentinel://10.0.0.1:26379/0")

    @pytest.mark.parametrize(
        ("url", "message"),
        [
            ("sentinel://h1:26379;sentinel://h2:26379/2", r"database /2 differs"),
            ("sentinel://h1:26379?socket_timeout=1", r"no options"),
            ("sentinel://h1:26379;redis://h2:6379", r"give each sentinel"),
            ("sentinel://h1:port", r"MAILWORKER_REDIS_URL: "),
        ],
    )
    def test_malformed(self, url: str, message: str) -> None:
        """Malformed Sentinel URLs are ConfigErrors that say what is wrong."""
        with pytest.raises(ConfigError, match=message):
            make_client(url, sentinel_master="main")


class TestReplication:
    """confirm_replicated: WAIT before a task message is acknowledged."""

    def test_no_replicas_asked(self, redis_client: redis.Redis) -> None:
        """With 0 replicas required nothing is sent."""
        assert confirm_replicated(redis_client, 0) == 0

    def test_no_replica_is_a_shortfall(self, redis_client: redis.Redis) -> None:
        """A primary without replicas: NotReplicatedError after the timeout."""
        with pytest.raises(NotReplicatedError, match=r"^0 of 1 replica\(s\) .* 0.2 s$"):
            confirm_replicated(redis_client, 1, timeout=0.2)

    def test_through_sentinel_and_failover(self, group: SentinelGroup) -> None:
        """Writes confirmed by the replica survive a failover; writes the old primary took
        after it was replaced are reported lost, and the client moves on to the new
        master (which has no replica until the old primary rejoins)."""
        with contextlib.closing(
            make_client(group.url, sentinel_master=group.master_name, socket_timeout=2)
        ) as client:
            client.set("before", "kept")
            assert confirm_replicated(client, 1) == 1
            new = group.failover()
            client.set("after", "lost")  # still the old primary: it answers for ~10 s
            with pytest.raises(NotReplicatedError, match="promoted another master"):
                confirm_replicated(client, 1, timeout=0.2)
            pool = client.connection_pool
            assert isinstance(pool, SentinelConnectionPool)
            assert pool.master_address == (new.host, new.port)
            assert client.get("before") == b"kept"
            assert client.get("after") is None
            with pytest.raises(NotReplicatedError, match=r"within 0.2 s$"):
                confirm_replicated(client, 1, timeout=0.2)
