"""systemd's sd_notify protocol (READY=1, STOPPING=1, STATUS=..., WATCHDOG=1, and
EXTEND_TIMEOUT_USEC while a start is slow), a no-op outside systemd."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

_SEND_TIMEOUT_S = 1.0


def notify(*states: str) -> bool:
    """Send `states` to $NOTIFY_SOCKET; returns False when not run by systemd (or on error)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # systemd reads its socket at once; if it did not, the daemon (this runs on the
            # event loop) must not hang on a full queue.
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError:
        return False
    return True


def watchdog_interval_s() -> float | None:
    """How often to send WATCHDOG=1 (half of the unit's WatchdogSec, from $WATCHDOG_USEC), or
    None when systemd does not watch this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (a parent that exec'd us)
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2_000_000 if value > 0 else None


class StartProgress:
    """Keeps systemd's TimeoutStartSec from killing a start that is slow but moving (the first
    start after an upgrade: a migration building an index, or reading the dedupe keys of
    millions of events): once start has taken `every_s`, each `tick()` at most once per
    `every_s` sends EXTEND_TIMEOUT_USEC (`extend_s` more from now) and STATUS=`status`.

    `tick` is also a SQLite progress handler (`conn.set_progress_handler(tick, n)`), so a
    single long statement extends the timeout as long as SQLite is making progress; a start
    that hangs stops ticking and is still killed. Once `stopping` is set (a stop signal came
    during the start), `tick` sends nothing more and returns 1, which makes SQLite abandon the
    statement it runs: systemd would apply an extension to its stop timeout too."""

    def __init__(
        self,
        every_s: float = 5.0,
        extend_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.status = "starting"
        self.stopping = False
        self.sent = 0
        self._every_s = every_s
        self._extend_us = int(extend_s * 1_000_000)
        self._clock = clock
        self._last = clock()

    def tick(self) -> int:
        """Returns 0 (go on), or 1 once `stopping` (abort the SQLite statement); never raises."""
        if self.stopping:
            return 1
        try:
            now = self._clock()
            if now - self._last >= self._every_s:
                self._last = now
                if notify(f"EXTEND_TIMEOUT_USEC={self._extend_us}", f"STATUS={self.status}"):
                    self.sent += 1
        except Exception:  # raising here would abort the start itself
            pass
        return 0
