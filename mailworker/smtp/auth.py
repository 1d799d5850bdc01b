"""AUTH mechanisms (RFC 4954): choosing one and answering its challenges.

smtplib's ``login()`` tries every mechanism in turn, which triples the cost of
a wrong password against a server that delays failures; we pick one, the first
of the profile's preference that the server offers, and try only that.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Callable, Sequence

from mailworker.errors import SMTPNotSupportedError
from mailworker.smtp import oauth
from mailworker.smtp._client import Client
from mailworker.smtp.profile import Profile
from mailworker.smtp.reply import Reply

#: Answers the server: called with None for the initial response (returns None
#: when the mechanism has none), then with each decoded challenge.
AuthObject = Callable[[bytes | None], "bytes | None"]

#: More challenges than any mechanism we speak needs: the server is looping.
_MAX_CHALLENGES = 5


def choose_mechanism(profile: Profile, offered: Sequence[str]) -> str:
    """The first mechanism of the profile's preference that the server offers and
    we have credentials for.

    Raises:
        SMTPNotSupportedError: no mechanism in common.
    """
    offered_upper = {m.upper() for m in offered}
    for mech in profile.auth:
        if mech not in offered_upper:
            continue
        if mech == "XOAUTH2" and profile.oauth_token_provider is None:
            continue
        if mech != "XOAUTH2" and profile.password is None:
            continue
        return mech
    server = " ".join(sorted(offered_upper)) or "none"
    raise SMTPNotSupportedError(
        f"no AUTH mechanism in common: the server offers {server}, the profile "
        f"allows {','.join(profile.auth)} with the credentials it has",
        stage="auth",
    )


def authenticate(client: Client, mechanism: str, answer: AuthObject, *, initial: bool) -> Reply:
    """Run the AUTH exchange (RFC 4954) and return the server's final reply.

    smtplib's ``auth()`` encodes answers as ASCII, so a non-ASCII password fails
    there with an exception that quotes it; SASL wants UTF-8 (RFC 4616), and the
    exchange is short enough to run here.

    Args:
        client: a greeted session.
        mechanism: the mechanism chosen by :func:`choose_mechanism`.
        answer, initial: from :func:`authobject`.
    """
    first = answer(None) if initial else None
    if first is None:
        reply = client.command(f"AUTH {mechanism}")
    else:
        # RFC 4954 §4: an empty initial response is sent as "=".
        reply = client.command(f"AUTH {mechanism} {_b64(first) or '='}")
    for _ in range(_MAX_CHALLENGES):
        if reply.code != 334:
            return reply
        try:
            challenge = base64.b64decode(reply.text.strip(), validate=True)
        except binascii.Error:
            challenge = b""
        reply = client.command(_b64(answer(challenge) or b""))
    client.command("*")  # cancel the exchange (RFC 4954 §4)
    return client.last_reply


def token_refused(reply: Reply) -> bool:
    """Whether an XOAUTH2 exchange ended with the token refused: ``535`` (Gmail after its
    ``334`` JSON error, Microsoft 365 at once), worth one more try with a fresh token.
    Not 454 (transient anyway) nor 534 (a policy a new token does not change)."""
    return reply.code == 535


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def authobject(
    mechanism: str, profile: Profile, *, token: str | None = None
) -> tuple[AuthObject, bool]:
    """The answer function for ``mechanism`` and whether it sends an initial response.

    Args:
        token: the XOAUTH2 bearer token; asked of the profile's provider when not given.

    Raises:
        OAuthTokenError: or whatever else the profile's token provider raises.
    """
    user = (profile.username or "").encode("utf-8")
    if mechanism == "XOAUTH2":
        assert profile.oauth_token_provider is not None
        if token is None:
            token = oauth.get_token(profile.oauth_token_provider, refresh=False)
        return _xoauth2(user, token.encode("utf-8")), True
    password = (profile.password or "").encode("utf-8")
    if mechanism == "PLAIN":
        return (lambda _challenge: b"\0" + user + b"\0" + password), True
    if mechanism == "CRAM-MD5":
        return _cram_md5(user, password), False
    if mechanism == "LOGIN":
        return _login(user, password), False
    raise ValueError(f"unsupported AUTH mechanism {mechanism!r}")


def _cram_md5(user: bytes, password: bytes) -> AuthObject:
    def answer(challenge: bytes | None) -> bytes | None:
        if challenge is None:
            return None
        return user + b" " + hmac.HMAC(password, challenge, "md5").hexdigest().encode("ascii")

    return answer


def _login(user: bytes, password: bytes) -> AuthObject:
    # The server asks for the user name, then the password (draft-murchison-sasl-login).
    answers = iter((user, password))

    def answer(challenge: bytes | None) -> bytes | None:
        if challenge is None:
            return None
        return next(answers, b"")

    return answer


def _xoauth2(user: bytes, token: bytes) -> AuthObject:
    sent = False

    def answer(challenge: bytes | None) -> bytes | None:
        nonlocal sent
        if not sent:
            sent = True
            return b"user=" + user + b"\x01auth=Bearer " + token + b"\x01\x01"
        # A 334 after our token carries a JSON error; the protocol wants an empty
        # line back, after which the server sends its final 5xx.
        return b""

    return answer
