"""The dead-letter store's byte limits as settings: environment and Django."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from mailworker.contrib.django.conf import problems, worker_environ
from mailworker.errors import ConfigError
from mailworker.store.deadletter import DEFAULT_MAX_BYTES, DEFAULT_MAX_PAYLOAD_BYTES
from mailworker.worker.settings import Settings


class TestDlqByteSettings:
    """MAILWORKER_DLQ_MAX_BYTES and MAILWORKER_DLQ_MAX_PAYLOAD_BYTES reach the store."""

    def test_defaults(self) -> None:
        """Unset, the budget is 256 MiB and the per-record payload cap 34 MiB, as the store's."""
        settings = Settings.from_env({})
        assert settings.dlq_max_bytes == DEFAULT_MAX_BYTES == 256 * 1024 * 1024
        assert settings.dlq_max_payload_bytes == DEFAULT_MAX_PAYLOAD_BYTES == 34 * 1024 * 1024

    def test_from_environment(self) -> None:
        """Both are read from the environment; 0 switches a limit off."""
        settings = Settings.from_env(
            {"MAILWORKER_DLQ_MAX_BYTES": "1048576", "MAILWORKER_DLQ_MAX_PAYLOAD_BYTES": "0"}
        )
        assert (settings.dlq_max_bytes, settings.dlq_max_payload_bytes) == (1048576, 0)

    @pytest.mark.parametrize(
        "var", ["MAILWORKER_DLQ_MAX_BYTES", "MAILWORKER_DLQ_MAX_PAYLOAD_BYTES"]
    )
    @pytest.mark.parametrize("value", ["-1", "lots"])
    def test_bad_values_name_the_variable(self, var: str, value: str) -> None:
        """A negative or non-numeric value is an error naming the variable."""
        with pytest.raises(ConfigError, match=var):
            Settings.from_env({var: value})

    def test_django_settings_pass_them_to_the_worker(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """MAILWORKER["DLQ_MAX_BYTES"] and ["DLQ_MAX_PAYLOAD_BYTES"] become worker variables."""
        monkeypatch.delenv("MAILWORKER_BROKER_URL", raising=False)
        django = SimpleNamespace(MAILWORKER={"DLQ_MAX_BYTES": 1000, "DLQ_MAX_PAYLOAD_BYTES": 0})
        env = worker_environ(django)
        assert env["MAILWORKER_DLQ_MAX_BYTES"] == "1000"
        assert env["MAILWORKER_DLQ_MAX_PAYLOAD_BYTES"] == "0"
        bad = problems(SimpleNamespace(MAILWORKER={"DLQ_MAX_BYTES": -1}))
        assert [p.setting for p in bad] == ["MAILWORKER['DLQ_MAX_BYTES']"]
