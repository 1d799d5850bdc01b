"""The fault suite of issue 9: a real worker, a real Redis and a real SMTP server on
loopback; each scenario sends a batch, injects one fault mid-batch and counts.

Every scenario must lose nothing (each message accepted by the server or
dead-lettered) and dead-letter nothing (no fault here outlasts the retries). The
duplicate rule: a message is accepted twice only when mailworker could not know that
the server had it — a delivery deferred *in doubt* (the whole message sent, the reply
lost: at-least-once, see :func:`~tests.faults.scenarios.in_doubt_drop`) or a process
SIGKILLed between the server's 250 and the idempotency record. Every other fault
strikes before the data or gets a verdict, and must cause none.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults import scenarios
from tests.faults.rig import CONCURRENCY, Result

pytestmark = pytest.mark.slow


def check(result: Result, *, killed: int = 0, crashes: bool = False) -> None:
    """Nothing lost or dead-lettered, one Message-ID per message, no duplicate beyond
    the in-doubt deliveries and the ``killed`` processes' 250-to-record windows, and
    no worker that exited on its own (unless ``crashes``: then it was restarted)."""
    if killed and result.lost and result.lost == result.detail["vanished"] <= 1:
        # Only a SIGKILL of the main process can hit it; documented in the README.
        pytest.xfail(f"kombu#305: a message taken off the queue, not yet unacked: {result}")
    if not crashes:
        assert result.crashes == 0, f"a worker exited on its own: {result.detail['crashes']}"
    assert result.drained, f"not drained after {result.seconds} s: {result}"
    assert result.lost == 0, result
    assert result.dead_lettered == 0, result
    assert result.sent == result.messages, result
    assert result.split_ids == 0, f"a message went out under two Message-IDs: {result}"
    assert result.duplicates <= result.in_doubt + killed, result


class TestSMTPFaults:
    """The SMTP server restarts, cuts, refuses, stalls, babbles or throttles."""

    def test_smtp_server_restart(self, tmp_path: Path) -> None:
        """A server restart mid-batch: every held session reconnects, nothing is lost."""
        result = scenarios.smtp_restart(tmp_path)
        check(result)
        assert result.detail["connections"] > CONCURRENCY, "the sessions reconnected"

    def test_drop_after_the_data_is_at_least_once(self, tmp_path: Path) -> None:
        """A connection cut after the whole message and before the reply: the delivery
        is deferred in doubt and sent again by the delayed retry, so each such message
        arrives exactly twice, with the same Message-ID (at-least-once)."""
        result = scenarios.in_doubt_drop(tmp_path)
        check(result)
        assert result.detail["dropped_after_data"] == scenarios.IN_DOUBT
        assert result.in_doubt == scenarios.IN_DOUBT, result
        assert result.duplicates == scenarios.IN_DOUBT, result

    def test_421_storm_at_the_greeting(self, tmp_path: Path) -> None:
        """421 to MAIL and at every greeting for 2 s: retried until it clears, no
        duplicate."""
        result = scenarios.greeting_421_storm(tmp_path)
        check(result)
        assert result.duplicates == 0
        assert result.detail["mail_refused"] > 0

    def test_421_storm_mid_session(self, tmp_path: Path) -> None:
        """421 to MAIL, then to the end of the data, for 2 s: no loss, no duplicate."""
        result = scenarios.midsession_421_storm(tmp_path)
        check(result)
        assert result.duplicates == 0
        assert result.detail["connections"] > CONCURRENCY

    def test_server_slower_than_the_timeouts(self, tmp_path: Path) -> None:
        """Greeting and MAIL slower than the 1 s timeouts for 2 s: no loss, no duplicate."""
        result = scenarios.slow_server(tmp_path)
        check(result)
        assert result.duplicates == 0
        assert result.detail["connections"] > CONCURRENCY

    def test_garbage_overlong_and_endless_replies(self, tmp_path: Path) -> None:
        """Garbage, a 20 KB line and a 100,000-line reply to MAIL for 2 s: each session
        is dropped and renewed; no loss, no duplicate."""
        result = scenarios.garbage_replies_storm(tmp_path)
        check(result)
        assert result.duplicates == 0
        assert result.detail["mail_refused"] > 0

    def test_throttling_server(self, tmp_path: Path) -> None:
        """451 after 15 messages per 2 s window: every message arrives, none twice."""
        result = scenarios.throttling_server(tmp_path)
        check(result)
        assert result.duplicates == 0
        assert result.detail["mail_refused"] > 0


class TestInfrastructureFaults:
    """Redis restarts; worker processes die or are stopped."""

    def test_redis_restart_with_aof(self, tmp_path: Path) -> None:
        """Redis (AOF on) restarted mid-batch: nothing lost, no duplicate, and the
        worker reconnects instead of exiting."""
        result = scenarios.redis_restart_aof(tmp_path)
        check(result, crashes=True)
        assert result.duplicates == 0
        if result.crashes:
            # Not a mailworker bug, and intermittent (about 1 run in 10 under load), so
            # it cannot be a strict xfail: Celery 5.7's consumer closes the broken
            # connection (Consumer.on_connection_error_after_connected), kombu's Redis
            # channel then restores unacked messages through a transport whose client
            # is already None, and the AttributeError ends the worker ("Unrecoverable
            # error"). Nothing is lost (Redis keeps the messages; the restarted worker
            # sends them), but a worker without a supervisor stops sending.
            pytest.xfail(f"the worker exited on the Redis restart: {result.detail['crashes']}")

    def test_pool_process_sigkill(self, tmp_path: Path) -> None:
        """The pool process that is mid-send is SIGKILLed: its message is sent again
        after the time limit and its lock; at most one duplicate."""
        result = scenarios.pool_process_sigkill(tmp_path)
        check(result, killed=1)

    def test_worker_sigkill(self, tmp_path: Path) -> None:
        """The whole worker is SIGKILLed and replaced: its messages come back after the
        visibility timeout; at most one duplicate per process."""
        result = scenarios.worker_sigkill(tmp_path)
        check(result, killed=CONCURRENCY)

    def test_worker_sigkill_mid_sweep(self, tmp_path: Path) -> None:
        """A worker killed while it held kombu's restore lock does not hold up the
        recovery of its messages for five minutes: they come back within seconds."""
        result = scenarios.worker_sigkill_mid_sweep(tmp_path)
        assert result.detail["restore_lock_expire"] <= 5
        check(result, killed=CONCURRENCY)

    def test_warm_shutdown(self, tmp_path: Path) -> None:
        """SIGTERM mid-batch: the worker exits 0 after finishing every transaction it
        had started and QUITting every session; a new worker sends the rest."""
        result = scenarios.warm_shutdown(tmp_path)
        check(result)
        assert result.duplicates == 0
        assert result.detail["exit_status"] == 0
        assert result.detail["unfinished"] == 0, "a started transaction was cut off"
        assert result.detail["unquit"] == 0, "a session ended without QUIT"
