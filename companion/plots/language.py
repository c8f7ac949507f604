"""The language of the figures' words: English, or Japanese for the Japanese edition.

Every figure function of :mod:`companion.plots` draws its titles, axis labels,
legends and annotations in English; with the language set to ``"ja"`` the
figure it returns has each of those words replaced by its Japanese
translation, from the catalog ``companion/plots/ja.po`` (a gettext
catalog: the English text as drawn is the message id), and a Japanese font
beside the usual one (Debian's ``fonts-noto-cjk``: Latin text keeps
DejaVu Sans, matplotlib falls back glyph by glyph).  Numbers, math and
the data's own strings (tokens of an example sentence) are left as drawn.

The language is read from the environment variable ``COMPANION_LANGUAGE``
(``en`` when unset), or set in code with :func:`set_language`.  The book's
stored outputs are English; ``python tools/translations.py figures ja``
re-runs the chapters with ``COMPANION_LANGUAGE=ja`` for the Japanese edition.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import matplotlib
from matplotlib import font_manager
from matplotlib.text import Text
from matplotlib.ticker import FixedFormatter, FuncFormatter

__all__ = [
    "LANGUAGES",
    "LANGUAGE_VARIABLE",
    "figure_texts",
    "japanese_font",
    "language",
    "localized",
    "set_language",
    "translate_figure",
]

LANGUAGE_VARIABLE = "COMPANION_LANGUAGE"
"""The environment variable that chooses the figures' language."""

LANGUAGES: tuple[str, ...] = ("en", "ja")
"""The languages the figures are drawn in."""

CATALOGS = Path(__file__).resolve().parent
JAPANESE_FONTS = ("Noto Sans CJK JP", "IPAexGothic", "IPAGothic")
"""Japanese fonts looked for, in order (the first is Debian's fonts-noto-cjk)."""

_chosen: str | None = None
_catalogs: dict[str, dict[str, str]] = {}

F = TypeVar("F", bound=Callable[..., Any])


