"""Transport security: implicit TLS, STARTTLS, and refusing anything unverified or in clear."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from mailworker import SMTPServerDisconnected, SMTPSession, SMTPTLSError
from tests.servers import (
    DEFAULT_USER,
    ScriptConnection,
    ScriptedServer,
    SMTPServer,
    TLSMaterials,
)
from tests.smtp.helpers import MESSAGE, RCPT, SENDER, ProfileFactory, smtp_script, verb

SMTPFactory = Callable[..., SMTPServer]
ScriptedFactory = Callable[..., ScriptedServer]


class TestImplicitTLS:
    """smtps:// speaks TLS from the first byte and verifies the server."""

    def test_delivers_over_tls(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A message sent over smtps:// arrives encrypted and authenticated."""
        server = smtp_server(tls="implicit", auth=True)
        with SMTPSession(make_profile(server, "smtps")) as session:
            result = session.send(SENDER, [RCPT], MESSAGE)
            info = session.info
        [message] = server.handler.wait_for_messages(1)
        assert message.tls
        assert message.auth_user == DEFAULT_USER
        assert message.content == MESSAGE
        assert result.accepted == [RCPT]
        assert info is not None
        assert info.tls["tls_version"] in ("TLSv1.2", "TLSv1.3")
        assert info.tls["cipher"]
        assert info.auth_mechanism is not None

    def test_tls_version_at_least_1_2(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """The negotiated TLS version is 1.2 or newer, and the session reports it."""
        server = smtp_server(tls="implicit")
        profile = make_profile(server, "smtps", credentials=False)
        with SMTPSession(profile) as session:
            assert session.info is not None
            version = session.info.tls["tls_version"]
        assert version in ("TLSv1.2", "TLSv1.3")


class TestStartTLS:
    """smtp+starttls:// upgrades the connection before anything else and never falls back."""

    def test_delivers_after_starttls(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """The message is sent over the upgraded connection, after a second EHLO."""
        server = smtp_server(tls="starttls", auth=True, require_starttls=True)
        with SMTPSession(make_profile(server, "smtp+starttls")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            assert session.info is not None
            assert session.info.tls["tls_version"] in ("TLSv1.2", "TLSv1.3")
            assert "AUTH" in " ".join(session.info.capabilities).upper()
        [message] = server.handler.wait_for_messages(1)
        assert message.tls
        assert message.auth_user == DEFAULT_USER
        assert server.handler.tls_handshakes == 1
        assert server.handler.counts["EHLO"] == 2

    def test_submission_alias(self, smtp_server: SMTPFactory, make_profile: ProfileFactory) -> None:
        """submission:// means the same as smtp+starttls://."""
        server = smtp_server(tls="starttls", auth=True, require_starttls=True)
        with SMTPSession(make_profile(server, "submission")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
        assert server.handler.wait_for_messages(1)[0].tls

    @pytest.mark.parametrize(
        ("tls", "remove"),
        [
            pytest.param("none", set(), id="no-tls"),
            pytest.param("starttls", {"STARTTLS"}, id="stripped"),
        ],
    )
    def test_required_but_not_offered(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, tls: str, remove: set[str]
    ) -> None:
        """Without STARTTLS on offer the session fails permanently and sends nothing in clear."""
        server = smtp_server(tls=tls, auth=True, auth_require_tls=False)
        server.handler.ehlo_remove = set(remove)
        session = SMTPSession(make_profile(server, "smtp+starttls"))
        with pytest.raises(SMTPTLSError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)
        exc = failure.value
        assert exc.stage == "tls"
        assert not exc.is_transient
        assert "STARTTLS" in str(exc)
        counts = server.handler.counts
        assert (counts["AUTH"], counts["MAIL"], counts["RCPT"], counts["DATA"]) == (0, 0, 0, 0)
        assert server.handler.messages == []
        assert not session.connected

    def test_nothing_but_ehlo_and_quit_in_clear(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """A server offering AUTH but not STARTTLS sees only EHLO and QUIT, never credentials."""
        server = scripted_server(smtp_script(extensions=("AUTH PLAIN LOGIN", "8BITMIME")))
        with pytest.raises(SMTPTLSError):
            SMTPSession(make_profile(server, "smtp+starttls")).connect()
        [conn] = server.wait_for_connections(1)
        server.stop()
        assert [line.split()[0].upper() for line in conn.received] == ["EHLO", "QUIT"]

    def test_starttls_refused(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """A 454 to STARTTLS is a transient TLS error, and the session does not go on in clear."""
        server = scripted_server(
            smtp_script(
                {"STARTTLS": "454 4.7.0 TLS not available"},
                extensions=("STARTTLS", "AUTH PLAIN"),
            )
        )
        with pytest.raises(SMTPTLSError) as failure:
            SMTPSession(make_profile(server, "smtp+starttls")).connect()
        assert (failure.value.stage, failure.value.code) == ("tls", 454)
        assert failure.value.is_transient
        server.stop()
        assert [line.split()[0].upper() for line in server.received] == [
            "EHLO",
            "STARTTLS",
            "QUIT",
        ]

    def test_starttls_reply_injection_is_discarded(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """Reply lines sent in clear along with the 220 to STARTTLS are not read after TLS."""

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo(extensions=("STARTTLS",))
            conn.expect("STARTTLS")
            # An attacker appends a fake EHLO reply before the handshake.
            conn.send_raw(b"220 2.0.0 Ready\r\n250 localhost injected\r\n")
            conn._wrap_tls("good")  # conn.starttls() would send its own 220
            conn.expect("EHLO", "250-localhost\r\n250 8BITMIME")
            conn.expect("QUIT", "221 bye")

        server = scripted_server(script)
        profile = make_profile(server, "smtp+starttls", credentials=False)
        with SMTPSession(profile) as session:
            assert session.info is not None
            assert session.info.capabilities == ("8BITMIME",)
        server.stop()
        assert "injected" not in " ".join(session.transcript.as_strings())


class TestCertificateChecks:
    """Untrusted, expired and wrong-name certificates are refused before anything is sent."""

    @pytest.mark.parametrize("tls", ["implicit", "starttls"])
    @pytest.mark.parametrize("cert", ["untrusted", "wrong_host", "expired"])
    def test_bad_certificate_refused(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, tls: str, cert: str
    ) -> None:
        """A certificate that does not verify is a permanent TLS error; no AUTH or MAIL is sent."""
        server = smtp_server(tls=tls, cert=cert, auth=True)
        scheme = "smtps" if tls == "implicit" else "smtp+starttls"
        session = SMTPSession(make_profile(server, scheme))
        with pytest.raises(SMTPTLSError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)
        exc = failure.value
        assert exc.stage == "tls"
        assert not exc.is_transient
        assert "certificate" in str(exc)
        counts = server.handler.counts
        assert (counts["AUTH"], counts["MAIL"], counts["auth_attempts"]) == (0, 0, 0)
        assert server.handler.messages == []
        assert not session.connected
        if tls == "starttls":  # the server saw the handshake fail (and let go of the connection)
            server.handler.wait_for_count("tls_failures", 1)

    def test_wrong_host_name_message(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A certificate for another host name is refused with a message that says so."""
        server = smtp_server(tls="implicit", cert="wrong_host")
        with pytest.raises(SMTPTLSError) as failure:
            SMTPSession(make_profile(server, "smtps", credentials=False)).connect()
        assert "Hostname mismatch" in str(failure.value)
        assert "'localhost'" in str(failure.value)

    @pytest.mark.parametrize("cert", ["untrusted", "wrong_host"])
    def test_verify_false_connects(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, cert: str
    ) -> None:
        """verify=false accepts an unverifiable certificate, still encrypts, and logs a warning."""
        server = smtp_server(tls="implicit", cert=cert, auth=True)
        with capture_logs() as logs, SMTPSession(make_profile(server, "smtps", verify=False)) as s:
            s.send(SENDER, [RCPT], MESSAGE)
        [message] = server.handler.wait_for_messages(1)
        assert message.tls
        warnings = [e for e in logs if e["log_level"] == "warning"]
        assert [e["event"] for e in warnings] == ["smtp.tls_unverified"]

    def test_plain_connection_refused_by_tls_client(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """smtps:// against a server that does not speak TLS fails instead of talking in clear."""
        server = smtp_server(tls="none")
        with pytest.raises((SMTPTLSError, SMTPServerDisconnected)) as failure:
            SMTPSession(make_profile(server, "smtps", credentials=False, timeout=1)).connect()
        assert failure.value.stage in ("tls", "connect")
        assert server.handler.counts["MAIL"] == 0


class RecordingMaterials:
    """Stands in for TLSMaterials in a ScriptedServer: a fresh server context that records the
    SNI name each client sends and can demand a client certificate from the test CA."""

    def __init__(self, materials: TLSMaterials, *, require_client_cert: bool = False) -> None:
        self.server_names: list[str | None] = []
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        materials.certs["good"].configure_cert(self.context)
        self.context.sni_callback = self._record
        if require_client_cert:
            self.context.verify_mode = ssl.CERT_REQUIRED
            materials.ca.configure_trust(self.context)

    def _record(self, sock: ssl.SSLObject, name: str | None, context: ssl.SSLContext) -> None:
        self.server_names.append(name)

    def server_context(self, cert: str = "good") -> ssl.SSLContext:
        """The one recording context, whatever certificate is asked for."""
        return self.context


class TestHandshakeDetails:
    """What the client puts into the TLS handshake: SNI, and a client certificate if configured."""

    def test_sni_implicit(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory, tls_ca: TLSMaterials
    ) -> None:
        """Implicit TLS sends the profile's host name as SNI."""
        materials = RecordingMaterials(tls_ca)
        server = scripted_server(smtp_script(), tls="implicit", tls_materials=materials)
        with SMTPSession(make_profile(server, "smtps", credentials=False)):
            pass
        assert materials.server_names == ["localhost"]

    def test_sni_starttls(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory, tls_ca: TLSMaterials
    ) -> None:
        """STARTTLS sends the profile's host name as SNI."""
        materials = RecordingMaterials(tls_ca)

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo(extensions=("STARTTLS",))
            conn.expect("STARTTLS")
            conn.starttls()
            smtp_script(greeting=None)(conn)

        server = scripted_server(script, tls_materials=materials)
        profile = make_profile(server, "smtp+starttls", credentials=False)
        with SMTPSession(profile) as session:
            session.send(SENDER, [RCPT], MESSAGE)
        assert materials.server_names == ["localhost"]

    def test_client_certificate(
        self,
        scripted_server: ScriptedFactory,
        make_profile: ProfileFactory,
        tls_ca: TLSMaterials,
        tmp_path: Path,
    ) -> None:
        """client_cert/client_key are presented to a server that requires a client certificate."""
        materials = RecordingMaterials(tls_ca, require_client_cert=True)
        leaf = tls_ca.ca.issue_cert("client.example")
        cert_file, key_file = tmp_path / "client.pem", tmp_path / "client.key"
        cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(key_file)
        server = scripted_server(smtp_script(), tls="implicit", tls_materials=materials)
        profile = make_profile(
            server, "smtps", credentials=False, client_cert=cert_file, client_key=key_file
        )
        with SMTPSession(profile) as session:
            session.send(SENDER, [RCPT], MESSAGE)
        server.stop()
        assert [verb(line) for line in server.received] == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
