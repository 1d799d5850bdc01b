"""Extra header fields in a ``send_mail`` payload: their validation and their folding."""

from __future__ import annotations

import re
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Final

from mailworker.message._address import parse_address
from mailworker.message._fields import fail, header_text, type_name
from mailworker.message._unsubscribe import (
    check_one_click,
    parse_list_unsubscribe,
    unsubscribe_value,
)

# Header fields the payload has its own argument for.
_ARGUMENT_HEADERS: Final = {
    "from": "from_email",
    "to": "to",
    "cc": "cc",
    "bcc": "bcc",
    "reply-to": "reply_to",
    "subject": "subject",
}
_HEADER_NAME = re.compile(r"[!-9;-~]{1,76}")  # printable ASCII except ':' (RFC 5322 ftext)
_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
# RFC 5322 3.6.4: "<" dot-atom-text "@" (dot-atom-text / no-fold-literal) ">".
_MSG_ID = re.compile(rf"<{_ATEXT}(?:\.{_ATEXT})*@(?:{_ATEXT}(?:\.{_ATEXT})*|\[[!-Z^-~]*\])>")
_FOLD_WORD = re.compile(r"[ \t]*[^ \t]+|[ \t]+")
# RFC 5322 §2.1.1: a line is at most 998 octets plus CRLF.
_MAX_LINE: Final = 998


def _header_pairs(value: object) -> tuple[tuple[object, object], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple(value.items())
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in value
    ):
        fail("headers", f"must be an object of name: value, got {type_name(value)}")
    return tuple((pair[0], pair[1]) for pair in value)


def _check_header(name: str, value: object) -> tuple[str, str]:
    where = f"headers[{name!r}]"
    if "\r" in name or "\n" in name:
        fail(where, "the name contains CR or LF (header injection)")
    if not _HEADER_NAME.fullmatch(name):
        fail(where, "a header name is 1-76 printable ASCII characters without ':' or spaces")
    lower = name.lower()
    if lower in _ARGUMENT_HEADERS:
        argument = _ARGUMENT_HEADERS[lower]
        fail(where, f"pass it as the {argument} argument, not in headers")
    if lower == "mime-version" or lower.startswith("content-"):
        fail(where, "MIME-Version and Content-* are set by the message builder")
    if lower == "return-path":
        fail(where, "the receiving server sets Return-Path from the envelope sender")
    if lower.startswith("resent-"):
        fail(where, "Resent-* fields are for re-sending an existing message; use send_message")
    text = header_text(where, value)
    if lower in {"date", "orig-date"}:
        text = check_date(where, text)
    elif lower == "message-id":
        text = check_message_id(where, text)
    elif lower == "sender":
        text = str(parse_address(where, text))
    elif lower == "list-unsubscribe":
        # As the list_unsubscribe argument: https/mailto URIs, written <uri>, <uri>.
        text = unsubscribe_value(parse_list_unsubscribe(where, text))
    elif lower == "list-unsubscribe-post":
        text = check_one_click(where, text)
    elif text.isascii():
        # VerbatimHeader folds only before whitespace, so its longest piece bounds a line.
        longest = max((len(word) for word in _FOLD_WORD.findall(text)), default=0)
        if len(name) + 2 + longest > _MAX_LINE:
            fail(where, f"a {longest}-character word makes a line longer than 998 octets")
    return name, text


def check_date(where: str, value: object) -> str:
    """An RFC 5322 date (``Tue, 01 Jul 2025 10:00:00 +0000``), as given."""
    text = header_text(where, value)
    try:
        parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        fail(where, f"{text!r} is not an RFC 5322 date like 'Tue, 01 Jul 2025 10:00:00 +0000'")
    return text


def check_message_id(where: str, value: object) -> str:
    """A Message-ID (``<unique-id@your.domain>``), stripped."""
    text = header_text(where, value).strip()
    if not _MSG_ID.fullmatch(text) or len(text) > 250:
        fail(where, f"{text!r} does not look like <unique-id@your.domain>")
    return text


def check_headers(value: object) -> tuple[tuple[str, str], ...]:
    checked: dict[str, str] = {}
    result: list[tuple[str, str]] = []
    for raw_name, raw_value in _header_pairs(value):
        if not isinstance(raw_name, str):
            fail(f"headers[{raw_name!r}]", "a header name must be a string")
        name, text = _check_header(raw_name, raw_value)
        if name.lower() in checked:
            fail(f"headers[{name!r}]", f"given twice (also as {checked[name.lower()]!r})")
        checked[name.lower()] = name
        result.append((name, text))
    return tuple(result)
