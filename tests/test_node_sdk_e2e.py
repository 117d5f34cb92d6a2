"""Segment's Node SDK (@segment/analytics-node, from the npm registry) against the real daemon."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest
from support import WRITE_KEY, Sink, config_text, webhook

NODE_SDK = "@segment/analytics-node@3.1.0"

SEND_MJS = """
import { Analytics } from '@segment/analytics-node'
const [host, writeKey] = process.argv.slice(2)
const analytics = new Analytics({ writeKey, host, flushAt: 3, maxRetries: 0 })
let failed = 0
analytics.on('error', (err) => { failed += 1; console.error('SDK error', err) })
analytics.identify({ userId: 'node-user', traits: { plan: 'pro' } })
analytics.track({ userId: 'node-user', event: 'Order Completed', properties: { revenue: 12.5 } })
analytics.page({ anonymousId: 'anon-1', name: 'Home' })
analytics.group({ userId: 'node-user', groupId: 'g1', traits: { name: 'Initech' } })
analytics.alias({ userId: 'node-user', previousId: 'anon-1' })
analytics.screen({ userId: 'node-user', name: 'Main' })
await analytics.closeAndFlush()
process.exit(failed ? 1 : 0)
"""


@pytest.fixture(scope="module")
def node_sdk(tmp_path_factory):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed")
    folder = tmp_path_factory.mktemp("node-sdk")
    (folder / "package.json").write_text('{"name": "sdk-check", "private": true}')
    installed = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", NODE_SDK],
        cwd=folder, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr[-2000:]
    (folder / "send.mjs").write_text(SEND_MJS)
    return folder


async def test_node_sdk_events_arrive_intact(make_daemon, tmp_path, node_sdk):
    async with Sink() as sink:
        daemon = await make_daemon(
            config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url))
        ).start()
        result = await asyncio.to_thread(
            subprocess.run, ["node", "send.mjs", daemon.url, WRITE_KEY], cwd=node_sdk,
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        await sink.wait_for(lambda: len(sink.delivered()) == 6)
    by_type = {e["type"]: e for e in sink.delivered()}
    assert set(by_type) == {"identify", "track", "page", "group", "alias", "screen"}
    track = by_type["track"]
    assert track["properties"] == {"revenue": 12.5}
    assert track["context"]["library"]["name"] == "@segment/analytics-node"
    assert by_type["alias"]["previousId"] == "anon-1"
    assert all(e["receivedAt"] and e["messageId"].startswith("node-") for e in sink.delivered())
