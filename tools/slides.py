"""Reveal.js slide decks generated from the chapter notebooks.

Each chapter's deck is made from the chapter notebook itself, so a deck can
never drift from the chapter: every cell carries Jupyter's standard
``slideshow`` metadata (``slide``, ``subslide``, ``fragment``, ``notes``,
``skip``), which JupyterLab shows in its property inspector and which an
instructor may change.  ``--assign`` writes a first choice into cells that
have none (the rules are in :func:`default_slide_type`); the build then

* resolves the book's roles (glued numbers, citations, cross-references)
  as ``make lab`` does (``tools/lab_notebooks.py``);
* drops the ``skip`` cells (every check cell, tagged ``hide-cell``, and
  the exercises, which are listed on one closing slide by title and
  difficulty instead);
* keeps, of a long markdown cell that opens a slide, the heading and the
  lead paragraph on the slide and moves the rest into the speaker notes
  (press ``s`` in a deck);
* shows figures and tables without the code that drew them;
* renders with nbconvert's reveal template, with reveal.js (from the npm
  registry, fetched at install time) and MathJax 3 (the site's copy) next
  to the decks, so a deck needs no network.

A deck in another language (``language="ja"``) is built the same way from
a translated copy of the chapters (``tools/translate_notebooks.py``, run by
``tools/translations.py build ja``) into the translated site's ``slides/``:
what the deck adds itself (the closing slide's sentence, the exercises'
details, the ``lang`` of the page) is in that language too, and its links
to the book's pages, relative, land in the same edition.

Usage::

    python tools/slides.py --assign            # add missing metadata in book/
    python tools/slides.py --fetch REVEAL_DIR  # reveal.js, from PyPI (install time)
    python tools/slides.py OUT_DIR REVEAL_DIR [SOURCE_DIR [LANGUAGE]]
                                               # build every deck into OUT_DIR

reveal.js itself comes from PyPI: the wheel of ``sphinx-revealjs`` (pinned
below) carries reveal.js's distribution files; ``--fetch`` downloads that
wheel with pip and unpacks only them.  Nothing else of the package is used
or installed.
"""

from __future__ import annotations

import copy
import re
import shutil
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lab_notebooks  # noqa: E402  (tools/ is not a package)

CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
TEMPLATE_DIR = Path(__file__).resolve().parent / "slides_template"
WIDTH, HEIGHT = 1280, 720
SLIDE_TYPES = ("slide", "subslide", "fragment", "notes", "skip", "-")
CHECK_TAGS = {"hide-cell", "remove-cell", "remove-input"}
HEADING = re.compile(r"^(#{1,3}) ", re.M)
EXERCISE_START = re.compile(r"^```\{exercise-start\}[ \t]*([^\n]*)\n((?::[\w-]+:[^\n]*\n)*)```", re.M)
# an exercise's details in any language: "**Difficulty:** easy · **Kind:** implement"
DETAILS = re.compile(r"^\*\*([^*\n]+?)[:：]\*\*\s*([^\n·]+?)\s*·\s*\*\*[^*\n]+?[:：]\*\*\s*([^\n]+?)\s*$", re.M)
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uff00-\uffef]")
# what a deck says itself, in each language it is built in
WORDS = {
    "en": {
        "solutions": "Solutions: in the book; the student edition leaves them out.",
        "title": "{title} slides",
        "details": " ({difficulty}, {kind})",
        "admonitions": {},
    },
    "ja": {
        "solutions": "解答は本書にあります（学生版には含まれません）。",
        "title": "{title}（スライド）",
        "details": "（{label}：{difficulty}、{kind}）",
        # an exercise referred to by its label: the number the site gives it
        "exercise": "練習 {chapter}.{number}",
        "admonitions": {
            "admonition": "注", "note": "注", "tip": "ヒント", "hint": "ヒント", "warning": "警告",
            "important": "重要", "caution": "注意", "attention": "注意", "seealso": "参照",
        },
    },
}
REVEAL_WHEEL = "sphinx-revealjs==3.2.1"  # carries reveal.js 5.2.0 (MIT)
MAX_CODE_LINES = 14  # a visible code cell with its output, shown on a slide
MAX_TABLE_ROWS = 20  # a table (or a figure, counted as 20) shown on a slide


def slide_type(cell: nbformat.NotebookNode) -> str | None:
    return cell.metadata.get("slideshow", {}).get("slide_type")


