"""destfnd.retry: randomized exponential backoff and the give-up rules, with a seeded rng."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from destfnd.config import RetryPolicy
from destfnd.outcome import MAX_RETRY_AFTER_S, parse_retry_after
from destfnd.retry import backoff_s, decide_retry
from destfnd.store import Status

NOW = 1_700_000_000_000  # unix ms
HOUR_MS = 3600 * 1000


@dataclass(frozen=True, slots=True)
class Policy:
    max_attempts: int = 10
    max_age_s: float = 4 * 3600.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_multiplier: float = 2.0  # doubling: the figures below are easy to check by hand


def step_s(policy: Policy, attempt: int) -> float:
    """The nominal (jitter-free) delay after the `attempt`-th failure."""
    growth = policy.backoff_multiplier ** (attempt - 1)
    return min(policy.backoff_max_s, policy.backoff_initial_s * growth)


@pytest.mark.parametrize("seed", range(20))
def test_backoff_s_stays_between_half_step_and_step(seed):
    policy = Policy()
    rng = random.Random(seed)
    for attempt in range(1, 16):
        step = step_s(policy, attempt)
        for _ in range(20):
            assert step / 2 <= backoff_s(policy, attempt, rng) <= step


def test_backoff_s_grows_exponentially_with_attempt():
    policy = Policy(backoff_initial_s=0.5, backoff_max_s=10_000.0)
    rng = random.Random(7)
    samples = {a: [backoff_s(policy, a, rng) for _ in range(200)] for a in range(1, 11)}
    for attempt in range(1, 10):
        # Equal jitter: attempt n lies in [s/2, s], attempt n+1 in [s, 2s]; the ranges touch.
        assert min(samples[attempt + 1]) >= max(samples[attempt])
        mean_now = sum(samples[attempt]) / 200
        mean_next = sum(samples[attempt + 1]) / 200
        assert 1.7 < mean_next / mean_now < 2.3
    # Attempt 10 waits around 0.75 * 0.5 * 2**9 = 192 s on average.
    assert 170 < sum(samples[10]) / 200 < 215


def test_backoff_s_grows_by_backoff_multiplier():
    rng = random.Random(9)
    for multiplier in (1.0, 1.5, 5.0):
        policy = Policy(backoff_initial_s=0.5, backoff_max_s=1e9, backoff_multiplier=multiplier)
        for attempt in range(1, 8):
            step = 0.5 * multiplier ** (attempt - 1)
            delays = [backoff_s(policy, attempt, rng) for _ in range(50)]
            assert all(step / 2 <= d <= step for d in delays), (multiplier, attempt)
    # A small multiplier still reaches backoff_max, however many attempts it takes.
    slow = Policy(backoff_initial_s=1.0, backoff_max_s=3600.0, backoff_multiplier=1.1)
    assert 1800.0 <= backoff_s(slow, 100, rng) <= 3600.0
    assert 1800.0 <= backoff_s(Policy(backoff_max_s=3600.0, backoff_multiplier=100.0), 10**6, rng)
    # 1: every wait is backoff_initial's step, however many attempts were made.
    flat = Policy(backoff_initial_s=2.0, backoff_max_s=60.0, backoff_multiplier=1.0)
    assert all(1.0 <= backoff_s(flat, a, rng) <= 2.0 for a in (1, 5, 50, 5000))


def test_default_policy_retries_for_hours_as_segment():
    """Segment retries a delivery up to 9 times over 4 hours: the defaults' ten attempts,
    each failing, spread over hours (with waits that doubled, they took 4-9 minutes), and
    the first retries still come within seconds, for a blip. decide_retry is driven as the
    dispatcher drives it: each attempt at the time the one before asked for."""
    policy = RetryPolicy()
    lasts = []
    for seed in range(300):
        rng = random.Random(seed)
        now, attempt, times = NOW, 1, [NOW]
        while True:
            decision = decide_retry(policy, attempt=attempt, created_at=NOW, now=now, rng=rng)
            if decision.status is not Status.RETRYING:
                break
            now, attempt = decision.at, attempt + 1
            times.append(now)
        assert decision.status is Status.EXPIRED
        assert "max_attempts = 10" in decision.why  # all ten made: max_age never cut it short
        assert len(times) == 10
        assert times[1] - NOW <= 1_000 and times[3] - NOW <= 60_000, times
        lasts.append(times[-1] - NOW)
    assert 2 * HOUR_MS <= min(lasts) and max(lasts) <= 4 * HOUR_MS, (min(lasts), max(lasts))


def test_backoff_s_is_capped_at_backoff_max():
    policy = Policy(backoff_initial_s=1.0, backoff_max_s=60.0)
    rng = random.Random(3)
    # 2**6 = 64 s > 60 s: from attempt 7 on, the cap applies.
    delays = [backoff_s(policy, attempt, rng) for attempt in range(7, 40) for _ in range(10)]
    assert all(30.0 <= d <= 60.0 for d in delays)
    assert max(delays) > 55.0  # the cap is reached, not some lower plateau


def test_backoff_s_huge_attempt_stays_capped():
    # max_attempts has no upper bound in config: 2**1999 must not overflow a float.
    policy = Policy(max_attempts=5000, backoff_initial_s=1.0, backoff_max_s=60.0)
    assert 30.0 <= backoff_s(policy, 2000, random.Random(1)) <= 60.0
    decision = decide_retry(
        Policy(max_attempts=5000, max_age_s=1e9),
        attempt=2000,
        created_at=NOW,
        now=NOW,
        rng=random.Random(1),
    )
    assert decision.status is Status.RETRYING
    assert NOW + 30_000 <= decision.at <= NOW + 60_000


def test_backoff_s_same_seed_reproduces_and_different_seeds_differ():
    policy = Policy()

    def series(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [backoff_s(policy, attempt, rng) for attempt in range(1, 10)]

    assert series(11) == series(11)
    assert series(11) != series(12)


def test_decide_retry_jitter_is_random_across_seeds():
    policy = Policy()
    ats = {
        decide_retry(policy, attempt=5, created_at=NOW, now=NOW, rng=random.Random(seed)).at
        for seed in range(50)
    }
    # Attempt 5: a delay in [8 s, 16 s], spread over many distinct milliseconds.
    assert len(ats) > 40
    assert all(NOW + 8_000 <= at <= NOW + 16_000 for at in ats)


def test_decide_retry_schedules_retry_after_backoff():
    policy = Policy()
    now = NOW + 1000
    decision = decide_retry(policy, attempt=3, created_at=NOW, now=now, rng=random.Random(5))
    expected_delay_s = backoff_s(policy, 3, random.Random(5))
    assert decision.status is Status.RETRYING
    assert decision.at == now + int(expected_delay_s * 1000)
    assert now + 2_000 <= decision.at <= now + 4_000  # step 4 s: [2 s, 4 s]


def test_decide_retry_expires_when_max_attempts_reached():
    policy = Policy(max_attempts=3)
    rng = random.Random(1)
    below = decide_retry(policy, attempt=2, created_at=NOW, now=NOW, rng=rng)
    at_limit = decide_retry(policy, attempt=3, created_at=NOW, now=NOW + 5, rng=rng)
    assert below.status is Status.RETRYING
    assert at_limit.status is Status.EXPIRED
    assert at_limit.at == NOW + 5


def test_decide_retry_single_attempt_policy_never_retries():
    decision = decide_retry(
        Policy(max_attempts=1), attempt=1, created_at=NOW, now=NOW, rng=random.Random(1)
    )
    assert decision.status is Status.EXPIRED


def test_decide_retry_expires_when_next_try_falls_after_max_age():
    policy = Policy(max_age_s=4 * 3600.0, backoff_initial_s=60.0, backoff_max_s=60.0)
    # Backoff is 30-60 s; created 4 h minus 10 s ago, any next try falls past the deadline.
    now = NOW + 4 * HOUR_MS - 10_000
    late = decide_retry(policy, attempt=2, created_at=NOW, now=now, rng=random.Random(1))
    assert late.status is Status.EXPIRED
    assert late.at == now
    # Two minutes of margin: every possible next try is within max_age.
    early_now = NOW + 4 * HOUR_MS - 120_000
    early = decide_retry(policy, attempt=2, created_at=NOW, now=early_now, rng=random.Random(1))
    assert early.status is Status.RETRYING
    assert early.at <= NOW + 4 * HOUR_MS


def test_decide_retry_honours_larger_retry_after():
    policy = Policy()
    decision = decide_retry(
        policy, attempt=1, created_at=NOW, now=NOW, rng=random.Random(1), retry_after_s=120.0
    )
    assert decision.status is Status.RETRYING
    assert decision.at == NOW + 120_000


def test_decide_retry_ignores_smaller_retry_after():
    policy = Policy()
    with_hint = decide_retry(
        policy, attempt=4, created_at=NOW, now=NOW, rng=random.Random(9), retry_after_s=0.5
    )
    without = decide_retry(policy, attempt=4, created_at=NOW, now=NOW, rng=random.Random(9))
    assert with_hint == without
    assert with_hint.at >= NOW + 4_000  # step 8 s: at least 4 s, not the 0.5 s hint


def test_decide_retry_retry_after_past_max_age_expires():
    policy = Policy(max_age_s=3600.0)
    decision = decide_retry(
        policy, attempt=1, created_at=NOW, now=NOW, rng=random.Random(1), retry_after_s=7200.0
    )
    assert decision.status is Status.EXPIRED


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("120", 120.0),
        (" 2.5 ", 2.5),  # fractions: not in RFC 9110, sent anyway
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),  # an HTTP date, 10 s after "now"
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past: now
        ("-5", 0.0),
        ("1e300", MAX_RETRY_AFTER_S),
        ("1" + "0" * 400, MAX_RETRY_AFTER_S),  # no float, as a number
        ("Wed, 21 Oct 2015 07:28:10 -0000", 10.0),  # no zone: UTC
        ("inf", MAX_RETRY_AFTER_S),
        ("nan", None),
        ("\u00b2", None),  # str.isdigit() says yes, float() says no
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after_takes_seconds_or_a_date_and_never_raises(header, seconds):
    now = datetime(2015, 10, 21, 7, 28, tzinfo=UTC).timestamp()
    assert parse_retry_after(header, now) == seconds


@pytest.mark.parametrize("hint", ["3", [3], {"s": 3}, True, float("nan"), object()])
def test_decide_retry_ignores_a_hint_that_is_no_number(hint):
    """From a user's function anything can come: it must not crash the decision."""
    policy = Policy()
    with_hint = decide_retry(
        policy, attempt=1, created_at=NOW, now=NOW, rng=random.Random(3), retry_after_s=hint
    )
    without = decide_retry(policy, attempt=1, created_at=NOW, now=NOW, rng=random.Random(3))
    assert with_hint == without


