"""`destfnd run-function`, the editor's Run button, as a user runs it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from support import FIXTURES, Sink, process_running, run_cli

import destfnd

FUNCTION = """
from destfnd.functions import RetryError, ValidationError, fetch

SETTINGS = {"endpoint": {"type": "string", "required": True},
            "apiKey": {"type": "string", "secret": True}}

async def on_track(event, settings):
    print("sending", event["event"], "with", settings.get("apiKey"))
    res = await fetch(settings["endpoint"], method="POST", json=event)
    if res.status >= 500:
        raise RetryError(f"HTTP {res.status}")

async def on_identify(event, settings):
    raise ValidationError("identify needs traits.email")

async def on_batch(events, settings):
    print(f"batch of {len(events)}")
    return [None if e["type"] == "track" else ValidationError("tracks only") for e in events]
"""

INSERT = """
from destfnd.functions import DropEvent

def on_track(event, settings):
    if event["event"] == "Internal":
        raise DropEvent("internal event")
    event["properties"]["region"] = settings["region"]
    return event

def on_identify(event, settings):
    event["traits"].pop("email")
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "crm.py").write_text(FUNCTION)
    (tmp_path / "insert.py").write_text(INSERT)
    track = {"type": "track", "event": "Signed Up", "userId": "u1", "properties": {"plan": "pro"}}
    (tmp_path / "track.json").write_bytes(orjson.dumps(track))
    (tmp_path / "identify.json").write_text('{"type": "identify", "userId": "u1", '
                                            '"traits": {"email": "a@example.com"}}')  # fmt: skip
    return tmp_path


