"""Delivery driven directly — no Celery worker — against a real Redis and a real
STARTTLS + AUTH SMTP server: what is sent, deferred, dead-lettered and logged."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Mapping, MutableMapping
from email.message import EmailMessage
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from mailworker.errors import DeadLetteredError
from mailworker.queue.names import SEND_MAIL, SEND_MESSAGE
from mailworker.store import keys
from mailworker.store.deadletter import DeadLetter, DeadLetterStore
from mailworker.store.ledger import Ledger
from mailworker.store.schedule import RetrySchedule, ScheduledTask
from mailworker.worker.delivery import Delivery
from tests.servers import DEFAULT_USER, WRONG_PASSWORD, SMTPServer
from tests.worker_process import TERMINAL_FIELDS

#: The server under test (``smtpd``): STARTTLS with the test CA, AUTH required.
pytestmark = pytest.mark.smtpd_options(tls="starttls", auth=True)

SENDER = "app@example.com"

# Recognisable payload bytes: a PDF-ish attachment and a PNG-ish inline image with every
# byte value, so any transfer-encoding mistake shows.
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 8 + b"\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(reversed(range(256))) * 4


def b64(data: bytes) -> str:
    """Base64 text, as a producer puts attachments into the task's JSON."""
    return base64.b64encode(data).decode("ascii")


def mail(**overrides: Any) -> dict[str, Any]:
    """Valid send_mail kwargs; ``overrides`` replace fields (``...`` removes one)."""
    kwargs: dict[str, Any] = {"to": "ann@example.org", "subject": "Welcome", "text": "Hi Ann"}
    kwargs.update(overrides)
    return {k: v for k, v in kwargs.items() if v is not ...}


class FakeClock:
    """A clock that moves only when told to (starts at the real time)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def only_record(dlq: DeadLetterStore) -> DeadLetter:
    """The one dead-letter record there must be."""
    records = dlq.list()
    assert len(records) == 1, [r.summary() for r in records]
    record = dlq.get(records[0].id)
    assert record is not None
    return record


def payload_of(record: DeadLetter) -> dict[str, Any]:
    """The task kwargs a record keeps, without mailworker's private ``_meta``."""
    return {k: v for k, v in record.kwargs.items() if k != "_meta"}


def claim_one(schedule: RetrySchedule, now: float) -> ScheduledTask:
    """Do what the worker's mover does for the one retry due by ``now``: claim it and
    forget it once "published"."""
    tasks = schedule.claim_due(now=now)
    assert len(tasks) == 1, tasks
    schedule.done(tasks[0].id)
    return tasks[0]


def body(msg: EmailMessage, subtype: str) -> str:
    """The text/``subtype`` body as the producer wrote it (the wire has CRLF)."""
    part = msg.get_body((subtype,))
    assert part is not None, f"no text/{subtype} body"
    return str(part.get_content()).replace("\r\n", "\n")


def tree(part: EmailMessage) -> Any:
    """The MIME structure as nested (type, [children]) tuples."""
    if part.is_multipart():
        return (part.get_content_type(), [tree(p) for p in part.iter_parts()])  # type: ignore[arg-type]
    return part.get_content_type()


def check_terminal_event(event: Mapping[str, Any]) -> None:
    """A terminal event carries every promised field and a C:/S: transcript."""
    missing = [f for f in TERMINAL_FIELDS if f not in event]
    assert not missing, f"{event['event']} lacks {missing}: {event}"
    assert event["task_id"]
    assert isinstance(event["attempt"], int)
    assert event["attempt"] >= 1
    assert isinstance(event["duration_ms"], (int, float))
    assert event["duration_ms"] >= 0
    assert event["reply"]
    transcript = event["transcript"]
    assert isinstance(transcript, list)
    assert transcript
    assert all(line.startswith(("C: ", "S: ")) for line in transcript), transcript


