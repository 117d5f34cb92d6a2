from __future__ import annotations

from urllib.parse import quote

import orjson
import pytest

from destfnd.redact import Redactor, redact_tree, redacted_json


def test_redact_replaces_every_secret_longest_first():
    redact = Redactor(["abc123", "xyz-long-secret", "xyz-long", "", "pw=p", "ab"])
    text = "token=abc123 again abc123 and Bearer xyz-long-secret, pw=p ab"
    assert redact(text) == "token=[redacted] again [redacted] and Bearer [redacted], [redacted] ab"
    assert redact("nothing here") == "nothing here"
    assert Redactor()("abc123") == "abc123"


def test_redact_settings_declared_secret_nested_values_too():
    redact = Redactor()
    settings = {"apiKey": "k-123456", "oauth": {"id": "client-1", "secret": "s-987654"},
                "plain": "visible-value"}  # fmt: skip
    redact.add_settings(["apiKey", "oauth", "missing"], settings)
    assert redact("k-123456 client-1 s-987654 visible-value") == (
        "[redacted] [redacted] [redacted] visible-value"
    )


def test_a_secret_is_redacted_where_json_escapes_it_too():
    """Recorded requests are JSON: a secret with a quote or a backslash (a JSON key file)
    appears escaped in a body that is JSON text, and was shown."""
    secret = 'tok"en\\with-quote'
    redact = Redactor([secret])
    request = {"request_headers": {"X-Token": secret},
               "request_body": orjson.dumps({"key": secret}).decode()}  # fmt: skip
    shown = orjson.dumps(redact_tree(redact, [request])).decode()
    assert "tok" not in shown
    assert redact_tree(redact, [request])[0]["request_headers"] == {"X-Token": "[redacted]"}
    assert redact(f"plain {secret}") == "plain [redacted]"


@pytest.mark.parametrize("secret", ['tok"en\\with-quote', "plain-secret-123"])
def test_redacted_json_hides_a_secret_in_a_body_that_is_itself_json(secret):
    redact = Redactor([secret])
    requests = [{"url": f"https://x.example/?key={quote(secret, safe='')}",
                 "request_headers": {"X-Token": secret},
                 "request_body": orjson.dumps({"key": secret}).decode()}]  # fmt: skip
    shown = redacted_json(redact, requests).decode()
    assert "tok" not in shown and "plain-secret" not in shown
    assert orjson.loads(shown)[0]["request_headers"] == {"X-Token": "[redacted]"}
    nothing = [{"url": "https://x.example/", "status": 200}]
    assert redacted_json(redact, nothing) == orjson.dumps(nothing)


@pytest.mark.parametrize("secret", ['pa"ss\\word9', "pässwörd123", "it's-a-secret", "tab\there"])
def test_a_secret_is_redacted_as_python_prints_it_and_as_json_dumps_escapes_it(secret):
    """`print(settings)`, `f"{settings}"` and `repr(key)` show a secret with a backslash or a
    quote escaped; Python's json.dumps escapes what is not ASCII: each was shown in clear (in
    the logs, the error, and a recorded request's JSON body)."""
    import json

    redact = Redactor([secret])
    settings = {"apiKey": secret}
    print_text = [repr(secret), str(settings), json.dumps(settings), ascii(secret)]
    for text in print_text:
        assert redact(text).count("[redacted]") == 1, (text, redact(text))
    request = {"request_body": json.dumps({"key": secret}), "logs": "\n".join(print_text)}
    shown = redacted_json(redact, [request]).decode()
    assert shown.count("[redacted]") == 1 + len(print_text), shown
    assert secret[:4] not in shown.replace("[redacted]", "")


def test_a_secret_is_redacted_however_a_url_encodes_it_and_without_its_whitespace():
    """AWS-style keys have "/" and "+": `quote(key)` keeps the "/", yarl decodes a "%2F" in
    a query back (aiohttp's errors and `redirected_to` show that form), a form body makes a
    space "+". A key file with an extra newline is stripped by many functions."""
    from urllib.parse import quote_plus

    key = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    redact = Redactor([key, "sk_live_FILEKEY_123\n\n", "pass word/é"])
    for form in (quote(key), quote(key, safe=""), quote(key).replace("%2B", "%2b"),
                 "wJalrXUtnFEMI/K7MDENG%2BbPxRfiCYEXAMPLEKEY", quote_plus("pass word/é"),
                 quote("pass word/é"), "sk_live_FILEKEY_123"):  # fmt: skip
        assert redact(f"?api_key={form}&v=1") == "?api_key=[redacted]&v=1", form
    # Only percent-encoding of what the secret holds: the same letters otherwise are kept.
    assert redact("wJalrXUtnFEMI%2FK7MDENG-bPxRfiCYEXAMPLEKEY") == (
        "wJalrXUtnFEMI%2FK7MDENG-bPxRfiCYEXAMPLEKEY"
    )


def test_an_encoded_secret_holding_another_secret_is_hidden_whole():
    redact = Redactor(["abcd1234", "abcd1234/xyz+tail"])
    assert redact("k=abcd1234%2Fxyz%2Btail&j=abcd1234") == "k=[redacted]&j=[redacted]"
    assert redact("k=abcd1234/xyz+tail") == "k=[redacted]"


def test_a_secret_holding_another_is_hidden_whole_also_where_text_has_a_percent():
    """A key file (JSON) holds its client_email, also a secret: in text with a "%" (which
    brings in the percent-encoded forms) the email was hidden first, and the rest of the key
    file, as JSON escapes it, was left in the clear."""
    import json

    keyfile = json.dumps({"type": "service_account", "client_email": "bot@proj.example.com",
                          "private_key_id": "PKID-0123456789"})  # fmt: skip
    redact = Redactor([keyfile, "bot@proj.example.com"])
    for tail in ("", " 100%", " a+b"):
        assert redact(json.dumps({"creds": keyfile}) + tail) == '{"creds": "[redacted]"}' + tail


def test_a_secret_with_a_byte_that_is_no_utf8_is_redacted():
    """An environment variable's bytes that are no UTF-8 come as lone surrogates: the
    redactor made of it must not fail (serve would not start)."""
    secret = "key-\udcff-secret"
    assert Redactor([secret])(f"x {secret} y") == "x [redacted] y"


def test_redacted_json_writes_lone_surrogates_as_escapes():
    """A recorded request holding a lone surrogate (a URL or header decoded from bytes that
    were not UTF-8) is stored, not lost: orjson refuses such a string."""
    value = [{"url": "http://h.test/caf\udce9", "headers": {"X-\ud83d": "key-secret-1"}}]
    data = redacted_json(Redactor(["key-secret-1"]), value)
    assert orjson.loads(data) == [
        {"url": "http://h.test/caf\\xe9", "headers": {"X-\\ud83d": "[redacted]"}}
    ]
