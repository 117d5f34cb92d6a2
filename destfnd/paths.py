"""Whether destfnd could create or write the files its config names, found without creating
or opening them: check-config's look ahead at what `serve` will do (with the permissions of
whoever runs it)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def creatable_problem(path: Path) -> str | None:
    """Why `path`, which does not exist, could not be created with its missing folders (as
    `mkdir(parents=True)` then open() would), found without creating anything; None if it
    could. With the permissions of whoever asks."""
    try:
        ancestor = path.parent
        while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():  # a file, or a link to no folder
            return f"{path}: cannot create it: {ancestor} is not a folder"
        return _unwritable(path, ancestor, "cannot create it")
    except OSError as exc:
        return f"{path}: cannot look at it: {exc.strerror}"


def _unwritable(path: Path, folder: Path, what: str) -> str | None:
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
    why = "a read-only file system" if read_only else "no permission"
    return f"{path}: {what}: cannot write in {folder} ({why})"


def database_problem(path: Path) -> str | None:
    """Why the daemon could not open or create its SQLite database at `path` (it writes the
    file, and its -wal and -shm files beside it), found without opening it; for check-config."""
    try:
        if not os.path.lexists(path):
            return creatable_problem(path)
        if not stat.S_ISREG(os.stat(path).st_mode):
            return f"{path}: not a regular file"
        if not os.access(path, os.R_OK | os.W_OK):
            read_only = os.statvfs(path).f_flag & os.ST_RDONLY
            why = "a read-only file system" if read_only else "no permission"
            return f"{path}: cannot open it for writing ({why})"
        return _unwritable(path, path.parent, "cannot keep its -wal and -shm files")
    except OSError as exc:
        return f"{path}: cannot look at it: {exc.strerror}"