class TestSent:
    """Messages go out as built, with a result that says what the server said."""

    def test_attachments_and_inline_image_arrive_intact(
        self, delivery: Delivery, smtpd: SMTPServer
    ) -> None:
        """A send_mail with text, HTML, an inline image, an attachment and non-ASCII
        headers arrives as multipart/mixed > alternative > related, every part intact."""
        subject = "Ihre Rechnung für März ✓"
        text = "Hallo Zoë,\nIhre Rechnung liegt bei.\n"
        html = '<p>Hallo Zoë</p><img src="cid:logo@example.com">'
        kwargs = mail(
            to=["Zoë Ünicode <zoe@example.org>"],
            cc="carl@example.org",
            bcc=["hidden@example.org"],
            reply_to="Support <support@example.com>",
            subject=subject,
            text=text,
            html=html,
            headers={"X-Campaign": "spring-2025"},
            attachments=[
                {"filename": "rechnung.pdf", "content": b64(PDF), "mimetype": "application/pdf"},
                {
                    "filename": "logo.png",
                    "content": b64(PNG),
                    "mimetype": "image/png",
                    "content_id": "logo@example.com",
                },
            ],
        )

        result = delivery.run(SEND_MAIL, "task-attachments", kwargs)

        [received] = smtpd.handler.wait_for_messages(1)
        assert received.mail_from == SENDER
        assert received.rcpt_tos == ("zoe@example.org", "carl@example.org", "hidden@example.org")
        assert received.tls
        assert received.auth_user == DEFAULT_USER
        assert received.content.isascii(), "built messages are 7-bit clean"
        msg = received.parsed()
        assert tree(msg) == (
            "multipart/mixed",
            [
                (
                    "multipart/alternative",
                    ["text/plain", ("multipart/related", ["text/html", "image/png"])],
                ),
                "application/pdf",
            ],
        )
        assert msg["Subject"] == subject
        assert msg["To"].addresses[0].display_name == "Zoë Ünicode"
        assert msg["To"].addresses[0].addr_spec == "zoe@example.org"
        assert msg["Cc"] == "carl@example.org"
        assert msg["Reply-To"].addresses[0].addr_spec == "support@example.com"
        assert msg["From"].addresses[0].addr_spec == SENDER
        assert "Bcc" not in msg
        assert msg["X-Campaign"] == "spring-2025"
        assert msg["Message-ID"] == result["message_id"]
        assert msg["Date"]
        assert body(msg, "plain") == text
        assert body(msg, "html").rstrip("\n") == html
        parts = {p.get_filename(): p for p in msg.walk() if p.get_filename()}
        assert parts["rechnung.pdf"].get_content() == PDF
        assert parts["rechnung.pdf"].get_content_disposition() == "attachment"
        logo = parts["logo.png"]
        assert logo.get_content() == PNG
        assert logo.get_content_disposition() == "inline"
        assert logo["Content-ID"] == "<logo@example.com>"

    def test_result_says_what_the_server_said(self, delivery: Delivery, smtpd: SMTPServer) -> None:
        """The task result is JSON with status, message_id, accepted, refused, the final
        reply including the server's queue id, and the number of attempts."""
        result = delivery.run(SEND_MAIL, "task-result", mail(to=["ann@example.org"]))

        [received] = smtpd.handler.wait_for_messages(1)
        assert json.loads(json.dumps(result)) == result
        assert result["status"] == "sent"
        assert result["message_id"] == received.parsed()["Message-ID"]
        assert result["accepted"] == ["ann@example.org"]
        assert result["refused"] == {}
        assert result["reply"] == received.reply
        assert received.queue_id in result["reply"]
        assert result["queue_id"] == received.queue_id
        assert result["attempts"] == 1

    def test_prebuilt_message_is_sent_as_given(self, delivery: Delivery, smtpd: SMTPServer) -> None:
        """send_message delivers the caller's bytes unchanged but for CRLF line endings."""
        raw = (
            b"From: App <app@example.com>\nTo: ann@example.org\nSubject: prebuilt\n"
            b"Message-ID: <prebuilt-1@example.com>\n\nfirst line\n.a line with a leading dot\n"
        )
        kwargs = {
            "raw_b64": b64(raw),
            "envelope_from": SENDER,
            "recipients": ["ann@example.org", "bob@example.org"],
        }

        result = delivery.run(SEND_MESSAGE, "task-raw", kwargs)

        [received] = smtpd.handler.wait_for_messages(1)
        assert received.content == raw.replace(b"\n", b"\r\n")
        assert received.rcpt_tos == ("ann@example.org", "bob@example.org")
        assert result["message_id"] == "<prebuilt-1@example.com>"
        assert result["accepted"] == ["ann@example.org", "bob@example.org"]

    def test_messages_share_one_held_session(self, delivery: Delivery, smtpd: SMTPServer) -> None:
        """Several messages go through one TLS session with one AUTH."""
        for i in range(5):
            delivery.run(SEND_MAIL, f"task-reuse-{i}", mail(subject=f"message {i}"))

        smtpd.handler.wait_for_messages(5)
        assert smtpd.handler.counts["connections"] == 1
        assert smtpd.handler.counts["tls_handshakes"] == 1
        assert smtpd.handler.counts["auth_successes"] == 1


