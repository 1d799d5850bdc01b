"""The Celery tasks ``send_mail`` and ``send_message`` (defined in
:mod:`mailworker.worker.tasks`).

Include ``"mailworker.tasks"`` in a Celery app to run them there; import ``send_mail``
from here (or from :mod:`mailworker`) to publish one.
"""

from mailworker.worker.tasks import send_mail, send_message

__all__ = ["send_mail", "send_message"]
