"""The Flask extension: ``MailWorker`` reading ``app.config``, sending from routes and CLI.

End-to-end tests use a private ``redis-server``, a real ``mailworker worker`` subprocess
and an aiosmtpd server; the others inspect the tasks left on an idle Redis database.
"""

from __future__ import annotations

import base64
import importlib
import json
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from celery import Celery
from flask import Flask, jsonify, request

from mailworker.contrib import MissingExtraError, PublishError
from mailworker.contrib.flask import MailWorker
from mailworker.errors import ConfigError, InvalidMessageError
from tests.servers import RedisServer, SMTPServer, free_port
from tests.worker_process import WorkerProcess, worker_env

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)
PDF = b"%PDF-1.4 not really\x00\xff\xfe"

#: The extension, created once and bound to apps by the factory (the app-factory pattern).
mail = MailWorker()


def create_app(**config: Any) -> Flask:
    """An app factory like a user's: config, extension, a route and a CLI command."""
    app = Flask(__name__)
    app.config.update({"MAILWORKER_DEFAULT_FROM": "Shop <shop@example.com>", **config})
    mail.init_app(app)

    @app.post("/signup")
    def signup() -> Any:
        email = request.form["email"]
        result = mail.send(
            to=email,
            subject="Welcome to the shop",
            text="Welcome!",
            html='<p>Welcome!</p><img src="cid:logo">',
            attachments=[
                ("terms.pdf", PDF, "application/pdf"),
                {"filename": "logo.png", "content": PNG, "content_id": "logo"},
            ],
        )
        return jsonify(task_id=result.id), 202

    @app.cli.command("send-test")
    @click.argument("to")
    def send_test(to: str) -> None:
        outcome = mail.send(to=to, subject="Test from the CLI", text="It works.").get(timeout=20)
        click.echo(outcome["status"])

    return app


@dataclass
class Stack:
    """A worker on database 0 of a private Redis, delivering to ``server``."""

    redis: RedisServer
    server: SMTPServer
    worker: WorkerProcess

    @property
    def broker_url(self) -> str:
        """The database the worker consumes from."""
        return self.redis.url_for(0)

    def delivered(self, before: int, count: int = 1) -> list[Any]:
        """Wait for ``count`` messages after the first ``before``."""
        try:
            return self.server.handler.wait_for_messages(before + count, timeout=15)[before:]
        except TimeoutError:
            pytest.fail("not delivered; worker output:\n" + self.worker.output()[-3000:])


@dataclass
class IdleBroker:
    """Database 1 of the private Redis, which no worker reads."""

    redis: RedisServer

    @property
    def url(self) -> str:
        """Its URL."""
        return self.redis.url_for(1)

    def queued(self, queue: str = "celery") -> list[dict[str, Any]]:
        """Tasks waiting in ``queue``, oldest first: their headers and kwargs."""
        client = self.redis.client(1)
        try:
            raw = client.lrange(queue, 0, -1)
        finally:
            client.close()
        tasks = []
        for item in reversed(raw):
            envelope = json.loads(item)
            _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            tasks.append({"headers": envelope["headers"], "kwargs": kwargs})
        return tasks


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    """This module's own ``redis-server``."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def stack(private_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """An SMTP server and ``mailworker worker --concurrency 1`` for this module."""
    with SMTPServer() as server:
        env = worker_env(private_redis.url_for(0), {"default": f"smtp://127.0.0.1:{server.port}"})
        log = tmp_path_factory.mktemp("flask-worker") / "worker.log"
        with WorkerProcess(env, log, concurrency=1, name="flask") as worker:
            try:
                yield Stack(private_redis, server, worker)
            finally:
                worker.kill()  # a warm shutdown takes seconds; nothing here needs it


@pytest.fixture
def idle(private_redis: RedisServer) -> Iterator[IdleBroker]:
    """The idle database, emptied before and after the test."""
    client = private_redis.client(1)
    client.flushdb()
    try:
        yield IdleBroker(private_redis)
    finally:
        client.flushdb()
        client.close()


class TestDelivery:
    """Mail sent from Flask reaches the SMTP server through the real worker."""

    def test_route_sends_mail(self, stack: Stack) -> None:
        """A route's mail.send() is delivered with its HTML part and attachments."""
        app = create_app(MAILWORKER_BROKER_URL=stack.broker_url)
        before = len(stack.server.handler.messages)
        response = app.test_client().post("/signup", data={"email": "Ann <ann@example.org>"})
        assert response.status_code == 202
        assert response.get_json()["task_id"]
        (got,) = stack.delivered(before)
        assert got.rcpt_tos == ("ann@example.org",)
        assert got.mail_from == "shop@example.com"
        message = got.parsed()
        assert message["Subject"] == "Welcome to the shop"
        assert message["To"] == "Ann <ann@example.org>"
        html = message.get_body(("html",))
        assert html is not None
        assert "Welcome!" in html.get_content()
        parts = {part.get_filename(): part for part in message.walk() if part.get_filename()}
        assert parts["terms.pdf"].get_content() == PDF
        assert parts["logo.png"]["Content-ID"] == "<logo>"
        assert parts["logo.png"].get_content() == PNG

    def test_cli_command_waits_for_result(self, stack: Stack) -> None:
        """In a CLI command, send() returns an AsyncResult whose get() gives the outcome."""
        app = create_app(MAILWORKER_BROKER_URL=stack.broker_url)
        before = len(stack.server.handler.messages)
        result = app.test_cli_runner().invoke(args=["send-test", "bob@example.org"])
        assert result.exit_code == 0, result.output
        assert result.output.strip() == "sent"
        (got,) = stack.delivered(before)
        assert got.parsed()["Subject"] == "Test from the CLI"

    def test_send_from_another_thread(self, stack: Stack) -> None:
        """A thread with an app context publishes to the configured broker (Celery's
        thread-local current app is never consulted)."""
        app = create_app(MAILWORKER_BROKER_URL=stack.broker_url)
        before = len(stack.server.handler.messages)
        errors: list[BaseException] = []

        def work() -> None:
            try:
                with app.app_context():
                    mail.send(to="carol@example.org", subject="From a thread", text="x")
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=work)
        thread.start()
        thread.join(10)
        assert errors == []
        (got,) = stack.delivered(before)
        assert got.parsed()["Subject"] == "From a thread"


