"""A development SMTP server, like MailHog or Mailpit: every message lands in a maildir.

Point an application (or ``mailworker worker``) at it instead of a real provider::

    with DevServer("mail", port=0, tls="starttls", auth=("dev", "secret")) as server:
        print(server.url())        # smtp+starttls://dev:secret@localhost:PORT?ca_file=...
        run_your_app_against(server.url())
        print(server.counters.summary())

It speaks real SMTP (aiosmtpd) over real TLS: at start it makes a throw-away CA and a
certificate for its host name (trustme) and writes the CA certificate next to the maildir,
so clients verify the server with ``?ca_file=``. It can refuse recipients by ``fnmatch``
pattern: for good (550 5.1.1), for now (451 4.2.0), or only the first time an address is
tried. Like Postfix it offers PIPELINING and ENHANCEDSTATUSCODES.

Needs the ``devserver`` extra (aiosmtpd and trustme): importing this module without it
raises :class:`ImportError` saying what to install. The aiosmtpd plumbing is in
:mod:`mailworker.dev._smtp`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hmac
import mailbox
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from email.parser import BytesParser
from email.policy import default as default_policy
from email.utils import formatdate
from pathlib import Path
from types import TracebackType
from typing import Literal
from urllib.parse import quote

from mailworker.dev._smtp import (
    INSTALL_HINT,
    Protocol,
    ThreadedServer,
    free_port,
    tls_context,
)
from mailworker.dev._smtp import bindable as _bindable

__all__ = ["INSTALL_HINT", "TLS_MODES", "Counters", "DevServer", "TLSMode", "free_port"]

#: ``none``: clear text; ``starttls``: STARTTLS offered; ``implicit``: TLS from the first byte.
TLSMode = Literal["none", "starttls", "implicit"]
TLS_MODES: tuple[TLSMode, ...] = ("none", "starttls", "implicit")
#: Reply to a recipient matching ``reject`` (permanent).
REJECT_REPLY = "550 5.1.1 <{}>: Recipient address rejected (devserver --reject)"
#: Reply to a recipient matching ``defer`` or, the first time, ``defer_once`` (transient).
DEFER_REPLY = "451 4.2.0 <{}>: Greylisted, try again later (devserver {})"
#: The subdirectories that make a directory a Maildir.
MAILDIR_PARTS = ("cur", "new", "tmp")


@dataclass(frozen=True)
class Counters:
    """What the server has seen since it started.

    Attributes:
        connections: TCP connections accepted.
        tls_sessions: TLS handshakes completed (STARTTLS or implicit); ``tls_failures``
            the STARTTLS handshakes that failed (e.g. the client did not trust us).
        auths: successful AUTH exchanges; ``auth_failures`` the refused ones.
        messages: messages accepted and written to the maildir.
        rejected: recipients refused with 550; ``deferred`` those refused with 451.
        quits: QUIT commands received (clients that closed politely).
    """

    connections: int = 0
    tls_sessions: int = 0
    tls_failures: int = 0
    auths: int = 0
    auth_failures: int = 0
    messages: int = 0
    rejected: int = 0
    deferred: int = 0
    quits: int = 0

    def summary(self) -> str:
        """E.g. ``"20 messages over 2 connections (2 TLS sessions, 2 AUTHs)"``."""
        return (
            f"{_n(self.messages, 'message')} over {_n(self.connections, 'connection')} "
            f"({_n(self.tls_sessions, 'TLS session')}, {_n(self.auths, 'AUTH')})"
        )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class DevServer:
    """A development SMTP server in a background thread, writing messages to a maildir.

    Args:
        maildir: directory of the maildir: an existing Maildir, or a directory that is
            missing or empty, in which ``cur/``, ``new/`` and ``tmp/`` are created.
        host: address to listen on.
        port: port to listen on; 0 picks a free one (see :attr:`port` after start).
        tls: ``"none"``, ``"starttls"`` or ``"implicit"``.
        auth: ``(user, password)`` to require AUTH PLAIN/LOGIN (after TLS unless
            ``tls="none"``); None accepts mail from anyone.
        reject: ``fnmatch`` patterns of recipients refused with 550 5.1.1.
        defer: patterns of recipients refused with 451 4.2.0, every time.
        defer_once: patterns of recipients refused with 451 the first time each address
            is tried, accepted after.
        hostname: the name in the greeting and in the certificate.
        ca_file: where to write the CA certificate (PEM); default
            ``<maildir>-ca.pem`` beside the maildir. Only with TLS.
        on_event: called with one line of text per accepted message and per refusal
            (from the server thread).

    Raises:
        ValueError: an unknown TLS mode, an empty user name, or a ``maildir`` that is a
            file or a directory that is neither empty nor a Maildir.
        OSError: the maildir could not be created (e.g. no permission).
    """

    def __init__(
        self,
        maildir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int = 1025,
        tls: TLSMode = "none",
        auth: tuple[str, str] | None = None,
        reject: Sequence[str] = (),
        defer: Sequence[str] = (),
        defer_once: Sequence[str] = (),
        hostname: str = "localhost",
        ca_file: str | Path | None = None,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        if tls not in TLS_MODES:
            raise ValueError(f"tls must be one of {', '.join(TLS_MODES)}, not {tls!r}")
        if auth is not None and not auth[0]:
            raise ValueError("auth: the user name must not be empty")
        self.maildir_path = Path(maildir)
        self.host = host
        self.port = port
        self.tls: TLSMode = tls
        self.auth = auth
        self.reject = tuple(p.lower() for p in reject)
        self.defer = tuple(p.lower() for p in defer)
        self.defer_once = tuple(p.lower() for p in defer_once)
        self.hostname = hostname
        self.ca_file: Path | None = None
        if tls != "none":
            default_ca = self.maildir_path.parent / f"{self.maildir_path.name}-ca.pem"
            self.ca_file = (Path(ca_file) if ca_file is not None else default_ca).absolute()
        self.maildir = _open_maildir(self.maildir_path)
        self._on_event = on_event
        self._counters = Counters()
        self._tried_once: set[str] = set()
        self._lock = threading.Lock()
        self._controller: ThreadedServer | None = None
        #: Open client connections (touched in the server thread only).
        self.active: set[Protocol] = set()

    def __repr__(self) -> str:
        return f"<DevServer {self.host}:{self.port} tls={self.tls} auth={self.auth is not None}>"

    # -- life cycle --------------------------------------------------------------------

    def start(self) -> DevServer:
        """Make the certificate, start listening and return self.

        Raises:
            OSError: the port is taken (with ``port=0``, after five free ports failed).
        """
        if self._controller is not None:
            raise RuntimeError(f"{self!r} is already running")
        context = self._tls_context() if self.tls != "none" else None
        pick = self.port == 0
        for attempt in range(5):
            port = free_port(self.host) if pick else _bindable(self.host, self.port)
            controller = ThreadedServer(self, port, context)
            try:
                controller.start()
            except OSError:  # taken since free_port() looked
                controller.stop(no_assert=True)
                controller.loop.close()
                if not pick or attempt == 4:
                    raise
                continue
            self.port = port
            self._controller = controller
            break
        # Controller.start() made one connection to check the server answers.
        with self._lock:
            self._counters = Counters()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections (idempotent)."""
        controller, self._controller = self._controller, None
        if controller is None:
            return
        with contextlib.suppress(RuntimeError, TimeoutError):
            controller.abort_all()
        controller.stop()

    @property
    def running(self) -> bool:
        """Whether the server is listening."""
        return self._controller is not None

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- what clients and operators need ------------------------------------------------

    @property
    def counters(self) -> Counters:
        """A snapshot of the counters."""
        with self._lock:
            return self._counters

    def url(self, host: str | None = None, *, redact: bool = False) -> str:
        """A ``MAILWORKER_SMTP_URL`` for this server: scheme by TLS mode, the AUTH
        credentials (password as ``****`` with ``redact``) and ``ca_file`` included.
        ``host`` defaults to :attr:`hostname`, the name the certificate is made for."""
        scheme = {"none": "smtp", "starttls": "smtp+starttls", "implicit": "smtps"}[self.tls]
        user = ""
        if self.auth is not None:
            password = "****" if redact else quote(self.auth[1], safe="")
            user = f"{quote(self.auth[0], safe='')}:{password}@"
        query = []
        if self.ca_file is not None:
            query.append(f"ca_file={quote(str(self.ca_file))}")
        if self.auth is not None and self.tls == "none":
            query.append("allow_insecure_auth=true")
        suffix = "?" + "&".join(query) if query else ""
        return f"{scheme}://{user}{host or self.hostname}:{self.port}{suffix}"

    # -- used by the protocol (server thread) ---------------------------------------

    def count(self, **deltas: int) -> Counters:
        """Add to the counters; returns them."""
        with self._lock:
            current = self._counters
            changes = {name: getattr(current, name) + n for name, n in deltas.items()}
            self._counters = replace(current, **changes)
            return self._counters

    def verdict(self, address: str) -> str | None:
        """The refusal for recipient ``address``, or None to accept it."""
        key = address.lower()
        if any(fnmatch.fnmatchcase(key, p) for p in self.reject):
            self.count(rejected=1)
            self.event(f"rejected  to=<{address}> (--reject)")
            return REJECT_REPLY.format(address)
        first_time = False
        if any(fnmatch.fnmatchcase(key, p) for p in self.defer_once):
            with self._lock:
                first_time = key not in self._tried_once
                self._tried_once.add(key)
        if first_time or any(fnmatch.fnmatchcase(key, p) for p in self.defer):
            option = "--defer-once" if first_time else "--defer"
            self.count(deferred=1)
            self.event(f"deferred  to=<{address}> ({option})")
            return DEFER_REPLY.format(address, option)
        return None

    def event(self, line: str) -> None:
        """Report one line to ``on_event``."""
        if self._on_event is not None:
            self._on_event(f"{time.strftime('%H:%M:%S')} {line}")

    def deliver(
        self,
        mail_from: str,
        recipients: list[str],
        content: bytes,
        *,
        peer: str,
        helo: str | None,
        tls: str | None,
        user: str | None,
        connection: int,
    ) -> str:
        """Write an accepted message to the maildir, with trace headers in front as a
        local delivery agent adds them; returns its maildir key."""
        proto = "ESMTP" + ("S" if tls else "") + ("A" if user else "")
        trace = [f"Return-Path: <{mail_from}>"]
        trace += [f"Delivered-To: {rcpt}" for rcpt in recipients]
        trace.append(
            f"Received: from {helo or 'unknown'} ([{peer}]) by {self.hostname} "
            f"(mailworker devserver) with {proto}; {formatdate(localtime=True)}"
        )
        # Line endings as local mail files have them (LF), like Postfix's local(8).
        stored = "\n".join(trace).encode() + b"\n" + content.replace(b"\r\n", b"\n")
        key = self.maildir.add(stored)
        self.count(messages=1)
        headers = BytesParser(policy=default_policy).parsebytes(content, headersonly=True)
        subject = headers["subject"]
        self.event(
            f"accepted  from=<{mail_from}> to={','.join(recipients)} "
            f"subject={str(subject or '')!r} size={len(content)} conn={connection} "
            f"{tls or 'clear'} auth={user or '-'} -> new/{key}"
        )
        return key

    def authenticate(self, user: bytes, password: bytes) -> bool:
        """Whether ``user``/``password`` are the configured credentials."""
        if self.auth is None:
            return False
        ok = hmac.compare_digest(user, self.auth[0].encode()) and hmac.compare_digest(
            password, self.auth[1].encode()
        )
        if ok:
            self.count(auths=1)
        else:
            self.count(auth_failures=1)
        return ok

    def _tls_context(self) -> ssl.SSLContext:
        assert self.ca_file is not None
        names = {self.hostname, "localhost", "127.0.0.1"}
        if self.host not in ("", "0.0.0.0", "::"):  # noqa: S104 - compared, not bound
            names.add(self.host)
        self.ca_file.parent.mkdir(parents=True, exist_ok=True)
        return tls_context(sorted(names), self.hostname, str(self.ca_file))


