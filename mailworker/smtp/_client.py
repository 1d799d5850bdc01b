"""smtplib, with a transcript, pipelining and bounded reply reading added on top.

smtplib does socket I/O and EHLO bookkeeping well; what it lacks is a record of
the exchange that leaves secrets out (``set_debuglevel`` prints AUTH in clear), a
way to write several commands at once (RFC 2920), and a bound on a reply: its
reader takes any number of lines and applies the timeout to each ``recv``, so a
server streaming ``250-`` lines grows the client without end and one dripping a
byte now and then holds it for ever. Replies are read here instead.
"""

from __future__ import annotations

import contextlib
import select
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from mailworker.smtp.reply import Reply
from mailworker.smtp.transcript import REDACTED, Transcript

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer

#: Size of each write of message content; each write has its own data_block timeout.
BLOCK = 64 * 1024
#: How long to look for a refusal after the server stopped reading our content.
EARLY_REPLY_WAIT = 2.0
#: Longest reply line accepted, line ending included. RFC 5321 §4.5.3.1.5 says 512,
#: but servers write longer text lines; smtplib's limit (8192) keeps them working.
MAX_REPLY_LINE = 8192
#: Most lines in one reply. The longest real replies (EHLO with every extension, a
#: banner or a rejection with a policy text) run to a few dozen lines; a server
#: streaming ``250-`` lines would otherwise grow the client without end.
MAX_REPLY_LINES = 200
#: Most bytes in one reply, all lines together: ten times a long real one, and what
#: a reply (with its transcript lines) may cost in memory.
MAX_REPLY_BYTES = 64 * 1024
#: Bytes asked of the socket per read.
_RECV = 64 * 1024
#: Most bytes of pipelined commands written and not yet answered (see _pipeline.py).
#: RFC 2920 §3.1: a client that blocks on writes must keep each group within the
#: TCP window, "usually 4K octets", or both sides can end up blocked writing to
#: each other. More is written whenever half of it has been answered.
PIPELINE_WINDOW = 4096


class ReplyLimitExceeded(smtplib.SMTPException):
    """A reply broke a bound above: the server is broken or hostile."""


