"""``mailworker check``: connect with a profile and say whether it can send, and why not."""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import ssl
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import click
import structlog

from mailworker.errors import ConfigError, SMTPError
from mailworker.smtp import SessionInfo, SMTPSession
from mailworker.smtp.profile import Profile
from mailworker.smtp.transcript import TranscriptLine
from mailworker.worker.logs import Redactor
from mailworker.worker.prepare import dkim_signer

#: Width of the label column.
_LABEL = 14


def load_profile(name: str) -> Profile:
    """Profile ``name`` from the environment; a usage error naming the variable if not."""
    try:
        return Profile.from_env(name)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def describe_dkim(profile: Profile) -> None:
    """Print the profile's DKIM key and the TXT record to publish for it; a key that
    cannot sign is a usage error naming ``dkim_key_file`` and the file."""
    try:
        signer = dkim_signer(profile)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if signer is None:
        return
    echo_field(
        "DKIM",
        f"{signer.algorithm}, {signer.bits}-bit key {signer.key_file}: a test signature "
        f"verified\nsigns as d={signer.domain}, s={signer.selector}",
    )
    echo_field("DKIM record", f"{signer.record_name} TXT\n{signer.dns_record}")


def one_line(text: str) -> str:
    """``text`` with line breaks folded, for a one-line reason."""
    return " ".join(text.split())


@contextlib.contextmanager
def quiet_logs(secrets: Iterable[str] = ()) -> Iterator[None]:
    """While a command talks SMTP: library events below WARNING dropped, warnings to
    stderr with secrets redacted. The previous structlog configuration is restored."""
    configured = structlog.is_configured()
    previous = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            Redactor(secrets),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        if configured:
            structlog.configure(**previous)
        else:
            structlog.reset_defaults()


def _default_sender() -> str:
    """The bare address of MAILWORKER_DEFAULT_FROM, or the null sender."""
    return email.utils.parseaddr(os.environ.get("MAILWORKER_DEFAULT_FROM", ""))[1]


def echo_field(label: str, value: str) -> None:
    """Print ``label`` and ``value`` in two columns (continuation lines indented)."""
    lines = value.split("\n") or [""]
    click.echo(f"{label + ':':<{_LABEL}} {lines[0]}".rstrip())
    for line in lines[1:]:
        click.echo(f"{'':<{_LABEL}} {line}".rstrip())


def echo_transcript(lines: Sequence[TranscriptLine | str], indent: str = "  ") -> None:
    """Print transcript lines (``C: ...`` / ``S: ...``); AUTH is redacted already."""
    for line in lines:
        click.echo(f"{indent}{line}")


def merged(*transcripts: Sequence[TranscriptLine]) -> list[TranscriptLine]:
    """Several transcripts of one connection, as one, in time order."""
    return sorted((line for t in transcripts for line in t), key=lambda line: line.at)


def describe_tls(tls: dict[str, Any], profile: Profile) -> None:
    """Print TLS version, cipher and the certificate's subject, issuer and expiry."""
    if not tls:
        echo_field("TLS", "none: clear text (smtp://)")
        return
    echo_field("TLS", f"{tls.get('tls_version')}, {tls.get('cipher')}")
    if not profile.verify:
        echo_field("Certificate", "NOT verified (verify=false): anyone could be listening")
        return
    expiry = str(tls.get("cert_not_after") or "unknown")
    with contextlib.suppress(ValueError):
        days = (ssl.cert_time_to_seconds(expiry) - time.time()) / 86400
        expiry += f" (in {days:.0f} days)" if days >= 0 else " (EXPIRED)"
    where = f"verified for {profile.host}" + (
        f" against {profile.ca_file}" if profile.ca_file else " against the system CAs"
    )
    echo_field(
        "Certificate",
        f"{where}\nsubject: {tls.get('cert_subject') or 'none'}\n"
        f"issuer:  {tls.get('cert_issuer') or 'none'}\n"
        f"expires: {expiry}",
    )


def describe_session(info: SessionInfo, profile: Profile) -> None:
    """Print what the session learnt while connecting."""
    echo_field("Greeting", " / ".join(info.greeting.splitlines()))
    describe_tls(info.tls, profile)
    echo_field("Capabilities", ", ".join(info.capabilities) or "none (HELO server)")
    offered = next((c for c in info.capabilities if c.upper().startswith("AUTH")), None)
    if info.auth_mechanism:
        echo_field("AUTH", f"{info.auth_mechanism} as {profile.username}: succeeded")
    elif offered:
        echo_field("AUTH", "offered, not used: the profile has no credentials")
    else:
        echo_field("AUTH", "not used")


@click.command()
@click.option(
    "--profile",
    "profile_name",
    default="default",
    show_default=True,
    metavar="NAME",
    help="The SMTP profile: MAILWORKER_SMTP_URL, or MAILWORKER_SMTP_URL_<NAME>.",
)
@click.option("--transcript", is_flag=True, help="Also show the SMTP session (AUTH redacted).")
def check(profile_name: str, transcript: bool) -> None:
    """Connect with an SMTP profile and tell whether it can send.

    Opens a session as the worker would (TLS as the URL's scheme says, the certificate
    verified, EHLO, AUTH), prints the greeting, TLS version and cipher, the server
    certificate's subject, issuer and expiry, the EHLO capabilities and the AUTH
    mechanism used, asks the server whether it takes mail from MAILWORKER_DEFAULT_FROM
    (MAIL FROM, then RSET), then says QUIT. No message is sent. With a DKIM key
    (dkim_key_file) it first checks the key and prints the TXT record to publish.

    Exits 0 if the profile can send; otherwise 1, with a one-line reason (untrusted
    certificate, STARTTLS not offered, AUTH refused, server unreachable, ...). The
    password is never printed.

    \b
    Examples:
      mailworker check
      mailworker check --profile bulk --transcript
    """
    profile = load_profile(profile_name)
    click.echo(f"Profile {profile.name!r}: {profile.redacted_url()}")
    describe_dkim(profile)
    session = SMTPSession(profile)
    with quiet_logs([profile.password or ""]):
        try:
            session.connect()
            # Connecting is not sending: a server may still want AUTH (530) or refuse
            # the sender; ask it, without sending a message.
            session.probe(_default_sender())
        except SMTPError as exc:
            if transcript and exc.transcript:
                click.echo("Transcript:")
                echo_transcript(exc.transcript)
            raise click.ClickException(
                f"profile {profile.name!r} cannot send: {one_line(str(exc))}"
            ) from None
        info = session.info
        session.close()
    assert info is not None
    describe_session(info, profile)
    if transcript:
        click.echo("Transcript:")
        echo_transcript(session.transcript.lines)
    click.echo(f"OK: profile {profile.name!r} can send.")