async def test_run_function_success_prints_outcome_logs_and_requests(files):
    import asyncio

    async with Sink() as sink:
        settings = orjson.dumps({"endpoint": sink.url, "apiKey": "key-9876"}).decode()
        result = await asyncio.to_thread(
            run_cli, "run-function", str(files / "crm.py"), "--event",
            str(files / "track.json"), "--settings", settings,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "outcome: delivered" in result.stdout
    assert "sending Signed Up with [redacted]" in result.stdout
    assert f"POST {sink.url} -> 200" in result.stdout
    assert "key-9876" not in result.stdout + result.stderr
    assert sink.delivered()[0]["properties"] == {"plan": "pro"}


def test_run_function_failure_exit_code_and_error_type(files):
    result = run_cli(
        "run-function", str(files / "crm.py"), "--event", str(files / "identify.json"),
        "--settings", '{"endpoint": "http://127.0.0.1:1/"}', "--json",
    )  # fmt: skip
    assert result.returncode == 1
    report = orjson.loads(result.stdout)
    (outcome,) = report["outcomes"]
    assert outcome["status"] == "discarded"
    assert outcome["error_type"] == "Message Rejected"
    assert outcome["message"] == "ValidationError: identify needs traits.email"


def test_run_function_workers_do_not_import_from_the_current_folder(tmp_path):
    """A worker's modules (uvloop, orjson, destfnd...) are the installed ones, never files of
    the folder the command runs in, which `python -m` puts first: a `uvloop.py` there ran in
    the worker as whoever ran run-function or check-config (root, say, in /tmp)."""
    script = Path(sys.executable).with_name("destfnd")
    if not script.exists():
        pytest.skip("no destfnd console script beside this Python (not a pip install)")
    here = tmp_path / "here"
    here.mkdir()
    marker = tmp_path / "planted-module-ran"
    (here / "uvloop.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise ImportError('planted')\n"
    )
    (tmp_path / "fn.py").write_text("def on_track(event, settings):\n    print('ran')\n")
    result = subprocess.run(
        [str(script), "run-function", str(tmp_path / "fn.py"), "--event", "-"],
        input='{"type": "track", "event": "e", "userId": "u"}', capture_output=True,
        text=True, timeout=60, cwd=here,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "outcome: delivered" in result.stdout
    assert not marker.exists()


def test_run_function_from_a_source_checkout_runs_its_destfnd_in_the_worker(tmp_path):
    """`python -m destfnd` run in a source tree takes destfnd from there: its workers, which
    do not get the current folder on sys.path (-P), are given that folder, so they run the
    same destfnd (not an installed one, nor none at all)."""
    checkout = tmp_path / "checkout"
    shutil.copytree(Path(destfnd.__file__).parent, checkout / "destfnd",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (tmp_path / "fn.py").write_text(
        "import destfnd\ndef on_track(event, settings):\n    print(destfnd.__file__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-m", "destfnd", "run-function", str(tmp_path / "fn.py"), "--event",
         "-"], input='{"type": "track", "event": "e", "userId": "u"}', capture_output=True,
        text=True, timeout=60, cwd=checkout, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{checkout}/destfnd/__init__.py" in result.stdout, result.stdout


def test_run_function_in_a_folder_deleted_meanwhile(tmp_path):
    """A command (or serve) whose current folder was deleted (a shell left in a removed temp
    folder, an old release's folder) still starts its workers: finding out whether destfnd
    came from there failed on it (FileNotFoundError at every worker start)."""
    script = Path(sys.executable).with_name("destfnd")
    if not script.exists():
        pytest.skip("no destfnd console script beside this Python (not a pip install)")
    (tmp_path / "fn.py").write_text("def on_track(event, settings):\n    print('ran')\n")
    gone = tmp_path / "gone"
    gone.mkdir()
    result = subprocess.run(
        ["sh", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "$0" "$@"', str(script),
         "run-function", str(tmp_path / "fn.py"), "--event", "-"],
        input='{"type": "track", "event": "e", "userId": "u"}', capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "outcome: delivered" in result.stdout and "ran" in result.stdout
    # --settings, whose {"file": ...} values are found from there: said so (it was "cannot
    # write the output").
    gone.mkdir()
    result = subprocess.run(
        ["sh", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "$0" "$@"', str(script),
         "run-function", str(tmp_path / "fn.py"), "--event", "-", "--settings", '{"a": 1}'],
        input='{"type": "track", "event": "e", "userId": "u"}', capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr == (
        "destfnd: --settings: the current folder cannot be found (No such file or directory):"
        " it was deleted? cd to one that exists\n"
    )


def test_run_function_retryable_failure_from_fetch(files):
    result = run_cli(
        "run-function", str(files / "crm.py"), "--event", str(files / "track.json"),
        "--settings", '{"endpoint": "http://127.0.0.1:1/"}',
    )  # fmt: skip
    assert result.returncode == 1
    assert "outcome: retrying (Retry): FetchError" in result.stdout
    assert "cannot connect to 127.0.0.1:1: connection refused" in result.stdout
    assert "ssl:default" not in result.stdout  # aiohttp's words, which misled for plain http


def test_run_function_shows_the_wait_a_retry_asks_for(tmp_path):
    """serve honours retry_after_s, and expires a delivery whose wait would pass max_age:
    run-function, which has no config, shows the wait and says when the default would."""
    (tmp_path / "f.py").write_text(
        "from destfnd.functions import RetryError\n\n"
        "def on_track(event, settings):\n"
        "    raise RetryError('busy', retry_after_s=event['properties']['after'])\n"
    )
    cases = [
        (42.5, "(asks to wait 42.5s)", None),
        (-0.0, "(asks to wait 0s)", None),
        (14399.6, "(asks to wait 4h: past the default max_age of 4h, serve would expire", None),
        (5400, "(asks to wait 1h 30m)", None),
        (14400, "(asks to wait 4h: past the default max_age of 4h, serve would expire", None),
        (99999, "(asks to wait 1d 3h 46m 39s: past the default max_age of 4h, serve", 99999),
        ("Wed, 21 Oct 2099 07:28:00 GMT", "(asks to wait years: past the default max_age", None),
    ]
    for after, shown, in_json in cases:
        event = {"type": "track", "userId": "u", "event": "e", "properties": {"after": after}}
        (tmp_path / "ev.json").write_bytes(orjson.dumps(event))
        result = run_cli(
            "run-function", str(tmp_path / "f.py"), "--event", str(tmp_path / "ev.json")
        )
        assert result.returncode == 1, result.stderr
        assert result.stdout.startswith(f"outcome: retrying (Retry): RetryError: busy {shown}"), (
            result.stdout
        )
        if in_json is not None:
            as_json = run_cli(
                "run-function",
                str(tmp_path / "f.py"),
                "--event",
                str(tmp_path / "ev.json"),
                "--json",
            )
            assert orjson.loads(as_json.stdout)["outcomes"][0]["retry_after_s"] == in_json


def test_run_function_array_runs_on_batch_with_per_event_outcomes(files):
    batch = FIXTURES / "functions" / "onBatch-events-example.json"
    result = run_cli(
        "run-function", str(files / "crm.py"), "--event", str(batch),
        "--settings", '{"endpoint": "http://127.0.0.1:1/"}', "--json",
    )  # fmt: skip
    assert result.returncode == 1  # the identify is rejected
    report = orjson.loads(result.stdout)
    assert [o["status"] for o in report["outcomes"]] == ["discarded", "delivered", "delivered"]
    assert report["logs"] == "batch of 3\n"


def test_run_function_on_batch_takes_segments_status_per_event(files, tmp_path):
    """Segment's documented partial failure, `[{"status": 200}, {"status": 400,
    "errormessage": "Bad Request"}, ...]`: a 2xx delivered, a 5xx, 408 or 429 retried, other
    statuses discarded. A straight port had every event of the batch discarded."""
    (files / "statuses.py").write_text(
        "def on_batch(events, settings):\n"
        "    return [{'status': 200}, {'status': 400, 'errormessage': 'Bad Request'},\n"
        "            {'status': 500, 'errormessage': 'Error processing request'},\n"
        "            {'status': 429}, {'status': 204.0, 'sent': 1}, {'status': 'ok'}]\n"
    )
    event = {"type": "track", "event": "E", "userId": "u"}
    (tmp_path / "six.json").write_bytes(orjson.dumps([event] * 6))
    result = run_cli("run-function", str(files / "statuses.py"), "--event",
                     str(tmp_path / "six.json"), "--json")  # fmt: skip
    outcomes = orjson.loads(result.stdout)["outcomes"]
    assert [(o["status"], o["error_type"], o["message"]) for o in outcomes[:5]] == [
        ("delivered", None, None),
        ("discarded", "Bad Request", "HTTP 400: Bad Request"),
        ("retrying", "Retry", "HTTP 500: Error processing request"),
        ("retrying", "Retry", "HTTP 429"),
        ("delivered", None, None),
    ]
    assert outcomes[5]["status"] == "discarded"
    assert outcomes[5]["message"] == (
        "on_batch outcome [5] is {'status': 'ok'}: use None, 'ok', an error or "
        '{"status": 500, "errormessage": "..."}'
    )


def test_run_function_an_insert_functions_error_says_it_is_the_insert_functions(files):
    """In front of a function, "Unsupported Event Type: EventNotSupported: internal" could
    have come from either: the insert function's errors name it and their handler."""
    (files / "gate.py").write_text(
        "from destfnd.functions import DropEvent, EventNotSupported\n\n"
        "def on_track(event, settings):\n"
        "    if event['event'] == 'Internal Ping':\n"
        "        raise EventNotSupported('internal')\n"
        "    raise DropEvent('not wanted')\n"
    )
    for name, status, message in (
        ("Internal Ping", "discarded",
         "the insert function's on_track: EventNotSupported: internal"),
        ("Other", "dropped", "not wanted"),  # a drop is the insert function's by nature
    ):  # fmt: skip
        event = files / "ev.json"
        event.write_bytes(orjson.dumps({"type": "track", "event": name, "userId": "u"}))
        result = run_cli("run-function", str(files / "gate.py"), "--insert", "--event",
                         str(event), "--json")  # fmt: skip
        (outcome,) = orjson.loads(result.stdout)["outcomes"]
        assert (outcome["status"], outcome["message"]) == (status, message), outcome


def test_run_function_insert_prints_the_resulting_event(files):
    result = run_cli(
        "run-function", str(files / "insert.py"), "--insert", "--event",
        str(files / "track.json"), "--settings", '{"region": "eu"}', "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["events"][0]["properties"] == {"plan": "pro", "region": "eu"}
    human = run_cli("run-function", str(files / "insert.py"), "--insert", "--event",
                    str(files / "track.json"), "--settings", '{"region": "eu"}')  # fmt: skip
    assert "outcome: passed on" in human.stdout and '"region": "eu"' in human.stdout


def test_run_function_an_insert_functions_new_event_keeps_the_messageid(files):
    """One built anew went on without a messageId, which receivers dedupe on."""
    (files / "anew.py").write_text(
        "def on_track(event, settings):\n"
        "    return {'type': 'identify', 'userId': event['userId'], 'traits': {}}\n"
        "\n"
        "def on_batch(events, settings):  # (changing the events it was given first)\n"
        "    for event in events:\n"
        "        event.pop('messageId')\n"
        "    return [{'type': 'identify', 'userId': e['userId']} for e in events]\n"
    )
    (files / "sent.json").write_text(
        '{"type": "track", "event": "E", "userId": "u1", "messageId": "m-1"}'
    )
    result = run_cli("run-function", str(files / "anew.py"), "--insert", "--event",
                     str(files / "sent.json"), "--json")  # fmt: skip
    (event,) = orjson.loads(result.stdout)["events"]
    assert event == {"type": "identify", "userId": "u1", "traits": {}, "messageId": "m-1"}
    (files / "two.json").write_text(
        '[{"type": "track", "event": "E", "userId": "u1", "messageId": "m-1"},'
        ' {"type": "track", "event": "E", "userId": "u2", "messageId": "m-2"}]'
    )
    result = run_cli("run-function", str(files / "anew.py"), "--insert", "--event",
                     str(files / "two.json"), "--json")  # fmt: skip
    assert [e["messageId"] for e in orjson.loads(result.stdout)["events"]] == ["m-1", "m-2"]


def test_run_function_insert_drop_and_forgotten_return(files, tmp_path):
    (tmp_path / "internal.json").write_text(
        '{"type": "track", "event": "Internal", "userId": "u", "properties": {}}'
    )
    dropped = run_cli("run-function", str(files / "insert.py"), "--insert",
                      "--event", str(tmp_path / "internal.json"))  # fmt: skip
    assert dropped.returncode == 0
    assert "outcome: dropped: internal event" in dropped.stdout
    forgot = run_cli("run-function", str(files / "insert.py"), "--insert",
                     "--event", str(files / "identify.json"))  # fmt: skip
    assert forgot.returncode == 1
    assert "returned nothing (None), not an event" in forgot.stdout


def test_run_function_reads_the_event_from_stdin(files):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "destfnd", "run-function", str(files / "crm.py"), "--event", "-",
         "--settings", '{"endpoint": "http://127.0.0.1:1/"}'],
        input=(files / "identify.json").read_text(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Message Rejected" in result.stdout


@pytest.mark.parametrize(
    ("code", "phrase"),
    [
        ("def on_track(event, settings):\n    return (\n", "broken.py:2: SyntaxError"),
        ("import not_installed_pkg\n", "broken.py:1: ModuleNotFoundError"),
        ("raise RuntimeError('at import')\n", "broken.py:1: RuntimeError: at import"),
        ("X = 1\n", "defines no handler"),
    ],
)
def test_run_function_broken_files_give_one_line(files, code, phrase):
    (files / "broken.py").write_text(code)
    result = run_cli("run-function", str(files / "broken.py"), "--event",
                     str(files / "track.json"))  # fmt: skip
    assert result.returncode == 3
    assert phrase in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["missing.py", "--event", "track.json"], "missing.py: file not found"),
        (["missing.py"], "missing.py: file not found"),  # before the event from stdin
        (["crm.py", "--event", "nope.json"], "nope.json: cannot read the event"),
        (["crm.py", "--event", "crm.py"], "not JSON"),
        (["crm.py", "--event", "track.json", "--settings", "{bad"], "--settings: not JSON"),
        # Segment's Tracking API bodies: a batch's array is what runs; a typo is no type.
        (["crm.py", "--event", "batch.json"], 'a /v1/batch body: give its "batch" array'),
        (["crm.py", "--event", "trak.json"], "type 'trak' is none of Segment's (track, "),
    ],
)
def test_run_function_bad_input_is_one_clear_line(files, args, phrase):
    (files / "batch.json").write_bytes((FIXTURES / "http-api" / "v1-batch.json").read_bytes())
    (files / "trak.json").write_text('{"type": "trak", "event": "E", "userId": "u"}')
    import os

    result = run_cli("run-function", *[str(files / a) if a.endswith((".py", ".json"))
                                       else a for a in args],
                     env={**os.environ})  # fmt: skip
    assert result.returncode == 3, result
    assert phrase in result.stderr
    assert "Traceback" not in result.stderr


HEADERS_FUNCTION = """
from destfnd.functions import fetch

async def on_track(event, settings):
    res = await fetch(settings["endpoint"], method="POST", json=event)
    print("Retry-After:", res.headers.get("Retry-After"), "/", res.headers["RETRY-AFTER"])
"""


async def test_run_function_fetch_response_headers_are_looked_up_in_any_case(files):
    """Servers send header names in any case; `res.headers.get("Retry-After")` (the README's
    example) must find `retry-after`."""
    import asyncio

    from support import Reply

    (files / "headers.py").write_text(HEADERS_FUNCTION)
    async with Sink(lambda n, r: Reply(200, headers={"retry-after": "7"})) as sink:
        settings = orjson.dumps({"endpoint": sink.url}).decode()
        result = await asyncio.to_thread(
            run_cli, "run-function", str(files / "headers.py"), "--event",
            str(files / "track.json"), "--settings", settings,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Retry-After: 7 / 7" in result.stdout


async def test_run_function_fetch_sends_an_encoded_url_as_written(files):
    """A signed URL is checked against its exact bytes, which JavaScript's fetch keeps: the
    %2F and %3D of its query were decoded on the way."""
    import asyncio

    (files / "post.py").write_text(
        "from destfnd.functions import fetch\n\nasync def on_track(event, settings):\n"
        '    await fetch(settings["endpoint"], method="POST", json=event)\n'
    )
    async with Sink() as sink:
        signed = "/p%2Fq?sig=a%2Bb%2Fc%3D%3D&x=1"
        settings = orjson.dumps({"endpoint": sink.url + signed}).decode()
        result = await asyncio.to_thread(
            run_cli, "run-function", str(files / "post.py"), "--event",
            str(files / "track.json"), "--settings", settings,
        )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r.raw_path for r in sink.requests] == ["/in" + signed]


def test_run_function_timeout_keeps_what_the_function_printed(files):
    (files / "slow.py").write_text(
        "import asyncio\n\nasync def on_track(event, settings):\n"
        "    print('started', event['event'])\n    await asyncio.sleep(30)\n"
    )
    result = run_cli(
        "run-function", str(files / "slow.py"), "--event", str(files / "track.json"),
        "--timeout", "0.5", "--json",
    )  # fmt: skip
    report = orjson.loads(result.stdout)
    assert report["outcomes"][0]["error_type"] == "Timeout", report
    assert report["logs"] == "started Signed Up\n"


def test_run_function_ctrl_c_exits_130_quietly_and_ends_the_worker(files):
    started = files / "started"
    (files / "slow.py").write_text(
        "import asyncio, os, pathlib\n\nasync def on_track(event, settings):\n"
        f"    pathlib.Path({str(started)!r}).write_text(str(os.getpid()))\n"
        "    await asyncio.sleep(60)\n"
    )
    # As from a terminal: SIGINT not ignored. A test run started as a background job (`cmd &`
    # in a script, nohup) has it ignored, and a command inherits that: Ctrl-C does nothing.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "destfnd", "run-function", str(files / "slow.py"),
             "--event", str(files / "track.json"), "--timeout", "60"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        deadline = time.monotonic() + 30
        while not started.exists() or not started.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        worker = int(started.read_text())
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err and out == ""
    deadline = time.monotonic() + 10
    while process_running(worker):  # the worker goes with the command
        assert time.monotonic() < deadline, f"worker {worker} outlived run-function"
        time.sleep(0.05)


def test_run_function_invalid_settings_is_the_outcome_and_nothing_runs(files):
    """As Segment's editor: settings that do not satisfy SETTINGS end as Invalid Settings,
    discarded, and the handler does not run (no print, no request)."""
    result = run_cli("run-function", str(files / "crm.py"), "--event", str(files / "track.json"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "outcome: discarded (Invalid Settings): --settings.endpoint: required by SETTINGS" in (
        result.stdout
    )
    assert "logs: (none)" in result.stdout and "requests: (none)" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


INSERT_BATCH = """
from destfnd.functions import DropEvent, ValidationError

def on_batch(events, settings):
    if len(events) == 1:
        return []  # the wrong length: an error the user sees
    out = []
    for event in events:
        name = event.get("event")
        if name == "Internal":
            out.append(DropEvent("internal"))
        elif name == "Bad":
            out.append(ValidationError("bad event"))
        elif name == "Junk":
            out.append({"oops": 1})
        else:
            event["properties"] = {"region": settings["region"]}
            out.append(event)
    return out
"""


def test_run_function_insert_on_batch_answers_per_event_in_order(files):
    """An insert function's on_batch returns one item per event, in order: the event to pass
    on, or an error (DropEvent drops it); anything else is that event's Bad Request."""
    (files / "insert_batch.py").write_text(INSERT_BATCH)
    names = ["Signed Up", "Internal", "Bad", "Junk"]
    batch = [{"type": "track", "event": n, "userId": "u1"} for n in names]
    (files / "batch.json").write_bytes(orjson.dumps(batch))
    result = run_cli(
        "run-function", str(files / "insert_batch.py"), "--insert", "--event",
        str(files / "batch.json"), "--settings", '{"region": "eu"}', "--json",
    )  # fmt: skip
    report = orjson.loads(result.stdout)
    got = [(o["status"], o["error_type"]) for o in report["outcomes"]]
    assert got == [("delivered", None), ("dropped", None), ("discarded", "Message Rejected"),
                   ("discarded", "Bad Request")], report  # fmt: skip
    assert report["events"][0]["properties"] == {"region": "eu"}
    assert report["events"][1:] == [None, None, None]
    assert "item [3] is a dict whose type is None, not an event" in report["outcomes"][3]["message"]
    (files / "one.json").write_bytes(orjson.dumps(batch[:1]))
    wrong = run_cli("run-function", str(files / "insert_batch.py"), "--insert", "--event",
                    str(files / "one.json"), "--settings", '{"region": "eu"}')  # fmt: skip
    assert wrong.returncode == 1
    assert "on_batch returned a list of 0: return a list of 1" in wrong.stdout


def test_run_function_json_stays_json_when_the_function_writes_to_its_stdout(files):
    (files / "stray.py").write_text(
        "import os\n\nasync def on_track(event, settings):\n"
        "    os.write(1, b'raw on fd 1\\n')\n    print('printed')\n"
    )
    result = run_cli("run-function", str(files / "stray.py"), "--event",
                     str(files / "track.json"), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)  # all of stdout is the JSON
    assert report["logs"] == "printed\n"
    assert "raw on fd 1" in result.stderr  # the stray line is shown, on stderr


@pytest.mark.parametrize(
    ("timeout", "ok"),
    [("0", False), ("-1", False), ("nan", False), ("inf", False), ("5x", False),
     ("2.5", True), ("500ms", True), ("1m", True)],
)  # fmt: skip
def test_run_function_timeout_is_seconds_or_a_duration_above_zero(files, timeout, ok):
    settings = '{"endpoint": "http://127.0.0.1:9/"}'
    result = run_cli("run-function", str(files / "crm.py"), "--event",
                     str(files / "identify.json"), "--settings", settings,
                     "--timeout", timeout)  # fmt: skip
    if ok:
        assert "Message Rejected" in result.stdout, result.stderr
    else:
        assert result.returncode == 2
        assert "--timeout: must be a number of seconds above 0" in result.stderr


async def test_run_function_says_what_ingest_would_refuse_and_how_many_requests_were_made(files):
    import asyncio

    (files / "chatty.py").write_text(
        "from destfnd.functions import fetch\n\nasync def on_track(event, settings):\n"
        "    for _ in range(55):\n        await fetch(settings['sink'], method='POST', json={})\n"
    )
    (files / "no_event.json").write_text('{"type": "track", "userId": "u1"}')
    async with Sink() as sink:
        result = await asyncio.to_thread(
            run_cli, "run-function", str(files / "chatty.py"), "--event",
            str(files / "no_event.json"), "--settings", orjson.dumps({"sink": sink.url}).decode(),
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(sink.requests) == 55
    assert "requests: 55, the first 50 recorded" in result.stdout
    assert "warning: ingest would refuse this event: event: required" in result.stderr


def test_run_function_warns_of_an_event_too_large_for_ingest(files):
    """Ingest answers 413 to an event over 32 KB with destfnd's fields; run-function passed it
    on without a word. Each event of a batch is measured on its own."""
    (files / "ok.py").write_text("def on_track(event, settings):\n    pass\n")
    big = {"type": "track", "event": "e", "userId": "u", "properties": {"x": "a" * 33_500}}
    fits = {"type": "track", "event": "e", "userId": "u", "properties": {"x": "a" * 32_000}}
    (files / "events.json").write_bytes(orjson.dumps([fits, big]))
    result = run_cli("run-function", str(files / "ok.py"), "--event", str(files / "events.json"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "event [1] is 33" in warnings[0] and "at most 32768 + 512" in warnings[0], warnings
    assert "[1] outcome: delivered" in result.stdout


def test_run_function_an_insert_result_that_is_not_json_is_a_bad_request(files):
    """It was left unanswered (the reply could not be encoded) and ended as a timeout."""
    (files / "odd_insert.py").write_text(
        "def on_track(event, settings):\n    event['properties']['tags'] = {'a', 'b'}\n"
        "    print('\\x1b[31mred\\x1b[0m')\n    return event\n"
    )
    result = run_cli("run-function", str(files / "odd_insert.py"), "--insert", "--event",
                     str(files / "track.json"), "--timeout", "20")  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "outcome: discarded (Bad Request): the insert function's result is not JSON" in (
        result.stdout
    )
    assert "\x1b" not in result.stdout and "\\x1b[31mred" in result.stdout  # escaped


def test_run_function_an_insert_result_as_deep_as_ingest_takes_passes_on(files):
    """An event ingest accepts (orjson writes 254 levels) sat two levels deeper in the
    worker's reply: every event of the call failed as Retry, until they expired. Each event
    is now written on its own: it passes on, as do the others of its batch."""
    inner: object = 1
    for _ in range(252):
        inner = {"a": inner}
    deep = {"type": "track", "event": "Deep", "userId": "u", "properties": inner}
    orjson.dumps(deep)  # ingest takes it
    plain = {"type": "track", "event": "Plain", "userId": "u"}
    (files / "batch.json").write_text(orjson.dumps([plain, deep, plain]).decode())
    (files / "keep.py").write_text("def on_track(event, settings):\n    return event\n")
    result = run_cli("run-function", str(files / "keep.py"), "--insert", "--event",
                     str(files / "batch.json"), "--timeout", "20")  # fmt: skip
    out = result.stdout
    assert result.returncode == 0, (result.stderr, out[:3000])
    assert out.count("outcome: passed on") == 3, out[:3000]
    assert '"event": "Deep"' in out


def test_run_function_an_insert_result_over_a_megabyte_fails_alone(files):
    """An insert function's result had no size limit: one of 30 MB went on to the daemon and
    downstream. Over 1 MB as JSON, that event alone is a Bad Request."""
    plain = {"type": "track", "event": "Plain", "userId": "u"}
    (files / "two.json").write_text(orjson.dumps([plain, {**plain, "event": "Big"}]).decode())
    (files / "grow.py").write_text(
        "def on_track(event, settings):\n"
        "    if event['event'] == 'Big':\n"
        "        event['properties'] = {'blob': 'x' * 1_100_000}\n"
        "    return event\n"
    )
    result = run_cli("run-function", str(files / "grow.py"), "--insert", "--event",
                     str(files / "two.json"), "--timeout", "20")  # fmt: skip
    out = result.stdout
    assert "[1] outcome: discarded (Bad Request): the insert function's result is 1,1" in out
    assert "bytes as JSON; at most 1,048,576" in out
    assert "[0] outcome: passed on" in out


def test_run_function_an_event_nested_too_deep_is_one_clear_line(files):
    deep = '{"type": "track", "event": "e", "userId": "u", "p": ' + '{"a": ' * 300 + "1"
    (files / "deep.json").write_text(deep + "}" * 301)
    result = run_cli("run-function", str(files / "crm.py"), "--event", str(files / "deep.json"))
    assert result.returncode == 3
    assert result.stderr.strip() == "destfnd: the event is nested more than 254 levels deep"


MISHAPS = """
import asyncio, logging, sys
from destfnd.functions import fetch

def on_track(event, settings):  # a plain def: on a thread, with a loop of its own
    asyncio.run(fetch(settings["sink"], method="POST", json={"from": "thread"}))

async def on_identify(event, settings):
    await asyncio.sleep(0.5)  # after the thread's loop has closed
    logging.getLogger("crm").warning("two %s %s", "one")  # a bad format: reported, not raised
    try:
        sys.stdout.write(b"bytes")
    except TypeError as exc:
        print("refused:", exc)
    await fetch(settings["sink"], method="POST", json={"from": "loop"})

async def on_page(event, settings):
    await fetch("ftp://example.com/file")
"""


async def test_run_function_fetch_on_any_loop_and_mishaps_that_real_python_forgives(files):
    """A plain def's asyncio.run(fetch()) tied the worker's shared session to a loop that
    then closed: every later fetch failed ("Event loop is closed"). Writing bytes to stdout
    hung the call; a logging format mistake raised into the handler; a URL that is no
    http(s) one was retried for hours."""
    import asyncio

    (files / "mishaps.py").write_text(MISHAPS)
    events = [{"type": "track", "event": "e", "userId": "u"}, {"type": "identify", "userId": "u"},
              {"type": "page", "userId": "u"}]  # fmt: skip
    (files / "three.json").write_bytes(orjson.dumps(events))
    async with Sink() as sink:
        result = await asyncio.to_thread(
            run_cli, "run-function", str(files / "mishaps.py"), "--event",
            str(files / "three.json"), "--settings", orjson.dumps({"sink": sink.url}).decode(),
            "--json", "--timeout", "20",
        )  # fmt: skip
    report = orjson.loads(result.stdout)
    outcomes = [(o["status"], o["error_type"]) for o in report["outcomes"]]
    assert outcomes == [("delivered", None), ("delivered", None), ("discarded", "Bad Request")]
    assert "not an http(s) URL" in report["outcomes"][2]["message"]
    assert sorted(orjson.loads(r.body)["from"] for r in sink.requests) == ["loop", "thread"]
    assert "refused: write() argument must be str, not bytes" in report["logs"]
    assert "--- Logging error ---" in report["logs"]


FETCH_ARGS = """
from destfnd.functions import fetch

async def on_track(event, settings):
    res = await fetch(settings["sink"] + "/moved", method="POST",
                      headers={"X-Count": 5, "X-None": None}, body="plain", timeout="5s")
    await fetch(settings["sink"] + "/landed", timeout="2.5")  # its text, from settings, say
    print("status", res.status, res.redirected, res.url == settings["sink"] + "/landed")
    # Content-Type as JavaScript's fetch sets it for a string body; one given in any case is
    # the only one sent.
    plain = await fetch(settings["sink"] + "/type", method="POST", body="plain")
    own = await fetch(settings["sink"] + "/type", method="POST", json=[1],
                      headers={"content-type": "application/vnd.x+json"})
    print("types", await plain.text(), "|", await own.text(), "|", own.redirected)

async def on_identify(event, settings):
    await fetch(settings["sink"], body={"an": "object"})

async def on_page(event, settings):
    await fetch(settings["sink"], timeout="soon")

async def on_group(event, settings):  # headers as pairs, a value as bytes
    await fetch(settings["sink"] + "/ftp", headers=[("X-Raw", b"caf\\xe9")])

async def on_alias(event, settings):
    await fetch(settings["sink"] + "/loop")
"""


async def test_run_function_fetch_arguments_and_redirects(files):
    import asyncio

    from aiohttp import web

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/landed")

    async def landed(request: web.Request) -> web.Response:
        count, none = request.headers.get("X-Count"), request.headers.get("X-None", "-")
        kind = request.headers.get("Content-Type", "-")
        return web.Response(text=f"{request.method} {count} {none} {kind}")

    app = web.Application()
    app.router.add_post("/moved", moved)
    app.router.add_get("/landed", landed)

    async def to_ftp(request: web.Request) -> web.Response:  # a server's bad redirect
        assert request.headers["X-Raw"] == "café"
        raise web.HTTPFound("ftp://example.com/file")

    app.router.add_get("/ftp", to_ftp)

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    app.router.add_get("/loop", loop)

    async def content_type(request: web.Request) -> web.Response:
        return web.Response(text=",".join(request.headers.getall("Content-Type")))

    app.router.add_post("/type", content_type)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    (files / "args.py").write_text(FETCH_ARGS)
    events = [{"type": "track", "event": "e", "userId": "u"}, {"type": "identify", "userId": "u"},
              {"type": "page", "userId": "u"},
              {"type": "group", "userId": "u", "groupId": "g"},
              {"type": "alias", "userId": "u", "previousId": "p"}]  # fmt: skip
    (files / "three.json").write_bytes(orjson.dumps(events))
    try:
        result = await asyncio.to_thread(
            run_cli, "run-function", str(files / "args.py"), "--event", str(files / "three.json"),
            "--settings", orjson.dumps({"sink": url}).decode(), "--json",
        )  # fmt: skip
    finally:
        await runner.cleanup()
    assert result.stdout, result.stderr
    report = orjson.loads(result.stdout)
    track, identify, page, group, alias = report["outcomes"]
    # The server's redirect is bad, not the function's URL: a failure to retry.
    assert (group["status"], group["error_type"]) == ("retrying", "Retry")
    assert "NonHttpUrlRedirectClientError" in group["message"]
    # A redirect loop says so (it was "TooManyRedirects: 0, message=''").
    assert (alias["status"], alias["error_type"]) == ("retrying", "Retry")
    assert alias["message"].endswith(
        "TooManyRedirects: 10 redirects (a loop?), the last to /loop"
    ), alias
    assert track["status"] == "delivered"
    assert "status 200 True True\n" in report["logs"]
    assert "types text/plain;charset=UTF-8 | application/vnd.x+json | False\n" in report["logs"]
    (moved_request,) = [r for r in report["requests"] if r["url"].endswith("/moved")]
    assert moved_request["redirected_to"] == f"{url}/landed"
    # A 302 turns a POST into a GET, without the body's Content-Type (as JavaScript's fetch);
    # a header whose value is None is not sent ("None" was).
    assert moved_request["response_body"] == "GET 5 - -"
    assert moved_request["request_headers"]["Content-Type"] == "text/plain;charset=UTF-8"
    assert (identify["error_type"], page["error_type"]) == ("Bad Request", "Bad Request")
    assert "use json= for an object" in identify["message"]
    assert (
        "fetch(timeout=) must be a number of seconds above 0, or a duration such as "
        "\"500ms\", got 'soon'"
    ) in page["message"]


def test_run_function_a_lone_surrogate_printed_does_not_leave_the_call_unanswered(files):
    """The reply could not be encoded, the call waited for its timeout and was retried."""
    (files / "surrogate.py").write_text(
        "async def on_track(event, settings):\n    print('cut \\ud83d here')\n"
    )
    result = run_cli("run-function", str(files / "surrogate.py"), "--event",
                     str(files / "track.json"), "--timeout", "20", "--json")  # fmt: skip
    report = orjson.loads(result.stdout)
    assert report["outcomes"][0]["status"] == "delivered"
    assert report["logs"] == "cut \\ud83d here\n"


def test_run_function_an_error_naming_bytes_that_are_not_utf8_keeps_its_outcome(files):
    """A function's error quoting a name decoded from bytes that were not UTF-8 (a lone
    surrogate): its own outcome, the byte written as `\\xe9`, and its logs. The whole reply
    was replaced by "the worker could not send the result", a Retry, logs gone."""
    (files / "latin1.py").write_text(
        "async def on_track(event, settings):\n"
        "    name = b'caf\\xe9'.decode('utf-8', 'surrogateescape')\n"
        "    print('looking up', name)\n"
        "    raise ValueError(f'no customer {name}')\n"
    )
    result = run_cli("run-function", str(files / "latin1.py"), "--event",
                     str(files / "track.json"), "--json")  # fmt: skip
    report = orjson.loads(result.stdout)
    (outcome,) = report["outcomes"]
    assert (outcome["status"], outcome["error_type"]) == ("discarded", "Bad Request"), outcome
    assert outcome["message"] == "ValueError: no customer caf\\xe9"
    assert report["logs"].startswith("looking up caf\\xe9\n"), report["logs"]


GROUPS_PY = """
import asyncio
from destfnd.functions import RetryError, ValidationError, fetch

async def on_track(event, settings):  # fetches in parallel, as Python 3.11 does it
    async with asyncio.TaskGroup() as tg:
        tg.create_task(fetch(settings["down"], method="POST", json=event))
        tg.create_task(asyncio.sleep(5))

async def on_identify(event, settings):
    raise ExceptionGroup("two", [RetryError("busy", retry_after_s=30), RetryError("later", 90)])

async def on_page(event, settings):
    raise ExceptionGroup("mixed", [RetryError("busy"), ValidationError("no email")])
"""


@pytest.mark.parametrize(
    ("event_type", "outcome"),
    [
        ("track", "outcome: retrying (Retry): FetchError: "),
        ("identify", "outcome: retrying (Retry): RetryError: busy (and 1 more in its "
                     "ExceptionGroup) (asks to wait 1m 30s)"),
        ("page", "outcome: discarded (Message Rejected): ValidationError: no email (and 1 more "
                 "in its ExceptionGroup)"),
    ],
)  # fmt: skip
def test_run_function_an_exception_group_has_the_outcome_of_what_it_holds(
    tmp_path, event_type, outcome
):
    """A TaskGroup whose fetch failed raised an ExceptionGroup, discarded as a Bad Request
    where the FetchError alone is retried."""
    from support import closed_port_url

    (tmp_path / "groups.py").write_text(GROUPS_PY)
    event = {"type": event_type, "userId": "u1", "event": "E", "name": "Home"}
    (tmp_path / "event.json").write_bytes(orjson.dumps(event))
    result = run_cli(
        "run-function", str(tmp_path / "groups.py"), "--event", str(tmp_path / "event.json"),
        "--settings", orjson.dumps({"down": closed_port_url()}).decode(),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert outcome in result.stdout, result.stdout


def test_run_function_a_function_that_starts_a_process_ends_quietly(tmp_path):
    """The worker's output pipe, held open by the process the function started, was still
    open when run-function's event loop closed: "Exception ignored ... Event loop is closed"
    and a traceback on stderr."""
    (tmp_path / "spawns.py").write_text(
        "import subprocess\n\ndef on_track(event, settings):\n"
        '    subprocess.Popen(["sleep", "30"])\n'
    )
    (tmp_path / "event.json").write_text('{"type": "track", "userId": "u", "event": "E"}')
    for _ in range(3):
        result = run_cli(
            "run-function", str(tmp_path / "spawns.py"), "--event", str(tmp_path / "event.json")
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""


def test_run_function_notes_a_returned_error_and_a_settings_that_is_no_dict(tmp_path):
    """A handler that returns an error instead of raising it (as on_batch returns outcomes)
    has delivered the event: the logs say so. A SETTINGS that is no dict is the problem, not
    each setting "not declared" in it (those warnings came too), and the file's: exit 3."""
    (tmp_path / "slips.py").write_text(
        "from destfnd.functions import RetryError\n\nSETTINGS = ['apiKey']\n\n"
        "def on_track(event, settings):\n    return RetryError('downstream 503')\n"
    )
    (tmp_path / "event.json").write_text('{"type": "track", "userId": "u", "event": "E"}')
    result = run_cli("run-function", str(tmp_path / "slips.py"), "--event",
                     str(tmp_path / "event.json"), "--settings", '{"apiKey": "k"}')  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr == "destfnd: settings: SETTINGS in slips.py must be a dict\n"
    assert result.stdout == ""
    (tmp_path / "slips.py").write_text(
        (tmp_path / "slips.py").read_text().replace("SETTINGS = ['apiKey']", "")
    )
    result = run_cli("run-function", str(tmp_path / "slips.py"), "--event",
                     str(tmp_path / "event.json"))  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert (
        "  destfnd: on_track returned RetryError(...) instead of raising it: a handler that "
        "returns has delivered the event\n"
    ) in result.stdout


def test_run_function_a_file_that_cannot_be_used_exits_3_naming_it(tmp_path):
    """A SETTINGS declaration with a typo is the file's fault, as check-config says: it was
    reported as Invalid Settings of `--settings` (exit 1). A file that exits as it loads
    was "the worker exited while loading: no output", naming neither file nor exit code.
    Found by a new user's audit."""
    (tmp_path / "event.json").write_text('{"type": "track", "userId": "u", "event": "E"}')
    (tmp_path / "typo.py").write_text(
        'SETTINGS = {"region": {"type": "strin", "requird": True}}\n\n'
        "def on_track(event, settings):\n    print('ran')\n"
    )
    result = run_cli("run-function", str(tmp_path / "typo.py"), "--event",
                     str(tmp_path / "event.json"), "--settings", '{"region": "eu"}')  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr == (
        "destfnd: settings.region: SETTINGS['region'] in typo.py has an unknown field "
        "'requird' (did you mean 'required'?); settings.region: SETTINGS['region'] in typo.py: "
        "unknown type 'strin' (did you mean string? use string, number, integer, boolean, "
        "object, array)\n"
    )
    assert "ran" not in result.stdout
    # A handler's own exit code 75, destfnd's for a worker left with a stuck thread, is
    # what it is (it was said to be a stuck thread's).
    (tmp_path / "exits.py").write_text(
        "import os\n\ndef on_track(event, settings):\n    os._exit(75)\n"
    )
    result = run_cli(
        "run-function", str(tmp_path / "exits.py"), "--event", str(tmp_path / "event.json")
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "outcome: retrying (Retry): the worker process exited with code 75\n" in result.stdout
    (tmp_path / "leaves.py").write_text("import os\n\nos._exit(4)\n")
    result = run_cli(
        "run-function", str(tmp_path / "leaves.py"), "--event", str(tmp_path / "event.json")
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stderr == (
        f"destfnd: the worker process exited with code 4 while loading {tmp_path / 'leaves.py'}"
        ": no output\n"
    )


def test_run_function_settings_read_secrets_as_the_config_does(tmp_path):
    """`{"env": ...}` and `{"file": ...}` in --settings are read as the config reads secrets,
    and redacted: a key need not be typed on the command line. They were refused ("must be
    string, got dict"). The variable is kept from the worker, as serve keeps it."""
    import os

    (tmp_path / "show.py").write_text(
        "import os\n\ndef on_track(event, settings):\n"
        "    print(settings['apiKey'], settings['deep'])\n"
        "    print('in the environment:', 'DESTFND_TEST_KEY' in os.environ)\n"
    )
    (tmp_path / "event.json").write_text('{"type": "track", "userId": "u", "event": "E"}')
    (tmp_path / "key.txt").write_text("file-secret-123\n")
    settings = '{"apiKey": {"env": "DESTFND_TEST_KEY"}, "deep": {"k": {"file": "key.txt"}}}'

    def run(env: dict[str, str]) -> subprocess.CompletedProcess:  # in tmp_path: key.txt
        return subprocess.run(
            [sys.executable, "-m", "destfnd", "run-function", "show.py", "--event",
             "event.json", "--settings", settings],
            capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip

    result = run({**os.environ, "DESTFND_TEST_KEY": "env-secret-456"})
    assert result.returncode == 0, result.stderr
    assert "  [redacted] {'k': '[redacted]'}\n" in result.stdout, result.stdout
    # Kept from the worker's environment, as serve keeps it (it was passed on).
    assert "  in the environment: False\n" in result.stdout, result.stdout
    assert "secret-" not in result.stdout + result.stderr
    missing = run({k: v for k, v in os.environ.items() if k != "DESTFND_TEST_KEY"})
    assert (missing.returncode, missing.stderr) == (
        3,
        "destfnd: --settings.apiKey: environment variable DESTFND_TEST_KEY is not set\n",
    )


def test_run_function_a_cancelled_error_the_handler_raises_is_its_own(tmp_path):
    """Nothing cancelled the call: the CancelledError is the handler's, a Bad Request like any
    other exception. It was reported as a Timeout ("cancelled") and retried."""
    (tmp_path / "cancels.py").write_text(
        "import asyncio\n\nasync def on_track(event, settings):\n"
        "    raise asyncio.CancelledError()\n"
    )
    (tmp_path / "event.json").write_text('{"type": "track", "userId": "u", "event": "E"}')
    result = run_cli(
        "run-function", str(tmp_path / "cancels.py"), "--event", str(tmp_path / "event.json")
    )
    assert "outcome: discarded (Bad Request): CancelledError\n" in result.stdout, result.stdout


def test_run_function_logging_basic_config_and_a_huge_error(tmp_path):
    """A function's own logging.basicConfig(level=DEBUG, format=...) applies to its logs (it
    did nothing: the root logger had destfnd's handler). An error of 100 KB is shown cut at
    4 KB, as serve stores it (it was printed whole)."""
    (tmp_path / "logs.py").write_text(
        "import logging\n"
        'logging.basicConfig(level=logging.DEBUG, format="%(levelname)s|%(message)s")\n'
        "def on_track(event, settings):\n"
        '    logging.getLogger("crm").debug("token cached")\n'
        "def on_identify(event, settings):\n"
        '    raise ValueError("x" * 100_000)\n'
    )
    (tmp_path / "events.json").write_text(
        '[{"type": "track", "userId": "u", "event": "E"}, {"type": "identify", "userId": "u"}]'
    )
    result = run_cli("run-function", str(tmp_path / "logs.py"), "--event",
                     str(tmp_path / "events.json"), "--json")  # fmt: skip
    report = orjson.loads(result.stdout)
    assert "DEBUG|token cached\n" in report["logs"]
    message = report["outcomes"][1]["message"]
    assert len(message) < 4200 and message.endswith("... [100,012 characters in all]"), message


def test_run_function_gives_the_event_as_ingest_would(tmp_path):
    """messageId filled, receivedAt set, timestamp corrected, as the daemon's functions get
    them: a function reading event["messageId"] failed here alone (KeyError)."""
    (tmp_path / "ids.py").write_text(
        "def on_track(event, settings):\n"
        "    print(len(event['messageId']), event['receivedAt'] == event['timestamp'])\n"
    )
    (tmp_path / "event.json").write_text('{"type": "track", "userId": "u", "event": "E"}')
    result = run_cli("run-function", str(tmp_path / "ids.py"), "--event",
                     str(tmp_path / "event.json"))  # fmt: skip
    assert result.returncode == 0, result.stdout
    assert "logs:\n  36 True\n" in result.stdout, result.stdout
    # A clock skew that cannot be corrected: ingest's 400, here a warning (a traceback).
    (tmp_path / "event.json").write_text(
        '{"type": "track", "userId": "u", "event": "E", "messageId": "m", '
        '"timestamp": "0001-01-01T00:00:00Z", "sentAt": "9999-12-31T23:59:59Z"}'
    )
    skewed = run_cli("run-function", str(tmp_path / "ids.py"), "--event",
                     str(tmp_path / "event.json"))  # fmt: skip
    assert "Traceback" not in skewed.stderr, skewed.stderr
    assert skewed.stderr.startswith("warning: ingest would refuse this event: "), skewed.stderr


BIG_AND_SECRET_PY = """
from destfnd.functions import fetch

async def on_track(event, settings):
    key = settings["apiKey"]
    print("p" * (16 * 1024 - 5) + key)  # the secret across the cut of the logs
    await fetch(settings["endpoint"] + "?u=" + "u" * 1_000_000, method="POST",
                body="x" * 4090 + key, headers={"X-Big": "h" * 100_000, "X-Key": key})
    for i in range(49):
        await fetch(settings["endpoint"] + "?u=" + "u" * 100_000)
"""


async def test_run_function_records_are_bounded_and_a_secret_is_not_cut_in_two(files):
    """What a call records is redacted before it is cut: a secret across the cut of the logs
    or a body left its first half. URLs and header values are cut short too: 50 fetches of
    a 1 MB URL made a record of 50 MB, which the daemon held in memory and stored."""
    import asyncio
    import os

    key = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
    (files / "big.py").write_text(BIG_AND_SECRET_PY)
    async with Sink() as sink:
        settings = orjson.dumps({"endpoint": sink.url, "apiKey": {"env": "BIG_KEY"}}).decode()
        result = await asyncio.to_thread(
            run_cli, "run-function", str(files / "big.py"), "--event",
            str(files / "track.json"), "--settings", settings, "--json",
            env={**os.environ, "BIG_KEY": key},
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "wJalrX" not in result.stdout + result.stderr
    assert len(result.stdout) < 400_000, len(result.stdout)
    report = orjson.loads(result.stdout)
    assert report["logs"].endswith("ppppp[reda\n[logs truncated]\n"), report["logs"][-100:]
    first, *rest = report["requests"]
    assert len(rest) == 49
    assert len(first["url"]) < 2100 and first["url"].endswith(" characters in all]")
    assert first["request_headers"]["X-Key"] == "[redacted]"
    assert first["request_headers"]["X-Big"].endswith("... [100,000 characters in all]")
    assert first["request_body"].startswith("x" * 4090 + "[redac")
    assert first["request_body"].endswith("... [4130 bytes in all]")


def test_run_function_warns_of_a_misspelled_handler_as_check_config_does(files):
    """The event went to "no on_identify handler" with no word of the on_identfy beside it."""
    (files / "typo.py").write_text(
        "def on_track(event, settings):\n    pass\n\n"
        "def on_identfy(event, settings):\n    print('never')\n"
    )
    result = run_cli("run-function", str(files / "typo.py"), "--event",
                     str(files / "identify.json"))  # fmt: skip
    assert f"warning: {files / 'typo.py'}: did you mean on_identify? (it has on_identfy)" in (
        result.stderr
    )
    assert "no on_identify handler" in result.stdout
