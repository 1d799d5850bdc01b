"""``mailworker dlq ...``: list, show, re-queue, purge and count dead letters.

Re-queueing goes through a *publisher*, ``publish(task_name, kwargs) -> task_id``. By
default it is :func:`default_publish` (:mod:`mailworker.queue.producer`, imported only
when ``dlq retry`` runs); to use another one (tests do), invoke the command with a
:class:`DlqHooks` as click's ``obj``::

    CliRunner().invoke(main, ["dlq", "retry", "--all"], obj=DlqHooks(publish=fake))

The filter options and the choice of records are in :mod:`mailworker.cli._dlq_select`;
what the commands print for people, and duration parsing, in :mod:`mailworker.cli._dlq_format`.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click
import redis

from mailworker.cli._dlq_format import (
    describe,
    json_line,
    parse_duration,
    plural,
    printable,
    record_table,
    stats_lines,
)
from mailworker.cli._dlq_select import duration_option, filter_options, store_filters, target_ids
from mailworker.errors import ConfigError
from mailworker.store.client import describe as describe_redis
from mailworker.store.client import redis_client
from mailworker.store.deadletter import DeadLetterStore, PayloadNotKeptError
from mailworker.worker.settings import Settings

__all__ = ["PROGRESS_MIN", "DlqHooks", "Publish", "default_publish", "dlq", "parse_duration"]

#: ``publish(task_name, kwargs)`` enqueues a task and returns its id.
Publish = Callable[[str, dict[str, Any]], str]

#: Retry or purge at least this many records to get a progress bar (on a terminal).
PROGRESS_MIN = 10


@dataclass
class DlqHooks:
    """What a caller can swap in, passed as click's ``obj``.

    Attributes:
        publish: the publisher for ``dlq retry``; None means :func:`default_publish`.
    """

    publish: Publish | None = None


def default_publish(task_name: str, kwargs: dict[str, Any]) -> str:
    """Publish to ``MAILWORKER_BROKER_URL``, back to the queue the message came from
    (Celery is imported now, not at CLI start-up)."""
    from mailworker.queue.producer import Producer, producer_app  # noqa: PLC0415

    settings = Settings.from_env()
    app = producer_app(settings.broker_url, sentinel_master=settings.sentinel_master)
    return str(Producer(app).publish(task_name, kwargs).id)


@dataclass
class _State:
    """Per-invocation state of the ``dlq`` group: where Redis is, how to publish."""

    redis_url: str | None
    publish: Publish
    _store: DeadLetterStore | None = field(default=None, init=False)

    def store(self) -> DeadLetterStore:
        if self._store is None:
            try:
                settings = Settings.from_env()
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from None
            try:
                client = redis_client(
                    self.redis_url or settings.redis_url,
                    sentinel_master=settings.sentinel_master,
                    setting="--redis-url" if self.redis_url else "MAILWORKER_REDIS_URL",
                )
            except ConfigError as exc:
                raise click.ClickException(str(exc)) from None
            self._store = DeadLetterStore(client, **settings.dlq_limits)
            click.get_current_context().call_on_close(self._store.redis.close)
        return self._store


class _Group(click.Group):
    """Turns Redis failures into one clear line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except redis.RedisError as exc:
            state = ctx.find_object(_State)
            where = _safe_url(state._store.redis) if state and state._store else "Redis"
            raise click.ClickException(f"{where}: {type(exc).__name__}: {exc}") from None


def _safe_url(client: redis.Redis) -> str:
    """The client's address, for messages; never its password."""
    return describe_redis(client)


