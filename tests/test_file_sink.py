"""The file destination's writes, on real files: whole lines or none."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

# A file size limit (RLIMIT_FSIZE) makes the kernel cut a write short, as a full disk does:
# the first batch fits, the second crosses the limit part-way.
FULL_DISK = """
import asyncio, resource, signal, subprocess, sys
from pathlib import Path
from destfnd.config import load_config
from destfnd.webhook import FileSink

async def main(folder, append_only):
    config = Path(folder, "destfnd.toml")
    config.write_text('[[sources]]\\nname = "web"\\nwrite_key = "k"\\n[[destinations]]\\n'
                      'name = "archive"\\ntype = "file"\\npath = "out.ndjson"\\n')
    sink = FileSink(load_config(config).destinations[0])
    if append_only:  # the file may be appended to, never cut back
        Path(folder, "out.ndjson").touch()
        subprocess.run(["chattr", "+a", Path(folder, "out.ndjson")], check=True)
    await sink.start()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
    first = await sink.deliver([b'{"n":1}', b'{"n":2}'], batched=True)
    second = await sink.deliver([b'{"n":3,"pad":"' + b"x" * 100 + b'"}'], batched=False)
    await sink.close()
    print([o.kind.value for o in first.outcomes], [o.kind.value for o in second.outcomes])
    print(second.outcomes[0].message)

asyncio.run(main(sys.argv[1], sys.argv[2:] == ["append-only"]))
"""


def test_file_sink_a_write_cut_short_leaves_no_part_of_its_lines(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(tmp_path)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    kinds, message = result.stdout.splitlines()
    assert kinds == "['ok', 'ok'] ['retry']", result.stdout
    assert message.startswith(f"cannot write {tmp_path}/out.ndjson: File too large"), message
    # The retried line is not there in part: the file holds the first batch only.
    assert (tmp_path / "out.ndjson").read_bytes() == b'{"n":1}\n{"n":2}\n'


def test_file_sink_a_part_it_cannot_undo_stays_and_is_logged(tmp_path):
    """An append-only file cannot be cut back: the part of a line that was written stays (the
    retry writes the whole line after it), and the log says so."""
    if shutil.which("chattr") is None:
        pytest.skip("no chattr here")
    probe = tmp_path / "probe"
    probe.touch()
    if subprocess.run(["chattr", "+a", probe], capture_output=True).returncode != 0:
        pytest.skip("cannot make a file append-only here (needs root and ext4 or the like)")
    subprocess.run(["chattr", "-a", probe], check=True)
    try:
        result = subprocess.run(
            [sys.executable, "-c", FULL_DISK, str(tmp_path), "append-only"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        subprocess.run(["chattr", "-a", tmp_path / "out.ndjson"], check=False)
    assert result.returncode == 0, result.stderr
    *logged, kinds, message = result.stdout.splitlines()
    assert kinds == "['ok', 'ok'] ['retry']", result.stdout
    assert message.startswith(f"cannot write {tmp_path}/out.ndjson: File too large"), message
    assert any("file_write_not_undone" in line and "Operation not permitted" in line
               for line in logged), result.stdout  # fmt: skip
    written = (tmp_path / "out.ndjson").read_bytes()
    assert written.startswith(b'{"n":1}\n{"n":2}\n{"n":3,"pad":"xxx') and len(written) == 100


async def test_file_sink_follows_its_path_when_the_file_is_moved_or_deleted(tmp_path):
    """logrotate moves the file away (and a user may delete it): the next lines go to `path`,
    created again. They went on into the moved or deleted file, reported delivered."""
    from destfnd.config import load_config
    from destfnd.webhook import FileSink

    config = tmp_path / "destfnd.toml"
    config.write_text('[[sources]]\nname = "web"\nwrite_key = "k"\n[[destinations]]\n'
                      'name = "archive"\ntype = "file"\npath = "out/events.ndjson"\n')  # fmt: skip
    sink = FileSink(load_config(config).destinations[0])
    await sink.start()
    out = tmp_path / "out" / "events.ndjson"
    try:
        await sink.deliver([b'{"n":1}'], batched=False)
        out.rename(tmp_path / "out" / "events.ndjson.1")  # logrotate's default
        await sink.deliver([b'{"n":2}', b'{"n":3}'], batched=True)
        rotated = (tmp_path / "out" / "events.ndjson.1").read_bytes()
        after_move = out.read_bytes()
        out.unlink()
        (tmp_path / "out" / "events.ndjson.1").unlink()
        (tmp_path / "out").rmdir()  # its folder too: made again
        report = await sink.deliver([b'{"n":4}'], batched=False)
    finally:
        await sink.close()
    assert rotated == b'{"n":1}\n'
    assert after_move == b'{"n":2}\n{"n":3}\n'
    assert out.read_bytes() == b'{"n":4}\n'
    assert [o.kind.value for o in report.outcomes] == ["ok"]
