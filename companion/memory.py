"""How much memory a loss needs: counted from first principles, and measured.

* :class:`TensorMemoryTracker` counts, exactly and deterministically, the
  bytes of tensor storage alive inside a ``with`` block, operator by
  operator, forward and backward alike;
* :func:`measure_peak_tensor_bytes` is its peak over one
  ``loss_fn(...).backward()``;
* :func:`estimate_peak_bytes` predicts that peak for the four causal-LM
  formulations of the book (:data:`ESTIMATED_VARIANTS`): the two eager ones
  of :mod:`companion.causal_lm_loss` on ``hidden @ weight.T``, and the two
  chunked ones of :mod:`companion.chunked_loss`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from companion._checks import require_positive_int
from companion.chunked_loss import chunk_rows, logits_row_bytes

__all__ = [
    "ESTIMATED_VARIANTS",
    "LossFunction",
    "TensorMemoryTracker",
    "estimate_peak_bytes",
    "measure_peak_tensor_bytes",
]

LossFunction = Callable[..., torch.Tensor]
"""A loss ``loss_fn(*args, **kwargs) -> 0-d tensor``."""

ESTIMATED_VARIANTS: tuple[str, ...] = (
    "shift_and_slice",
    "label_padding",
    "checkpointed_chunks",
    "chunked_function",
)
"""The formulations :func:`estimate_peak_bytes` knows, by the benchmark's names.

