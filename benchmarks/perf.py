"""mailworker's performance benchmark: one table, measured in one interleaved run.

    make perf                       # installs what it needs, then runs this
    python benchmarks/perf.py [--reps 3] [--messages 300] [--e2e-messages 2000]
                              [--long] [--only smtp|e2e] [--quick]

It starts its own servers on 127.0.0.1 random ports and stops them at the end
(also on Ctrl-C or an error):

- a private Postfix (Debian's package) that accepts and discards: PIPELINING and
  CHUNKING, no TLS;
- an asyncio SMTP sink with STARTTLS, AUTH PLAIN and PIPELINING (trustme
  certificate), in its own process;
- a latency proxy (10 ms each way, 20 ms RTT, one RTT more at connect) that counts
  client turns: a client burst the server answered, i.e. a round trip the client
  waited for (connecting counts as one);
- redis-server (no persistence) and, per end-to-end measurement, a fresh Celery
  worker with 2 prefork processes.

SMTP-client rows (one held session unless said) run at 0 ms (direct) and 20 ms RTT
(through the proxy); lock-step clients send ``--messages / 5`` messages at 20 ms.
End-to-end rows send ``--e2e-messages`` ~2 KB messages after a 100-message warm-up
and time them from the first publish to the last message the sink received.
Every rep runs every row once, in the same order, so noise hits all rows alike;
the table gives medians with min-max, the ratios the medians of per-rep ratios.

Columns: msg/s; RTT/msg (client turns per message, proxy rows); CPU ms/msg (the
client's for SMTP rows, the worker's — main process and pool children — for
end-to-end rows); Redis commands per message (INFO commandstats, publishing
included); worker RSS after the warm-up and at the end; the busiest server
process's CPU share (Postfix/sink/proxy/Redis), flagged ``!`` above 80 % of a core.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog
from _perf_clients import (
    Client,
    Clock,
    Target,
    mailworker_send,
    mailworker_send_many,
    nodemailer_dir,
    nodemailer_pool,
    smtplib_held,
    smtplib_new_connection,
)
from _perf_e2e import E2EResult, EndToEnd
from _perf_procs import busiest, cpu_seconds, stop_all
from _perf_servers import Postfix, Proxy, Redis, Sink, cert_files, smtp_source_rate

from mailworker import SMTPSession

RTT = 0.020
BOTTLENECK = 0.8


@dataclass
class Row:
    name: str
    rtt_ms: int | None
    run: Callable[[], dict[str, Any] | str]
    results: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""


def _summary(values: list[float], fmt: str) -> str:
    if not values:
        return ""
    median = statistics.median(values)
    if len(values) == 1:
        return format(median, fmt)
    return f"{median:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.cert, self.ca_file = cert_files(work)
        self.sink = Sink(self.cert)
        self.postfix: Postfix | None = None
        self.postfix_error = ""
        try:
            self.postfix = Postfix(work)
        except (RuntimeError, OSError) as exc:
            self.postfix_error = str(exc)
        upstreams = [self.sink.port] + ([self.postfix.port] if self.postfix else [])
        self.proxy = Proxy(upstreams, RTT)
        #: msg/s smtp-source gets from each server over one held session.
        self.capacity: dict[str, float] = {}

    # -- SMTP-client rows -----------------------------------------------------------

    def smtp_row(self, client: Client, server: str, rtt: bool, n: int) -> dict[str, Any] | str:
        if server == "postfix" and self.postfix is None:
            return f"skipped: {self.postfix_error}"
        route = 0 if server == "sink" else 1
        direct = self.sink.port if server == "sink" else self.postfix.port  # type: ignore[union-attr]
        port = self.proxy.ports[route] if rtt else direct
        target = Target(port, tls=server == "sink", ca_file=self.ca_file)
        state: dict[str, Any] = {}

        def server_cpu() -> dict[str, float]:
            found = {"proxy": self.proxy.cpu(), "sink": self.sink.cpu()}
            if self.postfix is not None:
                for pid, seconds in busiest(self.postfix.pid).items():
                    found[f"postfix:{pid}"] = seconds
            return found

        def start() -> None:
            state["servers"] = server_cpu()
            state["turns"] = self.proxy.turns[route]
            state["cpu"] = cpu_seconds([clock.pid]) if clock.pid else time.process_time()
            state["t"] = time.perf_counter()

        def end() -> None:
            state["wall"] = time.perf_counter() - state["t"]
            now = cpu_seconds([clock.pid]) if clock.pid else time.process_time()
            state["cpu"] = now - state["cpu"]
            state["turns"] = self.proxy.turns[route] - state["turns"]
            after = server_cpu()
            state["share"] = max(
                (after[k] - state["servers"].get(k, 0.0)) / state["wall"] for k in after
            )

        clock = Clock(start, end)
        client(target, n, clock)
        return {
            "rate": n / state["wall"],
            "turns": state["turns"] / n if rtt else None,
            "per_turn": n / state["turns"] if rtt and state["turns"] else None,
            "cpu_ms": state["cpu"] / n * 1000,
            # A server near what it can take from one session is a bottleneck too.
            "share": max(state["share"], n / state["wall"] / self.capacity.get(server, 1e9)),
        }

    def smtp_rows(self) -> list[Row]:
        a = self.args
        node = nodemailer_dir()
        built = hasattr(SMTPSession, "send_many")
        clients: list[tuple[str, Client | str, str, bool]] = [
            ("mailworker send() loop, Postfix", mailworker_send, "postfix", False),
            ("mailworker send() loop, STARTTLS+AUTH sink", mailworker_send, "sink", False),
            (
                "mailworker send_many(), Postfix",
                mailworker_send_many if built else "n/a (not built yet)",
                "postfix",
                False,
            ),
            (
                "mailworker send_many(), STARTTLS+AUTH sink",
                mailworker_send_many if built else "n/a (not built yet)",
                "sink",
                False,
            ),
            ("smtplib held connection, Postfix", smtplib_held, "postfix", True),
            ("smtplib held connection, STARTTLS+AUTH sink", smtplib_held, "sink", True),
            ("smtplib new connection per msg, sink", smtplib_new_connection, "sink", True),
            (
                "Nodemailer pool (1 conn), STARTTLS+AUTH sink",
                nodemailer_pool(node) if isinstance(node, Path) else f"skipped: {node}",
                "sink",
                True,
            ),
        ]
        rows = []
        for rtt in (False, True):
            for name, client, server, slow in clients:
                n = max(20, a.messages // 5) if rtt and slow else a.messages

                def run(
                    c: Client | str = client, s: str = server, r: bool = rtt, k: int = n
                ) -> dict[str, Any] | str:
                    return c if isinstance(c, str) else self.smtp_row(c, s, r, k)

                rows.append(Row(name, 20 if rtt else 0, run, note=f"{n} msgs"))
        return rows

    # -- end-to-end rows ------------------------------------------------------------

    def e2e_rows(self, e2e: EndToEnd) -> list[Row]:
        n = self.args.e2e_messages

        def run(mode: str, chunk: int | None = None, count: int = n) -> dict[str, Any] | str:
            result = e2e.run(mode, count, chunk)
            if isinstance(result, str):
                return result
            return e2e_dict(result)

        rows = [
            Row("no-op task (ceiling)", None, lambda: run("noop")),
            Row("no-op task, mailworker's guarantees", None, lambda: run("noop_guarded")),
            Row("django-celery-email, 1 per task", None, lambda: run("dce", 1)),
            Row("django-celery-email, chunks of 10", None, lambda: run("dce", 10)),
            Row("mailworker send_mail, 1 per task", None, lambda: run("mw")),
            Row("mailworker send_mail_batch, 10", None, lambda: run("batch10")),
            Row("mailworker send_mail_batch, 100", None, lambda: run("batch100")),
        ]
        if self.args.long:
            rows.append(
                Row("mailworker 1 per task, 10,000 (RSS)", None, lambda: run("mw", count=10_000))
            )
        return rows


def e2e_dict(result: E2EResult) -> dict[str, Any]:
    return {
        "rate": result.rate,
        "cpu_ms": result.cpu_ms,
        "redis": result.redis_per_msg,
        "rss_100": result.rss_100 / 2**20,
        "rss_end": result.rss_end / 2**20,
        "share": max(result.server_share.values()),
    }


# -- the report ------------------------------------------------------------------------


def print_table(rows: list[Row]) -> None:
    def col(row: Row, key: str, fmt: str) -> str:
        return _summary([r[key] for r in row.results if r.get(key) is not None], fmt)

    header = (
        f"{'row':46} {'RTT':>5} {'msg/s median (min-max)':>28} {'RTT/msg':>7} "
        f"{'CPU ms/msg':>10} {'Redis/msg':>9} {'RSS@100 MB':>10} {'RSS end MB':>10} {'server':>7}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        rtt = "" if row.rtt_ms is None else f"{row.rtt_ms}ms"
        if not row.results:
            print(f"{row.name:46} {rtt:>5} {row.note}")
            continue
        if row.note.startswith("failed"):
            print(f"{row.name:46} {rtt:>5} (a rep {row.note})")
        shares = [r["share"] for r in row.results]
        share = f"{max(shares) * 100:5.0f}%" + ("!" if max(shares) > BOTTLENECK else " ")
        print(
            f"{row.name:46} {rtt:>5} {col(row, 'rate', '.1f'):>28} {col(row, 'turns', '.2f'):>7} "
            f"{col(row, 'cpu_ms', '.2f'):>10} {col(row, 'redis', '.1f'):>9} "
            f"{col(row, 'rss_100', '.0f'):>10} {col(row, 'rss_end', '.0f'):>10} {share:>7}"
        )


def ratio(
    rows: dict[tuple[str, int | None], Row],
    top: tuple[str, int | None],
    bottom: tuple[str, int | None] | None,
    key: str = "rate",
    bottom_key: str = "rate",
) -> list[float]:
    """Per-rep ratios top[key] / bottom[bottom_key] (or top[key] alone)."""
    a = rows.get(top)
    if a is None or not a.results:
        return []
    if bottom is None:
        return [r[key] for r in a.results if r.get(key) is not None]
    b = rows.get(bottom)
    if b is None or not b.results:
        return []
    return [x[key] / y[bottom_key] for x, y in zip(a.results, b.results, strict=False)]


def print_targets(rows: list[Row]) -> None:
    by = {(r.name, r.rtt_ms): r for r in rows}
    mw_pf, pf_lib = (
        ("mailworker send() loop, Postfix", 20),
        ("smtplib held connection, Postfix", 20),
    )
    many = ("mailworker send_many(), Postfix", 20)
    mw1 = ("mailworker send_mail, 1 per task", None)
    long_row = by.get(("mailworker 1 per task, 10,000 (RSS)", None))
    checks: list[tuple[str, list[float], str, Callable[[float], bool]]] = [
        ("20 ms, one session (Postfix): mailworker ÷ smtplib held", ratio(by, mw_pf, pf_lib),
         "≥ 3.5x", lambda v: v >= 3.5),
        ("20 ms, one session (Postfix): mailworker round trips/msg", ratio(by, mw_pf, None,
         "turns"), "≤ 1.25", lambda v: v <= 1.25),
        ("20 ms, send_many (Postfix): messages per round trip", ratio(by, many, None,
         "per_turn"), "≥ 3", lambda v: v >= 3),
        ("20 ms, send_many (sink, DATA): messages per round trip",
         ratio(by, ("mailworker send_many(), STARTTLS+AUTH sink", 20), None, "per_turn"),
         "(info)", lambda v: True),
        ("e2e: mailworker 1/task ÷ no-op ceiling", ratio(by, mw1, ("no-op task (ceiling)",
         None)), "≥ 0.6", lambda v: v >= 0.6),
        ("e2e: mailworker 1/task ÷ no-op with its guarantees", ratio(by, mw1,
         ("no-op task, mailworker's guarantees", None)), "(info)", lambda v: True),
        ("e2e: mailworker 1/task ÷ DCE 1/task", ratio(by, mw1,
         ("django-celery-email, 1 per task", None)), "≥ 2.5x", lambda v: v >= 2.5),
        ("e2e: batch of 10 ÷ DCE chunks of 10", ratio(by, ("mailworker send_mail_batch, 10",
         None), ("django-celery-email, chunks of 10", None)), "≥ 1.5x", lambda v: v >= 1.5),
        ("e2e: batch of 100 ÷ DCE chunks of 10", ratio(by, ("mailworker send_mail_batch, 100",
         None), ("django-celery-email, chunks of 10", None)), "≥ 1.5x", lambda v: v >= 1.5),
    ]  # fmt: skip
    if long_row is not None and long_row.results:
        checks.append((
            "RSS after 10,000 ÷ after 100 (mailworker 1/task)",
            [r["rss_end"] / r["rss_100"] for r in long_row.results],
            "≤ 1.10", lambda v: v <= 1.10,
        ))  # fmt: skip
    else:
        checks.append(("RSS after 10,000 ÷ after 100", [], "≤ 1.10 (--long)", lambda v: True))
    print("\nTargets (median of per-rep ratios, min-max)")
    for name, values, target, ok in checks:
        if not values:
            print(f"  {name:58} {'n/a':>24}   target {target}")
            continue
        verdict = "met" if ok(statistics.median(values)) else "MISSED"
        if target == "(info)":
            verdict = ""
        print(f"  {name:58} {_summary(values, '.2f'):>24}   target {target:8} {verdict}")


def check_servers(bench: Bench, quick: bool) -> None:
    """Each server alone with a fast client (Postfix's smtp-source, 2 KB, lock-step)."""
    count = 2000 if quick else 6000
    servers = {"sink": bench.sink.port}
    if bench.postfix is not None:
        servers["postfix"] = bench.postfix.port
    print("Server capacity alone (smtp-source, 2 KB messages, held sessions, msg/s):")
    for name, port in servers.items():
        rates = [smtp_source_rate(port, count // s, s) for s in (1, 4)]
        if rates[0] is None or rates[1] is None:
            print(f"  {name}: n/a (no /usr/sbin/smtp-source)")
            continue
        bench.capacity[name] = rates[0]
        label = "Postfix (discarding)" if name == "postfix" else "sink (in clear, no TLS)"
        print(f"  {label:24} 1 session {rates[0]:7.0f}   4 sessions {rates[1]:7.0f}")
    print(
        "  'server' column: the busiest server process's CPU share (Postfix, sink, proxy,\n"
        "  Redis) or, for SMTP rows, msg/s as a share of the server's 1-session rate\n"
        "  above; '!' marks > 80 %: that row measured the server, not the client.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--messages", type=int, default=300, help="per SMTP-client row")
    parser.add_argument("--e2e-messages", type=int, default=2000)
    parser.add_argument("--long", action="store_true", help="add the 10,000-message RSS row")
    parser.add_argument("--only", choices=("smtp", "e2e"))
    parser.add_argument("--quick", action="store_true", help="1 rep, small counts")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.messages, args.e2e_messages = 1, 60, 200

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # silence events
    work = Path(tempfile.mkdtemp(prefix="mailworker-perf-"))
    atexit.register(stop_all)
    # Ctrl-C raises KeyboardInterrupt even when started with SIGINT ignored (a background
    # job); SIGTERM and SIGHUP exit: either way the finally below stops every server.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    try:
        bench = Bench(args, work)
        if bench.postfix_error:
            print(f"Postfix rows skipped: {bench.postfix_error}")
        check_servers(bench, args.quick)
        rows: list[Row] = []
        if args.only != "e2e":
            rows += bench.smtp_rows()
        if args.only != "smtp":
            rows += bench.e2e_rows(EndToEnd(work, Redis(work), bench.sink, bench.ca_file))
        started = time.monotonic()
        for rep in range(args.reps):
            for row in rows:
                print(f"\rrep {rep + 1}/{args.reps}: {row.name} {row.rtt_ms or ''}".ljust(79),
                      end="", file=sys.stderr, flush=True)  # fmt: skip
                try:
                    result = row.run()
                except Exception as exc:
                    result = f"failed: {exc}"
                if isinstance(result, str):
                    row.note = result
                else:
                    row.results.append(result)
        print("\r".ljust(79), file=sys.stderr)
        print(
            f"{args.reps} rep(s), rows interleaved, {time.monotonic() - started:.0f} s; "
            f"SMTP rows {args.messages} msgs (lock-step clients {max(20, args.messages // 5)} "
            f"at 20 ms), e2e {args.e2e_messages} msgs after a 100-message warm-up\n"
        )
        print_table(rows)
        print_targets(rows)
    finally:
        stop_all()
        if args.keep:
            print(f"\nlogs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted; every server and worker it started is stopped", file=sys.stderr)
        sys.exit(130)
