"""Batch tasks: many messages in one task, each handled as if it had come alone, with
one pipelined Redis round trip and one SMTP exchange per profile between them.

In-process through :func:`~mailworker.worker.batch.run_batch` against a real Redis and
real SMTP servers, plus one real ``mailworker worker`` subprocess.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import redis

from mailworker.errors import DeadLetteredError
from mailworker.queue.names import SEND_MAIL
from mailworker.store.deadletter import DeadLetterStore
from mailworker.store.schedule import RetrySchedule
from mailworker.worker.batch import run_batch
from mailworker.worker.delivery import Delivery
from mailworker.worker.tasks import send_mail_batch
from tests.servers import SMTPServer, smtp_url, wait_for
from tests.servers.chunking import ChunkingServer
from tests.worker_process import WorkerProcess, producer


def mail(n: int, **overrides: Any) -> dict[str, Any]:
    """Valid send_mail kwargs of message ``n`` (to ``r<n>@example.org``)."""
    kwargs: dict[str, Any] = {
        "to": f"r{n}@example.org",
        "subject": f"batch message {n}",
        "text": f"Hello number {n}",
    }
    kwargs.update(overrides)
    return kwargs


def batch(count: int) -> list[dict[str, Any]]:
    return [mail(n) for n in range(count)]


def statuses(results: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(r["status"]) for r in results]


@pytest.fixture
def stats(redis_url: str) -> Iterator[redis.Redis]:
    """A client of its own for ``INFO``, so that it is not counted as mailworker's."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    yield client
    client.close()


@pytest.fixture
def chunking() -> Iterator[ChunkingServer]:
    """A CHUNKING + PIPELINING server (counts its turns), stopped after the test."""
    server = ChunkingServer().start()
    yield server
    server.stop()


