"""``mailworker worker``: a Celery worker running mailworker's tasks."""

from __future__ import annotations

import base64

import click

from mailworker.errors import ConfigError
from mailworker.smtp.profile import Profile, profile_names
from mailworker.worker.logs import configure_logging
from mailworker.worker.settings import Settings


def profile_secrets(profiles: list[Profile]) -> list[str]:
    """Every secret the profiles hold, as text and in the base64 forms AUTH sends
    (PLAIN, LOGIN), for the log redactor."""
    secrets: list[str] = []
    for profile in profiles:
        user = (profile.username or "").encode()
        if profile.password:
            password = profile.password.encode()
            secrets.append(profile.password)
            secrets.append(base64.b64encode(password).decode())
            secrets.append(base64.b64encode(b"\0" + user + b"\0" + password).decode())
        if profile.oauth_token_provider is not None:
            secrets.append(profile.oauth_token_provider())
    return secrets


def load_profiles() -> list[Profile]:
    """Every configured profile; raises a usage error naming the variable to set."""
    names = profile_names()
    if not names:
        raise click.UsageError(
            "no SMTP profile configured: set MAILWORKER_SMTP_URL "
            "(e.g. smtps://user:password@smtp.example.com)"
        )
    try:
        return [Profile.from_env(name) for name in names]
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


@click.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(celery_args: tuple[str, ...]) -> None:
    """Start a Celery worker with mailworker's tasks.

    Configuration comes from the environment: MAILWORKER_BROKER_URL (default
    redis://localhost:6379/0), MAILWORKER_SMTP_URL[_<NAME>], MAILWORKER_REDIS_URL.
    Any other argument goes to `celery worker`, e.g.
    `mailworker worker --concurrency 4 --loglevel INFO`; `--help` shows Celery's options.
    """
    if "--help" in celery_args or "-h" in celery_args:
        click.echo(click.get_current_context().get_help())
        click.echo("\nCelery's worker options follow.\n")
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    profiles = load_profiles()
    configure_logging(settings.log_format, secrets=profile_secrets(profiles))
    from mailworker.worker.app import create_app  # noqa: PLC0415 -- imports Celery

    create_app(settings).worker_main(["worker", *celery_args])
