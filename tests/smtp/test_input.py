"""Bad input is refused before anything reaches the server: no command injection."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mailworker import InvalidMessageError, SMTPSession
from tests.servers import SMTPServer
from tests.smtp.helpers import MESSAGE, RCPT, SENDER, ProfileFactory

SMTPFactory = Callable[..., SMTPServer]


class TestInputValidation:
    """Addresses that could smuggle commands, and payloads of the wrong type, are refused."""

    @pytest.mark.parametrize(
        ("sender", "recipients"),
        [
            pytest.param(SENDER, [f"{RCPT}>\r\nRCPT TO:<victim@example.org"], id="crlf-rcpt"),
            pytest.param(f"{SENDER}\r\nRSET", [RCPT], id="crlf-sender"),
            pytest.param(SENDER, [f"{RCPT}\nDATA"], id="lf-rcpt"),
            pytest.param(SENDER, [f"<{RCPT}>"], id="angle-brackets"),
            pytest.param(SENDER, [f"{RCPT} NOTIFY=NEVER"], id="space-parameter"),
            pytest.param(SENDER, [""], id="empty-recipient"),
            pytest.param(SENDER, [], id="no-recipient"),
            pytest.param(SENDER, RCPT, id="string-not-list"),
        ],
    )
    def test_bad_addresses(
        self,
        smtp_server: SMTPFactory,
        make_profile: ProfileFactory,
        sender: str,
        recipients: list[str],
    ) -> None:
        """The send raises InvalidMessageError (a ValueError) and the server sees no transaction."""
        server = smtp_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(InvalidMessageError) as failure:
                session.send(sender, recipients, MESSAGE)
            assert isinstance(failure.value, ValueError)
            session.send(SENDER, [RCPT], MESSAGE)  # the session is unharmed
        counts = server.handler.counts
        assert (counts["MAIL"], counts["RCPT"], counts["RSET"]) == (1, 1, 0)
        assert [m.rcpt_tos for m in server.handler.wait_for_messages(1)] == [(RCPT,)]

    def test_null_sender_allowed(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """The null reverse-path (bounces) is sent as MAIL FROM:<>."""
        server = smtp_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send("", [RCPT], MESSAGE)
        assert str(result.transcript[0]).startswith("C: MAIL FROM:<> ")
        [message] = server.handler.wait_for_messages(1)
        assert message.mail_from == "<>"  # how aiosmtpd records the null sender

    def test_message_must_be_bytes(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A str message is refused with InvalidMessageError naming the message."""
        server = smtp_server()
        with (
            SMTPSession(make_profile(server, "smtp")) as session,
            pytest.raises(InvalidMessageError, match="message"),
        ):
            session.send(SENDER, [RCPT], MESSAGE.decode())  # type: ignore[arg-type]
        assert server.handler.counts["MAIL"] == 0
