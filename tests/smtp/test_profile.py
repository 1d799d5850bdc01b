"""Profiles parsed from URLs and the environment."""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailworker import ConfigError, Profile, Timeouts
from mailworker.smtp.limits import normalize_profile_name
from mailworker.smtp.profile import profile_names


class TestSchemes:
    def test_smtps_is_implicit_tls_on_465(self) -> None:
        """smtps:// means implicit TLS, port 465 by default."""
        p = Profile.from_url("smtps://u:p@mail.example.com")
        assert (p.security, p.port, p.host) == ("tls", 465, "mail.example.com")

    @pytest.mark.parametrize("scheme", ["smtp+starttls", "submission", "SMTP+STARTTLS"])
    def test_starttls_schemes_require_starttls_on_587(self, scheme: str) -> None:
        """smtp+starttls:// and its alias submission:// mean STARTTLS required, port 587."""
        p = Profile.from_url(f"{scheme}://u:p@mail.example.com")
        assert (p.security, p.port) == ("starttls", 587)

    def test_smtp_is_clear_text_on_25(self) -> None:
        """smtp:// is a clear-text relay on port 25."""
        p = Profile.from_url("smtp://relay.internal")
        assert (p.security, p.port, p.wants_auth) == ("none", 25, False)

    def test_auth_over_clear_text_is_refused(self) -> None:
        """Credentials on smtp:// are refused unless allow_insecure_auth is set."""
        with pytest.raises(ConfigError, match="allow_insecure_auth"):
            Profile.from_url("smtp://u:p@relay.internal")
        p = Profile.from_url("smtp://u:p@relay.internal?allow_insecure_auth=true")
        assert p.allow_insecure_auth
        assert p.wants_auth

    def test_unknown_scheme_names_the_known_ones(self) -> None:
        """An unknown scheme is an error listing the supported schemes."""
        with pytest.raises(ConfigError, match=r"smtps://.*smtp\+starttls://"):
            Profile.from_url("http://u:p@mail.example.com")


class TestCredentials:
    def test_user_and_password_are_percent_decoded(self) -> None:
        """Percent-encoded user and password are decoded."""
        p = Profile.from_url("smtps://app%40example.com:p%40ss%3Aw%2Frd@mail.example.com")
        assert (p.username, p.password) == ("app@example.com", "p@ss:w/rd")

    def test_password_never_in_repr(self) -> None:
        """repr() of a profile does not contain the password."""
        p = Profile.from_url("smtps://u:sup3rsecret@mail.example.com")
        assert "sup3rsecret" not in repr(p)
        assert "sup3rsecret" not in p.redacted_url()

    def test_password_never_in_errors(self) -> None:
        """A malformed URL's error does not echo the password."""
        with pytest.raises(ConfigError) as info:
            Profile.from_url("smtps://u:sup3rsecret@mail.example.com?bogus=1")
        assert "sup3rsecret" not in str(info.value)
        assert "bogus" in str(info.value)

    @pytest.mark.parametrize("delimiter", ["\uff03", "\uff0f", "\uff1f", "\uff20", "\uff1a"])
    def test_fullwidth_delimiter_in_password_never_in_errors(self, delimiter: str) -> None:
        """A password with a character NFKC turns into a URL delimiter is refused unquoted."""
        password = f"pa{delimiter}s3cr3t"
        for url in (f"smtps://user:{password}@mail.example.com", f"smtps://user:{password}@h:465"):
            with pytest.raises(ConfigError) as info:
                Profile.from_url(url)
            message = str(info.value)
            assert "s3cr3t" not in message
            assert password not in message
            assert "percent-encode" in message

    def test_fullwidth_password_works_percent_encoded(self) -> None:
        """The same password, percent-encoded, is accepted."""
        password = "pa\uff03ss"
        p = Profile.from_url(f"smtps://user:{quote(password, safe='')}@mail.example.com")
        assert p.password == password

    def test_password_from_env_and_file(self, tmp_path: Path) -> None:
        """The password may come from MAILWORKER_SMTP_PASSWORD or a _FILE (newline stripped)."""
        env = {
            "MAILWORKER_SMTP_URL": "smtps://u@mail.example.com",
            "MAILWORKER_SMTP_PASSWORD": "x1",
        }
        assert Profile.from_env(environ=env).password == "x1"
        secret = tmp_path / "pw"
        secret.write_text("from-file\n")
        env = {
            "MAILWORKER_SMTP_URL": "smtps://u@h.example",
            "MAILWORKER_SMTP_PASSWORD_FILE": str(secret),
        }
        assert Profile.from_env(environ=env).password == "from-file"

    def test_password_given_twice_is_an_error(self) -> None:
        """A password both in the URL and in the environment is ambiguous."""
        env = {"MAILWORKER_SMTP_URL": "smtps://u:a@h.example", "MAILWORKER_SMTP_PASSWORD": "b"}
        with pytest.raises(ConfigError, match="twice"):
            Profile.from_env(environ=env)

    def test_user_without_password_is_an_error(self) -> None:
        """A user name with no password anywhere names the variable to set."""
        with pytest.raises(ConfigError, match="MAILWORKER_SMTP_PASSWORD"):
            Profile.from_url("smtps://u@h.example")

    def test_oauth_token_file_is_read_at_each_call(self, tmp_path: Path) -> None:
        """An OAuth token file is re-read on every connect, so it can be refreshed."""
        token = tmp_path / "token"
        token.write_text("t1")
        env = {
            "MAILWORKER_SMTP_URL": "smtps://u@h.example?auth=XOAUTH2",
            "MAILWORKER_SMTP_OAUTH_TOKEN_FILE": str(token),
        }
        p = Profile.from_env(environ=env)
        assert p.oauth_token_provider is not None
        assert p.oauth_token_provider() == "t1"
        token.write_text("t2")
        assert p.oauth_token_provider() == "t2"


