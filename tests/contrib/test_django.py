"""The Django integration: the email backend, its settings, system checks and worker env.

Delivery tests run against real parts: a private ``redis-server``, a real
``mailworker worker`` subprocess delivering to an aiosmtpd server, and Django's own SMTP
backend delivering the same message to a second aiosmtpd server for comparison.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import random
import re
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.mime.image import MIMEImage
from typing import Any

import django
import pytest
from celery import Celery
from django.conf import settings
from django.core import mail
from django.core.checks import run_checks
from django.core.management import call_command
from django.test import override_settings

from mailworker.contrib import MissingExtraError, PublishError
from mailworker.contrib.django import worker_environ
from mailworker.contrib.django.management.commands.mailworker_worker import (
    Command,
    worker_command,
    worker_process_env,
)
from mailworker.errors import ConfigError, InvalidMessageError
from mailworker.smtp.profile import Profile
from mailworker.worker.settings import Settings
from tests.servers import ReceivedMessage, RedisServer, SMTPServer, free_port
from tests.worker_process import WorkerProcess, worker_env

BACKEND = "mailworker.contrib.django.EmailBackend"
SMTP_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
#: Fixed Date and Message-ID, for messages that can carry headers.
FIXED = {"Date": "Tue, 01 Jul 2025 10:00:00 +0000", "Message-ID": "<fixed-1@example.com>"}
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def _configure_django() -> None:
    if not settings.configured:
        settings.configure(
            INSTALLED_APPS=["mailworker.contrib.django"],
            EMAIL_BACKEND=BACKEND,
            DEFAULT_FROM_EMAIL="App <app@example.com>",
            SERVER_EMAIL="Server <server@example.com>",
            ADMINS=[("Ops", "ops@example.com"), ("Dev Team", "dev@example.org")],
            MAILWORKER={},
            LOGGING_CONFIG=None,
            USE_TZ=True,
        )
        django.setup()


_configure_django()


@dataclass
class Stack:
    """Two SMTP servers and a worker that delivers to ``server``."""

    redis: RedisServer
    server: SMTPServer
    reference: SMTPServer
    worker: WorkerProcess

    @property
    def broker_url(self) -> str:
        """The database the worker consumes from."""
        return self.redis.url_for(0)


@dataclass
class IdleBroker:
    """A database no worker reads: published tasks stay there to be inspected."""

    redis: RedisServer

    @property
    def url(self) -> str:
        """Its URL."""
        return self.redis.url_for(1)

    def queued(self, queue: str = "celery") -> list[dict[str, Any]]:
        """The tasks waiting in ``queue``, oldest first: their headers and kwargs."""
        client = self.redis.client(1)
        try:
            raw = client.lrange(queue, 0, -1)
        finally:
            client.close()
        tasks = []
        for item in reversed(raw):  # LPUSH: oldest last
            envelope = json.loads(item)
            assert envelope["content-type"] == "application/json"
            _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            tasks.append({"headers": envelope["headers"], "kwargs": kwargs})
        return tasks


@pytest.fixture(scope="module")
def private_redis() -> Iterator[RedisServer]:
    """This module's own ``redis-server``: database 0 for the worker, 1 for inspection."""
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def stack(private_redis: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A worker delivering to one SMTP server; a second server for Django's SMTP backend."""
    with SMTPServer() as server, SMTPServer() as reference:
        env = worker_env(private_redis.url_for(0), {"default": f"smtp://127.0.0.1:{server.port}"})
        log = tmp_path_factory.mktemp("django-worker") / "worker.log"
        with WorkerProcess(env, log, concurrency=1, name="django") as worker:
            try:
                yield Stack(private_redis, server, reference, worker)
            finally:
                worker.kill()  # a warm shutdown takes seconds; nothing here needs it


@pytest.fixture
def idle_broker(private_redis: RedisServer) -> Iterator[IdleBroker]:
    """Publish to the idle database (emptied before and after)."""
    client = private_redis.client(1)
    client.flushdb()
    try:
        with override_settings(MAILWORKER={"BROKER_URL": private_redis.url_for(1)}):
            yield IdleBroker(private_redis)
    finally:
        client.flushdb()
        client.close()


# -- byte-for-byte against Django's SMTP backend ------------------------------------------

#: One way of sending mail: called with ``None`` (the configured EMAIL_BACKEND, ours) or a
#: connection (Django's SMTP backend); returns what Django's API returned.
Sender = Callable[[Any], Any]


def _send_mail_text(connection: Any) -> Any:
    return mail.send_mail(
        "Plain subject",
        "Hello,\n\nthis is the body.\n",
        None,
        ["Ann Example <ann@example.org>", "bob@example.net"],
        connection=connection,
    )


def _send_mail_html(connection: Any) -> Any:
    return mail.send_mail(
        "HTML subject",
        "Text part",
        "Sender <sender@example.com>",
        ["ann@example.org"],
        html_message="<p>HTML <b>part</b></p>",
        connection=connection,
    )


def _send_mass_mail(connection: Any) -> Any:
    return mail.send_mass_mail(
        (
            ("Mass one", "First body", "app@example.com", ["one@example.org"]),
            ("Mass two", "Second body", "app@example.com", ["two@example.org", "x@example.net"]),
        ),
        connection=connection,
    )


def _mail_admins(connection: Any) -> Any:
    return mail.mail_admins(
        "Server error", "Traceback ...", html_message="<pre>Traceback ...</pre>",
        connection=connection,
    )  # fmt: skip


def _email_message_headers(connection: Any) -> Any:
    message = mail.EmailMessage(
        subject="Headers",
        body="Body with headers",
        from_email="Billing <billing@example.com>",
        to=["ann@example.org"],
        cc=["Carl <carl@example.org>"],
        bcc=["hidden@example.net"],
        reply_to=["help@example.com"],
        headers={**FIXED, "X-Campaign": "spring-2025", "List-Unsubscribe": "<mailto:u@x.org>"},
        connection=connection,
    )
    return message.send()


def _alternatives_attachments(connection: Any) -> Any:
    message = mail.EmailMultiAlternatives(
        subject="Invoice",
        body="Your invoice is attached.",
        to=["ann@example.org"],
        headers=FIXED,
        connection=connection,
    )
    message.attach_alternative('<p>Your invoice.</p><img src="cid:logo">', "text/html")
    message.attach("invoice.pdf", b"%PDF-1.4 fake\x00\xff binary", "application/pdf")
    message.attach("data.csv", "a,b\n1,2\n", "text/csv")
    logo = MIMEImage(PNG, "png")
    logo.add_header("Content-ID", "<logo>")
    logo.add_header("Content-Disposition", "inline", filename="logo.png")
    message.attach(logo)
    return message.send()


def _non_ascii(connection: Any) -> Any:
    message = mail.EmailMessage(
        subject="Grüße aus Köln — ✓",
        body="Schöne Grüße,\nÅsa\n",
        from_email="Jürgen Müller <juergen@example.com>",
        to=["Ånn Ëxample <ann@bücher.example>", "zoë@example.org"],
        headers=FIXED,
        connection=connection,
    )
    return message.send()


def _dots_and_long_lines(connection: Any) -> Any:
    body = ".leading dot\n..two dots\n.\nend\n" + "x" * 1200 + "\n"
    message = mail.EmailMessage(
        "Dots", body, "app@example.com", ["ann@example.org"], headers=FIXED, connection=connection
    )
    return message.send()


PATHS: dict[str, tuple[Sender, int, bool]] = {
    # name: (sender, messages, Date and Message-ID fixed)
    "send_mail": (_send_mail_text, 1, False),
    "send_mail_html": (_send_mail_html, 1, False),
    "send_mass_mail": (_send_mass_mail, 2, False),
    "mail_admins": (_mail_admins, 1, False),
    "headers_cc_bcc_reply_to": (_email_message_headers, 1, True),
    "alternatives_attachments_inline": (_alternatives_attachments, 1, True),
    "non_ascii": (_non_ascii, 1, True),
    "dots_and_long_lines": (_dots_and_long_lines, 1, True),
}
_VOLATILE = re.compile(rb"^(Date|Message-ID): .*(?:\r\n[ \t].*)*", re.MULTILINE | re.IGNORECASE)


def _mask(content: bytes) -> bytes:
    """The message with its top-level Date and Message-ID values blanked."""
    head, sep, body = content.partition(b"\r\n\r\n")
    masked, count = _VOLATILE.subn(lambda m: m.group(1) + b": *", head)
    assert count == 2, head
    return masked + sep + body


def _subject(message: ReceivedMessage) -> str:
    return str(message.parsed()["Subject"])


class TestBackendMatchesSMTPBackend:
    """Every django.core.mail path arrives as Django's own SMTP backend sends it."""

    @pytest.mark.parametrize("path", PATHS)
    def test_same_bytes_and_envelope(self, stack: Stack, path: str) -> None:
        """The worker delivers the bytes and envelope Django's SMTP backend delivers."""
        sender, count, fixed = PATHS[path]
        before = len(stack.server.handler.messages)
        reference = mail.get_connection(SMTP_BACKEND, host="127.0.0.1", port=stack.reference.port)
        stack.reference.handler.clear()
        state = random.getstate()
        try:
            with override_settings(MAILWORKER={"BROKER_URL": stack.broker_url}):
                # Same seed, same MIME boundaries (and Message-ID randomness) in both renderings.
                random.seed(path)
                expected_result = sender(reference)
                random.seed(path)
                result = sender(None)
        finally:
            random.setstate(state)
        assert result == expected_result  # what Django's API returns (mail_admins: None)
        theirs = stack.reference.handler.wait_for_messages(count)
        try:
            ours = stack.server.handler.wait_for_messages(before + count, timeout=15)[before:]
        except TimeoutError:
            pytest.fail("not delivered; worker output:\n" + stack.worker.output()[-3000:])
        for expected in theirs:
            (got,) = [m for m in ours if _subject(m) == _subject(expected)]
            assert got.mail_from == expected.mail_from
            assert got.rcpt_tos == expected.rcpt_tos
            if fixed:
                assert got.content == expected.content
            else:
                assert _mask(got.content) == _mask(expected.content)

    def test_bcc_only_in_envelope(self, stack: Stack) -> None:
        """Bcc recipients get the message but appear in no header."""
        before = len(stack.server.handler.messages)
        with override_settings(MAILWORKER={"BROKER_URL": stack.broker_url}):
            _email_message_headers(None)
        (got,) = stack.server.handler.wait_for_messages(before + 1, timeout=15)[before:]
        assert "hidden@example.net" in got.rcpt_tos
        assert b"hidden@example.net" not in got.content
        assert got.parsed()["Reply-To"] == "help@example.com"


class TestProjectCeleryApp:
    """A project's own Celery app (celery.py reading CELERY_* settings) publishes the mail."""

    def test_publishes_through_project_app(self, stack: Stack) -> None:
        """With MAILWORKER['CELERY_APP'] the project's app publishes; our worker delivers."""
        before = len(stack.server.handler.messages)
        with override_settings(CELERY_BROKER_URL=stack.broker_url):
            project = Celery("proj", set_as_current=False)
            project.config_from_object("django.conf:settings", namespace="CELERY")
            try:
                with override_settings(MAILWORKER={"CELERY_APP": project}):
                    sent = mail.send_mail("Via project app", "Hi", None, ["ann@example.org"])
            finally:
                project.close()
        assert sent == 1
        (got,) = stack.server.handler.wait_for_messages(before + 1, timeout=15)[before:]
        assert _subject(got) == "Via project app"

    def test_import_path(self, idle_broker: IdleBroker, monkeypatch: pytest.MonkeyPatch) -> None:
        """CELERY_APP may be an import path; its broker is then the worker's broker too."""
        module = types.ModuleType("mailworker_test_proj_celery")
        module.app = app = Celery("proj2", set_as_current=False, broker=idle_broker.url)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        try:
            with override_settings(MAILWORKER={"CELERY_APP": f"{module.__name__}:app"}):
                assert mail.send_mail("Path", "Hi", None, ["ann@example.org"]) == 1
                env = worker_environ()
        finally:
            app.close()
        assert env["MAILWORKER_BROKER_URL"] == idle_broker.url
        (task,) = idle_broker.queued()
        assert task["headers"]["task"] == "mailworker.send_message"


class TestQueuedTask:
    """What the backend puts on the broker."""

    def test_json_task_with_django_bytes(self, idle_broker: IdleBroker) -> None:
        """The task is JSON: base64 of Django's bytes, the bare envelope, the profile."""
        message = mail.EmailMessage(
            "Queued", "Body", "Sender <sender@example.com>", ["Ann <ann@example.org>"],
            cc=["cc@example.org"], bcc=["bcc@example.org"], headers=FIXED,
        )  # fmt: skip
        state = random.getstate()
        try:
            random.seed(7)
            expected = message.message().as_bytes(linesep="\r\n")
            random.seed(7)
            assert mail.get_connection().send_messages([message]) == 1
        finally:
            random.setstate(state)
        (task,) = idle_broker.queued()
        assert task["headers"]["task"] == "mailworker.send_message"
        assert task["headers"]["id"] == message.mailworker_task_id
        kwargs = task["kwargs"]
        assert set(kwargs) == {"raw_b64", "envelope_from", "recipients", "profile"}
        assert base64.b64decode(kwargs["raw_b64"]) == expected
        assert kwargs["envelope_from"] == "sender@example.com"
        assert kwargs["recipients"] == ["ann@example.org", "cc@example.org", "bcc@example.org"]
        assert kwargs["profile"] == "default"

    def test_count_skips_messages_without_recipients(self, idle_broker: IdleBroker) -> None:
        """send_messages returns the number queued; a message without recipients is
        skipped; several go as one send_message_batch task, each with its own id."""
        messages = [
            mail.EmailMessage("One", "x", to=["a@example.org"]),
            mail.EmailMessage("Nobody", "x", to=[]),
            mail.EmailMessage("Two", "x", bcc=["b@example.org"]),
        ]
        assert mail.get_connection().send_messages(messages) == 2
        assert mail.get_connection().send_messages([]) == 0
        (task,) = idle_broker.queued()
        assert task["headers"]["task"] == "mailworker.send_message_batch"
        batch = task["kwargs"]["messages"]
        assert [m["recipients"] for m in batch] == [["a@example.org"], ["b@example.org"]]
        batch_id = task["headers"]["id"]
        assert [messages[0].mailworker_task_id, messages[2].mailworker_task_id] == [
            f"{batch_id}-0",
            f"{batch_id}-1",
        ]
        assert not hasattr(messages[1], "mailworker_task_id")

    def test_profile_and_queue(self, idle_broker: IdleBroker) -> None:
        """PROFILE and QUEUE come from settings, and get_connection() arguments win."""
        config = {"BROKER_URL": idle_broker.url, "PROFILE": "bulk", "QUEUE": "mail"}
        with override_settings(MAILWORKER=config):
            mail.send_mail("Settings", "x", None, ["a@example.org"])
            connection = mail.get_connection(profile="alerts", queue="urgent")
            mail.send_mail("Arguments", "x", None, ["a@example.org"], connection=connection)
        assert [t["kwargs"]["profile"] for t in idle_broker.queued("mail")] == ["bulk"]
        assert [t["kwargs"]["profile"] for t in idle_broker.queued("urgent")] == ["alerts"]
        assert idle_broker.queued() == []

    def test_invalid_message_raises_before_publishing(self, idle_broker: IdleBroker) -> None:
        """A message the worker would refuse raises InvalidMessageError, also silently-failing."""
        message = mail.EmailMessage(
            "Bcc header", "x", to=["a@example.org"], headers={"Bcc": "x@y.org"}
        )
        with pytest.raises(InvalidMessageError, match="Bcc"):
            mail.get_connection(fail_silently=True).send_messages([message])
        assert idle_broker.queued() == []


class TestBrokerErrors:
    """fail_silently is honoured when the broker is unreachable."""

    @pytest.fixture
    def dead_broker(self) -> Iterator[None]:
        with override_settings(MAILWORKER={"BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}):
            yield

    @pytest.mark.usefixtures("dead_broker")
    def test_raises(self) -> None:
        """Without fail_silently the error says what could not be reached."""
        with pytest.raises(PublishError, match=r"could not publish mailworker\.send_message"):
            mail.send_mail("Lost", "x", None, ["a@example.org"])

    @pytest.mark.usefixtures("dead_broker")
    def test_fail_silently(self) -> None:
        """With fail_silently nothing is queued, nothing raised, and 0 returned."""
        assert mail.send_mail("Lost", "x", None, ["a@example.org"], fail_silently=True) == 0

    def test_is_a_connection_error(self) -> None:
        """Generic code can catch it as ConnectionError."""
        assert issubclass(PublishError, ConnectionError)


# -- settings, checks and the worker's environment ------------------------------------------


class TestWorkerEnviron:
    """worker_environ() gives the worker what the Django settings describe."""

    @pytest.mark.parametrize(
        ("email", "url"),
        [
            ({}, "smtp://localhost:25"),
            ({"EMAIL_HOST": "relay.internal", "EMAIL_PORT": 2525}, "smtp://relay.internal:2525"),
            (
                {
                    "EMAIL_HOST": "smtp.example.com",
                    "EMAIL_PORT": 587,
                    "EMAIL_USE_TLS": True,
                    "EMAIL_HOST_USER": "app@example.com",
                    "EMAIL_HOST_PASSWORD": "p@ss:w/rd %",
                    "EMAIL_TIMEOUT": 20,
                },
                "smtp+starttls://app%40example.com:p%40ss%3Aw%2Frd%20%25@smtp.example.com:587?timeout=20",
            ),
            (
                {"EMAIL_HOST": "smtp.example.com", "EMAIL_PORT": 465, "EMAIL_USE_SSL": True},
                "smtps://smtp.example.com:465",
            ),
            (
                # Django logs in only with both user and password; so do we.
                {"EMAIL_HOST_USER": "app", "EMAIL_HOST_PASSWORD": ""},
                "smtp://localhost:25",
            ),
        ],
    )
    def test_email_settings_fallback(self, email: dict[str, Any], url: str) -> None:
        """Without PROFILES, Django's EMAIL_* settings make the default profile."""
        with override_settings(**email, MAILWORKER={}):
            env = worker_environ()
        assert env["MAILWORKER_SMTP_URL"] == url
        profile = Profile.from_env("default", env)
        assert profile.password == (email.get("EMAIL_HOST_PASSWORD") or None)

    def test_profiles_and_worker_settings(self) -> None:
        """PROFILES become MAILWORKER_SMTP_URL[_<NAME>]; other keys MAILWORKER_<KEY>."""
        config = {
            "BROKER_URL": "redis://broker.internal:6379/3",
            "PROFILES": {
                "default": "smtps://app%40example.com:secret@smtp.example.com",
                "bulk": "smtp+starttls://bulk@relay.example.com:587",
            },
            "DEFAULT_FROM": "Shop <shop@example.com>",
            "RETRY_DELAYS": [30, 60, 600],
            "MAX_AGE": 7200,
        }
        with override_settings(MAILWORKER=config):
            env = worker_environ()
        assert env == {
            "MAILWORKER_BROKER_URL": "redis://broker.internal:6379/3",
            "MAILWORKER_SMTP_URL": "smtps://app%40example.com:secret@smtp.example.com",
            "MAILWORKER_SMTP_URL_BULK": "smtp+starttls://bulk@relay.example.com:587",
            "MAILWORKER_DEFAULT_FROM": "Shop <shop@example.com>",
            "MAILWORKER_RETRY_DELAYS": "30,60,600",
            "MAILWORKER_MAX_AGE": "7200",
        }
        assert Settings.from_env(env).retry_delays == (30.0, 60.0, 600.0)

    def test_broker_fallbacks(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Broker: BROKER_URL, CELERY_BROKER_URL, the environment, then Redis on localhost."""
        monkeypatch.delenv("MAILWORKER_BROKER_URL", raising=False)
        with override_settings(MAILWORKER={}):
            assert worker_environ()["MAILWORKER_BROKER_URL"] == "redis://localhost:6379/0"
            monkeypatch.setenv("MAILWORKER_BROKER_URL", "redis://env:6379/1")
            assert worker_environ()["MAILWORKER_BROKER_URL"] == "redis://env:6379/1"
            with override_settings(CELERY_BROKER_URL="redis://celery:6379/2"):
                assert worker_environ()["MAILWORKER_BROKER_URL"] == "redis://celery:6379/2"
        assert worker_environ()["MAILWORKER_DEFAULT_FROM"] == "App <app@example.com>"

    def test_malformed_setting_raises(self) -> None:
        """A malformed setting raises ConfigError naming it, never echoing a password."""
        config = {"PROFILES": {"bulk": "smtp://user:hunter22@relay.example.com"}}
        with override_settings(MAILWORKER=config), pytest.raises(ConfigError) as info:
            worker_environ()
        assert str(info.value).startswith("MAILWORKER['PROFILES']['bulk']: ")
        assert "hunter22" not in str(info.value)

    def test_print_env_command(self) -> None:
        """manage.py mailworker_worker --print-env prints the environment, shell-quoted."""
        out = io.StringIO()
        with override_settings(
            MAILWORKER={"BROKER_URL": "redis://b:6379/0", "DEFAULT_FROM": "A <a@b.org>"}
        ):
            call_command("mailworker_worker", "--print-env", stdout=out)
        assert out.getvalue().splitlines() == [
            "MAILWORKER_BROKER_URL=redis://b:6379/0",
            "MAILWORKER_DEFAULT_FROM='A <a@b.org>'",
            "MAILWORKER_SMTP_URL=smtp://localhost:25",
        ]

    def test_celery_options_pass_through(self) -> None:
        """Options Django does not know reach Celery in their order; Django's own still work."""
        command = Command()
        parser = command.create_parser("manage.py", "mailworker_worker")
        options = parser.parse_args(
            ["--concurrency", "2", "-v", "2", "--loglevel", "INFO", "-P", "solo", "--pool=threads"]
        )
        assert options.verbosity == 2
        assert options.celery_args == [
            "--concurrency", "2", "--loglevel", "INFO", "-P", "solo", "--pool=threads"
        ]  # fmt: skip

    def test_worker_process_env(self) -> None:
        """The worker inherits the environment (e.g. a password variable), settings win,
        and DJANGO_SETTINGS_MODULE is dropped."""
        env = worker_process_env(
            {
                "PATH": "/bin",
                "DJANGO_SETTINGS_MODULE": "proj.settings",
                "MAILWORKER_SMTP_PASSWORD_BULK": "s3cret",
                "MAILWORKER_BROKER_URL": "redis://old",
            },
            {"MAILWORKER_BROKER_URL": "redis://new", "MAILWORKER_SMTP_URL_BULK": "smtps://u@h"},
        )
        assert env == {
            "PATH": "/bin",
            "MAILWORKER_SMTP_PASSWORD_BULK": "s3cret",
            "MAILWORKER_BROKER_URL": "redis://new",
            "MAILWORKER_SMTP_URL_BULK": "smtps://u@h",
        }

    def test_worker_command_line(self) -> None:
        """Options Django doesn't know go to the worker, and QUEUE becomes --queues."""
        command = worker_command(["--concurrency", "4"], "mail")
        assert command[0] == sys.executable
        assert command[-4:] == ["--concurrency", "4", "--queues", "mail"]
        assert worker_command(["-Q", "other"], "mail")[-2:] == ["-Q", "other"]


class TestSystemChecks:
    """Django's system checks name every missing or malformed setting."""

    @pytest.mark.parametrize(
        ("overrides", "check_id", "start"),
        [
            ({"MAILWORKER": "redis://x"}, "mailworker.E001", "MAILWORKER: must be a dict"),
            (
                {"MAILWORKER": {"BROKER": "redis://x"}},
                "mailworker.E005",
                "MAILWORKER['BROKER']: unknown key",
            ),
            (
                {
                    "MAILWORKER": {
                        "PROFILE": "bulk",
                        "PROFILES": {"bulk": "http://relay.example.com"},
                    }
                },
                "mailworker.E023",
                "MAILWORKER['PROFILES']['bulk']: unknown URL scheme 'http'",
            ),
            (
                {"MAILWORKER": {"PROFILE": "bulk", "PROFILES": {"bulk": "smtps://h?timeout=soon"}}},
                "mailworker.E023",
                "MAILWORKER['PROFILES']['bulk']: option timeout='soon'",
            ),
            (
                {"MAILWORKER": {"PROFILES": ["smtp://x"]}},
                "mailworker.E020",
                "MAILWORKER['PROFILES']: must be a dict",
            ),
            (
                {"MAILWORKER": {"PROFILES": {"bulk": "smtps://relay.example.com"}}},
                "mailworker.E024",
                "MAILWORKER['PROFILE']: no profile 'default'",
            ),
            (
                {"MAILWORKER": {"QUEUE": 3}},
                "mailworker.E002",
                "MAILWORKER['QUEUE']: must be a non-empty string",
            ),
            (
                {"MAILWORKER": {"CELERY_APP": "no_such_module.celery:app"}},
                "mailworker.E004",
                "MAILWORKER['CELERY_APP']: cannot import",
            ),
            (
                {"MAILWORKER": {"CELERY_APP": "x:app", "BROKER_URL": "redis://x"}},
                "mailworker.E003",
                "MAILWORKER['BROKER_URL']: set either",
            ),
            (
                {"MAILWORKER": {"RETRY_DELAYS": "soon"}},
                "mailworker.E030",
                "MAILWORKER['RETRY_DELAYS']: MAILWORKER_RETRY_DELAYS='soon': expected a number",
            ),
            (
                {"MAILWORKER": {"VISIBILITY_TIMEOUT": 60, "TASK_TIME_LIMIT": 40}},
                "mailworker.E031",
                "MAILWORKER['TASK_TIME_LIMIT']: MAILWORKER_TASK_TIME_LIMIT must be below half",
            ),
            (
                {"EMAIL_HOST_USER": "app", "EMAIL_HOST_PASSWORD": "secret"},
                "mailworker.E011",
                "EMAIL_HOST_USER: credentials are set but neither EMAIL_USE_TLS nor EMAIL_USE_SSL",
            ),
            (
                {"EMAIL_USE_TLS": True, "EMAIL_USE_SSL": True},
                "mailworker.E010",
                "EMAIL_USE_TLS/EMAIL_USE_SSL",
            ),
            ({"EMAIL_HOST": "bad host"}, "mailworker.E012", "EMAIL_HOST/EMAIL_PORT/"),
            (
                {"MAILWORKER": {"BROKER_URL": "amqp://guest@rabbit//"}},
                "mailworker.W001",
                "MAILWORKER['BROKER_URL']: the broker is amqp://",
            ),
        ],
    )
    def test_reports_setting_by_name(
        self, overrides: dict[str, Any], check_id: str, start: str
    ) -> None:
        """The check's message starts with the setting's name as written in settings.py."""
        overrides.setdefault("MAILWORKER", {})
        with override_settings(**overrides):
            messages = run_checks(tags=["mailworker"])
        assert [(m.id, m.msg[: len(start)]) for m in messages] == [(check_id, start)]
        assert all("secret" not in m.msg and "secret" not in (m.hint or "") for m in messages)

    def test_valid_settings_pass(self) -> None:
        """A complete configuration raises nothing."""
        config = {
            "BROKER_URL": "redis://localhost:6379/0",
            "PROFILES": {"default": "smtps://u:p@smtp.example.com", "bulk": "smtp://relay:25"},
            "PROFILE": "bulk",
            "QUEUE": "mail",
            "RETRY_DELAYS": [60, 300],
        }
        with override_settings(MAILWORKER=config):
            assert run_checks(tags=["mailworker"]) == []

    def test_password_may_come_from_worker_env(self) -> None:
        """A profile URL with a user but no password is fine: the worker may read the password
        from MAILWORKER_SMTP_PASSWORD[_<NAME>]."""
        with override_settings(
            MAILWORKER={"PROFILES": {"default": "smtps://user@smtp.example.com"}}
        ):
            assert run_checks(tags=["mailworker"]) == []

    def test_runtime_error_names_setting(self) -> None:
        """The backend refuses a malformed setting it needs with the same name."""
        with (
            override_settings(MAILWORKER={"QUEUE": ""}),
            pytest.raises(ConfigError, match=r"MAILWORKER\['QUEUE'\]"),
        ):
            mail.send_mail("x", "x", None, ["a@example.org"])


class TestMissingDjango:
    """Without Django installed the import says exactly what to install."""

    def test_error_names_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """ImportError (and MailworkerError) with pip install "mailworker[django]"."""
        monkeypatch.setitem(sys.modules, "django", None)
        monkeypatch.delitem(sys.modules, "mailworker.contrib.django")
        with pytest.raises(
            MissingExtraError, match=re.escape('pip install "mailworker[django]"')
        ) as info:
            importlib.import_module("mailworker.contrib.django")
        assert isinstance(info.value, ImportError)
