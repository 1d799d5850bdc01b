"""The shapes a delivery passes on: the task result and the ``_meta`` it carries.

Both travel as JSON (the result to Celery's result backend and the idempotency
record, ``_meta`` inside a retry's task arguments), so they are plain dicts, typed
here as ``TypedDict``s. Each result shape is built by one function below.
"""

from __future__ import annotations

import math
from typing import Any, Literal, NoReturn, TypedDict

from mailworker.errors import InvalidMessageError
from mailworker.message import MAX_KEY_LENGTH, check_date, check_message_id
from mailworker.smtp import SendResult


class _MetaRequired(TypedDict):
    #: The message's idempotency key (``<key>+<digest>`` for a subset of recipients).
    key: str
    #: The task id that first carried the message.
    origin: str
    #: Unix time of the first attempt.
    first_attempt_at: float


class Meta(_MetaRequired, total=False):
    """A task's private ``_meta`` argument: the message's state across delayed retries."""

    #: The queue (routing key) and exchange the message came from; retries go back there.
    queue: str
    exchange: str
    #: Pinned on the first attempt, so every attempt sends the same message.
    message_id: str
    date: str
    #: Set when only some recipients are retried.
    recipients: list[str]
    #: SMTP attempts and delayed retries so far, and waits for fleet limits.
    attempts: int
    retries: int
    waits: int
    #: One ``{"at": float, "error": str | None}`` per attempt that failed.
    history: list[dict[str, Any]]


#: Bounds of ``_meta`` values read back from the broker.
_MAX_META_KEY = 1024
_MAX_COUNT = 1_000_000
#: Entries of ``history`` kept (the oldest are dropped).
_MAX_HISTORY = 50


