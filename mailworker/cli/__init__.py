"""The ``mailworker`` command line."""

from __future__ import annotations

import click

from mailworker.cli.check import check
from mailworker.cli.dev import demo, devserver
from mailworker.cli.dlq import dlq
from mailworker.cli.health import health
from mailworker.cli.send import send
from mailworker.cli.status import status
from mailworker.cli.worker import worker


@click.group()
def main() -> None:
    """mailworker: transactional email from Celery workers over held-open SMTP sessions."""


main.add_command(dlq)
main.add_command(worker)
main.add_command(check)
main.add_command(send)
main.add_command(devserver)
main.add_command(demo)
main.add_command(health)
main.add_command(status)