@click.group(cls=_Group)
@click.option(
    "--redis-url",
    metavar="URL",
    help="Redis holding the dead letters. Default: MAILWORKER_REDIS_URL, else "
    "MAILWORKER_BROKER_URL, else redis://localhost:6379/0.",
)
@click.pass_context
def dlq(ctx: click.Context, redis_url: str | None) -> None:
    """Inspect, re-queue and purge dead letters: messages mailworker gave up on.

    A message is dead-lettered when its payload is invalid (reason "invalid"), the
    server refused it for good ("permanent", a 5xx), its retries ran out ("exhausted")
    or it kept killing its worker ("poison"). Each record keeps the original payload,
    the last error, the SMTP transcript of the last attempt and the attempt history.

    The store keeps at most MAILWORKER_DLQ_MAX records (default 100000) and none older
    than MAILWORKER_DLQ_TTL seconds (default 30 days); the oldest go first. All records
    together take at most MAILWORKER_DLQ_MAX_BYTES (default 256 MiB): beyond it the
    oldest payloads are evicted first, then the oldest records. A payload larger than
    MAILWORKER_DLQ_MAX_PAYLOAD_BYTES (default 34 MiB) is not kept at all. A record
    without its payload still shows its error and transcript, but cannot be re-queued.

    Everything printed for people shows control characters as escapes (\\x1b), so a
    hostile subject or reply cannot drive your terminal.

    \b
    Typical session:
      mailworker dlq stats
      mailworker dlq list --code 5xx --since 1h
      mailworker dlq show ID
      mailworker dlq retry ID
      mailworker dlq purge --older-than 7d
    """
    hooks = ctx.find_object(DlqHooks)
    publish = hooks.publish if hooks is not None and hooks.publish is not None else None
    ctx.obj = _State(redis_url=redis_url, publish=publish or default_publish)


