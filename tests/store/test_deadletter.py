"""The dead-letter store against a real Redis: records, filters, re-queue, purge, retention."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from mailworker.message.payload import MAX_MESSAGE_BYTES
from mailworker.store import keys
from mailworker.store.deadletter import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PAYLOAD_BYTES,
    EVICTED,
    DeadLetter,
    DeadLetterStore,
    PayloadNotKeptError,
    code_matcher,
    payload_summary,
)

#: A recognisable attachment; neither it nor its base64 may show up in summaries.
SECRET_BYTES = b"ATTACHMENT-BYTES-MUST-NOT-LEAK-" * 8
SECRET_B64 = base64.b64encode(SECRET_BYTES).decode()
START = 1_700_000_000.0


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_record(
    *,
    reason: str = "permanent",
    code: int | None = 550,
    enhanced_code: str | None = "5.1.1",
    profile: str = "default",
    recipients: list[str] | None = None,
    subject: str | None = "Welcome",
    kwargs: dict[str, Any] | None = None,
    task: str = "mailworker.send_mail",
) -> DeadLetter:
    """A plausible dead letter; the store assigns id and created_at."""
    recipients = ["bob@example.com"] if recipients is None else recipients
    if kwargs is None:
        kwargs = {"to": recipients, "subject": subject, "text": "hello", "profile": profile}
    return DeadLetter(
        id="",
        reason=reason,  # type: ignore[arg-type]
        task=task,
        kwargs=kwargs,
        error={
            "type": "SMTPReplyError",
            "message": f"[rcpt] recipient refused — server said: {code} {enhanced_code}",
            "stage": "rcpt",
            "code": code,
            "enhanced_code": enhanced_code,
            "reply": f"{enhanced_code} no such user",
            "transient": False,
        },
        transcript=["C: RCPT TO:<bob@example.com>", f"S: {code} {enhanced_code} no such user"],
        attempts=3,
        first_attempt_at=START - 600,
        last_attempt_at=START - 10,
        profile=profile,
        task_id="task-1",
        recipients=recipients,
        subject=subject,
        history=[{"at": START - 600, "error": "451 try later"}, {"at": START - 10, "error": "550"}],
    )


def attachment_kwargs() -> dict[str, Any]:
    """send_mail kwargs with one attachment whose bytes are :data:`SECRET_BYTES`."""
    return {
        "to": ["bob@example.com"],
        "subject": "Invoice",
        "text": "see attached",
        "attachments": [
            {"filename": "invoice.pdf", "content": SECRET_B64, "mimetype": "application/pdf"}
        ],
    }


@pytest.fixture
def clock() -> FakeClock:
    """The store's clock."""
    return FakeClock()


@pytest.fixture
def make_store(redis_client: redis.Redis, clock: FakeClock) -> Callable[..., DeadLetterStore]:
    """Factory: a store on the test's own database with the fake clock."""

    def create(**kw: Any) -> DeadLetterStore:
        kw.setdefault("clock", clock)
        return DeadLetterStore(redis_client, **kw)

    return create


@pytest.fixture
def store(make_store: Callable[..., DeadLetterStore]) -> DeadLetterStore:
    """A store with default limits."""
    return make_store()


def fill(store: DeadLetterStore, clock: FakeClock, records: list[DeadLetter]) -> list[str]:
    """Add ``records`` a minute apart, oldest first; returns their ids."""
    ids = []
    for record in records:
        ids.append(store.add(record))
        clock.advance(60)
    return ids


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


