"""Message bodies reach a real server byte-correct: CRLF only, dots intact, nothing smuggled."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mailworker import SMTPSession
from tests.servers import ScriptedServer, SMTPServer
from tests.smtp.helpers import RCPT, SENDER, ProfileFactory, smtp_script, wire_form

SMTPFactory = Callable[..., SMTPServer]
ScriptedFactory = Callable[..., ScriptedServer]

HEADERS = b"From: app@example.com\r\nTo: ann@example.org\r\nSubject: dots\r\n\r\n"

#: Bodies full of bare LFs, bare CRs and lone dots, including every known smuggling sequence.
BODIES = [
    b"a\n.\nb\r.\rc\n..\n.x\n",
    b".\n",
    b".",
    b"..",
    b"\n.\n",
    b"\r.\r",
    b"\r\n.\r\n",
    b"a\n.\r\nb",  # <LF>.<CRLF>
    b"a\r\n.\nb",  # <CRLF>.<LF>
    b"a\r.\r\nb",  # <CR>.<CRLF>
    b"a\r\n.\rb",  # <CRLF>.<CR>
    b"line\r\r\nnext\n\rend",
    b"trailing bare CR\r",
    b"no final newline",
    b".leading\n..two\n...three\n. space\n",
    b"x\n.\nMAIL FROM:<evil@example.com>\nRCPT TO:<victim@example.org>\nDATA\nforged\n.\n",
    b"x\r\n.\r\nQUIT\r\n",
    b"\n\n\n.\n\n\n",
    b"",
]


class TestBodyOnTheWire:
    """Whatever the line endings and dots, exactly one message arrives, as CRLF-normalised."""

    @pytest.mark.parametrize("body", BODIES, ids=[repr(b)[2:-1][:30] or "empty" for b in BODIES])
    def test_arrives_byte_correct(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, body: bytes
    ) -> None:
        """The server's unstuffed content equals the CRLF-normalised input; nothing is split off."""
        server = smtp_server()
        message = HEADERS + body
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, [RCPT], message)
            follow_up = session.send(SENDER, [RCPT], HEADERS + b"second\r\n")
        assert result.accepted == [RCPT]
        assert follow_up.accepted == [RCPT]
        messages = server.handler.wait_for_messages(2)
        assert [m.content for m in messages] == [wire_form(message), HEADERS + b"second\r\n"]
        assert [m.mail_from for m in messages] == [SENDER, SENDER]
        counts = server.handler.counts
        assert (counts["MAIL"], counts["RCPT"], counts["DATA"]) == (2, 2, 2)

    def test_stuffing_on_the_wire(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """On the wire every line starting with a dot gets one more, and lines end in CRLF."""
        server = scripted_server(smtp_script())
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], HEADERS + BODIES[0])
        [conn] = server.wait_for_connections(1)
        server.stop()
        assert conn.data == [HEADERS + b"a\r\n..\r\nb\r\n..\r\nc\r\n...\r\n..x\r\n"]
        raw = b"".join(data for side, data in conn.transcript if side == "C")
        assert raw.count(b"\r\n.\r\n") == 1
        assert b"\n" not in raw.replace(b"\r\n", b"")
        assert b"\r" not in raw.replace(b"\r\n", b"")

    def test_large_body_with_dots(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A 220 kB body of dot lines and mixed line endings (several write blocks) is intact."""
        server = smtp_server()
        chunk = b".\n..\r\n.x\r" + b"y" * 97 + b"\n"
        message = HEADERS + chunk * 2000
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, [RCPT], message)
        [received] = server.handler.wait_for_messages(1)
        assert received.content == wire_form(message)
        assert result.size == len(wire_form(message))