INVALID_PAYLOADS = [
    pytest.param(SEND_MAIL, mail(to="not an address"), "to", id="bad-address"),
    pytest.param(SEND_MAIL, mail(to=["ann@example.org", "bob@"]), "to[1]", id="bad-address-list"),
    pytest.param(
        SEND_MAIL,
        mail(subject="Hello\r\nBcc: victim@example.net"),
        "subject",
        id="crlf-in-subject",
    ),
    pytest.param(
        SEND_MAIL,
        mail(headers={"X-Note": "fine\r\nBcc: victim@example.net"}),
        "headers['X-Note']",
        id="crlf-in-extra-header",
    ),
    pytest.param(
        SEND_MAIL,
        mail(attachments=[{"filename": "a.txt", "content": "%%% not base64 %%%"}]),
        "attachments[0].content",
        id="attachment-not-base64",
    ),
    pytest.param(SEND_MAIL, mail(subject=...), "subject", id="missing-subject"),
    pytest.param(SEND_MAIL, mail(to=[]), "to", id="missing-recipients"),
    pytest.param(
        SEND_MESSAGE,
        {"raw_b64": b64(b"Subject: x\r\n\r\nbody\r\n"), "envelope_from": SENDER, "recipients": []},
        "recipients",
        id="raw-missing-recipients",
    ),
]


class TestInvalid:
    """A payload that fails validation is dead-lettered at once and never sent."""

    @pytest.mark.parametrize(("task", "kwargs", "field"), INVALID_PAYLOADS)
    def test_invalid_payload_is_dead_lettered_without_connecting(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        dlq: DeadLetterStore,
        schedule: RetrySchedule,
        task: str,
        kwargs: dict[str, Any],
        field: str,
    ) -> None:
        """The error names the field, the record says "invalid" and keeps the payload,
        nothing is retried and the server never sees a connection."""
        with pytest.raises(DeadLetteredError) as excinfo:
            delivery.run(task, "task-invalid", kwargs)

        assert field in str(excinfo.value)
        record = only_record(dlq)
        assert record.reason == "invalid"
        assert record.error["field"] == field
        assert field in record.error["message"]
        assert payload_of(record) == kwargs, "the record keeps the payload to re-queue"
        assert record.task == task
        assert record.task_id == "task-invalid"
        assert schedule.pending() == 0
        assert smtpd.handler.counts["connections"] == 0

    def test_unknown_profile_waits_for_the_worker_to_know_it(
        self, delivery: Delivery, smtpd: SMTPServer, dlq: DeadLetterStore, schedule: RetrySchedule
    ) -> None:
        """A profile this worker lacks (a rolling deploy) is its configuration, not the
        message's fault: the message is deferred, naming the variable, not dead-lettered."""
        result = delivery.run(SEND_MAIL, "task-profile", mail(profile="nope"))

        assert result["status"] == "deferred"
        assert result["error"] is not None
        assert result["error"]["field"] == "profile"
        assert "MAILWORKER_SMTP_URL_NOPE" in result["error"]["message"]
        assert schedule.pending() == 1
        assert dlq.list() == []
        assert smtpd.handler.counts["connections"] == 0


