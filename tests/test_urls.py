"""destfnd.urls.as_written: which URLs go as written, and which as the HTTP client makes them."""

from __future__ import annotations

import pytest
from yarl import URL

from destfnd.urls import as_written


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        # Encoded already: its bytes kept (yarl decodes %2F in a query: a signature broke).
        ("http://h/p%2Fq?sig=a%2Bb%2Fc%3D%3D&x=1", "/p%2Fq?sig=a%2Bb%2Fc%3D%3D&x=1"),
        ("http://[::1]:8080/a?b=c", "/a?b=c"),
        ("http://bob:p%40ss@h/x", "/x"),
        ("http://h?x=1", "/?x=1"),
        # Not: as the HTTP client makes them. Brackets belong to an IPv6 host alone (a
        # strict server refuses them in a query), a dot segment is resolved (as
        # JavaScript's fetch does), a space and a letter not ASCII are encoded.
        ("http://h/p?ids[]=1", "/p?ids%5B%5D=1"),
        ("http://h/a/../b/./c", "/b/c"),
        ("http://h/x y?q=é", "/x%20y?q=%C3%A9"),
    ],
)
def test_urls_sent_as_written_only_when_encoded_already(url: str, sent: str) -> None:
    target = as_written(url)
    assert (target if isinstance(target, URL) else URL(target)).raw_path_qs == sent


def test_urls_a_bad_port_is_left_to_the_http_client() -> None:
    """Its error ("not an http(s) URL" from fetch) is the one users got before: yarl's own,
    raised later from aiohttp's internals, was a traceback of destfnd's frames."""
    assert as_written("http://127.0.0.1:99999/x") == "http://127.0.0.1:99999/x"
