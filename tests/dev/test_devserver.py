"""The development SMTP server (``DevServer`` and ``mailworker devserver``), checked with
plain ``smtplib`` and with mailworker's own session."""

from __future__ import annotations

import mailbox
import os
import re
import signal
import smtplib
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailworker.cli import main
from mailworker.dev.server import DevServer
from mailworker.smtp import SMTPSession
from mailworker.smtp.profile import Profile

ServerFactory = Callable[..., DevServer]
#: Our EHLO name; passing it avoids smtplib's slow socket.getfqdn().
EHLO_NAME = "client.example"
MESSAGE = b"From: a@example.com\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.fixture
def dev_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Factory: ``dev_server(**options)`` starts a DevServer on a free port with its
    maildir in ``tmp_path`` (or at ``maildir=``); every server is stopped after the test."""
    servers: list[DevServer] = []

    def create(maildir: Path | None = None, **options: object) -> DevServer:
        options.setdefault("port", 0)
        maildir = maildir or tmp_path / f"mail{len(servers)}"
        server = DevServer(maildir, **options)  # type: ignore[arg-type]
        servers.append(server)
        return server.start()

    yield create
    for server in servers:
        server.stop()


def connect(server: DevServer) -> smtplib.SMTP:
    """A plain smtplib connection to ``server``."""
    return smtplib.SMTP("127.0.0.1", server.port, local_hostname=EHLO_NAME, timeout=5)


def stored(server: DevServer) -> list[bytes]:
    """The maildir's messages, as bytes, oldest first."""
    keys = sorted(server.maildir.keys())
    return [server.maildir.get_bytes(key) for key in keys]


class TestDelivery:
    """Accepted messages are written to the maildir, one file each."""

    def test_writes_maildir(self, dev_server: ServerFactory) -> None:
        """The message lands in new/ with Return-Path and Delivered-To in front of it."""
        events: list[str] = []
        server = dev_server(on_event=events.append)
        with connect(server) as client:
            assert (
                client.sendmail("a@example.com", ["b@example.org", "c@example.org"], MESSAGE) == {}
            )
        [raw] = stored(server)
        head, _, content = raw.partition(b"Received: ")
        assert head.splitlines() == [
            b"Return-Path: <a@example.com>",
            b"Delivered-To: b@example.org",
            b"Delivered-To: c@example.org",
        ]
        assert content.split(b"\n", 1)[1] == MESSAGE.replace(b"\r\n", b"\n")
        assert len(os.listdir(server.maildir_path / "new")) == 1
        [line] = events
        assert "accepted  from=<a@example.com> to=b@example.org,c@example.org subject='hi'" in line
        assert "conn=1 clear auth=-" in line
        counters = server.counters
        assert (counters.connections, counters.messages, counters.quits) == (1, 1, 1)

    def test_offers_pipelining_and_no_auth(self, dev_server: ServerFactory) -> None:
        """EHLO offers PIPELINING and ENHANCEDSTATUSCODES, and no AUTH without --auth."""
        server = dev_server()
        with connect(server) as client:
            client.ehlo()
            assert client.has_extn("pipelining")
            assert client.has_extn("enhancedstatuscodes")
            assert not client.has_extn("auth")
            assert not client.has_extn("starttls")

    def test_mailworker_session_reuses_one_connection(self, dev_server: ServerFactory) -> None:
        """mailworker's session sends three messages over one connection (pipelined)."""
        server = dev_server(tls="starttls", auth=("dev", "s3cret pass"))
        profile = Profile.from_url(server.url())
        with SMTPSession(profile) as session:
            for i in range(3):
                result = session.send("a@example.com", [f"u{i}@example.org"], MESSAGE)
                assert result.accepted == [f"u{i}@example.org"]
                assert result.reply.enhanced_code == "2.0.0"
        assert len(server.maildir) == 3
        assert server.counters.summary() == "3 messages over 1 connection (1 TLS session, 1 AUTH)"
        assert server.counters.quits == 1


class TestMaildir:
    """The maildir may be new, an empty directory or an existing Maildir; nothing else."""

    def test_existing_empty_directory(self, dev_server: ServerFactory, tmp_path: Path) -> None:
        """In a directory made beforehand (``mkdir mail``) messages are delivered to new/."""
        maildir = tmp_path / "mail"
        maildir.mkdir()
        server = dev_server(maildir)
        with SMTPSession(Profile.from_url(server.url("127.0.0.1"))) as session:
            result = session.send("a@example.com", ["b@example.org"], MESSAGE)
        assert result.reply.code == 250
        [name] = os.listdir(maildir / "new")
        assert (maildir / "new" / name).read_bytes().endswith(b"Subject: hi\n\nbody\n")
        assert sorted(os.listdir(maildir)) == ["cur", "new", "tmp"]

    def test_existing_maildir_is_kept(self, dev_server: ServerFactory, tmp_path: Path) -> None:
        """Messages already in a Maildir stay, and new ones are added beside them."""
        mailbox.Maildir(tmp_path / "mail").add(MESSAGE)
        server = dev_server(tmp_path / "mail")
        with connect(server) as client:
            client.sendmail("a@example.com", ["b@example.org"], MESSAGE)
        assert len(os.listdir(tmp_path / "mail" / "new")) == 2

    def test_refuses_other_directory(self, tmp_path: Path) -> None:
        """A directory holding other files is refused, untouched, with what to do instead."""
        (tmp_path / "notes.txt").write_text("mine")
        with pytest.raises(ValueError, match="neither empty nor a Maildir") as caught:
            DevServer(tmp_path, port=0)
        assert "notes.txt" in str(caught.value)
        assert "give a new or empty directory, or an existing Maildir" in str(caught.value)
        assert os.listdir(tmp_path) == ["notes.txt"]


