"""The ``mailworker`` command line."""

from __future__ import annotations

import click

from mailworker.cli.dlq import dlq
from mailworker.cli.worker import worker


@click.group()
def main() -> None:
    """mailworker: transactional email from Celery workers over held-open SMTP sessions."""


main.add_command(dlq)
main.add_command(worker)
