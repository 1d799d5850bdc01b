"""Fleet-wide provider limits in Redis (rate, leases, throttle, breaker), against a real
Redis, with several processes where the fleet is the point."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.synchronize import Barrier, Event
from typing import Any

import pytest
import redis

from mailworker.smtp.limits import Rate
from mailworker.store import keys
from mailworker.store.limits import Breaker, Leases, RateLimiter, Throttle, default_burst

#: Processes forked from a fork server that has imported this module once (not from a
#: test process that may run threads, and without each importing it again).
PROCESSES = multiprocessing.get_context("forkserver")
PROCESSES.set_forkserver_preload([__name__])
#: Processes in the fleet tests.
FLEET = 6


@pytest.fixture
def prefix() -> str:
    """A key prefix of the test's own."""
    return f"test-{uuid.uuid4().hex[:8]}:"


def at_once(n: int, call: Callable[[], Any]) -> list[Any]:
    """``call()`` in ``n`` threads released together; their results."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = call()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


# -- processes of the fleet tests (module level: spawned processes import them) --------


def rate_worker(url: str, prefix: str, rate: Rate, ready: Barrier, window: Any, out: Any) -> None:
    """Take tokens as fast as allowed (sleeping the waits) until ``window[1]``; put the
    times tokens were granted within ``window``."""
    limiter = RateLimiter(redis.Redis.from_url(url), prefix=prefix)
    ready.wait()  # the parent drains the bucket and sets the window
    ready.wait()
    start, end = window[0], window[1]
    granted: list[float] = []
    while True:
        wait = limiter.acquire("fleet", rate)
        now = time.time()
        if now >= end:
            break
        if wait == 0:
            granted.append(now)
        else:
            time.sleep(wait)
    out.put([t for t in granted if t >= start])


def lease_worker(
    url: str, prefix: str, limit: int, name: str, ready: Barrier, end: Any, out: Any
) -> None:
    """Open "sessions" under leases until ``end``; put (sessions, most inside at once,
    most leases seen held)."""
    client = redis.Redis.from_url(url)
    leases = Leases(client, prefix=prefix)
    inside_key = f"{prefix}inside"
    ready.wait()
    sessions = peak_inside = peak_held = 0
    while time.time() < end.value:
        holder = f"{name}:{sessions}"
        if not leases.acquire("fleet", limit, holder, ttl=5):
            time.sleep(0.002)
            continue
        peak_inside = max(peak_inside, int(client.incr(inside_key)))
        peak_held = max(peak_held, leases.held("fleet"))
        time.sleep(0.02)
        client.decr(inside_key)
        leases.release("fleet", holder)
        sessions += 1
    out.put((sessions, peak_inside, peak_held))


def lease_then_hang(url: str, prefix: str, ttl: float, holding: Event) -> None:
    """Take the only lease, say so, and never release it (the parent kills us)."""
    leases = Leases(redis.Redis.from_url(url), prefix=prefix)
    assert leases.acquire("fleet", 1, "doomed", ttl)
    holding.set()
    time.sleep(60)


# -- tests ------------------------------------------------------------------------------


class TestRate:
    """The token bucket."""

    def test_takes_burst_then_says_how_long_to_wait(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """A 5/s bucket grants 5 at once, then refuses with the wait for the next token."""
        limiter = RateLimiter(redis_client, prefix=prefix)
        rate = Rate.parse("5/s", "rate")
        assert [limiter.acquire("p", rate) for _ in range(5)] == [0.0] * 5
        wait = limiter.acquire("p", rate)
        assert 0 < wait <= 0.2

    def test_a_refusal_takes_nothing(self, redis_client: redis.Redis, prefix: str) -> None:
        """After a refusal, waiting what it said is enough for the next token."""
        limiter = RateLimiter(redis_client, prefix=prefix)
        rate = Rate(2, 1)
        for _ in range(2):
            limiter.acquire("p", rate)
        wait = limiter.acquire("p", rate)
        assert wait > 0
        assert limiter.acquire("p", rate) > 0
        time.sleep(wait + 0.005)
        assert limiter.acquire("p", rate) == 0.0

    @pytest.mark.parametrize(("text", "gap"), [("60/m", 1.0), ("0.5/s", 2.0), ("3600/h", 1.0)])
    def test_slower_rates_do_not_burst(
        self, redis_client: redis.Redis, prefix: str, text: str, gap: float
    ) -> None:
        """Rates per minute or hour, and below 1/s, hold one token: sends come evenly."""
        limiter = RateLimiter(redis_client, prefix=prefix)
        rate = Rate.parse(text, "rate")
        assert default_burst(rate) == 1
        assert limiter.acquire("p", rate) == 0.0
        assert limiter.acquire("p", rate) == pytest.approx(gap, rel=0.05)

    def test_burst_sets_the_capacity(self, redis_client: redis.Redis, prefix: str) -> None:
        """burst= lets a bucket hold more (or fewer) tokens than the default."""
        limiter = RateLimiter(redis_client, prefix=prefix)
        rate = Rate(1, 60)
        assert [limiter.acquire("p", rate, burst=3) for _ in range(4)][-1] > 59
        assert limiter.tokens("p", rate, burst=3) < 0.01
        with pytest.raises(ValueError, match="burst"):
            limiter.acquire("p", rate, burst=0.5)

    def test_tokens_counts_without_taking(self, redis_client: redis.Redis, prefix: str) -> None:
        """tokens() says what is left (full when untouched) and takes none."""
        limiter = RateLimiter(redis_client, prefix=prefix)
        rate = Rate(10, 3600)
        assert limiter.tokens("p", rate, burst=10) == 10
        limiter.acquire("p", rate, burst=10)
        limiter.acquire("p", rate, burst=10)
        assert limiter.tokens("p", rate, burst=10) == pytest.approx(8, abs=0.01)
        assert limiter.tokens("p", rate, burst=10) == pytest.approx(8, abs=0.01)

    def test_profiles_and_prefixes_are_separate(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """One profile's bucket, or another deployment's, is not another's."""
        rate = Rate(1, 1)
        limiter = RateLimiter(redis_client, prefix=prefix)
        assert limiter.acquire("a", rate) == 0.0
        assert limiter.acquire("b", rate) == 0.0
        assert RateLimiter(redis_client, prefix=prefix + "x:").acquire("a", rate) == 0.0
        assert limiter.acquire("a", rate) > 0

    def test_the_bucket_expires_once_full_again(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """The key lives no longer than the refill of what was taken (+1 s)."""
        limiter = RateLimiter(redis_client, prefix=prefix)
        limiter.acquire("p", Rate(10, 1))
        assert 0 < redis_client.pttl(keys.rate("p", prefix)) <= 1100

    def test_a_fleet_gets_the_rate(self, redis_url: str, prefix: str) -> None:
        """Six processes taking tokens as fast as allowed get 100/s between them, within
        5 % over 2 s (the burst drained first)."""
        rate, duration = Rate(100, 1), 2.0
        ready = PROCESSES.Barrier(FLEET + 1)
        window = PROCESSES.Array("d", 2)
        out = PROCESSES.Queue()
        procs = [
            PROCESSES.Process(
                target=rate_worker, args=(redis_url, prefix, rate, ready, window, out)
            )
            for _ in range(FLEET)
        ]
        for p in procs:
            p.start()
        ready.wait(timeout=30)
        limiter = RateLimiter(redis.Redis.from_url(redis_url), prefix=prefix)
        while limiter.acquire("fleet", rate) == 0:
            pass
        window[0] = time.time()
        window[1] = window[0] + duration
        ready.wait(timeout=5)
        per_process = [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=10)
        granted = sum(len(g) for g in per_process)
        measured = granted / duration
        print(f"fleet rate: {granted} granted in {duration} s = {measured:.1f}/s for 100/s")
        assert measured == pytest.approx(100, rel=0.05)
        assert all(per_process), "every process got some tokens"


class TestLeases:
    """The connection semaphore."""

    def test_no_more_than_limit(self, redis_client: redis.Redis, prefix: str) -> None:
        """Two leases out of two are granted, the third is refused until one is released."""
        leases = Leases(redis_client, prefix=prefix)
        assert leases.acquire("p", 2, "a", 30)
        assert leases.acquire("p", 2, "b", 30)
        assert not leases.acquire("p", 2, "c", 30)
        assert leases.held("p") == 2
        leases.release("p", "a")
        assert leases.acquire("p", 2, "c", 30)
        assert leases.held("p") == 2

    def test_the_holder_acquiring_again_renews(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """A holder asking again keeps its one lease (even at the limit) with the new ttl."""
        leases = Leases(redis_client, prefix=prefix)
        assert leases.acquire("p", 1, "a", 0.2)
        assert leases.acquire("p", 1, "a", 30)
        time.sleep(0.3)
        assert leases.held("p") == 1
        assert not leases.acquire("p", 1, "b", 30)

    def test_expired_leases_are_reclaimed(self, redis_client: redis.Redis, prefix: str) -> None:
        """A lease not renewed within its ttl stops counting and its slot is taken."""
        leases = Leases(redis_client, prefix=prefix)
        assert leases.acquire("p", 1, "a", 0.1)
        time.sleep(0.15)
        assert leases.held("p") == 0
        assert leases.acquire("p", 1, "b", 30)

    def test_renew(self, redis_client: redis.Redis, prefix: str) -> None:
        """renew() extends a live lease and reports a lost one (expired) with False."""
        leases = Leases(redis_client, prefix=prefix)
        assert leases.acquire("p", 1, "a", 0.5)
        assert leases.renew("p", "a", 30)
        expiry = redis_client.zscore(keys.leases("p", prefix), "a")
        assert expiry is not None
        assert expiry > time.time() + 29
        assert leases.renew("p", "a", 0.05)
        time.sleep(0.1)
        assert leases.held("p") == 0
        assert not leases.renew("p", "a", 30)
        assert leases.acquire("p", 1, "b", 30)
        assert not leases.renew("p", "a", 30)
        assert not leases.renew("p", "nobody", 30)

    def test_release_of_an_unknown_holder_is_harmless(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """Releasing twice, or what was never held, changes nothing."""
        leases = Leases(redis_client, prefix=prefix)
        leases.acquire("p", 2, "a", 30)
        leases.release("p", "a")
        leases.release("p", "a")
        leases.release("p", "b")
        assert leases.held("p") == 0

    def test_the_key_lives_as_long_as_its_longest_lease(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """No lease outlives its key, and the key does not outlive its leases by much."""
        leases = Leases(redis_client, prefix=prefix)
        leases.acquire("p", 3, "long", 10)
        leases.acquire("p", 3, "short", 1)
        assert 10_000 <= redis_client.pttl(keys.leases("p", prefix)) <= 11_100

    def test_a_fleet_never_exceeds_the_limit(self, redis_url: str, prefix: str) -> None:
        """Six processes competing for 3 leases for 1.5 s never hold more than 3 at once,
        and do hold 3."""
        limit = 3
        ready = PROCESSES.Barrier(FLEET + 1)
        end = PROCESSES.Value("d", 0.0)
        out = PROCESSES.Queue()
        procs = [
            PROCESSES.Process(
                target=lease_worker, args=(redis_url, prefix, limit, f"w{i}", ready, end, out)
            )
            for i in range(FLEET)
        ]
        for p in procs:
            p.start()
        end.value = time.time() + 60
        ready.wait(timeout=30)
        end.value = time.time() + 1.5
        results = [out.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=10)
        sessions = sum(r[0] for r in results)
        peak_inside = max(r[1] for r in results)
        peak_held = max(r[2] for r in results)
        print(f"leases: {sessions} sessions, at most {peak_inside} inside, {peak_held} held")
        assert peak_inside == limit
        assert peak_held <= limit
        # 3 at a time, ~20 ms each, for 1.5 s: about 200 if nothing else were slow.
        assert sessions > 20

    def test_a_dead_holders_lease_is_reclaimed_after_its_ttl(
        self, redis_url: str, redis_client: redis.Redis, prefix: str
    ) -> None:
        """A process killed while holding the only lease blocks others for its ttl, no
        longer."""
        ttl = 0.5
        holding = PROCESSES.Event()
        proc = PROCESSES.Process(target=lease_then_hang, args=(redis_url, prefix, ttl, holding))
        proc.start()
        assert holding.wait(timeout=20), f"the holder exited ({proc.exitcode}) before holding"
        proc.kill()
        proc.join(timeout=10)
        taken = time.monotonic()
        leases = Leases(redis_client, prefix=prefix)
        assert not leases.acquire("fleet", 1, "me", 30)
        while not leases.acquire("fleet", 1, "me", 30):
            time.sleep(0.01)
        waited = time.monotonic() - taken
        print(f"dead holder's lease reclaimed after {waited:.3f} s (ttl {ttl} s)")
        assert waited <= ttl + 0.1


class TestThrottle:
    """The fleet's back-off after throttling replies."""

    def test_no_back_off_at_first(self, redis_client: redis.Redis, prefix: str) -> None:
        """Nothing recorded: no wait."""
        assert Throttle(redis_client, prefix=prefix).wait("p") == 0.0

    def test_a_hit_starts_a_back_off_for_the_fleet(
        self, redis_client: redis.Redis, redis_url: str, prefix: str
    ) -> None:
        """After a hit every process (another client here) waits out the back-off."""
        assert Throttle(redis_client, prefix=prefix).hit("p", 0.3, 10) == 0.3
        with redis.Redis.from_url(redis_url) as client:
            other = Throttle(client, prefix=prefix)
            assert 0.1 < other.wait("p") <= 0.3
            time.sleep(0.35)
            assert other.wait("p") == 0.0

    def test_consecutive_hits_double_up_to_the_cap(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """Each hit after a back-off ended doubles it, up to the cap."""
        throttle = Throttle(redis_client, prefix=prefix)
        seen = []
        for _ in range(4):
            seen.append(throttle.hit("p", 0.05, 0.3))
            time.sleep(seen[-1] + 0.01)
        assert seen == [0.05, 0.1, 0.2, 0.3]

    def test_hits_within_a_back_off_count_once(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """Eight processes hitting at once start one back-off of the base length."""
        throttle = Throttle(redis_client, prefix=prefix)
        results = at_once(8, lambda: throttle.hit("p", 1.0, 60))
        assert all(0.5 < r <= 1.0 for r in results)
        assert throttle.hit("p", 1.0, 60) <= 1.0
        assert redis_client.hget(keys.throttle("p", prefix), "backoff") == b"1"

    def test_clear_restarts_at_base_and_keeps_the_back_off_in_force(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """A success resets the doubling; the back-off already in force runs out."""
        throttle = Throttle(redis_client, prefix=prefix)
        throttle.hit("p", 0.2, 10)
        time.sleep(0.21)
        assert throttle.hit("p", 0.2, 10) == 0.4
        throttle.clear("p")
        assert throttle.wait("p") > 0
        time.sleep(0.41)
        assert throttle.hit("p", 0.2, 10) == 0.2

    def test_the_key_expires_cap_after_the_back_off(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """The doubling is forgotten ``cap`` seconds after the back-off ended."""
        Throttle(redis_client, prefix=prefix).hit("p", 2, 8)
        assert 9_900 < redis_client.pttl(keys.throttle("p", prefix)) <= 10_000


class TestBreaker:
    """The shared circuit breaker."""

    def test_closed_at_first(self, redis_client: redis.Redis, prefix: str) -> None:
        """A profile never seen failing is closed."""
        breaker = Breaker(redis_client, prefix=prefix)
        assert breaker.allow("p", reset=30) == "closed"
        assert breaker.status("p").state == "closed"
        assert not breaker.success("p")

    def test_opens_after_consecutive_failures(self, redis_client: redis.Redis, prefix: str) -> None:
        """The third failure within the window opens it, for ``reset`` seconds."""
        breaker = Breaker(redis_client, prefix=prefix)
        opened = [breaker.failure("p", failures=3, window=10, reset=30) for _ in range(3)]
        assert opened == [False, False, True]
        assert breaker.allow("p", reset=30) == "open"
        status = breaker.status("p")
        assert (status.state, status.failures) == ("open", 3)
        assert status.opened_at is not None
        assert status.retry_at == pytest.approx(status.opened_at + 30)
        assert not breaker.failure("p", failures=3, window=10, reset=30)
        assert breaker.status("p").failures == 4

    def test_failures_spread_wider_than_the_window_do_not_open(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """Only failures within ``window`` of each other count toward opening."""
        breaker = Breaker(redis_client, prefix=prefix)

        def fail() -> bool:
            return breaker.failure("p", failures=3, window=0.5, reset=30)

        assert not fail()
        time.sleep(0.55)
        assert not fail()
        assert not fail()
        assert breaker.status("p").state == "closed"
        assert fail()

    def test_a_success_resets_the_count(self, redis_client: redis.Redis, prefix: str) -> None:
        """Failures must be consecutive: a success in between starts over."""
        breaker = Breaker(redis_client, prefix=prefix)
        breaker.failure("p", failures=2, window=10, reset=30)
        assert not breaker.success("p")
        assert breaker.status("p").failures == 0
        assert not breaker.failure("p", failures=2, window=10, reset=30)
        assert breaker.failure("p", failures=2, window=10, reset=30)

    def test_one_probe_per_reset_across_the_fleet(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """Once ``reset`` has passed, one of many callers at once gets the probe."""
        breaker = Breaker(redis_client, prefix=prefix)
        breaker.failure("p", failures=1, window=10, reset=0.5)
        assert breaker.allow("p", reset=0.5) == "open"
        time.sleep(0.55)
        answers = at_once(10, lambda: breaker.allow("p", reset=0.5))
        assert sorted(answers) == ["open"] * 9 + ["probe"]
        assert breaker.status("p").state == "half_open"
        # A probe that never reports (its process died): another one a reset later.
        time.sleep(0.55)
        assert breaker.allow("p", reset=0.5) == "probe"

    def test_a_failed_probe_reopens(self, redis_client: redis.Redis, prefix: str) -> None:
        """A failure while half-open opens the breaker again for another ``reset``."""
        breaker = Breaker(redis_client, prefix=prefix)
        breaker.failure("p", failures=1, window=10, reset=0.05)
        opened_at = breaker.status("p").opened_at
        time.sleep(0.06)
        assert breaker.allow("p", reset=30) == "probe"
        assert breaker.failure("p", failures=1, window=10, reset=30)
        status = breaker.status("p")
        assert status.state == "open"
        assert status.opened_at == opened_at
        assert status.retry_at is not None
        assert status.retry_at > time.time() + 29
        assert breaker.allow("p", reset=30) == "open"

    def test_a_successful_probe_closes(self, redis_client: redis.Redis, prefix: str) -> None:
        """A success while half-open (or open) closes the breaker, once."""
        breaker = Breaker(redis_client, prefix=prefix)
        breaker.failure("p", failures=1, window=10, reset=0.05)
        time.sleep(0.06)
        assert breaker.allow("p", reset=30) == "probe"
        assert breaker.success("p")
        assert not breaker.success("p")
        assert breaker.allow("p", reset=30) == "closed"
        assert breaker.status("p") == breaker.status("q")

    def test_a_closed_breakers_failures_expire_after_the_window(
        self, redis_client: redis.Redis, prefix: str
    ) -> None:
        """A closed breaker's key expires ``window`` after its last failure; an open one
        is kept."""
        breaker = Breaker(redis_client, prefix=prefix)
        breaker.failure("p", failures=2, window=10, reset=30)
        assert 9_900 < redis_client.pttl(keys.breaker("p", prefix)) <= 10_000
        breaker.failure("p", failures=2, window=10, reset=30)
        assert redis_client.pttl(keys.breaker("p", prefix)) == -1

    def test_a_decoding_client_works_too(self, redis_url: str, prefix: str) -> None:
        """Clients with decode_responses=True get the same answers."""
        client = redis.Redis.from_url(redis_url, decode_responses=True)
        breaker = Breaker(client, prefix=prefix)
        breaker.failure("p", failures=1, window=10, reset=30)
        assert breaker.allow("p", reset=30) == "open"
        assert breaker.status("p").state == "open"
        assert Throttle(client, prefix=prefix).hit("p", 1, 2) == 1.0
        assert RateLimiter(client, prefix=prefix).acquire("p", Rate(1, 1)) == 0.0
        client.close()
