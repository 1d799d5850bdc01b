"""``mailworker check`` and ``mailworker send`` through click's CliRunner, against real
SMTP servers (aiosmtpd with trustme certificates) and a real Redis."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import redis
from click.testing import CliRunner, Result

from mailworker.cli import main
from tests.servers import (
    DEFAULT_PASSWORD,
    DEFAULT_USER,
    SMTPServer,
    TLSMaterials,
    free_port,
)

SMTPFactory = Callable[..., SMTPServer]
Invoke = Callable[..., Result]

#: Every MAILWORKER_* variable a test might inherit, unset unless a test sets it.
_CLEAN: dict[str, str | None] = dict.fromkeys(
    (
        "MAILWORKER_SMTP_URL",
        "MAILWORKER_SMTP_URL_BULK",
        "MAILWORKER_SMTP_PASSWORD",
        "MAILWORKER_BROKER_URL",
        "MAILWORKER_REDIS_URL",
        "MAILWORKER_DEFAULT_FROM",
    )
)


def url_for(
    server: SMTPServer | int,
    ca_file: Path,
    *,
    scheme: str = "smtp+starttls",
    password: str = DEFAULT_PASSWORD,
    user: str | None = DEFAULT_USER,
) -> str:
    """A profile URL for ``server`` (or a bare port) that trusts the test CA."""
    port = server if isinstance(server, int) else server.port
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}@" if user else ""
    return f"{scheme}://{auth}localhost:{port}?ca_file={ca_file}&timeout=5"


@pytest.fixture
def cli() -> Invoke:
    """Run ``mailworker ARGS...`` with only the given MAILWORKER_* variables set."""

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        return CliRunner().invoke(main, list(args), env={**_CLEAN, **(env or {})})

    return invoke


def one_line_error(result: Result) -> str:
    """The command's error output, asserted to be exactly one line."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def assert_no_secret(output: str) -> None:
    """Neither the password nor its AUTH PLAIN / base64 forms appear in ``output``."""
    plain = base64.b64encode(f"\0{DEFAULT_USER}\0{DEFAULT_PASSWORD}".encode()).decode()
    for secret in (DEFAULT_PASSWORD, plain, base64.b64encode(DEFAULT_PASSWORD.encode()).decode()):
        assert secret not in output


