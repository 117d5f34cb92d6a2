"""analytics.js (@segment/analytics-next, from the npm registry) in a real headless Chromium, on
a page served from another origin than the daemon's, as on a customer's site.

Runs when a Chromium (or Chrome) and npm are installed (`apt-get install chromium`); skipped
otherwise. This is what showed that analytics.js sends `Authorization` and so a preflight
`OPTIONS` before every first POST to a path: without an answer to it, no event ever left the
browser.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tarfile

import pytest
from aiohttp import web
from support import Sink, config_text, webhook

ANALYTICS_JS = "@segment/analytics-next@1.84.3"
BROWSER_KEY = "wk_browser"

PAGE = """<!doctype html><html><head><title>analytics.js</title></head><body>
<pre id="out">waiting</pre>
<script src="umd/index.js"></script>
<script>
const api = new URLSearchParams(location.search).get("api");  // host:port/v1 of the daemon
const out = document.getElementById("out");
(async () => {
  try {
    const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(
      {writeKey: "@@KEY@@", cdnSettings: {integrations: {"Segment.io":
        {apiKey: "@@KEY@@", apiHost: api, protocol: "http"}}}},
      {disableClientPersistence: true});
    await analytics.track("Browser Clicked", {button: "buy"});
    await analytics.page("Home");
    await analytics.identify("browser-user", {plan: "pro"});
    out.textContent = "SENT";
  } catch (e) { out.textContent = "ERROR " + e; }
})();
</script></body></html>
""".replace("@@KEY@@", BROWSER_KEY)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A folder with analytics.js's browser build (umd/) and the page that sends events."""
    if _chromium() is None or shutil.which("npm") is None:
        pytest.skip("Chromium and npm are not installed")
    folder = tmp_path_factory.mktemp("analytics-js")
    packed = subprocess.run(
        ["npm", "pack", "--silent", ANALYTICS_JS],
        cwd=folder, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr[-2000:]
    with tarfile.open(folder / packed.stdout.strip().splitlines()[-1]) as tar:
        tar.extractall(folder, filter="data")
    (folder / "package" / "dist" / "index.html").write_text(PAGE)
    return folder / "package" / "dist"


async def test_analytics_js_in_chromium_from_another_origin(make_daemon, tmp_path, site):
    async with Sink() as sink:
        source = f'[[sources]]\nname = "browser"\nwrite_key = "{BROWSER_KEY}"\n'
        cfg = config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url), sources=source)
        daemon = await make_daemon(cfg).start()
        app = web.Application()
        app.router.add_static("/", site)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        page_site = web.TCPSite(runner, "127.0.0.1", 0)
        await page_site.start()
        try:
            page_port = runner.addresses[0][1]
            api = daemon.url.removeprefix("http://") + "/v1"
            url = f"http://127.0.0.1:{page_port}/index.html?api={api}"
            browser = await asyncio.to_thread(
                subprocess.run,
                [_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
                 "--virtual-time-budget=15000", "--dump-dom", url],
                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            assert "SENT" in browser.stdout, browser.stdout[-2000:] + browser.stderr[-2000:]
            await sink.wait_for(lambda: len(sink.delivered()) == 3)
        finally:
            await runner.cleanup()
    by_type = {e["type"]: e for e in sink.delivered()}
    assert set(by_type) == {"track", "page", "identify"}
    assert by_type["track"]["event"] == "Browser Clicked"
    assert by_type["track"]["properties"] == {"button": "buy"}
    assert by_type["identify"]["traits"]["plan"] == "pro"
    for event in sink.delivered():
        assert event["context"]["library"]["name"] == "analytics.js"
        assert event["receivedAt"] and event["messageId"]
        assert "writeKey" not in event