class TestTask:
    """What MailWorker.send() puts on the broker."""

    def test_kwargs_and_attachment_forms(self, idle: IdleBroker, tmp_path: Path) -> None:
        """Attachments as a path, tuples and dicts are base64-encoded; str content is UTF-8."""
        path = tmp_path / "report.csv"
        path.write_bytes(b"a,b\n1,2\n")
        app = create_app(MAILWORKER_BROKER_URL=idle.url)
        with app.app_context():
            result = mail.send(
                to=["ann@example.org", "bob@example.org"],
                subject="Report",
                text="See attached.",
                cc="carl@example.org",
                reply_to=["help@example.com"],
                headers={"X-Report": "daily"},
                attachments=[
                    path,
                    ("notes.txt", "Grüße"),
                    {"filename": "raw.bin", "content": b"\x00\x01", "mimetype": "x/y"},
                ],
                idempotency_key="report-2025-07-01",
            )
        (task,) = idle.queued()
        assert task["headers"]["task"] == "mailworker.send_mail"
        assert task["headers"]["id"] == result.id
        kwargs = task["kwargs"]
        attachments = kwargs.pop("attachments")
        assert kwargs == {
            "to": ["ann@example.org", "bob@example.org"],
            "subject": "Report",
            "text": "See attached.",
            "from_email": "Shop <shop@example.com>",
            "cc": "carl@example.org",
            "reply_to": ["help@example.com"],
            "headers": {"X-Report": "daily"},
            "profile": "default",
            "idempotency_key": "report-2025-07-01",
        }
        assert attachments == [
            {"filename": "report.csv", "content": base64.b64encode(b"a,b\n1,2\n").decode()},
            {"filename": "notes.txt", "content": base64.b64encode("Grüße".encode()).decode()},
            {"filename": "raw.bin", "content": "AAE=", "mimetype": "x/y"},
        ]

    def test_app_factory_keeps_apps_apart(self, idle: IdleBroker) -> None:
        """Two apps from one factory publish with their own queue, profile and sender."""
        shop = create_app(MAILWORKER_BROKER_URL=idle.url, MAILWORKER_QUEUE="shop")
        news = create_app(
            MAILWORKER_BROKER_URL=idle.url,
            MAILWORKER_QUEUE="news",
            MAILWORKER_PROFILE="bulk",
            MAILWORKER_DEFAULT_FROM="News <news@example.com>",
        )
        for app in (shop, news):
            with app.app_context():
                mail.send(to="ann@example.org", subject=app.config["MAILWORKER_QUEUE"], text="x")
        (shop_task,) = idle.queued("shop")
        (news_task,) = idle.queued("news")
        assert (shop_task["kwargs"]["profile"], shop_task["kwargs"]["from_email"]) == (
            "default",
            "Shop <shop@example.com>",
        )
        assert (news_task["kwargs"]["profile"], news_task["kwargs"]["from_email"]) == (
            "bulk",
            "News <news@example.com>",
        )

    def test_bound_extension_needs_no_context(self, idle: IdleBroker) -> None:
        """MailWorker(app) sends without an app context; per-call profile wins."""
        app = Flask("bound")
        app.config["MAILWORKER_BROKER_URL"] = idle.url
        bound = MailWorker(app)
        bound.send(
            to="a@example.org", subject="s", text="t", from_email="x@example.com", profile="p"
        )
        (task,) = idle.queued()
        assert task["kwargs"]["profile"] == "p"
        assert "from_email" in task["kwargs"]

    def test_without_default_from_the_worker_decides(self, idle: IdleBroker) -> None:
        """With no sender configured the task has none: the worker's default applies."""
        app = Flask("nofrom")
        app.config["MAILWORKER_BROKER_URL"] = idle.url
        MailWorker(app).send(to="a@example.org", subject="s", text="t")
        (task,) = idle.queued()
        assert "from_email" not in task["kwargs"]

    def test_project_celery_app(self, idle: IdleBroker) -> None:
        """MAILWORKER_CELERY_APP publishes through the project's Celery app."""
        celery_app = Celery("flaskproj", set_as_current=False, broker=idle.url)
        try:
            app = Flask("withcelery")
            app.config["MAILWORKER_CELERY_APP"] = celery_app
            result = MailWorker(app).send(to="a@example.org", subject="s", text="t")
            assert result.app is celery_app
        finally:
            celery_app.close()
        assert len(idle.queued()) == 1


