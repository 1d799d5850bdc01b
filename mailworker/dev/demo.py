"""``mailworker demo``: the whole pipeline on this machine, with no SMTP account.

It starts a private ``redis-server`` on a free port, a :class:`~mailworker.dev.server.DevServer`
on 127.0.0.1 with STARTTLS, AUTH and a certificate made for it, and a real
``mailworker worker`` subprocess (2 processes), then enqueues a batch of
``send_mail`` tasks — one message with an attachment, one to an address the server
rejects (550), one it greylists once (451) — and reports what really happened: the
messages read back from the server's maildir, a transcript from the worker's
``mail.sent`` log event, how many connections carried them, and ``mailworker dlq list``.
Everything is stopped at the end, also on failure or Ctrl-C.

Enqueueing publishes through mailworker's one producer (:mod:`mailworker.queue.producer`)
to the private broker.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from secrets import token_urlsafe
from typing import Any

import redis

from mailworker.dev.server import Counters, DevServer, free_port
from mailworker.errors import MailworkerError
from mailworker.queue.names import SEND_MAIL
from mailworker.store.client import redis_client
from mailworker.store.deadletter import DeadLetterStore
from mailworker.store.schedule import RetrySchedule
from mailworker.worker.settings import Settings

#: Recipients the demo's server treats specially (``fnmatch`` patterns).
REJECTED = "nobody@bounce.example"
GREYLISTED = "greylisted@example.org"
WITH_ATTACHMENT = "accounts@example.org"
ATTACHMENT_NAME = "invoice-1001.csv"
ATTACHMENT = b"item,amount\r\nmailworker subscription,0.00\r\n"

Echo = Callable[[str], None]


class DemoError(MailworkerError):
    """The demo could not finish; the message says why."""


@dataclass(frozen=True)
class DemoReport:
    """What the demo saw: messages enqueued, found in the maildir and dead-lettered, the
    server's counters (connections, TLS sessions, AUTHs, QUITs) and the wall time."""

    enqueued: int
    delivered: int
    dead_lettered: int
    counters: Counters
    seconds: float


def mailworker_command() -> list[str]:
    """How to run this installation's ``mailworker`` CLI in a subprocess."""
    script = Path(sys.executable).parent / "mailworker"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from mailworker.cli import main; main()"]


def batch(count: int) -> list[dict[str, Any]]:
    """``send_mail`` keyword arguments for ``count`` messages (at least 3)."""
    messages: list[dict[str, Any]] = [
        {
            "to": WITH_ATTACHMENT,
            "subject": "Your invoice #1001",
            "text": "Please find your invoice attached.",
            "attachments": [
                {"filename": ATTACHMENT_NAME, "content": base64.b64encode(ATTACHMENT).decode()}
            ],
        },
        {"to": REJECTED, "subject": "This one bounces", "text": "The server refuses it."},
        {"to": GREYLISTED, "subject": "Greylisted once", "text": "Deferred, then delivered."},
    ]
    for i in range(1, count - len(messages) + 1):
        messages.append(
            {
                "to": f"Reader {i} <user{i:02d}@example.org>",
                "subject": f"Welcome, reader {i}",
                "text": f"Hello reader {i}, welcome aboard.",
                "html": f"<p>Hello reader {i}, <b>welcome aboard</b>.</p>",
            }
        )
    return messages[:count]


@contextlib.contextmanager
def private_redis(directory: Path, timeout: float = 10.0) -> Iterator[str]:
    """A ``redis-server`` on a free port of 127.0.0.1, without persistence; yields its URL."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise DemoError("redis-server not found on PATH (Debian: apt-get install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
        "no", "--dir", str(directory), "--daemonize", "no", "--logfile", str(directory / "log"),
    ]  # fmt: skip
    process = subprocess.Popen(  # noqa: S603 -- our own argv, no shell
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_for_ping(url, process, timeout, directory / "log")
        yield url
    finally:
        _stop(process, signal.SIGTERM, 5.0)


def _wait_for_ping(url: str, process: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
    deadline = time.monotonic() + timeout
    with contextlib.closing(client):
        while True:
            with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                if client.ping():
                    return
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-300:] if log.exists() else ""
                raise DemoError(f"redis-server did not start: {' '.join(tail.split())}")
            time.sleep(0.02)


class Worker:
    """``mailworker worker`` in its own process group, output captured to a file."""

    def __init__(self, env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        command = [
            *mailworker_command(), "worker", "--concurrency", "2", "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--hostname", f"demo-{os.getpid()}@%h",
        ]  # fmt: skip
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(  # noqa: S603 -- our own argv, no shell
                command,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def check_alive(self) -> None:
        """Raise :class:`DemoError` with the log's last line if the worker exited."""
        if self.process.poll() is not None:
            lines = self.log_path.read_text(errors="replace").strip().splitlines() or [""]
            raise DemoError(f"the worker exited ({self.process.returncode}): {lines[-1]}")

    def stop(self, timeout: float = 20.0) -> int:
        """Warm shutdown (SIGTERM: running tasks finish, sessions say QUIT); returns the
        exit status. Anything left of its process group is killed."""
        status = _stop(self.process, signal.SIGTERM, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)  # pool children, if any are left
        return status


