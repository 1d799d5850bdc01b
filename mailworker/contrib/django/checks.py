"""Django system checks for ``settings.MAILWORKER`` and the ``EMAIL_*`` fallback.

Registered by :class:`~mailworker.contrib.django.apps.MailworkerConfig` under the tag
``mailworker``; ``manage.py check --tag mailworker`` runs only these.
"""

from __future__ import annotations

import importlib
from typing import Any

from mailworker.contrib.django import conf

__all__ = ["TAG", "check_settings"]

#: The tag the checks are registered with.
TAG = "mailworker"


def check_settings(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """One Django ``Error`` or ``Warning`` per missing or malformed setting."""
    checks = importlib.import_module("django.core.checks")
    messages = []
    for problem in conf.problems():
        kind = checks.Error if problem.is_error else checks.Warning
        messages.append(
            kind(f"{problem.setting}: {problem.message}", hint=problem.hint, id=problem.id)
        )
    return messages
