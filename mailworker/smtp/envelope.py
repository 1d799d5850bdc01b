"""The mail transaction: MAIL, RCPT..., then the content (RFC 5321 §3.3).

With PIPELINING (RFC 2920) MAIL, every RCPT and DATA leave together and the
replies are read back in order: two round trips per message instead of three
plus one per recipient. They are written in windows of unanswered commands no
larger than the TCP window (RFC 2920 §3.1), for a client that writes thousands
of RCPTs before reading would block on a server blocked writing their replies.
Without PIPELINING, strict lock-step.

A server may take fewer recipients per transaction than a message has: it
answers 452 "too many recipients" and the rest go at once in further
transactions on the same session, with the same content (RFC 5321 §4.5.3.1.10).

The content transfer sits behind :class:`ContentTransfer` so that BDAT
(CHUNKING, RFC 3030) can be added as a second implementation: it would send no
initiation command and write the content as sized chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from mailworker.errors import (
    InvalidMessageError,
    SMTPError,
    SMTPNotSupportedError,
    SMTPRecipientsRefused,
    SMTPReplyError,
    Stage,
)
from mailworker.smtp._client import Client, Pipeline
from mailworker.smtp.body import is_8bit
from mailworker.smtp.profile import Timeouts
from mailworker.smtp.reply import Reply
from mailworker.smtp.result import RecipientResult, RecipientStatus

#: Runs one step under the stage's timeout, mapping I/O failures to SMTPError.
StageGuard = Callable[[Stage, float], AbstractContextManager[None]]
#: The RCPT TO parameters for an address (DSN's ``NOTIFY=`` and ``ORCPT=``).
RcptParams = Callable[[str], Sequence[str]]


@dataclass(frozen=True)
class Envelope:
    """Who a message is from and to, and what the server must support for it."""

    sender: str
    recipients: tuple[str, ...]
    size: int
    eight_bit: bool
    utf8: bool


@dataclass(frozen=True)
class Outcome:
    """The server's verdict on a message, over one transaction or several.

    Attributes:
        recipients: every recipient's result, in the envelope's order.
        replies: the final reply of each transaction that delivered the message.
        error: a failure after an earlier transaction delivered the message (so
            not raised); the recipients it concerns are deferred or rejected in
            ``recipients``, and the session must be reset or dropped as after any
            failure.
    """

    recipients: tuple[RecipientResult, ...]
    replies: tuple[Reply, ...]
    size: int
    error: SMTPError | None = None


@dataclass
class _Attempt:
    """One transaction for some of the recipients (indices into the envelope),
    filled in as replies come, so what was answered is known if it fails midway."""

    recipients: list[int]
    rcpt: list[Reply] = field(default_factory=list)
    #: The verdict on the content; None while nothing was delivered.
    final: Reply | None = None


def build_envelope(sender: str, recipients: Sequence[str], message: bytes) -> Envelope:
    """Check the addresses and work out what the message needs from the server.

    Raises:
        InvalidMessageError: an address could smuggle a command (CR, LF, <>, spaces).
    """
    if isinstance(recipients, str):
        raise InvalidMessageError("recipients", "must be a list of addresses, not a string")
    if not recipients:
        raise InvalidMessageError("recipients", "at least one recipient is required")
    for name, address in [("envelope_from", sender)] + [
        (f"recipients[{i}]", r) for i, r in enumerate(recipients)
    ]:
        if any(c in address for c in "\r\n<> \t\0"):
            raise InvalidMessageError(
                name, f"{address!r} must be a bare address without CR, LF, spaces or <>"
            )
        if address == "" and name != "envelope_from":
            raise InvalidMessageError(name, "empty address")
    return Envelope(
        sender=sender,
        recipients=tuple(recipients),
        size=len(message),
        eight_bit=is_8bit(message),
        # RFC 6532: UTF-8 in addresses or in the header block needs SMTPUTF8.
        utf8=not (
            sender.isascii()
            and all(r.isascii() for r in recipients)
            and message.partition(b"\r\n\r\n")[0].isascii()
        ),
    )


def mail_params(envelope: Envelope, features: dict[str, str]) -> list[str]:
    """The MAIL FROM parameters for ``envelope`` given the server's EHLO ``features``.

    Raises:
        SMTPNotSupportedError: the message needs an extension the server lacks (or
            is larger than its SIZE); nothing has been sent.
    """
    params = []
    limit = features.get("size", "")
    # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
    if limit.isascii() and limit.isdigit() and 0 < int(limit) < envelope.size:
        raise SMTPNotSupportedError(
            f"message is {envelope.size} bytes; the server accepts at most {limit} (SIZE)",
            stage="mail",
        )
    if "size" in features:
        params.append(f"SIZE={envelope.size}")
    if envelope.utf8:
        if "smtputf8" not in features:
            raise SMTPNotSupportedError(
                "a non-ASCII address or raw UTF-8 in the headers needs SMTPUTF8 "
                "(RFC 6531/6532), which the server does not offer; encode headers "
                "as RFC 2047 words instead",
                stage="mail",
            )
        params.append("SMTPUTF8")
    if envelope.eight_bit:
        if "8bitmime" not in features:
            raise SMTPNotSupportedError(
                "the message has 8-bit content and the server does not offer 8BITMIME; "
                "encode it as quoted-printable or base64",
                stage="mail",
            )
        params.append("BODY=8BITMIME")
    return params


class ContentTransfer(Protocol):
    """How the message content is handed over after the envelope."""

    #: The command that opens the content transfer (``"DATA"``), or None.
    initiation: str | None

    def send(
        self, client: Client, payload: bytes, size: int, guard: StageGuard, timeouts: Timeouts
    ) -> Reply:
        """Write the content and return the server's final reply."""


