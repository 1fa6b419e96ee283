"""Write the screenshots docs/server.md shows: the default IOI view, an ablation diff, a
component page and a saved-then-reopened investigation.

    python scripts/screenshots.py            # writes docs/img/*.png (about a minute)
    python scripts/screenshots.py --out /tmp/img

It scans a slice of the demo corpus (so component pages exist), starts `tdb serve --scan` on a
free loopback port, and drives Debian's chromium with Playwright as the browser tests do. If the
page has changed so that an element it waits for is gone, it stops with a message naming it.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
TIMEOUT_MS = 120_000
MAX_BYTES = 300_000
VIEWPORT = {"width": 1400, "height": 900}
IOI = {
    "prompt": "When Mary and John went to the store, John gave a drink to",
    "target": " Mary",
    "distractor": " John",
}


class PageChangedError(Exception):
    pass


def tdb(*args: str) -> list[str]:
    return [sys.executable, "-m", "tdb.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_scan(folder: Path) -> Path:
    """A small scan of the demo corpus's first documents (seconds), for the component pages."""
    from tdb.scan.corpus import DEMO_CORPUS

    corpus = folder / "corpus.txt"
    corpus.write_text("".join(DEMO_CORPUS.read_text().splitlines(keepends=True)[:24]))
    out = folder / "scan"
    command = tdb("scan", "--corpus", str(corpus), "--out", str(out), "-k", "8", "--quiet")
    subprocess.run([*command, "--window", "32"], check=True, cwd=ROOT)
    # Explanations for the heads, so the component page shows one (seconds on this slice).
    explain = tdb("explain", "--scan", str(out), "--components", "heads")
    subprocess.run(explain, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def start_server(scan: Path, port: int) -> subprocess.Popen[bytes]:
    server = subprocess.Popen(tdb("serve", "--scan", str(scan), "--port", str(port)), cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"screenshots: tdb serve exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/model", timeout=2):
                return server
        except OSError:
            time.sleep(0.5)
    server.terminate()
    sys.exit("screenshots: tdb serve did not answer within 120 s")


def wait(
    page: Page, selector: str, what: str, text: str | None = None, visible: bool = True
) -> None:
    """Wait for `selector` (with `text`, if given; in the DOM, if not `visible`), or stop: the
    page no longer has it."""
    try:
        locator = page.locator(selector).first
        locator.wait_for(state="visible" if visible else "attached", timeout=TIMEOUT_MS)
        if text is not None:
            page.wait_for_function(
                "([s, t]) => document.querySelector(s)?.textContent.includes(t)",
                arg=[selector, text],
                timeout=TIMEOUT_MS,
            )
    except PlaywrightError:
        raise PageChangedError(
            f"waiting for {what} ({selector!r}{f' containing {text!r}' if text else ''}): not "
            "there; the page has changed, so update scripts/screenshots.py"
        ) from None


def idle(page: Page) -> None:
    """The node table page has finished computing (its status line is empty again)."""
    page.wait_for_function(
        "() => !document.querySelector('#status')?.textContent", timeout=TIMEOUT_MS
    )
    page.wait_for_load_state("networkidle")


def shoot(page: Page, path: Path) -> None:
    """A viewport screenshot, reduced to a 256-colour palette if it is over MAX_BYTES."""
    data = page.screenshot()
    if len(data) > MAX_BYTES:
        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("RGB").quantize(256)
        buffer = io.BytesIO()
        image.save(buffer, "PNG", optimize=True)
        data = buffer.getvalue()
    path.write_bytes(data)
    print(
        f"screenshots: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
        f"({len(data) // 1000} kB)"
    )


def top_head(base: str) -> dict[str, Any]:
    """The IOI example's attention head with the largest direct effect (POST /api/nodes)."""
    body = {**IOI, "k": 5, "node_types": ["attention_head"], "sort": "direct_effect"}
    request = urllib.request.Request(
        f"{base}/api/nodes", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        nodes = json.load(response)["nodes"]
    if not nodes or not nodes[0].get("component"):
        raise PageChangedError("POST /api/nodes: no attention head with a component page")
    return dict(nodes[0])


def screenshots(base: str, out: Path, work: Path) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox", "--headless"]
        )
        context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)

        page.goto(base + "/")
        wait(page, "#example", "the IOI example button")
        page.click("#example")
        page.click("#submit")
        wait(page, "#node-table tbody tr", "the node table's rows")
        idle(page)
        shoot(page, out / "ioi.png")

        # The head with the largest direct effect (asked of the API, whatever the table's
        # order): its ablation and its component page.
        head = top_head(base)
        button = f"#node-table tbody tr[data-node='{head['id']}'] button[data-action='ablate']"
        wait(page, button, f"the ablate button of {head['id']}'s row")
        page.click(button)
        wait(page, "[data-testid='ablation']", "the ablation chip")
        wait(page, "#direction-extra", "the value before the ablation", "before ablation")
        idle(page)
        # The direction's value (before / after) at the top, the diff columns below it.
        page.locator("#direction-value").evaluate(
            "e => window.scrollTo(0, e.getBoundingClientRect().top + window.scrollY - 60)"
        )
        shoot(page, out / "ablation.png")

        wait(page, "#save-investigation", "the Save button")
        with page.expect_download() as download:
            page.click("#save-investigation")
        saved = work / "ioi-ablation.tdb.json"
        download.value.save_as(saved)

        reopened = context.new_page()
        reopened.set_default_timeout(TIMEOUT_MS)
        reopened.goto(base + "/")
        wait(reopened, "#open-investigation", "the Open file input", visible=False)
        reopened.set_input_files("#open-investigation", str(saved))
        wait(
            reopened,
            "#investigation-banner",
            "the opened investigation banner",
            "restored view matches",
        )
        idle(reopened)
        shoot(reopened, out / "investigation.png")

        # Opened from the investigation: the current prompt's activations and a way back.
        query = urllib.parse.urlencode({"prompt": IOI["prompt"], "from": base + "/"})
        page.goto(f"{base}{head['component']}?{query}")
        wait(page, "h1", "the component page's title")
        page.wait_for_load_state("networkidle")
        shoot(page, out / "component.png")
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="PNG folder")
    args = parser.parse_args()
    if not CHROMIUM.is_file():
        sys.exit(f"screenshots: {CHROMIUM} is missing (bash scripts/setup.sh installs it)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        port = free_port()
        server = start_server(make_scan(work), port)
        try:
            screenshots(f"http://127.0.0.1:{port}", args.out.resolve(), work)
        except PageChangedError as e:
            sys.exit(f"screenshots: {e}")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
