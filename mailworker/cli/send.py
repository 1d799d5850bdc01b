"""``mailworker send``: one message, now through a session or later through the worker."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from mailworker.cli.check import (
    echo_field,
    echo_transcript,
    load_profile,
    merged,
    one_line,
    quiet_logs,
)
from mailworker.errors import (
    ConfigError,
    InvalidMessageError,
    PublishError,
    SMTPError,
    SMTPRecipientsRefused,
)
from mailworker.message import MailPayload, build_message, message_bytes
from mailworker.queue.names import SEND_MAIL
from mailworker.smtp import SendResult, SMTPSession
from mailworker.worker.settings import Settings

#: Stands in for the worker's MAILWORKER_DEFAULT_FROM when validating a queued message.
_WORKERS_SENDER = "sender@worker.invalid"
#: The option a payload field comes from, to name it in a usage error.
_OPTION = {
    "to": "--to",
    "subject": "--subject",
    "text": "--text",
    "html": "--html",
    "from_email": "--from",
    "MAILWORKER_DEFAULT_FROM": "--from",
    "attachments": "--attach",
    "profile": "--profile",
    "list_unsubscribe": "--list-unsubscribe",
    "list_unsubscribe_post": "--list-unsubscribe-post",
}


def task_kwargs(
    *,
    to: Sequence[str],
    subject: str,
    text: str | None,
    html: str | None,
    from_email: str | None,
    attach: Sequence[Path],
    profile: str,
    list_unsubscribe: Sequence[str] = (),
    list_unsubscribe_post: bool = False,
) -> dict[str, Any]:
    """``send_mail`` keyword arguments (JSON values; attachments in base64)."""
    kwargs: dict[str, Any] = {"to": list(to), "subject": subject, "profile": profile}
    if list_unsubscribe:
        kwargs["list_unsubscribe"] = list(list_unsubscribe)
    if list_unsubscribe_post:
        kwargs["list_unsubscribe_post"] = True
    for name, value in (("text", text), ("html", html), ("from_email", from_email)):
        if value is not None:
            kwargs[name] = value
    if attach:
        kwargs["attachments"] = [
            {"filename": path.name, "content": base64.b64encode(path.read_bytes()).decode()}
            for path in attach
        ]
    return kwargs


def validate(kwargs: dict[str, Any], default_from: str | None) -> MailPayload:
    """The payload the worker would build, or a usage error naming the option."""
    try:
        return MailPayload.from_task_kwargs(kwargs, default_from=default_from)
    except InvalidMessageError as exc:
        root = exc.field.split("[")[0].split(".")[0]
        option = _OPTION.get(root, exc.field)
        raise click.UsageError(f"{option}: {exc}") from None


def echo_result(result: SendResult) -> None:
    """Print the server's verdict per recipient and its final reply."""
    echo_field("Accepted", ", ".join(result.accepted) or "nobody")
    for address, outcome in result.refused.items():
        echo_field("Refused", f"{address}: {outcome.status}, {outcome.code} {outcome.reply}")
    echo_field("Reply", str(result.reply))


def send_now(payload: MailPayload, profile_name: str) -> None:
    """Build the message and send it through one SMTP session; print what happened."""
    profile = load_profile(profile_name)
    message = build_message(payload)
    data = message_bytes(message)
    click.echo(f"Sending {message['Message-ID']} ({len(data)} bytes) via {profile.redacted_url()}")
    session = SMTPSession(profile)
    with quiet_logs([profile.password or ""]):
        try:
            result = session.send(payload.envelope_from, list(payload.recipients), data)
        except SMTPError as exc:
            session.close()
            if isinstance(exc, SMTPRecipientsRefused):
                for address, (code, _, reply) in exc.refused.items():
                    echo_field("Refused", f"{address}: {code} {one_line(reply)}")
            click.echo("Transcript:")
            echo_transcript(exc.transcript or session.transcript.as_strings())
            raise click.ClickException(f"not sent: {one_line(str(exc))}") from None
        session.close()
    echo_result(result)
    click.echo("Transcript:")
    # The session's lines (connect ... QUIT) around the message's, in time order.
    echo_transcript(merged(session.transcript.lines, result.transcript))


@click.command(short_help="Send one message now, or enqueue it with --queue.")
@click.option(
    "--to", "to", multiple=True, required=True, metavar="ADDR", help="Recipient (repeatable)."
)
@click.option("--subject", required=True, metavar="TEXT", help="The subject line.")
@click.option("--text", metavar="TEXT", help="Plain-text body.")
@click.option("--html", metavar="HTML", help="HTML body (with --text: both, as alternatives).")
@click.option(
    "--from",
    "from_email",
    metavar="ADDR",
    help="Sender. Default: MAILWORKER_DEFAULT_FROM.",
)
@click.option(
    "--attach",
    multiple=True,
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    help="Attach a file (repeatable).",
)
@click.option(
    "--list-unsubscribe",
    multiple=True,
    metavar="URI",
    help="An https: or mailto: URI for List-Unsubscribe (repeatable).",
)
@click.option(
    "--list-unsubscribe-post",
    is_flag=True,
    help="Add List-Unsubscribe-Post for one-click unsubscribe (needs an https: URI).",
)
@click.option(
    "--profile",
    default="default",
    show_default=True,
    metavar="NAME",
    help="SMTP profile: MAILWORKER_SMTP_URL, or MAILWORKER_SMTP_URL_<NAME>.",
)
@click.option(
    "--queue",
    is_flag=True,
    help="Enqueue a send_mail task for the worker instead of sending now.",
)
def send(
    *,
    to: tuple[str, ...],
    subject: str,
    text: str | None,
    html: str | None,
    from_email: str | None,
    attach: tuple[Path, ...],
    list_unsubscribe: tuple[str, ...],
    list_unsubscribe_post: bool,
    profile: str,
    queue: bool,
) -> None:
    """Send one message now, or enqueue it for the worker with --queue.

    The message is built exactly as the send_mail task builds it. Without --queue it
    goes out at once through one SMTP session of the profile, and the server's verdict
    per recipient, its reply and the transcript (AUTH redacted) are printed; exit 1 if
    it was not accepted. With --queue a send_mail task is published to
    MAILWORKER_BROKER_URL and its task id printed: the worker delivers it with retries
    and dead-lettering, with its own SMTP profiles and default sender.

    \b
    Examples:
      mailworker send --to ann@example.org --subject Hi --text "Hello Ann"
      mailworker send --to ann@example.org --subject Invoice --html "<p>Attached</p>" \\
          --attach invoice.pdf --queue
    """
    if text is None and html is None:
        raise click.UsageError("--text or --html: give a body (or both)")
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    kwargs = task_kwargs(
        to=to,
        subject=subject,
        text=text,
        html=html,
        from_email=from_email,
        attach=attach,
        profile=profile,
        list_unsubscribe=list_unsubscribe,
        list_unsubscribe_post=list_unsubscribe_post,
    )
    if not queue:
        send_now(validate(kwargs, settings.default_from), profile)
        return
    # The worker holds the SMTP profiles and may have its own MAILWORKER_DEFAULT_FROM:
    # check everything else now, the sender only if there is one to check.
    validate(kwargs, settings.default_from or _WORKERS_SENDER)
    from mailworker.queue.producer import Producer, producer_app  # noqa: PLC0415 -- Celery

    try:
        result = Producer(producer_app(settings.broker_url)).publish(SEND_MAIL, kwargs)
    except PublishError as exc:
        raise click.ClickException(one_line(str(exc))) from None
    click.echo(result.id)
