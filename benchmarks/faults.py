"""The fault suite as a table: one line per scenario of ``tests/faults/scenarios.py``.

    python benchmarks/faults.py [SCENARIO ...] [--keep]

Each scenario starts a real ``mailworker worker`` (2 prefork processes), a private
``redis-server`` and a recording SMTP server on loopback, sends a batch of messages,
injects one fault mid-batch and waits until every message was accepted or
dead-lettered and nothing is left to run. Columns:

- sent: messages the server accepted at least once;
- dead-lettered: messages in the dead-letter store (and not accepted);
- lost: neither, when the scenario gave up waiting;
- duplicates: accepted copies beyond the first, counted by Message-ID;
- in doubt: deliveries deferred with the whole message sent and no reply (each may
  have arrived; the delayed retry sends it again: at-least-once);
- crashes: workers that exited on their own (restarted, as a supervisor would);
- drain s: seconds from the first publish until all of that was settled.

Worker logs go to a temporary directory, deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.faults.rig import Result
from tests.faults.scenarios import SCENARIOS


def main(argv: list[str] | None = None) -> int:
    """Run the scenarios and print the table; exit status 1 if any lost a message."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenarios", nargs="*", help=f"default: all of {', '.join(SCENARIOS)}")
    parser.add_argument("--keep", action="store_true", help="keep the worker logs")
    args = parser.parse_args(argv)
    names = args.scenarios or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(SCENARIOS)}")

    workdir = Path(tempfile.mkdtemp(prefix="mailworker-faults-"))
    started = time.monotonic()
    print(Result.HEADER, flush=True)
    results = []
    for name in names:
        result = SCENARIOS[name](workdir)
        results.append(result)
        print(result.row(), flush=True)
    print(f"\n{len(results)} scenarios in {time.monotonic() - started:.0f} s", end="")
    if args.keep:
        print(f"; logs in {workdir}")
    else:
        print()
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if any(r.lost or not r.drained for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