class TestPermanent:
    """A 5xx goes to the dead-letter store after exactly one attempt."""

    def test_rcpt_5xx_is_dead_lettered_after_one_attempt(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        dlq: DeadLetterStore,
        schedule: RetrySchedule,
    ) -> None:
        """550 to the only recipient: one attempt at the server, a "permanent" record
        with the reply and the transcript, no retry."""
        smtpd.handler.rcpt_replies["bad@example.org"] = "550 5.1.1 no such user"

        with pytest.raises(DeadLetteredError, match="permanent"):
            delivery.run(SEND_MAIL, "task-550", mail(to="bad@example.org"))

        assert smtpd.handler.counts["MAIL"] == 1
        assert smtpd.handler.counts["RCPT"] == 1
        assert smtpd.handler.counts["DATA"] == 0
        record = only_record(dlq)
        assert record.reason == "permanent"
        assert record.code == 550
        assert record.error["stage"] == "rcpt"
        assert record.recipients == ["bad@example.org"]
        assert record.subject == "Welcome"
        assert record.attempts == 1
        assert "C: RCPT TO:<bad@example.org>" in record.transcript
        assert "S: 550 5.1.1 no such user" in record.transcript
        assert schedule.pending() == 0

    def test_data_5xx_is_dead_lettered_after_one_attempt(
        self, delivery: Delivery, smtpd: SMTPServer, dlq: DeadLetterStore
    ) -> None:
        """554 after the content: the server saw the message once, the record says why."""
        smtpd.handler.data_reply = "554 5.6.0 message content rejected"

        with pytest.raises(DeadLetteredError):
            delivery.run(SEND_MAIL, "task-554", mail())

        assert len(smtpd.handler.rejected) == 1
        assert smtpd.handler.counts["DATA"] == 1
        record = only_record(dlq)
        assert record.reason == "permanent"
        assert record.code == 554
        assert record.error["stage"] == "data"
        assert "S: 554 5.6.0 message content rejected" in record.transcript


