"""Against real Postfix code: ``smtp-sink`` from Debian's ``postfix`` package.

smtp-sink offers PIPELINING, ENHANCEDSTATUSCODES, 8BITMIME and DSN (no TLS, no
SIZE, no SMTPUTF8), so the pipelined path of :class:`SMTPSession` runs against a
server that advertises it. With ``-d`` it dumps every transaction to its own file:
``X-Helo-Args``, ``X-Mail-Args``, one ``X-Rcpt-Args`` per RCPT, a three-line
``Received``, then the content as received minus every CR and minus the dot that
starts a line (so CRLF becomes LF and dot-stuffing is undone), then one empty
line. The file is created at MAIL, closed before the 250 to the final dot, and
removed when the transaction is abandoned. With ``-c`` it prints
``sess= quit= mesg=`` counters (sessions ended, QUITs, messages) on stdout.

Options used here, from smtp-sink(1): ``-r``/``-f CMD`` soft/hard-reject every
such command and imply ``-p`` (no PIPELINING); ``-b``/``-B`` set those replies;
``-q CMD`` disconnects without a reply after CMD; ``-Q CMD`` replies 421 and
disconnects; ``-A 0`` answers 550 right after 354 and stops reading; ``-w N``
delays the reply to DATA; ``-E`` hides ENHANCEDSTATUSCODES; ``-8`` hides 8BITMIME.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest

from mailworker import (
    SMTPNotSupportedError,
    SMTPRecipientsRefused,
    SMTPReplyError,
    SMTPServerDisconnected,
    SMTPSession,
    SMTPTimeoutError,
)
from mailworker.smtp import SendResult
from mailworker.worker.tasks import send_mail
from tests.servers.base import wait_for
from tests.servers.sink import EHLO_NAME, SinkFactory
from tests.smtp.helpers import verb, wire_form
from tests.worker_process import WorkerProcess, producer, worker_env

SENDER = "app@example.com"


# -- messages ------------------------------------------------------------------------

#: Everything a careless client lets through: bare LF and CR, lone and leading dots,
#: <LF>.<LF> / <CR>.<CR> / <LF>.<CR><LF> smuggling sequences followed by a second
#: transaction, and a real <CRLF>.<CRLF> inside the content.
TRICKY_BODY = (
    b"bare LF line\n"
    b".\n"
    b"..two leading dots\r\n"
    b".one leading dot\n"
    b"bare CR\r.\rafter CR-dot-CR\r\n"
    b"\n.\nMAIL FROM:<evil@attacker.example>\nRCPT TO:<victim@example.org>\nDATA\n"
    b"smuggled\n.\n"
    b"\r.\r\n"
    b"\n.\r\n"
    b"\r\n.\r\nQUIT\r\n"
    b"...\n"
    b". \n"
    b"\r\r\n\n"
    b"last line without a line ending ."
)


def tricky_message(n: int, token: str) -> bytes:
    """Message ``n``: LF-only headers on odd ``n``, then :data:`TRICKY_BODY`."""
    eol = "\n" if n % 2 else "\r\n"
    headers = [
        f"From: {SENDER}",
        "To: undisclosed-recipients:;",
        f"Subject: pipelined {n:03d}",
        f"Message-ID: <{n}.{token}@test.example>",
    ]
    return (eol.join(headers) + eol + eol + f"message {n}\n").encode() + TRICKY_BODY


def as_dumped(message: bytes) -> bytes:
    """What smtp-sink writes for ``message``: the CRLF form, each CRLF as LF."""
    return wire_form(message).replace(b"\r\n", b"\n")


def lines(result: SendResult) -> list[str]:
    """The result's transcript as ``C: ...`` / ``S: ...`` strings."""
    return [str(line) for line in result.transcript]


