"""Prometheus metrics (``mailworker.worker.metrics``): off without a port; one process
(threads, solo) on the default registry; prefork in prometheus_client's multiprocess
mode, in this process with forked children and in a real ``mailworker worker``."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery, signals
from structlog.testing import capture_logs

from mailworker.errors import ConfigError
from mailworker.store.deadletter import DeadLetterStore
from mailworker.store.limits import Breaker
from mailworker.worker import metrics
from mailworker.worker.settings import Settings
from tests.servers import SMTPServer, free_port, wait_for
from tests.worker_process import WorkerProcess, producer

#: One parsed scrape: (sample name, labels) -> value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """GET ``/metrics`` and parse it."""
    from prometheus_client.parser import text_string_to_metric_families  # noqa: PLC0415

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    """The sample ``name{labels}``, or None if the scrape has none."""
    return samples.get((name, frozenset(labels.items())))


def names(samples: Samples) -> set[str]:
    """Every sample name of a scrape."""
    return {name for name, _ in samples}


def listening(port: int) -> bool:
    """Whether anything answers on ``port``."""
    try:
        scrape(port)
    except (urllib.error.URLError, ConnectionError):
        return False
    return True


def metrics_env(redis_url: str, **more: str) -> dict[str, str]:
    """A worker's environment with two profiles and metrics on a free port."""
    return {
        "MAILWORKER_BROKER_URL": redis_url,
        "MAILWORKER_SMTP_URL": "smtp://127.0.0.1:25",
        "MAILWORKER_SMTP_URL_BULK": "smtp://127.0.0.1:26",
        "MAILWORKER_METRICS_PORT": str(free_port()),
        "MAILWORKER_METRICS_ADDR": "127.0.0.1",
        **more,
    }


class FakeWorker:
    """What Celery's ``worker_init`` hands its receivers: the worker, with app and pool."""

    def __init__(self, app: Celery, pool_cls: object) -> None:
        self.app = app
        self.pool_cls = pool_cls


#: Starts metrics as a worker's worker_init would: ``start(pool, **env)`` -> settings.
Starter = Callable[..., Settings]


@pytest.fixture
def start(redis_url: str) -> Iterator[Starter]:
    """Factory: install on a fresh app and send ``worker_init`` for a ``pool`` worker;
    ``worker_shutdown`` after the test (and the metrics are off again)."""
    workers: list[FakeWorker] = []

    def create(pool: object = "threads", **env: str) -> Settings:
        settings = Settings.from_env(metrics_env(redis_url, **env))
        app = Celery("metrics-test", set_as_current=False)
        metrics.install(app, settings)
        worker = FakeWorker(app, pool)
        workers.append(worker)
        signals.worker_init.send(sender=worker)
        return settings

    yield create
    for worker in workers:
        signals.worker_shutdown.send(sender=worker)
    metrics._stop()


class TestSettings:
    """MAILWORKER_METRICS_* are read with the other settings."""

    def test_defaults(self) -> None:
        """Without the variables metrics are off, on all interfaces, in a private dir."""
        settings = Settings.from_env({})
        assert settings.metrics_port is None
        assert settings.metrics_addr == "0.0.0.0"
        assert settings.metrics_dir is None

    def test_read(self) -> None:
        """Port, address and directory come from the environment."""
        settings = Settings.from_env(
            {
                "MAILWORKER_METRICS_PORT": "9808",
                "MAILWORKER_METRICS_ADDR": "127.0.0.1",
                "MAILWORKER_METRICS_DIR": "/run/mailworker/metrics",
            }
        )
        assert settings.metrics_port == 9808
        assert settings.metrics_addr == "127.0.0.1"
        assert settings.metrics_dir == "/run/mailworker/metrics"

    @pytest.mark.parametrize("port", ["http", "98.08", "-1", "0", "65536"])
    def test_bad_port(self, port: str) -> None:
        """A port that is not 1 to 65535 is an error naming the variable."""
        with pytest.raises(ConfigError, match="MAILWORKER_METRICS_PORT"):
            Settings.from_env({"MAILWORKER_METRICS_PORT": port})


