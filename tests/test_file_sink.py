"""The file destination's writes, on real files: whole lines or none."""

from __future__ import annotations

import subprocess
import sys

# A file size limit (RLIMIT_FSIZE) makes the kernel cut a write short, as a full disk does:
# the first batch fits, the second crosses the limit part-way.
FULL_DISK = """
import asyncio, resource, signal, sys
from pathlib import Path
from destfnd.config import load_config
from destfnd.webhook import FileSink

async def main(folder):
    config = Path(folder, "destfnd.toml")
    config.write_text('[[sources]]\\nname = "web"\\nwrite_key = "k"\\n[[destinations]]\\n'
                      'name = "archive"\\ntype = "file"\\npath = "out.ndjson"\\n')
    sink = FileSink(load_config(config).destinations[0])
    await sink.start()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
    first = await sink.deliver([b'{"n":1}', b'{"n":2}'], batched=True)
    second = await sink.deliver([b'{"n":3,"pad":"' + b"x" * 100 + b'"}'], batched=False)
    await sink.close()
    print([o.kind.value for o in first.outcomes], [o.kind.value for o in second.outcomes])
    print(second.outcomes[0].message)

asyncio.run(main(sys.argv[1]))
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
