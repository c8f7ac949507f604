"""Checkers for chapter 6's exercises (the loss's memory, see book/06_loss_memory.ipynb).

Memory is measured with :class:`~companion.memory.TensorMemoryTracker`
or counted with the library's first-principles
:func:`~companion.memory.estimate_peak_bytes`; losses and gradients are
compared with PyTorch's own ``F.cross_entropy`` (``label_smoothing`` too)
run by autograd in float64 on the full logits, and with the float64 NumPy
reference :func:`companion.reference.label_smoothed_cross_entropy`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from companion import reference
from companion.exercises import checker, expect, expect_close
from companion.memory import TensorMemoryTracker, estimate_peak_bytes, measure_peak_tensor_bytes

__all__: list[str] = []


# ---------------------------------------------------------------------------
# loss-memory-ex1: the shift-and-slice loss's peak at B = 1 and B > 1
# ---------------------------------------------------------------------------


@checker("loss-memory-ex1")
def _shift_and_slice_peak(answer: Callable[..., Any]) -> int:
    from companion.experiments.loss_memory import eager_shift_and_slice_loss

    checks = 0
    # d = 4 and T >= 6: the (V, d) weight gradient never sets the peak.
    for batch, time, vocab in ((1, 16, 1000), (2, 16, 1000), (3, 8, 2000), (1, 6, 1500), (4, 12, 700), (2, 40, 300)):
        generator = torch.Generator().manual_seed(batch * time)
        hidden = torch.randn(batch, time, 4, generator=generator).requires_grad_()
        weight = torch.randn(vocab, 4, generator=generator).requires_grad_()
        labels = torch.randint(0, vocab, (batch, time), generator=generator)
        measured = measure_peak_tensor_bytes(eager_shift_and_slice_loss, hidden, weight, labels)
        got = answer(batch, time, vocab)
        where = f"B={batch}, T={time}, V={vocab}"
        expect(isinstance(got, int), f"{where}: expected an int number of bytes; got {type(got).__name__}")
        # What the tracker sees beyond the logits-sized tensors: targets and
        # scalars, a few bytes per position.
        slack = 64 * batch * time + 512
        expect(
            0 <= measured - got <= slack,
            f"{where}: predicted {got} bytes; TensorMemoryTracker measured {measured} "
            f"(of which at most {slack} are small tensors)",
        )
        checks += 1
    return checks


# ---------------------------------------------------------------------------
# loss-memory-ex2: the largest chunk that fits a memory budget
# ---------------------------------------------------------------------------


def _fits(batch: int, time: int, hidden: int, vocab: int, chunk: int, fraction: float) -> bool:
    eager = estimate_peak_bytes("label_padding", batch, time, vocab, hidden)
    return estimate_peak_bytes("chunked_function", batch, time, vocab, hidden, chunk_size=chunk) <= fraction * eager


@checker("loss-memory-ex2")
def _largest_chunk(answer: Callable[..., Any]) -> int:
    cases = [
        (1, 1024, 128, 8000, 0.25, 64),
        (1, 512, 32, 4000, 0.25, 32),
        (2, 256, 128, 1000, 0.25, 16),
        (4, 64, 64, 3000, 0.2, 8),
        (1, 300, 16, 2000, 0.1, 10),
        (1, 64, 512, 1000, 0.25, 8),
        (1, 100, 256, 500, 0.05, 4),
        (1, 64, 8, 1000, 0.5, 8),  # the budget allows more rows than N = 64
        (1, 60, 8, 1000, 0.5, 8),  # ... and N is no multiple of 8
    ]
    checks = 0
    for batch, time, hidden, vocab, fraction, multiple in cases:
        where = f"B={batch}, T={time}, d={hidden}, V={vocab}, fraction {fraction}, multiple {multiple}"
        got = answer(batch, time, hidden, vocab, fraction, multiple)
        expect(isinstance(got, int), f"{where}: expected an int; got {type(got).__name__}")
        expect(got >= 0 and got % multiple == 0, f"{where}: {got} is not a multiple of {multiple}")
        positions = batch * time
        expect(got <= positions, f"{where}: C = {got} is more than the N = {positions} rows there are")
        if got > 0:
            expect(_fits(batch, time, hidden, vocab, got, fraction), f"{where}: C = {got} does not fit the budget")
        if got + multiple <= positions:
            expect(
                not _fits(batch, time, hidden, vocab, got + multiple, fraction),
                f"{where}: C = {got + multiple} fits too; {got} is not the largest",
            )
        checks += 1
    return checks


# ---------------------------------------------------------------------------
# loss-memory-ex3: label smoothing in a chunked autograd Function
# ---------------------------------------------------------------------------


def _problem(batch: int, time: int, hidden: int, vocab: int, seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, time, hidden, generator=generator, dtype=torch.float64)
    w = 0.5 * torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    labels[0, time // 2:] = -100  # right padding
    if batch > 2:
        labels[2] = -100  # a row with nothing to score
    return h.to(dtype), w.to(dtype), labels


def _smoothed_reference(h, w, labels, eps):
    """Loss and gradients of F.cross_entropy(label_smoothing=eps) in float64."""
    h = h.detach().double().requires_grad_()
    w = w.detach().double().requires_grad_()
    logits = h @ w.T
    vocab = w.shape[0]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=-100, label_smoothing=eps
    )
    loss.backward()
    numpy_loss = reference.label_smoothed_cross_entropy(
        logits[:, :-1].reshape(-1, vocab).detach().numpy(),
        labels[:, 1:].reshape(-1).numpy(),
        label_smoothing=eps,
    )
    return loss.item(), numpy_loss, h.grad, w.grad


@checker("loss-memory-ex3")
def _chunked_smoothed(answer: Callable[..., Any]) -> int:
    cases = [
        ("B=2, T=9, V=13, chunk 4, eps 0.1", (2, 9, 5, 13), 4, 0.1, torch.float64),
        ("eps 0 (no smoothing)", (2, 9, 5, 13), 4, 0.0, torch.float64),
        ("B=1, a chunk larger than N", (1, 6, 3, 10), 64, 0.2, torch.float64),
        ("B=3 with an empty row, chunk 1", (3, 7, 4, 7), 1, 0.3, torch.float64),
        ("eps 1 (uniform target)", (2, 8, 4, 11), 3, 1.0, torch.float64),
        ("float32", (2, 10, 6, 17), 5, 0.1, torch.float32),
    ]
    checks = 0
    for index, (name, sizes, chunk, eps, dtype) in enumerate(cases):
        h, w, labels = _problem(*sizes, seed=index, dtype=dtype)
        want, numpy_want, want_h, want_w = _smoothed_reference(h, w, labels, eps)
        h.requires_grad_()
        w.requires_grad_()
        loss = answer(h, w, labels, chunk_size=chunk, label_smoothing=eps)
        expect(isinstance(loss, torch.Tensor) and loss.dim() == 0, f"{name}: expected a 0-D tensor")
        tolerance = 1e-10 if dtype == torch.float64 else 1e-5
        expect_close(float(loss.detach()), numpy_want, f"{name}: the loss", rtol=tolerance)
        expect_close(float(loss.detach()), want, f"{name}: the loss", rtol=tolerance)
        loss.backward()
        expect(h.grad is not None and w.grad is not None, f"{name}: hidden.grad or weight.grad is None")
        expect_close(h.grad, want_h, f"{name}: d loss / d hidden", rtol=tolerance, atol=tolerance * float(want_h.abs().max()))
        expect_close(w.grad, want_w, f"{name}: d loss / d weight", rtol=tolerance, atol=tolerance * float(want_w.abs().max()))
        checks += 3
    # Memory: never a (N, V) tensor, forward or backward.
    h, w, labels = _problem(1, 257, 8, 1000, seed=99)
    h.requires_grad_()
    w.requires_grad_()
    with TensorMemoryTracker() as tracker:
        answer(h, w, labels, chunk_size=8, label_smoothing=0.1).backward()
    logits_bytes = 257 * 1000 * 8
    expect(
        tracker.peak_bytes < logits_bytes / 4,
        f"B=1, T=257, V=1000, chunk 8: the peak is {tracker.peak_bytes / logits_bytes:.3g} logits tensors "
        "(expected under 0.25: nothing of size (N, V) may exist)",
    )
    return checks + 1
