"""Hostile input at scale: every ``send_mail`` and ``send_message`` field, generated.

Each payload either fails validation or building with :class:`InvalidMessageError`, or
is delivered over SMTP (a real aiosmtpd server, a held-open :class:`SMTPSession`) and,
parsed there, carries exactly the intended header fields — names in order, decoded
values, addresses — the intended bodies and attachments, and the intended envelope.
Never another exception, never an extra header.

``make test`` runs a small profile (a few hundred payloads). The long run sets the
examples of every property here, in tests/contrib/test_fuzz_entry_points.py and in
tests/smtp/test_fuzz_server.py (there, sessions) with one variable::

    MAILWORKER_FUZZ_EXAMPLES=10000 pytest -n 2 --timeout=0 --hypothesis-show-statistics \\
        tests/message/test_fuzz_payloads.py tests/contrib/test_fuzz_entry_points.py \\
        tests/smtp/test_fuzz_server.py
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from email import policy
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.parser import Parser
from typing import Any

import idna
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mailworker import Profile, SMTPSession
from mailworker.errors import InvalidMessageError
from mailworker.message import (
    MAIL_FIELDS,
    MailPayload,
    RawPayload,
    build_message,
    message_bytes,
)
from tests.servers import SMTPServer


def fuzz_examples(default: int) -> int:
    """Examples per property: ``MAILWORKER_FUZZ_EXAMPLES`` for the long run, else ``default``."""
    return int(os.environ.get("MAILWORKER_FUZZ_EXAMPLES") or default)


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings of a property: ``examples`` in ``make test`` (or
    ``MAILWORKER_FUZZ_EXAMPLES``), no per-example deadline (a delivery takes a round
    trip), no health check that the size or speed of these examples trips."""
    return settings(
        max_examples=fuzz_examples(examples),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


#: The sender when a payload has no from_email (the worker's MAILWORKER_DEFAULT_FROM).
DEFAULT_FROM = "Shop <shop@example.com>"
#: Header fields every built message has, besides the caller's and the MIME ones.
MIME_FIELDS = frozenset({"mime-version", "content-type", "content-transfer-encoding"})

# -- strategies -----------------------------------------------------------------------------


def mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    """``valid`` nine times in ten, else ``hostile``: a payload has many fields, and
    most examples should get past validation to be delivered and read back. (Not
    ``one_of(valid, ..., valid, hostile)``: one_of drops repeated strategies.)"""
    return st.integers(0, 9).flatmap(lambda n: hostile if n == 9 else valid)


#: Header text that is tricky but legal: encoded-word syntax (which decodes to CR/LF and
#: new fields), quoting and specials, folding whitespace, non-ASCII, Unicode spaces, and
#: words too long for a line.
_TRICKY_PIECES = [
    "=?", "?=", "=?utf-8?q?", "=?utf-8?b?", "=?iso-8859-1?q?", "=0D=0A", "=0A", "=00",
    "=?utf-8?q?Hi=0D=0ABcc:_evil@attacker.example?=",
    "=?utf-8?b?DQpCY2M6IGV2aWxAYXR0YWNrZXIuZXhhbXBsZQ==?=",
    "Bcc: evil@attacker.example", "Content-Type: text/html", "\t", " ", "  ",
    '"', "\\", "<", ">", "(", ")", ",", ";", ":", "@", ".", "[", "]", "é", "東京", "Ω",
    "\u00a0", "\ufeff", "\u200b", "😀", "x", "Hello", "ann@example.org", "x" * 80, "y" * 1000,
]  # fmt: skip
#: What no header may hold: CR, LF, other controls, Unicode line separators, a surrogate.
_ILLEGAL_PIECES = ["\r\n", "\n", "\r", "\r\n\r\n", "\x00", "\x07", "\x1b", "\x7f", "\x85",
                   "\u2028", "\u2029", "\ud800"]  # fmt: skip
tricky_text = st.one_of(
    st.lists(st.sampled_from(_TRICKY_PIECES), max_size=10).map("".join),
    st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp")), max_size=30),
)
hostile_text = mostly(
    tricky_text,
    st.one_of(
        st.lists(st.sampled_from(_TRICKY_PIECES + _ILLEGAL_PIECES), max_size=10).map("".join),
        st.text(max_size=30),
    ),
)
#: Local parts: ordinary and non-ASCII (SMTPUTF8).
_LOCALS = st.one_of(
    st.sampled_from(["ann", "a.b", "o'neil", "x+tag", "First.Last", "zoë", "用户", "a" * 64]),
    st.text("abcXYZ019!#$%&'*+-/=?^_`{|}~é", min_size=1, max_size=8),
)
#: Local parts that need quoting, are empty or too long, or anything at all.
_HOSTILE_LOCALS = st.one_of(
    _LOCALS,
    st.sampled_from(["a" * 65, "", ".a", "a.", "a..b", "a b", '"q"', "a(b", "a\\b", "a@b"]),
    st.text(max_size=6),
)
#: Domains: ASCII, upper case, IDN (U- and A-labels), literals.
_DOMAINS = st.sampled_from(
    ["example.org", "EXAMPLE.com", "mail.example.net", "bücher.example", "ünï.example",
     "xn--bcher-kva.example", "straße.de", "例え.テスト", "[127.0.0.1]", "[IPv6:::1]",
     "x" * 63 + ".com"]
)  # fmt: skip
#: Domains that are not valid, and valid ones.
_HOSTILE_DOMAINS = st.one_of(
    _DOMAINS,
    st.sampled_from(
        ["[300.1.1.1]", "-bad.example", "a..b", "", "ex ample.org", "exa\nmple.org",
         "x" * 64 + ".com", "example.org>", "a_b.example"]
    ),
)  # fmt: skip


@dataclass(frozen=True)
class Addr:
    """A generated address: the text given, and what a reader must find if it is valid.

    ``spec`` is the addr-spec expected on the wire (ASCII domain unless the local part
    needs SMTPUTF8) or None for text whose meaning the generator cannot predict;
    ``name`` is the expected display name, or None when not predictable.
    """

    text: str
    spec: str | None
    name: str | None


def _expected_spec(local: str, domain: str) -> str | None:
    """The addr-spec a reader must see for ``local@domain``, computed independently of
    mailworker (None where the domain is not a plain name to encode)."""
    if not local.isascii() or domain.isascii():
        return f"{local}@{domain}"
    try:
        return f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}"
    except idna.IDNAError:
        return None


