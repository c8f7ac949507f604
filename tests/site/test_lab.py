"""A chapter opened in JupyterLab, as `make lab` opens it, in headless Chromium.

`make lab` serves the copies that tools/lab_notebooks.py writes (glued
numbers, cross-references and citations written in); jupyterlab-myst draws
the math and the exercises.  The test starts JupyterLab from this
environment on a temporary copy, with a private HOME and settings, so
nothing is written into the repository.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAPTER = "02_llava_loss.ipynb"


def _lab_tool():
    spec = importlib.util.spec_from_file_location(
        "lab_notebooks", ROOT / "tools" / "lab_notebooks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("lab")
    _lab_tool().make_copies(ROOT / "book", tmp / "book")
    settings = tmp / "settings"
    for plugin, value in {
        "notebook-extension/tracker": {"windowingMode": "none"},  # every cell in the DOM
        "apputils-extension/notification": {"fetchNews": "false"},
    }.items():
        path = settings / "@jupyterlab" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, HOME=str(tmp / "home"), JUPYTERLAB_SETTINGS_DIR=str(settings))
    log_path = tmp / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
             "--IdentityProvider.token=", "--ServerApp.password=",
             f"--ServerApp.root_dir={tmp / 'book'}"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    urllib.request.urlopen(base + "/api/status", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(log_path.read_text()[-3000:])
                    time.sleep(0.3)
            yield base
        finally:
            server.terminate()
            server.wait(timeout=30)


@pytest.fixture(scope="module")
def chapter(browser, lab_server):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.goto(f"{lab_server}/lab/tree/{CHAPTER}?reset")
    page.wait_for_selector(".jp-MarkdownCell .myst", timeout=90_000)
    page.wait_for_function(
        "() => document.querySelectorAll('.jp-MarkdownCell .myst').length"
        " === document.querySelectorAll('.jp-MarkdownCell').length",
        timeout=90_000,
    )
    yield page, messages
    page.close()


def _rendered(page) -> str:
    return "\n".join(page.locator(".jp-MarkdownCell .myst").all_inner_texts())


def test_the_myst_renderer_is_active_without_errors(chapter):
    page, messages = chapter
    assert any("jupyterlab-myst is activated" in m for m in messages)
    assert not [m for m in messages if m.startswith("pageerror")]
    assert not [m for m in messages if m.startswith("error")], messages


def test_no_raw_role_or_tex_is_shown(chapter):
    page, _ = chapter
    text = _rendered(page)
    for raw in ("{glue", "{term}", "{cite", "{doc}", "{exercise}", "$-100$"):
        assert raw not in text


def test_glued_numbers_appear_as_on_the_site(chapter):
    page, _ = chapter
    notebook = json.loads((ROOT / "book" / CHAPTER).read_text(encoding="utf-8"))
    value = _lab_tool().glued_values(notebook)["llava_toy_loss"]
    cell = page.locator(".jp-MarkdownCell .myst", has_text="is their mean").first
    assert f"{value:.4f}" in cell.inner_text()
    assert "llava_toy_loss" not in _rendered(page)


def test_exercises_and_math_are_drawn(chapter):
    page, _ = chapter
    assert page.locator(".myst-exercise").count() >= 1
    assert page.locator(".jp-MarkdownCell .myst .katex").count() > 20
