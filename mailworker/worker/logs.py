"""structlog set-up for the worker and the CLI (library code never configures).

JSON lines by default; console rendering when stderr is a TTY or
``MAILWORKER_LOG_FORMAT=console``. A last-line redaction processor replaces any
configured secret that would still reach a log line.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

from mailworker.smtp.transcript import REDACTED


class Redactor:
    """Replaces every occurrence of the given secrets in an event's strings."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Short strings would redact half the log; nobody's password is "a".
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(
        self, _logger: Any, _name: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if self._secrets:
            for key, value in event.items():
                event[key] = self._scrub(value)
        return event

    def _scrub(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, list | tuple):
            return type(value)(self._scrub(v) for v in value)
        if isinstance(value, dict):
            return {k: self._scrub(v) for k, v in value.items()}
        return value


def configure_logging(fmt: str | None = None, secrets: Iterable[str] = ()) -> None:
    """Configure structlog (and stdlib logging) for a worker or CLI process."""
    console = fmt == "console" or (fmt is None and sys.stderr.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            Redactor(secrets),
            renderer,
        ],
        # One write() per line: worker processes share stderr, and PrintLogger's
        # two writes (text, newline) interleave into broken JSON lines.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    # Celery's own stdlib records go through the same redactor and renderer.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                Redactor(secrets),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
