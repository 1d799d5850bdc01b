"""A fleet limit that makes a message wait longer than a task should puts it back on
the Redis retry schedule: deferred with reason ``limited``, not an attempt, not a
dead letter. And a throttling reply backs the profile off for the whole fleet."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis

from mailworker.errors import SMTPReplyError
from mailworker.queue.names import SEND_MAIL
from mailworker.smtp.profile import Profile
from mailworker.store.deadletter import DeadLetterStore
from mailworker.store.limits import Leases, Throttle
from mailworker.store.schedule import RetrySchedule
from mailworker.worker.fleet import MAX_WAIT, Fleet, WaitFor
from tests.servers import SMTPServer, smtp_url
from tests.worker.conftest import DeliveryFactory


def mail(n: int) -> dict[str, Any]:
    return {"to": f"r{n}@example.org", "subject": f"waits {n}", "text": "hi", "profile": "slow"}


def test_a_long_wait_for_a_token_is_rescheduled_not_counted(
    make_delivery: DeliveryFactory,
    smtpd: SMTPServer,
    schedule: RetrySchedule,
    dlq: DeadLetterStore,
) -> None:
    """rate=1/m: the first message takes the token; the second would wait ~60 s, so it
    is deferred (limited) for about that long, with no attempt and no dead letter."""
    delivery = make_delivery(
        MAILWORKER_SMTP_URL_SLOW=smtp_url(smtpd.port, scheme="smtp", rate="1/m")
    )
    first = delivery.run(SEND_MAIL, "wait-1", mail(1))
    started = time.time()
    second = delivery.run(SEND_MAIL, "wait-2", mail(2))

    assert first["status"] == "sent"
    assert second["status"] == "deferred"
    assert second["reason"] == "limited"
    assert second["attempts"] == 0
    assert second["retry_at"] is not None
    assert 50 < second["retry_at"] - started <= 61
    assert time.time() - started < 2, "a long wait is not spent in the task"
    assert schedule.pending() == 1
    assert dlq.count() == 0
    assert len(smtpd.handler.messages) == 1


def test_no_connection_lease_within_the_bound_is_rescheduled(
    make_delivery: DeliveryFactory,
    smtpd: SMTPServer,
    redis_client: redis.Redis,
    schedule: RetrySchedule,
) -> None:
    """max_connections=1 held by another process: the delivery does not connect; after
    MAX_WAIT it is deferred (limited); once the lease is free it is sent."""
    url = smtp_url(smtpd.port, scheme="smtp", max_connections=1)
    delivery = make_delivery(MAILWORKER_SMTP_URL_SLOW=url)
    leases = Leases(redis_client)
    assert leases.acquire("slow", 1, "another-host:1:1", 30)
    started = time.monotonic()
    waited = delivery.run(SEND_MAIL, "lease-1", mail(1))
    took = time.monotonic() - started

    assert waited["status"] == "deferred"
    assert waited["reason"] == "limited"
    assert waited["attempts"] == 0
    # Polled up to MAX_WAIT, cut to the send's deadline (0.8 x the 4 s time limit).
    assert 2.5 <= took < MAX_WAIT + 1
    assert smtpd.handler.messages == []
    assert schedule.pending() == 1

    leases.release("slow", "another-host:1:1")
    sent = delivery.run(SEND_MAIL, "lease-1", mail(1))
    assert sent["status"] == "sent"
    assert leases.held("slow") == 1  # this process's session holds it now
    delivery.pool.close_all()
    assert leases.held("slow") == 0  # QUIT gives it back


def test_a_throttling_reply_backs_the_profile_off_for_the_fleet(
    redis_client: redis.Redis,
) -> None:
    """A 421 at the greeting starts a fleet-wide back-off, doubled by the next one;
    another process connecting to that profile waits a short one out and reschedules
    for a long one."""
    short = Profile.from_url("smtp://localhost:2525?throttle_backoff=0.3", name="slow")
    long = Profile.from_url("smtp://localhost:2525?throttle_backoff=30", name="busy")
    profiles = {"slow": short, "busy": long}
    one = Fleet(redis_client, profiles.__getitem__)
    slept: list[float] = []
    other = Fleet(redis_client, profiles.__getitem__, sleep=slept.append)
    throttle = Throttle(redis_client)
    refused = SMTPReplyError(
        "server refused the session", stage="connect", code=421, enhanced_code="4.7.0"
    )

    one.failed(short, refused)
    assert 0 < throttle.wait("slow") <= 0.3
    other.admit(short, deadline=time.monotonic() + 60, connecting=True)
    assert len(slept) == 1
    assert 0 < slept[0] <= 0.3
    time.sleep(throttle.wait("slow"))
    one.failed(short, refused)  # consecutive: doubled
    assert 0.3 < throttle.wait("slow") <= 0.6

    one.failed(long, refused)
    with pytest.raises(WaitFor) as waiting:
        other.admit(long, deadline=time.monotonic() + 600, connecting=True)
    assert waiting.value.reason == "throttled"
    assert MAX_WAIT < waiting.value.seconds <= 30
    assert len(slept) == 1, "a long back-off is not slept in the task"
