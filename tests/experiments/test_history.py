"""The version history: releases installed by `make history`, quotes that
hold in their release's file and in the page that quotes them."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import nbformat
import pytest

from companion.experiments import history

ROOT = Path(__file__).resolve().parents[2]


def _page_sources(stem: str) -> str:
    """A page's cell sources; for the history page, which prints the quotes
    from :data:`history.QUOTES`, its stored HTML outputs too."""
    notebook = nbformat.read(ROOT / "book" / f"{stem}.ipynb", as_version=4)
    texts = [cell.source for cell in notebook.cells]
    if stem == "version_history":
        texts += [html.unescape(output.get("data", {}).get("text/html", ""))
                  for cell in notebook.cells if cell.cell_type == "code"
                  for output in cell.outputs]
    return "\n".join(texts)


def test_every_release_is_installed_with_its_pins():
    installed = json.loads((history.history_dir() / "installed.json").read_text())
    for release in (*history.TRANSFORMERS_RELEASES, *history.TRANSFORMERS_WHEELS,
                    *history.KERAS_RELEASES, *history.KERAS2_WHEELS):
        assert installed[release.folder] == list(release.pins)
        if release.runnable:
            package = release.package.replace("-", "_")
            dist = next((history.history_dir() / release.folder).glob(
                f"{package}-{release.version}.dist-info"), None)
            assert dist is not None, release.folder


def test_every_quote_is_in_its_release():
    assert history.missing_quotes() == []


def test_a_changed_quote_is_reported():
    quote = history.QUOTES[0]
    wrong = history.Quote(quote.package, quote.version, quote.path, quote.text + " ")
    assert history.missing_quotes([quote, wrong]) == [wrong]


@pytest.mark.parametrize("quote", history.QUOTES, ids=lambda q: f"{q.version}-{q.text[:30]}")
def test_every_quote_is_on_the_page_that_quotes_it(quote):
    assert quote.text in _page_sources(quote.page), (
        f"{quote.page} no longer quotes {quote.text!r} from {quote.package} {quote.version}")


def test_the_crops_differ_between_4_45_and_4_46():
    path = "transformers/models/llava/modeling_llava.py"
    old = history.release_file("transformers", "4.45.2", path)
    new = history.release_file("transformers", "4.46.0", path)
    assert "attention_mask[..., 1:]" in old and "logits.shape[1] - 1" not in old
    assert "attention_mask[:, -(logits.shape[1] - 1) :]" in new


def test_pinned_releases_are_read_from_the_environment():
    text = history.release_file("transformers", "5.23.0", "transformers/loss/loss_utils.py")
    assert "def ForCausalLMLoss(" in text


def test_unknown_release_is_refused():
    with pytest.raises(ValueError, match="^version"):
        history.release_file("transformers", "4.0.0", "transformers/trainer.py")


def test_missing_history_names_make_history(tmp_path, monkeypatch):
    monkeypatch.setenv("COMPANION_HISTORY_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="make history"):
        history.release_file("transformers", "4.46.0", "transformers/trainer.py")
    with pytest.raises(FileNotFoundError, match="make history"):
        history.release_file("keras", "2.9.0", "keras/losses.py")


def test_a_failing_probe_reports_its_stderr(monkeypatch):
    with pytest.raises(RuntimeError, match="keras_release"):
        history.run_probe("keras_release", None, "tensorflow",
                          env={"KERAS_BACKEND": "no-such-backend"})


def test_the_replica_of_each_release():
    assert [history._replica_of(r.version) for r in history.TRANSFORMERS_RELEASES] == [
        "4.45", "4.46", "4.46", "loss_function"]
    assert history._replica_of("5.23.0") == "loss_function"


def test_the_page_is_in_the_table_of_contents():
    assert re.search(r"file: book/version_history\b", (ROOT / "_toc.yml").read_text())
