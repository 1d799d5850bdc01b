"""Many messages in one task, each handled exactly as if it had come alone.

A batch task carries ``send_mail`` (or ``send_message``) arguments for several
messages. Each message gets its own id within the task (``<task id>-<n>``), so its
own idempotency record, lock, poison count, delayed retries and dead letter, all
as the single task's — a retry or a dead letter of one message is a single task.
What they share is the work: one pipelined Redis round trip before the sends, one
after them for the plain acceptances, and one SMTP exchange
(:meth:`~mailworker.smtp.SMTPSession.send_many`) in which the transactions follow
each other without waiting.

A message the exchange could not deliver at once for a reason worth an immediate
retry (a dropped connection before its content) is sent again alone, with the
in-process retries of a single delivery.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import redis
import structlog

from mailworker.errors import DeadLetteredError, SMTPError
from mailworker.smtp import SendResult
from mailworker.store.ledger import Begun
from mailworker.worker import outcome
from mailworker.worker.delivery import Delivery, _Attempt
from mailworker.worker.fleet import WaitFor
from mailworker.worker.outcome import SentResult, TaskResult
from mailworker.worker.prepare import Prepared
from mailworker.worker.retry import retry_now

log = structlog.get_logger("mailworker.worker.batch")

#: Most messages one batch task may carry: a batch runs within one task time limit.
MAX_BATCH = 1000


def run_batch(
    delivery: Delivery,
    task: str,
    task_id: str,
    messages: list[dict[str, Any]],
    *,
    queue: str | None = None,
    exchange: str | None = None,
    time_limit: float | None = None,
) -> list[TaskResult]:
    """Deliver each of ``messages`` (``task``'s arguments each); one result per message,
    in order. A message dead-lettered gets a ``dead_lettered`` result, not an exception.

    Raises:
        redis.RedisError: Redis failed (the task message goes back to the queue; the
            messages already accepted are recorded and are not sent again).
    """
    attempts = [
        delivery.attempt(
            task, f"{task_id}-{n}", kwargs, queue=queue, exchange=exchange, time_limit=time_limit
        )
        for n, kwargs in enumerate(messages)
    ]
    checked = [a for a in attempts if a.malformed is None]
    begun = dict(
        zip(
            map(id, checked),
            delivery.ledger.begin_many(
                [(a.meta["key"], a.meta["origin"]) for a in checked],
                **checked[0].ledger_args(),
            )
            if checked
            else [],
            strict=True,
        )
    )
    results: list[TaskResult] = []
    ready: list[tuple[int, _Attempt, Prepared]] = []
    try:
        for n, attempt in enumerate(attempts):
            results.append(_settle(attempt, partial(_start, attempt, n, begun, ready)))
        _send(delivery, ready, results)
    finally:
        for attempt in attempts:
            attempt.release()
    return results


def _start(
    attempt: _Attempt,
    n: int,
    begun: dict[int, Begun],
    ready: list[tuple[int, _Attempt, Prepared]],
) -> TaskResult:
    """Settle what needs no sending (done, locked, poison, invalid); keep the lock and
    the prepared message of the others in ``ready``."""
    began = begun.get(id(attempt))
    if began is None:
        return attempt.run()  # malformed: dead-lettered

    def hold() -> TaskResult:
        prepared = attempt.ready()
        if not isinstance(prepared, Prepared):
            return prepared
        ready.append((n, attempt, prepared))
        return _HELD

    return attempt.proceed(began, hold, keep_lock=True)


#: Stands for "sent below" while the lock is held.
_HELD: TaskResult = outcome.locked(message_id=None, attempts=0, retry_at=0.0, retry_task_id="")


def _settle(attempt: _Attempt, run: Callable[[], TaskResult]) -> TaskResult:
    """``run()``'s result, with a dead letter as a result rather than an exception."""
    try:
        return run()
    except DeadLetteredError as exc:
        return attempt.stamp(
            outcome.dead_lettered(
                message_id=attempt.message_id,
                attempts=attempt.attempts,
                error={"type": "DeadLettered", "message": str(exc)},
                reply=None,
                recipients=None,
            )
        )


def _send(
    delivery: Delivery,
    ready: list[tuple[int, _Attempt, Prepared]],
    results: list[TaskResult],
) -> None:
    """Send the prepared messages: those for one profile and without DSN in one
    pipelined exchange, the others alone."""
    groups: dict[str, list[tuple[int, _Attempt, Prepared]]] = {}
    for item in ready:
        n, attempt, prepared = item
        if prepared.dsn is not None:
            results[n] = _settle(attempt, partial(attempt.send_prepared, prepared))
        else:
            groups.setdefault(attempt.profile, []).append(item)
    for name, items in groups.items():
        outcomes = _exchange(delivery, name, items)
        records = _record(delivery, items, outcomes)
        for (n, attempt, prepared), got in zip(items, outcomes, strict=True):
            record = records.get(n)
            results[n] = _settle(attempt, partial(_conclude, attempt, prepared, got, record))


def _record(
    delivery: Delivery,
    items: list[tuple[int, _Attempt, Prepared]],
    outcomes: list[SendResult | SMTPError | BaseException],
) -> dict[int, SentResult]:
    """Record every plain acceptance of the exchange and release its lock, in one
    pipelined round trip; the others (refused recipients to follow up) are recorded
    one by one as a single delivery does. A Redis failure here leaves them to that."""
    records: dict[int, SentResult] = {}
    finished = []
    for (n, attempt, _), got in zip(items, outcomes, strict=True):
        if isinstance(got, SendResult) and not got.refused and attempt.token is not None:
            attempt.result = got
            records[n] = attempt.sent(got)
            meta = attempt.meta
            finished.append((meta["key"], meta["origin"], attempt.token, dict(records[n])))
    if not finished:
        return {}
    try:
        delivery.ledger.finish_many(finished, ttl=delivery.settings.max_age + 86400)
    except redis.RedisError:
        return {}  # each records its own below, with the usual retries
    for n, attempt, _ in items:
        if n in records:
            attempt.token = None
    return records


def _exchange(
    delivery: Delivery,
    name: str,
    items: list[tuple[int, _Attempt, Prepared]],
) -> list[SendResult | SMTPError | BaseException]:
    """One send_many for ``items`` (all through profile ``name``)."""
    first = items[0][1]
    profile = delivery.pool.profile(name)
    try:
        with delivery.pool.use(name, deadline=first.deadline) as session:
            for _, attempt, _ in items:
                delivery.fleet.admit(
                    profile, deadline=first.deadline, connecting=not session.connected
                )
                attempt.attempts += 1
            got = session.send_many(
                [(p.envelope_from, p.recipients, p.data) for _, _, p in items],
                deadline=first.deadline,
            )
    except WaitFor as exc:
        return [exc] * len(items)
    except delivery.interrupts as exc:
        # Cut off mid-exchange: the late replies would answer the next commands.
        delivery.pool.discard(name, send_quit=False)
        return [exc] * len(items)
    except redis.RedisError:
        raise
    except Exception as exc:
        return [exc] * len(items)
    failures = [g for g in got if isinstance(g, SMTPError)]
    for failure in failures:
        delivery.fleet.failed(profile, failure)
    if len(failures) < len(got):
        delivery.fleet.succeeded(profile)
    return list(got)


def _conclude(
    attempt: _Attempt,
    prepared: Prepared,
    got: SendResult | SMTPError | BaseException,
    record: SentResult | None = None,
) -> TaskResult:
    """One message's outcome of the shared exchange, handled as a single delivery's
    (``record``: its acceptance, already recorded)."""
    if isinstance(got, SendResult):
        attempt.result = got
        return attempt.accepted(got, record)
    if isinstance(got, WaitFor):
        attempt.attempts -= 1  # not sent: a fleet limit, not an attempt
        return attempt.wait(got)
    if isinstance(got, SMTPError):
        if retry_now(got):
            # Not delivered, safe to repeat: alone, with the usual in-process retries.
            attempt.attempts -= 1
            return attempt.send_prepared(prepared)
        attempt.transcript = got.transcript
        return attempt.failed(got)
    if isinstance(got, Exception):
        return attempt.unexpected(got)
    # The soft time limit: the rest wait for a delayed retry.
    error = {"type": type(got).__name__, "message": "task time limit reached"}
    return attempt.schedule_retry(error, recipients=attempt.meta.get("recipients"), whole=True)
