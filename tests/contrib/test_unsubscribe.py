"""One-click unsubscribe and DSN through the entry points. Django: List-Unsubscribe in
``EmailMessage.headers`` arrives as Django wrote it, and ``get_connection(dsn=...)`` asks
for notifications. Flask's ``MailWorker.send`` and ``mailworker send`` take the same
arguments as the task.

Django's settings are those of tests/contrib/test_django.py (configured when it is
imported), so the modules can share an xdist worker. Delivery runs without Celery: the
backend's task arguments go through a :class:`Delivery` (real Redis) to a real server —
aiosmtpd, which records the exact bytes, or Postfix's smtp-sink, which offers DSN.
"""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from django.core import mail
from django.test import override_settings
from flask import Flask

from mailworker.cli import main
from mailworker.contrib.django.backend import task_kwargs
from mailworker.contrib.flask import MailWorker
from mailworker.dev.server import free_port
from mailworker.errors import InvalidMessageError
from mailworker.queue.names import SEND_MAIL, SEND_MESSAGE
from mailworker.smtp.profile import Profile
from mailworker.worker.delivery import Delivery
from mailworker.worker.sessions import SessionPool
from mailworker.worker.settings import Settings
from tests.contrib.test_django import BACKEND, FIXED
from tests.servers import SMTPServer
from tests.servers.sink import SMTPSink
from tests.worker_process import BASE_SETTINGS

HTTPS = "https://shop.example/unsubscribe?u=42&token=" + "a1B2c3" * 12
MAILTO = "mailto:unsubscribe@shop.example?subject=unsubscribe"
UNSUBSCRIBE = {
    "List-Unsubscribe": f"<{HTTPS}>, <{MAILTO}>",
    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
}
DSN_OPTION = {"notify": ["FAILURE", "DELAY"], "ret": "HDRS", "envid": "newsletter 7"}


def newsletter(**options: Any) -> Any:
    """A Django EmailMessage with one-click unsubscribe headers."""
    return mail.EmailMessage(
        "Newsletter",
        "Hello,\n\nnews.\n",
        "Shop <shop@example.com>",
        ["Ann <ann@example.org>"],
        headers={**FIXED, **UNSUBSCRIBE},
        **options,
    )


def queued(redis_url: str) -> list[dict[str, Any]]:
    """The kwargs of the tasks waiting in the ``celery`` queue, oldest first."""
    client = redis.Redis.from_url(redis_url)
    try:
        raw = client.lrange("celery", 0, -1)
    finally:
        client.close()
    return [json.loads(base64.b64decode(json.loads(item)["body"]))[1] for item in reversed(raw)]


def start_sink(tmp_path: Path) -> SMTPSink:
    """Postfix's smtp-sink (offers DSN) on a free port, dumping under ``tmp_path``."""
    (tmp_path / "dumps").mkdir()
    return SMTPSink(free_port(), tmp_path / "dumps", tmp_path / "sink.out").start()


@pytest.fixture
def deliver(redis_client: redis.Redis, redis_url: str) -> Iterator[Any]:
    """``deliver(port, kwargs)``: run send_message ``kwargs`` through a Delivery whose
    default profile is plain SMTP to 127.0.0.1:``port``; returns the task result."""
    made: list[Delivery] = []

    def run(port: int, kwargs: dict[str, Any], task: str = SEND_MESSAGE) -> Any:
        environ = {
            **{k: v for k, v in BASE_SETTINGS.items() if k != "MAILWORKER_LOG_FORMAT"},
            "MAILWORKER_BROKER_URL": redis_url,
            "MAILWORKER_SMTP_URL": f"smtp://127.0.0.1:{port}?timeout=5",
        }
        pool = SessionPool(lambda name: Profile.from_env(name, environ))
        delivery = Delivery(Settings.from_env(environ), redis_client, pool)
        made.append(delivery)
        result = delivery.run(task, f"entry-{len(made)}", kwargs)
        delivery.pool.close_all()
        return result

    yield run
    for delivery in made:
        delivery.pool.close_all()


