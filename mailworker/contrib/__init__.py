"""Integrations with web frameworks.

- :mod:`mailworker.contrib.django`: ``EMAIL_BACKEND = "mailworker.contrib.django.EmailBackend"``
  (``pip install "mailworker[django]"``);
- :mod:`mailworker.contrib.flask`: the ``MailWorker`` extension
  (``pip install "mailworker[flask]"``).

Both only *publish* tasks; ``mailworker worker`` delivers them with the SMTP profiles of its
own environment.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from mailworker.errors import MailworkerError, PublishError

__all__ = ["MissingExtraError", "PublishError", "import_extra"]


class MissingExtraError(MailworkerError, ImportError):
    """An integration was imported without its framework; the message says what to install."""


def import_extra(module: str, extra: str) -> ModuleType:
    """Import ``module`` for the integration ``extra``.

    Raises:
        MissingExtraError: ``module`` is not installed; the message gives the exact
            ``pip install "mailworker[<extra>]"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"mailworker.contrib.{extra} needs {module!r}, which is not installed: "
            f'pip install "mailworker[{extra}]"'
        ) from exc
