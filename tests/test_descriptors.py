"""The daemon's file descriptors against its limit (destfnd/descriptors.py)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import os, resource
from destfnd import descriptors

resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
assert descriptors.note() == "", descriptors.in_use()
held = []
try:
    while True:
        held.append(os.open(os.devnull, os.O_RDONLY))
except OSError:
    pass  # EMFILE: none left, not even one to look with
print(descriptors.note())
os.close(held.pop())  # one free again: counted, not guessed
print(descriptors.in_use())
"""


def test_descriptors_note_says_when_they_ran_out():
    """SQLite's "unable to open database file" names no cause when the process is out of
    descriptors: the note added to it does, also when not one is left to count them with."""
    argv = [sys.executable, "-c", SCRIPT]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    note, counted = done.stdout.splitlines()
    assert note == (
        " (the daemon has 40 of its 40 file descriptors open: raise LimitNOFILE= in the unit, "
        "or ulimit -n)"
    )
    assert counted == "(39, 40)"
