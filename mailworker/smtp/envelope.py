"""The mail transaction: MAIL, RCPT..., then the content (RFC 5321 §3.3).

With PIPELINING (RFC 2920) MAIL, every RCPT and DATA leave in one write and the
replies are read back in order: two round trips per message instead of three
plus one per recipient. Without it, strict lock-step.

The content transfer sits behind :class:`ContentTransfer` so that BDAT
(CHUNKING, RFC 3030) can be added as a second implementation: it would send no
initiation command and write the content as sized chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from mailworker.errors import (
    InvalidMessageError,
    SMTPError,
    SMTPNotSupportedError,
    SMTPRecipientsRefused,
    SMTPReplyError,
    Stage,
)
from mailworker.smtp._client import Client
from mailworker.smtp.body import is_8bit
from mailworker.smtp.profile import Timeouts
from mailworker.smtp.reply import Reply
from mailworker.smtp.result import RecipientResult, RecipientStatus

#: Runs one step under the stage's timeout, mapping I/O failures to SMTPError.
StageGuard = Callable[[Stage, float], AbstractContextManager[None]]


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
    """The server's verdict on one transaction."""

    recipients: tuple[RecipientResult, ...]
    reply: Reply
    size: int


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
    if limit.isdigit() and int(limit) > 0 and envelope.size > int(limit):
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
) -> Outcome:
    """Run one mail transaction on a connected, greeted session.

    Raises:
        SMTPReplyError: the sender, DATA or the content was refused.
        SMTPRecipientsRefused: no recipient was accepted.
    """
    if transfer is None:
        transfer = DataTransfer()
    mail = "MAIL FROM:<{}>{}".format(envelope.sender, "".join(f" {p}" for p in params))
    rcpts = [f"RCPT TO:<{r}>" for r in envelope.recipients]
    data_reply: Reply | None = None

    if client.has_extn("pipelining"):
        batch = [mail, *rcpts] + ([transfer.initiation] if transfer.initiation else [])
        with guard("mail", timeouts.mail):
            client.pipeline(batch)
            mail_reply = _unless_closing(client.reply(), "mail")
        rcpt_replies = []
        for _ in rcpts:
            with guard("rcpt", timeouts.rcpt):
                rcpt_replies.append(_unless_closing(client.reply(), "rcpt"))
        if transfer.initiation:
            with guard("data", timeouts.data_init):
                data_reply = client.reply()
        nothing_to_deliver = not mail_reply.ok or not _accepted(rcpt_replies)
        if nothing_to_deliver and data_reply is not None and data_reply.code == 354:
            # The server opened DATA although nothing can be delivered: close it
            # with an empty body (RFC 2920 §3.1) and let RSET discard it.
            with guard("data", timeouts.data_end):
                client.pipeline(["."])
                client.reply()
    else:
        with guard("mail", timeouts.mail):
            mail_reply = _unless_closing(client.command(mail), "mail")
        rcpt_replies = []
        if mail_reply.ok:
            for line in rcpts:
                with guard("rcpt", timeouts.rcpt):
                    rcpt_replies.append(_unless_closing(client.command(line), "rcpt"))
        if mail_reply.ok and _accepted(rcpt_replies) and transfer.initiation:
            with guard("data", timeouts.data_init):
                data_reply = client.command(transfer.initiation)

    if not mail_reply.ok:
        raise _reply_error("server refused the sender", "mail", mail_reply)
    outcomes = tuple(
        _recipient(address, reply)
        for address, reply in zip(envelope.recipients, rcpt_replies, strict=True)
    )
    if not _accepted(rcpt_replies):
        raise SMTPRecipientsRefused(
            "server refused every recipient",
            refused={o.recipient: (o.code, o.enhanced_code, o.reply) for o in outcomes},
        )
    if data_reply is not None and data_reply.code != 354:
        raise _reply_error("server refused DATA", "data", data_reply)
    final = transfer.send(client, payload, envelope.size, guard, timeouts)
    if not final.ok:
        raise _reply_error("server refused the message", "data", final)
    return Outcome(recipients=outcomes, reply=final, size=envelope.size)


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
    elif 400 <= reply.code < 500:
        status = "deferred"
    else:
        status = "rejected"
    return RecipientResult(address, status, reply.code, reply.text, reply.enhanced_code)


def _reply_error(message: str, stage: Stage, reply: Reply) -> SMTPReplyError:
    return SMTPReplyError(
        message,
        stage=stage,
        code=reply.code,
        enhanced_code=reply.enhanced_code,
        reply=reply.text,
    )
