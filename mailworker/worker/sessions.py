"""One held-open SMTP session per profile, per worker process (per thread with
the threads pool): connect once, send many, QUIT at shutdown.

A session is never used across a fork: the pool remembers the process that
created it and starts empty in a child.

For a profile with ``max_connections``, a session holds a lease from the fleet's
semaphore (:class:`~mailworker.store.limits.Leases`) from before it connects until
it is closed. A keeper thread renews the leases in use and closes (QUIT) a session
idle for the profile's ``noop_after``, giving its lease back so that a busy peer
can use it; a crashed process's leases expire after ``lease_ttl``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import redis
import structlog

from mailworker.smtp import SMTPSession
from mailworker.smtp.profile import Profile
from mailworker.store.limits import Leases
from mailworker.worker import metrics
from mailworker.worker.fleet import MAX_WAIT, WaitFor

log = structlog.get_logger("mailworker.worker.sessions")

#: Seconds a connection lease lives without renewal (a crashed holder's lease is
#: free again after this).
LEASE_TTL = 30.0
#: How often the keeper looks at leased sessions.
_KEEPER_INTERVAL = 1.0
#: Pause between tries for a connection lease.
_LEASE_POLL = 0.1
#: When a message that found no lease within MAX_WAIT looks again.
_LEASE_WAIT = 1.0


@dataclass
class _Entry:
    session: SMTPSession
    #: Held while a task uses the session, so the keeper never closes it mid-send.
    busy: threading.Lock = field(default_factory=threading.Lock)
    leased: bool = False
    #: The lease's holder name: the thread that took it (the keeper renews it
    #: from its own thread, so it is kept here, not derived again).
    holder: str = ""
    renewed_at: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    #: Whether the session was connected the last time the pool looked.
    was_open: bool = False


class SessionPool:
    """Lazily opened sessions, keyed by profile name and thread."""

    def __init__(
        self,
        resolve: Callable[[str], Profile],
        *,
        leases: Leases | None = None,
        lease_ttl: float = LEASE_TTL,
    ) -> None:
        self._resolve = resolve
        self._leases = leases
        self._lease_ttl = lease_ttl
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, str], _Entry] = {}
        self._pid = os.getpid()
        self._keeper: threading.Thread | None = None
        self._stop = threading.Event()

    def profile(self, profile_name: str) -> Profile:
        """The profile by name.

        Raises:
            ConfigError: the profile is not configured.
        """
        return self._resolve(profile_name)

    def get(self, profile_name: str) -> SMTPSession:
        """This thread's session for ``profile_name`` (not yet connected if new).

        Raises:
            ConfigError: the profile is not configured.
        """
        return self._entry(profile_name).session

    def _entry(self, profile_name: str) -> _Entry:
        self._forget_if_forked()
        key = (threading.get_ident(), profile_name)
        entry = self._entries.get(key)
        if entry is None:
            entry = _Entry(SMTPSession(self._resolve(profile_name)))
            with self._lock:
                self._entries[key] = entry
        return entry

    @contextlib.contextmanager
    def use(self, profile_name: str, *, deadline: float) -> Iterator[SMTPSession]:
        """This thread's session, with a connection lease when the profile caps
        connections; the keeper leaves it alone meanwhile.

        Raises:
            WaitFor: no lease came free within MAX_WAIT (or before ``deadline``).
            ConfigError: the profile is not configured.
        """
        entry = self._entry(profile_name)
        with entry.busy:
            self._lease(entry, deadline)
            try:
                yield entry.session
            finally:
                entry.last_used = time.monotonic()
                self._observe(entry)

    def _lease(self, entry: _Entry, deadline: float) -> None:
        profile = entry.session.profile
        limit = profile.fleet.max_connections
        if limit is None or self._leases is None or entry.leased:
            return
        holder = entry.holder = entry.holder or _holder()
        until = min(time.monotonic() + MAX_WAIT, deadline)
        while not self._leases.acquire(profile.name, limit, holder, self._lease_ttl):
            if entry.session.connected:
                # Its lease was lost (expired, taken): it may not stay over the limit.
                self._close(entry, send_quit=True)
            if time.monotonic() + _LEASE_POLL >= until:
                raise WaitFor(_LEASE_WAIT, "connection lease")
            time.sleep(_LEASE_POLL)
        entry.leased = True
        entry.renewed_at = time.monotonic()
        self._start_keeper()

    def _observe(self, entry: _Entry) -> None:
        """Count connections opened and sessions open, for the metrics."""
        session = entry.session
        name = session.profile.name
        open_now = session.connected
        if open_now and not entry.was_open:
            metrics.connection_opened(name)
            metrics.session_open(name, +1)
        elif entry.was_open and not open_now:
            metrics.session_open(name, -1)
        entry.was_open = open_now

    def discard(self, profile_name: str, *, send_quit: bool = True) -> None:
        """Close this thread's session (QUIT if possible and ``send_quit``); the next
        get() reconnects."""
        with self._lock:
            entry = self._entries.pop((threading.get_ident(), profile_name), None)
        if entry is not None:
            self._close(entry, send_quit=send_quit)

    def close_all(self) -> int:
        """QUIT every session of this process; returns how many were open."""
        self._forget_if_forked()
        self._stop.set()
        with self._lock:
            entries, self._entries = list(self._entries.values()), {}
        opened = sum(1 for e in entries if e.session.connected)
        for entry in entries:
            self._close(entry, send_quit=True)
        return opened

    def _close(self, entry: _Entry, *, send_quit: bool) -> None:
        if send_quit:
            entry.session.close()
        else:
            entry.session.abort()
        self._observe(entry)
        if entry.leased and self._leases is not None:
            entry.leased = False
            with contextlib.suppress(redis.RedisError):  # it expires on its own
                self._leases.release(entry.session.profile.name, entry.holder)

    # -- the keeper ----------------------------------------------------------------

    def _start_keeper(self) -> None:
        with self._lock:
            if self._keeper is not None and self._keeper.is_alive():
                return
            self._stop.clear()
            self._keeper = threading.Thread(
                target=self._keep, name="mailworker-leases", daemon=True
            )
            self._keeper.start()

    def _keep(self) -> None:
        while not self._stop.wait(_KEEPER_INTERVAL):
            with self._lock:
                entries = [e for e in self._entries.values() if e.leased]
            for entry in entries:
                try:
                    self._tend(entry)
                except redis.RedisError as exc:
                    log.warning("fleet.lease_keeper_failed", error=str(exc))

    def _tend(self, entry: _Entry) -> None:
        """Close an idle leased session, or renew the lease of one in use."""
        assert self._leases is not None
        profile = entry.session.profile
        now = time.monotonic()
        if now - entry.last_used >= profile.noop_after and entry.busy.acquire(blocking=False):
            try:
                if entry.leased:
                    log.info("fleet.lease_released", profile=profile.name, idle=True)
                    self._close(entry, send_quit=True)
            finally:
                entry.busy.release()
            return
        if now - entry.renewed_at >= self._lease_ttl / 3:
            if self._leases.renew(profile.name, entry.holder, self._lease_ttl):
                entry.renewed_at = now
            else:
                # Expired and maybe taken: this session must not stay over the limit.
                log.warning("fleet.lease_lost", profile=profile.name)
                entry.leased = False
                if entry.busy.acquire(blocking=False):
                    try:
                        self._close(entry, send_quit=True)
                    finally:
                        entry.busy.release()

    def _forget_if_forked(self) -> None:
        if os.getpid() != self._pid:
            # The parent's sockets belong to the parent: drop them without QUIT.
            self._entries = {}
            self._lock = threading.Lock()
            self._keeper = None
            self._stop = threading.Event()
            self._pid = os.getpid()


def _holder() -> str:
    """This thread's name in the lease table."""
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"
