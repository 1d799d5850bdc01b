"""The test servers themselves work, checked with plain ``smtplib`` and ``redis``."""

from __future__ import annotations

import base64
import json
import smtplib
import ssl
import threading
from collections.abc import Callable

import pytest
import redis

from tests.servers import (
    DEFAULT_PASSWORD,
    DEFAULT_TOKEN,
    DEFAULT_USER,
    XOAUTH2_ERROR,
    RedisServer,
    ScriptConnection,
    ScriptedServer,
    SMTPServer,
    TLSMaterials,
    xoauth2_string,
)

#: Our EHLO name; passing it avoids smtplib's slow socket.getfqdn().
EHLO_NAME = "client.example"
MESSAGE = (
    b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hi\r\n\r\n"
    b".leading dot survives\r\nbody \xc3\xa9\r\n"
)

SMTPFactory = Callable[..., SMTPServer]
ScriptedFactory = Callable[..., ScriptedServer]


def connect(server: SMTPServer | ScriptedServer, timeout: float = 5.0) -> smtplib.SMTP:
    """Open a plain smtplib connection to ``server``."""
    return smtplib.SMTP(server.host, server.port, local_hostname=EHLO_NAME, timeout=timeout)


class TestSMTPRecording:
    """The SMTP server records messages, connections and commands."""

    def test_records_exact_bytes_and_envelope(self, smtp_server: SMTPFactory) -> None:
        """A message is recorded byte for byte, with envelope and MAIL options."""
        server = smtp_server()
        assert server.handler.connections == 0  # Controller's start-up probe is not counted
        with connect(server) as client:
            refused = client.sendmail(
                "a@example.com",
                ["b@example.com", "c@example.com"],
                MESSAGE,
                mail_options=["BODY=8BITMIME"],
            )
        assert refused == {}
        [message] = server.handler.wait_for_messages(1)
        assert message.content == MESSAGE
        assert message.mail_from == "a@example.com"
        assert message.rcpt_tos == ("b@example.com", "c@example.com")
        assert "BODY=8BITMIME" in message.mail_options
        assert message.reply == f"250 OK: queued as {message.queue_id}"
        assert not message.tls
        assert message.auth_user is None
        assert message.parsed()["Subject"] == "hi"
        counts = server.handler.counts
        assert (counts["connections"], counts["MAIL"], counts["RCPT"], counts["DATA"]) == (
            1,
            1,
            2,
            1,
        )

    def test_one_connection_id_per_session(self, smtp_server: SMTPFactory) -> None:
        """Messages sent over one held-open session share a connection id."""
        server = smtp_server()
        with connect(server) as client:
            client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
            client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        with connect(server) as client:
            client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        ids = [m.connection_id for m in server.handler.wait_for_messages(3)]
        assert ids[0] == ids[1] != ids[2]
        assert server.handler.connections == 2

    def test_restart_keeps_port_and_records(self, smtp_server: SMTPFactory) -> None:
        """restart() drops open sessions and comes back on the same port with the same handler."""
        server = smtp_server()
        port = server.port
        client = connect(server)
        client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        server.restart()
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
        client.close()
        assert server.port == port
        with connect(server) as again:
            again.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        assert len(server.handler.messages) == 2

    def test_drop_connections(self, smtp_server: SMTPFactory) -> None:
        """drop_connections() cuts held-open sessions while the server keeps listening."""
        server = smtp_server()
        client = connect(server)
        client.noop()
        assert server.active_connections == 1
        server.drop_connections()
        assert server.active_connections == 0
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
        client.close()
        with connect(server) as again:
            assert again.noop()[0] == 250


