"""The client's IP address for `context.ip`, as Segment's servers fill it for client-side events.

The address is the TCP peer's, unless the peer is a trusted proxy: then X-Forwarded-For is read
from the right (the proxy nearest destfnd appends last), skipping trusted proxies, and the
first address that is not one is the client. What a client wrote into the header itself sits
to the left of what its proxy appended, so it is never taken while an untrusted hop follows it.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    """An address ("10.0.0.1") or a network ("10.0.0.0/8"); ValueError if neither."""
    return ipaddress.ip_network(text.strip(), strict=False)


class ClientIP:
    def __init__(self, trusted: Iterable[str]) -> None:
        self._trusted = tuple(parse_network(t) for t in trusted)
        # Peers repeat (keep-alive clients, one proxy): parse and match each distinct text once.
        self._is_trusted = functools.lru_cache(maxsize=1024)(self._match)

    def of(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """The client's address, given the socket's peer and the X-Forwarded-For header; None
        when there is no peer (not a TCP socket)."""
        if peer is None:
            return None
        client = _address(peer)
        if client is None:
            return None
        if not forwarded_for or not self._is_trusted(client):
            return str(client)
        for hop in reversed(forwarded_for.split(",")):
            address = _address(hop)
            if address is None:
                break  # not an address: the hops to its left cannot be told apart from it
            client = address
            if not self._is_trusted(address):
                break
        return str(client)

    def _match(self, address: Address) -> bool:
        return any(address in network for network in self._trusted)


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> Address | None:
    """An IP address, an IPv4 one as such when it comes mapped into IPv6 (a dual-stack socket
    shows IPv4 peers as ::ffff:a.b.c.d); None for anything else (a port, a name, garbage)."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
