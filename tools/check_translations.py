"""Check message catalogs: every entry translated, markup kept, Japanese text.

``python tools/check_translations.py locales/ja/LC_MESSAGES/book/*.po``
prints one line per problem and exits 1 if there is any:

* an entry with an empty or fuzzy ``msgstr``;
* markup that differs between ``msgid`` and ``msgstr``: glued numbers,
  citations, API roles, equation and label references, math spans and
  inline code must all be carried over unchanged (a ``{doc}``, ``{ref}`` or
  ``{term}`` role may translate its text, never its target);
* prose left in English: outside markup, at least 30 % of the letters of a
  translated entry are Japanese (hiragana, katakana or kanji), unless the
  entry is only code, math or names (then ``msgstr == msgid``).
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

from babel.messages.pofile import read_po

KEPT = re.compile(
    r"\{(?:glue(?::\w+)?|cite(?::\w+)?|py:\w+|eq|numref)\}`[^`]*`"  # verbatim roles
    r"|\{ref\}`[^`<]*`"  # a bare label
    r"|\$\$.*?\$\$|\$[^$\n]+\$"  # math
    r"|(?<![`}])`[^`\n]+`(?!`)",  # inline code (not a role's body)
    re.S,
)
TARGETED = re.compile(r"\{(doc|ref|term)\}`(?:[^`<]*<([^`>]+)>|([^`]+))`")
JAPANESE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f]")
LETTER = re.compile(r"[A-Za-z\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]")


def _kept(text: str) -> Counter:
    text = re.sub(r"\\text\{[^}]*\}", r"\\text{}", text)
    return Counter(match.group(0) for match in KEPT.finditer(TARGETED.sub(" ", text)))


def _targets(text: str, *, translated: bool) -> Counter:
    found = Counter()
    for kind, target, bare in TARGETED.findall(text):
        found[(kind, (target or bare).strip())] += 1
    return found


def problems(path: Path) -> list[str]:
    with path.open("rb") as handle:
        catalog = read_po(handle)
    out = []
    for message in catalog:
        if not message.id:
            continue
        where = f"{path.name}: {message.id[:60]!r}"
        if not message.string:
            out.append(f"{where}: not translated")
            continue
        if message.fuzzy:
            out.append(f"{where}: fuzzy (the English changed)")
        if _kept(message.id) != _kept(message.string):
            missing = _kept(message.id) - _kept(message.string)
            extra = _kept(message.string) - _kept(message.id)
            out.append(f"{where}: markup differs: missing {sorted(missing)[:3]} extra {sorted(extra)[:3]}")
        if _targets(message.id, translated=False) != _targets(message.string, translated=True):
            out.append(f"{where}: role targets differ")
        if message.string != message.id:
            plain = KEPT.sub(" ", TARGETED.sub(" ", message.string))
            letters = LETTER.findall(plain)
            if letters and len(JAPANESE.findall(plain)) < 0.3 * len(letters):
                out.append(f"{where}: less than 30 % Japanese")
    return out


def main(argv: list[str]) -> int:
    found = [problem for name in argv for problem in problems(Path(name))]
    for problem in found:
        print(problem)
    print(f"{len(found)} problems in {len(argv)} catalogs")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