def test_decide_retry_says_why_it_gave_up():
    policy = Policy(max_attempts=3, max_age_s=3600.0)
    rng = random.Random(1)
    assert decide_retry(policy, attempt=3, created_at=NOW, now=NOW, rng=rng).why == (
        "3 attempts made (max_attempts = 3)"
    )
    late = decide_retry(policy, attempt=1, created_at=NOW, now=NOW, rng=rng, retry_after_s=1e300)
    assert late.status is Status.EXPIRED
    assert late.why == "the wait asked for (years) would fall past max_age"


@pytest.mark.parametrize("hint", [10**400, float("inf"), 1e300])
def test_decide_retry_takes_any_huge_hint_as_past_max_age(hint):
    decision = decide_retry(
        Policy(), attempt=1, created_at=NOW, now=NOW, rng=random.Random(3), retry_after_s=hint
    )
    assert decision.status is Status.EXPIRED


def test_clip_error_leaves_a_clipped_message_and_nothing_longer():
    from destfnd.outcome import MAX_ERROR_CHARS, clip_error

    clipped = clip_error("E" * 100_000)
    assert clipped == "E" * MAX_ERROR_CHARS + "... [100,000 characters in all]"
    assert clip_error(clipped) == clipped  # the worker clipped it: the daemon keeps it
    # A message made to look clipped, with a note of any length, is clipped all the same.
    forged = "x" * MAX_ERROR_CHARS + "... [" + "9" * 5_000 + " characters in all]"
    assert len(clip_error(forged)) < MAX_ERROR_CHARS + 48