@st.composite
def addresses(draw: st.DrawFn, *, legal: bool = False) -> Addr:
    """An address as a caller may write it: bare, with a display name (plain or
    quoted); or, one time in ten unless ``legal``, made of hostile parts or text."""
    hostile = not legal and draw(st.integers(0, 9)) == 9
    local = draw(_HOSTILE_LOCALS if hostile else _LOCALS)
    domain = draw(_HOSTILE_DOMAINS if hostile else _DOMAINS)
    spec = f"{local}@{domain}"
    expected = _expected_spec(local, domain)
    form = draw(st.sampled_from(["bare", "name", "quoted", "junk" if hostile else "name"]))
    if form == "bare":
        return Addr(spec, expected, "")
    if form == "junk":
        return Addr(draw(hostile_text), None, None)
    name = draw(hostile_text if hostile else tricky_text)
    if form == "quoted":
        escaped = name.replace("\\", "\\\\").replace('"', '\\"')
        return Addr(f'"{escaped}" <{spec}>', expected, name)
    stripped = name.strip()
    unpredictable = len(stripped) >= 2 and stripped[0] == stripped[-1] == '"'
    return Addr(f"{name} <{spec}>", expected, None if unpredictable else stripped)


@st.composite
def address_fields(
    draw: st.DrawFn, *, legal: bool = False
) -> tuple[str | list[str] | None, tuple[Addr, ...]]:
    """An address field as given (absent, one address as a string, or a list) and the
    generated addresses in it."""
    kind = draw(st.sampled_from(["absent", "one", "list", "list"]))
    if kind == "absent":
        return None, ()
    if kind == "one":
        one = draw(addresses(legal=legal))
        return one.text, (one,)
    found = tuple(draw(st.lists(addresses(legal=legal), min_size=1, max_size=3)))
    return [a.text for a in found], found


