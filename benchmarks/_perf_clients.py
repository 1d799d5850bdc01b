"""The SMTP clients benchmarks/perf.py compares, each sending ``n`` messages.

Each client takes a :class:`Clock`: it connects and sends a few warm-up messages,
calls ``clock.start()``, sends ``n`` messages, calls ``clock.stop()`` and only then
closes. Whoever measures reads counters in ``start``/``stop``.
"""

# ruff: noqa: S603 -- every command run here is built from fixed paths and our own values

from __future__ import annotations

import json
import os
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _perf_servers import PASSWORD, USER

from mailworker import Profile, SMTPSession

SENDER, RECIPIENT = "app@example.com", "ann@example.org"
EHLO_NAME = "bench.example"
WARM_UP = 5
HERE = Path(__file__).resolve().parent
NODEMAILER = "nodemailer"


def message(n: int = 0, size: int = 2048) -> bytes:
    """A plain-text message of about ``size`` bytes."""
    head = (
        f"From: App <{SENDER}>\r\nTo: <{RECIPIENT}>\r\nSubject: perf {n}\r\n"
        f"Message-ID: <{n}.{os.getpid()}@bench.example>\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


@dataclass
class Target:
    """Where a client connects: through the proxy or not, with or without TLS+AUTH."""

    port: int
    tls: bool
    ca_file: str

    def profile(self, n: int) -> Profile:
        query = f"local_hostname={EHLO_NAME}&max_messages={n + WARM_UP + 10}"
        if self.tls:
            return Profile.from_url(
                f"smtp+starttls://{USER}:{PASSWORD}@127.0.0.1:{self.port}"
                f"?ca_file={self.ca_file}&{query}"
            )
        return Profile.from_url(f"smtp://127.0.0.1:{self.port}?{query}")

    def smtplib(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname=EHLO_NAME, timeout=60)
        if self.tls:
            client.starttls(context=ssl.create_default_context(cafile=self.ca_file))
            client.login(USER, PASSWORD)
        return client


class Clock:
    """Called by a client around its measured part."""

    def __init__(self, start: Callable[[], None], stop: Callable[[], None]) -> None:
        self.start, self.stop = start, stop
        #: A child process doing the sending (its CPU is the client's), if any.
        self.pid: int | None = None


Client = Callable[[Target, int, Clock], None]


def mailworker_send(target: Target, n: int, clock: Clock) -> None:
    data = message()
    with SMTPSession(target.profile(n)) as session:
        for _ in range(WARM_UP):
            session.send(SENDER, [RECIPIENT], data)
        clock.start()
        for _ in range(n):
            session.send(SENDER, [RECIPIENT], data)
        clock.stop()


def mailworker_send_many(target: Target, n: int, clock: Clock) -> None:
    data = message()
    with SMTPSession(target.profile(n)) as session:
        for _ in range(WARM_UP):
            session.send(SENDER, [RECIPIENT], data)
        items = [(SENDER, [RECIPIENT], data)] * n
        clock.start()
        results = session.send_many(items)  # type: ignore[attr-defined]
        clock.stop()
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"send_many: {len(failed)} of {n} failed, e.g. {failed[0]!r}")


def smtplib_held(target: Target, n: int, clock: Clock) -> None:
    data = message()
    with target.smtplib() as client:
        for _ in range(WARM_UP):
            client.sendmail(SENDER, [RECIPIENT], data)
        clock.start()
        for _ in range(n):
            client.sendmail(SENDER, [RECIPIENT], data)
        clock.stop()


def smtplib_new_connection(target: Target, n: int, clock: Clock) -> None:
    data = message()
    for _ in range(WARM_UP):
        with target.smtplib() as client:
            client.sendmail(SENDER, [RECIPIENT], data)
    clock.start()
    for _ in range(n):
        with target.smtplib() as client:
            client.sendmail(SENDER, [RECIPIENT], data)
    clock.stop()


# -- Nodemailer ------------------------------------------------------------------


def nodemailer_dir() -> Path | str:
    """node_modules holding nodemailer (installed once into a cache), or why not."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        return f"{'node' if node is None else 'npm'} not found"
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    prefix = cache / "mailworker-bench" / "node"
    modules = prefix / "node_modules"
    if (modules / "nodemailer" / "package.json").exists():
        return modules
    prefix.mkdir(parents=True, exist_ok=True)
    print(f"installing {NODEMAILER} into {prefix} ...", flush=True)
    done = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), NODEMAILER],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0 or not (modules / "nodemailer").exists():
        return "npm install nodemailer failed: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    return modules


def nodemailer_pool(modules: Path) -> Client:
    """Nodemailer's pooled transport, one connection, in a node child process."""

    def run(target: Target, n: int, clock: Clock) -> None:
        config = {
            "port": target.port,
            "tls": target.tls,
            "user": USER,
            "password": PASSWORD,
            "ca": target.ca_file,
            "messages": n,
            "warmUp": WARM_UP,
            "message": message().decode(),
        }
        process = subprocess.Popen(
            [shutil.which("node") or "node", str(HERE / "perf_nodemailer.js")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "NODE_PATH": str(modules)},
        )
        try:
            assert process.stdin is not None
            assert process.stdout is not None
            process.stdin.write(json.dumps(config) + "\n")
            process.stdin.flush()
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("nodemailer: no 'ready'")
            clock.pid = process.pid
            clock.start()
            process.stdin.write("go\n")
            process.stdin.flush()
            if process.stdout.readline().strip() != "done":
                raise RuntimeError("nodemailer: no 'done'")
            clock.stop()
            process.stdin.close()
            process.wait(30)
            if process.returncode:
                raise RuntimeError(f"nodemailer exited with {process.returncode}")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    return run
