"""Whether destfnd could create or write the files its config names, found without creating
them: check-config's look ahead at what `serve` will do. A finding that only permissions
make is marked as such: check-config may run as another user than `serve` (root, say, for
a systemd service with a dynamic user)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The files SQLite (and destfnd's lock) keep beside a database, by the suffix of their name.
DATABASE_COMPANIONS = ("-wal", "-shm", "-journal", ".lock")
# After a finding that depends on permissions: a warning, since serve may run as another user.
AS_THIS_USER = " (for the user running check-config; serve's user may differ)"


@dataclass(frozen=True, slots=True)
class PathProblem:
    text: str
    permission: bool = False  # True: true for whoever asked, maybe not for serve's user


def open_checked(path: Path, flags: int, check: Callable[[os.stat_result], None]) -> int:
    """`path` opened with `flags` (with O_CREAT if it may be created), never blocking, and
    only if `check(stat)` does not raise: before open() (opening a FIFO with no reader blocks
    for good, and opening a device can act) and after it (the file may have changed since)."""
    try:
        check(os.stat(path))
    except FileNotFoundError:
        pass
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC, 0o644)
    try:
        check(os.fstat(fd))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def irregular_companion(real: Path, ends: tuple[str, ...] = DATABASE_COMPANIONS) -> Path | None:
    """The first file kept beside the database `real` (by the ends of its name) that is
    there but not a regular file (a symbolic link included: SQLite does not follow one at
    -wal, -shm or -journal, nor destfnd at its lock)."""
    for end in ends:
        companion = Path(f"{real}{end}")
        if not os.path.lexists(companion):
            continue
        try:
            st = os.lstat(companion)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(st.st_mode):
            return companion
    return None


def permission_only(exc_errno: int | None = errno.EACCES) -> bool:
    """Whether a refusal is a matter of permissions, which another user might not meet. Not
    for root, who has them all: what refuses root (an immutable file, say) refuses anyone."""
    return exc_errno == errno.EACCES and os.geteuid() != 0


def nearest_existing(path: Path) -> Path:
    """The nearest of `path`'s folders that is there (a link counts, leading anywhere): where
    `mkdir(parents=True)` starts making the others, or fails if it is no folder."""
    ancestor = path.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def creatable_problem(path: Path) -> PathProblem | None:
    """Why `path`, which does not exist, could not be created with its missing folders (as
    `mkdir(parents=True)` then open() would); None if it could."""
    try:
        ancestor = nearest_existing(path)
        if not ancestor.is_dir():  # a file, or a link to no folder
            return PathProblem(f"{path}: cannot create it: {ancestor} is not a folder")
        return _unwritable(path, ancestor, "cannot create it")
    except OSError as exc:
        text = f"{path}: cannot look at it: {exc.strerror}"
        return PathProblem(text, permission_only(exc.errno))


def link_target(path: Path) -> Path | PathProblem:
    """Where a link to nothing leads, as open(O_CREAT) would create it (in a folder that must
    exist: only the link's own folders are made)."""
    target = Path(os.path.realpath(path))
    if not target.parent.is_dir():
        return PathProblem(f"{path}: cannot create it: it links to {target}, in no folder")
    return target


def _unwritable(path: Path, folder: Path, what: str) -> PathProblem | None:
    if os.access(folder, os.W_OK | os.X_OK):
        return None
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        return PathProblem(f"{path}: {what}: {folder} is on a read-only file system")
    text = f"{path}: {what}: no permission to write in {folder}"
    return PathProblem(text, permission_only())


def database_problem(path: Path) -> PathProblem | None:
    """Why the daemon could not open or create its SQLite database at `path`: it makes the
    folders of `path`, then writes the file and, beside it (links resolved), its -wal, -shm
    and .lock files. Nothing is opened."""
    try:
        real = Path(os.path.realpath(path))
        if not os.path.lexists(real):
            found = creatable_problem(path)  # the folders, as serve's mkdir sees them
            if found is None and os.path.islink(path):
                target = link_target(path)
                found = target if isinstance(target, PathProblem) else None
            return found or creatable_problem(real) or _companions_problem(path, real)
        if not stat.S_ISREG(os.stat(real).st_mode):
            return PathProblem(f"{path}: not a regular file")
        if not os.access(real, os.R_OK | os.W_OK):
            if os.statvfs(real).f_flag & os.ST_RDONLY:
                return PathProblem(f"{path}: on a read-only file system")
            return PathProblem(f"{path}: cannot read and write it", permission_only())
        found = _unwritable(path, real.parent, "cannot keep its -wal, -shm and .lock files")
        return found or _companions_problem(path, real) or _foreign_problem(path, real)
    except OSError as exc:
        text = f"{path}: cannot look at it: {exc.strerror}"
        return PathProblem(text, permission_only(exc.errno))


def _foreign_problem(path: Path, real: Path) -> PathProblem | None:
    """Another application's SQLite file (which serve refuses), read as it is on disk:
    `immutable` takes no lock and makes no -shm file (which, made by root, would keep the
    daemon's user out). What only a WAL holds is not seen: a new destfnd database then."""
    import sqlite3

    from destfnd.store.db import not_ours

    if os.stat(real).st_size == 0:
        return None  # a new database, to SQLite
    uri = f"{real.as_uri()}?immutable=1"
    try:
        conn = sqlite3.connect(uri, uri=True)
        try:
            why = not_ours(conn)
        finally:
            conn.close()
    except sqlite3.Error:
        # Not SQLite, or pages a running daemon's checkpoint was moving as they were read
        # (no lock is taken): left to serve, which opens it properly.
        return None
    if why is None:
        return None
    return PathProblem(f"{path}: {why}: is storage.path another application's database?")


def _companions_problem(path: Path, real: Path) -> PathProblem | None:
    companion = irregular_companion(real)
    if companion is None:
        return None
    if os.path.islink(companion):
        return PathProblem(f"{path}: {companion} is a symbolic link (remove it)")
    return PathProblem(f"{path}: {companion} is not a regular file")
