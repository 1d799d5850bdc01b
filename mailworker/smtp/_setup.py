"""Setting a session up: TLS context, EHLO name, what we learnt, and mapping
low-level failures onto mailworker's errors."""

from __future__ import annotations

import functools
import os
import smtplib
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

from mailworker.errors import (
    SMTPError,
    SMTPProtocolError,
    SMTPServerDisconnected,
    SMTPTimeoutError,
    SMTPTLSError,
    Stage,
)
from mailworker.smtp._client import ReplyLimitExceeded
from mailworker.smtp.profile import Profile


@dataclass(frozen=True)
class SessionInfo:
    """What we learnt while connecting: for logs and ``mailworker check``."""

    peer: str
    greeting: str
    capabilities: tuple[str, ...]
    tls: dict[str, Any] = field(default_factory=dict)
    auth_mechanism: str | None = None


def tls_context(
    verify: bool, ca_file: str | None, client_cert: str | None, client_key: str | None
) -> ssl.SSLContext:
    """A client context: certificate and host name verified, TLS >= 1.2.

    Never ``context=None``: smtplib then uses a context that verifies nothing. Made once
    per set of files and reused until one of them changes (a rotated CA bundle or
    client certificate is picked up at the next connect, without a restart).
    """
    files = (ca_file, client_cert, client_key)
    return _context(verify, *files, stamps=tuple(_stamp(path) for path in files))


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    """What tells a changed file: inode, size and modification time (ns)."""
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None  # loading it fails with the real error
    return (info.st_ino, info.st_size, info.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _context(
    verify: bool,
    ca_file: str | None,
    client_cert: str | None,
    client_key: str | None,
    *,
    stamps: tuple[tuple[int, int, int] | None, ...],
) -> ssl.SSLContext:
    del stamps  # part of the cache key only
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert:
        context.load_cert_chain(client_cert, client_key)
    return context


def ehlo_name(profile: Profile, sock: socket.socket | None) -> str:
    """The name we give in EHLO: configured, else a dotted host name, else an
    address literal of our end of the connection (RFC 5321 §4.1.4)."""
    if profile.local_hostname:
        return profile.local_hostname
    host = socket.gethostname()
    if "." in host:
        return host
    if sock is not None:
        address = sock.getsockname()[0]
        return f"[IPv6:{address}]" if ":" in address else f"[{address}]"
    return "[127.0.0.1]"


def classify(exc: BaseException, stage: Stage, host: str) -> SMTPError | None:
    """Map a low-level failure to our hierarchy; None if it is not an I/O failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return SMTPTLSError(f"certificate of {host} not trusted: {exc.verify_message}", stage="tls")
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return SMTPServerDisconnected("server closed the TLS connection", stage=stage)
    if isinstance(exc, ssl.SSLError):
        return SMTPTLSError(f"TLS failed: {exc.reason or exc}", stage="tls")
    if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
        return SMTPTimeoutError("no reply within the timeout", stage=stage)
    if isinstance(exc, ReplyLimitExceeded):
        return SMTPProtocolError(f"server sent {exc}; the session is dropped", stage=stage)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return SMTPServerDisconnected("server closed the connection", stage=stage)
    if isinstance(exc, smtplib.SMTPResponseException):
        return SMTPProtocolError(f"unusable reply: {exc.smtp_error!r}", stage=stage)
    if isinstance(exc, socket.gaierror):
        return SMTPServerDisconnected(f"cannot resolve {host}: {exc.strerror}", stage=stage)
    if isinstance(exc, OSError):
        return SMTPServerDisconnected(
            f"connection to {host} failed: {exc.strerror or exc}", stage=stage
        )
    return None
