"""CHUNKING (RFC 3030): MAIL, RCPT... and ``BDAT <n> LAST`` with the content in one
write, one round trip per message; DATA when not offered or when BDAT turns out not
to work."""

from __future__ import annotations

import pytest

from mailworker import SMTPRecipientsRefused, SMTPServerDisconnected, SMTPSession
from tests.smtp.conftest import ChunkingFactory
from tests.smtp.helpers import MESSAGE, RCPT, SENDER, ProfileFactory, wire_form

#: Leading dots, bare LF and CR, a lone dot line: what dot-stuffing would change.
TRICKY = b"Subject: dots\n\n.leading dot\r\n.\r\nbare LF\nbare CR\r..\r\nend"


def shape(lines: list[str]) -> list[str]:
    """Direction and verb (client) or code (server) of each transcript line."""
    return [line[:7] if line.startswith("C:") else line[:6] for line in lines]


class TestOneRoundTrip:
    """With CHUNKING and PIPELINING a message costs one round trip."""

    def test_one_turn_per_message(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """On a held session, send() of a 1-recipient message is one turn of the server,
        and the content arrives byte for byte, CRLF-normalised and not dot-stuffed."""
        server = chunking_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            server.reset_counts()
            result = session.send(SENDER, [RCPT], TRICKY)
            assert server.turns == 1
        assert result.accepted == [RCPT]
        first, second = server.messages
        assert second.content == wire_form(TRICKY)
        assert (second.via, second.rcpt_tos, second.mail_from) == ("BDAT", (RCPT,), SENDER)
        assert first.content == wire_form(MESSAGE)

    def test_transcript(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """The transcript shows MAIL, RCPT, BDAT and the content before any reply."""
        server = chunking_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, [RCPT, "bob@example.org"], MESSAGE)
        size = len(wire_form(MESSAGE))
        assert [str(line) for line in result.transcript][:5] == [
            f"C: MAIL FROM:<{SENDER}>",
            f"C: RCPT TO:<{RCPT}>",
            "C: RCPT TO:<bob@example.org>",
            f"C: BDAT {size} LAST",
            f"C: <message content, {size} bytes>",
        ]
        assert shape([str(line) for line in result.transcript])[5:] == ["S: 250"] * 4
        assert result.reply.queue_id == "Q00000"

    def test_lock_step_without_pipelining(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """CHUNKING without PIPELINING: MAIL, RCPT, then BDAT, each waiting for a reply."""
        server = chunking_server(pipelining=False)
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            server.reset_counts()
            session.send(SENDER, [RCPT], TRICKY)
            assert server.turns == 3
        assert [m.via for m in server.messages] == ["BDAT", "BDAT"]
        assert server.messages[1].content == wire_form(TRICKY)

    def test_data_when_not_offered(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """Without CHUNKING the same message goes with DATA, dot-stuffed, in two turns."""
        server = chunking_server(chunking=False)
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            server.reset_counts()
            session.send(SENDER, [RCPT], TRICKY)
            assert server.turns == 2
        assert [m.via for m in server.messages] == ["DATA", "DATA"]
        assert server.messages[1].content == wire_form(TRICKY)

    def test_large_message(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """A message of several write blocks arrives whole, in one chunk."""
        server = chunking_server()
        big = b"Subject: big\r\n\r\n" + b".line of text, leading dot\r\n" * 20_000
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, [RCPT], big)
        assert result.size == len(big)
        [message] = server.messages
        assert message.content == big
        assert server.commands["BDAT"] == 1


class TestRecipients:
    """Per-recipient results are the same as with DATA."""

    def test_some_refused(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """A refused and a deferred recipient keep their replies; the others get it."""
        server = chunking_server()
        server.faults.rcpt_replies = {
            "bad@example.org": "550 5.1.1 no such user",
            "later@example.org": "451 4.3.0 greylisted",
        }
        recipients = ["ok1@example.org", "bad@example.org", "later@example.org", "ok2@example.org"]
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, recipients, MESSAGE)
        assert [(r.recipient, r.status, r.code, r.enhanced_code) for r in result.recipients] == [
            ("ok1@example.org", "accepted", 250, "2.1.5"),
            ("bad@example.org", "rejected", 550, "5.1.1"),
            ("later@example.org", "deferred", 451, "4.3.0"),
            ("ok2@example.org", "accepted", 250, "2.1.5"),
        ]
        [message] = server.messages
        assert message.rcpt_tos == ("ok1@example.org", "ok2@example.org")

    def test_every_recipient_refused(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """Every RCPT refused: the BDAT's 554 is read and set aside, SMTPRecipientsRefused
        is raised, RSET clears the open transaction and the session goes on."""
        server = chunking_server()
        server.faults.rcpt_replies = {"bad@example.org": "550 5.1.1 no such user"}
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(SMTPRecipientsRefused) as failure:
                session.send(SENDER, ["bad@example.org"], MESSAGE)
            assert failure.value.refused["bad@example.org"][0] == 550
            assert failure.value.transcript[-2:] == ["C: RSET", "S: 250 2.0.0 Ok"]
            result = session.send(SENDER, [RCPT], MESSAGE)
        assert result.accepted == [RCPT]
        assert server.commands["RSET"] == 1
        assert [m.rcpt_tos for m in server.messages] == [(RCPT,)]
        assert server.connections == 1

    def test_split_by_recipient_limit(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """452 "too many recipients" still splits the message into transactions."""
        server = chunking_server()
        server.faults.limit = 2
        recipients = [f"r{n}@example.org" for n in range(5)]
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, recipients, MESSAGE)
        assert result.accepted == recipients
        assert len(result.replies) == 3
        assert [m.rcpt_tos for m in server.messages] == [
            tuple(recipients[:2]),
            tuple(recipients[2:4]),
            tuple(recipients[4:]),
        ]
        assert {m.via for m in server.messages} == {"BDAT"}

    def test_twenty_thousand_recipients(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """20,000 pipelined RCPTs and a BDAT against a server with 4 KiB buffers that
        stops reading while its replies are stuck: the windows keep it from deadlocking."""
        server = chunking_server(small_buffers=True)
        recipients = [f"user{n}@example.org" for n in range(20_000)]
        with SMTPSession(make_profile(server, "smtp", timeout=10)) as session:
            result = session.send(SENDER, recipients, MESSAGE)
        assert len(result.accepted) == 20_000
        [message] = server.messages
        assert message.rcpt_tos == tuple(recipients)


class TestFallback:
    """A server that offers CHUNKING but does not handle BDAT gets DATA instead."""

    def test_bdat_refused_502(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """502 to BDAT although offered: RSET, then the same message with DATA on the
        same connection; later messages go with DATA at once."""
        server = chunking_server()
        server.faults.bdat_reply = "502 5.5.1 Error: command not implemented"
        with SMTPSession(make_profile(server, "smtp")) as session:
            first = session.send(SENDER, [RCPT], TRICKY)
            second = session.send(SENDER, [RCPT], MESSAGE)
        assert first.accepted == second.accepted == [RCPT]
        assert [(m.via, m.content) for m in server.messages] == [
            ("DATA", wire_form(TRICKY)),
            ("DATA", wire_form(MESSAGE)),
        ]
        assert server.commands["BDAT"] == 1
        assert server.commands["RSET"] == 1
        assert server.connections == 1

    def test_bdat_unknown_reads_chunk_as_commands(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """A server that reads the chunk as commands is out of step: the connection is
        dropped and the message goes with DATA on a new one, once."""
        server = chunking_server()
        server.faults.bdat_unknown = True
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, [RCPT], MESSAGE)
        assert result.accepted == [RCPT]
        assert [(m.via, m.content) for m in server.messages] == [("DATA", wire_form(MESSAGE))]
        assert server.connections == 2


class TestDrops:
    """A connection lost during BDAT is in doubt only once all of the chunk went out."""

    def test_drop_mid_chunk(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """The server hangs up while the chunk is still being written (small buffers keep
        most of it in the client): not in doubt, transient. Had the write completed, the
        client could not tell, and it would be in doubt."""
        server = chunking_server(small_buffers=True)
        server.faults.drop_in_chunk = 1000
        big = b"Subject: big\r\n\r\n" + b"x" * 4_000_000 + b"\r\n"
        with (
            SMTPSession(make_profile(server, "smtp")) as session,
            pytest.raises(SMTPServerDisconnected) as failure,
        ):
            session.send(SENDER, [RCPT], big)
        assert not failure.value.in_doubt
        assert failure.value.is_transient
        assert server.messages == []

    def test_drop_after_chunk(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """The server hangs up after all of the chunk, with no verdict: in doubt (it did
        take the message here), so the session does not send it again."""
        server = chunking_server()
        server.faults.drop_after_chunk = True
        with (
            SMTPSession(make_profile(server, "smtp")) as session,
            pytest.raises(SMTPServerDisconnected) as failure,
        ):
            session.send(SENDER, [RCPT], MESSAGE)
        assert failure.value.in_doubt
        assert "in doubt" in str(failure.value)
        assert len(server.messages) == 1
        assert server.connections == 1

    def test_idle_close_then_send(
        self, chunking_server: ChunkingFactory, make_profile: ProfileFactory
    ) -> None:
        """A held session the server closed while idle is found before the pipelined
        group is written: a new connection, no error, one copy."""
        server = chunking_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            server.stop()
            server.start()  # a new port: point the session at it
            session.profile = make_profile(server, "smtp")
            result = session.send(SENDER, [RCPT], MESSAGE)
        assert result.accepted == [RCPT]
