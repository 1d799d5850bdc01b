"""Settings of the example project: only what sending mail needs.

The values come from the environment so the same project runs against
`mailworker devserver` on your machine and in the test suite.
"""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = True
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
INSTALLED_APPS = [
    "mailworker.contrib.django",  # system checks and `manage.py mailworker_worker`
]
MIDDLEWARE: list[str] = []
ROOT_URLCONF = "django_project.urls"
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

# -- mail ----------------------------------------------------------------------------
# Every django.core.mail call is queued for mailworker's worker.
EMAIL_BACKEND = "mailworker.contrib.django.EmailBackend"
# Django's usual SMTP settings: with no MAILWORKER["PROFILES"], the worker's default
# profile is built from them (here smtp://127.0.0.1:1025, `mailworker devserver`).
EMAIL_HOST = os.environ.get("EMAIL_HOST", "127.0.0.1")
EMAIL_PORT = int(os.environ.get("EMAIL_PORT", "1025"))
DEFAULT_FROM_EMAIL = "Example Shop <shop@example.com>"

# -- Celery ----------------------------------------------------------------------------
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0")

MAILWORKER = {
    # Publish through the project's Celery app (and its broker, CELERY_BROKER_URL).
    "CELERY_APP": "django_project.celery:app",
}
