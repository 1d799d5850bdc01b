"""Smoke tests of ``examples/``: each example runs as its README says, against real parts.

A private ``redis-server`` and an aiosmtpd server stand in for Redis and
``mailworker devserver``. The Django project runs as processes (``manage.py check``,
``manage.py mailworker_worker``, ``manage.py runserver``); the Flask app and
``send_one.py`` use a ``mailworker worker`` subprocess.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ReceivedMessage, RedisServer, SMTPServer, free_port
from tests.worker_process import WorkerProcess, worker_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DJANGO_PROJECT = EXAMPLES / "django_project"


@dataclass
class Stack:
    """Redis, an SMTP server, and a ``mailworker worker`` on database 0 delivering to it."""

    redis: RedisServer
    server: SMTPServer
    worker: WorkerProcess
    logs: Path

    def wait_for(
        self, subject: str, to: str | None = None, timeout: float = 20.0
    ) -> ReceivedMessage:
        """The message with ``subject`` (and recipient ``to``), once the server has it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in list(self.server.handler.messages):
                if message.parsed()["Subject"] == subject and to in (None, *message.rcpt_tos):
                    return message
            time.sleep(0.05)
        raise AssertionError(f"no message {subject!r} arrived within {timeout}s")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The servers and worker the examples run against."""
    logs = tmp_path_factory.mktemp("examples")
    with RedisServer() as redis_server, SMTPServer() as server:
        env = worker_env(redis_server.url_for(0), {"default": f"smtp://127.0.0.1:{server.port}"})
        with WorkerProcess(env, logs / "worker.log", concurrency=1, name="examples") as worker:
            try:
                yield Stack(redis_server, server, worker, logs)
            finally:
                worker.kill()  # a warm shutdown takes seconds; nothing here needs it


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without MAILWORKER_* or Django settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MAILWORKER_") and k != "DJANGO_SETTINGS_MODULE"
    }
    env.update(extra, PYTHONUNBUFFERED="1")
    return env


class Process:
    """A subprocess in its own process group, output to a file."""

    def __init__(self, args: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                args,
                env=dict(env),
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        """What it wrote so far."""
        return self.log.read_text(errors="replace")

    def wait_for_output(self, marker: str, timeout: float = 30.0) -> None:
        """Wait until ``marker`` is in its output."""
        deadline = time.monotonic() + timeout
        while marker not in self.output():
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {marker!r} in the output:\n{self.output()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the whole group and reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


@contextlib.contextmanager
def running(args: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> Iterator[Process]:
    """Run ``args`` for the duration of the block."""
    process = Process(args, env, cwd, log)
    try:
        yield process
    finally:
        process.kill()


def _post(url: str, data: dict[str, str], timeout: float = 20.0) -> tuple[int, dict[str, Any]]:
    """POST a form, retrying while the server is still starting."""
    body = urllib.parse.urlencode(data).encode()
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, data=body, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.URLError as exc:
            if not isinstance(exc.reason, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


#: Run by ``manage.py shell -c``: POST each form in $EXAMPLE_FORMS (JSON) to /welcome/
#: with Django's test client, print ``[[status, answer], ...]`` as JSON.
DJANGO_CLIENT = """
import json, os
from django.test import Client
client = Client(HTTP_HOST="localhost")
answers = []
for form in json.loads(os.environ["EXAMPLE_FORMS"]):
    response = client.post("/welcome/", form)
    answers.append([response.status_code, response.json()])
