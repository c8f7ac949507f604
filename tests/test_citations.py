"""Every address in the bibliography has the shape of a real one, and every
link into a release's source names a file that exists at that release.

Offline: a GitHub ``blob/<tag>/<path>`` link into transformers, Keras,
tf-keras or PyTorch is resolved against the release's own files, the pinned
ones in this environment and the older ones in the history folder that
``make history`` fills (:mod:`companion.experiments.history`).  A link to a
release the book does not install fails: cite a release that is checked, or
add it to the history.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

from companion.experiments import history

ROOT = Path(__file__).resolve().parent.parent
BIB = ROOT / "book" / "references.bib"

ENTRY = re.compile(r"@(\w+)\s*\{\s*([^,\s]+)\s*,(.*?)\n\}", re.S)
URL = re.compile(r"(?:url\s*=\s*\{|\\url\{)([^}\s]+)\}")

#: GitHub repository -> (package name in history.release_file, how a path in
#: the repository maps to the path inside the wheel)
RELEASE_REPOSITORIES = {
    "huggingface/transformers": ("transformers", lambda p: p.removeprefix("src/")),
    "keras-team/keras": ("keras", lambda p: p),
    "keras-team/tf-keras": ("tf-keras", lambda p: p.replace("tf_keras/", "tf_keras/src/", 1)),
    "pytorch/pytorch": ("torch", lambda p: p),
}

SHAPES = {
    "arxiv.org": re.compile(r"^/abs/\d{4}\.\d{4,5}$"),
    "doi.org": re.compile(r"^/10\.\d{4,9}/\S+$"),
    "github.com": re.compile(
        r"^/[\w.-]+/[\w.-]+(/(pull|issues)/\d+|/releases/tag/v[\w.]+"
        r"|/blob/(v[\w.]+|[0-9a-f]{40}|main)/[\w./-]+\.\w+)?/?$"),
}


def _entries() -> list[tuple[str, str, str]]:
    return [(m.group(2), m.group(1).lower(), m.group(3)) for m in ENTRY.finditer(BIB.read_text())]


def _urls() -> list[tuple[str, str]]:
    return [(key, url) for key, _, body in _entries() for url in URL.findall(body)]


def test_the_bibliography_is_parsed():
    keys = [key for key, _, _ in _entries()]
    assert len(keys) >= 50 and len(keys) == len(set(keys)), "duplicate or missing keys"
    assert len(_urls()) >= len(keys) - 5


@pytest.mark.parametrize(("key", "url"), _urls(), ids=[key for key, _ in _urls()])
def test_every_address_has_the_shape_of_a_real_one(key, url):
    parts = urlparse(url)
    assert parts.scheme == "https", f"{key}: not https: {url}"
    assert parts.netloc and "." in parts.netloc, f"{key}: no host: {url}"
    assert not parts.query, f"{key}: query string: {url}"
    shape = SHAPES.get(parts.netloc)
    if shape is not None:
        assert shape.match(parts.path), f"{key}: {parts.netloc} address of an unknown shape: {url}"


def _release_links() -> list[tuple[str, str, str, str]]:
    """GitHub links into the releases' Python sources (a ``.cu`` or ``.cpp``
    file of PyTorch is not in its wheel: those get the shape check only)."""
    links = []
    for key, url in _urls():
        m = re.match(r"https://github\.com/([\w.-]+/[\w.-]+)/blob/([\w.]+)/(.+)$", url)
        if m and m.group(1) in RELEASE_REPOSITORIES and m.group(3).endswith(".py"):
            links.append((key, m.group(1), m.group(2).removeprefix("v"), m.group(3)))
    return links


def test_links_into_release_repositories_name_a_release():
    for key, url in _urls():
        m = re.match(r"https://github\.com/([\w.-]+/[\w.-]+)/blob/([\w.]+)/", url)
        if m and m.group(1) in RELEASE_REPOSITORIES:
            assert re.fullmatch(r"v\d+\.\d+\.\d+", m.group(2)), (
                f"{key}: link into {m.group(1)} at {m.group(2)!r}, not at a release tag")


def test_release_links_are_found():
    assert len(_release_links()) >= 20


@pytest.mark.parametrize(("key", "repository", "version", "path"), _release_links(),
                         ids=[link[0] for link in _release_links()])
def test_every_link_into_a_release_names_a_file_of_that_release(key, repository, version, path):
    package, wheel_path = RELEASE_REPOSITORIES[repository]
    if package == "torch":
        import torch

        assert torch.__version__.split("+")[0] == version, f"{key}: torch {version} is not pinned"
        assert (Path(torch.__file__).parent.parent / path).is_file(), f"{key}: no {path}"
        return
    try:
        text = history.release_file(package, version, wheel_path(path))
    except ValueError:
        pytest.fail(f"{key}: {package} {version} is neither pinned nor in the history")
    except FileNotFoundError as error:
        pytest.fail(f"{key}: {error}")
    assert text.strip(), f"{key}: {path} is empty at {version}"


def test_every_entry_is_cited_somewhere():
    cited = set()
    for page in [*ROOT.glob("book/*.ipynb"), *ROOT.glob("book/*.md")]:
        for keys in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", page.read_text()):
            cited.update(k.strip() for k in keys.split(","))
    uncited = sorted({key for key, _, _ in _entries()} - cited)
    assert not uncited, f"entries no page cites: {uncited}"
