"""A canary password, used for real across the stack, shows up nowhere it should not.

The canary (and a wrong canary for failed AUTH) goes into profile URLs and environment
variables for real sessions against AUTH-requiring STARTTLS servers: successful sends
with AUTH PLAIN and LOGIN, a refused AUTH, a message dead-lettered by
:class:`~mailworker.worker.delivery.Delivery`, ``mailworker check`` and a real
``mailworker worker`` process. Neither password, in clear, URL-encoded or in the
base64 forms AUTH PLAIN and LOGIN put on the wire, may appear in a log event (captured
before any redaction), a transcript, a dead-letter record (read raw from Redis), an
exception's str, repr or traceback, a task result, a repr, the development server's
event lines or maildir, the CLI's output, or the worker's log file. The fuzzing SMTP
server (tests/smtp/test_fuzz_server.py) logs in with the same canary and checks its
errors, transcripts and log events the same way.
"""

from __future__ import annotations

import base64
import json
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from structlog.testing import capture_logs

from mailworker import Profile, SMTPAuthError, SMTPSession
from mailworker.cli import main
from mailworker.dev.server import DevServer
from mailworker.errors import ConfigError, DeadLetteredError
from mailworker.queue.names import SEND_MAIL, SEND_MESSAGE
from mailworker.store.deadletter import DeadLetterStore
from mailworker.worker.delivery import Delivery
from mailworker.worker.sessions import SessionPool
from mailworker.worker.settings import Settings
from mailworker.worker.tasks import send_mail
from tests.servers import SMTPServer, TLSMaterials, smtp_url, wait_for
from tests.worker_process import BASE_SETTINGS, WorkerProcess, producer, profile_vars, worker_env

#: The password every session here logs in with.
CANARY = "canary-Pa55-7f3e"
#: A password no server accepts, for refused AUTH.
WRONG_CANARY = "canary-Wr0ng-9b1d"
USER = "canary-user@example.com"
MESSAGE = b"From: app@example.com\r\nTo: ann@example.org\r\nSubject: canary\r\n\r\nhello\r\n"


def secret_forms() -> dict[str, bytes]:
    """Every form of both passwords that must not leak: clear, URL-encoded, base64 (AUTH
    LOGIN) and the AUTH PLAIN string in base64."""
    forms = {}
    for name, password in (("canary", CANARY), ("wrong canary", WRONG_CANARY)):
        forms[name] = password
        forms[f"{name}, URL-encoded"] = urllib.parse.quote(password, safe="")
        forms[f"{name}, base64 (LOGIN)"] = base64.b64encode(password.encode()).decode()
        plain = base64.b64encode(f"\0{USER}\0{password}".encode()).decode()
        forms[f"{name}, base64 (PLAIN)"] = plain
    return {name: form.encode() for name, form in forms.items()}


SECRETS = secret_forms()