class DataTransfer:
    """DATA with dot-stuffed content (RFC 5321 §4.1.1.4)."""

    initiation: str | None = "DATA"

    def send(
        self, client: Client, payload: bytes, size: int, guard: StageGuard, timeouts: Timeouts
    ) -> Reply:
        with guard("data", timeouts.data_block):
            early = client.send_content(payload, size)
        if early is not None:
            return early
        try:
            with guard("data", timeouts.data_end):
                return client.reply()
        except SMTPError as exc:
            # All of the message went out and no verdict came back: the server may
            # well have accepted it, so sending it again at once risks a duplicate.
            exc.in_doubt = exc.code is None
            raise


def exchange(
    client: Client,
    envelope: Envelope,
    *,
    params: Sequence[str],
    payload: bytes,
    timeouts: Timeouts,
    guard: StageGuard,
    transfer: ContentTransfer | None = None,
    rcpt_params: RcptParams | None = None,
) -> Outcome:
    """Deliver the message on a connected, greeted session: one transaction, or as
    many as the server's limit of recipients per transaction needs.

    ``params`` go on MAIL FROM, ``rcpt_params(address)`` on each RCPT TO; the caller
    has checked that the server offers the extensions they belong to.

    Raises:
        SMTPReplyError: the sender, DATA or the content was refused.
        SMTPRecipientsRefused: no recipient was accepted.
        SMTPError: any other failure, as long as nothing was delivered; after that
            a failure is returned in ``Outcome.error``, never raised, for the
            recipients delivered before must not be sent the message again.
    """
    if transfer is None:
        transfer = DataTransfer()
    addresses = envelope.recipients
    results = [RecipientResult(a, "deferred", -1, "not sent") for a in addresses]
    replies: list[Reply] = []
    pending = list(range(len(addresses)))
    limit: int | None = None  # recipients per transaction, once the server showed it
    open_transaction = False
    while pending:
        attempt = _Attempt(pending if limit is None else pending[:limit])
        try:
            if open_transaction:
                _reset(client, guard, timeouts)
            _transaction(
                client,
                envelope,
                attempt,
                params=params,
                payload=payload,
                timeouts=timeouts,
                guard=guard,
                transfer=transfer,
                rcpt_params=rcpt_params,
            )
        except SMTPError as exc:
            if not replies:
                raise
            for k, index in enumerate(pending):
                own = attempt.rcpt[k] if k < len(attempt.rcpt) else None
                if own is None or own.ok or own.too_many_recipients:
                    results[index] = _failed(addresses[index], exc, own)
                else:  # refused on its own account
                    results[index] = _recipient(addresses[index], own)
            return Outcome(tuple(results), tuple(replies), envelope.size, error=exc)
        if attempt.final is not None:
            replies.append(attempt.final)
        answered = attempt.rcpt
        first, full = next(
            ((k, r) for k, r in enumerate(answered) if r.too_many_recipients), (0, None)
        )
        settled = False
        left = []
        for k, index in enumerate(attempt.recipients):
            reply = answered[k] if k < len(answered) else full
            assert reply is not None  # only a full server leaves recipients unasked
            results[index] = _recipient(addresses[index], reply)
            if reply.too_many_recipients:
                left.append(index)
            else:
                settled = True
        if full is not None:
            limit = first if limit is None else min(limit, first)
        pending = left + pending[len(attempt.recipients) :]
        open_transaction = attempt.final is None
        if not settled or limit == 0:
            break  # no progress: the rest stay deferred, for a later retry
    if not replies:
        raise SMTPRecipientsRefused(
            "server refused every recipient",
            refused={o.recipient: (o.code, o.enhanced_code, o.reply) for o in results},
        )
    if open_transaction:  # the last one delivered nothing
        try:
            _reset(client, guard, timeouts)
        except SMTPError as exc:
            return Outcome(tuple(results), tuple(replies), envelope.size, error=exc)
    return Outcome(tuple(results), tuple(replies), envelope.size)


