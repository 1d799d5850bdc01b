"""The servers benchmarks/perf.py measures against, all on 127.0.0.1 random ports.

- :class:`Postfix`: a private Postfix instance (Debian's package, its own config,
  queue and data directories) whose smtpd discards every message it accepts
  (PIPELINING, CHUNKING, no TLS, no AUTH);
- :class:`Sink`: an asyncio SMTP sink in a child process in bench_smtp.py's style
  (STARTTLS, AUTH PLAIN, PIPELINING, replies batched per read), counting messages
  and the time of the last one; it also counts UDP datagrams (the no-op task's
  "I ran");
- :class:`Proxy`: a latency-injecting TCP proxy in a child process;
- :class:`Redis`: a private redis-server without persistence.
"""

# ruff: noqa: S603 -- every command run here is built from fixed paths and our own values

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import redis
from _perf_procs import (
    cpu_seconds,
    free_port,
    on_stop,
    spawn,
    stop,
    wait_port,
)

USER, PASSWORD = "bench", "bench-password"
POSTFIX_MASTER = "/usr/lib/postfix/sbin/master"
_ctx = multiprocessing.get_context("fork")


class _Child:
    """A multiprocessing child, terminated by :func:`_perf_procs.stop_all`."""

    process: Any

    def _start(self, target: Any, args: tuple[Any, ...]) -> None:
        self.process = _ctx.Process(target=target, args=args, daemon=True)
        self.process.start()
        on_stop(self.close)

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)

    def cpu(self) -> float:
        return cpu_seconds([self.process.pid], reaped=False)


# -- the STARTTLS + AUTH sink ------------------------------------------------------


def _serve_sink(port: int, udp_port: int, cert: str, counters: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert)
    ehlo = [
        "250-sink.example",
        "250-PIPELINING",
        "250-STARTTLS",
        "250-AUTH PLAIN",
        "250-SIZE 10000000",
        "250 8BITMIME",
    ]
    clock = time.monotonic

    def received() -> None:
        counters[0] += 1
        counters[1] = clock()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        in_data = False
        buffered = b""
        writer.write(b"220 sink.example ESMTP\r\n")
        try:
            while True:
                chunk = await reader.read(262144)
                if not chunk:
                    break
                lines = (buffered + chunk).split(b"\n")
                buffered = lines.pop()
                replies: list[str] = []
                starttls = False
                for line in lines:
                    if in_data:
                        if line in {b".\r", b"."}:
                            in_data = False
                            received()
                            replies.append("250 2.0.0 Ok: queued as BENCH")
                        continue
                    verb = line[:4].upper()
                    if verb in (b"EHLO", b"HELO"):
                        replies.extend(ehlo if verb == b"EHLO" else ["250 sink.example"])
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
                    writer.write("".join(r + "\r\n" for r in replies).encode())
                    await writer.drain()
                    if starttls:
                        await writer.start_tls(context)
                    if replies[-1].startswith("221"):
                        break
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    class Datagrams(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            received()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(Datagrams, local_addr=("127.0.0.1", udp_port))
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=512)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class Sink(_Child):
    """The STARTTLS + AUTH + PIPELINING sink; ``messages``/``last`` count what came."""

    def __init__(self, cert: str) -> None:
        self.port = free_port()
        self.udp_port = free_port()
        self.counters = _ctx.Array("d", 2, lock=False)
        self._start(_serve_sink, (self.port, self.udp_port, cert, self.counters))
        wait_port(self.port, 10, "the SMTP sink", self.process.is_alive)

    @property
    def messages(self) -> int:
        return int(self.counters[0])

    @property
    def last(self) -> float:
        """``time.monotonic()`` of the last message or datagram."""
        return float(self.counters[1])


# -- the latency proxy -------------------------------------------------------------


