"""RabbitMQ as the broker, end to end: a real ``mailworker worker`` consuming from a
private ``rabbitmq-server`` (``MAILWORKER_BROKER_URL=amqp://…``) while the dead-letter
store, the retry schedule, the idempotency records and the task results stay in the
test's Redis database (``MAILWORKER_REDIS_URL``).

RabbitMQ has no visibility timeout: it hands a message back the moment the connection
or channel that held it unacknowledged closes (a killed worker), or when a pool process
dies and Celery rejects its task (``reject_on_worker_lost``). The workers here run with
a 600 s visibility timeout that would hold a Redis broker's messages for ten minutes;
everything comes back within seconds.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import amqp
import pytest
import redis
from kombu import Connection

from mailworker.store.deadletter import DeadLetterStore
from mailworker.store.schedule import RetrySchedule
from mailworker.worker.tasks import send_mail
from tests.servers import RabbitMQServer, SMTPServer, wait_for
from tests.worker_process import WorkerProcess, producer, subjects

#: The first test of each pytest worker also waits for the node to start (up to its
#: 60 s bound on a loaded machine), on top of the default 60 s per test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: Worker settings of these tests (seconds): a visibility timeout RabbitMQ ignores, and
#: a short task time limit, so a killed run's lock (limit + 2 s) expires soon.
RABBIT_SETTINGS = {
    "MAILWORKER_VISIBILITY_TIMEOUT": "600",
    "MAILWORKER_TASK_TIME_LIMIT": "2",
}
#: The only queue the routing test's worker consumes.
QUEUE = "mail"


@pytest.fixture(scope="session")
def rabbitmq() -> Iterator[RabbitMQServer]:
    """This pytest worker's own RabbitMQ node (started once, ~5-10 s)."""
    with RabbitMQServer() as server:
        yield server


@pytest.fixture
def rabbit_env(env: dict[str, str], rabbitmq: RabbitMQServer, redis_url: str) -> dict[str, str]:
    """The worker environment of ``env`` with a fresh RabbitMQ virtual host as broker and
    the test's Redis database as store (and result backend)."""
    return {
        **env,
        **RABBIT_SETTINGS,
        "MAILWORKER_BROKER_URL": rabbitmq.fresh_url(),
        "MAILWORKER_REDIS_URL": redis_url,
    }


def ready_messages(env: dict[str, str], queue: str) -> int | None:
    """Messages ready in RabbitMQ queue ``queue`` of ``env``'s broker; None if no such
    queue was ever declared (nothing was routed there)."""
    with Connection(env["MAILWORKER_BROKER_URL"], connect_timeout=5) as connection:
        try:
            _, count, _ = connection.default_channel.queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            return None
    return int(count)


def pool_processes(worker: WorkerProcess) -> list[int]:
    """The live prefork pool processes of ``worker`` (children of its main process that
    are not zombies waiting to be reaped)."""
    children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children").read_text().split()
    alive = []
    for pid in children:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            alive.append(int(pid))
    return alive


