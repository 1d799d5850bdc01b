"""PIPELINING (RFC 2920) when offered, strict lock-step otherwise, same results either way."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest

from mailworker import SMTPRecipientsRefused, SMTPReplyError, SMTPSession
from tests.servers import ScriptConnection, ScriptedServer, SMTPServer
from tests.smtp.helpers import MESSAGE, RCPT, SENDER, ProfileFactory, verb, wire_form

SMTPFactory = Callable[..., SMTPServer]
ScriptedFactory = Callable[..., ScriptedServer]

RECIPIENTS = ["ann@example.org", "bob@example.org", "cy@example.org"]


class TestPipelined:
    """With PIPELINING offered, MAIL, every RCPT and DATA leave in one write."""

    def test_envelope_in_one_write(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """The server reads MAIL, three RCPTs and DATA before answering any, in one TCP read."""
        seen: list[str] = []

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo(extensions=("PIPELINING", "8BITMIME"))
            # No reply is sent until all five commands are in: a lock-step client
            # would sit waiting for the MAIL reply and this read would time out.
            seen.extend(conn.readline(timeout=2) for _ in range(5))
            conn.send_raw(b"250 OK\r\n250 OK\r\n250 OK\r\n250 OK\r\n354 go ahead\r\n")
            conn.read_until_data_end()
            conn.send("250 OK: queued as PIPE1")
            conn.expect("QUIT", "221 bye")

        server = scripted_server(script)
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, RECIPIENTS, MESSAGE)
        server.stop()
        assert result.accepted == RECIPIENTS
        assert [verb(line) for line in seen] == ["MAIL", "RCPT", "RCPT", "RCPT", "DATA"]
        [conn] = server.connections
        [chunk] = [data for side, data in conn.transcript if side == "C" and b"MAIL" in data]
        assert chunk == (
            f"MAIL FROM:<{SENDER}>\r\n".encode()
            + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in RECIPIENTS)
            + b"DATA\r\n"
        )
        assert conn.data == [wire_form(MESSAGE)]

    def test_transcript_shows_batch(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """The per-message transcript shows all commands before the first reply."""
        server = smtp_server()
        server.handler.ehlo_extra = ["PIPELINING"]
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, RECIPIENTS[:2], MESSAGE)
        lines = [str(line) for line in result.transcript]
        expected = ["C: MAIL", "C: RCPT", "C: RCPT", "C: DATA", "S: 250"]
        assert [
            line[: len(prefix)] for line, prefix in zip(lines, expected, strict=False)
        ] == expected

    def test_every_rcpt_refused_aiosmtpd(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """Every RCPT refused: the pipelined DATA is refused, RSET follows, the session goes on."""
        server = smtp_server()
        server.handler.ehlo_extra = ["PIPELINING"]
        server.handler.rcpt_replies = dict.fromkeys(RECIPIENTS[1:], "550 5.1.1 no such user")
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(SMTPRecipientsRefused) as failure:
                session.send(SENDER, RECIPIENTS[1:], MESSAGE)
            assert set(failure.value.refused) == set(RECIPIENTS[1:])
            assert not failure.value.is_transient
            result = session.send(SENDER, [RCPT], MESSAGE)
        assert result.accepted == [RCPT]
        assert server.handler.counts["RSET"] == 1
        assert server.handler.connections == 1
        assert [m.rcpt_tos for m in server.handler.wait_for_messages(1)] == [(RCPT,)]

    def test_every_rcpt_refused_but_data_opened(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """A server that answers 354 although no RCPT succeeded gets an empty body, then RSET."""
        lines: list[str] = []

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo(extensions=("PIPELINING",))
            lines.extend(conn.readline() for _ in range(3))
            conn.send_raw(b"250 OK\r\n550 5.1.1 no such user\r\n354 go ahead\r\n")
            empty = conn.read_until_data_end()
            conn.send("554 5.5.1 no valid recipients")
            lines.append(f"payload={empty!r}")
            lines.append(conn.expect("RSET", "250 OK"))
            lines.extend(conn.readline() for _ in range(3))
            conn.send_raw(b"250 OK\r\n250 OK\r\n354 go ahead\r\n")
            conn.read_until_data_end()
            conn.send("250 OK: queued as NEXT1")
            lines.append(conn.expect("QUIT", "221 bye"))

        server = scripted_server(script)
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(SMTPRecipientsRefused) as failure:
                session.send(SENDER, ["bad@example.org"], MESSAGE)
            assert failure.value.refused["bad@example.org"][0] == 550
            result = session.send(SENDER, [RCPT], MESSAGE)
        server.stop()
        assert result.accepted == [RCPT]
        assert [verb(line) for line in lines] == [
            "MAIL", "RCPT", "DATA", "PAYLOAD=B''", "RSET", "MAIL", "RCPT", "DATA", "QUIT",
        ]  # fmt: skip
        assert len(server.connections) == 1

    def test_mail_refused_pipelined(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A refused sender is reported at the mail stage even though RCPT and DATA were sent."""
        server = smtp_server()
        server.handler.ehlo_extra = ["PIPELINING"]
        server.handler.mail_reply_once = "553 5.1.8 bad sender"
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(SMTPReplyError) as failure:
                session.send(SENDER, [RCPT], MESSAGE)
            assert (failure.value.stage, failure.value.code) == ("mail", 553)
            session.send(SENDER, [RCPT], MESSAGE)
        assert server.handler.connections == 1
        assert len(server.handler.wait_for_messages(1)) == 1


