"""The studio page in a real headless Chromium, driven over the Chrome DevTools protocol.

Needs Debian's `chromium` (apt-get install chromium) and `websocket-client` (pip install websocket-client,
in the `test` extra); skips with that message otherwise. Screenshots go to tests/artifacts/studio/
(ignored by git); set DITKIT_ARTIFACTS to write them elsewhere.
"""

import base64
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from ditkit.samplers import SAMPLERS
from test_studio import tiny_studio

INSTALL = (
    "install Chromium (Debian: apt-get install chromium, or `make browser`) "
    "and websocket-client (pip install websocket-client)"
)
ARTIFACTS = Path(os.environ.get("DITKIT_ARTIFACTS", Path(__file__).parent / "artifacts" / "studio"))


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """A headless Chromium page: evaluate JavaScript, wait for conditions, take screenshots."""

    def __init__(self, binary: str) -> None:
        import websocket

        self.profile = tempfile.mkdtemp(prefix="ditkit-chromium-")
        args = [binary, "--headless=new", "--no-first-run", "--no-default-browser-check", "--disable-gpu"]
        args += ["--remote-debugging-port=0", f"--user-data-dir={self.profile}", "--window-size=1280,1000"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.proc = subprocess.Popen(args + ["about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            pages = [t for t in json.load(resp) if t["type"] == "page"]
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {expression}")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path = ARTIFACTS / name
        path.write_bytes(base64.b64decode(data))
        print(f"screenshot: {path}")
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    binary = find_chromium()
    try:
        import websocket  # noqa: F401
    except ImportError:
        pytest.skip(f"no websocket-client: {INSTALL}")
    if binary is None:
        pytest.skip(f"no Chromium found: {INSTALL}")
    b = Browser(binary)
    yield b
    b.close()


@pytest.fixture(scope="module")
def studio_url():
    from ditkit.studio import make_server

    server = make_server(tiny_studio(), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def set_value(browser: Browser, selector: str, value) -> None:
    browser.js(
        f"(() => {{ const el = document.querySelector({json.dumps(selector)}); el.value = {json.dumps(str(value))};"
        " el.dispatchEvent(new Event('change')); })()"
    )


def click(browser: Browser, selector: str) -> None:
    browser.js(f"document.querySelector({json.dumps(selector)}).click()")


def test_page_samples_compares_inpaints_and_shows_errors(browser, studio_url):
    browser.send("Page.enable")
    browser.send("Page.navigate", url=studio_url)
    browser.wait_for("document.body && document.body.dataset.ready === 'true'")
    assert "4 classes" in browser.js("document.querySelector('#model-info').textContent")
    assert browser.js("document.querySelector('#A-sampler').options.length") == len(SAMPLERS)

    # Sample: request 4 images, watch them appear.
    set_value(browser, "#A-labels", "0, 1, 2, 3")
    set_value(browser, "#A-steps", 6)
    click(browser, "#run")
    browser.wait_for("document.querySelector('#result-A .status')?.dataset.status === 'done'")
    browser.wait_for(
        "(() => { const g = document.querySelector('#result-A img.grid');"
        " return g && !g.hidden && g.complete && g.naturalWidth > 0; })()"
    )
    assert browser.js("document.querySelector('#result-A img.grid').naturalWidth") == 4 * 10 + 2
    assert browser.js("document.querySelectorAll('#result-A .downloads figure').length") == 4
    assert browser.js("document.querySelector('#result-A .status').textContent").startswith("done")
    assert browser.js("document.querySelector('#error').hidden")
    browser.screenshot("01_samples.png")

    # Compare two settings side by side.
    click(browser, "#compare")
    set_value(browser, "#B-steps", 3)
    set_value(browser, "#B-sampler", "euler")
    click(browser, "#run")
    for slot in "AB":
        browser.wait_for(f"document.querySelector('#result-{slot} .status')?.dataset.status === 'done'")
        browser.wait_for(f"document.querySelector('#result-{slot} img.grid').naturalWidth > 0")
    assert "euler, 3 steps" in browser.js("document.querySelector('#result-B .settings-summary').textContent")
    browser.screenshot("02_compare.png")

    # Inpaint a result: edit it, mask the centre, fill it.
    click(browser, "#compare")
    set_value(browser, "#A-steps", 4)
    set_value(browser, "#A-labels", "1, 2")
    browser.js("document.querySelector('#result-A .downloads figure button').click()")
    browser.wait_for("!document.querySelector('#source').hidden && document.querySelector('#editor').width === 8")
    click(browser, "#mask-center")
    click(browser, "#run")
    assert browser.js("document.querySelector('#result-A .status').dataset.status") != "done"  # old result cleared
    browser.wait_for("document.querySelector('#result-A .status')?.dataset.status === 'done'")
    assert "inpaint" in browser.js("document.querySelector('#result-A .settings-summary').textContent")
    browser.wait_for("document.querySelectorAll('#result-A .downloads figure').length === 2")
    assert browser.js("document.querySelector('#error').hidden")
    browser.screenshot("04_inpaint.png")

    # Outpaint to the right: 2 rounds of 4 new columns.
    click(browser, "#tab-outpaint")
    set_value(browser, "#direction", "right")
    set_value(browser, "#times", 2)
    click(browser, "#run")
    browser.wait_for("document.querySelector('#result-A .status')?.dataset.status === 'done'")
    browser.wait_for("document.querySelector('#result-A .downloads figure img')?.naturalWidth === 16")
    browser.screenshot("05_outpaint.png")

    # Cancel a long request while it runs: the page says so and offers the run button again.
    click(browser, "#tab-sample")
    set_value(browser, "#A-steps", 1000)
    click(browser, "#run")
    browser.wait_for(
        "document.querySelector('#result-A .status')?.dataset.status === 'running'"
        " && !document.querySelector('#result-A button.cancel').hidden"
    )
    click(browser, "#result-A button.cancel")
    browser.wait_for("document.querySelector('#result-A .status')?.dataset.status === 'cancelled'")
    assert browser.js("document.querySelector('#result-A .status').textContent").startswith("cancelled at step")
    assert browser.js("document.querySelector('#result-A button.cancel').hidden")
    browser.wait_for("!document.querySelector('#run').disabled")
    assert browser.js("document.querySelector('#error').hidden")
    browser.screenshot("06_cancelled.png")

    # A bad request: the server's message shows in the page.
    set_value(browser, "#A-steps", 5000)
    click(browser, "#run")
    message = browser.wait_for(
        "(() => { const e = document.querySelector('#error'); return !e.hidden && e.textContent; })()"
    )
    assert "steps must be between 1 and 1000, got 5000" in message
    assert "Traceback" not in browser.js("document.body.innerText")
    browser.screenshot("07_error.png")
