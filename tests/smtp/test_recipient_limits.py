"""Many recipients: pipelined in windows that cannot deadlock (RFC 2920 §3.1), and split
into further transactions when the server answers 452 "too many recipients" (RFC 5321
§4.5.3.1.10), every recipient getting exactly one copy."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mailworker import SMTPRecipientsRefused, SMTPSession
from mailworker.smtp._client import PIPELINE_WINDOW
from tests.smtp.helpers import MESSAGE, SENDER, ProfileFactory, wire_form

#: The reply of Postfix's smtpd past smtpd_recipient_limit.
TOO_MANY = "452 4.5.3 Error: too many recipients"


def addresses(count: int, prefix: str = "user", domain: str = "example.org") -> list[str]:
    """``count`` distinct recipient addresses."""
    return [f"{prefix}{n}@{domain}" for n in range(count)]


class Lines:
    """Lines from a socket; unlike ``makefile()``, still usable after a timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def readline(self) -> bytes:
        """The next line with its CRLF; ``b""`` at the end of the stream."""
        while (end := self._buffer.find(b"\n")) < 0:
            chunk = self._sock.recv(1 << 16)
            if not chunk:
                return b""
            self._buffer += chunk
        line = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        return line


@dataclass
class Delivery:
    """One message the server accepted."""

    recipients: tuple[str, ...]
    content: bytes


