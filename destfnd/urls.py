"""A URL as the HTTP client sends it: as written, when it is encoded already. For the
webhook's `url` and a function's `fetch`; no I/O.
"""

from __future__ import annotations

import re

from yarl import URL

# A URL already in its encoded form: only characters a URL may hold as they are (RFC 3986),
# and a % only before two hex digits.
_ENCODED_URL_RE = re.compile(r"(?:[A-Za-z0-9._~:/?#\[\]@!$&'()*+,;=-]|%[0-9A-Fa-f]{2})+")


def as_written(url: str) -> URL | str:
    """What a request is sent to: the URL as written when it is encoded already, for a
    signed URL checks its exact bytes (yarl would decode a %2F or %3D in its query, where
    JavaScript's fetch keeps them); else as yarl encodes it (a space, a letter not ASCII)."""
    if _ENCODED_URL_RE.fullmatch(url):
        try:
            return URL(url, encoded=True)
        except ValueError:  # (checked by the config: not expected)
            pass
    return url