class TestLockStep:
    """Without PIPELINING, each command waits for its reply."""

    def test_waits_for_each_reply(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """After each of MAIL, RCPT, RCPT and DATA the client sends nothing until answered."""
        early: list[str] = []

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo(extensions=("8BITMIME",))
            for command, reply in (
                ("MAIL", "250 OK"),
                ("RCPT", "250 OK"),
                ("RCPT", "250 OK"),
                ("DATA", "354 go ahead"),
            ):
                conn.expect(command)
                with contextlib.suppress(TimeoutError):  # good: the client waits for us
                    early.append(conn.readline(timeout=0.1))
                conn.send(reply)
            conn.read_until_data_end()
            conn.send("250 OK: queued as STEP1")
            conn.expect("QUIT", "221 bye")

        server = scripted_server(script)
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, RECIPIENTS[:2], MESSAGE)
        server.stop()
        assert early == []
        assert result.accepted == RECIPIENTS[:2]

    def test_no_rcpt_after_refused_mail(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """When MAIL is refused, no RCPT or DATA follows; RSET does."""
        seen: list[str] = []

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo(extensions=("8BITMIME",))
            conn.expect("MAIL", "550 5.7.1 not you")
            while (line := conn.readline()).upper() != "QUIT":
                seen.append(line)
                conn.send("250 OK")
            conn.send("221 bye")

        server = scripted_server(script)
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(SMTPReplyError) as failure:
                session.send(SENDER, [RCPT], MESSAGE)
            assert failure.value.stage == "mail"
        server.stop()
        assert seen == ["RSET"]


class TestPipelinedVsLockStep:
    """The same message gets the same per-recipient results with and without PIPELINING."""

    def test_identical_results(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """aiosmtpd with and without PIPELINING advertised yields identical outcomes."""
        recipients = ["ok1@example.org", "later@example.org", "ok2@example.org", "bad@example.org"]
        outcomes = {}
        for mode, extra in (("lockstep", []), ("pipelined", ["PIPELINING"])):
            server = smtp_server()
            server.handler.ehlo_extra = [*extra, "ENHANCEDSTATUSCODES"]
            server.handler.rcpt_replies = {
                "later@example.org": "451 4.3.0 greylisted",
                "bad@example.org": "550 5.1.1 no such user",
            }
            with SMTPSession(make_profile(server, "smtp")) as session:
                result = session.send(SENDER, recipients, MESSAGE)
            lines = [str(line)[:7] for line in result.transcript]
            pipelined = lines[:2] == ["C: MAIL", "C: RCPT"]
            assert pipelined is (mode == "pipelined")
            [message] = server.handler.wait_for_messages(1)
            outcomes[mode] = (
                [
                    (r.recipient, r.status, r.code, r.enhanced_code, r.reply)
                    for r in result.recipients
                ],
                message.rcpt_tos,
                message.content,
            )
        assert outcomes["pipelined"] == outcomes["lockstep"]
        assert outcomes["lockstep"][1] == ("ok1@example.org", "ok2@example.org")
