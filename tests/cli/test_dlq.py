"""``mailworker dlq ...`` through click's CliRunner against a real Redis."""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import os
import time
from collections.abc import Callable
from typing import Any

import click
import pytest
import redis
from click.testing import CliRunner, Result

from mailworker.cli import main
from mailworker.cli.dlq import DlqHooks, dlq, parse_duration
from mailworker.store import keys
from mailworker.store.deadletter import DeadLetterStore
from tests.store.test_deadletter import SECRET_B64, attachment_kwargs, make_record

Invoke = Callable[..., Result]

#: The module itself: ``mailworker.cli.dlq`` as an attribute is the click group.
dlq_module = importlib.import_module("mailworker.cli.dlq")


class FakePublisher:
    """Records what it was asked to enqueue; can be told to fail."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail_after = fail_after

    def __call__(self, task: str, kwargs: dict[str, Any]) -> str:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise ConnectionError("broker unreachable")
        self.calls.append((task, kwargs))
        return f"task-{len(self.calls)}"


@pytest.fixture
def store(redis_client: redis.Redis) -> DeadLetterStore:
    """The store the CLI reads, with the real clock."""
    return DeadLetterStore(redis_client)


@pytest.fixture
def publisher() -> FakePublisher:
    """The publisher the CLI is given."""
    return FakePublisher()


@pytest.fixture
def cli(redis_url: str, publisher: FakePublisher) -> Invoke:
    """Run ``mailworker dlq --redis-url <test db> ARGS...``; ``input`` feeds stdin."""

    def invoke(*args: str, input: str | None = None, publish: Any = publisher) -> Result:
        return CliRunner().invoke(
            dlq, ["--redis-url", redis_url, *args], input=input, obj=DlqHooks(publish=publish)
        )

    return invoke


def add_at(store: DeadLetterStore, age: float, **kw: Any) -> str:
    """Add a record as if it had been dead-lettered ``age`` seconds ago."""
    when = time.time() - age
    return DeadLetterStore(store.redis, clock=lambda: when).add(make_record(**kw))


@pytest.fixture
def sample(store: DeadLetterStore) -> dict[str, str]:
    """Four records: old invalid, 550, 421 exhausted on "bulk", and a fresh 554."""
    return {
        "invalid": add_at(store, 3 * 86400, reason="invalid", code=None, enhanced_code=None),
        "p550": add_at(store, 2 * 3600, code=550, subject="Reset your password"),
        "e421": add_at(store, 1800, reason="exhausted", code=421, profile="bulk"),
        "p554": add_at(store, 60, code=554, enhanced_code="5.7.1"),
    }


def ok(result: Result) -> Result:
    """Assert the command succeeded, showing its output if not."""
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def json_lines(result: Result) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines()]


class TestList:
    """``dlq list`` shows records newest first, as a table or JSON lines."""

    def test_table_newest_first(self, cli: Invoke, sample: dict[str, str]) -> None:
        """The table has a header and one row per record, newest first."""
        lines = ok(cli("list")).stdout.splitlines()
        assert lines[0].split() == [
            "ID",
            "WHEN",
            "REASON",
            "CODE",
            "RECIPIENTS",
            "SUBJECT",
            "ATTEMPTS",
        ]
        ids = [line.split()[0] for line in lines[1:]]
        assert ids == [sample["p554"], sample["e421"], sample["p550"], sample["invalid"]]
        assert "Reset your password" in lines[3]
        assert "550 5.1.1" in lines[3]

    def test_json_lines(self, cli: Invoke, sample: dict[str, str], store: DeadLetterStore) -> None:
        """--json prints one parseable summary per line, newest first."""
        rows = json_lines(ok(cli("list", "--json")))
        assert [r["id"] for r in rows] == [sample[k] for k in ("p554", "e421", "p550", "invalid")]
        record = store.get(sample["p550"])
        assert record is not None
        assert rows[2] == record.summary()
        assert {"reason", "error", "recipients", "subject", "attempts", "created_at"} <= set(
            rows[2]
        )

    @pytest.mark.parametrize(
        ("args", "names"),
        [
            (["--reason", "exhausted"], ["e421"]),
            (["--code", "5xx"], ["p554", "p550"]),
            (["--code", "550"], ["p550"]),
            (["--code", "5.7.1"], ["p554"]),
            (["--code", "4xx"], ["e421"]),
            (["--profile", "bulk"], ["e421"]),
            (["--since", "1h"], ["p554", "e421"]),
            (["--since", "2d", "--code", "5xx"], ["p554", "p550"]),
            (["--limit", "1"], ["p554"]),
        ],
    )
    def test_filters(
        self, cli: Invoke, sample: dict[str, str], args: list[str], names: list[str]
    ) -> None:
        """Each filter option selects the expected records."""
        rows = json_lines(ok(cli("list", "--json", *args)))
        assert [r["id"] for r in rows] == [sample[n] for n in names]

    def test_empty(self, cli: Invoke) -> None:
        """An empty store says so (and prints nothing with --json)."""
        assert ok(cli("list")).stdout == "No dead letters.\n"
        assert ok(cli("list", "--json")).stdout == ""
        assert ok(cli("list", "--reason", "poison")).stdout == "No dead letters match.\n"

    @pytest.mark.parametrize("value", ["1x", "soon", "-1h", ""])
    def test_bad_since_is_a_usage_error(self, cli: Invoke, value: str) -> None:
        """A bad --since is a usage error (exit 2) naming the option."""
        result = cli("list", "--since", value)
        assert result.exit_code == 2
        assert "Invalid value for '--since'" in result.stderr
        assert "Traceback" not in result.output

    def test_bad_code_is_a_usage_error(self, cli: Invoke) -> None:
        """A bad --code is a usage error naming the option."""
        result = cli("list", "--code", "5yy")
        assert result.exit_code == 2
        assert "Invalid value for '--code'" in result.stderr

    def test_attachment_bytes_never_listed(self, cli: Invoke, store: DeadLetterStore) -> None:
        """Neither the table nor the JSON lines contain attachment bytes."""
        store.add(make_record(kwargs=attachment_kwargs()))
        for args in (["list"], ["list", "--json"]):
            assert SECRET_B64[:40] not in ok(cli(*args)).output
        assert json_lines(cli("list", "--json"))[0]["attachments"][0]["filename"] == "invoice.pdf"

    def test_unreachable_redis_is_one_clear_line(self) -> None:
        """With Redis unreachable the command exits 1 with a message, not a traceback."""
        result = CliRunner().invoke(dlq, ["--redis-url", "redis://:pw@127.0.0.1:1/0", "list"])
        assert result.exit_code == 1
        assert "Redis at 127.0.0.1:1/0" in result.stderr
        assert "pw" not in result.output
        assert "Traceback" not in result.output

    def test_redis_url_from_environment(
        self, redis_url: str, sample: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without --redis-url the store is found through MAILWORKER_REDIS_URL."""
        monkeypatch.setenv("MAILWORKER_REDIS_URL", redis_url)
        result = ok(CliRunner().invoke(dlq, ["list", "--json"]))
        assert len(json_lines(result)) == 4


