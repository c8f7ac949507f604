"""Copies of the chapters for reading in JupyterLab, as the site shows them.

The chapters' markdown uses Sphinx roles that only the book build resolves:
``{glue:text}`name:.4f``` (a number computed by a cell), ``{doc}``,
``{term}``, ``{cite:p}``, ``{py:func}``.  JupyterLab, even with the MyST
renderer ``jupyterlab-myst`` (which draws the math, the admonitions and the
exercises), cannot show a glued number: it prints the glue's name instead.
``make lab`` therefore opens copies of the notebooks, made by this script,
in which every such role is replaced by what the site shows:

* ``{glue:text}`name:fmt``` by the value the notebook stored for ``name``,
  formatted with ``fmt``, exactly as MyST-NB formats it;
* ``{doc}`target``` by a link to ``target.ipynb`` (or ``.md``) titled with
  its heading;
* ``{term}`text <target>``` and ``{term}`text``` by ``text``;
* ``{cite:p}`a,b``` by ``[a, b]`` (the keys of ``book/references.bib``);
* ``{py:func}`~companion.module.name``` by ``name`` in code font;
* ``{ref}`label``` by a link to the heading that ``(label)=`` marks.

Code cells and their outputs are copied unchanged; a cell tagged
``hide-input``, ``hide-cell`` or ``hide-output`` (collapsed behind a toggle
on the site) is collapsed in JupyterLab too (``metadata.jupyter``), and the
kernel's display name is JupyterLab's own, so that opening a copy does not
mark it modified.  The copies live in
``_build/lab/`` (never committed); edit the notebooks in ``book/``
(``make lab-source``).

Usage: ``python tools/lab_notebooks.py [SOURCE_DIR] [TARGET_DIR]``.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GLUE_MIME = "application/papermill.record/text/plain"

GLUE = re.compile(r"\{glue(?::text)?\}`([^`:]+)(?::([^`]*))?`")
DOC = re.compile(r"\{doc\}`(?:([^`<]*?)\s*<([^`>]+)>|([^`]+))`")
TERM = re.compile(r"\{term\}`(?:([^`<]*?)\s*<[^`>]+>|([^`]+))`")
CITE = re.compile(r"\{cite(?::\w+)?\}`([^`]+)`")
PY = re.compile(r"\{py:\w+\}`(?:([^`<]*?)\s*<~?([^`>]+)>|(~?)([^`]+))`")
REF = re.compile(r"\{(?:ref|numref)\}`(?:([^`<]*?)\s*<([^`>]+)>|([^`]+))`")
LABEL = re.compile(r"^\(([\w-]+)\)=\s*\n#+\s+(.+)$", re.M)
EXERCISE = re.compile(r"^```\{exercise(?:-start)?\}[^\n]*\n(?::[\w-]+:[^\n]*\n)*", re.M)
EXERCISE_LABEL = re.compile(r"^:label:\s*(\S+)", re.M)
LEFTOVER = re.compile(r"\{(glue|doc|term|cite|py|ref|numref)(:\w+)?\}`")


def glued_values(notebook: dict[str, Any]) -> dict[str, Any]:
    """``name -> value`` of every ``glue`` output stored in the notebook."""
    values = {}
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            name = output.get("metadata", {}).get("scrapbook", {}).get("name")
            data = output.get("data", {}).get(GLUE_MIME)
            if name and data is not None:
                text = data if isinstance(data, str) else "".join(data)
                try:
                    values[name] = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    values[name] = text
    return values


def title_of(notebook_path: Path) -> str:
    """The first ``# heading`` of a notebook (or its file stem)."""
    notebook = json.loads(notebook_path.read_text(encoding="utf-8"))
    for cell in notebook["cells"]:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return notebook_path.stem


