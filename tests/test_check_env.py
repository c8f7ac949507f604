"""`python -m companion.check_env` on this machine: in the book's own
environment, in an empty one, and in one with a wrong version; and the
pins it reads, as each platform's markers select them."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from companion import check_env
from companion.device import book_device

ROOT = Path(__file__).resolve().parent.parent
LINUX = {"sys_platform": "linux", "platform_system": "Linux"}
MACOS = {"sys_platform": "darwin", "platform_system": "Darwin"}
WINDOWS = {"sys_platform": "win32", "platform_system": "Windows"}


def _run(python: str, *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != check_env.DEVICE_VARIABLE}
    environment.update(env or {})
    return subprocess.run([python, "-m", "companion.check_env"], capture_output=True, text=True,
                          cwd=ROOT, env=environment, timeout=120)


def test_the_books_environment_passes():
    done = _run(sys.executable)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].startswith("all ") and lines[-1].endswith(" checks ok")
    # every pin of requirements.txt that applies on Linux is listed, with its version
    for line in check_env.read_requirements(ROOT / "requirements.txt"):
        if "sys_platform" in line and "linux" not in line.split(";")[1].replace("!= \"linux\"", ""):
            continue
        name, version = line.split(";")[0].split("==")
        assert any(row.split()[1:3] == [name.strip(), version.strip()] or
                   (row.split()[1] == name.strip() and row.split()[2].startswith(version.strip() + "+"))
                   for row in lines if row.startswith("ok ")), name


@pytest.fixture(scope="module")
def empty_python(tmp_path_factory) -> str:
    """A new virtual environment with nothing but pip, the package on its path."""
    where = tmp_path_factory.mktemp("empty-venv")
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(where)
    return str(where / "bin" / "python")


def test_an_empty_environment_is_told_what_is_missing(empty_python):
    done = _run(empty_python, env={"PYTHONPATH": str(ROOT), check_env.DEVICE_VARIABLE: "tpu"})
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout
    assert "FIX  torch" in out and "not installed" in out and "pip install torch==2.13.0" in out
    assert "FIX  COMPANION_DEVICE" in out and "must be cpu, cuda or mps" in out
    assert "to fix" in out.splitlines()[-1]


def test_a_wrong_version_is_named_with_the_pin(empty_python, tmp_path):
    # an installed numpy 1.26.0, as far as package metadata can tell
    dist = tmp_path / "numpy-1.26.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: numpy\nVersion: 1.26.0\n")
    done = _run(empty_python, env={"PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])})
    assert done.returncode == 1
    row = next(line for line in done.stdout.splitlines() if line.split()[1:2] == ["numpy"])
    assert row.startswith("FIX ") and "1.26.0" in row and "pip install numpy==2.4.6" in row


def _selected(environment: dict[str, str]) -> dict[str, str]:
    lines = [line for name in check_env.REQUIREMENT_FILES for line in check_env.read_requirements(ROOT / name)]
    checks = check_env.check_requirements(lines, environment, installed=lambda name: None)
    return {check.name: check.wanted for check in checks}


@pytest.mark.parametrize("environment", [LINUX, MACOS, WINDOWS], ids=["linux", "macos", "windows"])
def test_each_platform_gets_one_tensorflow_and_tf_keras(environment):
    selected = _selected(environment)
    tensorflow = "tensorflow-cpu" if environment is LINUX else "tensorflow"
    assert tensorflow in selected and ({"tensorflow", "tensorflow-cpu"} - {tensorflow}).isdisjoint(selected)
    assert selected["tf-keras"] == selected[tensorflow] and selected["torch"] == "2.13.0"


def test_the_platform_check():
    assert check_env.check_platform("Linux", "x86_64").ok and check_env.check_platform("Linux", "aarch64").ok
    assert check_env.check_platform("Windows", "AMD64").ok
    assert check_env.check_platform("Darwin", "arm64", "14.5").ok
    assert not check_env.check_platform("Darwin", "arm64", "13.6").ok
    intel = check_env.check_platform("Darwin", "x86_64", "15.1")
    assert not intel.ok and "Intel" in intel.advice
    assert not check_env.check_python((3, 10, 12)).ok and check_env.check_python((3, 11, 7)).ok


def test_a_local_version_label_matches_its_pin():
    (check,) = check_env.check_requirements(["torch==2.13.0"], installed=lambda name: "2.13.0+cpu")
    assert check.ok
    (check,) = check_env.check_requirements(["torch==2.13.0"], installed=lambda name: "2.13.1+cpu")
    assert not check.ok


def test_the_device_is_the_cpu_unless_asked():
    assert book_device({}).type == "cpu"
    assert book_device({check_env.DEVICE_VARIABLE: ""}).type == "cpu"
    assert book_device({check_env.DEVICE_VARIABLE: " CPU "}).type == "cpu"
