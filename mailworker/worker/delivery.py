"""One delivery attempt of one message, composed from the parts below it.

Knows nothing of Celery: :mod:`mailworker.worker.tasks` passes the task's name, id and
arguments in and turns the outcome into a task result. That keeps the whole
policy — poison guard, lock, idempotency, in-process and delayed retries,
dead-lettering, logging — testable with a real Redis and a real SMTP server but
no worker.

Task arguments carry a private ``_meta`` dict across delayed retries
(:class:`~mailworker.worker.outcome.Meta`): ``key`` (the message's idempotency key),
``message_id`` and ``date`` (so every attempt sends the same message), ``recipients``
(when only some recipients are retried), ``first_attempt_at``, ``attempts`` (SMTP
attempts so far), ``retries`` (delayed retries so far) and ``history``. The task
result is a :data:`~mailworker.worker.outcome.TaskResult`.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from typing import Any, NoReturn, cast

import redis
import structlog

from mailworker.errors import (
    ConfigError,
    DeadLetteredError,
    InvalidMessageError,
    SMTPError,
    SMTPRecipientsRefused,
)
from mailworker.smtp import SendResult
from mailworker.store.deadletter import DeadLetter, DeadLetterReason, DeadLetterStore
from mailworker.store.ledger import Begun, Ledger
from mailworker.store.schedule import RetrySchedule
from mailworker.worker import metrics, outcome
from mailworker.worker.fleet import Fleet, WaitFor
from mailworker.worker.outcome import Meta, SentResult, TaskResult, check_key, check_meta
from mailworker.worker.prepare import Prepared, prepare, profile_of
from mailworker.worker.retry import RetryPolicy
from mailworker.worker.sessions import SessionPool
from mailworker.worker.settings import Settings

log = structlog.get_logger("mailworker.worker.delivery")


class Delivery:
    """Runs delivery attempts in one worker process."""

    def __init__(
        self,
        settings: Settings,
        redis_client: redis.Redis,
        pool: SessionPool,
        *,
        clock: Callable[[], float] = time.time,
        interrupts: tuple[type[BaseException], ...] = (),
    ) -> None:
        #: Exceptions that cut a delivery short from outside (Celery's soft time limit).
        self.interrupts = interrupts
        self.settings = settings
        self.pool = pool
        self.ledger = Ledger(redis_client)
        self.schedule = RetrySchedule(redis_client)
        self.dlq = DeadLetterStore(redis_client, **settings.dlq_limits)
        self.policy = RetryPolicy.from_settings(settings)
        self.fleet = Fleet(redis_client, pool.profile)
        self._clock = clock

    def run(
        self,
        task: str,
        task_id: str,
        kwargs: dict[str, Any],
        *,
        queue: str | None = None,
        exchange: str | None = None,
        time_limit: float | None = None,
    ) -> TaskResult:
        """Deliver (or defer, or dead-letter) one message; returns the task result.

        Args:
            task: the task name (``mailworker.send_mail`` or ``mailworker.send_message``).
            task_id: this task message's id.
            kwargs: the task's arguments.
            queue: the queue (routing key) the task came from; its retries go back
                there.
            exchange: the exchange it came through, when not the default one.
            time_limit: the running task's hard time limit (default
                ``MAILWORKER_TASK_TIME_LIMIT``); sends end well before it and the
                message's lock outlives it.

        Raises:
            DeadLetteredError: the message went to the dead-letter store.
            redis.RedisError: Redis failed before the message was accepted (the
                caller hands the task message back to the broker).
        """
        attempt = self.attempt(
            task, task_id, kwargs, queue=queue, exchange=exchange, time_limit=time_limit
        )
        return attempt.run()

    def attempt(
        self,
        task: str,
        task_id: str,
        kwargs: dict[str, Any],
        *,
        queue: str | None = None,
        exchange: str | None = None,
        time_limit: float | None = None,
    ) -> _Attempt:
        """The state of one run of one message (see :meth:`run`), not started yet."""
        started = self._clock()
        try:
            meta = _meta(kwargs, task_id, started, queue=queue, exchange=exchange)
            malformed = None
        except InvalidMessageError as exc:
            # Anyone with broker access can write a task message: a malformed _meta or
            # key is the message's fault, dead-lettered with a fresh state of its own.
            meta = _meta({}, task_id, started, queue=queue, exchange=exchange)
            malformed = exc
        return _Attempt(
            self,
            task=task,
            task_id=task_id,
            kwargs=kwargs,
            meta=meta,
            started=started,
            time_limit=time_limit or self.settings.task_time_limit,
            malformed=malformed,
        )


def _meta(
    kwargs: dict[str, Any],
    task_id: str,
    started: float,
    *,
    queue: str | None,
    exchange: str | None,
) -> Meta:
    """The task's ``_meta``, checked, and started on its first run.

    Raises:
        InvalidMessageError: ``_meta`` or ``idempotency_key`` is malformed.
    """
    meta = cast("Meta", check_meta(kwargs.get("_meta")))
    meta.setdefault("key", check_key(kwargs.get("idempotency_key")) or task_id)
    meta.setdefault("first_attempt_at", started)
    meta.setdefault("origin", task_id)
    if queue:
        meta.setdefault("queue", queue)
        if exchange:
            meta.setdefault("exchange", exchange)
    return meta


def _invalid(exc: InvalidMessageError) -> dict[str, Any]:
    """The dead-letter error of an invalid message."""
    return {"type": type(exc).__name__, "message": str(exc), "field": exc.field}


def _sent_record(ledger: Ledger, key: str) -> SentResult | None:
    """The result recorded when the server accepted the message, if it did."""
    # Written by _Attempt.record_sent and _Attempt.follow_up only.
    return cast("SentResult | None", ledger.sent(key))


def _follow_up_done(record: SentResult) -> bool:
    return not record.get("refused") or bool(record.get("follow_up_done"))


class _Attempt:
    """The state of one run of a task."""

    def __init__(
        self,
        delivery: Delivery,
        *,
        task: str,
        task_id: str,
        kwargs: dict[str, Any],
        meta: Meta,
        started: float,
        time_limit: float,
        malformed: InvalidMessageError | None = None,
    ) -> None:
        self.d = delivery
        self.malformed = malformed
        #: The lock's token while this run holds it; None once released.
        self.token: str | None = None
        self.task = task
        self.task_id = task_id
        self.kwargs = kwargs
        self.meta = meta
        self.started = started
        #: The profile the message asked for, and the one it goes through (a fallback
        #: when the requested one's breaker is open).
        self.requested_profile = self.profile = profile_of(kwargs)
        self.attempts = int(meta.get("attempts", 0))
        self.transcript: list[str] = []
        self.summary: dict[str, Any] = {}
        self.message_id = meta.get("message_id")
        #: The server's verdict once it accepted the message (nothing may resend it).
        self.result: SendResult | None = None
        self.log = log.bind(task_id=task_id, message_key=meta["key"], profile=self.profile)
        #: SMTP exchanges end by then, in any pool: well inside the task's time limits
        #: (the threads pool enforces none), so a send never outlives its lock, which
        #: outlives the task.
        self.deadline = time.monotonic() + time_limit * 0.8
        self.time_limit = time_limit
        self.lock_ttl = time_limit + 2

    # -- the happy path ----------------------------------------------------------

    def run(self) -> TaskResult:
        """Deliver (or defer, or dead-letter) the message: :meth:`Delivery.run`."""
        return self.proceed(self.begin(), self.deliver)

    def begin(self) -> Begun:
        """Check, count and lock the message before a delivery (one Redis round trip).

        Raises:
            DeadLetteredError: the task message is malformed.
        """
        if self.malformed is not None:
            self.give_up("invalid", _invalid(self.malformed))
        return self.d.ledger.begin(self.meta["key"], self.meta["origin"], **self.ledger_args())

    def ledger_args(self) -> dict[str, Any]:
        """The lock's and the start count's bounds, for :meth:`Ledger.begin`."""
        settings = self.d.settings
        return {
            "lock_ttl": self.lock_ttl,
            # Starts are counted per message (its first task id), not per task message:
            # a run killed by the hard time limit comes back as a lock deferral with
            # another task id, and must still count.
            "runs_ttl": settings.max_age + 86400,
            "max_starts": 1 + settings.max_redeliveries,
        }

    def proceed(
        self, begun: Begun, deliver: Callable[[], TaskResult], *, keep_lock: bool = False
    ) -> TaskResult:
        """What :meth:`begin` found decides: done before, poison, locked — or
        ``deliver()`` under the lock, which is released when it returns (unless
        ``keep_lock``: the caller releases it)."""
        if begun.status == "done":
            # Before the poison guard: a sent message is never poison.
            return self.already_sent(cast("SentResult", begun.sent))
        if begun.status == "poison":
            error = {"type": "Poison", "message": f"started {begun.starts} times without finishing"}
            self.give_up("poison", error)
        if begun.status == "locked":
            return self.defer_locked()
        self.token = begun.token
        try:
            if begun.sent is not None:
                return self.already_sent(cast("SentResult", begun.sent))
            too_old = float(self.meta["first_attempt_at"]) + self.d.settings.max_age
            if self.started > too_old + self.time_limit:
                # Whatever kept it going (redeliveries, lock deferrals), it is too old
                # now (the last scheduled retry runs at the maximum age, maybe late).
                error = {"type": "MaxAge", "message": "past the maximum age"}
                self.give_up("exhausted", error)
            return deliver()
        except (DeadLetteredError, redis.RedisError):
            raise
        except Exception as exc:
            # Celery acknowledges a task that raised: never let a message vanish that
            # way. A bug, a broken TLS setup, the soft time limit outside the SMTP
            # exchange — whatever it is, the message waits for a delayed retry.
            return self.unexpected(exc)
        finally:
            if not keep_lock:
                self.release()

    def release(self) -> None:
        """Give the lock back and forget the start count: one Redis round trip.
        Nothing is raised; both expire on their own."""
        token, self.token = self.token, None
        if token is None:
            return
        with contextlib.suppress(redis.RedisError):
            self.d.ledger.finish(self.meta["key"], self.meta["origin"], token)

    def deliver(self) -> TaskResult:
        prepared = self.ready()
        if not isinstance(prepared, Prepared):
            return prepared
        return self.send_prepared(prepared)

    def ready(self) -> Prepared | TaskResult:
        """Choose the profile and build the message; the result instead when the
        profile is missing here (the message waits for a delayed retry).

        Raises:
            DeadLetteredError: the message is invalid.
        """
        try:
            self.profile = self.d.fleet.route(self.requested_profile)
            if self.profile != self.requested_profile:
                self.log = self.log.bind(
                    profile=self.profile, requested_profile=self.requested_profile
                )
            prepared = self.prepare()
        except ConfigError as exc:
            # This worker lacks the profile or cannot read it (a rolling deploy, a bad
            # variable): its configuration, not the message, so the message waits; past
            # the maximum age it is dead-lettered as exhausted with this error.
            error = {"type": "ConfigError", "message": str(exc), "field": "profile"}
            return self.schedule_retry(error, recipients=self.meta.get("recipients"), whole=True)
        self.message_id = prepared.message_id
        self.summary = prepared.summary
        return prepared

    def send_prepared(self, prepared: Prepared) -> TaskResult:
        """Send with in-process retries, then record, defer or dead-letter."""
        retrying = self.d.policy.retrying(
            before_retry=lambda: self.d.pool.discard(self.profile), deadline=self.deadline
        )
        try:
            for try_ in retrying:
                with try_:
                    self.result = self.send(prepared)
        except SMTPError as exc:
            self.transcript = exc.transcript
            return self.failed(exc)
        except WaitFor as wait:
            return self.wait(wait)
        except self.d.interrupts as exc:
            # Cut off mid-exchange: the server's late reply would answer the next
            # message's command, so the session goes without QUIT; the message waits
            # for a delayed retry.
            self.d.pool.discard(self.profile, send_quit=False)
            error = {"type": type(exc).__name__, "message": "task time limit reached"}
            return self.schedule_retry(error, recipients=self.meta.get("recipients"), whole=True)
        result = self.result
        assert result is not None  # the loop ends by success or by raising
        return self.accepted(result)

    def send(self, prepared: Prepared) -> SendResult:
        """One SMTP attempt, inside the profile's fleet limits.

        Raises:
            SMTPError: the attempt failed (counted against the profile).
            WaitFor: a fleet limit makes the message wait (not an attempt).
        """
        profile = self.d.pool.profile(self.profile)
        with self.d.pool.use(self.profile, deadline=self.deadline) as session:
            self.d.fleet.admit(profile, deadline=self.deadline, connecting=not session.connected)
            self.attempts += 1
            try:
                result = session.send(
                    prepared.envelope_from,
                    prepared.recipients,
                    prepared.data,
                    deadline=self.deadline,
                    dsn=prepared.dsn,
                )
            except SMTPError as exc:
                metrics.replies(self.profile, [exc.code] if exc.code else [])
                self.d.fleet.failed(profile, exc)
                raise
        self.d.fleet.succeeded(profile)
        return result

    def accepted(self, result: SendResult, record: SentResult | None = None) -> TaskResult:
        """The server took the message: record it at once (unless the caller did:
        ``record``), log, follow up."""
        # Any retry after here would be a duplicate: record it now.
        if record is None:
            record = self.record_sent(result)
        self.transcript = [str(line) for line in result.transcript]
        self.log.info(
            "mail.sent",
            **self.event(reply=str(result.reply)),
            queue_id=result.queue_id,
            accepted=result.accepted,
            refused=record["refused"],
            # "not_offered": DSN was asked for, the server lacks it, sent without.
            dsn=result.dsn,
        )
        metrics.replies(self.profile, [r.code for r in result.recipients] + [result.reply.code])
        refused = record["refused"]
        metrics.message(
            self.profile,
            "sent",
            recipients={
                "accepted": len(result.accepted),
                "deferred": sum(1 for o in refused.values() if o["status"] == "deferred"),
                "rejected": sum(1 for o in refused.values() if o["status"] == "rejected"),
            },
            duration=self.d._clock() - self.started,
        )
        try:
            self.follow_up(record)
        except redis.RedisError:
            if record.get("idempotency_recorded") is False:
                # Nothing recorded and nothing scheduled: sending again would be
                # worse than the loss, which is logged here for the operator.
                self.log.error("mail.follow_up_lost", refused=record["refused"])
                return record
            raise  # redelivered; already_sent() does the follow-up again
        return record

    def already_sent(self, done: SentResult) -> SentResult:
        """The message was accepted before (a redelivery): finish its follow-up if a
        failure interrupted it, send nothing."""
        self.message_id = done.get("message_id")
        # The follow-up's retry must send the same message: same Message-ID and Date.
        if message_id := done.get("message_id"):
            self.meta.setdefault("message_id", message_id)
        if date := done.get("date"):
            self.meta.setdefault("date", date)
        self.attempts = max(self.attempts, int(done.get("attempts") or 0))
        self.log.info("mail.duplicate_skipped", message_id=self.message_id)
        self.follow_up(done)
        return {**done, "duplicate": True}

    def unexpected(self, exc: Exception) -> TaskResult:
        """A failure outside the SMTP exchange: drop the session (its state is
        unknown) and retry later — unless the server had already accepted the
        message, which must not be sent again."""
        self.log.exception("mail.error", error_type=type(exc).__name__)
        self.d.pool.discard(self.profile, send_quit=False)
        if self.result is not None:
            self.log.error(
                "mail.idempotency_unrecorded",
                error=f"{type(exc).__name__} after the server accepted the message",
                accepted=self.result.accepted,
            )
            record = self.sent(self.result)
            record["idempotency_recorded"] = False
            return record
        error = {"type": type(exc).__name__, "message": f"{type(exc).__name__}: {exc}"[:500]}
        return self.schedule_retry(error, recipients=self.meta.get("recipients"), whole=True)

    def prepare(self) -> Prepared:
        """Validate and build the message (the profile is checked too, before any I/O);
        an invalid one is dead-lettered at once.

        Raises:
            ConfigError: this worker has no such profile, or cannot read it.
        """
        try:
            return prepare(
                self.task,
                self.kwargs,
                self.meta,
                default_from=self.d.settings.default_from,
                # The profile it goes through (a fallback signs with its own DKIM key).
                check_profile=lambda _requested: self.d.pool.profile(self.profile),
                limits=self.d.settings.message_limits,
            )
        except InvalidMessageError as exc:
            self.give_up("invalid", _invalid(exc))

    def sent(self, result: SendResult) -> SentResult:
        """The result for the server's acceptance of this message."""
        return self.stamp(
            outcome.sent(
                result,
                message_id=self.message_id,
                attempts=self.attempts,
                date=self.meta.get("date"),
            )
        )

    def stamp(self, result: TaskResult) -> TaskResult:
        """``result`` with the profile used and, when another, the one asked for."""
        result["profile"] = self.profile
        if self.profile != self.requested_profile:
            result["requested_profile"] = self.requested_profile
        return result

    def record_sent(self, result: SendResult) -> SentResult:
        """Remember the acceptance at once. A Redis failure here must not send the
        message again, so it is retried briefly, then logged, never raised.

        With nothing to follow up (the common case) the lock goes in the same round
        trip."""
        record = self.sent(result)
        ttl = self.d.settings.max_age + 86400
        for pause in (0.1, 0.5, 0):
            try:
                if not record["refused"] and self.token is not None:
                    key, origin = self.meta["key"], self.meta["origin"]
                    self.d.ledger.finish(key, origin, self.token, record=dict(record), ttl=ttl)
                    self.token = None
                else:
                    self.d.ledger.record_sent(self.meta["key"], dict(record), ttl=ttl)
                return record
            except redis.RedisError as exc:
                failure = exc
                time.sleep(pause)
        self.log.error("mail.idempotency_unrecorded", error=f"{type(failure).__name__}: {failure}")
        record["idempotency_recorded"] = False
        return record

    # -- partial and failed deliveries ------------------------------------------------

    def follow_up(self, record: SentResult) -> None:
        """Retry the deferred recipients alone and dead-letter the rejected ones, then
        mark the sent record done, so a redelivery knows whether to do it again."""
        refused = record.get("refused") or {}
        if not refused or record.get("follow_up_done"):
            return
        deferred = [r for r, o in refused.items() if o["status"] == "deferred"]
        rejected = {r: o for r, o in refused.items() if o["status"] == "rejected"}
        if deferred:
            last = refused[deferred[-1]]
            error = {
                "type": "RecipientsDeferred",
                "code": last["code"],
                "enhanced_code": last["enhanced_code"],
                "reply": last["reply"],
                "message": f"{len(deferred)} recipient(s) deferred",
                "stage": "rcpt",
            }
            self.schedule_retry(error, recipients=deferred, whole=False)
        if rejected:
            last = next(reversed(rejected.values()))
            error = {
                "type": "RecipientsRejected",
                "code": last["code"],
                "enhanced_code": last["enhanced_code"],
                "reply": last["reply"],
                "stage": "rcpt",
                "message": "; ".join(f"{r}: {o['code']} {o['reply']}" for r, o in rejected.items()),
            }
            self.dead_letter("permanent", error, subset=list(rejected))
        record["follow_up_done"] = True
        if record.get("idempotency_recorded") is not False:
            self.d.ledger.record_sent(
                self.meta["key"], dict(record), ttl=self.d.settings.max_age + 86400
            )

    def failed(self, exc: SMTPError) -> TaskResult:
        error = exc.to_dict()
        if isinstance(exc, SMTPRecipientsRefused):
            deferred = [r for r, (code, _, _) in exc.refused.items() if 400 <= code < 500]
            rejected = [r for r in exc.refused if r not in deferred]
            if rejected and deferred:
                self.dead_letter("permanent", error, subset=rejected)
            if deferred:
                return self.schedule_retry(error, recipients=deferred, whole=not rejected)
            self.give_up("permanent", error)
        if not exc.is_transient:
            self.give_up("permanent", error)
        return self.schedule_retry(error, recipients=self.meta.get("recipients"), whole=True)

    def schedule_retry(
        self, error: dict[str, Any], *, recipients: list[str] | None, whole: bool
    ) -> TaskResult:
        """Schedule a delayed retry, or dead-letter as exhausted past the maximum age.

        ``whole``: the task's message failed as a whole (an exhausted one raises).
        """
        now = self.d._clock()
        retries = int(self.meta.get("retries", 0)) + 1
        due = self.d.policy.due(retries, float(self.meta["first_attempt_at"]), now)
        meta = self._next_meta(error, recipients)
        if due is None:
            if whole:
                self.give_up("exhausted", error)
            self.dead_letter("exhausted", error, subset=recipients)
            return self.stamp(
                outcome.dead_lettered(
                    message_id=self.message_id,
                    attempts=self.attempts,
                    error=error,
                    reply=_reply_line(error),
                    recipients=recipients,
                )
            )
        meta["retries"] = retries
        kwargs = {**self.kwargs, "_meta": meta}
        # Derived, not random: a follow-up or retry scheduled twice (a redelivery
        # redoing it) is one entry, one task.
        retry_id = f"{meta['key']}/retry/{retries}"
        self.d.schedule.add(retry_id, self.task, kwargs, due)
        self.log.info(
            "mail.deferred",
            **self.event(reply=_reply_line(error)),
            error=error.get("message"),
            delay=round(due - now, 3),
            retry_at=due,
            retry_task_id=retry_id,
            recipients=recipients,
        )
        metrics.message(self.profile, "deferred")
        metrics.retry_scheduled()
        return self.stamp(
            outcome.deferred(
                message_id=self.message_id,
                attempts=self.attempts,
                retry_at=due,
                retry_task_id=retry_id,
                error=error,
                reply=_reply_line(error),
                recipients=recipients,
            )
        )

    def wait(self, wait: WaitFor) -> TaskResult:
        """A fleet limit (rate, connection lease, throttle) keeps the message waiting
        longer than a task should: back on the retry schedule, not an attempt."""
        now = self.d._clock()
        due = now + wait.seconds
        waits = int(self.meta.get("waits", 0)) + 1
        meta: Meta = {**self.meta, "attempts": self.attempts, "waits": waits}
        retry_id = f"{meta['key']}/wait/{meta.get('retries', 0)}.{waits}"
        self.d.schedule.add(retry_id, self.task, {**self.kwargs, "_meta": meta}, due)
        error = {"type": "FleetLimit", "message": f"waiting for the profile's {wait.reason}"}
        self.log.info(
            "mail.deferred",
            **self.event(reply=None),
            error=error["message"],
            delay=round(wait.seconds, 3),
            retry_at=due,
            retry_task_id=retry_id,
        )
        metrics.message(self.profile, "deferred")
        return self.stamp(
            outcome.deferred(
                message_id=self.message_id,
                attempts=self.attempts,
                retry_at=due,
                retry_task_id=retry_id,
                error=error,
                reply=None,
                recipients=self.meta.get("recipients"),
                reason="limited",
            )
        )

    def _next_meta(self, error: dict[str, Any], recipients: list[str] | None) -> Meta:
        meta: Meta = {**self.meta, "attempts": self.attempts}
        meta["history"] = [
            *meta.get("history", []),
            {"at": self.d._clock(), "error": error.get("message")},
        ]
        if recipients is not None and recipients != self.meta.get("recipients"):
            # A new message for a subset of recipients: its own idempotency key.
            digest = hashlib.sha256("\n".join(sorted(recipients)).encode()).hexdigest()[:12]
            meta["key"] = f"{self.meta['key']}+{digest}"
            meta["recipients"] = recipients
        return meta

    def defer_locked(self) -> TaskResult:
        """Another delivery of this message is running now (a redelivery overtook it):
        look again once its lock has expired, rather than run beside it."""
        due = self.d._clock() + self.lock_ttl
        # One look per message, however many redeliveries overtake it.
        retry_id = f"{self.meta['origin']}/locked"
        self.d.schedule.add(retry_id, self.task, {**self.kwargs, "_meta": self.meta}, due)
        self.log.info(
            "mail.deferred",
            **self.event(reply=None),
            error="locked by a running delivery",
            retry_at=due,
            retry_task_id=retry_id,
        )
        return self.stamp(
            outcome.locked(
                message_id=self.message_id,
                attempts=self.attempts,
                retry_at=due,
                retry_task_id=retry_id,
            )
        )

    # -- dead letters -----------------------------------------------------------------

    def give_up(self, reason: DeadLetterReason, error: dict[str, Any]) -> NoReturn:
        """Dead-letter the task's whole message and end the task.

        Raises:
            DeadLetteredError: always, naming the dead-letter record.
        """
        dlq_id = self.dead_letter(reason, error)
        raise DeadLetteredError(
            f"message dead-lettered ({reason}): {error.get('message')} [dlq id {dlq_id}]"
        )

    def dead_letter(
        self, reason: DeadLetterReason, error: dict[str, Any], *, subset: list[str] | None = None
    ) -> str:
        """Store the message (or the ``subset`` of its recipients) as dead; returns the
        record's id. The task goes on: :meth:`give_up` ends it."""
        now = self.d._clock()
        meta = self._next_meta(error, subset)
        recipients = subset or meta.get("recipients") or self.summary.get("recipients")
        record = DeadLetter(
            id="",
            reason=reason,
            task=self.task,
            kwargs={**self.kwargs, "_meta": meta},
            error=error,
            transcript=self.transcript,
            attempts=self.attempts,
            first_attempt_at=float(meta["first_attempt_at"]),
            last_attempt_at=now,
            profile=self.profile,
            requested_profile=(
                self.requested_profile if self.requested_profile != self.profile else None
            ),
            task_id=self.task_id,
            recipients=list(recipients or _rough_recipients(self.kwargs)),
            subject=self.summary.get("subject") or _text(self.kwargs.get("subject")),
            history=meta["history"],
        )
        dlq_id = self.d.dlq.add(record)
        self.log.warning(
            "mail.dead_lettered",
            **self.event(reply=_reply_line(error)),
            reason=reason,
            dlq_id=dlq_id,
            error=error.get("message"),
            recipients=record.recipients,
        )
        metrics.message(
            self.profile,
            "dead_lettered",
            recipients={"rejected": len(record.recipients)} if reason == "permanent" else None,
            duration=now - self.started if self.attempts else None,
        )
        return dlq_id

    def event(self, *, reply: str | None) -> dict[str, Any]:
        """The fields every terminal event carries."""
        return {
            "message_id": self.message_id,
            "attempt": self.attempts,
            "duration_ms": round((self.d._clock() - self.started) * 1000, 1),
            "reply": reply,
            "transcript": self.transcript,
        }


def _reply_line(error: dict[str, Any]) -> str | None:
    """The server's reply as it was sent, code first (``451 4.2.0 try later``)."""
    code, text = error.get("code"), error.get("reply")
    if code is None:
        return text or None
    return f"{code} {text or ''}".rstrip()


def _rough_recipients(kwargs: dict[str, Any]) -> list[str]:
    """Recipients as given, for a record of a message that could not be parsed."""
    found: list[str] = []
    for name in ("to", "cc", "bcc", "recipients"):
        value = kwargs.get(name)
        items = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        found.extend(str(v) for v in items)
    return found


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


__all__ = ["Delivery"]
