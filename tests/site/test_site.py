"""The built site, opened page by page in headless Chromium.

Checks what a reader would notice: JavaScript errors, math left as raw TeX,
broken images, links to pages or anchors that do not exist, a search that
finds nothing, a chapter without its notebook download.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

SKIP_DIRS = {"_static", "_sources", "_images", "reveal.js"}  # reveal.js: the decks' library
MATHJAX_READY = "() => window.MathJax && MathJax.startup && MathJax.startup.promise"


REDIRECT = re.compile(r'<meta http-equiv="Refresh" content="0; url=([^"]+)"', re.IGNORECASE)


def is_redirect(path: Path) -> bool:
    return bool(REDIRECT.search(path.read_text(encoding="utf-8")))


def site_pages(site_root: Path) -> list[Path]:
    return sorted(
        path for path in site_root.rglob("*.html")
        if not SKIP_DIRS.intersection(path.relative_to(site_root).parts) and not is_redirect(path)
    )


def chapter_pages(site_root: Path) -> list[Path]:
    return sorted((site_root / "book").glob("[0-9][0-9]_*.html"))


def ids_in(html_file: Path, cache: dict[Path, set[str]]) -> set[str]:
    if html_file not in cache:
        text = html_file.read_text(encoding="utf-8")
        cache[html_file] = set(re.findall(r'\bid="([^"]+)"', text))
    return cache[html_file]


@pytest.fixture(scope="module")
def visited(browser, base_url, site_root):
    """Open every page once and record what the checks need."""
    results = {}
    context = browser.new_context()
    for path in site_pages(site_root):
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda msg, errors=errors: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
        page.on("requestfailed", lambda req, errors=errors: errors.append(f"request failed: {req.url}"))
        relative = path.relative_to(site_root).as_posix()
        page.goto(f"{base_url}/{relative}", wait_until="load")
        has_math = page.evaluate("() => document.querySelectorAll('.math').length > 0")
        if has_math:
            page.wait_for_function(MATHJAX_READY, timeout=20_000)
            page.evaluate("() => MathJax.startup.promise")
        results[relative] = {
            "errors": errors,
            "math": page.evaluate(
                """() => {
                    const maths = Array.from(document.querySelectorAll('.math'));
                    return {
                        total: maths.length,
                        unrendered: maths.filter(m => !m.querySelector('mjx-container'))
                                         .map(m => m.textContent.slice(0, 60)),
                        tex_errors: document.querySelectorAll('mjx-merror').length,
                    };
                }"""
            ),
            "broken_images": page.evaluate(
                "() => Array.from(document.images)"
                ".filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)"
            ),
            "links": page.evaluate("() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"),
            "text": page.evaluate("() => document.body.innerText"),
        }
        page.close()
    context.close()
    return results


def test_every_page_loads_without_console_errors(visited):
    assert len(visited) >= 3
    bad = {page: result["errors"] for page, result in visited.items() if result["errors"]}
    assert not bad, f"console errors or failed requests: {bad}"


def test_math_is_rendered_by_the_local_mathjax(visited):
    chapters_with_math = [page for page, result in visited.items() if result["math"]["total"]]
    assert "book/01_tensor_shapes.html" in chapters_with_math
    for page in chapters_with_math:
        math = visited[page]["math"]
        assert not math["unrendered"], f"{page}: raw TeX left unrendered: {math['unrendered'][:5]}"
        assert math["tex_errors"] == 0, f"{page}: {math['tex_errors']} TeX errors"


def test_every_image_loads(visited):
    bad = {page: result["broken_images"] for page, result in visited.items() if result["broken_images"]}
    assert not bad, f"images that did not load: {bad}"


def test_glue_references_and_directives_are_resolved(visited):
    for page, result in visited.items():
        for leftover in ("{glue:", "{cite:", "{exercise}", "{solution-start}", "```"):
            assert leftover not in result["text"], f"{page}: unresolved {leftover!r} in the text"


def test_internal_links_resolve(visited, base_url, site_root):
    cache: dict[Path, set[str]] = {}
    broken = []
    for page, result in visited.items():
        for href in result["links"]:
            if not href.startswith(base_url):
                continue
            parts = urlsplit(href)
            target = site_root / unquote(parts.path).lstrip("/")
            pdfs = (site_root / "book.pdf", site_root / "ja" / "book.pdf")
            if target in pdfs and not target.exists() and not os.environ.get("REQUIRE_PDF"):
                continue  # `make pdf` writes them (tests/pdf checks the links then)
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page} -> {href}")
            elif (
                parts.fragment
                and not parts.fragment.startswith("/")  # reveal.js's own slide addresses
                and target.suffix == ".html"
                and unquote(parts.fragment) not in ids_in(target, cache)
            ):
                broken.append(f"{page} -> {href} (no such anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(sorted(set(broken)))


def test_every_page_links_the_pdf_and_each_chapter_its_slides(visited, site_root):
    for page, result in visited.items():
        if not page.startswith(("book/", "ja/book/")):
            continue
        # each edition links its own PDF
        pdf = "/ja/book.pdf" if page.startswith("ja/") else "/book.pdf"
        links = [link for link in result["links"] if link.endswith("/book.pdf")]
        assert links and all(link.endswith(pdf) for link in links), (page, links)
        assert page.startswith("ja/") or not any("/ja/" in link for link in links), (page, links)
    for chapter in chapter_pages(site_root):
        page = chapter.relative_to(site_root).as_posix()
        deck = f"slides/{chapter.stem}.slides.html"
        assert any(link.endswith(deck) for link in visited[page]["links"]), page
        assert (site_root / deck).is_file(), f"{deck} missing: run `make slides`"


def test_each_chapter_offers_its_notebook_for_download(visited, site_root):
    chapters = chapter_pages(site_root)
    assert chapters, "no chapter pages were built"
    for chapter in chapters:
        page = chapter.relative_to(site_root).as_posix()
        notebook = f"_sources/book/{chapter.stem}.ipynb"
        assert any(link.endswith(notebook) for link in visited[page]["links"]), page
        assert (site_root / notebook).exists()


def test_the_front_door_redirects_to_the_introduction(site_root):
    match = REDIRECT.search((site_root / "index.html").read_text(encoding="utf-8"))
    assert match and match.group(1) == "book/intro.html"
    assert (site_root / match.group(1)).exists()


def test_search_finds_a_term_from_a_chapter(browser, base_url):
    page = browser.new_page()
    page.goto(f"{base_url}/search.html?q=contiguous", wait_until="load")
    page.wait_for_selector("#search-results ul.search li", timeout=20_000)
    hits = page.evaluate(
        "() => Array.from(document.querySelectorAll('#search-results ul.search li a')).map(a => a.href)"
    )
    page.close()
    assert any("01_tensor_shapes" in hit for hit in hits), hits


def test_the_api_reference_lists_every_public_name(site_root):
    """Every name in a library module's ``__all__`` has its entry on the page."""
    import importlib

    page = (site_root / "book" / "api.html").read_text(encoding="utf-8")
    anchors = set(re.findall(r'id="([^"]+)"', page))
    modules = re.findall(
        r"^\.\. automodule:: (companion\.\w+)$",
        (site_root.parents[1] / "book" / "api.md").read_text(), re.M,
    )
    assert len(modules) >= 8
    missing = [
        f"{module}.{name}"
        for module in modules
        for name in importlib.import_module(module).__all__
        if f"{module}.{name}" not in anchors
    ]
    assert not missing, missing