def _serve_proxy(routes: list[tuple[int, int]], one_way: float, turns: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops it

    async def pump(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        seen: Any,
    ) -> None:
        """Forward each read as one write, ``one_way`` seconds later, in order."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        sender = asyncio.create_task(deliver())
        try:
            while True:
                data = await reader.read(262144)
                if data:
                    seen()
                queue.put_nowait((loop.time() + one_way, data))
                if not data:
                    break
            await sender
        except (ConnectionError, OSError):
            sender.cancel()
        finally:
            writer.close()

    def handler(index: int, upstream: int) -> Any:
        async def handle(c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
            # The TCP handshake: one round trip before anything can be said.
            await asyncio.sleep(2 * one_way)
            turns[index] += 1
            try:
                s_reader, s_writer = await asyncio.open_connection("127.0.0.1", upstream)
            except OSError:
                c_writer.close()
                return
            last = ["server"]  # the greeting is no reply to the client

            def client_data() -> None:
                last[0] = "client"

            def server_data() -> None:
                # The server answers a client burst: the client waited one round trip.
                if last[0] == "client":
                    turns[index] += 1
                last[0] = "server"

            await asyncio.gather(
                pump(c_reader, s_writer, client_data),
                pump(s_reader, c_writer, server_data),
            )

        return handle

    async def main() -> None:
        servers = [
            await asyncio.start_server(handler(i, up), "127.0.0.1", port, backlog=512)
            for i, (port, up) in enumerate(routes)
        ]
        await asyncio.gather(*(s.serve_forever() for s in servers))

    asyncio.run(main())


class Proxy(_Child):
    """Adds ``rtt / 2`` each way (and one ``rtt`` at connect) in front of upstreams;
    ``turns(i)`` counts client turns through the ``i``-th route."""

    def __init__(self, upstreams: list[int], rtt: float) -> None:
        self.ports = [free_port() for _ in upstreams]
        self.turns = _ctx.Array("l", len(upstreams), lock=False)
        self._start(
            _serve_proxy, (list(zip(self.ports, upstreams, strict=True)), rtt / 2, self.turns)
        )
        for port in self.ports:
            wait_port(port, 10, "the latency proxy", self.process.is_alive)


# -- Postfix -----------------------------------------------------------------------

_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
"""

_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
meta_directory = /etc/postfix
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.perf.example
mydomain = perf.example
myorigin = perf.example
mydestination =
alias_maps =
alias_database =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
# Accept, then throw away: the message never reaches the queue manager.
smtpd_recipient_restrictions = check_client_access static:DISCARD
default_transport = discard
relay_transport = discard
local_transport = discard
# Without deliveries the queue manager hands out no tokens: no 1 s pause per message.
in_flow_delay = 0
smtpd_client_event_limit_exceptions = 127.0.0.0/8
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
maillog_file_prefixes = {base}
maillog_file = {base}/maillog
biff = no
"""


class Postfix:
    """A private Postfix whose smtpd on 127.0.0.1:``port`` discards what it accepts.

    Queue and data directories are on tmpfs (/dev/shm) when there is one. Needs root
    (the master runs as root and its daemons as the ``postfix`` user).
    """

    def __init__(self, work: Path) -> None:
        if os.geteuid() != 0:
            raise RuntimeError("a private Postfix instance needs root")
        if not os.access(POSTFIX_MASTER, os.X_OK):
            raise RuntimeError(f"{POSTFIX_MASTER} not found (apt-get install postfix)")
        shm = Path("/dev/shm")  # noqa: S108 -- a private, freshly made directory in it
        parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else work
        self.base = parent / f"mailworker-perf-postfix-{os.getpid()}"
        shutil.rmtree(self.base, ignore_errors=True)
        on_stop(lambda: shutil.rmtree(self.base, ignore_errors=True))
        for sub in ("etc", "queue", "data"):
            (self.base / sub).mkdir(parents=True)
        self.base.chmod(0o755)
        shutil.chown(self.base / "data", "postfix")
        self.port = free_port()
        etc = self.base / "etc"
        (etc / "main.cf").write_text(_MAIN_CF.format(base=self.base))
        (etc / "master.cf").write_text(_MASTER_CF.format(port=self.port))
        # Creates the queue's subdirectories with their owners and modes.
        subprocess.run(
            ["/usr/sbin/postfix", "-c", str(etc), "check"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        self.process = spawn([POSTFIX_MASTER, "-c", str(etc), "-d"], work / "postfix.out")
        on_stop(lambda: stop(self.process))
        wait_port(self.port, 20, "Postfix", lambda: self.process.poll() is None)

    @property
    def pid(self) -> int:
        return self.process.pid


# -- Redis -------------------------------------------------------------------------


class Redis:
    """redis-server on a random port: no RDB, no AOF, its own directory."""

    def __init__(self, work: Path) -> None:
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        self.port = free_port()
        directory = work / "redis"
        directory.mkdir()
        command = [
            server, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(directory), "--daemonize", "no",
        ]  # fmt: skip
        self.process = spawn(command, work / "redis.out")
        on_stop(lambda: stop(self.process))
        wait_port(self.port, 10, "redis-server", lambda: self.process.poll() is None)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.client = redis.Redis.from_url(self.url)

    def commands(self) -> int:
        """Commands Redis has run (INFO commandstats, every command's calls)."""
        stats = self.client.info("commandstats")
        return sum(int(v["calls"]) for v in stats.values())

    def cpu(self) -> float:
        return cpu_seconds([self.process.pid], reaped=False)

    def flush(self) -> None:
        self.client.flushall()


def smtp_source_rate(port: int, messages: int, sessions: int = 4) -> float | None:
    """Messages/s Postfix's smtp-source gets through ``port`` (2 KB, -d: held sessions)."""
    tool = "/usr/sbin/smtp-source"
    if not os.access(tool, os.X_OK):
        return None
    command = [
        tool, "-d", "-s", str(sessions), "-m", str(messages), "-l", "2000",
        "-f", "app@example.com", "-t", "ann@example.org", f"127.0.0.1:{port}",
    ]  # fmt: skip
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return messages / (time.monotonic() - started)


def cert_files(work: Path) -> tuple[str, str]:
    """(server cert+key PEM, CA PEM) for localhost/127.0.0.1, made with trustme."""
    import trustme  # noqa: PLC0415 -- only the benchmark needs it

    ca = trustme.CA()
    cert, ca_file = work / "cert.pem", work / "ca.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(cert)
    ca.cert_pem.write_to_path(ca_file)
    return str(cert), str(ca_file)


def udp_ping(port: int) -> None:  # pragma: no cover -- used by the no-op task
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"1", ("127.0.0.1", port))