def enqueue(env: Mapping[str, str], messages: list[dict[str, Any]]) -> None:
    """Publish a ``send_mail`` task for each message to ``env``'s broker, as
    ``send_mail.delay(**kwargs)`` would (nothing waits for the results)."""
    from mailworker.queue.producer import Producer, producer_app  # noqa: PLC0415 -- Celery

    producer = Producer(producer_app(Settings.from_env(env).broker_url))
    for kwargs in messages:
        producer.publish(SEND_MAIL, kwargs, store_result=False)


def run_demo(
    *, messages: int = 20, timeout: float = 45.0, keep: bool = False, echo: Echo = print
) -> DemoReport:
    """Run the demo, printing as it goes; everything started is stopped before it returns
    (also on KeyboardInterrupt: make SIGTERM raise it to be safe from that too).

    Raises:
        DemoError: something did not work; the message says what (and where the worker
            log and the maildir were kept).
    """
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="mailworker-demo-"))
    try:
        with contextlib.ExitStack() as stack:
            report = _run(stack=stack, workdir=workdir, count=messages, timeout=timeout, echo=echo)
    except Exception as exc:
        reason = str(exc) if isinstance(exc, DemoError) else f"{type(exc).__name__}: {exc}"
        if (workdir / "worker.log").exists():
            reason += f" (worker log and maildir kept in {workdir})"
        else:
            shutil.rmtree(workdir, ignore_errors=True)
        raise DemoError(reason) from exc
    except BaseException:  # Ctrl-C: stopped everything above, now tidy up
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    report = dataclasses.replace(report, seconds=time.monotonic() - started)
    echo(f"\nDone in {report.seconds:.1f} s; Redis, the SMTP server and the worker are stopped.")
    if keep:
        echo(f"Files kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _run(
    *,
    stack: contextlib.ExitStack,
    workdir: Path,
    count: int,
    timeout: float,
    echo: Echo,
) -> DemoReport:
    redis_url = stack.enter_context(private_redis(workdir / "redis"))
    server = DevServer(
        workdir / "maildir",
        port=0,
        tls="starttls",
        auth=("demo", token_urlsafe(12)),
        reject=["*@bounce.example"],
        defer_once=[GREYLISTED],
    )
    stack.enter_context(server)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env.update(
        MAILWORKER_BROKER_URL=redis_url,
        MAILWORKER_REDIS_URL=redis_url,
        MAILWORKER_SMTP_URL=server.url(),
        MAILWORKER_DEFAULT_FROM="mailworker demo <demo@example.com>",
        MAILWORKER_RETRY_DELAYS="1",
        MAILWORKER_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    worker = Worker(env, workdir / "worker.log")
    stack.callback(worker.stop)
    echo("mailworker demo: Redis, an SMTP server and a worker, all on this machine")
    echo(f"  Redis        {redis_url} (private, no persistence)")
    echo(f"  SMTP server  {server.url(redact=True)}")
    echo("               STARTTLS with its own certificate, AUTH required; rejects")
    echo(f"               *@bounce.example (550), greylists {GREYLISTED} once (451)")
    echo(f"  Worker       mailworker worker --concurrency 2 (pid {worker.process.pid})")

    payloads = batch(count)
    enqueue(env, payloads)
    echo(f"\nEnqueued {len(payloads)} send_mail tasks")
    client = stack.enter_context(contextlib.closing(redis_client(redis_url)))
    delivered, dead = _wait(
        server=server,
        worker=worker,
        client=client,
        want_delivered=len(payloads) - 1,
        want_dead=1,
        timeout=timeout,
        echo=echo,
    )

    status = worker.stop()
    counters = server.counters
    if status != 0:
        raise DemoError(f"the worker exited with status {status} on SIGTERM")
    _report_messages(server, payloads, echo)
    _report_log(worker.log_path, echo)
    echo(f"\nConnection reuse: {counters.summary()}")
    if counters.quits < counters.connections:
        raise DemoError(
            f"only {counters.quits} of {counters.connections} SMTP sessions ended with QUIT"
        )
    echo(f"  on SIGTERM the worker said QUIT on all {counters.connections} sessions")
    echo(f"\nDead letters (mailworker dlq list): the 550 for {REJECTED}")
    listing = subprocess.run(  # noqa: S603 -- our own argv, no shell
        [*mailworker_command(), "dlq", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if listing.returncode != 0:
        raise DemoError(f"mailworker dlq list failed: {listing.stderr.strip()}")
    for line in listing.stdout.splitlines():
        echo(f"  {line}")
    return DemoReport(len(payloads), delivered, dead, counters, 0.0)


def _wait(
    *,
    server: DevServer,
    worker: Worker,
    client: redis.Redis,
    want_delivered: int,
    want_dead: int,
    timeout: float,
    echo: Echo,
) -> tuple[int, int]:
    """Show progress until the maildir and the dead-letter store hold what they should."""
    dlq, schedule = DeadLetterStore(client), RetrySchedule(client)
    tty = sys.stdout.isatty()
    start = time.monotonic()
    shown, last_shown = "", 0.0
    while True:
        worker.check_alive()
        delivered, dead, waiting = len(server.maildir), dlq.count(), schedule.pending()
        elapsed = time.monotonic() - start
        done = delivered >= want_delivered and dead >= want_dead
        line = (
            f"  {elapsed:4.1f} s  delivered {delivered}/{want_delivered}, "
            f"dead-lettered {dead}/{want_dead}, retries waiting {waiting}"
        )
        if tty:
            print(f"\r{line}", end="\n" if done else "", flush=True)
        elif done or (line[9:] != shown and time.monotonic() - last_shown >= 1.0):
            echo(line)
            shown, last_shown = line[9:], time.monotonic()
        if done:
            return delivered, dead
        if elapsed > timeout:
            raise DemoError(
                f"timed out after {timeout:.0f} s: {delivered} of {want_delivered} messages "
                f"delivered, {dead} of {want_dead} dead-lettered"
            )
        time.sleep(0.1)


def _report_messages(server: DevServer, payloads: list[dict[str, Any]], echo: Echo) -> None:
    """Read every message back from the maildir and check each recipient got one."""
    received: dict[str, EmailMessage] = {}
    for key in server.maildir.iterkeys():
        raw = server.maildir.get_bytes(key)
        message = BytesParser(policy=default_policy).parsebytes(raw)
        for rcpt in message.get_all("Delivered-To", []):
            received[str(rcpt)] = message
    wanted = {_addr(p["to"]) for p in payloads} - {REJECTED}
    missing = sorted(wanted - set(received))
    if missing:
        raise DemoError(f"not in the maildir: {', '.join(missing)}")
    echo(f"\nDelivered: {len(received)} messages in the server's maildir ({server.maildir_path})")
    invoice = received[WITH_ATTACHMENT]
    files = {p.get_filename(): p.get_content() for p in invoice.iter_attachments()}
    if files.get(ATTACHMENT_NAME) not in (ATTACHMENT, ATTACHMENT.decode()):
        raise DemoError(f"the message to {WITH_ATTACHMENT} arrived without {ATTACHMENT_NAME}")
    echo(
        f"  {WITH_ATTACHMENT}: {invoice['subject']!s}, "
        f"with {ATTACHMENT_NAME} ({len(ATTACHMENT)} bytes, read back intact)"
    )


def _report_log(log: Path, echo: Echo) -> None:
    """The greylisted message's two attempts and one transcript, from the worker's log."""
    sent = _events(log, "mail.sent")
    deferred = [e for e in _events(log, "mail.deferred") if GREYLISTED in e.get("recipients", ())]
    retried = [e for e in sent if GREYLISTED in e.get("accepted", ()) and e.get("attempt", 0) > 1]
    if not deferred or not retried:
        raise DemoError(f"the worker log does not show {GREYLISTED} deferred, then sent")
    said = re.search(r"server said: (.*?)(?: — |$)", str(deferred[0].get("error")))
    echo(f"  {GREYLISTED}: attempt 1 deferred ({said[1] if said else 'a 4xx reply'}),")
    echo(f"    attempt {retried[0]['attempt']} delivered after the scheduled retry")
    invoice = next((e for e in sent if WITH_ATTACHMENT in e.get("accepted", ())), None)
    if invoice is None:
        raise DemoError("the worker logged no mail.sent event for the invoice")
    session = next(iter(_events(log, "smtp.connected")), {})
    echo("\nTranscript of the invoice (from the worker's mail.sent log event):")
    echo(
        f"  session: {session.get('tls_version')} {session.get('cipher')}, "
        f"AUTH {session.get('auth_mechanism')}, greeting {session.get('greeting')!r}"
    )
    for line in invoice.get("transcript", []):
        echo(f"  {line}")


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    """The structlog JSON events called ``name`` in a worker log, oldest first."""
    events = []
    for line in log.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            event = json.loads(line) if line.startswith("{") else None
            if isinstance(event, dict) and event.get("event") == name:
                events.append(event)
    return events


def _addr(value: str) -> str:
    return value.rsplit("<", 1)[-1].rstrip(">")


def _stop(process: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    """Send ``sig`` and wait; SIGKILL after ``timeout`` seconds. Returns the exit status."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode
