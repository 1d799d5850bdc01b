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
from typing import Final
from urllib.parse import quote

from mailworker.message import _registry

#: Encoded-word payload bytes per word: 45 bytes are 60 base64 characters, so a word
#: (``=?utf-8?b?`` + 60 + ``?=``) stays within RFC 2047's 75 characters.
_WORD_BYTES: Final = 45
_FOLD_WORD = re.compile(r"[ \t]*[^ \t]+|[ \t]+")
#: RFC 5322 §2.1.1: a line is at most 998 octets plus CRLF.
_MAX_LINE: Final = 998
# RFC 5322 atext plus space: a display name of these needs no quoting.
_PHRASE_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~ ]*")
_WHITESPACE = re.compile(r"\s+")
# A file name that can go in a quoted-string as it is.
_SAFE_NAME = re.compile(r"[ !#-\[\]-~]+")
# RFC 2231 attribute-char, less '%' (quote() adds it for escapes).
_ATTR_CHARS = "!#$&+-.^_`|~"
#: Characters of an RFC 2231 continuation, so each ``filename*N*=`` fits a line.
_PIECE = 60


def needs_encoding(text: str) -> bool:
    """Whether ``text`` must be written as encoded-words: it is not ASCII, or a reader
    would take part of it for an encoded-word and decode it."""
    return not text.isascii() or "=?" in text


def _longest_word(text: str) -> int:
    return max((len(word) for word in _FOLD_WORD.findall(text)), default=0)


def encoded_words(text: str) -> list[str]:
    """``text`` as RFC 2047 base64 encoded-words, never splitting a character, and
    breaking before a space where one is near: the space then starts the next word, so a
    reader that drops the whitespace between encoded-words (RFC 2047 section 6.2) and
    one that keeps a space there (Python's address parser) both read the words apart."""
    chunks: list[str] = []
    chunk = ""
    size = 0
    for char in text:
        width = len(char.encode("utf-8"))
        if size + width > _WORD_BYTES:
            cut = chunk.rfind(" ")
            head, chunk = (chunk[:cut], chunk[cut:]) if cut > 0 else (chunk, "")
            chunks.append(head)
            size = len(chunk.encode("utf-8"))
        chunk += char
        size += width
    chunks.append(chunk)
    return [f"=?utf-8?b?{base64.b64encode(c.encode()).decode('ascii')}?=" for c in chunks]


def display_name(name: str) -> str:
    """A display name as a phrase: atoms, a quoted string, or encoded-words (also for a
    word too long to fit a line of 998 octets, as encoded-words can be folded)."""
    if needs_encoding(name) or _longest_word(name) > _MAX_LINE // 2:
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
    #: For MIME fields, the parameters a reader must find (decoded).
    params: dict[str, str] | None

    def __new__(
        cls,
        name: str,
        wire: str,
        *,
        intended: str | None = None,
        addresses: tuple[Address, ...] | None = None,
        params: dict[str, str] | None = None,
    ) -> VerbatimHeader:
        header = super().__new__(cls, wire if intended is None else intended)
        header.name = name
        header.wire = wire
        header.addresses = None if addresses is None else _pairs(addresses)
        header.params = params
        return header

    @classmethod
    def unstructured(cls, name: str, text: str) -> VerbatimHeader:
        """Subject or an extra header: ASCII as it is, anything else (or a word too long
        for a line of 998 octets) as encoded-words."""
        if needs_encoding(text) or len(name) + 2 + _longest_word(text) > _MAX_LINE:
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
    # Whitespace is left out of display names: RFC 2047 readers drop it between
    # adjacent encoded-words, Python's address parser keeps a space there.
    return tuple((_WHITESPACE.sub("", a.display_name), a.addr_spec.lower()) for a in addresses)


def _same_text(a: str, b: str) -> bool:
    # Folding and unfolding may change runs of whitespace, never anything else.
    return _WHITESPACE.sub(" ", a).strip() == _WHITESPACE.sub(" ", b).strip()


def header_mismatch(msg: EmailMessage, data: bytes) -> str | None:
    """Compare the serialised header block of ``msg`` (``data``) and of each of its
    parts with the fields they were built with.

    Returns:
        None when every block holds exactly its part's fields, in order, with the same
        meaning; otherwise the name of the first field that differs (or ``"headers"``
        when a block has fields the part has not).
    """
    end = data.find(b"\r\n\r\n")
    differs = _block_mismatch(msg, data[: end + 2] if end >= 0 else data)
    for part in msg.walk():
        if differs is not None:
            return differs
        if part is not msg:
            # Folded exactly as the generator writes it, headers only (no body copy).
            block = "".join(part.policy.fold(name, value) for name, value in part.items())
            differs = _block_mismatch(part, block.encode())
    return differs


def _block_mismatch(part: EmailMessage, block: bytes) -> str | None:
    try:
        # UTF-8, not the parser's ASCII: an SMTPUTF8 message carries UTF-8 headers.
        parsed = HeaderParser(policy=_registry.READ_BACK).parsestr(block.decode() + "\r\n")
        got = list(parsed.items())
    except Exception:  # a block the parser cannot even read is not what we meant
        return next(iter(part.keys()), "headers")
    wanted = list(part.items())
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
    if isinstance(value, VerbatimHeader) and value.params is not None:
        # A registry ParameterizedMIMEHeader: its parameters, decoded (RFC 2231).
        return dict(getattr(got, "params", {})) == value.params
    return _same_text(str(value), str(got))


def disposition(kind: str, filename: str) -> VerbatimHeader:
    """``Content-Disposition: attachment; filename=...`` written by us: a plain quoted
    name when that is safe, else RFC 2231 percent-encoding (``filename*0*=utf-8''...``)
    in continuations, which no reader decodes into anything but the name."""
    if filename.isascii() and _SAFE_NAME.fullmatch(filename) and "=?" not in filename:
        wire = f'{kind}; filename="{filename}"'
    else:
        # Whole characters per continuation, so none ends inside a %XX escape.
        pieces = [""]
        for char in filename:
            escaped = quote(char.encode("utf-8"), safe=_ATTR_CHARS)
            if len(pieces[-1]) + len(escaped) > _PIECE:
                pieces.append("")
            pieces[-1] += escaped
        pieces[0] = "utf-8''" + pieces[0]  # the charset, and no language
        wire = "; ".join([kind, *(f"filename*{n}*={p}" for n, p in enumerate(pieces))])
    return VerbatimHeader("Content-Disposition", wire, params={"filename": filename})
