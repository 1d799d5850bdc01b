"""The guarantees of the "message-loss and duplicate paths" review, checked one by one:
in-doubt sends, unexpected errors, Redis trouble, redone follow-ups, Message-IDs, the
poison guard, send deadlines, AUTH failures, SMTPUTF8 and the Celery options.

Delivery is driven directly (no worker) against a real Redis and a real SMTP server;
the SMTP-level checks use :class:`SMTPSession` alone.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from structlog.testing import capture_logs

from mailworker.errors import (
    DeadLetteredError,
    SMTPAuthError,
    SMTPNotSupportedError,
    SMTPReplyError,
    SMTPTimeoutError,
)
from mailworker.queue.names import SEND_MAIL
from mailworker.smtp import SMTPSession
from mailworker.smtp.profile import Profile
from mailworker.store import keys
from mailworker.store.deadletter import DeadLetterStore
from mailworker.store.schedule import RetrySchedule, ScheduledTask
from mailworker.worker.app import configure
from mailworker.worker.delivery import Delivery
from mailworker.worker.settings import Settings
from tests.servers import (
    DEFAULT_TOKEN,
    DEFAULT_USER,
    ScriptConnection,
    ScriptedServer,
    SMTPServer,
    TLSMaterials,
    smtp_url,
)

# The server under test (``smtpd``) takes no options: clear text without AUTH, which is
# fast; the guarantees are not about TLS.

SENDER = "app@example.com"
RCPT = "ann@example.org"
#: An ASCII message for the SMTP-level tests.
MESSAGE = b"From: app@example.com\r\nTo: ann@example.org\r\nSubject: hi\r\n\r\nhello\r\n"
#: Text a failing OAuth token provider puts in its exception; it must never surface.
TOKEN_TEXT = "ya29.leaked-refresh-token-5f1e"

SMTPFactory = Callable[..., SMTPServer]
ScriptedFactory = Callable[..., ScriptedServer]


def mail(**overrides: Any) -> dict[str, Any]:
    """Valid send_mail kwargs; ``overrides`` replace fields."""
    kwargs: dict[str, Any] = {"to": RCPT, "subject": "Welcome", "text": "Hi Ann"}
    kwargs.update(overrides)
    return kwargs


def fail_once(monkeypatch: pytest.MonkeyPatch, target: object, name: str, exc: Exception) -> None:
    """Make ``target.name`` raise ``exc`` on its first call and behave normally after."""
    original = getattr(target, name)
    calls = 0

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


def claim_one(schedule: RetrySchedule) -> ScheduledTask:
    """Claim the one scheduled retry, as the worker's mover does once it is due."""
    tasks = schedule.claim_due(now=time.time() + 600)
    assert len(tasks) == 1, tasks
    schedule.done(tasks[0].id)
    return tasks[0]


def message_ids(server: SMTPServer) -> list[str]:
    """The Message-ID of every accepted copy, oldest first."""
    return [str(m.parsed()["Message-ID"]) for m in list(server.handler.messages)]


def events_named(events: list[Any], name: str) -> list[Any]:
    """The captured structlog events called ``name``."""
    return [e for e in events if e["event"] == name]


def profile_for(port: int, **options: Any) -> Profile:
    """A clear-text profile (no credentials) for a local test server."""
    return Profile.from_url(smtp_url(port, scheme="smtp", **options))


