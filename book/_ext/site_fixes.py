"""Two fixes to the HTML that Jupyter Book 1's stack produces, and the
links to the course material.

Both would show as JavaScript console errors for every reader (the browser
test in tests/site checks that there are none):

* sphinx-thebe 0.3 registers its inline configuration script once per
  ``env-before-read-docs`` event, which Jupyter Book's build emits twice, so
  ``const THEBE_JS_URL`` is declared twice on every page (sphinx-togglebutton's
  inline script is doubled the same way).  Scripts that render identically
  are dropped here, keeping the first.
* pydata-sphinx-theme writes ``localStorage.mode || default_mode`` into the
  page; with no ``default_mode`` set, a first visit gets an empty mode and the
  theme logs "Got invalid theme mode".  ``auto`` follows the reader's system.

Every page of the book also opens with a small bar of links: the PDF of the
whole book (``book.pdf`` at the site's root, written by ``make pdf``) and,
on a chapter, the chapter's slides (``slides/NN_topic.slides.html``,
written by ``make book`` / ``make slides``), in the edition's own language
(the Japanese site's decks are in ``ja/slides/``).
"""

from __future__ import annotations

import re
from typing import Any

# the course-kit bar's words, by book_language
COURSE_KIT_WORDS = {
    "en": {"pdf": "The book as PDF", "slides": "This chapter as slides", "label": "Course material"},
    "ja": {"pdf": "本書の PDF 版", "slides": "この章のスライド", "label": "授業用の資料"},
}


def _default_mode(app: Any, config: Any) -> None:
    # pydata-sphinx-theme reads the default mode from html_context, not from
    # html_theme_options.
    config.html_context.setdefault("default_mode", "auto")


def _drop_duplicate_scripts(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
    unique = []
    for script in scripts:
        # what the page renders: an inline script is registered once with
        # filename None and once with "", which Sphinx treats as different
        key = (str(script.filename or ""), tuple(sorted(script.attributes.items())))
        if key in seen:
            continue
        seen.add(key)
        unique.append(script)
    scripts[:] = unique


def _course_links(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    if "body" not in context or not pagename.startswith("book/"):
        return
    prefix = "../" * pagename.count("/")
    words = COURSE_KIT_WORDS.get(app.config.book_language, COURSE_KIT_WORDS["en"])
    links = []
    if app.config.course_kit_pdf:
        links.append(
            f'<a class="course-kit-pdf" href="{prefix}book.pdf" download>'
            f'<i class="fas fa-file-pdf" aria-hidden="true"></i> {words["pdf"]}</a>'
        )
    chapter = re.fullmatch(r"book/(\d\d_\w+)", pagename)
    if chapter and app.config.course_kit_slides:
        links.append(
            f'<a class="course-kit-slides" href="{prefix}slides/{chapter[1]}.slides.html">'
            f'<i class="fas fa-chalkboard" aria-hidden="true"></i> {words["slides"]}</a>'
        )
    # the same page in the other edition: the Japanese site is /ja/ of the English one
    if app.config.book_language == "ja":
        links.append(f'<a class="language-switch" href="{prefix}../{pagename}.html" hreflang="en" lang="en">English</a>')
    else:
        links.append(f'<a class="language-switch" href="{prefix}ja/{pagename}.html" hreflang="ja" lang="ja">日本語</a>')
    if not links:
        return
    bar = f'<nav class="course-kit" aria-label="{words["label"]}">' + "".join(links) + "</nav>"
    context["body"] = bar + context["body"]


def setup(app: Any) -> dict[str, Any]:
    # the student edition has no PDF (it would hold the solutions)
    app.add_config_value("course_kit_pdf", True, "html")
    app.add_config_value("course_kit_slides", True, "html")
    # which edition this is: "en", or "ja" for the Japanese site built into ja/
    app.add_config_value("book_language", "en", "html")
    app.connect("config-inited", _default_mode)
    # Early: html-page-context is emitted with emit_firstresult, and a theme's
    # handler that returns a template name ends the chain.
    app.connect("html-page-context", _drop_duplicate_scripts, priority=100)
    app.connect("html-page-context", _course_links, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
