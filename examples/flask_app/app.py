"""A minimal Flask app that sends mail through mailworker from a route and a CLI command.

flask --app app run                      # POST /contact sends a message
flask --app app send-test ann@example.org   # sends one and waits for the outcome
"""

from __future__ import annotations

import os
from typing import Any

import click
from flask import Flask, jsonify, request

from mailworker.contrib.flask import MailWorker

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
        """Forward a contact form to support, with the sender as Reply-To."""
        sender = request.form["email"]
        message = request.form["message"]
        result = mail.send(
            to=app.config["SUPPORT_ADDRESS"],
            subject=f"Contact form: {sender}",
            text=message,
            html=f"<p>{message}</p>",
            reply_to=sender,
            attachments=[("message.txt", message.encode("utf-8"), "text/plain")],
        )
        return jsonify(task_id=result.id), 202

    @app.cli.command("send-test")
    @click.argument("to")
    def send_test(to: str) -> None:
        """Send a test message to TO and wait until the worker has sent it."""
        outcome = mail.send(to=to, subject="mailworker test", text="It works.").get(timeout=30)
        click.echo(f"{outcome['status']}: {outcome['message_id']} {outcome['reply']}")

    return app


app = create_app()