def text_of(value: object) -> bytes:
    """Everything ``value`` says: bytes as they are, an exception's str, repr and whole
    traceback (causes included), anything else as JSON (reprs for the rest)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, BaseException):
        formatted = "".join(traceback.format_exception(value))
        return f"{value}\n{value!r}\n{formatted}".encode()
    return json.dumps(value, default=repr, ensure_ascii=False).encode()


class Leaks:
    """Collects what was looked at; :meth:`check` names each leak and where."""

    def __init__(self) -> None:
        self.seen: dict[str, bytes] = {}

    def add(self, where: str, value: object) -> None:
        self.seen[where] = self.seen.get(where, b"") + b"\n" + text_of(value)

    def check(self) -> None:
        leaks = [
            f"{secret} in {where}"
            for where, data in self.seen.items()
            for secret, form in SECRETS.items()
            if form in data
        ]
        assert not leaks, leaks
        assert self.seen, "nothing was looked at"


@pytest.fixture
def leaks() -> Iterator[Leaks]:
    """A leak collector, checked after the test body."""
    collector = Leaks()
    yield collector
    collector.check()


def redis_dump(client: redis.Redis) -> bytes:
    """Every key and value in the database, raw."""
    out = []
    for key in client.scan_iter():
        kind = client.type(key)
        values: list[Any] = []
        if kind == b"string":
            values = [client.get(key) or b""]
        elif kind == b"hash":
            values = [b for pair in client.hgetall(key).items() for b in pair]
        elif kind == b"list":
            values = client.lrange(key, 0, -1)
        elif kind == b"zset":
            values = client.zrange(key, 0, -1)
        elif kind == b"set":
            values = list(client.smembers(key))
        elif kind == b"stream":
            values = [repr(client.xrange(key)).encode()]
        out.append(
            key + b"\n" + b"\n".join(v if isinstance(v, bytes) else str(v).encode() for v in values)
        )
    return b"\n".join(out)


@pytest.fixture
def canary_server(smtp_server: Callable[..., SMTPServer]) -> SMTPServer:
    """STARTTLS, AUTH required (PLAIN, LOGIN, CRAM-MD5), accepting USER / CANARY."""
    return smtp_server(
        tls="starttls",
        auth=True,
        user=USER,
        password=CANARY,
        mechanisms=["PLAIN", "LOGIN", "CRAM-MD5"],
    )


def canary_url(server: SMTPServer, ca_file: Path, *, password: str = CANARY, **options: Any) -> str:
    """A STARTTLS profile URL for ``server`` with ``password`` (5 s timeouts)."""
    options.setdefault("timeout", 5)
    return smtp_url(server.port, user=USER, password=password, ca_file=ca_file, **options)


class TestSessions:
    """SMTPSession, Profile and their errors."""

    @pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
    def test_successful_sends(
        self, canary_server: SMTPServer, tls_ca: TLSMaterials, leaks: Leaks, mechanism: str
    ) -> None:
        """Two sends on one session that logged in with the canary leave it nowhere:
        not in log events, transcripts, results, the session info or any repr."""
        profile = Profile.from_url(canary_url(canary_server, tls_ca.ca_file, auth=mechanism))
        with capture_logs() as events, SMTPSession(profile) as session:
            results = [session.send("app@example.com", ["ann@example.org"], MESSAGE) for _ in "ab"]
            leaks.add("repr(session)", repr(session))
            leaks.add("session info", session.info)
            leaks.add("session transcript", session.transcript.as_strings())
        assert [login.success for login in canary_server.handler.logins] == [True]
        assert canary_server.handler.logins[0].mechanism == mechanism
        leaks.add("log events", events)
        leaks.add("send results", [(repr(r), r.transcript, r.reply) for r in results])
        leaks.add("repr(profile)", repr(profile))
        leaks.add("str(profile)", str(profile))
        leaks.add("profile.redacted_url()", profile.redacted_url())
        assert f"AUTH {mechanism}" in " ".join(session.transcript.as_strings())

    @pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
    def test_refused_auth(
        self, canary_server: SMTPServer, tls_ca: TLSMaterials, leaks: Leaks, mechanism: str
    ) -> None:
        """A refused AUTH with the wrong canary raises SMTPAuthError whose str, repr,
        to_dict, transcript and traceback, and the log events, hold neither password."""
        url = canary_url(canary_server, tls_ca.ca_file, password=WRONG_CANARY, auth=mechanism)
        session = SMTPSession(Profile.from_url(url))
        with capture_logs() as events, pytest.raises(SMTPAuthError) as caught:
            session.send("app@example.com", ["ann@example.org"], MESSAGE)
        session.close()
        assert [login.success for login in canary_server.handler.logins] == [False]
        exc = caught.value
        leaks.add("SMTPAuthError", exc)
        leaks.add("SMTPAuthError.to_dict()", exc.to_dict())
        leaks.add("SMTPAuthError.transcript", exc.transcript)
        leaks.add("log events", events)
        leaks.add("session transcript", session.transcript.as_strings())

    def test_password_from_the_environment(
        self, canary_server: SMTPServer, tls_ca: TLSMaterials, leaks: Leaks, tmp_path: Path
    ) -> None:
        """A password from MAILWORKER_SMTP_PASSWORD or ..._PASSWORD_FILE is used, and
        kept out of the profile's repr."""
        url = smtp_url(canary_server.port, user=USER, ca_file=tls_ca.ca_file, timeout=5)
        secret_file = tmp_path / "password"
        secret_file.write_text(CANARY + "\n")
        for environ in (
            {"MAILWORKER_SMTP_URL": url, "MAILWORKER_SMTP_PASSWORD": CANARY},
            {"MAILWORKER_SMTP_URL": url, "MAILWORKER_SMTP_PASSWORD_FILE": str(secret_file)},
        ):
            profile = Profile.from_env("default", environ)
            with capture_logs() as events, SMTPSession(profile) as session:
                session.send("app@example.com", ["ann@example.org"], MESSAGE)
            leaks.add("repr(profile from env)", repr(profile))
            leaks.add("log events", events)
        assert [login.success for login in canary_server.handler.logins] == [True, True]

    @pytest.mark.parametrize(
        "url",
        [
            f"smtp+starttls://{USER}:{CANARY}@localhost:notaport",
            f"smtp+starttls://{USER}:{CANARY}@localhost:25?timeout=-1",
            f"smtp+starttls://{USER}:{CANARY}@localhost:25?no_such_option=1",
            f"smtpx://{USER}:{CANARY}@localhost:25",
            f"smtp://{USER}:{CANARY}@localhost:25",  # AUTH in clear text refused
            f"smtp+starttls://{USER}:{CANARY}@local\uff0fhost:25",  # NFKC trap
            f"smtp+starttls://{USER}:{CANARY}@bad host:25",
        ],
    )
    def test_config_errors(self, url: str, leaks: Leaks) -> None:
        """A malformed profile URL holding the canary raises ConfigError without it."""
        with pytest.raises(ConfigError) as caught:
            Profile.from_url(url)
        leaks.add("ConfigError", caught.value)

    def test_password_given_twice(self, leaks: Leaks) -> None:
        """A password in the URL and the environment is refused without quoting either."""
        environ = {
            "MAILWORKER_SMTP_URL": f"smtp+starttls://{USER}:{CANARY}@localhost:587",
            "MAILWORKER_SMTP_PASSWORD": WRONG_CANARY,
        }
        with pytest.raises(ConfigError) as caught:
            Profile.from_env("default", environ)
        leaks.add("ConfigError", caught.value)


