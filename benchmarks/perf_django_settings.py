"""Django settings for benchmarks/perf.py's django-celery-email rows.

django-celery-email 3.x unmodified: its Celery backend publishes chunks of
``CELERY_EMAIL_CHUNK_SIZE`` messages (``PERF_DCE_CHUNK_SIZE``), and its task sends
them with Django's SMTP backend (STARTTLS + AUTH) to perf.py's sink
(``PERF_SMTP_PORT``; its CA is trusted through ``SSL_CERT_FILE``).
"""

import os

SECRET_KEY = "perf-benchmark-not-a-secret"  # noqa: S105 -- a throwaway benchmark setting
INSTALLED_APPS = ["djcelery_email"]
USE_TZ = True

EMAIL_BACKEND = "djcelery_email.backends.CeleryEmailBackend"
CELERY_EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
CELERY_EMAIL_CHUNK_SIZE = int(os.environ.get("PERF_DCE_CHUNK_SIZE", "10"))

EMAIL_HOST = "127.0.0.1"
EMAIL_PORT = int(os.environ.get("PERF_SMTP_PORT", "25"))
EMAIL_HOST_USER = "bench"
EMAIL_HOST_PASSWORD = "bench-password"  # noqa: S105 -- the sink takes any password
EMAIL_USE_TLS = True
EMAIL_TIMEOUT = 60
