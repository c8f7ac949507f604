"""Copies of the book's sources, for the editions built from them.

The student edition (``tools/student_edition.py``) and the Japanese edition
(``tools/translations.py build``) each change a copy of the sources, never
the sources themselves, and build it with the same command as ``make book``
(warnings are errors, nitpicky).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("_config.yml", "_toc.yml", "_static", "book")


def copy_sources(target: Path, extra: tuple[str, ...] = ()) -> None:
    """Copy the book's sources (and the ``extra`` paths) into an empty ``target``."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in (*SOURCES, *extra):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        else:
            shutil.copy(source, target / name)


def build_site(source: Path, html: Path) -> None:
    """Build the book in ``source`` into ``html`` (replaced), warnings as errors."""
    work = html.parent / f".{html.name}-build"
    subprocess.run(
        [
            str(Path(sys.executable).with_name("jupyter-book")), "build", str(source),
            "--warningiserror", "--nitpick", "--keep-going", "--path-output", str(work),
        ],
        check=True,
    )
    if html.exists():
        shutil.rmtree(html)
    shutil.move(str(work / "_build" / "html"), html)
    shutil.rmtree(work)
