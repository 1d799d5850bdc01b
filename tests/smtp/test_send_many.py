"""``SMTPSession.send_many``: transactions pipelined into each other, one outcome per
message, in order, each exactly what ``send`` gives."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from mailworker import (
    InvalidMessageError,
    SMTPError,
    SMTPRecipientsRefused,
    SMTPSession,
    SMTPTimeoutError,
)
from mailworker.smtp import SendResult
from tests.servers.chunking import ChunkingServer
from tests.smtp.conftest import ChunkingFactory
from tests.smtp.helpers import RCPT, SENDER, ProfileFactory, wire_form


def message(n: int) -> bytes:
    """Message ``n``: LF-only on odd ``n``, with lines a careless client would mangle."""
    eol = "\n" if n % 2 else "\r\n"
    text = eol.join([f"Subject: message {n:03d}", "", ".leading dot", ".", f"body {n}"])
    return text.encode()


def items(count: int, recipients: int = 1) -> list[tuple[str, list[str], bytes]]:
    """``count`` items, each to its own recipients."""
    return [
        (f"app+{n}@example.com", [f"r{n}-{k}@example.org" for k in range(recipients)], message(n))
        for n in range(count)
    ]


def delivered(server: ChunkingServer) -> Counter[bytes]:
    """How many copies of each content the server accepted."""
    return Counter(m.content for m in server.messages)


class TestPipelinedBatch:
    """Many messages, few round trips, every outcome exact."""

    def test_300_messages(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """300 messages with BDAT take at least 3 messages per round trip, each arrives
        once with its envelope and content, and each result is send()'s."""
        server = chunking_server()
        batch = items(300, recipients=2)
        with SMTPSession(make_profile(server, "smtp", max_messages=1000)) as session:
            server.reset_counts()
            results = session.send_many(batch)
            turns = server.turns
        print(f"\n300 messages: {turns} turns, {300 / turns:.1f} messages per round trip")
        assert 300 / turns >= 3
        assert len(results) == 300
        for (sender, recipients, content), result, received in zip(
            batch, results, server.messages, strict=True
        ):
            assert isinstance(result, SendResult)
            assert result.accepted == recipients
            assert [r.status for r in result.recipients] == ["accepted", "accepted"]
            assert result.size == len(wire_form(content))
            assert (received.mail_from, received.rcpt_tos) == (sender, tuple(recipients))
            assert received.content == wire_form(content)
            assert received.via == "BDAT"
        assert len({r.reply.queue_id for r in results if isinstance(r, SendResult)}) == 300
        assert server.connections == 1

    def test_data_one_round_trip_per_message(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """With DATA (no CHUNKING) the next message follows the end-of-data dot: about
        one round trip per message instead of two."""
        server = chunking_server(chunking=False)
        batch = items(100)
        with SMTPSession(make_profile(server, "smtp")) as session:
            server.reset_counts()
            results = session.send_many(batch)
            turns = server.turns
        assert turns <= 102
        assert all(isinstance(r, SendResult) for r in results)
        assert [m.content for m in server.messages] == [wire_form(c) for _, _, c in batch]
        assert {m.via for m in server.messages} == {"DATA"}

    def test_lock_step_server(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """Without PIPELINING the batch goes one command at a time, with the same outcome."""
        server = chunking_server(pipelining=False)
        batch = items(10)
        with SMTPSession(make_profile(server, "smtp")) as session:
            results = session.send_many(batch)
        assert all(isinstance(r, SendResult) for r in results)
        assert [m.content for m in server.messages] == [wire_form(c) for _, _, c in batch]

    def test_send_is_a_batch_of_one(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """send() and send_many() of one item give the same result and the same wire."""
        server = chunking_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            one = session.send(SENDER, [RCPT], message(1))
            [many] = session.send_many([(SENDER, [RCPT], message(1))])
        assert isinstance(many, SendResult)
        assert [str(line) for line in one.transcript][:4] == [
            str(line) for line in many.transcript
        ][:4]
        assert (one.accepted, one.size, one.replies[0].code) == (
            many.accepted,
            many.size,
            many.replies[0].code,
        )


class TestFailuresInsideABatch:
    """One message's failure is its own outcome; the others go on."""

    def test_every_recipient_refused_midway(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """An item whose recipients are all refused gets SMTPRecipientsRefused; the RSET
        written before the next MAIL keeps the following items from a 503 "nested
        MAIL" (or from joining the open transaction)."""
        server = chunking_server()
        server.faults.rcpt_replies = {"r5-0@example.org": "550 5.1.1 no such user"}
        batch = items(12)
        with SMTPSession(make_profile(server, "smtp")) as session:
            results = session.send_many(batch)
        assert isinstance(results[5], SMTPRecipientsRefused)
        assert results[5].refused["r5-0@example.org"][0] == 550
        others = [r for n, r in enumerate(results) if n != 5]
        assert all(isinstance(r, SendResult) and r.accepted for r in others)
        assert [m.rcpt_tos for m in server.messages] == [
            rcpts_ for n, (_, rcpts_, _) in enumerate((s, tuple(r), c) for s, r, c in batch)
            if n != 5
        ]  # fmt: skip
        assert server.connections == 1

    def test_recipient_limit_inside_a_batch(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """An item split by 452 is finished in further transactions; every recipient of
        every item gets one copy."""
        server = chunking_server()
        server.faults.limit = 3
        batch = items(6, recipients=2)
        batch[2] = (batch[2][0], [f"big{k}@example.org" for k in range(7)], batch[2][2])
        with SMTPSession(make_profile(server, "smtp")) as session:
            results = session.send_many(batch)
        for (_, recipients, _), result in zip(batch, results, strict=True):
            assert isinstance(result, SendResult)
            assert result.accepted == recipients
        assert isinstance(results[2], SendResult)
        assert len(results[2].replies) == 3
        copies = Counter(r for m in server.messages for r in m.rcpt_tos)
        assert set(copies.values()) == {1}
        assert len(copies) == 5 * 2 + 7

    def test_421_midway_reconnects(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """421 to the 20th MAIL: the 20 before keep their results, the rest go on a new
        connection; nothing is lost or sent twice."""
        server = chunking_server()
        server.faults.close_421_at = True
        server.faults.drop_at = 20
        batch = items(60)
        with SMTPSession(make_profile(server, "smtp")) as session:
            results = session.send_many(batch)
        assert all(isinstance(r, SendResult) for r in results), [
            r for r in results if isinstance(r, SMTPError)
        ]
        assert delivered(server) == Counter(wire_form(c) for _, _, c in batch)
        assert server.connections == 2

    def test_drop_after_a_chunk(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """The server hangs up after the 10th message's chunk, no verdict: that one is in
        doubt, those written after it whose content went out are in doubt too, the
        others go again on a new connection. No message is sent twice."""
        server = chunking_server()
        server.faults.drop_after_chunk = True
        server.faults.drop_at = 10
        batch = items(200)
        with SMTPSession(make_profile(server, "smtp", max_messages=1000)) as session:
            results = session.send_many(batch)
        assert all(isinstance(r, SendResult) for r in results[:10])
        assert isinstance(results[10], SMTPError)
        assert results[10].in_doubt
        assert results[10].is_transient
        doubt = [n for n, r in enumerate(results) if isinstance(r, SMTPError)]
        assert all(getattr(results[n], "in_doubt", False) for n in doubt)
        sent = [n for n, r in enumerate(results) if isinstance(r, SendResult)]
        assert sorted(doubt + sent) == list(range(200))
        assert 10 in doubt
        assert 199 in sent  # the window held back the last ones
        copies = delivered(server)
        assert all(copies[wire_form(batch[n][2])] == 1 for n in sent)
        assert max(copies.values()) == 1
        assert server.connections == 2

    def test_recycled_after_max_messages(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """max_messages=25: 60 messages take three connections."""
        server = chunking_server()
        with SMTPSession(make_profile(server, "smtp", max_messages=25)) as session:
            results = session.send_many(items(60))
        assert all(isinstance(r, SendResult) for r in results)
        assert server.connections == 3
        assert Counter(m.connection for m in server.messages) == {1: 25, 2: 25, 3: 10}

    def test_deadline_passed(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """Past the deadline nothing more is written: each item gets a transient
        SMTPTimeoutError, not in doubt."""
        server = chunking_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            results = session.send_many(items(5), deadline=time.monotonic() - 1)
        assert all(isinstance(r, SMTPTimeoutError) and not r.in_doubt for r in results)
        assert server.messages == []


class TestMisuse:
    """A malformed item is refused before anything is sent."""

    def test_item_not_bytes(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """A str message names its item."""
        server = chunking_server()
        batch: list[tuple[str, list[str], bytes]] = items(3)
        batch[2] = (SENDER, [RCPT], "text")  # type: ignore[assignment]
        with (
            SMTPSession(make_profile(server, "smtp")) as session,
            pytest.raises(InvalidMessageError) as failure,
        ):
            session.send_many(batch)
        assert failure.value.field == "items[2].message"
        assert server.messages == []

    def test_bad_address(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """A recipient with a CR names its item and its position."""
        server = chunking_server()
        batch = items(2)
        batch[1] = (SENDER, [RCPT, "evil@example.org\r\nDATA"], b"x")
        with (
            SMTPSession(make_profile(server, "smtp")) as session,
            pytest.raises(InvalidMessageError) as failure,
        ):
            session.send_many(batch)
        assert failure.value.field == "items[1].recipients[1]"
