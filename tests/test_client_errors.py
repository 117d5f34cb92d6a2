"""client_error_text on real failed connections (no server is started: each address fails
in the kernel, before any packet leaves the machine). The reason expected is what a plain
socket gets for the same address, since that depends on the host's routes."""

from __future__ import annotations

import os
import socket

import aiohttp
import pytest

from destfnd.client_errors import client_error_text


async def _error_of(session: aiohttp.ClientSession, url: str) -> str:
    with pytest.raises(aiohttp.ClientError) as info:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)):
            pass
    return client_error_text(info.value)


def _reason(family: socket.AddressFamily, address: tuple) -> str:
    """Why a plain TCP connect to `address` fails here, in client_error_text's words."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        pytest.skip(f"no {family.name} sockets on this host")
    try:
        sock.settimeout(5)
        sock.connect(address)
    except OSError as exc:
        if not exc.errno:  # timed out: something on the way answers nothing
            pytest.skip(f"a connect to {address} does not fail at once on this host")
        return os.strerror(exc.errno).lower()
    finally:
        sock.close()
    pytest.skip(f"{address} accepts connections on this host")


async def test_client_error_text_names_the_reason_behind_asyncios_text(session):
    # TCP to a multicast address: refused by the kernel (ENETUNREACH on most hosts; EACCES
    # with a "prohibit" route); a link-local IPv6 address without its interface: EINVAL. The
    # reason comes from the errno, worded as the other reasons are (lower case), where
    # asyncio's own text can be "Connect call failed (...)".
    reason = _reason(socket.AF_INET, ("224.0.0.1", 1))
    assert reason != "connection refused"  # the errno branch, not the refused one
    assert await _error_of(session, "http://224.0.0.1:1/") == (
        f"ClientConnectorError: cannot connect to 224.0.0.1:1: {reason}"
    )
    reason = _reason(socket.AF_INET6, ("fe80::1", 1, 0, 0))
    assert await _error_of(session, "http://[fe80::1]:1/") == (
        f"ClientConnectorError: cannot connect to [fe80::1]:1: {reason}"
    )


async def test_client_error_text_brackets_an_ipv6_host(session):
    reason = _reason(socket.AF_INET6, ("::1", 1, 0, 0))
    assert await _error_of(session, "http://[::1]:1/") == (
        f"ClientConnectorError: cannot connect to [::1]:1: {reason}"
    )


async def test_client_error_text_other_client_errors_keep_aiohttps_text(session):
    text = await _error_of(session, "http://127.0.0.1:1:2/")  # not a URL aiohttp can use
    assert text.startswith(("InvalidURL", "InvalidUrlClientError")), text
    assert "127.0.0.1:1:2" in text, text