def test_dark_mode_shows_no_white_boxes(browser, base_url, site_root):
    """In the theme's dark mode a chapter's figure, admonition and table
    are dark too: no light box on the dark page (figures are drawn on
    white and inverted by _static/book.css)."""
    import io

    from PIL import Image

    context = browser.new_context(color_scheme="dark", viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(f"{base_url}/book/04_keras_masking.html", wait_until="load")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    brightness = {}
    for name, selector in (("figure", "div.cell_output img"), ("admonition", "div.admonition"),
                           ("table", "div.cell_output table")):
        element = page.locator(selector).first
        element.scroll_into_view_if_needed()
        picture = Image.open(io.BytesIO(element.screenshot())).convert("L")
        brightness[name] = sum(picture.getdata()) / (255 * picture.width * picture.height)
    context.close()
    assert all(value < 0.35 for value in brightness.values()), brightness


def test_the_introduction_names_each_heading_once(browser, base_url):
    """The table of contents' captions (Chapters, Appendix, Back matter) are
    not repeated by a heading of the same name in the page's article."""
    page = browser.new_page()
    page.goto(f"{base_url}/book/intro.html", wait_until="load")
    names = page.evaluate(
        """() => Array.from(document.querySelectorAll('article h1, article h2, article h3, article p.caption'))
                 .map(e => e.textContent.replace(/[#¶]/g, '').trim())"""
    )
    page.close()
    for caption in ("Chapters", "Appendix", "Back matter"):
        assert names.count(caption) == 1, (caption, names)


def _ja_pages(site_root: Path) -> list[Path]:
    return sorted((site_root / "ja" / "book").glob("*.html"))


def test_every_page_links_the_same_page_in_the_other_language(visited, site_root):
    english = sorted((site_root / "book").glob("*.html"))
    japanese = _ja_pages(site_root)
    assert [p.name for p in english] == [p.name for p in japanese], "the two editions differ in pages"
    for page in english:
        links = visited[page.relative_to(site_root).as_posix()]["links"]
        assert any(link.endswith(f"/ja/book/{page.name}") for link in links), page.name
    for page in japanese:
        links = visited[page.relative_to(site_root).as_posix()]["links"]
        assert any(link.endswith(f"/book/{page.name}") and "/ja/" not in link for link in links), page.name


@pytest.mark.parametrize("query, page", [
    ("交差", "03_cross_entropy"), ("損失", "02_llava_loss"), ("分母", "05_one_denominator"),
    ("label_padding_loss", "api"),
])
def test_the_japanese_search_finds_japanese_words_and_code_names(browser, base_url, query, page):
    tab = browser.new_page()
    tab.goto(f"{base_url}/ja/search.html?q={query}", wait_until="load")
    tab.wait_for_function(
        "() => document.querySelectorAll('#search-results li').length > 0"
        " || (document.querySelector('#search-results p') || {}).textContent", timeout=20_000)
    found = tab.evaluate("() => Array.from(document.querySelectorAll('#search-results li a')).map(a => a.href)")
    tab.close()
    assert any(f"/ja/book/{page}.html" in link for link in found), (query, found[:8])


def test_no_english_paragraph_is_left_in_a_japanese_page(browser, base_url, site_root, english_passages):
    """Each paragraph, list item, heading and table cell of a Japanese page
    is mostly Japanese once code, math and names are set aside (the API
    page's docstrings are English by design)."""
    tab = browser.new_page()
    english = []
    for path in _ja_pages(site_root):
        if path.stem == "api":
            continue
        tab.goto(f"{base_url}/ja/book/{path.name}", wait_until="load")
        for text in english_passages(
            tab,
            "article p, article li, article h1, article h2, article h3, article td, article dt, article dd",
            ".cell_output, pre, .highlight, .bibliography, .citation, nav",
            "code, .math, mjx-container, .headerlink, a.reference.external, cite, .footnote-reference",
        ):
            english.append(f"{path.stem}: {text[:80]!r}")
        # short labels too: the buttons of collapsed cells, the course-kit bar
        for label in tab.evaluate(
            "() => Array.from(document.querySelectorAll('article summary, nav.course-kit a:not(.language-switch)'))"
            ".map(e => e.textContent.trim())"
        ):
            if not re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", label):
                english.append(f"{path.stem}: label {label!r}")
    tab.close()
    assert not english, f"{len(english)} English passages:\n" + "\n".join(sorted(set(english))[:25])