class TestOff:
    """Without a port nothing happens, and prometheus_client is never imported."""

    def test_nothing_imported_or_connected(self) -> None:
        """install() and every function are no-ops that import no prometheus_client."""
        code = textwrap.dedent(
            """
            import sys
            from celery import Celery, signals
            from mailworker.worker import metrics
            from mailworker.worker.settings import Settings

            before = len(signals.worker_init.receivers)
            metrics.install(Celery("off", set_as_current=False), Settings.from_env({}))
            metrics.message("default", "sent", recipients={"accepted": 2}, duration=0.1)
            metrics.connection_opened("default")
            metrics.session_open("default", 1)
            metrics.replies("default", [250, 550])
            metrics.retry_scheduled()
            metrics.rate_limit_wait("default")
            assert len(signals.worker_init.receivers) == before, "a receiver was connected"
            assert "prometheus_client" not in sys.modules, "prometheus_client was imported"
            """
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
        subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)

    def test_outcome_checked_while_off(self) -> None:
        """A misspelt outcome fails also without metrics, so tests catch it."""
        with pytest.raises(ValueError, match="outcome='delivered'"):
            metrics.message("default", "delivered")
        with pytest.raises(ValueError, match="recipients="):
            metrics.message("default", "sent", recipients={"refused": 1})

    def test_port_without_the_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A port without prometheus_client: an error naming the variable and the fix."""
        monkeypatch.setitem(sys.modules, "prometheus_client", None)
        settings = Settings.from_env({"MAILWORKER_METRICS_PORT": "9808"})
        with pytest.raises(ConfigError) as raised:
            metrics.install(Celery("no-extra", set_as_current=False), settings)
        assert "MAILWORKER_METRICS_PORT" in str(raised.value)
        assert "pip install 'mailworker[metrics]'" in str(raised.value)


class TestOneProcess:
    """The threads and solo pools: the default registry, served from the process."""

    def test_counts(self, start: Starter) -> None:
        """Every function shows in the scrape under its exact name."""
        settings = start("threads")
        metrics.message("default", "sent", recipients={"accepted": 2, "rejected": 1}, duration=0.2)
        metrics.message("default", "deferred", recipients={"deferred": 3}, duration=7)
        metrics.message("bulk", "dead_lettered")
        metrics.connection_opened("default")
        metrics.session_open("default", +1)
        metrics.session_open("default", +1)
        metrics.session_open("default", -1)
        metrics.replies("default", [250, 250, 550, 999])
        metrics.retry_scheduled()
        metrics.rate_limit_wait("bulk")
        assert settings.metrics_port is not None
        got = scrape(settings.metrics_port)

        def count(name: str, **labels: str) -> float | None:
            return value(got, name, **labels)

        assert count("mailworker_messages_total", profile="default", outcome="sent") == 1
        assert count("mailworker_messages_total", profile="default", outcome="deferred") == 1
        assert count("mailworker_messages_total", profile="bulk", outcome="dead_lettered") == 1
        assert count("mailworker_recipients_total", profile="default", outcome="accepted") == 2
        assert count("mailworker_recipients_total", profile="default", outcome="rejected") == 1
        assert count("mailworker_recipients_total", profile="default", outcome="deferred") == 3
        assert count("mailworker_send_duration_seconds_count", profile="default") == 2
        assert count("mailworker_send_duration_seconds_bucket", profile="default", le="0.25") == 1
        assert count("mailworker_send_duration_seconds_bucket", profile="default", le="10.0") == 2
        assert count("mailworker_smtp_connections_total", profile="default") == 1
        assert count("mailworker_smtp_sessions_open", profile="default") == 1
        assert count("mailworker_smtp_replies_total", profile="default", code="250") == 2
        assert count("mailworker_smtp_replies_total", profile="default", code="550") == 1
        assert count("mailworker_smtp_replies_total", profile="default", code="other") == 1
        assert count("mailworker_retries_scheduled_total") == 1
        assert count("mailworker_rate_limit_waits_total", profile="bulk") == 1
        assert "process_cpu_seconds_total" in names(got), "the default registry's process_*"

    def test_series_start_at_zero(self, start: Starter) -> None:
        """Every configured profile's series exist before anything happened."""
        settings = start("solo")
        assert settings.metrics_port is not None
        got = scrape(settings.metrics_port)
        for profile in ("default", "bulk"):
            for outcome in ("sent", "deferred", "dead_lettered"):
                assert (
                    value(got, "mailworker_messages_total", profile=profile, outcome=outcome) == 0
                )
            assert value(got, "mailworker_smtp_sessions_open", profile=profile) == 0

    def test_installed_once_per_app(self, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        """A second install() for an app connects nothing more."""
        settings = Settings.from_env(metrics_env(redis_url))
        app = Celery("twice", set_as_current=False)
        connected: list[object] = []
        connect = signals.worker_init.connect

        def counting(*args: Any, **kwargs: Any) -> Any:
            connected.append(args)
            return connect(*args, **kwargs)

        # Counted, not read off the receivers: other tests' dead receivers may be
        # pruned meanwhile.
        monkeypatch.setattr(signals.worker_init, "connect", counting)
        metrics.install(app, settings)
        metrics.install(app, settings)
        assert len(connected) == 1

    def test_other_apps_worker_ignored(self, redis_url: str) -> None:
        """A worker of another app in the same process starts nothing."""
        settings = Settings.from_env(metrics_env(redis_url))
        mine = Celery("mine", set_as_current=False)
        metrics.install(mine, settings)
        other = FakeWorker(Celery("theirs", set_as_current=False), "threads")
        signals.worker_init.send(sender=other)
        assert settings.metrics_port is not None
        assert not listening(settings.metrics_port)
        assert mine in metrics._installed  # still connected, yet it was not its worker

    def test_shutdown(self, redis_url: str) -> None:
        """worker_shutdown stops the server; the functions are no-ops again, and the
        metrics can start again (the default registry let go of them)."""
        settings = Settings.from_env(metrics_env(redis_url))
        app = Celery("stops", set_as_current=False)
        metrics.install(app, settings)
        worker = FakeWorker(app, "threads")
        assert settings.metrics_port is not None
        for _ in range(2):
            signals.worker_init.send(sender=worker)
            assert listening(settings.metrics_port)
            signals.worker_shutdown.send(sender=worker)
            assert not listening(settings.metrics_port)
            metrics.retry_scheduled()

    def test_port_taken(self, start: Starter) -> None:
        """A port already in use is logged; the worker goes on without metrics."""
        with socket.create_server(("127.0.0.1", 0)) as taken, capture_logs() as logs:
            start("threads", MAILWORKER_METRICS_PORT=str(taken.getsockname()[1]))
        [event] = [e for e in logs if e["event"] == "metrics.unavailable"]
        assert "MAILWORKER_METRICS_PORT" in event["error"]
        assert metrics._metrics is None
        metrics.retry_scheduled()  # a no-op, not an error

    def test_pool_kinds(self) -> None:
        """prefork (by alias, class or Celery's default) means multiprocess mode."""
        from celery.concurrency.prefork import TaskPool as Prefork  # noqa: PLC0415
        from celery.concurrency.thread import TaskPool as Threads  # noqa: PLC0415

        assert metrics._is_prefork("prefork")
        assert metrics._is_prefork("processes")
        assert metrics._is_prefork(Prefork)
        assert metrics._is_prefork("celery.concurrency.prefork:TaskPool")
        assert metrics._is_prefork(None)
        assert not metrics._is_prefork("threads")
        assert not metrics._is_prefork("solo")
        assert not metrics._is_prefork("gevent")
        assert not metrics._is_prefork(Threads)


class TestStoreGauges:
    """Dead letters and breakers are read from Redis at scrape time."""

    def test_dead_letters(self, start: Starter, dlq: DeadLetterStore) -> None:
        """The gauge is the store's size now."""
        settings = start("threads")
        assert settings.metrics_port is not None
        assert value(scrape(settings.metrics_port), "mailworker_dead_letters") == 0
        for n in range(2):
            dlq.add(dead_letter(n))
        assert value(scrape(settings.metrics_port), "mailworker_dead_letters") == 2

    def test_breaker_open(self, start: Starter, redis_client: redis.Redis) -> None:
        """1 for a profile whose breaker is open, 0 for the others."""
        settings = start("threads")
        assert settings.metrics_port is not None
        Breaker(redis_client).failure("bulk", failures=1, window=60, reset=60)
        got = scrape(settings.metrics_port)
        assert value(got, "mailworker_breaker_open", profile="bulk") == 1
        assert value(got, "mailworker_breaker_open", profile="default") == 0

    def test_redis_down(self, start: Starter) -> None:
        """Without Redis the two gauges are absent (not 0), the rest is served."""
        with capture_logs() as logs:
            settings = start("threads", MAILWORKER_BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
            assert settings.metrics_port is not None
            got = scrape(settings.metrics_port)
        assert "mailworker_dead_letters" not in names(got)
        assert "mailworker_breaker_open" not in names(got)
        assert "mailworker_messages_total" in names(got)
        assert any(e["event"] == "metrics.store_unreadable" for e in logs)


def dead_letter(n: int) -> Any:
    """A small dead-letter record."""
    from mailworker.store.deadletter import DeadLetter  # noqa: PLC0415

    return DeadLetter(
        id="",
        reason="permanent",
        task="mailworker.send_mail",
        kwargs={"to": [f"u{n}@example.org"], "subject": "s", "text": "t"},
        error={"type": "SMTPReplyError", "message": "550", "code": 550, "transient": False},
        transcript=[],
        attempts=1,
        first_attempt_at=0.0,
        last_attempt_at=0.0,
        profile="default",
        task_id=f"task-{n}",
        recipients=[f"u{n}@example.org"],
        subject="s",
        history=[],
    )


def stale_counter(directory: Path) -> None:
    """Leave a counter file in ``directory``, as a previous worker would have."""
    code = (
        "from prometheus_client import Counter; "
        "Counter('mailworker_stale', 'left over', registry=None).inc()"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=30)
    assert list(directory.glob("counter_*.db"))


@contextlib.contextmanager
def forked(body: Callable[[], None]) -> Iterator[int]:
    """Run ``body`` in a forked child (as a prefork pool process); yield its pid, then
    wait for it. The child always leaves with ``os._exit``."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            body()
            code = 0
        finally:
            os._exit(code)
    try:
        yield pid
    finally:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.filterwarnings("ignore:.*fork.*:DeprecationWarning")
class TestPreforkInProcess:
    """Multiprocess mode: pool processes forked after worker_init, values in files."""

    def test_children_summed_dead_ones_dropped(self, start: Starter, tmp_path: Path) -> None:
        """Counters add up over the children; a child's open sessions stop counting when it
        exits, whether it said so (worker_process_shutdown) or was killed."""
        directory = tmp_path / "prom"
        stale_counter(directory)
        stale = set(directory.glob("*.db"))
        settings = start("prefork", MAILWORKER_METRICS_DIR=str(directory))
        assert settings.metrics_port is not None
        assert not stale & set(directory.glob("*.db")), "the directory was not emptied"
        read_end, write_end = os.pipe()

        def polite() -> None:
            metrics.message("default", "sent", duration=0.1)
            metrics.session_open("default", +1)
            signals.worker_process_shutdown.send(sender=None, pid=os.getpid(), exitcode=0)

        def killed() -> None:  # exits without a word, as after SIGKILL
            metrics.message("default", "sent", duration=0.1)
            metrics.session_open("default", +1)

        def waiting() -> None:
            metrics.session_open("default", +1)
            os.close(write_end)
            os.read(read_end, 1)

        def one_live_session() -> Samples | None:
            got = scrape(port)
            return got if value(got, "mailworker_smtp_sessions_open", profile="default") else None

        port = settings.metrics_port
        with forked(polite), forked(killed):
            pass
        with forked(waiting):
            os.close(read_end)
            got = wait_for(one_live_session, 10, "the live child's session")
            os.close(write_end)
        assert value(got, "mailworker_smtp_sessions_open", profile="default") == 1
        assert value(got, "mailworker_messages_total", profile="default", outcome="sent") == 2
        assert value(got, "mailworker_send_duration_seconds_count", profile="default") == 2
        assert "mailworker_stale_total" not in names(got)
        assert "process_cpu_seconds_total" not in names(got)
        after = scrape(settings.metrics_port)
        assert value(after, "mailworker_smtp_sessions_open", profile="default") == 0

    def test_restored_after_shutdown(self, start: Starter) -> None:
        """Stopping undoes PROMETHEUS_MULTIPROC_DIR and in-memory values come back."""
        from prometheus_client import values  # noqa: PLC0415

        previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        start("prefork")
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"]
        metrics._stop()
        assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") == previous
        assert values.ValueClass is values.MutexValue

    def test_directory_one_worker(self, start: Starter, tmp_path: Path, redis_url: str) -> None:
        """A second worker on the same directory gets no metrics (and says why); the
        first worker's files are left alone."""
        directory = tmp_path / "shared"
        settings = start("prefork", MAILWORKER_METRICS_DIR=str(directory))
        metrics.retry_scheduled()
        env = metrics_env(redis_url, MAILWORKER_METRICS_DIR=str(directory))
        output = run_worker_init(env, "prefork")
        assert "metrics.unavailable" in output
        assert "in use by another worker" in output
        assert settings.metrics_port is not None
        assert value(scrape(settings.metrics_port), "mailworker_retries_scheduled_total") == 1

    def test_private_directory_removed(self, redis_url: str) -> None:
        """Without MAILWORKER_METRICS_DIR a new private directory is used, and removed
        when the worker's main process exits."""
        output = run_worker_init(metrics_env(redis_url), "prefork", "print(d, flush=True)")
        directory = Path(output.strip().splitlines()[-1])
        assert directory.name.startswith("mailworker-metrics-")
        assert not directory.exists()


def run_worker_init(env: dict[str, str], pool: str, then: str = "") -> str:
    """Run install() and worker_init in a new Python process; its output."""
    code = textwrap.dedent(
        f"""
        import os
        from celery import Celery, signals
        from mailworker.worker import metrics
        from mailworker.worker.settings import Settings
        app = Celery("other", set_as_current=False)
        metrics.install(app, Settings.from_env())
        class Worker:
            app, pool_cls = app, {pool!r}
        signals.worker_init.send(sender=Worker())
        d = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        {then}
        """
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("MAILWORKER_")}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout + done.stderr


#: Until the lead wires ``metrics.install`` into the worker: a module the worker imports
#: (``--include``) that installs the metrics on the worker's app. Harmless after (once
#: per app).
HOOK = """
from celery import current_app

from mailworker.worker import metrics
from mailworker.worker.app import settings_of

app = current_app._get_current_object()
metrics.install(app, settings_of(app))
"""

#: Messages per run; one of them to a recipient the server refuses for good.
MESSAGES = 20
BAD = "bad@example.org"


@pytest.mark.slow
class TestWorker:
    """A real ``mailworker worker`` with the prefork pool and two processes."""

    @staticmethod
    def run(
        env: dict[str, str],
        smtpd: SMTPServer,
        dlq: DeadLetterStore,
        start_worker: Callable[..., WorkerProcess],
        tmp_path: Path,
    ) -> tuple[int, set[str]]:
        """Send :data:`MESSAGES` messages (one to :data:`BAD`) through a worker with
        metrics and a metrics directory that held a stale counter; wait until they are
        through. Returns the metrics port and the stale file names."""
        from mailworker.worker.tasks import send_mail  # noqa: PLC0415

        (tmp_path / "mw_metrics_hook.py").write_text(HOOK)
        directory = tmp_path / "prom"
        stale_counter(directory)
        stale = {f.name for f in directory.glob("*.db")}
        port = free_port()
        env = {
            **env,
            "MAILWORKER_METRICS_PORT": str(port),
            "MAILWORKER_METRICS_ADDR": "127.0.0.1",
            "MAILWORKER_METRICS_DIR": str(directory),
            "PYTHONPATH": os.pathsep.join(
                [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        smtpd.handler.rcpt_replies[BAD] = "550 5.1.1 no such user"
        worker = start_worker(env, concurrency=2, extra_args=("--include", "mw_metrics_hook"))
        assert listening(port), worker.output()[-3000:]
        with producer(env):
            for n in range(MESSAGES):
                to = BAD if n == 0 else f"user{n}@example.org"
                send_mail.delay(to=to, subject=f"metrics {n}", text="hi")
            wait_for(
                lambda: len(smtpd.handler.messages) == MESSAGES - 1 and dlq.count() == 1,
                30,
                "19 messages sent and 1 dead letter",
            )
        assert not stale & {f.name for f in directory.glob("*.db")}, "not emptied"
        return port, stale

    def test_endpoint(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        dlq: DeadLetterStore,
        start_worker: Callable[..., WorkerProcess],
        tmp_path: Path,
    ) -> None:
        """The main process serves the pool's metrics from a directory emptied at start,
        with the dead-letter store's size and the breakers read from Redis."""
        port, _ = self.run(env, smtpd, dlq, start_worker, tmp_path)
        got = scrape(port)
        assert value(got, "mailworker_dead_letters") == dlq.count() == 1
        assert value(got, "mailworker_breaker_open", profile="default") == 0
        assert "mailworker_stale_total" not in names(got)
        assert "process_cpu_seconds_total" not in names(got), "multiprocess: no process_*"
        assert (
            value(got, "mailworker_messages_total", profile="default", outcome="sent") is not None
        )

    def test_counters(
        self,
        env: dict[str, str],
        smtpd: SMTPServer,
        dlq: DeadLetterStore,
        start_worker: Callable[..., WorkerProcess],
        tmp_path: Path,
    ) -> None:
        """The counters agree with what the SMTP server received."""
        port, _ = self.run(env, smtpd, dlq, start_worker, tmp_path)
        received = len(smtpd.handler.messages)

        def settled() -> Samples | None:
            # A counter moves just after the server's reply: poll a little.
            got = scrape(port)
            sent = value(got, "mailworker_messages_total", profile="default", outcome="sent")
            return got if sent == received else None

        with contextlib.suppress(TimeoutError):
            wait_for(settled, 5, "the sent counter")
        got = scrape(port)

        def count(name: str, **labels: str) -> float:
            return value(got, name, profile="default", **labels) or 0.0

        assert count("mailworker_messages_total", outcome="sent") == received == MESSAGES - 1
        assert count("mailworker_messages_total", outcome="dead_lettered") == dlq.count() == 1
        assert count("mailworker_messages_total", outcome="deferred") == 0
        assert count("mailworker_recipients_total", outcome="accepted") == received
        assert count("mailworker_recipients_total", outcome="rejected") == 1
        assert count("mailworker_send_duration_seconds_count") == MESSAGES
        assert count("mailworker_smtp_replies_total", code="550") == 1
        assert count("mailworker_smtp_replies_total", code="250") >= received
        connections = count("mailworker_smtp_connections_total")
        assert 1 <= connections <= smtpd.handler.counts["connections"]
        assert 0 <= count("mailworker_smtp_sessions_open") <= min(connections, 2)
        assert value(got, "mailworker_retries_scheduled_total") == 0