def shape(transcript: list[str]) -> list[str]:
    """Direction and verb (client) or code (server) of each transcript line."""
    out = []
    for line in transcript:
        side, text = line[0], line[3:]
        if side == "S":
            out.append(f"S: {text[:3]}")
        elif text.startswith("<message content"):
            out.append("C: <content>")
        else:
            out.append(f"C: {verb(text)}")
    return out


# -- tests ---------------------------------------------------------------------------


class TestPipelining:
    """MAIL, every RCPT and DATA leave in one batch when smtp-sink offers PIPELINING."""

    def test_300_messages_3_recipients_one_connection(self, start_sink: SinkFactory) -> None:
        """300 messages to 3 recipients each over one connection arrive each exactly once
        with their envelope and, byte for byte, their CRLF-normalised content."""
        sink = start_sink()
        token = f"{os.getpid()}-{time.monotonic_ns()}"
        sent: dict[str, tuple[str, list[str], bytes]] = {}
        results = []
        with SMTPSession(sink.profile()) as session:
            assert session.info is not None
            assert "PIPELINING" in session.info.capabilities
            started = time.perf_counter()
            for n in range(300):
                sender = f"app+{n}@example.com"
                recipients = [f"r{n}-{k}@example.org" for k in range(3)]
                message = tricky_message(n, token)
                results.append(session.send(sender, recipients, message))
                sent[f"<{n}.{token}@test.example>"] = (sender, recipients, message)
            elapsed = time.perf_counter() - started
            assert session.connections == 1
        print(f"\n300 pipelined messages x 3 rcpt to smtp-sink (-d): {300 / elapsed:.0f} msg/s")
        settled = sink.settle(1)

        batch = ["C: MAIL", "C: RCPT", "C: RCPT", "C: RCPT", "C: DATA"]
        replies = ["S: 250", "S: 250", "S: 250", "S: 250", "S: 354"]
        expected = [*batch, *replies, "C: <content>", "C: .", "S: 250"]
        for (sender, recipients, _), result in zip(sent.values(), results, strict=True):
            assert shape(lines(result)) == expected
            assert lines(result)[:5] == [
                f"C: MAIL FROM:<{sender}>",
                *(f"C: RCPT TO:<{r}>" for r in recipients),
                "C: DATA",
            ]
            assert result.accepted == recipients

        assert settled == {"sess": 1, "quit": 1, "mesg": 300}
        dumps = sink.dumps()
        assert len(dumps) == 300, "one transaction per message, none smuggled in"
        by_id = Counter(d.header("Message-ID") for d in dumps)
        assert by_id == Counter(list(sent)), "every message exactly once"
        for dump in dumps:
            sender, recipients, message = sent[dump.header("Message-ID")]
            assert dump.helo == EHLO_NAME
            assert dump.mail_args == f"<{sender}>"
            assert dump.rcpt_args == tuple(f"<{r}>" for r in recipients)
            assert dump.content == as_dumped(message)


class TestSendMany:
    """``send_many`` through smtp-sink (PIPELINING, no CHUNKING): each message follows
    the previous one's end-of-data dot in the same write."""

    def test_300_messages_in_one_batch(self, start_sink: SinkFactory) -> None:
        """300 tricky messages in one send_many arrive each exactly once, with their
        envelope and their CRLF-normalised content, on one connection."""
        sink = start_sink()
        token = f"{os.getpid()}-{time.monotonic_ns()}"
        items = [
            (f"app+{n}@example.com", [f"r{n}-{k}@example.org" for k in range(2)],
             tricky_message(n, token))
            for n in range(300)
        ]  # fmt: skip
        with SMTPSession(sink.profile()) as session:
            results = session.send_many(items)
            assert session.connections == 1
        assert [r.accepted for r in results if isinstance(r, SendResult)] == [
            recipients for _, recipients, _ in items
        ]
        assert sink.settle(1) == {"sess": 1, "quit": 1, "mesg": 300}
        sent = {f"<{n}.{token}@test.example>": item for n, item in enumerate(items)}
        dumps = sink.dumps()
        assert Counter(d.header("Message-ID") for d in dumps) == Counter(list(sent))
        for dump in dumps:
            sender, recipients, message = sent[dump.header("Message-ID")]
            assert dump.mail_args == f"<{sender}>"
            assert dump.rcpt_args == tuple(f"<{r}>" for r in recipients)
            assert dump.content == as_dumped(message)

    def test_send_is_unchanged(self, start_sink: SinkFactory) -> None:
        """send() after send_many() on the same session: still two round trips, DATA."""
        sink = start_sink()
        with SMTPSession(sink.profile()) as session:
            session.send_many([(SENDER, ["a@example.org"], b"Subject: one\r\n\r\nx\r\n")])
            result = session.send(SENDER, ["b@example.org"], b"Subject: two\r\n\r\ny\r\n")
        assert shape(lines(result)) == [
            "C: MAIL", "C: RCPT", "C: DATA", "S: 250", "S: 250", "S: 354",
            "C: <content>", "C: .", "S: 250",
        ]  # fmt: skip
        assert sink.settle(1)["mesg"] == 2


