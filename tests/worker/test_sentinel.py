"""Redis Sentinel, end to end: a real ``mailworker worker`` whose broker, result backend
and store are the master of a Sentinel group (a primary, a replica and three sentinels
on loopback), failed over (``SENTINEL FAILOVER``) in the middle of a batch.

The harness is the fault suite's :class:`~tests.faults.rig.Rig` with the group in place
of its single Redis; a worker that exits on its own is restarted, as a supervisor would.

The failover strikes while both worker processes are mid-send, not while the worker
fetches the next message: kombu's Redis transport takes a message off the queue
(``BRPOP``) and then records it in ``unacked`` (``HSET``), two commands, and a replica
promoted between them has the first and not the second, so that message is gone
(celery/kombu#305; about 1 run in 12 lost one message when the failover was not
timed). mailworker cannot close that window; it is in the README.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
import redis
from celery import Celery

from mailworker.errors import ConfigError
from mailworker.queue.producer import producer_app
from mailworker.store import keys
from mailworker.store.deadletter import DeadLetterStore
from mailworker.worker.app import configure
from mailworker.worker.settings import Settings
from mailworker.worker.tasks import send_mail
from tests.faults.rig import CONCURRENCY, Rig
from tests.servers import SentinelGroup, smtp_url, wait_for
from tests.servers.sentinel import sentinel_client
from tests.worker_process import producer, worker_env

pytestmark = pytest.mark.slow

#: A killed or stranded task message comes back after 6 s (the visibility timeout).
SHORT = {"MAILWORKER_VISIBILITY_TIMEOUT": "6", "MAILWORKER_TASK_TIME_LIMIT": "2"}
#: Seconds added to every RCPT reply: the batch is still flowing at the failover.
PACE = 0.03
#: Seconds added to RCPT replies while the failover starts: both processes are mid-send.
SLOW_RCPT = 1.0
#: Refused for good (dead-lettered) and refused once (a retry in the schedule).
REFUSED, GREYLISTED = ("user3", "user17"), ("user5", "user21")
URL = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379/0"


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    """A primary, a replica and three sentinels of this test's own."""
    with SentinelGroup() as started:
        yield started


class SentinelRig(Rig):
    """The fault suite's rig with a Sentinel group as broker and store."""

    def __init__(self, workdir: Path, group: SentinelGroup, settings: dict[str, str]) -> None:
        super().__init__("sentinel_failover", workdir, **settings)  # type: ignore[arg-type]
        self.group = group
        #: Subject -> the task id it was published with.
        self.task_ids: dict[str, str] = {}

    def __enter__(self) -> SentinelRig:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.smtp.start()
        self._client = sentinel_client(self.group, socket_timeout=1, socket_connect_timeout=1)
        url = smtp_url(self.smtp.port, scheme="smtp", timeout=self.timeout, max_messages=1000)
        self.env = worker_env(
            self.group.url,
            {"default": url},
            MAILWORKER_SENTINEL_MASTER=self.group.master_name,
            **self.settings,
        )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        super().__exit__(exc_type, exc, tb)  # its own Redis was never started

    def publish(self) -> None:
        """Publish the batch as the rig does, noting each message's task id."""
        with producer(self.env):
            self.started = time.monotonic()
            for n, subject in enumerate(self.subjects):
                result = send_mail.delay(to=f"user{n}@example.org", subject=subject, text="hi")
                self.task_ids[subject] = result.id

    def broker_state(self, client: redis.Redis) -> dict[str, object]:
        """What the master holds of the broker's keys, for a failure message."""
        unacked = [json.loads(v)[0] for v in client.hvals("unacked")]
        queued = [json.loads(v) for v in client.lrange("celery", 0, -1)]
        return {
            "queued": [m["headers"]["id"] for m in queued],
            "unacked": [m["headers"]["id"] for m in unacked],
            "restore_mutex_ttl": client.ttl("unacked_mutex"),
            "task_ids": {s: t for s, t in self.task_ids.items() if s not in self.done()},
        }

    def done(self) -> set[str]:
        """Subjects accepted by the server or dead-lettered."""
        return {s for s, _ in self.accepted()} | self._dead_subjects()

    def store_state(self, client: redis.Redis) -> tuple[set[str], set[bytes]]:
        """Dead-letter ids and scheduled retry ids in ``client``'s database."""
        dead = {r.id for r in DeadLetterStore(client).list()}
        scheduled: list[bytes] = client.zrange(keys.retry_due(), 0, -1)  # type: ignore[assignment]
        return dead, set(scheduled)


