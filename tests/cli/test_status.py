"""``mailworker status`` through click's CliRunner, against a real Redis whose limits are
set through :mod:`mailworker.store.limits`."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable

import pytest
import redis
from click.testing import CliRunner, Result

from mailworker.cli import main
from mailworker.smtp.limits import Rate
from mailworker.store.limits import Breaker, Leases, RateLimiter, Throttle
from tests.servers import free_port

Invoke = Callable[..., Result]

#: Three profiles: limited with a fallback that does not exist, limited, unlimited.
PROFILES = {
    "MAILWORKER_SMTP_URL": "smtp://relay.internal?rate=10/s&max_connections=4&fallback=bulk,backup",
    "MAILWORKER_SMTP_URL_BULK": "smtp://bulk.internal?rate=60/h&breaker_failures=2",
    "MAILWORKER_SMTP_URL_PLAIN": "smtp://plain.internal",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No MAILWORKER_* variable inherited from the environment."""
    for var in [v for v in os.environ if v.startswith("MAILWORKER_")]:
        monkeypatch.delenv(var)


@pytest.fixture
def cli(redis_url: str) -> Invoke:
    """Run ``mailworker status ARGS...`` with the three profiles and the test's Redis."""

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        full = {**PROFILES, "MAILWORKER_REDIS_URL": redis_url, **(env or {})}
        return CliRunner().invoke(main, ["status", *args], env=full)

    return invoke


@pytest.fixture
def busy(redis_client: redis.Redis) -> None:
    """The fleet's state: 2 of default's 4 connections held; bulk's one token taken
    (one a minute comes back), bulk throttled for 30 s and its breaker opened by 2
    failures (probe in 40 s)."""
    assert RateLimiter(redis_client).acquire("bulk", Rate(60, 3600)) == 0.0
    leases = Leases(redis_client)
    assert leases.acquire("default", 4, "host-a:1", 60)
    assert leases.acquire("default", 4, "host-b:7", 60)
    Throttle(redis_client).hit("bulk", 30, 60)
    breaker = Breaker(redis_client)
    breaker.failure("bulk", failures=2, window=60, reset=40)
    assert breaker.failure("bulk", failures=2, window=60, reset=40)


def table(result: Result) -> dict[str, dict[str, str]]:
    """The text output as {profile: {column: cell}}, columns split on 2+ spaces."""
    lines = result.stdout.splitlines()
    header = re.split(r" {2,}", lines[0])
    rows = [dict(zip(header, re.split(r" {2,}", line), strict=False)) for line in lines[1:]]
    return {row["PROFILE"]: row for row in rows}


class TestStatus:
    """``status`` shows what the fleet holds of each profile's limits."""

    def test_table(self, cli: Invoke, busy: None) -> None:
        """The table shows rate and tokens, connections, throttle, breaker and
        fallbacks of every profile, aligned in columns."""
        result = cli()
        assert result.exit_code == 0, result.output
        rows = table(result)
        assert list(rows) == ["bulk", "default", "plain"]
        default, bulk, plain = rows["default"], rows["bulk"], rows["plain"]
        assert default["RATE"] == "10/s"
        assert default["TOKENS"] == "10.0"
        assert default["CONNECTIONS"] == "2/4"
        assert default["THROTTLE"] == "-"
        assert default["BREAKER"] == "closed"
        assert default["FALLBACK"] == "bulk, backup (not configured)"
        assert bulk["RATE"] == "60/h"
        assert bulk["TOKENS"] in ("0.0", "0.1")
        assert bulk["CONNECTIONS"] == "0/-"
        assert re.fullmatch(r"(29\.\d|30\.0) s", bulk["THROTTLE"])
        assert re.fullmatch(r"open, 2 failures, probe in (39\.\d|40\.0) s", bulk["BREAKER"])
        assert [plain[c] for c in ("RATE", "TOKENS", "THROTTLE", "FALLBACK")] == ["-"] * 4
        header, *lines = result.stdout.splitlines()
        for column in ("RATE", "TOKENS", "CONNECTIONS", "THROTTLE", "BREAKER", "FALLBACK"):
            start = header.index(column)
            assert all(line[start - 2 : start] == "  " != line[start] for line in lines)

    def test_json(self, cli: Invoke, busy: None) -> None:
        """--json gives the same facts as one JSON document, times in Redis's clock."""
        result = cli("--json")
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert abs(data["time"] - time.time()) < 5
        profiles = {p["name"]: p for p in data["profiles"]}
        default, bulk = profiles["default"], profiles["bulk"]
        assert default["rate"] == "10/s"
        assert default["tokens"] == 10
        assert (default["max_connections"], default["connections"]) == (4, 2)
        assert default["fallback"] == ["bulk", "backup"]
        assert default["unknown_fallback"] == ["backup"]
        assert default["breaker"] == {
            "state": "closed",
            "failures": 0,
            "opened_at": None,
            "retry_at": None,
        }
        assert 29 < bulk["throttle_wait"] <= 30
        assert bulk["breaker"]["state"] == "open"
        assert bulk["breaker"]["failures"] == 2
        assert bulk["breaker"]["retry_at"] == pytest.approx(bulk["breaker"]["opened_at"] + 40)
        assert 0 <= bulk["tokens"] < 0.1
        assert profiles["plain"]["rate"] is None
        assert profiles["plain"]["tokens"] is None

    def test_half_open_and_probe_due(self, cli: Invoke, redis_client: redis.Redis) -> None:
        """A breaker whose probe is due says so; one with a probe out shows half-open."""
        breaker = Breaker(redis_client)
        breaker.failure("bulk", failures=1, window=60, reset=0.05)
        time.sleep(0.06)
        assert table(cli())["bulk"]["BREAKER"] == "open, 1 failure, probe due"
        assert breaker.allow("bulk", reset=120) == "probe"
        assert re.fullmatch(
            r"half-open, 1 failure, probe in 2\.0 min", table(cli())["bulk"]["BREAKER"]
        )

    def test_one_profile(self, cli: Invoke) -> None:
        """--profile (any case) limits the output to the profiles named."""
        result = cli("--profile", "BULK", "--json")
        assert [p["name"] for p in json.loads(result.stdout)["profiles"]] == ["bulk"]

    def test_a_broken_profile_is_reported_and_the_others_shown(self, cli: Invoke) -> None:
        """A profile that cannot be read is named on stderr with its error; exit 1."""
        result = cli(env={"MAILWORKER_SMTP_URL_BROKEN": "smtp://x?rate=fast"})
        assert result.exit_code == 1
        assert list(table(result)) == ["bulk", "default", "plain"]
        assert "profile 'broken'" in result.stderr
        assert "<n>/s" in result.stderr

    def test_no_profile(self, redis_url: str) -> None:
        """Without any profile it says which variable to set."""
        result = CliRunner().invoke(main, ["status"], env={"MAILWORKER_REDIS_URL": redis_url})
        assert result.exit_code == 1
        assert "set MAILWORKER_SMTP_URL" in result.stderr

    def test_unreachable_redis(self, cli: Invoke) -> None:
        """An unreachable store is one line naming it, no traceback."""
        result = cli("--redis-url", f"redis://127.0.0.1:{free_port()}/0")
        assert result.exit_code == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert "ConnectionError" in lines[0]
        assert "127.0.0.1" in lines[0]
