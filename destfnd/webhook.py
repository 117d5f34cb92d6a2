"""The built-in destinations: `webhook` (HTTP POST of the event, or a JSON array of a batch)
and `file` (one JSON line per event). They turn a response into an Outcome; nothing else."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
from pathlib import Path

import aiohttp
import structlog

from destfnd import __version__
from destfnd.client_errors import client_error_text
from destfnd.config import DestinationConfig, Secret
from destfnd.errors import DestfndError
from destfnd.outcome import (
    DELIVERED,
    ErrorType,
    Outcome,
    Report,
    discard,
    parse_retry_after,
    retried_status,
    retry,
    same_for_all,
)
from destfnd.paths import (
    PathProblem,
    creatable_problem,
    link_target,
    open_checked,
    permission_only,
)
from destfnd.redact import Redactor
from destfnd.urls import as_written

# Their Retry-After pauses the whole destination: rate limited, or down for maintenance.
_PAUSE_STATUSES = frozenset({429, 503})
_MAX_ERROR_BODY = 4096  # characters of a failed response's body kept on the attempt
_MAX_DRAIN = 1024 * 1024  # bytes of a 2xx answer read (and dropped) before its connection closes
# A server that cannot be reached pauses the destination this long, doubling while it stays so
# (one pause for the requests that fail together), up to the last.
UNREACHABLE_PAUSE_S = (1.0, 60.0)


log = structlog.get_logger("destfnd.file")


class Webhook:
    def __init__(self, cfg: DestinationConfig, redactor: Redactor | None = None) -> None:
        assert cfg.url is not None
        # What the server sends back is redacted here, before it is cut short: a secret it
        # echoes (a header's) across the cut would no longer be found by the dispatcher,
        # which redacts it all again.
        self._redactor = redactor or Redactor()
        self._url = cfg.url.value if isinstance(cfg.url, Secret) else cfg.url
        self._target = as_written(self._url)
        self._timeout_s = cfg.timeout_s
        self._headers = {
            "Content-Type": "application/json",
            "User-Agent": f"destfnd/{__version__}",
            **{k: v.value if isinstance(v, Secret) else v for k, v in cfg.headers},
        }
        self._limit = cfg.concurrency
        self._session: aiohttp.ClientSession | None = None
        self._unreachable_s = 0.0  # the last pause for an unreachable server; 0: reached
        self._unreachable_until = 0.0  # monotonic

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._limit),
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def deliver(self, payloads: list[bytes], batched: bool) -> Report:
        started = time.monotonic()
        request: dict = {"method": "POST", "url": self._url, "events": len(payloads)}
        outcome, unreachable = await self._post(payloads, batched, request)
        request["duration_ms"] = round((time.monotonic() - started) * 1000, 1)
        # A Retry-After is the server's, for every request: the destination pauses.
        pause_s = outcome.retry_after_s if request.get("status") in _PAUSE_STATUSES else None
        if unreachable:
            pause_s = self._unreachable_pause()
        elif "status" in request:
            self._unreachable_s = 0.0
        return same_for_all(outcome, len(payloads), requests=(request,), pause_s=pause_s)

    def _unreachable_pause(self) -> float:
        """The server cannot be reached (refused, no route, no such host): every delivery
        would fail at once, and retrying each on its own backoff took the CPU the others
        needed. The destination pauses instead, its waiting deliveries uncounted."""
        now = time.monotonic()
        if now < self._unreachable_until:  # one of the requests that failed together
            return self._unreachable_until - now
        first, longest = UNREACHABLE_PAUSE_S
        self._unreachable_s = min(self._unreachable_s * 2, longest) or first
        self._unreachable_until = now + self._unreachable_s
        return self._unreachable_s

    async def _error_body(self, resp: aiohttp.ClientResponse, request: dict) -> None:
        """The first _MAX_ERROR_BODY characters of a failed response's body, redacted before
        they are cut: the text read reaches past the cut by the longest secret, so one that
        starts before it is there whole. If the rest does not come (a timeout, a cut
        connection: raised after), what did is kept but its last characters, where a secret
        may have begun that did not arrive whole."""
        longest = self._redactor.longest
        window = _MAX_ERROR_BODY + longest  # characters
        data = bytearray()
        try:
            await _read_up_to(resp, data, 4 * window)  # (a character: 4 bytes at most)
        except BaseException:
            partial = data.decode("utf-8", "replace")
            partial = partial[: max(0, len(partial) - longest)] if longest else partial
            if partial:
                request["response_body"] = self._redactor(partial)[:_MAX_ERROR_BODY]
            raise
        text = data.decode("utf-8", "replace")[:window]
        request["response_body"] = self._redactor(text)[:_MAX_ERROR_BODY]

    async def _post(
        self, payloads: list[bytes], batched: bool, request: dict
    ) -> tuple[Outcome, bool]:
        """The outcome, and whether the server could not be reached at all."""
        assert self._session is not None
        body = b"[" + b",".join(payloads) + b"]" if batched else payloads[0]
        try:
            async with self._session.post(
                self._target, data=body, headers=self._headers, allow_redirects=False
            ) as resp:
                request["status"] = resp.status
                # The status decides; the body is read after, within what is left of
                # `timeout`. If it does not arrive whole, the connection is closed instead
                # of reused, and the outcome stands: a 200 whose body stalls was delivered.
                outcome = _outcome(resp, self._redactor)
                try:
                    if outcome is DELIVERED:
                        await _drain(resp)
                    else:
                        # To the Event Delivery view only: it may echo the event, and the
                        # error message is logged.
                        await self._error_body(resp, request)
                except TimeoutError:
                    resp.close()
                    request["response_body_error"] = "did not arrive within the timeout"
                except aiohttp.ClientError as exc:
                    resp.close()
                    request["response_body_error"] = f"cut short: {client_error_text(exc)}"
                return outcome, False
        except TimeoutError:
            return retry(ErrorType.TIMEOUT, f"no response within {self._timeout_s:g}s"), False
        except aiohttp.ClientError as exc:
            unreachable = isinstance(exc, aiohttp.ClientConnectorError)
            return retry(ErrorType.RETRY, client_error_text(exc)), unreachable


async def _read_up_to(resp: aiohttp.ClientResponse, data: bytearray, size: int) -> None:
    """Up to `size` bytes of the body into `data`, however the server splits its writes."""
    while len(data) < size:
        chunk = await resp.content.read(size - len(data))
        if not chunk:
            return
        data += chunk


def _outcome(resp: aiohttp.ClientResponse, redact: Redactor) -> Outcome:
    """What a response's status and headers mean for the delivery; `redact`: before the
    Location is cut short (a secret across the cut would be found no more)."""
    if 200 <= resp.status < 300:
        return DELIVERED
    message = f"HTTP {resp.status} {resp.reason or ''}".rstrip()
    if resp.status < 200:  # a 101 Switching Protocols (aiohttp's client takes it as final)
        return retry(ErrorType.RETRY, f"{message}: not a final answer")
    if 300 <= resp.status < 400:
        # Not followed: after a 301, 302 or 303 the POST would arrive as a GET without the
        # event, and a redirect elsewhere would carry the configured headers (maybe secrets)
        # to another host. Retried, so nothing is lost while the url is corrected.
        where = redact(resp.headers.get("Location", ""))[:200]
        if not where:  # a 304, say: no redirect at all
            return retry(ErrorType.RETRY, f"{message}: a 3xx answer without a Location")
        return retry(ErrorType.RETRY, f"{message} to {where}: redirects are not followed")
    if retried_status(resp.status):
        after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
        return retry(ErrorType.RETRY, message, after)
    return discard(ErrorType.BAD_REQUEST, message)


async def _drain(resp: aiohttp.ClientResponse) -> None:
    """A 2xx answer read and dropped, so its keep-alive connection can serve the next POST,
    up to a cap: a large or endless answer is never held in memory, nor waited for (past the
    cap the connection is closed instead)."""
    drained = 0
    async for chunk in resp.content.iter_any():
        drained += len(chunk)
        if drained > _MAX_DRAIN:
            resp.close()
            return


def _refuse_kind(st: os.stat_result) -> None:
    """Only a regular file, or a memory device such as /dev/null: a write to a FIFO, a socket
    or a terminal can block for as long as its reader pleases, and with it the daemon."""
    mode = st.st_mode
    if stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and os.major(st.st_rdev) == 1):
        return
    kind = (
        "a FIFO" if stat.S_ISFIFO(mode)
        else "a socket" if stat.S_ISSOCK(mode)
        else "a device other than /dev/null and the like" if stat.S_ISCHR(mode)
        else "not a regular file"
    )  # fmt: skip
    raise ValueError(f"is {kind}; a file destination needs a regular file")


def _open_append(path: Path, *, create: bool) -> int:
    """`path` opened for appending, if `_refuse_kind` lets it."""
    return open_checked(
        path, os.O_WRONLY | os.O_APPEND | (os.O_CREAT if create else 0), _refuse_kind
    )


def _append_all(fd: int, data: bytes, path: Path) -> None:
    """All of `data` or none of it: a write cut short (a full disk) is undone, so the retry
    leaves no torn line and no line twice. Not if another process wrote to the file
    meanwhile (the end is no longer ours), nor where it cannot be (an append-only file): then
    the part stays, and is logged."""
    view = memoryview(data)
    start = os.fstat(fd).st_size
    written = 0
    try:
        while written < len(view):
            written += os.write(fd, view[written:])
    except OSError:
        if written:
            try:
                if os.fstat(fd).st_size != start + written:
                    raise OSError(errno.EBUSY, "the file was written by another process too")
                os.ftruncate(fd, start)
            except OSError as exc:
                log.warning("file_write_not_undone", path=str(path), bytes=written,
                            error=exc.strerror)  # fmt: skip
        raise


def file_problem(path: Path) -> PathProblem | None:
    """Why `FileSink.start` could not open `path` for appending, found without creating
    anything (for check-config); None if it could."""
    try:
        if os.path.lexists(path):
            try:
                os.close(_open_append(path, create=False))
                return None
            except ValueError as exc:
                return PathProblem(f"{path}: {exc}")
            except OSError as exc:
                if not (exc.errno == errno.ENOENT and path.is_symlink()):
                    text = f"{path}: cannot open for appending: {exc.strerror}"
                    return PathProblem(text, permission_only(exc.errno))
            target = link_target(path)  # a link to nothing: open() creates its target
            if isinstance(target, PathProblem):
                return target
            path = target
        return creatable_problem(path)
    except OSError as exc:
        return PathProblem(f"{path}: cannot look at it: {exc.strerror}", permission_only(exc.errno))


class FileSink:
    """Appends each event as one JSON line: a destination that needs no outside service."""

    def __init__(self, cfg: DestinationConfig) -> None:
        assert cfg.path is not None
        self._path: Path = cfg.path
        self._fd: int | None = None
        self._identity = (0, 0)  # (st_dev, st_ino) of the file open

    async def start(self) -> None:
        try:
            self._open()
        except ValueError as exc:
            raise DestfndError(f"{self._path}: {exc}") from None
        except OSError as exc:
            raise DestfndError(f"{self._path}: cannot open for appending: {exc.strerror}") from None

    def _open(self) -> None:
        """`path` opened (created, with its folders, if need be) in place of what was open."""
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_append(self._path, create=True)
        st = os.fstat(fd)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._identity = fd, (st.st_dev, st.st_ino)

    def _reopen_if_moved(self) -> None:
        """The file open is no longer at `path` (logrotate moved it away, or it was deleted):
        what follows goes to `path`, created again, rather than on into the old file unseen."""
        try:
            st = os.stat(self._path)
            if (st.st_dev, st.st_ino) == self._identity:
                return
        except FileNotFoundError:
            pass
        self._open()
        log.info("file_reopened", path=str(self._path))

    async def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # unbuffered: nothing is left to write, so nothing can fail here

    async def deliver(self, payloads: list[bytes], batched: bool) -> Report:
        assert self._fd is not None
        try:
            self._reopen_if_moved()
            _append_all(self._fd, b"".join(p + b"\n" for p in payloads), self._path)
        except OSError as exc:
            failed = retry(ErrorType.RETRY, f"cannot write {self._path}: {exc.strerror}")
            return same_for_all(failed, len(payloads))
        except ValueError as exc:  # something else than a file is at `path` now
            failed = retry(ErrorType.RETRY, f"cannot write {self._path}: {exc}")
            return same_for_all(failed, len(payloads))
        await asyncio.sleep(0)
        return same_for_all(DELIVERED, len(payloads))