def _output_lines(cell: nbformat.NotebookNode) -> int:
    lines = 0
    for output in cell.get("outputs", []):
        if output.get("output_type") == "stream":
            lines += output.get("text", "").count("\n")
        elif "data" in output:
            data = output["data"]
            if "image/png" in data or "image/svg+xml" in data:
                lines += 20
            elif "text/html" in data:
                lines += data["text/html"].count("<tr")
            else:
                lines += data.get("text/plain", "").count("\n") + 1
    return lines


def _only_imports(source: str) -> bool:
    """True for an empty cell or one that only imports (set-up, not content)."""
    import ast

    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False
    return all(isinstance(node, (ast.Import, ast.ImportFrom)) for node in body)


def _has_figure_or_table(cell: nbformat.NotebookNode) -> bool:
    return any(
        key in output.get("data", {})
        for output in cell.get("outputs", [])
        for key in ("image/png", "image/svg+xml", "text/html")
    )


def default_slide_type(cell: nbformat.NotebookNode, in_exercises: bool) -> str:
    """The first choice of a cell's slide type (an instructor may change it).

    Titles and ``##`` sections open a slide, ``###`` sections a sub-slide;
    short markdown with display math gets a sub-slide of its own, other
    prose goes to the speaker notes.  Check cells are skipped; figures and
    tables get a sub-slide (without their code); a short visible code cell
    gets a sub-slide with its output; longer code is skipped.  The
    exercises are skipped (the deck lists them on one slide).
    """
    tags = set(cell.metadata.get("tags", []))
    if cell.cell_type == "markdown":
        heading = HEADING.search(cell.source)
        if heading and cell.source.lstrip().startswith("#"):
            level = len(heading[1])
            if in_exercises and not cell.source.lstrip().startswith("## Exercises"):
                return "skip"
            return "subslide" if level == 3 else "slide"
        if in_exercises:
            return "skip"
        if "$$" in cell.source and cell.source.count("\n") <= 12:
            return "subslide"
        return "notes"
    if cell.cell_type != "code" or in_exercises or tags & CHECK_TAGS or _only_imports(cell.source):
        return "skip"
    rows = _output_lines(cell)
    if "hide-input" in tags:
        return "subslide" if _has_figure_or_table(cell) and rows <= MAX_TABLE_ROWS else "skip"
    if _has_figure_or_table(cell):
        return "subslide" if rows <= MAX_TABLE_ROWS else "skip"
    return "subslide" if cell.source.count("\n") + 1 + rows <= MAX_CODE_LINES else "skip"


def _exercise_section_starts(cells: list) -> int:
    for index, cell in enumerate(cells):
        if cell.cell_type == "markdown" and (
            cell.source.lstrip().startswith("## Exercises") or EXERCISE_START.search(cell.source)
        ):
            return index
    return len(cells)


def assign(notebook_path: Path) -> int:
    """Give every cell of a notebook without ``slideshow`` metadata its
    default; return how many cells changed."""
    notebook = nbformat.read(notebook_path, as_version=4)
    start = _exercise_section_starts(notebook.cells)
    changed = 0
    for index, cell in enumerate(notebook.cells):
        if slide_type(cell) is None:
            cell.metadata["slideshow"] = {"slide_type": default_slide_type(cell, index >= start)}
            changed += 1
    if changed:
        nbformat.write(notebook, notebook_path)
    return changed


def _words(text: str) -> float:
    """The length of ``text`` in English words (three Japanese characters
    take about the room of one word)."""
    return len(CJK.sub(" ", text).split()) + len(CJK.findall(text)) / 3


def split_lead(source: str) -> tuple[str, str]:
    """``(heading and lead paragraph, the rest)`` of a markdown cell.

    The lead is the first paragraph after the heading, cut after its first
    sentence when it runs past 70 words (or as much Japanese).  Blocks
    (math, directives, tables, lists) are never cut: the lead stops before
    them.
    """
    paragraphs = re.split(r"\n\s*\n", source.strip())
    kept: list[str] = []
    rest = list(paragraphs)
    while rest and rest[0].lstrip().startswith("#"):
        kept.append(rest.pop(0))
    if rest and not re.match(r"\s*(\$\$|```|:::|\||[-*] |\d+\. |<)", rest[0]):
        lead = rest.pop(0)
        if _words(lead) > 70:
            # the first sentence: English, or Japanese (which ends with "。")
            match = re.match(r"(.+?[.!?])(?=\s+[A-Z(`$]|$)|(.+?。)", lead, re.S)
            sentence = match and (match[1] or match[2])
            if sentence and len(sentence) < len(lead.rstrip()):
                rest.insert(0, lead[len(sentence):].strip())
                lead = sentence
        kept.append(lead)
    return "\n\n".join(kept), "\n\n".join(rest)


