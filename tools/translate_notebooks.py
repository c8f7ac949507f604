"""Translated copies of the book's notebooks, made from the message catalogs.

The Japanese site is translated by Sphinx while it builds (gettext): the
notebooks themselves stay in English.  What is built from the notebooks
outside Sphinx, such as the chapter decks (``tools/slides.py``), needs the
translation written into the notebooks.  This module writes it into a copy,
from the same catalogs and by the same units that Sphinx translates, so the
decks say what the Japanese pages say:

* the markdown of every cell is parsed with MyST's own parser (the book's
  extensions enabled), and each unit that Sphinx offers for translation is
  replaced as a whole by its translation: a heading, a paragraph (its lines
  joined by a space, as Sphinx joins them into the msgid), a list item's
  paragraph, a table cell, a definition list's term, an admonition's title,
  a figure's ``:alt:``, and the same units inside a directive's body
  (admonitions, exercises, solutions, figures' captions);
* a unit is looked up whole, never as a substring: a short message such as
  ``symbol`` translates a table cell that says exactly that, never a word
  inside another paragraph or a code span;
* code cells, their outputs, math blocks and code fences are not touched.

The copy passed in must be a prepared one (``tools/translations.py
prepare ja DIR``): its notebooks have the glued numbers written in, the same
way as its catalogs ``DIR/locales/<language>/LC_MESSAGES/book/<page>.po``,
so every msgid matches the notebook's text.  The translated notebooks are
written into another folder; the prepared copy and the catalogs are only
read.

Usage: ``python tools/translate_notebooks.py PREPARED_DIR OUT_DIR [LANGUAGE]``
writes ``OUT_DIR/<notebook>.ipynb`` (and the pages' other files) and lists
every unit left in English; the exit status is 1 when there is one.
"""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat
from babel.messages.pofile import read_po

# the book's MyST extensions (_config.yml's myst_enable_extensions)
EXTENSIONS = {"amsmath", "dollarmath", "colon_fence", "deflist"}
# directives whose body is MyST markdown (anything not listed is left alone:
# math, code, and directives whose body is not prose)
PROSE_DIRECTIVES = re.compile(
    r"^(admonition|note|tip|hint|warning|important|caution|attention|danger|error|seealso"
    r"|figure|exercise|exercise-start|solution|solution-start|margin|sidebar|topic|epigraph)$"
)
# directives whose argument is a title for translation (exercises' titles
# have their own catalog, written in by ``translations.py prepare``)
TITLED_DIRECTIVES = {"admonition", "sidebar", "topic"}
OPTION = re.compile(r"^\s*:([\w-]+):\s*(.*)$")
LETTERS = re.compile(r"[^\W\d_]", re.UNICODE)


@dataclass
class Unit:
    """One translatable unit of a markdown text: its msgid and where it is."""

    msgid: str
    line: int  # the first source line (0-based) of the unit
    lines: list[str]  # the unit's text, line by line, as it stands in the source
    column: int | None = None  # table cells and options: where the text starts
    end: int | None = None  # ... and ends, on ``line``


def _parser():
    from markdown_it.renderer import RendererHTML
    from myst_parser.config.main import MdParserConfig
    from myst_parser.parsers.mdit import create_md_parser

    return create_md_parser(MdParserConfig(enable_extensions=EXTENSIONS), RendererHTML)


_MD = None


def _tokens(text: str) -> list:
    global _MD
    if _MD is None:
        _MD = _parser()
    return _MD.parse(text)


def _msgid(content: str) -> str:
    # Sphinx: ``node.rawsource.replace('\n', ' ').strip()``
    return content.replace("\n", " ").strip()


def _pipes(line: str) -> list[int]:
    """Columns of the unescaped ``|`` of a table row (markdown-it's split)."""
    out, escaped = [], False
    for column, char in enumerate(line):
        if char == "|" and not escaped:
            out.append(column)
        escaped = char == "\\" and not escaped
    return out


def _cell_spans(line: str) -> list[tuple[int, int]]:
    pipes = _pipes(line)
    start = len(line) - len(line.lstrip())
    stop = len(line.rstrip())
    bounds = [start - 1] if not pipes or pipes[0] != start else []
    bounds += pipes
    if not pipes or pipes[-1] != stop - 1:
        bounds.append(stop)
    return [(a + 1, b) for a, b in zip(bounds, bounds[1:])]