class TestRecord:
    """DeadLetter serialises, summarises and prepares its re-queue."""

    @given(kwargs=st.dictionaries(st.text(max_size=10), json_values, max_size=5))
    def test_json_round_trip(self, kwargs: dict[str, Any]) -> None:
        """A record read back from its JSON equals the original."""
        record = make_record(kwargs=kwargs)
        assert DeadLetter.from_json(record.to_json()) == record

    def test_from_json_ignores_unknown_keys(self) -> None:
        """Keys a newer version may add are ignored when reading."""
        data = json.loads(make_record().to_json())
        data["added_later"] = 1
        assert DeadLetter.from_json(json.dumps(data)) == make_record()

    def test_from_json_rejects_incomplete_records(self) -> None:
        """A record without a required field raises ValueError, not TypeError."""
        data = json.loads(make_record().to_json())
        del data["reason"]
        with pytest.raises(ValueError, match="reason"):
            DeadLetter.from_json(json.dumps(data))

    def test_requeue_kwargs_keep_identity_and_drop_attempt_budget(self) -> None:
        """Re-queue kwargs keep key, message_id, date and recipients of _meta, nothing else."""
        meta = {
            "key": "order-17+3f2a9c1b0d4e",
            "message_id": "<m1@example.com>",
            "date": "Tue, 14 Nov 2023 22:13:20 +0000",
            "recipients": ["bob@example.com"],
            "attempt": 7,
            "first_attempt_at": START,
        }
        record = make_record(kwargs={"to": ["bob@example.com"], "subject": "s", "_meta": meta})
        assert record.requeue_kwargs() == {
            "to": ["bob@example.com"],
            "subject": "s",
            "_meta": {
                "key": "order-17+3f2a9c1b0d4e",
                "message_id": "<m1@example.com>",
                "date": "Tue, 14 Nov 2023 22:13:20 +0000",
                "recipients": ["bob@example.com"],
            },
        }
        assert record.kwargs["_meta"]["attempt"] == 7  # the record itself is untouched

    def test_requeue_kwargs_without_kept_meta_have_no_meta(self) -> None:
        """A _meta holding only attempt bookkeeping disappears entirely."""
        record = make_record(kwargs={"to": ["a@example.com"], "_meta": {"attempt": 2}})
        assert record.requeue_kwargs() == {"to": ["a@example.com"]}

    def test_summary_lists_attachments_by_name_and_size(self) -> None:
        """summary() gives attachment file names and decoded sizes, never their bytes."""
        summary = make_record(kwargs=attachment_kwargs()).summary()
        assert summary["attachments"] == [{"filename": "invoice.pdf", "size": len(SECRET_BYTES)}]
        text = json.dumps(summary)
        assert SECRET_B64[:40] not in text
        assert "ATTACHMENT-BYTES" not in text

    def test_summary_gives_raw_message_size_only(self) -> None:
        """For send_message records, summary() and details() carry the raw size only."""
        kwargs = {"raw_b64": SECRET_B64, "envelope_from": "a@example.com", "recipients": ["b@x"]}
        record = make_record(kwargs=kwargs, task="mailworker.send_message")
        assert record.summary()["raw_size"] == len(SECRET_BYTES)
        assert record.details()["kwargs"]["raw_size"] == len(SECRET_BYTES)
        assert SECRET_B64[:40] not in json.dumps([record.summary(), record.details()])

    def test_summary_fields(self) -> None:
        """summary() carries id, reason, code, recipients, subject, attempts, times, error."""
        summary = make_record().summary()
        assert summary["reason"] == "permanent"
        assert summary["code"] == 550
        assert summary["enhanced_code"] == "5.1.1"
        assert summary["recipients"] == ["bob@example.com"]
        assert summary["subject"] == "Welcome"
        assert summary["attempts"] == 3
        assert summary["first_attempt_at"] == START - 600
        assert "recipient refused" in summary["error"]

    def test_payload_summary_survives_malformed_attachments(self) -> None:
        """Invalid payloads (not base64, not a dict) are described, not echoed or crashed on."""
        summary = payload_summary({"attachments": [{"filename": "a", "content": "!!!"}, "junk"]})
        assert summary["attachments"] == [
            {"filename": "a", "size": None},
            {"filename": None, "size": None},
        ]


