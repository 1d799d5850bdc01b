"""Send one message from plain Python and wait for the outcome.

    MAILWORKER_BROKER_URL=redis://localhost:6379/0 python send_one.py --to ann@example.org

A running `mailworker worker` on the same broker sends it; this prints the task's
result (status, Message-ID, the server's reply) as JSON, or the error.
"""

from __future__ import annotations

import argparse
import json
import sys

from mailworker.errors import DeadLetteredError
from mailworker.worker.tasks import send_mail


def main(argv: list[str] | None = None) -> int:
    """Enqueue one message, wait for it, print the result; 0 if it was sent."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--to", required=True, help="recipient address")
    parser.add_argument("--subject", default="Hello from mailworker")
    parser.add_argument("--text", default="This message went through mailworker.")
    parser.add_argument("--from", dest="from_email", help="sender (default: the worker's)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    args = parser.parse_args(argv)

    # Results are opt-in (MAILWORKER_RESULTS=1 for every task): this one waits for its.
    result = send_mail.apply_async(
        kwargs={
            "to": args.to,
            "subject": args.subject,
            "text": args.text,
            "from_email": args.from_email,
        },
        ignore_result=False,
    )
    print(f"queued task {result.id}", file=sys.stderr)
    try:
        outcome = result.get(timeout=args.timeout)
    except DeadLetteredError as exc:
        print(f"not sent: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(outcome, indent=2))
    return 0 if outcome["status"] == "sent" else 1


if __name__ == "__main__":
    sys.exit(main())
