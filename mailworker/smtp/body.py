"""Message bodies on the wire: CRLF only, dot-stuffed for DATA (RFC 5321 §4.1.1.4,
§4.5.2), as they are for BDAT (RFC 3030).

SMTP smuggling works by getting a server to see an end-of-data sequence the
client did not mean to send (``<LF>.<LF>``, ``<CR>.<CR>``, ``<LF>.<CR><LF>``).
We turn every bare CR and bare LF into CRLF first, so the only line ending on
the wire is CRLF, then double every leading dot; the one ``<CRLF>.<CRLF>``
that remains is the one we append.

BDAT sends the content as a counted chunk: nothing in it can end it early, so it
is not dot-stuffed; line endings are still normalised (RFC 5322 allows no bare CR
or LF, and the server may hand the message on over DATA).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)

#: The end-of-data marker.
END_OF_DATA = b".\r\n"


def normalise_line_endings(message: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF becomes CRLF; the result ends with CRLF."""
    data = _LINE_ENDINGS.sub(b"\r\n", message)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def dot_stuff(message: bytes, *, normalised: bool = False) -> bytes:
    """The DATA payload for ``message``, ending with ``<CRLF>.<CRLF>``.

    Line endings are normalised first (unless ``normalised`` says they already
    are), so only CRLF separates lines and ``^.`` in ``MULTILINE`` mode matches
    exactly the starts of SMTP lines.
    """
    data = message if normalised else normalise_line_endings(message)
    return _LEADING_DOT.sub(b"..", data) + END_OF_DATA


def is_8bit(message: bytes) -> bool:
    """Whether the message has octets above 127 (needs 8BITMIME)."""
    return not message.isascii()


@dataclass(frozen=True)
class Payload:
    """A message's content in wire form: ``data`` CRLF-normalised (sent as it is by
    BDAT), dot-stuffed with its end-of-data marker on demand (for DATA)."""

    data: bytes

    @functools.cached_property
    def stuffed(self) -> bytes:
        """The DATA payload."""
        return dot_stuff(self.data, normalised=True)