def _myst_to_markdown(text: str, language: str = "en") -> str:
    """MyST blocks that nbconvert's markdown renderer cannot draw, as markdown."""
    text = re.sub(r"^\([\w-]+\)=\s*$\n?", "", text, flags=re.M)  # targets
    text = re.sub(r"^%.*$\n?", "", text, flags=re.M)  # comments

    def admonition(match: re.Match[str]) -> str:
        kind, title, body = match.group(2), match.group(3).strip(), match.group(4)
        body = re.sub(r"^:[\w-]+:.*$\n?", "", body, flags=re.M).strip()
        heading = title or WORDS[language]["admonitions"].get(kind, kind.capitalize())
        return f"> **{heading}**\n>\n" + "\n".join(f"> {line}" if line else ">" for line in body.splitlines())

    fence = r"(```|:::)\{(admonition|note|tip|warning|important|caution|seealso|attention|hint)\}([^\n]*)\n(.*?)^\1"
    text = re.sub(fence, admonition, text, flags=re.M | re.S)

    def math(match: re.Match[str]) -> str:
        body = re.sub(r"^:[\w-]+:.*$\n?", "", match.group(2), flags=re.M).strip()
        return f"$$\n{body}\n$$"

    text = re.sub(r"^(```|:::)\{math\}[^\n]*\n(.*?)^\1", math, text, flags=re.M | re.S)

    def figure(match: re.Match[str]) -> str:
        path, body = match.group(2).strip(), match.group(3)
        caption = re.sub(r"^:[\w-]+:.*$\n?", "", body, flags=re.M).strip()
        alt = re.search(r"^:alt:\s*(.*)$", body, re.M)
        image = f"![{alt[1] if alt else caption}]({path.replace('*', 'svg')})"
        return f"{image}\n\n*{caption}*" if caption else image

    text = re.sub(r"^(```|:::)\{figure\}([^\n]*)\n(.*?)^\1", figure, text, flags=re.M | re.S)
    # MathJax numbers nothing here: drop "(label)" after display math
    text = re.sub(r"\$\$[ \t]*\([\w-]+\)[ \t]*$", "$$", text, flags=re.M)
    return text


def _split_at_headings(cell: nbformat.NotebookNode, kind: str) -> list[tuple[str, str]]:
    """A markdown cell cut before each heading inside it: ``(text, kind)``.

    A section that starts in the middle of a cell still opens a slide
    (``##``) or a sub-slide (``###``); the text before it keeps the cell's
    own kind.  Code cells are returned whole.
    """
    if cell.cell_type != "markdown":
        return [(cell.source, kind)]
    parts = re.split(r"(?m)^(?=#{2,3} )", cell.source)
    out = []
    for number, part in enumerate(parts):
        if not part.strip():
            continue
        heading = re.match(r"(#{2,3}) ", part)
        if number > 0 and heading:
            out.append((part, "subslide" if len(heading[1]) == 3 else "slide"))
        else:
            out.append((part, kind))
    return out


def _link_to_site(text: str, labels: dict[str, str] | None = None) -> str:
    """Links between the book's pages, pointed at the site's pages (the
    decks live in ``slides/`` beside ``book/``, in each edition).

    ``labels``: the lab copies' heading anchors (the heading's text, spaces
    as ``-``) of the headings that carry a ``(label)=``, and the label; a
    link to one of them goes to the label, an id of the page in every
    edition (a translated heading's text is not).
    """
    from urllib.parse import unquote

    from docutils.nodes import make_id

    labels = labels or {}

    def link(match: re.Match[str]) -> str:
        # the lab copies link headings by their text; the site's ids are
        # the label's or docutils' ids of the English text
        anchor = unquote(match[2]) if match[2] else ""
        anchor = f"#{labels.get(anchor) or make_id(anchor)}" if anchor else ""
        return f"](../book/{match[1]}.html{anchor})"

    return re.sub(r"\]\((\w+)\.(?:ipynb|md)(?:#([^)]*))?\)", link, text)


def _exercise_list(cells: list, language: str = "en") -> str:
    rows = []
    for cell in cells:
        if cell.cell_type != "markdown":
            continue
        for title, _ in EXERCISE_START.findall(cell.source):
            details = DETAILS.search(cell.source)
            detail = ""
            if details:
                label, difficulty, kind = (part.strip() for part in details.groups())
                detail = WORDS[language]["details"].format(label=label, difficulty=difficulty, kind=kind)
            rows.append(f"{len(rows) + 1}. {title.strip()}{detail}")
    return "\n".join(rows)


