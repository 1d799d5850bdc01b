"""The ledger's two round trips against a real Redis: ``begin`` (sent check, start
count, lock) and ``finish`` (record, start count gone, own lock released)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis

from mailworker.store import keys
from mailworker.store.ledger import Ledger

LIMITS: dict[str, Any] = {"lock_ttl": 30.0, "runs_ttl": 600.0, "max_starts": 3}


@pytest.fixture
def prefix() -> str:
    """A prefix of this test's own."""
    return f"test-{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def ledger(redis_client: redis.Redis, prefix: str) -> Ledger:
    return Ledger(redis_client, prefix=prefix)


def sent_record(**fields: Any) -> dict[str, Any]:
    return {"status": "sent", "message_id": "<m@example.com>", "refused": {}, **fields}


REFUSED = {
    "grey@example.org": {
        "status": "deferred",
        "code": 451,
        "enhanced_code": "4.7.1",
        "reply": "greylisted",
    }
}


class TestBegin:
    """What begin finds, counts and takes."""

    def test_ok_takes_the_lock_and_counts_a_start(
        self, ledger: Ledger, redis_client: redis.Redis, prefix: str
    ) -> None:
        begun = ledger.begin("m-ok", "t-ok", **LIMITS)

        assert begun.status == "ok"
        assert begun.starts == 1
        assert begun.token
        assert begun.sent is None
        assert redis_client.get(keys.lock("m-ok", prefix)) == begun.token.encode()
        assert 0 < redis_client.pttl(keys.lock("m-ok", prefix)) <= 30_000
        assert redis_client.get(keys.runs("t-ok", prefix)) == b"1"
        assert 0 < redis_client.ttl(keys.runs("t-ok", prefix)) <= 600

    def test_locked_while_held(
        self, ledger: Ledger, redis_client: redis.Redis, prefix: str
    ) -> None:
        first = ledger.begin("m-locked", "t-locked", **LIMITS)
        second = ledger.begin("m-locked", "t-locked", **LIMITS)

        assert second.status == "locked"
        assert second.starts == 2, "a start is counted even when locked out"
        assert second.token is None
        assert first.token is not None
        assert redis_client.get(keys.lock("m-locked", prefix)) == first.token.encode()

    def test_poison_past_the_most_starts_takes_no_lock(
        self, ledger: Ledger, redis_client: redis.Redis, prefix: str
    ) -> None:
        redis_client.set(keys.runs("t-poison", prefix), 3)

        begun = ledger.begin("m-poison", "t-poison", **LIMITS)

        assert begun.status == "poison"
        assert begun.starts == 4
        assert begun.token is None
        assert redis_client.exists(keys.lock("m-poison", prefix)) == 0

    def test_at_the_most_starts_is_still_ok(
        self, ledger: Ledger, redis_client: redis.Redis, prefix: str
    ) -> None:
        redis_client.set(keys.runs("t-last", prefix), 2)

        begun = ledger.begin("m-last", "t-last", **LIMITS)

        assert begun.status == "ok"
        assert begun.starts == 3

    def test_done_counts_nothing_and_locks_nothing(
        self, ledger: Ledger, redis_client: redis.Redis, prefix: str
    ) -> None:
        record = sent_record()
        redis_client.set(keys.sent("m-done", prefix), json.dumps(record))

        begun = ledger.begin("m-done", "t-done", **LIMITS)

        assert begun.status == "done"
        assert begun.starts == 0
        assert begun.token is None
        assert begun.sent == record
        assert redis_client.exists(keys.runs("t-done", prefix)) == 0
        assert redis_client.exists(keys.lock("m-done", prefix)) == 0

    def test_done_even_past_the_most_starts(
        self, ledger: Ledger, redis_client: redis.Redis, prefix: str
    ) -> None:
        """A sent message is never poison."""
        redis_client.set(keys.sent("m-old", prefix), json.dumps(sent_record()))
        redis_client.set(keys.runs("t-old", prefix), 99)

        assert ledger.begin("m-old", "t-old", **LIMITS).status == "done"
        assert redis_client.get(keys.runs("t-old", prefix)) == b"99"

    def test_done_when_the_follow_up_is_done(
        self, ledger: Ledger, redis_client: redis.Redis, prefix: str
    ) -> None:
        record = sent_record(refused=REFUSED, follow_up_done=True)
        redis_client.set(keys.sent("m-followed", prefix), json.dumps(record))

        begun = ledger.begin("m-followed", "t-followed", **LIMITS)

        assert begun.status == "done"
        assert begun.sent == record

    def test_pending_follow_up_is_ok_with_the_record(
        self, ledger: Ledger, redis_client: redis.Redis, prefix: str
    ) -> None:
        """Sent, but its refused recipients not followed up: locked for us, counted,
        and the record returned (so nothing is sent again)."""
        record = sent_record(refused=REFUSED, follow_up_done=False)
        redis_client.set(keys.sent("m-pending", prefix), json.dumps(record))

        begun = ledger.begin("m-pending", "t-pending", **LIMITS)

        assert begun.status == "ok"
        assert begun.starts == 1
        assert begun.sent == record
        assert begun.token is not None
        assert redis_client.get(keys.lock("m-pending", prefix)) == begun.token.encode()