def resolve_markdown(
    text: str,
    values: dict[str, Any],
    titles: dict[str, tuple[str, str]],
    where: str,
    labels: dict[str, tuple[str, str]] | None = None,
) -> str:
    """``text`` with every Sphinx role replaced by what the site shows.

    Raises:
        KeyError: a glue name that the notebook never glued, or a ``{doc}``
            target that is not a chapter (``where`` names the notebook).
    """
    labels = labels or {}

    def glue(match: re.Match[str]) -> str:
        name, spec = match.group(1).strip(), match.group(2) or ""
        if name not in values:
            raise KeyError(f"{where}: glue name {name!r} is not glued in the notebook")
        return format(values[name], spec)

    def doc(match: re.Match[str]) -> str:
        label, target = match.group(1), match.group(2) or match.group(3)
        stem = Path(target.strip()).name
        if stem not in titles:
            raise KeyError(f"{where}: {{doc}} target {target!r} is not a chapter")
        title, filename = titles[stem]
        return f"[{label or title}]({filename})"

    def ref(match: re.Match[str]) -> str:
        text_, label = match.group(1), (match.group(2) or match.group(3)).strip()
        if label not in labels:
            raise KeyError(f"{where}: {{ref}} label {label!r} is not defined")
        heading, filename = labels[label]
        if heading.startswith("Exercise "):  # an admonition has no anchor
            return text_ or heading
        anchor = heading.replace(" ", "-")
        return f"[{text_ or heading}]({filename}#{anchor})"

    text = GLUE.sub(glue, text)
    text = REF.sub(ref, text)
    text = DOC.sub(doc, text)
    text = TERM.sub(lambda m: m.group(1) or m.group(2), text)
    text = CITE.sub(lambda m: "[" + ", ".join(k.strip() for k in m.group(1).split(",")) + "]", text)
    def py(match: re.Match[str]) -> str:
        title, _, short, name = match.groups()
        if title:
            return f"`{title}`"
        return f"`{name.rsplit('.', 1)[-1] if short else name}`"

    text = PY.sub(py, text)
    return text


def make_copies(source: Path, target: Path) -> list[Path]:
    """Write the resolved copy of every notebook in ``source`` to ``target``."""
    notebooks = sorted(source.glob("*.ipynb"))
    titles = {path.stem: (title_of(path), path.name) for path in notebooks}
    titles.update(
        {path.stem: (title_of_md(path), path.name) for path in source.glob("*.md")}
    )
    labels: dict[str, tuple[str, str]] = {}
    exercises: dict[str, int] = {}
    for path in notebooks:
        for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] == "markdown":
                text = "".join(cell["source"])
                for label, heading in LABEL.findall(text):
                    labels[label] = (heading.strip(), path.name)
                # exercises are numbered per notebook, as jupyterlab-myst does
                for block in EXERCISE.findall(text):
                    exercises[path.name] = exercises.get(path.name, 0) + 1
                    for label in EXERCISE_LABEL.findall(block):
                        labels[label] = (f"Exercise {exercises[path.name]}", path.name)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    written = []
    for path in notebooks:
        notebook = json.loads(path.read_text(encoding="utf-8"))
        values = glued_values(notebook)
        notebook["metadata"].setdefault("kernelspec", {})["display_name"] = (
            "Python 3 (ipykernel)"
        )
        for cell in notebook["cells"]:
            tags = set(cell.get("metadata", {}).get("tags", []))
            hidden = {
                "source_hidden": bool(tags & {"hide-input", "hide-cell"}),
                "outputs_hidden": bool(tags & {"hide-output", "hide-cell"}),
            }
            if cell["cell_type"] == "code" and any(hidden.values()):
                cell["metadata"].setdefault("jupyter", {}).update(
                    {key: True for key, value in hidden.items() if value}
                )
            if cell["cell_type"] == "markdown":
                text = resolve_markdown(
                    "".join(cell["source"]), values, titles, path.name, labels
                )
                cell["source"] = text.splitlines(keepends=True)
        out = target / path.name
        out.write_text(json.dumps(notebook, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written.append(out)
    for path in source.glob("*.md"):
        shutil.copy(path, target / path.name)
    # the pages' own images (the introduction's figure), at the same path
    if (source / "images").is_dir():
        shutil.copytree(source / "images", target / "images", dirs_exist_ok=True)
    return written


def title_of_md(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else ROOT / "book"
    target = Path(argv[1]) if len(argv) > 1 else ROOT / "_build" / "lab"
    written = make_copies(source, target)
    print(f"{len(written)} notebooks for JupyterLab in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
