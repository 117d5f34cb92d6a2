"""The worker pipes' setup (`protocol.open_pipes`) when it is cancelled part-way, on both event
loops the daemon may run on: no descriptor is left open, and none is closed twice (a second
close would hit whatever file took the number in between)."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import subprocess
import sys

import pytest
import uvloop

from destfnd.sandbox import protocol


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


async def _cancel_after(turns: int) -> bool:
    """Start open_pipes on two fresh pipes, cancel it after `turns` loop turns; True if it
    had finished by then (its streams are then closed as a caller would)."""
    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()
    opening = asyncio.ensure_future(protocol.open_pipes(from_r, to_w))
    for _ in range(turns):
        await asyncio.sleep(0)
    finished = opening.done()
    opening.cancel()
    try:
        _, writer = await opening
    except asyncio.CancelledError:
        pass
    else:
        writer.close()
    os.close(from_w)  # the reader, if it was set up, sees EOF and closes its transport
    for _ in range(5):
        await asyncio.sleep(0)
    os.close(to_r)
    return finished


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_protocol_open_pipes_cancelled_at_any_point_leaves_no_fd_and_closes_none_twice(loop):
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.sleep(0))  # uvloop keeps a pipe of its own from its first loop on
    turns = 1  # from its first await on (a task cancelled before its first step runs nothing)
    while True:
        before = _open_fds()
        with asyncio.Runner(loop_factory=factory) as runner:
            finished = runner.run(_cancel_after(turns))
            # A file opened now takes the lowest free number, the one a pipe had: a late
            # second close of that pipe (at garbage collection) would close this file.
            canary_r, canary_w = os.pipe()
            gc.collect()
            runner.run(asyncio.sleep(0))
        try:
            os.fstat(canary_r)
            os.fstat(canary_w)
        except OSError:
            pytest.fail(f"{loop}, cancelled after {turns} turns: a pipe was closed twice")
        finally:
            for fd in (canary_r, canary_w):
                try:
                    os.close(fd)
                except OSError:
                    pass
        assert _open_fds() - before == set(), f"{loop}, cancelled after {turns} turns: a leak"
        if finished:
            break
        turns += 1
    assert turns >= 2  # it was cancelled at least once before it finished


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_protocol_a_workers_pipe_is_closed_at_eof(loop):
    """When a worker exits, its end of the reply pipe closes: the daemon's end is closed at
    once (uvloop kept it open until garbage collection found it: a descriptor per worker)."""

    async def main() -> None:
        to_r, to_w = os.pipe()
        from_r, from_w = os.pipe()
        reader, writer = await protocol.open_pipes(from_r, to_w)
        os.close(from_w)
        try:
            assert await reader.read() == b""
            for _ in range(5):
                await asyncio.sleep(0)
            with pytest.raises(OSError) as closed:  # (nothing opens a file meanwhile)
                os.fstat(from_r)
            assert closed.value.errno == errno.EBADF
        finally:
            writer.close()
            await asyncio.sleep(0)
            os.close(to_r)

    gc.disable()  # the transport is referenced all along: only the loop may close it
    try:
        factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())
    finally:
        gc.enable()


FORK_CHECK = """
import os, sys
from destfnd.sandbox import confine

from_daemon, _ = os.pipe()
_, to_daemon = os.pipe()
confine._Forks((from_daemon, to_daemon))  # as the worker does as it starts
os.close(from_daemon)  # closed at the daemon's EOF
user_file = open(sys.argv[1], "w")  # a function still running opens a file: same number
assert user_file.fileno() == from_daemon, (user_file.fileno(), from_daemon)
pid = os.fork()
if pid == 0:
    try:
        os.fstat(user_file.fileno())
    except OSError:
        os._exit(10)  # the function's file was closed
    try:
        os.fstat(to_daemon)
    except OSError:
        os._exit(0)
    os._exit(11)  # the pipe to the daemon was kept
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_protocol_a_fork_keeps_a_file_that_took_a_closed_pipes_number(tmp_path):
    """A process a function forks closes the worker's pipes, but only while they are the
    pipes: once one is closed, a file the function opens may get its number."""
    result = subprocess.run(
        [sys.executable, "-c", FORK_CHECK, str(tmp_path / "user.txt")],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, (result.returncode, result.stderr)
