"""Dead-letter records: the :class:`DeadLetter` type, its JSON form and its summaries.

The store that keeps them in Redis is :class:`mailworker.store.deadletter.DeadLetterStore`; this
module needs neither Redis nor Celery.

A record's ``kwargs`` (the payload) is kept apart from the rest of it, so that listing and
counting never load attachments. A record read without its payload carries a compact
summary in ``kwargs`` (:func:`compact_summary`) and ``payload_complete=False``; it cannot be
re-queued (:class:`PayloadNotKeptError`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from mailworker.errors import MailworkerError

DeadLetterReason = Literal["invalid", "permanent", "exhausted", "poison"]

#: Every reason a message can be dead-lettered for.
REASONS: tuple[str, ...] = get_args(DeadLetterReason)

#: ``_meta`` entries that survive a re-queue: the re-sent message keeps its
#: Message-ID and Date, goes only to the recipients that failed, and keeps its
#: idempotency ``key``. The key matters when only some recipients failed: theirs is
#: ``<key>+<digest>``, while ``<key>`` itself is recorded as sent for the accepted
#: ones, so a re-queue deriving the key from ``idempotency_key`` again would be
#: skipped as a duplicate. Keeping it also makes two re-queues of one record
#: deliver once.
KEPT_META = ("key", "message_id", "date", "recipients", "queue", "exchange")

#: Strings in a record's payload summary are cut to this many characters, so a large
#: text or HTML body does not come along whenever records are listed.
SUMMARY_TEXT_MAX = 1024

_CODE = re.compile(r"^[245]\d\d$")
_CODE_CLASS = re.compile(r"^[245]xx$", re.IGNORECASE)
_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


@dataclass(frozen=True)
class DeadLetter:
    """One message mailworker gave up on, with everything needed to understand and resend it.

    Attributes:
        id: assigned by :meth:`DeadLetterStore.add`; sorts by the time it was added.
        reason: why it is here: ``invalid``, ``permanent``, ``exhausted`` or ``poison``.
        task: the task to re-queue it with (``mailworker.send_mail`` or
            ``mailworker.send_message``).
        kwargs: the original task kwargs (JSON-safe).
        error: the last error: ``type``, ``message``, ``stage``, ``code``,
            ``enhanced_code``, ``reply``, ``transient`` (values may be None).
        transcript: ``C: ...`` / ``S: ...`` lines of the last attempt, redacted.
        attempts: how many attempts were made.
        first_attempt_at: unix time of the first attempt.
        last_attempt_at: unix time of the last attempt.
        profile: the SMTP profile that refused it (or was last tried).
        requested_profile: the profile the message asked for, when a fallback was
            used instead; None otherwise.
        task_id: the Celery task id of the last attempt, if known.
        recipients: the recipients it failed for.
        subject: the message's subject, if known.
        history: one ``{"at": float, "error": str}`` per attempt.
        created_at: unix time it was dead-lettered; set by :meth:`DeadLetterStore.add`.
        payload_bytes: size of the payload (``kwargs`` as UTF-8 JSON) when it was
            dead-lettered; set by :meth:`DeadLetterStore.add`.
        payload_dropped: why the store no longer holds the payload (over the per-record
            cap, or evicted to stay within the store's byte budget); None while it does.
        payload_complete: whether ``kwargs`` is the whole original payload. False when
            it is only :func:`compact_summary` of it: records from
            :meth:`DeadLetterStore.list`, and records whose payload was dropped.
    """

    id: str
    reason: DeadLetterReason
    task: str
    kwargs: dict[str, Any]
    error: dict[str, Any]
    transcript: list[str]
    attempts: int
    first_attempt_at: float
    last_attempt_at: float
    profile: str
    task_id: str | None
    recipients: list[str]
    subject: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    created_at: float = 0.0
    payload_bytes: int = 0
    payload_dropped: str | None = None
    payload_complete: bool = True
    requested_profile: str | None = None

    def to_json(self) -> str:
        """The record as one JSON object."""
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, separators=(",", ":"))

    @classmethod
    def from_json(cls, s: str | bytes) -> DeadLetter:
        """Read a record written by :meth:`to_json`; unknown keys are ignored.

        Raises:
            ValueError: ``s`` is not JSON or lacks a field without a default.
        """
        data = json.loads(s)
        if not isinstance(data, dict):
            raise ValueError("dead-letter record: expected a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise ValueError(f"dead-letter record: {exc}") from None

    @property
    def code(self) -> int | None:
        """The last reply code, if the server gave one."""
        return _as_code(self.error.get("code"))

    def summary(self) -> dict[str, Any]:
        """A short JSON-safe description (one line of ``dlq list --json``).

        Never contains attachment bytes or the raw message: attachments are listed by
        file name and decoded size, a prebuilt message by its size.
        """
        payload = payload_summary(self.kwargs)
        out: dict[str, Any] = {
            "id": self.id,
            "created_at": self.created_at,
            "reason": self.reason,
            "task": self.task,
            "code": self.code,
            "enhanced_code": self.error.get("enhanced_code"),
            "stage": self.error.get("stage"),
            "error": self.error.get("message"),
            "recipients": list(self.recipients),
            "subject": self.subject,
            "attempts": self.attempts,
            "profile": self.profile,
            "requested_profile": self.requested_profile,
            "task_id": self.task_id,
            "first_attempt_at": self.first_attempt_at,
            "last_attempt_at": self.last_attempt_at,
        }
        if "attachments" in payload:
            out["attachments"] = [
                {"filename": a.get("filename"), "size": a.get("size")}
                for a in payload["attachments"]
            ]
        if "raw_size" in payload:
            out["raw_size"] = payload["raw_size"]
        out["payload_bytes"] = self.payload_bytes
        out["payload_kept"] = self.payload_dropped is None
        return out

    def details(self) -> dict[str, Any]:
        """The whole record, JSON-safe, with the payload summarised (``dlq show --json``).

        ``kwargs`` is replaced by :func:`payload_summary` of it, so no attachment bytes;
        ``payload_kept`` says whether the store still holds the payload (see
        ``payload_dropped`` for why not).
        """
        out = dataclasses.asdict(self)
        del out["payload_complete"]
        out["kwargs"] = payload_summary(self.kwargs)
        out["code"] = self.code
        out["payload_kept"] = self.payload_dropped is None
        return out

    def requeue_kwargs(self) -> dict[str, Any]:
        """The kwargs to re-queue with: the original ones with a fresh attempt budget.

        ``_meta`` (the attempt bookkeeping) is dropped except the entries in
        :data:`KEPT_META` (``key``, ``message_id``, ``date``, ``recipients``, ``queue``), so the
        resent message keeps its Message-ID and idempotency key and goes only to the
        recipients that failed.

        Raises:
            PayloadNotKeptError: ``kwargs`` is only a summary of the payload (read it with
                :meth:`DeadLetterStore.get`; if that has none either, it was dropped).
        """
        if not self.payload_complete:
            raise PayloadNotKeptError(self.id, self.payload_dropped)
        kwargs = {k: v for k, v in self.kwargs.items() if k != "_meta"}
        meta = self.kwargs.get("_meta")
        if isinstance(meta, dict):
            kept = {k: meta[k] for k in KEPT_META if k in meta}
            if kept:
                kwargs["_meta"] = kept
        return kwargs


class PayloadNotKeptError(MailworkerError, LookupError):
    """The dead letter's payload is not at hand, so it cannot be re-queued."""

    def __init__(self, id: str, reason: str | None) -> None:
        why = reason or "only its summary was read (read the record with get())"
        super().__init__(f"dead letter {id}: the payload was not kept: {why}")
        self.id = id
        self.reason = reason


def payload_summary(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` with attachment contents and raw message bytes replaced by their sizes.

    Each ``attachments`` entry keeps ``filename``, ``mimetype`` and ``content_id`` and
    gets ``size`` (decoded bytes; None when the content is not valid base64);
    ``raw_b64`` becomes ``raw_size``. Malformed entries are described, never echoed.
    A summary summarises to itself.
    """
    out = {k: v for k, v in kwargs.items() if k not in ("attachments", "raw_b64")}
    if "attachments" in kwargs:
        items = kwargs["attachments"]
        if not isinstance(items, list):
            items = []
        out["attachments"] = [_attachment_summary(item) for item in items]
    if "raw_b64" in kwargs:
        out["raw_size"] = _b64_size(kwargs["raw_b64"])
    return out


def _attachment_summary(item: object) -> dict[str, Any]:
    if not isinstance(item, dict):
        return {"filename": None, "size": None}
    summary: dict[str, Any] = {"filename": item.get("filename")}
    for key in ("mimetype", "content_id"):
        if item.get(key) is not None:
            summary[key] = item[key]
    if "content" not in item and isinstance(item.get("size"), int):
        summary["size"] = item["size"]  # already a summary
    else:
        summary["size"] = _b64_size(item.get("content"))
    return summary


def compact_summary(kwargs: dict[str, Any]) -> dict[str, Any]:
    """:func:`payload_summary` of ``kwargs`` with every string cut to
    :data:`SUMMARY_TEXT_MAX` characters: what a record keeps beside its payload."""
    return {k: _cut_strings(v) for k, v in payload_summary(kwargs).items()}


def _cut_strings(value: Any) -> Any:
    if isinstance(value, str) and len(value) > SUMMARY_TEXT_MAX:
        return f"{value[:SUMMARY_TEXT_MAX]}… ({len(value)} characters)"
    if isinstance(value, list):
        return [_cut_strings(v) for v in value]
    if isinstance(value, dict):
        return {k: _cut_strings(v) for k, v in value.items()}
    return value


def _b64_size(content: object) -> int | None:
    if not isinstance(content, str):
        return None
    try:
        return len(base64.b64decode("".join(content.split()), validate=True))
    except (binascii.Error, ValueError):
        return None


def _as_code(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def code_matcher(pattern: str) -> Callable[[DeadLetter], bool]:
    """A test for records whose last error matches ``pattern``.

    Args:
        pattern: a reply code (``"550"``), a class (``"5xx"``, ``"4xx"``) or an
            enhanced status code (``"5.1.1"``).

    Raises:
        ValueError: ``pattern`` is none of those.
    """
    pattern = pattern.strip()
    if _CODE.match(pattern):
        wanted = int(pattern)
        return lambda r: r.code == wanted
    if _CODE_CLASS.match(pattern):
        first = int(pattern[0])
        return lambda r: r.code is not None and r.code // 100 == first
    if _ENHANCED.match(pattern):
        return lambda r: r.error.get("enhanced_code") == pattern
    raise ValueError(f"code {pattern!r}: use a reply code (550), a class (5xx) or 5.1.1")