def check_meta(value: object) -> dict[str, Any]:
    """``_meta`` as it came back from the broker, checked like any payload: it is read
    from a message anyone with broker access could have written.

    Returns:
        The known keys, checked (unknown ones are dropped: a newer worker may add some).

    Raises:
        InvalidMessageError: a value is malformed; ``field`` names it (``_meta.<key>``).
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        fail("_meta", f"must be an object, got {type(value).__name__}")
    meta: dict[str, Any] = {}
    for name, limit in (("key", _MAX_META_KEY), ("origin", 256), ("queue", 255), ("exchange", 255)):
        if name in value:
            meta[name] = _text(f"_meta.{name}", value[name], limit)
    if "first_attempt_at" in value:
        meta["first_attempt_at"] = _number("_meta.first_attempt_at", value["first_attempt_at"])
    for name in ("attempts", "retries", "waits"):
        if name in value:
            meta[name] = int(_number(f"_meta.{name}", value[name], integer=True))
    if "message_id" in value:
        meta["message_id"] = check_message_id("_meta.message_id", value["message_id"])
    if "date" in value:
        meta["date"] = check_date("_meta.date", value["date"])
    if "recipients" in value:
        recipients = value["recipients"]
        if not isinstance(recipients, list) or not recipients:
            fail("_meta.recipients", "must be a non-empty list of addresses")
        meta["recipients"] = [_text("_meta.recipients", r, 254) for r in recipients]
    if "history" in value:
        history = value["history"]
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            fail("_meta.history", "must be a list of objects")
        meta["history"] = history[-_MAX_HISTORY:]
    return meta


def check_key(value: object) -> str | None:
    """The task's ``idempotency_key`` (None when it has none), before anything is keyed
    on it."""
    if value is None:
        return None
    return _text("idempotency_key", value, MAX_KEY_LENGTH)


def fail(where: str, problem: str) -> NoReturn:
    raise InvalidMessageError(where, problem)


def _text(where: str, value: object, limit: int) -> str:
    if not isinstance(value, str) or not value or len(value) > limit:
        fail(where, f"must be a non-empty string of at most {limit} characters")
    return value


def _number(where: str, value: object, *, integer: bool = False) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        fail(where, f"must be a{'n integer' if integer else ' number'}, got {value!r}"[:200])
    if not math.isfinite(value) or not 0 <= value <= (_MAX_COUNT if integer else 1e11):
        fail(where, f"out of range: {value!r}")
    return value


class TaskResult(TypedDict):
    """What the ``send_mail`` and ``send_message`` tasks return, and what the
    idempotency ledger keeps of a sent message: every key, whatever the status (None,
    empty or False where it does not apply), so a caller can read any of them."""

    #: ``sent``, ``deferred`` (a delayed retry is scheduled) or ``dead_lettered``.
    status: Literal["sent", "deferred", "dead_lettered"]
    #: Why it was not sent: ``retry``, ``locked`` or ``limited`` (deferred: a delayed
    #: retry, another delivery running, a fleet limit), ``exhausted`` (dead-lettered);
    #: None when sent.
    reason: Literal["retry", "locked", "limited", "exhausted"] | None
    message_id: str | None
    #: Recipients the server accepted.
    accepted: list[str]
    #: Per refused recipient: ``status`` (deferred/rejected), ``code``, ``enhanced_code``,
    #: ``reply``.
    refused: dict[str, dict[str, Any]]
    #: The server's last reply (``250 2.0.0 queued as …``, or the one that deferred it).
    reply: str | None
    #: The server's queue id, when its reply gave one.
    queue_id: str | None
    #: SMTP attempts so far.
    attempts: int
    #: The message's Date header.
    date: str | None
    #: When the delayed retry is due (Unix time) and its task id.
    retry_at: float | None
    retry_task_id: str | None
    #: What went wrong (``type``, ``message``, ``code``, ``enhanced_code``, ``reply``,
    #: ``stage``) when not sent.
    error: dict[str, Any] | None
    #: The recipients a retry or a dead letter is about, when only some are.
    recipients: list[str] | None
    #: True when this run sent nothing: an earlier one had.
    duplicate: bool
    #: False when the acceptance could not be recorded (a redelivery would resend).
    idempotency_recorded: bool
    #: True once deferred recipients are scheduled and rejected ones dead-lettered.
    follow_up_done: bool
    #: The profile that delivered or refused it, and the one the message asked for
    #: when that was another (a fallback took over); None where no profile was used.
    profile: str | None
    requested_profile: str | None


#: A sent message's result, as the idempotency ledger keeps it.
SentResult = TaskResult


def _result(
    status: Literal["sent", "deferred", "dead_lettered"],
    *,
    reason: Literal["retry", "locked", "limited", "exhausted"] | None = None,
    message_id: str | None = None,
    attempts: int = 0,
    accepted: list[str] | None = None,
    refused: dict[str, dict[str, Any]] | None = None,
    reply: str | None = None,
    queue_id: str | None = None,
    date: str | None = None,
    retry_at: float | None = None,
    retry_task_id: str | None = None,
    error: dict[str, Any] | None = None,
    recipients: list[str] | None = None,
) -> TaskResult:
    return {
        "status": status,
        "reason": reason,
        "message_id": message_id,
        "accepted": accepted or [],
        "refused": refused or {},
        "reply": reply,
        "queue_id": queue_id,
        "attempts": attempts,
        "date": date,
        "retry_at": retry_at,
        "retry_task_id": retry_task_id,
        "error": error,
        "recipients": recipients,
        "duplicate": False,
        "idempotency_recorded": True,
        "follow_up_done": False,
        "profile": None,
        "requested_profile": None,
    }


def sent(
    result: SendResult, *, message_id: str | None, attempts: int, date: str | None
) -> TaskResult:
    """The result of a message the server accepted."""
    return _result(
        "sent",
        message_id=message_id,
        attempts=attempts,
        accepted=result.accepted,
        refused={r: outcome.to_dict() for r, outcome in result.refused.items()},
        reply=str(result.reply),
        queue_id=result.queue_id,
        date=date,
    )


def deferred(
    *,
    message_id: str | None,
    attempts: int,
    retry_at: float,
    retry_task_id: str,
    error: dict[str, Any],
    reply: str | None,
    recipients: list[str] | None,
    reason: Literal["retry", "limited"] = "retry",
) -> TaskResult:
    """The result of a message that waits for a delayed retry (``limited``: for a
    fleet limit, not counted as an attempt)."""
    return _result(
        "deferred",
        reason=reason,
        message_id=message_id,
        attempts=attempts,
        retry_at=retry_at,
        retry_task_id=retry_task_id,
        error=error,
        reply=reply,
        recipients=recipients,
    )


def locked(
    *, message_id: str | None, attempts: int, retry_at: float, retry_task_id: str
) -> TaskResult:
    """The result of a run that found the message locked by another delivery."""
    return _result(
        "deferred",
        reason="locked",
        message_id=message_id,
        attempts=attempts,
        retry_at=retry_at,
        retry_task_id=retry_task_id,
        error={"type": "Locked", "message": "locked by a running delivery"},
    )


def dead_lettered(
    *,
    message_id: str | None,
    attempts: int,
    error: dict[str, Any],
    reply: str | None,
    recipients: list[str] | None,
) -> TaskResult:
    """The result of a run whose remaining recipients were dead-lettered as exhausted."""
    return _result(
        "dead_lettered",
        reason="exhausted",
        message_id=message_id,
        attempts=attempts,
        error=error,
        reply=reply,
        recipients=recipients,
    )


__all__ = [
    "Meta",
    "SentResult",
    "TaskResult",
    "check_key",
    "check_meta",
    "dead_lettered",
    "deferred",
    "locked",
    "sent",
]
