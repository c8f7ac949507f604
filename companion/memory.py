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

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from companion._checks import require_positive_int
from companion.chunked_loss import DEFAULT_CHUNK_SIZE

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


def estimate_peak_bytes(
    variant: str,
    batch: int,
    time: int,
    vocab: int,
    hidden_size: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    element_size: int = 4,
) -> int:
    """Bytes a formulation's forward + backward holds at its peak.

    The inputs are not counted.  With ``L = B*T*V`` logits elements,
    ``C = min(chunk_size, B*T)`` and ``N = B*T``:

    * eager (``shift_and_slice``, ``label_padding``): ``3 L``.  During
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
    * ``chunked_function``: one ``(C, V)`` block, plus the two gradients
      it fills, ``(V, d)`` and ``(N, d)``.

    Args:
        variant: one of :data:`ESTIMATED_VARIANTS`.
        batch, time, vocab, hidden_size: ``B``, ``T``, ``V``, ``d``, >= 1.
        chunk_size: positions per chunk (chunked variants).
        element_size: bytes per element (4 for float32).

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
        (chunk_size, "chunk_size"),
        (element_size, "element_size"),
    ):
        require_positive_int(value, name)
    positions = batch * time
    chunk = min(chunk_size, positions)
    weight_grad = vocab * hidden_size
    hidden_grad = positions * hidden_size
    if variant in ("shift_and_slice", "label_padding"):
        elements = 3 * positions * vocab
    elif variant == "checkpointed_chunks":
        first = 3 * chunk * vocab + weight_grad
        elements = max(first, 3 * weight_grad) + hidden_grad
    else:
        elements = chunk * vocab + weight_grad + hidden_grad
    return elements * element_size


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
        self._counted: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._release_hooks: set[weakref.ref] = set()

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