class TestInDoubt:
    """A message sent in full whose verdict never came is not sent again at once."""

    def test_lost_reply_to_the_final_dot_is_in_doubt(self, smtpd: SMTPServer) -> None:
        """The server records the message but answers the final dot too late: the send
        fails with a timeout marked in_doubt, and the server did get the message."""
        smtpd.handler.command_delays["DATA"] = 3
        session = SMTPSession(profile_for(smtpd.port, timeout=1))

        with pytest.raises(SMTPTimeoutError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)

        assert failure.value.in_doubt is True
        assert failure.value.stage == "data"
        assert failure.value.is_transient
        assert failure.value.to_dict()["in_doubt"] is True
        assert len(smtpd.handler.messages) == 1

    def test_in_doubt_message_waits_for_the_delayed_retry(
        self, make_delivery: Callable[..., Delivery], smtpd: SMTPServer, schedule: RetrySchedule
    ) -> None:
        """Through Delivery the server gets exactly one copy (no in-process retry), the
        task result is "deferred" with a retry scheduled and an error marked in_doubt."""
        delivery = make_delivery(timeout=1)
        smtpd.handler.command_delays["DATA"] = 3

        result = delivery.run(SEND_MAIL, "task-in-doubt", mail())

        assert result["status"] == "deferred"
        assert result["attempts"] == 1
        assert result["error"]["in_doubt"] is True
        assert result["error"]["stage"] == "data"
        assert smtpd.handler.counts["DATA"] == 1, "not sent again in-process"
        assert smtpd.handler.copies() == {RCPT: 1}
        assert schedule.pending() == 1

    def test_deferred_event_says_the_message_may_have_arrived(
        self, make_delivery: Callable[..., Delivery], smtpd: SMTPServer, schedule: RetrySchedule
    ) -> None:
        """The mail.deferred log line and the scheduled retry's history tell the operator
        that the deferred message may already have been delivered (in doubt)."""
        delivery = make_delivery(timeout=1)
        smtpd.handler.command_delays["DATA"] = 3

        with capture_logs() as events:
            delivery.run(SEND_MAIL, "task-in-doubt-log", mail())

        [deferred] = events_named(events, "mail.deferred")
        logged = deferred.get("in_doubt") is True or "doubt" in str(deferred.get("error"))
        assert logged, f"mail.deferred does not say the message is in doubt: {deferred}"
        history = claim_one(schedule).kwargs["_meta"]["history"]
        assert "doubt" in str(history[-1]["error"]), history

    def test_4xx_to_the_final_dot_is_not_in_doubt(self, smtpd: SMTPServer) -> None:
        """A 451 reply to the final dot is a clear verdict: not in doubt."""
        smtpd.handler.data_reply_once = "451 4.3.0 try again"
        session = SMTPSession(profile_for(smtpd.port, timeout=5))

        with pytest.raises(SMTPReplyError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)
        session.close()

        assert failure.value.code == 451
        assert failure.value.in_doubt is False

    def test_4xx_to_the_final_dot_is_retried_in_process(
        self, delivery: Delivery, smtpd: SMTPServer, schedule: RetrySchedule
    ) -> None:
        """One 451 to the final dot: sent again at once, one accepted copy, no retry."""
        smtpd.handler.data_reply_once = "451 4.3.0 try again"

        result = delivery.run(SEND_MAIL, "task-451-dot", mail())

        assert result["status"] == "sent"
        assert result["attempts"] == 2
        assert smtpd.handler.copies() == {RCPT: 1}
        assert len(smtpd.handler.rejected) == 1
        assert schedule.pending() == 0