class TestShow:
    """``dlq show`` prints one whole record."""

    def test_human(self, cli: Invoke, sample: dict[str, str]) -> None:
        """The page shows error, payload, transcript and attempt history."""
        out = ok(cli("show", sample["p550"])).stdout
        assert f"id:          {sample['p550']}" in out
        assert "stage:         rcpt" in out
        assert "code:          550" in out
        assert "C: RCPT TO:<bob@example.com>" in out
        assert "S: 550 5.1.1 no such user" in out
        assert "451 try later" in out
        assert "subject:     Reset your password" in out

    def test_json(self, cli: Invoke, sample: dict[str, str], store: DeadLetterStore) -> None:
        """--json prints the whole record as one JSON object."""
        data = json.loads(ok(cli("show", sample["e421"], "--json")).stdout)
        assert data["id"] == sample["e421"]
        assert data["error"]["code"] == 421
        assert data["transcript"][0].startswith("C: ")
        assert len(data["history"]) == 2
        assert data["kwargs"]["subject"] == "Welcome"

    def test_unknown_id(self, cli: Invoke) -> None:
        """An unknown id exits 1 with a message naming it."""
        result = cli("show", "0123456789abcdef0123")
        assert result.exit_code == 1
        assert "no dead letter with id '0123456789abcdef0123'" in result.stderr

    def test_attachment_bytes_never_shown(self, cli: Invoke, store: DeadLetterStore) -> None:
        """show lists attachments by name and size; their bytes never appear."""
        id_ = store.add(make_record(kwargs=attachment_kwargs()))
        human = ok(cli("show", id_)).output
        assert "invoice.pdf (application/pdf, 248 bytes)" in human
        as_json = ok(cli("show", id_, "--json")).output
        for out in (human, as_json):
            assert SECRET_B64[:40] not in out
            assert "ATTACHMENT-BYTES" not in out

    def test_raw_message_never_shown(self, cli: Invoke, store: DeadLetterStore) -> None:
        """A send_message record shows the raw message's size, not its bytes."""
        kwargs = {"raw_b64": SECRET_B64, "envelope_from": "a@x", "recipients": ["b@x"]}
        id_ = store.add(make_record(kwargs=kwargs, task="mailworker.send_message"))
        for args in (["show", id_], ["show", id_, "--json"], ["list", "--json"]):
            assert SECRET_B64[:40] not in ok(cli(*args)).output


