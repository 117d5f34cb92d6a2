"""The process's file descriptors against its limit: the soft limit raised to the hard one as
the daemon starts (each client connection, webhook connection and worker pipe takes one), and
a note for errors that running out of them causes, which do not say so themselves."""

from __future__ import annotations

import errno
import os
import resource

_NEAR = 0.9  # of the limit: "running out"


def raise_limit() -> int:
    """The soft limit raised to the hard one (as Go's runtime does; systemd gives services
    1024 and 524288); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):  # a hard limit above what the kernel allows (nr_open)
            pass
    return soft


def in_use() -> tuple[int, int] | None:
    """(open, limit), or None where /proc cannot tell."""
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        count = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir opened
    except OSError as exc:
        if exc.errno == errno.EMFILE:  # none left to look with
            return limit, limit
        return None
    return count, limit


def running_out() -> tuple[int, int] | None:
    """(open, limit) when 90% or more of the limit is open, else None."""
    used = in_use()
    if used is None or used[0] < _NEAR * used[1]:
        return None
    return used


def note() -> str:
    """For an error that running out of descriptors can cause ("unable to open database
    file"): what to do, if they are running out; else nothing."""
    used = running_out()
    if used is None:
        return ""
    return (
        f" (the daemon has {used[0]} of its {used[1]} file descriptors open: raise "
        "LimitNOFILE= in the unit, or ulimit -n)"
    )