@dlq.command("list")
@filter_options
@click.option("--limit", type=click.IntRange(min=1), metavar="N", help="Show at most N records.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per record and line.")
@click.pass_obj
def list_(
    state: _State,
    *,
    reason: str | None,
    code: str | None,
    profile: str | None,
    since: float | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List dead letters, newest first.

    The table shows id, when, reason, reply code, recipients, subject and attempts.
    With --json each line is a JSON object: id, created_at, reason, task, code,
    enhanced_code, stage, error, recipients, subject, attempts, profile, task_id,
    first/last attempt times, attachments as file name and size (never content),
    payload_bytes and payload_kept. Payloads are never loaded.

    \b
    Examples:
      mailworker dlq list --reason exhausted --since 2d
      mailworker dlq list --code 5.1.1 --json | jq -r .recipients[]
    """
    records = state.store().list(**store_filters(reason, code, profile, since), limit=limit)
    if as_json:
        for record in records:
            click.echo(json_line(record.summary()))
        return
    if not records:
        filtered = any(v is not None for v in (reason, code, profile, since))
        click.echo("No dead letters match." if filtered else "No dead letters.")
        return
    for line in record_table(records):
        click.echo(line)


@dlq.command()
@click.argument("id")
@click.option("--json", "as_json", is_flag=True, help="The record as one JSON object.")
@click.pass_obj
def show(state: _State, id: str, as_json: bool) -> None:
    """Show one dead letter: payload, error, transcript and attempt history.

    The payload is summarised: attachments appear as file name, type and size, a
    prebuilt message as its size; their bytes are never shown. If the payload was
    not kept (too large, or evicted for the byte budget) the page says so and why.
    ID is the first column of `mailworker dlq list`.
    """
    record = state.store().get(id)
    if record is None:
        raise click.ClickException(
            f"no dead letter with id {printable(repr(id))} (see `mailworker dlq list`)"
        )
    if as_json:
        click.echo(json_line(record.details(), indent=2))
        return
    for line in describe(record):
        click.echo(line)


@dlq.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "all_", is_flag=True, help="Every record matching the filters.")
@filter_options
@click.pass_obj
def retry(
    state: _State,
    *,
    ids: tuple[str, ...],
    all_: bool,
    reason: str | None,
    code: str | None,
    profile: str | None,
    since: float | None,
) -> None:
    """Re-queue dead letters with their original payload and a fresh attempt budget.

    Give the IDs to re-queue, or --all with optional filters. The message keeps its
    Message-ID and goes only to the recipients that failed. A record leaves the store
    only after its new task was enqueued: if enqueueing fails, it stays (and the
    command stops with exit status 1). A record whose payload was not kept is
    refused and stays; the others are still re-queued, and the exit status is 1.

    \b
    Examples:
      mailworker dlq retry 018f2a4b3c5d9e1f2a3b
      mailworker dlq retry --all --reason exhausted --since 1d
    """
    store = state.store()
    targets = target_ids(store, ids, all_, store_filters(reason, code, profile, since))
    if not targets:
        click.echo("Nothing to re-queue.")
        return
    done, missing, refused = 0, [], []
    with _progress(len(targets), "Re-queueing") as bar:
        for position, id_ in enumerate(targets):
            try:
                task_id = store.requeue(id_, state.publish)
            except PayloadNotKeptError as exc:
                refused.append(f"{id_} ({exc.reason})")
                bar.update(1)
                continue
            except Exception as exc:  # the broker's or Redis's; the record stays either way
                left = len(targets) - position
                raise click.ClickException(
                    f"re-queueing {id_} failed: {type(exc).__name__}: {exc}. "
                    f"Re-queued {done}; {left} left in the store, {id_} included."
                ) from None
            bar.update(1)
            if task_id is None:
                missing.append(id_)
                continue
            done += 1
            if not bar.active:
                click.echo(f"{id_} re-queued as task {task_id}")
    click.echo(f"Re-queued {done} of {len(targets)}.")
    if refused:
        problems = [
            f"cannot re-queue {plural(len(refused))}, the payload was not kept: "
            + "; ".join(refused)
            + ". They stay in the store: resend those messages from the application, "
            "then purge the records"
        ]
        if missing:
            problems.append(f"no dead letter with id {', '.join(missing)}")
        raise click.ClickException(printable(". ".join(problems)))
    _fail_missing(missing)


@dlq.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "all_", is_flag=True, help="Every record matching the filters.")
@click.option(
    "--older-than",
    metavar="DURATION",
    callback=duration_option,
    help="Only records dead-lettered longer ago than this: 12h, 7d, 4w. Implies --all.",
)
@filter_options
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def purge(
    state: _State,
    *,
    ids: tuple[str, ...],
    all_: bool,
    older_than: float | None,
    reason: str | None,
    code: str | None,
    profile: str | None,
    since: float | None,
    yes: bool,
) -> None:
    """Delete dead letters for good.

    Give the IDs to delete, or --all and/or --older-than with optional filters.
    Asks for confirmation unless --yes; without a terminal to ask on, refuses
    unless --yes is given.

    \b
    Examples:
      mailworker dlq purge --older-than 7d --yes
      mailworker dlq purge --all --reason invalid
    """
    store = state.store()
    filters = store_filters(reason, code, profile, since)
    targets = target_ids(store, ids, all_ or older_than is not None, filters, older_than)
    if not targets:
        click.echo("Nothing to purge.")
        return
    question = f"Delete {plural(len(targets))} for good?"
    if not yes:
        if not _stdin_is_tty():
            raise click.ClickException(
                f"not purging {plural(len(targets))} without confirmation: "
                "stdin is not a terminal; add --yes"
            )
        click.confirm(question, default=False, abort=True)
    removed, missing = 0, []
    with _progress(len(targets), "Purging") as bar:
        if ids:  # one by one, to name the unknown ones
            for id_ in targets:
                if store.remove([id_]):
                    removed += 1
                else:
                    missing.append(id_)
                bar.update(1)
        else:
            for start in range(0, len(targets), 500):
                chunk = targets[start : start + 500]
                removed += store.remove(chunk)
                bar.update(len(chunk))
    click.echo(f"Purged {plural(removed)}.")
    _fail_missing(missing)


@dlq.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def stats(state: _State, as_json: bool) -> None:
    """Count dead letters by reason, reply code and profile."""
    counts = state.store().stats()
    if as_json:
        click.echo(json_line(counts))
        return
    for line in stats_lines(counts):
        click.echo(line)


class _NoBar:
    """Stands in for a progress bar when there is no terminal to draw it on."""

    active = False

    def update(self, n: int) -> None:
        """Ignore progress."""


class _Bar:
    """A click progress bar on stderr."""

    active = True

    def __init__(self, update: Callable[[int], None]) -> None:
        self._update = update

    def update(self, n: int) -> None:
        """Advance by ``n``."""
        self._update(n)


@contextlib.contextmanager
def _progress(length: int, label: str) -> Iterator[_Bar | _NoBar]:
    """A progress bar on stderr for many records, when stderr is a terminal."""
    if length < PROGRESS_MIN or not _stderr_is_tty():
        yield _NoBar()
        return
    with click.progressbar(length=length, label=label, file=sys.stderr) as bar:
        yield _Bar(bar.update)


def _stdin_is_tty() -> bool:
    """Whether there is a person at a terminal to confirm with."""
    return sys.stdin.isatty()


def _stderr_is_tty() -> bool:
    """Whether a progress bar can be drawn."""
    return sys.stderr.isatty()


def _fail_missing(missing: Iterable[str]) -> None:
    missing = list(missing)
    if missing:
        raise click.ClickException(printable(f"no dead letter with id {', '.join(missing)}"))
