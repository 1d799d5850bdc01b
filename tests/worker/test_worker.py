"""End to end: a real ``mailworker worker`` (prefork) subprocess, a real Redis broker and
a real STARTTLS + AUTH SMTP server; producers publish with ``send_mail.delay``."""

from __future__ import annotations

import base64
import datetime
import json
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from mailworker.store.deadletter import DeadLetterStore
from mailworker.store.schedule import RetrySchedule
from mailworker.worker.tasks import send_mail
from tests.servers import DEFAULT_USER, WRONG_PASSWORD, SMTPServer, wait_for
from tests.worker_process import (
    BASE_SETTINGS,
    TERMINAL_FIELDS,
    WorkerProcess,
    json_lines,
    mailworker_executable,
    producer,
    publish,
    subjects,
)

#: The server's password; it must never appear in any output of the worker (nor must
#: WRONG_PASSWORD, profile "wrong").
PASSWORD = "Wk-7f3a9c-pa55 w:rd/@?"
#: The server under test (``smtpd``): STARTTLS with the test CA, AUTH with PASSWORD.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.smtpd_options(tls="starttls", auth=True, password=PASSWORD),
]
VISIBILITY_TIMEOUT = float(BASE_SETTINGS["MAILWORKER_VISIBILITY_TIMEOUT"])
TASK_TIME_LIMIT = float(BASE_SETTINGS["MAILWORKER_TASK_TIME_LIMIT"])


def message_ids(server: SMTPServer) -> Counter[str]:
    """How many copies of each Message-ID the server accepted."""
    return Counter(str(m.parsed()["Message-ID"]) for m in list(server.handler.messages))


def when(event: dict[str, Any]) -> float:
    """An event's timestamp as unix seconds."""
    stamp = event["timestamp"].replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()


def redis_dump(client: redis.Redis) -> bytes:
    """Every key and value in the database, as bytes (for grepping)."""
    out = []
    for key in client.scan_iter():
        kind = client.type(key)
        values: list[Any]
        if kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"hash":
            values = [b for kv in client.hgetall(key).items() for b in kv]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"zset":
            values = client.zrange(key, 0, -1)
        elif kind == b"set":
            values = list(client.smembers(key))
        else:
            values = []
        out.append(key + b"\n" + b"\n".join(_bytes(v) for v in values))
    return b"\n".join(out)


def _bytes(value: object) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


class TestSessions:
    """One held-open session per worker process."""

    def test_200_messages_use_one_session_per_process(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
    ) -> None:
        """200 messages through 2 prefork processes: exactly 2 TLS sessions and 2 AUTHs
        at the server, and both say QUIT at warm shutdown."""
        worker = start_worker(env)
        with producer(env):
            started = time.monotonic()
            publish(200, "bulk")
            smtpd.handler.wait_for_messages(200, timeout=40)
            elapsed = time.monotonic() - started
        assert worker.stop() == 0

        counts = smtpd.handler.counts
        print(f"\n200 messages in {elapsed:.2f} s: {200 / elapsed:.0f} msg/s (incl. publishing)")
        assert sorted(subjects(smtpd).values()) == [1] * 200, "each message exactly once"
        assert counts["tls_handshakes"] == 2
        assert counts["auth_successes"] == 2
        assert counts["connections"] == 2
        assert len({m.connection_id for m in smtpd.handler.messages}) == 2
        assert all(m.tls and m.auth_user == DEFAULT_USER for m in smtpd.handler.messages)
        smtpd.handler.wait_for_count("QUIT", 2, timeout=5)
        assert counts["QUIT"] == 2
        garbled = [line for line in worker.output().splitlines() if "}{" in line]
        assert len(worker.events("mail.sent")) == 200, f"log lines run together: {garbled[:2]}"
        assert len(worker.events("smtp.connected")) == 2


