"""Steps of the wall clock, which retry schedules are on, told from slewing and suspend."""

from __future__ import annotations


def test_clock_steps_are_told_apart_from_slewing_and_suspend():
    from destfnd.upkeep import ClockSteps

    wall, boot = [1000.0], [50.0]
    steps = ClockSteps(lambda: wall[0], lambda: boot[0])
    wall[0] += 1.0005  # a second passes, NTP slews half a millisecond: no step
    boot[0] += 1.0
    assert steps.check() is None
    wall[0] += 3600 + 1  # suspended an hour: the boot clock counts it too
    boot[0] += 3600 + 1
    assert steps.check() is None
    wall[0] -= 3600 - 1  # stepped back an hour
    boot[0] += 1
    assert steps.check() == -3600
    wall[0] += 5 * 3600 + 1  # stepped forward five hours
    boot[0] += 1
    assert steps.check() == 5 * 3600
