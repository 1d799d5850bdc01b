"""Delivery status notifications (RFC 3461) against Postfix's ``smtp-sink``, which offers
DSN (``-N`` hides it) and dumps the MAIL and RCPT parameters it received; and through a
Delivery (real Redis) to see what ``mail.sent`` says.

A server that does not offer DSN would refuse the parameters (aiosmtpd answers 555), so
the message goes without them and the result, and the ``mail.sent`` event, say so.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from mailworker import DSN, SMTPSession
from mailworker.queue.names import SEND_MAIL, SEND_MESSAGE
from mailworker.smtp.dsn import xtext
from mailworker.smtp.profile import Profile
from mailworker.worker.delivery import Delivery
from mailworker.worker.sessions import SessionPool
from mailworker.worker.settings import Settings
from tests.servers import SMTPServer
from tests.servers.sink import SinkFactory
from tests.worker_process import BASE_SETTINGS

SENDER = "app@example.com"
MESSAGE = b"From: app@example.com\r\nTo: ann@example.org\r\nSubject: dsn\r\n\r\nHi\r\n"
#: The issue's example: bounces and delays, headers only, an envelope id.
ASKED = DSN(notify=("FAILURE", "DELAY"), ret="HDRS", envid="order 42+x=y")
ENVID_XTEXT = "order+2042+2Bx+3Dy"


def client_lines(transcript: Any) -> list[str]:
    """The MAIL and RCPT lines of a transcript (TranscriptLine objects or strings)."""
    lines = [str(line) for line in transcript]
    return [line for line in lines if line.startswith(("C: MAIL", "C: RCPT"))]


class TestXtext:
    """ENVID and ORCPT values are RFC 3461 xtext."""

    @pytest.mark.parametrize(
        ("text", "encoded"),
        [
            ("order-42", "order-42"),
            ("a+b=c", "a+2Bb+3Dc"),
            ("two words", "two+20words"),
            ("tab\there", "tab+09here"),
            ("\r\n", "+0D+0A"),
            ("~!", "~!"),
            ("caf\u00e9", "caf+C3+A9"),
        ],
    )
    def test_encoding(self, text: str, encoded: str) -> None:
        """Printable ASCII but ``+`` and ``=`` stays; everything else is ``+XX``."""
        assert xtext(text) == encoded


class TestDSNValue:
    """A DSN is checked when made, and gives the parameters for MAIL and RCPT."""

    def test_parameters(self) -> None:
        """RET and ENVID go on MAIL; NOTIFY and ORCPT (xtext) on each RCPT."""
        assert ASKED.mail_params() == ["RET=HDRS", f"ENVID={ENVID_XTEXT}"]
        assert ASKED.rcpt_params("ann+tag@example.org") == [
            "NOTIFY=FAILURE,DELAY",
            "ORCPT=rfc822;ann+2Btag@example.org",
        ]

    def test_defaults_leave_it_to_the_server(self) -> None:
        """An empty DSN adds only ORCPT; a non-ASCII address gets no ORCPT at all."""
        assert DSN().mail_params() == []
        assert DSN().rcpt_params("ann@example.org") == ["ORCPT=rfc822;ann@example.org"]
        assert DSN(notify=("NEVER",)).rcpt_params("z\u00f6e@example.org") == ["NOTIFY=NEVER"]

    def test_a_list_is_taken(self) -> None:
        """A list for notify (an untyped caller) becomes a tuple."""
        assert DSN(notify=["SUCCESS"]).notify == ("SUCCESS",)  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("options", "message"),
        [
            ({"notify": ("NEVER", "FAILURE")}, "dsn.notify: NEVER cannot be combined"),
            ({"notify": ("failure",)}, "dsn.notify: 'failure' is not one of"),
            ({"notify": ("DELAY", "DELAY")}, "dsn.notify: a value is given twice"),
            ({"notify": "FAILURE"}, "dsn.notify: a tuple of"),
            ({"ret": "BODY"}, "dsn.ret: 'BODY' is not FULL or HDRS"),
            ({"envid": ""}, "dsn.envid: a non-empty string"),
            ({"envid": "a\r\nRCPT TO:<x@y>"}, "dsn.envid: printable ASCII only"),
            ({"envid": "caf\u00e9"}, "dsn.envid: printable ASCII only"),
            ({"envid": "+" * 34}, "dsn.envid: at most 100 characters once xtext-encoded"),
        ],
    )
    def test_refused(self, options: dict[str, Any], message: str) -> None:
        """Values outside RFC 3461 raise ValueError naming the field."""
        with pytest.raises(ValueError, match=message.replace("+", r"\+")):
            DSN(**options)

    def test_envid_of_100_encoded_characters(self) -> None:
        """An ENVID exactly 100 characters long once encoded is taken."""
        assert DSN(envid="+" * 33 + "x").mail_params() == ["ENVID=" + "+2B" * 33 + "x"]


class TestOffered:
    """smtp-sink offers DSN: the parameters go out and arrive, pipelined or not."""

    @pytest.mark.parametrize("options", [(), ("-p",)], ids=["pipelined", "lock-step"])
    def test_parameters_arrive(self, start_sink: SinkFactory, options: tuple[str, ...]) -> None:
        """MAIL carries RET and ENVID, every RCPT NOTIFY and ORCPT; the transcript shows
        them and the result says they were requested."""
        sink = start_sink(*options)
        recipients = ["ann@example.org", "bob+news@example.org"]
        with SMTPSession(sink.profile()) as session:
            assert session.info is not None
            assert "DSN" in session.info.capabilities
            assert ("PIPELINING" in session.info.capabilities) is not bool(options)
            result = session.send(SENDER, recipients, MESSAGE, dsn=ASKED)
        sink.settle(1)
        assert result.dsn == "requested"
        assert result.accepted == recipients
        assert client_lines(result.transcript) == [
            f"C: MAIL FROM:<{SENDER}> RET=HDRS ENVID={ENVID_XTEXT}",
            "C: RCPT TO:<ann@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;ann@example.org",
            "C: RCPT TO:<bob+news@example.org> NOTIFY=FAILURE,DELAY "
            "ORCPT=rfc822;bob+2Bnews@example.org",
        ]
        [dump] = sink.dumps()
        assert dump.mail_args == f"<{SENDER}> RET=HDRS ENVID={ENVID_XTEXT}"
        assert dump.rcpt_args == (
            "<ann@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;ann@example.org",
            "<bob+news@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob+2Bnews@example.org",
        )

    def test_not_asked(self, start_sink: SinkFactory) -> None:
        """Without a DSN nothing is added, although the server offers it."""
        sink = start_sink()
        with SMTPSession(sink.profile()) as session:
            result = session.send(SENDER, ["ann@example.org"], MESSAGE)
        sink.settle(1)
        assert result.dsn is None
        [dump] = sink.dumps()
        assert dump.mail_args == f"<{SENDER}>"
        assert dump.rcpt_args == ("<ann@example.org>",)


class TestNotOffered:
    """A server without DSN gets the message without the parameters, and we say so."""

    def test_smtp_sink_without_dsn(self, start_sink: SinkFactory) -> None:
        """With ``-N`` the envelope is plain and the result says ``not_offered``."""
        sink = start_sink("-N")
        with SMTPSession(sink.profile()) as session:
            assert session.info is not None
            assert "DSN" not in session.info.capabilities
            result = session.send(SENDER, ["ann@example.org"], MESSAGE, dsn=ASKED)
        sink.settle(1)
        assert result.dsn == "not_offered"
        assert client_lines(result.transcript) == [
            f"C: MAIL FROM:<{SENDER}>",
            "C: RCPT TO:<ann@example.org>",
        ]
        [dump] = sink.dumps()
        assert dump.mail_args == f"<{SENDER}>"
        assert dump.rcpt_args == ("<ann@example.org>",)

    def test_aiosmtpd(self, smtp_server: Callable[..., SMTPServer]) -> None:
        """aiosmtpd (no DSN, and 555 to parameters it does not know) takes the message."""
        server = smtp_server()
        profile = Profile.from_url(f"smtp://127.0.0.1:{server.port}?timeout=5")
        with SMTPSession(profile) as session:
            result = session.send(SENDER, ["ann@example.org"], MESSAGE, dsn=ASKED)
        assert result.dsn == "not_offered"
        [received] = server.handler.wait_for_messages(1)
        assert received.mail_options == ("SIZE=" + str(len(MESSAGE)),)
        assert received.rcpt_options == ()


# -- through a Delivery: the mail.sent event --------------------------------------------


@pytest.fixture
def make_delivery(redis_client: redis.Redis, redis_url: str) -> Iterator[Callable[[int], Delivery]]:
    """Factory: ``make_delivery(port)`` is a Delivery (no Celery) whose default profile
    is plain SMTP to 127.0.0.1:``port``, storing in the test's Redis database."""
    made: list[Delivery] = []

    def create(port: int) -> Delivery:
        environ = {
            **{k: v for k, v in BASE_SETTINGS.items() if k != "MAILWORKER_LOG_FORMAT"},
            "MAILWORKER_BROKER_URL": redis_url,
            "MAILWORKER_SMTP_URL": f"smtp://127.0.0.1:{port}?timeout=5",
        }
        pool = SessionPool(lambda name: Profile.from_env(name, environ))
        delivery = Delivery(Settings.from_env(environ), redis_client, pool)
        made.append(delivery)
        return delivery

    yield create
    for delivery in made:
        delivery.pool.close_all()