class TestDevServerAndCheck:
    """The development server with AUTH, and ``mailworker check`` against it."""

    def test_devserver_and_check(self, tmp_path: Path, leaks: Leaks) -> None:
        """Sends through a DevServer that requires the canary, and ``mailworker check``
        (with its transcript) with the right and the wrong password: the server's event
        lines and maildir, its redacted URL and repr, and the CLI's output are clean."""
        lines: list[str] = []
        with DevServer(
            tmp_path / "mail", port=0, tls="starttls", auth=(USER, CANARY), on_event=lines.append
        ) as server:
            url = server.url()
            assert CANARY in urllib.parse.unquote(url)  # the real thing, for real sessions
            with capture_logs() as events, SMTPSession(Profile.from_url(url)) as session:
                session.send("app@example.com", ["ann@example.org"], MESSAGE)
            wrong = url.replace(urllib.parse.quote(CANARY, safe=""), WRONG_CANARY)
            runner = CliRunner()
            outputs = [
                runner.invoke(main, ["check", "--transcript"], env={"MAILWORKER_SMTP_URL": u})
                for u in (url, wrong)
            ]
            counters = server.counters
            leaks.add("repr(DevServer)", repr(server))
            leaks.add("DevServer.url(redact=True)", server.url(redact=True))
        assert (counters.auths, counters.auth_failures) == (2, 1)
        assert [r.exit_code == 0 for r in outputs] == [True, False], outputs[0].output
        leaks.add("log events", events)
        leaks.add("DevServer events", lines)
        leaks.add(
            "maildir",
            b"".join(p.read_bytes() for p in (tmp_path / "mail").rglob("*") if p.is_file()),
        )
        for result in outputs:
            leaks.add("mailworker check output", result.output)


