"""One session, many messages: held open, health-checked, recycled, reconnected, closed."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import pytest

from mailworker import SMTPReplyError, SMTPSession
from tests.servers import ScriptConnection, ScriptedServer, SMTPServer
from tests.smtp.helpers import MESSAGE, RCPT, SENDER, ProfileFactory, smtp_script, verb

SMTPFactory = Callable[..., SMTPServer]
ScriptedFactory = Callable[..., ScriptedServer]


class TestHeldSession:
    """Messages share one connection and one login."""

    def test_hundred_messages_one_connection(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """100 messages over STARTTLS + AUTH: one TCP connection, one TLS handshake, one AUTH."""
        server = smtp_server(tls="starttls", auth=True, require_starttls=True)
        with SMTPSession(make_profile(server, "smtp+starttls")) as session:
            for i in range(100):
                result = session.send(SENDER, [RCPT], MESSAGE + f"n={i}\r\n".encode())
                assert result.accepted == [RCPT]
            assert session.connections == 1
        messages = server.handler.wait_for_messages(100)
        counts = server.handler.counts
        assert counts["connections"] == 1
        assert counts["tls_handshakes"] == 1
        assert counts["AUTH"] == 1
        assert counts["EHLO"] == 2  # before and after STARTTLS, never again
        assert counts["RSET"] == 0
        assert counts["NOOP"] == 0
        assert counts["QUIT"] == 1
        assert {m.connection_id for m in messages} == {1}
        assert [m.content for m in messages] == [
            MESSAGE + f"n={i}\r\n".encode() for i in range(100)
        ]

    def test_max_messages_recycles(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """max_messages=10 and 25 messages: three connections, QUIT before each new one."""
        server = smtp_server(tls="implicit", auth=True)
        with SMTPSession(make_profile(server, "smtps", max_messages=10)) as session:
            for _ in range(25):
                session.send(SENDER, [RCPT], MESSAGE)
            counts = server.handler.counts
            assert (counts["connections"], counts["QUIT"]) == (3, 2)
            assert session.connections == 3
        messages = server.handler.wait_for_messages(25)
        assert sorted(Counter(m.connection_id for m in messages).values()) == [5, 10, 10]
        assert server.handler.counts["QUIT"] == 3
        assert server.handler.counts["AUTH"] == 3

    def test_quit_precedes_reconnect(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """When a session is recycled, the old connection has said QUIT before the new one opens."""
        events: list[str] = []

        def record(conn: ScriptConnection, line: str) -> None:
            if line == "QUIT" or line.startswith("EHLO"):
                events.append(f"{verb(line)} {conn.index}")

        script = smtp_script(on_line=record)
        server = scripted_server(script)
        with SMTPSession(make_profile(server, "smtp", max_messages=2)) as session:
            for _ in range(5):
                session.send(SENDER, [RCPT], MESSAGE)
        server.stop()
        assert events == [
            "EHLO 0", "QUIT 0", "EHLO 1", "QUIT 1", "EHLO 2", "QUIT 2",
        ]  # fmt: skip


class TestIdle:
    """An idle session is checked with NOOP before reuse, and replaced if it is gone."""

    def test_noop_after_idle_gap(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """After more than noop_after seconds idle, a NOOP precedes the next transaction."""
        server = smtp_server()
        with SMTPSession(make_profile(server, "smtp", noop_after=0.3)) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            session.send(SENDER, [RCPT], MESSAGE)
            assert server.handler.counts["NOOP"] == 0
            time.sleep(0.4)
            session.send(SENDER, [RCPT], MESSAGE)
            assert server.handler.counts["NOOP"] == 1
            assert "C: NOOP" in session.transcript.as_strings()
        assert server.handler.connections == 1
        assert len(server.handler.wait_for_messages(3)) == 3

    @pytest.mark.parametrize("noop_after", [0.0, 10.0], ids=["noop-detects", "mail-detects"])
    def test_server_closed_idle_session(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, noop_after: float
    ) -> None:
        """A session the server dropped while idle is replaced transparently; the send succeeds."""
        server = smtp_server(tls="implicit", auth=True)
        with SMTPSession(make_profile(server, "smtps", noop_after=noop_after)) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            server.drop_connections()
            result = session.send(SENDER, [RCPT], MESSAGE)
            assert result.accepted == [RCPT]
            assert session.connections == 2
        assert len(server.handler.wait_for_messages(2)) == 2
        assert server.handler.connections == 2

    def test_server_closed_idle_session_pipelined(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """The transparent reconnect also works when the envelope is pipelined."""
        server = smtp_server()
        server.handler.ehlo_extra = ["PIPELINING"]
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            server.drop_connections()
            session.send(SENDER, [RCPT], MESSAGE)
        assert len(server.handler.wait_for_messages(2)) == 2

    def test_server_restarted(self, smtp_server: SMTPFactory, make_profile: ProfileFactory) -> None:
        """A server restart between messages costs a reconnect, not a failed send."""
        server = smtp_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            server.restart()
            session.send(SENDER, [RCPT], MESSAGE)
        assert len(server.handler.wait_for_messages(2)) == 2


class TestClose:
    """close() says QUIT whenever the socket is open, and never raises."""

    def test_close_sends_quit(self, smtp_server: SMTPFactory, make_profile: ProfileFactory) -> None:
        """close() sends QUIT and the session is no longer connected."""
        server = smtp_server()
        session = SMTPSession(make_profile(server, "smtp"))
        session.send(SENDER, [RCPT], MESSAGE)
        session.close()
        assert not session.connected
        server.handler.wait_for_count("QUIT", 1)
        assert session.transcript.as_strings()[-2:][0] == "C: QUIT"

    def test_context_manager_sends_quit(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """Leaving the with-block sends QUIT, also when the block raised."""
        server = smtp_server()

        def application() -> None:
            with SMTPSession(make_profile(server, "smtp")) as session:
                session.send(SENDER, [RCPT], MESSAGE)
                raise RuntimeError("application error")

        with pytest.raises(RuntimeError):
            application()
        server.handler.wait_for_count("QUIT", 1)

    def test_quit_after_refusal(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """After a refused message, close() still sends QUIT."""
        server = smtp_server()
        server.handler.mail_reply = "550 5.7.1 not today"
        session = SMTPSession(make_profile(server, "smtp"))
        with pytest.raises(SMTPReplyError):
            session.send(SENDER, [RCPT], MESSAGE)
        session.close()
        server.handler.wait_for_count("QUIT", 1)
        assert server.handler.counts["RSET"] == 1

    def test_close_when_server_gone(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """close() does not raise when the server has vanished, and can be called twice."""
        server = smtp_server(tls="implicit", auth=True)
        session = SMTPSession(make_profile(server, "smtps"))
        session.send(SENDER, [RCPT], MESSAGE)
        server.stop()
        session.close()
        session.close()
        assert not session.connected

    def test_close_when_server_silent(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """close() against a server that never answers QUIT returns within the timeout."""

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo()
            conn.wait_for_close(timeout=5)

        server = scripted_server(script)
        session = SMTPSession(make_profile(server, "smtp", timeout=0.3))
        session.connect()
        start = time.monotonic()
        session.close()
        assert time.monotonic() - start < 2
        assert not session.connected

    def test_close_never_connected(self, make_profile: ProfileFactory) -> None:
        """close() on a session that never connected is a no-op."""
        session = SMTPSession(make_profile(1, "smtp"))
        session.close()
        assert not session.connected

    def test_send_after_close_reconnects(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A closed session opens a new connection on the next send."""
        server = smtp_server()
        session = SMTPSession(make_profile(server, "smtp"))
        session.send(SENDER, [RCPT], MESSAGE)
        session.close()
        session.send(SENDER, [RCPT], MESSAGE)
        session.close()
        assert server.handler.connections == 2
        assert len(server.handler.wait_for_messages(2)) == 2