class LimitServer:
    """An SMTP server on 127.0.0.1 with a limit of recipients per transaction, like
    Postfix's smtpd_recipient_limit. It reads one command and writes its reply at once,
    through small socket buffers: a client that writes a long pipelined group before
    reading any reply deadlocks with it.

    Args:
        limit: recipients accepted per transaction; then 452 4.5.3.
        pipelining: whether EHLO offers PIPELINING.
        end_of_data: the reply to the end of the n-th transaction's content (0 first);
            None to hang up with no verdict.
        rcpt_reply: a refusal for an address, or None to accept it.
        hold: after MAIL, read without answering until the client pauses (0.3 s);
            ``held`` is then the bytes of commands it wrote before any reply.
    """

    def __init__(
        self,
        *,
        limit: int | None = 100,
        pipelining: bool = True,
        end_of_data: Callable[[int], str | None] = lambda _n: "250 2.0.0 Ok: queued",
        rcpt_reply: Callable[[str], str | None] = lambda _address: None,
        hold: bool = False,
    ) -> None:
        self.limit = limit
        self.pipelining = pipelining
        self.end_of_data = end_of_data
        self.rcpt_reply = rcpt_reply
        self.hold = hold
        self.held = 0
        self.deliveries: list[Delivery] = []
        #: Every command word received, counted.
        self.commands: Counter[str] = Counter()
        self.connections = 0
        self._recipients: list[str] | None = None
        self._transactions = 0
        self._listener = socket.socket()
        # Inherited by accepted sockets: a small window, as on a busy server.
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen()
        self._listener.settimeout(0.05)  # to notice stop()
        self.port: int = self._listener.getsockname()[1]
        self._stopping = False
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(10)
            self._socks.append(sock)
            self.connections += 1
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, sock: socket.socket) -> None:
        # Each reply is written as it is made: Nagle's algorithm would hold all but
        # the first of a pipelined group's replies until the client's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError, ValueError), sock:
            file = Lines(sock)
            sock.sendall(b"220 limit.example ESMTP\r\n")
            holding = self.hold
            while line := file.readline():
                text = line.decode().rstrip("\r\n")
                word = re.split(r"[ :]", text, maxsplit=1)[0].upper()
                self.commands[word] += 1
                if word == "DATA":
                    if not self._data(sock, file):
                        return
                elif word == "QUIT":
                    sock.sendall(b"221 2.0.0 Bye\r\n")
                    return
                elif holding and word == "MAIL":
                    holding = False
                    replies, data = self._hold(sock, file, len(line), self._answer(word, text))
                    sock.sendall(replies)
                    if data and not self._data(sock, file):
                        return
                else:
                    sock.sendall(self._answer(word, text))

    def _answer(self, word: str, text: str) -> bytes:
        if word == "EHLO":
            lines = ["limit.example", "8BITMIME", "ENHANCEDSTATUSCODES"]
            lines += ["PIPELINING"] if self.pipelining else []
            last = len(lines) - 1
            return "".join(
                f"250{'-' if i < last else ' '}{t}\r\n" for i, t in enumerate(lines)
            ).encode()
        if word == "MAIL":
            self._recipients = []
            return b"250 2.1.0 Ok\r\n"
        if word == "RCPT":
            address = text.split("<", 1)[1].rstrip(">")
            refusal = self.rcpt_reply(address)
            if self._recipients is None:
                return b"503 5.5.1 Error: need MAIL command\r\n"
            if self.limit is not None and len(self._recipients) >= self.limit:
                return f"{TOO_MANY}\r\n".encode()
            if refusal is not None:
                return f"{refusal}\r\n".encode()
            self._recipients.append(address)
            # Sendmail's style: the address is echoed, so replies are as large as commands.
            return f"250 2.1.5 <{address}>... Recipient ok\r\n".encode()
        if word == "RSET":
            self._recipients = None
            return b"250 2.0.0 Ok\r\n"
        return b"502 5.5.2 Error: command not recognized\r\n"

    def _data(self, sock: socket.socket, file: Lines) -> bool:
        """DATA, the content and its verdict; False to hang up."""
        if not self._recipients:
            sock.sendall(b"554 5.5.1 Error: no valid recipients\r\n")
            return True
        sock.sendall(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        content = b""
        while (chunk := file.readline()) != b".\r\n":
            if not chunk:
                return False
            content += chunk
        reply = self.end_of_data(self._transactions)
        self._transactions += 1
        if reply is None:
            return False  # the whole content read, and no verdict
        if reply.startswith("250"):
            self.deliveries.append(Delivery(tuple(self._recipients), content))
        self._recipients = None
        sock.sendall(f"{reply}\r\n".encode())
        return True

    def _hold(
        self, sock: socket.socket, file: Lines, size: int, first: bytes
    ) -> tuple[bytes, bool]:
        """Read commands until the client pauses for 0.3 s or sends DATA; returns their
        replies, to send, and whether DATA came."""
        replies = [first]
        data = False
        sock.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            while line := file.readline():
                size += len(line)
                text = line.decode().rstrip("\r\n")
                word = re.split(r"[ :]", text, maxsplit=1)[0].upper()
                self.commands[word] += 1
                if word == "DATA":
                    data = True
                    break
                replies.append(self._answer(word, text))
        sock.settimeout(10)
        self.held = size
        return b"".join(replies), data

    def stop(self) -> None:
        self._stopping = True
        self._threads[0].join(5)
        self._listener.close()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads[1:]:
            thread.join(5)

    def delivered(self) -> Counter[str]:
        """How many copies each recipient got."""
        return Counter(r for d in self.deliveries for r in d.recipients)


@pytest.fixture
def limit_server() -> Iterator[Callable[..., LimitServer]]:
    """Factory: ``limit_server(**options)`` starts a :class:`LimitServer`, stopped at
    teardown."""
    servers: list[LimitServer] = []

    def start(**options: object) -> LimitServer:
        servers.append(LimitServer(**options))  # type: ignore[arg-type]
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


LimitFactory = Callable[..., LimitServer]


class TestWindowedPipelining:
    """Pipelined commands go out in windows, so any number of recipients completes."""

    def test_twenty_thousand_recipients(
        self, limit_server: LimitFactory, make_profile: ProfileFactory
    ) -> None:
        """20,000 recipients with long addresses (4.6 MB of RCPT commands, more than the
        socket buffers hold) in one pipelined transaction complete within seconds against
        a server that answers each command as it reads it; each gets one copy."""
        server = limit_server(limit=None)
        long_domain = ".".join(["subdomain-of-a-long-name"] * 6) + ".example.org"
        recipients = addresses(20_000, prefix="x" * 50, domain=long_domain)
        start = time.monotonic()
        with SMTPSession(make_profile(server.port, "smtp", timeout=10)) as session:
            result = session.send(SENDER, recipients, MESSAGE)
        assert time.monotonic() - start < 15
        assert result.accepted == recipients
        assert [d.recipients for d in server.deliveries] == [tuple(recipients)]
        assert server.deliveries[0].content == wire_form(MESSAGE)
        assert server.commands["RCPT"] == 20_000

    def test_window_of_unanswered_commands(
        self, limit_server: LimitFactory, make_profile: ProfileFactory
    ) -> None:
        """The client writes at most PIPELINE_WINDOW bytes of commands before it reads a
        reply, then goes on as replies come."""
        server = limit_server(limit=None, hold=True)
        recipients = addresses(2_000)
        with SMTPSession(make_profile(server.port, "smtp")) as session:
            result = session.send(SENDER, recipients, MESSAGE)
        assert PIPELINE_WINDOW // 2 < server.held <= PIPELINE_WINDOW
        assert result.accepted == recipients
        assert server.delivered() == Counter(recipients)

    def test_small_group_stays_one_write(
        self, limit_server: LimitFactory, make_profile: ProfileFactory
    ) -> None:
        """A group smaller than the window (MAIL, 50 RCPTs, DATA) is still written before
        any reply is read."""
        server = limit_server(limit=None, hold=True)
        recipients = addresses(50)
        with SMTPSession(make_profile(server.port, "smtp")) as session:
            result = session.send(SENDER, recipients, MESSAGE)
        assert result.accepted == recipients
        assert server.commands["RCPT"] == 50
        assert server.commands["DATA"] == 1
        assert server.held == len(
            f"MAIL FROM:<{SENDER}>\r\n".encode()
            + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in recipients)
            + b"DATA\r\n"
        )


