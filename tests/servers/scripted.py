"""A raw TCP server driven by a Python function, for faults a real server never
produces: garbage, 421 at greeting, dropping the connection mid-DATA, never answering."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Literal

from tests.servers.base import LOCALHOST, SERVER_HOSTNAME, Service, wait_for
from tests.servers.tls import CertChoice, TLSMaterials


class ClientClosed(ConnectionError):
    """The client closed the connection (or the server is stopping)."""


class ScriptConnection:
    """One client connection of a :class:`ScriptedServer`, as seen by the script.

    Attributes:
        index: 0 for the server's first connection, 1 for the next, ...
        received: Every line the client sent (decoded, without CRLF).
        data: Every DATA payload read by :meth:`read_until_data_end`.
        transcript: ``("C" | "S", bytes)`` pairs: exactly what went each way.
        ended_by: The I/O error that ended the script, if any.
    """

    def __init__(self, server: ScriptedServer, sock: socket.socket, index: int) -> None:
        """Wrap an accepted socket (for :class:`ScriptedServer` only)."""
        self.index = index
        self.received: list[str] = []
        self.data: list[bytes] = []
        self.transcript: list[tuple[str, bytes]] = []
        self.ended_by: BaseException | None = None
        self._server = server
        self._sock = sock
        self._buffer = bytearray()
        self._closed = False

    # ---- output --------------------------------------------------------

    def send(self, line: str | bytes) -> None:
        """Send one reply line; CRLF is added unless already there."""
        data = line.encode("utf-8") if isinstance(line, str) else line
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        self.send_raw(data)

    def send_reply(self, code: str, lines: Sequence[str]) -> None:
        """Send a reply of one line or more: ``250-a``, ..., ``250 z``."""
        for position, text in enumerate(lines):
            self.send(f"{code}{' ' if position == len(lines) - 1 else '-'}{text}")

    def send_raw(self, data: bytes) -> None:
        """Send bytes exactly as given."""
        self.transcript.append(("S", data))
        self._sock.sendall(data)

    # ---- input ---------------------------------------------------------

    def _fill(self, deadline: float) -> None:
        """Receive more bytes into the buffer, watching the stop flag."""
        while True:
            if self._server._stopping.is_set():
                raise ClientClosed("server stopping")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("client sent nothing in time")
            self._sock.settimeout(min(remaining, 0.05))
            try:
                chunk = self._sock.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            if not chunk:
                raise ClientClosed("client closed the connection")
            self.transcript.append(("C", chunk))
            self._buffer += chunk
            return

    def readline(self, timeout: float | None = None) -> str:
        """Read one line (CRLF or LF ended) and return it without the ending.

        Raises:
            ClientClosed: The client hung up (or the server is stopping).
            TimeoutError: No full line within ``timeout`` (default: server's).
        """
        deadline = time.monotonic() + (self._server.timeout if timeout is None else timeout)
        while (end := self._buffer.find(b"\n")) < 0:
            self._fill(deadline)
        raw = bytes(self._buffer[: end + 1])
        del self._buffer[: end + 1]
        line = raw.rstrip(b"\r\n").decode("utf-8", errors="surrogateescape")
        self.received.append(line)
        return line

    def expect(self, command: str, reply: str | None = None) -> str:
        """Read a line, assert it starts with ``command`` (any case), optionally reply.

        Raises:
            AssertionError: The client sent something else.
        """
        line = self.readline()
        assert line.upper().startswith(command.upper()), f"expected {command!r}, got {line!r}"
        if reply is not None:
            self.send(reply)
        return line

    def read_until_data_end(self, timeout: float | None = None) -> bytes:
        """Read DATA content up to and excluding ``CRLF.CRLF``; return it unstuffed-as-sent.

        The returned bytes are exactly what the client sent (dot-stuffing
        kept), ending with the CRLF before the final dot. Also appended to
        :attr:`data`.
        """
        deadline = time.monotonic() + (self._server.timeout if timeout is None else timeout)
        while True:
            if self._buffer.startswith(b".\r\n"):
                end, skip = 0, 3
                break
            end = self._buffer.find(b"\r\n.\r\n")
            if end >= 0:
                end, skip = end + 2, 3
                break
            self._fill(deadline)
        payload = bytes(self._buffer[:end])
        del self._buffer[: end + skip]
        self.data.append(payload)
        return payload

    def wait_for_close(self, timeout: float | None = None) -> None:
        """Never answer: swallow input until the client hangs up, timeout or stop.

        Use to play a server slower than the client's timeout.
        """
        deadline = time.monotonic() + (self._server.timeout if timeout is None else timeout)
        with contextlib.suppress(ClientClosed, TimeoutError):
            while True:
                self._fill(deadline)
                self._buffer.clear()

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early if the server stops (use instead of time.sleep)."""
        if self._server._stopping.wait(seconds):
            raise ClientClosed("server stopping")

    # ---- helpers ------------------------------------------------------

    def greet_and_ehlo(
        self,
        extensions: Sequence[str] = ("PIPELINING", "8BITMIME"),
        greeting: str = f"220 {SERVER_HOSTNAME} ESMTP scripted",
    ) -> str:
        """Send the greeting, read EHLO (or HELO), answer it; return the client's line."""
        self.send(greeting)
        line = self.readline()
        assert line.upper().startswith(("EHLO", "HELO")), f"expected EHLO, got {line!r}"
        self.send_reply("250", [SERVER_HOSTNAME, *extensions])
        return line

    def starttls(self, cert: CertChoice = "good") -> None:
        """Send ``220 Ready`` and switch this connection to TLS (server side).

        Call after reading the client's STARTTLS line.
        """
        self.send("220 2.0.0 Ready to start TLS")
        self._buffer.clear()  # RFC 3207: discard anything pipelined before TLS
        self._wrap_tls(cert)

    def _wrap_tls(self, cert: CertChoice) -> None:
        materials = self._server.tls_materials
        if materials is None:
            raise ValueError("this ScriptedServer has no tls_materials")
        context = materials.server_context(cert)
        tls = context.wrap_socket(self._sock, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(self._server.timeout)
        self._sock = tls
        tls.do_handshake()

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _interrupt(self) -> None:
        """Unblock any I/O from another thread (server stop)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


Script = Callable[[ScriptConnection], None]


class ScriptedServer(Service):
    """A raw TCP server that runs ``script(conn)`` for each client connection.

    The script drives the conversation through a :class:`ScriptConnection`;
    I/O errors (client hung up, timeouts, TLS failures) end it quietly,
    any other exception is collected in :attr:`errors` and re-raised by
    :meth:`check`. Threads are joined by :meth:`stop`.
    """

    def __init__(
        self,
        script: Script,
        *,
        tls: Literal["none", "implicit"] = "none",
        tls_materials: TLSMaterials | None = None,
        cert: CertChoice = "good",
        timeout: float = 5.0,
        host: str = LOCALHOST,
        port: int | None = None,
    ) -> None:
        """Configure the server (nothing starts until :meth:`start`).

        Args:
            script: Called with a :class:`ScriptConnection` per connection,
                in its own thread; the connection is closed when it returns.
            tls: ``"implicit"`` wraps each connection in TLS before the script
                runs (use ``conn.starttls()`` for STARTTLS).
            tls_materials: Certificates, needed for any TLS.
            cert: Certificate for implicit TLS.
            timeout: Default seconds a read waits for the client.
            host: Address to bind.
            port: Port to bind; default a free one.
        """
        if tls == "implicit" and tls_materials is None:
            raise ValueError("tls='implicit' needs tls_materials")
        self.script = script
        self.tls = tls
        self.tls_materials = tls_materials
        self.cert: CertChoice = cert
        self.timeout = timeout
        self.host = host
        self.port = port if port is not None else 0
        #: Connections so far, in order of arrival.
        self.connections: list[ScriptConnection] = []
        #: Non-I/O exceptions raised by scripts.
        self.errors: list[BaseException] = []
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<ScriptedServer {self.host}:{self.port} tls={self.tls}>"

    @property
    def received(self) -> list[str]:
        """Every line clients sent, across all connections in arrival order."""
        with self._lock:
            connections = list(self.connections)
        return [line for conn in connections for line in conn.received]

    def start(self) -> ScriptedServer:
        """Start listening; return self."""
        if self._listener is not None:
            raise RuntimeError(f"{self!r} is already running")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(16)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._stopping.clear()
        accept = threading.Thread(target=self._accept_loop, name=f"scripted-{self.port}")
        accept.daemon = True
        self._threads.append(accept)
        accept.start()
        return self

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                sock, _addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # listener closed by stop()
            sock.settimeout(self.timeout)
            with self._lock:
                conn = ScriptConnection(self, sock, len(self.connections))
                self.connections.append(conn)
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name=f"scripted-{self.port}-{conn.index}"
                )
                thread.daemon = True
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: ScriptConnection) -> None:
        try:
            if self.tls == "implicit":
                conn._wrap_tls(self.cert)
            self.script(conn)
        except OSError as error:  # hung up, timed out, TLS failed: the connection ended
            conn.ended_by = error
        except Exception as error:  # collected; re-raised by check()
            if self._stopping.is_set():
                conn.ended_by = error  # I/O cut under the script's feet by stop()
            else:
                with self._lock:
                    self.errors.append(error)
        finally:
            conn.close()

    def wait_for_connections(self, count: int, timeout: float = 5.0) -> list[ScriptConnection]:
        """Block until ``count`` connections arrived; return them all."""
        wait_for(lambda: len(self.connections) >= count, timeout, f"{count} connections")
        with self._lock:
            return list(self.connections)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop listening, cut connections and join every thread (idempotent).

        Raises:
            RuntimeError: A script thread did not finish (it slept with
                ``time.sleep`` instead of ``conn.sleep``?).
        """
        self._stopping.set()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            connections = list(self.connections)
            threads = list(self._threads)
            self._threads.clear()
        for conn in connections:
            conn._interrupt()
        deadline = time.monotonic() + timeout
        stuck = []
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                stuck.append(thread.name)
        if stuck:
            raise RuntimeError(f"scripted server threads did not stop: {stuck}")

    def check(self) -> None:
        """Re-raise the first exception a script raised (other than I/O ends)."""
        if self.errors:
            raise self.errors[0]
