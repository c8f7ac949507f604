"""The JupyterLab copies of the chapters (tools/lab_notebooks.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEC = importlib.util.spec_from_file_location("lab_notebooks", ROOT / "tools" / "lab_notebooks.py")
lab = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(lab)


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("lab")
    lab.make_copies(ROOT / "book", target)
    return target


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def test_every_chapter_is_copied(copies):
    assert sorted(p.name for p in copies.glob("*.ipynb")) == sorted(
        p.name for p in (ROOT / "book").glob("*.ipynb")
    )


def test_no_sphinx_role_is_left_in_the_prose(copies):
    left = [
        f"{path.name}: {match.group(0)}"
        for path in sorted(copies.glob("*.ipynb"))
        for cell in _cells(path)
        if cell["cell_type"] == "markdown"
        for match in lab.LEFTOVER.finditer("".join(cell["source"]))
    ]
    assert not left, left


def test_glued_numbers_are_written_in_as_the_site_formats_them(copies):
    checked = 0
    for source in sorted((ROOT / "book").glob("*.ipynb")):
        values = lab.glued_values(json.loads(source.read_text(encoding="utf-8")))
        for before, after in zip(_cells(source), _cells(copies / source.name)):
            if before["cell_type"] != "markdown":
                continue
            text = "".join(after["source"])
            for name, spec in lab.GLUE.findall("".join(before["source"])):
                assert format(values[name.strip()], spec) in text
                checked += 1
    assert checked > 100


def test_code_cells_and_outputs_are_unchanged(copies):
    for source in sorted((ROOT / "book").glob("*.ipynb")):
        before = [c for c in _cells(source) if c["cell_type"] == "code"]
        after = [c for c in _cells(copies / source.name) if c["cell_type"] == "code"]
        assert [(c["source"], c["outputs"]) for c in before] == [
            (c["source"], c["outputs"]) for c in after
        ]


def test_cells_hidden_on_the_site_are_collapsed_in_lab(copies):
    for source in sorted((ROOT / "book").glob("*.ipynb")):
        for before, after in zip(_cells(source), _cells(copies / source.name)):
            tags = set(before.get("metadata", {}).get("tags", []))
            shown = after["metadata"].get("jupyter", {})
            assert shown.get("source_hidden", False) == bool(
                before["cell_type"] == "code" and tags & {"hide-input", "hide-cell"}
            )


def test_roles_are_resolved():
    titles = {"02_llava_loss": ("The LLaVA loss", "02_llava_loss.ipynb")}
    labels = {"sec": ("A heading", "x.ipynb"), "ex": ("Exercise 2", "x.ipynb")}
    text = (
        "loss {glue:text}`loss:.2f`, {doc}`02_llava_loss`, "
        "{term}`ignore index <Ignore index>`, {cite:p}`a, b`, "
        "{py:func}`~companion.shapes.shift_for_next_token`, {ref}`sec`, {ref}`ex`, "
        "{py:func}`the flattening <companion.shapes.flatten_for_cross_entropy>`, "
        "{py:mod}`companion.shapes`"
    )
    assert lab.resolve_markdown(text, {"loss": 2.19058}, titles, "x", labels) == (
        "loss 2.19, [The LLaVA loss](02_llava_loss.ipynb), ignore index, [a, b], "
        "`shift_for_next_token`, [A heading](x.ipynb#A-heading), Exercise 2, "
        "`the flattening`, `companion.shapes`"
    )


def test_an_unknown_name_is_an_error_naming_the_notebook():
    with pytest.raises(KeyError, match="x.ipynb: glue name 'nope'"):
        lab.resolve_markdown("{glue:text}`nope`", {}, {}, "x.ipynb")
    with pytest.raises(KeyError, match="x.ipynb: .* label 'nope'"):
        lab.resolve_markdown("{ref}`nope`", {}, {}, "x.ipynb", {})
