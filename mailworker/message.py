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

This module uses the standard library only: no Celery, Redis or SMTP session code.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import ipaddress
import mimetypes
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import Policy
from email.utils import format_datetime, make_msgid, parsedate_to_datetime
from typing import Final, NoReturn

from mailworker.errors import InvalidMessageError

__all__ = [
    "MAIL_FIELDS",
    "MAX_MESSAGE_BYTES",
    "RAW_FIELDS",
    "TASK_OPTIONS",
    "Attachment",
    "MailPayload",
    "RawPayload",
    "build_message",
    "message_bytes",
]

#: Upper bound, in bytes, of a send_mail payload's decoded attachments and of a
#: send_message payload's message. Most providers refuse mail much above 25 MiB, so a larger
#: one would only bounce later; refusing it here fails it early and permanently.
MAX_MESSAGE_BYTES: Final = 25 * 1024 * 1024

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
)
#: send_message keyword arguments that describe the message.
RAW_FIELDS: Final = ("raw_b64", "envelope_from", "recipients")
#: Task options accepted (and type-checked) beside the message fields; the tasks use them,
#: the payload does not keep them.
TASK_OPTIONS: Final = ("profile", "idempotency_key")
_ATTACHMENT_FIELDS: Final = ("filename", "content", "mimetype", "content_id")

# Header fields the payload has its own argument for.
_ARGUMENT_HEADERS: Final = {
    "from": "from_email",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
    "reply-to": "reply_to",
    "subject": "subject",
}
# Line breaks for str.splitlines(), which the email package refuses in header values, and
# every other control character: none belongs in a header, and CR/LF is header injection.
_BAD_HEADER_CHAR = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Control characters other than TAB/CR/LF; a body holding them is sent quoted-printable so
# the wire carries none of them.
_BODY_CONTROL = re.compile("[\x00-\x08\x0b-\x0c\x0e-\x1f\x7f]")
_ATEXT: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # printable ASCII except ':' (RFC 5322 ftext)
_MSG_ID = re.compile(r"<[!-;=?-~]+@[!-;=?-~]+>")  # printable ASCII except '<' and '>'
_CONTENT_ID = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]{1,250}")
_MIME_NAME = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_MIMETYPE = re.compile(f"{_MIME_NAME}/{_MIME_NAME}")
_QUOTED_PAIR = re.compile(r"\\(.)")
_FOLD_WORD = re.compile(r"[ \t]*[^ \t]+|[ \t]+")
_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
# The SMTP policies default to cte_type="8bit", which sends short non-ASCII text as raw 8-bit
# and so would need 8BITMIME; "7bit" makes the email package pick quoted-printable or base64.
_POLICY: Final = email_policy.SMTP.clone(cte_type="7bit")
_POLICY_UTF8: Final = email_policy.SMTPUTF8.clone(cte_type="7bit")
# RFC 5322 §2.1.1: a line is at most 998 octets plus CRLF.
_MAX_LINE: Final = 998


def _fail(field_name: str, problem: str) -> NoReturn:
    raise InvalidMessageError(field_name, problem)


def _type_name(value: object) -> str:
    return type(value).__name__


# -- scalar fields ------------------------------------------------------------------------


