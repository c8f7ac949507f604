"""The chapters' figures in another language, for that edition.

The figures are outputs of the chapter notebooks, stored in English.
``python tools/translated_figures.py ja`` runs every chapter that draws a
figure again, in memory (the notebooks are not written), with
``COMPANION_LANGUAGE=ja``, so that :mod:`companion.plots` draws the words in
Japanese (``companion/plots/language.py``), and keeps what it needs:

* ``locales/ja/figures/<notebook>/<cell id>.png``: each figure cell's image;
* ``locales/ja/figures/manifest.json``: for each, the key it was drawn
  under: the hash of the English image stored in the notebook, of the
  figure catalog and of the plotting code.  When any of them changes, the
  Japanese figure is stale: :func:`stale` says so and the translation
  tests fail until this command is run again;
* ``locales/ja/figures/pipeline.svg``: the introduction's picture;
* new English strings drawn by a figure are added, untranslated, to the
  catalog ``companion/plots/ja.po`` (strings no figure draws are dropped).

``tools/translations.py prepare ja`` then puts the Japanese images in
place of the English ones in its copy of the notebooks.  About 5 minutes
on two cores (chapter 7 trains its models again).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PLOTS = ROOT / "companion" / "plots"
RECORD = "COMPANION_FIGURE_TEXTS"

# Run first in each notebook: record the English strings each figure draws,
# before they are translated (the figure functions call translate_figure
# through the module's global name).
_PRELUDE = f"""
import json as _json, os as _os
import companion.plots.language as _language
_translate = _language.translate_figure
def _recording(fig, lang):
    with open(_os.environ["{RECORD}"], "a", encoding="utf-8") as _out:
        for _text in _language.figure_texts(fig):
            _out.write(_json.dumps(_text) + "\\n")
    return _translate(fig, lang)
_language.translate_figure = _recording
"""


def figures_dir(language: str) -> Path:
    return ROOT / "locales" / language / "figures"


def _png(cell: nbformat.NotebookNode) -> str | None:
    for output in cell.get("outputs", []):
        data = output.get("data", {})
        if "image/png" in data:
            return data["image/png"]
    return None


def figure_cells(path: Path) -> dict[str, str]:
    """``cell id -> English PNG (base64)`` of every figure cell of a notebook."""
    notebook = nbformat.read(path, as_version=4)
    return {cell.id: png for cell in notebook.cells if cell.cell_type == "code" and (png := _png(cell))}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _code_key(language: str) -> str:
    parts = [p.read_bytes() for p in sorted(PLOTS.glob("*.py"))]
    parts.append((PLOTS / f"{language}.po").read_bytes())
    return _digest(b"\0".join(parts))


def key(english_png: str, language: str) -> str:
    """What a Japanese figure was drawn under: the English image, the catalog, the plotting code."""
    return f"{_digest(english_png.encode())}-{_code_key(language)}"


def _manifest(language: str) -> dict[str, str]:
    path = figures_dir(language) / "manifest.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _current(manifest: dict[str, str], name: str, drawn_under: str, language: str) -> Path | None:
    """The ``language`` image ``name`` if it was drawn under ``drawn_under``, else None."""
    image = figures_dir(language) / name
    return image if manifest.get(name) == drawn_under and image.exists() else None


def stale(language: str, notebooks: bool = True) -> list[str]:
    """The figures (``notebook/cell id``, ``pipeline.svg``) missing for ``language`` or drawn under an old key."""
    manifest = _manifest(language)
    found = []
    for path in sorted((ROOT / "book").glob("*.ipynb")) if notebooks else ():
        for cell_id, png in figure_cells(path).items():
            name = f"{path.stem}/{cell_id}"
            if not _current(manifest, f"{name}.png", key(png, language), language):
                found.append(name)
    if not _current(manifest, "pipeline.svg", _code_key(language), language):
        found.append("pipeline.svg")
    return found


def swap_in(notebook: nbformat.NotebookNode, stem: str, language: str) -> list[str]:
    """Put the ``language`` images in place of the English ones; return the cells left in English (stale)."""
    manifest = _manifest(language)
    left = []
    for cell in notebook.cells:
        if cell.cell_type != "code" or (png := _png(cell)) is None:
            continue
        image = _current(manifest, f"{stem}/{cell.id}.png", key(png, language), language)
        if image is None:
            left.append(f"{stem}/{cell.id}")
            continue
        for output in cell.outputs:
            if "image/png" in output.get("data", {}):
                output["data"]["image/png"] = base64.b64encode(image.read_bytes()).decode() + "\n"
    return left


def _update_catalog(language: str, texts: list[str]) -> int:
    from babel.messages.catalog import Catalog
    from babel.messages.pofile import read_po, write_po

    path = PLOTS / f"{language}.po"
    old = {}
    if path.exists():
        with path.open("rb") as handle:
            old = {m.id: m for m in read_po(handle) if m.id}
    catalog = Catalog(locale=language, project="companion.plots", fuzzy=False)
    new = 0
    for text in sorted(set(texts)):
        previous = old.get(text)
        catalog.add(text, previous.string if previous else "", flags=previous.flags if previous else ())
        new += previous is None
    with path.open("wb") as handle:
        write_po(handle, catalog, width=0, omit_header=False)
    return new


def render(language: str) -> None:
    from nbclient import NotebookClient

    out = figures_dir(language)
    out.mkdir(parents=True, exist_ok=True)
    record = out / ".texts.jsonl"
    record.write_text("", encoding="utf-8")
    os.environ["COMPANION_LANGUAGE"] = language
    os.environ[RECORD] = str(record)
    os.environ.pop("COMPANION_DEVICE", None)
    images = {}
    for path in sorted((ROOT / "book").glob("*.ipynb")):
        english = figure_cells(path)
        if not english:
            continue
        notebook = nbformat.read(path, as_version=4)
        prelude = nbformat.v4.new_code_cell(_PRELUDE)
        notebook.cells.insert(0, prelude)
        print(f"{path.name}: running it with {language} figures", flush=True)
        NotebookClient(notebook, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        for cell in notebook.cells[1:]:
            if cell.id in english:
                png = _png(cell)
                if png is None:
                    raise RuntimeError(f"{path.name}: cell {cell.id} drew no figure this time")
                images[f"{path.stem}/{cell.id}"] = (png, english[cell.id])
    texts = [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]
    # the introduction's picture is drawn outside the notebooks
    from companion.plots import language as plot_language
    from companion.plots import pipeline

    plot_language.set_language("en")
    texts.extend(plot_language.figure_texts(pipeline.plot_pipeline()))
    record.unlink()
    added = _update_catalog(language, texts)
    manifest = {}
    for name, (png, english_png) in sorted(images.items()):
        target = out / f"{name}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(png))
        manifest[f"{name}.png"] = key(english_png, language)
    plot_language.set_language(language)
    (out / "pipeline.svg").write_text(pipeline.pipeline_svg(), encoding="utf-8")
    manifest["pipeline.svg"] = _code_key(language)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"{len(images)} figures and pipeline.svg in {out.relative_to(ROOT)}; "
          f"{added} new strings in companion/plots/{language}.po")


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    render(argv[0])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
