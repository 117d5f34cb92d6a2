"""destfnd.client_ip: which address goes into context.ip, and whose X-Forwarded-For is believed."""

from __future__ import annotations

import pytest

from destfnd.client_ip import ClientIP, parse_network
from destfnd.spec import fill_ip

LOOPBACK = ClientIP(("127.0.0.1", "::1"))  # the default


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        # No proxy: the peer itself; a header from an untrusted peer is the client's own claim.
        ("203.0.113.7", [], "203.0.113.7"),
        ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
        # A proxy on this host: the address it appended.
        ("127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("::1", ["2001:db8::5"], "2001:db8::5"),
        ("127.0.0.1", [" 198.51.100.1 "], "198.51.100.1"),
        # The client sent its own header and the proxy appended the real address after it...
        ("127.0.0.1", ["10.9.9.9, 198.51.100.1"], "198.51.100.1"),
        # ... or added a line of its own after the client's (HAProxy): the same.
        ("127.0.0.1", ["6.6.6.6", "198.51.100.9"], "198.51.100.9"),
        # Every hop trusted: the leftmost.
        ("127.0.0.1", ["::1, 127.0.0.1"], "::1"),
        # Ports, brackets and empty entries, as some load balancers write them.
        ("127.0.0.1", ["198.51.100.1:4711"], "198.51.100.1"),
        ("127.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("127.0.0.1", ["[2001:db8::1]"], "2001:db8::1"),
        ("127.0.0.1", ["198.51.100.1, "], "198.51.100.1"),
        # A hop that is not an address stops the walk at the last good one.
        ("127.0.0.1", ["198.51.100.1, unknown"], "127.0.0.1"),
        ("127.0.0.1", ["198.51.100.1:http"], "127.0.0.1"),
        ("127.0.0.1", ["[2001:db8::1]x"], "127.0.0.1"),
        # Trusted peer, no header or an empty one: the peer.
        ("127.0.0.1", [], "127.0.0.1"),
        ("127.0.0.1", [""], "127.0.0.1"),
        # A dual-stack socket shows IPv4 peers mapped into IPv6.
        ("::ffff:203.0.113.7", [], "203.0.113.7"),
        ("::ffff:127.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        # An IPv6 zone names this host's interface: not stored.
        ("fe80::1%eth0", [], "fe80::1"),
        # No TCP peer (a Unix socket): nothing to fill.
        (None, ["198.51.100.1"], None),
    ],
)
def test_client_ip_default_trusts_this_host_only(peer, forwarded_for, client) -> None:
    assert LOOPBACK.of(peer, forwarded_for) == client


def test_client_ip_walks_past_trusted_networks_only() -> None:
    chain = ClientIP(("10.0.0.0/8",))
    # Two proxies of ours (10.x), then the client; the client's own claim to its left is ignored.
    header = ["192.0.2.66, 198.51.100.1, 10.1.2.3"]
    assert chain.of("10.0.0.2", header) == "198.51.100.1"
    # Loopback is no longer trusted once the list is given.
    assert chain.of("127.0.0.1", ["198.51.100.1"]) == "127.0.0.1"


def test_client_ip_trusted_networks_written_mapped_into_ipv6_match_ipv4_peers() -> None:
    mapped = ClientIP(("::ffff:10.0.0.0/104",))
    assert mapped.of("10.1.2.3", ["198.51.100.1"]) == "198.51.100.1"
    assert mapped.of("::ffff:10.1.2.3", ["198.51.100.1"]) == "198.51.100.1"
    assert mapped.of("11.0.0.1", ["198.51.100.1"]) == "11.0.0.1"


def test_parse_network_refuses_host_bits() -> None:
    with pytest.raises(ValueError, match="has host bits set"):
        parse_network("10.0.0.5/8")
    assert str(parse_network("10.0.0.5")) == "10.0.0.5/32"


def test_client_ip_no_trusted_proxies_ignores_the_header() -> None:
    assert ClientIP(()).of("127.0.0.1", ["198.51.100.1"]) == "127.0.0.1"


@pytest.mark.parametrize(
    ("event", "context"),
    [
        ({"type": "track"}, {"ip": "198.51.100.1"}),
        ({"context": None}, {"ip": "198.51.100.1"}),
        ({"context": {"locale": "de-DE"}}, {"locale": "de-DE", "ip": "198.51.100.1"}),
        ({"context": {"ip": None}}, {"ip": "198.51.100.1"}),
        ({"context": {"ip": ""}}, {"ip": "198.51.100.1"}),
        # Set by the client (Segment's opt-out is "0.0.0.0"): left alone.
        ({"context": {"ip": "0.0.0.0"}}, {"ip": "0.0.0.0"}),
        ({"context": {"ip": "24.5.68.47"}}, {"ip": "24.5.68.47"}),
    ],
)
def test_fill_ip_sets_context_ip_only_when_missing(event, context) -> None:
    fill_ip(event, "198.51.100.1")
    assert event["context"] == context