#: Header names with rules of their own (reserved, or checked when given).
_RESERVED_NAMES = frozenset(
    {"from", "to", "cc", "bcc", "reply-to", "subject", "mime-version", "return-path",
     "date", "message-id", "sender", "orig-date", "list-unsubscribe", "list-unsubscribe-post"}
)  # fmt: skip
#: Header names with no rules of their own: ordinary ones, and any token.
_PLAIN_HEADER_NAMES = st.one_of(
    st.sampled_from(
        ["X-Campaign", "X-Note", "List-Id", "Keywords", "Comments", "In-Reply-To", "References",
         "x-campaign"]
    ),
    st.text(
        st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
        min_size=1,
        max_size=12,
    ).filter(
        lambda n: n.lower() not in _RESERVED_NAMES
        and not n.lower().startswith(("content-", "resent-"))
    ),
)  # fmt: skip
#: Header names: plain, checked (Date, Message-ID, Sender, List-Unsubscribe); or reserved
#: for arguments or the builder, or not a name (colon, space, CR/LF, non-ASCII, too long).
HEADER_NAMES = mostly(
    st.one_of(
        _PLAIN_HEADER_NAMES,
        st.sampled_from(
            ["Date", "Message-ID", "Sender", "Orig-Date", "List-Unsubscribe",
             "List-Unsubscribe-Post"]
        ),
    ),
    st.sampled_from(
        ["Bcc", "To", "Subject", "Resent-Bcc", "Content-Type", "MIME-Version", "Return-Path",
         "X-Bad:Name", "X Bad", "X-Bad\r\nBcc", "X-Ünï", "", "X-" + "a" * 80]
    ),
)  # fmt: skip
HEADER_VALUES = st.one_of(
    hostile_text,
    st.sampled_from(
        ["Tue, 01 Jul 2025 10:00:00 +0000", "not a date", "<fixed-1@example.com>",
         " <spaced@example.com> ", "<bad", "Ops <ops@example.com>", "<mailto:u@x.org>",
         "<https://example.com/u?id=1>, <mailto:u@example.com>", "<http://example.com/u>",
         "List-Unsubscribe=One-Click"]
    ),
)  # fmt: skip
headers_field = st.one_of(
    st.none(),
    st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=3),
    st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=2),
)
#: Legal extra headers: plain names, any legal text without a word too long to fold.
legal_headers_field = st.one_of(
    st.none(),
    st.dictionaries(
        _PLAIN_HEADER_NAMES,
        tricky_text.filter(lambda v: not v.isascii() or max(map(len, v.split()), default=0) < 900),
        max_size=3,
    ).filter(lambda h: len({n.lower() for n in h}) == len(h)),
)
#: Bodies: any text (controls, lone CR/LF, leading dots, long lines), or none.
_BODY_PIECES = ["\r\n", "\n", "\r", ".", "..", "\r\n.\r\n", "\x00", "\x0c", "\u2028", "é", " "]
any_body = st.one_of(
    st.text(max_size=60),
    st.lists(st.sampled_from([*_BODY_PIECES, "x" * 1200, "word"]), max_size=12).map("".join),
)
bodies = st.integers(0, 3).flatmap(lambda n: st.none() if n == 3 else any_body)
#: Filenames with no control character, path or emptiness, of legal length.
_LEGAL_FILENAMES = st.one_of(
    st.sampled_from(["report.pdf", "logo.png", "data.csv", "x.tar.gz", "a.eml", "noext"]),
    # Any tricky text made a file name: no path separator, not blank, not too long.
    tricky_text.map(lambda name: re.sub(r"[/\\]", "_", name)[:250] + ".txt"),
)
_FILENAMES = mostly(_LEGAL_FILENAMES, hostile_text)
_LEGAL_MIMETYPES = st.one_of(
    st.none(),
    st.sampled_from(["image/png", "application/pdf", "TEXT/CSV", "text/plain", "text/html"]),
)
_MIMETYPES = mostly(
    _LEGAL_MIMETYPES,
    st.sampled_from(
        ["message/rfc822", "multipart/mixed", "bad", "a/b;c=d", "image/png\r\nX-Evil: 1", ""]
    ),
)
_CONTENT_IDS = mostly(
    st.one_of(st.none(), st.sampled_from(["logo@example", "<logo@example>", "part.1"])),
    st.sampled_from(["a b", "x\r\ny", "", "é@x", "c" * 251, "<a>b>"]),
)
attachment_items = st.fixed_dictionaries(
    {"filename": _FILENAMES, "content": st.binary(max_size=300)},
    optional={"mimetype": _MIMETYPES, "content_id": _CONTENT_IDS},
).map(lambda a: {**a, "content": base64.b64encode(a["content"]).decode("ascii")})
attachments_field = mostly(
    st.one_of(st.none(), st.lists(attachment_items, max_size=3)),
    st.sampled_from([[{"filename": "bad.bin", "content": "not base64!"}], "x.pdf", [1]]),
)


