"""Commands written ahead of their replies (RFC 2920), in bounded windows.

One :class:`Pipeline` serves a connection for a whole send: the commands of one
transaction or of many follow each other, and every reply is handed to the command
it answers, in order. What may be written ahead is bounded three ways:

- at most ``PIPELINE_WINDOW`` bytes of commands unanswered (RFC 2920 §3.1: a client
  that blocks on writes must keep within the TCP window, or both sides can end up
  blocked writing to each other); more goes whenever half of it is answered;
- message content (a BDAT chunk, or DATA's content once 354 came) goes right after
  the command it belongs to: it is read by the server without a reply per line,
  so it cannot fill our receive buffer however large it is; but at most
  ``TAIL_BUDGET`` bytes of it are written ahead of their replies, which bounds what
  a dropped connection leaves in doubt;
- DATA's content is *held*: nothing after DATA is written until the 354 came and
  the content is released (DATA ends a command group, RFC 2920 §3.1).

Without PIPELINING every command waits for the reply to the one before (lock-step).
"""

from __future__ import annotations

import smtplib
import ssl
from collections import deque
from dataclasses import dataclass, field

from mailworker.smtp._client import BLOCK, EARLY_REPLY_WAIT, PIPELINE_WINDOW, Client
from mailworker.smtp.reply import Reply
from mailworker.smtp.transcript import Transcript

#: Most bytes of message content written ahead of their replies (see above).
TAIL_BUDGET = 1024 * 1024


@dataclass(eq=False)
class Command:
    """One command line, optionally followed by message content.

    Attributes:
        line: the command without CRLF; empty for DATA's content (written as is).
        tail: bytes written right after the line: a BDAT chunk, or DATA's content
            with its end-of-data marker once released.
        size: the content size shown in the transcript (``<message content, n bytes>``).
        held: DATA's content before the 354: nothing from here on is written.
        transcript: where the command and its reply are recorded.
    """

    line: str
    tail: bytes = b""
    size: int | None = None
    held: bool = False
    transcript: Transcript | None = None
    written: bool = False
    #: The whole tail was written (handed to the kernel): from here on a missing
    #: verdict means the server may have the message.
    sent: bool = False
    dropped: bool = False
    answered: bool = False

    @property
    def cost(self) -> int:
        """Bytes counted against the window: the line (a reply comes per command)."""
        return len(self.line.encode("utf-8")) + 2


@dataclass
class Pipeline:
    """Commands queued for one connection, written ahead of their replies within
    the bounds above; :meth:`reply` hands out the replies in order."""

    client: Client
    pipelining: bool
    _unsent: deque[Command] = field(default_factory=deque)
    _unanswered: deque[Command] = field(default_factory=deque)
    _in_flight: int = 0
    _tails: int = 0
    #: The write that failed (the server stopped reading); replies already sent
    #: may still be read, no more is written.
    _broken: BaseException | None = None

    def add(self, commands: list[Command]) -> None:
        """Queue commands behind those already queued."""
        self._unsent.extend(commands)

    @property
    def queued(self) -> int:
        """Bytes of commands queued or written and not answered."""
        return self._in_flight + sum(c.cost for c in self._unsent if not c.dropped)

    @property
    def tails(self) -> int:
        """Bytes of content queued or written and not answered."""
        return self._tails + sum(len(c.tail) for c in self._unsent if not c.dropped)

    @property
    def idle(self) -> bool:
        """Nothing queued, nothing unanswered."""
        return not self._unanswered and not any(not c.dropped for c in self._unsent)

    def drop(self, command: Command) -> None:
        """Do not write ``command`` (it is not written yet)."""
        assert not command.written
        command.dropped = True

    def release(self, command: Command, tail: bytes) -> None:
        """Let held content go: ``tail`` is written in its place."""
        command.held = False
        command.tail = tail

    def reply(self, command: Command) -> Reply:
        """The reply to ``command``, after writing what the bounds allow.

        Raises:
            smtplib.SMTPException, OSError: the exchange failed (the session must go).
        """
        self.fill()
        if not self._unanswered or self._unanswered[0] is not command:
            raise RuntimeError("replies read out of order")  # a bug of ours
        client = self.client
        if command.transcript is not None:
            client.transcript = command.transcript
        if self._broken is not None:
            # The server stopped reading: a refusal it wrote first beats the
            # "broken pipe"; without one, the write's failure is the story.
            client.set_timeout(EARLY_REPLY_WAIT)
            try:
                reply = client.reply()
            except (OSError, smtplib.SMTPException):
                raise self._broken from None
            if reply.ok and command.tail and not command.sent:
                # Acceptance of content that never fully went out is no verdict.
                raise smtplib.SMTPResponseException(reply.code, b"reply before the end of data")
        else:
            reply = client.reply()
        self._unanswered.popleft()
        self._in_flight -= command.cost
        self._tails -= len(command.tail)
        command.answered = True
        return reply

    def fill(self) -> None:
        """Write queued commands as far as the bounds allow."""
        if self._broken is not None:
            return
        if self.pipelining:
            if self._unanswered and self._in_flight > PIPELINE_WINDOW // 2:
                return
        elif self._unanswered:
            return
        batch: list[Command] = []
        while self._unsent:
            command = self._unsent[0]
            if command.dropped:
                self._unsent.popleft()
                continue
            if command.held:
                break
            busy = bool(batch or self._unanswered)
            if busy and not self.pipelining:
                break
            if busy and self._in_flight + command.cost > PIPELINE_WINDOW:
                break
            if busy and command.tail and self._tails + len(command.tail) > TAIL_BUDGET:
                break
            self._unsent.popleft()
            batch.append(command)
            self._unanswered.append(command)
            self._in_flight += command.cost
            self._tails += len(command.tail)
        if batch:
            self._write(batch)

    def _write(self, batch: list[Command]) -> None:
        """Write the commands and their content, in as few writes as size allows."""
        client = self.client
        pending = bytearray()
        carried: list[Command] = []  # commands whose content is in ``pending``
        try:
            for command in batch:
                command.written = True
                if command.line:
                    if "\r" in command.line or "\n" in command.line:
                        raise ValueError("command contains CR or LF")
                    if command.transcript is not None:
                        client.transcript = command.transcript
                    client.record_command(command.line)
                    pending += command.line.encode("utf-8") + b"\r\n"
                if command.tail:
                    client.transcript.client(f"<message content, {command.size} bytes>")
                    if len(pending) + len(command.tail) <= BLOCK:
                        pending += command.tail
                        carried.append(command)
                    else:
                        self._flush(pending, carried)
                        client.in_content = True
                        view = memoryview(command.tail)
                        for start in range(0, len(view), BLOCK):
                            client.send_raw(view[start : start + BLOCK])
                        client.in_content = False
                        command.sent = True
                    if not command.line:  # DATA's content ends with its marker
                        client.transcript.client(".")
            self._flush(pending, carried)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError) as exc:
            client.in_content = False
            self._broken = exc

    def _flush(self, pending: bytearray, carried: list[Command]) -> None:
        """Write ``pending``; the content it carries is then sent."""
        if not pending:
            return
        # A write cut off inside content must not be followed by QUIT.
        self.client.in_content = bool(carried)
        self.client.send_raw(bytes(pending))
        self.client.in_content = False
        for command in carried:
            command.sent = True
        pending.clear()
        carried.clear()
