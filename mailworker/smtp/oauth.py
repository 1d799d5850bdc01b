"""OAuth2 bearer tokens for XOAUTH2: providers, and the refresh-token grant (RFC 6749 §6).

A token provider is a callable ``get_token(*, refresh: bool) -> str``. The session calls it
with ``refresh=False`` at each connect and, when the server refuses the token (XOAUTH2's
``334`` error challenge, then ``535``), once with ``refresh=True`` before one more AUTH on
the same connection. A callable without the ``refresh`` parameter is simply called again.

:class:`RefreshTokenProvider` is the built-in one: it trades a refresh token (read from a
file) for access tokens at a token endpoint, with presets for Google and Microsoft 365
(:data:`PRESETS`). A profile names it with URL options (:mod:`._oauth_options`), every
secret in a file::

    smtps://app%40example.com@smtp.gmail.com?oauth=google&oauth_client_id=123.apps...
        &oauth_client_secret_file=/run/secrets/client_secret
        &oauth_refresh_token_file=/run/secrets/refresh_token

Failures are :class:`OAuthTokenError`: :class:`OAuthTokenRefused` (the endpoint said no:
``invalid_grant``, ``invalid_client``; permanent until the configuration changes),
:class:`OAuthTokenUnavailable` (unreachable, 5xx, 429; transient) and
:class:`OAuthTokenTimeout`. Their messages name the endpoint and the fix, never a secret.

The HTTP client (httpx, ``pip install "mailworker[oauth]"``) is imported at the first fetch.
"""

from __future__ import annotations

import importlib.util
import inspect
import ipaddress
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeGuard
from urllib.parse import urlsplit

import structlog

from mailworker.errors import ConfigError, MailworkerError

log = structlog.get_logger("mailworker.smtp")


class RefreshingTokenProvider(Protocol):
    """A token provider that can be told to get a fresh token."""

    def __call__(self, *, refresh: bool) -> str: ...


#: Returns an OAuth2 bearer token for XOAUTH2; a zero-argument callable is accepted too.
TokenProvider = Callable[[], str] | RefreshingTokenProvider


class OAuthTokenError(MailworkerError):
    """No access token could be had; ``is_transient`` says whether to try again later."""

    is_transient = True


class OAuthTokenRefused(OAuthTokenError):
    """The token endpoint refused the grant (revoked refresh token, wrong client); permanent."""

    is_transient = False


class OAuthTokenUnavailable(OAuthTokenError, ConnectionError):
    """The token endpoint is unreachable or failing (5xx, 429); transient."""


class OAuthTokenTimeout(OAuthTokenUnavailable, TimeoutError):
    """The token endpoint did not answer within the timeout; transient."""


@dataclass(frozen=True)
class Preset:
    """Where a provider's token endpoint is and the scope SMTP sending needs."""

    token_url: str
    scope: str


#: ``oauth=`` presets. Microsoft's URL takes ``oauth_tenant`` (default ``common``).
PRESETS: dict[str, Preset] = {
    "google": Preset("https://oauth2.googleapis.com/token", "https://mail.google.com/"),
    "microsoft": Preset(
        "https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token",
        "https://outlook.office.com/SMTP.Send offline_access",
    ),
}

#: Lifetime assumed when the answer has no ``expires_in`` (RFC 6749 §5.1 only recommends it).
DEFAULT_LIFETIME = 300.0
#: A cached token is renewed this long before it expires (at most half its lifetime).
EXPIRY_MARGIN = 60.0
#: Error codes (RFC 6749 §5.2 and common practice) worth trying again later.
_TRANSIENT_ERRORS = {"temporarily_unavailable", "server_error", "slow_down"}


def get_token(provider: TokenProvider, *, refresh: bool) -> str:
    """Ask ``provider`` for a token (passing ``refresh`` if it takes it) and check it.

    Raises:
        OAuthTokenError: the provider's own, or an unusable (empty, multi-line) token.
    """
    token = provider(refresh=refresh) if _takes_refresh(provider) else provider()  # type: ignore[call-arg]
    if not _usable(token):
        raise OAuthTokenUnavailable("the token provider returned an empty or malformed token")
    return token


def _usable(token: object) -> bool:
    # CR/LF would end the AUTH line and ^A would forge XOAUTH2 fields.
    return isinstance(token, str) and bool(token) and not re.search(r"[\x00-\x20\x7f]", token)


def _takes_refresh(provider: TokenProvider) -> TypeGuard[RefreshingTokenProvider]:
    try:
        parameters = inspect.signature(provider).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.kind is p.VAR_KEYWORD or (p.name == "refresh" and p.kind is not p.POSITIONAL_ONLY)
        for p in parameters
    )


