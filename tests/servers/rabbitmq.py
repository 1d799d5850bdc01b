"""A private ``rabbitmq-server`` (Debian's package) on 127.0.0.1 for the tests.

Everything the node uses is its own: a temporary directory for its database, logs,
configuration and Erlang cookie (``HOME``), free ports for AMQP, Erlang distribution and
``epmd`` (started here, as a child, so that nothing is left running), and a node name
with this process's id. Debian's ``/usr/sbin/rabbitmq-server`` wrapper drops to the
``rabbitmq`` user when started as root and refuses other users; the package's own
script under ``/usr/lib/rabbitmq/bin`` runs as whoever starts it, so it is used here.

Tests do not share a virtual host: the node is booted with :attr:`RabbitMQServer.vhosts`
empty ones (``load_definitions``), and :meth:`RabbitMQServer.fresh_url` hands out the
next unused one (creating more with ``rabbitmqctl`` if they run out).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Final

import amqp

from mailworker.dev.server import free_port
from tests.servers.base import LOCALHOST, Service

#: Where Debian's package keeps the scripts that run as the calling user.
DEBIAN_SCRIPTS: Final = Path("/usr/lib/rabbitmq/bin")
#: The user every virtual host grants everything to.
USER: Final = "mailworker"
PASSWORD: Final = "mailworker-test"
#: Erlang's distribution bound to loopback only (the node's and rabbitmqctl's).
_LOOPBACK_DIST: Final = "-kernel inet_dist_use_interface {127,0,0,1}"

_nodes = itertools.count(1)


def _script(name: str) -> str:
    """The path of RabbitMQ script ``name`` that runs as the calling user."""
    debian = DEBIAN_SCRIPTS / name
    if debian.exists():
        return str(debian)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} not found; apt-get install rabbitmq-server")
    return found


def _password_hash(password: str) -> str:
    """``rabbit_password_hashing_sha256``: base64 of a 4-byte salt and the SHA-256 of
    salt + password (what ``load_definitions`` reads)."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


