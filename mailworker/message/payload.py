"""Task payloads: their schema, their validation, and the MIME message built from them.

Two payload kinds arrive from the broker as JSON keyword arguments:

* ``send_mail(to, subject, text=..., html=..., ...)`` becomes a :class:`MailPayload`, from
  which :func:`build_message` builds the message;
* ``send_message(raw_b64, envelope_from, recipients)`` becomes a :class:`RawPayload` that
  carries a message the caller built.

Both are validated completely before anything talks to a server. A bad payload fails the
same way on every attempt, so :class:`~mailworker.errors.InvalidMessageError` names the field
and the fix, and is never retried.

Encoding: messages are built with :data:`email.policy.SMTP` (CRLF line endings, non-ASCII
header text as RFC 2047 encoded-words, ASCII domains via IDNA) and every body part is 7bit,
quoted-printable or base64, so they never need 8BITMIME. An address with a non-ASCII local
part cannot be written in ASCII at all; such a message needs SMTPUTF8 anyway, so it is built
with :data:`email.policy.SMTPUTF8` and its headers carry raw UTF-8 (bodies stay 7-bit).

The parts live in private modules beside this one: scalar field checks in ``_fields``,
addresses in ``_address``, extra headers in ``_headers``, :class:`Attachment` in
``_attachments``, and :func:`build_message` and :func:`message_bytes` in ``_mime``.

These modules use the standard library only: no Celery, Redis or SMTP session code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from typing import Final

from mailworker.message._address import address_list, parse_address, unique_addr_specs
from mailworker.message._attachments import Attachment, attachments_from_json, check_attachments
from mailworker.message._dsn import DSNOptions, check_dsn
from mailworker.message._fields import (
    check_fields,
    decode_base64,
    fail,
    header_text,
    optional_str,
    required_str,
    type_name,
)
from mailworker.message._headers import check_headers
from mailworker.message._mime import build_message, message_bytes
from mailworker.message._unsubscribe import check_post, check_unsubscribe, check_uris

__all__ = [
    "DEFAULT_LIMITS",
    "MAIL_FIELDS",
    "MAX_KEY_LENGTH",
    "MAX_MESSAGE_BYTES",
    "MAX_RECIPIENTS",
    "RAW_FIELDS",
    "TASK_OPTIONS",
    "Attachment",
    "DSNOptions",
    "Limits",
    "MailPayload",
    "RawPayload",
    "build_message",
    "check_dsn",
    "message_bytes",
]

#: Default upper bound, in bytes, of a whole message as sent. Most providers refuse mail
#: much above 25 MiB, so a larger one would only bounce later; refusing it here fails it
#: early and permanently (``MAILWORKER_MAX_MESSAGE_BYTES``).
MAX_MESSAGE_BYTES: Final = 25 * 1024 * 1024
#: Default upper bound of a message's envelope recipients (``MAILWORKER_MAX_RECIPIENTS``):
#: Postfix takes 1,000 per transaction by default; transactional mail needs far fewer.
MAX_RECIPIENTS: Final = 1000


@dataclass(frozen=True)
class Limits:
    """What one message may hold, checked from the payload's encoded sizes before
    anything large is decoded or built, and again on the bytes built.

    Attributes:
        max_message_bytes: the whole message as sent (headers, bodies, attachments).
        max_recipients: envelope recipients (to, cc and bcc together, or recipients).
    """

    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_recipients: int = MAX_RECIPIENTS

    def check_size(self, size: int, field: str = "message") -> None:
        """Raise InvalidMessageError naming ``field`` if ``size`` bytes is too much."""
        if size > self.max_message_bytes:
            fail(
                field,
                f"the message is {size} bytes, above the limit of {self.max_message_bytes}"
                " (MAILWORKER_MAX_MESSAGE_BYTES)",
            )

    def check_recipients(self, counts: Mapping[str, int]) -> None:
        """Raise InvalidMessageError if the fields' recipients together are too many;
        the error names the field with the most."""
        total = sum(counts.values())
        if total > self.max_recipients:
            field = max(counts, key=lambda name: counts[name])
            fail(
                field,
                f"{total} recipients, above the limit of {self.max_recipients}"
                " (MAILWORKER_MAX_RECIPIENTS): split the message",
            )


#: Longest ``idempotency_key`` (it names Redis keys and travels with every retry).
MAX_KEY_LENGTH: Final = 200

#: The limits when none are given.
DEFAULT_LIMITS: Final = Limits()

#: send_mail keyword arguments that describe the message.
MAIL_FIELDS: Final = (
    "to",
    "subject",
    "text",
    "html",
    "from_email",
    "cc",
    "bcc",
    "reply_to",
    "headers",
    "attachments",
    "list_unsubscribe",
    "list_unsubscribe_post",
)
#: send_message keyword arguments that describe the message.
RAW_FIELDS: Final = ("raw_b64", "envelope_from", "recipients")
#: Task options accepted (and type-checked) beside the message fields; the tasks use them,
#: the payload does not keep them. ``dsn`` steers the envelope (:func:`check_dsn`).
TASK_OPTIONS: Final = ("profile", "idempotency_key", "dsn")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
# A line of more than 998 octets, its line ending left out (RFC 5322 2.1.1).
_LONG_LINE = re.compile(rb"[^\r\n]{999}")


def _task_options(kwargs: Mapping[str, object]) -> None:
    profile = optional_str("profile", kwargs.get("profile"))
    if profile is not None and not profile.strip():
        fail("profile", "must not be empty")
    key = optional_str("idempotency_key", kwargs.get("idempotency_key"))
    if key is not None and not key.strip():
        fail("idempotency_key", "must not be empty (pass null for none)")
    if key is not None and len(key) > MAX_KEY_LENGTH:
        fail("idempotency_key", f"at most {MAX_KEY_LENGTH} characters (hash a longer one)")
    check_dsn("dsn", kwargs.get("dsn"))


def _count(value: object) -> int:
    """How many addresses a field gives, before they are parsed."""
    if isinstance(value, (list, tuple)):
        return len(value)
    return 0 if value is None else 1


def _decoded_size(text: str) -> int:
    """The size of valid base64 ``text`` once decoded, without decoding (or copying) it."""
    return (len(text) - sum(text.count(c) for c in " \t\r\n=")) * 3 // 4


def _encoded_size(kwargs: Mapping[str, object]) -> int:
    """A lower bound of the message's size as sent, from the payload as it came: the
    bodies' characters and the attachments' base64 (which is what goes on the wire)."""
    size = 0
    for name in ("subject", "text", "html"):
        value = kwargs.get(name)
        size += len(value) if isinstance(value, str) else 0
    attachments = kwargs.get("attachments")
    for item in attachments if isinstance(attachments, (list, tuple)) else ():
        content = item.get("content") if isinstance(item, Mapping) else None
        size += len(content) if isinstance(content, str) else 0
    return size


# -- send_mail --------------------------------------------------------------------------


@dataclass(frozen=True)
class MailPayload:
    """A validated ``send_mail`` payload, from which :func:`build_message` builds the message.

    Construction validates and normalises every field (address domains in IDNA form,
    attachment types resolved); it raises :class:`InvalidMessageError` naming the field.
    Build one from task arguments with :meth:`from_task_kwargs`.

    Attributes:
        to: Recipient addresses, bare or as ``"Display Name <a@b.example>"``.
        subject: The subject line.
        from_email: The sender, bare or with a display name.
        text: The plain-text body, or None.
        html: The HTML body, or None.
        cc: Copy recipients.
        bcc: Blind-copy recipients: in the envelope only, never in a header.
        reply_to: Reply-To addresses.
        headers: Extra header fields as (name, value) pairs, in order.
        attachments: Attached files, inline ones (with ``content_id``) included.
        list_unsubscribe: ``https:`` and ``mailto:`` URIs for List-Unsubscribe
            (RFC 2369), bare (without ``<>``).
        list_unsubscribe_post: Add ``List-Unsubscribe-Post: List-Unsubscribe=One-Click``
            (RFC 8058); needs an https URI in ``list_unsubscribe``.
    """

    to: tuple[str, ...]
    subject: str
    from_email: str
    text: str | None = None
    html: str | None = None
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    reply_to: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    attachments: tuple[Attachment, ...] = ()
    list_unsubscribe: tuple[str, ...] = ()
    list_unsubscribe_post: bool = False

    def __post_init__(self) -> None:
        # The constructor validates as well as from_task_kwargs, so a payload made by hand
        # is held to the same rules and build_message can trust every instance. The checks
        # are idempotent: re-checking normalised values changes nothing.
        set_field = object.__setattr__
        for name in ("to", "cc", "bcc", "reply_to"):
            addresses = address_list(name, getattr(self, name))
            set_field(self, name, tuple(str(a) for a in addresses))
        if not (self.to or self.cc or self.bcc):
            fail("to", "at least one recipient in to, cc or bcc is required")
        set_field(self, "from_email", str(parse_address("from_email", self.from_email)))
        header_text("subject", self.subject)
        optional_str("text", self.text)
        optional_str("html", self.html)
        if self.text is None and self.html is None:
            fail("text", "required: pass text or html (or both)")
        set_field(self, "headers", check_headers(self.headers))
        set_field(self, "attachments", check_attachments(self.attachments, self.html is not None))
        uris = check_uris("list_unsubscribe", self.list_unsubscribe)
        set_field(self, "list_unsubscribe", uris)
        set_field(self, "list_unsubscribe_post", check_post(self.list_unsubscribe_post))
        check_unsubscribe(uris, self.list_unsubscribe_post, self.headers)

    @classmethod
    def from_task_kwargs(
        cls,
        kwargs: Mapping[str, object],
        *,
        default_from: str | None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> MailPayload:
        """Validate ``send_mail`` keyword arguments (JSON values) into a payload.

        Args:
            kwargs: The task's keyword arguments. ``to``, ``cc``, ``bcc`` and ``reply_to``
                take an address or a list; ``headers`` an object of name: value;
                ``attachments`` a list of ``{"filename", "content" (base64), "mimetype",
                "content_id"}``; ``list_unsubscribe`` a URI or a list;
                ``list_unsubscribe_post`` a bool. ``profile``, ``idempotency_key``
                and ``dsn`` are checked and left to the task.
            default_from: The sender when ``from_email`` is missing
                (``MAILWORKER_DEFAULT_FROM``), or None if none is configured.
            limits: Size and recipient bounds, checked before attachments are decoded.

        Returns:
            The validated payload.

        Raises:
            InvalidMessageError: a field is missing, unknown or invalid; ``field`` names
                it, e.g. ``to[1]`` or ``attachments[0].content``.
        """
        check_fields(kwargs, (*MAIL_FIELDS, *TASK_OPTIONS))
        _task_options(kwargs)
        limits.check_size(_encoded_size(kwargs))
        limits.check_recipients({name: _count(kwargs.get(name)) for name in ("to", "cc", "bcc")})
        from_email = kwargs.get("from_email")
        if from_email is None:
            if default_from is None:
                fail("from_email", "required (pass from_email or set MAILWORKER_DEFAULT_FROM)")
            from_email = str(parse_address("MAILWORKER_DEFAULT_FROM", default_from))
        return cls(
            to=tuple(str(a) for a in address_list("to", kwargs.get("to"))),
            subject=header_text("subject", kwargs.get("subject")),
            from_email=str(parse_address("from_email", from_email)),
            text=optional_str("text", kwargs.get("text")),
            html=optional_str("html", kwargs.get("html")),
            cc=tuple(str(a) for a in address_list("cc", kwargs.get("cc"))),
            bcc=tuple(str(a) for a in address_list("bcc", kwargs.get("bcc"))),
            reply_to=tuple(str(a) for a in address_list("reply_to", kwargs.get("reply_to"))),
            headers=check_headers(kwargs.get("headers")),
            attachments=attachments_from_json(kwargs.get("attachments")),
            list_unsubscribe=check_uris("list_unsubscribe", kwargs.get("list_unsubscribe")),
            list_unsubscribe_post=check_post(kwargs.get("list_unsubscribe_post")),
        )

    @property
    def recipients(self) -> tuple[str, ...]:
        """Envelope recipients: bare addresses of to, cc and bcc, each once, in order."""
        every = (*self.to, *self.cc, *self.bcc)
        return unique_addr_specs(parse_address("recipients", a) for a in every)

    @property
    def envelope_from(self) -> str:
        """The bare address of ``from_email``, for MAIL FROM."""
        return parse_address("from_email", self.from_email).addr_spec

    @property
    def needs_smtputf8(self) -> bool:
        """True if an address has a non-ASCII local part, which only SMTPUTF8 can carry."""
        every = (self.from_email, *self.to, *self.cc, *self.bcc, *self.reply_to)
        return any(not parse_address("address", a).username.isascii() for a in every)

    def header(self, name: str) -> str | None:
        """The value of the extra header ``name`` (any case), or None."""
        return next((v for n, v in self.headers if n.lower() == name.lower()), None)

    def summary(self) -> dict[str, object]:
        """A small JSON-safe description for logs and dead-letter records (no bodies or
        attachment bytes)."""
        return {
            "kind": "mail",
            "from": self.envelope_from,
            "recipients": list(self.recipients),
            "subject": self.subject,
            "message_id": self.header("Message-ID"),
            "attachments": [a.summary() for a in self.attachments],
        }


# -- send_message -------------------------------------------------------------------------


def _header_block(data: bytes) -> EmailMessage:
    """Parse only the header section: summaries and checks need no body."""
    match = _BLANK_LINE.search(data)
    block = data[: match.start()] if match else data
    parser = BytesParser(_class=EmailMessage, policy=email_policy.default)
    return parser.parsebytes(block + b"\r\n", headersonly=True)


def _check_raw(name: str, data: object) -> bytes:
    if not isinstance(data, bytes):
        fail(name, f"must be bytes, got {type_name(data)}")
    if not data.strip():
        fail(name, "the message is empty")
    long_line = _LONG_LINE.search(data)
    if long_line is not None:
        line = data.count(b"\n", 0, long_line.start()) + 1
        fail(name, f"line {line} is longer than 998 octets (RFC 5322 2.1.1); servers refuse it")
    headers = _header_block(data)
    if not headers.keys():
        fail(name, "not an RFC 5322 message: it must start with 'Name: value' header lines")
    if "bcc" in headers or "resent-bcc" in headers:
        fail(
            name, "has a Bcc header, which every recipient would see; list those only in recipients"
        )
    return data


@dataclass(frozen=True)
class RawPayload:
    """A validated ``send_message`` payload: a prebuilt message and its envelope.

    Attributes:
        message: The RFC 5322 message, sent as it is (the SMTP layer dot-stuffs it).
        envelope_from: The bare MAIL FROM address; ``""`` is the null sender.
        recipients: The bare RCPT TO addresses, each once.
    """

    message: bytes = field(repr=False)
    envelope_from: str
    recipients: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_raw("message", self.message)
        if self.envelope_from != "":
            sender = parse_address("envelope_from", self.envelope_from)
            object.__setattr__(self, "envelope_from", sender.addr_spec)
        recipients = unique_addr_specs(address_list("recipients", self.recipients))
        if not recipients:
            fail("recipients", "at least one recipient is required")
        object.__setattr__(self, "recipients", recipients)

    @classmethod
    def from_task_kwargs(
        cls, kwargs: Mapping[str, object], *, limits: Limits = DEFAULT_LIMITS
    ) -> RawPayload:
        """Validate ``send_message`` keyword arguments (JSON values) into a payload.

        Args:
            kwargs: ``raw_b64`` (the message, base64), ``envelope_from`` (an address, or
                ``""`` for the null sender), ``recipients`` (an address or a list), and
                optionally ``profile``, ``idempotency_key`` and ``dsn``, which are
                checked and left to the task.
            limits: Size and recipient bounds; the size is checked before decoding.

        Returns:
            The validated payload.

        Raises:
            InvalidMessageError: a field is missing, unknown or invalid; ``field`` names it.
        """
        check_fields(kwargs, (*RAW_FIELDS, *TASK_OPTIONS))
        _task_options(kwargs)
        encoded = kwargs.get("raw_b64")
        if isinstance(encoded, str):
            limits.check_size(_decoded_size(encoded), "raw_b64")  # before decoding
        limits.check_recipients({"recipients": _count(kwargs.get("recipients"))})
        message = _check_raw("raw_b64", decode_base64("raw_b64", encoded))
        limits.check_size(len(message), "raw_b64")
        hint = ' (use "" for the null sender)'
        envelope_from = required_str("envelope_from", kwargs.get("envelope_from"), hint)
        recipients = address_list("recipients", kwargs.get("recipients"))
        if not recipients:
            fail("recipients", "required: at least one recipient address")
        return cls(
            message=message,
            envelope_from=envelope_from,
            recipients=tuple(a.addr_spec for a in recipients),
        )

    @property
    def message_id(self) -> str | None:
        """The Message-ID header, or None if the message has none."""
        return _message_id(_header_block(self.message))

    @property
    def subject(self) -> str | None:
        """The decoded Subject header, or None if the message has none."""
        return _subject(_header_block(self.message))

    def summary(self) -> dict[str, object]:
        """A small JSON-safe description for logs and dead-letter records (no content).

        Read from the header block alone, so it costs little for a message of any size
        and can be made on every attempt. Attachments are not listed: finding them would
        take a MIME parse of the whole message.
        """
        headers = _header_block(self.message)
        return {
            "kind": "raw",
            "from": self.envelope_from,
            "recipients": list(self.recipients),
            "subject": _subject(headers),
            "message_id": _message_id(headers),
            "size": len(self.message),
        }


def _message_id(headers: EmailMessage) -> str | None:
    value = headers.get("Message-ID")
    return str(value).strip() if value is not None else None


def _subject(headers: EmailMessage) -> str | None:
    value = headers.get("Subject")
    return str(value) if value is not None else None
