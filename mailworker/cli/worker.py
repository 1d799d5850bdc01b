"""``mailworker worker``: a Celery worker running mailworker's tasks."""

from __future__ import annotations

import base64

import click

from mailworker.errors import ConfigError
from mailworker.smtp.oauth import provider_secrets
from mailworker.smtp.profile import Profile, profile_names
from mailworker.worker.logs import configure_logging
from mailworker.worker.prepare import dkim_signer
from mailworker.worker.settings import Settings


def profile_secrets(profiles: list[Profile]) -> list[str]:
    """Every secret the profiles hold, as text and in the base64 forms AUTH sends
    (PLAIN, LOGIN, XOAUTH2), for the log redactor.

    Token providers are not asked for a token (a refresh-token provider would fetch one
    from the network): they give what they hold now, e.g. client secret and refresh token.
    """
    secrets: list[str] = []
    for profile in profiles:
        user = (profile.username or "").encode()
        if profile.password:
            password = profile.password.encode()
            secrets.append(profile.password)
            secrets.append(base64.b64encode(password).decode())
            secrets.append(base64.b64encode(b"\0" + user + b"\0" + password).decode())
        if profile.oauth_token_provider is not None:
            for secret in provider_secrets(profile.oauth_token_provider):
                xoauth2 = b"user=" + user + b"\x01auth=Bearer " + secret.encode() + b"\x01\x01"
                secrets.append(secret)
                secrets.append(base64.b64encode(xoauth2).decode())
    return secrets


def load_profiles() -> list[Profile]:
    """Every configured profile, DKIM keys read and checked; raises a usage error naming
    the variable to set (or the DKIM key file that cannot be used)."""
    names = profile_names()
    if not names:
        raise click.UsageError(
            "no SMTP profile configured: set MAILWORKER_SMTP_URL "
            "(e.g. smtps://user:password@smtp.example.com)"
        )
    try:
        profiles = [Profile.from_env(name) for name in names]
        for profile in profiles:
            dkim_signer(profile)  # a key that cannot sign stops the worker, not a message
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    return profiles


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