class TestSMTPTLS:
    """STARTTLS and implicit TLS with verified, wrong-host, untrusted and expired certificates."""

    def test_starttls_verified(self, smtp_server: SMTPFactory, tls_ca: TLSMaterials) -> None:
        """STARTTLS verifies against the CA file and is counted and recorded."""
        server = smtp_server(tls="starttls")
        context = ssl.create_default_context(cafile=str(tls_ca.ca_file))
        with connect(server) as client:
            client.starttls(context=context)
            client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        [message] = server.handler.wait_for_messages(1)
        assert message.tls
        assert server.handler.tls_handshakes == 1

    def test_implicit_tls_verified(self, smtp_server: SMTPFactory, tls_ca: TLSMaterials) -> None:
        """Implicit TLS verifies, and AUTH is offered over it."""
        server = smtp_server(tls="implicit", auth=True)
        with smtplib.SMTP_SSL(
            server.host,
            server.port,
            local_hostname=EHLO_NAME,
            context=tls_ca.client_context(),
            timeout=5,
        ) as client:
            client.login(DEFAULT_USER, DEFAULT_PASSWORD)
            client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        [message] = server.handler.wait_for_messages(1)
        assert message.tls
        assert message.auth_user == DEFAULT_USER
        assert server.handler.tls_handshakes == 1

    @pytest.mark.parametrize("cert", ["wrong_host", "untrusted", "expired"])
    def test_bad_certificates_fail_verification(
        self, smtp_server: SMTPFactory, tls_ca: TLSMaterials, cert: str
    ) -> None:
        """A verifying client refuses each bad certificate; the server counts the failure."""
        server = smtp_server(tls="starttls", cert=cert)
        with connect(server) as client, pytest.raises(ssl.SSLCertVerificationError):
            client.starttls(context=tls_ca.client_context())
        server.handler.wait_for_count("tls_failures", 1)
        assert server.handler.tls_handshakes == 0

    def test_wrong_host_name_by_ip(self, smtp_server: SMTPFactory, tls_ca: TLSMaterials) -> None:
        """The good certificate also matches 127.0.0.1 (IP SAN) and localhost."""
        server = smtp_server(tls="implicit")
        for name in ("127.0.0.1", "localhost"):
            with smtplib.SMTP_SSL(
                name, server.port, local_hostname=EHLO_NAME, context=tls_ca.client_context()
            ) as client:
                assert client.noop()[0] == 250

    def test_require_starttls(self, smtp_server: SMTPFactory) -> None:
        """With require_starttls, MAIL before STARTTLS gets 530."""
        server = smtp_server(tls="starttls", require_starttls=True)
        with connect(server) as client:
            client.ehlo()
            assert client.mail("a@example.com")[0] == 530


class TestSMTPAuth:
    """AUTH LOGIN, PLAIN, CRAM-MD5 and XOAUTH2 with right and wrong credentials."""

    @pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN", "CRAM-MD5"])
    def test_password_mechanisms(self, smtp_server: SMTPFactory, mechanism: str) -> None:
        """Each password mechanism accepts the right password and refuses a wrong one with 535."""
        server = smtp_server(auth=True)
        authobject = {"LOGIN": "auth_login", "PLAIN": "auth_plain", "CRAM-MD5": "auth_cram_md5"}
        with connect(server) as client:
            client.ehlo()
            client.user, client.password = DEFAULT_USER, "wrong"
            with pytest.raises(smtplib.SMTPAuthenticationError) as failure:
                client.auth(mechanism, getattr(client, authobject[mechanism]))
            assert failure.value.args == (535, b"5.7.8 Authentication credentials invalid")
            client.password = DEFAULT_PASSWORD
            assert client.auth(mechanism, getattr(client, authobject[mechanism]))[0] == 235
        assert [(a.mechanism, a.success) for a in server.handler.logins] == [
            (mechanism, False),
            (mechanism, True),
        ]
        assert server.handler.counts["auth_attempts"] == 2
        assert server.handler.counts["auth_successes"] == 1

    def test_xoauth2(self, smtp_server: SMTPFactory) -> None:
        """XOAUTH2 fails like Gmail (334 JSON, then 535 after an empty line), then succeeds."""
        server = smtp_server(auth=True)
        with connect(server) as client:
            client.ehlo()
            code, reply = client.docmd("AUTH", "XOAUTH2 " + xoauth2_string(DEFAULT_USER, "bad"))
            assert code == 334
            assert json.loads(base64.b64decode(reply)) == XOAUTH2_ERROR
            code, reply = client.docmd("")
            assert code == 535
            assert reply.startswith(b"5.7.8")
            assert client.docmd("AUTH", "XOAUTH2") == (334, b"")  # no initial response
            assert client.docmd(xoauth2_string(DEFAULT_USER, DEFAULT_TOKEN))[0] == 235

    def test_mechanisms_and_auth_required(self, smtp_server: SMTPFactory) -> None:
        """Only the chosen mechanisms are offered; MAIL before AUTH gets 530."""
        server = smtp_server(auth=True, mechanisms=["XOAUTH2"])
        with connect(server) as client:
            client.ehlo()
            assert client.esmtp_features["auth"].split() == ["XOAUTH2"]
            assert client.mail("a@example.com")[0] == 530

    @pytest.mark.smtpd_options(tls="starttls", auth=True)
    def test_auth_only_after_starttls(self, smtpd: SMTPServer, tls_ca: TLSMaterials) -> None:
        """A STARTTLS server offers AUTH only after TLS (options from the smtpd marker)."""
        with connect(smtpd) as client:
            client.ehlo()
            assert not client.has_extn("auth")
            assert client.docmd("AUTH", "PLAIN")[0] == 538
            client.starttls(context=tls_ca.client_context())
            client.ehlo()
            assert client.has_extn("auth")
            client.login(DEFAULT_USER, DEFAULT_PASSWORD)
        assert smtpd.handler.logins[-1].success

    def test_no_auth_by_default(self, smtp_server: SMTPFactory, tls_ca: TLSMaterials) -> None:
        """Without auth=True no AUTH keyword is advertised."""
        server = smtp_server(tls="starttls")
        with connect(server) as client:
            client.starttls(context=tls_ca.client_context())
            client.ehlo()
            assert not client.has_extn("auth")