def provider_secrets(provider: TokenProvider) -> list[str]:
    """The secrets a provider holds now, for a log redactor; never fetches a token.

    A provider of the user's own (without a ``secrets()`` method) gives none: calling it
    might fetch one.
    """
    secrets = getattr(provider, "secrets", None)
    return list(secrets()) if callable(secrets) else []


class StaticToken:
    """A fixed token (``MAILWORKER_SMTP_OAUTH_TOKEN``)."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, *, refresh: bool = False) -> str:
        return self._token

    def __repr__(self) -> str:
        return "<StaticToken>"

    def secrets(self) -> list[str]:
        """The token."""
        return [self._token]


class TokenFile:
    """A token read from a file at every call, so an outside process can refresh it
    (``MAILWORKER_SMTP_OAUTH_TOKEN_FILE``)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __call__(self, *, refresh: bool = False) -> str:
        try:
            return _read(self.path)
        except OSError as exc:
            raise OAuthTokenUnavailable(
                f"cannot read token file {str(self.path)!r}: {exc.strerror}"
            ) from None

    def __repr__(self) -> str:
        return f"<TokenFile {str(self.path)!r}>"

    def secrets(self) -> list[str]:
        """The token the file holds now."""
        try:
            return [_read(self.path)]
        except OSError:
            return []


