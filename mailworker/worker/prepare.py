"""Turning task arguments into the bytes and envelope to send."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

from mailworker.errors import ConfigError, InvalidMessageError
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
from mailworker.message.dkim import DkimSigner
from mailworker.message.payload import check_dsn
from mailworker.queue.names import SEND_MESSAGE
from mailworker.smtp.body import normalise_line_endings
from mailworker.smtp.dsn import DSN
from mailworker.smtp.limits import normalize_profile_name
from mailworker.smtp.profile import Profile
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
    #: Delivery status notifications to ask the server for (the ``dsn`` option).
    dsn: DSN | None = None


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

    ``check_profile`` returns the profile's session (or the :class:`Profile`): when the
    profile has a DKIM key, the final bytes are signed (:func:`dkim_signed`).

    Raises:
        InvalidMessageError: a field is invalid (named in the error).
        ConfigError: the task's profile is not configured (from ``check_profile``), or
            its DKIM key cannot be used.
    """
    fields = {k: v for k, v in kwargs.items() if k not in _CONTROL}
    override = meta.get("recipients")
    profile = profile_of(kwargs)
    if task == SEND_MESSAGE:
        raw = RawPayload.from_task_kwargs(fields, limits=limits)
        data = dkim_signed(check_profile(profile), raw.message, meta)
        limits.check_size(len(data))
        return Prepared(
            raw.envelope_from,
            _own(override, raw.recipients),
            data,
            raw.message_id,
            None,
            raw.summary(),
            dsn=dsn_of(kwargs),
        )
    payload = MailPayload.from_task_kwargs(fields, default_from=default_from, limits=limits)
    target = check_profile(profile)
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
    _pin_boundaries(message, meta["message_id"])
    data = dkim_signed(target, message_bytes(message), meta)
    # The payload's sizes bound it from below; quoted-printable bodies can grow it.
    limits.check_size(len(data))
    return Prepared(
        payload.envelope_from,
        _own(override, payload.recipients),
        data,
        meta["message_id"],
        meta["date"],
        payload.summary(),
        dsn=dsn_of(kwargs),
    )


def dkim_signed(target: object, data: bytes, meta: Meta) -> bytes:
    """``data`` with a DKIM-Signature on top when the profile of ``target`` (a session or
    a :class:`Profile`) has a DKIM key; else ``data`` as it is.

    What is signed is what the session sends: the bytes with CRLF line endings (it
    dot-stuffs them after; the receiver undoes that before verifying). The signature's
    time (``t=``) is the message's first attempt, so every attempt sends the same bytes.

    Raises:
        ConfigError: the key cannot be used (see :func:`dkim_signer`).
    """
    profile = getattr(target, "profile", target)
    signer = dkim_signer(profile) if isinstance(profile, Profile) else None
    if signer is None:
        return data
    return signer.sign(normalise_line_endings(data), timestamp=int(meta["first_attempt_at"]))


def dkim_signer(profile: Profile) -> DkimSigner | None:
    """The DKIM signer of ``profile`` (None without ``dkim_key_file``), loaded once per
    process: replacing the key file takes a restart (a new selector, the usual way to
    rotate keys, changes the profile URL anyway).

    Raises:
        ConfigError: the key cannot be read, parsed or used, or dkimpy is missing; the
            message names the profile, ``dkim_key_file`` and the file.
    """
    if profile.dkim_key_file is None:
        return None
    assert profile.dkim_domain is not None  # Profile requires all three
    assert profile.dkim_selector is not None
    try:
        return _load_signer(profile.dkim_domain, profile.dkim_selector, profile.dkim_key_file)
    except ConfigError as exc:
        raise ConfigError(f"profile {profile.name!r}: {exc}") from None


@functools.lru_cache(maxsize=32)
def _load_signer(domain: str, selector: str, key_file: str) -> DkimSigner:
    return DkimSigner.load(domain=domain, selector=selector, key_file=key_file)


def _pin_boundaries(message: EmailMessage, message_id: str) -> None:
    """Give every multipart a boundary derived from the Message-ID, so a rebuilt message
    (a delayed retry) has the same bytes, and so the same DKIM signature; the email
    package would draw random ones. A boundary found in the content gets a counter, as
    the email package does."""
    content = "\n".join(
        str(part.get_payload()) for part in message.walk() if not part.is_multipart()
    )
    for number, part in enumerate(p for p in message.walk() if p.is_multipart()):
        seed = hashlib.sha256(f"{message_id}\n{number}".encode()).hexdigest()[:24]
        boundary, tries = f"=_{seed}", 0
        while boundary in content:
            tries += 1
            boundary = f"=_{seed}.{tries}"
        part.set_boundary(boundary)


def dsn_of(kwargs: dict[str, Any]) -> DSN | None:
    """The task's ``dsn`` option as a :class:`DSN` (None when not given).

    Raises:
        InvalidMessageError: the option is malformed (naming ``dsn.notify`` etc.).
    """
    options = check_dsn("dsn", kwargs.get("dsn"))
    if options is None:
        return None
    return DSN(notify=options.notify, ret=options.ret, envid=options.envid)


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
