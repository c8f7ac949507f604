"""The chapter decks that `make book` / `make slides` build into
_build/html/slides, and the Japanese decks in _build/html/ja/slides.

In headless Chromium, offline, each deck of each edition: it opens with no
console error and no failed request (reveal.js and MathJax are local
copies), its math is typeset, every slide fits the 1280 x 720 slide box
(each slide's content measured with all its fragments shown), and the deck
has a slide for every section of its chapter (in the Japanese deck, the
section's Japanese title).  A Japanese deck has no English paragraph left
(the measure of tests/site/conftest.py) and says ``lang="ja"``; each
Japanese chapter page links its Japanese deck, and a deck's links to the
book land on pages and anchors of its own edition.  The notebooks
themselves: every cell has slide metadata, and no check cell is shown.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
LANGUAGES = ("en", "ja")
# where an edition's site and decks are, under the site's root
EDITION = {"en": "", "ja": "ja/"}
sys.path.insert(0, str(ROOT / "tools"))

import slides  # noqa: E402
import translate_notebooks  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _sections(chapter: Path, language: str = "en") -> list[str]:
    """The chapter's ``##`` section titles, in ``language`` (from its catalog)."""
    notebook = nbformat.read(chapter, as_version=4)
    titles = [
        match[1].strip()
        for cell in notebook.cells
        if cell.cell_type == "markdown"
        for match in re.finditer(r"^## (.+)$", cell.source, re.M)
    ]
    if language == "en":
        return titles
    po = ROOT / "locales" / language / "LC_MESSAGES" / "book" / f"{chapter.stem}.po"
    catalog = translate_notebooks.load_catalog(po)
    missing = [title for title in titles if title not in catalog]
    assert not missing, f"{po.name}: section titles without a translation: {missing}"
    return [catalog[title] for title in titles]


def _plain(title: str) -> str:
    """The longest stretch of a title without math, code or parentheses
    (MathJax and code font change how those read as text), 30 characters."""
    text = re.sub(r"\*|\{[^}]*\}", "", title)
    return max((part.strip() for part in re.split(r"[$`()（）]", text)), key=len)[:30]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_cell_has_slide_metadata_and_checks_are_skipped(chapter):
    notebook = nbformat.read(chapter, as_version=4)
    for index, cell in enumerate(notebook.cells):
        kind = slides.slide_type(cell)
        assert kind in slides.SLIDE_TYPES, f"cell {index}: slide_type {kind!r}"
        if set(cell.metadata.get("tags", [])) & slides.CHECK_TAGS:
            assert kind == "skip", f"cell {index} is a check cell shown on a slide"


def test_a_long_cell_keeps_its_lead_on_the_slide():
    lead, rest = slides.split_lead("## Title\n\nFirst paragraph.\n\n$$x$$\n\nMore.")
    assert lead == "## Title\n\nFirst paragraph." and rest == "$$x$$\n\nMore."
    words = " ".join(["word"] * 80)
    lead, rest = slides.split_lead(f"## T\n\nShort first sentence. More {words}.")
    assert lead == "## T\n\nShort first sentence." and rest.startswith("More word")
    # Japanese has no spaces between words: it is cut by its length, after "。"
    japanese = "短い最初の文です。" + "損失を計算する前に、出力をトークンと対応づけます。" * 10
    lead, rest = slides.split_lead(f"## 見出し\n\n{japanese}")
    assert lead == "## 見出し\n\n短い最初の文です。" and rest.startswith("損失を計算する前に")
    lead, rest = slides.split_lead("## 見出し\n\n短い段落です。二つ目の文です。")
    assert rest == ""