#: List-Unsubscribe URIs (https and mailto); and ones that are refused: another scheme,
#: not a URI, bracketed, an encoded-word, CR/LF, non-ASCII, not a string.
_LEGAL_URIS = st.lists(
    st.sampled_from(
        ["https://example.com/unsub?u=42", "mailto:unsub@example.com?subject=stop",
         "https://xn--bcher-kva.example/u/%C3%A9", "MAILTO:U@EXAMPLE.COM"]
    ),
    max_size=2,
)  # fmt: skip
_URIS = mostly(
    st.one_of(_LEGAL_URIS, _LEGAL_URIS.map(lambda uris: uris[0] if uris else None)),
    st.one_of(
        st.sampled_from(
            ["http://example.com/u", "javascript:alert(1)", "https://x.example/a b",
             "<https://x.example>", "https://x.example/=?utf-8?q?x?=", "mailto:nobody",
             "https://x.example/\r\nBcc: evil@attacker.example", "https://例え.jp/", "", 42]
        ),
        st.lists(hostile_text, min_size=1, max_size=2),
    ),
)  # fmt: skip


@st.composite
def legal_attachments(draw: st.DrawFn, *, inline: bool) -> list[dict[str, str]] | None:
    """Attachments that are valid: legal names and types, unique ids, inline parts only
    beside an HTML body."""
    items = []
    for i in range(draw(st.integers(0, 3))):
        item = {
            "filename": draw(_LEGAL_FILENAMES),
            "content": base64.b64encode(draw(st.binary(max_size=300))).decode("ascii"),
        }
        mimetype = draw(_LEGAL_MIMETYPES)
        if mimetype is not None:
            item["mimetype"] = mimetype
        if inline and draw(st.booleans()):
            item["content_id"] = f"part{i}@example"
        items.append(item)
    return items or None


@dataclass
class MailCase:
    """Generated ``send_mail`` kwargs and the generator's knowledge of the addresses."""

    kwargs: dict[str, Any]
    addresses: dict[str, tuple[Addr, ...]] = field(default_factory=dict)


@st.composite
def mail_cases(draw: st.DrawFn, *, legal: bool = False) -> MailCase:
    """``send_mail`` keyword arguments, every field drawn (None fields left out); with
    ``legal``, only values the schema allows."""
    case = MailCase({})
    for name in ("to", "cc", "bcc", "reply_to"):
        value, known = draw(address_fields(legal=legal))
        case.addresses[name] = known
        case.kwargs[name] = value
    if legal and not any(case.addresses[n] for n in ("to", "cc", "bcc")):
        one = draw(addresses(legal=True))
        case.kwargs["to"], case.addresses["to"] = one.text, (one,)
    case.kwargs["subject"] = draw(tricky_text if legal else hostile_text)
    case.kwargs["text"] = draw(any_body if legal else bodies)
    html = draw(bodies)
    case.kwargs["html"] = None if html is None else f"<p>{html}</p>"
    sender = draw(st.one_of(st.none(), addresses(legal=legal)))
    case.addresses["from_email"] = (sender,) if sender is not None else ()
    case.kwargs["from_email"] = sender.text if sender is not None else None
    if legal:
        case.kwargs["headers"] = draw(legal_headers_field)
        case.kwargs["attachments"] = draw(legal_attachments(inline=html is not None))
    else:
        case.kwargs["headers"] = draw(headers_field)
        case.kwargs["attachments"] = draw(attachments_field)
    if "list_unsubscribe" in MAIL_FIELDS:  # List-Unsubscribe (RFC 2369, RFC 8058)
        uris = draw(_LEGAL_URIS if legal else _URIS)
        case.kwargs["list_unsubscribe"] = uris
        https = any(u.lower().startswith("https:") for u in uris) if legal else True
        case.kwargs["list_unsubscribe_post"] = draw(
            st.booleans().map(lambda post: post and https)
            if legal
            else mostly(st.one_of(st.none(), st.booleans()), st.just("yes"))
        )
    case.kwargs = {k: v for k, v in case.kwargs.items() if v is not None}
    return case


# -- what a reader sees -------------------------------------------------------------------


def read(data: bytes) -> EmailMessage:
    """The message as a reader sees it (UTF-8: an SMTPUTF8 message has UTF-8 headers)."""
    message = Parser(policy=policy.default).parsestr(data.decode("utf-8"))
    assert isinstance(message, EmailMessage)
    return message