class TestTransient:
    """4xx: retried in-process first, then as a delayed retry scheduled in Redis."""

    def test_data_4xx_once_is_retried_in_process(
        self, delivery: Delivery, smtpd: SMTPServer, schedule: RetrySchedule
    ) -> None:
        """One 451 after the content: a fresh session sends it again at once."""
        smtpd.handler.data_reply_once = "451 4.3.0 try again"

        result = delivery.run(SEND_MAIL, "task-451-once", mail())

        assert result["status"] == "sent"
        assert result["attempts"] == 2
        assert len(smtpd.handler.wait_for_messages(1)) == 1
        assert len(smtpd.handler.rejected) == 1
        assert smtpd.handler.counts["connections"] == 2, "the retry reconnects first"
        assert schedule.pending() == 0

    def test_421_at_mail_once_is_retried_in_process(
        self, delivery: Delivery, smtpd: SMTPServer
    ) -> None:
        """A 421 (server closing) to MAIL: reconnect and send, no delayed retry."""
        smtpd.handler.mail_reply_once = "421 4.3.2 service shutting down"

        result = delivery.run(SEND_MAIL, "task-421-once", mail())

        assert result["status"] == "sent"
        assert result["attempts"] == 2
        assert len(smtpd.handler.wait_for_messages(1)) == 1

    def test_rcpt_4xx_once_waits_for_the_delayed_retry(
        self,
        make_delivery: Callable[..., Delivery],
        smtpd: SMTPServer,
        schedule: RetrySchedule,
    ) -> None:
        """A greylisted recipient (451 once) is not hammered in-process: the message is
        deferred by the first delay and the scheduled run delivers it."""
        clock = FakeClock()
        delivery = make_delivery(clock=clock)
        smtpd.handler.rcpt_replies_once["grey@example.org"] = "451 4.7.1 greylisted"

        first = delivery.run(SEND_MAIL, "task-grey", mail(to="grey@example.org"))

        assert first["status"] == "deferred"
        assert smtpd.handler.counts["RCPT"] == 1
        assert schedule.next_due() == clock.now + 1.0
        retry = claim_one(schedule, clock.now + 1.0)
        second = delivery.run(retry.task, retry.id, retry.kwargs)
        assert second["status"] == "sent"
        assert second["attempts"] == 2
        assert smtpd.handler.copies() == {"grey@example.org": 1}

    def test_persistent_4xx_schedules_a_retry_that_delivers(
        self,
        make_delivery: Callable[..., Delivery],
        smtpd: SMTPServer,
        schedule: RetrySchedule,
    ) -> None:
        """451 on every in-process try: result "deferred", one retry in Redis due after
        the first MAILWORKER_RETRY_DELAYS delay; run when due, it delivers."""
        clock = FakeClock()
        delivery = make_delivery(clock=clock)
        smtpd.handler.data_reply = "451 4.3.0 try again later"

        result = delivery.run(SEND_MAIL, "task-451", mail())

        assert result["status"] == "deferred"
        assert result["attempts"] == 3
        assert smtpd.handler.counts["DATA"] == 3, "three in-process tries"
        assert schedule.pending() == 1
        assert schedule.next_due() == clock.now + 1.0
        assert result["retry_at"] == clock.now + 1.0
        assert schedule.claim_due(now=clock.now + 0.5) == [], "not due before its time"

        smtpd.handler.data_reply = None
        clock.now += 1.0
        retry = claim_one(schedule, clock.now)
        assert retry.id == result["retry_task_id"]
        assert retry.task == SEND_MAIL
        sent = delivery.run(retry.task, retry.id, retry.kwargs)

        assert sent["status"] == "sent"
        assert sent["attempts"] == 4
        assert len(smtpd.handler.wait_for_messages(1)) == 1
        assert schedule.pending() == 0

    def test_retry_delays_follow_the_setting_then_exhaust(
        self,
        make_delivery: Callable[..., Delivery],
        smtpd: SMTPServer,
        schedule: RetrySchedule,
        dlq: DeadLetterStore,
    ) -> None:
        """Delays are MAILWORKER_RETRY_DELAYS (1, 1, 2, last repeating); the retry that
        would run past MAILWORKER_MAX_AGE runs right at it instead, and then the message
        is dead-lettered as "exhausted"."""
        clock = FakeClock()
        delivery = make_delivery(clock=clock, MAILWORKER_MAX_AGE="5")
        smtpd.handler.rcpt_replies["grey@example.org"] = "451 4.7.1 greylisted"
        first_attempt = clock.now

        result = delivery.run(SEND_MAIL, "task-exhaust", mail(to="grey@example.org"))
        delays = []
        while result["status"] == "deferred":
            delays.append(result["retry_at"] - clock.now)
            clock.now = result["retry_at"]
            retry = claim_one(schedule, clock.now)
            try:
                result = delivery.run(retry.task, retry.id, retry.kwargs)
            except DeadLetteredError:
                break

        assert delays == [1.0, 1.0, 2.0, 1.0]
        assert clock.now - first_attempt == 5.0
        record = only_record(dlq)
        assert record.reason == "exhausted"
        assert record.code == 451
        assert record.attempts == 5
        assert len(record.history) == 5
        assert record.first_attempt_at == first_attempt
        assert record.recipients == ["grey@example.org"]
        assert smtpd.handler.counts["RCPT"] == 5
        assert smtpd.handler.messages == []
        assert schedule.pending() == 0

    def test_delayed_retry_sends_the_same_message_id_and_date(
        self, delivery: Delivery, smtpd: SMTPServer, schedule: RetrySchedule
    ) -> None:
        """Every attempt of one message, also a delayed retry seconds later, carries the
        Message-ID and Date of the first."""
        smtpd.handler.data_reply = "451 4.3.0 try again later"
        delivery.run(SEND_MAIL, "task-identity", mail())
        smtpd.handler.data_reply = None
        time.sleep(1.1)  # a rebuilt message would get a later Date
        retry = claim_one(schedule, time.time() + 5)

        result = delivery.run(retry.task, retry.id, retry.kwargs)

        [sent] = smtpd.handler.wait_for_messages(1)
        attempts = [m.parsed() for m in [*smtpd.handler.rejected, sent]]
        assert len(attempts) == 4
        assert {m["Message-ID"] for m in attempts} == {result["message_id"]}
        assert len({m["Date"] for m in attempts}) == 1