class TestExtensions:
    """MAIL parameters follow what smtp-sink offers: 8BITMIME yes, SMTPUTF8 no."""

    def test_8bit_body_is_declared(self, start_sink: SinkFactory) -> None:
        """A UTF-8 body goes with ``BODY=8BITMIME`` and arrives unchanged; without
        8BITMIME offered (``-8``) it is refused before any command is sent."""
        sink = start_sink()
        message = "Subject: greetings\r\n\r\nGr\u00fc\u00dfe aus K\u00f6ln\n.\n".encode()
        with SMTPSession(sink.profile()) as session:
            session.send(SENDER, ["ann@example.org"], message)
        sink.settle(1)
        [dump] = sink.dumps()
        assert dump.mail_args == f"<{SENDER}> BODY=8BITMIME"
        assert dump.content == as_dumped(message)

        sink.restart("-8")
        with SMTPSession(sink.profile()) as session:
            with pytest.raises(SMTPNotSupportedError) as failure:
                session.send(SENDER, ["ann@example.org"], message)
            assert not failure.value.is_transient
            assert failure.value.stage == "mail"
            assert failure.value.transcript == []
        assert sink.settle(1) == {"sess": 1, "quit": 1, "mesg": 0}
        assert len(sink.dumps()) == 1, "only the first message"

    def test_utf8_header_needs_smtputf8(self, start_sink: SinkFactory) -> None:
        """Raw UTF-8 in a header (RFC 6532) needs SMTPUTF8, which smtp-sink does not
        offer: refused, permanent, nothing sent."""
        sink = start_sink()
        message = "Subject: caf\u00e9\r\n\r\nHi\r\n".encode()
        with SMTPSession(sink.profile()) as session:
            assert session.info is not None
            assert "SMTPUTF8" not in session.info.capabilities
            with pytest.raises(SMTPNotSupportedError) as failure:
                session.send(SENDER, ["ann@example.org"], message)
            assert (failure.value.stage, failure.value.is_transient) == ("mail", False)
        assert sink.settle(1) == {"sess": 1, "quit": 1, "mesg": 0}
        assert sink.dumps() == []


class TestEnhancedStatusCodes:
    """RFC 3463 codes come from Postfix's replies only when ENHANCEDSTATUSCODES is offered."""

    def test_parsed_from_postfix_replies(self, start_sink: SinkFactory) -> None:
        """smtp-sink's ``250 2.0.0 Ok`` gives enhanced code 2.0.0, each RCPT 2.1.5."""
        sink = start_sink()
        with SMTPSession(sink.profile()) as session:
            result = session.send(SENDER, ["ann@example.org", "bob@example.org"], b"Hi\n")
        assert result.reply.code == 250
        assert result.reply.enhanced_code == "2.0.0"
        assert str(result.reply) == "250 2.0.0 Ok"
        assert result.queue_id is None, "smtp-sink names no queue id"
        assert [(r.code, r.enhanced_code, r.reply) for r in result.recipients] == [
            (250, "2.1.5", "2.1.5 Ok")
        ] * 2

    def test_not_parsed_when_not_offered(self, start_sink: SinkFactory) -> None:
        """With ``-E`` the same ``2.0.0`` text is not taken for a status code."""
        sink = start_sink("-E")
        with SMTPSession(sink.profile()) as session:
            assert session.info is not None
            assert "ENHANCEDSTATUSCODES" not in session.info.capabilities
            result = session.send(SENDER, ["ann@example.org"], b"Hi\n")
        assert result.reply.text == "2.0.0 Ok"
        assert result.reply.enhanced_code is None
        assert result.recipients[0].enhanced_code is None


