"""Header fields as they go on the wire, written by us, and checked after serialising.

The ``email`` package parses a value assigned to a header: it *decodes* RFC 2047
encoded-words it finds in the caller's text (``=?utf-8?q?Hi=0D=0ABcc:_x?=``) and, before
recent CPython releases, folds the decoded CR/LF onto the wire as a real line break — a
header injection that the raw-text CR/LF check cannot see. So the fields a caller fills
(Subject, extra headers, addresses and their display names) are never parsed by it: they
are written here, with the caller's text encoded literally, and :func:`check_header_block`
parses the serialised header block back and compares it with what was intended, so the
guarantee holds on every Python whatever the ``email`` package does.
"""

from __future__ import annotations

import base64
import re
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import HeaderParser
from email.policy import Policy
from email.policy import default as default_policy
from typing import Final

#: Encoded-word payload bytes per word: 45 bytes are 60 base64 characters, so a word
#: (``=?utf-8?b?`` + 60 + ``?=``) stays within RFC 2047's 75 characters.
_WORD_BYTES: Final = 45
_FOLD_WORD = re.compile(r"[ \t]*[^ \t]+|[ \t]+")
#: RFC 5322 §2.1.1: a line is at most 998 octets plus CRLF.
_MAX_LINE: Final = 998
# RFC 5322 atext plus space: a display name of these needs no quoting.
_PHRASE_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ ]*")
_WHITESPACE = re.compile(r"\s+")


def needs_encoding(text: str) -> bool:
    """Whether ``text`` must be written as encoded-words: it is not ASCII, or a reader
    would take part of it for an encoded-word and decode it."""
    return not text.isascii() or "=?" in text


def encoded_words(text: str) -> list[str]:
    """``text`` as RFC 2047 base64 encoded-words, never splitting a character."""
    chunks: list[bytes] = []
    chunk = b""
    for char in text:
        data = char.encode("utf-8")
        if len(chunk) + len(data) > _WORD_BYTES:
            chunks.append(chunk)
            chunk = b""
        chunk += data
    chunks.append(chunk)
    return [f"=?utf-8?b?{base64.b64encode(c).decode('ascii')}?=" for c in chunks]


def display_name(name: str) -> str:
    """A display name as a phrase: atoms, a quoted string, or encoded-words."""
    if needs_encoding(name):
        return " ".join(encoded_words(name))
    if _PHRASE_ATOMS.fullmatch(name) and name.strip() == name and "  " not in name:
        return name
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def address_text(address: Address) -> str:
    """``address`` for an address header: ``a@b.example`` or ``Name <a@b.example>``."""
    if not address.display_name:
        return address.addr_spec
    return f"{display_name(address.display_name)} <{address.addr_spec}>"


class VerbatimHeader(str):
    """A header value written as it is, folded only at whitespace, never parsed or
    re-encoded by the ``email`` package.

    ``str()`` is what the field means once read back (``intended``): the caller's text for
    an unstructured field, or the address list for an address field. The email package
    writes any header value that has a ``name`` and a ``fold()`` through ``fold()``.
    """

    name: str
    #: The text on the wire, before folding.
    wire: str
    #: For address fields, the (display name, address) pairs a reader must find.
    addresses: tuple[tuple[str, str], ...] | None

    def __new__(
        cls,
        name: str,
        wire: str,
        *,
        intended: str | None = None,
        addresses: tuple[Address, ...] | None = None,
    ) -> VerbatimHeader:
        header = super().__new__(cls, wire if intended is None else intended)
        header.name = name
        header.wire = wire
        header.addresses = None if addresses is None else _pairs(addresses)
        return header

    @classmethod
    def unstructured(cls, name: str, text: str) -> VerbatimHeader:
        """Subject or an extra header: ASCII as it is, anything else (or a word too long
        for a line of 998 octets) as encoded-words."""
        longest = max((len(word) for word in _FOLD_WORD.findall(text)), default=0)
        if needs_encoding(text) or len(name) + 2 + longest > _MAX_LINE:
            return cls(name, " ".join(encoded_words(text)), intended=text)
        return cls(name, text, intended=text)

    @classmethod
    def address_list(cls, name: str, addresses: tuple[Address, ...]) -> VerbatimHeader:
        """From, To, Cc, Reply-To, Sender."""
        wire = ", ".join(address_text(a) for a in addresses)
        return cls(name, wire, intended=wire, addresses=addresses)

    def fold(self, *, policy: Policy) -> str:
        """The header line(s) with their line endings, folded before whitespace."""
        limit = policy.max_line_length or 78
        head = f"{self.name}:"
        lines = [head]
        words = _FOLD_WORD.findall(self.wire)
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


def _pairs(addresses: tuple[Address, ...]) -> tuple[tuple[str, str], ...]:
    return tuple(
        (_WHITESPACE.sub(" ", a.display_name).strip(), a.addr_spec.lower()) for a in addresses
    )


def _same_text(a: str, b: str) -> bool:
    # Folding and unfolding may change runs of whitespace, never anything else.
    return _WHITESPACE.sub(" ", a).strip() == _WHITESPACE.sub(" ", b).strip()


def header_mismatch(msg: EmailMessage, data: bytes) -> str | None:
    """Compare the serialised header block of ``msg`` (``data``) with ``msg``'s fields.

    Returns:
        None when the block holds exactly ``msg``'s fields, in order, with the same
        meaning; otherwise the name of the first field that differs (or ``"headers"``
        when the block has fields ``msg`` has not).
    """
    end = data.find(b"\r\n\r\n")
    block = data[: end + 2] if end >= 0 else data
    try:
        # UTF-8, not the parser's ASCII: an SMTPUTF8 message carries UTF-8 headers.
        parsed = HeaderParser(policy=default_policy).parsestr(block.decode() + "\r\n")
        got = [(name, parsed_value) for name, parsed_value in parsed.items()]
    except Exception:  # a block the parser cannot even read is not what we meant
        return next(iter(msg.keys()), "headers")
    wanted = list(msg.items())
    for (name, value), (got_name, got_value) in zip(wanted, got, strict=False):
        if name.lower() != got_name.lower():
            return name
        try:
            if not _same_value(value, got_value):
                return name
        except Exception:
            return name
    if len(got) != len(wanted):
        return wanted[len(got)][0] if len(got) < len(wanted) else "headers"
    return None


def _same_value(value: object, got: object) -> bool:
    if isinstance(value, VerbatimHeader) and value.addresses is not None:
        found: tuple[Address, ...] = getattr(got, "addresses", ())  # registry AddressHeader
        return _pairs(found) == value.addresses
    return _same_text(str(value), str(got))
