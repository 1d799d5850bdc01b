"""Tests for mailworker.message: payload validation and the MIME messages built from it.

Every message is checked the way a receiver sees it: serialised with ``message_bytes`` and
parsed back with the standard library's parser.
"""

from __future__ import annotations

import base64
import email
import json
import re
from datetime import datetime
from email import policy
from email.message import EmailMessage
from email.utils import parsedate_to_datetime
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailworker.errors import InvalidMessageError
from mailworker.message import (
    Attachment,
    MailPayload,
    RawPayload,
    build_message,
    message_bytes,
)
from mailworker.message import payload as message
from mailworker.smtp.envelope import build_envelope, mail_params

SENDER = "Shop <shop@example.com>"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))
PDF = b"%PDF-1.4\n" + bytes(range(256)) * 40


def b64(data: bytes) -> str:
    """Base64 as a JSON producer would send it."""
    return base64.b64encode(data).decode("ascii")


def payload(**kwargs: Any) -> MailPayload:
    """A payload from task kwargs, with a recipient, subject and text body by default."""
    kwargs.setdefault("to", "ann@example.org")
    kwargs.setdefault("subject", "Hello")
    if "text" not in kwargs and "html" not in kwargs:
        kwargs["text"] = "Hi Ann\n"
    return MailPayload.from_task_kwargs(kwargs, default_from=SENDER)


def wire(p: MailPayload, **kwargs: Any) -> bytes:
    """The bytes that would go to DATA."""
    return message_bytes(build_message(p, **kwargs))


def parse(data: bytes) -> EmailMessage:
    """Parse as a receiver would."""
    return cast(EmailMessage, email.message_from_bytes(data, policy=policy.default))


def roundtrip(**kwargs: Any) -> EmailMessage:
    """Build a message from task kwargs and parse its bytes back."""
    return parse(wire(payload(**kwargs)))


def structure(msg: EmailMessage) -> list[str]:
    """Content types in walk order, indented by depth (e.g. ``'  text/plain'``)."""
    lines: list[str] = []

    def visit(part: EmailMessage, depth: int) -> None:
        lines.append("  " * depth + part.get_content_type())
        if part.is_multipart():
            for child in part.iter_parts():
                visit(cast(EmailMessage, child), depth + 1)

    visit(msg, 0)
    return lines