class TestMixedRecipients:
    """Accepted recipients get the message once; only deferred ones are retried."""

    def test_ok_deferred_and_rejected_recipients(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        schedule: RetrySchedule,
        dlq: DeadLetterStore,
    ) -> None:
        """ok@ is delivered once, a retry is scheduled for grey@ alone, bad@ gets a
        "permanent" record alone; when grey@'s retry succeeds ok@ still has one copy."""
        smtpd.handler.rcpt_replies["grey@example.org"] = "451 4.7.1 greylisted"
        smtpd.handler.rcpt_replies["bad@example.org"] = "550 5.1.1 no such user"
        recipients = ["ok@example.org", "grey@example.org", "bad@example.org"]

        first = delivery.run(SEND_MAIL, "task-mixed", mail(to=recipients))

        assert first["status"] == "sent"
        assert first["accepted"] == ["ok@example.org"]
        assert first["refused"]["grey@example.org"]["status"] == "deferred"
        assert first["refused"]["bad@example.org"]["status"] == "rejected"
        assert smtpd.handler.copies() == {"ok@example.org": 1}
        record = only_record(dlq)
        assert record.reason == "permanent"
        assert record.recipients == ["bad@example.org"]
        assert record.code == 550
        assert schedule.pending() == 1

        del smtpd.handler.rcpt_replies["grey@example.org"]
        retry = claim_one(schedule, time.time() + 5)
        second = delivery.run(retry.task, retry.id, retry.kwargs)

        assert second["status"] == "sent"
        assert second["accepted"] == ["grey@example.org"]
        assert smtpd.handler.copies() == {"ok@example.org": 1, "grey@example.org": 1}
        ids = {m.parsed()["Message-ID"] for m in smtpd.handler.messages}
        assert ids == {first["message_id"]}
        assert len(dlq.list()) == 1
        assert schedule.pending() == 0

    def test_no_recipient_accepted_splits_deferred_and_rejected(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        schedule: RetrySchedule,
        dlq: DeadLetterStore,
    ) -> None:
        """Every recipient refused, one 451 and one 550: the 550 is dead-lettered, the
        451 alone is retried, and the result says "deferred"."""
        smtpd.handler.rcpt_replies["grey@example.org"] = "451 4.7.1 greylisted"
        smtpd.handler.rcpt_replies["bad@example.org"] = "550 5.1.1 no such user"

        result = delivery.run(
            SEND_MAIL, "task-none", mail(to=["grey@example.org", "bad@example.org"])
        )

        assert result["status"] == "deferred"
        assert only_record(dlq).recipients == ["bad@example.org"]
        del smtpd.handler.rcpt_replies["grey@example.org"]
        retry = claim_one(schedule, time.time() + 5)
        assert delivery.run(retry.task, retry.id, retry.kwargs)["status"] == "sent"
        assert smtpd.handler.copies() == {"grey@example.org": 1}