class TestSettings:
    """MAILWORKER_SENTINEL_MASTER names the master for broker, results and store."""

    def test_celery_transport_options(self) -> None:
        """configure() and producer_app() give broker and result backend the master."""
        settings = Settings(broker_url=URL, sentinel_master="main")
        app = configure(Celery("t", set_as_current=False), settings)
        publisher = producer_app(URL, sentinel_master="main")
        for conf in (app.conf, publisher.conf):
            assert conf.broker_url == conf.result_backend == URL
            assert conf.broker_transport_options["master_name"] == "main"
            assert conf.result_backend_transport_options["master_name"] == "main"

    def test_replicas_default(self) -> None:
        """A sentinel:// store waits for 1 replica by default, others for none."""
        assert Settings(broker_url=URL, sentinel_master="main").redis_replicas == 1
        assert Settings(broker_url="redis://h/0").redis_replicas == 0
        env = {"MAILWORKER_BROKER_URL": URL, "MAILWORKER_REDIS_REPLICAS": "0"}
        assert Settings.from_env(env).redis_replicas == 0

    def test_master_name_required(self) -> None:
        """A sentinel:// broker without a master name fails naming the setting."""
        with pytest.raises(ConfigError, match="MAILWORKER_SENTINEL_MASTER"):
            configure(Celery("t", set_as_current=False), Settings(broker_url=URL))


class TestFailover:
    """SENTINEL FAILOVER in the middle of a batch."""

    def test_failover_mid_batch(self, group: SentinelGroup, tmp_path: Path) -> None:
        """Every message arrives or (the 550s) is dead-lettered, none more than twice;
        the dead letters and scheduled retries written before the failover are on the
        new master."""
        settings = {**SHORT, "MAILWORKER_RETRY_DELAYS": "8"}
        with SentinelRig(tmp_path, group, settings) as rig:
            handler = rig.handler
            handler.command_delays["RCPT"] = PACE
            for user in REFUSED:
                handler.rcpt_replies[f"{user}@example.org"] = "550 5.1.1 no such user"
            for user in GREYLISTED:
                handler.rcpt_replies_once[f"{user}@example.org"] = "451 4.7.1 greylisted"
            assert rig._client is not None
            client = rig._client
            rig.start_worker()
            rig.publish()
            wait_for(
                lambda: [len(ids) for ids in rig.store_state(client)] == [2, 2],
                20,
                "2 dead letters and 2 scheduled retries",
            )
            dead, scheduled = rig.store_state(client)
            # Fail over while both processes wait for a (slowed) RCPT reply, so that the
            # worker is not between kombu's BRPOP of a message and its HSET into
            # "unacked": a failover between the two loses that message (kombu's, see
            # the module docstring).
            handler.command_delays["RCPT"] = SLOW_RCPT
            handler.wait_for_count("RCPT", handler.counts["RCPT"] + CONCURRENCY, 10)
            new = group.failover()
            handler.command_delays["RCPT"] = PACE

            with contextlib.closing(new.client()) as direct:  # not through Sentinel
                dead_after, scheduled_after = rig.store_state(direct)
            assert dead <= dead_after
            assert scheduled <= scheduled_after, "the retries are due in 8 s, not yet"
            result = rig.drain(timeout=35)
            dead_at_end = rig.store_state(client)[0]
            state = {} if result.drained else rig.broker_state(client)

        assert result.drained, (state, result)
        assert result.lost == 0, result
        assert (result.sent, result.dead_lettered) == (rig.messages - 2, 2), result
        assert result.split_ids == 0, result
        # Only the messages in flight at the failover may go out twice: sent through the
        # old primary, their idempotency records went down with it.
        assert result.duplicates <= CONCURRENCY, result
        assert dead <= dead_at_end
