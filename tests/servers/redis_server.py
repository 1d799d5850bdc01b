"""A private ``redis-server`` subprocess on 127.0.0.1 for the tests: clear text, or
TLS only, with or without a password or an ACL user."""

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
from urllib.parse import quote, urlencode

from mailworker.dev.server import free_port
from tests.servers.base import LOCALHOST, Service

if TYPE_CHECKING:
    import redis

    from tests.servers.tls import TLSMaterials


class RedisServer(Service):
    """A private ``redis-server`` subprocess on 127.0.0.1 (no persistence unless
    ``extra_args`` turn it on and ``data_dir`` keeps the files across restarts).

    With ``tls`` it listens for TLS only (``--port 0 --tls-port``), presenting the
    materials' good certificate (for ``localhost`` and ``127.0.0.1``) and asking no
    client certificate; :attr:`url` is then a ``rediss://`` URL that verifies it.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = LOCALHOST,
        executable: str = "redis-server",
        startup_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
        data_dir: str | os.PathLike[str] | None = None,
        tls: TLSMaterials | None = None,
        password: str | None = None,
        user: str | None = None,
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
            tls: Listen for TLS only, with these materials' good certificate.
            password: Require it: ``requirepass``, or ``user``'s password.
            user: An ACL user with every permission and ``password``; the default user
                is switched off.
        """
        if user is not None and password is None:
            raise ValueError("an ACL user needs a password")
        self.host = host
        self.port = port if port is not None else 0
        self.executable = executable
        self.startup_timeout = startup_timeout
        self.extra_args = tuple(extra_args)
        self._port_fixed = port is not None
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.tls = tls
        self.password = password
        self.user = user
        self._process: subprocess.Popen[bytes] | None = None
        self._directory: Path | None = None

    def __repr__(self) -> str:
        return f"<RedisServer {'rediss' if self.tls else 'redis'}://{self.host}:{self.port}>"

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (with TLS ``rediss://…?ssl_cert_reqs=required&
        ssl_ca_certs=CA``; with a password ``…//[user]:password@…``)."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        """URL of database ``db`` on this server."""
        credentials = ""
        if self.password is not None:
            credentials = f"{quote(self.user or '', safe='')}:{quote(self.password, safe='')}@"
        if self.tls is None:
            return f"redis://{credentials}{self.host}:{self.port}/{db}"
        query = urlencode({"ssl_cert_reqs": "required", "ssl_ca_certs": str(self.tls.ca_file)})
        return f"rediss://{credentials}{self.host}:{self.port}/{db}?{query}"

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
        if self.password is not None:
            kwargs.setdefault("username", self.user)
            kwargs.setdefault("password", self.password)
        if self.tls is not None:
            kwargs.setdefault("ssl", True)
            kwargs.setdefault("ssl_ca_certs", str(self.tls.ca_file))
            kwargs.setdefault("ssl_cert_reqs", "required")
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
        command = [executable, *self._arguments(self._directory)]
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

    def _arguments(self, directory: Path) -> list[str]:
        """``redis-server``'s arguments for a start in ``directory``."""
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            cert = self.tls.certs["good"]
            cert_file, key_file = directory / "server.pem", directory / "server.key"
            for n, blob in enumerate(cert.cert_chain_pems):
                blob.write_to_path(str(cert_file), append=n > 0)
            cert.private_key_pem.write_to_path(str(key_file))
            ports = [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", str(cert_file),
                "--tls-key-file", str(key_file),
                "--tls-ca-cert-file", str(self.tls.ca_file),
                "--tls-auth-clients", "no",
                "--tls-replication", "yes",
            ]  # fmt: skip
        auth: list[str] = []
        if self.user is not None:
            auth = ["--user", self.user, "on", f">{self.password}", "~*", "&*", "+@all",
                    "--user", "default", "off"]  # fmt: skip
        elif self.password is not None:
            auth = ["--requirepass", self.password]
        return [
            *ports,
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
            "--daemonize", "no",
            "--databases", "16",
            "--loglevel", "warning",
            "--logfile", str(directory / "redis.log"),
            *auth,
            *self.extra_args,
        ]  # fmt: skip

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