@pytest.fixture(scope="module", params=LANGUAGES)
def decks(request, browser, base_url, site_root, english_passages):
    language = request.param
    folder = site_root / EDITION[language] / "slides"
    if not folder.is_dir():
        pytest.fail(f"no decks in {folder}: run `make book`")
    measured = {"language": language}
    for chapter in CHAPTERS:
        errors: list[str] = []
        page = browser.new_page(viewport={"width": slides.WIDTH, "height": slides.HEIGHT})
        page.on("console", lambda msg, errors=errors: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
        page.on("requestfailed", lambda req, errors=errors: errors.append(f"request failed: {req.url}"))
        page.goto(f"{base_url}/{EDITION[language]}slides/{chapter.stem}.slides.html", wait_until="networkidle")
        page.wait_for_function("window.Reveal && Reveal.isReady()")
        page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise")
        page.evaluate("MathJax.startup.promise")
        sizes = page.evaluate(
            """() => {
                const out = [];
                const slides = Reveal.getSlides();
                slides.forEach((slide) => {
                    const index = Reveal.getIndices(slide);
                    Reveal.slide(index.h, index.v, 1000);  // every fragment shown
                    const box = slide.getBoundingClientRect();
                    const scale = Reveal.getScale();
                    out.push({
                        h: index.h, v: index.v,
                        height: slide.scrollHeight, width: slide.scrollWidth,
                        title: (slide.querySelector('h1, h2, h3') || {}).textContent || '',
                        text: slide.textContent.trim().slice(0, 60),
                    });
                });
                return out;
            }"""
        )
        math = page.locator("mjx-container").count()
        raw_math = page.evaluate("document.body.innerText.includes('$$')")
        english = english_passages(
            page,
            ".reveal .slides :is(p, li, h1, h2, h3, td, th, dt, dd)",
            ".jp-OutputArea, pre, .highlight",
            "code, mjx-container, .anchor-link",
            r"\[\w+(?:,\s*\w+)*\]",  # the citations' keys, "[key, key]", are names
        )
        measured[chapter.stem] = {
            "errors": errors, "sizes": sizes, "math": math, "raw_math": raw_math,
            "lang": page.evaluate("document.documentElement.lang"),
            "english": english,
        }
        page.close()
    return measured


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_the_deck_opens_offline_without_errors(decks, chapter):
    assert decks[chapter.stem]["errors"] == []


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_math_is_typeset(decks, chapter):
    deck = decks[chapter.stem]
    assert deck["math"] > 0 and not deck["raw_math"]


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_slide_fits_the_slide_box(decks, chapter):
    too_big = [
        (s["h"], s["v"], s["width"], s["height"], s["text"])
        for s in decks[chapter.stem]["sizes"]
        if s["height"] > slides.HEIGHT or s["width"] > slides.WIDTH
    ]
    assert not too_big, f"slides past {slides.WIDTH} x {slides.HEIGHT} (h, v, width, height, text): {too_big}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_every_section_has_a_slide(decks, chapter):
    titles = " | ".join(s["title"] for s in decks[chapter.stem]["sizes"])
    for section in _sections(chapter, decks["language"]):
        plain = _plain(section)
        assert plain and plain in titles, f"no slide for section {section!r}"


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_the_deck_is_in_its_language(decks, chapter):
    """``<html lang>``, and no slide (notes included) with an English
    paragraph, list item, heading or table cell in a translated deck."""
    deck = decks[chapter.stem]
    assert deck["lang"] == decks["language"]
    if decks["language"] != "en":
        assert not deck["english"], f"{len(deck['english'])} English passages: {deck['english'][:10]}"


@pytest.mark.parametrize("language", LANGUAGES)
def test_each_chapter_page_links_its_deck_in_the_same_edition(site_root, language):
    """The course-kit bar of each chapter page links the deck of its own
    edition, in the edition's words; the deck is there."""
    words = {"en": "This chapter as slides", "ja": "この章のスライド"}[language]
    for chapter in CHAPTERS:
        page = site_root / EDITION[language] / "book" / f"{chapter.stem}.html"
        html = page.read_text(encoding="utf-8")
        link = re.search(r'<a class="course-kit-slides" href="([^"]+)">(.*?)</a>', html)
        assert link, f"{page}: no link to the chapter's deck"
        assert link[1] == f"../slides/{chapter.stem}.slides.html" and words in link[2], link[0]
        deck = (page.parent / link[1]).resolve()
        assert deck.is_file(), f"{deck} missing"
        assert f'<html lang="{language}">' in deck.read_text(encoding="utf-8")[:300]


@pytest.mark.parametrize("language", LANGUAGES)
def test_a_decks_links_land_in_its_own_edition(site_root, language):
    """Every relative link of a deck names a page of its edition's site,
    and an anchor that page has (the Japanese pages' ids are the English
    ones: a translated heading's text is no anchor)."""
    edition = Path(os.path.normpath(site_root / EDITION[language]))
    broken = []
    for chapter in CHAPTERS:
        deck = edition / "slides" / f"{chapter.stem}.slides.html"
        for href in re.findall(r'<a href="([^"#][^"]*)"', deck.read_text(encoding="utf-8")):
            parts = urlsplit(href)
            if parts.scheme:
                continue
            target = Path(os.path.normpath(deck.parent / unquote(parts.path)))
            if edition not in target.parents or not target.is_file():
                broken.append(f"{deck.name} -> {href}")
            elif parts.fragment and f'id="{unquote(parts.fragment)}"' not in target.read_text(encoding="utf-8"):
                broken.append(f"{deck.name} -> {href} (no such anchor)")
    assert not broken, "\n".join(broken)