class TestOnce:
    """Idempotency, the per-message lock and the poison guard."""

    def test_same_task_twice_sends_once(self, delivery: Delivery, smtpd: SMTPServer) -> None:
        """A redelivered task (same id) after a successful send returns the recorded
        result marked duplicate and sends nothing."""
        first = delivery.run(SEND_MAIL, "task-twice", mail())
        second = delivery.run(SEND_MAIL, "task-twice", mail())

        assert second["duplicate"] is True
        assert second["message_id"] == first["message_id"]
        assert second["status"] == "sent"
        assert len(smtpd.handler.messages) == 1

    def test_same_idempotency_key_sends_once(self, delivery: Delivery, smtpd: SMTPServer) -> None:
        """Two tasks with one idempotency_key are one message."""
        kwargs = mail(idempotency_key="order-42-receipt")
        delivery.run(SEND_MAIL, "task-key-a", kwargs)
        second = delivery.run(SEND_MAIL, "task-key-b", kwargs)

        assert second["duplicate"] is True
        assert len(smtpd.handler.messages) == 1

    def test_copy_sent_in_the_kill_window_keeps_its_message_id(
        self, delivery: Delivery, smtpd: SMTPServer, redis_client: redis.Redis
    ) -> None:
        """A task redelivered after its worker died between the server's 250 and the
        idempotency record (the one documented duplicate) sends the same Message-ID,
        so the recipient's mail system can tell it is the same message."""
        delivery.run(SEND_MAIL, "task-window", mail())
        redis_client.delete(keys.sent("task-window"))  # the record the dead worker never wrote

        delivery.run(SEND_MAIL, "task-window", mail())

        copies = [m.parsed()["Message-ID"] for m in smtpd.handler.wait_for_messages(2)]
        assert copies[0] == copies[1], f"the duplicate got a new Message-ID: {copies}"

    def test_locked_message_is_deferred_not_sent(
        self,
        make_delivery: Callable[..., Delivery],
        smtpd: SMTPServer,
        schedule: RetrySchedule,
        redis_client: redis.Redis,
    ) -> None:
        """While another delivery holds the message's lock, a run schedules a look
        after the lock's lifetime and sends nothing; that later run sends it."""
        clock = FakeClock()
        delivery = make_delivery(clock=clock)
        ledger = Ledger(redis_client)
        token = ledger.acquire("task-locked", ttl=30)
        assert token is not None

        result = delivery.run(SEND_MAIL, "task-locked", mail())

        assert result["status"] == "deferred"
        assert result["reason"] == "locked"
        assert schedule.pending() == 1
        assert schedule.next_due() == clock.now + (delivery.settings.task_time_limit + 2)
        assert smtpd.handler.counts["connections"] == 0

        ledger.release("task-locked", token)
        clock.now += delivery.settings.task_time_limit + 2
        retry = claim_one(schedule, clock.now)
        assert delivery.run(retry.task, retry.id, retry.kwargs)["status"] == "sent"
        assert len(smtpd.handler.wait_for_messages(1)) == 1

    def test_poison_message_is_dead_lettered_without_sending(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        dlq: DeadLetterStore,
        redis_client: redis.Redis,
    ) -> None:
        """A task message that already started 1 + max_redeliveries times (its worker
        died each time) goes to the store as "poison" instead of running again."""
        limit = 1 + delivery.settings.max_redeliveries
        redis_client.set(keys.runs("task-poison"), limit)

        with pytest.raises(DeadLetteredError, match="poison"):
            delivery.run(SEND_MAIL, "task-poison", mail())

        record = only_record(dlq)
        assert record.reason == "poison"
        assert record.task_id == "task-poison"
        assert payload_of(record) == mail()
        assert smtpd.handler.counts["connections"] == 0

    def test_redelivery_below_the_poison_limit_still_sends(
        self, delivery: Delivery, smtpd: SMTPServer, redis_client: redis.Redis
    ) -> None:
        """The last allowed redelivery (start number 1 + max_redeliveries) runs normally."""
        redis_client.set(keys.runs("task-almost"), delivery.settings.max_redeliveries)

        assert delivery.run(SEND_MAIL, "task-almost", mail())["status"] == "sent"
        assert len(smtpd.handler.wait_for_messages(1)) == 1


