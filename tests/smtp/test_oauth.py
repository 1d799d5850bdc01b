"""XOAUTH2 with tokens that refresh themselves: the refresh-token grant against a local
token endpoint, the profile's ``oauth*`` options, and one more AUTH after a refused token."""

from __future__ import annotations

import base64
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from structlog.testing import capture_logs

from mailworker import ConfigError, MailworkerError, Profile, SMTPAuthError, SMTPSession
from mailworker.cli.worker import profile_secrets
from mailworker.smtp import oauth
from mailworker.smtp.oauth import (
    OAuthTokenRefused,
    OAuthTokenTimeout,
    OAuthTokenUnavailable,
    RefreshTokenProvider,
)
from tests.servers import DEFAULT_USER, AuthAttempt, SMTPServer
from tests.smtp.helpers import MESSAGE, RCPT, SENDER, ProfileFactory

REFRESH_TOKEN = "1//refresh-token-abc123"
CLIENT_SECRET = "client-secret-xyz789"
CLIENT_ID = "client-id.apps.example"
STALE = "ya29.stale-access-token"
FRESH = "ya29.fresh-access-token"

SMTPFactory = Callable[..., SMTPServer]


def granted(token: str, expires_in: object = 3600, **extra: object) -> tuple[int, dict[str, Any]]:
    """A successful token response (RFC 6749 §5.1)."""
    body: dict[str, Any] = {"access_token": token, "token_type": "Bearer", **extra}
    if expires_in is not None:
        body["expires_in"] = expires_in
    return 200, body


