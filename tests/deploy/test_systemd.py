"""deploy/systemd/mailworker.service: ``systemd-analyze verify`` accepts it and
``systemd-analyze security`` rates it well hardened (Debian package ``systemd``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.parse
from pathlib import Path

import pytest

from tests.deploy import artifacts

#: systemd's own units, which verify needs to resolve multi-user.target and the like.
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
#: The highest exposure `systemd-analyze security` may give (0 best, 10 worst; 1.3 now).
MAX_EXPOSURE = 2.0


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd")
    return found


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A root directory with the unit installed as the unit's header says, systemd's
    own units, and an executable where ExecStart expects the worker (verify checks it)."""
    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    shutil.copy(artifacts.UNIT, units / "mailworker.service")
    shutil.copytree(SYSTEM_UNITS, tmp_path / "usr/lib/systemd/system", symlinks=True)
    executable = tmp_path / artifacts.systemd().argv[0].lstrip("/")
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\n")
    executable.chmod(0o755)
    return tmp_path


class TestUnit:
    """The hardened unit."""

    def test_verify(self, root: Path) -> None:
        """systemd-analyze verify reports nothing."""
        result = subprocess.run(
            [
                systemd_analyze(),
                "verify",
                f"--root={root}",
                "/etc/systemd/system/mailworker.service",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""

    def test_verify_would_fail_a_bad_unit(self, root: Path) -> None:
        """(The check can fail) a misspelt directive is reported."""
        unit = root / "etc/systemd/system/mailworker.service"
        unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=strikt"))
        result = subprocess.run(
            [
                systemd_analyze(),
                "verify",
                f"--root={root}",
                "/etc/systemd/system/mailworker.service",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "strikt" in result.stderr

    def test_security_exposure(self, root: Path) -> None:
        """systemd-analyze security rates the unit's exposure at most MAX_EXPOSURE."""
        result = subprocess.run(
            [systemd_analyze(), "security", "--offline=true", f"--root={root}", "--no-pager",
             "mailworker.service"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )  # fmt: skip
        match = re.search(
            r"Overall exposure level for mailworker\.service: (\d+\.\d)", result.stdout
        )
        assert match is not None, result.stdout + result.stderr
        assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout

    def test_required_settings(self) -> None:
        """The issue's settings: no new privileges, a read-only system, the password as
        a credential (read through MAILWORKER_SMTP_PASSWORD_FILE), SIGTERM to the main
        process only, and a stop timeout above the longest send."""
        service = artifacts.unit()["Service"]
        assert service["NoNewPrivileges"] == ["yes"]
        assert service["ProtectSystem"] == ["strict"]
        assert service["LoadCredential"] == ["smtp-password:/etc/mailworker/smtp-password"]
        assert "MAILWORKER_SMTP_PASSWORD_FILE=%d/smtp-password" in service["Environment"]
        assert service["KillMode"] == ["mixed"]
        assert service["KillSignal"] == ["SIGTERM"]
        assert int(service["TimeoutStopSec"][0]) == 300

    def test_no_secret_in_the_environment_file(self) -> None:
        """The environment file carries no password: only the credential does."""
        env = artifacts.env_file(artifacts.ENV_EXAMPLE)
        assert not [key for key in env if "PASSWORD" in key or "TOKEN" in key]
        for key, value in env.items():
            if key.endswith("_URL"):
                assert urllib.parse.urlsplit(value).password is None, key
