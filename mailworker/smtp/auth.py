"""AUTH mechanisms (RFC 4954): choosing one and answering its challenges.

smtplib's ``login()`` tries every mechanism in turn, which triples the cost of
a wrong password against a server that delays failures; we pick one, the first
of the profile's preference that the server offers, and use smtplib's
``auth()`` loop with our own answer functions.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Sequence

from mailworker.config import Profile
from mailworker.errors import SMTPNotSupportedError

#: smtplib's authobject protocol: called with None for the initial response
#: (return None if the mechanism has none), then with each decoded challenge.
AuthObject = Callable[..., "str | None"]


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


def authobject(mechanism: str, profile: Profile) -> tuple[AuthObject, bool]:
    """The answer function for ``mechanism`` and whether it sends an initial response."""
    user = profile.username or ""
    if mechanism == "XOAUTH2":
        assert profile.oauth_token_provider is not None
        return _xoauth2(user, profile.oauth_token_provider()), True
    password = profile.password or ""
    if mechanism == "PLAIN":
        return (lambda challenge=None: f"\0{user}\0{password}"), True
    if mechanism == "CRAM-MD5":
        return _cram_md5(user, password), False
    if mechanism == "LOGIN":
        return _login(user, password), False
    raise ValueError(f"unsupported AUTH mechanism {mechanism!r}")


def _cram_md5(user: str, password: str) -> AuthObject:
    def answer(challenge: bytes | None = None) -> str | None:
        if challenge is None:
            return None
        digest = hmac.HMAC(password.encode("utf-8"), challenge, "md5").hexdigest()
        return f"{user} {digest}"

    return answer


def _login(user: str, password: str) -> AuthObject:
    # The server asks for the user name, then the password (RFC draft-murchison-sasl-login).
    answers = iter((user, password))

    def answer(challenge: bytes | None = None) -> str | None:
        if challenge is None:
            return None
        return next(answers, "")

    return answer


def _xoauth2(user: str, token: str) -> AuthObject:
    sent = False

    def answer(challenge: bytes | None = None) -> str | None:
        nonlocal sent
        if not sent:
            sent = True
            return f"user={user}\x01auth=Bearer {token}\x01\x01"
        # A 334 after our token carries a JSON error; the protocol wants an empty
        # line back, after which the server sends its final 5xx.
        return ""

    return answer
