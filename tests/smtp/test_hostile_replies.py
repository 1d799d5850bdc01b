"""Hostile and broken servers: replies too long, too many lines, or dripped to outlast a timeout.

Each server here is a raw socket in a thread that speaks a scripted dialogue, for no
real server can be told to misbehave like this.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from mailworker import SMTPProtocolError, SMTPSession, SMTPTimeoutError
from mailworker.smtp._client import MAX_REPLY_BYTES, MAX_REPLY_LINE, MAX_REPLY_LINES
from tests.smtp.helpers import MESSAGE, RCPT, SENDER, ProfileFactory


class Peer:
    """The server's end of one connection, for a script."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._file = sock.makefile("rb")
        #: Command lines read from the client.
        self.lines: list[str] = []
        #: Bytes the script wrote before the client went away.
        self.written = 0

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.written += len(data)

    def readline(self) -> str:
        line = self._file.readline(4096)
        if not line:
            raise ConnectionError("client closed")
        text = line.decode().rstrip("\r\n")
        self.lines.append(text)
        return text

    def greet_and_ehlo(self, *extensions: str) -> None:
        """Greeting, then answer EHLO."""
        self.send(b"220 hostile.example ESMTP\r\n")
        self.readline()
        lines = ["hostile.example", *extensions]
        self.send(
            b"".join(
                f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n".encode()
                for i, text in enumerate(lines)
            )
        )

    def up_to_mail(self) -> None:
        """Greeting, EHLO, then read MAIL (unanswered)."""
        self.greet_and_ehlo()
        self.readline()

    def serve_normally(self) -> None:
        """Answer like a well-behaved server until QUIT."""
        while True:
            word = self.readline().split(":")[0].split(" ")[0].upper()
            if word == "DATA":
                self.send(b"354 go ahead\r\n")
                while self.readline() != ".":
                    pass
                self.send(b"250 2.0.0 Ok: queued as NORMAL1\r\n")
            elif word == "QUIT":
                self.send(b"221 bye\r\n")
                return
            else:
                self.send(b"250 OK\r\n")

    def gone(self, timeout: float) -> bool:
        """Whether the client closed the connection within ``timeout`` (what it still
        sends, such as QUIT, is read into ``lines``)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                self.readline()
        except TimeoutError:
            return False
        except (ConnectionError, OSError, ValueError):
            return True


Script = Callable[[Peer, int], None]


class RawServer:
    """Scripted SMTP on 127.0.0.1, port 0; ``script(peer, n)`` runs for the n-th
    connection (0 first) in its own thread."""

    def __init__(self, script: Script) -> None:
        self._script = script
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self.peers: list[Peer] = []
        self.done = threading.Event()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        self._listener.settimeout(0.05)  # to notice stop()
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            sock.settimeout(None)
            peer = Peer(sock)
            self.peers.append(peer)
            thread = threading.Thread(
                target=self._run, args=(peer, len(self.peers) - 1), daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _run(self, peer: Peer, index: int) -> None:
        with contextlib.suppress(OSError, ValueError), peer.sock:
            self._script(peer, index)
        self.done.set()

    def stop(self) -> None:
        self._stopping = True
        self._threads[0].join(5)
        self._listener.close()
        for peer in self.peers:
            with contextlib.suppress(OSError):
                peer.sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)


@pytest.fixture
def raw_server() -> Iterator[Callable[[Script], RawServer]]:
    """Factory: ``raw_server(script)`` starts a :class:`RawServer`, stopped at teardown."""
    servers: list[RawServer] = []

    def start(script: Script) -> RawServer:
        servers.append(RawServer(script))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


RawFactory = Callable[[Script], RawServer]


def endless(peer: Peer, line: bytes, pause: float = 0.0, limit: float = 20.0) -> None:
    """Write ``line`` again and again (every ``pause`` s) until the client goes away."""
    stop = time.monotonic() + limit
    while time.monotonic() < stop:
        peer.send(line)
        if pause:
            time.sleep(pause)


class TestReplyBounds:
    """A reply larger than the documented bounds is a transient protocol error that drops
    the session, found at once rather than after the memory is gone."""

    def test_endless_multiline_reply(
        self, raw_server: RawFactory, make_profile: ProfileFactory
    ) -> None:
        """A server streaming 250- lines forever gets SMTPProtocolError within a second,
        the connection closed without QUIT, and the next send on a new connection."""

        def script(peer: Peer, index: int) -> None:
            if index:
                peer.greet_and_ehlo()
                peer.serve_normally()
                return
            peer.up_to_mail()
            endless(peer, b"250-2.1.0 still going, still going, still going\r\n")

        server = raw_server(script)
        session = SMTPSession(make_profile(server.port, "smtp", timeout=5))
        start = time.monotonic()
        with pytest.raises(SMTPProtocolError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)
        assert time.monotonic() - start < 1.5
        exc = failure.value
        assert (exc.stage, exc.is_transient) == ("mail", True)
        assert f"more than {MAX_REPLY_LINES} lines" in str(exc)
        assert not session.connected
        assert server.peers[0].gone(timeout=2)
        assert "QUIT" not in server.peers[0].lines
        result = session.send(SENDER, [RCPT], MESSAGE)
        session.close()
        assert result.accepted == [RCPT]
        assert session.connections == 2

    def test_reply_too_many_bytes(
        self, raw_server: RawFactory, make_profile: ProfileFactory
    ) -> None:
        """Fewer lines than the limit but more bytes than MAX_REPLY_BYTES is a protocol error."""
        line = b"250-" + b"x" * (MAX_REPLY_LINE - 100) + b"\r\n"

        def script(peer: Peer, _index: int) -> None:
            peer.up_to_mail()
            endless(peer, line)

        server = raw_server(script)
        with pytest.raises(SMTPProtocolError) as failure:
            SMTPSession(make_profile(server.port, "smtp")).send(SENDER, [RCPT], MESSAGE)
        assert f"longer than {MAX_REPLY_BYTES} bytes" in str(failure.value)
        assert failure.value.stage == "mail"

    def test_overlong_line_without_crlf(
        self, raw_server: RawFactory, make_profile: ProfileFactory
    ) -> None:
        """A line that never ends is a protocol error as soon as it passes MAX_REPLY_LINE
        bytes, not a wait for the timeout."""

        def script(peer: Peer, _index: int) -> None:
            peer.send(b"220 " + b"x" * (4 * MAX_REPLY_LINE))
            peer.gone(timeout=10)

        server = raw_server(script)
        start = time.monotonic()
        with pytest.raises(SMTPProtocolError) as failure:
            SMTPSession(make_profile(server.port, "smtp", timeout=10)).connect()
        assert time.monotonic() - start < 2
        assert (failure.value.stage, failure.value.is_transient) == ("connect", True)
        assert f"longer than {MAX_REPLY_LINE} bytes" in str(failure.value)
        assert server.peers[0].gone(timeout=2)

    def test_long_real_replies_still_work(
        self, raw_server: RawFactory, make_profile: ProfileFactory
    ) -> None:
        """A 40-line banner and a 150-line EHLO reply are well within the bounds."""

        def script(peer: Peer, _index: int) -> None:
            banner = [f"220-Authorised use only, notice line {n}" for n in range(39)]
            peer.send("".join(f"{line}\r\n" for line in banner).encode())
            peer.send(b"220 hostile.example ESMTP\r\n")
            peer.readline()
            extensions = [f"X-EXTENSION-{n} " + "y" * 200 for n in range(149)]
            lines = ["hostile.example", *extensions]
            peer.send(
                b"".join(
                    f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n".encode()
                    for i, text in enumerate(lines)
                )
            )
            peer.serve_normally()

        server = raw_server(script)
        with SMTPSession(make_profile(server.port, "smtp")) as session:
            result = session.send(SENDER, [RCPT], MESSAGE)
            assert session.info is not None
            assert len(session.info.capabilities) == 149
        assert result.accepted == [RCPT]


class TestWholeReplyTimeouts:
    """A stage's timeout, and the send's deadline, bound a whole reply, not each line."""

    def test_dripped_lines_at_mail(
        self, raw_server: RawFactory, make_profile: ProfileFactory
    ) -> None:
        """250- lines dripped every 0.5 s hold a send no longer than timeout=1."""

        def script(peer: Peer, _index: int) -> None:
            peer.up_to_mail()
            endless(peer, b"250-2.1.0 wait for it\r\n", pause=0.5, limit=10)

        server = raw_server(script)
        session = SMTPSession(make_profile(server.port, "smtp", timeout=1))
        start = time.monotonic()
        with pytest.raises(SMTPTimeoutError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)
        took = time.monotonic() - start
        assert 0.9 < took < 2
        assert (failure.value.stage, failure.value.is_transient) == ("mail", True)
        assert not session.connected
        assert server.peers[0].gone(timeout=2)

    def test_dripped_bytes_in_greeting(
        self, raw_server: RawFactory, make_profile: ProfileFactory
    ) -> None:
        """A greeting dripped a byte every 0.1 s times out at the connect stage in ~1 s."""

        def script(peer: Peer, _index: int) -> None:
            endless(peer, b"2", pause=0.1, limit=10)

        server = raw_server(script)
        start = time.monotonic()
        with pytest.raises(SMTPTimeoutError) as failure:
            SMTPSession(make_profile(server.port, "smtp", timeout=1)).connect()
        assert 0.9 < time.monotonic() - start < 2
        assert failure.value.stage == "connect"

    def test_deadline_bounds_dripped_reply(
        self, raw_server: RawFactory, make_profile: ProfileFactory
    ) -> None:
        """With stage timeouts of 30 s, the send's 1.5 s deadline still ends a dripped
        end-of-data reply in time."""

        def script(peer: Peer, _index: int) -> None:
            peer.greet_and_ehlo()
            peer.readline()
            peer.send(b"250 OK\r\n")
            peer.readline()
            peer.send(b"250 OK\r\n")
            peer.readline()
            peer.send(b"354 go ahead\r\n")
            while peer.readline() != ".":
                pass
            endless(peer, b"250-2.0.0 nearly queued\r\n", pause=0.5, limit=10)

        server = raw_server(script)
        session = SMTPSession(make_profile(server.port, "smtp", timeout=30))
        start = time.monotonic()
        with pytest.raises(SMTPTimeoutError) as failure:
            session.send(SENDER, [RCPT], MESSAGE, deadline=start + 1.5)
        assert 1.4 < time.monotonic() - start < 2.5
        exc = failure.value
        assert (exc.stage, exc.in_doubt) == ("data", True)
        session.close()

    def test_slow_reply_within_timeout(
        self, raw_server: RawFactory, make_profile: ProfileFactory
    ) -> None:
        """A reply whose lines come 0.2 s apart but end within the timeout is read whole."""

        def script(peer: Peer, _index: int) -> None:
            peer.up_to_mail()
            for n in range(4):
                peer.send(f"250-2.1.0 line {n}\r\n".encode())
                time.sleep(0.2)
            peer.send(b"250 2.1.0 Ok\r\n")
            peer.serve_normally()

        server = raw_server(script)
        with SMTPSession(make_profile(server.port, "smtp", timeout=2)) as session:
            result = session.send(SENDER, [RCPT], MESSAGE)
        assert result.accepted == [RCPT]
        assert [str(line) for line in result.transcript][1:6] == [
            *(f"S: 250-2.1.0 line {n}" for n in range(4)),
            "S: 250 2.1.0 Ok",
        ]
