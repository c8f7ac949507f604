"""Full-page screenshots of every chapter of the built site, for review by eye.

Usage: ``make screenshots`` (after ``make book``); PNGs go to _build/screenshots/,
the Japanese edition's pages as ``ja-<page>.png``.
"""

from __future__ import annotations

import functools
import http.server
import sys
import threading
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "_build" / "html"
OUT = ROOT / "_build" / "screenshots"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def main(chromium: str = "/usr/bin/chromium", width: int = 1280) -> None:
    pages = sorted((SITE / "book").glob("*.html")) + sorted((SITE / "ja" / "book").glob("*.html"))
    if not pages:
        sys.exit(f"no built pages under {SITE}: run `make book` first")
    OUT.mkdir(parents=True, exist_ok=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(SITE)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": width, "height": 900})
        for path in pages:
            page.goto(f"{base}/{path.relative_to(SITE).as_posix()}", wait_until="load")
            page.wait_for_function("() => !window.MathJax || (MathJax.startup && MathJax.startup.promise)")
            page.evaluate("() => window.MathJax ? MathJax.startup.promise : null")
            prefix = "ja-" if path.parent.parent.name == "ja" else ""
            target = OUT / f"{prefix}{path.stem}.png"
            page.screenshot(path=str(target), full_page=True)
            print(target.relative_to(ROOT))
        browser.close()
    server.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:2])
