"""Header injection through what the ``email`` package decodes: the bytes built carry
exactly the header fields the caller asked for, with the caller's text, on every Python."""

from __future__ import annotations

import base64
import glob
import json
import subprocess
import sys
import textwrap
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import idna
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailworker.errors import InvalidMessageError
from mailworker.message import MailPayload, build_message, message_bytes
from mailworker.message._wire import VerbatimHeader, header_mismatch

ROOT = Path(__file__).resolve().parents[2]
#: The fields every built single-part message has, in order, besides the caller's extras.
BASE_FIELDS = ["From", "To", "Subject", "Date", "Message-ID"]
MIME_FIELDS = ["Content-Type", "Content-Transfer-Encoding", "MIME-Version"]
#: Encoded-words that decode to CR LF and a new header field.
CRLF_SUBJECT = "=?utf-8?q?Hi=0D=0AContent-Type:_text/html=0D=0A=0D=0A<h1>x</h1>?="
CRLF_BCC = "=?utf-8?q?a=0D=0ABcc:_evil@attacker.example?="


def build(**fields: Any) -> bytes:
    """The wire bytes ``send_mail`` would send for ``fields`` (to, subject, text defaulted)."""
    kwargs: dict[str, Any] = {"to": "ann@example.org", "subject": "s", "text": "real body"}
    kwargs.update(fields)
    payload = MailPayload.from_task_kwargs(kwargs, default_from="shop@example.com")
    return message_bytes(build_message(payload))