class TestErrors:
    """Mistakes fail in the caller, with the name of what to fix."""

    def test_invalid_message_not_published(self, idle: IdleBroker) -> None:
        """An invalid address raises InvalidMessageError naming the field; nothing is queued."""
        app = create_app(MAILWORKER_BROKER_URL=idle.url)
        with app.app_context(), pytest.raises(InvalidMessageError) as info:
            mail.send(to=["ann@example.org", "not an address"], subject="s", text="t")
        assert info.value.field == "to[1]"
        assert idle.queued() == []

    def test_bad_attachment(self) -> None:
        """An attachment of the wrong shape is refused before anything is sent."""
        app = create_app(MAILWORKER_BROKER_URL="redis://127.0.0.1:1/0")
        with app.app_context(), pytest.raises(TypeError, match=r"attachments\[0\]: content"):
            mail.send(to="a@example.org", subject="s", text="t", attachments=[("a.txt", 3)])

    def test_outside_app_context(self) -> None:
        """An unbound extension outside an app context says so."""
        with pytest.raises(RuntimeError, match="application context"):
            mail.send(to="a@example.org", subject="s", text="t")

    def test_not_initialised(self) -> None:
        """An app the extension was not initialised for says how to fix it."""
        with Flask("other").app_context(), pytest.raises(RuntimeError, match=r"init_app"):
            MailWorker().send(to="a@example.org", subject="s", text="t")

    @pytest.mark.parametrize(
        ("config", "name"),
        [
            ({"MAILWORKER_QUEUE": ""}, 'app.config["MAILWORKER_QUEUE"]'),
            ({"MAILWORKER_BROKER_URL": 6379}, 'app.config["MAILWORKER_BROKER_URL"]'),
            (
                {"MAILWORKER_BROKER_URL": "redis://x", "MAILWORKER_CELERY_APP": "proj:app"},
                'app.config["MAILWORKER_CELERY_APP"]',
            ),
        ],
    )
    def test_malformed_config(self, config: dict[str, Any], name: str) -> None:
        """init_app refuses a malformed setting, naming it."""
        app = Flask("bad")
        app.config.update(config)
        with pytest.raises(ConfigError, match=re.escape(name)):
            MailWorker(app)

    def test_broker_unreachable(self) -> None:
        """An unreachable broker raises PublishError (a ConnectionError) with its redacted URL."""
        app = Flask("down")
        app.config["MAILWORKER_BROKER_URL"] = f"redis://:hunter22@127.0.0.1:{free_port()}/0"
        with pytest.raises(PublishError, match=r"could not publish mailworker\.send_mail") as info:
            MailWorker(app).send(to="a@example.org", subject="s", text="t", from_email="a@b.org")
        assert isinstance(info.value, ConnectionError)
        assert "hunter22" not in str(info.value)

    def test_missing_flask(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without Flask the import says pip install "mailworker[flask]"."""
        monkeypatch.setitem(sys.modules, "flask", None)
        monkeypatch.delitem(sys.modules, "mailworker.contrib.flask")
        with pytest.raises(ImportError, match=re.escape('pip install "mailworker[flask]"')) as info:
            importlib.import_module("mailworker.contrib.flask")
        assert isinstance(info.value, MissingExtraError)