class TestAddGet:
    """add() stores a record under a new id; get() reads it back."""

    def test_add_assigns_id_and_time(self, store: DeadLetterStore, clock: FakeClock) -> None:
        """The stored record has the new id and the clock's time as created_at."""
        id_ = store.add(make_record())
        got = store.get(id_)
        assert got is not None
        assert got.id == id_
        assert got.created_at == clock.now
        assert got.recipients == ["bob@example.com"]

    def test_get_unknown_is_none(self, store: DeadLetterStore) -> None:
        """An unknown id gives None."""
        assert store.get("nope") is None

    def test_ids_sort_by_time(self, store: DeadLetterStore, clock: FakeClock) -> None:
        """Ids added later sort after ids added earlier."""
        ids = fill(store, clock, [make_record() for _ in range(5)])
        assert sorted(ids) == ids
        assert len(set(ids)) == 5

    def test_index_and_records_stay_in_step(
        self, store: DeadLetterStore, redis_client: redis.Redis
    ) -> None:
        """Each record is in both the index and the record hash, under the documented keys."""
        id_ = store.add(make_record())
        assert redis_client.zscore(keys.dlq_index(), id_) is not None
        assert redis_client.hexists(keys.dlq_record(), id_)
        assert store.count() == 1

    def test_from_url(self, redis_url: str) -> None:
        """from_url() builds a working store with the given options."""
        store = DeadLetterStore.from_url(redis_url, max_records=5)
        try:
            assert store.max_records == 5
            id_ = store.add(make_record())
            assert store.get(id_) is not None
        finally:
            store.redis.close()

    def test_prefix_separates_stores(self, make_store: Callable[..., DeadLetterStore]) -> None:
        """Stores with different prefixes do not see each other's records."""
        make_store(prefix="one:").add(make_record())
        assert make_store(prefix="two:").count() == 0