def _reset(client: Client, guard: StageGuard, timeouts: Timeouts) -> None:
    """RSET a transaction that delivered nothing, before the next one."""
    with guard("reset", timeouts.command):
        reply = client.command("RSET")
    if reply.code != 250:
        raise _reply_error("server refused RSET", "reset", reply)


def _transaction(
    client: Client,
    envelope: Envelope,
    attempt: _Attempt,
    *,
    params: Sequence[str],
    payload: bytes,
    timeouts: Timeouts,
    guard: StageGuard,
    transfer: ContentTransfer,
    rcpt_params: RcptParams | None = None,
) -> None:
    """MAIL, RCPT for the attempt's recipients and, if any was accepted, the content.

    Returns with ``attempt.final`` None when no recipient was accepted (the
    transaction is then still open).
    """
    mail = "MAIL FROM:<{}>{}".format(envelope.sender, "".join(f" {p}" for p in params))
    rcpts = []
    for i in attempt.recipients:
        address = envelope.recipients[i]
        extra = rcpt_params(address) if rcpt_params is not None else ()
        rcpts.append("RCPT TO:<{}>{}".format(address, "".join(f" {p}" for p in extra)))
    send = _pipelined if client.has_extn("pipelining") else _lock_step
    mail_reply, data_reply = send(
        client,
        mail,
        rcpts,
        initiation=transfer.initiation,
        answered=attempt.rcpt,
        guard=guard,
        timeouts=timeouts,
    )
    if not mail_reply.ok:
        raise _reply_error("server refused the sender", "mail", mail_reply)
    if not _accepted(attempt.rcpt):
        return
    if data_reply is not None and data_reply.code != 354:
        raise _reply_error("server refused DATA", "data", data_reply)
    final = transfer.send(client, payload, envelope.size, guard, timeouts)
    if not final.ok:
        raise _reply_error("server refused the message", "data", final)
    attempt.final = final