def _optional_str(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        _fail(name, f"must be a string, got {_type_name(value)}")
    if _SURROGATE.search(value):
        _fail(name, "contains a lone surrogate, which is not valid Unicode")
    return value


def _required_str(name: str, value: object, hint: str = "") -> str:
    text = _optional_str(name, value)
    if text is None:
        _fail(name, f"required{hint}")
    return text


def _header_text(name: str, value: object, *, required: bool = True) -> str:
    """A string that is safe on a header line: no CR, LF or other control character."""
    text = _required_str(name, value) if required else _optional_str(name, value) or ""
    bad = _BAD_HEADER_CHAR.search(text)
    if bad:
        if bad.group() in "\r\n":
            _fail(name, "contains CR or LF (header injection)")
        _fail(name, f"contains control character U+{ord(bad.group()):04X}")
    return text


def _decode_base64(name: str, value: object) -> bytes:
    text = _required_str(name, value)
    try:
        # Line-wrapped base64 (MIME style) is common, so whitespace is dropped first;
        # validate=True then refuses everything outside the alphabet instead of skipping it.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        _fail(name, "not valid base64")


def _task_options(kwargs: Mapping[str, object]) -> None:
    profile = _optional_str("profile", kwargs.get("profile"))
    if profile is not None and not profile.strip():
        _fail("profile", "must not be empty")
    key = _optional_str("idempotency_key", kwargs.get("idempotency_key"))
    if key is not None and not key.strip():
        _fail("idempotency_key", "must not be empty (pass null for none)")


def _check_fields(kwargs: Mapping[str, object], known: Iterable[str], prefix: str = "") -> None:
    """Refuse unknown keys: a misspelt optional field would otherwise vanish silently."""
    valid = sorted(known)
    for key in kwargs:
        name = str(key)
        if name in valid:
            continue
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "valid fields: " + ", ".join(valid)
        _fail(f"{prefix}{name}", f"unknown field {name!r} ({hint})")


# -- addresses ----------------------------------------------------------------------------


def _ascii_domain(domain: str) -> str:
    """The domain in ASCII (IDNA A-labels, or the address literal); ValueError if invalid."""
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        try:
            if literal[:5].lower() == "ipv6:":
                ipaddress.IPv6Address(literal[5:])
            else:
                ipaddress.IPv4Address(literal)
        except ValueError:
            raise ValueError(f"domain literal {domain!r} is not an IP address") from None
        return domain
    try:
        # The stdlib codec implements IDNA 2003 (e.g. it maps 'ß' to 'ss'); the idna
        # package would do IDNA 2008, but this module keeps to the standard library.
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"domain {domain!r} is not a valid domain name") from None
    if len(ascii_domain) > 255:
        raise ValueError("domain is longer than 255 octets")
    if not all(_LDH_LABEL.fullmatch(label) for label in ascii_domain.split(".")):
        raise ValueError(f"domain {domain!r} is not a valid domain name")
    return ascii_domain


def _split_addr_spec(spec: str) -> tuple[str, str]:
    """Check a bare address; return (local part, domain) or raise ValueError(reason)."""
    if any(ch.isspace() for ch in spec):
        raise ValueError("contains whitespace")
    if spec.count("@") != 1:
        raise ValueError("expected exactly one '@'")
    local, _, domain = spec.partition("@")
    if not local or not domain:
        raise ValueError("empty local part" if not local else "empty domain")
    if len(local.encode()) > 64:
        raise ValueError("local part is longer than 64 octets")
    atoms_ok = all(
        atom and all(ch in _ATEXT or (ord(ch) > 127 and ch.isprintable()) for ch in atom)
        for atom in local.split(".")
    )
    if not atoms_ok:
        raise ValueError("the part before '@' has a character or dot that needs quoting")
    ascii_domain = _ascii_domain(domain)
    # An ASCII local part means no SMTPUTF8 is needed: write the domain in A-labels so
    # every server can take it. A non-ASCII local part needs SMTPUTF8 anyway, which
    # carries U-labels as they are.
    if local.isascii():
        domain = ascii_domain
    if len(f"{local}@{domain}".encode()) > 254:
        raise ValueError("longer than 254 octets")
    return local, domain


def _parse_address(name: str, value: object) -> Address:
    """Parse 'a@b.example' or 'Display Name <a@b.example>' into a checked Address."""
    if not isinstance(value, str):
        _fail(name, f"must be an email address string, got {_type_name(value)}")
    text = _header_text(name, value).strip()
    display, spec = "", text
    if text.endswith(">") and "<" in text:
        cut = text.rindex("<")
        display, spec = text[:cut].strip(), text[cut + 1 : -1].strip()
        if len(display) >= 2 and display[0] == display[-1] == '"':
            display = _QUOTED_PAIR.sub(r"\1", display[1:-1])
    try:
        local, domain = _split_addr_spec(spec)
    except ValueError as exc:
        hint = "pass several addresses as a list" if "," in spec else str(exc)
        _fail(name, f"{value!r} is not a valid email address ({hint})")
    return Address(display_name=display, username=local, domain=domain)


