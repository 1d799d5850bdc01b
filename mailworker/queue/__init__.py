"""The task queue, seen from both sides: task names, where a message goes, publishing.

What a publisher (a web process, the CLI, the retry mover) and the worker agree on lives
here, so a process that only publishes imports none of the worker's machinery:

- :mod:`mailworker.queue.names`: task names, the default broker URL, routing by origin
  (no Celery import);
- :mod:`mailworker.queue.producer`: the one way mailworker publishes a task (Celery).
"""

from mailworker.queue.names import DEFAULT_BROKER_URL, SEND_MAIL, SEND_MESSAGE, route_options

__all__ = ["DEFAULT_BROKER_URL", "SEND_MAIL", "SEND_MESSAGE", "route_options"]