class TestRefusedRecipients:
    """smtp-sink refuses every RCPT (``-r``/``-f``, lock-step): exact per-recipient errors."""

    @pytest.mark.parametrize(
        ("options", "code", "enhanced", "text", "transient"),
        [
            (("-r", "RCPT"), 450, "4.3.0", "4.3.0 Error: command failed", True),
            (
                ("-r", "RCPT", "-b", "451 4.7.1 Greylisted, try again later"),
                451,
                "4.7.1",
                "4.7.1 Greylisted, try again later",
                True,
            ),
            (("-f", "RCPT"), 500, "5.3.0", "5.3.0 Error: command failed", False),
            (
                ("-f", "RCPT", "-B", "550 5.1.1 User unknown"),
                550,
                "5.1.1",
                "5.1.1 User unknown",
                False,
            ),
        ],
        ids=["soft", "soft-custom", "hard", "hard-custom"],
    )
    def test_every_recipient_refused(
        self,
        start_sink: SinkFactory,
        options: tuple[str, ...],
        code: int,
        enhanced: str,
        text: str,
        transient: bool,
    ) -> None:
        """SMTPRecipientsRefused lists each recipient's reply, DATA is never sent, and
        the session stays on the same connection: the next message is refused alike."""
        sink = start_sink(*options)
        recipients = ["ann@example.org", "bob@example.org", "cy@example.org"]
        with SMTPSession(sink.profile()) as session:
            assert session.info is not None
            assert "PIPELINING" not in session.info.capabilities, "-r/-f imply -p"
            for _ in range(2):
                with pytest.raises(SMTPRecipientsRefused) as failure:
                    session.send(SENDER, recipients, b"Subject: refused\r\n\r\nHi\r\n")
                error = failure.value
                assert error.refused == dict.fromkeys(recipients, (code, enhanced, text))
                assert error.is_transient is transient
                assert (error.stage, error.code, error.enhanced_code) == ("rcpt", code, enhanced)
                lock_step = ["C: MAIL", "S: 250"] + ["C: RCPT", f"S: {code}"] * 3
                assert shape(error.transcript)[:8] == lock_step, "no DATA"
                assert session.connected
            assert session.connections == 1
        assert sink.settle(1) == {"sess": 1, "quit": 1, "mesg": 0}
        assert sink.dumps() == []

    def test_rset_after_the_refusal_is_recorded(self, start_sink: SinkFactory) -> None:
        """The RSET that ends the refused transaction shows in a transcript: the
        error's or the session's."""
        sink = start_sink("-r", "RCPT")
        with SMTPSession(sink.profile()) as session:
            with pytest.raises(SMTPRecipientsRefused) as failure:
                session.send(SENDER, ["ann@example.org"], b"Hi\r\n")
            assert session.connected, "RSET was accepted"
            recorded = failure.value.transcript + session.transcript.as_strings()
        assert "C: RSET" in recorded, recorded