``shift_and_slice`` and ``label_padding``: the eager losses of
:mod:`companion.causal_lm_loss` on ``hidden @ weight.T``, which hold the
``(B, T, V)`` logits; ``checkpointed_chunks`` and ``chunked_function``:
:func:`companion.chunked_loss.checkpointed_chunked_loss` and
:func:`companion.chunked_loss.chunked_causal_lm_loss`.
"""


_DTYPE_OF_SIZE = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def estimate_peak_bytes(
    variant: str,
    batch: int,
    time: int,
    vocab: int,
    hidden_size: int,
    *,
    chunk_size: int | None = None,
    element_size: int = 4,
) -> int:
    """Bytes a formulation's forward + backward holds at its peak.

    The inputs are not counted.  With ``L = B*T*V`` logits elements,
    ``C = min(chunk_size, B*T)``, ``N = B*T`` and ``e`` the bytes of an
    input element:

    * eager (``shift_and_slice``, ``label_padding``): ``3 L e``.  During
      ``log_softmax``'s backward three ``(B, T, V)`` tensors are alive: the
      output ``log_softmax`` saved in the forward pass, the gradient
      ``nll_loss`` hands back, and the gradient being computed.  Later
      moments hold less (one ``(B, T, V)`` gradient and ``weight.grad``).
    * ``checkpointed_chunks``: the larger of two moments, plus the running
      ``(N, d)`` gradient of ``hidden``.  While a chunk's ``log_softmax``
      is differentiated: its three ``(C, V)`` tensors and the running
      ``(V, d)`` weight gradient, ``3 C V + V d``.  While that chunk's
      weight gradient is added to the running sum: the sum, the addend
      and the result, ``3 V d``.
    * ``chunked_function``: one chunk's block, ``C`` rows of
      :func:`companion.chunked_loss.logits_row_bytes`, and its ``(C, d)``
      rows (gathered, their gradient and, for 4- and 8-byte inputs, scaled:
      three; two for bfloat16), plus the two gradients it fills, ``(V, d)``
      and ``(N, d)``.  For a 2-byte input
      (bfloat16) the weight gradient is summed in float32, ``4 V d``
      bytes, and the peak is the larger of the loop (block, float32 sum,
      ``(N, d)`` gradient) and its end, when the float32 sum is rounded
      into the ``(V, d)`` gradient of the input's dtype.

    Args:
        variant: one of :data:`ESTIMATED_VARIANTS`.
        batch, time, vocab, hidden_size: ``B``, ``T``, ``V``, ``d``, >= 1.
        chunk_size: rows per chunk (chunked variants); ``None`` for the
            rows of the default budget,
            :func:`companion.chunked_loss.chunk_rows`.
        element_size: bytes per input element: 2 (bfloat16), 4 (float32)
            or 8 (float64).

    Returns:
        The estimate in bytes (tensors of ``O(B*T)`` elements left out).
    """
    if variant not in ESTIMATED_VARIANTS:
        raise ValueError(
            f"variant must be one of {sorted(ESTIMATED_VARIANTS)}; "
            f"got {variant!r}"
        )
    for value, name in (
        (batch, "batch"),
        (time, "time"),
        (vocab, "vocab"),
        (hidden_size, "hidden_size"),
        (element_size, "element_size"),
    ):
        require_positive_int(value, name)
    if element_size not in _DTYPE_OF_SIZE:
        raise ValueError(
            f"element_size must be one of {sorted(_DTYPE_OF_SIZE)}; "
            f"got {element_size}"
        )
    dtype = _DTYPE_OF_SIZE[element_size]
    if chunk_size is None:
        chunk_size = chunk_rows(vocab, hidden_size, dtype)
    require_positive_int(chunk_size, "chunk_size")
    positions = batch * time
    chunk = min(chunk_size, positions)
    weight_grad = vocab * hidden_size
    hidden_grad = positions * hidden_size
    if variant in ("shift_and_slice", "label_padding"):
        return 3 * positions * vocab * element_size
    if variant == "checkpointed_chunks":
        first = 3 * chunk * vocab + weight_grad
        return (max(first, 3 * weight_grad) + hidden_grad) * element_size
    grads = (weight_grad + hidden_grad) * element_size
    # The block, and the chunk's (C, d) rows: gathered hidden rows, their
    # gradient rows and (float32, float64) the rows scaled by 1 / D.
    block = chunk * logits_row_bytes(vocab, dtype)
    block += (3 if element_size >= 4 else 2) * chunk * hidden_size * element_size
    if element_size >= 4:
        return block + grads
    weight_sum = 4 * weight_grad
    return max(block + weight_sum + hidden_grad * element_size, weight_sum + grads)


class TensorMemoryTracker(TorchDispatchMode):
    """Exact bytes of tensor storage allocated inside a ``with`` block.

    Every operator call PyTorch dispatches (forward and backward alike) is
    seen; each new storage is counted from its creation until it is freed.
    Storages that existed before the block (the inputs) are not counted,
    and neither are a kernel's private scratch buffers, which are not
    tensors.  The counts are exact and deterministic, unlike a process's
    resident set.

    Attributes:
        live_bytes: bytes of counted storage alive now.
        peak_bytes: the most ``live_bytes`` has been.
        timeline: ``live_bytes`` right after each operator call, in order.
        times: seconds from entering the block to the end of each operator
            call, one per ``timeline`` entry (wall time, so it includes the
            tracker's own small cost per call).

    Example::

        with TensorMemoryTracker() as tracker:
            loss_fn(hidden, weight, labels).backward()
        tracker.peak_bytes
    """

    def __init__(self) -> None:
        super().__init__()
        self.live_bytes = 0
        self.peak_bytes = 0
        self.timeline: list[int] = []
        self.times: list[float] = []
        self._start = time.perf_counter()
        self._counted: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._release_hooks: set[weakref.ref] = set()

    def __enter__(self) -> TensorMemoryTracker:
        self._start = time.perf_counter()
        return super().__enter__()

    def elapsed(self) -> float:
        """Seconds since the block was entered (the clock of ``times``)."""
        return time.perf_counter() - self._start

    def _count(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        if storage in self._counted:
            return  # a view, or the result of an in-place operator
        nbytes = storage.nbytes()
        self._counted[storage] = nbytes

        def release(hook: weakref.ref) -> None:
            self.live_bytes -= nbytes
            self._release_hooks.discard(hook)

        # The callback runs when the storage is freed; the set keeps the
        # weak reference itself alive until then.
        self._release_hooks.add(weakref.ref(storage, release))
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def __torch_dispatch__(
        self, func: Any, types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        # Storages an operator receives but that this tracker has not seen
        # were created before the block (the inputs): remember them
        # uncounted, so that a view of them or an in-place result is not
        # taken for new memory.
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._counted.setdefault(leaf.untyped_storage(), 0)
        result = func(*args, **kwargs)
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
                self._count(leaf)
        self.timeline.append(self.live_bytes)
        self.times.append(time.perf_counter() - self._start)
        return result


def measure_peak_tensor_bytes(
    loss_fn: LossFunction, *args: Any, **kwargs: Any
) -> int:
    """Peak bytes alive at once in ``loss_fn(*args, **kwargs).backward()``.

    Gradients of the inputs are reset to ``None`` first, so every call
    measures the same thing.  Returns the :class:`TensorMemoryTracker`
    peak.
    """
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.requires_grad:
            value.grad = None
    with TensorMemoryTracker() as tracker:
        loss_fn(*args, **kwargs).backward()
    return tracker.peak_bytes
