"""The figures' language (companion.plots.language) and the Japanese catalog.

A figure function draws English by default and Japanese under
``COMPANION_LANGUAGE=ja``; every string of every figure is replaced from the
catalog, numbers and formulas are left alone, and every translation is drawn
without a missing glyph (no tofu) in the Japanese font Debian's
fonts-noto-cjk installs.
"""

from __future__ import annotations

import logging
import os
import warnings

import matplotlib
import pytest
from babel.messages.pofile import read_po

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from companion.plots import language  # noqa: E402
from companion.plots.shapes import plot_shift_alignment  # noqa: E402


@pytest.fixture(autouse=True)
def _english_afterwards():
    yield
    language.set_language(None)


def _has_japanese_font() -> bool:
    try:
        language.japanese_font()
    except RuntimeError:
        return False
    return True


needs_font = pytest.mark.skipif(
    not _has_japanese_font() and not os.environ.get("CI"),
    reason="no Japanese font installed (apt-get install fonts-noto-cjk; required under CI)",
)


def test_the_language_comes_from_the_environment_or_the_code():
    assert language.language({}) == "en"
    assert language.language({"COMPANION_LANGUAGE": "JA "}) == "ja"
    language.set_language("ja")
    assert language.language({"COMPANION_LANGUAGE": "en"}) == "ja"
    language.set_language(None)
    assert language.language({"COMPANION_LANGUAGE": ""}) == "en"


@pytest.mark.parametrize("value, error, words", [
    ("de", ValueError, "language must be one of en, ja; got 'de'"),
    (2, TypeError, "language must be a string"),
])
def test_a_bad_language_is_refused_with_its_name(value, error, words):
    with pytest.raises(error, match=words):
        language.set_language(value)


def test_a_bad_environment_fails_before_anything_is_drawn(monkeypatch):
    monkeypatch.setenv("COMPANION_LANGUAGE", "fr")
    before = plt.get_fignums()
    with pytest.raises(ValueError, match="COMPANION_LANGUAGE must be one of en, ja; got 'fr'"):
        plot_shift_alignment(["<s>", "a", "b"])
    assert plt.get_fignums() == before


def test_translate_figure_refuses_what_is_not_a_figure():
    with pytest.raises(TypeError, match="fig must be a matplotlib Figure; got Axes"):
        language.translate_figure(plt.subplots()[1], "ja")
    with pytest.raises(ValueError, match="lang must be one of en, ja"):
        language.translate_figure(plt.figure(), "xx")


def _toy_figure():
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1], label="loss")
    ax.set_title("the title")
    ax.set_xlabel("step")
    ax.set_ylabel("$\\log V$")
    ax.set_xticks([0, 1], ["prompt", "answer"])
    ax.annotate("a note", (0.5, 0.5))
    ax.text(0.1, 0.1, "0.25")
    ax.legend()
    return fig


@needs_font
def test_every_string_with_words_is_translated_and_numbers_are_not(monkeypatch):
    messages = {"loss": "損失", "the title": "表題", "step": "ステップ", "prompt": "プロンプト",
                "answer": "回答", "a note": "注記"}
    monkeypatch.setitem(language._catalogs, "ja", messages)
    fig = _toy_figure()
    assert set(language.figure_texts(fig)) == set(messages)  # "$\log V$" and "0.25" have no words
    language.translate_figure(fig, "ja")
    fig.canvas.draw()
    drawn = {t.get_text() for t in fig.findobj(matplotlib.text.Text)}
    assert {"損失", "表題", "ステップ", "注記"} <= drawn
    assert not set(messages) & drawn
    assert {"$\\log V$", "0.25"} <= drawn
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["プロンプト", "回答"]


def test_english_draws_as_before(monkeypatch):
    monkeypatch.delenv("COMPANION_LANGUAGE", raising=False)
    fig = plot_shift_alignment(["<s>", "The", "cat"])
    assert "Logit row t is scored against label t + 1" in language.figure_texts(fig)


def _catalog():
    with (language.CATALOGS / "ja.po").open("rb") as handle:
        return [m for m in read_po(handle) if m.id]


def test_the_japanese_catalog_is_complete():
    messages = _catalog()
    assert messages
    missing = [m.id for m in messages if not m.string or m.fuzzy]
    assert not missing, f"untranslated figure strings in companion/plots/ja.po: {missing}"


@needs_font
def test_every_translation_draws_without_a_missing_glyph(caplog):
    """Draw each translation as the figures do; matplotlib warns on a glyph no font has."""
    font = language.japanese_font()
    fig, ax = plt.subplots()
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="matplotlib"):
        warnings.simplefilter("error")
        for message in _catalog():
            text = ax.text(0, 0, message.string, fontfamily=[*matplotlib.rcParams["font.family"], font])
            fig.canvas.draw()
            text.remove()
    problems = [r.getMessage() for r in caplog.records if "glyph" in r.getMessage().lower()]
    assert not problems, problems[:5]


@needs_font
def test_a_japanese_figure_draws_japanese(monkeypatch):
    monkeypatch.setenv("COMPANION_LANGUAGE", "ja")
    fig = plot_shift_alignment(["<s>", "The", "cat"])
    texts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    assert any(any("\u3040" <= ch <= "\u30ff" or "\u4e00" <= ch <= "\u9fff" for ch in t) for t in texts)
    assert "Logit row t is scored against label t + 1" not in texts
    fig.canvas.draw()  # tick labels, made now, have the fallback too
    ticks = fig.axes[0].get_xticklabels()
    assert ticks and all(language.japanese_font() in t.get_fontfamily() for t in ticks)
    # matplotlib's own settings are not changed
    assert language.japanese_font() not in matplotlib.rcParams["font.family"]
