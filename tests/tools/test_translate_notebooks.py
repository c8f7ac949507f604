"""Translated copies of the notebooks, for the Japanese decks (tools/translate_notebooks.py)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import translate_notebooks as tn  # noqa: E402  (tools/ is not a package)

CHAPTERS = sorted(p.name for p in (ROOT / "book").glob("[0-9][0-9]_*.ipynb"))

CATALOG = {
    "symbol": "記号",
    "meaning": "意味",
    "Shapes and `strides`": "形状と `strides`",
    "A paragraph that spans two lines of the source.": "ソースの 2 行にまたがる段落。",
    "an item of a list, on two lines": "2 行にわたるリストの項目",
    "another item": "別の項目",
    "Hint": "ヒント",
    "The hint's body, with a `code | span`.": "ヒントの本文、`code | span` つき。",
    "a | b": "a と b の対",
}


def test_each_unit_is_replaced_whole():
    text = (
        "## Shapes and `strides`\n"
        "\n"
        "A paragraph that spans\n"
        "two lines of the source.\n"
        "\n"
        "* an item of a list,\n"
        "  on two lines\n"
        "* another item\n"
        "\n"
        "| symbol | meaning |\n"
        "| --- | --- |\n"
        "| a \\| b | symbol |\n"
        "\n"
        ":::{admonition} Hint\n"
        ":class: dropdown\n"
        "The hint's body, with a `code | span`.\n"
        ":::\n"
    )
    out, missing = tn.translate_markdown(text, CATALOG)
    assert missing == []
    assert out == (
        "## 形状と `strides`\n"
        "\n"
        "ソースの 2 行にまたがる段落。\n"
        "\n"
        "* 2 行にわたるリストの項目\n"
        "* 別の項目\n"
        "\n"
        "| 記号 | 意味 |\n"
        "| --- | --- |\n"
        "| a と b の対 | 記号 |\n"
        "\n"
        ":::{admonition} ヒント\n"
        ":class: dropdown\n"
        "ヒントの本文、`code | span` つき。\n"
        ":::\n"
    )


def test_a_short_msgid_never_replaces_inside_another_unit_or_code():
    text = "The `symbol` column names each symbol.\n\n```python\nsymbol = 1\n```\n\n$$\n\\text{symbol}\n$$\n"
    out, missing = tn.translate_markdown(text, {"symbol": "記号"})
    assert "記号" not in out
    assert out == text
    # and the paragraph, which has no translation of its own, is reported
    assert missing == ["The `symbol` column names each symbol."]


def test_an_untranslated_unit_is_reported_and_left_as_it_is():
    text = "## Shapes and `strides`\n\nA paragraph nobody translated.\n\n| symbol | $x$ |\n| --- | --- |\n| `code` | 1 |\n"
    out, missing = tn.translate_markdown(text, CATALOG)
    assert missing == ["A paragraph nobody translated."]  # math, code and numbers need none
    assert "A paragraph nobody translated." in out and "## 形状と `strides`" in out


def test_a_fuzzy_translation_is_not_used(tmp_path):
    po = tmp_path / "page.po"
    po.write_text(
        'msgid ""\nmsgstr ""\n"Content-Type: text/plain; charset=utf-8\\n"\n\n'
        'msgid "symbol"\nmsgstr "記号"\n\n#, fuzzy\nmsgid "meaning"\nmsgstr "意味"\n\nmsgid "empty"\nmsgstr ""\n',
        encoding="utf-8",
    )
    assert tn.load_catalog(po) == {"symbol": "記号"}


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def translated(tmp_path_factory):
    import translations

    prepared = translations.prepare("ja", tmp_path_factory.mktemp("ja") / "src")
    before = _digest(prepared)
    out = tmp_path_factory.mktemp("ja-book") / "book"
    report = tn.translate_copy(prepared, out, "ja")
    return prepared, out, report, before


def test_every_unit_of_the_chapters_is_translated(translated):
    _, _, report, _ = translated
    assert sorted(name for name in report if name in CHAPTERS) == CHAPTERS
    left = {name: missing for name, missing in report.items() if missing}
    assert not left, f"untranslated units: {left}"


def test_code_cells_and_outputs_are_untouched_and_the_prepared_copy_is_only_read(translated):
    prepared, out, _, before = translated
    assert _digest(prepared) == before
    for name in CHAPTERS:
        original = nbformat.read(prepared / "book" / name, as_version=4)
        copy = nbformat.read(out / name, as_version=4)
        assert len(original.cells) == len(copy.cells)
        changed = 0
        for a, b in zip(original.cells, copy.cells):
            if a.cell_type == "code":
                assert a == b
            else:
                changed += a.source != b.source
        assert changed > 10, f"{name}: only {changed} markdown cells translated"


def test_the_copy_goes_to_a_folder_of_its_own(translated):
    prepared, _, _, _ = translated
    with pytest.raises(ValueError):
        tn.translate_copy(prepared, prepared / "book", "ja")