class TestOptions:
    def test_every_option(self, tmp_path: Path) -> None:
        """Every documented query option is parsed into the profile."""
        ca = tmp_path / "ca.pem"
        ca.write_text("x")
        p = Profile.from_url(
            f"smtps://u:p@h.example?verify=false&ca_file={ca}&auth=PLAIN,LOGIN&timeout=7"
            "&local_hostname=client.example.com&max_messages=5&noop_after=2"
        )
        assert p.verify is False
        assert p.ca_file == str(ca)
        assert p.auth == ("PLAIN", "LOGIN")
        assert p.timeouts == Timeouts.uniform(7)
        assert (p.local_hostname, p.max_messages, p.noop_after) == ("client.example.com", 5, 2)

    def test_default_timeouts_follow_rfc_5321(self) -> None:
        """Without timeout=, stages use RFC 5321 §4.5.3.2 values."""
        t = Profile.from_url("smtps://u:p@h.example").timeouts
        assert (t.greeting, t.mail, t.rcpt, t.data_init, t.data_block, t.data_end) == (
            300,
            300,
            300,
            120,
            180,
            600,
        )

    @pytest.mark.parametrize(
        ("query", "named"),
        [
            ("verify=maybe", "verify"),
            ("timeout=soon", "timeout"),
            ("timeout=-1", "timeout"),
            ("max_messages=0", "max_messages"),
            ("auth=NTLM", "auth"),
            ("ca_file=/nonexistent.pem", "ca_file"),
            ("local_hostname=bad%0Ahost", "local_hostname"),
            ("colour=blue", "colour"),
            ("verify=true&verify=false", "verify"),
        ],
    )
    def test_bad_options_name_the_option(self, query: str, named: str) -> None:
        """A malformed or unknown option is an error naming it."""
        with pytest.raises(ConfigError, match=named):
            Profile.from_url(f"smtps://u:p@h.example?{query}")

    @pytest.mark.parametrize(
        ("url", "named"),
        [
            ("smtps://u:p@h.example:notaport", "port"),
            ("smtps://u:p@h.example:70000", "port"),
            ("smtps:///nohost", "host"),
            ("smtps://u:p@h.example/path", "path"),
            ("smtps://u:p@h.exa\r\nmple", "CR or LF"),
        ],
    )
    def test_malformed_urls_name_the_problem(self, url: str, named: str) -> None:
        """A malformed URL is an error saying what is wrong with it."""
        with pytest.raises(ConfigError, match=named):
            Profile.from_url(url)


