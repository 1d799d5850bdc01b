"""A message's delivery: MAIL, RCPT..., then the content (RFC 5321 §3.3), in one
transaction or several.

With PIPELINING (RFC 2920) the commands leave together and the replies are read
back in order (see :mod:`._pipeline` for the windows that keep this from
deadlocking); with CHUNKING too (RFC 3030) the content goes with them as
``BDAT <n> LAST``: one round trip per message, two with DATA. Without PIPELINING,
strict lock-step. One transaction is in :mod:`._transaction`.

A server may take fewer recipients per transaction than a message has: it
answers 452 "too many recipients" and the rest go at once in further
transactions on the same session, with the same content (RFC 5321 §4.5.3.1.10).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mailworker.errors import (
    InvalidMessageError,
    SMTPError,
    SMTPNotSupportedError,
    SMTPRecipientsRefused,
)
from mailworker.smtp._pipeline import Command, Pipeline
from mailworker.smtp._transaction import (
    Attempt,
    RcptParams,
    StageGuard,
    attempt,
    read,
    reply_error,
)
from mailworker.smtp.body import Payload, is_8bit
from mailworker.smtp.profile import Timeouts
from mailworker.smtp.reply import Reply
from mailworker.smtp.result import RecipientResult, RecipientStatus
from mailworker.smtp.transcript import Transcript


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


class Delivery:
    """One message on its way: the transactions it took so far and every recipient's
    result, ready for the next transaction when the server's limit of recipients per
    transaction (452) left some for later.

    Attributes:
        open_transaction: the last transaction delivered nothing and is still open
            on the server (MAIL accepted, no recipient): RSET before the next MAIL.
    """

    def __init__(
        self,
        envelope: Envelope,
        payload: Payload,
        *,
        params: Sequence[str],
        rcpt_params: RcptParams | None,
        transcript: Transcript,
    ) -> None:
        self.envelope = envelope
        self.payload = payload
        self.transcript = transcript
        self._mail = "MAIL FROM:<{}>{}".format(envelope.sender, "".join(f" {p}" for p in params))
        self._rcpt_params = rcpt_params
        addresses = envelope.recipients
        self.results = [RecipientResult(a, "deferred", -1, "not sent") for a in addresses]
        self.replies: list[Reply] = []
        self.pending = list(range(len(addresses)))
        self.limit: int | None = None  # recipients per transaction, once the server showed it
        self.open_transaction = False
        self.error: SMTPError | None = None
        self._over = False

    def next_attempt(self, *, chunking: bool, reset_first: bool = False) -> Attempt | None:
        """The next transaction, or None when there is nothing left to try."""
        if self._over or not self.pending:
            return None
        recipients = self.pending if self.limit is None else self.pending[: self.limit]
        rcpts = []
        for i in recipients:
            address = self.envelope.recipients[i]
            extra = self._rcpt_params(address) if self._rcpt_params is not None else ()
            rcpts.append("RCPT TO:<{}>{}".format(address, "".join(f" {p}" for p in extra)))
        return attempt(
            self._mail,
            rcpts,
            list(recipients),
            self.payload,
            chunking=chunking,
            reset_first=reset_first,
            transcript=self.transcript,
        )

    def absorb(self, done: Attempt) -> None:
        """Take in the replies of a transaction that was read to its end."""
        if done.final is not None:
            self.replies.append(done.final)
        addresses = self.envelope.recipients
        answered = done.rcpt
        first, full = next(
            ((k, r) for k, r in enumerate(answered) if r.too_many_recipients), (0, None)
        )
        settled = False
        left = []
        for k, index in enumerate(done.recipients):
            reply = answered[k] if k < len(answered) else full
            assert reply is not None  # only a full server leaves recipients unasked
            self.results[index] = _recipient(addresses[index], reply)
            if reply.too_many_recipients:
                left.append(index)
            else:
                settled = True
        if full is not None:
            self.limit = first if self.limit is None else min(self.limit, first)
        self.pending = left + self.pending[len(done.recipients) :]
        self.open_transaction = done.final is None
        if not settled or self.limit == 0:
            self._over = True  # no progress: the rest stay deferred, for a later retry

    def fail(self, failed: Attempt, exc: SMTPError) -> None:
        """Take in a transaction that failed with ``exc``.

        Raises:
            SMTPError: ``exc``, when no earlier transaction delivered the message;
                after one did, the failure goes into the results instead, for the
                recipients delivered before must not be sent the message again.
        """
        if not self.replies:
            raise exc
        addresses = self.envelope.recipients
        for k, index in enumerate(self.pending):
            own = failed.rcpt[k] if k < len(failed.rcpt) else None
            if own is None or own.ok or own.too_many_recipients:
                tried = k < len(failed.recipients)
                self.results[index] = _failed(addresses[index], exc, own, tried=tried)
            else:  # refused on its own account
                self.results[index] = _recipient(addresses[index], own)
        self.error = exc
        self._over = True

    def abort(self, exc: SMTPError) -> None:
        """The session went away before the recipients still pending were tried."""
        addresses = self.envelope.recipients
        for index in self.pending:
            self.results[index] = _failed(addresses[index], exc, None, tried=False)
        self.error = exc
        self._over = True

    def outcome(self) -> Outcome:
        """The verdict so far.

        Raises:
            SMTPRecipientsRefused: no transaction delivered the message.
        """
        if not self.replies:
            raise SMTPRecipientsRefused(
                "server refused every recipient",
                refused={o.recipient: (o.code, o.enhanced_code, o.reply) for o in self.results},
            )
        return Outcome(tuple(self.results), tuple(self.replies), self.envelope.size, self.error)


def finish(
    pipe: Pipeline,
    delivery: Delivery,
    *,
    chunking: bool,
    guard: StageGuard,
    timeouts: Timeouts,
) -> Outcome:
    """Run the delivery's remaining transactions one after the other on a session
    with nothing else in flight, and give its outcome.

    Raises:
        SMTPReplyError: the sender or the content was refused.
        SMTPRecipientsRefused: no recipient was accepted.
        SMTPError: any other failure, as long as nothing was delivered; after that
            a failure is returned in ``Outcome.error``, never raised.
    """
    while (step := delivery.next_attempt(chunking=chunking)) is not None:
        try:
            if delivery.open_transaction:
                reset(pipe, delivery.transcript, guard, timeouts)
            pipe.add(step.commands())
            read(step, pipe, guard, timeouts)
        except SMTPError as exc:
            delivery.fail(step, exc)
            break
        delivery.absorb(step)
    if delivery.open_transaction and delivery.replies and delivery.error is None:
        try:  # the last one delivered nothing
            reset(pipe, delivery.transcript, guard, timeouts)
        except SMTPError as exc:
            delivery.error = exc
    return delivery.outcome()


def reset(pipe: Pipeline, transcript: Transcript, guard: StageGuard, timeouts: Timeouts) -> None:
    """RSET a transaction that delivered nothing, before the next one (lock-step)."""
    command = Command("RSET", transcript=transcript)
    pipe.add([command])
    with guard("reset", timeouts.command):
        reply = pipe.reply(command)
    if reply.code != 250:
        raise reply_error("server refused RSET", "reset", reply)


def _recipient(address: str, reply: Reply) -> RecipientResult:
    status: RecipientStatus
    if reply.ok:
        status = "accepted"
    elif 400 <= reply.code < 500 or reply.too_many_recipients:
        status = "deferred"  # also a 552 "too many" (RFC 5321 §4.5.3.1.10)
    else:
        status = "rejected"
    return RecipientResult(address, status, reply.code, reply.text, reply.enhanced_code)


def _failed(address: str, exc: SMTPError, own: Reply | None, *, tried: bool) -> RecipientResult:
    """The result of a recipient whose (later) transaction failed with ``exc``."""
    return RecipientResult(
        address,
        "deferred" if exc.is_transient else "rejected",
        exc.code if exc.code is not None else -1,
        exc.reply or exc.message,
        exc.enhanced_code,
        # Content that went out without a verdict may have been delivered to every
        # recipient of the transaction not known to be refused (with BDAT the chunk
        # can go before the RCPT replies are read).
        in_doubt=exc.in_doubt and tried and (own is None or own.ok),
    )