class TokenEndpoint:
    """A token endpoint on 127.0.0.1: records each POSTed form and answers with the
    queued responses in turn (the last one repeats), after ``delay`` seconds."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.responses: list[tuple[int, dict[str, Any]]] = [granted(FRESH)]
        self.delay = 0.0
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                form = dict(parse_qsl(self.rfile.read(length).decode()))
                with endpoint._lock:
                    endpoint.requests.append(form)
                    status, body = (
                        endpoint.responses.pop(0)
                        if len(endpoint.responses) > 1
                        else endpoint.responses[0]
                    )
                time.sleep(endpoint.delay)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that gave up on a slow answer

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/token"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def answer(self, *responses: tuple[int, dict[str, Any]]) -> None:
        """Answer the next requests with ``responses`` (the last one repeats)."""
        self.responses = list(responses)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def endpoint() -> Iterator[TokenEndpoint]:
    server = TokenEndpoint()
    yield server
    server.stop()


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    """A directory holding ``refresh_token`` and ``client_secret`` files (mode 0600)."""
    for name, value in (("refresh_token", REFRESH_TOKEN), ("client_secret", CLIENT_SECRET)):
        path = tmp_path / name
        path.write_text(value + "\n")
        path.chmod(0o600)
    return tmp_path


@pytest.fixture
def make_provider(
    endpoint: TokenEndpoint, secrets_dir: Path
) -> Callable[..., RefreshTokenProvider]:
    """Factory: a RefreshTokenProvider for the local endpoint and the secret files."""

    def build(**options: Any) -> RefreshTokenProvider:
        options.setdefault("token_url", endpoint.url)
        options.setdefault("client_id", CLIENT_ID)
        options.setdefault("refresh_token_file", secrets_dir / "refresh_token")
        options.setdefault("client_secret_file", secrets_dir / "client_secret")
        options.setdefault("scope", "https://mail.google.com/")
        options.setdefault("timeout", 5.0)
        return RefreshTokenProvider(**options)

    return build


ProviderFactory = Callable[..., RefreshTokenProvider]


def assert_no_secret(*texts: object) -> None:
    for text in texts:
        for secret in (REFRESH_TOKEN, CLIENT_SECRET, STALE, FRESH):
            assert secret not in str(text)


class TestRefreshGrant:
    """The refresh-token grant (RFC 6749 §6) and the cache in front of it."""

    def test_fetches_with_refresh_grant(
        self, endpoint: TokenEndpoint, make_provider: ProviderFactory
    ) -> None:
        """The provider posts the refresh-token grant with client id, secret and scope."""
        assert make_provider()(refresh=False) == FRESH
        assert endpoint.requests == [
            {
                "grant_type": "refresh_token",
                "refresh_token": REFRESH_TOKEN,
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "scope": "https://mail.google.com/",
            }
        ]

    def test_public_client(self, endpoint: TokenEndpoint, make_provider: ProviderFactory) -> None:
        """Without a client secret file (a public client) no client_secret is sent."""
        make_provider(client_secret_file=None, scope=None)(refresh=False)
        assert set(endpoint.requests[0]) == {"grant_type", "refresh_token", "client_id"}

    def test_cached_until_shortly_before_expiry(
        self, endpoint: TokenEndpoint, make_provider: ProviderFactory
    ) -> None:
        """A token is reused until a minute before expires_in, then fetched anew."""
        clock = Clock()
        endpoint.answer(granted("at-1"), granted("at-2"))
        provider = make_provider(clock=clock)
        assert provider(refresh=False) == "at-1"
        clock.now += 3539
        assert provider(refresh=False) == "at-1"
        assert len(endpoint.requests) == 1
        clock.now += 2
        assert provider(refresh=False) == "at-2"
        assert len(endpoint.requests) == 2

    @pytest.mark.parametrize(
        ("expires_in", "reused_until"),
        [(10, 5.0), ("120", 60.0), (None, oauth.DEFAULT_LIFETIME - 60), (-1, 240.0)],
    )
    def test_short_or_missing_lifetime(
        self,
        endpoint: TokenEndpoint,
        make_provider: ProviderFactory,
        expires_in: object,
        reused_until: float,
    ) -> None:
        """A short lifetime is renewed halfway; a missing or bad one counts as 5 minutes."""
        clock = Clock()
        endpoint.answer(granted("at-1", expires_in), granted("at-2"))
        provider = make_provider(clock=clock)
        provider(refresh=False)
        clock.now += reused_until - 0.1
        assert provider(refresh=False) == "at-1"
        clock.now += 0.2
        assert provider(refresh=False) == "at-2"

    def test_refresh_true_fetches_anew(
        self, endpoint: TokenEndpoint, make_provider: ProviderFactory
    ) -> None:
        """refresh=True fetches a new token even when the cached one has not expired."""
        endpoint.answer(granted("at-1"), granted("at-2"))
        provider = make_provider()
        assert provider(refresh=False) == "at-1"
        assert provider(refresh=True) == "at-2"
        assert provider.fetches == 2

    def test_rotated_refresh_token_is_kept_and_saved(
        self, endpoint: TokenEndpoint, make_provider: ProviderFactory, secrets_dir: Path
    ) -> None:
        """A refresh token the server rotates is used next and written back to its file."""
        endpoint.answer(granted("at-1", refresh_token="rt-2"), granted("at-2"))
        provider = make_provider()
        provider(refresh=False)
        path = secrets_dir / "refresh_token"
        assert path.read_text() == "rt-2\n"
        assert path.stat().st_mode & 0o777 == 0o600
        provider(refresh=True)
        assert endpoint.requests[1]["refresh_token"] == "rt-2"

    def test_changed_files_are_reread(
        self, endpoint: TokenEndpoint, make_provider: ProviderFactory, secrets_dir: Path
    ) -> None:
        """A refresh token or client secret replaced on disk is used at the next fetch."""
        provider = make_provider()
        provider(refresh=False)
        (secrets_dir / "refresh_token").write_text("rt-new-longer\n")
        (secrets_dir / "client_secret").write_text("secret-new-longer\n")
        provider(refresh=True)
        assert endpoint.requests[1]["refresh_token"] == "rt-new-longer"
        assert endpoint.requests[1]["client_secret"] == "secret-new-longer"

    def test_repr_holds_no_secret(self, make_provider: ProviderFactory) -> None:
        """The provider's repr names the endpoint and client id, no secret or token."""
        provider = make_provider()
        provider(refresh=False)
        assert CLIENT_ID in repr(provider)
        assert_no_secret(repr(provider))


