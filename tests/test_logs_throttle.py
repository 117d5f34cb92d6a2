"""logs.Throttle: bounded lines from what others can make as fast as they like."""

from __future__ import annotations

from destfnd.logs import Throttle


def test_throttle_lets_a_burst_then_a_rate_through_and_counts_the_rest():
    now = [100.0]
    throttle = Throttle(per_s=2.0, burst=3, clock=lambda: now[0])
    assert [throttle.allow() for _ in range(5)] == [0, 0, 0, None, None]
    assert throttle.held == 2
    now[0] += 0.4  # 0.8 of a line
    assert throttle.allow() is None
    now[0] += 0.1  # 1.0: the next line goes, with the three held back since the last
    assert throttle.allow() == 3
    assert throttle.held == 0
    now[0] += 1000  # a long quiet: back to the burst, no more
    assert [throttle.allow() for _ in range(4)] == [0, 0, 0, None]