class TestRefusals:
    """Recipients matching a pattern are rejected or deferred."""

    def test_reject_by_pattern(self, dev_server: ServerFactory) -> None:
        """A recipient matching --reject gets 550 5.1.1 (case-insensitively); others pass."""
        server = dev_server(reject=["*@bounce.example"])
        with connect(server) as client:
            refused = client.sendmail(
                "a@example.com", ["X@Bounce.Example", "ok@example.org"], MESSAGE
            )
        assert list(refused) == ["X@Bounce.Example"]
        code, text = refused["X@Bounce.Example"]
        assert (code, text.split()[0]) == (550, b"5.1.1")
        [raw] = stored(server)
        assert b"Delivered-To: ok@example.org\n" in raw
        assert b"bounce" not in raw.split(b"Received:")[0]
        assert server.counters.rejected == 1

    def test_defer_every_time(self, dev_server: ServerFactory) -> None:
        """A recipient matching --defer gets 451 4.2.0 on every attempt."""
        server = dev_server(defer=["slow@*"])
        with connect(server) as client:
            for _ in range(2):
                with pytest.raises(smtplib.SMTPRecipientsRefused) as caught:
                    client.sendmail("a@example.com", ["slow@example.org"], MESSAGE)
                code, text = caught.value.recipients["slow@example.org"]
                assert (code, text.split()[0]) == (451, b"4.2.0")
        assert len(server.maildir) == 0
        assert server.counters.deferred == 2

    def test_defer_once(self, dev_server: ServerFactory) -> None:
        """A recipient matching --defer-once is deferred the first time only, per address."""
        server = dev_server(defer_once=["grey*@example.org"])
        with connect(server) as client:
            for address in ("grey1@example.org", "grey2@example.org"):
                with pytest.raises(smtplib.SMTPRecipientsRefused):
                    client.sendmail("a@example.com", [address], MESSAGE)
                assert client.sendmail("a@example.com", [address], MESSAGE) == {}
        assert len(server.maildir) == 2
        assert server.counters.deferred == 2


class TestTLSAndAuth:
    """TLS with the certificate made at start, and AUTH only where it is safe."""

    def test_starttls_and_auth_with_the_ca(self, dev_server: ServerFactory, tmp_path: Path) -> None:
        """Clients that trust the written CA file get STARTTLS, then AUTH, then send."""
        server = dev_server(tls="starttls", auth=("dev", "pw"))
        assert server.ca_file == tmp_path / "mail0-ca.pem"
        assert f"ca_file={server.ca_file}" in server.url()
        context = ssl.create_default_context(cafile=str(server.ca_file))
        with smtplib.SMTP("localhost", server.port, local_hostname=EHLO_NAME, timeout=5) as client:
            client.ehlo()
            assert not client.has_extn("auth")  # not before TLS
            assert client.mail("a@example.com")[0] == 530  # nothing without AUTH
            client.rset()
            client.starttls(context=context)
            client.ehlo()
            assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
            client.login("dev", "pw")
            assert client.sendmail("a@example.com", ["b@example.org"], MESSAGE) == {}
        [raw] = stored(server)
        assert b" with ESMTPSA; " in raw
        counters = server.counters
        assert (counters.tls_sessions, counters.auths, counters.messages) == (1, 1, 1)

    def test_wrong_password(self, dev_server: ServerFactory) -> None:
        """Wrong credentials get 535 and are counted."""
        server = dev_server(tls="implicit", auth=("dev", "pw"))
        context = ssl.create_default_context(cafile=str(server.ca_file))
        with smtplib.SMTP_SSL(
            "localhost", server.port, local_hostname=EHLO_NAME, timeout=5, context=context
        ) as client:
            client.ehlo()
            client.user, client.password = "dev", "nope"
            with pytest.raises(smtplib.SMTPAuthenticationError) as caught:
                client.auth("PLAIN", client.auth_plain)
            assert caught.value.smtp_code == 535
        assert server.counters.auth_failures == 1
        assert server.counters.tls_sessions == 1

    def test_untrusting_client_is_counted(self, dev_server: ServerFactory) -> None:
        """A client that does not trust the CA fails its handshake; the server carries on."""
        server = dev_server(tls="starttls")
        client = smtplib.SMTP("localhost", server.port, local_hostname=EHLO_NAME, timeout=5)
        with client, pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=ssl.create_default_context())
        deadline = time.monotonic() + 5
        while server.counters.tls_failures < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.counters.tls_failures == 1
        with connect(server) as client:
            assert client.noop()[0] == 250

    def test_stop_with_open_connection(self, dev_server: ServerFactory) -> None:
        """Stopping cuts open connections instead of waiting for them."""
        server = dev_server()
        client = connect(server)
        try:
            client.ehlo()
            started = time.monotonic()
            server.stop()
            assert time.monotonic() - started < 2
            with pytest.raises(smtplib.SMTPServerDisconnected):
                client.noop()
        finally:
            client.close()


