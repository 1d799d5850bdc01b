"""Transcripts record the exchange, never the content, and nothing anywhere shows a secret."""

from __future__ import annotations

import base64
import hmac
import re
import time
from collections.abc import Callable

import pytest
from structlog.testing import capture_logs

from mailworker import Profile, SMTPAuthError, SMTPRecipientsRefused, SMTPSession
from tests.servers import DEFAULT_USER, SMTPServer, xoauth2_string
from tests.smtp.helpers import BODY_MARKER, MESSAGE, RCPT, SENDER, ProfileFactory, b64

SMTPFactory = Callable[..., SMTPServer]

PASSWORD = "hunter2-Tr0ub4dor&3 staple"
TOKEN = "ya29.a0-secret-bearer-token"
MECHANISMS = ["PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2"]


class TestMessageTranscript:
    """``result.transcript`` is the message's exchange as timestamped C:/S: lines."""

    def test_lines_and_timestamps(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """Every line is 'C: ...' or 'S: ...' with a wall-clock time, in order."""
        server = smtp_server()
        before = time.time()
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, [RCPT], MESSAGE)
        after = time.time()
        lines = [str(line) for line in result.transcript]
        assert all(re.match(r"^[CS]: ", line) for line in lines)
        assert lines[0] == f"C: MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}"
        assert f"C: RCPT TO:<{RCPT}>" in lines
        assert "C: DATA" in lines
        assert lines[-1].startswith("S: 250")
        times = [line.at for line in result.transcript]
        assert times == sorted(times)
        assert before <= times[0] <= times[-1] <= after
        assert {line.direction for line in result.transcript} == {"C", "S"}

    def test_content_not_recorded(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """Between 354 and the final reply there is only a size line and the end marker."""
        server = smtp_server()
        with SMTPSession(make_profile(server, "smtp")) as session:
            result = session.send(SENDER, [RCPT], MESSAGE)
            everything = "\n".join(session.transcript.as_strings())
        lines = [str(line) for line in result.transcript]
        start = next(i for i, line in enumerate(lines) if line.startswith("S: 354"))
        content_lines = lines[start + 1 : -1]
        assert len(content_lines) == 2
        assert str(len(MESSAGE)) in content_lines[0]
        assert content_lines[1] == "C: ."
        for text in (BODY_MARKER.decode(), "Subject", "hello"):
            assert not any(text in line for line in lines)
            assert text not in everything

    def test_session_transcript(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """The session transcript holds the greeting, EHLO, AUTH (redacted) and QUIT."""
        server = smtp_server(tls="implicit", auth=True, mechanisms=["PLAIN"])
        session = SMTPSession(make_profile(server, "smtps"))
        session.send(SENDER, [RCPT], MESSAGE)
        session.close()
        lines = session.transcript.as_strings()
        assert lines[0].startswith("S: 220")
        assert any(line.startswith("C: EHLO ") for line in lines)
        assert "C: AUTH PLAIN ****" in lines
        assert any(line.startswith("S: 235") for line in lines)
        assert lines[-2] == "C: QUIT"
        assert lines[-1].startswith("S: 221")

    def test_error_carries_transcript(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A refused message's error carries the exchange that led to the refusal."""
        server = smtp_server()
        server.handler.rcpt_replies[RCPT] = "550 5.1.1 no such user"
        with (
            SMTPSession(make_profile(server, "smtp")) as session,
            pytest.raises(SMTPRecipientsRefused) as failure,
        ):
            session.send(SENDER, [RCPT], MESSAGE)
        transcript = failure.value.transcript
        assert transcript[:3] == [
            f"C: MAIL FROM:<{SENDER}> SIZE={len(MESSAGE)}",
            "S: 250 OK",
            f"C: RCPT TO:<{RCPT}>",
        ]
        assert "S: 550 5.1.1 no such user" in transcript


def secrets_for(mechanism: str, password: str, token: str, lines: list[str]) -> list[str]:
    """Everything that would give a credential away for ``mechanism``.

    For CRAM-MD5 the response is computed from the challenge found in ``lines``.
    """
    if mechanism == "XOAUTH2":
        return [token, b64(token), xoauth2_string(DEFAULT_USER, token)]
    found = [password, b64(password), b64(f"\0{DEFAULT_USER}\0{password}")]
    if mechanism == "CRAM-MD5":
        index = lines.index("C: AUTH CRAM-MD5")
        challenge = lines[index + 1].removeprefix("S: 334 ")
        digest = hmac.new(password.encode(), base64.b64decode(challenge), "md5").hexdigest()
        found += [digest, b64(f"{DEFAULT_USER} {digest}")]
    return found


def assert_no_secret(secrets: list[str], **places: str) -> None:
    """No secret occurs in any of the named texts."""
    for name, text in places.items():
        for secret in secrets:
            assert secret not in text, f"secret {secret[:4]}... found in {name}"


#: The AUTH lines each mechanism must leave in a transcript (server lines: code only).
AUTH_LINES = {
    "PLAIN": ["C: AUTH PLAIN ****"],
    "LOGIN": ["C: AUTH LOGIN", "S: 334", "C: ****", "S: 334", "C: ****"],
    "CRAM-MD5": ["C: AUTH CRAM-MD5", "S: 334", "C: ****"],
    "XOAUTH2": ["C: AUTH XOAUTH2 ****"],
}


class TestNoSecrets:
    """Passwords, tokens and AUTH payloads never appear in transcripts, errors, reprs or logs."""

    def profile(
        self, make_profile: ProfileFactory, server: SMTPServer, mechanism: str, ok: bool
    ) -> Profile:
        """A profile for ``mechanism`` with the right (``ok``) or a wrong credential."""
        if mechanism == "XOAUTH2":
            token = TOKEN if ok else TOKEN + "-wrong"
            return make_profile(server, "smtps", token=token, auth="XOAUTH2")
        password = PASSWORD if ok else PASSWORD + "-wrong"
        return make_profile(server, "smtps", password=password, auth=mechanism)

    @pytest.mark.parametrize("mechanism", MECHANISMS)
    def test_successful_auth(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, mechanism: str
    ) -> None:
        """After a successful AUTH, no credential is in the transcripts, reprs or log events."""
        server = smtp_server(tls="implicit", auth=True, password=PASSWORD, token=TOKEN)
        profile = self.profile(make_profile, server, mechanism, ok=True)
        with capture_logs() as logs:
            session = SMTPSession(profile)
            result = session.send(SENDER, [RCPT], MESSAGE)
            session_repr = repr(session)
            session.close()
        lines = session.transcript.as_strings()
        assert server.handler.logins[-1].success
        auth_lines = AUTH_LINES[mechanism]
        start = lines.index(auth_lines[0])
        # Server challenges vary; compare them by their code only.
        seen = [line[:6] if line.startswith("S: ") else line for line in lines[start:]]
        assert seen[: len(auth_lines)] == auth_lines
        assert_no_secret(
            secrets_for(mechanism, PASSWORD, TOKEN, lines),
            session_transcript="\n".join(lines),
            session_transcript_repr=repr(session.transcript),
            result_transcript="\n".join(map(str, result.transcript)),
            result_repr=repr(result),
            session_repr=session_repr,
            profile_repr=repr(profile),
            profile_str=str(profile),
            redacted_url=profile.redacted_url(),
            info=repr(session.info),
            logs=repr(logs),
        )

    @pytest.mark.parametrize("mechanism", MECHANISMS)
    def test_failed_auth(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory, mechanism: str
    ) -> None:
        """A refused AUTH's error, its transcript and the logs show no credential."""
        server = smtp_server(tls="implicit", auth=True, password=PASSWORD, token=TOKEN)
        profile = self.profile(make_profile, server, mechanism, ok=False)
        session = SMTPSession(profile)
        with capture_logs() as logs, pytest.raises(SMTPAuthError) as failure:
            session.send(SENDER, [RCPT], MESSAGE)
        exc = failure.value
        assert exc.code == 535
        assert exc.transcript
        assert AUTH_LINES[mechanism][0] in exc.transcript
        wrong_password, wrong_token = PASSWORD + "-wrong", TOKEN + "-wrong"
        secrets = secrets_for(mechanism, wrong_password, wrong_token, exc.transcript)
        assert_no_secret(
            secrets,
            exc_str=str(exc),
            exc_repr=repr(exc),
            exc_transcript="\n".join(exc.transcript),
            exc_dict=repr(exc.to_dict()),
            exc_context=repr(exc.__context__) + repr(exc.__cause__),
            session_transcript="\n".join(session.transcript.as_strings()),
            session_repr=repr(session),
            profile_repr=repr(profile),
            logs=repr(logs),
        )

    def test_failed_auth_non_ascii_password(
        self, smtp_server: SMTPFactory, make_profile: ProfileFactory
    ) -> None:
        """A wrong non-ASCII password is refused as an SMTPAuthError that does not show it."""
        server = smtp_server(tls="implicit", auth=True, mechanisms=["PLAIN"])
        wrong = "fälsch-pässwort"
        session = SMTPSession(make_profile(server, "smtps", password=wrong))
        with pytest.raises(Exception) as failure:
            session.send(SENDER, [RCPT], MESSAGE)
        exc = failure.value
        assert_no_secret(
            [wrong, b64(wrong), b64(f"\0{DEFAULT_USER}\0{wrong}")],
            exc_str=str(exc),
            exc_repr=repr(exc),
            exc_args=repr(exc.args),
            session_transcript="\n".join(session.transcript.as_strings()),
        )
        assert isinstance(exc, SMTPAuthError)
        assert exc.code == 535
