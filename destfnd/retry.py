"""Pure retry decisions: policy + attempt + outcome + clock -> retry at a time, or give up.

No I/O and no clock of its own: the caller passes `now` and the random source (for jitter).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Protocol

from destfnd.outcome import MAX_RETRY_AFTER_S, retry_after_hint
from destfnd.store import Status


class Policy(Protocol):
    max_attempts: int
    max_age_s: float
    backoff_initial_s: float
    backoff_max_s: float
    backoff_multiplier: float


@dataclass(frozen=True, slots=True)
class Decision:
    status: Status  # RETRYING, or the terminal status to record
    at: int  # unix ms: when to try again, or when it was finished
    why: str = field(default="", compare=False)  # why it gave up (EXPIRED)


def backoff_s(policy: Policy, attempt: int, rng: random.Random) -> float:
    """Randomized exponential backoff after the `attempt`-th failure ("equal jitter"): the step
    is backoff_initial * backoff_multiplier^(attempt-1), at most backoff_max.

    Half the step is fixed, half random, so retries of a burst spread out but never come back
    sooner than half the nominal delay.
    """
    try:
        growth = policy.backoff_multiplier ** (attempt - 1)
    except OverflowError:  # a large max_attempts: far past backoff_max anyway
        growth = math.inf
    step = min(policy.backoff_max_s, policy.backoff_initial_s * growth)
    return step / 2 + rng.uniform(0, step / 2)


def decide_retry(
    policy: Policy,
    *,
    attempt: int,
    created_at: int,
    now: int,
    rng: random.Random,
    retry_after_s: object = None,
) -> Decision:
    """After a retryable failure of attempt number `attempt` (1-based): when to try again.

    Gives up with EXPIRED once `max_attempts` tries were made, or when the next try would
    fall after `created_at + max_age`. A downstream `Retry-After` is honoured as a minimum
    (`retry_after_s` as a function sent it: anything but a number of seconds is ignored).
    """
    if attempt >= policy.max_attempts:
        made = f"{attempt} attempts made (max_attempts = {policy.max_attempts})"
        return Decision(Status.EXPIRED, now, made)
    delay_s = backoff_s(policy, attempt, rng)
    hinted = retry_after_hint(retry_after_s)
    if hinted is not None and hinted > delay_s:
        delay_s = hinted
    at = now + int(delay_s * 1000)
    if at > created_at + int(policy.max_age_s * 1000):
        asked = f"{hinted:g}s" if hinted is not None and hinted < MAX_RETRY_AFTER_S else "years"
        wait = f"the wait asked for ({asked})" if delay_s == hinted else "the next attempt"
        return Decision(Status.EXPIRED, now, f"{wait} would fall past max_age")
    return Decision(Status.RETRYING, at)
