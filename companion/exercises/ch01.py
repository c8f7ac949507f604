"""Checkers for chapter 1's exercises (tensor shapes, see book/01_tensor_shapes.ipynb).

Expected values come from the library (``count_scored_targets``), from
PyTorch itself (``Tensor.is_contiguous`` on the ``meta`` device) or from
the float64 reference ``companion.reference.causal_lm_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from companion import IGNORE_INDEX, reference
from companion.causal_lm_loss import count_scored_targets
from companion.exercises import call, checker, expect, expect_close

__all__: list[str] = []


def _random_batch(batch: int, time: int, vocab: int, seed: int, drop: float = 0.3):
    """float64 logits (B, T, V) and labels (B, T) with about ``drop`` ignored."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(batch, time, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    ignored = torch.rand(batch, time, generator=generator) < drop
    labels = labels.masked_fill(ignored, IGNORE_INDEX)
    labels[0, -1] = 0  # at least one scored target
    return logits, labels


def _padded_labels(lengths: list[int], time: int, side: str) -> torch.Tensor:
    """Every real token labelled with its id (1, 2, ...), padding -100."""
    labels = torch.full((len(lengths), time), IGNORE_INDEX, dtype=torch.long)
    for row, length in enumerate(lengths):
        tokens = torch.arange(1, length + 1)
        if side == "right":
            labels[row, :length] = tokens
        else:
            labels[row, time - length :] = tokens
    return labels


@checker("shapes-ex1")
def _scored_targets(answer: Callable[..., Any]) -> int:
    cases = [
        ([3, 5, 2], 5, "left"),
        ([3, 5, 2], 5, "right"),
        ([5, 5], 5, "left"),
        ([1, 4], 4, "left"),
        ([1, 4], 4, "right"),
        ([2], 6, "left"),
        ([0, 3], 4, "left"),
        ([0, 3], 4, "right"),
        ([7, 1, 7, 3], 7, "left"),
    ]
    for lengths, time, side in cases:
        case = f"lengths={lengths}, T={time}, {side} padding"
        got = call(answer, case, list(lengths), time, side)
        want = count_scored_targets(_padded_labels(lengths, time, side))
        expect(
            isinstance(got, int) and not isinstance(got, bool),
            f"{case}: expected a Python int, computed from the lengths without a tensor; "
            f"got {type(got).__name__}",
        )
        expect(got == want, f"{case}: expected {want} scored targets; got {got!r}")
    return len(cases)


def _strided_cases() -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(shape, stride) pairs, including the ones a near-miss rule gets wrong."""
    return [
        ((2, 6, 10), (60, 10, 1)),  # a fresh (B, T, V) tensor
        ((2, 5, 10), (60, 10, 1)),  # its shifted slice, B = 2
        ((1, 5, 10), (60, 10, 1)),  # the slice for B = 1: size-1 batch axis
        ((2, 1, 10), (60, 10, 1)),  # the slice for T = 2, B = 2
        ((1, 1, 10), (60, 10, 1)),  # T = 2, B = 1
        ((2, 0, 10), (60, 10, 1)),  # the slice for T = 1: no element
        ((0,), (5,)),
        ((4, 3), (1, 4)),  # a transpose
        ((3,), (2,)),  # every other element
        ((3, 1), (1, 7)),
        ((1, 4), (0, 1)),  # expanded along a size-1 axis
        ((3, 4), (0, 1)),  # expanded along a real axis
        ((), ()),  # a scalar
        ((2, 3), (3, 1)),
        ((3, 2, 1), (2, 1, 5)),
        ((2, 3, 4), (12, 1, 3)),
    ]


@checker("shapes-ex2")
def _is_contiguous(answer: Callable[..., Any]) -> int:
    cases = _strided_cases()
    for shape, stride in cases:
        case = f"shape={shape}, stride={stride}"
        want = torch.empty_strided(shape, stride, device="meta").is_contiguous()
        got = call(answer, case, tuple(shape), tuple(stride))
        expect(
            isinstance(got, (bool, np.bool_)) and bool(got) == want,
            f"{case}: expected {want}; got {got!r}",
        )
    return len(cases)


def _expect_loss(got: Any, logits: torch.Tensor, labels: torch.Tensor, case: str) -> None:
    expect(isinstance(got, torch.Tensor), f"{case}: expected a 0-D tensor; got {type(got).__name__}")
    expect(got.dim() == 0, f"{case}: expected a 0-D tensor; got shape {tuple(got.shape)}")
    expect(got.dtype == logits.dtype, f"{case}: expected dtype {logits.dtype}; got {got.dtype}")
    want = reference.causal_lm_loss(logits.numpy(), labels.numpy())
    expect_close(got, want, f"{case}: loss", rtol=1e-9)


@checker("shapes-ex3")
def _next_token_loss(answer: Callable[..., Any]) -> int:
    cases = [(2, 6, 6, 0), (3, 5, 7, 1), (1, 4, 4, 2), (2, 2, 5, 3), (4, 7, 3, 4)]
    for batch, time, vocab, seed in cases:
        logits, labels = _random_batch(batch, time, vocab, seed)
        case = f"B={batch}, T={time}, V={vocab}" if time != vocab else f"B={batch}, T=V={time}"
        got = call(answer, case, logits.clone(), labels.clone())
        _expect_loss(got, logits, labels, case)
    return len(cases)


@checker("shapes-ex4")
def _time_major_flatten(answer: Callable[..., Any]) -> int:
    # (T, B, V): T = V, B = V and B = 1 are the cases a wrong pairing or
    # a wrong class axis gets away with elsewhere.
    cases = [(5, 3, 7, 0), (6, 2, 6, 1), (4, 5, 5, 2), (5, 1, 4, 3), (2, 3, 4, 4), (3, 4, 2, 5)]
    checks = 0
    for time, batch, vocab, seed in cases:
        batch_major, labels = _random_batch(batch, time, vocab, seed)
        logits = batch_major.transpose(0, 1).contiguous()  # (T, B, V)
        case = f"T={time}, B={batch}, V={vocab}"
        result = call(answer, case, logits, labels.clone())
        expect(
            isinstance(result, tuple) and len(result) == 2,
            f"{case}: expected a pair (flat_logits, flat_targets); got {type(result).__name__}",
        )
        flat_logits, flat_targets = result
        expect(
            isinstance(flat_logits, torch.Tensor) and isinstance(flat_targets, torch.Tensor),
            f"{case}: expected two tensors",
        )
        expect(
            flat_logits.dim() == 2 and flat_logits.shape[1] == vocab,
            f"{case}: flat_logits must be (N, V) with V={vocab}; got {tuple(flat_logits.shape)}",
        )
        expect(
            flat_targets.shape == flat_logits.shape[:1],
            f"{case}: flat_targets must be ({flat_logits.shape[0]},); got {tuple(flat_targets.shape)}",
        )
        expect(
            flat_logits.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr(),
            f"{case}: flat_logits does not share the storage of logits (a copy was made)",
        )
        expect(
            flat_targets.dtype == torch.int64,
            f"{case}: flat_targets must hold class indices as int64, the dtype F.cross_entropy "
            f"expects; got {flat_targets.dtype}",
        )
        targets = flat_targets
        for reduction in ("sum", "mean"):
            got = torch.nn.functional.cross_entropy(flat_logits, targets, reduction=reduction)
            want = reference.causal_lm_loss(
                batch_major.numpy(), labels.numpy(), num_items_in_batch=1 if reduction == "sum" else None
            )
            expect_close(got, want, f"{case}: cross_entropy(..., reduction={reduction!r})", rtol=1e-9)
            checks += 1
    return checks
