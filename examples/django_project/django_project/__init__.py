"""A minimal Django project that sends its mail through mailworker."""

# The usual Celery set-up: load the app whenever Django starts.
from .celery import app as celery_app

__all__ = ("celery_app",)
