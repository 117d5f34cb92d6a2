"""analytics.js (@segment/analytics-next, from the npm registry) in a real headless Chromium, on
a page served from another origin than the daemon's, as on a customer's site.

Runs when a Chromium (or Chrome) and npm are installed (`apt-get install chromium`); skipped
otherwise. This is what showed that analytics.js sends `Authorization` and so a preflight
`OPTIONS` before every first POST to a path: without an answer to it, no event ever left the
browser.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

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
// What the page's script sees of each answer from the daemon: its status, or "neterr" when
// the browser hides it (as it does when the CORS headers are missing).
const answers = [];
const realFetch = window.fetch;
window.fetch = async (...args) => {
  try {
    const response = await realFetch(...args);
    answers.push(String(response.status));
    return response;
  } catch (e) { answers.push("neterr"); throw e; }
};
(async () => {
  try {
    const [analytics] = await AnalyticsNext.AnalyticsBrowser.load(
      {writeKey: "@@KEY@@", cdnSettings: {integrations: {"Segment.io":
        {apiKey: "@@KEY@@", apiHost: api, protocol: "http"}}}},
      {disableClientPersistence: true});
    await analytics.track("Browser Clicked", {button: "buy"});
    await analytics.page("Home");
    await analytics.identify("browser-user", {plan: "pro"});
    // The Tracking Pixel API, as an email's <img>: one accepted, one refused (unknown key);
    // each should load as an image (a refused one too, as at Segment), not show broken.
    const pixel = (event) => new Promise((done) => {
      const img = new Image();
      img.onload = () => done("load" + img.naturalWidth);
      img.onerror = () => done("error");
      img.src = "http://" + api + "/pixel/track?data=" + btoa(JSON.stringify(event));
    });
    const opened = await pixel({writeKey: "@@KEY@@", userId: "mail-1", event: "Email Opened"});
    const refused = await pixel({writeKey: "nope", userId: "mail-2", event: "Email Opened"});
    out.textContent = "SENT " + answers.join(",") + " END PIXELS " + opened + "," + refused;
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
def analytics_js(tmp_path_factory) -> tuple[str, Path]:
    """The browser to run, and a folder with analytics.js's browser build (umd/) and the page
    that sends events."""
    chromium = _chromium()
    if chromium is None or shutil.which("npm") is None:
        pytest.skip("Chromium or npm is not installed")
    folder = tmp_path_factory.mktemp("analytics-js")
    packed = subprocess.run(
        ["npm", "pack", "--silent", ANALYTICS_JS],
        cwd=folder, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr[-2000:]
    # The "data" filter (3.11.4+) refuses paths out of the folder and special files.
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(folder / packed.stdout.strip().splitlines()[-1]) as tar:
        tar.extractall(folder, **safe)
    (folder / "package" / "dist" / "index.html").write_text(PAGE)
    return chromium, folder / "package" / "dist"


async def test_analytics_js_in_chromium_from_another_origin(make_daemon, tmp_path, analytics_js):
    chromium, dist = analytics_js
    async with Sink() as sink:
        source = f'[[sources]]\nname = "browser"\nwrite_key = "{BROWSER_KEY}"\n'
        cfg = config_text(tmp_path / "db.sqlite3", webhook("hook", sink.url), sources=source)
        daemon = await make_daemon(cfg).start()
        app = web.Application()
        app.router.add_static("/", dist)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            page_port = runner.addresses[0][1]
            api = daemon.url.removeprefix("http://") + "/v1"
            url = f"http://127.0.0.1:{page_port}/index.html?api={api}"
            browser = await asyncio.to_thread(
                subprocess.run,
                [chromium, "--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
                 "--virtual-time-budget=15000", "--dump-dom", url],
                capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
            )  # fmt: skip
            sent = re.search(r"SENT (.*) END", browser.stdout)
            assert sent, browser.stdout[-2000:] + browser.stderr[-2000:]
            # One POST per call, each answer readable by the page: nothing was sent twice.
            assert sent.group(1) == "200,200,200"
            assert "END PIXELS load1,load1" in browser.stdout
            await sink.wait_for(lambda: len(sink.delivered()) == 4)
        finally:
            await runner.cleanup()
    (pixel,) = [e for e in sink.delivered() if e.get("userId") == "mail-1"]
    assert (pixel["type"], pixel["event"]) == ("track", "Email Opened")
    by_type = {e["type"]: e for e in sink.delivered() if e.get("userId") != "mail-1"}
    assert set(by_type) == {"track", "page", "identify"}
    assert by_type["track"]["event"] == "Browser Clicked"
    assert by_type["track"]["properties"] == {"button": "buy"}
    assert by_type["identify"]["traits"]["plan"] == "pro"
    for event in by_type.values():
        assert event["context"]["library"]["name"] == "analytics.js"
        assert event["receivedAt"] and event["messageId"]
        assert "writeKey" not in event