_WSP = re.compile(r"\s+")


def same_text(got: str, want: str) -> bool:
    """Equal but for runs of whitespace, which folding and unfolding may change."""
    return _WSP.sub(" ", got).strip() == _WSP.sub(" ", want).strip()


def body_text(text: str) -> str:
    """``text`` as it reads back: line endings as LF, ending with one."""
    text = re.sub(r"\r\n|\r", "\n", text)
    return text if text.endswith("\n") else text + "\n"


def _spec(text: str) -> str:
    """The addr-spec of a validated address (``a@b`` or ``Name <a@b>``)."""
    return text[text.rindex("<") + 1 : -1] if text.endswith(">") else text


def check_addresses(
    got: EmailMessage, name: str, intended: tuple[str, ...], known: tuple[Addr, ...]
) -> None:
    """The field ``name`` holds exactly the intended addresses: the payload's, and where
    the generator knows them, the addr-specs and display names it made."""
    pairs = [(a.display_name, a.addr_spec) for a in got[name].addresses]
    assert [s.lower() for _, s in pairs] == [_spec(t).lower() for t in intended], (name, pairs)
    if len(known) != len(pairs):
        return
    for (display, spec), addr in zip(pairs, known, strict=True):
        if addr.spec is not None:
            local, _, domain = addr.spec.rpartition("@")
            got_local, _, got_domain = spec.rpartition("@")
            assert (got_local, got_domain.lower()) == (local, domain.lower()), (name, spec, addr)
        if addr.name is not None:
            # Python's address parser reads a space between adjacent encoded-words, which
            # RFC 2047 readers drop: display names are compared without whitespace.
            assert _WSP.sub("", display) == _WSP.sub("", addr.name), (name, display, addr)


def intended_fields(payload: MailPayload) -> list[str]:
    """The non-MIME header field names the message must have, in order."""
    names = ["From", "To"]
    names += ["Cc"] if payload.cc else []
    names += ["Reply-To"] if payload.reply_to else []
    names += ["Subject", "Date", "Message-ID"]
    names += ["List-Unsubscribe"] if getattr(payload, "list_unsubscribe", ()) else []
    names += ["List-Unsubscribe-Post"] if getattr(payload, "list_unsubscribe_post", False) else []
    names += [n for n, _ in payload.headers if n.lower() not in {"date", "message-id"}]
    return names


def check_mail(got: EmailMessage, payload: MailPayload, case: MailCase) -> None:
    """``got`` is exactly the message ``payload`` asks for."""
    # Header fields: exactly the intended names, in order, and the MIME ones.
    names = [n for n in got if n.lower() not in MIME_FIELDS]
    assert names == intended_fields(payload), got.keys()
    assert {"mime-version", "content-type"} <= {n.lower() for n in got}
    assert sum(n.lower() in MIME_FIELDS for n in got) <= 3, got.keys()
    # Values.
    assert same_text(str(got["Subject"]), payload.subject)
    check_addresses(got, "From", (payload.from_email,), case.addresses["from_email"])
    check_addresses(got, "To", payload.to, case.addresses["to"])
    for name, field_name in (("Cc", "cc"), ("Reply-To", "reply_to")):
        if getattr(payload, field_name):
            check_addresses(got, name, getattr(payload, field_name), case.addresses[field_name])
    uris = getattr(payload, "list_unsubscribe", ())
    if uris:
        assert re.findall(r"<([^<>]*)>", str(got["List-Unsubscribe"])) == list(uris)
    if getattr(payload, "list_unsubscribe_post", False):
        assert str(got["List-Unsubscribe-Post"]) == "List-Unsubscribe=One-Click"
    for name, value in payload.headers:
        lower = name.lower()
        if lower == "sender":
            check_addresses(got, name, (value,), ())
        elif lower == "message-id":
            assert str(got[name]).strip() == value
        else:
            assert same_text(str(got[name]), value), (name, str(got[name]), value)
    check_parts(got, payload)


