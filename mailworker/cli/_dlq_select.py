"""Choosing dead letters: the filter options of ``list``, ``retry`` and ``purge``, and the
ids a ``retry`` or ``purge`` acts on."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from mailworker.cli._dlq_format import parse_duration
from mailworker.store.deadletter import REASONS, DeadLetterStore, code_matcher

F = TypeVar("F", bound=Callable[..., Any])


def duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """Click callback: the seconds in a ``DURATION`` option (see :func:`parse_duration`)."""
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


def filter_options(f: F) -> F:
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
            callback=duration_option,
            help="Only records dead-lettered within this long: 30m, 1h, 2d, 1w.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def store_filters(
    reason: str | None, code: str | None, profile: str | None, since: float | None
) -> dict[str, Any]:
    """The filter options as keyword arguments for :meth:`DeadLetterStore.ids` and ``list``."""
    return {
        "reason": reason,
        "code": code,
        "profile": profile,
        "since": None if since is None else time.time() - since,
    }


def target_ids(
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
