"""systemd's sd_notify protocol (READY=1, STOPPING=1, STATUS=..., WATCHDOG=1), a no-op outside
systemd."""

from __future__ import annotations

import os
import socket


def notify(*states: str) -> bool:
    """Send `states` to $NOTIFY_SOCKET; returns False when not run by systemd (or on error)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
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
