"""Message catalogs for the book's translations (Sphinx gettext), and the
translated site built from them.

``python tools/translations.py update ja`` extracts every translatable
string of the book (``jupyter-book build --builder custom
--custom-builder gettext``: one template per page) and merges it into
``locales/ja/LC_MESSAGES/<page>.po``: new strings arrive untranslated, strings
whose English changed become fuzzy (their old translation kept as a hint),
strings that are gone are dropped.  Code cells and their outputs are not in
the catalogs: they are shared with the English edition.  The exercises'
titles, which sphinx-exercise does not offer for translation, have a
catalog of their own, ``locales/<language>/LC_MESSAGES/_exercise_titles.po``.

``python tools/translations.py build ja OUT`` builds the Japanese site into
``OUT`` (``make book``: ``_build/html/ja``) from a copy of the sources
(``_build/ja-src``) in which two things are done first, the same way in the
pages and in the catalogs:

* every glued number, ``{glue:text}`name:fmt```, is written in as the
  value the notebook stored, formatted as MyST-NB formats it: MyST-NB
  resolves glue only while it reads a notebook, not in a translated
  paragraph, so the Japanese text gets the very digits of the English one;
* each exercise's title is replaced by its translation.

Then Sphinx builds the copy with ``language`` set, warnings as errors.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import json
import re

import nbformat
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po, write_po

ROOT = Path(__file__).resolve().parent.parent
LOCALES = ROOT / "locales"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab_notebooks  # noqa: E402
from book_sources import build_site, copy_sources  # noqa: E402

TITLES = "_exercise_titles.po"
EXERCISE_TITLE = re.compile(r"^(```\{exercise-start\}[ \t]*)([^\n]+)$", re.M)
SETTINGS = {
    "ja": {
        "title": "言語モデルは学習損失をどう計算するか",
        "html_search_language": "ja",
    },
}


def extract(out: Path) -> Path:
    """Write the ``.pot`` templates of every page under ``out``; return their folder."""
    subprocess.run(
        [str(Path(sys.executable).with_name("jupyter-book")), "build", str(ROOT), "--builder", "custom",
         "--custom-builder", "gettext", "--path-output", str(out)],
        check=True, stdout=subprocess.DEVNULL,
    )
    return out / "_build" / "gettext"


def update(language: str) -> list[Path]:
    """Merge the current templates into ``locales/<language>``'s catalogs."""
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        templates = extract(Path(tmp))
        for pot in sorted(templates.rglob("*.pot")):
            relative = pot.relative_to(templates).with_suffix(".po")
            if relative.parts[0] == "_static":
                continue
            with pot.open("rb") as handle:
                template = read_po(handle)
            target = LOCALES / language / "LC_MESSAGES" / relative
            _merge(template, target, language)
            written.append(target)
    return written


def _titles_template() -> Catalog:
    catalog = Catalog()
    for path in sorted((ROOT / "book").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "markdown":
                for _, title in EXERCISE_TITLE.findall(cell.source):
                    catalog.add(title.strip(), locations=[(f"book/{path.name}", 0)])
    return catalog


def _merge(template: Catalog, target: Path, language: str) -> None:
    if target.exists():
        with target.open("rb") as handle:
            catalog = read_po(handle, locale=language)
        catalog.update(template, update_header_comment=False)
    else:
        catalog = Catalog(locale=language)
        catalog.update(template)
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as handle:
        write_po(handle, catalog, width=0, omit_header=False, ignore_obsolete=True)


def _translations(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    with path.open("rb") as handle:
        return {m.id: m.string for m in read_po(handle) if m.id and m.string and not m.fuzzy}


def _glue_resolver(notebook_path: Path):
    values = lab_notebooks.glued_values(json.loads(notebook_path.read_text(encoding="utf-8")))

    def resolve(text: str) -> str:
        def value(match: re.Match[str]) -> str:
            name, spec = match.group(1).strip(), match.group(2) or ""
            return format(values[name], spec)

        return lab_notebooks.GLUE.sub(value, text)

    return resolve


def build(language: str, html: Path) -> Path:
    """Build the site in ``language`` into ``html``; return the sources' copy."""
    settings = SETTINGS[language]
    source = ROOT / "_build" / f"{language}-src"
    copy_sources(source)
    catalogs = LOCALES / language / "LC_MESSAGES"
    titles = _translations(catalogs / TITLES)
    for path in sorted((source / "book").glob("*.ipynb")):
        resolve = _glue_resolver(path)
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "markdown":
                text = resolve(cell.source)
                cell.source = EXERCISE_TITLE.sub(
                    lambda m: m.group(1) + titles.get(m.group(2).strip(), m.group(2)), text
                )
        nbformat.write(notebook, path)
        po = catalogs / "book" / f"{path.stem}.po"
        if po.exists():
            with po.open("rb") as handle:
                catalog = read_po(handle, locale=language)
            resolved = Catalog(locale=language)
            for message in catalog:
                if message.id:
                    resolved.add(resolve(message.id), resolve(message.string), flags=message.flags)
            target = source / "locales" / language / "LC_MESSAGES" / "book" / po.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as handle:
                write_po(handle, resolved, width=0)
    for po in sorted((catalogs / "book").glob("*.po")):
        target = source / "locales" / language / "LC_MESSAGES" / "book" / po.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(po.read_bytes())
    # the table of contents' captions (the sidebar shows them as written in
    # _toc.yml), from the introduction's catalog, where they are entries too
    intro = _translations(catalogs / "book" / "intro.po")
    toc = (source / "_toc.yml").read_text(encoding="utf-8")
    toc = re.sub(r"(caption: )(.+)", lambda m: m.group(1) + intro.get(m.group(2).strip(), m.group(2)), toc)
    (source / "_toc.yml").write_text(toc, encoding="utf-8")
    config = (source / "_config.yml").read_text(encoding="utf-8")
    config = re.sub(r"^title: .*$", f"title: {settings['title']}", config, count=1, flags=re.M)
    config = config.replace(
        "  config:\n",
        "  config:\n"
        f"    language: {language}\n"
        f"    html_search_language: {settings['html_search_language']}\n"
        f"    book_language: {language}\n"
        "    course_kit_pdf: false\n"
        "    course_kit_slides: false\n",
        1,
    )
    (source / "_config.yml").write_text(config, encoding="utf-8")
    build_site(source, html)
    return source


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "update":
        for path in update(argv[1]):
            print(path.relative_to(ROOT))
        target = LOCALES / argv[1] / "LC_MESSAGES" / TITLES
        _merge(_titles_template(), target, argv[1])
        print(target.relative_to(ROOT))
        return 0
    if len(argv) == 3 and argv[0] == "build":
        build(argv[1], Path(argv[2]).resolve())
        print(f"{argv[1]} edition: {Path(argv[2]) / 'index.html'}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
