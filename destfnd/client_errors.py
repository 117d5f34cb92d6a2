"""Errors of aiohttp's client as lines for the Event Delivery view: used by the webhook
destination in the daemon and by `fetch` in the function workers (a module of its own, so the
daemon does not import `destfnd.functions`, which only workers and user code import)."""

from __future__ import annotations

import os
import socket

import aiohttp


def client_error_text(exc: aiohttp.ClientError) -> str:
    """aiohttp's error as one line for the Event Delivery view: its class, and for a connection
    that failed, the host and why in plain words. (aiohttp's own text adds "ssl:default" also
    to plain http URLs; its TLS errors are left as they are: they say which certificate.)"""
    if isinstance(exc, aiohttp.ClientConnectorError) and not isinstance(
        exc, aiohttp.ClientSSLError
    ):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError):
            why = "connection refused"
        elif isinstance(os_error, socket.gaierror):
            why = f"host name not resolved ({os_error.strerror})"
        elif os_error.errno:  # asyncio's own text ("Connect call failed") hides the reason
            why = os.strerror(os_error.errno).lower()
        else:
            why = os_error.strerror or str(os_error) or type(os_error).__name__
        host = f"[{exc.host}]" if ":" in exc.host else exc.host  # an IPv6 address
        return f"{type(exc).__name__}: cannot connect to {host}:{exc.port}: {why}"
    if type(exc) is aiohttp.ClientResponseError:
        # Raised by aiohttp's parser (never by a status: neither caller checks one), with a
        # made-up status 400 and llhttp's text over several lines, a caret under the bytes.
        return f"{type(exc).__name__}: the answer is not valid HTTP: {_one_line(exc.message)}"
    if isinstance(exc, aiohttp.TooManyRedirects):
        last = exc.history[-1].headers.get("Location", "") if exc.history else ""
        return (
            # `history` ends with the redirect refused: as many as the server sent.
            f"{type(exc).__name__}: {len(exc.history)} redirects (a loop?), the last to "
            f"{last or exc.request_info.real_url}"
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError) and not isinstance(exc.message, str):
        # aiohttp's text is the repr of the head it had parsed so far.
        code = getattr(exc.message, "code", None)
        status = f" (status {code})" if code is not None else ""
        return (
            f"{type(exc).__name__}: the server closed the connection before the end of its "
            f"answer's headers{status}"
        )
    return f"{type(exc).__name__}: {exc}"


def _one_line(message: object) -> str:
    """llhttp's error as one line: its lines joined, without the one that only points."""
    lines = (line.strip() for line in str(message).splitlines())
    return " ".join(line for line in lines if line.strip("^ "))
