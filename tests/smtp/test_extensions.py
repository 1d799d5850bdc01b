"""Checks before sending: SIZE, SMTPUTF8 and 8BITMIME, and the MAIL parameters they add."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mailworker import SMTPNotSupportedError, SMTPSession
from tests.servers import SMTPServer
from tests.smtp.helpers import MESSAGE, RCPT, SENDER, ProfileFactory, wire_form

SMTPFactory = Callable[..., SMTPServer]

EIGHT_BIT = "Subject: café\r\n\r\nGrüße aus Köln\r\n".encode()


class TestSize:
    """SIZE (RFC 1870): oversized messages are refused before anything is sent."""

    def test_too_large_refused_without_sending(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A message over the advertised SIZE is a permanent error and MAIL is never sent."""
        server = smtp_server()
        server.handler.ehlo_extra = ["SIZE 1000"]
        big = MESSAGE + b"x" * 2000 + b"\r\n"
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(SMTPNotSupportedError) as failure:
                session.send(SENDER, [RCPT], big)
            exc = failure.value
            assert not exc.is_transient
            assert "SIZE" in str(exc)
            assert "1000" in str(exc)
            assert server.handler.counts["MAIL"] == 0
            session.send(SENDER, [RCPT], MESSAGE)  # the session is unharmed
        assert server.handler.connections == 1
        assert len(server.handler.wait_for_messages(1)) == 1

    def test_size_parameter_sent(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """When SIZE is offered, MAIL FROM carries SIZE=<message size>."""
        server = smtp_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
        [message] = server.handler.wait_for_messages(1)
        assert f"SIZE={len(MESSAGE)}" in message.mail_options

    def test_no_size_parameter_when_not_offered(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """Without SIZE on offer, no SIZE= parameter is sent."""
        server = smtp_server()
        server.handler.ehlo_remove = {"SIZE"}
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
        [message] = server.handler.wait_for_messages(1)
        assert not any(o.upper().startswith("SIZE") for o in message.mail_options)

    def test_size_counts_crlf_line_endings(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """SIZE= and result.size count the message as sent, with CRLF line endings (RFC 1870)."""
        server = smtp_server()
        body = b"Subject: lf\n\n" + b"line\n" * 100
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, [RCPT], body)
        [message] = server.handler.wait_for_messages(1)
        sent = len(wire_form(body))
        assert len(message.content) == sent
        assert f"SIZE={sent}" in message.mail_options
        assert result.size == sent

    def test_size_limit_counts_crlf_line_endings(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A bare-LF message that only exceeds SIZE once its line endings are CRLF is refused."""
        server = smtp_server()
        server.handler.ehlo_extra = ["SIZE 1000"]
        body = b"Subject: lf\n\n" + b"abcdefgh\n" * 105  # 958 bytes raw, 1064 as sent
        assert len(body) < 1000 < len(wire_form(body))
        with (
            SMTPSession(make_profile(server, "smtp")) as session,
            pytest.raises(SMTPNotSupportedError),
        ):
            session.send(SENDER, [RCPT], body)
        assert server.handler.counts["MAIL"] == 0


class TestSMTPUTF8:
    """Non-ASCII addresses need SMTPUTF8 (RFC 6531)."""

    def test_refused_without_smtputf8(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A non-ASCII address without SMTPUTF8 on offer is a permanent error; nothing is sent."""
        server = smtp_server()
        server.handler.ehlo_remove = {"SMTPUTF8"}
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(SMTPNotSupportedError) as failure:
                session.send(SENDER, ["jörg@exämple.de"], MESSAGE)
            assert not failure.value.is_transient
            assert "SMTPUTF8" in str(failure.value)
            session.send(SENDER, [RCPT], MESSAGE)
        assert server.handler.counts["MAIL"] == 1

    @pytest.mark.parametrize(
        ("sender", "recipient"),
        [(SENDER, "jörg@exämple.de"), ("absender@bücher.example", RCPT)],
        ids=["recipient", "sender"],
    )
    def test_sent_with_smtputf8(
        self,
        smtp_server: SMTPFactory,
        make_profile: ProfileFactory,
        sender: str,
        recipient: str,
    ) -> None:
        """With SMTPUTF8 offered, MAIL carries SMTPUTF8 and the UTF-8 addresses arrive intact."""
        server = smtp_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(sender, [recipient], MESSAGE)
        [message] = server.handler.wait_for_messages(1)
        assert "SMTPUTF8" in message.mail_options
        assert (message.mail_from, message.rcpt_tos) == (sender, (recipient,))

    def test_ascii_addresses_no_smtputf8(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """ASCII addresses do not ask for SMTPUTF8."""
        server = smtp_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
        assert "SMTPUTF8" not in server.handler.wait_for_messages(1)[0].mail_options


class Test8BitMIME:
    """8-bit content needs 8BITMIME (RFC 6152)."""

    def test_refused_without_8bitmime(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """An 8-bit body to a server without 8BITMIME is a permanent error; nothing is sent."""
        server = smtp_server()
        server.handler.ehlo_remove = {"8BITMIME"}
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(SMTPNotSupportedError) as failure:
                session.send(SENDER, [RCPT], EIGHT_BIT)
            assert not failure.value.is_transient
            assert "8BITMIME" in str(failure.value)
        assert server.handler.counts["MAIL"] == 0

    def test_body_8bitmime(self, smtp_server: SMTPFactory, make_profile: ProfileFactory) -> None:
        """With 8BITMIME offered, MAIL carries BODY=8BITMIME and the bytes arrive unchanged."""
        server = smtp_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], EIGHT_BIT)
        [message] = server.handler.wait_for_messages(1)
        assert "BODY=8BITMIME" in message.mail_options
        assert message.content == EIGHT_BIT

    def test_ascii_body_no_body_parameter(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A 7-bit body does not ask for BODY=8BITMIME."""
        server = smtp_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
        options = server.handler.wait_for_messages(1)[0].mail_options
        assert not any(o.upper().startswith("BODY=") for o in options)