class TestLogs:
    """Every message ends in one structured terminal event; secrets never appear."""

    @staticmethod
    def three_outcomes(
        delivery: Delivery, server: SMTPServer
    ) -> tuple[
        dict[str, MutableMapping[str, Any]], list[dict[str, Any]], list[MutableMapping[str, Any]]
    ]:
        """Send one message that is sent, one deferred (451) and one dead-lettered (550);
        returns the mail.* events by name, the results and every captured event."""
        server.handler.rcpt_replies["grey@example.org"] = "451 4.7.1 greylisted"
        server.handler.rcpt_replies["bad@example.org"] = "550 5.1.1 no such user"
        with capture_logs() as events:
            sent = delivery.run(SEND_MAIL, "task-log-sent", mail())
            deferred = delivery.run(SEND_MAIL, "task-log-deferred", mail(to="grey@example.org"))
            with pytest.raises(DeadLetteredError):
                delivery.run(SEND_MAIL, "task-log-dead", mail(to="bad@example.org"))
        by_name = {e["event"]: e for e in events if e["event"].startswith("mail.")}
        assert set(by_name) == {"mail.sent", "mail.deferred", "mail.dead_lettered"}
        return by_name, [sent, deferred], events

    def test_terminal_events_carry_the_story(self, delivery: Delivery, smtpd: SMTPServer) -> None:
        """mail.sent, mail.deferred and mail.dead_lettered each carry message_id, task_id,
        profile, attempt, duration_ms, the server's reply and a C:/S: transcript."""
        by_name, (sent, deferred), events = self.three_outcomes(delivery, smtpd)

        for event in by_name.values():
            check_terminal_event(event)
            assert event["profile"] == "default"

        ok = by_name["mail.sent"]
        assert ok["task_id"] == "task-log-sent"
        assert ok["message_id"] == sent["message_id"]
        assert ok["reply"] == sent["reply"]
        assert ok["queue_id"] == smtpd.handler.messages[0].queue_id
        assert "S: " + sent["reply"] in ok["transcript"]

        later = by_name["mail.deferred"]
        assert later["task_id"] == "task-log-deferred"
        assert later["message_id"] == deferred["message_id"]
        assert later["delay"] == 1.0
        assert later["error"]
        assert "S: 451 4.7.1 greylisted" in later["transcript"]

        dead = by_name["mail.dead_lettered"]
        assert dead["task_id"] == "task-log-dead"
        assert dead["reason"] == "permanent"
        assert "S: 550 5.1.1 no such user" in dead["transcript"]

        connected = [e for e in events if e["event"] == "smtp.connected"]
        assert len(connected) == 1
        assert connected[0]["tls_version"].startswith("TLSv1.")
        assert connected[0]["cipher"]
        assert connected[0]["auth_mechanism"] == "PLAIN"

    def test_terminal_event_reply_starts_with_the_code(
        self, delivery: Delivery, smtpd: SMTPServer
    ) -> None:
        """The ``reply`` of every terminal event is the server's reply as said, code
        first ("451 4.7.1 greylisted"), so operators can filter on it."""
        by_name, _, _ = self.three_outcomes(delivery, smtpd)

        replies = {name: event["reply"] for name, event in by_name.items()}
        assert replies["mail.sent"].startswith("250 ")
        assert replies["mail.deferred"] == "451 4.7.1 greylisted", replies
        assert replies["mail.dead_lettered"] == "550 5.1.1 no such user", replies

    def test_auth_line_is_redacted_in_logs_and_records(
        self, delivery: Delivery, smtpd: SMTPServer, dlq: DeadLetterStore
    ) -> None:
        """An AUTH failure is dead-lettered with its transcript, whose AUTH line shows
        "****": neither the password nor its base64 appear in events or the record."""
        with capture_logs() as events, pytest.raises(DeadLetteredError):
            delivery.run(SEND_MAIL, "task-auth", mail(profile="wrong"))

        record = only_record(dlq)
        plain = b64(f"\0{DEFAULT_USER}\0{WRONG_PASSWORD}".encode())
        everything = json.dumps(events) + record.to_json()
        for secret in (WRONG_PASSWORD, b64(WRONG_PASSWORD.encode()), plain):
            assert secret not in everything
        [dead] = [e for e in events if e["event"] == "mail.dead_lettered"]
        assert dead["profile"] == "wrong"
        assert "C: AUTH PLAIN ****" in dead["transcript"]
        check_terminal_event(dead)
        assert record.reason == "permanent"
        assert record.code == 535
        assert "C: AUTH PLAIN ****" in record.transcript
        assert smtpd.handler.counts["auth_attempts"] == 1
        assert smtpd.handler.counts["MAIL"] == 0