class TestTooManyRecipients:
    """452 "too many recipients": the rest go at once in further transactions on the same
    session, and the result reports every recipient exactly once."""

    @pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lock-step"])
    def test_split_into_transactions(
        self, limit_server: LimitFactory, make_profile: ProfileFactory, pipelining: bool
    ) -> None:
        """250 recipients against a limit of 100 are delivered as 100 + 100 + 50 on one
        connection, the same content each time, each recipient once, with no delay."""
        server = limit_server(limit=100, pipelining=pipelining)
        recipients = addresses(250)
        start = time.monotonic()
        with SMTPSession(make_profile(server.port, "smtp")) as session:
            result = session.send(SENDER, recipients, MESSAGE)
        assert time.monotonic() - start < 2
        assert result.accepted == recipients
        assert [r.recipient for r in result.recipients] == recipients
        assert result.refused == {}
        assert [len(d.recipients) for d in server.deliveries] == [100, 100, 50]
        assert {d.content for d in server.deliveries} == {wire_form(MESSAGE)}
        assert server.delivered() == Counter(recipients)
        assert server.connections == 1
        assert len(result.replies) == 3
        assert result.reply == result.replies[0]
        # After the first 452 the client learns the limit and asks no more than that.
        assert server.commands["RCPT"] <= 250 + (1 if not pipelining else PIPELINE_WINDOW // 20)
        assert server.commands["MAIL"] == 3

    def test_limit_inside_one_pipelined_group(
        self, limit_server: LimitFactory, make_profile: ProfileFactory
    ) -> None:
        """120 recipients fit one pipelined write with DATA: the 100 accepted get the
        content, then the 20 refused as too many get it in a second transaction."""
        server = limit_server(limit=100)
        recipients = addresses(120)
        with SMTPSession(make_profile(server.port, "smtp")) as session:
            result = session.send(SENDER, recipients, MESSAGE)
        assert result.accepted == recipients
        assert [d.recipients for d in server.deliveries] == [
            tuple(recipients[:100]),
            tuple(recipients[100:]),
        ]
        assert (server.commands["RCPT"], server.commands["DATA"]) == (140, 2)

    def test_twenty_thousand_recipients_limit_100(
        self, limit_server: LimitFactory, make_profile: ProfileFactory
    ) -> None:
        """20,000 recipients against a limit of 100 take 200 transactions on one connection,
        in seconds, and every recipient gets exactly one copy."""
        server = limit_server(limit=100)
        recipients = addresses(20_000)
        start = time.monotonic()
        with SMTPSession(make_profile(server.port, "smtp", timeout=10)) as session:
            result = session.send(SENDER, recipients, MESSAGE)
        assert time.monotonic() - start < 15
        assert result.accepted == recipients
        assert len(server.deliveries) == 200
        assert server.delivered() == Counter(recipients)
        assert server.connections == 1
        assert server.commands["RCPT"] < 20_000 + PIPELINE_WINDOW // 20

    def test_refusals_and_limit_together(
        self, limit_server: LimitFactory, make_profile: ProfileFactory
    ) -> None:
        """Recipients refused on their own account keep their own reply, once, while the
        ones over the limit are delivered in the next transaction."""
        bad = {"user7@example.org", "user130@example.org"}
        grey = {"user42@example.org"}

        def rcpt_reply(address: str) -> str | None:
            if address in bad:
                return "550 5.1.1 no such user"
            return "450 4.2.0 greylisted" if address in grey else None

        server = limit_server(limit=100, rcpt_reply=rcpt_reply)
        recipients = addresses(250)
        with SMTPSession(make_profile(server.port, "smtp")) as session:
            result = session.send(SENDER, recipients, MESSAGE)
        good = [r for r in recipients if r not in bad | grey]
        assert result.accepted == good
        assert sorted(result.deferred) == sorted(grey)
        assert {r: o.code for r, o in result.refused.items()} == {
            "user7@example.org": 550,
            "user42@example.org": 450,
            "user130@example.org": 550,
        }
        assert [r.recipient for r in result.recipients] == recipients
        assert server.delivered() == Counter(good)

    def test_later_transaction_deferred(
        self, limit_server: LimitFactory, make_profile: ProfileFactory
    ) -> None:
        """If the second transaction's content is refused with 451, the first 100 stay
        accepted and only the other 150 are deferred (for the caller to retry), no error
        is raised, and the session goes on."""
        server = limit_server(
            limit=100,
            end_of_data=lambda n: "451 4.3.0 try again later" if n == 1 else "250 2.0.0 Ok",
        )
        recipients = addresses(250)
        with SMTPSession(make_profile(server.port, "smtp")) as session:
            result = session.send(SENDER, recipients, MESSAGE)
            assert result.accepted == recipients[:100]
            assert result.deferred == recipients[100:]
            assert {(o.code, o.status, o.in_doubt) for o in result.refused.values()} == {
                (451, "deferred", False)
            }
            assert len(result.replies) == 1
            again = session.send(SENDER, result.deferred, MESSAGE)
        assert again.accepted == recipients[100:]
        assert server.delivered() == Counter(recipients)
        assert server.connections == 1
        assert server.commands["RSET"] == 1

    def test_later_transaction_rejected(
        self, limit_server: LimitFactory, make_profile: ProfileFactory
    ) -> None:
        """A 554 to the second transaction's content rejects its recipients (and the ones not
        yet tried), while the first 100 stay accepted."""
        server = limit_server(
            limit=100,
            end_of_data=lambda n: "554 5.7.1 content refused" if n == 1 else "250 2.0.0 Ok",
        )
        recipients = addresses(250)
        with SMTPSession(make_profile(server.port, "smtp")) as session:
            result = session.send(SENDER, recipients, MESSAGE)
        assert result.accepted == recipients[:100]
        assert set(result.refused) == set(recipients[100:])
        assert {o.status for o in result.refused.values()} == {"rejected"}
        assert result.deferred == []
        assert server.delivered() == Counter(recipients[:100])

    def test_later_transaction_in_doubt(
        self, limit_server: LimitFactory, make_profile: ProfileFactory
    ) -> None:
        """A server that hangs up after the second transaction's content leaves those 100
        recipients deferred and in doubt, the first 100 accepted, the last 50 deferred (not
        in doubt); the next send reconnects."""
        server = limit_server(limit=100, end_of_data=lambda n: None if n == 1 else "250 Ok")
        recipients = addresses(250)
        with SMTPSession(make_profile(server.port, "smtp")) as session:
            result = session.send(SENDER, recipients, MESSAGE)
            assert not session.connected
            assert result.accepted == recipients[:100]
            assert result.deferred == recipients[100:]
            doubt = [r.recipient for r in result.recipients if r.in_doubt]
            assert doubt == recipients[100:200]
            assert {result.refused[r].code for r in recipients[100:]} == {-1}
            session.send(SENDER, recipients[200:], MESSAGE)
        assert server.connections == 2
        assert server.delivered() == Counter(recipients[:100] + recipients[200:])

    def test_full_from_the_first_recipient(
        self, limit_server: LimitFactory, make_profile: ProfileFactory
    ) -> None:
        """A server that takes no recipient at all (452 to the first) is a transient refusal
        after one transaction, not a loop."""
        server = limit_server(limit=0)
        recipients = addresses(300)
        session = SMTPSession(make_profile(server.port, "smtp"))
        with session, pytest.raises(SMTPRecipientsRefused) as failure:
            session.send(SENDER, recipients, MESSAGE)
        assert failure.value.is_transient
        assert set(failure.value.refused) == set(recipients)
        assert server.commands["MAIL"] == 1
        assert server.deliveries == []

    def test_other_452_is_not_a_limit(
        self, limit_server: LimitFactory, make_profile: ProfileFactory
    ) -> None:
        """A 452 for a full mailbox (4.2.2) defers that recipient without another
        transaction."""
        full = "user1@example.org"
        server = limit_server(
            limit=None, rcpt_reply=lambda a: "452 4.2.2 mailbox full" if a == full else None
        )
        recipients = addresses(3)
        with SMTPSession(make_profile(server.port, "smtp")) as session:
            result = session.send(SENDER, recipients, MESSAGE)
        assert result.deferred == [full]
        assert server.commands["MAIL"] == 1


# -- against Postfix's smtp-sink ---------------------------------------------------------

SMTP_SINK = "/usr/sbin/smtp-sink"


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """Postfix's ``smtp-sink`` (PIPELINING) on a free port, dumping each message to a file
    under ``tmp_path``; yields the port and the dump directory."""
    if not os.access(SMTP_SINK, os.X_OK):
        pytest.fail(f"{SMTP_SINK} not installed: make test installs postfix")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    user = ["-u", "root"] if os.geteuid() == 0 else []
    command = [SMTP_SINK, *user, "-t", "10", "-d", f"{dumps}/m.", f"127.0.0.1:{port}", "64"]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 5
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert process.poll() is None, "smtp-sink exited"
            assert time.monotonic() < deadline, "smtp-sink is not listening"
            time.sleep(0.02)
        yield port, dumps
    finally:
        process.terminate()
        process.wait(5)


def test_smtp_sink_twenty_thousand_recipients(
    smtp_sink: tuple[int, Path], make_profile: ProfileFactory
) -> None:
    """Postfix's smtp-sink receives one message with all of 20,000 pipelined recipients."""
    port, dumps = smtp_sink
    recipients = addresses(20_000)
    start = time.monotonic()
    with SMTPSession(make_profile(port, "smtp", local_hostname="client.example")) as session:
        result = session.send(SENDER, recipients, MESSAGE)
    assert time.monotonic() - start < 15
    assert result.accepted == recipients
    deadline = time.monotonic() + 5
    while not (files := list(dumps.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.02)
    [dump] = files
    rcpts = re.findall(rb"^X-Rcpt-Args: <([^>]*)>", dump.read_bytes(), re.MULTILINE)
    assert Counter(r.decode() for r in rcpts) == Counter(recipients)
