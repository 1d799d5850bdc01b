"""What ``mailworker dlq`` prints for people (the ``list`` table, the ``show`` page, the
``stats`` counts), and the durations its options take.

``--json`` output is the records' own :meth:`~mailworker.store.deadletter.DeadLetter.summary` and
:meth:`~mailworker.store.deadletter.DeadLetter.details`, written by the commands with
:func:`json_line`.

Every field of a record comes from outside — a subject, a recipient, a server's reply —
and may carry terminal control sequences (``ESC ] 0;title BEL`` retitles the window,
``ESC [2J`` clears it). Everything printed for people goes through :func:`printable`,
which shows control characters as escapes instead; JSON escapes them too.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

from mailworker.store.deadletter import DeadLetter

#: C0 controls, DEL, C1 controls (``\x9b`` is CSI on some terminals) and the bidi
#: overrides and isolates, which reorder what is shown.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
_JSON_UNSAFE = re.compile("[\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")

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


def printable(value: object, *, multiline: bool = False) -> str:
    """``value`` as text that cannot drive a terminal: control characters become escapes.

    C0 and C1 controls and DEL are shown as ``\\x1b``, bidi controls as ``\\u202e``.
    With ``multiline``, newlines are kept (for blocks printed over several lines);
    a carriage return never is.
    """
    pattern = _CONTROL_BUT_NEWLINE if multiline else _CONTROL
    return pattern.sub(_escape, value if isinstance(value, str) else str(value))


def _escape(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def json_line(data: object, *, indent: int | None = None) -> str:
    """``data`` as JSON, non-ASCII kept readable but DEL, C1 and bidi controls escaped
    (``json`` escapes the C0 controls itself)."""
    text = json.dumps(data, ensure_ascii=False, indent=indent)
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def record_table(records: Sequence[DeadLetter]) -> list[str]:
    """The ``dlq list`` table: a header line, then one line per record."""
    rows = [("ID", "WHEN", "REASON", "CODE", "RECIPIENTS", "SUBJECT", "ATTEMPTS")]
    rows += [
        (
            printable(r.id),
            _when(r.created_at),
            printable(r.reason),
            _code(r),
            _cut(printable(", ".join(r.recipients)), 40),
            _cut(printable(r.subject or ""), 40),
            printable(r.attempts),
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
        group = {printable(k): v for k, v in counts[name].items()}
        width = max((len(k) for k in group), default=0)
        for key, count in group.items():
            lines.append(f"  {key.ljust(width)}  {count}")
    return lines


def describe(r: DeadLetter) -> list[str]:
    """The human-readable ``dlq show`` page; every field goes through :func:`printable`."""
    details = r.details()
    err = r.error
    task_id = f" (last task id {printable(r.task_id)})" if r.task_id else ""
    lines = [
        f"id:          {printable(r.id)}",
        f"reason:      {printable(r.reason)}",
        f"added:       {_when(r.created_at)}",
        f"task:        {printable(r.task)}{task_id}",
        f"profile:     {printable(r.profile)}",
        f"recipients:  {printable(', '.join(r.recipients)) or '-'}",
        f"subject:     {printable(r.subject) if r.subject is not None else '-'}",
        f"attempts:    {printable(r.attempts)} (first {_when(r.first_attempt_at)}, "
        f"last {_when(r.last_attempt_at)})",
        "",
        "error:",
    ]
    for key in ("type", "stage", "code", "enhanced_code", "transient", "message", "reply"):
        if err.get(key) is not None:
            lines.append(f"  {key + ':':15}{_indent(printable(err[key], multiline=True), 17)}")
    lines += ["", "payload:"]
    if r.payload_dropped is not None:
        lines += [
            f"  NOT KEPT ({r.payload_bytes} bytes): {printable(r.payload_dropped)}.",
            "  This record cannot be re-queued; what follows is a summary.",
        ]
    for key, value in details["kwargs"].items():
        text = printable(_payload_value(key, value), multiline=True)
        lines.append(f"  {printable(key) + ':':15}{_indent(text, 17)}")
    lines += ["", "transcript of the last attempt:"]
    lines += [f"  {_indent(printable(line, multiline=True), 4)}" for line in r.transcript] or [
        "  (none)"
    ]
    lines += ["", "attempt history:"]
    lines += [
        f"  {n}. {_when(entry.get('at'))}  {printable(entry.get('error', ''))}"
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
    parts = [str(r.code) if r.code is not None else "", printable(enhanced) if enhanced else ""]
    return " ".join(p for p in parts if p) or "-"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _indent(text: str, by: int) -> str:
    return text.replace("\n", "\n" + " " * by)


def plural(n: int) -> str:
    """``1 dead letter``, ``2 dead letters``."""
    return f"{n} dead letter" + ("" if n == 1 else "s")
