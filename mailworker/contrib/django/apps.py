"""The Django app: add ``"mailworker.contrib.django"`` to ``INSTALLED_APPS``.

It registers the system checks and the ``mailworker_worker`` management command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # Django has no type information; its classes are opaque to mypy.
    _AppConfig = object
else:
    _AppConfig = importlib.import_module("django.apps").AppConfig

__all__ = ["MailworkerConfig"]


class MailworkerConfig(_AppConfig):
    """mailworker's Django app (label ``mailworker``)."""

    name = "mailworker.contrib.django"
    label = "mailworker"
    verbose_name = "mailworker"
    default = True

    def ready(self) -> None:
        """Register the settings checks (tag ``mailworker``)."""
        from mailworker.contrib.django.checks import TAG, check_settings  # noqa: PLC0415

        importlib.import_module("django.core.checks").register(check_settings, TAG)
