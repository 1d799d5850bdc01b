"""Server replies and faults: codes, stages, transient or permanent, and what survives them."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import pytest

from mailworker import (
    SMTPError,
    SMTPProtocolError,
    SMTPRecipientsRefused,
    SMTPReplyError,
    SMTPServerDisconnected,
    SMTPSession,
    SMTPTimeoutError,
)
from tests.servers import ScriptConnection, ScriptedServer, SMTPServer, free_port
from tests.smtp.helpers import MESSAGE, RCPT, SENDER, ProfileFactory, smtp_script

SMTPFactory = Callable[..., SMTPServer]
ScriptedFactory = Callable[..., ScriptedServer]


class TestMultilineReplies:
    """The code of a multi-line reply is the code of its last line."""

    @pytest.mark.parametrize(
        ("command", "reply", "stage", "code"),
        [
            ("MAIL", "250-2.1.0 looks fine\r\n550 5.7.1 but refused", "mail", 550),
            ("RCPT", "250-2.1.5 looks fine\r\n450 4.2.1 but busy", "rcpt", 450),
            ("END", "250-2.0.0 looks fine\r\n451 4.3.0 but not queued", "data", 451),
            ("DATA", "354-go ahead\r\n554 5.5.1 but no", "data", 554),
        ],
    )
    def test_last_line_decides_refusal(
        self,
        scripted_server: ScriptedFactory,
        make_profile: ProfileFactory,
        command: str,
        reply: str,
        stage: str,
        code: int,
    ) -> None:
        """A reply starting 2xx/3xx but ending 4xx/5xx is a refusal with the last line's code."""
        server = scripted_server(smtp_script({command: reply}))
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(SMTPReplyError) as failure:
                session.send(SENDER, [RCPT], MESSAGE)
            exc = failure.value
            assert (exc.stage, exc.code) == (stage, code)
            assert exc.is_transient is (code < 500)
            assert exc.reply.splitlines()[-1].startswith(reply.rsplit("\r\n", 1)[-1][4:])

    @pytest.mark.parametrize(
        ("command", "reply"),
        [
            ("MAIL", "550-5.7.1 looks refused\r\n250 2.1.0 but fine"),
            ("RCPT", "550-5.1.1 looks refused\r\n250 2.1.5 but fine"),
            ("END", "554-5.6.0 looks refused\r\n250 2.0.0 but queued as ABC123"),
        ],
    )
    def test_last_line_decides_success(
        self,
        scripted_server: ScriptedFactory,
        make_profile: ProfileFactory,
        command: str,
        reply: str,
    ) -> None:
        """A reply starting 5xx but ending 250 is a success."""
        server = scripted_server(smtp_script({command: reply}))
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, [RCPT], MESSAGE)
        assert result.accepted == [RCPT]

    def test_multiline_greeting(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """A multi-line greeting ending in 554 refuses the session permanently."""
        server = scripted_server(smtp_script(greeting="220-welcome\r\n554 5.3.2 no service"))
        with pytest.raises(SMTPReplyError) as failure:
            SMTPSession(make_profile(server, "smtp")).connect()
        assert (failure.value.stage, failure.value.code) == ("connect", 554)
        assert not failure.value.is_transient


class TestGarbage:
    """A reply that is not SMTP is a transient protocol error."""

    @pytest.mark.parametrize(
        ("replies", "stage"),
        [
            ({}, "connect"),
            ({"MAIL": "hello, this is not SMTP"}, "mail"),
            ({"RCPT": "\x00\x01 binary noise"}, "rcpt"),
            ({"END": "OK thanks"}, "data"),
        ],
    )
    def test_garbage(
        self,
        scripted_server: ScriptedFactory,
        make_profile: ProfileFactory,
        replies: dict[str, str],
        stage: str,
    ) -> None:
        """Garbage raises SMTPProtocolError (transient) at the stage it arrived in."""
        greeting = "HTTP/1.1 400 Bad Request" if stage == "connect" else "220 localhost ESMTP"
        server = scripted_server(smtp_script(replies, greeting=greeting))
        session = SMTPSession(make_profile(server, "smtp"))
        with pytest.raises(SMTPProtocolError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)
        assert failure.value.stage == stage
        assert failure.value.is_transient
        assert not session.connected
        session.close()


class TestGreeting:
    """The greeting decides whether there is a session at all."""

    def test_421_greeting(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """421 at the greeting is transient at the connect stage, and the client says nothing."""
        server = scripted_server(smtp_script(greeting="421 4.3.2 too busy, try later"))
        session = SMTPSession(make_profile(server, "smtp"))
        with pytest.raises(SMTPReplyError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)
        exc = failure.value
        assert (exc.stage, exc.code, exc.is_transient) == ("connect", 421, True)
        assert "too busy" in str(exc)
        server.stop()
        assert server.received == []

    def test_554_greeting(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """554 at the greeting is permanent at the connect stage."""
        server = scripted_server(smtp_script(greeting="554 5.7.1 go away"))
        with pytest.raises(SMTPReplyError) as failure:
            SMTPSession(make_profile(server, "smtp")).connect()
        assert (failure.value.stage, failure.value.code) == ("connect", 554)
        assert not failure.value.is_transient

    def test_connection_refused(self, make_profile: ProfileFactory) -> None:
        """Nobody listening is a transient disconnect at the connect stage, a ConnectionError."""
        profile = make_profile(free_port(), "smtp", host="127.0.0.1", timeout=1)
        with pytest.raises(SMTPServerDisconnected) as failure:
            SMTPSession(profile).connect()
        assert failure.value.stage == "connect"
        assert failure.value.is_transient
        assert isinstance(failure.value, ConnectionError)

    def test_hang_up_at_greeting(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """A server that accepts and hangs up at once is a transient disconnect."""
        server = scripted_server(lambda conn: None)
        with pytest.raises(SMTPServerDisconnected) as failure:
            SMTPSession(make_profile(server, "smtp")).connect()
        assert failure.value.stage == "connect"
        assert failure.value.is_transient


class TestEhlo:
    """EHLO, and HELO only when EHLO is refused."""

    def test_helo_fallback(self, smtp_server: SMTPFactory, make_profile: ProfileFactory) -> None:
        """A 5xx to EHLO makes the client fall back to HELO, and the message is delivered."""
        server = smtp_server()
        server.handler.ehlo_reply = "502 5.5.2 EHLO not implemented"
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            assert session.info is not None
            assert session.info.capabilities == ()
        [message] = server.handler.wait_for_messages(1)
        assert message.content == MESSAGE
        assert message.mail_options == ()  # no ESMTP parameters after HELO
        assert (server.handler.counts["EHLO"], server.handler.counts["HELO"]) == (1, 1)

    def test_no_helo_after_4xx(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A 4xx to EHLO is a transient error at the ehlo stage, without trying HELO."""
        server = smtp_server()
        server.handler.ehlo_reply = "451 4.3.0 try again later"
        with pytest.raises(SMTPReplyError) as failure:
            SMTPSession(make_profile(server, "smtp")).connect()
        assert (failure.value.stage, failure.value.code) == ("ehlo", 451)
        assert failure.value.is_transient
        assert server.handler.counts["HELO"] == 0

    def test_configured_ehlo_name(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """local_hostname is the name given in EHLO."""
        server = scripted_server(smtp_script())
        profile = make_profile(server, "smtp", local_hostname="mailer.example.com")
        with SMTPSession(profile):
            pass
        server.stop()
        assert server.received[0] == "EHLO mailer.example.com"

    def test_default_ehlo_name(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """Without local_hostname, EHLO gives a dotted domain or an address literal (RFC 5321)."""
        server = scripted_server(smtp_script())
        with SMTPSession(make_profile(server, "smtp")):
            pass
        server.stop()
        name = server.received[0].split(" ", 1)[1]
        assert re.fullmatch(r"\[(IPv6:)?[0-9A-Fa-f:.]+\]|[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+", name)

    def test_helo_also_refused(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """EHLO and HELO both refused is a permanent error at the ehlo stage."""
        server = scripted_server(
            smtp_script({"EHLO": "500 5.5.1 unknown", "HELO": "550 5.7.1 not you"})
        )
        with pytest.raises(SMTPReplyError) as failure:
            SMTPSession(make_profile(server, "smtp")).connect()
        assert (failure.value.stage, failure.value.code) == ("ehlo", 550)
        assert not failure.value.is_transient


#: (stage, handler attribute, reply) for every refusal the aiosmtpd handler can inject.
REFUSALS = [
    ("mail", "mail_reply", "451 4.3.0 sender check unavailable"),
    ("mail", "mail_reply", "553 5.1.8 sender domain does not exist"),
    ("rcpt", "rcpt_replies", "450 4.2.1 mailbox busy"),
    ("rcpt", "rcpt_replies", "550 5.1.1 no such user"),
    ("data", "data_reply", "452 4.3.1 insufficient storage"),
    ("data", "data_reply", "554 5.6.0 content refused"),
]


class TestRefusals:
    """4xx and 5xx at MAIL, RCPT and the end of DATA."""

    @pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
    @pytest.mark.parametrize("enhanced", [True, False], ids=["enhanced", "plain"])
    @pytest.mark.parametrize(("stage", "attribute", "reply"), REFUSALS)
    def test_refusal(
        self,
        smtp_server: SMTPFactory,
        make_profile: ProfileFactory,
        stage: str,
        attribute: str,
        reply: str,
        enhanced: bool,
        pipelining: bool,
    ) -> None:
        """The error has the stage, code, transient flag and (if offered) the enhanced code;
        nothing is delivered, and after RSET the same connection delivers the next message."""
        server = smtp_server()
        handler = server.handler
        handler.ehlo_extra = (["ENHANCEDSTATUSCODES"] if enhanced else []) + (
            ["PIPELINING"] if pipelining else []
        )
        if attribute == "rcpt_replies":
            handler.rcpt_replies_once[RCPT] = reply
        else:
            setattr(handler, f"{attribute}_once", reply)
        code = int(reply[:3])
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(SMTPReplyError) as failure:
                session.send(SENDER, [RCPT], MESSAGE)
            exc = failure.value
            assert (exc.stage, exc.code) == (stage, code)
            assert exc.is_transient is (code < 500)
            assert exc.enhanced_code == (reply.split()[1] if enhanced else None)
            assert isinstance(exc, SMTPRecipientsRefused) is (stage == "rcpt")
            assert str(code) in str(exc)
            assert ("transient" if code < 500 else "permanent") in str(exc)
            assert exc.transcript  # the failed exchange, for the dead-letter record
            assert handler.messages == []
            session.send(SENDER, [RCPT], MESSAGE)
        assert handler.counts["RSET"] == 1
        assert handler.connections == 1
        [message] = handler.wait_for_messages(1)
        assert message.rcpt_tos == (RCPT,)

    def test_data_command_refused(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """A 4xx to the DATA command itself is transient at the data stage; no content is sent."""
        server = scripted_server(smtp_script({"DATA": "451 4.3.0 not now"}))
        with (
            SMTPSession(make_profile(server, "smtp")) as session,
            pytest.raises(SMTPReplyError) as failure,
        ):
            session.send(SENDER, [RCPT], MESSAGE)
        assert (failure.value.stage, failure.value.code) == ("data", 451)
        assert failure.value.is_transient
        server.stop()
        assert [line.split()[0].split(":")[0] for line in server.received[1:]] == [
            "MAIL",
            "RCPT",
            "DATA",
            "RSET",
            "QUIT",
        ]

    @pytest.mark.parametrize(
        ("stage", "attribute"),
        [("mail", "mail_reply_once"), ("rcpt", "rcpt"), ("data", "data_reply_once")],
    )
    def test_421_drops_session(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, stage: str, attribute: str
    ) -> None:
        """A 421 on a connection opened for this send is a transient error (not retried); the
        next send opens a new connection."""
        server = smtp_server()
        handler = server.handler
        if attribute == "rcpt":
            handler.rcpt_replies_once[RCPT] = "421 4.3.2 shutting down"
        else:
            setattr(handler, attribute, "421 4.3.2 shutting down")
        session = SMTPSession(make_profile(server, "smtp"))
        try:
            with pytest.raises(SMTPError) as failure:
                session.send(SENDER, [RCPT], MESSAGE)
            assert (failure.value.stage, failure.value.code) == (stage, 421)
            assert failure.value.is_transient
            assert not session.connected
            session.send(SENDER, [RCPT], MESSAGE)
        finally:
            session.close()
        assert handler.connections == 2
        assert handler.counts["RSET"] == 0

    def test_421_at_mail_on_held_session_retries(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A held session the server is closing (421 at MAIL) is replaced and the message sent."""
        server = smtp_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            server.handler.mail_reply_once = "421 4.4.2 idle too long"
            result = session.send(SENDER, [RCPT], MESSAGE)
        assert result.accepted == [RCPT]
        assert server.handler.connections == 2
        assert len(server.handler.wait_for_messages(2)) == 2


class TestDisconnects:
    """A server that goes away mid-transaction."""

    @pytest.mark.parametrize("size", [1_000, 2_000_000], ids=["small", "large"])
    def test_drop_mid_data(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory, size: int
    ) -> None:
        """Hanging up after part of the content is a transient disconnect at the data stage."""

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo(extensions=("8BITMIME",))
            conn.expect("MAIL", "250 OK")
            conn.expect("RCPT", "250 OK")
            conn.expect("DATA", "354 go ahead")
            conn.readline()
            conn.readline()
            conn.close()

        server = scripted_server(script)
        body = MESSAGE + b"x" * 70 + b"\r\n"
        message = body * (size // len(body))
        session = SMTPSession(make_profile(server, "smtp"))
        start = time.monotonic()
        with pytest.raises(SMTPServerDisconnected) as failure:
            session.send(SENDER, [RCPT], message)
        assert time.monotonic() - start < 3
        exc = failure.value
        assert exc.stage == "data"
        assert exc.is_transient
        assert isinstance(exc, ConnectionError)
        assert not session.connected
        session.close()  # never raises

    def test_next_send_reconnects_after_drop(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """After a connection dropped mid-DATA, the same session object reconnects and delivers."""
        first = smtp_script()

        def script(conn: ScriptConnection) -> None:
            if conn.index == 0:
                conn.greet_and_ehlo(extensions=("8BITMIME",))
                conn.expect("MAIL", "250 OK")
                conn.expect("RCPT", "250 OK")
                conn.expect("DATA", "354 go ahead")
                conn.readline()
                conn.close()
            else:
                first(conn)

        server = scripted_server(script)
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(SMTPServerDisconnected):
                session.send(SENDER, [RCPT], MESSAGE)
            result = session.send(SENDER, [RCPT], MESSAGE)
            assert session.connections == 2
        assert result.accepted == [RCPT]
        server.stop()
        assert len(server.connections) == 2
        assert len(server.connections[1].data) == 1


class TestTimeouts:
    """A server slower than the timeout is given up on quickly, as a transient error."""

    @pytest.mark.parametrize(
        ("command", "stage"),
        [
            ("GREETING", "connect"),
            ("EHLO", "ehlo"),
            ("MAIL", "mail"),
            ("RCPT", "rcpt"),
            ("DATA", "data"),
        ],
    )
    def test_slow_reply(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, command: str, stage: str
    ) -> None:
        """A reply slower than timeout=0.5 raises SMTPTimeoutError (a TimeoutError) in ~0.5 s."""
        server = smtp_server()
        server.handler.command_delays[command] = 5.0
        session = SMTPSession(make_profile(server, "smtp", timeout=0.5))
        start = time.monotonic()
        with pytest.raises(SMTPTimeoutError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)
        took = time.monotonic() - start
        assert 0.4 < took < 2.5
        exc = failure.value
        assert exc.stage == stage
        assert exc.is_transient
        assert isinstance(exc, TimeoutError)
        assert not session.connected
        session.close()

    def test_silent_server(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """A server that accepts the connection but never speaks times out at the connect stage."""
        server = scripted_server(lambda conn: conn.wait_for_close(timeout=5))
        start = time.monotonic()
        with pytest.raises(SMTPTimeoutError) as failure:
            SMTPSession(make_profile(server, "smtp", timeout=0.5)).connect()
        assert time.monotonic() - start < 2.5
        assert failure.value.stage == "connect"
        assert failure.value.is_transient

    def test_stalled_content_transfer(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """A server that stops reading mid-content times out at the data stage, and no QUIT is
        written into the unfinished message (the server would take it as message text)."""

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo(extensions=("8BITMIME",))
            conn.expect("MAIL", "250 OK")
            conn.expect("RCPT", "250 OK")
            conn.expect("DATA", "354 go ahead")
            conn.sleep(5)  # never read the content

        server = scripted_server(script)
        message = (b"x" * 998 + b"\r\n") * 4096  # 4 MB: more than the socket buffers hold
        session = SMTPSession(make_profile(server, "smtp", timeout=0.3))
        start = time.monotonic()
        with pytest.raises(SMTPTimeoutError) as failure:
            session.send(SENDER, [RCPT], message)
        assert time.monotonic() - start < 3
        assert (failure.value.stage, failure.value.is_transient) == ("data", True)
        assert not session.connected
        assert "C: QUIT" not in session.transcript.as_strings()
