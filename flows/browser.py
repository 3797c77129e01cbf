"""A look at a page in a real browser: Debian's Chromium driven by Playwright (it downloads no browser).

What the UI tests and `python -m flows.browser` (the README's screenshot of the demo's report) use:

    python -m flows.browser runs/demo/report/<hash>/report.html docs/demo-report.png
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    """The path of the system's Chromium, or an error saying how to install it."""
    for name in CHROMIUM:
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no Chromium on PATH: install Debian's (`apt-get install chromium`; `make test` does it)")


def look(url: str, screenshot: str | Path | None = None, wait_for: str | None = None, timeout_s: float = 60,
         width: int = 1400, scale: float = 1.0) -> dict:
    """Open ``url`` (a path or http URL), wait for ``wait_for`` (a selector or `text=...`) and every image to
    load, save a full-page screenshot; return the page's title, text and its images (alt, src head, width)."""
    from playwright.sync_api import sync_playwright

    target = url if "://" in url else Path(url).resolve().as_uri()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            # bypass_csp: the waits below are scripts, which a strict page (the review page's CSP) forbids
            page = browser.new_page(viewport={"width": width, "height": 1000}, device_scale_factor=scale,
                                    bypass_csp=True)
            page.goto(target, timeout=timeout_s * 1000)
            if wait_for:
                page.wait_for_selector(wait_for, timeout=timeout_s * 1000)
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=timeout_s * 1000)
            if screenshot:
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                jpeg = str(screenshot).endswith((".jpg", ".jpeg"))
                page.screenshot(path=str(screenshot), full_page=True, **({"quality": 80} if jpeg else {}))
            images = page.evaluate("Array.from(document.images).map(i => ({alt: i.alt, src: i.src.slice(0, 32), "
                                   "width: i.naturalWidth, height: i.naturalHeight}))")
            return {"title": page.title(), "text": page.inner_text("body"), "images": images}
        finally:
            browser.close()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m flows.browser PAGE_OR_URL SCREENSHOT.png")
    seen = look(sys.argv[1], sys.argv[2], scale=0.65)  # README-sized
    print(f"{sys.argv[2]}: {len(seen['images'])} images, {sum(i['width'] > 0 for i in seen['images'])} loaded")
