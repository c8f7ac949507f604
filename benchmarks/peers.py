"""The losses the benchmark compares, all called the same way.

Every variant is ``fn(hidden, weight, labels) -> loss`` or
``-> (loss, kept)``, where ``kept`` is what the caller holds through the
backward pass (the logits a model's output keeps).  ``hidden (B, T, d)``
and ``weight (V, d)`` require grad, ``labels (B, T)`` int64 with ``-100``
ignored, scored as ``ForCausalLMLoss`` scores them (position ``t`` against
``labels[:, t + 1]``).

The peers from other packages (torchtune, Cut Cross-Entropy, Liger Kernel)
are imported from the folder ``make benchmark`` installs them in
(``.bench-deps``, see ``requirements-benchmark.txt``), never from the book's
environment; a peer that does not import is reported with the exact error.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH_DEPS = REPO_ROOT / ".bench-deps"

Loss = Callable[..., Any]


def use_bench_deps() -> None:
    """Put ``.bench-deps`` at the *end* of ``sys.path``.

    Packages the book's environment already has (torch, numpy,
    transformers) keep their pinned versions; only the peers and what they
    need come from the folder.
    """
    if BENCH_DEPS.is_dir() and str(BENCH_DEPS) not in sys.path:
        sys.path.append(str(BENCH_DEPS))


@dataclass(frozen=True)
class Variant:
    """One line of the benchmark: a loss, its inputs' dtype and masking."""

    name: str
    label: str
    make: Callable[[int], Loss]  # vocab -> loss function
    dtype: str = "float32"
    masked: float = 0.0  # fraction of positions whose label is -100
    needs_gpu: bool = False
    compiled: bool = False
    chunk_bytes: int | None = None
    package: str = ""
    note: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)


def _shifted(labels):
    from companion.causal_lm_loss import shift_labels_with_padding

    return shift_labels_with_padding(labels)


# --------------------------------------------------------------------------
# Eager, as transformers and as plain PyTorch compute it
# --------------------------------------------------------------------------


def make_transformers_eager(vocab: int) -> Loss:
    """``ForCausalLMLoss`` on logits the caller keeps, as ``outputs.logits``.

    transformers upcasts the logits with ``.float()`` inside the loss (a
    copy for bfloat16 logits, nothing for float32).
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    def loss(hidden, weight, labels):
        logits = hidden @ weight.T  # kept by the model output
        return ForCausalLMLoss(logits, labels, vocab), logits

    return loss


def _plain_loss(hidden, weight, targets):
    """Cross-entropy of ``hidden @ weight.T`` against shifted targets, float32."""
    import torch.nn.functional as F

    logits = hidden @ weight.T
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=-100,
    )


def make_plain_eager(vocab: int) -> Loss:
    """The library's eager loss, ``label_padding_loss`` of ``hidden @ weight.T``."""
    from companion.experiments.loss_memory import eager_label_padding_loss

    return eager_label_padding_loss


def make_compiled_eager(vocab: int) -> Loss:
    """``torch.compile`` of the eager loss (default mode, static shapes)."""
    import torch

    compiled = torch.compile(_plain_loss, dynamic=False)

    def loss(hidden, weight, labels):
        return compiled(hidden, weight, _shifted(labels))

    return loss


# --------------------------------------------------------------------------
# The package's chunked losses
# --------------------------------------------------------------------------


def make_chunked(chunk_bytes: int | None = None) -> Callable[[int], Loss]:
    def make(vocab: int) -> Loss:
        from companion.chunked_loss import chunked_causal_lm_loss

        def loss(hidden, weight, labels):
            return chunked_causal_lm_loss(
                hidden, weight, labels, chunk_bytes=chunk_bytes
            )

        return loss

    return make


def make_checkpointed(vocab: int) -> Loss:
    from companion.chunked_loss import checkpointed_chunked_loss

    return checkpointed_chunked_loss


# --------------------------------------------------------------------------
# Other packages' losses
# --------------------------------------------------------------------------


def make_torchtune(vocab: int) -> Loss:
    """torchtune's ``CEWithChunkedOutputLoss`` on the model's 8 logit chunks.

    torchtune's decoder returns its output as a list of chunks
    (``num_output_chunks = 8``), which the caller keeps; its recipes shift
    the labels themselves.
    """
    use_bench_deps()
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    criterion = CEWithChunkedOutputLoss(num_output_chunks=8)

    def loss(hidden, weight, labels):
        chunks = [part @ weight.T for part in hidden.chunk(8, dim=1)]
        return criterion(chunks, _shifted(labels)), chunks

    return loss


