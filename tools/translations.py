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

``python tools/translations.py prepare ja [SRC]`` writes that copy alone
(for the PDF); ``python tools/translations.py slides ja OUT`` builds the
chapter decks alone.  ``python tools/translations.py build ja OUT`` builds the Japanese site into
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
import shutil

import nbformat
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po, write_po

ROOT = Path(__file__).resolve().parent.parent
LOCALES = ROOT / "locales"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab_notebooks  # noqa: E402
import translated_figures  # noqa: E402
import translate_notebooks  # noqa: E402
from book_sources import build_site, copy_sources  # noqa: E402

TITLES = "_exercise_titles.po"
PROJECT = "How Language Models Compute Their Training Loss"
EXERCISE_TITLE = re.compile(r"^(```\{exercise-start\}[ \t]*)([^\n]+)$", re.M)
SETTINGS = {
    "ja": {
        "title": "言語モデルは学習損失をどう計算するか",
        "html_search_language": "ja",
        # MyST-NB's button on a collapsed cell ("Show code cell source")
        "nb_code_prompt_show": "コードセルを表示",
        "nb_code_prompt_hide": "コードセルを隠す",
        # the PDF (make pdf): XeLaTeX with xeCJK and Noto CJK; see book/_latex/bookja.sty
        "latex_elements": {"preamble": r"\usepackage{bookja}"},
        "latex_additional_files": [
            "book/_latex/bookja.sty", "book/_latex/ctexhook.sty", "book/_latex/ucharclasses.sty",
        ],
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
    # the header: the book's, reviewed (not gettext's placeholders, not fuzzy)
    catalog.project, catalog.version = PROJECT, ""
    catalog.copyright_holder = "the authors"
    catalog.msgid_bugs_address = ""
    catalog.last_translator = catalog.language_team = f"{PROJECT} ({language})"
    catalog.header_comment = f"# {language} messages of: {PROJECT}\n# {target.relative_to(ROOT)}"
    catalog.revision_date = catalog.creation_date
    catalog.fuzzy = False
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as handle:
        write_po(handle, catalog, width=0, omit_header=False, ignore_obsolete=True)


def _glue_resolver(notebook_path: Path):
    values = lab_notebooks.glued_values(json.loads(notebook_path.read_text(encoding="utf-8")))

    def resolve(text: str) -> str:
        def value(match: re.Match[str]) -> str:
            name, spec = match.group(1).strip(), match.group(2) or ""
            return format(values[name], spec)

        return lab_notebooks.GLUE.sub(value, text)

    return resolve


GLOSSARY_INDEX = {
    "ja": ("(glossary-from-english)=\n## 英語の用語から引く\n\n"
           "英語の用語（アルファベット順）から、この用語集の項目へ：\n\n"
           # the PDF: two columns that share the text width
           "```{tabularcolumns} \\Y{0.4}\\Y{0.6}\n```\n\n| English | 日本語 |\n| --- | --- |\n"),
}


def glossary_terms(text: str) -> list[str]:
    """The terms of the glossary page's ``{glossary}`` block, in order."""
    block = re.search(r"^```\{glossary\}\n(.*?)^```$", text, re.S | re.M)
    if not block:
        raise ValueError("the glossary page has no {glossary} block")
    return [line for line in block[1].splitlines() if line.strip() and not line[0].isspace()]


def _glossary_index(page: Path, translated: dict[str, str], language: str) -> None:
    """Append to the copy's glossary the way back: each English term, its
    translation, linked to the entry (the entries themselves give the
    translation with the English beside it)."""
    text = page.read_text(encoding="utf-8")
    rows = []
    for term in sorted(glossary_terms(text), key=lambda t: t.strip("`").lower()):
        target = term.strip("`")
        shown = translated.get(term, term).replace("`", "")
        # the English is in the first column: drop it from the parenthesis
        shown = re.sub(rf"[、,]\s*{re.escape(target)}(?=）)|（{re.escape(target)}）", "", shown)
        # in italics (code stays code): a cell that reads exactly as a term
        # would be translated by the term's own catalog entry
        english = term if term.startswith("`") else f"*{term}*"
        rows.append(f"| {english} | {{term}}`{shown} <{target}>` |")
    page.write_text(text.rstrip("\n") + "\n\n" + GLOSSARY_INDEX[language] + "\n".join(rows) + "\n", encoding="utf-8")


def prepare(language: str, source: Path | None = None) -> Path:
    """Write the sources' copy for ``language`` (default ``_build/<language>-src``); return it.

    The copy is what every output in that language is built from: the site
    (:func:`build`), the PDF (``make pdf``) and the decks.
    """
    settings = SETTINGS[language]
    source = source or ROOT / "_build" / f"{language}-src"
    copy_sources(source)
    catalogs = LOCALES / language / "LC_MESSAGES"
    titles = translate_notebooks.load_catalog(catalogs / TITLES)
    for path in sorted((source / "book").glob("*.ipynb")):
        resolve = _glue_resolver(path)
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "markdown":
                text = resolve(cell.source)
                cell.source = EXERCISE_TITLE.sub(
                    lambda m: m.group(1) + titles.get(m.group(2).strip(), m.group(2)), text
                )
        # the figures drawn in this language (tools/translated_figures.py)
        for name in translated_figures.swap_in(notebook, path.stem, language):
            print(f"{name}: the {language} figure is stale or missing, the English one is used "
                  f"(python tools/translated_figures.py {language})", file=sys.stderr)
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
    glossary = translate_notebooks.load_catalog(catalogs / "book" / "glossary.po")
    _glossary_index(source / "book" / "glossary.md", glossary, language)
    pipeline = translated_figures.figures_dir(language) / "pipeline.svg"
    if "pipeline.svg" not in translated_figures.stale(language, notebooks=False):
        shutil.copy(pipeline, source / "book" / "images" / "pipeline.svg")
    for po in sorted((catalogs / "book").glob("*.po")):
        target = source / "locales" / language / "LC_MESSAGES" / "book" / po.name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(po.read_bytes())
    # the table of contents' captions (the sidebar shows them as written in
    # _toc.yml), from the introduction's catalog, where they are entries too
    intro = translate_notebooks.load_catalog(catalogs / "book" / "intro.po")
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
        f"    nb_code_prompt_show: {settings['nb_code_prompt_show']}\n"
        f"    nb_code_prompt_hide: {settings['nb_code_prompt_hide']}\n"
        "    course_kit_slides: true\n",
        1,
    )
    # the preamble: the language's, in place of the English one
    config, replaced = re.subn(
        r"^    latex_elements: .*$", lambda _: f"    latex_elements: {json.dumps(settings['latex_elements'])}", config,
        count=1, flags=re.M,
    )
    if not replaced:
        raise ValueError("_config.yml sets no latex_elements for the translation to replace")
    config = config.replace(
        "    latex_additional_files: [",
        "    latex_additional_files: [" + "".join(f"{path}, " for path in settings["latex_additional_files"]),
        1,
    )
    (source / "_config.yml").write_text(config, encoding="utf-8")
    return source


def build(language: str, html: Path) -> Path:
    """Build the site in ``language`` into ``html``; return the sources' copy.

    Then the chapter decks in ``language`` into ``html/slides`` (each
    chapter page links its deck there): ``tools/slides.py`` on a translated
    copy of the prepared chapters (``tools/translate_notebooks.py``), with
    reveal.js from ``.slides-deps/revealjs`` as for the English decks.
    Units the catalogs leave in English are listed on stderr.
    """
    source = prepare(language)
    build_site(source, html)
    build_decks(language, html / "slides", source)
    return source


def build_decks(language: str, out: Path, source: Path | None = None) -> None:
    """The chapter decks in ``language`` into ``out``, from the prepared copy ``source`` (made when not given)."""
    import slides

    source = source or prepare(language)
    with tempfile.TemporaryDirectory() as tmp:
        translated = Path(tmp) / "book"
        report = translate_notebooks.translate_copy(source, translated, language)
        for name, missing in report.items():
            for msgid in missing:
                print(f"{name}: left untranslated in the {language} decks: {msgid[:80]!r}", file=sys.stderr)
        slides.build(out, ROOT / ".slides-deps" / "revealjs", source=translated, language=language)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "update":
        for path in update(argv[1]):
            print(path.relative_to(ROOT))
        target = LOCALES / argv[1] / "LC_MESSAGES" / TITLES
        _merge(_titles_template(), target, argv[1])
        print(target.relative_to(ROOT))
        return 0
    if len(argv) in (2, 3) and argv[0] == "prepare":
        print(prepare(argv[1], Path(argv[2]).resolve() if len(argv) == 3 else None))
        return 0
    if len(argv) == 3 and argv[0] == "slides":
        build_decks(argv[1], Path(argv[2]).resolve())
        print(f"{argv[1]} decks in {argv[2]}")
        return 0
    if len(argv) == 3 and argv[0] == "build":
        build(argv[1], Path(argv[2]).resolve())
        print(f"{argv[1]} edition: {Path(argv[2]) / 'index.html'}, its decks in {Path(argv[2]) / 'slides'}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