def _exercises_heading(cells: list, start: int) -> int | None:
    """The index of the cell whose (last) ``##`` heading opens the exercises,
    in any language: the last section heading before the first exercise;
    None for a chapter without exercises."""
    if not any(c.cell_type == "markdown" and EXERCISE_START.search(c.source) for c in cells):
        return None
    for index in range(min(start, len(cells) - 1), -1, -1):
        cell = cells[index]
        if cell.cell_type == "markdown" and re.search(r"(?m)^## ", cell.source):
            return index
    return None


def _exercise_refs(text: str, chapter: str, language: str) -> str:
    """An exercise referred to by its label reads "Exercise N" in the lab
    copies; in a translated deck it reads as the site numbers it."""
    form = WORDS[language].get("exercise")
    number = re.match(r"(\d\d)_", chapter)
    if not form or not number:
        return text
    return re.sub(
        r"\bExercise (\d+)\b",
        lambda m: form.format(chapter=int(number[1]), number=m[1]),
        text,
    )


def deck(
    chapter: nbformat.NotebookNode,
    language: str = "en",
    labels: dict[str, str] | None = None,
    name: str = "",
) -> nbformat.NotebookNode:
    """The deck of a chapter (its roles already resolved): the cells the
    slides show, in order, with the slide types nbconvert reads.

    ``language``: the language of the chapter's prose, and of what the deck
    adds; ``labels``: see :func:`_link_to_site`; ``name``: the chapter's
    file stem (``NN_topic``).
    """
    words = WORDS[language]
    out = copy.deepcopy(chapter)
    cells = []
    start = _exercise_section_starts(chapter.cells)
    exercises = _exercises_heading(chapter.cells, start)
    for index, original in enumerate(chapter.cells):
        kind = slide_type(original) or default_slide_type(original, index >= start)
        if kind == "skip":
            continue
        parts = _split_at_headings(original, kind)
        # the part that opens the exercises: the exercises' cell's last section
        listing_part = max(
            (n for n, (part, _) in enumerate(parts) if part.lstrip().startswith("## ")), default=None
        ) if index == exercises else None
        for number, (part, part_kind) in enumerate(parts):
            cell = copy.deepcopy(original)
            if number and "id" in cell:
                cell["id"] = f"{cell['id']}-{number}"  # ids stay unique
            cell.metadata["slideshow"] = {"slide_type": part_kind}
            if cell.cell_type == "markdown":
                source = _link_to_site(_myst_to_markdown(part, language), labels)
                source = _exercise_refs(source, name, language)
                if number == listing_part:
                    listing = _exercise_list(chapter.cells[start:], language)
                    heading = source.lstrip().splitlines()[0]
                    cell.source = heading + "\n\n" + listing + "\n\n" + words["solutions"]
                    cells.append(cell)
                    continue
                if part_kind in ("slide", "subslide"):
                    lead, rest = split_lead(source)
                    cell.source = lead
                    cells.append(cell)
                    if rest.strip():
                        notes = nbformat.v4.new_markdown_cell(rest)
                        notes["id"] = f"{cell.get('id', 'cell')}-notes"
                        notes.metadata["slideshow"] = {"slide_type": "notes"}
                        cells.append(notes)
                    continue
                cell.source = source
            elif "hide-input" in set(cell.metadata.get("tags", [])) or (
                _has_figure_or_table(cell) and cell.source.count("\n") >= MAX_CODE_LINES
            ):
                # a figure or table is shown without the code that made it
                cell.metadata["tags"] = [*cell.metadata.get("tags", []), "remove_input"]
            cells.append(cell)
    out.cells = cells
    return out


def fetch_reveal(target: Path) -> None:
    """Download :data:`REVEAL_WHEEL` with pip and unpack reveal.js into ``target``."""
    import subprocess
    import zipfile

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, REVEAL_WHEEL],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        prefix = "sphinx_revealjs/_static/revealjs/"
        if target.exists():
            shutil.rmtree(target)
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                if name.startswith(prefix) and not name.endswith("/"):
                    out = target / name[len(prefix):]
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(archive.read(name))
    if not (target / "dist" / "reveal.js").is_file():
        raise FileNotFoundError(f"{REVEAL_WHEEL} carried no dist/reveal.js")


def _copy_reveal(reveal_dir: Path, out_dir: Path) -> None:
    target = out_dir / "reveal.js"
    if target.exists():
        shutil.rmtree(target)
    (target / "plugin").mkdir(parents=True)
    shutil.copytree(reveal_dir / "dist", target / "dist")
    shutil.copytree(reveal_dir / "plugin" / "notes", target / "plugin" / "notes")
    shutil.copy(reveal_dir / "LICENSE", target / "LICENSE")