print(json.dumps(answers))
"""


class TestDjangoProject:
    """examples/django_project, run as its README says."""

    def test_invalid_form_is_400(self, stack: Stack) -> None:
        """A bad address gets 400 with the form's errors by field, not a 500 traceback;
        one only mailworker refuses gets 400 with mailworker's message."""
        long_local = "a" * 65 + "@example.org"  # Django's EmailField lets it through
        forms = [{"email": "bad", "name": "Ann"}, {"name": "Ann"}, {"email": long_local}]
        env = _clean_env(
            CELERY_BROKER_URL=stack.redis.url_for(2),
            PYTHONPATH=str(DJANGO_PROJECT),
            EXAMPLE_FORMS=json.dumps(forms),
        )
        done = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", DJANGO_CLIENT],
            env=env, cwd=DJANGO_PROJECT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Traceback" not in done.stderr
        bad, missing, too_long = json.loads(done.stdout.splitlines()[-1])
        assert bad == [400, {"errors": {"email": [
            {"message": "Enter a valid email address.", "code": "invalid"}
        ]}}]  # fmt: skip
        assert missing[0] == 400
        assert missing[1]["errors"]["email"][0]["message"] == "This field is required."
        assert too_long[0] == 400
        [error] = too_long[1]["errors"]["__all__"]
        assert error["message"] == (
            f"recipients[0]: {long_local!r} is not a valid email address "
            "(local part is longer than 64 octets)"
        )

    def test_welcome_view_sends_mail(self, stack: Stack) -> None:
        """check passes; mailworker_worker (from settings) delivers the view's welcome mail."""
        env = _clean_env(
            CELERY_BROKER_URL=stack.redis.url_for(2),
            EMAIL_HOST="127.0.0.1",
            EMAIL_PORT=str(stack.server.port),
            PYTHONPATH=str(DJANGO_PROJECT),
        )
        manage = [sys.executable, "manage.py"]
        check = subprocess.run(
            [*manage, "check", "--fail-level", "WARNING"],
            env=env,
            cwd=DJANGO_PROJECT,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert check.returncode == 0, check.stdout + check.stderr
        worker_args = [
            *manage, "mailworker_worker",
            "--concurrency", "1", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
        ]  # fmt: skip
        port = free_port()
        web_args = [*manage, "runserver", "--noreload", f"127.0.0.1:{port}"]
        with (
            running(worker_args, env, DJANGO_PROJECT, stack.logs / "django-worker.log") as worker,
            running(web_args, env, DJANGO_PROJECT, stack.logs / "runserver.log") as web,
        ):
            status, answer = _post(
                f"http://127.0.0.1:{port}/welcome/", {"email": "ann@example.org", "name": "Ann"}
            )
            assert status == 202, web.output()
            assert answer["queued"] == 1
            worker.wait_for_output(" ready.")
            try:
                got = stack.wait_for("Welcome, Ann!")
            except AssertionError:
                pytest.fail("not delivered; worker output:\n" + worker.output()[-3000:])
        assert got.rcpt_tos == ("ann@example.org",)
        assert got.mail_from == "shop@example.com"
        message = got.parsed()
        html = message.get_body(("html",))
        assert html is not None
        assert "<b>Example Shop</b>" in html.get_content()
        (attachment,) = message.iter_attachments()
        assert attachment.get_filename() == "getting-started.txt"
        assert "Getting started" in attachment.get_content()
        # The worker was the management command's, with the settings' profile.
        assert "mailworker.send_message" in worker.output()


class TestFlaskApp:
    """examples/flask_app/app.py."""

    @pytest.fixture
    def example(self) -> Any:
        spec = importlib.util.spec_from_file_location(
            "mailworker_example_flask_app", EXAMPLES / "flask_app" / "app.py"
        )
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    def test_contact_route_sends_mail(self, stack: Stack, example: Any) -> None:
        """POST /contact is delivered to support with Reply-To, HTML and attachment."""
        app = example.create_app({"MAILWORKER_BROKER_URL": stack.redis.url_for(0)})
        form = {"email": "ann@example.org", "message": "Hello there"}
        response = app.test_client().post("/contact", data=form)
        assert response.status_code == 202
        got = stack.wait_for("Contact form: ann@example.org")
        assert got.rcpt_tos == ("support@example.com",)
        message = got.parsed()
        assert message["Reply-To"] == "ann@example.org"
        (attachment,) = message.iter_attachments()
        assert attachment.get_content() == "Hello there"

    def test_invalid_address_is_400(self, stack: Stack, example: Any) -> None:
        """POST /contact with email=bad gets 400 and the error naming the field, not a 500."""
        app = example.create_app({"MAILWORKER_BROKER_URL": stack.redis.url_for(0)})
        form = {"email": "bad", "message": "Hello there"}
        response = app.test_client().post("/contact", data=form)
        assert response.status_code == 400
        assert response.json == {
            "error": "reply_to: 'bad' is not a valid email address (expected exactly one '@')",
            "field": "reply_to",
        }

    def test_send_test_command(self, stack: Stack, example: Any) -> None:
        """flask send-test waits for the worker and prints the outcome."""
        app = example.create_app({"MAILWORKER_BROKER_URL": stack.redis.url_for(0)})
        result = app.test_cli_runner().invoke(args=["send-test", "bob@example.org"])
        assert result.exit_code == 0, result.output
        assert re.fullmatch(r"sent: <\S+@example\.com> 250 .*\n", result.output), result.output
        assert stack.wait_for("mailworker test", to="bob@example.org")

    def test_send_test_command_deferred(self, stack: Stack, example: Any) -> None:
        """When the first attempt gets 451, send-test prints the deferral and exits 1;
        the worker's retry delivers the message later."""
        app = example.create_app({"MAILWORKER_BROKER_URL": stack.redis.url_for(0)})
        stack.server.handler.rcpt_replies_once["dana@example.org"] = "451 4.2.0 Greylisted"
        result = app.test_cli_runner().invoke(args=["send-test", "dana@example.org"])
        assert result.exit_code == 1, result.output
        assert result.output.startswith("deferred: <"), result.output
        assert "451" in result.output
        assert "Greylisted" in result.output
        assert re.search(r"\(retry at \d\d:\d\d:\d\d\)\n$", result.output), result.output
        assert stack.wait_for("mailworker test", to="dana@example.org")


class TestSendOne:
    """examples/send_one.py."""

    def test_enqueue_and_wait(self, stack: Stack) -> None:
        """The script enqueues, waits, prints the result as JSON and exits 0."""
        env = _clean_env(MAILWORKER_BROKER_URL=stack.redis.url_for(0))
        done = subprocess.run(
            [sys.executable, str(EXAMPLES / "send_one.py"), "--to", "carol@example.org",
             "--subject", "One message", "--timeout", "20"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        outcome = json.loads(done.stdout)
        assert outcome["status"] == "sent"
        assert outcome["accepted"] == ["carol@example.org"]
        got = stack.wait_for("One message")
        assert got.parsed()["Message-ID"] == outcome["message_id"]
        assert got.mail_from == "app@example.com"  # the worker's MAILWORKER_DEFAULT_FROM