class TestListUnsubscribe:
    """List-Unsubscribe and List-Unsubscribe-Post pass through in Django's own bytes."""

    def test_task_carries_djangos_bytes(self) -> None:
        """The task's message is Django's rendering, both fields in it as Django wrote
        them; nothing is added to the task but the message and its envelope."""
        message = newsletter()
        expected = message.message().as_bytes(linesep="\r\n")
        kwargs = task_kwargs(message)
        assert kwargs is not None
        assert set(kwargs) == {"raw_b64", "envelope_from", "recipients", "profile"}
        data = base64.b64decode(kwargs["raw_b64"])
        assert data == expected
        head = data.partition(b"\r\n\r\n")[0].decode("ascii")
        assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in head.split("\r\n")
        assert HTTPS in head.replace("\r\n ", " ")

    def test_delivered_unchanged(self, deliver: Any, smtp_server: Any, tmp_path: Path) -> None:
        """Delivered by the worker's machinery, the server receives exactly the bytes
        Django's SMTP backend would send; a reader finds both URIs and one-click."""
        server: SMTPServer = smtp_server()
        message = newsletter()
        state = random.getstate()
        try:
            random.seed(13)
            expected = message.message().as_bytes(linesep="\r\n")
            random.seed(13)
            kwargs = task_kwargs(message)
        finally:
            random.setstate(state)
        assert kwargs is not None
        assert deliver(server.port, kwargs)["status"] == "sent"
        [received] = server.handler.wait_for_messages(1)
        assert received.content == expected
        parsed = received.parsed()
        # Django folds a long value right after the name: the reader's value then starts
        # with the folding space.
        assert str(parsed["List-Unsubscribe"]).strip() == UNSUBSCRIBE["List-Unsubscribe"]
        assert str(parsed["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"


class TestDSN:
    """``get_connection(dsn=...)``: every message of the connection asks for DSN."""

    def test_queued_with_the_message(self, redis_url: str) -> None:
        """The published task carries the dsn option beside Django's bytes."""
        with override_settings(MAILWORKER={"BROKER_URL": redis_url}):
            connection = mail.get_connection(BACKEND, dsn=DSN_OPTION)
            assert connection.send_messages([newsletter()]) == 1
        [kwargs] = queued(redis_url)
        assert kwargs["dsn"] == DSN_OPTION
        assert b"List-Unsubscribe-Post" in base64.b64decode(kwargs["raw_b64"])

    def test_malformed_option_raises_before_publishing(self) -> None:
        """A bad dsn fails in the caller, naming the key (nothing is published)."""
        connection = mail.get_connection(BACKEND, dsn={"notify": ["SOMETIMES"]})
        with pytest.raises(InvalidMessageError, match=r"dsn\.notify"):
            connection.send_messages([newsletter()])

    def test_parameters_reach_postfix(self, deliver: Any, tmp_path: Path) -> None:
        """Delivered to smtp-sink (which offers DSN), MAIL carries RET and ENVID and
        RCPT carries NOTIFY and ORCPT."""
        sink = start_sink(tmp_path)
        try:
            kwargs = task_kwargs(newsletter(), dsn=DSN_OPTION)
            assert kwargs is not None
            assert deliver(sink.port, kwargs)["status"] == "sent"
            sink.settle(1)
        finally:
            sink.stop()
        [dump] = sink.dumps()
        assert dump.mail_args == "<shop@example.com> RET=HDRS ENVID=newsletter+207"
        assert dump.rcpt_args == (
            "<ann@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;ann@example.org",
        )


class TestFlask:
    """``MailWorker.send`` publishes the arguments; the worker writes and sends them."""

    def test_published_and_delivered(self, redis_url: str, deliver: Any, tmp_path: Path) -> None:
        """The task carries list_unsubscribe, list_unsubscribe_post and dsn; delivered to
        smtp-sink, the headers and the DSN parameters arrive."""
        app = Flask(__name__)
        app.config.update(
            MAILWORKER_BROKER_URL=redis_url, MAILWORKER_DEFAULT_FROM="Shop <shop@example.com>"
        )
        MailWorker(app).send(
            to="ann@example.org",
            subject="News",
            text="Hi",
            list_unsubscribe=(HTTPS, MAILTO),
            list_unsubscribe_post=True,
            dsn={"notify": ("NEVER",)},
        )
        [kwargs] = queued(redis_url)
        assert kwargs["list_unsubscribe"] == [HTTPS, MAILTO]
        assert kwargs["list_unsubscribe_post"] is True
        assert kwargs["dsn"] == {"notify": ["NEVER"]}
        sink = start_sink(tmp_path)
        try:
            assert deliver(sink.port, kwargs, SEND_MAIL)["status"] == "sent"
            sink.settle(1)
        finally:
            sink.stop()
        [dump] = sink.dumps()
        assert dump.rcpt_args == ("<ann@example.org> NOTIFY=NEVER ORCPT=rfc822;ann@example.org",)
        assert dump.header("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
        assert f"List-Unsubscribe: <{HTTPS}>,\n <{MAILTO}>\n".encode() in dump.content

    def test_invalid_before_publishing(self, redis_url: str) -> None:
        """An http: URI fails in the caller, naming the argument; nothing is queued."""
        app = Flask(__name__)
        app.config.update(MAILWORKER_BROKER_URL=redis_url)
        with pytest.raises(InvalidMessageError) as failure:
            MailWorker(app).send(
                to="ann@example.org",
                subject="News",
                text="Hi",
                from_email="shop@example.com",
                list_unsubscribe="http://shop.example/u",
            )
        assert failure.value.field == "list_unsubscribe"
        assert queued(redis_url) == []


class TestCommandLine:
    """``mailworker send --list-unsubscribe URI --list-unsubscribe-post``."""

    def test_sends_the_headers(self, smtp_server: Any) -> None:
        """The message goes out with both fields."""
        server: SMTPServer = smtp_server()
        env = {
            "MAILWORKER_SMTP_URL": f"smtp://127.0.0.1:{server.port}?timeout=5",
            "MAILWORKER_DEFAULT_FROM": "shop@example.com",
        }
        result = CliRunner().invoke(
            main,
            ["send", "--to", "ann@example.org", "--subject", "News", "--text", "Hi",
             "--list-unsubscribe", HTTPS, "--list-unsubscribe", MAILTO,
             "--list-unsubscribe-post"],
            env=env,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        [received] = server.handler.wait_for_messages(1)
        parsed = received.parsed()
        assert str(parsed["List-Unsubscribe"]) == f"<{HTTPS}>, <{MAILTO}>"
        assert str(parsed["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"

    def test_bad_uri_names_the_option(self) -> None:
        """A usage error names --list-unsubscribe."""
        result = CliRunner().invoke(
            main,
            ["send", "--to", "ann@example.org", "--subject", "s", "--text", "t",
             "--from", "shop@example.com", "--list-unsubscribe", "ftp://x.example/u"],
            env={"MAILWORKER_SMTP_URL": "smtp://127.0.0.1:1"},
        )  # fmt: skip
        assert result.exit_code == 2
        assert "--list-unsubscribe: list_unsubscribe[0]" in result.stderr
