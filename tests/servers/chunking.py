"""An SMTP server with CHUNKING (RFC 3030) and PIPELINING, which aiosmtpd lacks: an
asyncio protocol in a thread on 127.0.0.1, recording every message and counting
round trips, with knobs for the faults a BDAT client must survive.

It keeps a transaction's state as Postfix's smtpd does: a MAIL inside an open
transaction is refused (``503 5.5.1 Error: nested MAIL command``); BDAT without an
accepted recipient reads its chunk, answers ``554 5.5.1 Error: no valid
recipients`` and leaves the transaction open (RFC 3030 §2: RSET is then needed).

A *turn* is one read after which the server wrote replies: all replies to what it
had received go in one write, so a client that pipelines a whole transaction into
one write costs one turn, which is one round trip it waited for.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.servers.base import LOCALHOST, Service


@dataclass(frozen=True)
class Chunked:
    """One message the server accepted."""

    mail_from: str
    mail_options: tuple[str, ...]
    rcpt_tos: tuple[str, ...]
    #: The content exactly as received (BDAT: the chunks; DATA: dot-unstuffed).
    content: bytes
    #: ``"BDAT"`` or ``"DATA"``.
    via: str
    connection: int


@dataclass
class Faults:
    """What the server does wrong, changeable while it runs.

    Attributes:
        rcpt_replies: address -> reply instead of accepting it.
        limit: recipients per transaction; the rest get 452 4.5.3.
        bdat_reply: a reply to every BDAT (its chunk read first), e.g. "502 5.5.1 ...".
        bdat_unknown: BDAT is an unknown command (500) and its chunk is read as
            commands, as a server that offers CHUNKING and does not know it would.
        final_reply: n -> the reply to the n-th message's end (0 first), or None.
        drop_in_chunk: hang up when this many octets of the n-th chunk are in, with
            no reply (n given by ``drop_at``).
        drop_after_chunk: hang up after all of the ``drop_at``-th chunk, no reply.
        close_421_at: answer the ``drop_at``-th MAIL with 421 and hang up.
        drop_at: which transaction (0 first, per server) the three above hit.
    """

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    bdat_reply: str | None = None
    bdat_unknown: bool = False
    final_reply: Callable[[int], str | None] = lambda _n: None
    drop_in_chunk: int | None = None
    drop_after_chunk: bool = False
    close_421_at: bool = False
    drop_at: int = 0


class _Connection(asyncio.Protocol):
    """One client connection: commands, BDAT chunks and DATA content, in order."""

    def __init__(self, server: ChunkingServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.mail: str | None = None
        self.options: tuple[str, ...] = ()
        self.rcpts: list[str] = []
        self.chunks = bytearray()
        self.chunk_left = 0
        self.chunk_last = False
        self.chunk_verdict: str | None = None  # reply already decided for the chunk
        self.in_data = False
        self.data = bytearray()
        self.id = 0

    # -- asyncio -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        server = self.server
        with server.lock:
            server.connections += 1
            self.id = server.connections
        server._open.add(self)
        if server.small_buffers:
            transport.set_write_buffer_limits(high=4096)
        transport.write(b"220 chunking.example ESMTP\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._open.discard(self)

    def pause_writing(self) -> None:
        # The client is not reading our replies: stop reading its commands, as a
        # server blocked in write() does.
        assert self.transport is not None
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        assert self.transport is not None
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        replies: list[str] = []
        closing = self._process(replies)
        assert self.transport is not None
        if replies:
            with self.server.lock:
                self.server.turns += 1
            self.transport.write("".join(f"{r}\r\n" for r in replies).encode())
        if closing:
            self.transport.close()

    # -- the protocol ------------------------------------------------------------

    def _process(self, replies: list[str]) -> bool:
        """Consume the buffer; True to hang up after writing ``replies``."""
        while True:
            if self.chunk_left:
                if not self._chunk(replies):
                    return self.transport is None or self.transport.is_closing()
                continue
            if self.in_data:
                end = self.buffer.find(b"\r\n")
                if end < 0:
                    return False
                line = bytes(self.buffer[: end + 2])
                del self.buffer[: end + 2]
                if line == b".\r\n":
                    self.in_data = False
                    replies.append(self._deliver(bytes(self.data), "DATA"))
                    self.data.clear()
                else:
                    self.data += line[1:] if line.startswith(b".") else line
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return False
            line = self.buffer[:end].decode("utf-8", "replace")
            del self.buffer[: end + 2]
            word = line.split(" ", 1)[0].split(":", 1)[0].upper()
            with self.server.lock:
                self.server.commands[word] += 1
            reply = self._command(word, line)
            if reply is None:
                continue
            replies.append(reply)
            if reply.startswith(("421", "221")):
                return True

    def _chunk(self, replies: list[str]) -> bool:
        """Take chunk octets; False when the buffer ran out or the connection went."""
        faults = self.server.faults
        take = min(self.chunk_left, len(self.buffer))
        hit = self.server.transactions == faults.drop_at
        if faults.drop_in_chunk is not None and hit:
            got = len(self.chunks) + take
            if got >= faults.drop_in_chunk:
                self._hang_up(replies)
                return False
        self.chunks += self.buffer[:take]
        del self.buffer[:take]
        self.chunk_left -= take
        if self.chunk_left:
            return False
        if faults.drop_after_chunk and hit:
            if self.chunk_verdict is None and self.chunk_last:
                self._deliver(bytes(self.chunks), "BDAT")
            self._hang_up(replies)
            return False
        if self.chunk_verdict is not None:
            replies.append(self.chunk_verdict)
            self.chunks.clear()
        elif self.chunk_last:
            replies.append(self._deliver(bytes(self.chunks), "BDAT"))
            self.chunks.clear()
        else:
            replies.append(f"250 2.0.0 Ok: {len(self.chunks)} octets received")
        return True

    def _hang_up(self, replies: list[str]) -> None:
        """Close after the replies to what came before (written first)."""
        assert self.transport is not None
        if replies:
            self.transport.write("".join(f"{r}\r\n" for r in replies).encode())
            replies.clear()
        self.server.faults.drop_in_chunk = None  # once
        self.server.faults.drop_after_chunk = False
        self.transport.close()

    def _command(self, word: str, line: str) -> str | None:
        server = self.server
        faults = server.faults
        if word == "EHLO":
            keywords = ["chunking.example", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]
            keywords += ["PIPELINING"] if server.pipelining else []
            keywords += ["CHUNKING"] if server.chunking else []
            return "\r\n".join(
                f"250{'-' if i < len(keywords) - 1 else ' '}{k}" for i, k in enumerate(keywords)
            )
        if word == "MAIL":
            if faults.close_421_at and server.transactions == faults.drop_at:
                faults.close_421_at = False  # once
                return "421 4.3.2 Service shutting down"
            if self.mail is not None:
                return "503 5.5.1 Error: nested MAIL command"
            address, _, options = line[10:].partition(">")
            self.mail = address.lstrip("<")
            self.options = tuple(options.split())
            self.rcpts = []
            return "250 2.1.0 Ok"
        if word == "RCPT":
            if self.mail is None:
                return "503 5.5.1 Error: need MAIL command"
            address = line.split("<", 1)[1].split(">", 1)[0]
            if faults.limit is not None and len(self.rcpts) >= faults.limit:
                return "452 4.5.3 Error: too many recipients"
            refusal = faults.rcpt_replies.get(address)
            if refusal is not None:
                return refusal
            self.rcpts.append(address)
            return "250 2.1.5 Ok"
        if word == "BDAT" and server.chunking and not faults.bdat_unknown:
            args = line.split()
            size = int(args[1])
            self.chunk_last = len(args) > 2 and args[2].upper() == "LAST"
            self.chunk_verdict = None
            if faults.bdat_reply is not None:
                self.chunk_verdict = faults.bdat_reply
            elif self.mail is None:
                self.chunk_verdict = "503 5.5.1 Error: need MAIL command"
            elif not self.rcpts:
                self.chunk_verdict = "554 5.5.1 Error: no valid recipients"
            self.chunk_left = size
            if size == 0:
                replies: list[str] = []
                self._chunk(replies)
                return replies[0] if replies else None
            return None
        if word == "DATA":
            if self.mail is None:
                return "503 5.5.1 Error: need MAIL command"
            if not self.rcpts:
                return "554 5.5.1 Error: no valid recipients"
            self.in_data = True
            return "354 End data with <CR><LF>.<CR><LF>"
        if word == "RSET":
            self._clear()
            return "250 2.0.0 Ok"
        if word == "NOOP":
            return "250 2.0.0 Ok"
        if word == "QUIT":
            return "221 2.0.0 Bye"
        return "500 5.5.2 Error: command not recognized"

    def _deliver(self, content: bytes, via: str) -> str:
        server = self.server
        with server.lock:
            number = server.transactions
            server.transactions += 1
        reply = server.faults.final_reply(number)
        if reply is None:
            reply = f"250 2.0.0 Ok: queued as Q{number:05d}"
            with server.lock:
                server.messages.append(
                    Chunked(
                        self.mail or "",
                        self.options,
                        tuple(self.rcpts),
                        content,
                        via,
                        self.id,
                    )
                )
        self._clear()
        return reply

    def _clear(self) -> None:
        self.mail = None
        self.options = ()
        self.rcpts = []


class ChunkingServer(Service):
    """The server; ``faults`` may be changed while it runs.

    Args:
        pipelining, chunking: whether EHLO offers them.
        small_buffers: 4 KiB socket buffers and no reading while a reply is stuck,
            so a client that writes too much before reading deadlocks with it.
    """

    def __init__(
        self, *, pipelining: bool = True, chunking: bool = True, small_buffers: bool = False
    ) -> None:
        self.pipelining = pipelining
        self.chunking = chunking
        self.small_buffers = small_buffers
        self.faults = Faults()
        self.lock = threading.Lock()
        self.messages: list[Chunked] = []
        self.commands: Counter[str] = Counter()
        self.turns = 0
        self.connections = 0
        #: Transactions that reached their end (delivered or refused), 0 first.
        self.transactions = 0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._open: set[_Connection] = set()

    def start(self) -> ChunkingServer:
        listener = socket.socket()
        if self.small_buffers:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        listener.bind((LOCALHOST, 0))
        self.port = listener.getsockname()[1]
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            self._server = await loop.create_server(lambda: _Connection(self), sock=listener)
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(serve())
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        if not ready.wait(5):
            raise TimeoutError("the chunking server did not start")
        return self

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return

        def halt() -> None:
            if self._server is not None:
                self._server.close()
            for connection in list(self._open):
                if connection.transport is not None:
                    connection.transport.abort()
            loop.call_later(0.05, loop.stop)

        loop.call_soon_threadsafe(halt)
        if self._thread is not None:
            self._thread.join(5)

    def reset_counts(self) -> None:
        """Forget turns and command counts (not messages)."""
        with self.lock:
            self.turns = 0
            self.commands.clear()
