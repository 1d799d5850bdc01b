"""Every Redis key mailworker uses, in one place.

Layout (``{p}`` is the prefix, ``mailworker:`` by default):

=============================  ======  =================================================
key                            type    holds
=============================  ======  =================================================
``{p}sent:<message key>``      string  JSON result of a delivery the server accepted (250
                                       to the data); kept ``max_age`` + 1 day. A key
                                       present here is never sent again.
``{p}lock:<message key>``      string  random token of the delivery running now; expires
                                       after the task time limit (+ margin).
``{p}runs:<task id>``          string  how many times a task message started (poison
                                       guard); expires after ``max_age``.
``{p}retry:due``               zset    scheduled retry id -> due time (unix seconds)
``{p}retry:task``              hash    scheduled retry id -> JSON ``{"task", "kwargs"}``
``{p}dlq:index``               zset    dead-letter id -> time it was added
``{p}dlq:record``              hash    dead-letter id -> JSON record without its payload
                                       (a summary of it instead)
``{p}dlq:payload``             hash    dead-letter id -> JSON payload (the task kwargs);
                                       absent when it was over the per-record cap or
                                       evicted for the byte budget
``{p}dlq:payload_index``       zset    dead-letter id -> time added, for the ids in
                                       ``dlq:payload`` (eviction order)
``{p}dlq:bytes``               string  bytes held by ``dlq:record`` + ``dlq:payload``
``{p}rate:<profile>``          hash    token bucket of the profile's ``rate``: ``tokens``
                                       left at ``ts`` (Redis time); expires once it would
                                       be full again
``{p}leases:<profile>``        zset    holder -> lease expiry (Redis time): the SMTP
                                       sessions open now (``max_connections``)
``{p}throttle:<profile>``      hash    fleet-wide back-off after a throttling reply:
                                       ``until`` (Redis time), ``backoff`` (its length)
``{p}breaker:<profile>``       hash    circuit breaker: ``state``, ``failures``,
                                       ``recent`` (failure times in the window),
                                       ``opened_at``, ``retry_at``
=============================  ======  =================================================

The four ``<profile>`` keys are described in full in :mod:`mailworker.store.limits`; each
is one key per profile (one hash slot), and every change to one is one Lua script.

The dead-letter store is pruned oldest first to ``MAILWORKER_DLQ_MAX`` records,
``MAILWORKER_DLQ_TTL`` seconds (as dramatiq's dead-letter sorted set + hash) and
``MAILWORKER_DLQ_MAX_BYTES`` bytes (see :mod:`mailworker.store.deadletter`).
"""

from __future__ import annotations

#: Prefix of every key; one Redis database can serve several deployments.
PREFIX = "mailworker:"


def sent(message_key: str, prefix: str = PREFIX) -> str:
    """Idempotency record of an accepted message."""
    return f"{prefix}sent:{message_key}"


def lock(message_key: str, prefix: str = PREFIX) -> str:
    """Per-message lock held while a delivery runs."""
    return f"{prefix}lock:{message_key}"


def runs(task_id: str, prefix: str = PREFIX) -> str:
    """Start counter of one task message (poison guard)."""
    return f"{prefix}runs:{task_id}"


def retry_due(prefix: str = PREFIX) -> str:
    """Sorted set of scheduled retries by due time."""
    return f"{prefix}retry:due"


def retry_task(prefix: str = PREFIX) -> str:
    """Hash of scheduled retries' task name and arguments."""
    return f"{prefix}retry:task"


def dlq_index(prefix: str = PREFIX) -> str:
    """Sorted set of dead-letter ids by time added."""
    return f"{prefix}dlq:index"


def dlq_record(prefix: str = PREFIX) -> str:
    """Hash of dead-letter records without their payloads (JSON)."""
    return f"{prefix}dlq:record"


def dlq_payload(prefix: str = PREFIX) -> str:
    """Hash of dead-letter payloads (JSON task kwargs)."""
    return f"{prefix}dlq:payload"


def dlq_payload_index(prefix: str = PREFIX) -> str:
    """Sorted set of the dead-letter ids whose payload is kept, by time added."""
    return f"{prefix}dlq:payload_index"


def dlq_bytes(prefix: str = PREFIX) -> str:
    """Bytes the dead-letter records and payloads take, kept up to date by the store."""
    return f"{prefix}dlq:bytes"


def rate(profile: str, prefix: str = PREFIX) -> str:
    """Token bucket of a profile's fleet-wide message rate."""
    return f"{prefix}rate:{profile}"


def leases(profile: str, prefix: str = PREFIX) -> str:
    """Sorted set of a profile's connection leases by expiry."""
    return f"{prefix}leases:{profile}"


def throttle(profile: str, prefix: str = PREFIX) -> str:
    """A profile's fleet-wide back-off after a throttling reply."""
    return f"{prefix}throttle:{profile}"


def breaker(profile: str, prefix: str = PREFIX) -> str:
    """A profile's circuit breaker."""
    return f"{prefix}breaker:{profile}"