class TestUnexpectedErrors:
    """A failure outside the SMTP exchange defers the message instead of losing it."""

    def test_error_while_preparing_schedules_a_retry(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        schedule: RetrySchedule,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A bug before sending (the session pool raises once): the result is "deferred",
        a mail.error event is logged, and the scheduled retry delivers the message."""
        fail_once(monkeypatch, delivery.pool, "profile", RuntimeError("pool exploded"))

        with capture_logs() as events:
            result = delivery.run(SEND_MAIL, "task-bug-prepare", mail())

        assert result["status"] == "deferred"
        assert "RuntimeError" in result["error"]["message"]
        [error] = events_named(events, "mail.error")
        assert error["error_type"] == "RuntimeError"
        assert error["task_id"] == "task-bug-prepare"
        assert smtpd.handler.counts["connections"] == 0
        retry = claim_one(schedule)
        assert delivery.run(retry.task, retry.id, retry.kwargs)["status"] == "sent"
        assert smtpd.handler.copies() == {RCPT: 1}

    def test_error_in_the_session_schedules_a_retry(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        schedule: RetrySchedule,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The session's send raises an unexpected error once: "deferred" with a retry
        and a mail.error event; the retry delivers one copy with the same Message-ID."""
        fail_once(monkeypatch, SMTPSession, "send", RuntimeError("session exploded"))

        with capture_logs() as events:
            result = delivery.run(SEND_MAIL, "task-bug-send", mail())

        assert result["status"] == "deferred"
        assert len(events_named(events, "mail.error")) == 1
        retry = claim_one(schedule)
        sent = delivery.run(retry.task, retry.id, retry.kwargs)
        assert sent["status"] == "sent"
        assert message_ids(smtpd) == [result["message_id"]]

    def test_ca_file_that_is_not_pem_is_a_permanent_tls_error(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        dlq: DeadLetterStore,
        schedule: RetrySchedule,
        not_pem: Path,
    ) -> None:
        """A profile whose ca_file holds no certificate dead-letters the message as
        "permanent" with an SMTPTLSError about the ca_file, and never connects."""
        with pytest.raises(DeadLetteredError, match="permanent"):
            delivery.run(SEND_MAIL, "task-bad-ca", mail(profile="badca"))

        [record] = dlq.list()
        assert record.reason == "permanent"
        assert record.error["type"] == "SMTPTLSError"
        assert "ca_file" in record.error["message"]
        assert "Traceback" not in record.error["message"]
        assert record.error["transient"] is False
        assert schedule.pending() == 0
        assert smtpd.handler.counts["connections"] == 0


class TestRedisTrouble:
    """Redis failing right after the server's 250 does not send the message twice."""

    def test_unrecorded_acceptance_still_reports_sent(
        self, delivery: Delivery, smtpd: SMTPServer, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The idempotency record cannot be written: the result is still "sent" (marked
        idempotency_recorded False), mail.idempotency_unrecorded is logged, one copy."""

        def down(*_args: Any, **_kwargs: Any) -> None:
            raise redis.ConnectionError("Redis went away")

        # The record goes with the lock's release in one script (finish), or alone.
        monkeypatch.setattr(delivery.ledger, "record_sent", down)
        monkeypatch.setattr(delivery.ledger, "finish", down)

        with capture_logs() as events:
            result = delivery.run(SEND_MAIL, "task-redis-down", mail())

        assert result["status"] == "sent"
        assert result["idempotency_recorded"] is False
        [unrecorded] = events_named(events, "mail.idempotency_unrecorded")
        assert "ConnectionError" in unrecorded["error"]
        assert len(events_named(events, "mail.sent")) == 1
        assert smtpd.handler.copies() == {RCPT: 1}


class TestFollowUp:
    """A partial delivery's follow-up, interrupted, is redone by the redelivery."""

    RECIPIENTS = ("ok@example.org", "grey@example.org", "bad@example.org")

    @pytest.fixture
    def interrupted(
        self, delivery: Delivery, smtpd: SMTPServer, monkeypatch: pytest.MonkeyPatch
    ) -> dict[str, Any]:
        """Send to ok@ (accepted), grey@ (451 always) and bad@ (550) while Redis fails the
        first scheduling of the follow-up; returns the task's kwargs."""
        smtpd.handler.rcpt_replies["grey@example.org"] = "451 4.7.1 greylisted"
        smtpd.handler.rcpt_replies["bad@example.org"] = "550 5.1.1 no such user"
        fail_once(monkeypatch, delivery.schedule, "add", redis.ConnectionError("blip"))
        kwargs = mail(to=list(self.RECIPIENTS))
        with pytest.raises(redis.ConnectionError):
            delivery.run(SEND_MAIL, "task-partial", kwargs)
        return kwargs

    def test_redelivery_redoes_the_follow_up_without_sending(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        schedule: RetrySchedule,
        dlq: DeadLetterStore,
        interrupted: dict[str, Any],
    ) -> None:
        """The interrupted run hands the task back; its redelivery sends nothing more but
        schedules grey@'s retry and dead-letters bad@; a third run does neither again."""
        assert smtpd.handler.copies() == {"ok@example.org": 1}
        assert schedule.pending() == 0
        assert dlq.count() == 0

        again = delivery.run(SEND_MAIL, "task-partial", interrupted)

        assert again["duplicate"] is True
        assert smtpd.handler.copies() == {"ok@example.org": 1}
        assert schedule.pending() == 1
        [record] = dlq.list()
        assert record.reason == "permanent"
        assert record.recipients == ["bad@example.org"]

        third = delivery.run(SEND_MAIL, "task-partial", interrupted)

        assert third["duplicate"] is True
        assert third["follow_up_done"] is True
        assert schedule.pending() == 1
        assert dlq.count() == 1
        assert smtpd.handler.copies() == {"ok@example.org": 1}
        assert claim_one(schedule).kwargs["_meta"]["recipients"] == ["grey@example.org"]

    def test_redone_follow_up_keeps_the_message_id_and_date(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        schedule: RetrySchedule,
        dlq: DeadLetterStore,
        interrupted: dict[str, Any],
    ) -> None:
        """grey@'s retry scheduled by the redelivery sends the Message-ID and Date ok@ got,
        and bad@'s dead letter keeps that Message-ID for a `dlq retry`: one message."""
        time.sleep(1.05)  # a Date built anew by the redelivery would differ
        delivery.run(SEND_MAIL, "task-partial", interrupted)
        del smtpd.handler.rcpt_replies["grey@example.org"]
        retry = claim_one(schedule)

        sent = delivery.run(retry.task, retry.id, retry.kwargs)

        assert sent["accepted"] == ["grey@example.org"]
        ok_copy, grey_copy = (m.parsed() for m in smtpd.handler.wait_for_messages(2))
        [record] = dlq.list()
        want = {"Message-ID": ok_copy["Message-ID"], "Date": ok_copy["Date"]}
        assert {
            "retry's Message-ID": grey_copy["Message-ID"],
            "retry's Date": grey_copy["Date"],
            "dead letter's Message-ID": record.kwargs["_meta"].get("message_id"),
        } == {
            "retry's Message-ID": want["Message-ID"],
            "retry's Date": want["Date"],
            "dead letter's Message-ID": want["Message-ID"],
        }


class TestMessageID:
    """The Message-ID is fixed per message: by its key and the task that first carried it."""

    def test_reused_key_gets_a_new_message_id(
        self, delivery: Delivery, smtpd: SMTPServer, redis_client: redis.Redis
    ) -> None:
        """An idempotency_key reused by another task after the first message's record
        expired gives the new message its own Message-ID."""
        first = delivery.run(SEND_MAIL, "task-key-1", mail(idempotency_key="receipt-7"))
        redis_client.delete(keys.sent("receipt-7"))  # expired after max_age + 1 day

        second = delivery.run(SEND_MAIL, "task-key-2", mail(idempotency_key="receipt-7"))

        assert second["status"] == "sent"
        assert second["duplicate"] is False
        assert first["message_id"] != second["message_id"]
        assert message_ids(smtpd) == [first["message_id"], second["message_id"]]

    def test_redelivered_task_repeats_its_message_id(
        self, delivery: Delivery, smtpd: SMTPServer, redis_client: redis.Redis
    ) -> None:
        """The same task run again after its sent record was lost sends the same
        Message-ID, so the duplicate can be recognised."""
        delivery.run(SEND_MAIL, "task-again", mail())
        redis_client.delete(keys.sent("task-again"))

        delivery.run(SEND_MAIL, "task-again", mail())

        first, second = message_ids(smtpd)
        assert first == second

    def test_delayed_retry_keeps_the_message_id(
        self, delivery: Delivery, smtpd: SMTPServer, schedule: RetrySchedule
    ) -> None:
        """A message deferred once (451 to RCPT) arrives through its retry, a different
        task, with the Message-ID of the first attempt."""
        smtpd.handler.rcpt_replies_once[RCPT] = "451 4.7.1 greylisted"
        deferred = delivery.run(SEND_MAIL, "task-later", mail())
        retry = claim_one(schedule)

        sent = delivery.run(retry.task, retry.id, retry.kwargs)

        assert deferred["status"] == "deferred"
        assert sent["message_id"] == deferred["message_id"]
        assert message_ids(smtpd) == [deferred["message_id"]]


class TestPoison:
    """The poison guard never dead-letters a message that was already sent."""

    def test_sent_message_over_the_start_limit_is_a_duplicate(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        dlq: DeadLetterStore,
        redis_client: redis.Redis,
    ) -> None:
        """A redelivered task whose start counter is over the limit but whose message
        was accepted returns the recorded result as a duplicate, not "poison"."""
        delivery.run(SEND_MAIL, "task-sent-poison", mail())
        redis_client.set(keys.runs("task-sent-poison"), 10 + delivery.settings.max_redeliveries)

        result = delivery.run(SEND_MAIL, "task-sent-poison", mail())

        assert result["status"] == "sent"
        assert result["duplicate"] is True
        assert dlq.count() == 0
        assert smtpd.handler.copies() == {RCPT: 1}


class TestDeadline:
    """A send ends by its deadline, however long the profile's timeouts are."""

    def test_slow_greeting_ends_at_the_deadline(self, smtpd: SMTPServer) -> None:
        """Every reply 3 s late, timeouts 30 s, deadline in 0.5 s: a timeout in ~0.5 s."""
        smtpd.handler.reply_delay = 3
        session = SMTPSession(profile_for(smtpd.port, timeout=30))

        started = time.monotonic()
        with pytest.raises(SMTPTimeoutError):
            session.send(SENDER, [RCPT], MESSAGE, deadline=time.monotonic() + 0.5)
        elapsed = time.monotonic() - started

        assert 0.4 < elapsed < 2.0, elapsed
        assert smtpd.handler.counts["MAIL"] == 0

    def test_slow_reply_in_the_transaction_ends_at_the_deadline(self, smtpd: SMTPServer) -> None:
        """A held session whose server answers MAIL 5 s late times out at the 0.5 s
        deadline, not after the 30 s MAIL timeout."""
        session = SMTPSession(profile_for(smtpd.port, timeout=30))
        session.connect()
        smtpd.handler.command_delays["MAIL"] = 5

        started = time.monotonic()
        with pytest.raises(SMTPTimeoutError) as failure:
            session.send(SENDER, [RCPT], MESSAGE, deadline=time.monotonic() + 0.5)
        elapsed = time.monotonic() - started

        assert elapsed < 2.0, elapsed
        assert failure.value.stage == "mail"
        assert failure.value.in_doubt is False
        assert smtpd.handler.messages == []

    def test_passed_deadline_fails_at_once_without_connecting(self, smtpd: SMTPServer) -> None:
        """A deadline already passed: a timeout at once, no connection made."""
        session = SMTPSession(profile_for(smtpd.port, timeout=30))

        started = time.monotonic()
        with pytest.raises(SMTPTimeoutError):
            session.send(SENDER, [RCPT], MESSAGE, deadline=time.monotonic() - 1)

        assert time.monotonic() - started < 0.5
        assert smtpd.handler.counts["connections"] == 0

    def test_passed_deadline_on_a_held_session_sends_nothing(self, smtpd: SMTPServer) -> None:
        """On an open session, a passed deadline fails before MAIL: nothing more is sent."""
        session = SMTPSession(profile_for(smtpd.port, timeout=30))
        session.send(SENDER, [RCPT], MESSAGE)

        with pytest.raises(SMTPTimeoutError):
            session.send(SENDER, [RCPT], MESSAGE, deadline=time.monotonic() - 1)
        session.close()

        assert smtpd.handler.counts["MAIL"] == 1
        assert len(smtpd.handler.messages) == 1

    def test_slow_server_is_deferred_within_the_task_time_limit(
        self,
        make_delivery: Callable[..., Delivery],
        smtpd: SMTPServer,
        schedule: RetrySchedule,
    ) -> None:
        """MAILWORKER_TASK_TIME_LIMIT=2 and a server answering MAIL 5 s late (timeouts
        30 s): Delivery returns "deferred" with a retry scheduled before the 2 s limit."""
        delivery = make_delivery(timeout=30, MAILWORKER_TASK_TIME_LIMIT="2")
        smtpd.handler.command_delays["MAIL"] = 5

        started = time.monotonic()
        result = delivery.run(SEND_MAIL, "task-slow", mail())
        elapsed = time.monotonic() - started

        assert result["status"] == "deferred"
        assert schedule.pending() == 1
        assert smtpd.handler.messages == []
        assert elapsed < 2.0, f"took {elapsed:.2f} s, past the task's 2 s time limit"


class TestAuth:
    """AUTH failures are failures, and a token provider's text never leaks."""

    def test_failing_token_provider_is_transient_and_says_nothing_secret(
        self, smtp_server: SMTPFactory, tls_ca: TLSMaterials
    ) -> None:
        """An OAuth token provider raising with the token in its message gives a
        transient SMTPAuthError at the auth stage that nowhere contains that text."""
        server = smtp_server(tls="implicit", auth=True)

        def provider() -> str:
            raise KeyError(f"refresh failed for {TOKEN_TEXT}")

        url = smtp_url(
            server.port,
            user=DEFAULT_USER,
            ca_file=tls_ca.ca_file,
            scheme="smtps",
            auth="XOAUTH2",
            timeout=5,
        )
        profile = Profile.from_url(url, oauth_token_provider=provider)
        session = SMTPSession(profile)

        with pytest.raises(SMTPAuthError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)

        exc = failure.value
        assert exc.stage == "auth"
        assert exc.is_transient
        shown = "\n".join([str(exc), repr(exc), *exc.transcript, *traceback.format_exception(exc)])
        assert TOKEN_TEXT not in shown
        assert TOKEN_TEXT not in str(exc.to_dict())
        assert server.handler.counts["AUTH"] == 0
        assert server.handler.counts["MAIL"] == 0

    def test_auth_answered_with_503_is_a_failure(self, scripted_server: ScriptedFactory) -> None:
        """A server answering AUTH with 503 has not authenticated us: SMTPAuthError,
        and no MAIL is sent."""

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo(extensions=("AUTH PLAIN LOGIN",))
            conn.expect("AUTH", "503 5.5.1 Error: already authenticated")
            conn.expect("QUIT", "221 2.0.0 Bye")

        server = scripted_server(script)
        url = smtp_url(
            server.port,
            user=DEFAULT_USER,
            password="pw",
            scheme="smtp",
            allow_insecure_auth="true",
            auth="PLAIN",
            timeout=5,
        )
        session = SMTPSession(Profile.from_url(url))

        with pytest.raises(SMTPAuthError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)

        assert failure.value.code == 503
        assert failure.value.stage == "auth"
        assert not any(line.upper().startswith("MAIL") for line in server.received)


class TestSMTPUTF8:
    """Raw UTF-8 in the header block needs SMTPUTF8 (RFC 6532)."""

    UTF8_HEADERS = (
        "From: app@example.com\r\nTo: ann@example.org\r\nSubject: Grüße aus Köln\r\n"
        "\r\nplain body\r\n"
    ).encode()

    def test_utf8_header_without_smtputf8_is_refused_before_sending(
        self, smtpd: SMTPServer
    ) -> None:
        """A server without SMTPUTF8: a permanent SMTPNotSupportedError, no MAIL sent."""
        smtpd.handler.ehlo_remove = {"SMTPUTF8"}
        session = SMTPSession(profile_for(smtpd.port, timeout=5))

        with pytest.raises(SMTPNotSupportedError) as failure:
            session.send(SENDER, [RCPT], self.UTF8_HEADERS)
        session.close()

        assert not failure.value.is_transient
        assert "SMTPUTF8" in str(failure.value)
        assert smtpd.handler.counts["MAIL"] == 0
        assert smtpd.handler.messages == []

    def test_utf8_header_with_smtputf8_arrives_unchanged(self, smtpd: SMTPServer) -> None:
        """A server offering SMTPUTF8: MAIL carries SMTPUTF8 and the bytes arrive as sent."""
        with SMTPSession(profile_for(smtpd.port, timeout=5)) as session:
            session.send(SENDER, [RCPT], self.UTF8_HEADERS)

        [received] = smtpd.handler.wait_for_messages(1)
        assert "SMTPUTF8" in received.mail_options
        assert received.content == self.UTF8_HEADERS

    def test_utf8_in_the_body_alone_does_not_need_smtputf8(self, smtpd: SMTPServer) -> None:
        """ASCII headers and a UTF-8 body go to a server without SMTPUTF8 (8BITMIME only)."""
        smtpd.handler.ehlo_remove = {"SMTPUTF8"}
        message = b"From: app@example.com\r\nSubject: hi\r\n\r\n" + "Grüße\r\n".encode()
        with SMTPSession(profile_for(smtpd.port, timeout=5)) as session:
            session.send(SENDER, [RCPT], message)

        [received] = smtpd.handler.wait_for_messages(1)
        assert "SMTPUTF8" not in received.mail_options
        assert "BODY=8BITMIME" in received.mail_options
        assert received.content == message


class TestConfigure:
    """configure() and the options mailworker's tasks carry."""

    SETTINGS = Settings(broker_url="redis://mail-broker.invalid:6379/3")

    def test_broker_false_leaves_the_apps_broker_alone(self) -> None:
        """configure(app, broker=False) keeps the app's broker and result backend and
        makes it speak JSON only."""
        app = Celery(
            "existing",
            broker="memory://",
            backend="cache+memory://",
            set_as_current=False,
        )

        configure(app, self.SETTINGS, broker=False)

        assert app.conf.broker_url == "memory://"
        assert app.conf.result_backend == "cache+memory://"
        assert app.conf.accept_content == ["json"]
        assert app.conf.task_serializer == "json"

    def test_configure_points_the_app_at_the_broker(self) -> None:
        """configure(app, settings) sets the broker and result backend from the settings."""
        app = Celery("fresh", set_as_current=False)

        configure(app, self.SETTINGS)

        assert app.conf.broker_url == self.SETTINGS.broker_url
        assert app.conf.result_backend == self.SETTINGS.broker_url
        assert app.conf.accept_content == ["json"]

    def test_tasks_carry_the_delivery_guarantees(self) -> None:
        """In any app, send_mail and send_message ack late, are requeued when their worker
        dies or their hard time limit strikes, and carry the configured time limits;
        the app's other tasks keep the app's defaults."""
        import mailworker.worker.tasks  # noqa: F401, PLC0415 -- registers the shared tasks

        app = Celery("existing", broker="memory://", set_as_current=False)
        configure(app, broker=False)
        expected = Settings.from_env()

        for name in ("mailworker.send_mail", "mailworker.send_message"):
            task = app.tasks[name]
            assert task.acks_late is True, name
            assert task.reject_on_worker_lost is True, name
            assert task.acks_on_timeout is False, name  # type: ignore[attr-defined]
            assert task.time_limit == expected.task_time_limit, name
            assert task.soft_time_limit == pytest.approx(expected.task_time_limit * 0.9), name
        assert app.conf.task_acks_late is False

    def test_explicit_settings_keep_the_time_limit_below_the_visibility_timeout(self) -> None:
        """configure(app, settings) with a 20 s visibility timeout leaves mailworker's
        tasks a hard time limit below 10 s, so Redis never hands a running message to a
        second worker (configure's documented promise)."""
        import mailworker.worker.tasks  # noqa: F401, PLC0415 -- registers the shared tasks

        settings = Settings(broker_url="memory://", visibility_timeout=20)
        app = Celery("short", set_as_current=False)
        configure(app, settings)

        assert app.conf.broker_transport_options["visibility_timeout"] == 20
        task = app.tasks["mailworker.send_mail"]
        limit = task.time_limit or app.conf.task_time_limit
        assert limit is not None
        assert limit * 2 < 20, f"hard time limit {limit} s, visibility timeout 20 s"


class _Interrupt(Exception):
    """Stands in for Celery's SoftTimeLimitExceeded."""


class TestHalfSetUpSession:
    def test_deadline_during_setup_leaves_no_session_behind(
        self, smtp_server: SMTPFactory, tls_ca: TLSMaterials
    ) -> None:
        """A deadline that passes while a session is being set up (a slow OAuth token
        refresh) drops it: the next send starts over with STARTTLS and AUTH instead of
        sending on a session without them."""
        server = smtp_server(tls="starttls", auth=True)
        slow = [True]

        def provider() -> str:
            if slow:
                slow.pop()
                time.sleep(0.5)
            return DEFAULT_TOKEN

        profile = Profile.from_url(
            smtp_url(server.port, user=DEFAULT_USER, ca_file=tls_ca.ca_file, auth="XOAUTH2"),
            oauth_token_provider=provider,
        )
        session = SMTPSession(profile)
        with pytest.raises(SMTPTimeoutError):
            session.send(SENDER, [RCPT], MESSAGE, deadline=time.monotonic() + 0.2)
        assert not session.connected

        result = session.send(SENDER, [RCPT], MESSAGE)
        session.close()

        assert result.accepted == [RCPT]
        [message] = server.handler.messages
        assert message.tls
        assert message.auth_user == DEFAULT_USER


class TestNoResendAfterAcceptance:
    def test_interrupt_after_the_250_does_not_send_again(
        self,
        make_delivery: Callable[..., Delivery],
        smtpd: SMTPServer,
        schedule: RetrySchedule,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A time limit that strikes while the acceptance is being recorded neither
        schedules the message again nor loses the result: one copy, status sent."""
        delivery = make_delivery(interrupts=(_Interrupt,))
        # The first finish() is the one that records the acceptance.
        fail_once(monkeypatch, delivery.ledger, "finish", _Interrupt("soft time limit"))

        result = delivery.run(SEND_MAIL, "task-interrupted", mail())
        delivery.pool.close_all()

        assert result["status"] == "sent"
        assert result["idempotency_recorded"] is False
        assert smtpd.handler.copies() == Counter({RCPT: 1})
        assert schedule.pending() == 0


class TestPoisonPerMessage:
    def test_lock_deferrals_count_towards_poison(
        self,
        delivery: Delivery,
        smtpd: SMTPServer,
        redis_client: redis.Redis,
        schedule: RetrySchedule,
        dlq: DeadLetterStore,
    ) -> None:
        """A message whose runs keep dying (each leaving its lock behind) is
        dead-lettered as poison even though it comes back as lock deferrals with other
        task ids, and every deferral of it is one scheduled entry."""
        kwargs = mail()
        origin = running = "task-dies"
        for _ in range(6):
            # A run that died holding the lock: counted, lock left behind.
            delivery.ledger.count_start(origin, ttl=60)
            delivery.ledger.acquire(origin, ttl=60)
            try:
                result = delivery.run(SEND_MAIL, running, kwargs)
            except DeadLetteredError:
                break
            assert result["reason"] == "locked"
            assert schedule.pending() == 1
            redis_client.delete(keys.lock(origin))
            task = claim_one(schedule)
            kwargs, running = task.kwargs, task.id
            assert running == f"{origin}/locked"
        [record] = dlq.list()
        assert record.reason == "poison"
        assert smtpd.handler.messages == []


class TestEarlyRefusalOverTLS:
    def test_refusal_mid_content_over_implicit_tls(
        self, scripted_server: ScriptedFactory, tls_ca: TLSMaterials
    ) -> None:
        """A server that refuses a large message with 552 right after 354 and closes is
        reported with its 552 (permanent), also over TLS, not as a dropped connection."""

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo(extensions=("8BITMIME",))
            conn.expect("MAIL", "250 OK")
            conn.expect("RCPT", "250 OK")
            conn.expect("DATA", "354 go ahead")
            conn.readline()
            conn.send("552 5.3.4 Message too big for this system")
            conn.close()

        server = scripted_server(script, tls="implicit")
        profile = Profile.from_url(
            smtp_url(server.port, scheme="smtps", ca_file=tls_ca.ca_file, timeout=5)
        )
        big = MESSAGE + (b"y" * 998 + b"\r\n") * 4000
        with SMTPSession(profile) as session, pytest.raises(SMTPReplyError) as failure:
            session.send(SENDER, [RCPT], big)

        assert failure.value.code == 552
        assert not failure.value.is_transient
