"""A real ``mailworker worker`` subprocess for end-to-end tests, and its producer side.

- :func:`worker_env` builds the worker's environment (``MAILWORKER_*`` only from the
  arguments, never from the test process's own environment);
- :class:`WorkerProcess` starts ``mailworker worker`` in its own process group with
  stdout and stderr captured to one file, waits for "ready", stops it warmly (SIGTERM)
  or kills the whole group (SIGKILL), and reads its JSON log lines back;
- :func:`producer` configures a fresh Celery app from the same environment and makes
  it the current app, so ``send_mail.delay(...)`` from :mod:`mailworker.worker.tasks` publishes
  to this test's broker. mailworker's own app reads its configuration once, at import;
  a fresh app per test also gets a fresh broker connection pool.

Nothing here imports pytest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from celery import Celery

from mailworker.worker import app as worker_app
from mailworker.worker.app import configure
from mailworker.worker.settings import Settings
from mailworker.worker.tasks import send_mail
from tests.servers import SMTPServer

#: Settings every end-to-end test starts from (seconds): short retry delays, a task
#: time limit below half the visibility timeout.
BASE_SETTINGS: Mapping[str, str] = {
    "MAILWORKER_DEFAULT_FROM": "App <app@example.com>",
    "MAILWORKER_RETRY_DELAYS": "1,1,2",
    "MAILWORKER_RETRY_JITTER": "0",
    "MAILWORKER_MAX_AGE": "60",
    "MAILWORKER_VISIBILITY_TIMEOUT": "10",
    "MAILWORKER_TASK_TIME_LIMIT": "4",
    "MAILWORKER_LOG_FORMAT": "json",
    # The tests read task results.
    "MAILWORKER_RESULTS": "1",
}
#: Fields every terminal event (mail.sent, mail.deferred, mail.dead_lettered) carries.
TERMINAL_FIELDS = (
    "message_id",
    "task_id",
    "profile",
    "attempt",
    "duration_ms",
    "reply",
    "transcript",
)


def worker_env(broker_url: str, smtp_urls: Mapping[str, str], **settings: str) -> dict[str, str]:
    """The worker's environment: this process's minus every ``MAILWORKER_*`` variable,
    plus :data:`BASE_SETTINGS`, the broker, the profiles and ``settings``.

    Args:
        broker_url: ``MAILWORKER_BROKER_URL`` (also the dead-letter/idempotency store).
        smtp_urls: profile name -> URL (``"default"`` -> ``MAILWORKER_SMTP_URL``).
        settings: more variables, e.g. ``MAILWORKER_MAX_AGE="5"``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env.update(BASE_SETTINGS)
    env["MAILWORKER_BROKER_URL"] = broker_url
    env.update(profile_vars(smtp_urls))
    env.update(settings)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def profile_vars(smtp_urls: Mapping[str, str]) -> dict[str, str]:
    """``MAILWORKER_SMTP_URL[_<NAME>]`` variables for profile name -> URL."""
    return {
        "MAILWORKER_SMTP_URL" + ("" if name == "default" else "_" + name.upper()): url
        for name, url in smtp_urls.items()
    }


def mailworker_executable() -> str:
    """The ``mailworker`` console script of the running interpreter's environment."""
    beside = Path(sys.executable).parent / "mailworker"
    if beside.exists():
        return str(beside)
    found = shutil.which("mailworker")
    if found is None:
        raise FileNotFoundError("no mailworker executable; pip install -e . first")
    return found