class _ReplyReader:
    """Reply lines from the socket, every read bounded by the reply's deadline.

    Stands where smtplib keeps ``sock.makefile("rb")``: that file applies the
    timeout to each ``recv``, so a line that trickles in never times out.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = bytearray()

    def readline(self, until: float) -> bytes:
        """The next line with its line ending; what is left at the end of the stream
        (``b""`` once nothing is); more than MAX_REPLY_LINE bytes if it is too long.

        Raises:
            TimeoutError: no complete line by ``until`` (a ``time.monotonic()`` time).
        """
        scanned = 0
        while True:
            end = self._buffer.find(b"\n", scanned)
            if end >= 0 or len(self._buffer) > MAX_REPLY_LINE:
                cut = end + 1 if end >= 0 else len(self._buffer)
                line = bytes(self._buffer[:cut])
                del self._buffer[:cut]
                return line
            scanned = len(self._buffer)
            left = until - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete reply within the timeout")
            self._sock.settimeout(left)
            chunk = self._sock.recv(_RECV)
            if not chunk:
                line = bytes(self._buffer)
                self._buffer.clear()
                return line
            self._buffer += chunk

    @property
    def buffered(self) -> bool:
        """Whether bytes were received and not read yet."""
        return bool(self._buffer)

    def close(self) -> None:
        self._buffer.clear()


class Client(smtplib.SMTP):
    """An ``smtplib.SMTP`` that records its transcript and can pipeline.

    Attributes:
        transcript: where lines are recorded now; the session swaps it per message.
        deadline: a ``time.monotonic()`` time no read or write may run past (the
            send's deadline), or None.
    """

    # smtplib sends "ehlo" in lower case; commands are case-insensitive, but
    # upper case is what every transcript reader expects.
    ehlo_msg = "EHLO"

    def __init__(
        self,
        *,
        local_hostname: str,
        connect_timeout: float,
        greeting_timeout: float,
        implicit_tls: ssl.SSLContext | None,
    ) -> None:
        self.transcript = Transcript()
        self.last_reply = Reply(-1, ())
        #: True while message content is being written (a QUIT now would join it).
        self.in_content = False
        self.deadline: float | None = None
        #: The timeout of one whole reply, or of one write.
        self._timeout = greeting_timeout
        self._redacting = False
        self._greeting_timeout = greeting_timeout
        self._implicit_tls = implicit_tls
        # local_hostname is always given: smtplib would otherwise call getfqdn(),
        # which can block for seconds without reverse DNS.
        super().__init__(local_hostname=local_hostname, timeout=connect_timeout)

    # -- smtplib hooks -------------------------------------------------------

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        if self._implicit_tls is not None:
            # The handshake runs under the connect timeout; SNI is the host name.
            sock = self._implicit_tls.wrap_socket(sock, server_hostname=host)
        sock.settimeout(self._greeting_timeout)
        self._timeout = self._greeting_timeout
        return sock

    def getreply(self) -> tuple[int, bytes]:
        """Read one reply, within the timeout as a whole and within the bounds above.

        Raises:
            smtplib.SMTPServerDisconnected: the connection closed or timed out (the
                socket is closed, as smtplib does).
            ReplyLimitExceeded: the reply was too long; the socket is closed, for
                what follows would be read as the answer to the next command.
            smtplib.SMTPResponseException: code -1, a line without a reply code.
        """
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        if self.file is None:
            self.file = _ReplyReader(self.sock)
        reader: _ReplyReader = self.file
        until = time.monotonic() + self._timeout
        if self.deadline is not None:
            until = min(until, self.deadline)
        raw: list[bytes] = []
        size = 0
        code = -1
        while True:
            try:
                line = reader.readline(until)
            except OSError as exc:
                self.close()
                raise smtplib.SMTPServerDisconnected(
                    f"Connection unexpectedly closed: {exc}"
                ) from exc
            if not line:
                self.close()
                raise smtplib.SMTPServerDisconnected("Connection unexpectedly closed")
            raw.append(line)
            size += len(line)
            text = line.rstrip(b"\r\n").decode("utf-8", "replace")
            self.transcript.server(text if len(text) <= 512 else f"{text[:512]}...")
            more = line[3:4] == b"-"
            problem = None
            if len(line) > MAX_REPLY_LINE:
                problem = f"a reply line longer than {MAX_REPLY_LINE} bytes"
            elif size > MAX_REPLY_BYTES:
                problem = f"a reply longer than {MAX_REPLY_BYTES} bytes"
            elif more and len(raw) >= MAX_REPLY_LINES:
                problem = f"a reply of more than {MAX_REPLY_LINES} lines"
            if problem is not None:
                self.close()
                raise ReplyLimitExceeded(problem)
            # Exactly three digits, then SP, '-' or the line end (RFC 5321 4.2): int()
            # would also take " 25", and "2500-x" read as a final 250 would leave the
            # reply's next line to answer the next command.
            if not (line[:3].isdigit() and line[3:4] in (b" ", b"-", b"\r", b"\n", b"")):
                code = -1
                break
            code = int(line[:3])
            if not more:
                break
        message = b"\n".join(line[4:].strip(b" \t\r\n") for line in raw)
        if code == -1:
            # Not a reply at all: the stream is out of step and cannot be trusted.
            raise smtplib.SMTPResponseException(-1, message)
        self.last_reply = Reply.parse(code, raw, enhanced=self.has_extn("enhancedstatuscodes"))
        return code, message

    def send(self, s: ReadableBuffer | str) -> None:
        """Write (smtplib's ``send``), within the timeout cut to the deadline."""
        self._arm()
        super().send(s)

    def putcmd(self, cmd: str, args: str = "") -> None:
        self.record_command(f"{cmd} {args}" if args else cmd)
        super().putcmd(cmd, args)

    # -- what we add ---------------------------------------------------------

    def record_command(self, line: str) -> None:
        """Record a command line, redacting AUTH payloads."""
        if self._redacting:
            words = line.split(" ", 2)
            if words[0].upper() == "AUTH":
                line = " ".join(words[:2]) + (f" {REDACTED}" if len(words) > 2 else "")
            else:
                line = REDACTED
        self.transcript.client(line)

    @contextlib.contextmanager
    def redacting(self) -> Iterator[None]:
        """Within this block every command line is recorded as ``****``."""
        self._redacting = True
        try:
            yield
        finally:
            self._redacting = False

    def reply(self) -> Reply:
        """Read one complete reply."""
        self.getreply()
        return self.last_reply

    def command(self, line: str) -> Reply:
        """Send one command and read its reply (lock-step)."""
        self.putcmd(line)
        return self.reply()

    def send_raw(self, data: bytes | memoryview) -> None:
        """Write bytes as they are, within the timeout cut to the deadline.

        Unlike smtplib's ``send`` a failed write is raised as it is (a broken pipe
        may come with the server's reply, still to be read), not as "not connected".
        """
        if self.sock is None:
            raise smtplib.SMTPServerDisconnected("please run connect() first")
        self._arm()
        self.sock.sendall(data)

    def stale(self) -> bool:
        """Whether the server said something, or closed, while we were not asking: a
        held session it dropped while idle (a 421, then end of stream).

        Checked before writing a pipelined group: written to a socket the server
        already closed, it would be lost with no way to tell "never read" from
        "read, then dropped".
        """
        if self.sock is None:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():
            return True
        if self.file is not None and self.file.buffered:
            return True
        readable, _, _ = select.select([self.sock], [], [], 0)
        return bool(readable)

    def set_timeout(self, seconds: float) -> None:
        """The timeout of each following reply as a whole, and of each write."""
        self._timeout = seconds
        # settimeout() costs a system call even when nothing changes.
        if self.sock is not None and self.sock.gettimeout() != seconds:
            self.sock.settimeout(seconds)

    def _arm(self) -> None:
        """Give the next write the timeout, cut to the deadline."""
        timeout = self._timeout
        if self.deadline is not None:
            timeout = min(timeout, self.deadline - time.monotonic())
            if timeout <= 0:
                raise TimeoutError("the send's deadline has passed")
        if self.sock is not None and self.sock.gettimeout() != timeout:
            self.sock.settimeout(timeout)

    def start_tls(self, context: ssl.SSLContext, host: str) -> None:
        """Wrap the socket after a 220 to STARTTLS; forget what EHLO said before."""
        assert self.sock is not None
        self.sock = context.wrap_socket(self.sock, server_hostname=host)
        # Anything the server sent before the handshake is discarded with the old
        # file object, which defeats STARTTLS command injection.
        self.file = None
        self.helo_resp = self.ehlo_resp = None
        self.esmtp_features = {}
        self.does_esmtp = False

    @property
    def alive(self) -> bool:
        """Whether the socket is still open (not whether the server still listens)."""
        return self.sock is not None

    def tls_info(self) -> dict[str, Any]:
        """TLS version, cipher and peer certificate summary, when encrypted."""
        sock = self.sock
        if not isinstance(sock, ssl.SSLSocket):
            return {}
        cipher = sock.cipher()
        cert = sock.getpeercert() or {}
        return {
            "tls_version": sock.version(),
            "cipher": cipher[0] if cipher else None,
            "cert_subject": _dn(cert.get("subject", ())),
            "cert_issuer": _dn(cert.get("issuer", ())),
            "cert_not_after": cert.get("notAfter"),
        }


#: The usual short names of distinguished-name attributes.
_DN_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
}


def _dn(rdns: Any) -> str:
    return ", ".join(f"{_DN_SHORT.get(k, k)}={v}" for rdn in rdns for k, v in rdn)