class TestRetry:
    """``dlq retry`` re-queues through the publisher and removes only what was enqueued."""

    def test_ids(
        self,
        cli: Invoke,
        sample: dict[str, str],
        store: DeadLetterStore,
        publisher: FakePublisher,
    ) -> None:
        """The given records are published with their task and kwargs, then removed."""
        result = ok(cli("retry", sample["p550"], sample["e421"]))
        assert f"{sample['p550']} re-queued as task task-1" in result.stdout
        assert [task for task, _ in publisher.calls] == ["mailworker.send_mail"] * 2
        assert publisher.calls[0][1]["subject"] == "Reset your password"
        assert set(store.ids()) == {sample["invalid"], sample["p554"]}

    def test_all_with_filters(
        self,
        cli: Invoke,
        sample: dict[str, str],
        store: DeadLetterStore,
        publisher: FakePublisher,
    ) -> None:
        """--all with filters re-queues exactly the matching records."""
        ok(cli("retry", "--all", "--code", "5xx"))
        assert len(publisher.calls) == 2
        assert set(store.ids()) == {sample["invalid"], sample["e421"]}

    def test_fresh_attempt_budget(
        self, cli: Invoke, store: DeadLetterStore, publisher: FakePublisher
    ) -> None:
        """The published kwargs drop the attempt bookkeeping but keep the message's identity."""
        kept = {"key": "k+1a2b", "message_id": "<m@x>", "date": "d", "recipients": ["b@x"]}
        budget = {"first_attempt_at": 1.0, "attempts": 9, "retries": 5, "history": [{"at": 1}]}
        id_ = store.add(make_record(kwargs={"to": ["a@x", "b@x"], "_meta": {**kept, **budget}}))
        ok(cli("retry", id_))
        assert publisher.calls == [("mailworker.send_mail", {"to": ["a@x", "b@x"], "_meta": kept})]

    def test_failing_publisher_keeps_records(
        self, cli: Invoke, sample: dict[str, str], store: DeadLetterStore
    ) -> None:
        """When enqueueing fails, that record and the rest stay and the exit status is 1."""
        publish = FakePublisher(fail_after=1)
        result = cli("retry", "--all", publish=publish)
        assert result.exit_code == 1
        assert "broker unreachable" in result.stderr
        assert "3 left in the store" in result.stderr
        assert len(publish.calls) == 1
        assert store.count() == 3

    def test_unknown_id(self, cli: Invoke, sample: dict[str, str], store: DeadLetterStore) -> None:
        """Unknown ids are reported with exit status 1; known ones are still re-queued."""
        result = cli("retry", "nope", sample["p554"])
        assert result.exit_code == 1
        assert "no dead letter with id nope" in result.stderr
        assert store.get(sample["p554"]) is None

    @pytest.mark.parametrize(
        ("args", "message"),
        [
            ([], "give the IDs to act on, or --all"),
            (["--reason", "invalid"], "add --all to use the filters"),
            (["someid", "--all"], "not both"),
            (["someid", "--profile", "x"], "don't apply to IDs"),
        ],
    )
    def test_selection_usage_errors(
        self, cli: Invoke, publisher: FakePublisher, args: list[str], message: str
    ) -> None:
        """Missing or conflicting selections are usage errors and publish nothing."""
        result = cli("retry", *args)
        assert result.exit_code == 2
        assert message in result.stderr
        assert publisher.calls == []

    def test_module_level_publisher(
        self, redis_url: str, store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Without a DlqHooks object the module-level default_publish is used."""
        publish = FakePublisher()
        monkeypatch.setattr(dlq_module, "default_publish", publish)
        id_ = store.add(make_record())
        ok(CliRunner().invoke(dlq, ["--redis-url", redis_url, "retry", id_]))
        assert len(publish.calls) == 1
        assert store.count() == 0

    def test_progress_bar_on_a_terminal(
        self,
        cli: Invoke,
        store: DeadLetterStore,
        publisher: FakePublisher,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Re-queueing many records on a terminal shows a progress bar, not a line each."""
        monkeypatch.setattr(dlq_module, "_stderr_is_tty", lambda: True)
        for _ in range(dlq_module.PROGRESS_MIN):
            store.add(make_record())
        result = ok(cli("retry", "--all"))
        assert "Re-queueing" in result.stderr
        assert "re-queued as task" not in result.stdout
        assert f"Re-queued {dlq_module.PROGRESS_MIN} of {dlq_module.PROGRESS_MIN}." in result.stdout
        assert store.count() == 0


class TestPurge:
    """``dlq purge`` deletes selected records, after confirmation."""

    def test_ids(self, cli: Invoke, sample: dict[str, str], store: DeadLetterStore) -> None:
        """Given ids are deleted."""
        result = ok(cli("purge", sample["p550"], "--yes"))
        assert "Purged 1 dead letter." in result.stdout
        assert store.get(sample["p550"]) is None
        assert store.count() == 3

    def test_all_with_filters(
        self, cli: Invoke, sample: dict[str, str], store: DeadLetterStore
    ) -> None:
        """--all with filters deletes the matching records only."""
        ok(cli("purge", "--all", "--reason", "permanent", "--yes"))
        assert set(store.ids()) == {sample["invalid"], sample["e421"]}

    def test_all(self, cli: Invoke, sample: dict[str, str], store: DeadLetterStore) -> None:
        """--all alone deletes everything."""
        assert "Purged 4 dead letters." in ok(cli("purge", "--all", "--yes")).stdout
        assert store.count() == 0

    def test_older_than(self, cli: Invoke, sample: dict[str, str], store: DeadLetterStore) -> None:
        """--older-than deletes records dead-lettered longer ago than that."""
        ok(cli("purge", "--older-than", "1h", "--yes"))
        assert set(store.ids()) == {sample["p554"], sample["e421"]}
        ok(cli("purge", "--older-than", "10m", "--profile", "bulk", "--yes"))
        assert store.ids() == [sample["p554"]]

    def test_refuses_without_terminal(
        self, cli: Invoke, sample: dict[str, str], store: DeadLetterStore
    ) -> None:
        """Without a terminal and without --yes nothing is deleted and the exit status is 1."""
        result = cli("purge", "--all")
        assert result.exit_code == 1
        assert "not purging 4 dead letters without confirmation" in result.stderr
        assert "--yes" in result.stderr
        assert store.count() == 4

    def test_asks_on_a_terminal(
        self,
        cli: Invoke,
        sample: dict[str, str],
        store: DeadLetterStore,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """On a terminal it asks; "n" keeps everything, "y" deletes."""
        monkeypatch.setattr(dlq_module, "_stdin_is_tty", lambda: True)
        refused = cli("purge", "--all", "--reason", "permanent", input="n\n")
        assert refused.exit_code == 1
        assert "Delete 2 dead letters for good?" in refused.output
        assert store.count() == 4
        ok(cli("purge", "--all", "--reason", "permanent", input="y\n"))
        assert store.count() == 2

    def test_nothing_to_purge(self, cli: Invoke, sample: dict[str, str]) -> None:
        """A selection matching nothing succeeds without asking."""
        assert ok(cli("purge", "--all", "--reason", "poison")).stdout == "Nothing to purge.\n"

    def test_unknown_id(self, cli: Invoke, sample: dict[str, str], store: DeadLetterStore) -> None:
        """Unknown ids are named, with exit status 1; known ones are still deleted."""
        result = cli("purge", "nope", sample["p554"], "--yes")
        assert result.exit_code == 1
        assert "no dead letter with id nope" in result.stderr
        assert store.count() == 3

    def test_bad_older_than_is_a_usage_error(self, cli: Invoke, sample: dict[str, str]) -> None:
        """A bad --older-than is a usage error naming the option."""
        result = cli("purge", "--older-than", "a week", "--yes")
        assert result.exit_code == 2
        assert "Invalid value for '--older-than'" in result.stderr

    def test_progress_bar_on_a_terminal(
        self, cli: Invoke, store: DeadLetterStore, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Purging many records on a terminal shows a progress bar."""
        monkeypatch.setattr(dlq_module, "_stderr_is_tty", lambda: True)
        for _ in range(dlq_module.PROGRESS_MIN):
            store.add(make_record())
        result = ok(cli("purge", "--all", "--yes"))
        assert "Purging" in result.stderr
        assert store.count() == 0


class TestStats:
    """``dlq stats`` counts records by reason, code and profile."""

    def test_json(self, cli: Invoke, sample: dict[str, str]) -> None:
        """--json prints the counts as one object."""
        assert json.loads(ok(cli("stats", "--json")).stdout) == {
            "reason": {"permanent": 2, "invalid": 1, "exhausted": 1},
            "code": {"none": 1, "550": 1, "421": 1, "554": 1},
            "profile": {"default": 3, "bulk": 1},
        }

    def test_human(self, cli: Invoke, sample: dict[str, str]) -> None:
        """The human form shows the total and each group."""
        out = ok(cli("stats")).stdout
        assert "total: 4" in out
        for group in ("by reason:", "by code:", "by profile:"):
            assert group in out
        assert "  permanent  2" in out

    def test_empty(self, cli: Invoke) -> None:
        """An empty store gives zero counts, not an error."""
        assert "total: 0" in ok(cli("stats")).stdout


#: Would retitle the window, clear the screen and (C1 CSI) move the cursor if printed raw.
HOSTILE = "Hi\x1b]0;pwned\x07\x1b[2J\x9b6n\x7f"


class TestTerminalSafety:
    """Nothing a record carries can drive the operator's terminal."""

    @pytest.fixture
    def hostile(self, store: DeadLetterStore) -> str:
        """A record whose subject, recipient, profile, reply and transcript carry escapes."""
        record = make_record(subject=HOSTILE, recipients=[f"a{HOSTILE}@x"], profile=HOSTILE)
        record = dataclasses.replace(
            record,
            error={**record.error, "reply": f"550 no\n{HOSTILE}"},
            transcript=[f"S: 550 {HOSTILE}"],
            history=[{"at": 1.0, "error": HOSTILE}],
        )
        return store.add(record)

    @pytest.mark.parametrize(
        "args",
        [
            ["list"],
            ["list", "--json"],
            ["show"],
            ["show", "--json"],
            ["stats"],
            ["stats", "--json"],
        ],
    )
    def test_no_raw_control_characters(self, cli: Invoke, hostile: str, args: list[str]) -> None:
        """list, show and stats print ESC, BEL, DEL and C1 controls as visible escapes."""
        if args[0] == "show":
            args = [args[0], hostile, *args[1:]]
        out = ok(cli(*args)).output
        for raw in ("\x1b", "\x07", "\x9b", "\x7f"):
            assert raw not in out
        if "--json" not in args:
            assert "Hi\\x1b]0;pwned\\x07\\x1b[2J\\x9b6n\\x7f" in out

    def test_json_keeps_the_text(self, cli: Invoke, hostile: str) -> None:
        """The escaped JSON still decodes to the original subject."""
        [row] = json_lines(ok(cli("list", "--json")))
        assert row["subject"] == HOSTILE

    def test_multi_line_reply_keeps_its_lines(self, cli: Invoke, hostile: str) -> None:
        """A multi-line reply is still shown over several lines, escaped within each."""
        out = ok(cli("show", hostile)).stdout
        assert "reply:         550 no\n                 Hi\\x1b]0;" in out


class TestPayloadNotKept:
    """Records whose payload was not kept are shown as such and never re-queued."""

    @pytest.fixture
    def capped(self, redis_client: redis.Redis) -> str:
        """A record whose attachment was over a 1000-byte payload cap."""
        content = base64.b64encode(b"A" * 2000).decode()
        kwargs = {
            "to": ["b@x"],
            "subject": "Scan",
            "attachments": [{"filename": "scan.tiff", "content": content}],
        }
        return DeadLetterStore(redis_client, max_payload_bytes=1000).add(make_record(kwargs=kwargs))

    def test_show_says_so(self, cli: Invoke, capped: str) -> None:
        """show says the payload was not kept and why, and still lists the attachment."""
        out = ok(cli("show", capped)).stdout
        assert "NOT KEPT" in out
        assert "MAILWORKER_DLQ_MAX_PAYLOAD_BYTES (1000 bytes)" in out
        assert "cannot be re-queued" in out
        assert "scan.tiff (type unknown, 2000 bytes)" in out
        assert "S: 550 5.1.1 no such user" in out
        data = json.loads(ok(cli("show", capped, "--json")).stdout)
        assert data["payload_kept"] is False
        assert "MAILWORKER_DLQ_MAX_PAYLOAD_BYTES" in data["payload_dropped"]

    def test_list_json_says_so(self, cli: Invoke, capped: str, sample: dict[str, str]) -> None:
        """list --json tells which records still have their payload."""
        rows = {r["id"]: r["payload_kept"] for r in json_lines(ok(cli("list", "--json")))}
        assert rows[capped] is False
        assert rows[sample["p550"]] is True

    def test_retry_refuses_with_a_clear_message(
        self,
        cli: Invoke,
        capped: str,
        sample: dict[str, str],
        store: DeadLetterStore,
        publisher: FakePublisher,
    ) -> None:
        """retry --all re-queues the others, refuses this one with a reason and exits 1."""
        result = cli("retry", "--all")
        assert result.exit_code == 1
        assert f"cannot re-queue 1 dead letter, the payload was not kept: {capped}" in result.stderr
        assert "MAILWORKER_DLQ_MAX_PAYLOAD_BYTES" in result.stderr
        assert "resend those messages from the application" in result.stderr
        assert "Re-queued 4 of 5." in result.stdout
        assert len(publisher.calls) == 4
        assert store.ids() == [capped]

    def test_list_and_stats_do_not_read_payloads(
        self, cli: Invoke, sample: dict[str, str], redis_client: redis.Redis
    ) -> None:
        """list and stats work even when every payload is unreadable; show does not."""
        for id_ in sample.values():
            redis_client.hset(keys.dlq_payload(), id_, "not JSON")
        assert len(json_lines(ok(cli("list", "--json")))) == 4
        ok(cli("list"))
        ok(cli("stats"))
        assert cli("show", sample["p550"]).exit_code != 0


class TestHelp:
    """Every command's --help stands on its own."""

    @pytest.mark.parametrize("command", ["list", "show", "retry", "purge", "stats"])
    def test_help(self, command: str) -> None:
        """--help works without Redis and explains the command."""
        result = ok(CliRunner().invoke(dlq, [command, "--help"]))
        assert f"dlq {command}" in result.stdout
        assert len(result.stdout.splitlines()) > 4

    def test_registered_on_main(self) -> None:
        """`mailworker dlq` is reachable from the top-level group."""
        assert isinstance(main, click.Group)
        assert "dlq" in main.commands


class TestDuration:
    """Durations for --since and --older-than."""

    @pytest.mark.parametrize(
        ("text", "seconds"),
        [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("1w", 604800)],
    )
    def test_parse(self, text: str, seconds: float) -> None:
        """Each unit converts to seconds."""
        assert parse_duration(text) == seconds


@pytest.fixture(autouse=True)
def _no_env_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the developer's MAILWORKER_* settings out of these tests."""
    for name in list(os.environ):
        if name.startswith("MAILWORKER_"):
            monkeypatch.delenv(name)
