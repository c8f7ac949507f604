"""The book's version history, executed on the releases themselves.

The chapters say how older releases of transformers and Keras computed the
loss.  Those sentences are not checked against copies of the old code: each
release is installed in a folder of its own (``pip install --no-deps
--target``, next to the pinned PyTorch and TensorFlow of the book's
environment) by ``make history``, which ``make test`` runs first, and the same
tiny batch goes through every release in a fresh interpreter whose
``PYTHONPATH`` puts that folder first.  Keras 2.9-2.11 cannot be imported on
Python 3.11 (they need TensorFlow 2.9-2.11), so their wheels are downloaded
and the files the book quotes are read, and where possible executed, from
the wheel.

Nothing here downloads at run time: :func:`install` is the only function
that uses the network, and the runs fail with a message naming ``make
history`` when a release is missing.

Layout of the history folder (``.history/`` at the repository root, or
``$COMPANION_HISTORY_DIR``)::

    wheels/<package>-<version>/*.whl   what was downloaded
    <package>-<version>/               the installed release (runnable ones)
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "KERAS2_WHEELS",
    "KERAS_RELEASES",
    "PINNED",
    "QUOTES",
    "TRANSFORMERS_RELEASES",
    "TRANSFORMERS_WHEELS",
    "Quote",
    "Release",
    "history_dir",
    "install",
    "keras2_history",
    "keras_history",
    "keras_table",
    "missing_quotes",
    "replica_losses",
    "release_file",
    "run_probe",
    "transformers_history",
    "transformers_table",
]

_REPO_ROOT = Path(__file__).resolve().parents[2]
_HISTORY_DIR_VARIABLE = "COMPANION_HISTORY_DIR"
_PROBES = "companion.experiments.history_probes"


@dataclass(frozen=True)
class Release:
    """One release of a package, with the exact pins it is installed with.

    ``pins`` are installed together, without dependency resolution, into
    the release's own folder: the package itself and those of its
    companions whose pinned versions it would reject (tokenizers,
    huggingface_hub, safetensors) or that its Trainer needs (accelerate).
    ``runnable=False`` marks a release that cannot be imported on this
    Python: its wheel is only downloaded, and read.
    """

    package: str
    version: str
    pins: tuple[str, ...]
    runnable: bool = True

    @property
    def folder(self) -> str:
        return f"{self.package}-{self.version}"


TRANSFORMERS_RELEASES: tuple[Release, ...] = (
    Release("transformers", "4.45.2", ("transformers==4.45.2", "tokenizers==0.20.0",
                                       "huggingface_hub==0.25.2", "safetensors==0.4.5",
                                       "accelerate==0.34.2")),
    Release("transformers", "4.46.0", ("transformers==4.46.0", "tokenizers==0.20.1",
                                       "huggingface_hub==0.26.1", "safetensors==0.4.5",
                                       "accelerate==1.0.1")),
    Release("transformers", "4.51.3", ("transformers==4.51.3", "tokenizers==0.21.1",
                                       "huggingface_hub==0.30.2", "safetensors==0.5.3",
                                       "accelerate==1.6.0")),
    Release("transformers", "4.52.1", ("transformers==4.52.1", "tokenizers==0.21.1",
                                       "huggingface_hub==0.31.4", "safetensors==0.5.3",
                                       "accelerate==1.7.0")),
)
"""The transformers releases the book's history names, oldest first."""

TRANSFORMERS_WHEELS: tuple[Release, ...] = (
    Release("transformers", "4.45.0", ("transformers==4.45.0",), runnable=False),
)
"""transformers releases the book cites but does not run: read from their wheels."""

KERAS_RELEASES: tuple[Release, ...] = (
    Release("keras", "3.6.0", ("keras==3.6.0",)),
    Release("keras", "3.7.0", ("keras==3.7.0",)),
)
"""Keras 3 just before and at the release that added ``mean_with_sample_weight``."""

KERAS2_WHEELS: tuple[Release, ...] = (
    Release("keras", "2.9.0", ("keras==2.9.0",), runnable=False),
    Release("keras", "2.10.0", ("keras==2.10.0",), runnable=False),
    Release("keras", "2.11.0", ("keras==2.11.0",), runnable=False),
)
"""Keras 2 releases: read from their wheels (they do not import on Python 3.11)."""

PINNED: dict[str, str] = {"transformers": "5.23.0", "keras": "3.15.1", "tf-keras": "2.21.0"}
"""The releases of the book's own environment (``requirements.txt``)."""


