"""The Japanese catalogs are complete and current.

Every string that Sphinx offers for translation in every page of the book
has a Japanese translation that is neither missing nor fuzzy, keeps the
English's markup (glued numbers, citations, API roles, math, code) and is
Japanese text; the exercises' titles too.  The templates are extracted from
the current English sources on each run, so an edit to the English that is
not carried into the catalogs (`python tools/translations.py update ja`,
then translate what it marks) fails here.

One part of the book stays in English on purpose: the docstrings of the
package, which the API reference page renders (they are the package's
reference, written beside its code); that page's own prose is translated.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import pytest
from babel.messages.pofile import read_po

ROOT = Path(__file__).resolve().parent.parent
CATALOGS = ROOT / "locales" / "ja" / "LC_MESSAGES"
sys.path.insert(0, str(ROOT / "tools"))

import check_translations  # noqa: E402
import translations  # noqa: E402


def _read(path: Path):
    with path.open("rb") as handle:
        return read_po(handle)


def _api_page_text() -> str:
    return re.sub(r"\s+", " ", (ROOT / "book" / "api.md").read_text(encoding="utf-8"))


def _is_docstring(page: str, msgid: str) -> bool:
    return page == "api" and re.sub(r"\s+", " ", msgid) not in _api_page_text()


@pytest.fixture(scope="module")
def templates() -> dict[str, set[str]]:
    """The msgids Sphinx extracts from the English sources now, per page."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = translations.extract(Path(tmp))
        return {
            pot.stem: {m.id for m in _read(pot) if m.id}
            for pot in (folder / "book").glob("*.pot")
        }


def test_every_page_has_a_catalog(templates):
    pages = {p.stem for p in (ROOT / "book").iterdir() if p.suffix in (".ipynb", ".md")}
    assert set(templates) == pages
    assert {p.stem for p in (CATALOGS / "book").glob("*.po")} == pages


def test_every_current_string_is_translated(templates):
    missing = []
    total = 0
    for page, msgids in sorted(templates.items()):
        translated = {m.id: m for m in _read(CATALOGS / "book" / f"{page}.po") if m.id}
        for msgid in sorted(msgids):
            if _is_docstring(page, msgid):
                continue
            total += 1
            message = translated.get(msgid)
            if message is None or not message.string or message.fuzzy:
                missing.append(f"{page}: {msgid[:70]!r}")
    print(f"\n{total} strings to translate, {total - len(missing)} translated")
    assert not missing, f"{len(missing)} strings without a current translation:\n" + "\n".join(missing[:20])


def test_the_translations_keep_the_markup_and_are_japanese():
    problems = []
    for path in sorted((CATALOGS / "book").glob("*.po")):
        for problem in check_translations.problems(path):
            if path.stem == "api" and problem.endswith("not translated"):
                continue  # docstrings (checked by the test above for the page's own prose)
            problems.append(problem)
    assert not problems, "\n".join(problems[:20])


def test_every_exercise_title_is_translated():
    template = translations._titles_template()
    catalog = {m.id: m for m in _read(CATALOGS / translations.TITLES) if m.id}
    titles = [m.id for m in template if m.id]
    assert len(titles) >= 24
    untranslated = [t for t in titles if t not in catalog or not catalog[t].string or catalog[t].fuzzy]
    assert not untranslated, untranslated


def test_the_glue_is_written_in_as_myst_nb_shows_it():
    """The Japanese build writes glued values in; the same text the English
    site shows (tests/site compares the pages)."""
    notebook = ROOT / "book" / "05_one_denominator.ipynb"
    resolve = translations._glue_resolver(notebook)
    text = "{glue:text}`denom_example_token_mean:.4f` and {glue:text}`denom_example_ratio:.2f`"
    first, second = resolve(text).split(" and ")
    assert re.fullmatch(r"\d+\.\d{4}", first) and re.fullmatch(r"\d+\.\d{2}", second)


def test_the_japanese_figures_are_current():
    """Each figure of the chapters and the introduction's picture has a
    Japanese image drawn from the current English figure, figure catalog and
    plotting code (tools/translated_figures.py); a chapter re-run, a changed
    translation or a changed figure function makes it stale."""
    import translated_figures

    stale = translated_figures.stale("ja")
    assert not stale, (
        f"Japanese figures missing or stale: {stale}; run `python tools/translated_figures.py ja`"
    )


def test_a_changed_english_figure_makes_its_translation_stale():
    import nbformat
    import translated_figures

    path = ROOT / "book" / "01_tensor_shapes.ipynb"
    notebook = nbformat.read(path, as_version=4)
    cell_id, png = next(iter(translated_figures.figure_cells(path).items()))
    assert translated_figures.swap_in(notebook, path.stem, "ja") == []
    swapped = next(c for c in notebook.cells if c.id == cell_id)
    assert translated_figures._png(swapped) != png  # the Japanese image is in place
    rerun = nbformat.read(path, as_version=4)
    changed = next(c for c in rerun.cells if c.id == cell_id)
    for output in changed.outputs:
        if "image/png" in output.get("data", {}):
            output["data"]["image/png"] = png[:-20] + "A" * 20  # as if the chapter had been re-run
    assert translated_figures.swap_in(rerun, path.stem, "ja") == [f"{path.stem}/{cell_id}"]
    assert translated_figures._png(changed) == png[:-20] + "A" * 20  # left in English


def test_the_japanese_glossary_maps_back_from_english(tmp_path):
    """The Japanese copy's glossary ends with a table from every English term,
    alphabetically, to its Japanese entry; the English cells do not read as a
    term's catalog entry (Sphinx would translate them)."""
    page = tmp_path / "glossary.md"
    page.write_text((ROOT / "book" / "glossary.md").read_text(encoding="utf-8"), encoding="utf-8")
    translated = translations.translate_notebooks.load_catalog(CATALOGS / "book" / "glossary.po")
    translations._glossary_index(page, translated, "ja")
    terms = translations.glossary_terms((ROOT / "book" / "glossary.md").read_text(encoding="utf-8"))
    rows = re.findall(r"^\| (.+?) \| \{term\}`(.+?) <(.+?)>` \|$", page.read_text(encoding="utf-8"), re.M)
    assert len(rows) == len(terms) >= 30
    assert [target for _, _, target in rows] == sorted((t.strip("`") for t in terms), key=str.lower)
    for english, japanese, target in rows:
        assert english.strip("*`") == target
        # a translated cell would show the Japanese in the English column
        assert english not in translated or translated[english] == english, english
        if not english.startswith("`"):  # a code name is its own translation
            assert re.search(r"[\u3040-\u30ff\u4e00-\u9fff]", japanese), (english, japanese)
            assert target not in japanese, (english, japanese)
