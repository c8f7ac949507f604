"""Is this Python environment the one the book runs in?

``python -m companion.check_env`` prints one line per check: the Python
version, the platform, each pinned package of ``requirements.txt`` and
``requirements-no-deps.txt`` (the ones that apply to this platform, by their
environment markers) with the version installed, and the device the
chapters will use.  It says what is missing or wrong and how to fix it,
and exits with status 1 if anything is, 0 otherwise.

It imports no framework and needs nothing beyond the standard library and
``packaging`` (or the copy that pip carries), so it runs in a broken or an
empty environment too, which is when it is needed.  It reads the pins from
the repository the package was installed from (``pip install -e .``).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

__all__ = [
    "DEVICE_VARIABLE",
    "REQUIREMENT_FILES",
    "Check",
    "check_environment",
    "check_platform",
    "check_python",
    "check_requirements",
    "installed_version",
    "main",
    "read_requirements",
]

REQUIREMENT_FILES: tuple[str, ...] = ("requirements.txt", "requirements-no-deps.txt")
"""The pin files, relative to the repository root."""

DEVICE_VARIABLE = "COMPANION_DEVICE"
"""The variable that opts a chapter into another device (see :mod:`companion.device`)."""

_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Check:
    """One line of the report.

    Attributes:
        name: what was checked (a package name, ``python``, ``platform``).
        wanted: what the book needs.
        found: what is there (``None``: nothing).
        ok: whether it is what the book needs.
        advice: how to fix it (empty when ``ok``).
    """

    name: str
    wanted: str
    found: str | None
    ok: bool
    advice: str = ""


def _packaging():
    try:
        from packaging.markers import Marker
        from packaging.requirements import Requirement
        from packaging.version import Version
    except ImportError:  # an environment without packaging: pip carries a copy
        from pip._vendor.packaging.markers import Marker  # type: ignore[no-redef]
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
        from pip._vendor.packaging.version import Version  # type: ignore[no-redef]
    return Marker, Requirement, Version


def read_requirements(path: str | Path) -> list[str]:
    """The requirement lines of a pip requirements file, comments dropped.

    Raises:
        TypeError: ``path`` is not a ``str`` or ``Path``.
        FileNotFoundError: there is no such file.
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or a pathlib.Path; got {type(path).__name__}")
    lines = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        # a marker may hold '#' only inside quotes, which pins here never do
        if line:
            lines.append(line)
    return lines


def installed_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or ``None``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str (a distribution name); got {name!r}")
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_python(version: Sequence[int] | None = None) -> Check:
    """Python 3.11 or newer (the pins were resolved for 3.11)."""
    version = tuple(sys.version_info[:3] if version is None else version)
    found = ".".join(map(str, version))
    ok = version[:2] >= (3, 11)
    return Check("python", ">= 3.11 (tested with 3.11)", found, ok, "" if ok else "install Python 3.11")


def check_platform(system: str | None = None, machine: str | None = None, mac_version: str | None = None) -> Check:
    """A platform that PyTorch 2.13.0 and TensorFlow 2.21.0 publish wheels for.

    Linux (x86_64, aarch64), macOS 14 or newer on Apple Silicon, and
    Windows (x86_64).  PyTorch publishes no macOS x86_64 (Intel) wheels
    after 2.2, so the pinned 2.13.0 cannot be installed on an Intel Mac.
    """
    system = platform.system() if system is None else system
    machine = (platform.machine() if machine is None else machine).lower()
    found = f"{system} {machine}"
    if system == "Darwin":
        mac = platform.mac_ver()[0] if mac_version is None else mac_version
        found = f"macOS {mac} {machine}"
        if machine in ("x86_64", "i386"):
            return Check("platform", "Linux, Windows x86_64 or macOS 14+ on Apple Silicon", found, False,
                         "PyTorch has no macOS Intel wheels after 2.2: run the book on Linux "
                         "(a virtual machine or a container) or on another computer")
        major = int(mac.split(".")[0]) if mac and mac.split(".")[0].isdigit() else 0
        if major < 14:
            return Check("platform", "macOS 14 or newer", found, False,
                         "torch 2.13.0's macOS wheels need macOS 14 (Sonoma) or newer")
        return Check("platform", "macOS 14+ on Apple Silicon", found, True)
    if system == "Windows":
        ok = machine in ("amd64", "x86_64")
        return Check("platform", "Windows x86_64", found, ok, "" if ok else "torch 2.13.0 has Windows wheels for x86_64 only")
    if system == "Linux":
        ok = machine in ("x86_64", "amd64", "aarch64", "arm64")
        return Check("platform", "Linux x86_64 or aarch64", found, ok, "" if ok else "no torch 2.13.0 wheels for this machine")
    return Check("platform", "Linux, macOS or Windows", found, False, "an untested operating system")


