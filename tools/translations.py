"""Message catalogs for the book's translations (Sphinx gettext).

``python tools/translations.py update ja`` extracts every translatable
string of the book (``jupyter-book build --builder custom
--custom-builder gettext``: one template per page) and merges it into
``locales/ja/LC_MESSAGES/<page>.po``: new strings arrive untranslated, strings
whose English changed become fuzzy (their old translation kept as a hint),
strings that are gone are dropped.  Code cells and their outputs are not in
the catalogs: they are shared with the English edition.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po, write_po

ROOT = Path(__file__).resolve().parent.parent
LOCALES = ROOT / "locales"


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
            if target.exists():
                with target.open("rb") as handle:
                    catalog = read_po(handle, locale=language)
                catalog.update(template, update_header_comment=False)
            else:
                catalog = Catalog(locale=language, project=template.project, version=template.version)
                catalog.update(template)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as handle:
                write_po(handle, catalog, width=0, omit_header=False, ignore_obsolete=True)
            written.append(target)
    return written


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "update":
        print(__doc__, file=sys.stderr)
        return 2
    for path in update(argv[1]):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
