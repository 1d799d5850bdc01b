"""benchmarks/perf.py's publisher, one process per measured end-to-end row.

    python _perf_publish.py MODE N WARM_UP

MODE: noop | noop_guarded | dce | mw | batch10 | batch100. Publishes WARM_UP messages, prints
``warm``, waits for ``go`` on stdin, prints ``t0 <time.monotonic()>``, publishes N
messages and prints ``published``. Prints ``n/a <why>`` and exits when the worker
side cannot run MODE.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

BODY = "The quick brown fox jumps over the lazy dog, again and again.\n" * 30  # ~1.9 KB


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def publisher(mode: str) -> Callable[[int, int], None] | str:
    """A function publishing messages ``start..start+count``, or why not."""
    if mode in ("noop", "noop_guarded", "dce"):
        import _perf_celery_app  # noqa: PLC0415 -- sets Django up

        if mode.startswith("noop"):
            task = _perf_celery_app.noop if mode == "noop" else _perf_celery_app.noop_guarded

            def noop(start: int, count: int) -> None:
                for i in range(start, start + count):
                    task.delay(i)

            return noop

        from django.core.mail import EmailMessage, get_connection  # noqa: PLC0415

        def dce(start: int, count: int) -> None:
            messages = [
                EmailMessage(f"perf {i}", BODY, "app@example.com", [f"user{i}@example.org"])
                for i in range(start, start + count)
            ]
            get_connection().send_messages(messages)

        return dce

    from mailworker import send_mail  # noqa: PLC0415
    from mailworker.worker.app import publishing_app  # noqa: PLC0415

    def fields(i: int) -> dict[str, Any]:
        return {"to": f"user{i}@example.org", "subject": f"perf {i}", "text": BODY}

    if mode == "mw":

        def one_per_task(start: int, count: int) -> None:
            for i in range(start, start + count):
                send_mail.delay(**fields(i))

        return one_per_task

    size = int(mode.removeprefix("batch"))
    app = publishing_app()
    app.loader.import_default_modules()
    if "mailworker.send_mail_batch" not in app.tasks:
        return "n/a (not built yet)"

    def batches(start: int, count: int) -> None:
        for first in range(start, start + count, size):
            last = min(first + size, start + count)
            app.send_task(
                "mailworker.send_mail_batch",
                kwargs={"messages": [fields(i) for i in range(first, last)]},
            )

    return batches


def main() -> None:
    mode, count, warm_up = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    publish = publisher(mode)
    if isinstance(publish, str):
        say(publish)
        return
    publish(0, warm_up)
    say("warm")
    if sys.stdin.readline().strip() != "go":
        return
    say(f"t0 {time.monotonic()!r}")
    publish(warm_up, count)
    say("published")


if __name__ == "__main__":
    main()