class TestList:
    """list() returns records newest first and filters them."""

    @pytest.fixture
    def ids(self, store: DeadLetterStore, clock: FakeClock) -> dict[str, str]:
        """Five records of varied reason, code and profile, a minute apart."""
        names = ["invalid", "p550", "p421", "p554", "other"]
        records = [
            make_record(reason="invalid", code=None, enhanced_code=None),
            make_record(code=550, enhanced_code="5.1.1"),
            make_record(reason="exhausted", code=421, enhanced_code="4.7.0"),
            make_record(code=554, enhanced_code="5.7.1", profile="bulk"),
            make_record(reason="poison", code=None, enhanced_code=None, profile="bulk"),
        ]
        return dict(zip(names, fill(store, clock, records), strict=True))

    def found(self, store: DeadLetterStore, **filters: Any) -> list[str]:
        return [r.id for r in store.list(**filters)]

    def test_newest_first(self, store: DeadLetterStore, ids: dict[str, str]) -> None:
        """Without filters every record comes back, newest first."""
        assert self.found(store) == list(reversed(ids.values()))

    def test_limit(self, store: DeadLetterStore, ids: dict[str, str]) -> None:
        """limit keeps the newest N."""
        assert self.found(store, limit=2) == [ids["other"], ids["p554"]]

    def test_reason(self, store: DeadLetterStore, ids: dict[str, str]) -> None:
        """reason keeps that reason only."""
        assert self.found(store, reason="permanent") == [ids["p554"], ids["p550"]]

    def test_profile(self, store: DeadLetterStore, ids: dict[str, str]) -> None:
        """profile keeps that profile only."""
        assert self.found(store, profile="bulk") == [ids["other"], ids["p554"]]

    @pytest.mark.parametrize(
        ("code", "names"),
        [
            ("550", ["p550"]),
            ("5xx", ["p554", "p550"]),
            ("5XX", ["p554", "p550"]),
            ("4xx", ["p421"]),
            ("5.7.1", ["p554"]),
            ("251", []),
        ],
    )
    def test_code(
        self, store: DeadLetterStore, ids: dict[str, str], code: str, names: list[str]
    ) -> None:
        """code matches an exact code, a class or an enhanced code; no-code records never."""
        assert self.found(store, code=code) == [ids[n] for n in names]

    def test_since(self, store: DeadLetterStore, ids: dict[str, str], clock: FakeClock) -> None:
        """since keeps records added at or after that time."""
        assert self.found(store, since=START + 180) == [ids["other"], ids["p554"]]

    def test_older_than(self, store: DeadLetterStore, ids: dict[str, str]) -> None:
        """older_than keeps records added more than that many seconds ago."""
        # The clock is at START + 300; p421 was added at START + 120.
        assert self.found(store, older_than=180) == [ids["p550"], ids["invalid"]]

    def test_combined_filters_and_limit(self, store: DeadLetterStore, ids: dict[str, str]) -> None:
        """Filters combine, and limit counts matching records only."""
        assert self.found(store, code="5xx", profile="default", limit=1) == [ids["p550"]]
        assert self.found(store, code="5xx", limit=1) == [ids["p554"]]

    def test_bad_code_filter(self, store: DeadLetterStore) -> None:
        """An unrecognised code filter raises ValueError naming the problem."""
        with pytest.raises(ValueError, match="reply code"):
            store.list(code="five hundred")

    def test_empty_store(self, store: DeadLetterStore) -> None:
        """An empty store lists, counts and summarises as empty, without errors."""
        assert store.list(code="5xx", limit=3) == []
        assert store.count() == 0
        assert store.stats() == {"reason": {}, "code": {}, "profile": {}}
        assert store.prune() == 0
        assert store.purge() == 0

    def test_ids_match_list(self, store: DeadLetterStore, ids: dict[str, str]) -> None:
        """ids() returns the ids list() would, in the same order."""
        assert store.ids(code="5xx") == self.found(store, code="5xx")
        assert store.ids(limit=3) == self.found(store, limit=3)

    def test_code_matcher_rejects_nonsense(self) -> None:
        """code_matcher accepts 550, 5xx and 5.1.1 shapes only."""
        for bad in ("55", "6xx", "5.1", "abc", ""):
            with pytest.raises(ValueError):
                code_matcher(bad)


class TestRequeue:
    """requeue() publishes the original payload and removes the record only afterwards."""

    def test_publishes_then_removes(self, store: DeadLetterStore) -> None:
        """The publisher gets task name and kwargs; the record is gone afterwards."""
        id_ = store.add(make_record(kwargs=attachment_kwargs()))
        calls: list[tuple[str, dict[str, Any]]] = []

        def publish(task: str, kwargs: dict[str, Any]) -> str:
            assert store.get(id_) is not None, "record removed before publish returned"
            calls.append((task, kwargs))
            return "new-task"

        assert store.requeue(id_, publish) == "new-task"
        assert calls == [("mailworker.send_mail", attachment_kwargs())]
        assert store.get(id_) is None
        assert store.count() == 0

    def test_failed_publish_keeps_record(self, store: DeadLetterStore) -> None:
        """If the publisher raises, the error propagates and the record stays."""
        id_ = store.add(make_record())

        def publish(task: str, kwargs: dict[str, Any]) -> str:
            raise ConnectionError("broker down")

        with pytest.raises(ConnectionError):
            store.requeue(id_, publish)
        assert store.get(id_) is not None
        assert store.count() == 1

    def test_strips_attempt_budget(self, store: DeadLetterStore) -> None:
        """The re-queued kwargs keep key, message_id, date and recipients of _meta only."""
        meta = {"key": "k", "message_id": "<m@x>", "date": "d", "recipients": ["b@x"], "attempt": 4}
        id_ = store.add(make_record(kwargs={"to": ["b@x"], "subject": "s", "_meta": meta}))
        published: list[dict[str, Any]] = []

        def publish(task: str, kwargs: dict[str, Any]) -> str:
            published.append(kwargs)
            return "t"

        store.requeue(id_, publish)
        assert published == [
            {
                "to": ["b@x"],
                "subject": "s",
                "_meta": {"key": "k", "message_id": "<m@x>", "date": "d", "recipients": ["b@x"]},
            }
        ]

    def test_unknown_id(self, store: DeadLetterStore) -> None:
        """An unknown id gives None and publishes nothing."""

        def publish(task: str, kwargs: dict[str, Any]) -> str:
            raise AssertionError("must not publish")

        assert store.requeue("nope", publish) is None


