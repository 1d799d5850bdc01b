"""Delayed retries in Redis and the per-message ledger, against a real Redis."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from mailworker.store.ledger import Ledger
from mailworker.store.schedule import RetrySchedule, ScheduledTask
from mailworker.worker.mover import RetryMover
from mailworker.worker.retry import RetryPolicy


class TestRetrySchedule:
    def test_only_due_tasks_are_claimed(self, redis_client: redis.Redis) -> None:
        """A retry is handed out once its due time has come, not before."""
        schedule = RetrySchedule(redis_client)
        schedule.add("early", "mailworker.send_mail", {"to": "a@example.org"}, due=100)
        schedule.add("late", "mailworker.send_mail", {"to": "b@example.org"}, due=200)

        claimed = schedule.claim_due(now=150)

        assert [(t.id, t.kwargs) for t in claimed] == [("early", {"to": "a@example.org"})]
        assert schedule.next_due() == pytest.approx(200)

    def test_a_claim_hides_the_task_until_it_times_out(self, redis_client: redis.Redis) -> None:
        """A claimed task is not handed out again unless its publisher died (claim timed out)."""
        schedule = RetrySchedule(redis_client)
        schedule.add("r1", "mailworker.send_mail", {}, due=100)

        assert len(schedule.claim_due(now=100, claim_timeout=60)) == 1
        assert schedule.claim_due(now=150) == []
        assert [t.id for t in schedule.claim_due(now=161)] == ["r1"]

    def test_done_forgets_the_task(self, redis_client: redis.Redis) -> None:
        """After done(), a published task is gone for good."""
        schedule = RetrySchedule(redis_client)
        schedule.add("r1", "mailworker.send_mail", {}, due=100)
        schedule.claim_due(now=100)
        schedule.done("r1")

        assert schedule.pending() == 0
        assert schedule.claim_due(now=10_000) == []

    def test_concurrent_movers_claim_each_task_once(self, redis_client: redis.Redis) -> None:
        """Several workers polling at once never get the same retry."""
        schedule = RetrySchedule(redis_client)
        for i in range(200):
            schedule.add(f"r{i}", "mailworker.send_mail", {"i": i}, due=1)
        claimed: list[str] = []
        lock = threading.Lock()

        def claim() -> None:
            mine = RetrySchedule(redis_client)
            while batch := mine.claim_due(now=2, limit=7):
                with lock:
                    claimed.extend(t.id for t in batch)

        threads = [threading.Thread(target=claim) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert sorted(claimed) == sorted(f"r{i}" for i in range(200))


class TestRetryMover:
    def test_due_tasks_are_published_and_removed(self, redis_client: redis.Redis) -> None:
        """The mover publishes every due retry with its id as task id, then forgets it."""
        schedule = RetrySchedule(redis_client)
        schedule.add("r1", "mailworker.send_mail", {"to": "a@example.org"}, due=time.time() - 1)
        published: list[ScheduledTask] = []

        moved = RetryMover(schedule, published.append).move_due()

        assert moved == 1
        assert [(t.id, t.task) for t in published] == [("r1", "mailworker.send_mail")]
        assert schedule.pending() == 0

    def test_a_failed_publish_keeps_the_task(self, redis_client: redis.Redis) -> None:
        """A retry whose publish fails (broker down) stays scheduled, to be claimed again."""
        schedule = RetrySchedule(redis_client)
        schedule.add("r1", "mailworker.send_mail", {}, due=time.time() - 1)

        def broken(_task: ScheduledTask) -> None:
            raise ConnectionError("broker down")

        with pytest.raises(ConnectionError):
            RetryMover(schedule, broken).move_due()

        assert schedule.pending() == 1
        assert [t.id for t in schedule.claim_due(now=time.time() + 61)] == ["r1"]

    def test_thread_moves_tasks_and_runs_housekeeping(self, redis_client: redis.Redis) -> None:
        """The background thread publishes due retries and runs its housekeeping."""
        schedule = RetrySchedule(redis_client)
        published = threading.Event()
        housekept = threading.Event()
        mover = RetryMover(
            schedule,
            lambda _task: published.set(),
            interval=0.05,
            housekeeping=housekept.set,
        )
        mover.start()
        try:
            schedule.add("r1", "mailworker.send_mail", {}, due=time.time())
            assert published.wait(5)
            assert housekept.wait(5)
        finally:
            mover.stop()


class TestLedger:
    def test_lock_is_exclusive_and_released_only_by_its_owner(
        self, redis_client: redis.Redis
    ) -> None:
        """A second delivery cannot take a held lock, nor release it with a wrong token."""
        ledger = Ledger(redis_client)
        token = ledger.acquire("m1", ttl=30)
        assert token is not None
        assert ledger.acquire("m1", ttl=30) is None

        ledger.release("m1", "not-the-token")
        assert ledger.acquire("m1", ttl=30) is None

        ledger.release("m1", token)
        assert ledger.acquire("m1", ttl=30) is not None

    def test_lock_expires(self, redis_client: redis.Redis) -> None:
        """A lock left by a killed worker expires after its lifetime."""
        ledger = Ledger(redis_client)
        assert ledger.acquire("m1", ttl=0.2) is not None
        time.sleep(0.3)
        assert ledger.acquire("m1", ttl=30) is not None

    def test_sent_record_round_trips(self, redis_client: redis.Redis) -> None:
        """A recorded acceptance is read back as it was written, with an expiry."""
        ledger = Ledger(redis_client)
        assert ledger.sent("m1") is None
        ledger.record_sent("m1", {"status": "sent", "accepted": ["a@example.org"]}, ttl=60)

        assert ledger.sent("m1") == {"status": "sent", "accepted": ["a@example.org"]}
        assert 0 < redis_client.ttl("mailworker:sent:m1") <= 60

    def test_starts_are_counted_per_task(self, redis_client: redis.Redis) -> None:
        """Each start of a task message is counted until it is forgotten."""
        ledger = Ledger(redis_client)
        assert [ledger.count_start("t1", ttl=60) for _ in range(3)] == [1, 2, 3]
        assert ledger.count_start("t2", ttl=60) == 1
        ledger.forget_starts("t1")
        assert ledger.count_start("t1", ttl=60) == 1


class TestRetryPolicy:
    def test_delays_follow_the_table_and_the_last_repeats(self) -> None:
        """Delayed retry n waits the n-th delay; past the table, the last one."""
        policy = RetryPolicy((60.0, 300.0), max_age=86400)
        assert [policy.delay(n) for n in (1, 2, 3, 9)] == [60.0, 300.0, 300.0, 300.0]

    def test_jitter_spreads_delays_within_its_fraction(self) -> None:
        """With jitter, delays vary but stay within the configured fraction."""
        policy = RetryPolicy((100.0,), max_age=86400, jitter=0.1)
        delays = {policy.delay(1) for _ in range(200)}
        assert len(delays) > 100
        assert all(90.0 <= d <= 110.0 for d in delays)

    def test_last_retry_lands_on_the_maximum_age(self) -> None:
        """A delay overshooting the maximum age is cut to it; after it, none is due."""
        policy = RetryPolicy((3600.0,), max_age=5000)
        assert policy.due(1, first_attempt_at=0, now=2000) == 5000
        assert policy.due(2, first_attempt_at=0, now=5000) is None