def check_parts(got: EmailMessage, payload: MailPayload) -> None:
    """The bodies and attachments are the intended ones, in order, with their bytes."""
    bodies: dict[str, list[str]] = {"plain": [], "html": []}
    files = []
    for part in got.walk():
        if part.is_multipart():
            continue
        assert isinstance(part, EmailMessage)
        if part.get_content_disposition() is None:
            assert part.get_content_maintype() == "text", part.get_content_type()
            bodies[part.get_content_subtype()].append(part.get_content())
        else:
            content_id = part["Content-ID"]
            files.append(
                (
                    part.get_filename(),
                    part.get_payload(decode=True),
                    part.get_content_type(),
                    str(content_id) if content_id is not None else None,
                )
            )
    expected_bodies = {
        "plain": [body_text(payload.text)] if payload.text is not None else [],
        "html": [body_text(payload.html)] if payload.html is not None else [],
    }
    assert {k: [body_text(b) for b in v] for k, v in bodies.items()} == expected_bodies
    # Inline parts sit beside the HTML, before the other attachments.
    inline = [a for a in payload.attachments if a.content_id is not None]
    others = [a for a in payload.attachments if a.content_id is None]
    expected_files = [
        # The stdlib's get_filename() strips the name it decodes; the wire has it whole.
        (a.filename.strip(), a.content, a.mimetype, f"<{a.content_id}>" if a.content_id else None)
        for a in (*inline, *others)
    ]
    assert files == expected_files


def field_kind(name: str) -> str:
    """``to[1]`` -> ``to``, ``attachments[0].content`` -> ``attachments``: for statistics."""
    return re.split(r"[\[.]", name, maxsplit=1)[0]


# -- the real server ----------------------------------------------------------------------


@dataclass
class Delivery:
    """An aiosmtpd server and a held-open session to it."""

    server: SMTPServer
    session: SMTPSession

    def deliver(self, sender: str, recipients: tuple[str, ...], data: bytes) -> bytes:
        """Send ``data``; return the bytes the server received (after checking the
        envelope it saw)."""
        handler = self.server.handler
        before = len(handler.messages)
        result = self.session.send(sender, list(recipients), data)
        assert result.accepted == list(recipients)
        received = handler.messages[before]
        # aiosmtpd records the null sender as it was written.
        assert (received.mail_from, received.rcpt_tos) == (sender or "<>", recipients)
        if before > 500:
            handler.clear()  # the long run sends thousands
        return received.content


@pytest.fixture(scope="module")
def delivery() -> Iterator[Delivery]:
    """One server and one session for all the examples of this module."""
    with SMTPServer() as server:
        session = SMTPSession(Profile.from_url(f"smtp://127.0.0.1:{server.port}?timeout=10"))
        try:
            yield Delivery(server, session)
        finally:
            session.close()


def wire_form(data: bytes) -> bytes:
    """What a correct client delivers for ``data``: CRLF line endings only, ending in
    CRLF (written here, not taken from mailworker.smtp.body)."""
    out = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return out if out.endswith(b"\r\n") else out + b"\r\n"


# -- properties ---------------------------------------------------------------------------


def round_trip(delivery: Delivery, case: MailCase) -> bool:
    """Build ``case``; if valid, check the bytes and what the server received, read
    back. Returns whether it was valid."""
    try:
        payload = MailPayload.from_task_kwargs(case.kwargs, default_from=DEFAULT_FROM)
        data = message_bytes(build_message(payload))
    except InvalidMessageError as exc:
        event("invalid", field_kind(exc.field))
        return False
    event("delivered")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998  # RFC 5322 2.1.1
    check_mail(read(data), payload, case)
    received = delivery.deliver(payload.envelope_from, payload.recipients, data)
    assert received == wire_form(data)
    check_mail(read(received), payload, case)
    return True


class TestSendMail:
    """Every send_mail field at once, hostile text everywhere."""

    @fuzz_settings(100)
    @given(case=mail_cases())
    def test_exact_fields_or_invalid(self, delivery: Delivery, case: MailCase) -> None:
        """A payload is InvalidMessageError, or it reaches the server and reads back there
        with exactly the intended fields, values, bodies, attachments and envelope."""
        round_trip(delivery, case)

    @fuzz_settings(40)
    @given(case=mail_cases(legal=True))
    def test_legal_payloads_are_delivered(self, delivery: Delivery, case: MailCase) -> None:
        """A payload the schema allows — tricky but legal text everywhere — is never
        refused: it is delivered and reads back as intended."""
        assert round_trip(delivery, case)