def _delivery(environ: dict[str, str], client: redis.Redis) -> Delivery:
    pool = SessionPool(lambda name: Profile.from_env(name, environ))
    return Delivery(Settings.from_env(environ), client, pool)


class TestDelivery:
    """Delivery (no Celery): a sent message and a dead-lettered AUTH failure."""

    def test_task_results_logs_and_dead_letters(
        self,
        canary_server: SMTPServer,
        tls_ca: TLSMaterials,
        redis_url: str,
        redis_client: redis.Redis,
        leaks: Leaks,
    ) -> None:
        """The task results, log events, DeadLetteredError and everything in Redis (the
        dead-letter record with its transcript included) are free of both passwords."""
        environ = {
            **{k: v for k, v in BASE_SETTINGS.items() if k != "MAILWORKER_LOG_FORMAT"},
            "MAILWORKER_BROKER_URL": redis_url,
            **profile_vars(
                {
                    "default": canary_url(canary_server, tls_ca.ca_file, auth="PLAIN"),
                    "wrong": canary_url(
                        canary_server, tls_ca.ca_file, password=WRONG_CANARY, auth="LOGIN"
                    ),
                }
            ),
        }
        delivery = _delivery(environ, redis_client)
        raw = base64.b64encode(MESSAGE).decode("ascii")
        try:
            with capture_logs() as events:
                results = [
                    delivery.run(
                        SEND_MAIL, "task-ok", {"to": "ann@example.org", "subject": "s", "text": "t"}
                    ),
                    delivery.run(
                        SEND_MESSAGE,
                        "task-raw",
                        {
                            "raw_b64": raw,
                            "envelope_from": "a@example.com",
                            "recipients": ["b@example.org"],
                        },
                    ),
                ]
                with pytest.raises(DeadLetteredError) as caught:
                    delivery.run(
                        SEND_MAIL,
                        "task-auth",
                        {"to": "ann@example.org", "subject": "s", "text": "t", "profile": "wrong"},
                    )
        finally:
            delivery.pool.close_all()
        assert [r["status"] for r in results] == ["sent", "sent"]
        [record] = DeadLetterStore(redis_client).list()
        assert record.code == 535
        leaks.add("task results", results)
        leaks.add("DeadLetteredError", caught.value)
        leaks.add("log events", events)
        leaks.add("Redis", redis_dump(redis_client))


class TestWorkerProcess:
    """A real ``mailworker worker`` with the canary in its environment."""

    def test_worker_output_results_and_redis(
        self,
        canary_server: SMTPServer,
        tls_ca: TLSMaterials,
        redis_url: str,
        redis_client: redis.Redis,
        tmp_path: Path,
        leaks: Leaks,
    ) -> None:
        """A sent message (its task result fetched) and an AUTH failure (dead-lettered):
        the worker's log file and everything in Redis are free of both passwords."""
        env = worker_env(
            redis_url,
            {
                "default": canary_url(canary_server, tls_ca.ca_file, auth="PLAIN"),
                "wrong": canary_url(
                    canary_server, tls_ca.ca_file, password=WRONG_CANARY, auth="LOGIN"
                ),
            },
        )
        dlq = DeadLetterStore(redis_client)
        with WorkerProcess(env, tmp_path / "worker.log", concurrency=1, name="canary") as worker:
            with producer(env):
                sent = send_mail.delay(to="ann@example.org", subject="canary", text="hi")
                refused = send_mail.delay(
                    to="ann@example.org", subject="auth", text="hi", profile="wrong"
                )
                result = sent.get(timeout=20)
                failure = refused.get(timeout=20, propagate=False)
            wait_for(lambda: dlq.count() == 1, 20, "the AUTH failure's dead letter")
        assert result["status"] == "sent"
        assert [login.success for login in canary_server.handler.logins] == [True, False]
        leaks.add("task result", result)
        leaks.add("task result of the AUTH failure", failure)
        leaks.add("worker log file", worker.output_bytes())
        leaks.add("Redis", redis_dump(redis_client))