class WorkerProcess:
    """``mailworker worker --pool prefork`` in its own process group.

    stdout and stderr go to :attr:`log_path`, or stderr alone to :attr:`stderr_path`
    when one is given (Celery prints its banner on stdout, logs on stderr). Files are
    appended to, so a worker started again with the same paths keeps one record.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        log_path: str | os.PathLike[str],
        *,
        stderr_path: str | os.PathLike[str] | None = None,
        concurrency: int = 2,
        name: str = "mw",
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.env = dict(env)
        self.log_path = Path(log_path)
        self.stderr_path = Path(stderr_path) if stderr_path is not None else None
        self.concurrency = concurrency
        self.name = name
        self.extra_args = extra_args
        self.process: subprocess.Popen[bytes] | None = None
        self._starts: dict[Path, int] = {}

    @property
    def pid(self) -> int:
        """The main process id (also the process group id)."""
        assert self.process is not None, "the worker is not started"
        return self.process.pid

    @property
    def running(self) -> bool:
        """Whether the main process is alive."""
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 30.0) -> WorkerProcess:
        """Start the worker and wait for Celery's "ready" line in its output.

        Raises:
            RuntimeError: the worker exited or was not ready in ``timeout`` seconds
                (its output is in the message).
        """
        if self.running:
            raise RuntimeError("the worker is already running")
        command = [
            mailworker_executable(),
            "worker",
            "--pool", "prefork",
            "--concurrency", str(self.concurrency),
            "--loglevel", "INFO",
            "--hostname", f"{self.name}-{os.getpid()}-{time.monotonic_ns()}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *self.extra_args,
        ]  # fmt: skip
        self._starts = {p: _size(p) for p in self._paths()}
        with contextlib.ExitStack() as files:
            log = files.enter_context(self.log_path.open("ab"))
            err: Any = subprocess.STDOUT
            if self.stderr_path is not None:
                err = files.enter_context(self.stderr_path.open("ab"))
            self.process = subprocess.Popen(
                command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=err,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while b" ready." not in self.output_bytes(since_start=True):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"worker exited with {self.process.returncode} before it was ready:\n"
                    + self.output(since_start=True)[-4000:]
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"worker not ready after {timeout}s:\n" + self.output(since_start=True)[-4000:]
                )
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 20.0) -> int:
        """Warm shutdown: SIGTERM to the main process, wait for the whole group.

        Returns:
            The main process's exit status.

        Raises:
            RuntimeError: it did not exit in ``timeout`` seconds (it is killed then).
        """
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise RuntimeError(f"worker did not stop within {timeout}s of SIGTERM") from None
        self._wait_for_group(timeout)
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group (main process and pool children) and reap it."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._wait_for_group(10.0)

    def _wait_for_group(self, timeout: float) -> None:
        """Wait until no live process of the worker's group is left (pool children
        exit after their parent; a killed group's children are reaped by init)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _live_group_members(self.process.pid):
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def _paths(self) -> list[Path]:
        return [self.log_path] + ([self.stderr_path] if self.stderr_path is not None else [])

    def output_bytes(self, *, since_start: bool = False) -> bytes:
        """Every byte the worker wrote so far: the log file, then the stderr file if
        separate; ``since_start``: only what the latest :meth:`start` wrote."""
        chunks = []
        for path in self._paths():
            data = path.read_bytes() if path.exists() else b""
            chunks.append(data[self._starts.get(path, 0) :] if since_start else data)
        return b"".join(chunks)

    def stderr_bytes(self) -> bytes:
        """Everything written to stderr (only with a separate :attr:`stderr_path`)."""
        if self.stderr_path is None:
            raise ValueError("stderr goes to the log file; pass stderr_path to separate it")
        return self.stderr_path.read_bytes() if self.stderr_path.exists() else b""

    def output(self, *, since_start: bool = False) -> str:
        """:meth:`output_bytes` decoded (invalid bytes replaced)."""
        return self.output_bytes(since_start=since_start).decode("utf-8", "replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The structlog JSON lines of the log file, optionally only event ``name``."""
        return [e for e in json_lines(self.output()) if name is None or e.get("event") == name]

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        if self.running:
            try:
                self.stop()
            except RuntimeError:
                self.kill()


def _live_group_members(pgid: int) -> list[int]:
    """Processes of group ``pgid`` that are not zombies (a zombie whose parent died
    waits for init to reap it, which a container's PID 1 may never do)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: ask the kernel whether the group exists
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return []
        return [pgid]
    members = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of ``text`` that is a JSON object (others are skipped)."""
    events = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                events.append(value)
    return events


@contextlib.contextmanager
def producer(env: Mapping[str, str]) -> Iterator[Celery]:
    """A Celery app configured from ``env`` exactly as the worker's.

    Inside the block ``mailworker.send_mail.delay(...)`` publishes through it (configure()
    makes an app the publishing one) to ``env``'s broker, and results come back from it.
    The previous publishing app is restored and the app's connections are closed after.
    """
    previous = list(worker_app._publishing)
    app = configure(
        Celery("mailworker-test-producer", set_as_current=False), Settings.from_env(env)
    )
    try:
        yield app
    finally:
        worker_app._publishing[:] = previous
        app.close()


def publish(count: int, prefix: str) -> list[str]:
    """``send_mail.delay`` ``count`` messages with subjects ``"<prefix> <n>"`` (inside
    :func:`producer`); returns their task ids."""
    return [
        send_mail.delay(
            to=f"user{n}@example.org", subject=f"{prefix} {n:03d}", text=f"message {n}"
        ).id
        for n in range(count)
    ]


def subjects(server: SMTPServer) -> Counter[str]:
    """How many copies of each subject the server accepted."""
    return Counter(str(m.parsed()["Subject"]) for m in list(server.handler.messages))
