"""``mailworker dlq ...``: list, show, re-queue, purge and count dead letters.

Re-queueing goes through a *publisher*, ``publish(task_name, kwargs) -> task_id``. By
default it is :func:`mailworker.tasks.enqueue`, imported only when ``dlq retry`` runs;
to use another one (tests do), invoke the command with a :class:`DlqHooks` as click's
``obj``::

    CliRunner().invoke(main, ["dlq", "retry", "--all"], obj=DlqHooks(publish=fake))
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click
import redis

from mailworker.deadletter import REASONS, DeadLetter, DeadLetterStore, code_matcher
from mailworker.errors import ConfigError
from mailworker.settings import Settings

#: ``publish(task_name, kwargs)`` enqueues a task and returns its id.
Publish = Callable[[str, dict[str, Any]], str]

#: Retry or purge at least this many records to get a progress bar (on a terminal).
PROGRESS_MIN = 10

F = TypeVar("F", bound=Callable[..., Any])

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")


@dataclass
class DlqHooks:
    """What a caller can swap in, passed as click's ``obj``.

    Attributes:
        publish: the publisher for ``dlq retry``; None means ``mailworker.tasks.enqueue``.
    """

    publish: Publish | None = None


def default_publish(task_name: str, kwargs: dict[str, Any]) -> str:
    """Enqueue with ``mailworker.tasks.enqueue`` (imported now, not at CLI start-up)."""
    from mailworker.tasks import enqueue  # noqa: PLC0415 - Celery only when needed

    return enqueue(task_name, kwargs)


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
            url = self.redis_url or settings.redis_url
            self._store = DeadLetterStore.from_url(
                url, max_records=settings.dlq_max, ttl=settings.dlq_ttl
            )
            click.get_current_context().call_on_close(self._store.redis.close)
        return self._store


def parse_duration(value: str) -> float:
    """Seconds in a duration such as ``90s``, ``30m``, ``1h``, ``2d`` or ``1w``.

    A bare number counts seconds.

    Raises:
        ValueError: ``value`` is not such a duration.
    """
    match = _DURATION.fullmatch(value.strip().lower())
    if match is None:
        raise ValueError(
            f"{value!r} is not a duration; use a number with a unit: 90s, 30m, 1h, 2d, 1w"
        )
    return float(match[1]) * _UNITS[match[2] or "s"]


def _duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _code_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        code_matcher(value)
    except ValueError:
        raise click.BadParameter(
            f"{value!r}: use a reply code (550), a class (5xx, 4xx) or an enhanced code (5.1.1)",
            ctx,
            param,
        ) from None
    return value.strip()


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
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"Redis at unix:{kw['path']}"
    return f"Redis at {kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def _filter_options(f: F) -> F:
    """The options that select records, shared by list, retry and purge."""
    options = [
        click.option("--reason", type=click.Choice(REASONS), help="Only this reason."),
        click.option(
            "--code",
            metavar="CODE",
            callback=_code_option,
            help="Only this reply code (550), class (5xx, 4xx) or enhanced code (5.1.1).",
        ),
        click.option("--profile", metavar="NAME", help="Only this SMTP profile."),
        click.option(
            "--since",
            metavar="DURATION",
            callback=_duration_option,
            help="Only records dead-lettered within this long: 30m, 1h, 2d, 1w.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _filters(
    reason: str | None, code: str | None, profile: str | None, since: float | None
) -> dict[str, Any]:
    return {
        "reason": reason,
        "code": code,
        "profile": profile,
        "since": None if since is None else time.time() - since,
    }


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
    than MAILWORKER_DLQ_TTL seconds (default 30 days); the oldest go first.

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
@_filter_options
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
    first/last attempt times, and attachments as file name and size (never content).

    \b
    Examples:
      mailworker dlq list --reason exhausted --since 2d
      mailworker dlq list --code 5.1.1 --json | jq -r .recipients[]
    """
    records = state.store().list(**_filters(reason, code, profile, since), limit=limit)
    if as_json:
        for record in records:
            click.echo(json.dumps(record.summary(), ensure_ascii=False))
        return
    if not records:
        filtered = any(v is not None for v in (reason, code, profile, since))
        click.echo("No dead letters match." if filtered else "No dead letters.")
        return
    rows = [("ID", "WHEN", "REASON", "CODE", "RECIPIENTS", "SUBJECT", "ATTEMPTS")]
    rows += [
        (
            r.id,
            _when(r.created_at),
            r.reason,
            _code(r),
            _cut(", ".join(r.recipients), 40),
            _cut(r.subject or "", 40),
            str(r.attempts),
        )
        for r in records
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@dlq.command()
@click.argument("id")
@click.option("--json", "as_json", is_flag=True, help="The record as one JSON object.")
@click.pass_obj
def show(state: _State, id: str, as_json: bool) -> None:
    """Show one dead letter: payload, error, transcript and attempt history.

    The payload is summarised: attachments appear as file name, type and size, a
    prebuilt message as its size; their bytes are never shown. ID is the first
    column of `mailworker dlq list`.
    """
    record = state.store().get(id)
    if record is None:
        raise click.ClickException(f"no dead letter with id {id!r} (see `mailworker dlq list`)")
    if as_json:
        click.echo(json.dumps(record.details(), ensure_ascii=False, indent=2))
        return
    for line in _describe(record):
        click.echo(line)


@dlq.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "all_", is_flag=True, help="Every record matching the filters.")
@_filter_options
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
    command stops with exit status 1).

    \b
    Examples:
      mailworker dlq retry 018f2a4b3c5d9e1f2a3b
      mailworker dlq retry --all --reason exhausted --since 1d
    """
    store = state.store()
    targets = _targets(store, ids, all_, _filters(reason, code, profile, since))
    if not targets:
        click.echo("Nothing to re-queue.")
        return
    done, missing = 0, []
    with _progress(len(targets), "Re-queueing") as bar:
        for position, id_ in enumerate(targets):
            try:
                task_id = store.requeue(id_, state.publish)
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
    _fail_missing(missing)


@dlq.command()
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("--all", "all_", is_flag=True, help="Every record matching the filters.")
@click.option(
    "--older-than",
    metavar="DURATION",
    callback=_duration_option,
    help="Only records dead-lettered longer ago than this: 12h, 7d, 4w. Implies --all.",
)
@_filter_options
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
    filters = _filters(reason, code, profile, since)
    targets = _targets(store, ids, all_ or older_than is not None, filters, older_than)
    if not targets:
        click.echo("Nothing to purge.")
        return
    question = f"Delete {_plural(len(targets))} for good?"
    if not yes:
        if not _stdin_is_tty():
            raise click.ClickException(
                f"not purging {_plural(len(targets))} without confirmation: "
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
    click.echo(f"Purged {_plural(removed)}.")
    _fail_missing(missing)


@dlq.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.pass_obj
def stats(state: _State, as_json: bool) -> None:
    """Count dead letters by reason, reply code and profile."""
    counts = state.store().stats()
    if as_json:
        click.echo(json.dumps(counts, ensure_ascii=False))
        return
    click.echo(f"total: {sum(counts['reason'].values())}")
    for name in ("reason", "code", "profile"):
        click.echo(f"by {name}:")
        group = counts[name]
        width = max((len(k) for k in group), default=0)
        for key, count in group.items():
            click.echo(f"  {key.ljust(width)}  {count}")


def _targets(
    store: DeadLetterStore,
    ids: Sequence[str],
    select_all: bool,
    filters: dict[str, Any],
    older_than: float | None = None,
) -> list[str]:
    """The ids a retry or purge acts on: those given, or those the filters select."""
    filtered = any(v is not None for v in filters.values())
    if ids and select_all:
        raise click.UsageError("give IDs or select with --all/--older-than, not both")
    if ids and filtered:
        raise click.UsageError("filters select records with --all; they don't apply to IDs")
    if not ids and not select_all:
        hint = " (add --all to use the filters)" if filtered else ""
        raise click.UsageError(f"give the IDs to act on, or --all{hint}")
    if ids:
        return list(dict.fromkeys(ids))
    return store.ids(**filters, older_than=older_than)


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
        raise click.ClickException(f"no dead letter with id {', '.join(missing)}")


def _describe(r: DeadLetter) -> list[str]:
    """The human-readable ``dlq show`` page."""
    details = r.details()
    err = r.error
    lines = [
        f"id:          {r.id}",
        f"reason:      {r.reason}",
        f"added:       {_when(r.created_at)}",
        f"task:        {r.task}" + (f" (last task id {r.task_id})" if r.task_id else ""),
        f"profile:     {r.profile}",
        f"recipients:  {', '.join(r.recipients) or '-'}",
        f"subject:     {r.subject if r.subject is not None else '-'}",
        f"attempts:    {r.attempts} (first {_when(r.first_attempt_at)}, "
        f"last {_when(r.last_attempt_at)})",
        "",
        "error:",
    ]
    for key in ("type", "stage", "code", "enhanced_code", "transient", "message", "reply"):
        if err.get(key) is not None:
            lines.append(f"  {key + ':':15}{_indent(str(err[key]), 17)}")
    lines += ["", "payload:"]
    for key, value in details["kwargs"].items():
        lines.append(f"  {key + ':':15}{_indent(_payload_value(key, value), 17)}")
    lines += ["", "transcript of the last attempt:"]
    lines += [f"  {line}" for line in r.transcript] or ["  (none)"]
    lines += ["", "attempt history:"]
    lines += [
        f"  {n}. {_when(entry.get('at'))}  {entry.get('error', '')}"
        for n, entry in enumerate(r.history, 1)
    ] or ["  (none)"]
    return lines


def _payload_value(key: str, value: Any) -> str:
    if key == "attachments" and isinstance(value, list):
        return "; ".join(
            f"{a.get('filename')} ({a.get('mimetype') or 'type unknown'}, "
            f"{'?' if a.get('size') is None else a['size']} bytes)"
            for a in value
        )
    if key == "raw_size":
        return f"{value} bytes"
    if isinstance(value, str):
        return _cut(value, 300)
    return _cut(json.dumps(value, ensure_ascii=False), 300)


def _when(ts: object) -> str:
    if not isinstance(ts, (int, float)) or not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _code(r: DeadLetter) -> str:
    enhanced = r.error.get("enhanced_code")
    parts = [str(r.code) if r.code is not None else "", str(enhanced) if enhanced else ""]
    return " ".join(p for p in parts if p) or "-"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _indent(text: str, by: int) -> str:
    return text.replace("\n", "\n" + " " * by)


def _plural(n: int) -> str:
    return f"{n} dead letter" + ("" if n == 1 else "s")
