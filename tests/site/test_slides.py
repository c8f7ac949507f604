"""The chapter decks that `make slides` builds into _build/html/slides.

In headless Chromium, offline: every deck opens with no console error and
no failed request (reveal.js and MathJax are local copies), its math is
typeset, every slide fits the 1280 x 720 slide box (each slide's content
measured with all its fragments shown), and the deck has a slide for every
section of its chapter.  The notebooks themselves: every cell has slide
metadata, and no check cell is shown.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
SLIDES = ROOT / "_build" / "html" / "slides"
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
sys.path.insert(0, str(ROOT / "tools"))

import slides  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _sections(chapter: Path) -> list[str]:
    notebook = nbformat.read(chapter, as_version=4)
    return [
        match[1].strip()
        for cell in notebook.cells
        if cell.cell_type == "markdown"
        for match in re.finditer(r"^## (.+)$", cell.source, re.M)
    ]


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


@pytest.fixture(scope="module")
def decks(browser, base_url):
    if not SLIDES.is_dir():
        pytest.fail(f"no decks in {SLIDES}: run `make slides`")
    measured = {}
    for chapter in CHAPTERS:
        errors: list[str] = []
        page = browser.new_page(viewport={"width": slides.WIDTH, "height": slides.HEIGHT})
        page.on("console", lambda msg, errors=errors: errors.append(msg.text) if msg.type == "error" else None)
        page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
        page.on("requestfailed", lambda req, errors=errors: errors.append(f"request failed: {req.url}"))
        page.goto(f"{base_url}/slides/{chapter.stem}.slides.html", wait_until="networkidle")
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
        measured[chapter.stem] = {"errors": errors, "sizes": sizes, "math": math, "raw_math": raw_math}
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
    for section in _sections(chapter):
        # the title up to its first math, code or parenthesis (MathJax and
        # code font change how the rest reads as text)
        plain = re.split(r"[$`(]", re.sub(r"\*|\{[^}]*\}", "", section))[0].strip()[:30]
        assert plain in titles, f"no slide for section {section!r}"