class TestRemovePurge:
    """remove() and purge() delete index entry and record together."""

    def test_remove_counts_existing(
        self, store: DeadLetterStore, clock: FakeClock, redis_client: redis.Redis
    ) -> None:
        """remove() returns how many of the ids existed and leaves no trace of them."""
        a, b, c = fill(store, clock, [make_record() for _ in range(3)])
        assert store.remove([a, "nope", c]) == 2
        assert store.ids() == [b]
        assert redis_client.hlen(keys.dlq_record()) == 1
        assert redis_client.zcard(keys.dlq_index()) == 1

    def test_purge_ids(self, store: DeadLetterStore, clock: FakeClock) -> None:
        """purge(ids=...) deletes exactly those records."""
        a, b = fill(store, clock, [make_record(), make_record()])
        assert store.purge(ids=[a]) == 1
        assert store.ids() == [b]

    def test_purge_filters(self, store: DeadLetterStore, clock: FakeClock) -> None:
        """purge() with filters deletes the matching records only."""
        _, keep = fill(store, clock, [make_record(reason="invalid"), make_record()])
        assert store.purge(reason="invalid") == 1
        assert store.ids() == [keep]

    def test_purge_older_than(self, store: DeadLetterStore, clock: FakeClock) -> None:
        """purge(older_than=...) deletes records added longer ago than that."""
        old = store.add(make_record())
        clock.advance(8 * 86400)
        new = store.add(make_record())
        assert store.purge(older_than=7 * 86400) == 1
        assert store.ids() == [new]
        assert store.get(old) is None

    def test_purge_everything(self, store: DeadLetterStore, clock: FakeClock) -> None:
        """purge() without arguments empties the store."""
        fill(store, clock, [make_record() for _ in range(3)])
        assert store.purge() == 3
        assert store.count() == 0


class TestRetention:
    """Records beyond max_records or older than ttl are pruned, oldest first."""

    def test_max_records(
        self, make_store: Callable[..., DeadLetterStore], clock: FakeClock
    ) -> None:
        """Adding beyond max_records drops the oldest."""
        store = make_store(max_records=3)
        ids = fill(store, clock, [make_record() for _ in range(5)])
        assert store.ids() == list(reversed(ids[2:]))

    def test_ttl(self, make_store: Callable[..., DeadLetterStore], clock: FakeClock) -> None:
        """Records older than ttl go at the next add or prune."""
        store = make_store(ttl=3600)
        old = store.add(make_record())
        clock.advance(1800)
        middle = store.add(make_record())
        clock.advance(1801)
        new = store.add(make_record())
        assert store.ids() == [new, middle]
        assert store.get(old) is None
        clock.advance(1800)
        assert store.prune() == 1
        assert store.ids() == [new]

    def test_zero_disables_limits(
        self, make_store: Callable[..., DeadLetterStore], clock: FakeClock
    ) -> None:
        """ttl=0 and max_records=0 keep everything."""
        store = make_store(ttl=0, max_records=0)
        fill(store, clock, [make_record() for _ in range(3)])
        clock.advance(10 * 365 * 86400)
        assert store.prune() == 0
        assert store.count() == 3

    def test_large_backlog_is_pruned_in_batches(
        self, make_store: Callable[..., DeadLetterStore], clock: FakeClock
    ) -> None:
        """More expired and excess records than one batch are all pruned."""
        unlimited = make_store(ttl=0, max_records=0)
        for _ in range(1200):
            unlimited.add(make_record())
        clock.advance(100)
        keep = [unlimited.add(make_record()) for _ in range(1100)]
        clock.advance(50)
        store = make_store(ttl=120, max_records=10)
        assert store.prune() == 1200 + 1090
        assert store.ids() == sorted(keep[-10:], reverse=True)

    def test_negative_limits_rejected(self, redis_client: redis.Redis) -> None:
        """Negative limits are a ValueError naming the argument."""
        with pytest.raises(ValueError, match="max_records"):
            DeadLetterStore(redis_client, max_records=-1)
        with pytest.raises(ValueError, match="ttl"):
            DeadLetterStore(redis_client, ttl=-1)


