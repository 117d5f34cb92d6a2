"""A URL as the HTTP client sends it: as written, when it is encoded already. For the
webhook's `url` and a function's `fetch`; no I/O.
"""

from __future__ import annotations

import re

from yarl import URL

# A URL already in its encoded form (RFC 3986): its scheme and authority (brackets only
# there, around an IPv6 address), then a path and query of the characters they may hold as
# they are, a % only before two hex digits. No fragment: it is not sent.
_ENCODED_URL_RE = re.compile(
    r"https?://[A-Za-z0-9._~!$&'()*+,;=:@%\[\]-]+"
    r"(?P<path>/(?:[A-Za-z0-9._~!$&'()*+,;=:@/-]|%[0-9A-Fa-f]{2})*)?"
    r"(?:\?(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*)?",
    re.IGNORECASE,
)
_DOT_SEGMENT_RE = re.compile(r"/\.\.?(?:/|$)")


def as_written(url: str) -> URL | str:
    """What a request is sent to: the URL as written when it is encoded already, for a
    signed URL checks its exact bytes (yarl would decode a %2F or %3D in its query, where
    JavaScript's fetch keeps them); else as yarl makes it (a space or a letter not ASCII
    encoded, a `..` segment resolved, as JavaScript's fetch does too)."""
    match = _ENCODED_URL_RE.fullmatch(url)
    if match is None or _DOT_SEGMENT_RE.search(match["path"] or ""):
        return url
    try:
        written = URL(url, encoded=True)
        written.host, written.port  # noqa: B018 (read: a bad port raises here, not later)
    except ValueError:  # the HTTP client says what is wrong with it, as before
        return url
    return written
