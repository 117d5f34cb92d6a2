"""Plain `def` handlers on a worker's threads: a handler answered for must never run later.
In-process, on the real runtime and Worker code; what fails (a thread's start) is injected
into the standard library."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from destfnd.sandbox import child, runtime


async def test_a_handler_whose_thread_could_not_start_never_runs(monkeypatch):
    """submit() queues the work before it starts a thread: when the start fails, the call is
    answered (MemoryError, retried) and the queued handler must not run once a thread frees
    up (it did: the event was retried and sent all the same)."""
    runtime.set_threads(4)
    real_start = threading.Thread.start
    starts = []

    def start(self: threading.Thread) -> None:
        if self.name.startswith("destfnd-handler"):
            starts.append(self.name)
            if len(starts) >= 2:
                raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    ran = []

    def handler(name: str) -> None:
        if name == "first":
            time.sleep(0.3)  # holds the one thread while the second is queued
        ran.append(name)

    first = asyncio.create_task(runtime.invoke(handler, "first"))
    await asyncio.sleep(0.05)
    with pytest.raises(MemoryError):
        await runtime.invoke(handler, "second")
    await first
    await asyncio.sleep(0.2)  # the thread is free: it would take the queued item now
    assert ran == ["first"]
    monkeypatch.undo()
    runtime.set_threads(8)


def test_a_cancelled_calls_gate_stays_shut_after_the_call_is_forgotten():
    """A thread that took up a call's handler just as the call was cancelled reaches the gate
    after the call has been answered and forgotten: the gate must still refuse. (It looked
    the call up by id in a set the answer cleared, and let the handler run.)"""

    class Writer:
        def write(self, data: bytes) -> None: ...

    worker = child.Worker(None, Writer())  # type: ignore[arg-type]
    worker.calls[1] = child._CallState()
    gate = worker._gate(1)
    loop = asyncio.new_event_loop()
    try:
        task = loop.create_task(asyncio.sleep(10))
        worker.tasks[1] = task
        worker.cancel(1)
        worker._forget(1)(task)  # answered and forgotten, as the task's done callback does
        assert gate(True) is False
        assert worker.stuck is False  # nothing of it ran on a thread: the worker is fine
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
    finally:
        loop.close()