class TestStats:
    """stats() counts records by reason, code and profile."""

    def test_counts(self, store: DeadLetterStore, clock: FakeClock) -> None:
        """Each record is counted once per dimension; no code counts as "none"."""
        fill(
            store,
            clock,
            [
                make_record(code=550),
                make_record(code=550, profile="bulk"),
                make_record(reason="exhausted", code=421),
                make_record(reason="invalid", code=None),
            ],
        )
        assert store.stats() == {
            "reason": {"permanent": 2, "exhausted": 1, "invalid": 1},
            "code": {"550": 2, "421": 1, "none": 1},
            "profile": {"default": 3, "bulk": 1},
        }


def big_attachment_kwargs(size: int) -> dict[str, Any]:
    """send_mail kwargs with one attachment of ``size`` bytes (base64 in the payload)."""
    content = base64.b64encode(b"A" * size).decode()
    return {
        "to": ["bob@example.com"],
        "subject": "Scan",
        "text": "see attached",
        "attachments": [{"filename": "scan.tiff", "content": content, "mimetype": "image/tiff"}],
    }


def stored_bytes(redis_client: redis.Redis) -> int:
    """What the record and payload hashes really hold, in bytes."""
    total = 0
    for key in (keys.dlq_record(), keys.dlq_payload()):
        for value in redis_client.hvals(key):
            total += len(value)
    return total