def expected_text(text: str) -> str:
    """What the email package guarantees for a text body: CRLF and CR become LF, and the
    body ends with a line break."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text if text.endswith("\n") else text + "\n"


def received_text(part: EmailMessage) -> str:
    """A text part's decoded content with the wire's CRLF turned back into LF."""
    return cast(str, part.get_content()).replace("\r\n", "\n")


class TestTextOnly:
    """A text body alone is a single text/plain part."""

    def test_single_text_part(self) -> None:
        """The message is one text/plain part in UTF-8 carrying the body."""
        msg = roundtrip(text="Hi Ann,\nyour order has shipped.\n")
        assert structure(msg) == ["text/plain"]
        assert msg.get_content_charset() == "utf-8"
        assert received_text(msg) == "Hi Ann,\nyour order has shipped.\n"

    def test_headers(self) -> None:
        """From, To and Subject carry the payload's values, MIME-Version is set once."""
        data = wire(payload(to=["Ann <ann@example.org>", "bob@example.org"]))
        msg = parse(data)
        assert str(msg["From"]) == SENDER
        assert [a.addr_spec for a in msg["To"].addresses] == ["ann@example.org", "bob@example.org"]
        assert str(msg["Subject"]) == "Hello"
        assert data.count(b"MIME-Version:") == 1

    def test_non_ascii_text_is_not_8bit(self) -> None:
        """Non-ASCII text is sent quoted-printable or base64 and decodes back exactly."""
        msg = roundtrip(text="Grüße aus Köln — 東京\n")
        assert msg["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
        assert received_text(msg) == "Grüße aus Köln — 東京\n"


class TestHtmlOnly:
    """An HTML body alone is a single text/html part."""

    def test_single_html_part(self) -> None:
        """The message is one text/html part carrying the HTML."""
        msg = roundtrip(html="<p>Hi <b>Ann</b></p>\n")
        assert structure(msg) == ["text/html"]
        assert received_text(msg) == "<p>Hi <b>Ann</b></p>\n"

    def test_long_html_line_is_encoded(self) -> None:
        """An HTML line longer than 998 octets is encoded so no wire line is too long."""
        html = "<p>" + "x" * 5000 + "</p>"
        data = wire(payload(html=html))
        assert max(len(line) for line in data.split(b"\r\n")) <= 998
        assert received_text(parse(data)) == html + "\n"


class TestAlternative:
    """Text and HTML together become multipart/alternative, plain text first."""

    def test_structure(self) -> None:
        """The parts are text/plain then text/html inside multipart/alternative."""
        msg = roundtrip(text="Hi Ann\n", html="<p>Hi Ann</p>\n")
        assert structure(msg) == ["multipart/alternative", "  text/plain", "  text/html"]

    def test_get_body_picks_each(self) -> None:
        """A reader asking for either representation gets the right content."""
        msg = roundtrip(text="plain\n", html="<p>rich</p>\n")
        plain = cast(EmailMessage, msg.get_body(("plain",)))
        html = cast(EmailMessage, msg.get_body(("html",)))
        assert received_text(plain) == "plain\n"
        assert received_text(html) == "<p>rich</p>\n"

    def test_mime_version_only_at_top(self) -> None:
        """Body parts carry no MIME-Version header of their own."""
        msg = roundtrip(
            text="a", html="<p>b</p>", attachments=[{"filename": "a.pdf", "content": b64(PDF)}]
        )
        assert [p for p in msg.walk() if p is not msg and "MIME-Version" in p] == []


class TestAttachments:
    """Files are attached in multipart/mixed and decode back byte-for-byte."""

    def test_bytes_round_trip(self) -> None:
        """Each attachment's decoded content equals the bytes that were sent."""
        msg = roundtrip(
            text="See attached.\n",
            attachments=[
                {"filename": "invoice.pdf", "content": b64(PDF)},
                {"filename": "data.bin", "content": b64(bytes(range(256)) * 3)},
                {"filename": "empty.txt", "content": ""},
            ],
        )
        # get_payload(decode=True) gives the bytes for every type (get_content() decodes
        # text/* to str).
        found = {
            part.get_filename(): part.get_payload(decode=True) for part in msg.iter_attachments()
        }
        assert found == {
            "invoice.pdf": PDF,
            "data.bin": bytes(range(256)) * 3,
            "empty.txt": b"",
        }

    def test_mixed_is_outermost(self) -> None:
        """With text, HTML and a file, multipart/mixed wraps the alternative and the file."""
        msg = roundtrip(
            text="t", html="<p>h</p>", attachments=[{"filename": "a.pdf", "content": b64(PDF)}]
        )
        assert structure(msg) == [
            "multipart/mixed",
            "  multipart/alternative",
            "    text/plain",
            "    text/html",
            "  application/pdf",
        ]

    def test_mimetype_guessed_or_given(self) -> None:
        """The type comes from the file name unless given; unknown ones are octet-stream."""
        msg = roundtrip(
            attachments=[
                {"filename": "a.pdf", "content": b64(b"x")},
                {"filename": "b.unknownext", "content": b64(b"x")},
                {"filename": "c.dat", "content": b64(b"x"), "mimetype": "Text/CSV"},
                {"filename": "d.tar.gz", "content": b64(b"x")},
            ]
        )
        types = [part.get_content_type() for part in msg.iter_attachments()]
        assert types == [
            "application/pdf",
            "application/octet-stream",
            "text/csv",
            "application/octet-stream",
        ]

    def test_non_ascii_and_long_filenames(self) -> None:
        """Non-ASCII and long file names survive the RFC 2231 encoding."""
        names = ["Rechnung März 2025.pdf", "発注書.xlsx", "x" * 200 + ".txt"]
        msg = roundtrip(attachments=[{"filename": n, "content": b64(b"x")} for n in names])
        assert [part.get_filename() for part in msg.iter_attachments()] == names

    def test_wrapped_base64_is_accepted(self) -> None:
        """Base64 with MIME line breaks decodes to the same bytes."""
        wrapped = base64.encodebytes(PDF).decode("ascii")
        p = payload(attachments=[{"filename": "a.pdf", "content": wrapped}])
        assert p.attachments[0].content == PDF


class TestInlineImages:
    """Attachments with a content_id are inline parts related to the HTML."""

    def test_related_inside_alternative(self) -> None:
        """The image sits beside the HTML in multipart/related, referenced as cid:."""
        msg = roundtrip(
            text="Logo below",
            html='<p><img src="cid:logo@shop"></p>',
            attachments=[
                {"filename": "logo.png", "content": b64(PNG), "content_id": "logo@shop"},
                {"filename": "terms.pdf", "content": b64(PDF)},
            ],
        )
        assert structure(msg) == [
            "multipart/mixed",
            "  multipart/alternative",
            "    text/plain",
            "    multipart/related",
            "      text/html",
            "      image/png",
            "  application/pdf",
        ]
        related = next(p for p in msg.walk() if p.get_content_type() == "multipart/related")
        html, image = cast(list[EmailMessage], list(related.iter_parts()))
        cid = str(image["Content-ID"])
        assert cid == "<logo@shop>"
        assert f"cid:{cid[1:-1]}" in received_text(html)
        assert image.get_content_disposition() == "inline"
        assert image.get_content() == PNG

    def test_html_only_related(self) -> None:
        """Without a text body the top level is multipart/related."""
        msg = roundtrip(
            html='<img src="cid:a">',
            attachments=[{"filename": "a.png", "content": b64(PNG), "content_id": "<a>"}],
        )
        assert structure(msg) == ["multipart/related", "  text/html", "  image/png"]

    def test_long_content_id_is_not_encoded(self) -> None:
        """A content id too long for one 78-character line is still written as it is."""
        cid = "image-" + "x" * 120 + "@example.com"
        msg = roundtrip(
            html=f'<img src="cid:{cid}">',
            attachments=[{"filename": "a.png", "content": b64(PNG), "content_id": cid}],
        )
        image = next(p for p in msg.walk() if p.get_content_type() == "image/png")
        assert str(image["Content-ID"]) == f"<{cid}>"


class TestInternationalHeaders:
    """Non-ASCII subjects, display names and domains are encoded for an ASCII transport."""

    def test_subject_round_trip(self) -> None:
        """A non-ASCII subject is RFC 2047 encoded and decodes back exactly."""
        subject = "Ihre Bestellung über 42 € — 注文確認 ✅"
        data = wire(payload(subject=subject))
        assert b"=?utf-8?" in data
        assert str(parse(data)["Subject"]) == subject

    @pytest.mark.parametrize(
        "name",
        ["Jürgen Müller", "Doe, Jöhn", 'Ann "the Admin" Ärger', "山田 太郎", "Zoë"],
    )
    def test_display_name_round_trip(self, name: str) -> None:
        """A non-ASCII display name, with specials or quotes, parses back unchanged."""
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        msg = roundtrip(to=f"{quoted} <ann@example.org>", from_email=f"{quoted} <shop@example.com>")
        (to,) = msg["To"].addresses
        (sender,) = msg["From"].addresses
        assert (to.display_name, to.addr_spec) == (name, "ann@example.org")
        assert (sender.display_name, sender.addr_spec) == (name, "shop@example.com")

    def test_idna_domain(self) -> None:
        """A non-ASCII domain with an ASCII local part is written in IDNA form."""
        p = payload(to="Ann <ann@bücher.example>", from_email="shop@exämple.com")
        assert p.recipients == ("ann@xn--bcher-kva.example",)
        assert p.envelope_from == "shop@xn--exmple-cua.com"
        assert not p.needs_smtputf8
        data = wire(p)
        assert data.isascii()
        assert parse(data)["To"].addresses[0].domain == "xn--bcher-kva.example"

    def test_smtputf8_address(self) -> None:
        """A non-ASCII local part needs SMTPUTF8: headers carry UTF-8, bodies stay 7-bit."""
        p = payload(to="用户@例子.广告", text="你好\n")
        assert p.needs_smtputf8
        assert p.recipients == ("用户@例子.广告",)
        data = wire(p)
        head, _, body = data.partition(b"\r\n\r\n")
        assert "用户@例子.广告".encode() in head
        assert body.isascii()
        assert received_text(parse(data)) == "你好\n"


class TestBcc:
    """Blind copies are envelope recipients only."""

    def test_bcc_not_in_headers(self) -> None:
        """No Bcc header is written and the address appears nowhere in the message."""
        p = payload(to="ann@example.org", bcc=["Audit <audit@example.net>"])
        data = wire(p)
        assert "Bcc" not in parse(data)
        assert b"audit@example.net" not in data
        assert "audit@example.net" in p.recipients

    def test_bcc_only_gets_undisclosed_to(self) -> None:
        """A message with only blind copies says so in To rather than leaving it out."""
        p = payload(to=None, bcc="audit@example.net")
        msg = parse(wire(p))
        assert str(msg["To"]) == "undisclosed-recipients:;"
        assert p.recipients == ("audit@example.net",)


class TestRecipients:
    """The envelope is to, cc and bcc, each address once, order kept."""

    def test_order_and_dedup(self) -> None:
        """Duplicates differing in domain case collapse; local-part case is significant."""
        p = payload(
            to=["Ann <ann@Example.org>", "bob@example.org"],
            cc=["ann@example.ORG", "Bob@example.org"],
            bcc=["carol@example.org", "bob@EXAMPLE.org"],
        )
        assert p.recipients == (
            "ann@Example.org",
            "bob@example.org",
            "Bob@example.org",
            "carol@example.org",
        )

    def test_envelope_from_is_bare(self) -> None:
        """MAIL FROM gets the sender's bare address."""
        assert payload().envelope_from == "shop@example.com"

    def test_default_from_used(self) -> None:
        """from_email falls back to the configured default, and an explicit one wins."""
        assert payload().from_email == SENDER
        assert payload(from_email="me@example.net").from_email == "me@example.net"


class TestMessageIdAndDate:
    """Message-ID and Date are added unless given."""

    def test_added_when_absent(self) -> None:
        """A Message-ID on the sender's domain and a current, zoned Date are added."""
        msg = roundtrip()
        assert re.fullmatch(r"<[^<>@\s]+@example\.com>", str(msg["Message-ID"]))
        date = parsedate_to_datetime(str(msg["Date"]))
        assert date.tzinfo is not None
        assert abs((datetime.now().astimezone() - date).total_seconds()) < 60

    def test_message_id_domain(self) -> None:
        """message_id_domain overrides the sender's domain, IDNA-encoded."""
        msg = parse(wire(payload(), message_id_domain="mail.bücher.example"))
        assert str(msg["Message-ID"]).endswith("@mail.xn--bcher-kva.example>")

    def test_bad_message_id_domain(self) -> None:
        """An invalid message_id_domain is a ValueError naming it."""
        with pytest.raises(ValueError, match="message_id_domain"):
            build_message(payload(), message_id_domain="bad domain")

    def test_unique(self) -> None:
        """Two builds of the same payload get different Message-IDs."""
        p = payload()
        assert build_message(p)["Message-ID"] != build_message(p)["Message-ID"]

    def test_kept_when_given(self) -> None:
        """Given Message-ID and Date are used as they are, once each."""
        given_headers = {
            "Message-ID": "<order-42@shop.example>",
            "date": "Tue, 01 Jul 2025 10:00:00 +0200",
        }
        data = wire(payload(headers=given_headers))
        msg = parse(data)
        assert str(msg["Message-ID"]) == "<order-42@shop.example>"
        assert parsedate_to_datetime(str(msg["Date"])) == parsedate_to_datetime(
            given_headers["date"]
        )
        assert data.lower().count(b"\r\nmessage-id:") == 1
        assert data.lower().count(b"\r\ndate:") == 1


class TestExtraHeaders:
    """Extra headers are written as given."""

    def test_allowed_headers(self) -> None:
        """List-Unsubscribe, X-* and In-Reply-To headers appear with their values."""
        headers = {
            "List-Unsubscribe": "<mailto:unsub@example.com>, <https://example.com/u/1>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            "X-Campaign": "welcome-2025",
            "In-Reply-To": "<a@b.example>",
            "X-Note": "Grüße",
        }
        msg = roundtrip(headers=headers)
        assert {name: str(msg[name]) for name in headers} == headers

    def test_long_url_is_not_encoded(self) -> None:
        """A URL longer than a 78-character line is kept intact instead of RFC 2047 encoded."""
        url = "<https://example.com/unsubscribe?token=" + "a1b2c3" * 40 + ">"
        data = wire(payload(headers={"List-Unsubscribe": url}))
        assert f"List-Unsubscribe: {url}\r\n".encode() in data
        assert str(parse(data)["List-Unsubscribe"]) == url

    def test_folded_at_whitespace(self) -> None:
        """A long ASCII value is folded at spaces into lines of at most 78 characters."""
        value = " ".join(f"<id{i}@example.com>" for i in range(30))
        data = wire(payload(headers={"References": value}))
        head = data.partition(b"\r\n\r\n")[0]
        assert max(len(line) for line in head.split(b"\r\n")) <= 78
        assert str(parse(data)["References"]) == value

    def test_sender_header(self) -> None:
        """A Sender header is checked and written as an address."""
        msg = roundtrip(headers={"Sender": "Bulk <bulk@bücher.example>"})
        assert msg["Sender"].address.addr_spec == "bulk@xn--bcher-kva.example"


BASE: dict[str, object] = {"to": "ann@example.org", "subject": "Hi", "text": "Body"}
OK_FILE = {"filename": "a.pdf", "content": b64(b"x")}

# (override of BASE, field named by the error, fragment of the problem)
MAIL_ERRORS: list[tuple[dict[str, object], str, str]] = [
    ({"to": "bob@@x"}, "to", "'bob@@x' is not a valid email address"),
    ({"to": ["ok@example.com", "bob@@x"]}, "to[1]", "'bob@@x' is not a valid email address"),
    ({"to": "a@example.com, b@example.com"}, "to", "pass several addresses as a list"),
    ({"to": 42}, "to", "must be an email address or a list"),
    ({"to": [None]}, "to[0]", "must be an email address string"),
    ({"to": []}, "to", "at least one recipient in to, cc or bcc is required"),
    ({"to": "@example.com"}, "to", "empty local part"),
    ({"to": "ann@"}, "to", "empty domain"),
    ({"to": "ann smith@example.com"}, "to", "whitespace"),
    ({"to": "ann..smith@example.com"}, "to", "is not a valid email address"),
    ({"to": "a" * 65 + "@example.com"}, "to", "64 octets"),
    ({"to": "a@" + ("b" * 63 + ".") * 4 + "com"}, "to", "255 octets"),
    ({"to": "a" * 64 + "@" + ("b" * 60 + ".") * 3 + "example"}, "to", "254 octets"),
    ({"to": "ann@exa_mple.com"}, "to", "not a valid domain name"),
    ({"to": "ann@[300.1.1.1]"}, "to", "not an IP address"),
    ({"cc": ["x y@example.com"]}, "cc[0]", "is not a valid email address"),
    ({"bcc": "Ann <ann@example.org"}, "bcc", "is not a valid email address"),
    ({"reply_to": ["R <r@example.org>\r\nBcc: e@evil.example"]}, "reply_to[0]", "CR or LF"),
    ({"to": "Ann\n <ann@example.org>"}, "to", "CR or LF (header injection)"),
    ({"subject": None}, "subject", "required"),
    ({"subject": 5}, "subject", "must be a string"),
    ({"subject": "Hi\r\nBcc: e@evil.example"}, "subject", "contains CR or LF (header injection)"),
    ({"subject": "Hi\x07"}, "subject", "control character U+0007"),
    ({"subject": "Hi\u2028there"}, "subject", "control character U+2028"),
    ({"text": None}, "text", "pass text or html"),
    ({"text": 1}, "text", "must be a string"),
    ({"html": ["<p>"]}, "html", "must be a string"),
    ({"text": "bad \ud800"}, "text", "lone surrogate"),
    ({"from_email": "nobody"}, "from_email", "is not a valid email address"),
    ({"foo": 1}, "foo", "unknown field 'foo'"),
    ({"subjet": "x"}, "subjet", "did you mean 'subject'?"),
    (
        {"headers": {"X-Foo": "a\r\nBcc: e@evil.example"}},
        "headers['X-Foo']",
        "contains CR or LF (header injection)",
    ),
    ({"headers": {"X-Foo": "a\nb"}}, "headers['X-Foo']", "CR or LF"),
    ({"headers": {"X-Foo\r\nBcc": "x"}}, "headers['X-Foo\\r\\nBcc']", "CR or LF"),
    ({"headers": {"X Foo": "x"}}, "headers['X Foo']", "printable ASCII"),
    ({"headers": {"X:Foo": "x"}}, "headers['X:Foo']", "without ':'"),
    ({"headers": {"": "x"}}, "headers['']", "1-76 printable"),
    ({"headers": {"Bcc": "x@example.com"}}, "headers['Bcc']", "pass it as the bcc argument"),
    ({"headers": {"To": "x@example.com"}}, "headers['To']", "pass it as the to argument"),
    ({"headers": {"subject": "x"}}, "headers['subject']", "subject argument"),
    (
        {"headers": {"Content-Type": "text/html"}},
        "headers['Content-Type']",
        "set by the message builder",
    ),
    (
        {"headers": {"Content-Transfer-Encoding": "8bit"}},
        "headers['Content-Transfer-Encoding']",
        "message builder",
    ),
    ({"headers": {"MIME-Version": "1.0"}}, "headers['MIME-Version']", "message builder"),
    ({"headers": {"Return-Path": "<x@example.com>"}}, "headers['Return-Path']", "envelope sender"),
    ({"headers": {"Resent-To": "x@example.com"}}, "headers['Resent-To']", "send_message"),
    (
        {"headers": {"Message-ID": "no-brackets"}},
        "headers['Message-ID']",
        "<unique-id@your.domain>",
    ),
    ({"headers": {"Date": "yesterday"}}, "headers['Date']", "not an RFC 5322 date"),
    ({"headers": {"Sender": "nobody"}}, "headers['Sender']", "not a valid email address"),
    ({"headers": {"X-A": "1", "x-a": "2"}}, "headers['x-a']", "given twice"),
    ({"headers": {"X-Num": 5}}, "headers['X-Num']", "must be a string"),
    ({"headers": {"X-Long": "a" * 1000}}, "headers['X-Long']", "998 octets"),
    ({"headers": {"X-Nul": "a\x00b"}}, "headers['X-Nul']", "control character U+0000"),
    ({"headers": ["X-Foo"]}, "headers", "must be an object"),
    ({"attachments": "x"}, "attachments", "must be a list"),
    ({"attachments": ["x"]}, "attachments[0]", "must be an object"),
    ({"attachments": [{"content": b64(b"x")}]}, "attachments[0].filename", "required"),
    ({"attachments": [{"filename": "a.txt"}]}, "attachments[0].content", "required"),
    (
        {"attachments": [OK_FILE, {"filename": "a", "content": "%%%"}]},
        "attachments[1].content",
        "not valid base64",
    ),
    (
        {"attachments": [{"filename": "a", "content": 5}]},
        "attachments[0].content",
        "must be a string",
    ),
    (
        {"attachments": [{"filename": "a\r\n.txt", "content": ""}]},
        "attachments[0].filename",
        "CR or LF",
    ),
    (
        {"attachments": [{"filename": "../etc/passwd", "content": ""}]},
        "attachments[0].filename",
        "not a path",
    ),
    (
        {"attachments": [{"filename": " ", "content": ""}]},
        "attachments[0].filename",
        "must not be empty",
    ),
    ({"attachments": [{**OK_FILE, "mimetype": "pdf"}]}, "attachments[0].mimetype", "type/subtype"),
    (
        {"attachments": [{**OK_FILE, "mimetype": "text/plain; charset=utf-8"}]},
        "attachments[0].mimetype",
        "type/subtype",
    ),
    (
        {"attachments": [{**OK_FILE, "mimetype": "multipart/mixed"}]},
        "attachments[0].mimetype",
        "cannot be attached",
    ),
    ({"attachments": [{**OK_FILE, "data": "x"}]}, "attachments[0].data", "unknown field 'data'"),
    (
        {"attachments": [{**OK_FILE, "content_id": "logo"}]},
        "attachments[0].content_id",
        "need an html body",
    ),
    (
        {"html": "<p>", "attachments": [{**OK_FILE, "content_id": "has space"}]},
        "attachments[0].content_id",
        "is not an id",
    ),
    (
        {
            "html": "<p>",
            "attachments": [{**OK_FILE, "content_id": "a"}, {**OK_FILE, "content_id": "<a>"}],
        },
        "attachments[1].content_id",
        "same id as attachments[0]",
    ),
    ({"profile": 3}, "profile", "must be a string"),
    ({"profile": ""}, "profile", "must not be empty"),
    ({"idempotency_key": ""}, "idempotency_key", "must not be empty"),
]


class TestMailValidation:
    """Every invalid send_mail payload is refused with an error naming the field."""

    @pytest.mark.parametrize(
        ("override", "field", "fragment"),
        MAIL_ERRORS,
        ids=[f"{i}-{case[1]}" for i, case in enumerate(MAIL_ERRORS)],
    )
    def test_error_names_field(
        self, override: dict[str, object], field: str, fragment: str
    ) -> None:
        """The error's field is the offending one and its message says what is wrong."""
        kwargs = {**BASE, **override}
        kwargs = {k: v for k, v in kwargs.items() if not (k == "text" and v is None)}
        with pytest.raises(InvalidMessageError) as caught:
            MailPayload.from_task_kwargs(kwargs, default_from=SENDER)
        assert caught.value.field == field
        assert str(caught.value).startswith(f"{field}: ")
        assert fragment in str(caught.value)
        assert "\n" not in str(caught.value)
        assert "\r" not in str(caught.value)

    def test_missing_from(self) -> None:
        """Without from_email or a default the error says how to provide one."""
        with pytest.raises(InvalidMessageError) as caught:
            MailPayload.from_task_kwargs(BASE, default_from=None)
        assert caught.value.field == "from_email"
        assert str(caught.value) == (
            "from_email: required (pass from_email or set MAILWORKER_DEFAULT_FROM)"
        )

    def test_bad_default_from(self) -> None:
        """An invalid configured default is reported under its setting's name."""
        with pytest.raises(InvalidMessageError) as caught:
            MailPayload.from_task_kwargs(BASE, default_from="not-an-address")
        assert caught.value.field == "MAILWORKER_DEFAULT_FROM"

    def test_is_value_error(self) -> None:
        """Generic code can catch a payload error as ValueError."""
        with pytest.raises(ValueError, match="subject: required"):
            MailPayload.from_task_kwargs({"to": "a@example.com"}, default_from=SENDER)

    def test_direct_construction_validates(self) -> None:
        """Building a MailPayload by hand applies the same checks."""
        with pytest.raises(InvalidMessageError, match=r"to\[0\]"):
            MailPayload(to=("bob@@x",), subject="s", from_email="a@example.com", text="t")
        with pytest.raises(InvalidMessageError, match="header injection"):
            MailPayload(
                to=("a@example.com",),
                subject="s",
                from_email="a@example.com",
                text="t",
                headers=(("X-A", "1\r\nBcc: e@evil.example"),),
            )

    def test_direct_construction_normalises(self) -> None:
        """A hand-built payload is normalised like one from task kwargs."""
        p = MailPayload(
            to=("Ann <ann@bücher.example>",),
            subject="s",
            from_email="a@example.com",
            html="<img src=cid:x>",
            attachments=(Attachment("x.png", PNG, content_id="<x>"),),
        )
        assert p.to == ("Ann <ann@xn--bcher-kva.example>",)
        assert p.attachments[0].content_id == "x"
        assert p.attachments[0].mimetype == "image/png"

    def test_task_options_accepted(self) -> None:
        """profile and idempotency_key are accepted and not part of the payload."""
        p = payload(profile="bulk", idempotency_key="order-42")
        assert p.to == ("ann@example.org",)

    def test_display_forms_accepted(self) -> None:
        """Bare, bracketed and display-name forms are accepted in every address field."""
        p = payload(
            to="<ann@example.org>",
            cc='"Doe, John" <john@example.org>',
            bcc="Audit <audit@example.org>",
            reply_to=["support@example.org"],
            from_email="Shop Team <team@example.com>",
        )
        assert p.recipients == ("ann@example.org", "john@example.org", "audit@example.org")
        assert p.cc == ('"Doe, John" <john@example.org>',)


class TestSizeLimit:
    """A message above the size limit is refused as a whole."""

    def test_default_limit(self) -> None:
        """The limit is 25 MiB."""
        assert message.MAX_MESSAGE_BYTES == 25 * 1024 * 1024
        assert message.DEFAULT_LIMITS.max_message_bytes == 25 * 1024 * 1024

    def test_total_over_limit(self) -> None:
        """The attachments' encoded sizes count with the bodies; the error names the
        message and the setting."""
        limits = message.Limits(max_message_bytes=200)
        files = [{"filename": f"{i}.bin", "content": b64(bytes(40))} for i in range(3)]
        kwargs = {"to": "ann@example.org", "subject": "s", "text": "t" * 40}
        MailPayload.from_task_kwargs(
            {**kwargs, "attachments": files[:2]}, default_from="a@example.com", limits=limits
        )
        with pytest.raises(InvalidMessageError) as caught:
            MailPayload.from_task_kwargs(
                {**kwargs, "attachments": files}, default_from="a@example.com", limits=limits
            )
        assert caught.value.field == "message"
        assert "MAILWORKER_MAX_MESSAGE_BYTES" in str(caught.value)


def all_lines(data: bytes) -> list[bytes]:
    """The message's lines without their CRLF."""
    assert data.endswith(b"\r\n")
    return data[:-2].split(b"\r\n")


class TestWireFormat:
    """The serialised message is CRLF-only, 7-bit and within line limits."""

    @pytest.fixture
    def rich(self) -> bytes:
        """A message with every kind of part and non-ASCII everywhere."""
        return wire(
            payload(
                to=["Jürgen <j@bücher.example>", "ann@example.org"],
                subject="Grüße " * 30,
                text="Zeile eins\nZeile zwei — ünïcödé\r\n" + "lang " * 400,
                html="<p>" + "ü" * 3000 + '</p><img src="cid:logo">',
                headers={"X-Note": "Grüße " * 40},
                attachments=[
                    {"filename": "logo.png", "content": b64(PNG), "content_id": "logo"},
                    {"filename": "Überweisung.pdf", "content": b64(PDF)},
                ],
            )
        )

    def test_crlf_only(self, rich: bytes) -> None:
        """Every line ends in CRLF: no bare LF and no bare CR."""
        assert re.search(rb"(?<!\r)\n", rich) is None
        assert re.search(rb"\r(?!\n)", rich) is None

    def test_seven_bit_and_short_lines(self, rich: bytes) -> None:
        """Every line is 7-bit and at most 998 octets, so no 8BITMIME is needed."""
        for line in all_lines(rich):
            assert line.isascii()
            assert len(line) <= 998

    def test_transfer_encodings(self, rich: bytes) -> None:
        """Leaf parts are 7bit, quoted-printable or base64, never 8bit or binary."""
        for part in parse(rich).walk():
            if not part.is_multipart():
                assert part["Content-Transfer-Encoding"] in ("7bit", "quoted-printable", "base64")

    def test_control_characters_are_encoded(self) -> None:
        """Control characters in a body go out quoted-printable, not raw."""
        data = wire(payload(text="bell\x07 form\x0c nul\x00\n"))
        body = data.partition(b"\r\n\r\n")[2]
        assert re.search(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", body) is None
        assert received_text(parse(data)) == "bell\x07 form\x0c nul\x00\n"


class TestBodyRoundTripProperty:
    """Any text survives build, serialise and parse."""

    @settings(max_examples=300, deadline=None)
    @given(text=st.text())
    def test_text_body(self, text: str) -> None:
        """A text body decodes back to itself with line breaks as LF and a final LF."""
        data = wire(payload(text=text))
        assert received_text(parse(data)) == expected_text(text)
        for line in all_lines(data):
            assert line.isascii()
            assert len(line) <= 998

    @settings(max_examples=100, deadline=None)
    @given(text=st.text(), html=st.text())
    def test_alternative_bodies(self, text: str, html: str) -> None:
        """Both bodies of an alternative decode back to themselves in the same way."""
        msg = parse(wire(payload(text=text, html=html)))
        assert received_text(cast(EmailMessage, msg.get_body(("plain",)))) == expected_text(text)
        assert received_text(cast(EmailMessage, msg.get_body(("html",)))) == expected_text(html)

    @settings(max_examples=200, deadline=None)
    @given(subject=st.text(st.characters(exclude_categories=("Cc", "Cs", "Zl", "Zp"))))
    def test_subject(self, subject: str) -> None:
        """A subject decodes back to itself (an ASCII one less the leading blanks the
        parser drops)."""
        msg = parse(wire(payload(subject=subject)))
        assert str(msg["Subject"]) in {subject, subject.lstrip(" \t")}


def with_line_break(draw: st.DrawFn) -> str:
    """Arbitrary text with a CR, LF or CRLF inserted somewhere."""
    text = draw(st.text())
    cut = draw(st.integers(min_value=0, max_value=len(text)))
    brk = draw(st.sampled_from(["\r", "\n", "\r\n"]))
    return text[:cut] + brk + text[cut:]


texts_with_line_break = st.composite(with_line_break)


class TestHeaderInjectionProperty:
    """CR or LF anywhere in header material is always refused."""

    @settings(max_examples=200, deadline=None)
    @given(value=texts_with_line_break())
    def test_header_value(self, value: str) -> None:
        """An extra header's value with CR or LF is refused, naming the header."""
        with pytest.raises(InvalidMessageError) as caught:
            payload(headers={"X-Test": value})
        assert caught.value.field == "headers['X-Test']"

    @settings(max_examples=100, deadline=None)
    @given(name=texts_with_line_break())
    def test_header_name(self, name: str) -> None:
        """A header name with CR or LF is refused."""
        with pytest.raises(InvalidMessageError) as caught:
            payload(headers={name: "x"})
        assert caught.value.field == f"headers[{name!r}]"

    @settings(max_examples=100, deadline=None)
    @given(value=texts_with_line_break())
    def test_subject_address_filename(self, value: str) -> None:
        """Subject, display names and file names with CR or LF are refused."""
        with pytest.raises(InvalidMessageError, match="subject"):
            payload(subject=value)
        with pytest.raises(InvalidMessageError, match="to"):
            payload(to=f"{value} <ann@example.org>")
        with pytest.raises(InvalidMessageError, match=r"attachments\[0\]\.filename"):
            payload(attachments=[{"filename": value, "content": ""}])


RAW = (
    b"From: shop@example.com\r\n"
    b"To: ann@example.org\r\n"
    b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n"
    b"Message-ID: <r1@example.com>\r\n"
    b"\r\n"
    b"Hello\r\n"
)


def raw_kwargs(**override: object) -> dict[str, object]:
    """send_message kwargs for a valid message, with overrides."""
    kwargs: dict[str, object] = {
        "raw_b64": b64(RAW),
        "envelope_from": "shop@example.com",
        "recipients": ["ann@example.org"],
    }
    kwargs.update(override)
    return kwargs


RAW_ERRORS: list[tuple[dict[str, object], str, str]] = [
    ({"raw_b64": None}, "raw_b64", "required"),
    ({"raw_b64": "!!not base64!!"}, "raw_b64", "not valid base64"),
    ({"raw_b64": ""}, "raw_b64", "empty"),
    ({"raw_b64": b64(b"just some text\r\n")}, "raw_b64", "header lines"),
    ({"raw_b64": b64(b"\r\n\r\nbody")}, "raw_b64", "header lines"),
    ({"raw_b64": b64(b"Subject: x\r\nBcc: a@example.com\r\n\r\nb")}, "raw_b64", "Bcc"),
    ({"envelope_from": None}, "envelope_from", 'use "" for the null sender'),
    ({"envelope_from": "bob@@x"}, "envelope_from", "not a valid email address"),
    ({"recipients": []}, "recipients", "at least one recipient"),
    ({"recipients": None}, "recipients", "at least one recipient"),
    ({"recipients": ["ok@example.org", "bad"]}, "recipients[1]", "not a valid email address"),
    ({"recipients": ["ok@example.org\r\nRCPT TO:<x@y>"]}, "recipients[0]", "CR or LF"),
    ({"extra": 1}, "extra", "unknown field"),
]


class TestRawPayload:
    """send_message payloads: a prebuilt message and its envelope."""

    def test_valid(self) -> None:
        """A valid payload exposes the bytes, envelope and header helpers; an ASCII
        message with encoded-word headers needs no SMTP extension."""
        raw = RawPayload.from_task_kwargs(raw_kwargs(profile="default", idempotency_key="k1"))
        assert raw.message == RAW
        assert raw.envelope_from == "shop@example.com"
        assert raw.recipients == ("ann@example.org",)
        assert raw.message_id == "<r1@example.com>"
        assert raw.subject == "Grüße"
        envelope = build_envelope(raw.envelope_from, raw.recipients, raw.message)
        assert not envelope.utf8
        assert not envelope.eight_bit
        assert mail_params(envelope, {}) == []

    def test_null_sender_and_normalised_recipients(self) -> None:
        """An empty envelope_from is the null sender; recipients are bare, IDNA, unique."""
        raw = RawPayload.from_task_kwargs(
            raw_kwargs(
                envelope_from="", recipients=["Ann <ann@bücher.example>", "ann@BÜCHER.example"]
            )
        )
        assert raw.envelope_from == ""
        assert raw.recipients == ("ann@xn--bcher-kva.example",)

    def test_single_recipient_string(self) -> None:
        """A single recipient may be given as a string."""
        assert RawPayload.from_task_kwargs(raw_kwargs(recipients="a@example.org")).recipients == (
            "a@example.org",
        )

    def test_missing_headers_helpers(self) -> None:
        """Without Message-ID or Subject the helpers return None."""
        raw = RawPayload(
            message=b"From: a@example.com\r\n\r\nx", envelope_from="", recipients=("b@example.org",)
        )
        assert raw.message_id is None
        assert raw.subject is None

    def test_eight_bit_and_utf8(self) -> None:
        """Raw UTF-8 in headers or a non-ASCII local part makes the envelope ask for
        SMTPUTF8, 8-bit content for 8BITMIME."""
        raw = RawPayload(
            message="Subject: Grüße\r\n\r\nGrüße\r\n".encode(),
            envelope_from="",
            recipients=("用户@例子.广告",),
        )
        assert raw.subject == "Grüße"
        envelope = build_envelope(raw.envelope_from, raw.recipients, raw.message)
        assert envelope.utf8
        assert envelope.eight_bit
        features = {"smtputf8": "", "8bitmime": ""}
        assert mail_params(envelope, features) == ["SMTPUTF8", "BODY=8BITMIME"]
        ascii_message = RawPayload(
            message=b"Subject: hi\r\n\r\nhi\r\n", envelope_from="", recipients=raw.recipients
        )
        by_address = build_envelope("", ascii_message.recipients, ascii_message.message)
        assert (by_address.utf8, by_address.eight_bit) == (True, False)

    def test_size_limit(self) -> None:
        """A message above the size limit is refused, naming raw_b64."""
        limits = message.Limits(max_message_bytes=len(RAW) - 1)
        RawPayload.from_task_kwargs(raw_kwargs(), limits=message.Limits(len(RAW)))
        with pytest.raises(InvalidMessageError) as caught:
            RawPayload.from_task_kwargs(raw_kwargs(), limits=limits)
        assert caught.value.field == "raw_b64"

    def test_accepts_built_message(self) -> None:
        """The bytes of a built message are a valid raw payload."""
        p = payload(subject="Round trip")
        raw = RawPayload.from_task_kwargs(
            {
                "raw_b64": b64(wire(p)),
                "envelope_from": p.envelope_from,
                "recipients": list(p.recipients),
            }
        )
        assert raw.subject == "Round trip"

    @pytest.mark.parametrize(
        ("override", "field", "fragment"),
        RAW_ERRORS,
        ids=[f"{i}-{case[1]}" for i, case in enumerate(RAW_ERRORS)],
    )
    def test_error_names_field(
        self, override: dict[str, object], field: str, fragment: str
    ) -> None:
        """The error's field is the offending one and its message says what is wrong."""
        with pytest.raises(InvalidMessageError) as caught:
            RawPayload.from_task_kwargs(raw_kwargs(**override))
        assert caught.value.field == field
        assert fragment in str(caught.value)


class TestSummary:
    """summary() is small, JSON-safe and never carries content."""

    def test_mail_summary(self) -> None:
        """Recipients, subject, sender and attachment names and sizes, no bytes."""
        p = payload(
            subject="Invoice",
            bcc="audit@example.net",
            html='<img src="cid:logo">',
            headers={"Message-ID": "<inv-1@example.com>"},
            attachments=[
                {"filename": "invoice.pdf", "content": b64(PDF)},
                {"filename": "logo.png", "content": b64(PNG), "content_id": "logo"},
            ],
        )
        summary = p.summary()
        assert json.loads(json.dumps(summary)) == summary
        assert summary == {
            "kind": "mail",
            "from": "shop@example.com",
            "recipients": ["ann@example.org", "audit@example.net"],
            "subject": "Invoice",
            "message_id": "<inv-1@example.com>",
            "attachments": [
                {
                    "filename": "invoice.pdf",
                    "mimetype": "application/pdf",
                    "size": len(PDF),
                    "content_id": None,
                },
                {
                    "filename": "logo.png",
                    "mimetype": "image/png",
                    "size": len(PNG),
                    "content_id": "logo",
                },
            ],
        }

    def test_raw_summary(self) -> None:
        """A raw payload's summary reads subject and id from the header block alone: it
        gives the size and lists no attachments, which would take parsing the body."""
        p = payload(
            subject="Grüße",
            headers={"Message-ID": "<m1@example.com>"},
            attachments=[{"filename": "invoice.pdf", "content": b64(PDF)}],
        )
        raw = RawPayload.from_task_kwargs(
            {"raw_b64": b64(wire(p)), "envelope_from": "", "recipients": "ann@example.org"}
        )
        summary = raw.summary()
        assert json.loads(json.dumps(summary)) == summary
        assert summary["subject"] == "Grüße"
        assert summary["message_id"] == "<m1@example.com>"
        assert summary["from"] == ""
        assert summary["size"] == len(raw.message)
        assert "attachments" not in summary
        assert PDF[:20].hex() not in json.dumps(summary)

    def test_attachment_repr_hides_content(self) -> None:
        """An Attachment's repr leaves out its bytes."""
        assert "secret-bytes" not in repr(Attachment("a.bin", b"secret-bytes"))
