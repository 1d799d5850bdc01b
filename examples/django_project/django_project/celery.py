"""The project's Celery app, the usual way: configured from the CELERY_* settings.

mailworker's EmailBackend publishes through it (settings.MAILWORKER["CELERY_APP"]), so
mail goes to the same broker as the project's other tasks. mailworker's own worker
(`python manage.py mailworker_worker`) delivers it.
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "django_project.settings")

app = Celery("django_project")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