class TestCheck:
    """``check`` reports what a profile's session looks like and whether it can send."""

    def test_good_server(self, cli: Invoke, smtp_server: SMTPFactory, tls_ca: TLSMaterials) -> None:
        """Against a good STARTTLS + AUTH server it prints the session's facts and exits 0."""
        server = smtp_server(tls="starttls", auth=True)
        result = cli("check", env={"MAILWORKER_SMTP_URL": url_for(server, tls_ca.ca_file)})
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert re.search(r"^Greeting: +localhost", out, re.M)
        assert re.search(r"^TLS: +TLSv1\.[23], [A-Z0-9_-]+$", out, re.M)
        assert re.search(r"^Certificate: +verified for localhost", out, re.M)
        assert re.search(r"^ +subject: .*O=trustme", out, re.M)
        assert re.search(r"^ +issuer: +.*Testing CA", out, re.M)
        assert re.search(r"^ +expires: .* GMT \(in \d+ days\)", out, re.M)
        assert re.search(r"^Capabilities: .*STARTTLS.*AUTH", out, re.M) is None  # after TLS
        assert re.search(r"^Capabilities: .*AUTH CRAM-MD5", out, re.M)
        assert f"AUTH:          CRAM-MD5 as {DEFAULT_USER}: succeeded" in out
        assert out.rstrip().endswith("OK: profile 'default' can send.")
        assert_no_secret(result.output)

    def test_transcript_is_redacted(
        self, cli: Invoke, smtp_server: SMTPFactory, tls_ca: TLSMaterials
    ) -> None:
        """--transcript shows the session with the AUTH exchange as ****."""
        server = smtp_server(tls="starttls", auth=True, mechanisms=["PLAIN"])
        url = url_for(server, tls_ca.ca_file)
        result = cli("check", "--transcript", env={"MAILWORKER_SMTP_URL": url})
        assert result.exit_code == 0, result.output
        out = result.stdout
        assert "  C: STARTTLS" in out
        assert "  C: AUTH PLAIN ****" in out
        assert "  S: 235" in out
        assert out.index("  C: QUIT") > out.index("  C: AUTH")
        assert_no_secret(result.output)

    def test_named_profile(
        self, cli: Invoke, smtp_server: SMTPFactory, tls_ca: TLSMaterials
    ) -> None:
        """--profile NAME reads MAILWORKER_SMTP_URL_<NAME>."""
        server = smtp_server(tls="implicit", auth=True)
        url = url_for(server, tls_ca.ca_file, scheme="smtps")
        result = cli("check", "--profile", "bulk", env={"MAILWORKER_SMTP_URL_BULK": url})
        assert result.exit_code == 0, result.output
        assert "Profile 'bulk': smtps://" in result.stdout

    def test_untrusted_certificate(
        self, cli: Invoke, smtp_server: SMTPFactory, tls_ca: TLSMaterials
    ) -> None:
        """A certificate from an unknown CA fails with one line naming the trust problem."""
        server = smtp_server(tls="starttls", auth=True, cert="untrusted")
        result = cli("check", env={"MAILWORKER_SMTP_URL": url_for(server, tls_ca.ca_file)})
        assert result.exit_code == 1
        assert "[tls] certificate of localhost not trusted" in one_line_error(result)
        server.handler.wait_for_count("tls_failures", 1)  # the server let go of it

    def test_no_starttls_offered(
        self, cli: Invoke, smtp_server: SMTPFactory, tls_ca: TLSMaterials
    ) -> None:
        """A server without STARTTLS fails a STARTTLS profile instead of going on in clear."""
        server = smtp_server(tls="none", auth=True, auth_require_tls=False)
        result = cli("check", env={"MAILWORKER_SMTP_URL": url_for(server, tls_ca.ca_file)})
        assert result.exit_code == 1
        assert "does not offer STARTTLS" in one_line_error(result)
        assert server.handler.counts["AUTH"] == 0

    def test_wrong_password(
        self, cli: Invoke, smtp_server: SMTPFactory, tls_ca: TLSMaterials
    ) -> None:
        """A refused AUTH fails with the mechanism and the server's 535, never the password."""
        server = smtp_server(tls="starttls", auth=True, password="the right one")
        result = cli("check", env={"MAILWORKER_SMTP_URL": url_for(server, tls_ca.ca_file)})
        assert result.exit_code == 1
        line = one_line_error(result)
        assert "[auth] server refused AUTH CRAM-MD5" in line
        assert "535" in line
        assert_no_secret(result.output)

    def test_server_wanting_auth_the_profile_lacks(
        self, cli: Invoke, smtp_server: SMTPFactory, tls_ca: TLSMaterials
    ) -> None:
        """A profile without credentials fails against a server that wants AUTH, at
        MAIL FROM with the server's 530, and no message is sent."""
        server = smtp_server(tls="starttls", auth=True)
        result = cli(
            "check",
            env={
                "MAILWORKER_SMTP_URL": url_for(server, tls_ca.ca_file, user=None),
                "MAILWORKER_DEFAULT_FROM": "App <app@example.com>",
            },
        )
        assert result.exit_code == 1
        line = one_line_error(result)
        assert "[mail] server refused the sender" in line
        assert "530" in line
        assert server.handler.messages == []

    def test_sender_is_probed_without_a_message(
        self, cli: Invoke, smtp_server: SMTPFactory, tls_ca: TLSMaterials
    ) -> None:
        """A passing check has asked MAIL FROM for MAILWORKER_DEFAULT_FROM, then RSET,
        and sent no message."""
        server = smtp_server(tls="starttls", auth=True)
        result = cli(
            "check",
            "--transcript",
            env={
                "MAILWORKER_SMTP_URL": url_for(server, tls_ca.ca_file),
                "MAILWORKER_DEFAULT_FROM": "App <app@example.com>",
            },
        )
        assert result.exit_code == 0, result.output
        assert "MAIL FROM:<app@example.com>" in result.output
        assert server.handler.counts["MAIL"] == 1
        assert server.handler.counts["RSET"] == 1
        assert server.handler.counts["DATA"] == 0

    def test_unreachable(self, cli: Invoke, tls_ca: TLSMaterials) -> None:
        """A port nobody listens on fails with one line saying the connection failed."""
        result = cli("check", env={"MAILWORKER_SMTP_URL": url_for(free_port(), tls_ca.ca_file)})
        assert result.exit_code == 1
        line = one_line_error(result)
        assert "[connect] connection to localhost failed" in line
        assert "transient" in line

    def test_missing_profile(self, cli: Invoke) -> None:
        """Without a profile it is a usage error naming the variable to set."""
        result = cli("check", "--profile", "bulk")
        assert result.exit_code == 2
        assert "MAILWORKER_SMTP_URL_BULK" in result.stderr


