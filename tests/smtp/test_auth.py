"""AUTH: every mechanism, the preference order, and one attempt only on failure."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import pytest

from mailworker import SMTPAuthError, SMTPNotSupportedError, SMTPServerDisconnected, SMTPSession
from tests.servers import (
    DEFAULT_TOKEN,
    DEFAULT_USER,
    XOAUTH2_ERROR,
    AuthAttempt,
    ScriptConnection,
    ScriptedServer,
    SMTPServer,
)
from tests.smtp.helpers import MESSAGE, RCPT, SENDER, ProfileFactory, b64, smtp_script

SMTPFactory = Callable[..., SMTPServer]
ScriptedFactory = Callable[..., ScriptedServer]


class TestMechanisms:
    """Each supported mechanism authenticates and the message is delivered."""

    @pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
    def test_password_mechanism(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, mechanism: str
    ) -> None:
        """A server offering only this mechanism gets one successful AUTH with it."""
        server = smtp_server(tls="implicit", auth=True, mechanisms=[mechanism])
        with SMTPSession(make_profile(server, "smtps")) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            assert session.info is not None
            assert session.info.auth_mechanism == mechanism
        [message] = server.handler.wait_for_messages(1)
        assert message.auth_user == DEFAULT_USER
        assert server.handler.logins == [AuthAttempt(mechanism, DEFAULT_USER, True)]

    def test_xoauth2(self, smtp_server: SMTPFactory, make_profile: ProfileFactory) -> None:
        """XOAUTH2 with a token from the provider authenticates."""
        server = smtp_server(tls="implicit", auth=True)
        profile = make_profile(server, "smtps", token=DEFAULT_TOKEN, auth="XOAUTH2")
        with SMTPSession(profile) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            assert session.info is not None
            assert session.info.auth_mechanism == "XOAUTH2"
        assert server.handler.wait_for_messages(1)[0].auth_user == DEFAULT_USER
        assert server.handler.logins == [AuthAttempt("XOAUTH2", DEFAULT_USER, True)]

    def test_token_provider_called_per_connection(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """The token provider is asked again at each new connection, so tokens can be refreshed."""
        server = smtp_server(tls="implicit", auth=True, token="token-1")
        tokens = iter(["token-1", "token-2"])
        profile = make_profile(server, "smtps", token="unused", auth="XOAUTH2", max_messages=1)
        profile = dataclasses.replace(profile, oauth_token_provider=lambda: next(tokens))
        with SMTPSession(profile) as session:
            session.send(SENDER, [RCPT], MESSAGE)
            server.handler.token = "token-2"  # the old token has expired
            session.send(SENDER, [RCPT], MESSAGE)
        assert [a.success for a in server.handler.logins] == [True, True]
        assert len(server.handler.wait_for_messages(2)) == 2

    @pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
    def test_non_ascii_password(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, mechanism: str
    ) -> None:
        """A password with non-ASCII characters is sent as UTF-8 (RFC 4616) and accepted."""
        password = "pässwörd-ünïcode"
        server = smtp_server(tls="implicit", auth=True, mechanisms=[mechanism], password=password)
        with SMTPSession(make_profile(server, "smtps", password=password)) as session:
            session.send(SENDER, [RCPT], MESSAGE)
        assert server.handler.logins == [AuthAttempt(mechanism, DEFAULT_USER, True)]


class TestPreference:
    """The profile's ``auth`` order decides among the mechanisms the server offers."""

    @pytest.mark.parametrize(
        ("preference", "chosen"),
        [
            ("LOGIN,PLAIN", "LOGIN"),
            ("PLAIN,LOGIN", "PLAIN"),
            ("CRAM-MD5,PLAIN", "CRAM-MD5"),
            ("XOAUTH2,PLAIN", "PLAIN"),  # no token: XOAUTH2 is skipped
        ],
    )
    def test_first_preferred_offered_mechanism(
        self,
        smtp_server: SMTPFactory,
        make_profile: ProfileFactory,
        preference: str,
        chosen: str,
    ) -> None:
        """The first mechanism of the preference that the server offers (and we can use) wins."""
        server = smtp_server(tls="implicit", auth=True)  # offers all four
        with SMTPSession(make_profile(server, "smtps", auth=preference)) as session:
            assert session.info is not None
            assert session.info.auth_mechanism == chosen
        assert [a.mechanism for a in server.handler.logins] == [chosen]

    def test_skips_mechanisms_the_server_lacks(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A preferred mechanism the server does not offer is passed over for the next one."""
        server = smtp_server(tls="implicit", auth=True, mechanisms=["PLAIN"])
        with SMTPSession(make_profile(server, "smtps", auth="LOGIN,PLAIN")) as session:
            assert session.info is not None
            assert session.info.auth_mechanism == "PLAIN"

    def test_no_mechanism_in_common(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """No mechanism in common is a permanent error at the auth stage, with no AUTH sent."""
        server = smtp_server(tls="implicit", auth=True, mechanisms=["PLAIN"])
        session = SMTPSession(make_profile(server, "smtps", auth="CRAM-MD5"))
        with pytest.raises(SMTPNotSupportedError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)
        assert failure.value.stage == "auth"
        assert not failure.value.is_transient
        assert server.handler.counts["AUTH"] == 0
        assert server.handler.counts["MAIL"] == 0

    def test_server_offers_no_auth(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """Credentials configured but no AUTH offered: a permanent error, nothing sent."""
        server = smtp_server(tls="implicit", auth=False)
        with pytest.raises(SMTPNotSupportedError) as failure:
            SMTPSession(make_profile(server, "smtps")).send(SENDER, [RCPT], MESSAGE)
        assert failure.value.stage == "auth"
        assert not failure.value.is_transient
        assert server.handler.counts["MAIL"] == 0


class TestFailures:
    """A refused AUTH is reported once, precisely, and the session is closed politely."""

    @pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
    def test_wrong_password_one_attempt(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, mechanism: str
    ) -> None:
        """A wrong password is a permanent 535 at the auth stage after exactly one AUTH."""
        server = smtp_server(tls="implicit", auth=True)  # offers all four mechanisms
        profile = make_profile(server, "smtps", password="wrong password", auth=mechanism)
        session = SMTPSession(profile)
        with pytest.raises(SMTPAuthError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)
        exc = failure.value
        assert (exc.stage, exc.code, exc.is_transient) == ("auth", 535, False)
        assert server.handler.logins == [AuthAttempt(mechanism, DEFAULT_USER, False)]
        assert server.handler.counts["AUTH"] == 1
        assert server.handler.counts["MAIL"] == 0
        assert not session.connected

    def test_default_preference_still_one_attempt(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """Default preference, every mechanism offered: a bad password costs one AUTH."""
        server = smtp_server(tls="implicit", auth=True)
        with pytest.raises(SMTPAuthError):
            SMTPSession(make_profile(server, "smtps", password="nope")).connect()
        assert server.handler.counts["AUTH"] == 1
        assert server.handler.counts["auth_attempts"] == 1

    def test_quit_after_failure(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """After a refused AUTH the client still says QUIT."""
        server = smtp_server(tls="implicit", auth=True)
        with pytest.raises(SMTPAuthError):
            SMTPSession(make_profile(server, "smtps", password="nope")).connect()
        server.handler.wait_for_count("QUIT", 1)

    def test_enhanced_code_on_failure(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """With ENHANCEDSTATUSCODES offered, the auth error carries 5.7.8."""
        server = smtp_server(tls="implicit", auth=True)
        server.handler.ehlo_extra = ["ENHANCEDSTATUSCODES"]
        with pytest.raises(SMTPAuthError) as failure:
            SMTPSession(make_profile(server, "smtps", password="nope")).connect()
        assert failure.value.enhanced_code == "5.7.8"

    def test_temporary_failure_is_transient(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """A 454 to AUTH is a transient auth error."""
        server = scripted_server(
            smtp_script(
                {"AUTH": "454 4.7.0 Temporary authentication failure"},
                extensions=("AUTH PLAIN",),
            )
        )
        profile = make_profile(server, "smtp", credentials=True, allow_insecure_auth=True)
        with pytest.raises(SMTPAuthError) as failure:
            SMTPSession(profile).connect()
        assert (failure.value.stage, failure.value.code) == ("auth", 454)
        assert failure.value.is_transient

    def test_hang_up_during_auth(
        self, scripted_server: ScriptedFactory, make_profile: ProfileFactory
    ) -> None:
        """A server hanging up in the middle of AUTH is a transient error at the auth stage."""

        def script(conn: ScriptConnection) -> None:
            conn.greet_and_ehlo(extensions=("AUTH LOGIN",))
            conn.expect("AUTH LOGIN", "334 VXNlcm5hbWU6")
            conn.readline()
            conn.close()

        server = scripted_server(script)
        profile = make_profile(server, "smtp", credentials=True, allow_insecure_auth=True)
        with pytest.raises(SMTPServerDisconnected) as failure:
            SMTPSession(profile).connect()
        assert failure.value.stage == "auth"
        assert failure.value.is_transient

    def test_xoauth2_bad_token(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A bad token gets the JSON challenge, an empty answer, then a permanent 535."""
        server = smtp_server(tls="implicit", auth=True)
        profile = make_profile(server, "smtps", token="expired-token", auth="XOAUTH2")
        with pytest.raises(SMTPAuthError) as failure:
            SMTPSession(profile).connect()
        exc = failure.value
        assert (exc.stage, exc.code, exc.is_transient) == ("auth", 535, False)
        assert "BadCredentials" in exc.reply
        assert server.handler.logins == [AuthAttempt("XOAUTH2", DEFAULT_USER, False)]
        assert server.handler.counts["AUTH"] == 1
        challenge = b64(json.dumps(XOAUTH2_ERROR, separators=(",", ":")))
        tail = exc.transcript[-5:]
        assert tail == [
            "C: AUTH XOAUTH2 ****",
            f"S: 334 {challenge}",
            "C: ****",
            "S: 535-5.7.8 Username and Password not accepted. For more information, go to",
            "S: 535 5.7.8  https://support.google.com/mail/?p=BadCredentials",
        ]
