"""The command lines the deployment files run, run for real: the worker delivers through
the file's own options and environment (its password read from the secret file the
platform mounts), and the stop its platform sends finishes the message in flight and
says QUIT; the health check answers 0 when the worker can work and 1 when it cannot."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from mailworker.cli import main
from mailworker.worker.settings import Settings
from mailworker.worker.tasks import send_mail
from tests.deploy import artifacts
from tests.deploy.artifacts import Launch
from tests.deploy.runner import TLS_FOR_SCHEME, DeployedWorker, environment, run_health
from tests.servers import DEFAULT_PASSWORD, RedisServer, SMTPServer, TLSMaterials, free_port
from tests.worker_process import producer

#: Seconds the test server holds its reply to RCPT: the message is mid-send that long.
HOLD = 1.0
#: The launches a worker can run here (the RabbitMQ overlay needs a RabbitMQ).
RUNNABLE = {
    "compose": artifacts.compose,
    "kubernetes": lambda: artifacts.kubernetes("base"),
    "systemd": artifacts.systemd,
}


@pytest.fixture
def deployed(
    tmp_path: Path,
    redis_url: str,
    smtp_server: Callable[..., SMTPServer],
    tls_ca: TLSMaterials,
) -> Iterator[Callable[[Launch], tuple[DeployedWorker, SMTPServer]]]:
    """Factory: the launch's worker, started against this test's Redis and an SMTP
    server speaking what the launch's profile URL asks for (AUTH required)."""
    workers: list[DeployedWorker] = []

    def start(launch: Launch) -> tuple[DeployedWorker, SMTPServer]:
        scheme = launch.env["MAILWORKER_SMTP_URL"].split("://")[0]
        server = smtp_server(tls=TLS_FOR_SCHEME.get(scheme, "none"), auth=True)
        env = environment(
            launch,
            tmp_path / "root",
            redis_url=redis_url,
            smtp=server,
            ca_file=Path(tls_ca.ca_file),
            password=DEFAULT_PASSWORD,
        )
        worker = DeployedWorker(launch, env, tmp_path / "worker.log")
        workers.append(worker)
        return worker.start(), server

    yield start
    for worker in workers:
        worker.kill()


class TestWorkerCommand:
    """Each file's `mailworker worker` command line, run as its platform runs it."""

    @pytest.mark.parametrize("source", sorted(RUNNABLE))
    def test_delivers_and_stops_warmly(
        self,
        source: str,
        deployed: Callable[[Launch], tuple[DeployedWorker, SMTPServer]],
        redis_client: redis.Redis,
    ) -> None:
        """The worker sends with the file's settings and secret file; the platform's stop
        (SIGTERM) mid-send lets the message finish, QUITs the session and exits 0."""
        launch = RUNNABLE[source]()
        assert launch.stop_signal == "SIGTERM"
        assert launch.signals_main_only, f"{source}: SIGTERM would reach the pool processes"
        worker, server = deployed(launch)
        server.handler.command_delays["RCPT"] = HOLD
        with producer(worker.env):
            send_mail.delay(to="ann@example.org", subject=f"via {source}", text="Hello")
        server.handler.wait_for_count("RCPT", 1, timeout=20)
        status = worker.stop(timeout=min(launch.stop_timeout, 30))

        assert status == 0, worker.output()[-3000:]
        (message,) = server.handler.messages
        assert message.parsed()["Subject"] == f"via {source}"
        assert message.auth_user == server.handler.user  # the password came from the file
        counts = server.handler.counts
        assert counts["connections"] == counts["QUIT"] == 1
        assert [e["event"] for e in worker.events("mail.sent")] == ["mail.sent"]
        assert redis_client.llen("celery") == 0
        assert redis_client.hlen("unacked") == 0

    def test_stop_timeouts_outlast_the_longest_send(self) -> None:
        """Every platform waits longer than a delivery may take (the task time limit)
        plus QUIT before it SIGKILLs."""
        for launch in artifacts.launches():
            settings = Settings.from_env({k: v for k, v in launch.env.items() if "URL" not in k})
            assert launch.stop_timeout >= settings.task_time_limit + 30, launch.source

    def test_every_file_runs_the_same_worker_options(self) -> None:
        """Docker, compose, Kubernetes and systemd start the worker with one set of
        options, so scaling advice in deploy/README.md holds for each."""
        options = {launch.argv[1:] for launch in artifacts.launches()}
        assert len(options) == 1, options
        assert {launch.argv[0].rsplit("/", 1)[-1] for launch in artifacts.launches()} == {
            "mailworker"
        }