class TestRetries:
    """Transient failures come back through Redis; permanent ones go to the store."""

    def test_4xx_then_success_through_the_redis_schedule(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
        redis_client: redis.Redis,
    ) -> None:
        """A greylisted message is deferred, moved back onto the queue by the worker's
        mover when due (a new task), and then delivered."""
        smtpd.handler.rcpt_replies_once["grey@example.org"] = "451 4.7.1 greylisted"
        worker = start_worker(env)
        with producer(env):
            first = send_mail.delay(to="grey@example.org", subject="greylisted", text="hi")
            [received] = smtpd.handler.wait_for_messages(1, timeout=20)
            assert first.get(timeout=5)["status"] == "deferred"
        worker.stop()

        [deferred] = worker.events("mail.deferred")
        [sent] = worker.events("mail.sent")
        assert deferred["task_id"] == first.id
        retry_id = deferred["retry_task_id"]
        assert sent["task_id"] == retry_id, "delivered by the scheduled retry task"
        assert f"mailworker.send_mail[{retry_id}] received" in worker.output(), (
            "the retry came through the broker queue"
        )
        assert when(sent) - when(deferred) >= 0.9, "not before the first retry delay (1 s)"
        assert sent["message_id"] == deferred["message_id"] == received.parsed()["Message-ID"]
        assert sent["attempt"] == 2
        assert smtpd.handler.counts["RCPT"] == 2
        assert RetrySchedule(redis_client).pending() == 0

    def test_5xx_goes_straight_to_the_dead_letter_store(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
    ) -> None:
        """A 550 is tried exactly once and shows in ``mailworker dlq list --json``."""
        smtpd.handler.rcpt_replies["bad@example.org"] = "550 5.1.1 no such user"
        worker = start_worker(env)
        with producer(env):
            result = send_mail.delay(to="bad@example.org", subject="bounce me", text="hi")
            wait_for(result.ready, 15, "the task to finish")
            assert result.state == "FAILURE"
            assert "dead-lettered" in str(result.result)
        worker.stop()

        listed = subprocess.run(
            [mailworker_executable(), "dlq", "list", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        [record] = [json.loads(line) for line in listed.stdout.splitlines()]
        assert record["reason"] == "permanent"
        assert record["code"] == 550
        assert record["recipients"] == ["bad@example.org"]
        assert record["subject"] == "bounce me"
        assert record["attempts"] == 1
        assert record["task_id"] == result.id
        assert "550" in record["error"]
        counts = smtpd.handler.counts
        assert (counts["MAIL"], counts["RCPT"], counts["DATA"]) == (1, 1, 0)
        assert len(worker.events("mail.dead_lettered")) == 1


class TestDeadLetterRetry:
    """Operators re-queue dead letters from the CLI."""

    def test_dlq_retry_redelivers_through_the_worker(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
        dlq: DeadLetterStore,
    ) -> None:
        """A message refused with 550 is re-queued by `mailworker dlq retry --all` once the
        address is fixed, delivered by the worker, and leaves the store."""
        smtpd.handler.rcpt_replies["moved@example.org"] = "550 5.1.1 mailbox moved"
        worker = start_worker(env)
        with producer(env):
            send_mail.delay(to="moved@example.org", subject="second chance", text="hi")
            wait_for(lambda: dlq.count() == 1, 15, "the dead letter")
        del smtpd.handler.rcpt_replies["moved@example.org"]

        retried = subprocess.run(
            [mailworker_executable(), "dlq", "retry", "--all"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )

        [message] = smtpd.handler.wait_for_messages(1, timeout=15)
        assert message.rcpt_tos == ("moved@example.org",)
        assert message.parsed()["Subject"] == "second chance"
        assert dlq.count() == 0
        assert "1" in retried.stdout
        worker.stop()
        assert len(worker.events("mail.sent")) == 1


class TestNoLoss:
    """Every message arrives, through server restarts and killed workers."""

    def test_server_restart_mid_stream(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
        dlq: DeadLetterStore,
    ) -> None:
        """The SMTP server restarts while 200 messages flow: every message arrives."""
        worker = start_worker(env)
        with producer(env):
            publish(200, "restart")
            smtpd.handler.wait_for_messages(60, timeout=30)
            smtpd.restart(down_for=0.5)
            at_restart = len(smtpd.handler.messages)
            wait_for(lambda: len(subjects(smtpd)) == 200, 40, "all 200 subjects")
        worker.stop()

        copies = subjects(smtpd)
        duplicates = {s: n for s, n in copies.items() if n > 1}
        print(f"\nrestart after {at_restart} messages; duplicates: {duplicates or 'none'}")
        assert set(copies) == {f"restart {n:03d}" for n in range(200)}
        assert sum(n - 1 for n in duplicates.values()) <= 2, duplicates
        assert dlq.count() == 0
        assert smtpd.handler.counts["connections"] >= 4, "both processes reconnected"

    def test_sigkill_mid_stream_loses_nothing(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
        redis_client: redis.Redis,
        dlq: DeadLetterStore,
    ) -> None:
        """SIGKILL the worker (main process and children) at about half of 200 messages
        and start a new one: every message arrives within the visibility timeout (plus
        one task time limit), duplicates at most the messages in flight at the kill."""
        smtpd.handler.command_delays["RCPT"] = 0.01  # keep messages in flight at the kill
        worker = start_worker(env)
        with producer(env):
            publish(200, "kill")
            smtpd.handler.wait_for_messages(100, timeout=30)
            worker.kill()
            killed = time.monotonic()
            at_kill = len(smtpd.handler.messages)
            start_worker(env, name="after-kill")
            expected = {f"kill {n:03d}" for n in range(200)}
            budget = VISIBILITY_TIMEOUT + TASK_TIME_LIMIT + 10

            def settled() -> bool:
                return set(subjects(smtpd)) == expected and not redis_client.hlen("unacked")

            deadline = killed + budget
            while not settled() and time.monotonic() < deadline:
                time.sleep(0.1)
            recovered = time.monotonic() - killed

        copies = subjects(smtpd)
        missing = sorted(expected - set(copies))
        by_subject = {s: n for s, n in copies.items() if n > 1}
        by_message_id = {i: n for i, n in message_ids(smtpd).items() if n > 1}
        print(
            f"\nkilled after {at_kill} messages; all back {recovered:.1f} s after the kill; "
            f"duplicates by subject: {by_subject or 'none'}, "
            f"by Message-ID: {by_message_id or 'none'}"
        )
        assert not missing, (
            f"{len(missing)} message(s) not delivered {budget:.0f} s after the kill "
            f"(visibility timeout {VISIBILITY_TIMEOUT:.0f} s): {missing}; the broker "
            f"still holds {redis_client.hlen('unacked')} unacknowledged message(s) of the "
            f"killed worker, {RetrySchedule(redis_client).pending()} scheduled retries, "
            f"{dlq.count()} dead letters"
        )
        assert not redis_client.hlen("unacked"), "unacknowledged messages left behind"
        assert sum(n - 1 for n in by_subject.values()) <= 2, by_subject
        assert dlq.count() == 0

    def test_time_limit_interrupting_a_send_loses_nothing(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
        dlq: DeadLetterStore,
        redis_client: redis.Redis,
    ) -> None:
        """A server slower than the task time limit: the interrupted message is retried
        (not dropped), and the next message on that process gets a clean session.

        One process, so that the next message surely uses the interrupted session.
        """
        smtpd.handler.command_delays["MAIL"] = TASK_TIME_LIMIT + 2
        worker = start_worker(env, concurrency=1)
        with producer(env):
            slow = send_mail.delay(to="slow@example.org", subject="slow server", text="hi")
            time.sleep(TASK_TIME_LIMIT + 0.5)  # the time limit has struck
            smtpd.handler.command_delays.clear()
            time.sleep(1.0)  # the server has answered the interrupted MAIL by now
            following = send_mail.delay(to="next@example.org", subject="next", text="hi")
            wait_for(following.ready, 10, "the following message's task")

            def settled() -> bool:
                got = set(subjects(smtpd))
                return {"slow server", "next"} <= got or dlq.count() > 0

            deadline = time.monotonic() + 15
            while not settled() and time.monotonic() < deadline:
                time.sleep(0.1)
            state: dict[str, Any] = {
                "slow task": f"{slow.state} {slow.result!r}",
                "next task": f"{following.state} {following.result!r}",
                "delivered": sorted(subjects(smtpd)),
                "scheduled retries": RetrySchedule(redis_client).pending(),
                "dead letters": [(r.reason, r.subject, r.error.get("message")) for r in dlq.list()],
                "queued": redis_client.llen("celery"),
            }
        worker.stop()

        assert dlq.count() == 0, f"a good message was dead-lettered: {state}"
        assert "next" in state["delivered"], f"the next message was not delivered: {state}"
        assert "slow server" in state["delivered"], (
            f"the message interrupted by the time limit was lost: {state}"
        )


#: Run in a fresh interpreter: configure logging as ``mailworker worker`` does, log one
#: structlog and one stdlib (Celery) record, print every write() stderr received.
_WRITES_PROBE = """
import json, logging, sys

class Recorder:
    def __init__(self):
        self.writes = []
    def write(self, text):
        self.writes.append(text)
        return len(text)
    def flush(self):
        pass
    def isatty(self):
        return False

sys.stderr = recorder = Recorder()
from mailworker.worker.logs import configure_logging
configure_logging("json")
import structlog
structlog.get_logger("mailworker.worker.delivery").info("mail.sent", task_id="t1")
logging.getLogger("celery.worker.strategy").info("Task mailworker.send_mail[t1] received")
sys.stdout.write(json.dumps(recorder.writes))
"""


class TestLogs:
    """Logs are JSON lines with one terminal event per outcome, and no secret."""

    def test_each_log_line_is_one_write(self) -> None:
        """Every log line reaches stderr in a single write() with its newline, so the
        lines of the prefork processes, which share stderr, never run together."""
        probe = subprocess.run(
            [sys.executable, "-c", _WRITES_PROBE],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        writes = json.loads(probe.stdout)
        assert len(writes) >= 2
        split = [w for w in writes if not w.endswith("\n") or w.count("\n") != 1]
        assert not split, f"log lines written in pieces, which interleave: {writes}"

    @staticmethod
    def full_run(server: SMTPServer, env: dict[str, str], dlq: DeadLetterStore) -> None:
        """Three sent, one deferred then sent, one 550, one AUTH failure."""
        server.handler.rcpt_replies_once["grey@example.org"] = "451 4.7.1 greylisted"
        server.handler.rcpt_replies["bad@example.org"] = "550 5.1.1 no such user"
        with producer(env):
            publish(3, "log")
            send_mail.delay(to="grey@example.org", subject="log grey", text="hi")
            send_mail.delay(to="bad@example.org", subject="log bad", text="hi")
            send_mail.delay(to="ann@example.org", subject="log auth", text="hi", profile="wrong")
            server.handler.wait_for_messages(4, timeout=20)
            wait_for(lambda: dlq.count() == 2, 15, "two dead letters")

    def test_no_password_in_any_output(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
        dlq: DeadLetterStore,
        redis_client: redis.Redis,
    ) -> None:
        """Every byte the worker wrote in a full run with an AUTH failure, and everything
        it stored in Redis, is free of both passwords in any encoding."""
        worker = start_worker(env)
        self.full_run(smtpd, env, dlq)
        worker.stop()

        assert any(not login.success for login in smtpd.handler.logins), "no AUTH failure"
        secrets = {}
        for name, password in (("password", PASSWORD), ("wrong password", WRONG_PASSWORD)):
            secrets[name] = password.encode()
            secrets[f"{name}, URL-encoded"] = urllib.parse.quote(password, safe="").encode()
            secrets[f"{name}, base64 (LOGIN)"] = base64.b64encode(password.encode())
            plain = f"\0{DEFAULT_USER}\0{password}".encode()
            secrets[f"{name}, base64 (PLAIN)"] = base64.b64encode(plain)
        output = worker.output_bytes()
        stored = redis_dump(redis_client)
        leaks = [f"{name} in the {where}" for name, secret in secrets.items()
                 for where, data in (("output", output), ("Redis data", stored))
                 if secret in data]  # fmt: skip
        assert not leaks, leaks
        [auth] = [r for r in dlq.list() if r.code == 535]
        assert "C: AUTH LOGIN" in auth.transcript
        assert auth.transcript.count("C: ****") == 2, auth.transcript

    def test_logs_are_json_lines_with_terminal_events(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        start_worker: Callable[..., WorkerProcess],
        dlq: DeadLetterStore,
        tmp_path: Path,
    ) -> None:
        """With MAILWORKER_LOG_FORMAT=json every line the worker logs (stderr) is a JSON
        object, and each outcome has its terminal event with the promised fields."""
        worker = start_worker(env, stderr_path=tmp_path / "stderr.log")
        self.full_run(smtpd, env, dlq)
        worker.stop()

        events = worker.events()
        terminal = [e for e in events if e.get("event", "").startswith("mail.")]
        names = Counter(e["event"] for e in terminal)
        assert names == {"mail.sent": 4, "mail.deferred": 1, "mail.dead_lettered": 2}, names
        for event in terminal:
            missing = [f for f in TERMINAL_FIELDS if f not in event]
            assert not missing, (event["event"], missing)
            assert all(line.startswith(("C: ", "S: ")) for line in event["transcript"])
        [connected, *_] = worker.events("smtp.connected")
        assert connected["tls_version"].startswith("TLSv1.")
        lines = worker.stderr_bytes().decode("utf-8", "replace").splitlines()
        not_json = [line for line in lines if line.strip() and not json_lines(line)]
        assert not not_json, (
            f"{len(not_json)} of {len(lines)} stderr lines are not JSON, e.g.: "
            + "\n".join(not_json[:8])
        )
