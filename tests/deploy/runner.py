"""Run what a deployment file runs, for real, against this test's Redis and SMTP server.

The command line and environment are the file's own (:mod:`tests.deploy.artifacts`);
only what points at infrastructure is moved here: the broker and store URLs become the
test's Redis, an SMTP profile URL keeps its scheme and options but names the test server
(and its CA), and every secret file is written under a temporary root at the path the
platform would mount it. ``mailworker`` is found on ``PATH`` as in the image (this
environment's ``bin/`` first); the unit's absolute path is mapped to the same script.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

from mailworker.cli import main
from tests.deploy.artifacts import Launch
from tests.servers import SMTPServer
from tests.worker_process import json_lines, mailworker_executable

#: TLS mode of the test server for each profile URL scheme.
TLS_FOR_SCHEME = {"smtps": "implicit", "smtp+starttls": "starttls", "submission": "starttls"}
#: Where the unit's ExecStart expects the virtual environment.
UNIT_VENV_BIN = "/opt/mailworker/venv/bin/"


def retarget(url: str, server: SMTPServer, ca_file: Path) -> str:
    """Profile ``url`` pointed at ``server``: same scheme and options, the server's user,
    host and port, and ``ca_file`` as the CA to trust."""
    parts = urllib.parse.urlsplit(url)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "ca_file"]
    if parts.scheme != "smtp":
        query.append(("ca_file", str(ca_file)))
    user = urllib.parse.quote(server.handler.user, safe="")
    netloc = f"{user}@localhost:{server.port}"
    return urllib.parse.urlunsplit(
        (parts.scheme, netloc, parts.path, urllib.parse.urlencode(query), "")
    )


def reroot(root: Path, path: str) -> Path:
    """Absolute ``path`` under ``root``."""
    return root / path.lstrip("/")


def resolve(argv: tuple[str, ...]) -> list[str]:
    """``argv`` runnable here: the unit's venv path mapped to this environment's
    script; ``mailworker health`` run as its module until it is registered."""
    command = list(argv)
    if command[0].startswith(UNIT_VENV_BIN):
        command[0] = mailworker_executable()
    if command[1:2] == ["health"] and "health" not in main.commands:
        command = [sys.executable, "-m", "mailworker.cli.health", *command[2:]]
    return command


def environment(
    launch: Launch,
    root: Path,
    *,
    redis_url: str,
    smtp: SMTPServer | None,
    ca_file: Path,
    password: str,
) -> dict[str, str]:
    """The launch's environment for a run here (see the module docstring); the secret
    files it names are written under ``root``.

    Raises:
        AssertionError: a ``*_FILE`` variable names a path no secret is mounted at.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name, value in launch.env.items():
        if name != "PATH":
            env[name] = _resolved(launch, name, value, root, redis_url, smtp, ca_file, password)
    return env


def _resolved(
    launch: Launch,
    name: str,
    value: str,
    root: Path,
    redis_url: str,
    smtp: SMTPServer | None,
    ca_file: Path,
    password: str,
) -> str:
    """One variable's value for a run here (see :func:`environment`)."""
    if name in ("MAILWORKER_BROKER_URL", "MAILWORKER_REDIS_URL"):
        return redis_url
    if name.startswith("MAILWORKER_SMTP_URL") and smtp is not None:
        return retarget(value, smtp, ca_file)
    if name.endswith("_FILE"):
        assert value in launch.secret_files, (
            f"{launch.source}: {name}={value} but no secret is mounted there "
            f"(mounted: {sorted(launch.secret_files)})"
        )
        path = reroot(root, value)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(password + "\n", encoding="utf-8")
        return str(path)
    assert not value.startswith("secret:"), f"{launch.source}: {name} left unresolved"
    return value


class DeployedWorker:
    """The launch's worker process: started in its own process group, output to a file."""

    def __init__(self, launch: Launch, env: dict[str, str], log_path: Path) -> None:
        self.launch = launch
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> DeployedWorker:
        """Start it and wait for Celery's "ready" line."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                resolve(self.launch.argv),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while " ready." not in self.output():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"{self.launch.source}: not ready:\n{self.output()[-4000:]}")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float) -> int:
        """Stop it as its platform does: its stop signal, to the main process or to the
        whole process group; returns the exit status."""
        assert self.process is not None
        signum = signal.Signals[self.launch.stop_signal]
        if self.launch.signals_main_only:
            self.process.send_signal(signum)
        else:
            os.killpg(self.process.pid, signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the whole process group."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def output(self) -> str:
        """Everything it wrote."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        """Its structlog JSON events called ``name``."""
        return [e for e in json_lines(self.output()) if e.get("event") == name]


def run_health(argv: tuple[str, ...], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a health check's command line."""
    return subprocess.run(  # noqa: PLW1510 -- the status is the result
        resolve(argv), env=env, capture_output=True, text=True, timeout=30
    )
