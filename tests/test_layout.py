"""The package as a user imports it: nothing happens at import time, a web process that
only publishes loads no worker machinery, and publishing follows the app the program
configured, from any thread."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from mailworker.dev.server import DevServer
from mailworker.queue.names import SEND_MAIL
from mailworker.store.ledger import Ledger
from mailworker.worker import app as worker_app
from mailworker.worker.app import configure
from mailworker.worker.settings import Settings
from tests.servers import RedisServer

ROOT = Path(__file__).resolve().parents[1]
#: What a process that only publishes must not load.
WORKER_MACHINERY = ("mailworker.worker", "mailworker.store", "tenacity")


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter from the repository root."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        check=False,
    )


def loaded_modules(*imports: str) -> list[str]:
    """The modules a fresh interpreter holds after ``import`` of each of ``imports``."""
    lines = "".join(f"import {name}\n" for name in imports)
    done = run_python(lines + "import json, sys; print(json.dumps(sorted(sys.modules)))")
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def queued_tasks(client: redis.Redis) -> list[str]:
    """Names of the tasks waiting in Celery's default queue."""
    return [json.loads(raw)["headers"]["task"] for raw in client.lrange("celery", 0, -1)]


@pytest.fixture
def publishing_app_restored() -> Iterator[None]:
    """configure() makes an app the publishing one: put the previous one back after."""
    previous = list(worker_app._publishing)
    yield
    worker_app._publishing[:] = previous


class TestNothingAtImport:
    """Importing mailworker reads no settings and loads only what the importer needs."""

    @pytest.mark.parametrize(
        "module", ["mailworker.contrib.django.backend", "mailworker.contrib.flask"]
    )
    def test_web_integrations_load_no_worker_machinery(self, module: str) -> None:
        """Importing the Django backend or the Flask extension loads no worker, store
        or tenacity module."""
        modules = loaded_modules(module)
        assert module in modules
        assert [m for m in modules if m.startswith(WORKER_MACHINERY)] == []

    def test_bad_worker_setting_does_not_break_imports(self) -> None:
        """A malformed MAILWORKER_TASK_TIME_LIMIT lets mailworker.tasks, the Celery app
        module and the public names import; the first publish names the variable."""
        done = run_python(
            """
            import mailworker.tasks, mailworker.celery_app, mailworker.logs
            from mailworker import send_mail
            from mailworker.errors import ConfigError
            print("imported")
            try:
                send_mail.delay(to="a@example.org", subject="s", text="t")
            except ConfigError as exc:
                print(exc)
            """,
            env={"MAILWORKER_TASK_TIME_LIMIT": "soon"},
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            "imported",
            "MAILWORKER_TASK_TIME_LIMIT='soon': expected a number",
        ]


class TestConfiguredApp:
    """configure(app, settings) decides what the tasks deliver with."""

    def test_tasks_deliver_with_the_configured_settings(
        self,
        redis_url: str,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        publishing_app_restored: None,
    ) -> None:
        """A task run in a configured app uses that configuration's time limit, SMTP
        profile and Redis, not the process environment's."""
        for var in ("MAILWORKER_SMTP_URL", "MAILWORKER_REDIS_URL", "MAILWORKER_BROKER_URL"):
            monkeypatch.delenv(var, raising=False)
        with DevServer(tmp_path / "mail", port=0) as server:
            settings = Settings.from_env(
                {
                    "MAILWORKER_BROKER_URL": redis_url,
                    "MAILWORKER_SMTP_URL": server.url("127.0.0.1"),
                    "MAILWORKER_VISIBILITY_TIMEOUT": "100",
                    "MAILWORKER_TASK_TIME_LIMIT": "30",
                }
            )
            app = Celery("configured", set_as_current=False, include=["mailworker.tasks"])
            configure(app, settings)
            app.loader.import_default_modules()
            task = app.tasks[SEND_MAIL]
            assert (task.time_limit, task.soft_time_limit) == (30, 27)

            kwargs: dict[str, Any] = {
                "to": "ann@example.org",
                "subject": "Configured",
                "text": "hi",
                "from_email": "shop@example.com",
                "idempotency_key": "configured-1",
            }
            outcome = task.apply(kwargs=kwargs).get()

            assert outcome["status"] == "sent"
            assert server.counters.messages == 1
            client = redis.Redis.from_url(redis_url)
            try:
                assert Ledger(client).sent("configured-1") is not None
            finally:
                client.close()


class TestPublishingThreads:
    """A web app publishes through its own Celery app from its request threads."""

    def test_threaded_flask_app_publishes_to_its_own_broker(
        self, redis_server: RedisServer, redis_url: str
    ) -> None:
        """Configured after mailworker was imported, a project's Celery app receives what
        send_mail.delay and the Flask extension publish from a threaded server's request
        threads; MAILWORKER_BROKER_URL's database receives nothing."""
        env_broker = redis_server.url_for(0)
        env_client = redis_server.client(0)
        own_client = redis.Redis.from_url(redis_url)
        env_client.flushdb()
        try:
            done = run_python(
                f"""
                import threading, urllib.request
                import mailworker
                from mailworker import send_mail
                from celery import Celery
                from flask import Flask
                from werkzeug.serving import make_server
                from mailworker.celery_app import configure
                from mailworker.contrib.flask import MailWorker

                project = Celery("proj", broker={redis_url!r}, include=["mailworker.tasks"])
                configure(project, broker=False)
                app = Flask("proj")
                app.config["MAILWORKER_CELERY_APP"] = project
                mail = MailWorker(app)
                fields = dict(to="ann@example.org", subject="s", text="t",
                              from_email="shop@example.com")

                @app.post("/delay")
                def delay():
                    return send_mail.delay(**fields).id

                @app.post("/extension")
                def extension():
                    return mail.send(**fields).id

                server = make_server("127.0.0.1", 0, app, threaded=True)
                threading.Thread(target=server.serve_forever, daemon=True).start()
                for path in ("/delay", "/extension"):
                    url = f"http://127.0.0.1:{{server.server_port}}{{path}}"
                    with urllib.request.urlopen(urllib.request.Request(url, method="POST")):
                        pass
                server.shutdown()
                print("published")
                """,
                env={"MAILWORKER_BROKER_URL": env_broker},
            )
            assert done.returncode == 0, done.stderr
            assert done.stdout.strip() == "published"
            assert queued_tasks(own_client) == [SEND_MAIL, SEND_MAIL]
            assert queued_tasks(env_client) == []
        finally:
            env_client.flushdb()
            env_client.close()
            own_client.close()