def _checked(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, one of {', '.join(LANGUAGES)}; got {type(value).__name__}")
    value = value.strip().lower()
    if value not in LANGUAGES:
        raise ValueError(f"{name} must be one of {', '.join(LANGUAGES)}; got {value!r}")
    return value


def set_language(value: str | None) -> None:
    """Draw the figures in ``value`` (``"en"`` or ``"ja"``); ``None``: back to the environment's choice."""
    global _chosen
    _chosen = None if value is None else _checked(value, "language")


def language(environ: Mapping[str, str] | None = None) -> str:
    """The figures' language: :func:`set_language`'s, else ``COMPANION_LANGUAGE``'s, else ``"en"``."""
    if _chosen is not None:
        return _chosen
    if environ is None:
        environ = os.environ
    if not isinstance(environ, Mapping):
        raise TypeError(f"environ must be a mapping such as os.environ; got {type(environ).__name__}")
    return _checked(environ.get(LANGUAGE_VARIABLE, "") or "en", LANGUAGE_VARIABLE)


def catalog(lang: str) -> dict[str, str]:
    """``English text -> translation`` for ``lang`` (empty for English)."""
    lang = _checked(lang, "lang")
    if lang == "en":
        return {}
    if lang not in _catalogs:
        from babel.messages.pofile import read_po

        with (CATALOGS / f"{lang}.po").open("rb") as handle:
            _catalogs[lang] = {
                m.id: m.string for m in read_po(handle) if m.id and m.string and not m.fuzzy
            }
    return _catalogs[lang]


def japanese_font() -> str:
    """The family name of an installed Japanese font (see :data:`JAPANESE_FONTS`).

    Raises:
        RuntimeError: none is installed (``apt-get install fonts-noto-cjk``).
    """
    def known() -> set[str]:
        return {entry.name for entry in font_manager.fontManager.ttflist}

    for attempt in range(2):
        names = known()
        for family in JAPANESE_FONTS:
            if family in names:
                return family
        if attempt == 0:
            # a font installed after matplotlib wrote its font cache
            for path in font_manager.findSystemFonts():
                if any(key in Path(path).name.lower() for key in ("cjk", "ipaexg", "ipag")):
                    font_manager.fontManager.addfont(path)
    raise RuntimeError(
        "no Japanese font is installed for the Japanese figures: install Debian's "
        f"fonts-noto-cjk (one of {', '.join(JAPANESE_FONTS)} is needed)"
    )


def _texts(fig: matplotlib.figure.Figure) -> Iterator[Text]:
    ticks = set()
    for ax in fig.get_axes():
        for axis in (ax.xaxis, ax.yaxis):
            ticks.update(axis.get_majorticklabels())
            ticks.update(axis.get_minorticklabels())
    for text in fig.findobj(Text):
        if text not in ticks and text.get_text().strip():
            yield text


def _fixed_tick_labels(fig: matplotlib.figure.Figure) -> Iterator[FixedFormatter]:
    for formatter in _formatters(fig):
        if isinstance(formatter, FixedFormatter):
            yield formatter


def _formatters(fig: matplotlib.figure.Figure) -> Iterator[Any]:
    for ax in fig.get_axes():
        for axis in (ax.xaxis, ax.yaxis):
            yield axis.get_major_formatter()
            yield axis.get_minor_formatter()


def _translating(function: Callable[..., str], messages: Mapping[str, str]) -> Callable[..., str]:
    def label(value: float, position: int | None = None) -> str:
        text = function(value, position)
        return messages.get(text, text)

    label.translated = True  # type: ignore[attr-defined]
    return label


def _has_words(text: str) -> bool:
    """Whether ``text`` has letters outside ``$...$`` math (a number or a formula alone has none)."""
    outside = "".join(part for index, part in enumerate(text.split("$")) if index % 2 == 0)
    return any(ch.isalpha() for ch in outside)


def figure_texts(fig: matplotlib.figure.Figure) -> list[str]:
    """Every string with words that ``fig`` draws: titles, labels, legends, annotations, tick labels."""
    found = [text.get_text() for text in _texts(fig)]
    for formatter in _fixed_tick_labels(fig):
        found.extend(str(label) for label in formatter.seq)
    return [text for text in dict.fromkeys(found) if _has_words(text)]


def translate_figure(fig: matplotlib.figure.Figure, lang: str) -> matplotlib.figure.Figure:
    """Replace, in place, every string of ``fig`` that the ``lang`` catalog translates; return ``fig``.

    Strings the catalog lacks stay as drawn (numbers, formulas, tokens).
    With ``lang="ja"`` the figure's texts and tick labels get a Japanese font
    as fallback (matplotlib's settings are left as they are).

    Raises:
        TypeError, ValueError: ``fig`` is not a matplotlib Figure, or ``lang``
            is not one of :data:`LANGUAGES`.
    """
    if not isinstance(fig, matplotlib.figure.Figure):
        raise TypeError(f"fig must be a matplotlib Figure; got {type(fig).__name__}")
    messages = catalog(lang)
    if not messages:
        return fig
    fallback = japanese_font()
    for text in _texts(fig):
        family = [f for f in text.get_fontfamily() if f != fallback]
        text.set_fontfamily([*family, fallback])
        text.set_text(messages.get(text.get_text(), text.get_text()))
    for formatter in _formatters(fig):
        if isinstance(formatter, FixedFormatter):
            formatter.seq = [messages.get(str(label), str(label)) for label in formatter.seq]
        elif isinstance(formatter, FuncFormatter) and not getattr(formatter.func, "translated", False):
            # what ``set_xticks(ticks, labels)`` installs
            formatter.func = _translating(formatter.func, messages)
    families = [f for f in matplotlib.rcParams["font.family"] if f != fallback]
    for ax in fig.get_axes():
        # the tick labels there are and those made when the figure is drawn
        ax.tick_params(axis="both", which="both", labelfontfamily=[*families, fallback])
    return fig


def localized(function: F) -> F:
    """Decorate a figure function: the figure it returns is in :func:`language`."""

    @functools.wraps(function)
    def draw(*args: Any, **kwargs: Any) -> Any:
        lang = language()  # a bad COMPANION_LANGUAGE fails before anything is drawn
        fig = function(*args, **kwargs)
        return translate_figure(fig, lang) if lang != "en" else fig

    return draw  # type: ignore[return-value]