class TestDisconnects:
    """A server that drops the connection mid-transaction: transient, and the next
    send reconnects."""

    @pytest.mark.parametrize(("command", "delivered"), [("DATA", 0), (".", 1)])
    def test_disconnect_without_reply(
        self, start_sink: SinkFactory, command: str, delivered: int
    ) -> None:
        """``-q DATA``: nothing delivered; ``-q .``: the message was taken (it is in the
        dump) but no reply came — both SMTPServerDisconnected, transient, and only the
        second in doubt."""
        sink = start_sink("-q", command)
        message = b"Subject: dropped\r\n\r\nHi\r\n"
        session = SMTPSession(sink.profile())
        try:
            with pytest.raises(SMTPServerDisconnected) as failure:
                session.send(SENDER, ["ann@example.org"], message)
            assert failure.value.is_transient
            assert failure.value.stage == "data"
            assert failure.value.code is None
            assert failure.value.in_doubt is (command == "."), "the content was all sent"
            assert not session.connected
            assert sink.settle(1)["mesg"] == delivered
            assert len(sink.dumps()) == delivered

            sink.restart()
            result = session.send(SENDER, ["bob@example.org"], message)
            assert result.reply.code == 250
            assert session.connections == 2
        finally:
            session.close()
        sink.settle(1)
        expected = [("<ann@example.org>",)] * delivered + [("<bob@example.org>",)]
        assert sorted(d.rcpt_args for d in sink.dumps()) == expected

    def test_421_to_pipelined_rcpt(self, start_sink: SinkFactory) -> None:
        """``-Q RCPT``: the 421 ends the pipelined batch; transient, session dropped,
        the next send opens a new connection."""
        sink = start_sink("-Q", "RCPT")
        with SMTPSession(sink.profile()) as session:
            for connection in (1, 2):
                with pytest.raises(SMTPReplyError) as failure:
                    session.send(SENDER, ["ann@example.org", "bob@example.org"], b"Hi\r\n")
                error = failure.value
                assert (error.stage, error.code, error.enhanced_code) == ("rcpt", 421, "4.0.0")
                assert error.is_transient
                assert shape(error.transcript) == [
                    "C: MAIL", "C: RCPT", "C: RCPT", "C: DATA", "S: 250", "S: 421",
                ]  # fmt: skip
                assert not session.connected
                assert session.connections == connection


class TestAbortedData:
    """A server that refuses the content right after 354 and stops reading (``-A 0``)."""

    def test_550_after_354(self, start_sink: SinkFactory) -> None:
        """The 550 is reported (permanent, stage data, no enhanced code in its text), the
        session is dropped at once rather than hanging on RSET, and the next send
        reconnects."""
        sink = start_sink("-A", "0")
        with SMTPSession(sink.profile(timeout=2)) as session:
            for connection in (1, 2):
                started = time.monotonic()
                with pytest.raises(SMTPReplyError) as failure:
                    session.send(SENDER, ["ann@example.org"], b"Subject: x\r\n\r\nHi\r\n")
                assert time.monotonic() - started < 1.0
                error = failure.value
                assert (error.stage, error.code, error.enhanced_code) == ("data", 550, None)
                assert error.reply == "This violates SMTP"
                assert not error.is_transient
                assert not error.in_doubt
                assert not session.connected
                assert session.connections == connection
        assert sink.settle(2) == {"sess": 2, "quit": 0, "mesg": 0}
        assert sink.dumps() == []

    def test_550_while_a_large_content_is_written(self, start_sink: SinkFactory) -> None:
        """With 4 MB to write, the connection breaks under the write (EPIPE); the
        server's 550 is still there to read, and it is what gets reported: permanent."""
        sink = start_sink("-A", "0")
        message = b"Subject: large\r\n\r\n" + (b"x" * 76 + b"\r\n") * 52_000
        with (
            SMTPSession(sink.profile(timeout=2)) as session,
            pytest.raises(SMTPReplyError) as failure,
        ):
            session.send(SENDER, ["ann@example.org"], message)
        assert (failure.value.stage, failure.value.code) == ("data", 550), failure.value
        assert not failure.value.is_transient


