"""The database's exclusive locks: one daemon per database file, whatever names lead to it.
Taken before SQLite opens the file; imports nothing above the store."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from destfnd.paths import irregular_companion, nearest_existing, open_checked
from destfnd.store.db import StoreBusy, StoreError, StoreFull


class DatabaseInUse(StoreBusy):
    """Another destfnd is already serving this database (exit 1, as another process's lock)."""


class DatabaseLock:
    """Exclusive locks held for the daemon's lifetime, taken before SQLite opens the file: two
    daemons on one database would deliver everything twice, and through two names of one
    file (hard links) each would keep a WAL of its own and corrupt it. One lock beside the
    file (symbolic links resolved), one on the file itself (an inode has one, whatever the
    name). flock, not SQLite's POSIX locks, which the two do not disturb; the file's own
    descriptor stays open until SQLite has closed it (closing any descriptor of a file drops
    the process's POSIX locks on it)."""

    def __init__(self, path: Path) -> None:
        beside = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            real = Path(os.path.realpath(path))
            beside = real.parent / f"{real.name}.lock"
            # Not through a link: one the daemon's user (or a function, running as that user)
            # put there would have a command run as root create a file where it leads.
            self._beside: int | None = _open_lock(beside, real)
        except OSError as exc:
            why = exc.strerror
            if beside is not None and os.path.islink(beside):
                why = f"{beside} is a symbolic link (remove it)"
            elif isinstance(exc, FileExistsError | NotADirectoryError):
                ancestor = nearest_existing(path)  # (as check-config's creatable_problem)
                if not ancestor.is_dir():
                    why = f"{ancestor} is not a folder"
            elif isinstance(exc, PermissionError) and beside is not None:
                why = f"{beside}: {why} (uid {os.geteuid()})"
            raise _error(f"{path}: cannot create the database's lock file: {why}", exc) from None
        self._file: int | None = None
        # An empty file that was there (not one made here): see `open_store` (startup.py).
        self.found_empty = False
        self._made: Path | None = None  # the database file, if made here (see close)
        try:
            self._take(self._beside, path)
            existed = real.is_file()
            try:  # an empty file is a new database to SQLite
                self._file = _open_regular(real, os.O_RDONLY)
            except OSError as exc:
                raise _error(f"{path}: cannot open the database: {exc.strerror}", exc) from None
            self.found_empty = existed and os.fstat(self._file).st_size == 0
            self._made = None if existed else real
            self._take(self._file, path)
            companion = irregular_companion(real, ("-wal", "-shm"))  # a FIFO fails each commit
            if companion is not None:
                raise StoreError(
                    f"{path}: cannot open the database: {companion} is not a regular file"
                )
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _take(fd: int, path: Path) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DatabaseInUse(
                f"{path}: another destfnd is already serving this database"
            ) from None

    def close(self) -> None:
        """Released; the database file is removed if it was made here and SQLite never wrote
        to it (a start that failed, on a port in use, say), so that the next start does not
        find an empty file it would have to warn of, as of one truncated."""
        if self._made is not None and self._file is not None:
            _remove_if_unused(self._made, self._file)
            self._made = None
        if self._beside is not None:
            os.close(self._beside)
            self._beside = None
        if self._file is not None:
            os.close(self._file)
            self._file = None


def _remove_if_unused(real: Path, fd: int) -> None:
    """`real` (open as `fd`, locked) unlinked if it is still that file, empty, and has no WAL
    beside it (one with commits in it would be the database until its checkpoint)."""
    try:
        st = os.fstat(fd)
        same = os.stat(real)
        wal = Path(f"{real}-wal")
        if st.st_size or (st.st_dev, st.st_ino) != (same.st_dev, same.st_ino):
            return
        if wal.exists() and wal.stat().st_size:
            return
        real.unlink()
        for companion in (wal, Path(f"{real}-shm")):
            companion.unlink(missing_ok=True)
    except OSError:
        pass  # left as it is: the next start warns of an empty file, as before


def _error(text: str, exc: OSError) -> StoreError:
    """A StoreFull for want of room (exit 1: the unit restarts it), else a StoreError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(f"{text}: make room and try again (exit 1, which the unit restarts)")
    return StoreError(text)


def _open_lock(lock: Path, real: Path) -> int:
    """The lock file beside the database `real`, never through a link: made now if it is not
    there (and, run as root, given the database's owner), else used as it is."""
    try:
        fd = _open_regular(lock, os.O_WRONLY | os.O_EXCL | os.O_NOFOLLOW)
    except FileExistsError:  # there already, whoever owns it
        return _open_regular(lock, os.O_WRONLY | os.O_NOFOLLOW)
    if os.geteuid() == 0:
        try:
            _owned_as_database(fd, real)
        except OSError:
            os.close(fd)
            raise
    return fd


def _owned_as_database(fd: int, real: Path) -> None:
    """The lock file `fd`, which this process has just created, owned as the database (or
    its folder, before there is one): a command run as root must not leave a lock the
    daemon's user cannot open (it would not start again), as SQLite gives its -wal and -shm
    files the database's owner. Only a file made here: one that was there may be another
    file's other name (a hard link), which this would give away."""
    try:
        owner = os.stat(real)
    except FileNotFoundError:
        owner = os.stat(real.parent)
    os.fchown(fd, owner.st_uid, owner.st_gid)


def _open_regular(path: Path, mode: int) -> int:
    """`path`, created if need be, opened only if it is a regular file (`open_checked`)."""
    return open_checked(path, mode | os.O_CREAT, _regular_only)


def _regular_only(st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, "not a regular file")
