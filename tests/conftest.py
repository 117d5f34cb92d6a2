from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from support import DaemonProcess


@pytest.fixture
def daemons(tmp_path) -> Iterator[list[DaemonProcess]]:
    """Daemon processes a test started; any still running are killed at teardown."""
    started: list[DaemonProcess] = []
    yield started
    for d in started:
        d.stop_quietly()


@pytest.fixture
def make_daemon(tmp_path, daemons):
    def make(
        config: str, env: dict[str, str] | None = None, open_files: tuple[int, int] | None = None
    ) -> DaemonProcess:
        d = DaemonProcess(tmp_path, config, env, open_files)
        daemons.append(d)
        return d

    return make


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s