class TestSMTPFaults:
    """Fault injection on the SMTP server."""

    def test_rcpt_replies(self, smtp_server: SMTPFactory) -> None:
        """A per-recipient reply refuses that recipient only, every time."""
        server = smtp_server()
        server.handler.rcpt_replies["Bad@Example.com"] = "550 5.1.1 no such user"
        with connect(server) as client:
            for _ in range(2):
                refused = client.sendmail(
                    "a@example.com", ["b@example.com", "bad@example.com"], MESSAGE
                )
                assert refused == {"bad@example.com": (550, b"5.1.1 no such user")}
        assert [m.rcpt_tos for m in server.handler.messages] == [("b@example.com",)] * 2

    def test_once_replies(self, smtp_server: SMTPFactory) -> None:
        """The *_once replies apply to the next matching command only."""
        server = smtp_server()
        handler = server.handler
        handler.rcpt_replies_once["b@example.com"] = "451 4.3.0 try later"
        handler.data_reply_once = "451 4.3.0 queue full"
        with connect(server) as client:
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
            with pytest.raises(smtplib.SMTPDataError) as failure:
                client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
            assert failure.value.smtp_code == 451
            client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        assert len(handler.messages) == 1
        assert [m.reply for m in handler.rejected] == ["451 4.3.0 queue full"]

    def test_mail_reply_421_closes(self, smtp_server: SMTPFactory) -> None:
        """An injected 421 is sent and the server then closes the connection."""
        server = smtp_server()
        server.handler.mail_reply = "421 4.3.2 shutting down"
        client = connect(server)
        client.ehlo()
        assert client.mail("a@example.com")[0] == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
        client.close()

    def test_ehlo_extra_and_remove(self, smtp_server: SMTPFactory) -> None:
        """EHLO keywords can be added, replaced (SIZE) and removed; enhanced codes follow."""
        server = smtp_server()
        server.handler.ehlo_extra = ["PIPELINING", "ENHANCEDSTATUSCODES", "SIZE 1000"]
        server.handler.ehlo_remove = {"SMTPUTF8"}
        with connect(server) as client:
            client.ehlo()
            assert client.has_extn("pipelining")
            assert client.has_extn("enhancedstatuscodes")
            assert client.esmtp_features["size"] == "1000"
            assert not client.has_extn("smtputf8")
            assert client.mail("a@example.com") == (250, b"2.1.0 OK")

    def test_slow_data_reply(self, smtp_server: SMTPFactory) -> None:
        """DATA slower than the client timeout: the client gives up, the server has the message."""
        server = smtp_server()
        server.handler.command_delays["DATA"] = 0.4
        with pytest.raises(smtplib.SMTPServerDisconnected), connect(server, 0.1) as client:
            client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        assert len(server.handler.wait_for_messages(1)) == 1

    def test_reply_delay(self, smtp_server: SMTPFactory) -> None:
        """reply_delay slows every reply, the greeting included."""
        server = smtp_server()
        server.handler.reply_delay = 0.3
        with pytest.raises(smtplib.SMTPServerDisconnected):
            connect(server, 0.1)


