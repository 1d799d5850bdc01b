"""What ``mailworker dlq`` prints for people (the ``list`` table, the ``show`` page, the
``stats`` counts), and the durations its options take.

``--json`` output is the records' own :meth:`~mailworker.store.deadletter.DeadLetter.summary` and
:meth:`~mailworker.store.deadletter.DeadLetter.details`, written by the commands.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

from mailworker.store.deadletter import DeadLetter

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)")


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


def record_table(records: Sequence[DeadLetter]) -> list[str]:
    """The ``dlq list`` table: a header line, then one line per record."""
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
    return [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def stats_lines(counts: dict[str, dict[str, int]]) -> list[str]:
    """The ``dlq stats`` page: the total, then the counts by reason, code and profile."""
    lines = [f"total: {sum(counts['reason'].values())}"]
    for name in ("reason", "code", "profile"):
        lines.append(f"by {name}:")
        group = counts[name]
        width = max((len(k) for k in group), default=0)
        for key, count in group.items():
            lines.append(f"  {key.ljust(width)}  {count}")
    return lines


def describe(r: DeadLetter) -> list[str]:
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


def plural(n: int) -> str:
    """``1 dead letter``, ``2 dead letters``."""
    return f"{n} dead letter" + ("" if n == 1 else "s")
