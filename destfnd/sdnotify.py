"""systemd's sd_notify protocol (READY=1, STOPPING=1, STATUS=...), a no-op outside systemd."""

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