class TestRefreshFailures:
    """Refused grants are permanent; slow, unreachable or failing endpoints transient."""

    @pytest.mark.parametrize(
        ("status", "error"),
        [(400, "invalid_grant"), (401, "invalid_client"), (400, "unauthorized_client")],
    )
    def test_refused_grant_is_permanent(
        self, endpoint: TokenEndpoint, make_provider: ProviderFactory, status: int, error: str
    ) -> None:
        """invalid_grant and a wrong client are permanent, named, and quote no secret."""
        endpoint.answer((status, {"error": error, "error_description": "Bad Request"}))
        with pytest.raises(OAuthTokenRefused) as failure:
            make_provider()(refresh=False)
        exc = failure.value
        assert isinstance(exc, MailworkerError)
        assert not exc.is_transient
        assert f"HTTP {status} {error} (Bad Request)" in str(exc)
        assert endpoint.url in str(exc)
        assert_no_secret(str(exc), repr(exc))

    def test_invalid_grant_names_the_file(
        self, endpoint: TokenEndpoint, make_provider: ProviderFactory, secrets_dir: Path
    ) -> None:
        """invalid_grant says which refresh token file needs a new token."""
        endpoint.answer((400, {"error": "invalid_grant"}))
        with pytest.raises(OAuthTokenRefused, match="obtain a new one") as failure:
            make_provider()(refresh=False)
        assert str(secrets_dir / "refresh_token") in str(failure.value)

    def test_echoed_secret_is_redacted(
        self, endpoint: TokenEndpoint, make_provider: ProviderFactory
    ) -> None:
        """A server that quotes our refresh token in its error does not get it into ours."""
        endpoint.answer((400, {"error": "invalid_grant", "error_description": REFRESH_TOKEN}))
        with pytest.raises(OAuthTokenRefused) as failure:
            make_provider()(refresh=False)
        assert "(****)" in str(failure.value)
        assert_no_secret(str(failure.value))

    @pytest.mark.parametrize(
        ("status", "body"),
        [
            (503, {}),
            (500, {"error": "server_error"}),
            (429, {"error": "slow_down"}),
            (400, {"error": "temporarily_unavailable"}),
            (200, {"token_type": "Bearer"}),
            (200, {"access_token": "x\r\nMAIL FROM:<>"}),
        ],
    )
    def test_failing_endpoint_is_transient(
        self,
        endpoint: TokenEndpoint,
        make_provider: ProviderFactory,
        status: int,
        body: dict[str, Any],
    ) -> None:
        """5xx, 429, temporarily_unavailable and an unusable answer are transient."""
        endpoint.answer((status, body))
        with pytest.raises(OAuthTokenUnavailable) as failure:
            oauth.get_token(make_provider(), refresh=False)
        assert failure.value.is_transient
        assert isinstance(failure.value, ConnectionError)

    def test_slow_endpoint_times_out(
        self, endpoint: TokenEndpoint, make_provider: ProviderFactory
    ) -> None:
        """An endpoint slower than the timeout gives a transient OAuthTokenTimeout in time."""
        endpoint.delay = 3.0
        started = time.monotonic()
        with pytest.raises(OAuthTokenTimeout) as failure:
            make_provider(timeout=0.3)(refresh=False)
        assert time.monotonic() - started < 2.0
        assert failure.value.is_transient
        assert isinstance(failure.value, TimeoutError)
        assert "did not answer within 0.3 s" in str(failure.value)

    def test_unreachable_endpoint(self, make_provider: ProviderFactory) -> None:
        """Nothing listening at the token URL is transient."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with pytest.raises(OAuthTokenUnavailable) as failure:
            make_provider(token_url=f"http://127.0.0.1:{port}/token")(refresh=False)
        assert failure.value.is_transient
        assert "unreachable" in str(failure.value)


class TestThreads:
    """One provider shared by many threads fetches once."""

    def test_many_threads_one_fetch(
        self, endpoint: TokenEndpoint, make_provider: ProviderFactory
    ) -> None:
        """Threads asking at once for a token wait for one fetch and share its token."""
        endpoint.delay = 0.3
        provider = make_provider()
        tokens = run_threads(16, lambda: provider(refresh=False))
        assert tokens == [FRESH] * 16
        assert len(endpoint.requests) == 1

    def test_concurrent_refreshes_one_fetch(
        self, endpoint: TokenEndpoint, make_provider: ProviderFactory
    ) -> None:
        """Threads whose token was refused at once get one fresh token between them."""
        endpoint.answer(granted(STALE), granted(FRESH))
        provider = make_provider()
        assert provider(refresh=False) == STALE
        endpoint.delay = 0.3
        tokens = run_threads(16, lambda: provider(refresh=True))
        assert tokens == [FRESH] * 16
        assert len(endpoint.requests) == 2


def run_threads(count: int, call: Callable[[], str]) -> list[str]:
    barrier = threading.Barrier(count)
    results: list[str] = []

    def run() -> None:
        barrier.wait()
        results.append(call())

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def recorded_provider(*, refresh: bool) -> str:
    """A provider named by ``oauth_token_provider`` in a test."""
    return FRESH if refresh else STALE


class TestProfileOptions:
    """The profile URL's oauth options build the provider; mistakes name the option."""

    def url(self, secrets_dir: Path, query: str, host: str = "smtp.gmail.com") -> str:
        return (
            f"smtps://app%40example.com@{host}?oauth_client_id={CLIENT_ID}"
            f"&oauth_client_secret_file={secrets_dir / 'client_secret'}"
            f"&oauth_refresh_token_file={secrets_dir / 'refresh_token'}{query}"
        )

    def test_google(self, secrets_dir: Path) -> None:
        """oauth=google gives Google's token URL and the https://mail.google.com/ scope."""
        profile = Profile.from_url(self.url(secrets_dir, "&oauth=google"))
        provider = profile.oauth_token_provider
        assert isinstance(provider, RefreshTokenProvider)
        assert provider.token_url == "https://oauth2.googleapis.com/token"
        assert provider.scope == "https://mail.google.com/"
        assert profile.wants_auth
        assert_no_secret(repr(profile))

    def test_microsoft_with_tenant(self, secrets_dir: Path) -> None:
        """oauth=microsoft takes a tenant (default common) and asks for SMTP.Send."""
        url = self.url(secrets_dir, "&oauth=microsoft&oauth_tenant=contoso.onmicrosoft.com")
        provider = Profile.from_url(url, name="m365").oauth_token_provider
        assert isinstance(provider, RefreshTokenProvider)
        assert provider.token_url == (
            "https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/token"
        )
        assert provider.scope == "https://outlook.office.com/SMTP.Send offline_access"
        common = Profile.from_url(self.url(secrets_dir, "&oauth=microsoft")).oauth_token_provider
        assert isinstance(common, RefreshTokenProvider)
        assert "/common/" in common.token_url

    def test_own_token_endpoint(self, secrets_dir: Path) -> None:
        """Any OAuth2 server: oauth_token_url and oauth_scope, no preset."""
        query = "&oauth_token_url=https://id.example.com/token&oauth_scope=smtp"
        provider = Profile.from_url(self.url(secrets_dir, query)).oauth_token_provider
        assert isinstance(provider, RefreshTokenProvider)
        assert (provider.token_url, provider.scope) == ("https://id.example.com/token", "smtp")

    def test_own_callable(self) -> None:
        """oauth_token_provider=package.module:callable names a provider of your own."""
        url = "smtps://u@h.example?oauth_token_provider=tests.smtp.test_oauth:recorded_provider"
        assert Profile.from_url(url).oauth_token_provider is recorded_provider

    @pytest.mark.parametrize(
        ("query", "message"),
        [
            ("&oauth=yahoo", "option oauth='yahoo': choose google or microsoft"),
            ("", "set oauth=google or oauth=microsoft, or oauth_token_url"),
            ("&oauth=google&oauth_tenant=x", "oauth_tenant: only for oauth=microsoft"),
            ("&oauth_token_url=http://id.example.com/token", "must be an https:// URL"),
            ("&oauth_token_url=https://u:pw@id.example.com/t", "must not hold credentials"),
            ("&oauth=google&oauth_token_provider=a.b:c", "drop oauth, oauth_client_id"),
        ],
    )
    def test_mistakes(self, secrets_dir: Path, query: str, message: str) -> None:
        """A wrong, missing or conflicting option is a ConfigError naming it."""
        with pytest.raises(ConfigError, match="profile 'default': ") as failure:
            Profile.from_url(self.url(secrets_dir, query))
        assert message in str(failure.value)
        assert_no_secret(str(failure.value))

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            ("nowhere.at_all:get", "cannot import it (ModuleNotFoundError"),
            ("tests.smtp.test_oauth:nothing", "cannot import it (AttributeError"),
            ("tests.smtp.test_oauth:CLIENT_ID", "is not callable"),
            ("no-colon", "expected package.module:callable"),
        ],
    )
    def test_own_callable_mistakes(self, spec: str, message: str) -> None:
        """A callable that cannot be imported or called is a ConfigError naming it."""
        with pytest.raises(ConfigError, match="oauth_token_provider") as failure:
            Profile.from_url(f"smtps://u@h.example?oauth_token_provider={spec}")
        assert message in str(failure.value)

    def test_missing_pieces(self, secrets_dir: Path) -> None:
        """The grant needs a client id and a refresh token file that exists."""
        with pytest.raises(ConfigError, match="needs oauth_client_id and oauth_refresh_token"):
            Profile.from_url("smtps://u@smtp.gmail.com?oauth=google")
        with pytest.raises(ConfigError, match="oauth_refresh_token_file='/nope': no such file"):
            Profile.from_url("smtps://u@h.example?oauth=google&oauth_refresh_token_file=/nope")
        empty = secrets_dir / "empty"
        empty.write_text("")
        with pytest.raises(ConfigError, match=r"oauth_refresh_token_file: .* is empty"):
            Profile.from_url(
                f"smtps://u@h.example?oauth=google&oauth_client_id=c"
                f"&oauth_refresh_token_file={empty}"
            )

    def test_user_required(self, secrets_dir: Path) -> None:
        """XOAUTH2 names the user, so the URL must have one."""
        url = self.url(secrets_dir, "&oauth=google").replace("app%40example.com@", "")
        with pytest.raises(ConfigError, match="XOAUTH2 needs the user name"):
            Profile.from_url(url)

    def test_token_given_twice(self, secrets_dir: Path) -> None:
        """oauth options and MAILWORKER_SMTP_OAUTH_TOKEN together are refused."""
        env = {
            "MAILWORKER_SMTP_URL": self.url(secrets_dir, "&oauth=google"),
            "MAILWORKER_SMTP_OAUTH_TOKEN": "static-token",
        }
        with pytest.raises(ConfigError, match=r"MAILWORKER_SMTP_URL: .*OAuth token given twice"):
            Profile.from_env(environ=env)

    def test_without_httpx(self, secrets_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without the oauth extra the error says what to install."""
        monkeypatch.setattr(oauth.importlib.util, "find_spec", lambda _name: None)
        with pytest.raises(ConfigError, match=r'pip install "mailworker\[oauth\]"'):
            Profile.from_url(self.url(secrets_dir, "&oauth=google"))


@pytest.fixture
def xoauth2_server(smtp_server: SMTPFactory) -> SMTPServer:
    """An implicit-TLS server that accepts only FRESH over XOAUTH2 and refuses other
    tokens like Gmail: ``334 <base64 JSON>``, then ``535`` after an empty line."""
    return smtp_server(tls="implicit", auth=True, token=FRESH, mechanisms=["XOAUTH2"])


def with_provider(make_profile: ProfileFactory, server: SMTPServer, provider: Any) -> Profile:
    profile = make_profile(server, "smtps", token="unused", auth="XOAUTH2")
    return dataclasses.replace(profile, oauth_token_provider=provider)


class Recorder:
    """A provider returning ``tokens[refresh]`` and recording each call's ``refresh``."""

    def __init__(self, stale: str = STALE, fresh: str = FRESH) -> None:
        self.calls: list[bool] = []
        self.tokens = {False: stale, True: fresh}

    def __call__(self, *, refresh: bool) -> str:
        self.calls.append(refresh)
        return self.tokens[refresh]


class TestRefusedToken:
    """A refused token is refreshed once and AUTH tried once more on the same connection."""

    def test_stale_token_refreshed_and_retried(
        self, xoauth2_server: SMTPServer, make_profile: ProfileFactory
    ) -> None:
        """First token refused, refresh=True, AUTH again on the same connection: sent."""
        provider = Recorder()
        profile = with_provider(make_profile, xoauth2_server, provider)
        with capture_logs() as logs, SMTPSession(profile) as session:
            result = session.send(SENDER, [RCPT], MESSAGE)
            transcript = session.transcript.as_strings()
        assert provider.calls == [False, True]
        assert xoauth2_server.handler.logins == [
            AuthAttempt("XOAUTH2", DEFAULT_USER, False),
            AuthAttempt("XOAUTH2", DEFAULT_USER, True),
        ]
        assert (session.connections, xoauth2_server.handler.connections) == (1, 1)
        assert transcript.count("C: AUTH XOAUTH2 ****") == 2
        assert_no_secret(transcript, result.transcript, logs)
        assert xoauth2_server.handler.wait_for_messages(1)

    def test_fresh_token_refused_too(
        self, xoauth2_server: SMTPServer, make_profile: ProfileFactory
    ) -> None:
        """When the fresh token is refused too the error is permanent, after two calls."""
        provider = Recorder(fresh="ya29.also-refused")
        profile = with_provider(make_profile, xoauth2_server, provider)
        with capture_logs() as logs, pytest.raises(SMTPAuthError) as failure:
            SMTPSession(profile).connect()
        exc = failure.value
        assert (exc.stage, exc.code, exc.is_transient) == ("auth", 535, False)
        assert provider.calls == [False, True]
        assert [a.success for a in xoauth2_server.handler.logins] == [False, False]
        assert exc.transcript.count("C: AUTH XOAUTH2 ****") == 2
        assert_no_secret(str(exc), repr(exc), exc.to_dict(), exc.transcript, logs)
        assert "ya29.also-refused" not in str([str(exc), exc.to_dict(), exc.transcript, logs])

    def test_same_token_is_not_retried(
        self, xoauth2_server: SMTPServer, make_profile: ProfileFactory
    ) -> None:
        """A provider that gives the refused token again gets no second AUTH."""
        provider = Recorder(fresh=STALE)
        profile = with_provider(make_profile, xoauth2_server, provider)
        with pytest.raises(SMTPAuthError) as failure:
            SMTPSession(profile).connect()
        assert not failure.value.is_transient
        assert provider.calls == [False, True]
        assert xoauth2_server.handler.counts["AUTH"] == 1

    @pytest.mark.parametrize(
        ("error", "transient"),
        [
            (OAuthTokenUnavailable("token endpoint https://id.example/token failed"), True),
            (OAuthTokenRefused("token endpoint https://id.example/token refused it"), False),
        ],
    )
    def test_refresh_fails(
        self,
        xoauth2_server: SMTPServer,
        make_profile: ProfileFactory,
        error: Exception,
        transient: bool,
    ) -> None:
        """A refresh that fails decides: unreachable endpoint transient, refused grant not."""

        def provider(*, refresh: bool) -> str:
            if refresh:
                raise error
            return STALE

        profile = with_provider(make_profile, xoauth2_server, provider)
        with pytest.raises(SMTPAuthError) as failure:
            SMTPSession(profile).connect()
        exc = failure.value
        assert (exc.stage, exc.is_transient) == ("auth", transient)
        assert str(exc).startswith(f"[auth] no OAuth token: {error}")
        assert xoauth2_server.handler.counts["AUTH"] == 1

    def test_zero_argument_provider_is_called_again(
        self, xoauth2_server: SMTPServer, make_profile: ProfileFactory
    ) -> None:
        """A provider without the refresh parameter is simply called again."""
        tokens = iter([STALE, FRESH])
        profile = with_provider(make_profile, xoauth2_server, lambda: next(tokens))
        with SMTPSession(profile) as session:
            session.send(SENDER, [RCPT], MESSAGE)
        assert [a.success for a in xoauth2_server.handler.logins] == [False, True]


class TestEndToEnd:
    """The refresh-token provider, from profile options, against both servers."""

    def test_refused_token_refreshed_from_endpoint(
        self,
        xoauth2_server: SMTPServer,
        endpoint: TokenEndpoint,
        make_profile: ProfileFactory,
        secrets_dir: Path,
    ) -> None:
        """A token the endpoint gave but the server refuses is refreshed there, once."""
        endpoint.answer(granted(STALE), granted(FRESH))
        profile = make_profile(
            xoauth2_server,
            "smtps",
            password=None,
            auth="XOAUTH2",
            oauth_token_url=endpoint.url,
            oauth_client_id=CLIENT_ID,
            oauth_client_secret_file=secrets_dir / "client_secret",
            oauth_refresh_token_file=secrets_dir / "refresh_token",
        )
        with capture_logs() as logs, SMTPSession(profile) as session:
            result = session.send(SENDER, [RCPT], MESSAGE)
        assert len(endpoint.requests) == 2
        assert [a.success for a in xoauth2_server.handler.logins] == [False, True]
        assert_no_secret(session.transcript.as_strings(), result.transcript, logs, repr(profile))
        assert [e["event"] for e in logs].count("oauth.token_fetched") == 2

    def test_invalid_grant_at_connect(
        self,
        xoauth2_server: SMTPServer,
        endpoint: TokenEndpoint,
        make_profile: ProfileFactory,
        make_provider: ProviderFactory,
    ) -> None:
        """invalid_grant at connect is a permanent SMTPAuthError and no AUTH is sent."""
        endpoint.answer((400, {"error": "invalid_grant"}))
        profile = with_provider(make_profile, xoauth2_server, make_provider())
        with pytest.raises(SMTPAuthError) as failure:
            SMTPSession(profile).connect()
        exc = failure.value
        assert (exc.stage, exc.is_transient) == ("auth", False)
        assert "invalid_grant" in str(exc)
        assert xoauth2_server.handler.counts["AUTH"] == 0
        assert_no_secret(str(exc), exc.to_dict(), exc.transcript)


class TestWorkerSecrets:
    """The worker's log redactor learns the secrets without fetching a token."""

    def test_no_fetch_at_start(
        self, endpoint: TokenEndpoint, make_provider: ProviderFactory
    ) -> None:
        """A refresh-token profile gives its refresh token and client secret, no request."""
        profile = Profile.from_url("smtps://u@h.example", oauth_token_provider=make_provider())
        secrets = profile_secrets([profile])
        assert {REFRESH_TOKEN, CLIENT_SECRET} <= set(secrets)
        assert endpoint.requests == []

    def test_static_token_and_its_xoauth2_form(self) -> None:
        """A token from the environment is redacted as text and as the XOAUTH2 string."""
        profile = Profile.from_env(
            environ={
                "MAILWORKER_SMTP_URL": "smtps://u@h.example",
                "MAILWORKER_SMTP_OAUTH_TOKEN": FRESH,
            }
        )
        xoauth2 = base64.b64encode(f"user=u\x01auth=Bearer {FRESH}\x01\x01".encode()).decode()
        assert {FRESH, xoauth2} <= set(profile_secrets([profile]))

    def test_own_provider_not_called(self) -> None:
        """A provider of the user's own is not called at start (it may fetch)."""
        provider = Recorder()
        profile = Profile.from_url("smtps://u@h.example", oauth_token_provider=provider)
        assert profile_secrets([profile]) == []
        assert provider.calls == []