class TestDevserverCommand:
    """``mailworker devserver`` runs until SIGTERM and says what it saw."""

    def test_serves_and_reports(self, tmp_path: Path) -> None:
        """It prints the CA path and a URL, one line per message, and counts at exit."""
        command = [
            sys.executable, "-c", "from mailworker.cli import main; main()", "devserver",
            "--port", "0", "--maildir", str(tmp_path / "mail"), "--tls", "starttls",
            "--auth", "dev:pw", "--reject", "*@bounce.example",
        ]  # fmt: skip
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            assert process.stdout is not None
            header = [process.stdout.readline() for _ in range(5)]
            match = re.match(r"mailworker devserver listening on 127\.0\.0\.1:(\d+) ", header[0])
            assert match, header
            port = int(match[1])
            ca_line = next(line for line in header if line.startswith("  CA "))
            ca_file = ca_line.split()[1]
            assert ca_file == str(tmp_path / "mail-ca.pem")
            url_line = next(line for line in header if line.startswith("  use "))
            assert f"smtp+starttls://dev:****@localhost:{port}?ca_file=" in url_line
            context = ssl.create_default_context(cafile=ca_file)
            with smtplib.SMTP("localhost", port, local_hostname=EHLO_NAME, timeout=5) as client:
                client.starttls(context=context)
                client.login("dev", "pw")
                client.sendmail("a@example.com", ["b@example.org", "c@bounce.example"], MESSAGE)
            process.send_signal(signal.SIGTERM)
            out, _ = process.communicate(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        assert process.returncode == 0
        assert "rejected  to=<c@bounce.example>" in out
        assert "accepted  from=<a@example.com> to=b@example.org subject='hi'" in out
        assert (
            "Stopped: 1 message over 1 connection (1 TLS session, 1 AUTH); 1 rejected, "
            "0 deferred, 0 failed AUTHs, 0 failed TLS handshakes, 1 QUITs." in out
        )
        [key] = mailbox.Maildir(tmp_path / "mail").keys()
        parsed = BytesParser(policy=default_policy).parsebytes(
            (tmp_path / "mail" / "new" / key).read_bytes()
        )
        assert parsed["Subject"] == "hi"

    def test_bad_auth_option(self) -> None:
        """--auth without a colon is a usage error."""
        result = CliRunner().invoke(main, ["devserver", "--auth", "justuser"])
        assert result.exit_code == 2
        assert "USER:PASSWORD" in result.stderr

    def test_maildir_not_empty(self, tmp_path: Path) -> None:
        """A --maildir that is neither empty nor a Maildir is a usage error naming it."""
        (tmp_path / "notes.txt").write_text("mine")
        result = CliRunner().invoke(main, ["devserver", "--port", "0", "--maildir", str(tmp_path)])
        assert result.exit_code == 2
        assert "Invalid value for '--maildir'" in result.stderr
        assert "neither empty nor a Maildir" in result.stderr
        assert "Traceback" not in result.output

    def test_port_taken(self, dev_server: ServerFactory, tmp_path: Path) -> None:
        """A port in use is a one-line error, not a traceback."""
        busy = dev_server()
        result = CliRunner().invoke(
            main, ["devserver", "--port", str(busy.port), "--maildir", str(tmp_path / "m")]
        )
        assert result.exit_code == 1
        assert f"cannot listen on 127.0.0.1:{busy.port}" in result.stderr

    def test_missing_extra(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without aiosmtpd the command says exactly what to install."""
        monkeypatch.setitem(sys.modules, "aiosmtpd", None)
        monkeypatch.setitem(sys.modules, "aiosmtpd.smtp", None)
        monkeypatch.setitem(sys.modules, "aiosmtpd.controller", None)
        for name in ("mailworker.dev.server", "mailworker.dev._smtp", "mailworker.dev.demo"):
            monkeypatch.delitem(sys.modules, name, raising=False)
        for command in ("devserver", "demo"):
            result = CliRunner().invoke(main, [command])
            assert result.exit_code == 1
            assert 'pip install "mailworker[devserver]"' in result.stderr