def _all_releases() -> tuple[Release, ...]:
    return TRANSFORMERS_RELEASES + TRANSFORMERS_WHEELS + KERAS_RELEASES + KERAS2_WHEELS


def history_dir() -> Path:
    """Where :func:`install` puts the releases (``$COMPANION_HISTORY_DIR``
    or ``.history/`` at the repository root)."""
    return Path(os.environ.get(_HISTORY_DIR_VARIABLE) or _REPO_ROOT / ".history")


def install(directory: str | Path | None = None, *, python: str | None = None) -> Path:
    """Download every release and install the runnable ones (needs the network).

    Wheels are kept under ``wheels/``, so a second call installs offline.
    Writes ``installed.json`` (release -> pins) last, so a folder without it
    is an interrupted install.
    """
    root = Path(directory) if directory is not None else history_dir()
    python = python or sys.executable
    root.mkdir(parents=True, exist_ok=True)
    pip = [python, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    for release in _all_releases():
        wheels = root / "wheels" / release.folder
        if not any(wheels.glob("*.whl")):
            subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:",
                            "-d", str(wheels), *release.pins], check=True)
        if release.runnable:
            target = root / release.folder
            subprocess.run(["rm", "-rf", str(target)], check=True)
            subprocess.run([*pip, "install", "--no-deps", "--no-index", "--no-compile",
                            "--find-links", str(wheels), "--target", str(target),
                            *release.pins], check=True)
    (root / "installed.json").write_text(json.dumps(
        {release.folder: list(release.pins) for release in _all_releases()}, indent=1) + "\n")
    return root


def _release_folder(release: Release) -> Path:
    folder = history_dir() / release.folder
    if not (history_dir() / "installed.json").is_file() or not folder.is_dir():
        raise FileNotFoundError(
            f"{release.package} {release.version} is not installed in {history_dir()}: "
            "run `make history` (it downloads the releases once)")
    return folder


def _wheel(release: Release) -> Path:
    wheels = sorted((history_dir() / "wheels" / release.folder).glob(f"{release.package}-*.whl"))
    if not wheels:
        raise FileNotFoundError(
            f"no {release.package} {release.version} wheel in {history_dir() / 'wheels'}: "
            "run `make history`")
    return wheels[0]


def _find_release(package: str, version: str) -> Release | None:
    for release in _all_releases():
        if (release.package, release.version) == (package, version):
            return release
    return None


def _installed_root(package: str) -> Path:
    """The folder that holds the pinned ``package``'s files (site-packages)."""
    import importlib.util

    module = {"tf-keras": "tf_keras"}.get(package, package)
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{package} is not installed in this environment")
    return Path(spec.origin).parent.parent


def release_file(package: str, version: str, path: str) -> str:
    """The text of ``path`` (as inside the wheel, e.g.
    ``"transformers/trainer.py"``) in ``package`` at ``version``.

    The pinned releases are read from this environment (after checking that
    the installed version is the pinned one), the others from the history
    folder or their wheel.
    """
    if PINNED.get(package) == version:
        import importlib.metadata

        installed = importlib.metadata.version(package)
        if installed != version:
            raise RuntimeError(f"{package} {installed} is installed, not the pinned {version}")
        return (_installed_root(package) / path).read_text()
    release = _find_release(package, version)
    if release is None:
        raise ValueError(f"version: {package} {version} is neither pinned nor in the history")
    if release.runnable:
        return (_release_folder(release) / path).read_text()
    with zipfile.ZipFile(_wheel(release)) as wheel:
        try:
            return wheel.read(path).decode()
        except KeyError:
            raise FileNotFoundError(f"{path} is not in {_wheel(release).name}") from None


# ---------------------------------------------------------------------------
# Quotes: every line the book quotes from a release that is not pinned
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Quote:
    """A piece of a release's source that the book quotes verbatim, and the
    page (a notebook's stem) that quotes it."""

    package: str
    version: str
    path: str
    text: str
    page: str = "version_history"


