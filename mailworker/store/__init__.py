"""Everything mailworker keeps in Redis: the key layout (:mod:`~mailworker.store.keys`),
the idempotency ledger and message locks, the retry schedule and the dead-letter store.

Knows redis-py and nothing of Celery or the worker above it.
"""
