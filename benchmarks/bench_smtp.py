"""SMTP client throughput and round trips, measured side by side in one run.

    python benchmarks/bench_smtp.py [--messages 400] [--latency-ms 0,5]

A small asyncio SMTP sink runs in its own process (STARTTLS + AUTH PLAIN, with
or without PIPELINING). It answers everything it has read in one write and
counts those "turns": one turn is one round trip the client waited for. An
optional per-turn delay stands in for network latency.

Compared, for one-recipient messages over STARTTLS + AUTH:

- smtplib, a new connection per message (what many task wrappers do);
- smtplib, one held connection (`sendmail` in a loop);
- mailworker's SMTPSession against a server without PIPELINING (lock-step);
- mailworker's SMTPSession against a server with PIPELINING.

Prints msg/s, turns per message and client CPU per message, and the ratios
against smtplib's held connection. Figures vary with the machine; the ratios
measured in one run are what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import smtplib
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import structlog

from mailworker import Profile, SMTPSession

USER, PASSWORD = "bench", "bench-password"
MESSAGE = (
    b"From: app@example.com\r\nTo: ann@example.org\r\nSubject: benchmark\r\n\r\n"
    + b"Hello, this is a benchmark message.\r\n" * 20
)


def _serve(port: int, cert_dir: str, pipelining: bool, delay: float, turns: object) -> None:
    """The sink: one coroutine per connection, replies batched per read."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(f"{cert_dir}/cert.pem")
    ehlo = ["250-sink.example", "250-STARTTLS", "250-AUTH PLAIN", "250-SIZE 10000000"]
    if pipelining:
        ehlo.append("250-PIPELINING")
    ehlo.append("250 8BITMIME")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        in_data = False
        buffered = b""
        writer.write(b"220 sink.example ESMTP\r\n")
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            buffered += chunk
            replies: list[str] = []
            starttls = False
            # Take every complete line already received: a pipelining client
            # gets all its replies in one write, a lock-step one gets one.
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                if in_data:
                    if line.rstrip(b"\r") == b".":
                        in_data = False
                        replies.append("250 2.0.0 Ok: queued as BENCH")
                    continue
                verb = line[:4].upper()
                if verb == b"EHLO":
                    replies.extend(ehlo)
                elif verb == b"STAR":
                    replies.append("220 2.0.0 Ready to start TLS")
                    starttls = True
                elif verb == b"AUTH":
                    replies.append("235 2.7.0 Authentication successful")
                elif verb == b"DATA":
                    replies.append("354 End data with <CR><LF>.<CR><LF>")
                    in_data = True
                elif verb == b"QUIT":
                    replies.append("221 2.0.0 Bye")
                else:
                    replies.append("250 2.0.0 Ok")
            if replies:
                turns.value += 1  # type: ignore[attr-defined]
                if delay:
                    await asyncio.sleep(delay)
                writer.write("".join(r + "\r\n" for r in replies).encode())
                await writer.drain()
                if starttls:
                    await writer.start_tls(context)
                if replies[-1].startswith("221"):
                    break
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class Sink:
    """The sink in a child process, with its turn counter."""

    def __init__(self, cert_dir: str, *, pipelining: bool, delay: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.turns = multiprocessing.Value("l", 0)
        self.process = multiprocessing.Process(
            target=_serve, args=(self.port, cert_dir, pipelining, delay, self.turns), daemon=True
        )

    def __enter__(self) -> Sink:
        self.process.start()
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sink did not start")

    def __exit__(self, *_: object) -> None:
        self.process.terminate()
        self.process.join()


def smtplib_new_connection(port: int, ctx: ssl.SSLContext, n: int) -> None:
    for _ in range(n):
        with smtplib.SMTP("localhost", port, local_hostname="bench.example") as s:
            s.starttls(context=ctx)
            s.login(USER, PASSWORD)
            s.sendmail("app@example.com", ["ann@example.org"], MESSAGE)


def smtplib_held(port: int, ctx: ssl.SSLContext, n: int) -> None:
    with smtplib.SMTP("localhost", port, local_hostname="bench.example") as s:
        s.starttls(context=ctx)
        s.login(USER, PASSWORD)
        for _ in range(n):
            s.sendmail("app@example.com", ["ann@example.org"], MESSAGE)


def mailworker_session(port: int, ca_file: str, n: int) -> None:
    profile = Profile.from_url(
        f"smtp+starttls://{USER}:{PASSWORD}@localhost:{port}"
        f"?ca_file={ca_file}&local_hostname=bench.example&max_messages={n + 1}"
    )
    with SMTPSession(profile) as session:
        for _ in range(n):
            session.send("app@example.com", ["ann@example.org"], MESSAGE)


def measure(
    name: str, run: Callable[[int], None], sink: Sink, n: int
) -> tuple[str, float, float, float]:
    run(5)  # warm up: imports, TLS context, first connection
    sink.turns.value = 0  # type: ignore[attr-defined]
    wall, cpu = time.perf_counter(), time.process_time()
    run(n)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return name, n / wall, sink.turns.value / n, cpu / n * 1000  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--latency-ms", default="0,5", help="per-turn delays to try")
    args = parser.parse_args()

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # silence events
    ca = trustme.CA()
    with tempfile.TemporaryDirectory() as tmp:
        ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
            f"{tmp}/cert.pem"
        )
        ca_file = f"{tmp}/ca.pem"
        ca.cert_pem.write_to_path(ca_file)
        ctx = ssl.create_default_context(cafile=ca_file)
        for latency in (float(x) / 1000 for x in args.latency_ms.split(",")):
            n = args.messages if latency == 0 else max(40, int(args.messages / 10))
            rows = []
            with Sink(tmp, pipelining=False, delay=latency) as plain:
                port = plain.port
                rows.append(
                    measure(
                        "smtplib, new connection per message",
                        lambda k, p=port: smtplib_new_connection(p, ctx, k),
                        plain,
                        n,
                    )
                )
                rows.append(
                    measure(
                        "smtplib, held connection",
                        lambda k, p=port: smtplib_held(p, ctx, k),
                        plain,
                        n,
                    )
                )
                rows.append(
                    measure(
                        "mailworker, lock-step (no PIPELINING)",
                        lambda k, p=port: mailworker_session(p, ca_file, k),
                        plain,
                        n,
                    )
                )
            with Sink(tmp, pipelining=True, delay=latency) as piped:
                pport = piped.port
                rows.append(
                    measure(
                        "mailworker, PIPELINING",
                        lambda k, p=pport: mailworker_session(p, ca_file, k),
                        piped,
                        n,
                    )
                )
            base = rows[1][1]
            print(f"\n{n} messages, STARTTLS + AUTH, {latency * 1000:g} ms added per round trip")
            print(f"{'client':40} {'msg/s':>9} {'RTT/msg':>8} {'CPU ms/msg':>11} {'vs held':>8}")
            for name, rate, turns, cpu_ms in rows:
                print(f"{name:40} {rate:9.1f} {turns:8.2f} {cpu_ms:11.3f} {rate / base:7.2f}x")


if __name__ == "__main__":
    main()