QUOTES: tuple[Quote, ...] = (
    Quote("transformers", "4.45.0", "transformers/models/llava/modeling_llava.py",
          "shift_attention_mask = attention_mask[..., 1:]", "02_llava_loss"),
    Quote("transformers", "4.45.2", "transformers/models/llava/modeling_llava.py",
          "shift_attention_mask = attention_mask[..., 1:]", "02_llava_loss"),
    Quote("transformers", "4.46.0", "transformers/models/llava/modeling_llava.py",
          "attention_mask[:, -(logits.shape[1] - 1) :]", "02_llava_loss"),
    Quote("transformers", "4.51.3", "transformers/models/llava/modeling_llava.py",
          "attention_mask[:, -(logits.shape[1] - 1) :]", "02_llava_loss"),
    Quote("transformers", "4.52.1", "transformers/models/llava/modeling_llava.py",
          "self.loss_function", "02_llava_loss"),
    Quote("transformers", "4.46.0", "transformers/trainer.py",
          'data_batch["labels"][..., 1:].ne(-100).sum()', "02_llava_loss"),
    Quote("transformers", "4.51.3", "transformers/trainer.py",
          '(batch["labels"].ne(-100)).sum()', "02_llava_loss"),
    Quote("transformers", "4.52.1", "transformers/trainer.py",
          '(batch["labels"].ne(-100)).sum()', "02_llava_loss"),
    Quote("keras", "2.9.0", "keras/engine/compile_utils.py",
          "def apply_mask(y_p, sw, mask):"),
    Quote("keras", "2.10.0", "keras/utils/losses_utils.py",
          "apply_valid_mask", "04_keras_masking"),
    Quote("keras", "2.11.0", "keras/utils/losses_utils.py",
          "apply_valid_mask", "04_keras_masking"),
    Quote("keras", "2.10.0", "keras/losses.py", "mask = losses_utils.get_mask(losses)"),
    Quote("keras", "2.11.0", "keras/losses.py", "in_mask = losses_utils.get_mask(y_pred)"),
    Quote("keras", "3.6.0", "keras/src/losses/loss.py",
          '"sum_over_batch_size",'),
    Quote("keras", "3.7.0", "keras/src/losses/loss.py",
          '"mean_with_sample_weight",'),
)
"""The quotes :func:`missing_quotes` checks against the releases' files."""


def missing_quotes(quotes: Iterable[Quote] = QUOTES) -> list[Quote]:
    """The quotes whose text is not in their release's file (empty when all hold)."""
    return [q for q in quotes if q.text not in release_file(q.package, q.version, q.path)]


# ---------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------


