"""``_meta`` and ``idempotency_key`` read back from the broker are untrusted input: a
malformed one is dead-lettered as invalid, never a crash, a retry loop or mail to
addresses the message does not have."""

from __future__ import annotations

from typing import Any

import pytest

from mailworker.errors import DeadLetteredError
from mailworker.queue.names import SEND_MAIL
from mailworker.store.deadletter import DeadLetterStore
from mailworker.store.schedule import RetrySchedule
from mailworker.worker.delivery import Delivery
from mailworker.worker.outcome import check_meta
from tests.servers import SMTPServer

pytestmark = pytest.mark.smtpd_options()


def mail(**overrides: Any) -> dict[str, Any]:
    """A valid send_mail payload to two recipients."""
    kwargs: dict[str, Any] = {
        "to": ["ann@example.org", "bob@example.org"],
        "subject": "Hi",
        "text": "Hello",
        "from_email": "shop@example.com",
    }
    kwargs.update(overrides)
    return kwargs


class TestMalformedMeta:
    """Each malformed value is named in an invalid dead letter; nothing is sent."""

    @pytest.mark.parametrize(
        ("meta", "field"),
        [
            ({"first_attempt_at": "yesterday"}, "_meta.first_attempt_at"),
            ({"first_attempt_at": float("nan")}, "_meta.first_attempt_at"),
            ({"attempts": True}, "_meta.attempts"),
            ({"retries": -1}, "_meta.retries"),
            ({"recipients": "abc"}, "_meta.recipients"),
            ({"message_id": "<a@b>\r\nBcc: x@y"}, "_meta.message_id"),
            ({"date": "not a date"}, "_meta.date"),
            ({"key": {"nested": 1}}, "_meta.key"),
            ({"history": "lots"}, "_meta.history"),
            ("not an object", "_meta"),
        ],
    )
    def test_dead_lettered_invalid(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        dlq: DeadLetterStore,
        schedule: RetrySchedule,
        meta: object,
        field: str,
    ) -> None:
        """The task fails with DeadLetteredError; the record is invalid and names the
        field; no retry is scheduled and the server sees no connection."""
        with pytest.raises(DeadLetteredError, match=field.replace(".", r"\.")):
            delivery.run(SEND_MAIL, "task-meta", mail(_meta=meta))
        [record] = dlq.list()
        assert record.reason == "invalid"
        assert record.error["field"] == field
        assert schedule.pending() == 0
        assert smtpd.handler.counts["connections"] == 0

    def test_overlong_idempotency_key(self, delivery: Delivery, dlq: DeadLetterStore) -> None:
        """An idempotency_key over 200 characters is invalid before anything is keyed
        on it."""
        with pytest.raises(DeadLetteredError, match="idempotency_key"):
            delivery.run(SEND_MAIL, "task-key", mail(idempotency_key="k" * 201))
        assert dlq.list()[0].error["field"] == "idempotency_key"

    def test_recipients_must_be_the_messages_own(
        self, delivery: Delivery, smtpd: SMTPServer, dlq: DeadLetterStore
    ) -> None:
        """A retry naming a recipient the message does not have sends to nobody."""
        meta = {"recipients": ["ann@example.org", "mallory@attacker.example"]}
        with pytest.raises(DeadLetteredError, match="mallory"):
            delivery.run(SEND_MAIL, "task-strangers", mail(_meta=meta))
        assert dlq.list()[0].error["field"] == "_meta.recipients"
        assert smtpd.handler.messages == []

    def test_valid_subset_is_sent_to_that_subset(
        self, delivery: Delivery, smtpd: SMTPServer
    ) -> None:
        """A well-formed retry for one of the recipients reaches only that one."""
        result = delivery.run(
            SEND_MAIL, "task-subset", mail(_meta={"recipients": ["bob@example.org"]})
        )
        assert result["accepted"] == ["bob@example.org"]


class TestCheckMeta:
    """check_meta keeps what it knows and bounds what grows."""

    def test_unknown_keys_dropped_history_bounded(self) -> None:
        """Keys a newer worker may add are dropped; history keeps its last 50 entries."""
        history = [{"at": float(i), "error": "x"} for i in range(80)]
        meta = check_meta({"future": 1, "history": history, "attempts": 3})
        assert meta == {"history": history[-50:], "attempts": 3}