def poll(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Check ``predicate`` every 0.1 s (it may ask RabbitMQ) until it holds.

    Raises:
        TimeoutError: it did not within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


class TestBatch:
    """Messages published to RabbitMQ are delivered, each exactly once."""

    def test_batch_is_delivered_exactly_once(
        self,
        rabbit_env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
        redis_client: redis.Redis,
        dlq: DeadLetterStore,
    ) -> None:
        """40 messages through RabbitMQ arrive once each, their results are read back
        from Redis, and no task message is left in RabbitMQ or lands in Redis."""
        worker = start_worker(rabbit_env)
        expected = {f"batch {n:02d}" for n in range(40)}
        with producer(rabbit_env):
            results = [
                send_mail.delay(to=f"user{n}@example.org", subject=f"batch {n:02d}", text="hi")
                for n in range(40)
            ]
            smtpd.handler.wait_for_messages(40, timeout=30)
            statuses = {result.get(timeout=10)["status"] for result in results}
        worker.stop()

        assert subjects(smtpd) == Counter(dict.fromkeys(expected, 1))
        assert statuses == {"sent"}
        assert ready_messages(rabbit_env, "celery") == 0
        assert not redis_client.exists("celery"), "a task message went to Redis"
        assert dlq.count() == 0


class TestDelayedRetry:
    """A delayed retry waits in Redis and goes back onto RabbitMQ when due."""

    def test_greylisted_message_is_retried_through_rabbitmq(
        self,
        rabbit_env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
        schedule: RetrySchedule,
    ) -> None:
        """A recipient refused with 451 once: the task is deferred with a retry in the
        Redis schedule, the mover publishes it to RabbitMQ when due, and the retry task
        delivers one copy."""
        smtpd.handler.rcpt_replies_once["grey@example.org"] = "451 4.7.1 greylisted"
        worker = start_worker(rabbit_env)
        with producer(rabbit_env):
            first = send_mail.delay(to="grey@example.org", subject="greylisted", text="hi")
            deferred = first.get(timeout=15)
            smtpd.handler.wait_for_messages(1, timeout=15)
        worker.stop()

        [event] = worker.events("mail.deferred")
        [sent] = worker.events("mail.sent")
        assert deferred["status"] == "deferred"
        assert sent["task_id"] == deferred["retry_task_id"] == event["retry_task_id"]
        assert [m.rcpt_tos for m in smtpd.handler.messages] == [("grey@example.org",)]
        assert schedule.pending() == 0
        assert ready_messages(rabbit_env, "celery") == 0


class TestWorkerLost:
    """A killed worker's messages come back from RabbitMQ at once (acks_late)."""

    def test_killed_worker_messages_are_redelivered(
        self,
        rabbit_env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
        dlq: DeadLetterStore,
    ) -> None:
        """The whole worker is SIGKILLed mid-send and another started: RabbitMQ hands
        the unacknowledged messages back as the connection closes, and every message
        arrives well inside the 600 s visibility timeout, duplicates at most the two
        messages in flight."""
        smtpd.handler.command_delays["RCPT"] = 0.1  # keep messages in flight at the kill
        worker = start_worker(rabbit_env)
        expected = {f"kill {n:02d}" for n in range(12)}
        with producer(rabbit_env):
            for n in range(12):
                send_mail.delay(to=f"user{n}@example.org", subject=f"kill {n:02d}", text="hi")
            smtpd.handler.wait_for_messages(3, timeout=20)
            rcpts = smtpd.handler.counts["RCPT"]
            smtpd.handler.wait_for_count("RCPT", rcpts + 1, timeout=10)  # one is mid-send
            worker.kill()
            killed = time.monotonic()
            after = start_worker(rabbit_env, name="after-kill")
            poll(lambda: set(subjects(smtpd)) >= expected, 30, "every message")
            recovered = time.monotonic() - killed
        after.stop()

        copies = subjects(smtpd)
        assert set(copies) == expected
        assert sum(n - 1 for n in copies.values()) <= 2, copies
        assert recovered < 30, f"back {recovered:.1f} s after the kill"
        assert ready_messages(rabbit_env, "celery") == 0
        assert dlq.count() == 0

    def test_message_that_kills_its_worker_is_dead_lettered_as_poison(
        self,
        rabbit_env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
        dlq: DeadLetterStore,
        schedule: RetrySchedule,
    ) -> None:
        """Every run of one message has its pool process SIGKILLed mid-send; Celery
        hands it back to RabbitMQ each time, and once it has started more than
        1 + MAILWORKER_MAX_REDELIVERIES (1) times without finishing it is dead-lettered
        as poison instead of looping, never sent."""
        smtpd.handler.command_delays["RCPT"] = 2.0  # the sender waits: time to kill it
        worker = start_worker({**rabbit_env, "MAILWORKER_MAX_REDELIVERIES": "1"}, concurrency=1)
        kills = 0
        with producer(rabbit_env):
            send_mail.delay(to="poison@example.org", subject="poison", text="hi")
            deadline = time.monotonic() + 40
            while dlq.count() == 0 and time.monotonic() < deadline:
                if smtpd.handler.counts["RCPT"] > kills:
                    [child] = wait_for(lambda: pool_processes(worker), 5, "the pool process")
                    os.kill(child, signal.SIGKILL)
                    kills += 1
                time.sleep(0.02)
        worker.stop()

        [record] = dlq.list()
        assert record.reason == "poison", record
        assert record.subject == "poison"
        assert record.error["message"] == "started 3 times without finishing"
        # Each start after a kill either runs (and is killed) or, when Celery noticed
        # the death before the killed run's lock expired, is deferred behind it.
        assert 1 <= kills <= 2, f"{kills} runs were killed"
        assert smtpd.handler.messages == []
        assert schedule.pending() == 0
        assert ready_messages(rabbit_env, "celery") == 0


class TestQueues:
    """Retries go back to the RabbitMQ queue the message came from."""

    def test_delayed_retry_returns_to_the_mail_queue(
        self,
        rabbit_env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
    ) -> None:
        """A worker consuming only "mail" gets the retry of a message published there and
        delivers it; nothing is routed to Celery's default "celery" queue."""
        smtpd.handler.rcpt_replies_once["grey@example.org"] = "451 4.7.1 greylisted"
        worker = start_worker(rabbit_env, concurrency=1, extra_args=("--queues", QUEUE))
        with producer(rabbit_env):
            first = send_mail.apply_async(
                kwargs={"to": "grey@example.org", "subject": "greylisted", "text": "hi"},
                queue=QUEUE,
            )
            assert first.get(timeout=15)["status"] == "deferred"
            poll(
                lambda: smtpd.handler.messages or ready_messages(rabbit_env, "celery"),
                15,
                "the retry to be delivered or misrouted",
            )
        worker.stop()

        assert not ready_messages(rabbit_env, "celery"), "the retry went to the default queue"
        [deferred] = worker.events("mail.deferred")
        [sent] = worker.events("mail.sent")
        assert sent["task_id"] == deferred["retry_task_id"], "delivered by the retry task"
        assert [m.rcpt_tos for m in smtpd.handler.messages] == [("grey@example.org",)]
        assert ready_messages(rabbit_env, QUEUE) == 0
