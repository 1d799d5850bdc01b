"""benchmarks/perf.py's process bookkeeping: what it started, and what /proc says of it.

Every process perf.py starts is registered here and stopped by :func:`stop_all`
(SIGTERM to its process group, then SIGKILL), which perf.py runs in a ``finally``
and at exit, also after Ctrl-C.
"""

# ruff: noqa: S603 -- every command run here is built from fixed paths and our own values

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_started: list[subprocess.Popen[bytes]] = []
_stoppers: list[Callable[[], None]] = []


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound, read and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, what: str, alive: Callable[[], bool]) -> None:
    """Wait until something accepts on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        if not alive():
            raise RuntimeError(f"{what} exited before listening on port {port}")
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:g} s")


def spawn(
    command: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own process group, output to ``log``; registered."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _started.append(process)
    return process


def on_stop(stopper: Callable[[], None]) -> None:
    """Run ``stopper`` (no exceptions raised) in :func:`stop_all`."""
    _stoppers.append(stopper)


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM the process group, wait, SIGKILL what is left; reap."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    # Children (pool processes, Postfix daemons) may outlive the leader.
    deadline = time.monotonic() + timeout
    while group_members(process.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)
    if process in _started:
        _started.remove(process)


def stop_all() -> None:
    """Stop everything registered, newest first."""
    while _stoppers:
        with contextlib.suppress(Exception):
            _stoppers.pop()()
    for process in reversed(list(_started)):
        with contextlib.suppress(Exception):
            stop(process)


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces.
    return raw[raw.rindex(")") + 2 :].split()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            # fields[0] is the state (field 3), fields[2] the pgrp (field 5).
            if fields and fields[2] == str(pgid) and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    """``pid`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def cpu_seconds(pids: Iterable[int], *, reaped: bool = True) -> float:
    """user + system time of ``pids``; with ``reaped`` also of their waited-for children."""
    total = 0
    for pid in pids:
        fields = _stat(pid)
        if fields:
            # utime, stime, cutime, cstime are fields 14-17 (index 11-14 here).
            total += int(fields[11]) + int(fields[12])
            if reaped:
                total += int(fields[13]) + int(fields[14])
    return total / _TICK


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid``, its live descendants and the children they reaped."""
    return cpu_seconds(descendants(pid))


def busiest(pid: int) -> dict[int, float]:
    """CPU seconds of each process in ``pid``'s tree (own time only), by pid."""
    return {p: cpu_seconds([p], reaped=False) for p in descendants(pid)}


def tree_rss(pid: int) -> int:
    """Resident set size in bytes of ``pid`` and its live descendants."""
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * _PAGE
    return total