class TestTimeouts:
    """A server slower than the profile's timeout gives SMTPTimeoutError, fast."""

    @pytest.mark.parametrize(
        ("options", "stage"),
        [((), "mail"), (("-p",), "data")],
        ids=["pipelined", "lock-step"],
    )
    def test_slow_data_reply(
        self, start_sink: SinkFactory, options: tuple[str, ...], stage: str
    ) -> None:
        """``-w 2`` with ``timeout=0.5``: transient, within ~0.5 s, the session is closed
        and the next send reconnects. Pipelined, smtp-sink holds back the whole batch's
        replies until DATA's, so the first reply missing is MAIL's."""
        sink = start_sink("-w", "2", *options)
        session = SMTPSession(sink.profile(timeout=0.5))
        try:
            session.connect()
            started = time.monotonic()
            with pytest.raises(SMTPTimeoutError) as failure:
                session.send(SENDER, ["ann@example.org"], b"Subject: slow\r\n\r\nHi\r\n")
            waited = time.monotonic() - started
            assert 0.45 < waited < 1.5
            assert failure.value.is_transient
            assert failure.value.stage == stage
            assert not failure.value.in_doubt, "no content was sent"
            assert shape(failure.value.transcript)[-1] == "C: DATA"
            assert not session.connected

            sink.restart()
            assert session.send(SENDER, ["ann@example.org"], b"Hi\r\n").reply.code == 250
            assert session.connections == 2
        finally:
            session.close()


@pytest.mark.slow
class TestEndToEnd:
    """A real ``mailworker worker`` delivers through its held-open sessions to smtp-sink."""

    def test_100_messages_through_a_worker(
        self, start_sink: SinkFactory, redis_url: str, tmp_path: Path
    ) -> None:
        """100 ``send_mail.delay`` messages arrive exactly once over 2 connections (one per
        prefork process), each pipelined, and both sessions end with QUIT."""
        sink = start_sink()
        env = worker_env(
            redis_url,
            {"default": f"smtp://127.0.0.1:{sink.port}?local_hostname={EHLO_NAME}"},
        )
        worker = WorkerProcess(env, tmp_path / "worker.log", name="postfix")
        worker.start()
        try:
            with producer(env):
                started = time.monotonic()
                for n in range(100):
                    send_mail.delay(
                        to=f"user{n}@example.org",
                        cc="audit@example.org",
                        subject=f"e2e {n:03d}",
                        text=f"message {n}\n.\nend",
                    )
                wait_for(lambda: sink.counters()["mesg"] >= 100, 30, "100 messages")
                elapsed = time.monotonic() - started
            assert worker.stop() == 0
        finally:
            if worker.running:
                worker.kill()
        settled = sink.settle(2)
        print(f"\n100 messages through the worker in {elapsed:.2f} s (incl. publishing)")

        assert settled == {"sess": 2, "quit": 2, "mesg": 100}
        dumps = sink.dumps()
        assert Counter(d.header("Subject") for d in dumps) == Counter(
            f"e2e {n:03d}" for n in range(100)
        )
        for dump in dumps:
            n = int(dump.header("Subject").split()[1])
            assert dump.helo == EHLO_NAME
            assert dump.mail_args == f"<{SENDER}>"
            assert dump.rcpt_args == (f"<user{n}@example.org>", "<audit@example.org>")
            assert dump.content.endswith(f"\n\nmessage {n}\n.\nend\n".encode()), "lone dot"

        connected = worker.events("smtp.connected")
        assert len(connected) == 2
        assert all("PIPELINING" in e["capabilities"] for e in connected)
        sent = worker.events("mail.sent")
        assert len(sent) == 100
        assert {e["message_id"] for e in sent} == {d.header("Message-ID") for d in dumps}
        for event in sent:
            assert shape(event["transcript"])[:8] == [
                "C: MAIL", "C: RCPT", "C: RCPT", "C: DATA",
                "S: 250", "S: 250", "S: 250", "S: 354",
            ]  # fmt: skip