def make_cce(impl: str) -> Callable[[int], Loss]:
    """Cut Cross-Entropy's ``linear_cross_entropy`` with ``impl``.

    ``"torch_compile"`` is its CPU path (``torch.compile`` of the eager
    loss, dynamic shapes); ``"cce"`` its Triton kernel (a GPU).
    """

    def make(vocab: int) -> Loss:
        use_bench_deps()
        from cut_cross_entropy import linear_cross_entropy

        def loss(hidden, weight, labels):
            return linear_cross_entropy(
                hidden, weight, labels, shift=True, impl=impl
            )

        return loss

    return make


def make_liger(vocab: int) -> Loss:
    """Liger Kernel's fused linear cross-entropy (Triton: a GPU)."""
    use_bench_deps()
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    criterion = LigerFusedLinearCrossEntropyLoss()

    def loss(hidden, weight, labels):
        targets = _shifted(labels).reshape(-1)
        return criterion(weight, hidden.reshape(-1, hidden.size(-1)), targets)

    return loss


def import_error(make: Callable[[int], Loss]) -> str | None:
    """The exact reason a peer does not import here, or ``None``."""
    try:
        make(8)
    except Exception as error:  # noqa: BLE001 - any failure is the reason
        last = traceback.format_exception_only(type(error), error)[-1].strip()
        return last[:300]
    return None


MIB = 2**20

VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("transformers_eager", "eager, transformers (logits kept)",
                make_transformers_eager, tags=("peer",)),
        Variant("eager", "eager", make_plain_eager, tags=("peer", "baseline")),
        Variant("compiled_eager", "torch.compile(eager)", make_compiled_eager,
                compiled=True, tags=("peer",)),
        Variant("cce_torch_compile", "Cut Cross-Entropy, CPU path",
                make_cce("torch_compile"), compiled=True,
                package="cut-cross-entropy", tags=("peer",)),
        Variant("torchtune_chunked", "torchtune chunked (8)", make_torchtune,
                package="torchtune", tags=("peer",)),
        Variant("checkpointed", "checkpointed chunks", make_checkpointed,
                tags=("peer",)),
        Variant("chunked", "chunked", make_chunked(), tags=("ours",)),
        Variant("chunked_masked", "chunked, half masked", make_chunked(),
                masked=0.5, tags=("ours",)),
        Variant("chunked_bf16", "chunked, bfloat16", make_chunked(),
                dtype="bfloat16", tags=("ours",)),
        Variant("chunked_bf16_masked", "chunked, bfloat16, half masked",
                make_chunked(), dtype="bfloat16", masked=0.5, tags=("ours",)),
        Variant("transformers_eager_bf16", "eager, transformers, bfloat16",
                make_transformers_eager, dtype="bfloat16", tags=("peer",)),
        Variant("liger_fused", "Liger fused linear CE", make_liger,
                needs_gpu=True, package="liger-kernel", tags=("peer",)),
        Variant("cce_kernel", "Cut Cross-Entropy kernel", make_cce("cce"),
                needs_gpu=True, package="cut-cross-entropy", tags=("peer",)),
    )
}
"""Every variant of the main comparison, by the name the results use."""

SWEEP_BUDGETS_MIB = (16, 64, 256, 1024)
"""Chunk budgets (MiB) of the chunk-size sweep, in float32 and bfloat16."""

SWEEP_VARIANTS: dict[str, Variant] = {
    f"chunked_{dtype_tag}{mib}mib": Variant(
        f"chunked_{dtype_tag}{mib}mib",
        f"chunked, {dtype}, {mib} MiB",
        make_chunked(mib * MIB),
        dtype=dtype,
        chunk_bytes=mib * MIB,
        tags=("sweep",),
    )
    for dtype, dtype_tag in (("float32", ""), ("bfloat16", "bf16_"))
    for mib in SWEEP_BUDGETS_MIB
}
"""The chunk-size sweep: the chunked loss at each budget."""

ALL_VARIANTS = {**VARIANTS, **SWEEP_VARIANTS}