class TestPayloadApart:
    """The payload is stored apart, so listing and counting never load it."""

    def test_thirty_mib_attachment_keeps_a_small_record(
        self, store: DeadLetterStore, redis_client: redis.Redis
    ) -> None:
        """A 30 MiB attachment no longer makes a 40 MiB record: the record stays small."""
        id_ = store.add(make_record(kwargs=big_attachment_kwargs(30 * 1024 * 1024)))
        assert redis_client.hstrlen(keys.dlq_record(), id_) < 4096
        assert not redis_client.hexists(keys.dlq_payload(), id_)
        assert store.size() < 4096
        record = store.get(id_)
        assert record is not None
        assert record.summary()["attachments"] == [
            {"filename": "scan.tiff", "size": 30 * 1024 * 1024}
        ]

    def test_list_and_stats_never_load_payloads(
        self, store: DeadLetterStore, redis_client: redis.Redis
    ) -> None:
        """list(), ids() and stats() work without reading payloads, even unreadable ones."""
        id_ = store.add(make_record(kwargs=attachment_kwargs()))
        redis_client.hset(keys.dlq_payload(), id_, "not JSON")  # reading it would fail
        [listed] = store.list()
        assert listed.payload_complete is False
        assert listed.payload_dropped is None
        assert listed.summary()["attachments"] == [
            {"filename": "invoice.pdf", "size": len(SECRET_BYTES)}
        ]
        assert SECRET_B64[:40] not in json.dumps(listed.kwargs)
        assert store.stats()["reason"] == {"permanent": 1}
        assert store.ids(profile="default") == [id_]
        with pytest.raises(ValueError, match="unreadable"):
            store.get(id_)

    def test_get_returns_the_whole_payload(self, store: DeadLetterStore) -> None:
        """get() gives the original kwargs back, ready to re-queue."""
        id_ = store.add(make_record(kwargs=attachment_kwargs()))
        record = store.get(id_)
        assert record is not None
        assert record.kwargs == attachment_kwargs()
        assert record.payload_complete
        assert record.payload_bytes == len(json.dumps(attachment_kwargs(), separators=(",", ":")))

    def test_listed_record_refuses_to_requeue(self, store: DeadLetterStore) -> None:
        """A record from list() holds only a summary, so its requeue_kwargs() refuse."""
        store.add(make_record(kwargs=attachment_kwargs()))
        with pytest.raises(PayloadNotKeptError, match="summary"):
            store.list()[0].requeue_kwargs()

    def test_long_bodies_are_cut_in_the_record(
        self, store: DeadLetterStore, redis_client: redis.Redis
    ) -> None:
        """A large text body stays in the payload; the listed record carries its start."""
        body = "x" * 100_000
        id_ = store.add(make_record(kwargs={"to": ["b@x"], "subject": "s", "text": body}))
        assert redis_client.hstrlen(keys.dlq_record(), id_) < 4096
        [listed] = store.list()
        assert listed.kwargs["text"].endswith("… (100000 characters)")
        record = store.get(id_)
        assert record is not None
        assert record.kwargs["text"] == body

    def test_records_written_before_the_split_still_work(
        self, store: DeadLetterStore, redis_client: redis.Redis
    ) -> None:
        """A record stored whole by an older version lists, shows and re-queues as before."""
        old = dataclasses.replace(make_record(kwargs=attachment_kwargs()), id="0" * 20)
        redis_client.zadd(keys.dlq_index(), {old.id: START})
        redis_client.hset(keys.dlq_record(), old.id, old.to_json())
        assert [r.id for r in store.list()] == [old.id]
        got = store.get(old.id)
        assert got is not None
        assert got.kwargs == attachment_kwargs()
        assert store.requeue(old.id, lambda task, kwargs: "t") == "t"
        assert store.count() == 0


class TestPayloadCap:
    """A payload over max_payload_bytes is not kept; the rest of the record is."""

    def test_over_the_cap_keeps_metadata_reply_and_transcript(
        self, make_store: Callable[..., DeadLetterStore], redis_client: redis.Redis
    ) -> None:
        """The record keeps error, reply, transcript and a summary, and says why no payload."""
        store = make_store(max_payload_bytes=1000)
        id_ = store.add(make_record(kwargs=big_attachment_kwargs(2000)))
        record = store.get(id_)
        assert record is not None
        assert record.error["reply"] == "5.1.1 no such user"
        assert record.transcript == make_record().transcript
        assert record.payload_complete is False
        assert record.payload_dropped is not None
        assert "MAILWORKER_DLQ_MAX_PAYLOAD_BYTES (1000 bytes)" in record.payload_dropped
        assert record.details()["payload_kept"] is False
        assert record.summary()["attachments"] == [{"filename": "scan.tiff", "size": 2000}]
        assert redis_client.hlen(keys.dlq_payload()) == 0

    def test_requeue_refuses_and_keeps_the_record(
        self, make_store: Callable[..., DeadLetterStore]
    ) -> None:
        """Re-queueing a record without payload raises, publishes nothing, keeps the record."""
        store = make_store(max_payload_bytes=1000)
        id_ = store.add(make_record(kwargs=big_attachment_kwargs(2000)))

        def publish(task: str, kwargs: dict[str, Any]) -> str:
            raise AssertionError("must not publish")

        with pytest.raises(PayloadNotKeptError, match="MAILWORKER_DLQ_MAX_PAYLOAD_BYTES"):
            store.requeue(id_, publish)
        assert store.count() == 1

    def test_default_cap_keeps_any_message_within_the_limit(self) -> None:
        """The default cap holds a payload carrying a 25 MiB message in base64."""
        largest = len(base64.b64encode(b"\0" * MAX_MESSAGE_BYTES))
        assert largest < DEFAULT_MAX_PAYLOAD_BYTES < largest + 1024 * 1024
        assert DEFAULT_MAX_PAYLOAD_BYTES < DEFAULT_MAX_BYTES