class TestEnvironment:
    def test_named_profiles(self) -> None:
        """MAILWORKER_SMTP_URL_<NAME> adds profile <name>."""
        env = {
            "MAILWORKER_SMTP_URL": "smtps://u:p@a.example",
            "MAILWORKER_SMTP_URL_BULK": "smtp://relay.example",
        }
        assert profile_names(env) == ["bulk", "default"]
        assert Profile.from_env("bulk", env).host == "relay.example"

    def test_named_profile_password_file(self, tmp_path: Path) -> None:
        """Profile bulk reads its password file from MAILWORKER_SMTP_PASSWORD_BULK_FILE."""
        secret = tmp_path / "pw"
        secret.write_text("bulk-secret\n")
        env = {
            "MAILWORKER_SMTP_URL_BULK": "smtps://u@bulk.example",
            "MAILWORKER_SMTP_PASSWORD_BULK_FILE": str(secret),
        }
        assert Profile.from_env("bulk", env).password == "bulk-secret"

    def test_named_profile_token_file(self, tmp_path: Path) -> None:
        """Profile bulk reads its OAuth token file from MAILWORKER_SMTP_OAUTH_TOKEN_BULK_FILE."""
        token = tmp_path / "token"
        token.write_text("t1")
        env = {
            "MAILWORKER_SMTP_URL_BULK": "smtps://u@bulk.example?auth=XOAUTH2",
            "MAILWORKER_SMTP_OAUTH_TOKEN_BULK_FILE": str(token),
        }
        provider = Profile.from_env("bulk", env).oauth_token_provider
        assert provider is not None
        assert provider() == "t1"

    @pytest.mark.parametrize("secret", ["PASSWORD", "OAUTH_TOKEN"])
    def test_misplaced_file_suffix_names_the_right_variable(
        self, tmp_path: Path, secret: str
    ) -> None:
        """MAILWORKER_SMTP_<SECRET>_FILE_BULK is an error naming …_<SECRET>_BULK_FILE."""
        path = tmp_path / "secret"
        path.write_text("x")
        env = {
            "MAILWORKER_SMTP_URL_BULK": "smtps://u:p@bulk.example",
            f"MAILWORKER_SMTP_{secret}_FILE_BULK": str(path),
        }
        with pytest.raises(ConfigError, match=f"MAILWORKER_SMTP_{secret}_BULK_FILE"):
            Profile.from_env("bulk", env)

    def test_profile_named_file_something_is_not_mistaken(self) -> None:
        """A profile called file_bulk keeps its plain MAILWORKER_SMTP_PASSWORD_FILE_BULK."""
        env = {
            "MAILWORKER_SMTP_URL_BULK": "smtps://u:p@bulk.example",
            "MAILWORKER_SMTP_URL_FILE_BULK": "smtps://u@other.example",
            "MAILWORKER_SMTP_PASSWORD_FILE_BULK": "other-secret",
        }
        assert Profile.from_env("bulk", env).password == "p"
        assert Profile.from_env("file_bulk", env).password == "other-secret"

    def test_named_profile_without_password_names_its_variable(self) -> None:
        """A named profile's missing password names MAILWORKER_SMTP_PASSWORD_<NAME>."""
        env = {"MAILWORKER_SMTP_URL_BULK": "smtps://u@bulk.example"}
        with pytest.raises(ConfigError, match="MAILWORKER_SMTP_PASSWORD_BULK_FILE"):
            Profile.from_env("bulk", env)

    def test_profile_names_are_case_insensitive(self) -> None:
        """Bulk, BULK and bulk are one profile, named bulk."""
        env = {"MAILWORKER_SMTP_URL_BULK": "smtp://relay.example"}
        profiles = {Profile.from_env(n, env) for n in ("Bulk", "BULK", " bulk ")}
        assert len(profiles) == 1
        assert profiles.pop().name == "bulk"
        assert normalize_profile_name("Bulk") == "bulk"
        assert normalize_profile_name("") == normalize_profile_name(None) == "default"
        assert profile_names(env) == ["bulk"]

    def test_missing_profile_names_the_variable(self) -> None:
        """An unconfigured profile's error names the variable to set."""
        with pytest.raises(ConfigError, match="MAILWORKER_SMTP_URL_BULK"):
            Profile.from_env("bulk", {})


_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=30)


class TestProperties:
    @given(user=_text, password=_text)
    def test_any_credentials_round_trip_percent_encoded(self, user: str, password: str) -> None:
        """Any user and password without CR/LF survive percent-encoding in the URL."""
        if any(c in user + password for c in "\r\n"):
            return
        url = f"smtps://{quote(user, safe='')}:{quote(password, safe='')}@mail.example.com"
        p = Profile.from_url(url)
        assert (p.username, p.password) == (user, password)
        assert "password" not in repr(p)

    @given(st.text(max_size=80))
    def test_arbitrary_text_is_parsed_or_refused_cleanly(self, url: str) -> None:
        """Any string either parses or raises ConfigError — never another exception."""
        with contextlib.suppress(ConfigError):
            Profile.from_url(url)
