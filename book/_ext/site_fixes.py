"""Two fixes to the HTML that Jupyter Book 1's stack produces.

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
"""

from __future__ import annotations

from typing import Any


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


def setup(app: Any) -> dict[str, Any]:
    app.connect("config-inited", _default_mode)
    # Early: html-page-context is emitted with emit_firstresult, and a theme's
    # handler that returns a template name ends the chain.
    app.connect("html-page-context", _drop_duplicate_scripts, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