#: Header lines of raw messages: ordinary, Bcc (refused), 8-bit, folded, long, broken.
_RAW_HEADER_LINES = mostly(
    st.sampled_from(
        [b"From: app@example.com", b"To: ann@example.org", b"Subject: hello",
         b"Subject: =?utf-8?q?Hi=0D=0ABcc:_evil@attacker.example?=", b"X-Note: caf\xc3\xa9",
         b"X-Latin1: caf\xe9", b"X-Folded: a\r\n\tb", b"X-Long: " + b"z" * 990,
         b"X-Nul: a\x00b", b"Message-ID: <m@example.com>", b"X-Dots: ..."]
    ),
    # Refused (Bcc, Resent-Bcc, a line over 998 octets) or out of place.
    st.sampled_from(
        [b"Bcc: evil@attacker.example", b"BCC:evil@attacker.example", b"Bcc : obs@example.org",
         b"Resent-Bcc: x@example.org", b"X-Bare-CR: a\rBcc: cr@attacker.example",
         b"X-Too-Long: " + b"z" * 990, b"no colon here", b" leading space"]
    ),
)  # fmt: skip
_RAW_SEPARATORS = st.sampled_from([b"\r\n", b"\n", b"\r"])
_RAW_BODY = st.lists(
    st.sampled_from(
        [b"body", b".", b"..", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\r.\r", b"\x00", b"\xff",
         b"caf\xc3\xa9", b"\r", b"\n", b"\r\n", b"w" * 900]
    ),
    max_size=10,
).map(b"".join)  # fmt: skip