def units(text: str, offset: int = 0, source_lines: list[str] | None = None) -> list[Unit]:
    """Every translatable unit of the markdown ``text``, in order.

    ``offset`` and ``source_lines``: ``text`` is a directive's body that
    starts at line ``offset`` of ``source_lines``.
    """
    source_lines = source_lines if source_lines is not None else text.split("\n")
    tokens = _tokens(text)
    found: list[Unit] = []
    row_cells: dict[int, list[tuple[int, int]]] = {}
    row_index: dict[int, int] = {}
    for index, token in enumerate(tokens):
        if token.type in ("heading_open", "paragraph_open", "dt_open"):
            inline = tokens[index + 1]
            line = offset + token.map[0]
            found.append(Unit(_msgid(inline.content), line, inline.content.split("\n")))
        elif token.type in ("th_open", "td_open"):
            inline = tokens[index + 1]
            line = offset + inline.map[0]
            if line not in row_cells:
                row_cells[line] = _cell_spans(source_lines[line])
                row_index[line] = 0
            spans = row_cells[line]
            number = row_index[line]
            row_index[line] += 1
            if number >= len(spans) or not inline.content.strip():
                continue
            start, stop = spans[number]
            cell = source_lines[line][start:stop]
            lead = len(cell) - len(cell.lstrip())
            found.append(
                Unit(_msgid(inline.content), line, [cell.strip()], start + lead, start + lead + len(cell.strip()))
            )
        elif token.type in ("fence", "colon_fence") and token.info.startswith("{"):
            match = re.match(r"\{([\w:-]+)\}\s*(.*)$", token.info.strip())
            if not match or not PROSE_DIRECTIVES.match(match[1]):
                continue
            name, argument = match[1], match[2].strip()
            first = offset + token.map[0]
            if name in TITLED_DIRECTIVES and argument:
                opening = source_lines[first]
                column = opening.rfind(argument)
                found.append(Unit(argument, first, [argument], column, column + len(argument)))
            # the body, its option lines blanked (the lines keep their numbers)
            body = token.content.split("\n")
            for number, line_text in enumerate(body):
                option = OPTION.match(line_text)
                if not option:
                    break
                if option[1] == "alt" and option[2].strip():
                    where = first + 1 + number
                    value = option[2].strip()
                    column = source_lines[where].rfind(value)
                    found.append(Unit(value, where, [value], column, column + len(value)))
                body[number] = ""
            found.extend(units("\n".join(body), first + 1, source_lines))
    return found


def translate_markdown(text: str, catalog: dict[str, str]) -> tuple[str, list[str]]:
    """``text`` with every unit replaced by its translation, and the msgids
    of the units that have none (those with no letter at all aside)."""
    lines = text.split("\n")
    missing: list[str] = []
    edits = []
    for unit in units(text):
        translation = catalog.get(unit.msgid)
        if translation is None:
            if LETTERS.search(re.sub(r"\$[^$]*\$|`[^`]*`", "", unit.msgid)):
                missing.append(unit.msgid)
            continue
        edits.append((unit, translation))
    # from the end, so that the lines and columns of the earlier units hold
    for unit, translation in sorted(edits, key=lambda e: (e[0].line, e[0].column or 0), reverse=True):
        if unit.column is not None:
            line = lines[unit.line]
            if line[unit.column:unit.end] != unit.lines[0]:
                raise ValueError(f"line {unit.line}: {unit.lines[0]!r} is not where the parser put it")
            if "|" in line[:unit.column]:  # a table cell: keep its pipes
                translation = re.sub(r"(?<!\\)\|", r"\\|", translation)
            lines[unit.line] = line[:unit.column] + translation + line[unit.end:]
            continue
        first, last = unit.lines[0].lstrip(), unit.lines[-1]
        start = lines[unit.line].find(first)
        end_line = unit.line + len(unit.lines) - 1
        end = lines[end_line].rfind(last) + len(last)
        if start < 0 or end < len(last):
            raise ValueError(f"line {unit.line}: {unit.msgid[:60]!r} is not where the parser put it")
        lines[unit.line: end_line + 1] = [lines[unit.line][:start] + translation + lines[end_line][end:]]
    return "\n".join(lines), missing


def load_catalog(po: Path) -> dict[str, str]:
    """``msgid -> msgstr`` of a catalog's current translations (fuzzy ones left out)."""
    if not po.exists():
        return {}
    with po.open("rb") as handle:
        return {m.id: m.string for m in read_po(handle) if m.id and m.string and not m.fuzzy}


def translate_notebook(path: Path, target: Path, catalog: dict[str, str]) -> list[str]:
    """Write ``path`` translated into ``target``; return the untranslated units."""
    notebook = nbformat.read(path, as_version=4)
    missing: list[str] = []
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            cell.source, left = translate_markdown(cell.source, catalog)
            missing.extend(left)
    nbformat.write(notebook, target)
    return missing


def translate_copy(prepared: Path, out: Path, language: str = "ja") -> dict[str, list[str]]:
    """Translate the prepared copy's ``book/`` into ``out``.

    ``out`` (replaced) gets every file of ``prepared/book``, the notebooks
    translated with ``prepared/locales/<language>/LC_MESSAGES/book/<stem>.po``
    and the markdown pages' titles translated (links to a page are named by
    its title).  Returns ``{notebook name: [untranslated msgids]}``.
    """
    book = prepared / "book"
    catalogs = prepared / "locales" / language / "LC_MESSAGES" / "book"
    if out.resolve() in (book.resolve(), prepared.resolve()):
        raise ValueError("the translated copy must go into a folder of its own")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(book, out, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    report = {}
    for path in sorted(book.glob("*.ipynb")):
        report[path.name] = translate_notebook(path, out / path.name, load_catalog(catalogs / f"{path.stem}.po"))
    for path in sorted(book.glob("*.md")):
        catalog = load_catalog(catalogs / f"{path.stem}.po")
        text = path.read_text(encoding="utf-8")
        title = re.search(r"^# (.+)$", text, re.M)
        if title and title[1].strip() in catalog:
            text = text[: title.start(1)] + catalog[title[1].strip()] + text[title.end(1):]
            (out / path.name).write_text(text, encoding="utf-8")
    return report


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    report = translate_copy(Path(argv[0]), Path(argv[1]), argv[2] if len(argv) == 3 else "ja")
    left = 0
    for name, missing in report.items():
        for msgid in missing:
            print(f"{name}: untranslated: {msgid[:100]!r}")
        left += len(missing)
    print(f"{len(report)} notebooks translated into {argv[1]}; {left} units left untranslated")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
