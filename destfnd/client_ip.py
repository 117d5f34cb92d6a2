"""The client's IP address for `context.ip`, as Segment's servers fill it for client-side events.

The address is the TCP peer's, unless the peer is a trusted proxy: then X-Forwarded-For is read
from the right (the proxy nearest destfnd appends last), skipping trusted proxies, and the
first address that is not one is the client. What a client wrote into the header itself sits
to the left of what its proxy appended, so it is never taken while an untrusted hop follows it.
(Proxies that add a header line of their own instead of appending to the client's are read
the same way: the lines are joined in order, as HTTP defines.)
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # IPv4 addresses as a dual-stack socket shows them


def parse_network(text: str) -> Network:
    """An address ("10.0.0.1") or a network ("10.0.0.0/8"); ValueError if neither, or if the
    network has host bits set ("10.0.0.5/8": which was meant?). IPv4 networks written mapped
    into IPv6 become IPv4 ones, as the peers they are matched against do."""
    network = ipaddress.ip_network(text.strip())
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None  # within ::ffff:0:0/96
        return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


class ClientIP:
    def __init__(self, trusted: Iterable[str]) -> None:
        self._trusted = tuple(parse_network(t) for t in trusted)
        # Peers repeat (keep-alive clients, one proxy): parse and match each distinct text once.
        self._is_trusted = functools.lru_cache(maxsize=1024)(self._match)

    def of(self, peer: str | None, forwarded_for: Iterable[str] = ()) -> str | None:
        """The client's address, given the socket's peer and the X-Forwarded-For header lines
        in order; None when there is no peer (not a TCP socket)."""
        if peer is None:
            return None
        client = _address(peer)
        if client is None:
            return None
        if not self._is_trusted(client):
            return _text(client)
        hops = [hop for line in forwarded_for for hop in line.split(",") if hop.strip()]
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                break  # not an address: the hops to its left cannot be told apart from it
            client = address
            if not self._is_trusted(address):
                break
        return _text(client)

    def _match(self, address: Address) -> bool:
        return any(address in network for network in self._trusted)


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> Address | None:
    """An IP address, with or without a port ("198.51.100.1:4711", "[2001:db8::1]:443"), an
    IPv4 one as such when mapped into IPv6 (a dual-stack socket shows IPv4 peers as
    ::ffff:a.b.c.d); None for anything else (a name, "unknown", an obfuscated node)."""
    text = text.strip()
    if text.startswith("["):  # [IPv6] or [IPv6]:port
        text, bracket, port = text[1:].partition("]")
        if not bracket or (port and not (port[0] == ":" and port[1:].isdigit())):
            return None
    elif text.count(":") == 1:  # IPv4:port (an IPv6 address has at least two colons)
        text, _, port = text.partition(":")
        if not port.isdigit():
            return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _text(address: Address) -> str:
    """The address as stored: without an IPv6 zone (fe80::1%eth0 is this host's interface
    name, meaningless to a destination)."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return str(address).partition("%")[0]
    return str(address)
