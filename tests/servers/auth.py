"""AUTH for the test SMTP server beyond aiosmtpd's LOGIN and PLAIN: CRAM-MD5 and
Google's XOAUTH2, and the check of every mechanism's credentials."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from typing import Any, Final, NamedTuple

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, auth_mechanism

#: Every AUTH mechanism an :class:`~tests.servers.SMTPServer` can offer.
ALL_MECHANISMS: Final = ("CRAM-MD5", "LOGIN", "PLAIN", "XOAUTH2")
#: The JSON object Gmail sends (base64, in a 334 reply) when XOAUTH2 fails.
XOAUTH2_ERROR: Final = {"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"}
#: Gmail's final reply to a failed XOAUTH2 exchange (two lines).
XOAUTH2_FAILURE_REPLY: Final = (
    "535-5.7.8 Username and Password not accepted. For more information, go to\r\n"
    "535 5.7.8  https://support.google.com/mail/?p=BadCredentials"
)


def xoauth2_string(user: str, token: str) -> str:
    """Return the base64 XOAUTH2 initial response for ``user`` and ``token``."""
    raw = f"user={user}\x01auth=Bearer {token}\x01\x01".encode()
    return base64.b64encode(raw).decode("ascii")


class AuthAttempt(NamedTuple):
    """One completed AUTH exchange: mechanism, claimed user name, outcome."""

    mechanism: str
    user: str
    success: bool


class CramMD5Response(NamedTuple):
    """What a CRAM-MD5 client answered to ``challenge``."""

    user: str
    challenge: bytes
    digest: str


class XOAuth2Response(NamedTuple):
    """The user and bearer token of an XOAUTH2 exchange."""

    user: str
    token: str


def check_credentials(auth_data: Any, user: str, password: str, token: str) -> tuple[str, bool]:
    """The claimed user name of ``auth_data`` (any mechanism) and whether it proves
    ``user`` with ``password`` (or, for XOAUTH2, ``token``)."""
    if isinstance(auth_data, LoginPassword):
        ok = hmac.compare_digest(auth_data.login, user.encode()) and (
            hmac.compare_digest(auth_data.password, password.encode())
        )
        return auth_data.login.decode("utf-8", errors="replace"), ok
    if isinstance(auth_data, CramMD5Response):
        expected = hmac.new(password.encode(), auth_data.challenge, hashlib.md5).hexdigest()
        ok = auth_data.user == user and hmac.compare_digest(expected, auth_data.digest.lower())
        return auth_data.user, ok
    if isinstance(auth_data, XOAuth2Response):
        return auth_data.user, auth_data.user == user and hmac.compare_digest(
            auth_data.token, token
        )
    return "", False  # pragma: no cover - only our mechanisms call this


class MoreMechanisms(SMTP):
    """aiosmtpd protocol mixin adding CRAM-MD5 and XOAUTH2; the answers go to the
    ``authenticator`` as :class:`CramMD5Response` and :class:`XOAuth2Response`."""

    @auth_mechanism("CRAM-MD5")
    async def auth_CRAM_MD5(self, _: SMTP, args: list[str]) -> AuthResult:
        """RFC 2195 CRAM-MD5: base64 challenge, answer ``user hex(hmac-md5)``."""
        if len(args) > 1:
            await self.push("501 5.5.2 CRAM-MD5 takes no initial response")
            return AuthResult(success=False)
        challenge = f"<{secrets.randbelow(10**9)}.{int(time.time())}@{self.hostname}>".encode()
        response = await self.challenge_auth(challenge)
        if not isinstance(response, bytes):
            return AuthResult(success=False)  # '*' or bad base64; already answered
        user, _sep, digest = response.decode("utf-8", errors="replace").rpartition(" ")
        return self._authenticate("CRAM-MD5", CramMD5Response(user, challenge, digest))

    @auth_mechanism("XOAUTH2")
    async def auth_XOAUTH2(self, _: SMTP, args: list[str]) -> AuthResult:
        """Google's XOAUTH2; on failure a 334 JSON error, then 535 after the client's empty line."""
        if len(args) > 1:
            try:
                raw = base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False)
        else:
            answer = await self.challenge_auth(b"")
            if not isinstance(answer, bytes):
                return AuthResult(success=False)
            raw = answer
        fields = dict(
            part.split("=", 1)
            for part in raw.decode("utf-8", errors="replace").split("\x01")
            if "=" in part
        )
        bearer = fields.get("auth", "")
        token = bearer[7:] if bearer[:7].lower() == "bearer " else ""
        result = self._authenticate("XOAUTH2", XOAuth2Response(fields.get("user", ""), token))
        if result.success:
            return result
        error = json.dumps(XOAUTH2_ERROR, separators=(",", ":")).encode()
        if not isinstance(await self.challenge_auth(error), bytes):
            return AuthResult(success=False)  # client sent '*'; already answered
        return AuthResult(success=False, handled=False, message=XOAUTH2_FAILURE_REPLY)