class RefreshTokenProvider:
    """Access tokens by the OAuth2 refresh-token grant (RFC 6749 §6), cached until shortly
    before ``expires_in``.

    Thread-safe: one fetch at a time; threads that waited for it take its token, also
    when they asked for ``refresh=True``. A refresh token the server rotates (Microsoft
    does) is used from then on and written back to its file when the file is writable.
    The files are re-read when they change, so a rotated secret needs no restart.

    Args:
        token_url: the token endpoint; ``https://``, or ``http://`` to a loopback address.
        client_id: the OAuth client id.
        refresh_token_file: a file holding the refresh token.
        client_secret_file: a file holding the client secret (none for a public client).
        scope: space-separated scopes to ask for (none: what was granted).
        timeout: seconds for each of connect, send and read.
        clock: a monotonic clock (injectable for tests).

    Raises:
        ConfigError: a bad token URL, an unreadable or empty file, httpx not installed.
    """

    def __init__(
        self,
        *,
        token_url: str,
        client_id: str,
        refresh_token_file: str | Path,
        client_secret_file: str | Path | None = None,
        scope: str | None = None,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        check_token_url(token_url)
        if not client_id:
            raise ConfigError("oauth_client_id: must not be empty")
        if importlib.util.find_spec("httpx") is None:
            raise ConfigError('OAuth token refresh needs httpx: pip install "mailworker[oauth]"')
        self.token_url = token_url
        self.client_id = client_id
        self.scope = scope
        self.timeout = timeout
        self._clock = clock
        self._refresh_token = _SecretFile(refresh_token_file, "oauth_refresh_token_file")
        self._client_secret = (
            _SecretFile(client_secret_file, "oauth_client_secret_file")
            if client_secret_file is not None
            else None
        )
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self._token: str | None = None
        self._renew_at = 0.0
        #: Tokens fetched so far.
        self.fetches = 0

    def __repr__(self) -> str:
        return f"<RefreshTokenProvider {self.token_url} client_id={self.client_id!r}>"

    def __call__(self, *, refresh: bool = False) -> str:
        """A valid access token: the cached one, or a fresh one if it is due or ``refresh``.

        Raises:
            OAuthTokenRefused: the endpoint refused the grant (permanent).
            OAuthTokenUnavailable: the endpoint is unreachable, slow or failing (transient).
        """
        seen = self.fetches
        with self._lock:
            if self._token is not None:
                if refresh and self.fetches != seen:
                    return self._token  # fetched while we waited for the lock
                if not refresh and self._clock() < self._renew_at:
                    return self._token
            started = self._clock()
            token, lifetime = self._fetch()
            self._token = token
            self._renew_at = started + lifetime - min(EXPIRY_MARGIN, lifetime / 2)
            self.fetches += 1
            log.info("oauth.token_fetched", token_url=self.token_url, expires_in=lifetime)
            return token

    def secrets(self) -> list[str]:
        """Client secret, refresh token and the cached access token, as held now."""
        held = [self._refresh_token.value(), self._token]
        if self._client_secret is not None:
            held.append(self._client_secret.value())
        return [s for s in held if s]

    def _fetch(self) -> tuple[str, float]:
        import httpx  # noqa: PLC0415 -- an optional extra, needed only here

        refresh_token = self._refresh_token.value()
        form = {
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": self.client_id,
        }
        if self._client_secret is not None:
            # In the body (RFC 6749 §2.3.1): both Google and Microsoft accept it there.
            form["client_secret"] = self._client_secret.value()
        if self.scope:
            form["scope"] = self.scope
        where = f"token endpoint {self.token_url}"
        try:
            response = httpx.post(
                self.token_url,
                data=form,
                headers={"Accept": "application/json"},
                timeout=self.timeout,
                verify=self._tls_context(),
            )
        except httpx.TimeoutException:
            raise OAuthTokenTimeout(f"{where} did not answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise OAuthTokenUnavailable(
                f"{where} is unreachable: {type(exc).__name__}: {self._clean(str(exc))}"
            ) from None
        try:
            body = response.json()
        except ValueError:
            body = None
        body = body if isinstance(body, dict) else {}
        status = response.status_code
        if 200 <= status < 300:
            token = body.get("access_token")
            if not isinstance(token, str) or not _usable(token):
                raise OAuthTokenUnavailable(f"{where} answered without a usable access_token")
            token_type = str(body.get("token_type", "Bearer"))
            if token_type.lower() != "bearer":
                raise OAuthTokenRefused(f"{where} gave a {token_type!r} token, not a Bearer one")
            rotated = body.get("refresh_token")
            if isinstance(rotated, str) and rotated and rotated != refresh_token:
                saved = self._refresh_token.replace(rotated)
                # Unsaved (a read-only file), the next process start reads the old one.
                (log.info if saved else log.warning)(
                    "oauth.refresh_token_rotated",
                    token_url=self.token_url,
                    saved_to=str(self._refresh_token.path) if saved else None,
                )
            return token, _lifetime(body.get("expires_in"))
        error = body.get("error") if isinstance(body.get("error"), str) else None
        text = f"HTTP {status}" + (f" {self._clean(error)}" if error else "")
        description = body.get("error_description")
        if isinstance(description, str) and description:
            text += f" ({self._clean(description)})"
        if status in (408, 429) or status >= 500 or error in _TRANSIENT_ERRORS:
            raise OAuthTokenUnavailable(f"{where} failed: {text}")
        if error == "invalid_grant":
            hint = (
                f"the refresh token in {str(self._refresh_token.path)!r} has expired or been "
                "revoked: obtain a new one"
            )
        elif error in ("invalid_client", "unauthorized_client"):
            hint = "check oauth_client_id and the client secret"
        else:
            hint = "check the profile's oauth options"
        raise OAuthTokenRefused(f"{where} refused the refresh token: {text}; {hint}")

    def _tls_context(self) -> ssl.SSLContext:
        # The system's CAs, as for SMTP (httpx would use certifi's); made once, it costs ms.
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _clean(self, text: str) -> str:
        """Server text fit for an error message: our secrets out, one short line."""
        for secret in self.secrets():
            text = text.replace(secret, "****")
        text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()
        return text[:200] + ("…" if len(text) > 200 else "")


class _SecretFile:
    """A secret in a file, re-read when the file changes; replaceable in memory."""

    def __init__(self, path: str | Path, option: str) -> None:
        self.path = Path(path)
        try:
            self._value = _read(self.path)
            self._stamp = _stamp(self.path)
        except OSError as exc:
            raise ConfigError(f"{option}: cannot read {str(path)!r}: {exc.strerror}") from None
        if not self._value:
            raise ConfigError(f"{option}: {str(path)!r} is empty")

    def value(self) -> str:
        try:
            stamp = _stamp(self.path)
            if stamp != self._stamp:
                value = _read(self.path)
                if value:
                    self._value, self._stamp = value, stamp
        except OSError:
            pass  # being replaced, or gone: the last value we read still stands
        return self._value

    def replace(self, value: str) -> bool:
        """Use ``value`` from now on, and write it to the file (atomically) if we can."""
        self._value = value
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            mode = self.path.stat().st_mode & 0o777
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(value + "\n")
            os.replace(temp, self.path)
            self._stamp = _stamp(self.path)
        except OSError:
            temp.unlink(missing_ok=True)
            return False
        return True


def _read(path: Path) -> str:
    # One trailing newline stripped, as secret files usually end with one.
    return path.read_text(encoding="utf-8").removesuffix("\n").removesuffix("\r")


def _stamp(path: Path) -> tuple[int, int, int]:
    info = path.stat()
    return (info.st_ino, info.st_size, info.st_mtime_ns)


def _lifetime(expires_in: object) -> float:
    try:
        seconds = float(expires_in)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return DEFAULT_LIFETIME
    return seconds if 0 < seconds < float("inf") else DEFAULT_LIFETIME


def check_token_url(url: str) -> None:
    """Raise ConfigError unless ``url`` is https://, or http:// to a loopback address."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        raise ConfigError("oauth_token_url: malformed URL") from None
    if "@" in parts.netloc:
        raise ConfigError("oauth_token_url: must not hold credentials; use the secret files")
    if parts.scheme == "https" and host:
        return
    if parts.scheme == "http" and _loopback(host):
        return
    raise ConfigError(
        f"oauth_token_url={url!r}: must be an https:// URL (http:// only to a loopback address)"
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