def _heading_labels(source: Path) -> dict[str, str]:
    """The lab copies' anchor of every labelled heading, and its label."""
    labels = {}
    for path in sorted(source.glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "markdown":
                for label, heading in lab_notebooks.LABEL.findall(cell.source):
                    labels[heading.strip().replace(" ", "-")] = label
    return labels


def build(
    out_dir: Path,
    reveal_dir: Path,
    mathjax_url: str = "../_static/mathjax/tex-chtml.js",
    source: Path = ROOT / "book",
    language: str = "en",
) -> list[Path]:
    """Write ``NN_topic.slides.html`` for every chapter of ``source`` into ``out_dir``.

    ``language``: the language of ``source``'s prose (a translated copy for
    any but ``"en"``) and of the words the deck adds.  ``out_dir`` is the
    ``slides/`` folder of that language's site: the MathJax, favicon and
    page links are relative, into the same site.
    """
    if language not in WORDS:
        raise ValueError(f"no deck words for language {language!r}: add them to WORDS")
    from nbconvert import SlidesExporter
    from nbconvert.preprocessors import TagRemovePreprocessor
    from traitlets.config import Config

    if not (reveal_dir / "dist" / "reveal.js").is_file():
        raise FileNotFoundError(f"reveal.js is not in {reveal_dir}: run `make slides`, which fetches it")
    out_dir.mkdir(parents=True, exist_ok=True)
    _copy_reveal(reveal_dir, out_dir)
    shutil.copy(TEMPLATE_DIR / "book-slides.css", out_dir / "book-slides.css")
    config = Config()
    config.TagRemovePreprocessor.remove_input_tags = {"remove_input"}
    config.TagRemovePreprocessor.enabled = True
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        labels = _heading_labels(source)
        copies = lab_notebooks.make_copies(source, Path(tmp))
        for path in copies:
            if not re.match(r"\d\d_", path.name):
                continue
            notebook = nbformat.read(path, as_version=4)
            exporter = SlidesExporter(
                config=config,
                template_name="book_reveal",
                extra_template_basedirs=[str(TEMPLATE_DIR)],
                reveal_url_prefix="reveal.js",
                reveal_theme="white",
                reveal_width=str(WIDTH),
                reveal_height=str(HEIGHT),
                reveal_scroll=False,
                mathjax_url=mathjax_url,
                exclude_input_prompt=True,
                exclude_output_prompt=True,
                language_code=language,
            )
            exporter.register_preprocessor(TagRemovePreprocessor(config=config), enabled=True)
            body, _ = exporter.from_notebook_node(
                deck(notebook, language, labels, path.stem), resources={"metadata": {"name": _title(notebook)}}
            )
            # nbconvert's reveal template names the page "<title> slides"
            body = re.sub(
                r"<title>(.*?) slides</title>",
                lambda m: "<title>" + WORDS[language]["title"].format(title=m[1]) + "</title>",
                body,
                count=1,
            )
            # nbconvert percent-encodes a heading's id; the link to it stays
            # encoded (a URL), the id itself is the heading's text
            body = re.sub(
                r'(<h[1-6] id=")([^"]*%[0-9A-Fa-f]{2}[^"]*)"', lambda m: m[1] + unquote(m[2]) + '"', body
            )
            # images beside the chapters (the introduction's figure) are not
            # used by any chapter deck; outputs are embedded as data URIs
            target = out_dir / f"{path.stem}.slides.html"
            target.write_text(body, encoding="utf-8")
            written.append(target)
    return written


def _title(notebook: nbformat.NotebookNode) -> str:
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^# (.+)$", cell.source, re.M)
            if match:
                return re.sub(r"[`*]", "", match[1]).strip()
    return "Slides"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--assign"]:
        for path in CHAPTERS:
            print(f"{path.name}: {assign(path)} cells given slide metadata")
        return 0
    if argv[:1] == ["--fetch"] and len(argv) == 2:
        fetch_reveal(Path(argv[1]))
        print(f"reveal.js in {argv[1]}")
        return 0
    if len(argv) not in (2, 3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    source = Path(argv[2]) if len(argv) >= 3 else ROOT / "book"
    language = argv[3] if len(argv) == 4 else "en"
    written = build(Path(argv[0]), Path(argv[1]), source=source, language=language)
    print(f"{len(written)} decks in {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