def _open_maildir(path: Path) -> mailbox.Maildir:
    """The Maildir at ``path``, creating ``cur/``, ``new/`` and ``tmp/`` when ``path`` is
    missing (parents too), an empty directory, or holds only some of them.

    The stdlib's ``Maildir(create=True)`` only creates a directory that does not exist:
    in an existing empty one (``mkdir mail`` first) every delivery would fail. Entries
    whose names start with a dot (``.gitkeep``, Maildir++ folders) do not count.

    Raises:
        ValueError: ``path`` is a file, or a directory that is neither empty nor a
            Maildir; the message says what to do.
        OSError: the directories could not be created.
    """
    if not path.exists():
        path.mkdir(mode=0o700, parents=True)
    elif not path.is_dir():
        raise ValueError(f"{path} is a file, not a directory; give a directory for the maildir")
    else:
        present = {entry.name for entry in path.iterdir() if not entry.name.startswith(".")}
        parts = {name for name in MAILDIR_PARTS if (path / name).is_dir()}
        if len(parts) < len(MAILDIR_PARTS) and not present <= parts:
            others = sorted(present - parts)
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ValueError(
                f"{path} is neither empty nor a Maildir (it has {shown} but not cur/, new/ "
                "and tmp/); give a new or empty directory, or an existing Maildir"
            )
    for name in MAILDIR_PARTS:
        (path / name).mkdir(mode=0o700, exist_ok=True)
    return mailbox.Maildir(path, factory=None, create=False)