class TestScriptedServer:
    """The scripted server plays faults a real server never produces."""

    def test_421_greeting(self, scripted_server: ScriptedFactory) -> None:
        """A 421 greeting makes smtplib refuse the connection."""
        server = scripted_server(lambda conn: conn.send("421 4.3.2 too busy"))
        with pytest.raises(smtplib.SMTPConnectError) as failure:
            connect(server)
        assert failure.value.smtp_code == 421

    def test_multiline_and_garbage(self, scripted_server: ScriptedFactory) -> None:
        """Scripts can send mismatched multi-line replies and garbage; client lines are recorded."""

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo()
            conn.expect("MAIL FROM:", "250-2.1.0 first line\r\n550 5.7.1 last line")
            conn.expect("NOOP", "this is not SMTP")
            conn.expect("QUIT", "221 bye")

        server = scripted_server(script)
        with connect(server) as client:
            client.ehlo()
            assert client.mail("a@example.com") == (550, b"2.1.0 first line\n5.7.1 last line")
            assert client.noop()[0] == -1
        assert server.received == [f"ehlo {EHLO_NAME}", "mail FROM:<a@example.com>", "noop", "QUIT"]

    def test_drop_mid_data(self, scripted_server: ScriptedFactory) -> None:
        """Closing the connection during DATA makes the client see a disconnect."""

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo()
            conn.expect("MAIL", "250 ok")
            conn.expect("RCPT", "250 ok")
            conn.expect("DATA", "354 go ahead")
            conn.readline()
            conn.close()

        server = scripted_server(script)
        with pytest.raises(smtplib.SMTPServerDisconnected), connect(server) as client:
            client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        assert server.received[-1] == "From: a@example.com"

    def test_data_end_and_never_reply(self, scripted_server: ScriptedFactory) -> None:
        """read_until_data_end returns the payload as sent; a silent server times the client out."""

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo()
            conn.expect("MAIL", "250 ok")
            conn.expect("RCPT", "250 ok")
            conn.expect("DATA", "354 go ahead")
            conn.read_until_data_end()
            conn.wait_for_close()

        server = scripted_server(script)
        with pytest.raises(smtplib.SMTPServerDisconnected), connect(server, 0.2) as client:
            client.sendmail("a@example.com", ["b@example.com"], MESSAGE)
        [conn] = server.wait_for_connections(1)
        server.stop()
        assert conn.data == [MESSAGE.replace(b"\r\n.leading", b"\r\n..leading")]

    def test_tls(self, scripted_server: ScriptedFactory, tls_ca: TLSMaterials) -> None:
        """Scripts can serve implicit TLS and STARTTLS with the test certificates."""

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo(extensions=["STARTTLS"])
            conn.expect("STARTTLS")
            conn.starttls()
            conn.expect("EHLO", "250 localhost")
            conn.expect("QUIT", "221 bye")

        with connect(scripted_server(script)) as client:
            client.starttls(context=tls_ca.client_context())
            client.ehlo()
        implicit = scripted_server(
            lambda conn: (conn.send("220 hi"), conn.expect("EHLO", "250 x")), tls="implicit"
        )
        with smtplib.SMTP_SSL(
            implicit.host, implicit.port, local_hostname=EHLO_NAME, context=tls_ca.client_context()
        ) as client:
            client.ehlo()

    def test_script_errors_surface_and_threads_stop(self) -> None:
        """A failing script is reported by check(), and stop() leaves no thread behind."""

        def script(conn: ScriptConnection) -> None:
            conn.send("220 hi")
            conn.expect("HELO")

        before = set(threading.enumerate())
        with ScriptedServer(script) as server:
            client = connect(server)
            with pytest.raises(smtplib.SMTPServerDisconnected):
                client.ehlo()  # the script fails on EHLO and hangs up
            client.close()
        assert set(threading.enumerate()) <= before
        with pytest.raises(AssertionError, match="expected 'HELO'"):
            server.check()


class TestRedis:
    """The session Redis server and private ones."""

    def test_redis_url_is_own_empty_db(self, redis_url: str, redis_client: redis.Redis) -> None:
        """redis_url names an empty database other than 0 on 127.0.0.1."""
        assert redis_url.startswith("redis://127.0.0.1:")
        assert not redis_url.endswith("/0")
        assert redis_client.dbsize() == 0
        redis_client.set("key", "value")
        assert redis_client.get("key") == b"value"

    def test_restart_same_port(self, redis_server_factory: Callable[..., RedisServer]) -> None:
        """A private server restarts on the same port, empty."""
        server = redis_server_factory()
        port = server.port
        client = server.client()
        client.set("key", "value")
        server.restart()
        assert server.port == port
        assert server.running
        assert client.get("key") is None  # redis-py reconnects; no persistence
        client.close()
        server.stop()
        assert not server.running
