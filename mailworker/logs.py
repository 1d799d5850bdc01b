"""structlog set-up for a worker or a command (defined in :mod:`mailworker.worker.logs`)."""

from mailworker.worker.logs import Redactor, configure_logging

__all__ = ["Redactor", "configure_logging"]
