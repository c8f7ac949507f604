"""Checkers for chapter 4's exercises (Keras masking, see book/04_keras_masking.ipynb).

The references are float64 NumPy means over the real tokens, or Keras 3's
own loss object called on a prediction that carries a Keras mask; none of
them holds a solution.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from companion import reference
from companion.exercises import ExerciseFailed, as_float, checker, expect, expect_close

__all__: list[str] = []


def _padded(lengths: list[int], width: int, rng: np.random.Generator, num_classes: int) -> np.ndarray:
    """``(B, T)`` labels in ``1 .. C-1``, right-padded with 0 after ``lengths``."""
    labels = rng.integers(1, num_classes, size=(len(lengths), width))
    for b, length in enumerate(lengths):
        labels[b, length:] = 0
    return labels


def _mean_over_real(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Float64 mean of ``-log p(label)`` over the positions whose label is not 0."""
    p = np.asarray(probabilities, dtype=np.float64)
    picked = np.take_along_axis(p, labels[..., None], axis=-1)[..., 0]
    real = labels != 0
    return float(-np.log(picked[real]).mean())


@checker("keras-masking-ex1")
def _real_token_loss(answer: Callable[..., Any]) -> int:
    """``answer(labels, probabilities)``: the mean over the real tokens."""
    rng = np.random.default_rng(1)
    cases = [
        ("B = 1, T = 5, no padding", [5], 5),
        ("B = 1, T = 5, 2 padding positions", [3], 5),
        ("B = 3, T = 6, lengths 6, 2, 4", [6, 2, 4], 6),
        ("B = 2, T = 4, the second row all padding", [3, 0], 4),
    ]
    checks = 0
    for case, lengths, width in cases:
        labels = _padded(lengths, width, rng, 5)
        logits = rng.normal(scale=1.5, size=(len(lengths), width, 5))
        probabilities = reference.softmax(logits).astype(np.float32)
        got = as_float(answer(labels.copy(), probabilities.copy()), case)
        expect_close(got, _mean_over_real(probabilities, labels), case, rtol=1e-5)
        checks += 1
    return checks


@checker("keras-masking-ex2")
def _mask_kept_through_the_middle(answer: Callable[..., Any]) -> int:
    """``answer(token_logits)``: a compiled Keras 3 model whose loss is the
    mean over the real tokens, and whose output is softmax(E[x])."""
    rng = np.random.default_rng(2)
    confident = np.zeros((5, 5))
    confident[0, 0] = 8.0  # after padding, the model predicts padding
    tables = [
        ("padding-confident table, V = C = 5", confident),
        ("random table, V = C = 6", rng.normal(scale=2.0, size=(6, 6))),
    ]
    batches = [np.array([[1, 1, 2, 0, 0]]), np.array([[1, 3, 2, 4, 0, 0], [2, 1, 0, 0, 0, 0]])]
    checks = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras 3 warns when a layer drops the mask
        for name, table in tables:
            model = answer(table.copy())
            expect(
                hasattr(model, "evaluate"),
                f"{name}: expected a compiled Keras model; got {type(model).__name__}",
            )
            for ids in batches:
                case = f"{name}, inputs = labels = {ids.tolist()}"
                probabilities = reference.softmax(table[ids])
                try:
                    outputs = model(ids)
                    output = np.asarray(outputs)
                    loss = model.evaluate(ids, ids, verbose=0)
                except Exception as error:  # a model that cannot run this batch
                    raise ExerciseFailed(f"{case}: the model raised {type(error).__name__}") from error
                expect_close(output, probabilities, f"{case}: model output", rtol=1e-5, atol=1e-6)
                want = _mean_over_real(probabilities, ids)
                expect_close(as_float(loss, case), want, f"{case}: loss", rtol=1e-5)
                # the lesson: the padding mask reaches the output, where any
                # loss (not only one told which class is padding) uses it
                mask = getattr(outputs, "_keras_mask", None)
                expect(
                    mask is not None and np.array_equal(np.asarray(mask), ids != 0),
                    f"{case}: the model's output carries no padding mask (its _keras_mask is "
                    f"{'None' if mask is None else np.asarray(mask).astype(int).tolist()}): the mask "
                    "must reach the output",
                )
                checks += 3
    return checks


_REDUCTIONS = ("sum_over_batch_size", "sum", "mean_with_sample_weight")


def _masked_prediction(mask: np.ndarray | None, num_classes: int, rng: np.random.Generator):
    """Random logits ``(B, T, C)`` that carry ``mask`` as their Keras mask.

    Each unmasked position gets an id of its own in an
    ``Embedding(mask_zero=True)``, masked positions id 0, so the embedding's
    output is the logits with exactly that mask (or no mask when ``mask`` is
    None).
    """
    import keras

    shape = mask.shape if mask is not None else (2, 5)
    count = int(np.prod(shape))
    table = rng.normal(scale=2.0, size=(count + 1, num_classes)).astype(np.float32)
    ids = np.arange(1, count + 1).reshape(shape)
    if mask is not None:
        ids = np.where(mask, ids, 0)
    embedding = keras.layers.Embedding(count + 1, num_classes, mask_zero=mask is not None)
    embedding.build(shape)
    embedding.set_weights([table])
    return embedding(ids), table[ids]


@checker("keras-masking-ex3")
def _keras3_reduction(answer: Callable[..., Any]) -> int:
    """``answer(nll, sample_weight, mask, reduction)``: what Keras 3's loss
    object reports for per-token losses ``nll``."""
    import keras

    rng = np.random.default_rng(3)
    right = np.array([[True, True, True, False, False], [True, True, False, False, False]])
    left = right[:, ::-1].copy()
    binary = right.astype(np.float64)
    weights = rng.uniform(0.5, 2.0, size=(2, 5)).round(2)
    weights_with_zeros = weights.copy()
    weights_with_zeros[0, 4] = 0.0  # a real token weighted 0
    configurations = [
        ("no mask, no weights", None, None),
        ("no mask, 0/1 weights", None, binary),
        ("right-padding mask, no weights", right, None),
        ("right-padding mask, weights", right, weights),
        ("left-padding mask, weights with a zero on a real token", left, weights_with_zeros),
        ("every position masked, weights", np.zeros((2, 5), dtype=bool), weights),
    ]
    checks = 0
    for name, mask, sample_weight in configurations:
        y_pred, logits = _masked_prediction(mask, 4, rng)
        labels = rng.integers(0, 4, size=(2, 5))
        nll = reference.cross_entropy(logits.reshape(-1, 4), labels.reshape(-1), reduction="none")
        nll = nll.reshape(2, 5)
        for reduction in _REDUCTIONS:
            case = f"{name}, reduction={reduction!r}"
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=reduction)
            want = float(loss(labels, y_pred, sample_weight=sample_weight))
            got = answer(
                nll.copy(),
                None if sample_weight is None else sample_weight.copy(),
                None if mask is None else mask.copy(),
                reduction,
            )
            expect_close(as_float(got, case), want, case, rtol=1e-5, atol=1e-6)
            checks += 1
    return checks
