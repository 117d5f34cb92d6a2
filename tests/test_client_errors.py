"""client_error_text on real failed connections (no server is started: each address fails
in the kernel, before any packet leaves the machine)."""

from __future__ import annotations

import aiohttp
import pytest

from destfnd.client_errors import client_error_text


async def _error_of(session: aiohttp.ClientSession, url: str) -> str:
    with pytest.raises(aiohttp.ClientError) as info:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)):
            pass
    return client_error_text(info.value)


async def test_client_error_text_names_the_reason_behind_asyncios_text(session):
    # TCP to a multicast address: the kernel refuses with ENETUNREACH; a link-local IPv6
    # address without its interface: EINVAL. The reason comes from the errno (asyncio's own
    # text is "Connect call failed (...)" for some), worded as the other reasons are.
    assert await _error_of(session, "http://224.0.0.1:1/") == (
        "ClientConnectorError: cannot connect to 224.0.0.1:1: network is unreachable"
    )
    assert await _error_of(session, "http://[fe80::1]:1/") == (
        "ClientConnectorError: cannot connect to [fe80::1]:1: invalid argument"
    )


async def test_client_error_text_brackets_an_ipv6_host(session):
    text = await _error_of(session, "http://[::1]:1/")
    # Refused where the loopback has IPv6; some other reason where it has not.
    assert text.startswith("ClientConnectorError: cannot connect to [::1]:1: "), text
    assert "Connect call failed" not in text and "ssl:default" not in text, text


async def test_client_error_text_other_client_errors_keep_aiohttps_text(session):
    text = await _error_of(session, "http://127.0.0.1:1:2/")  # not a URL aiohttp can use
    assert text.startswith(("InvalidURL", "InvalidUrlClientError")), text
    assert "127.0.0.1:1:2" in text, text
