"""Scalar field checks shared by the payload validators.

Each check either returns the value (normalised where that is its job) or raises
:class:`~mailworker.errors.InvalidMessageError` naming the field and the fix, via :func:`fail`.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import re
from collections.abc import Iterable, Mapping
from typing import NoReturn

from mailworker.errors import InvalidMessageError

# Line breaks for str.splitlines(), which the email package refuses in header values, and
# every other control character: none belongs in a header, and CR/LF is header injection.
_BAD_HEADER_CHAR = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def fail(field_name: str, problem: str) -> NoReturn:
    """Raise :class:`InvalidMessageError` for ``field_name``."""
    raise InvalidMessageError(field_name, problem)


def type_name(value: object) -> str:
    """The name of ``value``'s type, for error messages."""
    return type(value).__name__


# -- scalar fields ------------------------------------------------------------------------


def optional_str(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        fail(name, f"must be a string, got {type_name(value)}")
    if _SURROGATE.search(value):
        fail(name, "contains a lone surrogate, which is not valid Unicode")
    return value


def required_str(name: str, value: object, hint: str = "") -> str:
    text = optional_str(name, value)
    if text is None:
        fail(name, f"required{hint}")
    return text


def header_text(name: str, value: object, *, required: bool = True) -> str:
    """A string that is safe on a header line: no CR, LF or other control character."""
    text = required_str(name, value) if required else optional_str(name, value) or ""
    bad = _BAD_HEADER_CHAR.search(text)
    if bad:
        if bad.group() in "\r\n":
            fail(name, "contains CR or LF (header injection)")
        fail(name, f"contains control character U+{ord(bad.group()):04X}")
    return text


def decode_base64(name: str, value: object) -> bytes:
    text = required_str(name, value)
    try:
        # Line-wrapped base64 (MIME style) is common, so whitespace is dropped first;
        # validate=True then refuses everything outside the alphabet instead of skipping it.
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        fail(name, "not valid base64")


def check_fields(kwargs: Mapping[str, object], known: Iterable[str], prefix: str = "") -> None:
    """Refuse unknown keys: a misspelt optional field would otherwise vanish silently."""
    valid = sorted(known)
    for key in kwargs:
        name = str(key)
        if name in valid:
            continue
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "valid fields: " + ", ".join(valid)
        fail(f"{prefix}{name}", f"unknown field {name!r} ({hint})")
