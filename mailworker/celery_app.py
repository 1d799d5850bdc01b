"""Configure a Celery app for mailworker's tasks (defined in :mod:`mailworker.worker.app`).

Example::

    from celery import Celery
    from mailworker.celery_app import configure

    app = Celery("proj", include=["mailworker.tasks"])
    configure(app)
"""

from mailworker.worker.app import configure, create_app

__all__ = ["configure", "create_app"]
