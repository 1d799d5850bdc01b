"""Postfix's ``smtp-sink`` (Debian ``postfix``, installed unconfigured by ``make test``):
a very fast SMTP server with PIPELINING and DSN, no TLS, no AUTH, no CHUNKING, that
dumps each message with its envelope. Used by the Postfix, recipient-limit and DSN
tests; the ``start_sink`` fixture is in tests/conftest.py."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mailworker.dev.server import free_port
from mailworker.smtp.profile import Profile
from tests.servers.base import wait_for

SMTP_SINK = "/usr/sbin/smtp-sink"
EHLO_NAME = "client.example"


def listening_inode(port: int) -> str | None:
    """The socket inode of the LISTEN socket on 127.0.0.1:``port``, if any."""
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
            return fields[9]
    return None


def owns_socket(pid: int, inode: str) -> bool:
    """Whether process ``pid`` holds socket ``inode`` (so the listener is ours)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == f"socket:[{inode}]":
                    return True
    return False


@dataclass(frozen=True)
class Dump:
    """One transaction as smtp-sink dumped it."""

    path: Path
    helo: str
    mail_args: str
    rcpt_args: tuple[str, ...]
    #: The pseudo-random id in the Received line (also the file name suffix).
    sink_id: str
    #: The content as received, dot-unstuffed, every CR dropped (CRLF written as LF).
    content: bytes

    @classmethod
    def parse(cls, path: Path) -> Dump:
        """Split a dump file into smtp-sink's headers and the content."""
        raw = path.read_bytes()
        head, received, tail = raw.partition(b"\nReceived: ")
        assert received, f"{path}: not a complete dump: {raw[:300]!r}"
        fields: dict[str, list[str]] = {}
        for line in head.decode("ascii").split("\n"):
            name, _, value = line.partition(": ")
            fields.setdefault(name, []).append(value)
        # Received has three lines: "from ...", "\tby ... id <random>;", "\t<date>".
        _from, by, _date, rest = tail.split(b"\n", 3)
        sink_id = re.search(rb" id ([0-9a-f]+);$", by)
        assert sink_id is not None, f"{path}: no id in {by!r}"
        assert path.name.endswith(f".{sink_id.group(1).decode()}"), path
        assert rest.endswith(b"\n"), f"{path}: no empty line after the content"
        return cls(
            path=path,
            helo=fields["X-Helo-Args"][0],
            mail_args=fields["X-Mail-Args"][0],
            rcpt_args=tuple(fields.get("X-Rcpt-Args", [])),
            sink_id=sink_id.group(1).decode(),
            content=rest[:-1],
        )

    def header(self, name: str) -> str:
        """The first content header called ``name`` (one line)."""
        match = re.search(rb"^" + name.encode() + rb": (.*)$", self.content, re.MULTILINE)
        assert match is not None, f"{self.path}: no {name} header"
        return match.group(1).decode()


class SMTPSink:
    """Postfix's ``smtp-sink`` on 127.0.0.1:``port`` with ``-c``, ``-d dump_dir/m.`` and
    a 10 s idle timeout (``-t``).

    Restarting keeps the port and the dump directory (for "the server came back").
    """

    def __init__(self, port: int, dump_dir: Path, output: Path) -> None:
        self.port = port
        self.dump_dir = dump_dir
        self.output = output
        self.process: subprocess.Popen[bytes] | None = None
        #: Where the latest start's output begins in :attr:`output`.
        self._offset = 0

    def start(self, *options: str, timeout: float = 5.0) -> SMTPSink:
        """Start with ``options`` and wait until our process listens on the port."""
        if not os.access(SMTP_SINK, os.X_OK):
            raise FileNotFoundError(f"{SMTP_SINK} not found; apt-get install postfix")
        user = ["-u", "root"] if os.geteuid() == 0 else []
        command = [
            SMTP_SINK, *user, "-c", "-t", "10", "-d", f"{self.dump_dir}/m.",
            *options, f"127.0.0.1:{self.port}", "64",
        ]  # fmt: skip
        with self.output.open("ab") as out:
            self._offset = out.tell()
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=out
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"smtp-sink exited: {self.output.read_text()[-2000:]}")
            inode = listening_inode(self.port)
            if inode is not None and owns_socket(self.process.pid, inode):
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"smtp-sink not listening on {self.port} after {timeout}s")
            time.sleep(0.01)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 2 s; always reaped."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(2)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def settle(self, sessions: int, timeout: float = 5.0) -> dict[str, int]:
        """Wait until ``sessions`` sessions have ended and smtp-sink is done with them,
        then stop it; returns the counters as they were then.

        smtp-sink counts a session before it closes the socket and removes the dump file
        of an abandoned transaction; its single-threaded event loop greeting a new
        connection proves that it has finished with the old ones.
        """
        wait_for(lambda: self.counters()["sess"] >= sessions, timeout, f"{sessions} sessions")
        counters = self.counters()
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as probe:
            greeting = b""
            while not greeting.endswith(b"\n"):
                chunk = probe.recv(512)
                assert chunk, "smtp-sink closed the probe connection"
                greeting += chunk
        assert greeting.startswith(b"220 "), greeting
        self.stop()
        return counters

    def restart(self, *options: str) -> SMTPSink:
        """Stop, then start again on the same port with ``options``."""
        self.stop()
        return self.start(*options)

    def counters(self) -> dict[str, int]:
        """The latest ``-c`` counters of the latest start: sessions ended, QUITs,
        messages received."""
        text = self.output.read_bytes()[self._offset :]
        found = re.findall(rb"sess=(\d+) quit=(\d+) mesg=(\d+)", text)
        if not found:
            return {"sess": 0, "quit": 0, "mesg": 0}
        return dict(zip(("sess", "quit", "mesg"), map(int, found[-1]), strict=True))

    def dumps(self) -> list[Dump]:
        """Every dump file, parsed (read them when the server is quiet)."""
        return [Dump.parse(p) for p in sorted(self.dump_dir.iterdir())]

    def profile(self, **options: object) -> Profile:
        """A plain ``smtp://`` profile for this server (``timeout`` defaults to 5 s)."""
        query = {"local_hostname": EHLO_NAME, "timeout": 5, "max_messages": 1000, **options}
        return Profile.from_url(f"smtp://127.0.0.1:{self.port}?{urllib.parse.urlencode(query)}")


SinkFactory = Callable[..., SMTPSink]


def sink_factory(tmp_path: Path) -> tuple[SinkFactory, Callable[[], None]]:
    """``start(*options)`` starting smtp-sinks on free ports, each dumping to its own
    directory under ``tmp_path``, and ``stop_all()``."""
    sinks: list[SMTPSink] = []

    def start(*options: str) -> SMTPSink:
        index = len(sinks)
        dump_dir = tmp_path / f"dumps{index}"
        dump_dir.mkdir()
        sink = SMTPSink(free_port(), dump_dir, tmp_path / f"smtp-sink{index}.out")
        sinks.append(sink)
        return sink.start(*options)

    def stop_all() -> None:
        for sink in sinks:
            sink.stop()

    return start, stop_all
