"""The frame protocol between the daemon and a worker: a 4-byte big-endian length, then one
orjson object. It runs on its own pipe pair (not stdout/stderr), so output cannot corrupt it.

Daemon -> worker: {"t": "init", ...}, {"t": "call", "id", "events", "batch", "stages"},
{"t": "cancel", "id"}, {"t": "ping", "id"}.
Worker -> daemon: {"t": "ready", ...} or {"t": "init_error", "message"}, {"t": "result", "id",
"outcomes", "events", "logs", "requests", "out_of_memory"?, "exiting"?, "exit_code"?},
{"t": "pong", "id", "stuck"}.
An outcome is {"kind": ok|retry|discard|drop, "error_type", "message", "retry_after_s"}.
"""

from __future__ import annotations

import asyncio
import os
import struct

import orjson

# A worker's exit code after a MemoryError (EX_SOFTWARE): in a handler, once it has replied;
# reading a call too big for its memory_limit, at once.
OUT_OF_MEMORY_EXIT = 70
# Its exit code once it has replied to a batch in which a plain `def` handler ran out of its
# share of the timeout and still holds its thread (EX_TEMPFAIL): the daemon replaces it.
STUCK_EXIT = 75
MAX_FRAME_BYTES = 256 * 1024 * 1024  # far above any legitimate frame; guards a corrupt length
_HEADER = struct.Struct(">I")


def call_timeout_s(timeout_s: float, stages: list[str]) -> float:
    """What a call may take, as both sides time it: a `timeout` for each function in it, for
    them together (Segment gives an insert function and the destination function behind it
    5 s each; one call runs both here, and either may use what the other leaves)."""
    return timeout_s * (2 if "insert" in stages and "function" in stages else 1)


class ProtocolError(Exception):
    """The other side sent something that is not a frame."""


def encode(message: dict) -> bytes:
    body = orjson.dumps(message)
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict | None:
    """The next message, or None at a clean end of stream."""
    try:
        header = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("stream ended inside a frame header") from None
        return None
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {size} bytes")
    try:
        body = await reader.readexactly(size)
    except asyncio.IncompleteReadError:
        raise ProtocolError("stream ended inside a frame") from None
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("Not enough memory"):  # orjson's words for a MemoryError
            raise MemoryError(str(exc)) from None
        raise ProtocolError(f"a frame is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError("a frame is not an object")
    return message


class _ReaderProtocol(asyncio.StreamReaderProtocol):
    def eof_received(self) -> bool:
        super().eof_received()
        # Close the pipe at EOF. asyncio's loop does anyway; uvloop keeps it open when this
        # is True (as StreamReaderProtocol answers), until garbage collection finds the
        # transport: a descriptor per exited worker.
        return False


async def open_pipes(
    read_fd: int, write_fd: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over two pipe file descriptors (inherited or from os.pipe()), which it
    owns from its first step: if it fails or is cancelled part-way, both are closed (but for
    KeyboardInterrupt and SystemExit, on the way out of the process anyway)."""
    loop = asyncio.get_running_loop()
    read_file = os.fdopen(read_fd, "rb", buffering=0)
    write_file = os.fdopen(write_fd, "wb", buffering=0)
    reader = asyncio.StreamReader(limit=MAX_FRAME_BYTES)
    read_transport: asyncio.BaseTransport | None = None
    try:
        read_transport, _ = await loop.connect_read_pipe(lambda: _ReaderProtocol(reader), read_file)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, write_file
        )
    except (KeyboardInterrupt, SystemExit):
        raise  # uvloop keeps its transport open for these: closing under it aborts
    except BaseException:
        if read_transport is not None:
            read_transport.close()
        # Now, not at garbage collection: a pipe connect_*_pipe failed on may already be
        # closed by uvloop's transport but still be open in its file object, whose late close
        # would hit whatever took the number by then. Closing an open one again is a no-op.
        for file in (read_file, write_file):
            try:
                file.close()
            except OSError:
                pass  # EBADF: the transport closed it
        raise
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return reader, writer