def parse(data: bytes) -> EmailMessage:
    """The message as a reader sees it."""
    message = BytesParser(policy=policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


class TestEncodedWords:
    """Encoded-words in the caller's text stay text."""

    def test_subject_cannot_add_fields_or_a_body(self) -> None:
        """A subject whose encoded-word decodes to CRLF + Content-Type + a blank line adds
        no field and no body: the reader sees the caller's subject text and the body."""
        message = parse(build(subject=CRLF_SUBJECT))
        assert message.keys() == BASE_FIELDS + MIME_FIELDS
        assert str(message["Subject"]) == CRLF_SUBJECT
        assert message.get_content().replace("\r\n", "\n") == "real body\n"

    def test_non_ascii_extra_header_cannot_add_a_bcc(self) -> None:
        """A non-ASCII extra header carrying an encoded CRLF + Bcc adds no Bcc field."""
        value = f"é {CRLF_BCC}"
        message = parse(build(headers={"X-Note": value}))
        assert message.keys() == [*BASE_FIELDS, "X-Note", *MIME_FIELDS]
        assert str(message["X-Note"]) == value

    def test_display_name_with_encoded_crlf(self) -> None:
        """A display name that is an encoded CRLF neither crashes the builder nor
        escapes its field: it reads back as the same literal name."""
        message = parse(build(to="=?utf-8?q?=0D=0A?= <a@example.com>"))
        [address] = message["To"].addresses
        assert (address.display_name, address.addr_spec) == ("=?utf-8?q?=0D=0A?=", "a@example.com")

    def test_invalid_encoded_byte_in_non_ascii_header(self) -> None:
        """An encoded-word holding a byte that is not UTF-8 stays literal text."""
        value = "Grüße =?utf-8?q?=FF?="
        assert str(parse(build(headers={"X-Note": value}))["X-Note"]) == value

    def test_non_ascii_display_names_and_subject_round_trip(self) -> None:
        """Non-ASCII and quoted display names and subjects read back unchanged."""
        to = ["Zoë Ünïcode <zoe@example.org>", 'Bob "the" Builder <bob@example.org>']
        message = parse(build(to=to, subject="Grüße aus Köln, 東京"))
        pairs = [(a.display_name, a.addr_spec) for a in message["To"].addresses]
        assert pairs == [
            ("Zoë Ünïcode", "zoe@example.org"),
            ('Bob "the" Builder', "bob@example.org"),
        ]
        assert str(message["Subject"]) == "Grüße aus Köln, 東京"


class TestPartHeaders:
    """Attachment parts' fields are written by us too, and checked."""

    @pytest.mark.parametrize(
        "filename",
        [
            "=?utf-8?q?a=0D=0AContent-Type:_text=2Fhtml=0D=0A=0D=0Aboom?=",
            "=?utf-8?q?evil=2Fpath.exe?=",
            "Grüße \u2013 Rechnung 2026.pdf",
            "x" * 240 + "é.pdf",
            'quo"te; name=x.txt',
        ],
    )
    def test_filename_reads_back_as_given(self, filename: str) -> None:
        """A file name (encoded-words, non-ASCII, long, with quotes) reads back as
        itself, the part has exactly its fields, and no line passes 998 octets."""
        content = base64.b64encode(b"data").decode()
        data = build(attachments=[{"filename": filename, "content": content}])
        [part] = parse(data).iter_attachments()
        assert part.get_filename() == filename
        assert part.keys() == ["Content-Type", "Content-Transfer-Encoding", "Content-Disposition"]
        assert max(len(line) for line in data.split(b"\r\n")) <= 998

    def test_long_word_in_display_name(self) -> None:
        """A display name with a 1,000-character word is folded as encoded-words, not
        written as a line longer than 998 octets."""
        data = build(to=f"{'w' * 1000} <ann@example.org>")
        assert max(len(line) for line in data.split(b"\r\n")) <= 998
        [address] = parse(data)["To"].addresses
        assert address.display_name.replace(" ", "") == "w" * 1000

    @pytest.mark.parametrize("message_id", ["<mailto:u@x.org>", "<a b@x.org>", "<@x.org>"])
    def test_message_id_must_be_rfc_5322(self, message_id: str) -> None:
        """A Message-ID header that is not dot-atom@domain is refused, naming it."""
        with pytest.raises(InvalidMessageError) as caught:
            build(headers={"Message-ID": message_id})
        assert caught.value.field == "headers['Message-ID']"


class TestSerialisedCheck:
    """The header block written is parsed back before it is sent."""

    def test_a_field_that_comes_out_as_two_is_refused(self) -> None:
        """Were the email package to write a field as two (as older CPythons do with a
        decoded CRLF), message_bytes refuses the message and names the field."""
        payload = MailPayload.from_task_kwargs(
            {"to": "ann@example.org", "subject": "s", "text": "t"}, default_from="a@example.com"
        )
        message = build_message(payload)
        del message["Subject"]
        message["Subject"] = VerbatimHeader("Subject", "Hi\r\nBcc: evil@attacker.example")
        with pytest.raises(InvalidMessageError) as caught:
            message_bytes(message)
        assert caught.value.field == "subject"

    def test_matching_block_passes(self) -> None:
        """A message whose block reads back as its own fields is not flagged."""
        message = parse(build(subject="fine"))
        data = message.as_bytes(policy=policy.SMTP)
        assert header_mismatch(message, data) is None


#: Text that exercises encoded-words, quoting, folding and non-ASCII.
_PIECES = [*'=?qQbB_:;,<>"\\()@. \tazé東', "=0D", "=0A", "=?utf-8?q?", "?=", "\u00a0"]
_HOSTILE = st.lists(st.sampled_from(_PIECES), max_size=30).map("".join)


class TestNeverAnotherField:
    """Whatever text is given, the result is exactly the intended fields or an error
    naming the field."""

    @settings(max_examples=150, deadline=None)
    @given(subject=_HOSTILE, name=_HOSTILE, extra=_HOSTILE)
    def test_hostile_text(self, subject: str, name: str, extra: str) -> None:
        """Subject, display name and an extra header either come out as themselves in
        exactly the intended fields, or the payload is InvalidMessageError."""
        try:
            data = build(
                subject=subject,
                to=f'"{name}" <ann@example.org>' if '"' not in name else "ann@example.org",
                headers={"X-Extra": extra} if extra.strip() else None,
            )
        except InvalidMessageError:
            return
        message = parse(data)
        extras = ["X-Extra"] if extra.strip() else []
        assert message.keys() == [*BASE_FIELDS, *extras, *MIME_FIELDS]
        assert message.get_content().replace("\r\n", "\n") == "real body\n"


_SCRIPT = """
import json, sys
sys.path[:0] = sys.argv[1].split(":")
from email import policy
from email.parser import BytesParser
from mailworker.message import MailPayload, build_message, message_bytes
cases = json.loads(sys.argv[2])
out = []
for fields in cases:
    kwargs = {"to": "ann@example.org", "subject": "s", "text": "real body", **fields}
    payload = MailPayload.from_task_kwargs(kwargs, default_from="shop@example.com")
    message = BytesParser(policy=policy.default).parsebytes(message_bytes(build_message(payload)))
    out.append([message.keys(), str(message["Subject"]), message.get_content().strip()])
print(json.dumps(out))
"""


def _interpreters() -> list[str]:
    """This interpreter and every other CPython >= 3.10 installed by pyenv."""
    found = glob.glob("/root/.pyenv/versions/3.1[0-9]*/bin/python3")
    return sorted({sys.executable, *found})


class TestEveryPython:
    """The message layer (standard library and idna only) gives the same bytes' meaning
    on every installed Python the package supports."""

    @pytest.mark.parametrize("python", _interpreters())
    def test_injection_cases(self, python: str, tmp_path: Path) -> None:
        """Under each interpreter the hostile subject and header add no field."""
        cases = [{"subject": CRLF_SUBJECT}, {"headers": {"X-Note": f"é {CRLF_BCC}"}}]
        # The message layer's one dependency (pure Python), for interpreters without it.
        (tmp_path / "idna").symlink_to(Path(idna.__file__).parent)
        done = subprocess.run(
            [python, "-c", textwrap.dedent(_SCRIPT), f"{ROOT}:{tmp_path}", json.dumps(cases)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        first, second = json.loads(done.stdout)
        assert first == [BASE_FIELDS + MIME_FIELDS, CRLF_SUBJECT, "real body"]
        assert second[0] == [*BASE_FIELDS, "X-Note", *MIME_FIELDS]
