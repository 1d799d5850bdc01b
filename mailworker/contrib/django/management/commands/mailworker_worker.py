"""``python manage.py mailworker_worker [celery worker options]``: the worker, from settings.

Builds the worker's environment from ``settings.MAILWORKER`` (or the ``EMAIL_*`` settings)
with :func:`~mailworker.contrib.django.worker_environ` and replaces this process with
``mailworker worker`` (so signals from a process manager reach the worker directly). The
worker itself does not load Django. Options Django does not know go to Celery, e.g.
``python manage.py mailworker_worker --concurrency 4 --loglevel INFO``.
``--print-env`` prints the environment instead (it holds the SMTP passwords).
"""

from __future__ import annotations

import importlib
import os
import shlex
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from mailworker.contrib.django.conf import queue_name, worker_environ
from mailworker.errors import ConfigError

if TYPE_CHECKING:  # Django has no type information; its classes are opaque to mypy.
    _BaseCommand = object
else:
    _BaseCommand = importlib.import_module("django.core.management.base").BaseCommand

__all__ = ["Command", "worker_command", "worker_process_env"]

#: Runs ``mailworker worker`` with the arguments that follow.
_RUN_WORKER = (
    "import sys; from mailworker.cli import main; "
    "main(['worker', *sys.argv[1:]], prog_name='mailworker')"
)


def worker_command(celery_args: list[str], queue: str | None) -> list[str]:
    """The command line of the worker: this Python, ``mailworker worker``, the options."""
    args = list(celery_args)
    if queue and not any(a in ("-Q", "--queues") or a.startswith("--queues=") for a in args):
        args += ["--queues", queue]
    return [sys.executable, "-c", _RUN_WORKER, *args]


def worker_process_env(
    environ: Mapping[str, str], settings_env: Mapping[str, str]
) -> dict[str, str]:
    """The worker's whole environment: this process's, overridden by the settings' variables.

    Variables the settings don't give (``MAILWORKER_SMTP_PASSWORD_<NAME>``, ``..._FILE``,
    OAuth tokens) pass through. ``DJANGO_SETTINGS_MODULE`` does not: the worker needs no
    Django, and with it Celery would install its Django fix-up.
    """
    env = {k: v for k, v in environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    env.update(settings_env)
    return env


class Command(_BaseCommand):
    """Start ``mailworker worker`` configured from this project's settings."""

    help = (
        "Start mailworker's worker with the SMTP profiles and broker of settings.MAILWORKER "
        "(or EMAIL_*). Other options go to `celery worker`, e.g. --concurrency 4."
    )

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> Any:
        """Django's parser, but the options it does not know are kept, in order, for Celery."""
        # allow_abbrev=False: a Celery option must never be read as an abbreviated Django one.
        parser = cast(Any, super()).create_parser(
            prog_name, subcommand, allow_abbrev=False, **kwargs
        )
        parse_known_args = parser.parse_known_args

        def parse_args(args: Any = None, namespace: Any = None) -> Any:
            options, extra = parse_known_args(args, namespace)
            options.celery_args = [a for a in extra if a != "--"]
            return options

        parser.parse_args = parse_args
        return parser

    def add_arguments(self, parser: Any) -> None:
        """``--print-env``; everything else is for ``celery worker``."""
        parser.add_argument(
            "--print-env",
            action="store_true",
            help="print the worker's MAILWORKER_* environment (with passwords) and exit",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        """Print the environment, or become the worker."""
        try:
            env = worker_environ()
        except ConfigError as exc:
            raise importlib.import_module("django.core.management").CommandError(str(exc)) from None
        if options["print_env"]:
            for name, value in sorted(env.items()):
                cast(Any, self).stdout.write(f"{name}={shlex.quote(value)}")
            return
        command = worker_command(list(options["celery_args"]), queue_name())
        full_env = worker_process_env(os.environ, env)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(command[0], command, full_env)  # noqa: S606 -- our own interpreter, no shell
