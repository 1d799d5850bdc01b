"""One mail transaction on a :class:`~mailworker.smtp._pipeline.Pipeline`: RSET
(when the session may hold a transaction of unknown fate), MAIL, RCPT..., then the
content, by DATA or by BDAT (CHUNKING, RFC 3030).

With BDAT the whole transaction is one group: ``BDAT <n> LAST`` and the chunk
follow the RCPTs at once (BDAT does not end a command group), so with PIPELINING a
message takes one round trip. The chunk is not dot-stuffed: the server reads
exactly ``n`` octets. With DATA the content waits for the 354.

When is a failure *in doubt* (the server may have the message)? When all of the
content was written (DATA's content with its final dot; BDAT's whole chunk) and no
verdict came back. That is the DATA rule, and it carries over to BDAT for the same
reason: a server acts on the content only once it has all of it (the final dot;
the n-th octet of the LAST chunk). A connection that closes while the chunk is
being written leaves the server short of octets: it cannot have accepted the
message. With BDAT the chunk may be written before the RCPT replies are read, so
a drop while reading *any* reply of the transaction is in doubt once the chunk
went out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from mailworker.errors import SMTPError, SMTPReplyError, Stage
from mailworker.smtp._pipeline import Command, Pipeline
from mailworker.smtp.body import Payload
from mailworker.smtp.profile import Timeouts
from mailworker.smtp.reply import Reply
from mailworker.smtp.transcript import Transcript

#: Runs one step under the stage's timeout, mapping I/O failures to SMTPError.
StageGuard = Callable[[Stage, float], AbstractContextManager[None]]
#: The RCPT TO parameters for an address (DSN's ``NOTIFY=`` and ``ORCPT=``).
RcptParams = Callable[[str], Sequence[str]]

#: Replies to BDAT that say the server does not know it after all (RFC 5321 §4.2.4).
NOT_RECOGNISED = (500, 502, 504)


class ChunkingRefused(SMTPReplyError):
    """The server offered CHUNKING and then did not recognise BDAT; the message
    must go again with DATA (nothing was accepted)."""


@dataclass(eq=False)
class Attempt:
    """One transaction for some of the recipients (indices into the envelope),
    filled in as replies come, so what was answered is known if it fails midway.

    Attributes:
        content: ``BDAT <n> LAST`` with its chunk, or DATA's (held) content.
        data: the DATA command; None with BDAT.
        final: the verdict on the content; None while nothing was delivered.
    """

    recipients: list[int]
    mail: Command
    rcpts: list[Command]
    content: Command
    data: Command | None = None
    reset: Command | None = None
    rcpt: list[Reply] = field(default_factory=list)
    final: Reply | None = None
    payload: Payload | None = None

    @property
    def chunking(self) -> bool:
        return self.data is None

    def commands(self) -> list[Command]:
        """What to queue on the pipeline, in order."""
        head = [self.reset] if self.reset is not None else []
        tail = [self.data] if self.data is not None else []
        return [*head, self.mail, *self.rcpts, *tail, self.content]

    @property
    def sent(self) -> bool:
        """All of the content went out."""
        return self.content.sent

    @property
    def undecided(self) -> bool:
        """The content went out and its verdict did not come back."""
        return self.content.sent and not self.content.answered


def attempt(
    mail: str,
    rcpts: list[str],
    recipients: list[int],
    payload: Payload,
    *,
    chunking: bool,
    reset_first: bool,
    transcript: Transcript,
) -> Attempt:
    """An attempt's commands, recorded into ``transcript``."""

    def command(line: str, **options: object) -> Command:
        return Command(line, transcript=transcript, **options)  # type: ignore[arg-type]

    size = len(payload.data)
    if chunking:
        content = command(f"BDAT {size} LAST", tail=payload.data, size=size)
        data = None
    else:
        content = command("", held=True, size=size)
        data = command("DATA")
    return Attempt(
        recipients=recipients,
        mail=command(mail),
        rcpts=[command(line) for line in rcpts],
        content=content,
        data=data,
        reset=command("RSET") if reset_first else None,
        payload=payload,
    )


