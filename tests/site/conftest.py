"""Fixtures of the browser test: the built site served on localhost, and Chromium.

The test drives Debian's system Chromium with Playwright (no browser is ever
downloaded).  Without Chromium the tests are skipped with the reason, except
under CI (``CI`` set), where a missing browser is an error.

The site is ``_build/html`` (``make book``); ``BOOK_SITE=DIR`` tests another
build of it (a folder laid out the same way: ``DIR/index.html``,
``DIR/slides/``, ``DIR/ja/``).

Also shared: the measure of a block of text left in English on a page of
the Japanese edition (:func:`is_english`, and the ``english_passages``
fixture that applies it to a page's blocks).
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

SITE = Path(os.environ.get("BOOK_SITE") or Path(__file__).resolve().parents[2] / "_build" / "html").resolve()
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required under CI)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def site_root() -> Path:
    if not (SITE / "index.html").exists():
        _missing(f"no built site at {SITE}: run `make book` first")
    return SITE


@pytest.fixture(scope="session")
def base_url(site_root: Path) -> Iterator[str]:
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep the test output clean
            pass

    handler = functools.partial(QuietHandler, directory=str(site_root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    executable = os.environ.get("CHROMIUM") or next(
        (path for path in CHROMIUM_CANDIDATES if shutil.which(path)), None
    )
    if executable is None:
        _missing("Chromium not found (install Debian's `chromium` package to run the browser test)")
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            yield browser
        finally:
            browser.close()


LETTERS = re.compile(r"[A-Za-z\u3040-\u30ff\u4e00-\u9fff]")
JAPANESE = re.compile(r"[\u3040-\u30ff\u4e00-\u9fff]")


def is_english(text: str) -> bool:
    """A block left in English: 25 letters or more, under 30 % of them Japanese
    (kana and kanji), once code, math and names are taken out of ``text``."""
    letters = LETTERS.findall(text)
    return len(letters) >= 25 and len(JAPANESE.findall(text)) < 0.3 * len(letters)


TEXT_BLOCKS = """(args) => Array.from(document.querySelectorAll(args.blocks))
    .filter(e => !e.closest(args.outside))
    .map(e => { const c = e.cloneNode(true);
                c.querySelectorAll(args.aside).forEach(x => x.remove());
                return c.textContent; })"""


@pytest.fixture(scope="session")
def english_passages():
    """``find(page, blocks, outside, aside, drop=None)``: the text of each
    element of the open ``page`` matching ``blocks`` (CSS), not inside
    ``outside``, with its ``aside`` elements (code, math, names) removed and
    the matches of the regular expression ``drop`` too, that :func:`is_english`."""

    def find(page: object, blocks: str, outside: str, aside: str, drop: str | None = None) -> list[str]:
        texts = page.evaluate(TEXT_BLOCKS, {"blocks": blocks, "outside": outside, "aside": aside})
        texts = [re.sub(drop, "", text) if drop else text for text in texts]
        return [" ".join(text.split()) for text in texts if is_english(text)]

    return find
