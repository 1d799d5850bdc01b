"""A profile's fleet-wide limits (``rate``, ``max_connections``, ``fallback``, breaker and
throttle options) parsed from its URL."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailworker import ConfigError, Profile
from mailworker.smtp.limits import FleetLimits, Rate

BASE = "smtps://u:p@mail.example.com"


def limits(query: str, *, name: str = "default") -> FleetLimits:
    """The fleet limits of a profile with URL options ``query``."""
    return Profile.from_url(f"{BASE}?{query}", name=name).fleet


def refused(query: str, *, name: str = "default") -> str:
    """The error message for a profile with URL options ``query``."""
    with pytest.raises(ConfigError) as info:
        Profile.from_url(f"{BASE}?{query}", name=name)
    return str(info.value)


class TestRate:
    """``rate=<n>/s``, ``/m``, ``/h``."""

    @pytest.mark.parametrize(
        ("text", "count", "per", "per_second"),
        [
            ("10/s", 10, 1, 10),
            ("0.5/s", 0.5, 1, 0.5),
            ("600/m", 600, 60, 10),
            ("3600/h", 3600, 3600, 1),
            (".5/s", 0.5, 1, 0.5),
            ("2/M", 2, 60, 2 / 60),
            ("1e3/s", 1000, 1, 1000),
        ],
    )
    def test_forms(self, text: str, count: float, per: float, per_second: float) -> None:
        """Counts per second, minute or hour, fractions too, read as count and period."""
        rate = limits(f"rate={text}").rate
        assert rate == Rate(count, per)
        assert rate is not None
        assert rate.per_second == pytest.approx(per_second)

    @pytest.mark.parametrize(
        ("text", "shown"),
        [("10/s", "10/s"), ("0.5/s", "0.5/s"), ("600/m", "600/m"), (".5/h", "0.5/h")],
    )
    def test_str_gives_the_text_back(self, text: str, shown: str) -> None:
        """str(rate) is the option's text, and reads back as the same rate."""
        rate = Rate.parse(text, "option rate")
        assert str(rate) == shown
        assert Rate.parse(str(rate), "option rate") == rate

    def test_other_periods_are_shown_per_second(self) -> None:
        """A rate built by hand over another period is shown per second."""
        assert str(Rate(30, 2)) == "15/s"

    @given(st.floats(min_value=1e-6, max_value=1e9), st.sampled_from(["s", "m", "h"]))
    def test_any_positive_count_round_trips(self, count: float, unit: str) -> None:
        """Any positive count, as Python writes it, reads back unchanged."""
        rate = Rate.parse(f"{count!r}/{unit}", "option rate")
        assert rate.count == count
        assert Rate.parse(str(rate), "option rate") == rate

    @pytest.mark.parametrize(
        "text", ["10", "10/x", "0/s", "-1/s", "ten/s", "10/sec", "1e/s", "inf/s", "/s", ""]
    )
    def test_malformed_rates_name_the_option_and_the_forms(self, text: str) -> None:
        """A rate that is not <n>/s, /m or /h with n positive is refused with the forms."""
        message = refused(f"rate={text}", name="bulk")
        assert message.startswith("profile 'bulk': option rate:")
        assert "<n>/s, <n>/m or <n>/h" in message

    def test_parse_names_where(self) -> None:
        """Rate.parse names what it was given by."""
        with pytest.raises(ConfigError, match=r"^MAILWORKER_RATE: 'x' is not a rate"):
            Rate.parse("x", "MAILWORKER_RATE")

    @pytest.mark.parametrize(("count", "per"), [(0, 1), (1, 0), (float("nan"), 1), (1, -1)])
    def test_built_by_hand_must_be_positive(self, count: float, per: float) -> None:
        """Rate(count, per) refuses zero, negative and not-a-number."""
        with pytest.raises(ConfigError, match="positive"):
            Rate(count, per)

    def test_hashable_and_frozen(self) -> None:
        """A Rate is a value: equal by content, usable as a key, not changeable."""
        assert {Rate(1, 1): "a"}[Rate.parse("1/s", "rate")] == "a"
        with pytest.raises(AttributeError):
            Rate(1, 1).count = 2  # type: ignore[misc]


