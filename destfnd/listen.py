"""The listen address: why serve could not listen there, said the same way by serve and by
check-config, which tries the address as serve binds it and lets it go at once."""

from __future__ import annotations

import asyncio
import errno
import os
import socket

from destfnd.paths import AS_THIS_USER, permission_only

# Why a bind failed, for the errors users meet; appended to the system's own reason.
_HINTS = {
    errno.EADDRINUSE: "another process listens there now: a destfnd already running?",
    errno.EADDRNOTAVAIL: "no network interface of this machine has that address",
}
_LOW_PORT_HINT = "a port below 1024 needs root or CAP_NET_BIND_SERVICE"


def bind_error_text(host: str, port: int, exc: OSError) -> str:
    """`cannot listen on HOST:PORT: REASON (HINT)`, from what binding raised."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if isinstance(exc, socket.gaierror):
        return f"cannot listen on {where}: cannot resolve {host!r}: {exc.strerror or exc}"
    code = exc.errno
    if code is None and str(exc).startswith("could not bind on any address"):
        # Python 3.12.4+ and 3.13: asyncio skips an address that is on no interface here
        # (EADDRNOTAVAIL, taken for an address family the host lacks) and, when that was
        # every address, says only this, without the errno.
        code = errno.EADDRNOTAVAIL
    # asyncio's own strerror is "error while attempting to bind on address (...): reason"
    reason = os.strerror(code) if code else str(exc)
    hint = _HINTS.get(code or 0)
    if exc.errno == errno.EACCES and 0 < port < 1024:
        hint = _LOW_PORT_HINT
    return f"cannot listen on {where}: {reason}" + (f" ({hint})" if hint else "")


async def check_listen(host: str, port: int) -> tuple[list[str], list[str]]:
    """For check-config: the problems and the warnings of listening at `host:port`, found by
    binding it as serve does (every address the host resolves to) without listening, then
    closing. A port in use, or one refused for want of permission, is a warning: the
    daemon may be running, and serve may run as another user."""
    loop = asyncio.get_running_loop()
    try:
        server = await loop.create_server(asyncio.Protocol, host, port, start_serving=False)
    except OSError as exc:
        line = "server.listen: " + bind_error_text(host, port, exc)
        if isinstance(exc, socket.gaierror):
            temporary = exc.errno == socket.EAI_AGAIN  # the resolver is down, not the name
            return ([], [line]) if temporary else ([line], [])
        if exc.errno == errno.EADDRINUSE:
            return [], [line]
        if permission_only(exc.errno):
            return [], [line + AS_THIS_USER]
        return [line], []
    server.close()
    await server.wait_closed()
    return [], []
