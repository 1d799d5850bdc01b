"""Turning task arguments into the bytes and envelope to send."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailworker.errors import InvalidMessageError
from mailworker.message import (
    DEFAULT_LIMITS,
    Limits,
    MailPayload,
    RawPayload,
    build_message,
    message_bytes,
    pin_header,
    to_ascii_domain,
)
from mailworker.queue.names import SEND_MESSAGE
from mailworker.smtp.profile import normalize_profile_name
from mailworker.worker.outcome import Meta

#: Arguments that steer delivery rather than describe the message.
_CONTROL = ("profile", "idempotency_key", "_meta")


@dataclass(frozen=True)
class Prepared:
    """A validated message, ready for the wire."""

    envelope_from: str
    recipients: list[str]
    data: bytes
    message_id: str | None
    date: str | None
    #: For logs and dead-letter records: ``recipients``, ``subject`` and more, read
    #: without parsing a prebuilt message's body.
    summary: dict[str, Any]


def prepare(
    task: str,
    kwargs: dict[str, Any],
    meta: Meta,
    *,
    default_from: str | None,
    check_profile: Callable[[str], object],
    limits: Limits = DEFAULT_LIMITS,
) -> Prepared:
    """Validate the task's message and build it; ``meta`` gains its Message-ID and
    Date on the first attempt and gives them back on every later one.

    Raises:
        InvalidMessageError: a field is invalid (named in the error).
        ConfigError: the task's profile is not configured (from ``check_profile``).
    """
    fields = {k: v for k, v in kwargs.items() if k not in _CONTROL}
    override = meta.get("recipients")
    profile = profile_of(kwargs)
    if task == SEND_MESSAGE:
        raw = RawPayload.from_task_kwargs(fields, limits=limits)
        check_profile(profile)
        return Prepared(
            raw.envelope_from,
            _own(override, raw.recipients),
            raw.message,
            raw.message_id,
            None,
            raw.summary(),
        )
    payload = MailPayload.from_task_kwargs(fields, default_from=default_from, limits=limits)
    check_profile(profile)
    message = build_message(payload)
    # Every attempt of a message sends the same Message-ID and Date; the id is
    # derived from the message key and the first task id, so even a redelivery
    # that lost its retry state (a worker killed after the server's 250) repeats
    # it, while a key reused for another message later gets a new one.
    if payload.header("Message-ID") is None:
        meta.setdefault(
            "message_id", _message_id(meta["key"], meta["origin"], payload.envelope_from)
        )
    pin_header(message, "Message-ID", meta.setdefault("message_id", str(message["Message-ID"])))
    pin_header(message, "Date", meta.setdefault("date", str(message["Date"])))
    data = message_bytes(message)
    # The payload's sizes bound it from below; quoted-printable bodies can grow it.
    limits.check_size(len(data))
    return Prepared(
        payload.envelope_from,
        _own(override, payload.recipients),
        data,
        meta["message_id"],
        meta["date"],
        payload.summary(),
    )


def _own(subset: list[str] | None, recipients: tuple[str, ...]) -> list[str]:
    """The recipients a retry is for (``_meta.recipients``): only the message's own."""
    if subset is None:
        return list(recipients)
    strangers = [r for r in subset if r not in recipients]
    if strangers:
        raise InvalidMessageError(
            "_meta.recipients", f"names {strangers[0]!r}, not a recipient of the message"
        )
    return list(subset)


def profile_of(kwargs: dict[str, Any]) -> str:
    """The task's profile name, normalised (a malformed one fails validation, by name)."""
    return normalize_profile_name(str(kwargs.get("profile") or ""))


def _message_id(key: str, origin: str, sender: str) -> str:
    """A Message-ID that depends only on the message key, the task that first carried
    it and the sender's domain."""
    digest = hashlib.sha256(f"{key}\n{origin}".encode()).hexdigest()[:32]
    domain = sender.rpartition("@")[2]
    return f"<{digest}@{to_ascii_domain(domain) if domain else 'mailworker.invalid'}>"
