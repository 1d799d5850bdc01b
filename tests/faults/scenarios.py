"""The fault scenarios of issue 9: each sends a batch through a real worker, injects
one fault mid-batch, and returns a :class:`~tests.faults.rig.Result` (sent,
dead-lettered, lost, duplicates by Message-ID, seconds to drain).

Shared by ``tests/faults/test_faults.py`` (which asserts) and ``benchmarks/faults.py``
(which prints the table). Every scenario slows the server's RCPT a little, so that
the batch is still flowing when the fault strikes.

The in-doubt choice (:func:`in_doubt_drop`): a connection cut after the whole message
went out and before the server's verdict leaves mailworker not knowing whether the
server kept the message. It is not sent again at once, but it is sent again by the
delayed retry: at-least-once. Every such message arrives twice, with the same
Message-ID.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from tests.faults.rig import CONCURRENCY, FaultHandler, Result, Rig, garbage_replies

#: Seconds added to every RCPT reply, so the batch takes a second or two to flow.
PACE = 0.03
#: Copies accepted before the fault is injected.
MID_BATCH = 10
#: Seconds a storm (421s, slow replies, garbage) lasts.
STORM = 2.0
#: Connections cut after the data in :func:`in_doubt_drop`.
IN_DOUBT = 4
#: Shorter limits for the SIGKILL scenarios, whose drain waits for them: a killed
#: message comes back after the visibility timeout (whole worker killed) or after the
#: hard time limit and its lock (one pool process killed: Celery notices the dead
#: process within 5 s or at the time limit, and the lock outlives the limit by 2 s).
SHORT = {"MAILWORKER_VISIBILITY_TIMEOUT": "6", "MAILWORKER_TASK_TIME_LIMIT": "2"}


def _rig(
    name: str,
    workdir: Path,
    *,
    timeout: float = 2.0,
    redis_args: tuple[str, ...] = (),
    settings: Mapping[str, str] | None = None,
) -> Rig:
    """A :class:`Rig` in ``workdir/name`` whose server paces RCPT by :data:`PACE`."""
    rig = Rig(name, workdir / name, timeout=timeout, redis_args=redis_args, **(settings or {}))
    rig.handler.command_delays["RCPT"] = PACE
    return rig


def _mid_batch(rig: Rig) -> None:
    """Start a worker, publish the batch, wait until it is flowing and a message is
    mid-send: the fault strikes then."""
    rig.start_worker()
    rig.publish()
    rig.wait_accepted(MID_BATCH)
    rig.wait_mid_send()


def smtp_restart(workdir: Path) -> Result:
    """The SMTP server stops (cutting every connection) and is back 0.5 s later."""
    with _rig("smtp_restart", workdir) as rig:
        _mid_batch(rig)
        rig.smtp.restart(down_for=0.5)
        return rig.drain()


def in_doubt_drop(workdir: Path) -> Result:
    """The server keeps the message and cuts the connection before its reply, for
    :data:`IN_DOUBT` messages: in doubt, sent again by the delayed retry."""
    with _rig("in_doubt_drop", workdir) as rig:
        _mid_batch(rig)
        rig.handler.drop_after_data = IN_DOUBT
        return rig.drain()


def greeting_421_storm(workdir: Path) -> Result:
    """For :data:`STORM` seconds every held session gets ``421`` to its next MAIL
    (the server closes) and every new connection is greeted with ``421``."""
    with _rig("greeting_421_storm", workdir) as rig:
        _mid_batch(rig)
        handler = rig.handler

        def clear() -> None:
            handler.greeting_reply = handler.mail_reply = None

        with rig.storm(STORM, clear):
            handler.greeting_reply = "421 4.3.2 Service not available, closing channel"
            handler.mail_reply = "421 4.3.2 Service shutting down"
        return rig.drain()


def midsession_421_storm(workdir: Path) -> Result:
    """For :data:`STORM` seconds held sessions get ``421`` and a closed connection:
    first to MAIL, then to the end of the data (a verdict: the server did not keep it)."""
    with _rig("midsession_421_storm", workdir) as rig:
        _mid_batch(rig)
        handler = rig.handler

        def clear() -> None:
            handler.mail_reply = handler.data_reply = None

        with rig.storm(STORM / 2, clear):
            handler.mail_reply = "421 4.4.2 Connection timed out, closing"
        with rig.storm(STORM / 2, clear):
            handler.data_reply = "421 4.3.0 Queue file write error, closing"
        return rig.drain()


def slow_server(workdir: Path) -> Result:
    """For :data:`STORM` seconds the greeting and MAIL take 2.5 s, past the profile's
    1 s timeouts (before any data: a timeout there is no doubt)."""
    with _rig("slow_server", workdir, timeout=1.0) as rig:
        _mid_batch(rig)
        delays = rig.handler.command_delays

        def clear() -> None:
            delays.pop("GREETING", None)
            delays.pop("MAIL", None)

        with rig.storm(STORM, clear):
            delays.update(GREETING=2.5, MAIL=2.5)
        return rig.drain()


def garbage_replies_storm(workdir: Path) -> Result:
    """For :data:`STORM` seconds MAIL is answered in turn with garbage, a 20 KB line
    and a reply of 100,000 lines."""
    with _rig("garbage_replies", workdir) as rig:
        _mid_batch(rig)
        handler = rig.handler

        def clear() -> None:
            handler.mail_faults = []

        with rig.storm(STORM, clear):
            handler.mail_faults = garbage_replies()
        return rig.drain()


def throttling_server(workdir: Path) -> Result:
    """The server takes 15 messages per 2 s window and answers MAIL with ``451 4.7.0``
    beyond (a provider's "N per minute", compressed)."""
    with _rig("throttling_server", workdir) as rig:
        rig.handler.throttle = (15, 2.0)
        rig.start_worker()
        rig.publish()
        return rig.drain()


def redis_restart_aof(workdir: Path) -> Result:
    """Redis (broker and store, AOF on, fsync every second) is stopped and started
    again 1 s later."""
    aof = ("--appendonly", "yes", "--appendfsync", "everysec")
    with _rig("redis_restart_aof", workdir, redis_args=aof) as rig:
        _mid_batch(rig)
        rig.redis.restart(down_for=1.0)
        return rig.drain()


def pool_process_sigkill(workdir: Path) -> Result:
    """The prefork process that is mid-send (waiting for its RCPT reply) is SIGKILLed.
    Celery notices within 5 s or at the hard time limit (2 s here) and requeues the
    message, which finds the dead run's lock and looks again once it has expired."""
    with _rig("pool_process_sigkill", workdir, settings=SHORT) as rig:
        rig.start_worker()
        rig.publish()
        rig.wait_accepted(MID_BATCH)
        pid = rig.kill_sender(rig.workers[0])
        return rig.drain(killed=pid)


def worker_sigkill(workdir: Path) -> Result:
    """The whole worker (main process and pool) is SIGKILLed and another started: its
    unacknowledged messages come back after the visibility timeout (6 s here)."""
    with _rig("worker_sigkill", workdir, settings=SHORT) as rig:
        _mid_batch(rig)
        rig.kill_worker(rig.workers[0])
        rig.start_worker()
        return rig.drain()


def worker_sigkill_mid_sweep(workdir: Path) -> Result:
    """The whole worker is SIGKILLed while it holds kombu's restore lock (set here as
    a killed sweep leaves it): the replacement must still restore its messages within
    the visibility timeout and the lock's short expiry, not after kombu's 300 s."""
    with _rig("worker_sigkill_mid_sweep", workdir, settings=SHORT) as rig:
        _mid_batch(rig)
        rig.kill_worker(rig.workers[0])
        expire = rig.hold_restore_lock()
        rig.start_worker()
        return rig.drain(restore_lock_expire=expire)


def warm_shutdown(workdir: Path) -> Result:
    """SIGTERM to the worker mid-batch: it finishes the messages in flight and QUITs
    every session; a new worker sends the rest."""
    with _rig("warm_shutdown", workdir) as rig:
        _mid_batch(rig)
        status = rig.stop_worker(rig.workers[0])
        counts = rig.handler.counts
        # Every transaction started (MAIL) ended with the message accepted, and every
        # connection ended with QUIT.
        unfinished = counts["MAIL"] - len(rig.handler.messages)
        unquit = counts["connections"] - counts["QUIT"]
        rig.start_worker()
        return rig.drain(exit_status=status, unfinished=unfinished, unquit=unquit)


#: Every scenario by name, in the order of the table.
SCENARIOS: dict[str, Callable[[Path], Result]] = {
    "smtp_restart": smtp_restart,
    "in_doubt_drop": in_doubt_drop,
    "greeting_421_storm": greeting_421_storm,
    "midsession_421_storm": midsession_421_storm,
    "slow_server": slow_server,
    "garbage_replies": garbage_replies_storm,
    "throttling_server": throttling_server,
    "redis_restart_aof": redis_restart_aof,
    "pool_process_sigkill": pool_process_sigkill,
    "worker_sigkill": worker_sigkill,
    "worker_sigkill_mid_sweep": worker_sigkill_mid_sweep,
    "warm_shutdown": warm_shutdown,
}

__all__ = ["CONCURRENCY", "IN_DOUBT", "SCENARIOS", "FaultHandler", "Result"]