class TestConnectionsAndTuning:
    """``max_connections`` and the breaker and throttle numbers."""

    def test_defaults(self) -> None:
        """Without options: no rate, no connection limit, no fallback, default tuning."""
        fleet = Profile.from_url(BASE).fleet
        assert fleet == FleetLimits()
        assert (fleet.rate, fleet.max_connections, fleet.fallback) == (None, None, ())
        assert (fleet.breaker_failures, fleet.breaker_window, fleet.breaker_reset) == (5, 60, 30)
        assert (fleet.throttle_backoff, fleet.throttle_backoff_max) == (2, 60)

    def test_all_options(self) -> None:
        """Every option lands in its field."""
        fleet = limits(
            "max_connections=3&breaker_failures=2&breaker_window=10.5&breaker_reset=5"
            "&throttle_backoff=0.5&throttle_backoff_max=8"
        )
        assert fleet == FleetLimits(
            max_connections=3,
            breaker_failures=2,
            breaker_window=10.5,
            breaker_reset=5,
            throttle_backoff=0.5,
            throttle_backoff_max=8,
        )

    @pytest.mark.parametrize(
        ("query", "expected"),
        [
            ("max_connections=0", "option max_connections='0': must be at least 1"),
            ("max_connections=1.5", "option max_connections='1.5': expected a whole number"),
            ("breaker_failures=-2", "option breaker_failures='-2': must be at least 1"),
            ("breaker_window=0", "option breaker_window='0': expected a positive number"),
            ("breaker_reset=soon", "option breaker_reset='soon': expected a positive number"),
            ("throttle_backoff=nan", "option throttle_backoff='nan': expected a positive"),
            ("throttle_backoff_max=inf", "option throttle_backoff_max='inf': expected a"),
        ],
    )
    def test_bad_numbers_name_profile_and_option(self, query: str, expected: str) -> None:
        """A number out of range names the profile, the option and what it takes."""
        assert refused(query, name="bulk").startswith(f"profile 'bulk': {expected}")

    def test_backoff_max_below_backoff(self) -> None:
        """throttle_backoff above throttle_backoff_max is refused with the fix."""
        message = refused("throttle_backoff=120", name="bulk")
        assert message == (
            "profile 'bulk': throttle_backoff_max (60 s) is below throttle_backoff (120 s); "
            "raise throttle_backoff_max to at least 120"
        )
        assert limits("throttle_backoff=120&throttle_backoff_max=120").throttle_backoff == 120

    def test_options_given_twice_are_refused(self) -> None:
        """An option given twice is an error, as every other option."""
        assert "option 'rate' given twice" in refused("rate=1/s&rate=2/s")

    def test_built_by_hand_is_checked_too(self) -> None:
        """FleetLimits refuses bad values when built in code as well."""
        with pytest.raises(ConfigError, match="max_connections must be at least 1"):
            FleetLimits(max_connections=0)
        with pytest.raises(ConfigError, match="breaker_failures must be a whole number"):
            FleetLimits(breaker_failures=2.5)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="breaker_reset must be a positive number"):
            FleetLimits(breaker_reset=-1)


class TestFallback:
    """``fallback=<profile>[,<profile>...]``."""

    def test_names_are_normalised_and_kept_in_order(self) -> None:
        """Fallbacks are profile names, lower-cased and stripped like every profile name."""
        assert limits("fallback=Backup,%20RELAY").fallback == ("backup", "relay")

    def test_a_profile_may_not_fall_back_to_itself(self) -> None:
        """Naming the profile itself is refused, in any case."""
        message = refused("fallback=backup,BULK", name="bulk")
        assert message.startswith("profile 'bulk': fallback names the profile itself")
        assert "default" in refused("fallback=default")

    def test_duplicates_are_refused(self) -> None:
        """A fallback listed twice (after normalising) is refused."""
        message = refused("fallback=backup,Backup", name="bulk")
        assert message == "profile 'bulk': fallback lists backup twice; list each profile once"

    @pytest.mark.parametrize("value", ["", ",", "a,,b", "a,"])
    def test_empty_names_are_refused(self, value: str) -> None:
        """Empty names between the commas are an error showing the form."""
        assert "give profile names separated by commas" in refused(f"fallback={value}")

    def test_from_env(self) -> None:
        """From the environment, errors name the variable too."""
        env = {"MAILWORKER_SMTP_URL_BULK": f"{BASE}?fallback=bulk"}
        with pytest.raises(ConfigError, match=r"^MAILWORKER_SMTP_URL_BULK: profile 'bulk': "):
            Profile.from_env("Bulk", env)
        env = {"MAILWORKER_SMTP_URL_BULK": f"{BASE}?fallback=default&rate=5/s"}
        fleet = Profile.from_env("bulk", env).fleet
        assert (fleet.fallback, fleet.rate) == (("default",), Rate(5, 1))


class TestRedactedURL:
    """redacted_url() keeps every option that differs from its default."""

    @pytest.mark.parametrize(
        "query",
        [
            "",
            "rate=0.5/s",
            "rate=600/m&max_connections=4&fallback=backup,relay",
            "breaker_failures=3&breaker_window=12.5&breaker_reset=7"
            "&throttle_backoff=0.25&throttle_backoff_max=30",
            "verify=false&timeout=30&max_messages=5&noop_after=0&auth=PLAIN,LOGIN"
            "&local_hostname=app.example.com",
        ],
    )
    def test_round_trip(self, query: str) -> None:
        """The redacted URL, with the password put back, reads as the same profile."""
        profile = Profile.from_url(f"smtps://app%40example.com:s3cret@mail.example.com?{query}")
        redacted = profile.redacted_url()
        assert "s3cret" not in redacted
        assert Profile.from_url(redacted.replace("****", "s3cret")) == profile

    def test_defaults_are_left_out(self) -> None:
        """A profile without options has a URL without a query, as before."""
        assert Profile.from_url(BASE).redacted_url() == "smtps://u:****@mail.example.com:465"

    def test_options_are_readable(self) -> None:
        """Rates and fallback lists are not percent-encoded."""
        url = Profile.from_url(f"{BASE}?rate=10/s&fallback=a,b").redacted_url()
        assert url.endswith("?rate=10/s&fallback=a,b")