def check_requirements(
    lines: Sequence[str],
    environment: Mapping[str, str] | None = None,
    installed: Callable[[str], str | None] = installed_version,
) -> list[Check]:
    """One :class:`Check` per pin of ``lines`` that applies here.

    ``environment`` overrides the marker variables (``sys_platform``, ...),
    ``installed`` the version lookup: both exist so that another platform,
    or a broken environment, can be checked from this one.  A local version
    label (``2.13.0+cpu``) matches its pin (``2.13.0``).

    Raises:
        ValueError: a line is not a pin of the form ``name==version``.
    """
    Marker, Requirement, Version = _packaging()
    checks = []
    for line in lines:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(dict(environment or {})):
            continue
        pins = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if len(pins) != 1:
            raise ValueError(f"lines must pin one exact version (name==version); got {line!r}")
        wanted, found = pins[0], installed(requirement.name)
        if found is None:
            checks.append(Check(requirement.name, wanted, None, False, f"missing: pip install {requirement.name}=={wanted}"))
            continue
        same = Version(found).public == Version(wanted).public
        advice = "" if same else f"wrong version: pip install {requirement.name}=={wanted}"
        checks.append(Check(requirement.name, wanted, found, same, advice))
    return checks


def _extra_checks(environment: Mapping[str, str] | None, installed: Callable[[str], str | None]) -> list[Check]:
    checks = []
    on_linux = (environment or {}).get("sys_platform", sys.platform) == "linux"
    if on_linux and installed("tensorflow") and installed("tensorflow-cpu"):
        checks.append(Check("tensorflow", "tensorflow-cpu only, on Linux", installed("tensorflow"), False,
                            "both tensorflow and tensorflow-cpu are installed: pip uninstall tensorflow "
                            "(it prints CUDA-probe lines into the notebooks), then reinstall tensorflow-cpu"))
    torch_version = installed("torch")
    if torch_version and "+" in torch_version:
        build = torch_version.split("+", 1)[1]
        checks.append(Check("torch build", "any (the chapters run on the CPU)", build, True))
    device = os.environ.get(DEVICE_VARIABLE)
    checks.append(Check(DEVICE_VARIABLE, "unset or cpu (opt-in: cuda, mps)", device or "unset (cpu)",
                        device in (None, "", "cpu", "cuda", "mps"),
                        "" if device in (None, "", "cpu", "cuda", "mps") else f"{DEVICE_VARIABLE} must be cpu, cuda or mps"))
    return checks


def check_environment(
    root: str | Path | None = None,
    *,
    environment: Mapping[str, str] | None = None,
    installed: Callable[[str], str | None] = installed_version,
) -> list[Check]:
    """Every check: Python, platform, each pin of the repository's
    requirement files that applies here, and the device setting.

    Raises:
        ValueError: ``root`` holds no ``requirements.txt``.
    """
    root = _ROOT if root is None else Path(root)
    checks = [check_python(), check_platform()]
    if not (root / REQUIREMENT_FILES[0]).is_file():
        raise ValueError(
            f"root must be the book's repository, with {REQUIREMENT_FILES[0]}; none in {root} "
            "(install the package from a clone: pip install -e .)"
        )
    for name in REQUIREMENT_FILES:
        if (root / name).is_file():
            checks += check_requirements(read_requirements(root / name), environment, installed)
    return checks + _extra_checks(environment, installed)


def _report(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for check in checks:
        mark = "ok  " if check.ok else "FIX "
        found = check.found if check.found is not None else "not installed"
        line = f"{mark} {check.name:<{width}}  {found}"
        if not check.ok:
            line += f"  (needs {check.wanted}; {check.advice})"
        lines.append(line)
    bad = sum(not c.ok for c in checks)
    lines.append(f"{len(checks) - bad} ok, {bad} to fix" if bad else f"all {len(checks)} checks ok")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the report; return 0 when every check is ok, 1 otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    try:
        checks = check_environment(argv[0] if argv else None)
    except ValueError as error:
        print(f"FIX  {error}")
        return 1
    print(f"Python {sys.version.split()[0]} at {sys.executable}")
    print(_report(checks))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