class TestHealthCheck:
    """`mailworker health`, as the Dockerfile's HEALTHCHECK and the Kubernetes probes
    run it."""

    def test_health_is_registered(self) -> None:
        """`mailworker health` is a subcommand of the installed CLI."""
        assert "health" in main.commands

    @pytest.mark.parametrize("source", ["compose", "kubernetes"])
    def test_healthy(
        self,
        source: str,
        tmp_path: Path,
        redis_url: str,
        smtp_server: Callable[..., SMTPServer],
        tls_ca: TLSMaterials,
    ) -> None:
        """With the file's environment and a reachable broker it exits 0 and says so."""
        launch = RUNNABLE[source]()
        assert launch.health is not None
        env = environment(
            launch,
            tmp_path,
            redis_url=redis_url,
            smtp=smtp_server(),  # not connected to: only its address goes into the URL
            ca_file=Path(tls_ca.ca_file),
            password=DEFAULT_PASSWORD,
        )
        result = run_health(launch.health, env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("healthy: broker redis://127.0.0.1:")

    def test_unhealthy_when_redis_is_down(
        self, tmp_path: Path, redis_server_factory: Callable[..., RedisServer], tls_ca: TLSMaterials
    ) -> None:
        """A broker that does not answer is exit status 1 (never 2, which Docker
        reserves) with a one-line reason, within the probe's timeout."""
        launch = artifacts.kubernetes("base")
        assert launch.health is not None
        server = redis_server_factory()
        url = server.url
        server.stop()
        env = environment(
            launch,
            tmp_path,
            redis_url=url,
            smtp=None,
            ca_file=Path(tls_ca.ca_file),
            password=DEFAULT_PASSWORD,
        )
        result = run_health(launch.health, env)
        assert result.returncode == 1
        assert result.stdout == ""
        assert result.stderr.startswith("unhealthy: ConnectionError:")
        assert len(result.stderr.strip().splitlines()) == 1

    def test_unhealthy_when_the_secret_file_is_missing(
        self, tmp_path: Path, redis_url: str, tls_ca: TLSMaterials
    ) -> None:
        """A secret that is not mounted fails the check, naming the variable."""
        launch = artifacts.kubernetes("base")
        assert launch.health is not None
        env = environment(
            launch,
            tmp_path,
            redis_url=redis_url,
            smtp=None,
            ca_file=Path(tls_ca.ca_file),
            password=DEFAULT_PASSWORD,
        )
        Path(env["MAILWORKER_SMTP_PASSWORD_FILE"]).unlink()
        result = run_health(launch.health, env)
        assert result.returncode == 1
        assert "MAILWORKER_SMTP_PASSWORD_FILE" in result.stderr

    def test_unreachable_rabbitmq(
        self, tmp_path: Path, redis_url: str, tls_ca: TLSMaterials
    ) -> None:
        """The RabbitMQ overlay's check connects to the AMQP broker and fails fast when
        nothing listens there."""
        launch = artifacts.kubernetes("rabbitmq")
        assert launch.health is not None
        env = environment(
            launch,
            tmp_path,
            redis_url=redis_url,
            smtp=None,
            ca_file=Path(tls_ca.ca_file),
            password=DEFAULT_PASSWORD,
        )
        env["MAILWORKER_BROKER_URL"] = f"amqp://guest:guest@127.0.0.1:{free_port()}//"
        result = run_health((*launch.health, "--timeout", "1"), env)
        assert result.returncode == 1
        assert result.stderr.startswith("unhealthy: ")
        assert "guest:guest" not in result.stderr


class TestComposeRedis:
    """The compose file's Redis command line, run by a real redis-server."""

    def test_aof_and_noeviction(self, tmp_path: Path) -> None:
        """Its options turn on the append-only file, fsync'd every second, and refuse
        writes rather than evict a queued message when memory runs out."""
        command = artifacts.compose_file()["services"]["redis"]["command"]
        assert command[0] == "redis-server"
        with RedisServer(extra_args=tuple(command[1:]), data_dir=tmp_path / "redis") as server:
            client = server.client()
            try:
                config = {
                    key: client.config_get(key)[key]
                    for key in ("appendonly", "appendfsync", "maxmemory-policy")
                }
            finally:
                client.close()
        assert config == {
            "appendonly": "yes",
            "appendfsync": "everysec",
            "maxmemory-policy": "noeviction",
        }
