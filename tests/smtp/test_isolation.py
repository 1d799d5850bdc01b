"""The SMTP layer stands alone: no Celery, no Redis."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class TestImports:
    """Importing the SMTP layer pulls in nothing of the worker stack."""

    def test_no_celery_or_redis(self) -> None:
        """``import mailworker.smtp`` in a fresh interpreter loads no celery or redis module."""
        code = (
            "import json, sys\n"
            "import mailworker.smtp\n"
            "from mailworker.smtp import SMTPSession\n"
            "from mailworker import Profile, SMTPError\n"
            "print(json.dumps(sorted(sys.modules)))\n"
        )
        completed = subprocess.run(
            [sys.executable, "-c", code],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        modules = json.loads(completed.stdout)
        assert "mailworker.smtp.session" in modules
        forbidden = {"celery", "kombu", "redis", "billiard"}
        assert [m for m in modules if m.split(".")[0] in forbidden] == []
        assert [
            m
            for m in modules
            if m.startswith(
                ("mailworker.worker", "mailworker.store", "mailworker.queue", "mailworker.tasks")
            )
        ] == []