def _address_list(name: str, value: object) -> tuple[Address, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (_parse_address(name, value),)
    if not isinstance(value, (list, tuple)):
        _fail(name, f"must be an email address or a list of them, got {_type_name(value)}")
    return tuple(_parse_address(f"{name}[{i}]", item) for i, item in enumerate(value))


def _unique_addr_specs(addresses: Iterable[Address]) -> tuple[str, ...]:
    """Bare addresses, first occurrence kept; domains compare case-insensitively, local
    parts exactly (RFC 5321 lets the receiving server treat case in them as significant)."""
    seen: set[tuple[str, str]] = set()
    unique: list[str] = []
    for address in addresses:
        key = (address.username, address.domain.lower())
        if key not in seen:
            seen.add(key)
            unique.append(address.addr_spec)
    return tuple(unique)


# -- extra headers ------------------------------------------------------------------------


def _header_pairs(value: object) -> tuple[tuple[object, object], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple(value.items())
    if isinstance(value, (list, tuple)) and all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in value
    ):
        return tuple((pair[0], pair[1]) for pair in value)
    _fail("headers", f"must be an object of name: value, got {_type_name(value)}")


def _check_header(name: str, value: object) -> tuple[str, str]:
    where = f"headers[{name!r}]"
    if "\r" in name or "\n" in name:
        _fail(where, "the name contains CR or LF (header injection)")
    if not _HEADER_NAME.fullmatch(name):
        _fail(where, "a header name is 1-76 printable ASCII characters without ':' or spaces")
    lower = name.lower()
    if lower in _ARGUMENT_HEADERS:
        argument = _ARGUMENT_HEADERS[lower]
        _fail(where, f"pass it as the {argument} argument, not in headers")
    if lower == "mime-version" or lower.startswith("content-"):
        _fail(where, "MIME-Version and Content-* are set by the message builder")
    if lower == "return-path":
        _fail(where, "the receiving server sets Return-Path from the envelope sender")
    if lower.startswith("resent-"):
        _fail(where, "Resent-* fields are for re-sending an existing message; use send_message")
    text = _header_text(where, value)
    if lower in {"date", "orig-date"}:
        try:
            parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            _fail(where, f"{text!r} is not an RFC 5322 date like 'Tue, 01 Jul 2025 10:00:00 +0000'")
    elif lower == "message-id":
        if not _MSG_ID.fullmatch(text.strip()):
            _fail(where, f"{text!r} does not look like <unique-id@your.domain>")
        text = text.strip()
    elif lower == "sender":
        text = str(_parse_address(where, text))
    elif text.isascii():
        # _VerbatimHeader folds only before whitespace, so its longest piece bounds a line.
        longest = max((len(word) for word in _FOLD_WORD.findall(text)), default=0)
        if len(name) + 2 + longest > _MAX_LINE:
            _fail(where, f"a {longest}-character word makes a line longer than 998 octets")
    return name, text


def _check_headers(value: object) -> tuple[tuple[str, str], ...]:
    checked: dict[str, str] = {}
    result: list[tuple[str, str]] = []
    for raw_name, raw_value in _header_pairs(value):
        if not isinstance(raw_name, str):
            _fail(f"headers[{raw_name!r}]", "a header name must be a string")
        name, text = _check_header(raw_name, raw_value)
        if name.lower() in checked:
            _fail(f"headers[{name!r}]", f"given twice (also as {checked[name.lower()]!r})")
        checked[name.lower()] = name
        result.append((name, text))
    return tuple(result)


class _VerbatimHeader(str):
    """An ASCII header value folded only at whitespace and never encoded.

    For a word too long for one 78-character line, the email package turns the word into
    RFC 2047 encoded-words, which corrupts values it does not know to be structured (a long
    List-Unsubscribe URL, a Content-ID). RFC 5322 allows 998 octets, so such a word is
    better written as it is on a line of its own. The email package writes any header value
    that has a ``name`` and a ``fold()`` through ``fold()``.
    """

    name: str

    def __new__(cls, name: str, value: str) -> _VerbatimHeader:
        header = super().__new__(cls, value)
        header.name = name
        return header

    def fold(self, *, policy: Policy) -> str:
        """The header line(s) with their line endings, folded before whitespace."""
        limit = policy.max_line_length or 78
        head = f"{self.name}:"
        lines = [head]
        words = _FOLD_WORD.findall(str(self))
        if words and words[0][0] not in " \t":
            words[0] = " " + words[0]
        for word in words:
            # Fold before a word's leading whitespace once the line would pass the limit;
            # never leave the name alone on its line or start a line of whitespace only.
            if len(lines[-1]) + len(word) > limit and lines[-1] != head and word.strip():
                lines.append(word)
            else:
                lines[-1] += word
        return policy.linesep.join(lines) + policy.linesep


# -- attachments --------------------------------------------------------------------------


@dataclass(frozen=True)
class Attachment:
    """One attached file. With ``content_id`` it is an inline part, shown by the HTML body
    where it says ``cid:<content_id>``.

    Attributes:
        filename: The file name shown to the recipient (no path).
        content: The file's bytes.
        mimetype: ``type/subtype``; guessed from ``filename`` when None.
        content_id: The id the HTML refers to (without angle brackets), or None.
    """

    filename: str
    content: bytes = field(repr=False)
    mimetype: str | None = None
    content_id: str | None = None

    def summary(self) -> dict[str, object]:
        """Name, type and size, never the content: JSON-safe, for logs."""
        return {
            "filename": self.filename,
            "mimetype": self.mimetype,
            "size": len(self.content),
            "content_id": self.content_id,
        }


def _attachments_from_json(value: object) -> tuple[Attachment, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        _fail("attachments", f"must be a list of objects, got {_type_name(value)}")
    attachments: list[Attachment] = []
    for i, item in enumerate(value):
        where = f"attachments[{i}]"
        if not isinstance(item, Mapping):
            _fail(where, f"must be an object with filename and content, got {_type_name(item)}")
        _check_fields(item, _ATTACHMENT_FIELDS, prefix=f"{where}.")
        attachments.append(
            Attachment(
                filename=_required_str(f"{where}.filename", item.get("filename")),
                content=_decode_base64(f"{where}.content", item.get("content")),
                mimetype=_optional_str(f"{where}.mimetype", item.get("mimetype")),
                content_id=_optional_str(f"{where}.content_id", item.get("content_id")),
            )
        )
    return tuple(attachments)


def _guess_mimetype(filename: str) -> str:
    guessed, encoding = mimetypes.guess_type(filename)
    # 'x.tar.gz' guesses as application/x-tar with encoding gzip: labelling the compressed
    # bytes as a tar would mislead the recipient's mail program. message/* and multipart/*
    # parts are parsed, not shown as files, so an '.eml' file also goes as bytes.
    if guessed is None or encoding is not None or guessed.startswith(("message/", "multipart/")):
        return "application/octet-stream"
    return guessed


def _check_attachment(where: str, attachment: Attachment) -> Attachment:
    if not isinstance(attachment, Attachment):
        _fail(where, f"must be an Attachment, got {_type_name(attachment)}")
    filename = _header_text(f"{where}.filename", attachment.filename)
    if not filename.strip():
        _fail(f"{where}.filename", "must not be empty")
    if "/" in filename or "\\" in filename or len(filename) > 255:
        _fail(f"{where}.filename", "must be a file name of at most 255 characters, not a path")
    if not isinstance(attachment.content, bytes):
        _fail(f"{where}.content", f"must be bytes, got {_type_name(attachment.content)}")
    mimetype = _header_text(f"{where}.mimetype", attachment.mimetype, required=False).lower()
    if not mimetype:
        mimetype = _guess_mimetype(filename)
    elif not _MIMETYPE.fullmatch(mimetype):
        _fail(f"{where}.mimetype", f"{mimetype!r} is not a type/subtype such as 'image/png'")
    elif mimetype.startswith(("message/", "multipart/")):
        _fail(f"{where}.mimetype", "message/* and multipart/* cannot be attached as bytes")
    content_id = attachment.content_id
    if content_id is not None:
        content_id = _header_text(f"{where}.content_id", content_id).strip()
        if content_id.startswith("<") and content_id.endswith(">"):
            content_id = content_id[1:-1]
        if not _CONTENT_ID.fullmatch(content_id):
            _fail(f"{where}.content_id", f"{content_id!r} is not an id such as 'logo@example'")
    return dataclasses.replace(
        attachment, filename=filename, mimetype=mimetype, content_id=content_id
    )


def _check_attachments(value: object, has_html: bool) -> tuple[Attachment, ...]:
    if not isinstance(value, tuple):
        _fail("attachments", f"must be a tuple of Attachment, got {_type_name(value)}")
    checked = tuple(_check_attachment(f"attachments[{i}]", a) for i, a in enumerate(value))
    content_ids: dict[str, int] = {}
    for i, attachment in enumerate(checked):
        if attachment.content_id is None:
            continue
        if not has_html:
            _fail(f"attachments[{i}].content_id", "inline parts need an html body to show them")
        if attachment.content_id in content_ids:
            first = content_ids[attachment.content_id]
            _fail(f"attachments[{i}].content_id", f"the same id as attachments[{first}]")
        content_ids[attachment.content_id] = i
    total = sum(len(a.content) for a in checked)
    if total > MAX_MESSAGE_BYTES:
        _fail("attachments", f"{total} bytes in total, above the {MAX_MESSAGE_BYTES} byte limit")
    return checked


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

    def __post_init__(self) -> None:
        # The constructor validates as well as from_task_kwargs, so a payload made by hand
        # is held to the same rules and build_message can trust every instance. The checks
        # are idempotent: re-checking normalised values changes nothing.
        set_field = object.__setattr__
        for name in ("to", "cc", "bcc", "reply_to"):
            addresses = _address_list(name, getattr(self, name))
            set_field(self, name, tuple(str(a) for a in addresses))
        if not (self.to or self.cc or self.bcc):
            _fail("to", "at least one recipient in to, cc or bcc is required")
        set_field(self, "from_email", str(_parse_address("from_email", self.from_email)))
        _header_text("subject", self.subject)
        _optional_str("text", self.text)
        _optional_str("html", self.html)
        if self.text is None and self.html is None:
            _fail("text", "required: pass text or html (or both)")
        set_field(self, "headers", _check_headers(self.headers))
        set_field(self, "attachments", _check_attachments(self.attachments, self.html is not None))

    @classmethod
    def from_task_kwargs(
        cls, kwargs: Mapping[str, object], *, default_from: str | None
    ) -> MailPayload:
        """Validate ``send_mail`` keyword arguments (JSON values) into a payload.

        Args:
            kwargs: The task's keyword arguments. ``to``, ``cc``, ``bcc`` and ``reply_to``
                take an address or a list; ``headers`` an object of name: value;
                ``attachments`` a list of ``{"filename", "content" (base64), "mimetype",
                "content_id"}``. ``profile`` and ``idempotency_key`` are checked and
                left to the task.
            default_from: The sender when ``from_email`` is missing
                (``MAILWORKER_DEFAULT_FROM``), or None if none is configured.

        Returns:
            The validated payload.

        Raises:
            InvalidMessageError: a field is missing, unknown or invalid; ``field`` names
                it, e.g. ``to[1]`` or ``attachments[0].content``.
        """
        _check_fields(kwargs, (*MAIL_FIELDS, *TASK_OPTIONS))
        _task_options(kwargs)
        from_email = kwargs.get("from_email")
        if from_email is None:
            if default_from is None:
                _fail("from_email", "required (pass from_email or set MAILWORKER_DEFAULT_FROM)")
            from_email = str(_parse_address("MAILWORKER_DEFAULT_FROM", default_from))
        return cls(
            to=tuple(str(a) for a in _address_list("to", kwargs.get("to"))),
            subject=_header_text("subject", kwargs.get("subject")),
            from_email=str(_parse_address("from_email", from_email)),
            text=_optional_str("text", kwargs.get("text")),
            html=_optional_str("html", kwargs.get("html")),
            cc=tuple(str(a) for a in _address_list("cc", kwargs.get("cc"))),
            bcc=tuple(str(a) for a in _address_list("bcc", kwargs.get("bcc"))),
            reply_to=tuple(str(a) for a in _address_list("reply_to", kwargs.get("reply_to"))),
            headers=_check_headers(kwargs.get("headers")),
            attachments=_attachments_from_json(kwargs.get("attachments")),
        )

    @property
    def recipients(self) -> tuple[str, ...]:
        """Envelope recipients: bare addresses of to, cc and bcc, each once, in order."""
        every = (*self.to, *self.cc, *self.bcc)
        return _unique_addr_specs(_parse_address("recipients", a) for a in every)

    @property
    def envelope_from(self) -> str:
        """The bare address of ``from_email``, for MAIL FROM."""
        return _parse_address("from_email", self.from_email).addr_spec

    @property
    def needs_smtputf8(self) -> bool:
        """True if an address has a non-ASCII local part, which only SMTPUTF8 can carry."""
        every = (self.from_email, *self.to, *self.cc, *self.bcc, *self.reply_to)
        return any(not _parse_address("address", a).username.isascii() for a in every)

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


def _set_body(part: EmailMessage, content: str, subtype: str) -> None:
    # Left to itself the email package picks 7bit for short ASCII lines and otherwise the
    # shorter of quoted-printable and base64; control characters are forced into
    # quoted-printable so that no byte on the wire needs explaining.
    cte = "quoted-printable" if _BODY_CONTROL.search(content) else None
    part.set_content(content, subtype=subtype, charset="utf-8", cte=cte)


def _new_part(policy: Policy) -> EmailMessage:
    # EmailMessage rather than MIMEPart because attach() wants the parent's own type, as
    # the email package's add_attachment() does; build_message strips the MIME-Version
    # that EmailMessage.set_content() adds, as it belongs at the top level only.
    return EmailMessage(policy=policy)


def _file_part(attachment: Attachment, policy: Policy) -> EmailMessage:
    part = _new_part(policy)
    maintype, _, subtype = (attachment.mimetype or "application/octet-stream").partition("/")
    inline = attachment.content_id is not None
    part.set_content(
        attachment.content,
        maintype=maintype,
        subtype=subtype,
        disposition="inline" if inline else "attachment",
        filename=attachment.filename,
    )
    if inline:
        part["Content-ID"] = _VerbatimHeader("Content-ID", f"<{attachment.content_id}>")
    return part


def _fill_html(part: EmailMessage, html: str, inline: list[Attachment], policy: Policy) -> None:
    _set_body(part, html, "html")
    if inline:
        part.make_related()
        for attachment in inline:
            part.attach(_file_part(attachment, policy))


def build_message(payload: MailPayload, *, message_id_domain: str | None = None) -> EmailMessage:
    """Build the MIME message for a validated payload.

    Structure: a single text/plain or text/html part; text with html as
    multipart/alternative; inline parts in multipart/related around the HTML; with other
    attachments, multipart/mixed outermost. Bcc never appears in the headers.

    Args:
        payload: The validated payload.
        message_id_domain: Domain for a generated Message-ID; defaults to the sender's.

    Returns:
        The message, with policy :data:`email.policy.SMTP` (or
        :data:`email.policy.SMTPUTF8` when :attr:`MailPayload.needs_smtputf8`), both with
        ``cte_type="7bit"``. Date and Message-ID are added unless the payload's headers
        give them.

    Raises:
        ValueError: ``message_id_domain`` is not a valid domain name.
    """
    policy = _POLICY_UTF8 if payload.needs_smtputf8 else _POLICY
    sender = _parse_address("from_email", payload.from_email)
    try:
        id_domain = _ascii_domain(message_id_domain or sender.domain)
    except ValueError as exc:
        raise ValueError(f"message_id_domain: {exc}") from None

    msg = EmailMessage(policy=policy)
    msg["From"] = payload.from_email
    # Without To, some spam filters mark the message down: say that the list is hidden.
    msg["To"] = ", ".join(payload.to) if payload.to else "undisclosed-recipients:;"
    if payload.cc:
        msg["Cc"] = ", ".join(payload.cc)
    if payload.reply_to:
        msg["Reply-To"] = ", ".join(payload.reply_to)
    msg["Subject"] = payload.subject
    msg["Date"] = payload.header("Date") or format_datetime(datetime.now().astimezone())
    msg["Message-ID"] = payload.header("Message-ID") or make_msgid(domain=id_domain)
    for name, value in payload.headers:
        if name.lower() in {"date", "message-id"}:
            continue
        if value.isascii() and name.lower() not in {"sender", "orig-date"}:
            msg[name] = _VerbatimHeader(name, value)
        else:
            msg[name] = value

    inline = [a for a in payload.attachments if a.content_id is not None]
    files = [a for a in payload.attachments if a.content_id is None]
    if payload.text is not None:
        _set_body(msg, payload.text, "plain")
        if payload.html is not None:
            msg.make_alternative()
            html_part = _new_part(policy)
            _fill_html(html_part, payload.html, inline, policy)
            msg.attach(html_part)
    else:
        assert payload.html is not None  # MailPayload requires text or html
        _fill_html(msg, payload.html, inline, policy)
    if files:
        msg.make_mixed()
        for attachment in files:
            msg.attach(_file_part(attachment, policy))
    for part in msg.walk():
        if part is not msg:
            del part["MIME-Version"]
    return msg


def message_bytes(msg: EmailMessage) -> bytes:
    """Serialise ``msg`` for DATA: CRLF line endings, 7-bit bodies (no 8BITMIME needed).

    Headers are ASCII unless the message was built for SMTPUTF8. Dot-stuffing is left to
    the SMTP layer.
    """
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


# -- send_message -------------------------------------------------------------------------


def _header_block(data: bytes) -> EmailMessage:
    """Parse only the header section: summaries and checks need no body."""
    match = _BLANK_LINE.search(data)
    block = data[: match.start()] if match else data
    parser = BytesParser(_class=EmailMessage, policy=email_policy.default)
    return parser.parsebytes(block + b"\r\n", headersonly=True)


def _check_raw(name: str, data: object) -> bytes:
    if not isinstance(data, bytes):
        _fail(name, f"must be bytes, got {_type_name(data)}")
    if not data.strip():
        _fail(name, "the message is empty")
    if len(data) > MAX_MESSAGE_BYTES:
        _fail(name, f"the message is {len(data)} bytes, above the {MAX_MESSAGE_BYTES} limit")
    headers = _header_block(data)
    if not headers.keys():
        _fail(name, "not an RFC 5322 message: it must start with 'Name: value' header lines")
    if "bcc" in headers or "resent-bcc" in headers:
        _fail(
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
            sender = _parse_address("envelope_from", self.envelope_from)
            object.__setattr__(self, "envelope_from", sender.addr_spec)
        recipients = _unique_addr_specs(_address_list("recipients", self.recipients))
        if not recipients:
            _fail("recipients", "at least one recipient is required")
        object.__setattr__(self, "recipients", recipients)

    @classmethod
    def from_task_kwargs(cls, kwargs: Mapping[str, object]) -> RawPayload:
        """Validate ``send_message`` keyword arguments (JSON values) into a payload.

        Args:
            kwargs: ``raw_b64`` (the message, base64), ``envelope_from`` (an address, or
                ``""`` for the null sender), ``recipients`` (an address or a list), and
                optionally ``profile`` and ``idempotency_key``, which are checked and left
                to the task.

        Returns:
            The validated payload.

        Raises:
            InvalidMessageError: a field is missing, unknown or invalid; ``field`` names it.
        """
        _check_fields(kwargs, (*RAW_FIELDS, *TASK_OPTIONS))
        _task_options(kwargs)
        message = _check_raw("raw_b64", _decode_base64("raw_b64", kwargs.get("raw_b64")))
        hint = ' (use "" for the null sender)'
        envelope_from = _required_str("envelope_from", kwargs.get("envelope_from"), hint)
        recipients = _address_list("recipients", kwargs.get("recipients"))
        if not recipients:
            _fail("recipients", "required: at least one recipient address")
        return cls(
            message=message,
            envelope_from=envelope_from,
            recipients=tuple(a.addr_spec for a in recipients),
        )

    @property
    def message_id(self) -> str | None:
        """The Message-ID header, or None if the message has none."""
        value = _header_block(self.message).get("Message-ID")
        return str(value).strip() if value is not None else None

    @property
    def subject(self) -> str | None:
        """The decoded Subject header, or None if the message has none."""
        value = _header_block(self.message).get("Subject")
        return str(value) if value is not None else None

    @property
    def needs_smtputf8(self) -> bool:
        """True if an envelope address or a header holds non-ASCII (raw UTF-8) text."""
        match = _BLANK_LINE.search(self.message)
        headers = self.message[: match.start()] if match else self.message
        addresses = (self.envelope_from, *self.recipients)
        return not headers.isascii() or not all(a.partition("@")[0].isascii() for a in addresses)

    @property
    def needs_8bitmime(self) -> bool:
        """True if the message has bytes above 127, which only 8BITMIME lets through."""
        return not self.message.isascii()

    def summary(self) -> dict[str, object]:
        """A small JSON-safe description for logs and dead-letter records (no content).

        Attachments are found by parsing the whole message, so this costs a MIME parse.
        """
        parsed = BytesParser(_class=EmailMessage, policy=email_policy.default).parsebytes(
            self.message
        )
        attachments: list[dict[str, object]] = []
        for part in parsed.walk():
            if part.is_multipart() or part.get_content_disposition() is None:
                continue
            if part is parsed:
                continue
            content = part.get_payload(decode=True)
            content_id = part.get("Content-ID")
            attachments.append(
                {
                    "filename": part.get_filename(),
                    "mimetype": part.get_content_type(),
                    "size": len(content) if isinstance(content, bytes) else 0,
                    "content_id": str(content_id).strip().strip("<>") if content_id else None,
                }
            )
        return {
            "kind": "raw",
            "from": self.envelope_from,
            "recipients": list(self.recipients),
            "subject": self.subject,
            "message_id": self.message_id,
            "size": len(self.message),
            "attachments": attachments,
        }
