"""Checkers for chapter 3's exercises (cross-entropy, see book/03_cross_entropy.ipynb).

Each checker calls the reader's function on small fixed cases and compares
with PyTorch's ``F.cross_entropy`` in float64, its autograd, or Keras's own
loss object; none of them holds a solution.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from companion import IGNORE_INDEX
from companion.cross_entropy import perplexity
from companion.exercises import ExerciseFailed, as_float, checker, expect, expect_close

__all__: list[str] = []


@checker("cross-entropy-ex1")
def _smoothed_optimum(answer: Callable[..., Any]) -> int:
    """``answer(target, num_classes, epsilon) -> (logits (C,), floor)``."""
    checks = 0
    generator = torch.Generator().manual_seed(0)
    for target, num_classes, epsilon in ((0, 2, 0.5), (3, 10, 0.1), (9, 10, 0.1), (0, 1000, 0.2), (4, 5, 1.0)):
        case = f"target = {target}, C = {num_classes}, epsilon = {epsilon}"
        result = answer(target, num_classes, epsilon)
        expect(
            isinstance(result, tuple) and len(result) == 2,
            f"{case}: expected a tuple (logits, floor); got {type(result).__name__}",
        )
        logits, floor = result
        logits = torch.as_tensor(logits, dtype=torch.float64).detach().clone()
        expect(
            tuple(logits.shape) == (num_classes,),
            f"{case}: expected logits of shape ({num_classes},); got {tuple(logits.shape)}",
        )
        expect(bool(torch.isfinite(logits).all()), f"{case}: the logits must be finite")
        logits.requires_grad_(True)
        loss = F.cross_entropy(logits[None], torch.tensor([target]), label_smoothing=epsilon)
        (gradient,) = torch.autograd.grad(loss, logits)
        zero = torch.zeros(num_classes, dtype=torch.float64)
        expect_close(gradient, zero, f"{case}: gradient of the loss at your logits", atol=1e-9)
        got_floor = as_float(floor, f"{case}: floor")
        expect_close(got_floor, loss.item(), f"{case}: floor (the loss at your logits)", rtol=1e-9)
        others = 3.0 * torch.randn(200, num_classes, dtype=torch.float64, generator=generator)
        random_losses = F.cross_entropy(
            others, torch.full((200,), target), label_smoothing=epsilon, reduction="none"
        )
        expect(
            bool((random_losses >= loss.item() - 1e-12).all()),
            f"{case}: a random row has a lower loss than your floor",
        )
        checks += 3
    return checks


def _keras_case(logits: np.ndarray, answer_result: Any, case: str) -> float:
    expect(
        isinstance(answer_result, tuple) and len(answer_result) == 3,
        f"{case}: expected a tuple (loss, y_true, sample_weight); got {type(answer_result).__name__}",
    )
    loss, y_true, sample_weight = answer_result
    expect(callable(loss), f"{case}: the first item must be a Keras loss object")
    try:
        value = loss(y_true, logits, sample_weight=sample_weight)
    except Exception as error:  # Keras refuses the labels or the weights
        raise ExerciseFailed(f"{case}: calling your loss raised {type(error).__name__}") from error
    return as_float(value, case)


@checker("cross-entropy-ex2")
def _keras_class_weights(answer: Callable[..., Any]) -> int:
    """``answer(targets, weight) -> (loss, y_true, sample_weight)`` for Keras."""
    rng = np.random.default_rng(3)
    checks = 0
    cases = []
    targets = rng.integers(0, 10, 12)
    targets[[0, 1, 6]] = IGNORE_INDEX
    cases.append(("N = 12, C = 10, 3 rows ignored", targets, np.linspace(0.2, 2.0, 10)))
    cases.append(("N = 12, C = 10, 3 rows ignored, every weight 1", targets, np.ones(10)))
    cases.append(("N = 6, C = 4, no row ignored", rng.integers(0, 4, 6), np.array([0.5, 3.0, 1.0, 2.0])))
    cases.append(("N = 12, C = 10, 3 rows ignored, weights times 10", targets, 10 * np.linspace(0.2, 2.0, 10)))
    for case, case_targets, weight in cases:
        logits = rng.normal(scale=2.0, size=(len(case_targets), len(weight)))
        want = F.cross_entropy(
            torch.from_numpy(logits), torch.from_numpy(case_targets), weight=torch.from_numpy(weight)
        ).item()
        got = _keras_case(logits, answer(case_targets.copy(), weight.copy()), case)
        expect_close(got, want, case, rtol=1e-5)
        checks += 1
    return checks


@checker("cross-entropy-ex3")
def _per_row_shift(answer: Callable[..., Any]) -> int:
    """``answer(logits, targets)``: the mean cross-entropy of float32 rows,
    finite and right whatever the scale of each row."""
    rng = np.random.default_rng(5)
    ordinary = rng.normal(scale=2.0, size=(6, 5))
    far_apart = ordinary + np.array([[0.0], [150.0], [-150.0], [0.0], [30.0], [-30.0]])
    wide = ordinary.copy()
    wide[1] = [0.0, 200.0, 5.0, 1.0, 2.0]  # one row whose own logits span 200
    large = ordinary + 1000.0
    targets = np.array([3, 0, 4, 1, 2, IGNORE_INDEX])
    cases = [
        ("6 rows of logits of a few units", ordinary),
        ("rows offset by -150 to +150", far_apart),
        ("a row with logits 0 and 200", wide),
        ("every logit near 1000", large),
    ]
    checks = 0
    for case, logits in cases:
        x = torch.from_numpy(logits.astype(np.float32))
        y = torch.from_numpy(targets)
        leaf64 = x.double().requires_grad_(True)
        want = F.cross_entropy(leaf64, y)
        (want_gradient,) = torch.autograd.grad(want, leaf64)
        leaf = x.clone().requires_grad_(True)
        got = answer(leaf, y.clone())
        expect(isinstance(got, torch.Tensor) and got.dim() == 0, f"{case}: expected a 0-d tensor")
        expect_close(got, want, f"{case}: loss", rtol=1e-5, atol=1e-5)
        expect(got.requires_grad, f"{case}: the loss is not differentiable (no grad_fn)")
        (gradient,) = torch.autograd.grad(got, leaf)
        expect_close(gradient, want_gradient, f"{case}: gradient", rtol=1e-4, atol=1e-6)
        checks += 2
    return checks


@checker("cross-entropy-ex4")
def _mixture_perplexity(answer: Callable[..., Any]) -> int:
    """``answer(k, fraction)``: the perplexity of a model that is uniform over
    ``k`` tokens at a fraction of the targets and certain at the others."""
    checks = 0
    num_targets = 8
    for k in (2, 10, 1000):
        for uncertain in (0, 2, 5, 8):
            fraction = uncertain / num_targets
            # uncertain rows: k equal logits; certain rows: the target's
            # logit 0, every other -1e4, so that p(target) is 1 in float64
            logits = torch.full((num_targets, k), -1e4, dtype=torch.float64)
            logits[:uncertain] = 0.0
            logits[uncertain:, 0] = 0.0
            targets = torch.zeros(num_targets, dtype=torch.long)
            total = F.cross_entropy(logits, targets, reduction="sum").item()
            got = as_float(answer(k, fraction), f"k = {k}, fraction = {fraction}")
            expect_close(got, perplexity(total, num_targets), f"k = {k}, fraction = {fraction}", rtol=1e-9)
            checks += 1
    return checks


def _shifted_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of the causal-LM loss: logits at t score the label at t + 1."""
    return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


