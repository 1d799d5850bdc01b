"""SMTP replies: the code comes from the last line (RFC 5321 §4.2.1)."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: RFC 3463 status: class.subject.detail, at the start of the reply text.
_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?:\s|$)")
#: Queue ids as Postfix, Exim, Sendmail and most providers print them after 250.
_QUEUE_ID = re.compile(r"(?:queued as|id=|queue id)\s*<?([A-Za-z0-9._@-]+)>?", re.IGNORECASE)


@dataclass(frozen=True)
class Reply:
    """A complete (possibly multi-line) server reply.

    Attributes:
        code: the reply code of the LAST line; ``-1`` if it was not a number.
        lines: each line's text without the code and separator.
        enhanced_code: RFC 3463 status (``"2.0.0"``) when the server offers
            ENHANCEDSTATUSCODES and put one in front of the last line.
    """

    code: int
    lines: tuple[str, ...]
    enhanced_code: str | None = None

    @property
    def text(self) -> str:
        """All lines joined with newlines, enhanced code included as sent."""
        return "\n".join(self.lines)

    @property
    def ok(self) -> bool:
        """2xx or 3xx: the command was accepted."""
        return 200 <= self.code < 400

    @property
    def too_many_recipients(self) -> bool:
        """The server's limit of recipients per transaction is reached: the rest may
        go in another transaction at once (RFC 5321 §4.5.3.1.10).

        That is 452 (or 552 from servers that follow RFC 821's error) with RFC
        3463's X.5.3 "too many recipients", or saying so in words: a 452 for a
        full mailbox or a full disk is not one.
        """
        if self.code not in (452, 552):
            return False
        status = self.enhanced_code or (self.lines[-1].split(" ", 1)[0] if self.lines else "")
        return status.endswith(".5.3") or "too many recipients" in self.text.lower()

    @property
    def queue_id(self) -> str | None:
        """The server's queue id for an accepted message, when it gives one."""
        match = _QUEUE_ID.search(self.text)
        return match.group(1) if match else None

    def __str__(self) -> str:
        return f"{self.code} {self.text}".rstrip()

    @classmethod
    def parse(cls, code: int, raw_lines: list[bytes], *, enhanced: bool) -> Reply:
        """Build a reply from the raw lines smtplib read (``b"250-text\\r\\n"``)."""
        texts = tuple(line[4:].rstrip(b"\r\n").decode("utf-8", "replace") for line in raw_lines)
        status = None
        if enhanced and texts and 200 <= code < 600:
            match = _ENHANCED.match(texts[-1])
            # The class must agree with the reply code, else it is not a status.
            if match and match.group(1) == str(code)[0]:
                status = ".".join(match.groups())
        return cls(code, texts, status)
