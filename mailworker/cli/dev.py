"""``mailworker devserver`` and ``mailworker demo``: a local SMTP server, and the whole
pipeline on it. Both need the ``devserver`` extra, imported only when they run."""

from __future__ import annotations

import contextlib
import importlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from mailworker.dev.server import DevServer

#: What to install when aiosmtpd or trustme is missing.
INSTALL_HINT = 'pip install "mailworker[devserver]"'


def load(module: str) -> ModuleType:
    """Import ``module``; a missing ``devserver`` extra becomes a one-line error."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name not in ("aiosmtpd", "trustme") and INSTALL_HINT not in str(exc):
            raise
        raise click.ClickException(
            f"this command needs aiosmtpd and trustme: {INSTALL_HINT}"
        ) from None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt, so clean-up code runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_auth(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[str, str] | None:
    """``USER:PASSWORD`` as a pair."""
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise click.BadParameter("use USER:PASSWORD, both non-empty", ctx, param)
    return user, password


def _describe(server: DevServer) -> list[str]:
    mode = {"none": "clear text", "starttls": "STARTTLS", "implicit": "implicit TLS"}
    lines = [
        f"mailworker devserver listening on {server.host}:{server.port} "
        f"({mode[server.tls]}, {'AUTH required' if server.auth else 'no AUTH'})",
        f"  maildir   {server.maildir_path.absolute()} (one file per message in new/)",
    ]
    if server.ca_file is not None:
        lines.append(f"  CA        {server.ca_file} (clients: ?ca_file=...)")
    for label, patterns, reply in (
        ("reject", server.reject, "550 5.1.1"),
        ("defer", server.defer, "451 4.2.0"),
        ("defer once", server.defer_once, "451 4.2.0, first attempt"),
    ):
        if patterns:
            lines.append(f"  {label:<9} {', '.join(patterns)} ({reply})")
    lines.append(f"  use       MAILWORKER_SMTP_URL='{server.url(redact=True)}'")
    return lines


@click.command(short_help="Run a development SMTP server that writes to a maildir.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--port",
    default=1025,
    show_default=True,
    type=click.IntRange(0, 65535),
    help="Port to listen on (0: any free port).",
)
@click.option(
    "--maildir",
    default="devmail",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Maildir to write messages to (created if missing or empty).",
)
@click.option(
    "--tls",
    type=click.Choice(["none", "starttls", "implicit"]),
    default="none",
    show_default=True,
    help="Offer STARTTLS, or speak TLS from the first byte, with a certificate made now.",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the CA certificate clients must trust [default: <maildir>-ca.pem].",
)
@click.option(
    "--auth",
    metavar="USER:PASSWORD",
    callback=parse_auth,
    help="Require AUTH PLAIN/LOGIN with these credentials (after TLS unless --tls none).",
)
@click.option(
    "--reject", multiple=True, metavar="PATTERN", help="Refuse matching recipients with 550."
)
@click.option(
    "--defer", multiple=True, metavar="PATTERN", help="Refuse matching recipients with 451."
)
@click.option(
    "--defer-once",
    multiple=True,
    metavar="PATTERN",
    help="Refuse a matching recipient with 451 the first time only.",
)
@click.option(
    "--hostname", default="localhost", show_default=True, help="Name in greeting and certificate."
)
def devserver(
    *,
    host: str,
    port: int,
    maildir: Path,
    tls: str,
    ca_file: Path | None,
    auth: tuple[str, str] | None,
    reject: tuple[str, ...],
    defer: tuple[str, ...],
    defer_once: tuple[str, ...],
    hostname: str,
) -> None:
    """Run a development SMTP server that keeps every message in a maildir.

    Like MailHog or Mailpit, point an application at it instead of a real provider:
    each accepted message is written to MAILDIR/new (one file each, with Return-Path
    and Delivered-To in front) and printed as one line. MAILDIR may be new, empty or
    an existing Maildir (cur/, new/ and tmp/ are created as needed); any other
    directory is refused. With --tls it makes a CA and a certificate for HOSTNAME at
    start and writes the CA certificate next to the maildir, so clients can verify it
    (?ca_file=...). PATTERNs are shell-style wildcards matched against the recipient
    address, e.g. '*@bounce.example'.

    Runs until Ctrl-C or SIGTERM, then prints how many messages arrived over how many
    connections, TLS sessions and AUTHs.

    \b
    Examples:
      mailworker devserver --port 2525
      mailworker devserver --tls starttls --auth dev:secret --reject '*@bounce.example'
    """
    dev = load("mailworker.dev.server")
    try:
        server: DevServer = dev.DevServer(
            maildir,
            host=host,
            port=port,
            tls=tls,
            auth=auth,
            reject=reject,
            defer=defer,
            defer_once=defer_once,
            hostname=hostname,
            ca_file=ca_file,
            on_event=click.echo,
        )
    except ValueError as exc:  # only the maildir: click has checked the other options
        raise click.BadParameter(str(exc), param_hint="'--maildir'") from None
    except OSError as exc:
        raise click.BadParameter(
            f"cannot create the maildir {exc.filename or maildir}: {exc.strerror or exc}",
            param_hint="'--maildir'",
        ) from None
    try:
        server.start()
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None

    try:
        with sigterm_as_interrupt():
            for line in _describe(server):
                click.echo(line)
            click.echo("Press Ctrl-C to stop.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    c = server.counters
    click.echo(
        f"Stopped: {c.summary()}; {c.rejected} rejected, {c.deferred} deferred, "
        f"{c.auth_failures} failed AUTHs, {c.tls_failures} failed TLS handshakes, {c.quits} QUITs."
    )


@click.command()
@click.option(
    "--messages",
    default=20,
    show_default=True,
    type=click.IntRange(3, 1000),
    help="How many messages to enqueue.",
)
@click.option(
    "--timeout",
    default=45.0,
    show_default=True,
    type=click.FloatRange(1.0),
    help="Seconds to wait for the batch.",
)
@click.option("--keep", is_flag=True, help="Keep the maildir and the worker log afterwards.")
def demo(messages: int, timeout: float, keep: bool) -> None:
    """Run the whole pipeline on this machine, with no SMTP account.

    Starts a private redis-server, an SMTP server (mailworker devserver, STARTTLS and
    AUTH, its own certificate) and a worker with 2 processes; enqueues a batch with
    send_mail.delay() (one message with an attachment, one the server rejects with 550,
    one it greylists once with 451); then prints the messages read back from the
    server's maildir, the transcript of one, how many connections carried them, and
    the dead-lettered one from `mailworker dlq list`. Everything is stopped at the end.
    Exits 1 with the reason if anything did not work.

    Needs redis-server on PATH and the devserver extra.
    """
    module = load("mailworker.dev.demo")
    try:
        with sigterm_as_interrupt():
            module.run_demo(messages=messages, timeout=timeout, keep=keep, echo=click.echo)
    except KeyboardInterrupt:
        raise click.ClickException("demo interrupted; everything it started is stopped") from None
    except module.DemoError as exc:
        raise click.ClickException(f"demo failed: {exc}") from None