@pytest.fixture
def mail_server(smtp_server: SMTPFactory) -> SMTPServer:
    """A STARTTLS + AUTH server."""
    return smtp_server(tls="starttls", auth=True)


@pytest.fixture
def send_env(mail_server: SMTPServer, tls_ca: TLSMaterials) -> dict[str, str]:
    """The environment of ``send``: the server's profile and a default sender."""
    return {
        "MAILWORKER_SMTP_URL": url_for(mail_server, tls_ca.ca_file),
        "MAILWORKER_DEFAULT_FROM": "App <app@example.com>",
    }


class TestSendNow:
    """``send`` without --queue delivers at once through one session."""

    def test_sends_with_attachment(
        self, cli: Invoke, mail_server: SMTPServer, send_env: dict[str, str], tmp_path: Path
    ) -> None:
        """The message arrives with its attachment; accepted, reply and transcript are shown."""
        attachment = tmp_path / "report.csv"
        attachment.write_bytes(b"a,b\r\n1,2\r\n")
        result = cli(
            "send", "--to", "ann@example.org", "--subject", "Report", "--text", "Attached.",
            "--attach", str(attachment), env=send_env,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        [message] = mail_server.handler.wait_for_messages(1)
        parsed = message.parsed()
        assert message.rcpt_tos == ("ann@example.org",)
        assert message.mail_from == "app@example.com"
        assert parsed["Subject"] == "Report"
        [part] = list(parsed.iter_attachments())
        assert part.get_filename() == "report.csv"
        assert part.get_content() in (b"a,b\r\n1,2\r\n", "a,b\r\n1,2\r\n")
        out = result.stdout
        assert re.search(r"^Accepted: +ann@example.org$", out, re.M)
        assert re.search(rf"^Reply: +250 OK: queued as {message.queue_id}$", out, re.M)
        lines = out[out.index("Transcript:") :].splitlines()[1:]
        assert lines[0].startswith("  S: 220")
        assert "  C: MAIL FROM:<app@example.com> SIZE=" in out
        assert lines[-1] == "  S: 221 Bye"
        assert_no_secret(result.output)

    def test_html_and_from(
        self, cli: Invoke, mail_server: SMTPServer, send_env: dict[str, str]
    ) -> None:
        """--html and --from shape the message; several --to go to every recipient."""
        result = cli(
            "send", "--to", "ann@example.org", "--to", "Bob <bob@example.org>",
            "--subject", "Hi", "--html", "<p>Hello</p>", "--from", "ops@example.com",
            env=send_env,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        [message] = mail_server.handler.wait_for_messages(1)
        assert message.mail_from == "ops@example.com"
        assert message.rcpt_tos == ("ann@example.org", "bob@example.org")
        assert message.parsed().get_content_type() == "text/html"

    def test_refused_recipient(
        self, cli: Invoke, mail_server: SMTPServer, send_env: dict[str, str]
    ) -> None:
        """A refused recipient exits 1 with the server's reply in one line."""
        mail_server.handler.rcpt_replies["gone@example.org"] = "550 5.1.1 no such user"
        result = cli(
            "send", "--to", "gone@example.org", "--subject", "Hi", "--text", "x", env=send_env
        )
        assert result.exit_code == 1
        assert re.search(
            r"^Refused: +gone@example.org: 550 5.1.1 no such user$", result.stdout, re.M
        )
        assert "  C: RCPT TO:<gone@example.org>" in result.stdout
        line = one_line_error(result)
        assert "server refused every recipient" in line
        assert "permanent" in line

    @pytest.mark.parametrize(
        ("args", "names"),
        [
            (["--to", "not-an-address", "--subject", "s", "--text", "t"], "--to: to[0]"),
            (["--to", "a@example.org", "--subject", "s"], "--text or --html"),
            (["--to", "a@example.org", "--subject", "a\nb", "--text", "t"], "--subject"),
            (["--to", "a@example.org", "--subject", "s", "--text", "t", "--from", "x"], "--from"),
        ],
    )
    def test_invalid_input(
        self, cli: Invoke, send_env: dict[str, str], args: list[str], names: str
    ) -> None:
        """Invalid input is a usage error (exit 2) naming the option, before any connection."""
        result = cli("send", *args, env=send_env)
        assert result.exit_code == 2
        assert f"Error: {names}" in result.stderr

    def test_no_sender(self, cli: Invoke, send_env: dict[str, str]) -> None:
        """Without --from or MAILWORKER_DEFAULT_FROM the error names both."""
        env = {**send_env, "MAILWORKER_DEFAULT_FROM": ""}
        result = cli("send", "--to", "a@example.org", "--subject", "s", "--text", "t", env=env)
        assert result.exit_code == 2
        assert "--from" in result.stderr
        assert "MAILWORKER_DEFAULT_FROM" in result.stderr


class TestSendQueue:
    """``send --queue`` publishes a send_mail task and prints its id."""

    def test_task_lands_in_redis(
        self,
        cli: Invoke,
        send_env: dict[str, str],
        redis_url: str,
        redis_client: redis.Redis,
        tmp_path: Path,
        mail_server: SMTPServer,
    ) -> None:
        """The task message is on the broker's queue with the printed id and the payload."""
        attachment = tmp_path / "a.txt"
        attachment.write_bytes(b"hello")
        env = {**send_env, "MAILWORKER_BROKER_URL": redis_url}
        result = cli(
            "send", "--to", "ann@example.org", "--subject", "Queued", "--text", "later",
            "--attach", str(attachment), "--queue", env=env,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        task_id = result.stdout.strip()
        assert re.fullmatch(r"[0-9a-f-]{36}", task_id)
        [raw] = redis_client.lrange("celery", 0, -1)
        envelope: dict[str, Any] = json.loads(raw)
        assert envelope["headers"]["task"] == "mailworker.send_mail"
        assert envelope["headers"]["id"] == task_id
        assert envelope["content-type"] == "application/json"
        _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
        assert kwargs["to"] == ["ann@example.org"]
        assert kwargs["subject"] == "Queued"
        assert kwargs["profile"] == "default"
        assert kwargs["attachments"] == [
            {"filename": "a.txt", "content": base64.b64encode(b"hello").decode()}
        ]
        assert mail_server.handler.connections == 0  # nothing was sent now

    def test_needs_no_smtp_profile(
        self, cli: Invoke, redis_url: str, redis_client: redis.Redis
    ) -> None:
        """Queueing needs only the broker: profile and default sender are the worker's."""
        env = {"MAILWORKER_BROKER_URL": redis_url}
        result = cli(
            "send", "--to", "a@example.org", "--subject", "s", "--text", "t",
            "--profile", "bulk", "--queue", env=env,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        [raw] = redis_client.lrange("celery", 0, -1)
        _args, kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
        assert kwargs["profile"] == "bulk"
        assert "from_email" not in kwargs

    def test_broker_unreachable(self, cli: Invoke, send_env: dict[str, str]) -> None:
        """An unreachable broker fails in seconds with one line naming it (password hidden)."""
        env = {**send_env, "MAILWORKER_BROKER_URL": f"redis://:pw@127.0.0.1:{free_port()}/0"}
        result = cli(
            "send", "--to", "a@example.org", "--subject", "s", "--text", "t", "--queue", env=env
        )
        assert result.exit_code == 1
        line = one_line_error(result)
        assert "could not publish mailworker.send_mail to redis://:**@127.0.0.1" in line
