"""What was said on the wire, line by line, with secrets and content left out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

#: Replaces AUTH payloads and anything else secret.
REDACTED = "****"


@dataclass(frozen=True)
class TranscriptLine:
    """One line of an SMTP exchange.

    ``str(line)`` gives the familiar ``"C: MAIL FROM:<a@example.com>"`` form.
    """

    direction: Literal["C", "S"]
    text: str
    #: Wall-clock time (``time.time()``) the line was sent or received.
    at: float

    def __str__(self) -> str:
        return f"{self.direction}: {self.text}"


@dataclass
class Transcript:
    """The lines of one SMTP session, or of one message within it."""

    lines: list[TranscriptLine] = field(default_factory=list)

    def client(self, text: str) -> None:
        """Record a line we sent."""
        self.lines.append(TranscriptLine("C", text, time.time()))

    def server(self, text: str) -> None:
        """Record a line the server sent."""
        self.lines.append(TranscriptLine("S", text, time.time()))

    def as_strings(self) -> list[str]:
        """The lines as ``C: ...`` / ``S: ...`` strings (JSON-friendly)."""
        return [str(line) for line in self.lines]

    def __len__(self) -> int:
        return len(self.lines)
