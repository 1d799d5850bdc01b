"""Queues end to end: a real ``mailworker worker`` consuming only the "mail" queue gets
back every retry of the messages it took from there, delayed retries and ``dlq retry``
alike; nothing lands in Celery's default "celery" queue, which nobody consumes here."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import redis

from mailworker.queue.names import route_options
from mailworker.store.deadletter import DeadLetterStore
from mailworker.worker.tasks import send_mail
from tests.servers import SMTPServer, wait_for
from tests.worker_process import WorkerProcess, mailworker_executable, producer

pytestmark = pytest.mark.slow

#: The only queue the worker consumes.
QUEUE = "mail"


def default_queue_lists(client: redis.Redis) -> dict[bytes, int]:
    """Length of every Redis list of Celery's default "celery" queue (with its
    priority sub-queues) that holds messages."""
    lengths = {}
    for key in client.scan_iter(match="celery*"):
        if client.type(key) == b"list":
            lengths[key] = int(client.llen(key))
    return {k: n for k, n in lengths.items() if n}


def delivered_or_misrouted(server: SMTPServer, client: redis.Redis, count: int) -> bool:
    """True once ``count`` messages arrived, or a message sits in the default queue."""
    return len(server.handler.messages) >= count or bool(default_queue_lists(client))


@pytest.fixture
def mail_worker(env: dict[str, str], start_worker: Callable[..., WorkerProcess]) -> WorkerProcess:
    """A worker consuming only the "mail" queue; killed after the test if still running."""
    return start_worker(env, concurrency=1, extra_args=("--queues", QUEUE))


def publish_to_mail_queue(**kwargs: Any) -> Any:
    """``send_mail`` published to the "mail" queue."""
    return send_mail.apply_async(kwargs={"text": "hi", **kwargs}, queue=QUEUE)


class TestQueues:
    """Retries go back to the queue the message came from."""

    def test_delayed_retry_returns_to_the_mail_queue(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        mail_worker: WorkerProcess,
        redis_client: redis.Redis,
    ) -> None:
        """A message from the "mail" queue greylisted once is retried through the "mail"
        queue and delivered by the worker consuming it; the default queue stays empty."""
        smtpd.handler.rcpt_replies_once["grey@example.org"] = "451 4.7.1 greylisted"
        with producer(env):
            first = publish_to_mail_queue(to="grey@example.org", subject="greylisted")
            wait_for(
                lambda: delivered_or_misrouted(smtpd, redis_client, 1),
                20,
                "the retry to be delivered",
            )
            assert first.get(timeout=5)["status"] == "deferred"
        assert default_queue_lists(redis_client) == {}, "the retry went to the default queue"
        mail_worker.stop()

        [deferred] = mail_worker.events("mail.deferred")
        [sent] = mail_worker.events("mail.sent")
        assert deferred["task_id"] == first.id
        assert sent["task_id"] == deferred["retry_task_id"], "delivered by the retry task"
        assert [m.rcpt_tos for m in smtpd.handler.messages] == [("grey@example.org",)]
        assert redis_client.llen("celery") == 0

    def test_dlq_retry_publishes_to_the_original_queue(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        mail_worker: WorkerProcess,
        redis_client: redis.Redis,
        dlq: DeadLetterStore,
    ) -> None:
        """A dead letter of a message from the "mail" queue, re-queued with
        `mailworker dlq retry`, goes back to "mail" and the worker delivers it."""
        smtpd.handler.rcpt_replies["moved@example.org"] = "550 5.1.1 mailbox moved"
        with producer(env):
            publish_to_mail_queue(to="moved@example.org", subject="second chance")
            wait_for(lambda: dlq.count() == 1, 15, "the dead letter")
        [record] = dlq.list()
        assert record.kwargs["_meta"]["queue"] == QUEUE
        del smtpd.handler.rcpt_replies["moved@example.org"]

        subprocess.run(
            [mailworker_executable(), "dlq", "retry", "--all"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )

        wait_for(
            lambda: delivered_or_misrouted(smtpd, redis_client, 1),
            15,
            "the re-queued message to be delivered",
        )
        assert default_queue_lists(redis_client) == {}, "dlq retry published to the default queue"
        [message] = smtpd.handler.messages
        assert message.rcpt_tos == ("moved@example.org",)
        assert message.parsed()["Subject"] == "second chance"
        assert redis_client.llen("celery") == 0
        assert dlq.count() == 0
        mail_worker.stop()
        assert len(mail_worker.events("mail.sent")) == 1


class TestRouteOf:
    """Retries and re-queues are published where their message first came from."""

    def test_exchange_and_routing_key_are_kept(self) -> None:
        """A message that came through a named exchange goes back through it with its
        routing key, not to a queue named after the key."""
        meta = {"queue": "mail.transactional", "exchange": "mail"}
        assert route_options({"_meta": meta}) == {
            "exchange": "mail",
            "routing_key": "mail.transactional",
        }

    def test_default_route(self) -> None:
        """Without an exchange the queue is named; without a record, the app routes."""
        assert route_options({"_meta": {"queue": "mail"}}) == {"queue": "mail"}
        assert route_options({"to": "a@example.org"}) == {}