def sent_event(
    delivery: Delivery, task: str, task_id: str, kwargs: dict[str, Any]
) -> MutableMapping[str, Any]:
    """Run one task through ``delivery``; its one ``mail.sent`` event."""
    with capture_logs() as logs:
        result = delivery.run(task, task_id, kwargs)
    assert result["status"] == "sent", result
    [event] = [e for e in logs if e["event"] == "mail.sent"]
    return event


#: The task's dsn option (JSON).
DSN_OPTION = {"notify": ["FAILURE", "DELAY"], "ret": "HDRS", "envid": "order-42"}


class TestMailSentEvent:
    """``mail.sent`` carries ``dsn``: requested, not_offered, or None."""

    def test_not_offered(
        self, make_delivery: Callable[[int], Delivery], smtp_server: Callable[..., SMTPServer]
    ) -> None:
        """send_mail with dsn to aiosmtpd (no DSN): delivered without the parameters,
        and mail.sent says ``dsn="not_offered"``."""
        server = smtp_server()
        kwargs = {"to": "ann@example.org", "subject": "Hi", "text": "Hi", "dsn": DSN_OPTION}
        event = sent_event(make_delivery(server.port), SEND_MAIL, "t1", kwargs)
        assert event["dsn"] == "not_offered"
        [received] = server.handler.wait_for_messages(1)
        assert not any(o.startswith(("RET=", "ENVID=")) for o in received.mail_options)
        assert received.rcpt_options == ()
        assert "C: RCPT TO:<ann@example.org>" in event["transcript"]

    def test_requested(
        self, make_delivery: Callable[[int], Delivery], start_sink: SinkFactory
    ) -> None:
        """send_message with dsn to smtp-sink: the parameters are in the event's
        transcript and mail.sent says ``dsn="requested"``; without dsn it says None."""
        sink = start_sink()
        delivery = make_delivery(sink.port)
        raw = {
            "raw_b64": base64.b64encode(MESSAGE).decode("ascii"),
            "envelope_from": SENDER,
            "recipients": ["ann@example.org"],
        }
        event = sent_event(delivery, SEND_MESSAGE, "t1", {**raw, "dsn": DSN_OPTION})
        assert event["dsn"] == "requested"
        assert client_lines(event["transcript"]) == [
            f"C: MAIL FROM:<{SENDER}> RET=HDRS ENVID=order-42",
            "C: RCPT TO:<ann@example.org> NOTIFY=FAILURE,DELAY ORCPT=rfc822;ann@example.org",
        ]
        plain = sent_event(delivery, SEND_MESSAGE, "t2", raw)
        assert plain["dsn"] is None
        assert client_lines(plain["transcript"]) == [
            f"C: MAIL FROM:<{SENDER}>",
            "C: RCPT TO:<ann@example.org>",
        ]