def read(attempt: Attempt, pipe: Pipeline, guard: StageGuard, timeouts: Timeouts) -> None:
    """Read the attempt's replies (writing more as the pipeline allows).

    Returns with ``attempt.final`` None when no recipient was accepted (the
    transaction is then still open).

    Raises:
        SMTPReplyError: the sender, DATA or the content was refused (every reply of
            the attempt was read first, so the pipeline stays in step).
        ChunkingRefused: BDAT was not recognised.
        SMTPError: any other failure; ``in_doubt`` when the content went out and
            its verdict did not come back.
    """
    try:
        _read(attempt, pipe, guard, timeouts)
    except SMTPError as exc:
        # All of the message went out and no verdict came back: the server may well
        # have accepted it, so sending it again at once risks a duplicate.
        exc.in_doubt = exc.in_doubt or (exc.code is None and attempt.undecided)
        raise


def _read(attempt: Attempt, pipe: Pipeline, guard: StageGuard, timeouts: Timeouts) -> None:
    if attempt.reset is not None:
        # A refused RSET shows in the MAIL reply that follows (503).
        with guard("reset", timeouts.command):
            _unless_closing(pipe.reply(attempt.reset), "reset")
    with guard("mail", timeouts.mail):
        mail = _unless_closing(pipe.reply(attempt.mail), "mail")
    if not mail.ok:
        _drop_unwritten(pipe, attempt.rcpts)
    for position, command in enumerate(attempt.rcpts):
        if command.dropped:
            break
        with guard("rcpt", timeouts.rcpt):
            reply = _unless_closing(pipe.reply(command), "rcpt")
        attempt.rcpt.append(reply)
        if reply.too_many_recipients:
            _drop_unwritten(pipe, attempt.rcpts[position + 1 :])
    accepted = mail.ok and accepted_any(attempt.rcpt)
    if not accepted:  # DATA's content waits for the DATA reply
        _drop_unwritten(pipe, [attempt.data or attempt.content])
    data_reply = None
    if attempt.data is not None and attempt.data.dropped:
        pipe.drop(attempt.content)
    elif attempt.data is not None:
        with guard("data", timeouts.data_init):
            data_reply = _unless_closing(pipe.reply(attempt.data), "data")
        if data_reply.code == 354:
            assert attempt.payload is not None
            # Nothing to deliver, yet the server opened DATA: close it with an empty
            # body (RFC 2920 §3.1), and let RSET discard it.
            pipe.release(attempt.content, attempt.payload.stuffed if accepted else b".\r\n")
            with guard("data", timeouts.data_block):
                pipe.fill()
        else:
            pipe.drop(attempt.content)
    final = None
    if not attempt.content.dropped:
        with guard("data", timeouts.data_end):
            final = pipe.reply(attempt.content)
    if not mail.ok:
        error = reply_error("server refused the sender", "mail", mail)
        if final is not None and final.ok:
            # Taken all the same, into whatever transaction the server held: not to
            # be sent again.
            error.in_doubt = True
        raise error
    if not accepted:
        return  # a BDAT's refusal ("no valid recipients") read and set aside
    if data_reply is not None and data_reply.code != 354:
        raise reply_error("server refused DATA", "data", data_reply)
    assert final is not None
    if not final.ok:
        if attempt.chunking and final.code in NOT_RECOGNISED:
            raise ChunkingRefused(
                "server offered CHUNKING but did not recognise BDAT",
                stage="data",
                code=final.code,
                enhanced_code=final.enhanced_code,
                reply=final.text,
            )
        raise reply_error("server refused the message", "data", final)
    attempt.final = final


def _drop_unwritten(pipe: Pipeline, commands: Sequence[Command]) -> None:
    for command in commands:
        if not command.written and not command.dropped:
            pipe.drop(command)


def _unless_closing(reply: Reply, stage: Stage) -> Reply:
    # 421: the server is shutting this session down; nothing more will be answered.
    if reply.code == 421:
        raise reply_error("server is closing the session", stage, reply)
    return reply


def accepted_any(replies: Sequence[Reply]) -> bool:
    """Whether any of the RCPT replies accepted its recipient."""
    return any(r.ok for r in replies)


def reply_error(message: str, stage: Stage, reply: Reply) -> SMTPReplyError:
    """The error for a refusing reply."""
    return SMTPReplyError(
        message,
        stage=stage,
        code=reply.code,
        enhanced_code=reply.enhanced_code,
        reply=reply.text,
    )
