"""A private ``redis-server`` subprocess on 127.0.0.1 for the tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailworker.dev.server import free_port
from tests.servers.base import LOCALHOST, Service

if TYPE_CHECKING:
    import redis


class RedisServer(Service):
    """A private ``redis-server`` subprocess on 127.0.0.1 (no persistence unless
    ``extra_args`` turn it on and ``data_dir`` keeps the files across restarts)."""

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = LOCALHOST,
        executable: str = "redis-server",
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Configure the server (nothing starts until :meth:`start`).

        Args:
            port: Port to bind; default a free one (kept across restarts).
            host: Address to bind.
            executable: ``redis-server`` name or path.
            startup_timeout: Seconds to wait for PING to answer.
            extra_args: More ``redis-server`` arguments, e.g. ``("--maxmemory", "1mb")``
                or ``("--appendonly", "yes")``.
            data_dir: Working directory (AOF, RDB, log), kept across restarts and not
                deleted; default a temporary one per start, deleted at stop.
        """
        self.host = host
        self.port = port if port is not None else 0
        self.executable = executable
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self._port_fixed = port is not None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._process: subprocess.Popen[bytes] | None = None
        self._directory: Path | None = None

    def __repr__(self) -> str:
        return f"<RedisServer {self.url}>"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """URL of database ``db`` on this server."""
        return f"redis://{self.host}:{self.port}/{db}"

    @property
    def running(self) -> bool:
        """Whether the subprocess is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Process id of the running server."""
        return self._process.pid if self._process is not None else None

    def client(self, db: int = 0, **kwargs: Any) -> redis.Redis:
        """Return a new ``redis.Redis`` for database ``db`` (close it when done)."""
        import redis  # noqa: PLC0415 - only Redis users need redis-py

        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 5.0)
        return redis.Redis(host=self.host, port=self.port, db=db, **kwargs)

    def _log_tail(self) -> str:
        if self._directory is None:
            return ""
        with contextlib.suppress(OSError):
            return (self._directory / "redis.log").read_text(errors="replace")[-2000:]
        return ""

    def _launch(self) -> bool:
        """Start the process and wait for PING; False if it died (port taken?)."""
        import redis  # noqa: PLC0415

        executable = shutil.which(self.executable)
        if executable is None:
            raise FileNotFoundError(f"{self.executable!r} not found; apt-get install redis-server")
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._directory = self.data_dir
        else:
            self._directory = Path(tempfile.mkdtemp(prefix="mailworker-redis-"))
        command = [
            executable,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._directory),
            "--daemonize", "no",
            "--databases", "16",
            "--loglevel", "warning",
            "--logfile", str(self._directory / "redis.log"),
            *self.extra_args,
        ]  # fmt: skip
        self._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + self.startup_timeout
        probe = self.client(socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            while True:
                if self._process.poll() is not None:
                    return False
                try:
                    if probe.ping():
                        return True
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"redis-server did not answer PING in {self.startup_timeout}s\n"
                        f"{self._log_tail()}"
                    )
                time.sleep(0.01)
        finally:
            probe.close()

    def start(self) -> RedisServer:
        """Start the server and wait until it answers PING; return self.

        Raises:
            FileNotFoundError: No ``redis-server`` executable.
            RuntimeError: It exited (log tail in the message).
            TimeoutError: It did not answer in ``startup_timeout`` seconds.
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        for attempt in range(5):
            if not self._port_fixed:
                self.port = free_port(self.host)
            try:
                started = self._launch()
            except BaseException:
                self.stop()
                raise
            if started:
                self._port_fixed = True
                return self
            log = self._log_tail()
            self.stop()
            if self._port_fixed or attempt == 4:
                raise RuntimeError(f"redis-server exited during start:\n{log}")
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Terminate the server and delete its directory (idempotent)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(5.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._directory is not None:
            if self._directory != self.data_dir:
                shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, wait ``down_for`` seconds, start again on the same port (data is lost
        unless persistence is on and ``data_dir`` is given)."""
        self.stop()
        if down_for > 0:
            time.sleep(down_for)
        self.start()
