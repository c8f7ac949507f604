"""Tests of companion.plots.pipeline."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from companion.plots import TEXT_WIDTH_IN  # noqa: E402
from companion.plots import pipeline  # noqa: E402

COMMITTED_SVG = Path(__file__).resolve().parents[2] / "book" / "images" / "pipeline.svg"


@pytest.fixture(scope="module")
def figure():
    fig = pipeline.plot_pipeline()
    yield fig
    matplotlib.pyplot.close(fig)


def _texts(fig) -> list[str]:
    return [text.get_text() for text in fig.axes[0].texts]


def test_the_committed_svg_is_what_the_package_draws():
    # book/intro.md shows this file; regenerate it after changing the figure:
    # python -m companion.plots.pipeline book/images/pipeline.svg
    assert COMMITTED_SVG.read_text(encoding="utf-8") == pipeline.pipeline_svg()


def test_the_svg_is_the_same_on_every_run():
    assert pipeline.pipeline_svg() == pipeline.pipeline_svg()


def test_the_steps_run_from_input_ids_to_perplexity_in_order(figure):
    names = [step.name for row in pipeline.STEPS for step in row]
    assert names == [
        "labels", "input_ids", "embeddings", "logits", "shift", "flatten",
        "log-softmax", "pick the target", "mask", "sum / count", "loss",
        "perplexity",
    ]
    texts = _texts(figure)
    for name in names:
        assert texts.count(name) == 1, name
    boxes = [p for p in figure.axes[0].patches if isinstance(p, FancyBboxPatch)]
    assert len(boxes) == len(names)
    # drawn row by row: every row lies below the one before
    row_of_box = [index for index, row in enumerate(pipeline.STEPS) for _ in row]
    tops = {}
    for row, box in zip(row_of_box, boxes):
        tops.setdefault(row, set()).add(round(box.get_y() + box.get_height(), 9))
    assert all(len(top) == 1 for top in tops.values())
    ordered = [tops[row].pop() for row in range(len(pipeline.STEPS))]
    assert ordered == sorted(ordered, reverse=True)


def test_every_arrow_carries_the_shape_of_what_flows_along_it(figure):
    shapes = {(a.start, a.lane): a.shape for a in pipeline.ARROWS}
    assert shapes[(0, "main")] == "(B, T)"
    assert shapes[(2, "main")] == "(B, T, V)"
    assert shapes[(3, "main")] == "(B, T−1, V)"
    assert shapes[(3, "labels")] == "(B, T−1)"
    assert shapes[(4, "main")].startswith("(N, V)")
    assert "N = B(T−1)" in shapes[(4, "main")]
    assert shapes[(4, "labels")] == "(N,)"
    arrows = [p for p in figure.axes[0].patches if isinstance(p, FancyArrowPatch)]
    assert len(arrows) == len(pipeline.ARROWS)
    texts = _texts(figure)
    for arrow in pipeline.ARROWS:
        assert arrow.shape in texts
        assert arrow.stop > arrow.start
    # each row after the first is reached by an arrow on the logits' path
    reached = {a.stop for a in pipeline.ARROWS if a.lane == "main"}
    assert reached == set(range(1, len(pipeline.STEPS)))


def test_each_chapter_sits_where_it_acts():
    rows = {
        step.name: index
        for index, row in enumerate(pipeline.STEPS)
        for step in row
    }
    where = {c.number: range(c.first, c.last + 1) for c in pipeline.CHAPTERS}
    assert sorted(where) == list(range(1, 9))
    assert {rows["input_ids"], rows["shift"], rows["flatten"]} <= set(where[1])
    assert {rows["mask"], rows["sum / count"]} <= set(where[2])
    assert set(where[3]) == {rows["log-softmax"], rows["pick the target"]}
    assert set(where[4]) == {rows["mask"]}
    assert set(where[5]) == {rows["sum / count"]}
    assert rows["logits"] in where[6] and rows["log-softmax"] in where[6]
    assert set(where[7]) == {rows["pick the target"]}
    assert set(where[8]) == {rows["input_ids"]}
    # brackets in one column never overlap
    for column in (0, 1):
        spans = sorted((c.first, c.last) for c in pipeline.CHAPTERS if c.column == column)
        for (_, last), (first, _) in zip(spans, spans[1:]):
            assert last < first


def test_the_figure_fits_the_text_column_and_stays_inside_it(figure):
    assert figure.get_figwidth() == pytest.approx(TEXT_WIDTH_IN)
    renderer = figure.canvas.get_renderer()
    frame = figure.bbox
    for text in figure.axes[0].texts:
        assert text.get_fontsize() >= 9
        box = text.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, text.get_text()
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1, text.get_text()


def test_no_two_texts_overlap(figure):
    renderer = figure.canvas.get_renderer()
    texts = [t for t in figure.axes[0].texts if t.get_text()]
    boxes = [t.get_window_extent(renderer) for t in texts]
    for i, first in enumerate(boxes):
        for j in range(i + 1, len(boxes)):
            assert not first.overlaps(boxes[j]), (
                texts[i].get_text(), texts[j].get_text()
            )
