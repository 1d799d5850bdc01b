"""benchmarks/perf.py's end-to-end rows: publisher -> Redis -> 2 prefork worker
processes -> the STARTTLS + AUTH sink.

Each measurement starts a fresh worker, warms it up with 100 messages, then times
N messages from the first publish to the last message the sink received.
"""

# ruff: noqa: S603 -- every command run here is built from fixed paths and our own values

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _perf_procs import on_stop, spawn, stop, tree_cpu, tree_rss
from _perf_servers import PASSWORD, USER, Redis, Sink

HERE = Path(__file__).resolve().parent
WARM_UP = 100
STALL = 60.0  # seconds without progress before a row is given up


@dataclass
class E2EResult:
    rate: float
    cpu_ms: float
    redis_per_msg: float
    rss_100: int
    rss_end: int
    #: CPU share (of one core) of the sink and of redis-server during the run.
    server_share: dict[str, float]


class EndToEnd:
    """Runs one end-to-end measurement per call of :meth:`run`."""

    def __init__(self, work: Path, redis: Redis, sink: Sink, ca_file: str) -> None:
        self.work, self.redis, self.sink, self.ca_file = work, redis, sink, ca_file
        self._runs = 0
        base = {k: v for k, v in os.environ.items() if not k.startswith(("MAILWORKER_", "PERF_"))}
        smtp_url = (
            f"smtp+starttls://{USER}:{PASSWORD}@127.0.0.1:{sink.port}"
            f"?ca_file={ca_file}&local_hostname=bench.example"
        )
        self.env = {
            **base,
            "MAILWORKER_BROKER_URL": redis.url,
            "MAILWORKER_SMTP_URL": smtp_url,
            "MAILWORKER_DEFAULT_FROM": "App <app@example.com>",
            "MAILWORKER_LOG_FORMAT": "json",
            "PERF_BROKER_URL": redis.url,
            "PERF_UDP_PORT": str(sink.udp_port),
            "PERF_SMTP_PORT": str(sink.port),
            "SSL_CERT_FILE": ca_file,
            "DJANGO_SETTINGS_MODULE": "perf_django_settings",
            "PYTHONPATH": os.pathsep.join([str(HERE), base.get("PYTHONPATH", "")]).rstrip(
                os.pathsep
            ),
            "PYTHONUNBUFFERED": "1",
        }

    def _worker(self, mode: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        self._runs += 1
        name = f"perf-{mode}-{os.getpid()}-{self._runs}@%h"
        options = [
            "-P", "prefork", "-c", "2", "-n", name, "--loglevel", "WARNING",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        if mode.startswith(("mw", "batch")):
            command = [str(Path(sys.executable).parent / "mailworker"), "worker", *options]
        else:
            command = [sys.executable, "-m", "celery", "-A", "_perf_celery_app", "worker"]
            command += options
            if mode == "noop_guarded":
                command += ["--prefetch-multiplier", "1"]
        log = self.work / f"worker-{self._runs:03d}-{mode}.log"
        return spawn(command, log, env)

    def _wait(self, target: int, worker: subprocess.Popen[bytes], what: str) -> None:
        seen, since = self.sink.messages, time.monotonic()
        while self.sink.messages < target:
            if worker.poll() is not None:
                raise RuntimeError(f"{what}: the worker exited with {worker.returncode}")
            if self.sink.messages != seen:
                seen, since = self.sink.messages, time.monotonic()
            elif time.monotonic() - since > STALL:
                raise RuntimeError(
                    f"{what}: stalled at {seen - target}+{target} (no message for {STALL:g} s)"
                )
            time.sleep(0.005)

    def run(self, mode: str, count: int, chunk: int | None = None) -> E2EResult | str:
        """Measure ``mode`` (noop, noop_guarded, dce, mw, batch10, batch100) over ``count``
        messages;
        a string says why the row cannot run."""
        env = dict(self.env)
        if chunk is not None:
            env["PERF_DCE_CHUNK_SIZE"] = str(chunk)
        self.redis.flush()
        base = self.sink.messages
        worker = self._worker(mode, env)
        publisher = subprocess.Popen(
            [sys.executable, str(HERE / "_perf_publish.py"), mode, str(count), str(WARM_UP)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=HERE,
        )
        on_stop(publisher.kill)
        try:
            assert publisher.stdin is not None
            assert publisher.stdout is not None
            line = publisher.stdout.readline().strip()
            if line != "warm":
                return line or f"publisher failed ({publisher.wait()})"
            self._wait(base + WARM_UP, worker, f"{mode} warm-up")
            time.sleep(0.2)  # let the last warm-up acknowledgements land
            rss_100 = tree_rss(worker.pid)
            cpu0, commands0 = tree_cpu(worker.pid), self.redis.commands()
            sink0, redis0 = self.sink.cpu(), self.redis.cpu()
            start = self.sink.messages
            publisher.stdin.write("go\n")
            publisher.stdin.flush()
            t0 = float(publisher.stdout.readline().split()[1])
            self._wait(start + count, worker, mode)
            wall = self.sink.last - t0
            ended = time.monotonic() - t0
            cpu1, commands1 = tree_cpu(worker.pid), self.redis.commands()
            sink1, redis1 = self.sink.cpu(), self.redis.cpu()
            rss_end = tree_rss(worker.pid)
            publisher.wait(60)
            return E2EResult(
                rate=count / wall,
                cpu_ms=(cpu1 - cpu0) / count * 1000,
                redis_per_msg=(commands1 - commands0 - 2) / count,
                rss_100=rss_100,
                rss_end=rss_end,
                server_share={
                    "sink": (sink1 - sink0) / ended,
                    "redis": (redis1 - redis0) / ended,
                },
            )
        finally:
            if publisher.poll() is None:
                publisher.kill()
                publisher.wait()
            stop(worker, timeout=20)