class TestBatch:
    """Each message of a batch gets what it would have got alone."""

    def test_twenty_messages_are_sent_in_order(self, delivery: Delivery, smtpd: SMTPServer) -> None:
        """20 valid messages: 20 ``sent`` results in order, each message arrives once
        with its own Message-ID, each result names the profile used."""
        results = run_batch(delivery, SEND_MAIL, "batch-20", batch(20))

        assert statuses(results) == ["sent"] * 20
        assert [r["accepted"] for r in results] == [[f"r{n}@example.org"] for n in range(20)]
        assert {r["profile"] for r in results} == {"default"}
        received = smtpd.handler.wait_for_messages(20)
        assert smtpd.handler.copies() == {f"r{n}@example.org": 1 for n in range(20)}
        by_rcpt = {m.rcpt_tos[0]: m.parsed()["Message-ID"] for m in received}
        ids = [r["message_id"] for r in results]
        assert len(set(ids)) == 20, "every message has its own Message-ID"
        assert [by_rcpt[f"r{n}@example.org"] for n in range(20)] == ids
        assert all(r["attempts"] == 1 for r in results)

    def test_mixed_batch(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        dlq: DeadLetterStore,
        schedule: RetrySchedule,
    ) -> None:
        """An invalid message and a 5xx one are dead-lettered as single send_mail
        tasks, a 4xx one is deferred with a single send_mail retry, the others are
        sent; re-queued alone, the dead letter and the retry deliver."""
        smtpd.handler.rcpt_replies["grey@example.org"] = "451 4.7.1 greylisted"
        smtpd.handler.rcpt_replies["bad@example.org"] = "550 5.1.1 no such user"
        messages = [
            mail(0),
            mail(1, to="not an address"),
            mail(2, to="grey@example.org"),
            mail(3, to="bad@example.org"),
            mail(4),
        ]

        results = run_batch(delivery, SEND_MAIL, "batch-mixed", messages)

        assert statuses(results) == ["sent", "dead_lettered", "deferred", "dead_lettered", "sent"]
        assert smtpd.handler.copies() == {"r0@example.org": 1, "r4@example.org": 1}
        assert "invalid" in str(results[1]["error"])
        assert "permanent" in str(results[3]["error"])

        records = {r.task_id: dlq.get(r.id) for r in dlq.list()}
        assert set(records) == {"batch-mixed-1", "batch-mixed-3"}
        invalid, rejected = records["batch-mixed-1"], records["batch-mixed-3"]
        assert invalid is not None
        assert rejected is not None
        assert invalid.reason == "invalid"
        assert invalid.error["field"] == "to"
        assert rejected.reason == "permanent"
        assert rejected.code == 550
        for record, kwargs in ((invalid, messages[1]), (rejected, messages[3])):
            assert record.task == SEND_MAIL, "a dead letter of a batch is a single task"
            assert {k: v for k, v in record.kwargs.items() if k != "_meta"} == kwargs

        # The deferred one: a single send_mail task on the retry schedule.
        assert schedule.pending() == 1
        [retry] = schedule.claim_due(now=time.time() + 60)
        schedule.done(retry.id)
        assert retry.task == SEND_MAIL
        assert retry.id == results[2]["retry_task_id"]
        assert retry.kwargs["to"] == "grey@example.org"
        del smtpd.handler.rcpt_replies["grey@example.org"]
        again = delivery.run(retry.task, retry.id, retry.kwargs)
        assert again["status"] == "sent"
        assert again["message_id"] == results[2]["message_id"]

        # The 5xx one, re-queued the way `mailworker dlq retry` does it.
        del smtpd.handler.rcpt_replies["bad@example.org"]
        published: list[tuple[str, dict[str, Any]]] = []

        def publish(task: str, kwargs: dict[str, Any]) -> str:
            published.append((task, kwargs))
            return "requeued-3"

        assert dlq.requeue(rejected.id, publish) == "requeued-3"
        [(task, kwargs)] = published
        assert task == SEND_MAIL
        resent = delivery.run(task, "requeued-3", kwargs)
        assert resent["status"] == "sent"
        assert smtpd.handler.copies() == {
            "r0@example.org": 1,
            "r4@example.org": 1,
            "grey@example.org": 1,
            "bad@example.org": 1,
        }

    def test_same_batch_twice_sends_once(self, delivery: Delivery, smtpd: SMTPServer) -> None:
        """A redelivered batch task (same id) sends nothing: every result a duplicate."""
        first = run_batch(delivery, SEND_MAIL, "batch-twice", batch(5))
        second = run_batch(delivery, SEND_MAIL, "batch-twice", batch(5))

        assert statuses(first) == ["sent"] * 5
        assert statuses(second) == ["sent"] * 5
        assert all(r["duplicate"] is True for r in second)
        assert all(r["duplicate"] is False for r in first)
        assert [r["message_id"] for r in second] == [r["message_id"] for r in first]
        assert smtpd.handler.copies() == {f"r{n}@example.org": 1 for n in range(5)}

    def test_message_sent_alone_is_not_sent_again(
        self, delivery: Delivery, smtpd: SMTPServer
    ) -> None:
        """A message of a batch whose idempotency key was sent by a single task is a
        duplicate; the others are sent."""
        alone = delivery.run(SEND_MAIL, "single", mail(2, idempotency_key="order-7"))
        messages = batch(4)
        messages[2] = mail(2, idempotency_key="order-7")

        results = run_batch(delivery, SEND_MAIL, "batch-after-single", messages)

        assert statuses(results) == ["sent"] * 4
        assert results[2]["duplicate"] is True
        assert results[2]["message_id"] == alone["message_id"]
        assert [r["duplicate"] for r in results] == [False, False, True, False]
        assert smtpd.handler.copies() == {f"r{n}@example.org": 1 for n in range(4)}

    def test_pipelined_exchange_takes_fewer_turns_than_messages(
        self,
        make_delivery: Callable[..., Delivery],
        chunking: ChunkingServer,
    ) -> None:
        """Against a CHUNKING + PIPELINING server a batch costs fewer round trips
        (server turns) than it has messages."""
        url = smtp_url(chunking.port, scheme="smtp", timeout=5, max_messages=1000)
        delivery = make_delivery(MAILWORKER_SMTP_URL_CHUNK=url)
        # Connect (and EHLO) first, so only the batch's exchange is counted.
        warm = delivery.run(SEND_MAIL, "warm", mail(99, profile="chunk"))
        assert warm["status"] == "sent"
        chunking.reset_counts()

        count = 30
        messages = [mail(n, profile="chunk") for n in range(count)]
        results = run_batch(delivery, SEND_MAIL, "batch-chunk", messages)
        turns = chunking.turns

        print(f"\n{count} messages in one batch: {turns} server turns")
        assert statuses(results) == ["sent"] * count
        assert {r["profile"] for r in results} == {"chunk"}
        assert len(chunking.messages) == count + 1
        assert [m.rcpt_tos for m in chunking.messages[1:]] == [
            (f"r{n}@example.org",) for n in range(count)
        ]
        assert {m.via for m in chunking.messages[1:]} == {"BDAT"}
        assert chunking.connections == 1, "the batch went through the warm session"
        assert turns < count, f"{turns} turns for {count} messages: not pipelined"


