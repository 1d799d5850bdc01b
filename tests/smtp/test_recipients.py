"""Per-recipient outcomes: some accepted, some deferred, some rejected, or none accepted."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from mailworker import SMTPRecipientsRefused, SMTPSession
from tests.servers import SMTPServer
from tests.smtp.helpers import MESSAGE, RCPT, SENDER, ProfileFactory

SMTPFactory = Callable[..., SMTPServer]

LATER = "later@example.org"
BAD = "bad@example.org"


def mixed_server(smtp_server: SMTPFactory, *extra: str) -> SMTPServer:
    """A server that defers LATER (450) and rejects BAD (550)."""
    server = smtp_server()
    server.handler.ehlo_extra = list(extra)
    server.handler.rcpt_replies = {
        LATER: "450 4.2.1 mailbox busy, try later",
        BAD: "550 5.1.1 no such user",
    }
    return server


class TestMixedRecipients:
    """The message goes to the accepted recipients; the others are reported exactly."""

    @pytest.mark.parametrize("extra", [(), ("PIPELINING",)], ids=["lockstep", "pipelined"])
    def test_accepted_deferred_rejected(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, extra: tuple[str, ...]
    ) -> None:
        """One accepted, one 450, one 550: delivered once to the accepted one, the rest listed."""
        server = mixed_server(smtp_server, *extra)
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, [RCPT, LATER, BAD], MESSAGE)
        assert result.accepted == [RCPT]
        assert result.deferred == [LATER]
        assert set(result.refused) == {LATER, BAD}
        assert result.refused[LATER].status == "deferred"
        assert result.refused[LATER].code == 450
        assert result.refused[LATER].is_transient
        assert result.refused[BAD].status == "rejected"
        assert result.refused[BAD].code == 550
        assert not result.refused[BAD].is_transient
        assert [r.recipient for r in result.recipients] == [RCPT, LATER, BAD]
        assert result.reply.code == 250
        [message] = server.handler.wait_for_messages(1)
        assert message.rcpt_tos == (RCPT,)
        assert message.content == MESSAGE
        assert result.queue_id == message.queue_id

    def test_enhanced_codes_per_recipient(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """With ENHANCEDSTATUSCODES offered, each recipient's outcome carries its status code."""
        server = mixed_server(smtp_server, "ENHANCEDSTATUSCODES")
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, [RCPT, LATER, BAD], MESSAGE)
        assert [r.enhanced_code for r in result.recipients] == ["2.1.5", "4.2.1", "5.1.1"]
        assert result.reply.enhanced_code == "2.0.0"

    def test_no_enhanced_codes_without_extension(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """Without ENHANCEDSTATUSCODES, a status-like prefix in the text is not taken as one."""
        server = mixed_server(smtp_server)
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, [RCPT, LATER, BAD], MESSAGE)
        assert [r.enhanced_code for r in result.recipients] == [None, None, None]


class TestAllRefused:
    """No recipient accepted: an error, transient iff any refusal was, and the session lives on."""

    @pytest.mark.parametrize("extra", [(), ("PIPELINING",)], ids=["lockstep", "pipelined"])
    @pytest.mark.parametrize(
        ("recipients", "transient"),
        [
            pytest.param([LATER, BAD], True, id="one-4xx"),
            pytest.param([BAD], False, id="all-5xx"),
            pytest.param([LATER], True, id="all-4xx"),
        ],
    )
    def test_all_refused(
        self,
        smtp_server: SMTPFactory,
        make_profile: ProfileFactory,
        recipients: list[str],
        transient: bool,
        extra: tuple[str, ...],
    ) -> None:
        """SMTPRecipientsRefused lists every address; RSET, then the same connection delivers."""
        server = mixed_server(smtp_server, *extra)
        with SMTPSession(make_profile(server, "smtp")) as session:
            with pytest.raises(SMTPRecipientsRefused) as failure:
                session.send(SENDER, recipients, MESSAGE)
            exc = failure.value
            assert exc.stage == "rcpt"
            assert exc.is_transient is transient
            codes = {LATER: 450, BAD: 550}
            assert {a: r[0] for a, r in exc.refused.items()} == {a: codes[a] for a in recipients}
            assert all(exc.refused[a][2] for a in recipients)  # the server's text
            assert server.handler.messages == []
            assert session.connected
            result = session.send(SENDER, [RCPT], MESSAGE)
        assert result.accepted == [RCPT]
        handler = server.handler
        assert handler.counts["RSET"] == 1
        assert handler.connections == 1
        [message] = handler.wait_for_messages(1)
        assert message.rcpt_tos == (RCPT,)
        assert handler.rejected == []  # no empty message slipped through