class RabbitMQServer(Service):
    """A private RabbitMQ node on 127.0.0.1, started with :meth:`start` and stopped with
    ``rabbitmqctl -n <node> stop`` (:meth:`stop`)."""

    def __init__(self, *, vhosts: int = 16, startup_timeout: float = 60.0) -> None:
        """Configure the node (nothing starts until :meth:`start`).

        Args:
            vhosts: empty virtual hosts created at boot (``mw1`` … ``mw<n>``).
            startup_timeout: seconds to wait for it to take AMQP connections.
        """
        self.host = LOCALHOST
        self.vhosts = vhosts
        self.startup_timeout = startup_timeout
        self.port = 0
        self.node = f"mailworker-{os.getpid()}-{next(_nodes)}@localhost"
        self._directory: Path | None = None
        self._env: dict[str, str] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._handed_out = 0

    def __repr__(self) -> str:
        return f"RabbitMQServer({self.node!r}, port={self.port})"

    # -- addresses ----------------------------------------------------------------------

    def url_for(self, vhost: str) -> str:
        """``amqp://`` URL of virtual host ``vhost`` on this node."""
        return f"amqp://{USER}:{PASSWORD}@{self.host}:{self.port}/{vhost}"

    def fresh_url(self) -> str:
        """URL of a virtual host no one has used yet."""
        self._handed_out += 1
        vhost = f"mw{self._handed_out}"
        if self._handed_out > self.vhosts:
            self.ctl("add_vhost", vhost)
            self.ctl("set_permissions", "-p", vhost, USER, ".*", ".*", ".*")
        return self.url_for(vhost)

    @property
    def running(self) -> bool:
        """Whether the node's process is alive."""
        return self._process is not None and self._process.poll() is None

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> RabbitMQServer:
        """Start the node and wait until it takes AMQP connections; return self.

        Raises:
            FileNotFoundError: RabbitMQ or ``epmd`` is not installed.
            RuntimeError: it exited during start (its output's tail in the message).
            TimeoutError: not ready in ``startup_timeout`` seconds (it is stopped).
        """
        if self.running:
            raise RuntimeError(f"{self!r} is already running")
        server = _script("rabbitmq-server")
        epmd = shutil.which("epmd")
        if epmd is None:
            raise FileNotFoundError("'epmd' not found; apt-get install rabbitmq-server")
        try:
            self._prepare()
            self._epmd = subprocess.Popen(
                [epmd, "-port", self._env["ERL_EPMD_PORT"], "-address", self.host],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self._wait_for_epmd()
            assert self._directory is not None
            with (self._directory / "stdout.log").open("ab") as output:
                self._process = subprocess.Popen(
                    [server],
                    cwd=self._directory,
                    env=self._env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """``rabbitmqctl stop``, then wait for the node; kill it if it lingers; stop
        ``epmd``; delete the directory (idempotent)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                self.ctl("stop", timeout=30)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        epmd, self._epmd = self._epmd, None
        if epmd is not None:
            epmd.terminate()
            try:
                epmd.wait(5)
            except subprocess.TimeoutExpired:
                epmd.kill()
                epmd.wait()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def ctl(self, *args: str, timeout: float = 30) -> str:
        """Run ``rabbitmqctl -n <node> <args>`` against this node; returns its output.

        Raises:
            subprocess.CalledProcessError: it failed (its output is on the error).
        """
        done = subprocess.run(
            [_script("rabbitmqctl"), "-n", self.node, *args],
            env=self._env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
        return done.stdout

    # -- internals ------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Make the directory, its configuration and the environment; choose ports."""
        directory = Path(tempfile.mkdtemp(prefix="mailworker-rabbitmq-"))
        self._directory = directory
        self.port = free_port(self.host)
        dist_port, epmd_port = free_port(self.host), free_port(self.host)
        vhosts = [f"mw{n}" for n in range(1, self.vhosts + 1)]
        definitions = {
            "users": [
                {
                    "name": USER,
                    "password_hash": _password_hash(PASSWORD),
                    "hashing_algorithm": "rabbit_password_hashing_sha256",
                    "tags": ["administrator"],
                }
            ],
            "vhosts": [{"name": name} for name in vhosts],
            "permissions": [
                {"user": USER, "vhost": name, "configure": ".*", "write": ".*", "read": ".*"}
                for name in vhosts
            ],
        }
        (directory / "definitions.json").write_text(json.dumps(definitions))
        (directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = {self.host}:{self.port}\n"
            f"load_definitions = {directory / 'definitions.json'}\n"
        )
        (directory / "enabled_plugins").write_text("[].\n")
        (directory / "rabbitmq-env.conf").write_text("")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(directory),  # the Erlang cookie
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS=self.host,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(dist_port),
            RABBITMQ_MNESIA_BASE=str(directory / "mnesia"),
            RABBITMQ_LOG_BASE=str(directory / "log"),
            RABBITMQ_CONFIG_FILE=str(directory / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(directory / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(directory / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(directory / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(directory / "rabbitmq.pid"),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=_LOOPBACK_DIST,
            RABBITMQ_CTL_ERL_ARGS=_LOOPBACK_DIST,
            ERL_EPMD_PORT=str(epmd_port),
            ERL_EPMD_ADDRESS=self.host,
        )
        self._env = env

    def _wait_for_epmd(self) -> None:
        """Wait until ``epmd`` listens: the node would start a daemon of its own else."""
        assert self._epmd is not None
        port = int(self._env["ERL_EPMD_PORT"])
        deadline = time.monotonic() + 10
        while not port_open(self.host, port):
            if self._epmd.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"epmd did not listen on port {port}")
            time.sleep(0.01)

    def _wait_ready(self) -> None:
        """Wait until the last boot-time virtual host takes an AMQP connection."""
        assert self._process is not None
        deadline = time.monotonic() + self.startup_timeout
        vhost = f"mw{self.vhosts}" if self.vhosts else "/"
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"rabbitmq-server exited with {self._process.returncode} during start:\n"
                    + self._log_tail()
                )
            connection = amqp.Connection(
                f"{self.host}:{self.port}",
                userid=USER,
                password=PASSWORD,
                virtual_host=vhost,
                connect_timeout=1,
            )
            try:
                connection.connect()
            except (OSError, amqp.exceptions.AMQPError):
                pass
            else:
                connection.close()
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"rabbitmq-server took no connection in {self.startup_timeout}s:\n"
                    + self._log_tail()
                )
            time.sleep(0.2)

    def _log_tail(self) -> str:
        if self._directory is None:
            return ""
        with contextlib.suppress(OSError):
            return (self._directory / "stdout.log").read_text(errors="replace")[-3000:]
        return ""


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False