def command_calls(client: redis.Redis) -> dict[str, int]:
    """``INFO commandstats`` call counts by command (``info`` itself left out). Redis
    counts the commands a script runs too, so only ``evalsha`` is a round trip."""
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name != "cmdstat_info"
    }


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    changed = {name: calls - before.get(name, 0) for name, calls in after.items()}
    return {name: calls for name, calls in changed.items() if calls}


class Sent:
    """The commands a client sends, as issued (a pipeline's one by one), and the
    round trips they took."""

    def __init__(self, client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
        self.commands: list[str] = []
        self.round_trips = 0
        issue: Callable[..., Any] = client.execute_command
        execute = redis.client.Pipeline.execute

        def command(*args: Any, **options: Any) -> Any:
            self.commands.append(str(args[0]).lower())
            self.round_trips += 1
            return issue(*args, **options)

        def pipeline(pipe: redis.client.Pipeline, *args: Any, **options: Any) -> Any:
            self.commands.extend(str(c[0][0]).lower() for c in pipe.command_stack)
            self.round_trips += 1
            return execute(pipe, *args, **options)

        monkeypatch.setattr(client, "execute_command", command)
        monkeypatch.setattr(redis.client.Pipeline, "execute", pipeline)

    def take(self) -> tuple[list[str], int]:
        """The commands and round trips since the last take."""
        taken = (self.commands, self.round_trips)
        self.commands, self.round_trips = [], 0
        return taken


class TestRedisCommands:
    """What a delivery costs in Redis."""

    def test_single_delivery_costs_two_scripts(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        redis_client: redis.Redis,
        stats: redis.Redis,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """On a warm session (scripts loaded, connected), one message without refused
        recipients costs at most 2 script calls and 3 commands in all."""
        sent = Sent(redis_client, monkeypatch)
        assert delivery.run(SEND_MAIL, "warm", mail(99))["status"] == "sent"
        sent.take()
        per_message: list[tuple[list[str], int, dict[str, int]]] = []
        for n in range(5):
            before = command_calls(stats)
            result = delivery.run(SEND_MAIL, f"count-{n}", mail(n))
            server = delta(before, command_calls(stats))
            per_message.append((*sent.take(), server))
            assert result["status"] == "sent"

        print(f"\nRedis per message (sent, round trips, server-side incl. scripts'): {per_message}")
        for commands, round_trips, server in per_message:
            assert server.get("evalsha", 0) + server.get("eval", 0) <= 2, server
            assert commands.count("evalsha") <= 2, commands
            assert len(commands) <= 3, commands
            assert round_trips <= 3, commands

    def test_batch_costs_one_round_trip_before_the_sends(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        redis_client: redis.Redis,
        stats: redis.Redis,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A warm batch of 10: one begin script per message in one pipeline, one
        finish script per message in one pipeline after the exchange, nothing else."""
        sent = Sent(redis_client, monkeypatch)
        run_batch(delivery, SEND_MAIL, "batch-warm", batch(2))
        sent.take()
        before = command_calls(stats)
        results = run_batch(delivery, SEND_MAIL, "batch-count", batch(10))
        server = delta(before, command_calls(stats))
        commands, round_trips = sent.take()

        print(f"\nRedis for a batch of 10: {round_trips} round trips, {commands}")
        assert statuses(results) == ["sent"] * 10
        assert server.get("evalsha") == 20, server
        assert commands == ["evalsha"] * 20, commands
        assert round_trips == 2, "one pipeline of begins, one of finishes"


class TestWorker:
    """A real worker runs the published batch task."""

    def test_batch_task_through_a_worker(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
        dlq: DeadLetterStore,
    ) -> None:
        """send_mail_batch.delay with 10 messages: all 10 arrive and the task's result
        is the list of their 10 results; a malformed batch is dead-lettered naming
        ``messages``."""
        worker = start_worker(env)
        with producer(env):
            sent = send_mail_batch.delay(messages=batch(10))
            smtpd.handler.wait_for_messages(10, timeout=20)
            results = sent.get(timeout=10)
            bad = send_mail_batch.delay(messages="nope")
            with pytest.raises(DeadLetteredError, match="messages"):
                bad.get(timeout=10)
        worker.stop()

        assert isinstance(results, list)
        assert statuses(results) == ["sent"] * 10
        assert [r["accepted"] for r in results] == [[f"r{n}@example.org"] for n in range(10)]
        assert smtpd.handler.copies() == {f"r{n}@example.org": 1 for n in range(10)}
        wait_for(lambda: len(dlq.list()) == 1, 5, "the dead letter")
        [summary] = dlq.list()
        record = dlq.get(summary.id)
        assert record is not None
        assert record.reason == "invalid"
        assert record.error["field"] == "messages"
        assert record.task_id == bad.id
        assert record.kwargs.get("messages") == "nope"