def _micro_batches(rng: np.random.Generator, sizes, num_classes: int, empty: int | None = None):
    batches = []
    for k, (rows, length) in enumerate(sizes):
        logits = torch.from_numpy(rng.normal(scale=2.0, size=(rows, length, num_classes)))
        labels = torch.from_numpy(rng.integers(0, num_classes, size=(rows, length)))
        # right padding of random length, and the first position (a prompt)
        for b in range(rows):
            real = int(rng.integers(2, length + 1))
            labels[b, real:] = IGNORE_INDEX
        labels[:, 0] = IGNORE_INDEX
        # row 0 labels its first token (no prompt): that label is no target
        labels[0, 0] = (k + 1) % num_classes
        if k == empty:
            labels[:] = IGNORE_INDEX
        batches.append((logits, labels))
    return batches


@checker("cross-entropy-ex5")
def _weighted_accumulation(answer: Callable[..., Any]) -> int:
    """``answer(micro_batches, weight)`` -> one loss per micro-batch whose sum,
    and whose gradients, are those of the full batch's weighted mean."""
    rng = np.random.default_rng(4)
    cases = [
        ("K = 2 micro-batches of B = 2 and 1, T = 6, V = 7", _micro_batches(rng, [(2, 6), (1, 6)], 7), 7, 1.0),
        (
            "K = 3, T = 4, 6, 3, the second with no scored target",
            _micro_batches(rng, [(2, 4), (1, 6), (2, 3)], 5, empty=1),
            5,
            1.0,
        ),
        ("K = 2, T - 1 = V = 4", _micro_batches(rng, [(1, 5), (3, 5)], 4), 4, 1.0),
        ("K = 1, B = 1, T = 9, V = 6", _micro_batches(rng, [(1, 9)], 6), 6, 1.0),
        ("K = 2 of B = 2 and 1, weights times 10", _micro_batches(rng, [(2, 6), (1, 6)], 7), 7, 10.0),
    ]
    checks = 0
    for case, batches, num_classes, scale in cases:
        weight = torch.from_numpy(scale * rng.uniform(0.2, 2.0, size=num_classes))
        leaves = [logits.clone().requires_grad_(True) for logits, _ in batches]
        rows = [_shifted_rows(leaf, labels) for leaf, (_, labels) in zip(leaves, batches)]
        full = F.cross_entropy(torch.cat([r for r, _ in rows]), torch.cat([t for _, t in rows]), weight=weight)
        full_gradients = torch.autograd.grad(full, leaves)

        inputs = [(logits.clone().requires_grad_(True), labels.clone()) for logits, labels in batches]
        losses = answer(inputs, weight.clone())
        try:
            losses = list(losses)
        except TypeError as error:
            raise ExerciseFailed(f"{case}: expected a list of losses; got {type(losses).__name__}") from error
        expect(len(losses) == len(batches), f"{case}: expected {len(batches)} losses; got {len(losses)}")
        total = 0.0
        for k, (loss, (logits, _)) in enumerate(zip(losses, inputs)):
            expect(
                isinstance(loss, torch.Tensor) and loss.dim() == 0,
                f"{case}: micro-batch {k}: expected a 0-d tensor",
            )
            value = loss.item()
            expect(math.isfinite(value), f"{case}: micro-batch {k}: the loss is {value}")
            total += value
            if loss.requires_grad:
                (gradient,) = torch.autograd.grad(loss, logits, allow_unused=True)
            else:
                gradient = None
            if gradient is None:
                gradient = torch.zeros_like(logits)
            expect_close(gradient, full_gradients[k], f"{case}: micro-batch {k}: gradient", atol=1e-12, rtol=1e-9)
            checks += 1
        expect_close(total, full.item(), f"{case}: sum of the micro-batch losses", rtol=1e-9)
        checks += 1
    return checks
