"""The harness of the fault scenarios: a real worker, a private ``redis-server`` and a
recording SMTP server on loopback, a batch of messages, and the count at the end.

- :class:`FaultHandler`: the test server's :class:`~tests.servers.RecordingHandler` with
  three faults more (a connection cut after the whole message, a throttle, a rotation
  of malformed replies);
- :class:`Rig`: starts everything for one scenario, publishes the batch, and waits for
  the drain; :meth:`Rig.result` counts what the server and the dead-letter store got;
- :class:`Result`: one line of the table.

Nothing here imports pytest: ``benchmarks/faults.py`` runs the same scenarios.
"""

from __future__ import annotations

import contextlib
import email.parser
import email.policy
import itertools
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from aiosmtpd.smtp import SMTP, Envelope, Session
from celery import Celery

from mailworker.dev._smtp import BaseProtocol
from mailworker.store import keys
from mailworker.store.deadletter import DeadLetterStore
from mailworker.store.schedule import RetrySchedule
from mailworker.worker.app import configure
from mailworker.worker.settings import Settings
from mailworker.worker.tasks import send_mail
from tests.servers import RecordingHandler, RedisServer, SMTPServer, smtp_url
from tests.worker_process import WorkerProcess, producer, worker_env

#: Messages per scenario.
BATCH = 40
#: Worker settings of every scenario (seconds): one short delayed-retry delay, no
#: jitter, and a task time limit below half the visibility timeout.
SETTINGS: dict[str, str] = {
    "MAILWORKER_RETRY_DELAYS": "1",
    "MAILWORKER_RETRY_JITTER": "0",
    "MAILWORKER_MAX_AGE": "60",
    "MAILWORKER_VISIBILITY_TIMEOUT": "10",
    "MAILWORKER_TASK_TIME_LIMIT": "4",
}
#: Prefork processes per worker: at most this many messages are in flight.
CONCURRENCY = 2
#: Seconds a scenario may take to drain before what is missing counts as lost.
DRAIN_TIMEOUT = 40.0
#: The Celery queue and kombu's hash of unacknowledged messages (Redis transport).
QUEUE, UNACKED = "celery", "unacked"

_parser = email.parser.BytesHeaderParser(policy=email.policy.default)


@dataclass(frozen=True)
class Result:
    """What became of one scenario's batch."""

    scenario: str
    messages: int
    #: Messages the server accepted at least once.
    sent: int
    #: Messages with a dead-letter record (and not accepted).
    dead_lettered: int
    #: Messages neither accepted nor dead-lettered when the scenario ended.
    lost: int
    #: Accepted copies beyond the first, counted by Message-ID.
    duplicates: int
    #: Deliveries deferred in doubt (the whole message sent, no verdict), from the
    #: workers' ``mail.deferred`` events: each may have arrived, and is sent again.
    in_doubt: int
    #: Seconds from the first publish until every message was accounted for and no
    #: retry, queued or unacknowledged task message was left.
    seconds: float
    #: Whether it drained within :data:`DRAIN_TIMEOUT`.
    drained: bool
    #: Workers that exited on their own (and were restarted, as a supervisor would).
    crashes: int = 0
    #: Messages that reached the server under more than one Message-ID (must be 0).
    split_ids: int = 0
    #: Scenario-specific figures (e.g. ``in_doubt``: connections cut after the data).
    detail: dict[str, Any] = field(default_factory=dict)

    HEADER = (
        f"{'scenario':<22} {'messages':>8} {'sent':>5} {'dead-lettered':>13} "
        f"{'lost':>5} {'duplicates':>10} {'in doubt':>8} {'crashes':>7} {'drain s':>8}"
    )

    def row(self) -> str:
        """One line of the table (see :attr:`HEADER`)."""
        drain = f"{self.seconds:.1f}" if self.drained else f">{self.seconds:.0f}"
        return (
            f"{self.scenario:<22} {self.messages:>8} {self.sent:>5} {self.dead_lettered:>13} "
            f"{self.lost:>5} {self.duplicates:>10} {self.in_doubt:>8} {self.crashes:>7} "
            f"{drain:>8}"
        )


