"""Messages sent one after another on a held session, their transactions pipelined
into each other (:meth:`SMTPSession.send_many`; ``send`` is a batch of one).

With BDAT, transaction k+1 (RSET, MAIL, RCPT..., BDAT and its chunk) is written
before the replies of transaction k are read: BDAT does not end a command group.
With DATA, the next transaction follows the end-of-data dot in the same write.
How much goes ahead is bounded by the pipeline's windows (:mod:`._pipeline`) and
by ``MAX_IN_FLIGHT`` transactions.

Why RSET before every transaction written ahead of its predecessor's verdict:
when a transaction fails after MAIL was accepted (every RCPT refused, a refused
BDAT) the server still holds it; RFC 3030 §2 calls the state after a failed BDAT
indeterminate and requires RSET. Without RSET the next MAIL would be refused
(503 "nested MAIL command") while its RCPTs joined the old transaction and its
BDAT delivered the message under the old sender. RSET may go anywhere in a
group (RFC 2920 §3.1); it costs a short reply, not a round trip.

When the connection is lost midway: items answered keep their outcome; an item
whose content went out without a verdict is in doubt; the others were never
accepted and go again on a new connection (once per call), else they get a
transient error.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from mailworker.errors import (
    InvalidMessageError,
    SMTPError,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from mailworker.smtp._client import PIPELINE_WINDOW
from mailworker.smtp._pipeline import TAIL_BUDGET, Pipeline
from mailworker.smtp._transaction import Attempt, ChunkingRefused, read
from mailworker.smtp.body import Payload, normalise_line_endings
from mailworker.smtp.dsn import DSN, DSNStatus
from mailworker.smtp.envelope import (
    Delivery,
    Envelope,
    Outcome,
    build_envelope,
    finish,
    mail_params,
    reset,
)
from mailworker.smtp.result import SendResult
from mailworker.smtp.transcript import Transcript

if TYPE_CHECKING:
    from mailworker.smtp.session import SMTPSession

log = structlog.get_logger("mailworker.smtp")

#: Most transactions written and not yet answered.
MAX_IN_FLIGHT = 64


@dataclass(eq=False)
class Item:
    """One message of a batch, as validated."""

    index: int
    envelope: Envelope
    payload: Payload
    transcript: Transcript = field(default_factory=Transcript)
    delivery: Delivery | None = None
    status: DSNStatus | None = None
    #: Sent again once already (after a 503 to a MAIL written ahead).
    again: bool = False
    #: Why it did not go yet (for an item left unsent at the end).
    error: SMTPError | None = None


class Lost(Exception):
    """The connection went away (or must be dropped) before the batch was done."""

    def __init__(self, error: SMTPError | None, *, progress: bool, counted: bool = True) -> None:
        super().__init__(str(error))
        self.error = error
        self.progress = progress
        #: Whether it uses up the batch's one reconnection (not after a fallback).
        self.counted = counted


class Batch:
    """Sends ``items`` on ``session``; :meth:`run` gives one outcome per item."""

    def __init__(self, session: SMTPSession, items: Sequence[Item], dsn: DSN | None) -> None:
        self.session = session
        self.items = items
        self.dsn = dsn
        self.pending: deque[Item] = deque(items)
        self.outcomes: dict[int, Outcome | SMTPError] = {}
        self.reconnected = False
        #: The item whose transaction was the last written, if it failed (it may have
        #: left a transaction open on the server).
        self.dirty: Item | None = None
        self.last: Item | None = None

    def run(self) -> list[SendResult | SMTPError]:
        """Send every item; never raises for one item's failure."""
        session = self.session
        while self.pending:
            try:
                fresh = session._ensure_ready() or session._sent == 0
            except SMTPError as exc:
                self._give_up(exc)
                break
            try:
                self._round(fresh)
            except Lost as lost:
                session._drop(send_quit=False)
                self.dirty = None
                if not self.pending:
                    break
                if lost.counted and (self.reconnected or (fresh and not lost.progress)):
                    self._give_up(lost.error)
                    break
                self.reconnected = self.reconnected or lost.counted
                log.info("smtp.reconnect", profile=session.profile.name, reason=str(lost.error))
        self._clean_up()
        return [self._result(item) for item in self.items]

    # -- one connection ----------------------------------------------------------

    def _round(self, fresh: bool) -> None:
        """Send what the connection allows; raises Lost when it goes away."""
        session = self.session
        client = session._require()
        chunking = session._chunking and client.has_extn("chunking")
        pipe = Pipeline(client, pipelining=client.has_extn("pipelining"))
        inflight: deque[tuple[Item, Attempt]] = deque()
        later: list[Item] = []  # split by the server's limit: more transactions to go
        room = max(session.profile.max_messages - session._sent, 1)
        progress = False
        try:
            while self.pending or inflight or later:
                while self.pending and room > 0 and not later and self._room_for(pipe, inflight):
                    item = self.pending.popleft()
                    step = self._start(
                        item, chunking, reset_first=bool(inflight) or bool(self.dirty)
                    )
                    if step is not None:
                        pipe.add(step.commands())
                        inflight.append((item, step))
                        room -= 1
                        self.dirty = None
                        self.last = item
                if not inflight:
                    if later:
                        self.last = later[0]
                        self._finish(later.pop(0), pipe, chunking)
                        progress = True
                        continue
                    break  # recycle (max_messages) or the deadline
                item, step = inflight.popleft()
                assert item.delivery is not None
                try:
                    read(step, pipe, session._stage, session.profile.timeouts)
                except ChunkingRefused as exc:
                    if item.delivery.replies:
                        self._failed(item, step, exc)
                        continue
                    # Nothing was accepted: again with DATA. Whatever was written
                    # behind the BDAT went to a server that does not know it.
                    session._chunking = chunking = False
                    log.warning("smtp.chunking_refused", profile=session.profile.name)
                    self._requeue([item, *(it for it, _ in inflight)])
                    if inflight or not self._resync(item, pipe):
                        raise Lost(exc, progress=True, counted=False) from None
                    continue
                except SMTPError as exc:
                    gone = not session.connected or exc.code == 421
                    if isinstance(exc, SMTPTimeoutError) and session.connected:
                        gone = True  # replies may still come: the stream is out of step
                    if self._again(item, exc, retry=progress or not fresh):
                        if gone:
                            self._abandon(inflight, exc)
                            raise Lost(exc, progress=progress) from None
                        self.dirty = item
                        continue
                    progress = True
                    self._failed(item, step, exc)
                    if gone:
                        self._abandon(inflight, exc)
                        raise Lost(exc, progress=True) from None
                    continue
                progress = True
                item.delivery.absorb(step)
                if item.delivery.next_attempt(chunking=chunking) is not None:
                    later.append(item)
                else:
                    self._settle(item)
        except SMTPError as exc:  # a continuation lost the connection
            self._abandon(inflight, exc)
            for item in later:
                assert item.delivery is not None
                item.delivery.abort(exc)
                self._settle(item)
            raise Lost(exc, progress=True) from None
        finally:
            client.transcript = session.transcript
        if self.pending and session._deadline is not None and time.monotonic() >= session._deadline:
            self._give_up(SMTPTimeoutError("the send's deadline passed before it", stage="mail"))

    def _room_for(self, pipe: Pipeline, inflight: deque[tuple[Item, Attempt]]) -> bool:
        """Whether the next item may be written ahead of the replies in flight."""
        session = self.session
        if session._deadline is not None and time.monotonic() >= session._deadline:
            return False
        if not inflight:
            return True
        if not pipe.pipelining or len(inflight) >= MAX_IN_FLIGHT:
            return False
        item = self.pending[0]
        cost = 100 + sum(len(r) + 16 for r in item.envelope.recipients) * 2
        if pipe.queued + cost > PIPELINE_WINDOW:
            return False
        return pipe.tails + len(item.payload.data) <= TAIL_BUDGET

    def _start(self, item: Item, chunking: bool, *, reset_first: bool) -> Attempt | None:
        """The item's first transaction; None when it cannot go (its error is kept)."""
        client = self.session._require()
        item.transcript = Transcript()
        try:
            params = mail_params(item.envelope, client.esmtp_features)
        except SMTPError as exc:
            exc.transcript = []
            self.outcomes[item.index] = exc
            return None
        rcpt_params = None
        if self.dsn is not None:
            item.status = "requested" if client.has_extn("dsn") else "not_offered"
            # DSN parameters only where offered: a server without DSN refuses them (555).
            if item.status == "requested":
                params += self.dsn.mail_params()
                rcpt_params = self.dsn.rcpt_params
        item.delivery = Delivery(
            item.envelope,
            item.payload,
            params=params,
            rcpt_params=rcpt_params,
            transcript=item.transcript,
        )
        return item.delivery.next_attempt(chunking=chunking, reset_first=reset_first)

    def _finish(self, item: Item, pipe: Pipeline, chunking: bool) -> None:
        """The rest of a message the server's recipient limit split, lock-step."""
        assert item.delivery is not None
        session = self.session
        try:
            outcome = finish(
                pipe,
                item.delivery,
                chunking=chunking,
                guard=session._stage,
                timeouts=session.profile.timeouts,
            )
        except SMTPError as exc:
            self._record(item, exc)
            error: SMTPError | None = exc
        else:
            self._record(item, outcome)
            error = outcome.error
        if error is not None and (not session.connected or error.code == 421):
            raise error

    def _settle(self, item: Item) -> None:
        assert item.delivery is not None
        try:
            outcome = item.delivery.outcome()
        except SMTPError as exc:
            self._record(item, exc)
        else:
            self._record(item, outcome)

    def _failed(self, item: Item, step: Attempt, exc: SMTPError) -> None:
        assert item.delivery is not None
        try:
            item.delivery.fail(step, exc)
        except SMTPError:
            self._record(item, exc)
        else:
            self._settle(item)

    def _record(self, item: Item, outcome: Outcome | SMTPError) -> None:
        session = self.session
        self.outcomes[item.index] = outcome
        if isinstance(outcome, Outcome):
            session._sent += len(outcome.replies)
            session._last_used = time.monotonic()
        failed = isinstance(outcome, SMTPError) or outcome.error is not None
        if item is self.last:
            self.dirty = item if failed else None

    def _again(self, item: Item, exc: SMTPError, *, retry: bool) -> bool:
        """Whether the item's failure means it was never taken and it may go again:
        a 503 to a MAIL written ahead (once), or a held session found closed at its
        first command."""
        assert item.delivery is not None
        if exc.in_doubt or item.delivery.replies:
            return False
        if exc.stage == "mail" and exc.code == 503 and not item.again:
            item.again = True
        elif not (retry and exc.stage in ("mail", "reset")) or not (
            isinstance(exc, SMTPServerDisconnected) or exc.code == 421
        ):
            return False
        item.error = exc
        self._requeue([item])
        return True

    def _requeue(self, items: list[Item]) -> None:
        for item in reversed(items):
            item.delivery = None
            self.pending.appendleft(item)

    def _abandon(self, inflight: deque[tuple[Item, Attempt]], exc: SMTPError) -> None:
        """The connection is gone under items written and not answered."""
        again = []
        for item, step in inflight:
            if step.undecided and exc.code != 421:
                # After a 421 the server acts on nothing more; otherwise content that
                # went out may have been taken.
                doubt = SMTPServerDisconnected(
                    "the connection was lost after the message was sent, before the "
                    "server's verdict",
                    stage="data",
                )
                doubt.in_doubt = True
                self._record(item, doubt)
            else:
                item.error = exc
                again.append(item)
        self._requeue(again)
        inflight.clear()

    def _resync(self, item: Item, pipe: Pipeline) -> bool:
        """RSET after a refused BDAT; False if the reply shows the server read our
        chunk as commands (the stream is out of step: the connection must go).

        A server that parsed BDAT enough to refuse it skipped the chunk; one that did
        not answers each of its lines first, and the first line of a message is a
        header field, which no server answers with 250.
        """
        session = self.session
        try:
            reset(pipe, item.transcript, session._stage, session.profile.timeouts)
        except SMTPError:
            return False
        return True

    def _give_up(self, exc: SMTPError | None) -> None:
        """Every item not sent yet gets a transient error: it was never taken."""
        for item in self.pending:
            error = item.error or exc
            if error is None or error.in_doubt:
                error = SMTPServerDisconnected(
                    "not sent: the connection was lost before this message went out",
                    stage="mail",
                )
            self.outcomes[item.index] = error
        self.pending.clear()

    def _clean_up(self) -> None:
        """RSET after a last transaction that failed, into its transcript."""
        session = self.session
        item, self.dirty = self.dirty, None
        if item is None or not session.connected:
            return
        outcome = self.outcomes.get(item.index)
        if isinstance(outcome, SMTPError) and outcome.code == 421:
            session._drop(send_quit=False)
            return
        client = session._require()
        client.transcript = item.transcript
        try:
            session._reset()
        finally:
            if session._client is not None:
                session._client.transcript = session.transcript

    def _result(self, item: Item) -> SendResult | SMTPError:
        outcome = self.outcomes[item.index]
        if isinstance(outcome, SMTPError):
            if item.transcript.lines:
                outcome.transcript = item.transcript.as_strings()
            return outcome
        return SendResult(
            recipients=outcome.recipients,
            reply=outcome.replies[0],
            size=outcome.size,
            transcript=tuple(item.transcript.lines),
            replies=outcome.replies,
            dsn=item.status,
        )


def checked_dsn(dsn: object) -> DSN | None:
    """``dsn`` if it is a DSN or None."""
    if dsn is not None and not isinstance(dsn, DSN):
        raise InvalidMessageError("dsn", "must be a mailworker.smtp.DSN")
    return dsn


def prepare(
    index: int, sender: str, recipients: Sequence[str], message: bytes, *, prefix: str
) -> Item:
    """Check one message and put its content in wire form (CRLF line endings).

    Raises:
        InvalidMessageError: naming the field, after ``prefix`` (``items[3].``).
    """
    if not isinstance(message, (bytes, bytearray)):
        raise InvalidMessageError(f"{prefix}message", "must be bytes")
    data = normalise_line_endings(bytes(message))
    try:
        envelope = build_envelope(sender, recipients, data)
    except InvalidMessageError as exc:
        if not prefix:
            raise
        raise InvalidMessageError(f"{prefix}{exc.field}", exc.problem) from None
    return Item(index, envelope, Payload(data))