def _pipelined(
    client: Client,
    mail: str,
    rcpts: list[str],
    *,
    initiation: str | None,
    answered: list[Reply],
    guard: StageGuard,
    timeouts: Timeouts,
) -> tuple[Reply, Reply | None]:
    """The envelope with PIPELINING: replies are read while commands are written,
    and no more RCPTs go once the sender is refused or the server is full."""
    pipe = Pipeline(client, [mail, *rcpts, *([initiation] if initiation else [])])
    with guard("mail", timeouts.mail):
        mail_reply = _unless_closing(pipe.reply(), "mail")
    if not mail_reply.ok:
        pipe.stop()
    for position in range(1, len(rcpts) + 1):
        if not pipe.answers(position):
            break
        with guard("rcpt", timeouts.rcpt):
            reply = _unless_closing(pipe.reply(), "rcpt")
        answered.append(reply)
        if reply.too_many_recipients:
            pipe.stop()
    data_reply = None
    if initiation is not None:
        if pipe.answers(len(rcpts) + 1):
            with guard("data", timeouts.data_init):
                data_reply = pipe.reply()
        elif mail_reply.ok and _accepted(answered):
            # DATA was held back with the RCPTs after a 452: send it now, alone.
            with guard("data", timeouts.data_init):
                data_reply = client.command(initiation)
    nothing_to_deliver = not mail_reply.ok or not _accepted(answered)
    if nothing_to_deliver and data_reply is not None and data_reply.code == 354:
        # The server opened DATA although nothing can be delivered: close it
        # with an empty body (RFC 2920 §3.1) and let RSET discard it.
        with guard("data", timeouts.data_end):
            client.pipeline(["."])
            client.reply()
    return mail_reply, data_reply


def _lock_step(
    client: Client,
    mail: str,
    rcpts: list[str],
    *,
    initiation: str | None,
    answered: list[Reply],
    guard: StageGuard,
    timeouts: Timeouts,
) -> tuple[Reply, Reply | None]:
    """The envelope one command at a time; no more RCPTs once the server is full."""
    with guard("mail", timeouts.mail):
        mail_reply = _unless_closing(client.command(mail), "mail")
    if mail_reply.ok:
        for line in rcpts:
            with guard("rcpt", timeouts.rcpt):
                reply = _unless_closing(client.command(line), "rcpt")
            answered.append(reply)
            if reply.too_many_recipients:
                break
    data_reply = None
    if mail_reply.ok and _accepted(answered) and initiation:
        with guard("data", timeouts.data_init):
            data_reply = client.command(initiation)
    return mail_reply, data_reply


def _unless_closing(reply: Reply, stage: Stage) -> Reply:
    # 421: the server is shutting this session down; nothing more will be answered.
    if reply.code == 421:
        raise _reply_error("server is closing the session", stage, reply)
    return reply


def _accepted(replies: Sequence[Reply]) -> bool:
    return any(r.ok for r in replies)


def _recipient(address: str, reply: Reply) -> RecipientResult:
    status: RecipientStatus
    if reply.ok:
        status = "accepted"
    elif 400 <= reply.code < 500 or reply.too_many_recipients:
        status = "deferred"  # also a 552 "too many" (RFC 5321 §4.5.3.1.10)
    else:
        status = "rejected"
    return RecipientResult(address, status, reply.code, reply.text, reply.enhanced_code)


def _failed(address: str, exc: SMTPError, own: Reply | None) -> RecipientResult:
    """The result of a recipient whose (later) transaction failed with ``exc``."""
    return RecipientResult(
        address,
        "deferred" if exc.is_transient else "rejected",
        exc.code if exc.code is not None else -1,
        exc.reply or exc.message,
        exc.enhanced_code,
        # Content that went out without a verdict may have been delivered.
        in_doubt=exc.in_doubt and own is not None and own.ok,
    )


def _reply_error(message: str, stage: Stage, reply: Reply) -> SMTPReplyError:
    return SMTPReplyError(
        message,
        stage=stage,
        code=reply.code,
        enhanced_code=reply.enhanced_code,
        reply=reply.text,
    )
