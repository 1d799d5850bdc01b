"""The tasks as a producer that publishes by name reaches them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from mailworker.errors import DeadLetteredError
from mailworker.queue.names import SEND_MAIL, SEND_MESSAGE
from mailworker.store.deadletter import DeadLetterStore
from mailworker.worker import app as worker_app
from mailworker.worker.app import configure
from mailworker.worker.settings import Settings


@pytest.fixture
def app(redis_url: str, tmp_path: Path) -> Iterator[Celery]:
    """A configured app with mailworker's tasks, its store on the test's Redis."""
    previous = list(worker_app._publishing)
    settings = Settings.from_env(
        {"MAILWORKER_BROKER_URL": redis_url, "MAILWORKER_SMTP_URL": "smtp://127.0.0.1:1"}
    )
    celery = Celery("by-name", set_as_current=False, include=["mailworker.tasks"])
    configure(celery, settings)
    celery.loader.import_default_modules()
    yield celery
    worker_app._publishing[:] = previous


class TestMisspelledArguments:
    """Arguments a task does not take are dead-lettered as invalid, with a hint."""

    @pytest.mark.parametrize(
        ("task", "kwargs", "field", "hint"),
        [
            (
                SEND_MAIL,
                {"to": "ann@example.org", "subjct": "Hi", "text": "t"},
                "subjct",
                "did you mean 'subject'?",
            ),
            (
                SEND_MESSAGE,
                {"raw_b64": "eA==", "envelope_from": "", "recipient": ["a@example.org"]},
                "recipient",
                "did you mean 'recipients'?",
            ),
        ],
    )
    def test_dead_lettered_invalid_with_the_hint(
        self,
        app: Celery,
        redis_client: redis.Redis,
        task: str,
        kwargs: dict[str, object],
        field: str,
        hint: str,
    ) -> None:
        """A misspelled argument (as send_task publishes it) fails with
        DeadLetteredError, and the dead letter names the field and the fix."""
        result = app.tasks[task].apply(kwargs=kwargs)
        with pytest.raises(DeadLetteredError, match=hint):
            result.get()
        [record] = DeadLetterStore(redis_client).list()
        assert record.reason == "invalid"
        assert record.error["field"] == field
        assert hint in record.error["message"]

    def test_extra_positional_argument(self, app: Celery, redis_client: redis.Redis) -> None:
        """A positional argument beyond the signature is an unknown field, not a crash."""
        args = ("ann@example.org", "Hi", "text", None, None, None, None, None, None, None)
        result = app.tasks[SEND_MAIL].apply(args=(*args, "default", None, None, "extra"))
        with pytest.raises(DeadLetteredError, match="unknown field"):
            result.get()
        [record] = DeadLetterStore(redis_client).list()
        assert record.reason == "invalid"