@st.composite
def raw_messages(draw: st.DrawFn) -> bytes:
    """A message as a caller may have built it: header lines and a body, joined with
    any line ending; sometimes a built send_mail message, sometimes arbitrary bytes."""
    kind = draw(st.sampled_from(["lines"] * 6 + ["built", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=80))
    if kind == "built":
        subject = draw(hostile_text.filter(lambda s: "\r" not in s and "\n" not in s))
        try:
            payload = MailPayload(
                to=("ann@example.org",),
                subject=subject,
                from_email="a@example.com",
                text="x",
                headers=(("Message-ID", "<fixed@example.com>"),),  # make_msgid is random
            )
            return message_bytes(build_message(payload))
        except InvalidMessageError:
            return b"Subject: built\r\n\r\nfallback\r\n"
    eol = draw(_RAW_SEPARATORS)
    lines = draw(st.lists(_RAW_HEADER_LINES, min_size=1, max_size=6))
    blank = draw(st.sampled_from([eol + eol, b"\r\n\r\n", b"\n\r\n", b""]))
    return eol.join(lines) + blank + draw(_RAW_BODY)


#: Envelope addresses: ordinary, null sender, non-ASCII, with a display name, hostile.
_ENVELOPE_ADDRESSES = mostly(
    st.one_of(
        st.sampled_from(
            ["app@example.com", "", "zoë@example.org", "a@bücher.example",
             "Ann <ann@example.org>", "ann@example.org"]
        ),
        addresses(legal=True).map(lambda a: a.text),
    ),
    st.one_of(
        st.sampled_from(
            ["a b@example.org", "a@example.org>", "<a@example.org>", "a\x00@example.org",
             "a@example.org\r\nRCPT TO:<x@y>"]
        ),
        addresses().map(lambda a: a.text),
    ),
)  # fmt: skip
raw_cases = st.fixed_dictionaries(
    {
        "raw_b64": mostly(
            raw_messages().map(lambda m: base64.b64encode(m).decode("ascii")),
            st.sampled_from(["not base64!", "", "==", "ab\x00"]),
        ),
        "envelope_from": _ENVELOPE_ADDRESSES,
        "recipients": st.one_of(
            _ENVELOPE_ADDRESSES, st.lists(_ENVELOPE_ADDRESSES, min_size=0, max_size=3)
        ),
    }
)


def header_names(data: bytes) -> list[str]:
    """The header field names a reader finds in ``data``."""
    return (
        Parser(policy=policy.compat32)
        .parsestr(data.decode("utf-8", "surrogateescape"), headersonly=True)
        .keys()
    )


class TestSendMessage:
    """send_message: a prebuilt message and its envelope."""

    @fuzz_settings(100)
    @given(kwargs=raw_cases)
    def test_exact_bytes_or_invalid(self, delivery: Delivery, kwargs: dict[str, Any]) -> None:
        """A payload is InvalidMessageError, or the server receives the caller's message
        byte for byte (CRLF line endings only) with the intended envelope, and a reader
        there finds no Bcc field."""
        try:
            payload = RawPayload.from_task_kwargs(kwargs)
        except InvalidMessageError as exc:
            event("invalid", field_kind(exc.field))
            return
        message = base64.b64decode(kwargs["raw_b64"])
        event("delivered")
        received = delivery.deliver(payload.envelope_from, payload.recipients, payload.message)
        assert received == wire_form(message)
        names = [n.lower() for n in header_names(received)]
        assert "bcc" not in names
        assert "resent-bcc" not in names


def rfc2047_display_name(data: bytes, field_name: str) -> str:
    """The display name of the one address in ``field_name``, decoded as RFC 2047 says
    (whitespace between adjacent encoded-words dropped), from the raw header block."""
    block = data.split(b"\r\n\r\n", 1)[0].decode("utf-8")
    unfolded = re.sub(r"\r\n(?=[ \t])", "", block)
    [value] = [
        line.split(":", 1)[1]
        for line in unfolded.split("\r\n")
        if line.startswith(f"{field_name}:")
    ]
    phrase = value.rpartition("<")[0].strip()
    return str(make_header(decode_header(phrase)))


class TestFoundByFuzzing:
    """Defects the fuzzing found, each pinned by its smallest examples."""

    @pytest.mark.parametrize(
        "filename",
        [
            "=?utf-8?q?a=0D=0AContent-Type:_text=2Fhtml=0D=0A=0D=0Aboom?=",
            "=?utf-8?q?evil=2Fpath.exe?=",
            "=?utf-8?q?invoice.pdf?=",
        ],
    )
    def test_encoded_word_filename(self, filename: str) -> None:
        """An attachment's filename is written literally: no field is added to its part
        (the email package used to decode the encoded-word and write the CR LF), and a
        reader finds exactly that name, not a decoded path or another name."""
        kwargs = {
            "to": "ann@example.org",
            "subject": "s",
            "text": "t",
            "attachments": [{"filename": filename, "content": "aGVsbG8="}],
        }
        payload = MailPayload.from_task_kwargs(kwargs, default_from=DEFAULT_FROM)
        [part] = [p for p in read(message_bytes(build_message(payload))).walk() if p.get_filename()]
        assert part.keys() == ["Content-Type", "Content-Transfer-Encoding", "Content-Disposition"]
        assert part.get_filename() == filename

    @pytest.mark.parametrize("field_name", ["to", "from_email", "reply_to"])
    def test_long_word_in_display_name(self, field_name: str) -> None:
        """A display name with a 1,000-character word is written on lines of at most 998
        octets (it used to go out as one longer line, refused by servers after DATA)."""
        kwargs = {"to": "ann@example.org", "subject": "s", "text": "t"}
        kwargs[field_name] = f"{'y' * 1000} <bob@example.org>"
        payload = MailPayload.from_task_kwargs(kwargs, default_from=DEFAULT_FROM)
        data = message_bytes(build_message(payload))
        assert max(len(line) for line in data.split(b"\r\n")) <= 998
        header = {"to": "To", "from_email": "From", "reply_to": "Reply-To"}[field_name]
        assert rfc2047_display_name(data, header) == "y" * 1000

    @pytest.mark.parametrize(
        "name",
        [
            "Jürgen Müller-Lüdenscheidt, Geschäftsführer GmbH & Co. KG",
            "東京都千代田区丸の内一丁目株式会社",
            "=?utf-8?q?Hi=0D=0ABcc:_evil@attacker.example?=",
        ],
    )
    def test_long_encoded_display_name(self, name: str) -> None:
        """A display name written as several encoded-words is sent (it used to be refused
        as "header injection?", for Python's parser reads a space between the words) and
        an RFC 2047 reader finds exactly the name."""
        kwargs = {"to": f"{name} <ann@example.org>", "subject": "s", "text": "t"}
        payload = MailPayload.from_task_kwargs(kwargs, default_from=DEFAULT_FROM)
        data = message_bytes(build_message(payload))
        assert rfc2047_display_name(data, "To") == name

    def test_overlong_raw_line(self) -> None:
        """A raw message with a 2,000-octet line is InvalidMessageError at validation (it
        used to pass, to be refused by the server after DATA and dead-lettered)."""
        raw = b"Subject: long\r\n\r\n" + b"x" * 2000 + b"\r\n"
        kwargs = {
            "raw_b64": base64.b64encode(raw).decode("ascii"),
            "envelope_from": "app@example.com",
            "recipients": ["ann@example.org"],
        }
        with pytest.raises(InvalidMessageError, match="longer than 998 octets"):
            RawPayload.from_task_kwargs(kwargs)
