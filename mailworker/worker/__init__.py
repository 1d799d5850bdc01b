"""The worker: settings, retry policy, session pool, message preparation, delivery, the
retry mover, the Celery app and its tasks, log set-up.

Imports nothing at package level, so ``mailworker.worker.settings`` is cheap to read for a
process that only checks configuration.
"""