class TestFinish:
    """finish writes the record, forgets the starts, releases only its own lock."""

    def test_finish_with_a_record(
        self, ledger: Ledger, redis_client: redis.Redis, prefix: str
    ) -> None:
        begun = ledger.begin("m-fin", "t-fin", **LIMITS)
        assert begun.token is not None
        record = sent_record()

        ledger.finish("m-fin", "t-fin", begun.token, record=record, ttl=1000)

        assert json.loads(redis_client.get(keys.sent("m-fin", prefix)) or b"") == record
        assert 990 <= redis_client.ttl(keys.sent("m-fin", prefix)) <= 1000
        assert redis_client.exists(keys.runs("t-fin", prefix)) == 0
        assert redis_client.exists(keys.lock("m-fin", prefix)) == 0
        assert ledger.sent("m-fin") == record
        assert ledger.begin("m-fin", "t-fin", **LIMITS).status == "done"

    def test_finish_without_a_record_writes_none(
        self, ledger: Ledger, redis_client: redis.Redis, prefix: str
    ) -> None:
        begun = ledger.begin("m-none", "t-none", **LIMITS)
        assert begun.token is not None

        ledger.finish("m-none", "t-none", begun.token)

        assert redis_client.exists(keys.sent("m-none", prefix)) == 0
        assert redis_client.exists(keys.runs("t-none", prefix)) == 0
        assert redis_client.exists(keys.lock("m-none", prefix)) == 0
        assert ledger.begin("m-none", "t-none", **LIMITS).status == "ok"

    def test_finish_leaves_another_token_alone(
        self, ledger: Ledger, redis_client: redis.Redis, prefix: str
    ) -> None:
        """A lock that expired and was taken by a redelivery is not released by the
        first delivery's finish; its record and start count are still written."""
        begun = ledger.begin("m-other", "t-other", **LIMITS)
        assert begun.token is not None
        redis_client.set(keys.lock("m-other", prefix), "someone-else")

        ledger.finish("m-other", "t-other", begun.token, record=sent_record(), ttl=100)

        assert redis_client.get(keys.lock("m-other", prefix)) == b"someone-else"
        assert redis_client.exists(keys.sent("m-other", prefix)) == 1
        assert redis_client.exists(keys.runs("t-other", prefix)) == 0


class TestBeginMany:
    """begin for many messages in one pipeline, results in order."""

    def test_five_keys_in_one_round_trip(
        self,
        ledger: Ledger,
        redis_client: redis.Redis,
        prefix: str,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        redis_client.set(keys.sent("m1", prefix), json.dumps(sent_record()))
        held = ledger.acquire("m2", ttl=30)
        redis_client.set(keys.runs("t3", prefix), 3)
        ledger.begin_many([("warm", "warm")], **LIMITS)  # scripts loaded

        direct: list[Any] = []
        pipelines: list[int] = []
        issue: Callable[..., Any] = redis_client.execute_command
        execute = redis.client.Pipeline.execute

        def command(*args: Any, **options: Any) -> Any:
            direct.append(args[0])
            return issue(*args, **options)

        def run(pipe: redis.client.Pipeline, *args: Any, **options: Any) -> Any:
            pipelines.append(len(pipe.command_stack))
            return execute(pipe, *args, **options)

        monkeypatch.setattr(redis_client, "execute_command", command)
        monkeypatch.setattr(redis.client.Pipeline, "execute", run)

        begun = ledger.begin_many([(f"m{n}", f"t{n}") for n in range(5)], **LIMITS)

        assert direct == []
        assert pipelines == [5], "one pipelined round trip"
        assert [b.status for b in begun] == ["ok", "done", "locked", "poison", "ok"]
        assert [b.starts for b in begun] == [1, 0, 1, 4, 1]
        assert begun[1].sent == sent_record()
        assert held is not None
        assert redis_client.get(keys.lock("m2", prefix)) == held.encode()
        tokens = [b.token for b in begun]
        assert tokens[1] is None
        assert tokens[2] is None
        assert tokens[3] is None
        assert tokens[0] is not None
        assert tokens[4] is not None
        assert tokens[0] != tokens[4]
        for n in (0, 4):
            assert redis_client.get(keys.lock(f"m{n}", prefix)) == tokens[n].encode()  # type: ignore[union-attr]

    def test_first_use_on_a_fresh_connection_loads_the_script(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """With the script cache flushed, a pipelined begin_many still works."""
        redis_client.script_flush()
        ledger = Ledger(redis_client, prefix=prefix)

        begun = ledger.begin_many([("f1", "f1"), ("f2", "f2")], **LIMITS)

        assert [b.status for b in begun] == ["ok", "ok"]