def run_probe(probe: str, release: Release | None, *args: str,
              env: Mapping[str, str] | None = None, timeout: float = 300) -> dict[str, Any]:
    """Run ``companion.experiments.history_probes.<probe>`` in a fresh
    interpreter, with ``release``'s folder first on ``PYTHONPATH`` (``None``:
    the pinned environment as it is), and return the JSON object it prints
    last.  A probe that fails raises ``RuntimeError`` with its stderr."""
    paths = [str(_REPO_ROOT)]
    if release is not None:
        paths.insert(0, str(_release_folder(release)))
    child_env = {
        **os.environ, "PYTHONPATH": os.pathsep.join(paths), "USE_TF": "0", "USE_FLAX": "0",
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TF_CPP_MIN_LOG_LEVEL": "2",
        "TF_ENABLE_ONEDNN_OPTS": "0", "PYTHONHASHSEED": "0", "PYTHONWARNINGS": "ignore",
        **(env or {}),
    }
    done = subprocess.run([sys.executable, "-m", f"{_PROBES}.{probe}", *args],
                          env=child_env, capture_output=True, text=True, timeout=timeout)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        where = "the pinned environment" if release is None else release.folder
        raise RuntimeError(f"probe {probe} failed in {where} (exit {done.returncode}):\n"
                           f"{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def _in_parallel(calls: Sequence[tuple[Any, ...]], workers: int = 2) -> list[dict[str, Any]]:
    """``run_probe(*call)`` for each call, two at a time; a call's last item
    may be a mapping: the probe's extra environment."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run_probe, *call[:-1], env=call[-1])
                   if isinstance(call[-1], Mapping) else pool.submit(run_probe, *call)
                   for call in calls]
        return [future.result() for future in futures]


def transformers_history() -> list[dict[str, Any]]:
    """The tiny LLaVA batch through every transformers release, then the pinned one.

    One record per release (see ``history_probes/transformers_release.py``):
    the code path read from the release's ``LlavaForConditionalGeneration``,
    the loss of three label variants, the release's own ``Trainer`` count
    on the same labels, and the loss one ``Trainer.train()`` step logs with
    one micro-batch and with two.  Every release loads the same weights,
    written by the pinned release first.
    """
    with tempfile.TemporaryDirectory() as tmp:
        weights = str(Path(tmp) / "tiny_llava.pt")
        pinned = run_probe("transformers_release", None, weights)
        older = _in_parallel([("transformers_release", r, weights) for r in TRANSFORMERS_RELEASES])
        replicas = replica_losses(weights)
    records = [*older, pinned]
    for record in records:
        record["replica"] = replicas[_replica_of(record["release"])]
    return records


def _replica_of(release: str) -> str:
    """Which of the book's replicas stands for ``release``'s LLaVA loss."""
    from packaging.version import Version

    version = Version(release)
    if version < Version("4.46"):
        return "4.45"
    if version < Version("4.52"):
        return "4.46"
    return "loss_function"


def replica_losses(weights: str | Path) -> dict[str, dict[str, float]]:
    """The book's replicas of each release's LLaVA loss, on the pinned
    release's logits for the probe's batch and weights: the two crops of the
    attention-mask filter (:func:`companion.experiments.llava.release_filter_loss`)
    and, for 4.52 on, :func:`companion.causal_lm_loss.shift_and_slice_loss`
    (what ``ForCausalLMLoss`` computes)."""
    import torch

    from companion.causal_lm_loss import shift_and_slice_loss
    from companion.experiments.history_probes import transformers_release as probe
    from companion.experiments.llava import release_filter_loss

    model = probe.build_model()
    probe.load_or_write_weights(model, str(weights))
    ids, mask, pixels, variants = probe.build_batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    out: dict[str, dict[str, float]] = {"4.45": {}, "4.46": {}, "loss_function": {}}
    for name, labels in variants.items():
        for crop in ("4.45", "4.46"):
            out[crop][name] = float(release_filter_loss(logits, labels, mask, crop))
        out["loss_function"][name] = float(shift_and_slice_loss(logits, labels))
    return out


def keras_history() -> list[dict[str, Any]]:
    """Keras's ``SparseCategoricalCrossentropy`` options on one padded
    example, in Keras 3.6.0, 3.7.0 and the pinned release, on the
    TensorFlow and the torch backends."""
    calls = [("keras_release", release, backend)
             for release in (*KERAS_RELEASES, None) for backend in ("tensorflow", "torch")]
    calls = [(probe, release, backend, {"KERAS_BACKEND": backend}) for probe, release, backend in calls]
    return _in_parallel(calls)


def keras2_history() -> list[dict[str, Any]]:
    """Keras 2.9-2.11's ``losses_utils.py``, read from each wheel and, where
    it has ``apply_valid_mask``, executed on tf-keras's per-token losses."""
    return _in_parallel([("keras2_wheel", None, str(_wheel(r))) for r in KERAS2_WHEELS])


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------


def _five(value: Any) -> str:
    """A float32 result to the 5 significant digits the book shows."""
    return f"{value:.5g}" if isinstance(value, float) else str(value)


def transformers_table(records: Sequence[Mapping[str, Any]]):
    """One row per release: code path, losses, the Trainer's count, and the
    loss logged with one and with two micro-batches."""
    import pandas as pd

    rows = []
    for r in records:
        v = r["variants"]
        rows.append({
            "release": r["release"],
            "code path": r["code_path"],
            "answers only": _five(v["masked"]["loss"]),
            "padding labelled": _five(v["pad_labeled"]["loss"]),
            "Trainer count": r["trainer"].get("lm_labels", "-"),
            "logged, 1 micro-batch": _five(r["train"]["1"]),
            "logged, 2 micro-batches": _five(r["train"]["2"]),
        })
    return pd.DataFrame(rows).set_index("release")


def keras_table(records: Sequence[Mapping[str, Any]]):
    """One row per (release, backend): the loss under each option, on the
    non-uniform predictions (the uniform ones give log 5 whatever the
    divisor)."""
    import pandas as pd

    rows = []
    for r in records:
        row = {"Keras": r["keras"], "backend": r["backend"]}
        for key, label in (("plain", "default"), ("ignore_class", "ignore_class=0"),
                           ("sample_weight", "0/1 sample_weight"),
                           ("ignore_class+sample_weight", "both"),
                           ("mean_with_sample_weight", "mean_with_sample_weight")):
            value = r["nonuniform"][key]
            row[label] = "ValueError" if str(value).startswith("ValueError") else _five(value)
        rows.append(row)
    return pd.DataFrame(rows).set_index(["Keras", "backend"])