class TestByteBudget:
    """The store stays within max_bytes: oldest payloads go first, then oldest records."""

    def test_size_is_exact(
        self, store: DeadLetterStore, clock: FakeClock, redis_client: redis.Redis
    ) -> None:
        """size() is what the records and payloads hold, through adds and removes."""
        ids = fill(store, clock, [make_record(kwargs=attachment_kwargs()) for _ in range(3)])
        assert store.size() == stored_bytes(redis_client) > 0
        store.remove(ids[:1])
        assert store.size() == stored_bytes(redis_client)
        store.purge()
        assert store.size() == 0

    def test_oldest_payloads_are_evicted_first(
        self,
        make_store: Callable[..., DeadLetterStore],
        clock: FakeClock,
        redis_client: redis.Redis,
    ) -> None:
        """Over the budget, the oldest payloads go; every record stays, and says so."""
        store = make_store(max_bytes=30_000)
        big = [make_record(kwargs=big_attachment_kwargs(6000)) for _ in range(4)]
        ids = fill(store, clock, big)
        assert store.count() == 4
        assert store.size() <= 30_000
        assert store.size() == stored_bytes(redis_client)
        first = store.get(ids[0])
        last = store.get(ids[-1])
        assert first is not None
        assert last is not None
        assert first.payload_dropped == EVICTED
        assert last.payload_complete
        assert [r.payload_dropped for r in store.list()][-1] == EVICTED

    def test_whole_records_go_when_no_payload_is_left(
        self, make_store: Callable[..., DeadLetterStore], clock: FakeClock
    ) -> None:
        """When records alone exceed the budget, the oldest records go."""
        one = len(make_record().to_json()) + 500  # a record, payload summary and all
        store = make_store(max_bytes=3 * one)
        ids = fill(store, clock, [make_record() for _ in range(6)])
        assert 0 < store.count() < 6
        assert store.ids()[0] == ids[-1]
        assert store.size() <= 3 * one

    def test_payload_over_the_whole_budget_is_not_stored(
        self, make_store: Callable[..., DeadLetterStore]
    ) -> None:
        """A payload larger than the budget itself is never written, and the record says so."""
        store = make_store(max_bytes=5000, max_payload_bytes=0)
        id_ = store.add(make_record(kwargs=big_attachment_kwargs(6000)))
        record = store.get(id_)
        assert record is not None
        assert record.payload_dropped is not None
        assert "MAILWORKER_DLQ_MAX_BYTES" in record.payload_dropped

    def test_zero_switches_the_budget_off(
        self, make_store: Callable[..., DeadLetterStore], clock: FakeClock
    ) -> None:
        """max_bytes=0 and max_payload_bytes=0 keep every payload."""
        store = make_store(max_bytes=0, max_payload_bytes=0)
        big = [make_record(kwargs=big_attachment_kwargs(6000)) for _ in range(4)]
        ids = fill(store, clock, big)
        assert all(r is not None and r.payload_complete for r in map(store.get, ids))

    def test_negative_budgets_rejected(self, redis_client: redis.Redis) -> None:
        """Negative byte limits are a ValueError naming the argument."""
        with pytest.raises(ValueError, match="max_bytes"):
            DeadLetterStore(redis_client, max_bytes=-1)
        with pytest.raises(ValueError, match="max_payload_bytes"):
            DeadLetterStore(redis_client, max_payload_bytes=-1)
