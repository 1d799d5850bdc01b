"""Log set-up: JSON lines, and the last-line redaction of secrets."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from mailworker import Profile
from mailworker.cli.worker import profile_secrets
from mailworker.worker.logs import Redactor, configure_logging


class TestRedactor:
    def test_secrets_are_replaced_everywhere_in_an_event(self) -> None:
        """A secret in a string, a list or a nested dict of an event becomes ****."""
        redact = Redactor(["hunter22"])
        event = {
            "event": "x",
            "note": "password hunter22 here",
            "lines": ["C: hunter22", ("hunter22",)],
            "nested": {"deep": "xhunter22x"},
            "count": 3,
        }
        out = redact(None, "info", event)
        assert "hunter22" not in json.dumps(out)
        assert out["note"] == "password **** here"
        assert out["count"] == 3

    def test_short_strings_are_not_treated_as_secrets(self) -> None:
        """A one-letter 'secret' would blank half the log: it is ignored."""
        assert Redactor(["a"])(None, "info", {"event": "a b c"})["event"] == "a b c"

    def test_auth_encodings_of_the_password_are_redacted(self) -> None:
        """The password's base64 forms as AUTH PLAIN and LOGIN send them are secrets too."""
        secrets = profile_secrets([Profile.from_url("smtps://ann:Pa55-w0rd@mail.example.com")])
        assert "Pa55-w0rd" in secrets
        assert "UGE1NS13MHJk" in secrets  # LOGIN
        assert "AGFubgBQYTU1LXcwcmQ=" in secrets  # PLAIN: \0ann\0Pa55-w0rd


class TestConfigureLogging:
    def test_json_lines_with_redaction(self, capsys: pytest.CaptureFixture[str]) -> None:
        """With the JSON format each event is one JSON line on stderr, secrets redacted."""
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        configure_logging("json", secrets=["s3cr3t-value"])
        try:
            structlog.get_logger("t").info("mail.sent", reply="250 ok s3cr3t-value")
        finally:
            structlog.reset_defaults()
            root.handlers[:], root.level = handlers, level
            logging.captureWarnings(False)
        [line] = capsys.readouterr().err.splitlines()
        event = json.loads(line)
        assert event["event"] == "mail.sent"
        assert event["reply"] == "250 ok ****"