class FaultHandler(RecordingHandler):
    """A :class:`RecordingHandler` with more faults, changeable at any time.

    Attributes:
        drop_after_data: The next this many ends of DATA: the message is recorded
            (the server has it), then the connection is cut before any reply — the
            in-doubt case.
        throttle: ``(n, seconds)``: after ``n`` MAIL commands in a window of that
            many seconds, MAIL gets ``451 4.7.0`` until the window ends.
        mail_faults: While not empty, MAIL replies cycle through these (garbage,
            over-long, endless replies).
    """

    THROTTLED = "451 4.7.0 Too many messages, slow down"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.drop_after_data = 0
        self.throttle: tuple[int, float] | None = None
        self.mail_faults: list[str] = []
        #: The client port of the connection that sent the latest RCPT.
        self.rcpt_port = 0
        self._fault_cycle: Iterator[int] = itertools.count()
        self._window = (0.0, 0)
        self._lock = threading.Lock()

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        """Throttle, or answer with the next malformed reply, else as usual."""
        with self._lock:
            faults = list(self.mail_faults)
            fault = faults[next(self._fault_cycle) % len(faults)] if faults else None
            if fault is None and self.throttle is not None:
                limit, seconds = self.throttle
                start, used = self._window
                now = time.monotonic()
                if now - start >= seconds:
                    start, used = now, 0
                if used >= limit:
                    fault = self.THROTTLED
                self._window = (start, used + 1)
        if fault is not None:
            self._count("MAIL")
            return fault
        return await super().handle_MAIL(server, session, envelope, address, mail_options)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """Note the client's port (:attr:`rcpt_port`), then answer as usual."""
        transport = server.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        self.rcpt_port = int(peer[1]) if peer else 0
        return await super().handle_RCPT(server, session, envelope, address, rcpt_options)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Record the message; cut the connection instead of replying if told to."""
        reply = await super().handle_DATA(server, session, envelope)
        with self._lock:
            drop = self.drop_after_data > 0
            if drop:
                self.drop_after_data -= 1
        if drop and isinstance(server, BaseProtocol):
            self._count("dropped_after_data")
            server.abort()
        return reply


def garbage_replies() -> list[str]:
    """A reply without a code, a 20 KB reply line, and a reply of 100,000 lines (never
    ending, as far as any client limit goes)."""
    return [
        "this is not an SMTP reply",
        "250 " + "x" * 20_000,
        "250-" + "\r\n250-".join(["more"] * 100_000) + "\r\n250 end",
    ]


class Rig:
    """One scenario's worker, Redis and SMTP server, and the batch it sends.

    Args:
        name: the scenario's name (subject prefix, log file names).
        workdir: where logs (and Redis data) go.
        timeout: every SMTP stage's timeout, seconds (profile ``?timeout=``).
        redis_args: more ``redis-server`` arguments (e.g. AOF on).
        settings: ``MAILWORKER_*`` variables over :data:`SETTINGS`.
    """

    def __init__(
        self,
        name: str,
        workdir: Path,
        *,
        timeout: float = 2.0,
        redis_args: tuple[str, ...] = (),
        **settings: str,
    ) -> None:
        self.name = name
        self.workdir = workdir
        self.messages = BATCH
        self.handler = FaultHandler()
        self.smtp = SMTPServer(handler=self.handler)
        self.redis = RedisServer(extra_args=redis_args, data_dir=workdir / "redis")
        self.timeout = timeout
        self.settings = {**SETTINGS, **settings}
        self.workers: list[WorkerProcess] = []
        #: Why workers exited on their own (each was restarted by :meth:`supervise`).
        self.crashes: list[str] = []
        self._ended: set[int] = set()
        self.env: dict[str, str] = {}
        self.started = 0.0
        self.subjects = [f"{name} {n:03d}" for n in range(self.messages)]
        self._parsed: list[tuple[str, str]] = []
        self._client: redis.Redis | None = None

    # -- life cycle -------------------------------------------------------------------

    def __enter__(self) -> Rig:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.smtp.start()
        self.redis.start()
        self._client = self.redis.client(socket_timeout=1.0, socket_connect_timeout=1.0)
        url = smtp_url(self.smtp.port, scheme="smtp", timeout=self.timeout, max_messages=1000)
        self.env = worker_env(self.redis.url, {"default": url}, **self.settings)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for worker in self.workers:
            if worker.running:
                worker.kill()
        if self._client is not None:
            self._client.close()
        self.smtp.stop()
        self.redis.stop()

    def start_worker(self) -> WorkerProcess:
        """Start one more ``mailworker worker`` (logging to ``<name>-<n>.log``)."""
        index = len(self.workers)
        worker = WorkerProcess(
            self.env,
            self.workdir / f"{self.name}-{index}.log",
            concurrency=CONCURRENCY,
            name=f"{self.name}{index}",
        )
        self.workers.append(worker)
        return worker.start()

    def stop_worker(self, worker: WorkerProcess) -> int:
        """Warm shutdown (SIGTERM) of ``worker``, on purpose; returns its exit status."""
        self._ended.add(id(worker))
        return worker.stop()

    def kill_worker(self, worker: WorkerProcess) -> None:
        """SIGKILL ``worker``'s whole process group, on purpose."""
        self._ended.add(id(worker))
        worker.kill()

    def supervise(self) -> None:
        """Restart a worker that exited on its own, as systemd's ``Restart=always`` or
        Kubernetes would; note why it exited in :attr:`crashes`."""
        for worker in list(self.workers):
            if id(worker) in self._ended or worker.running:
                continue
            self._ended.add(id(worker))
            lines = worker.output(since_start=True).splitlines()
            fatal = [line for line in lines if "Unrecoverable error" in line]
            self.crashes.append((fatal or lines[-1:] or ["(no output)"])[0][:300])
            self.start_worker()

    def hold_restore_lock(self) -> float:
        """Take kombu's restore lock as a worker killed in its sweep leaves it: with
        the expiry that worker's configuration gives it (kombu's default 300 s unless
        configured). Returns that expiry."""
        app = configure(Celery("killed", set_as_current=False), Settings.from_env(self.env))
        expire = float(app.conf.broker_transport_options.get("unacked_mutex_expire", 300))
        assert self._client is not None
        self._client.set("unacked_mutex", "killed-worker", px=int(expire * 1000))
        return expire

    def publish(self) -> None:
        """Publish the batch (one ``send_mail.delay`` per message); the clock starts."""
        with producer(self.env):
            self.started = time.monotonic()
            for n, subject in enumerate(self.subjects):
                send_mail.delay(to=f"user{n}@example.org", subject=subject, text=f"message {n}")

    # -- observing --------------------------------------------------------------------

    def accepted(self) -> list[tuple[str, str]]:
        """(subject, Message-ID) of every copy the server accepted, oldest first."""
        messages = list(self.handler.messages)
        for message in messages[len(self._parsed) :]:
            headers = _parser.parsebytes(message.content)
            self._parsed.append((str(headers["Subject"]), str(headers["Message-ID"])))
        return list(self._parsed)

    def wait_accepted(self, count: int, timeout: float = 20.0) -> None:
        """Wait until the server accepted ``count`` copies."""
        self.handler.wait_for_messages(count, timeout)

    def wait_mid_send(self, timeout: float = 10.0) -> int:
        """Wait until the next RCPT reaches the server: a message is mid-send (its
        sender waits for the reply, the server's RCPT is slowed by ``PACE``); returns
        the client port of its connection."""
        self.handler.wait_for_count("RCPT", self.handler.counts["RCPT"] + 1, timeout)
        return self.handler.rcpt_port

    def pool_processes(self, worker: WorkerProcess) -> list[int]:
        """The prefork pool processes of ``worker`` (children of its main process)."""
        children = Path(f"/proc/{worker.pid}/task/{worker.pid}/children")
        return [int(pid) for pid in children.read_text().split()]

    def sender_of(self, port: int, worker: WorkerProcess) -> int:
        """The pool process of ``worker`` whose SMTP connection has client port ``port``
        (found through ``/proc/net/tcp`` and the processes' file descriptors)."""
        sockets = set()
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(f.rsplit(":", 1)[1], 16) for f in fields[1:3])
            if (local, remote) == (port, self.smtp.port):
                sockets.add(f"socket:[{fields[9]}]")
        for pid in self.pool_processes(worker):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) in sockets:
                        return pid
        raise LookupError(f"no pool process of {worker.pid} has the connection from {port}")

    def kill_sender(self, worker: WorkerProcess) -> int:
        """SIGKILL the pool process of ``worker`` that is mid-send; returns its pid."""
        pid = self.sender_of(self.wait_mid_send(), worker)
        os.kill(pid, signal.SIGKILL)
        return pid

    @contextlib.contextmanager
    def storm(self, seconds: float, clear: Callable[[], None]) -> Iterator[None]:
        """Run the block (which sets a fault), wait ``seconds``, then ``clear()``."""
        try:
            yield
            time.sleep(seconds)
        finally:
            clear()

    def _dead_subjects(self) -> set[str]:
        assert self._client is not None
        return {r.subject or "" for r in DeadLetterStore(self._client).list()}

    def _settled(self) -> bool:
        """Every message accepted or dead-lettered, and nothing left to run."""
        assert self._client is not None
        try:
            done = {s for s, _ in self.accepted()} | self._dead_subjects()
            return (
                done >= set(self.subjects)
                and RetrySchedule(self._client).pending() == 0
                and self._client.llen(QUEUE) == 0
                and self._client.hlen(UNACKED) == 0
            )
        except redis.RedisError:
            return False  # Redis is restarting

    def drain(self, timeout: float = DRAIN_TIMEOUT, **detail: Any) -> Result:
        """Wait until :meth:`_settled` (or ``timeout`` seconds after the publish), stop
        the workers warmly, and count (``detail`` goes into the result)."""
        deadline = self.started + timeout
        while not (drained := self._settled()) and time.monotonic() < deadline:
            self.supervise()
            time.sleep(0.05)
        seconds = time.monotonic() - self.started
        self.supervise()  # a crash in the last moments counts too
        for worker in self.workers:
            if worker.running:
                self.stop_worker(worker)
        return self.result(seconds=seconds, drained=drained, **detail)

    def result(self, *, seconds: float, drained: bool, **detail: Any) -> Result:
        """Count what the server accepted and what the dead-letter store holds."""
        copies = self.accepted()
        by_id = Counter(message_id for _, message_id in copies)
        ids_of: dict[str, set[str]] = {}
        for subject, message_id in copies:
            ids_of.setdefault(subject, set()).add(message_id)
        sent = set(ids_of) & set(self.subjects)
        dead = self._dead_subjects() & set(self.subjects)
        deferred = [e for w in self.workers for e in w.events("mail.deferred")]
        in_doubt = [e for e in deferred if e.get("in_doubt") or "in doubt" in str(e.get("error"))]
        counts = self.handler.counts
        return Result(
            scenario=self.name,
            messages=self.messages,
            sent=len(sent),
            dead_lettered=len(dead - sent),
            lost=len(set(self.subjects) - sent - dead),
            duplicates=sum(n - 1 for n in by_id.values()),
            in_doubt=len(in_doubt),
            seconds=round(seconds, 2),
            drained=drained,
            crashes=len(self.crashes),
            split_ids=sum(1 for ids in ids_of.values() if len(ids) > 1),
            detail={
                "connections": counts["connections"],
                # MAIL commands refused, cut short or given up on (one RCPT per message).
                "mail_refused": counts["MAIL"] - counts["RCPT"],
                "dropped_after_data": counts["dropped_after_data"],
                "duplicated": sorted(s for s, n in Counter(s for s, _ in copies).items() if n > 1),
                "crashes": list(self.crashes),
                "vanished": self._vanished(set(self.subjects) - sent - dead),
                **detail,
            },
        )

    def _vanished(self, lost: set[str]) -> int:
        """How many ``lost`` messages Redis no longer holds anywhere: neither queued,
        unacknowledged, nor scheduled for a retry — gone in kombu's window between
        taking a message off the queue and recording it as unacknowledged
        (celery/kombu#305), which a SIGKILL of the worker's main process can hit."""
        if not lost or self._client is None:
            return 0
        try:
            held = [
                *self._client.lrange(QUEUE, 0, -1),
                *self._client.hvals(UNACKED),
                *self._client.hvals(keys.retry_task()),
            ]
        except Exception:  # Redis already stopped: nothing to tell
            return 0
        text = "".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in held)
        return sum(1 for subject in lost if subject not in text)
