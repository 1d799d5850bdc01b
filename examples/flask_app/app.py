"""A minimal Flask app that sends mail through mailworker from a route and a CLI command.

flask --app app run                      # POST /contact sends a message
flask --app app send-test ann@example.org   # sends one and waits for the outcome
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

import click
from flask import Flask, jsonify, request
from markupsafe import escape

from mailworker.contrib.flask import MailWorker
from mailworker.errors import DeadLetteredError, InvalidMessageError

#: Created once, bound to each app by the factory.
mail = MailWorker()


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """The app factory."""
    app = Flask(__name__)
    app.config.from_mapping(
        MAILWORKER_BROKER_URL=os.environ.get("MAILWORKER_BROKER_URL", "redis://localhost:6379/0"),
        MAILWORKER_DEFAULT_FROM="Example App <app@example.com>",
        SUPPORT_ADDRESS="support@example.com",
    )
    app.config.update(config or {})
    mail.init_app(app)

    @app.post("/contact")
    def contact() -> Any:
        """Forward a contact form to support, with the sender as Reply-To.

        A missing field is Flask's 400 Bad Request (``request.form[...]``); a message
        mailworker refuses (e.g. ``email=bad``) is a 400 too, with the error's message,
        which names the field: ``reply_to: 'bad' is not a valid email address (...)``.
        """
        sender = request.form["email"]
        message = request.form["message"]
        try:
            result = mail.send(
                to=app.config["SUPPORT_ADDRESS"],
                subject=f"Contact form: {sender}",
                text=message,
                html=f"<p>{escape(message)}</p>",
                reply_to=sender,
                attachments=[("message.txt", message.encode("utf-8"), "text/plain")],
            )
        except InvalidMessageError as exc:
            return jsonify(error=str(exc), field=exc.field), 400
        return jsonify(task_id=result.id), 202

    @app.cli.command("send-test")
    @click.argument("to")
    def send_test(to: str) -> None:
        """Send a test message to TO, wait for the worker and print the outcome.

        Exits 1 unless the message was sent: deferred (the worker tries again later,
        see the retry time) or dead-lettered (`mailworker dlq list` shows why).
        """
        try:
            result = mail.send(to=to, subject="mailworker test", text="It works.")
        except InvalidMessageError as exc:
            raise click.BadParameter(str(exc), param_hint="TO") from None
        try:
            outcome = result.get(timeout=30)
        except DeadLetteredError as exc:
            raise click.ClickException(f"not sent: {exc}") from None
        click.echo(describe(outcome))
        if outcome.get("status") != "sent":
            raise click.exceptions.Exit(1)

    return app


def describe(outcome: Mapping[str, Any]) -> str:
    """One line for a task result of any status, from the keys it has, e.g.
    ``sent: <id@example.com> 250 2.0.0 OK`` or
    ``deferred: <id@example.com> 451 4.2.0 ... (retry at 12:00:05)``."""
    error = outcome.get("error") or {}
    parts = [
        f"{outcome.get('status')}:",
        outcome.get("message_id"),
        outcome.get("reply") or error.get("message") or outcome.get("reason"),
    ]
    if outcome.get("retry_at"):
        retry_at = time.strftime("%H:%M:%S", time.localtime(outcome["retry_at"]))
        parts.append(f"(retry at {retry_at})")
    return " ".join(str(part) for part in parts if part)


app = create_app()
