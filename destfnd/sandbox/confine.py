"""What a worker process does to itself before any function code runs: its user, its memory
limit, its signals (the daemon decides when it stops), what the processes a function forks
keep of it, and where print() and logging go (the running invocation's logs)."""

from __future__ import annotations

import ctypes
import logging
import os
import pwd
import resource
import signal
import sys
from typing import Any

from destfnd.functions import record


def setup(read_fd: int, write_fd: int, memory_limit: int, run_as: int) -> None:
    """The worker as the daemon started it (its pipes `read_fd` and `write_fd`), before any
    function code runs: as user `run_as` (-1: as it is), its address space capped at
    `memory_limit` bytes (0: none), its signals the daemon's, print() and logging captured."""
    if run_as >= 0:
        _run_as(run_as)
    # Passed to it as inheritable: not to what a function starts (os.system, subprocess),
    # which would keep the daemon from seeing this worker exit while that process runs.
    os.set_inheritable(read_fd, False)
    os.set_inheritable(write_fd, False)
    _tie_to_daemon()
    _Forks((read_fd, write_fd))
    if memory_limit > 0:
        # Address space, not RSS: a runaway allocation fails with MemoryError instead of
        # growing until the kernel's OOM killer picks a process (maybe the daemon).
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    sys.stdout = _Capture(sys.__stdout__)
    sys.stderr = _Capture(sys.__stderr__)
    handler = _LogHandler()
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.basicConfig = _user_basic_config(handler)  # type: ignore[assignment]


class _Capture:
    """sys.stdout/sys.stderr: text goes to the current invocation's logs, else to the fd."""

    def __init__(self, fallback: Any) -> None:
        self._fallback = fallback

    encoding = "utf-8"
    errors = "strict"

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # as a real text stream says
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        rec = record.current.get()
        if rec is not None:
            rec.log(text)
        else:
            self._fallback.write(text)
        return len(text)

    def flush(self) -> None:
        if record.current.get() is None:
            self._fallback.flush()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)


class _LogHandler(logging.Handler):
    def emit(self, rec: logging.LogRecord) -> None:
        try:
            line = self.format(rec) + "\n"
        except Exception:  # a bad format string: logging reports it and goes on, never raises
            self.handleError(rec)
            return
        call = record.current.get()
        if call is not None:
            call.log(line)
        else:
            sys.__stderr__.write(line)


_LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def _user_basic_config(handler: logging.Handler) -> Any:
    """A function's own `logging.basicConfig(level=..., format=...)`: the root logger keeps
    destfnd's handler (what it writes is the attempt's logs), and takes the level and format
    given. (Python's would do nothing: the root logger has a handler already.)"""

    def basic_config(**kwargs: Any) -> None:
        if "level" in kwargs:
            logging.getLogger().setLevel(kwargs["level"])
        if "format" in kwargs:
            style = kwargs.get("style", "%")
            handler.setFormatter(logging.Formatter(kwargs["format"], kwargs.get("datefmt"), style))

    return basic_config


def _not_now(signum: int, frame: object) -> None:
    """The daemon decides when a worker stops."""


_HANDLED = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class _Forks:
    """What a process a function forks (os.fork, multiprocessing) must not keep of the
    worker: its pipes to the daemon (or the daemon would not see the worker exit while that
    process runs) and its signal handling (it gets the usual one). A signal sent between the
    fork and the child's reset waits, blocked, rather than be lost to the worker's handler."""

    def __init__(self, fds: tuple[int, ...]) -> None:
        # Each with the pipe it is now: a pipe closed meanwhile (at the daemon's EOF) frees
        # its number for a file the function opens, which a fork must keep.
        self.fds = {fd: _identity(fd) for fd in fds}
        os.register_at_fork(
            before=self._block, after_in_parent=self._unblock, after_in_child=self._in_child
        )

    def _block(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)

    def _unblock(self) -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)

    def _in_child(self) -> None:
        for fd, pipe in self.fds.items():
            try:
                if _identity(fd) == pipe:
                    os.close(fd)
            except OSError:
                pass  # closed already
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        self._unblock()


def _identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _tie_to_daemon() -> None:
    """The daemon decides when a worker stops (it closes the pipe): a SIGTERM sent to every
    process of the service (systemd's KillMode=control-group) or by `pkill` must not kill
    invocations the daemon is draining (a terminal's Ctrl-C and hangup do not reach the
    worker: it has a session of its own); and if the daemon dies by SIGKILL, its workers go
    too (Linux: PR_SET_PDEATHSIG). Handled, not ignored: an ignored signal stays ignored in
    the processes a function starts, whose `terminate()` would then do nothing."""
    for sig in _HANDLED:
        signal.signal(sig, _not_now)
        signal.siginterrupt(sig, False)  # a system call it lands in goes on (SA_RESTART)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the closed pipe still ends the worker once its loop runs


def _run_as(uid: int) -> None:
    """Become user `uid` (its primary group, no supplementary ones) for good, before any
    function code runs. Exits if it cannot: no function runs with more rights than asked."""
    try:
        gid = pwd.getpwuid(uid).pw_gid
    except KeyError:
        gid = uid  # nobody has no passwd entry here: its usual group id, 65534 too
    try:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        sys.stderr.write(f"cannot run as user {uid}: {exc}\n")
        os._exit(70)
