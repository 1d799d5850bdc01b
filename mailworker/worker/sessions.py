"""One held-open SMTP session per profile, per worker process (per thread with
the threads pool): connect once, send many, QUIT at shutdown.

A session is never used across a fork: the pool remembers the process that
created it and starts empty in a child.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from mailworker.smtp import SMTPSession
from mailworker.smtp.profile import Profile


class SessionPool:
    """Lazily opened sessions, keyed by profile name and thread."""

    def __init__(self, resolve: Callable[[str], Profile]) -> None:
        self._resolve = resolve
        self._lock = threading.Lock()
        self._sessions: dict[tuple[int, str], SMTPSession] = {}
        self._pid = os.getpid()

    def get(self, profile_name: str) -> SMTPSession:
        """This thread's session for ``profile_name`` (not yet connected if new).

        Raises:
            ConfigError: the profile is not configured.
        """
        self._forget_if_forked()
        key = (threading.get_ident(), profile_name)
        session = self._sessions.get(key)
        if session is None:
            session = SMTPSession(self._resolve(profile_name))
            with self._lock:
                self._sessions[key] = session
        return session

    def discard(self, profile_name: str, *, send_quit: bool = True) -> None:
        """Close this thread's session (QUIT if possible and ``send_quit``); the next
        get() reconnects."""
        with self._lock:
            session = self._sessions.pop((threading.get_ident(), profile_name), None)
        if session is not None:
            if send_quit:
                session.close()
            else:
                session.abort()

    def close_all(self) -> int:
        """QUIT every session of this process; returns how many were open."""
        self._forget_if_forked()
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        opened = sum(1 for s in sessions if s.connected)
        for session in sessions:
            session.close()
        return opened

    def _forget_if_forked(self) -> None:
        if os.getpid() != self._pid:
            # The parent's sockets belong to the parent: drop them without QUIT.
            self._sessions = {}
            self._lock = threading.Lock()
            self._pid = os.getpid()
