"""The package's two layers: the library, and the book's experiments on top.

* the library (the modules directly in ``companion/``) never imports
  ``companion.experiments`` or ``companion.plots``;
* importing the PyTorch library imports neither TensorFlow nor Keras, and
  ``import companion`` alone imports no framework at all;
* every module of the library and of the experiments lists its public
  names in ``__all__``, and the notebooks use only those.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "companion"
NOTEBOOKS = sorted((ROOT / "book").glob("*.ipynb"))

LIBRARY = sorted(
    f"companion.{path.stem}" for path in PACKAGE.glob("*.py") if path.stem != "__init__"
)
"""Every module of the library, ``companion._checks`` included."""

EXPERIMENTS = sorted(
    f"companion.experiments.{path.stem}"
    for path in (PACKAGE / "experiments").glob("*.py")
    if path.stem != "__init__"
)
GRADERS = sorted(
    f"companion.exercises.{path.stem}" for path in (PACKAGE / "exercises").glob("ch*.py")
)
"""The exercises' checkers, one module per chapter (no public names)."""
FRAMEWORK_MODULES = ("tensorflow", "keras", "tf_keras")


def _module_path(module: str) -> Path:
    return ROOT / (module.replace(".", "/") + ".py")


def _imported_modules(module: str) -> set[str]:
    """Every module ``module`` imports, at any depth of its source."""
    imported = set()
    for node in ast.walk(ast.parse(_module_path(module).read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f"{node.module}.{alias.name}" for alias in node.names)
    return imported


def test_the_layers_are_found():
    assert {"companion.causal_lm_loss", "companion.keras_loss", "companion.memory"} <= set(LIBRARY)
    assert {"companion.experiments.ddp_demo", "companion.experiments.keras_masking"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("module", LIBRARY)
def test_the_library_never_imports_the_experiments_or_the_plots(module):
    upward = sorted(
        name
        for name in _imported_modules(module)
        if name.startswith(("companion.experiments", "companion.plots"))
        or name in ("companion.experiments", "companion.plots")
    )
    assert upward == [], f"{module} imports {upward}"


def _modules_after(code: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=False, cwd=ROOT, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_pytorch_library_imports_neither_tensorflow_nor_keras():
    modules = [name for name in LIBRARY if name != "companion.keras_loss"]
    loaded = _modules_after("\n".join(f"import {name}" for name in modules))
    assert set(modules) <= loaded
    assert not loaded & set(FRAMEWORK_MODULES)


def test_importing_companion_is_cheap_and_quietens_tensorflow():
    code = (
        "import os, warnings\n"
        "import companion\n"
        "assert os.environ['TF_CPP_MIN_LOG_LEVEL'] == '2'\n"
        "assert os.environ['TF_ENABLE_ONEDNN_OPTS'] == '0'\n"
        "assert any(f[1] is not None and f[1].pattern == 'IProgress not found'\n"
        "           for f in warnings.filters)\n"
    )
    loaded = _modules_after(code)
    assert not loaded & {"torch", "numpy", *FRAMEWORK_MODULES}


def _public_definitions(module: str) -> set[str]:
    names = set()
    for node in ast.parse(_module_path(module).read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if not name.startswith("_")}


@pytest.mark.parametrize(
    "module", [name for name in LIBRARY if name != "companion._checks"] + EXPERIMENTS + GRADERS
)
def test_every_module_lists_exactly_its_public_names(module):
    listed = importlib.import_module(module).__all__
    assert len(listed) == len(set(listed)), "duplicates in __all__"
    assert set(listed) == _public_definitions(module)


def _notebook_code(path: Path) -> list[str]:
    cells = json.loads(path.read_text())["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]


def _public(module: str) -> set[str]:
    loaded = importlib.import_module(module)
    listed = getattr(loaded, "__all__", None)
    if listed is not None:
        return set(listed)
    # companion.plots.*: no __all__; everything without an underscore.
    return {name for name in vars(loaded) if not name.startswith("_")}


def _is_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _companion_uses(source: str) -> list[tuple[str, str]]:
    """``(module, name)`` for every companion name a cell imports or reads."""
    tree = ast.parse(source)
    aliases: dict[str, str] = {}
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("companion.") and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("companion"):
            for alias in node.names:
                qualified = f"{node.module}.{alias.name}"
                if _is_module(qualified):
                    aliases[alias.asname or alias.name] = qualified
                else:
                    uses.append((node.module, alias.name))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            uses.append((aliases[node.value.id], node.attr))
    return uses


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_use_only_public_names(path):
    # Aliases are notebook-wide: a module imported in the first cell is used
    # in later ones.
    source = "\n".join(_notebook_code(path))
    source = re.sub(r"^\s*[%!].*$", "", source, flags=re.MULTILINE)
    private = sorted(
        f"{module}.{name}"
        for module, name in _companion_uses(source)
        if name.startswith("_") or name not in _public(module)
    )
    assert private == []


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_run_the_demo_by_its_module_path(path):
    for source in _notebook_code(path):
        for module in re.findall(r'"-m",\s*"(companion[\w.]*)"', source):
            assert _is_module(module), module


def test_the_api_page_documents_every_library_module():
    """book/api.md has an ``automodule`` for each public library module."""
    page = (ROOT / "book" / "api.md").read_text()
    documented = re.findall(r"^\.\. automodule:: (companion\.\w+)$", page, re.M)
    public = [name for name in LIBRARY if name != "companion._checks"]
    assert sorted(documented) == public
