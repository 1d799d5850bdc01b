"""smtplib, with a transcript and pipelining added on top.

smtplib does socket I/O, reply parsing and EHLO bookkeeping well; what it lacks
is a record of the exchange that leaves secrets out (``set_debuglevel`` prints
AUTH in clear) and a way to write several commands at once (RFC 2920).
"""

from __future__ import annotations

import contextlib
import smtplib
import socket
import ssl
from collections.abc import Iterator
from typing import IO, Any

from mailworker.smtp.reply import Reply
from mailworker.smtp.transcript import REDACTED, Transcript

#: Size of each write of message content; each write has its own data_block timeout.
_BLOCK = 64 * 1024
#: How long to look for a refusal after the server stopped reading our content.
_EARLY_REPLY_WAIT = 2.0


class _LineRecorder:
    """Wraps the socket file so every reply line is seen as smtplib reads it."""

    def __init__(self, file: IO[bytes], client: Client) -> None:
        self._file = file
        self._client = client

    def readline(self, size: int = -1) -> bytes:
        line = self._file.readline(size)
        if line:
            self._client.on_reply_line(line)
        return line

    def close(self) -> None:
        self._file.close()


class Client(smtplib.SMTP):
    """An ``smtplib.SMTP`` that records its transcript and can pipeline.

    Attributes:
        transcript: where lines are recorded now; the session swaps it per message.
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
        self._reply_lines: list[bytes] = []
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
        return sock

    def getreply(self) -> tuple[int, bytes]:
        if self.file is None and self.sock is not None:
            self.file = _LineRecorder(self.sock.makefile("rb"), self)
        self._reply_lines = []
        code, text = super().getreply()
        if code == -1:
            # Not a reply at all: the stream is out of step and cannot be trusted.
            raise smtplib.SMTPResponseException(-1, text)
        self.last_reply = Reply.parse(
            code, self._reply_lines, enhanced=self.has_extn("enhancedstatuscodes")
        )
        return code, text

    def putcmd(self, cmd: str, args: str = "") -> None:
        self.record_command(f"{cmd} {args}" if args else cmd)
        super().putcmd(cmd, args)

    # -- what we add ---------------------------------------------------------

    def on_reply_line(self, line: bytes) -> None:
        """Record one raw reply line (called by the line recorder)."""
        self._reply_lines.append(line)
        self.transcript.server(line.rstrip(b"\r\n").decode("utf-8", "replace"))

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

    def pipeline(self, lines: list[str]) -> None:
        """Send several commands in one write (RFC 2920); read replies with reply()."""
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError("command contains CR or LF")
            self.record_command(line)
        self.send("".join(f"{line}\r\n" for line in lines))

    def send_content(self, payload: bytes, size: int) -> Reply | None:
        """Write dot-stuffed message content; each block gets the socket's timeout.

        Returns None when all was written, or the server's reply when it refused
        the message and closed the connection before reading it all (a 5xx right
        after 354 to a message too large): that verdict beats a "broken pipe".
        """
        self.transcript.client(f"<message content, {size} bytes>")
        assert self.sock is not None
        view = memoryview(payload)
        self.in_content = True
        try:
            for start in range(0, len(view), _BLOCK):
                self.sock.sendall(view[start : start + _BLOCK])
        except (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError) as exc:
            self.in_content = False
            try:
                self.set_timeout(_EARLY_REPLY_WAIT)
                early = self.reply()
            except (OSError, smtplib.SMTPException):
                raise exc from None
            if early.ok:  # acceptance of a message that never ended is no verdict
                raise smtplib.SMTPResponseException(
                    early.code, b"reply before the end of data"
                ) from exc
            return early
        self.in_content = False
        self.transcript.client(".")
        return None

    def set_timeout(self, seconds: float) -> None:
        """The timeout of the next socket operations."""
        # settimeout() costs a system call even when nothing changes.
        if self.sock is not None and self.sock.gettimeout() != seconds:
            self.sock.settimeout(seconds)

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
