"""Task results have one shape: the same keys whatever the status."""

from __future__ import annotations

from mailworker.smtp import RecipientResult, Reply, SendResult
from mailworker.worker import outcome
from mailworker.worker.outcome import TaskResult

ERROR = {"type": "SMTPReplyError", "message": "try later", "code": 451, "reply": "try later"}


def every_result() -> dict[str, TaskResult]:
    """One result of each kind a delivery returns."""
    send = SendResult(
        recipients=(RecipientResult("a@example.org", "accepted", 250, "OK"),),
        reply=Reply(250, ("OK: queued as Q1",), "2.0.0"),
        size=100,
    )
    return {
        "sent": outcome.sent(send, message_id="<m@x>", attempts=1, date=None),
        "deferred": outcome.deferred(
            message_id="<m@x>",
            attempts=1,
            retry_at=10.0,
            retry_task_id="k/retry/1",
            error=ERROR,
            reply="451 try later",
            recipients=None,
        ),
        "locked": outcome.locked(
            message_id=None, attempts=0, retry_at=10.0, retry_task_id="t/locked"
        ),
        "dead_lettered": outcome.dead_lettered(
            message_id="<m@x>", attempts=3, error=ERROR, reply="451 try later", recipients=["b@x"]
        ),
    }


class TestOneShape:
    """A caller can read any key of any result."""

    def test_same_keys_for_every_status(self) -> None:
        """Sent, deferred, locked and dead-lettered results have exactly the keys the
        TaskResult type documents."""
        documented = set(TaskResult.__annotations__)
        for kind, result in every_result().items():
            assert set(result) == documented, kind

    def test_deferred_result_says_why_and_what_the_server_said(self) -> None:
        """A deferred result carries the reason, the server's reply and the retry."""
        result = every_result()["deferred"]
        assert (result["status"], result["reason"]) == ("deferred", "retry")
        assert result["reply"] == "451 try later"
        assert result["retry_task_id"] == "k/retry/1"
