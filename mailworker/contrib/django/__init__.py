"""Django integration (``pip install "mailworker[django]"``).

.. code-block:: python

    # settings.py
    INSTALLED_APPS = [..., "mailworker.contrib.django"]   # system checks, mailworker_worker
    EMAIL_BACKEND = "mailworker.contrib.django.EmailBackend"
    MAILWORKER = {
        "BROKER_URL": "redis://localhost:6379/0",      # or "CELERY_APP": "proj.celery:app"
        "PROFILES": {"default": "smtps://app%40example.com:secret@smtp.example.com"},
    }

Every ``django.core.mail`` call then queues a ``mailworker.send_message`` task; start the
worker with ``python manage.py mailworker_worker`` (or ``mailworker worker`` with the
environment :func:`worker_environ` returns). See :mod:`mailworker.contrib.django.conf` for
every setting and its fallbacks.
"""

from __future__ import annotations

from mailworker.contrib import import_extra

import_extra("django", "django")

from mailworker.contrib.django.backend import EmailBackend  # noqa: E402
from mailworker.contrib.django.conf import (  # noqa: E402
    Problem,
    broker_url,
    problems,
    profile_urls,
    worker_environ,
)

__all__ = [
    "EmailBackend",
    "Problem",
    "broker_url",
    "problems",
    "profile_urls",
    "worker_environ",
]
