"""The worker's message limits and how publishing fails when the broker is away."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mailworker.errors import ConfigError, InvalidMessageError
from mailworker.message import Limits
from mailworker.queue.names import SEND_MAIL
from mailworker.worker.outcome import Meta
from mailworker.worker.prepare import prepare
from mailworker.worker.settings import Settings
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


class TestSettings:
    """MAILWORKER_MAX_MESSAGE_BYTES and MAILWORKER_MAX_RECIPIENTS reach the limits."""

    def test_from_env(self) -> None:
        """The variables set the limits a delivery checks."""
        settings = Settings.from_env(
            {"MAILWORKER_MAX_MESSAGE_BYTES": "5000", "MAILWORKER_MAX_RECIPIENTS": "7"}
        )
        assert settings.message_limits == Limits(max_message_bytes=5000, max_recipients=7)

    @pytest.mark.parametrize(
        "var",
        ["MAILWORKER_MAX_MESSAGE_BYTES", "MAILWORKER_MAX_RECIPIENTS", "MAILWORKER_PUBLISH_TIMEOUT"],
    )
    def test_zero_is_refused(self, var: str) -> None:
        """A limit of 0 is a configuration error naming the variable."""
        with pytest.raises(ConfigError, match=var):
            Settings.from_env({var: "0"})


class TestBuiltSize:
    """The bytes built are checked too: quoted-printable can outgrow the payload."""

    def test_encoded_body_over_the_limit(self) -> None:
        """A body of 600 non-ASCII characters passes the payload estimate of a 1,500-byte
        limit but not as the ~1,900 bytes it is on the wire (1,200 UTF-8 bytes in
        base64, plus headers); the message is invalid."""
        meta: Meta = {"key": "k", "origin": "t", "first_attempt_at": 0.0}
        kwargs = {"to": "ann@example.org", "subject": "s", "text": "é" * 600}
        with pytest.raises(InvalidMessageError) as caught:
            prepare(
                SEND_MAIL,
                kwargs,
                meta,
                default_from="shop@example.com",
                check_profile=lambda _name: None,
                limits=Limits(max_message_bytes=1500),
            )
        assert caught.value.field == "message"


class TestPublishTimeout:
    """send_mail.delay fails fast, naming the broker, when the broker is unreachable."""

    def test_unreachable_broker(self) -> None:
        """With MAILWORKER_PUBLISH_TIMEOUT=1 and nothing listening, delay() raises
        PublishError naming the broker URL (password hidden) within seconds, not ~20 s."""
        url = f"redis://:secret@127.0.0.1:{free_port()}/0"
        code = """
            import time
            from mailworker import PublishError, send_mail
            started = time.monotonic()
            try:
                send_mail.delay(to="a@example.org", subject="s", text="t")
            except PublishError as exc:
                print(f"{time.monotonic() - started:.1f}", exc)
            """
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            cwd=ROOT,
            env={
                "PATH": "/usr/bin:/bin",
                "MAILWORKER_BROKER_URL": url,
                "MAILWORKER_PUBLISH_TIMEOUT": "1",
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        seconds, _, message = done.stdout.strip().partition(" ")
        assert "could not publish mailworker.send_mail to redis://:**@127.0.0.1" in message
        assert "secret" not in message
        assert float(seconds) < 10
