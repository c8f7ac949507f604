"""Chapter 4's experiments: padding, masks and the denominator in Keras.

A padded batch of token sequences has ``B * T`` positions, of which only the
real tokens should be scored.  Up to Keras 2.10 the mask that
``Embedding(mask_zero=True)`` attaches to the model's output entered the
loss as a sample weight, but the sum was still divided by ``B * T``: the
historical pitfall.  This module rebuilds the toy that shows it
(:func:`build_toy_model`), measures what the pinned Keras 3 and tf-keras
report in ``fit``, ``evaluate`` and ``compute_loss`` (:func:`report` and the
chapter's tables), reproduces the old reduction
(:class:`HistoricalSparseCategoricalCrossentropy`,
:func:`historical_masked_mean`) and runs the fixed loss of
:mod:`companion.keras_loss` on another Keras backend
(:func:`fixed_loss_on_backend`).

The experiments run on TensorFlow: Keras 3 through its TensorFlow backend
(``import keras``) and legacy Keras 2 (``import tf_keras``).  Arrays follow
one convention throughout:

* ``inputs``: ``(B, T)`` int token ids, ``0`` = padding;
* ``labels``: ``(B, T)`` int class ids, ``0`` (``PADDING_ID``) = padding;
* ``sample_weight``: ``(B, T)`` float, ``>= 0``;
* ``token_logits``: ``(V, C)`` float, the scores the toy model outputs at a
  position whose input token is ``v`` (its row ``v``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

# companion first: its __init__ sets TensorFlow's log level before the
# imports below.
from companion import reference
from companion._checks import require_positive_int
from companion.keras_loss import (
    FRAMEWORKS,
    PADDING_ID,
    MaskedSparseCrossEntropy,
    corpus_metrics,
    fixed_loss,
    keras_api,
)

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from tf_keras.__internal__.losses import (  # noqa: E402
    compute_weighted_loss as _tf_keras_compute_weighted_loss,
)

__all__ = [
    "BACKENDS",
    "BUILT_IN_FIXES",
    "HEADS",
    "LOSS_KINDS",
    "MIDDLE_LAYERS",
    "SOURCE_LABELS",
    "Batch",
    "HistoricalSparseCategoricalCrossentropy",
    "LegacySubclassedSparseCrossEntropy",
    "MaskingCase",
    "Reported",
    "SubclassedSparseCrossEntropy",
    "build_toy_model",
    "built_in_fix_table",
    "case_token_mean",
    "epoch_aggregation_batches",
    "epoch_aggregation_table",
    "fixed_loss_cases",
    "fixed_loss_cases_on_backend",
    "fixed_loss_on_backend",
    "historical_masked_mean",
    "installed_source",
    "keras3_samplewise_mean",
    "loss_kind_table",
    "lost_mask_table",
    "make_loss",
    "masking_cases",
    "metrics_argument_table",
    "padded",
    "padding_confident_logits",
    "padding_sweep",
    "quiet_retracing_warnings",
    "reference_nll_sums",
    "reference_token_nll",
    "report",
    "sample_weight_masking_table",
    "sequence_weighted_epoch_mean",
    "softmax_layer_probabilities",
    "token_weighted_mean",
    "uniform_logits",
    "weighted_mask_table",
]

LOSS_KINDS: tuple[str, ...] = (
    "string",
    "built-in Loss",
    "function",
    "custom Loss",
)
"""The ways to hand ``compile`` a sparse cross-entropy."""

MIDDLE_LAYERS: tuple[str, ...] = (
    "none",
    "Lambda",
    "custom layer",
    "custom layer, supports_masking",
    "raw op",
)
"""What :func:`build_toy_model` can put between embedding and output."""

HEADS: tuple[str, ...] = ("Dense(softmax)", "Softmax", "Activation")
"""The toy's output head: ``Dense(C, activation="softmax")``, or
``Dense(C)`` followed by ``layers.Softmax()`` or by
``layers.Activation("softmax")``."""

BACKENDS: tuple[str, ...] = ("tensorflow", "torch", "jax")
"""Keras 3 backends :func:`fixed_loss_on_backend` accepts."""

SOURCE_LABELS: tuple[tuple[int, ...], ...] = ((1, 1, 2, 0, 0),)
"""The source's example: three real labels, then two padding positions."""

_RETRACING_MESSAGE = "triggered tf.function retracing"



# ---------------------------------------------------------------------------
# Argument checks (NumPy side, before any Keras code runs)
# ---------------------------------------------------------------------------


def _int_matrix(value: ArrayLike, name: str) -> np.ndarray:
    """``value`` as a ``(B, T)`` int64 array, else an error naming ``name``."""
    array = np.asarray(value)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"{name} must hold integer ids (B, T); got dtype {array.dtype}"
        )
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (B, T); got shape {array.shape}"
        )
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(
            f"{name} must have B >= 1 and T >= 1; got shape {array.shape}"
        )
    return array.astype(np.int64)


def _float_array(
    value: ArrayLike, name: str, ndim: int, layout: str
) -> np.ndarray:
    """``value`` as a float64 array of rank ``ndim`` with finite entries."""
    array = np.asarray(value)
    is_real = np.issubdtype(array.dtype, np.floating) or np.issubdtype(
        array.dtype, np.integer
    )
    if not is_real or array.dtype == bool:
        raise TypeError(
            f"{name} must hold real numbers {layout}; got dtype {array.dtype}"
        )
    if array.ndim != ndim:
        raise ValueError(
            f"{name} must be a {ndim}-D array {layout}; "
            f"got shape {array.shape}"
        )
    array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be finite")
    return array


def _check_batch(
    inputs: ArrayLike,
    labels: ArrayLike,
    sample_weight: ArrayLike | None,
    num_tokens: int,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check ``(inputs, labels, sample_weight)`` against the model's sizes."""
    token_ids = _int_matrix(inputs, "inputs")
    label_ids = _int_matrix(labels, "labels")
    if label_ids.shape != token_ids.shape:
        raise ValueError(
            f"labels must have the shape of inputs {token_ids.shape} (B, T); "
            f"got {label_ids.shape}"
        )
    if token_ids.min() < 0 or token_ids.max() >= num_tokens:
        raise ValueError(
            f"inputs must lie in [0, {num_tokens}) (rows of token_logits)"
        )
    if label_ids.min() < 0 or label_ids.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (columns of token_logits)"
        )
    weights = _sample_weights(sample_weight, token_ids.shape, "inputs")
    if weights is not None and weights.min() < 0:
        raise ValueError("sample_weight must be >= 0")
    return token_ids, label_ids, weights


def _sample_weights(
    sample_weight: ArrayLike | None, shape: tuple[int, ...], other: str
) -> np.ndarray | None:
    """``sample_weight`` as float64 ``(B, T)`` of the shape of ``other``."""
    if sample_weight is None:
        return None
    weights = _float_array(sample_weight, "sample_weight", 2, "(B, T)")
    if weights.shape != shape:
        raise ValueError(
            f"sample_weight must have the shape of {other} "
            f"{shape} (B, T); got {weights.shape}"
        )
    return weights


def _check_logits_batch(
    logits: ArrayLike, labels: ArrayLike, sample_weight: ArrayLike | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check ``(labels (B, T), logits (B, T, C), sample_weight (B, T))``.

    Returns the logits as float64, the labels as int64 and the weights as
    float64 (or ``None``); errors name the argument.
    """
    label_ids = _int_matrix(labels, "labels")
    scores = _float_array(logits, "logits", 3, "(B, T, C)")
    if scores.shape[:2] != label_ids.shape:
        raise ValueError(
            f"logits must have shape {label_ids.shape} + (C,); "
            f"got {scores.shape}"
        )
    num_classes = scores.shape[2]
    if num_classes < 1:
        raise ValueError(
            f"logits must have C >= 1 classes; got shape {scores.shape}"
        )
    if label_ids.min() < 0 or label_ids.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}) (0 = padding); "
            f"got values in [{label_ids.min()}, {label_ids.max()}]"
        )
    return scores, label_ids, _sample_weights(sample_weight, label_ids.shape, "labels")


def _check_token_logits(token_logits: ArrayLike) -> np.ndarray:
    logits = _float_array(token_logits, "token_logits", 2, "(V, C)")
    if logits.shape[0] < 1 or logits.shape[1] < 2:
        raise ValueError(
            "token_logits must have V >= 1 rows and C >= 2 columns; "
            f"got {logits.shape}"
        )
    return logits


# ---------------------------------------------------------------------------
# NumPy side: the toy's exact values and the historical reduction
# ---------------------------------------------------------------------------


def uniform_logits(num_classes: int = 5) -> np.ndarray:
    """``(C, C)`` zeros: the toy predicts ``1/C`` for every class."""
    require_positive_int(num_classes, "num_classes")
    return np.zeros((num_classes, num_classes))


def padding_confident_logits(
    num_classes: int = 5, padding_logit: float = 8.0
) -> np.ndarray:
    """``(C, C)`` logits: uniform after a real token, sure of padding after it.

    Row 0 (the padding token) scores class 0 with ``padding_logit`` and every
    other class with 0, as a model does once it has learned that padding
    follows padding.  The other rows are zeros (uniform predictions).
    """
    logits = uniform_logits(num_classes)
    logits[PADDING_ID, PADDING_ID] = float(padding_logit)
    return logits


def reference_token_nll(
    token_logits: ArrayLike, inputs: ArrayLike, labels: ArrayLike
) -> np.ndarray:
    """Exact float64 ``-log p(label)`` of the toy at every position.

    Args:
        token_logits: ``(V, C)`` float, the toy's scores per input token.
        inputs: ``(B, T)`` int token ids in ``[0, V)``.
        labels: ``(B, T)`` int class ids in ``[0, C)``.

    Returns:
        ``(B, T)`` float64, padding positions included (masking is the
        caller's choice).
    """
    logits = _check_token_logits(token_logits)
    token_ids, label_ids, _ = _check_batch(
        inputs, labels, None, *logits.shape
    )
    log_probs = reference.log_softmax(logits)[token_ids]
    picked = np.take_along_axis(log_probs, label_ids[..., None], axis=-1)
    return -picked[..., 0]


def token_weighted_mean(per_token: ArrayLike, weights: ArrayLike) -> float:
    """``sum(w * x) / sum(w)`` in float64 (``nan`` if ``sum(w) == 0``).

    Args:
        per_token: ``(B, T)`` float, e.g. per-token negative log-likelihoods.
        weights: ``(B, T)`` float ``>= 0``: the real-token mask times any
            sample weight.
    """
    values = _float_array(per_token, "per_token", 2, "(B, T)")
    w = _float_array(weights, "weights", 2, "(B, T)")
    if w.shape != values.shape:
        raise ValueError(
            f"weights must have the shape of per_token {values.shape}; "
            f"got {w.shape}"
        )
    total = float(w.sum())
    return float((w * values).sum() / total) if total else float("nan")


def reference_nll_sums(
    logits: ArrayLike,
    labels: ArrayLike,
    sample_weight: ArrayLike | None = None,
) -> tuple[float, float]:
    """Float64 sums of one batch's weighted token losses, padding excluded.

    The reference the chapter checks the fixed loss and the corpus metrics
    of :mod:`companion.keras_loss` against.  With
    ``nll[b, t] = -log softmax(logits[b, t])[labels[b, t]]`` and
    ``w = sample_weight * (labels != PADDING_ID)`` (``sample_weight = 1``
    when omitted), it returns ``(sum(w * nll), sum(w))``.  Their ratio is
    the batch's loss; adding both sums over batches and dividing once gives
    the corpus value.

    Args:
        logits: ``(B, T, C)`` float, scores before the softmax.
        labels: ``(B, T)`` int class ids in ``[0, C)``, ``0``
            (:data:`~companion.keras_loss.PADDING_ID`) = padding.
        sample_weight: ``None`` or ``(B, T)`` float ``>= 0``.

    Returns:
        ``(weighted loss sum, weight sum)``, Python floats computed in
        float64.

    Raises:
        TypeError: non-integer labels, non-real logits or weights.
        ValueError: shapes that disagree, labels outside ``[0, C)``,
            non-finite values, negative weights.
    """
    scores, label_ids, weights = _check_logits_batch(
        logits, labels, sample_weight
    )
    if weights is None:
        weights = np.ones(label_ids.shape)
    elif weights.min() < 0:
        raise ValueError("sample_weight must be >= 0")
    log_probs = reference.log_softmax(scores)
    picked = np.take_along_axis(log_probs, label_ids[..., None], axis=-1)
    w = weights * (label_ids != PADDING_ID)
    return float((w * -picked[..., 0]).sum()), float(w.sum())


def historical_masked_mean(
    per_token_loss: ArrayLike, mask: ArrayLike
) -> float:
    """HISTORICAL: tf.keras's reduction of a masked output up to Keras 2.10.

    ``compile`` turned the output's mask into a 0/1 sample weight;
    ``Loss.__call__`` then reduced with ``SUM_OVER_BATCH_SIZE``, which
    divides by the number of elements, padding included::

        loss = sum(m * nll) / (B * T)

    Keras 2.11 rescales the mask by ``total / valid`` first, so the pinned
    versions no longer compute this.  Kept to reproduce old numbers.

    Args:
        per_token_loss: ``(B, T)`` float.
        mask: ``(B, T)``, 1 (or ``True``) on real tokens, 0 on padding.

    Returns:
        The historical loss, a float64.
    """
    values = _float_array(per_token_loss, "per_token_loss", 2, "(B, T)")
    m = _float_array(np.asarray(mask, dtype=np.float64), "mask", 2, "(B, T)")
    if m.shape != values.shape:
        raise ValueError(
            f"mask must have the shape of per_token_loss {values.shape}; "
            f"got {m.shape}"
        )
    if not np.all((m == 0) | (m == 1)):
        raise ValueError("mask must hold only 0 and 1")
    return float((m * values).sum() / values.size)


def sequence_weighted_epoch_mean(
    batch_means: Sequence[float], batch_sizes: Sequence[int]
) -> float:
    """What ``fit``/``evaluate`` report for an epoch: batch means by sequences.

    Both Keras versions feed each batch's loss to a ``Mean`` metric with
    ``sample_weight = B`` (the batch's number of sequences), so the epoch
    value is ``sum_k B_k * loss_k / sum_k B_k`` whatever the number of tokens.
    """
    means = np.asarray(batch_means, dtype=np.float64)
    sizes = np.asarray(batch_sizes, dtype=np.float64)
    if means.ndim != 1 or means.shape != sizes.shape or means.size == 0:
        raise ValueError(
            "batch_means and batch_sizes must be non-empty 1-D sequences "
            "of equal length"
        )
    if np.any(sizes < 1):
        raise ValueError("batch_sizes must be >= 1")
    return float((sizes * means).sum() / sizes.sum())


def padded(
    sequences: Sequence[Sequence[int]], length: int | None = None
) -> np.ndarray:
    """Right-pad int sequences with :data:`PADDING_ID` to ``(B, length)``.

    ``length`` defaults to the longest sequence; the result is int32.
    """
    if not sequences:
        raise ValueError("sequences must contain at least one sequence")
    longest = max(len(s) for s in sequences)
    if length is None:
        width = longest
    else:
        width = require_positive_int(length, "length")
    if width < longest:
        raise ValueError(
            f"length must be >= the longest sequence ({longest}); got {width}"
        )
    out = np.full((len(sequences), width), PADDING_ID, dtype=np.int32)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = np.asarray(sequence, dtype=np.int32)
    return out


# ---------------------------------------------------------------------------
# The historical reduction, and the four kinds of loss the source lists
# ---------------------------------------------------------------------------


class HistoricalSparseCategoricalCrossentropy(
    tf_keras.losses.SparseCategoricalCrossentropy
):
    """HISTORICAL: tf-keras's sparse cross-entropy, old ``Loss.__call__``.

    Up to Keras 2.10, ``Loss.__call__`` ended with
    ``compute_weighted_loss(losses, sample_weight, reduction)``: no
    rescaling of the mask that ``compile`` had already folded into
    ``sample_weight``.  Keras 2.11 inserted ``apply_valid_mask``
    (``total / valid``) before it, for the mask on ``y_pred``.  This class
    removes that step again, so ``fit`` and ``evaluate`` of a tf-keras model
    report what TensorFlow 2.0-2.10 reported.  Do not train with it: it is
    here to reproduce old numbers.
    """

    def __call__(
        self, y_true: Any, y_pred: Any, sample_weight: Any = None
    ) -> tf.Tensor:
        losses = self.call(y_true, y_pred)
        return _tf_keras_compute_weighted_loss(
            losses, sample_weight, reduction=self._get_reduction()
        )


def _keras_sparse_ce(y_true: Any, y_pred: Any) -> Any:
    """A plain function loss for Keras 3: per-token cross-entropy."""
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


def _tf_keras_sparse_ce(y_true: Any, y_pred: Any) -> Any:
    """A plain function loss for tf-keras: per-token cross-entropy."""
    return tf_keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


class SubclassedSparseCrossEntropy(keras.losses.Loss):
    """A user-written Keras 3 ``Loss``: ``call`` gives per-token losses."""

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


class LegacySubclassedSparseCrossEntropy(tf_keras.losses.Loss):
    """A user-written tf-keras ``Loss``: ``call`` gives per-token losses."""

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return tf_keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


def make_loss(framework: str, kind: str) -> Any:
    """A sparse cross-entropy of ``kind`` (see :data:`LOSS_KINDS`)."""
    K = keras_api(framework)
    legacy = K is tf_keras
    if kind == "string":
        return "sparse_categorical_crossentropy"
    if kind == "built-in Loss":
        return K.losses.SparseCategoricalCrossentropy()
    if kind == "function":
        return _tf_keras_sparse_ce if legacy else _keras_sparse_ce
    if kind == "custom Loss":
        if legacy:
            return LegacySubclassedSparseCrossEntropy()
        return SubclassedSparseCrossEntropy()
    raise ValueError(f"kind must be one of {LOSS_KINDS}; got {kind!r}")


# ---------------------------------------------------------------------------
# The toy model
# ---------------------------------------------------------------------------


class _KerasIdentityNoMask(keras.layers.Layer):
    """A Keras 3 layer written without ``supports_masking``: the identity."""

    def call(self, inputs: Any) -> Any:
        return inputs * 1.0


class _KerasIdentityWithMask(keras.layers.Layer):
    """The same layer declaring ``supports_masking = True``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs: Any) -> Any:
        return inputs * 1.0


class _TfKerasIdentityNoMask(tf_keras.layers.Layer):
    """A tf-keras layer written without ``supports_masking``: the identity."""

    def call(self, inputs: Any) -> Any:
        return inputs * 1.0


class _TfKerasIdentityWithMask(tf_keras.layers.Layer):
    """The same tf-keras layer declaring ``supports_masking = True``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs: Any) -> Any:
        return inputs * 1.0


def _middle(framework: str, middle: str) -> Callable[[Any], Any] | None:
    K = keras_api(framework)
    if middle == "none":
        return None
    if middle == "Lambda":
        return K.layers.Lambda(lambda t: t * 1.0)
    if middle == "custom layer":
        if K is keras:
            return _KerasIdentityNoMask()
        return _TfKerasIdentityNoMask()
    if middle == "custom layer, supports_masking":
        if K is keras:
            return _KerasIdentityWithMask()
        return _TfKerasIdentityWithMask()
    if middle == "raw op":
        # An op on a symbolic tensor outside any layer: `h = h * scale`.
        if K is keras:
            return lambda t: keras.ops.multiply(t, 1.0)
        return lambda t: tf.multiply(t, 1.0)
    raise ValueError(
        f"middle must be one of {MIDDLE_LAYERS}; got {middle!r}"
    )


def build_toy_model(
    framework: str,
    token_logits: ArrayLike,
    *,
    mask_zero: bool = True,
    middle: str = "none",
    head: str = "Dense(softmax)",
) -> Any:
    """The source's toy: ``Embedding(mask_zero=True)``, ``Dense(C, softmax)``.

    The embedding holds ``token_logits`` and the dense layer is the
    identity, so the model's output at a position whose input token is ``v``
    is exactly ``softmax(token_logits[v])``.  With :func:`uniform_logits`
    that is ``1/C`` everywhere, the source's "probability 0.2 for every
    class".

    Args:
        framework: ``"keras"`` or ``"tf_keras"``.
        token_logits: ``(V, C)`` float.
        mask_zero: whether the embedding attaches a padding mask (token 0).
        middle: one of :data:`MIDDLE_LAYERS`, put after the embedding.
        head: one of :data:`HEADS`, how the softmax is applied.

    Returns:
        An uncompiled functional model, ``(B, T)`` int32 -> ``(B, T, C)``
        float32.
    """
    K = keras_api(framework)
    logits = _check_token_logits(token_logits)
    if not isinstance(mask_zero, bool):
        raise TypeError(
            f"mask_zero must be a bool; got {type(mask_zero).__name__}"
        )
    if middle not in MIDDLE_LAYERS:
        raise ValueError(
            f"middle must be one of {MIDDLE_LAYERS}; got {middle!r}"
        )
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}; got {head!r}")
    num_tokens, num_classes = logits.shape
    inputs = K.Input(shape=(None,), dtype="int32")
    embedding = K.layers.Embedding(
        num_tokens, num_classes, mask_zero=mask_zero
    )
    hidden = embedding(inputs)
    between = _middle(framework, middle)
    if between is not None:
        hidden = between(hidden)
    activation = "softmax" if head == "Dense(softmax)" else None
    dense = K.layers.Dense(num_classes, activation=activation)
    outputs = dense(hidden)
    if head == "Softmax":
        outputs = K.layers.Softmax()(outputs)
    elif head == "Activation":
        outputs = K.layers.Activation("softmax")(outputs)
    model = K.Model(inputs, outputs)
    embedding.set_weights([logits.astype(np.float32)])
    identity = np.eye(num_classes, dtype=np.float32)
    dense.set_weights([identity, np.zeros(num_classes, np.float32)])
    return model


def softmax_layer_probabilities(
    framework: str, inputs: ArrayLike, token_logits: ArrayLike
) -> np.ndarray:
    """The toy with ``layers.Softmax()`` on ``inputs``, ``(B, T, C)`` float32.

    Raises whatever the Keras version raises when the ``(B, T)`` mask does
    not broadcast against ``(B, T, C)``.
    """
    logits = _check_token_logits(token_logits)
    token_ids, _, _ = _check_batch(
        inputs, np.zeros_like(np.asarray(inputs)), None, *logits.shape
    )
    model = build_toy_model(framework, logits, head="Softmax")
    return np.asarray(model(token_ids.astype(np.int32)))


# ---------------------------------------------------------------------------
# Running a loss through compile / fit / evaluate / compute_loss
# ---------------------------------------------------------------------------


class _DropRetracingWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _RETRACING_MESSAGE not in record.getMessage()


def quiet_retracing_warnings() -> None:
    """Drop TensorFlow's "triggered tf.function retracing" warning only.

    This chapter builds dozens of tiny models on purpose; each traces its own
    train step, which TensorFlow reports as excessive retracing of one
    Python function.  That performance hint does not apply here.
    Idempotent.
    """
    logger = tf.get_logger()
    if not any(isinstance(f, _DropRetracingWarning) for f in logger.filters):
        logger.addFilter(_DropRetracingWarning())


@dataclass(frozen=True)
class Batch:
    """One batch: ``inputs``, ``labels`` ``(B, T)`` int, ``sample_weight``.

    ``sample_weight`` is ``None`` or ``(B, T)`` float.
    """

    inputs: np.ndarray
    labels: np.ndarray
    sample_weight: np.ndarray | None = None


@dataclass(frozen=True)
class Reported:
    """What Keras reported for one model and loss.

    Attributes:
        fit: ``history.history`` after one epoch (learning rate 0),
            name -> value; empty when ``fit`` was not run.
        evaluate: ``evaluate(..., return_dict=True)``, name -> value.
        compute_loss: ``model.compute_loss`` on the single batch (``nan``
            with several batches).
        predictions: the model's ``(B, T, C)`` output on the single batch
            (``None`` with several).
        call: the loss object called directly on the model's output tensor
            (which carries the model's Keras mask), with the batch's sample
            weight (``nan`` with several batches, or a loss given by name).
        mask_warnings: messages of the ``UserWarning``s Keras raised about
            masks.
    """

    fit: dict[str, float]
    evaluate: dict[str, float]
    compute_loss: float
    predictions: np.ndarray | None = None
    mask_warnings: tuple[str, ...] = field(default_factory=tuple)
    call: float = float("nan")


def _as_batches(batches: Batch | Sequence[Batch]) -> list[Batch]:
    items = [batches] if isinstance(batches, Batch) else list(batches)
    if not items or not all(isinstance(b, Batch) for b in items):
        raise TypeError(
            "batches must be a Batch or a non-empty sequence of Batch"
        )
    with_weights = {b.sample_weight is not None for b in items}
    if len(with_weights) != 1:
        raise ValueError("either every batch has a sample_weight or none does")
    return items


def _dataset(batches: list[Batch]) -> tf.data.Dataset:
    """One dataset element per batch, so each keeps its own padded length."""

    def element(b: Batch) -> tuple[Any, ...]:
        x = b.inputs.astype(np.int32)
        y = b.labels.astype(np.int32)
        if b.sample_weight is None:
            return (x, y)
        return (x, y, b.sample_weight.astype(np.float32))

    dataset = tf.data.Dataset.from_tensors(element(batches[0]))
    for b in batches[1:]:
        following = tf.data.Dataset.from_tensors(element(b))
        dataset = dataset.concatenate(following)
    return dataset


def report(
    framework: str,
    loss: Any,
    batches: Batch | Sequence[Batch],
    token_logits: ArrayLike,
    *,
    metrics: Sequence[Any] | None = None,
    mask_zero: bool = True,
    middle: str = "none",
    head: str = "Dense(softmax)",
    fit: bool = True,
    metrics_argument: str = "weighted_metrics",
) -> Reported:
    """Compile the toy with ``loss``, run ``fit`` and ``evaluate``, read them.

    The optimizer has learning rate 0, so ``fit`` sees the same weights as
    ``evaluate``.  Each :class:`Batch` is one step (its own padded length).
    ``metrics`` go to ``weighted_metrics``, so they see the sample weights
    (``metrics_argument="metrics"`` passes them to ``metrics=``, which
    ignores sample weights); the default is Keras's own
    ``SparseCategoricalCrossentropy`` metric, named ``"metric"``.

    Args:
        framework: ``"keras"`` or ``"tf_keras"``.
        loss: anything ``compile(loss=...)`` takes (see :func:`make_loss`).
        batches: one :class:`Batch` or several.
        token_logits: ``(V, C)`` float, see :func:`build_toy_model`.
        metrics: metric objects for ``weighted_metrics``.
        mask_zero, middle, head: passed to :func:`build_toy_model`.
        fit: run the ``fit`` epoch (skip it where only ``evaluate``
            matters; each traced step costs about a second on a small CPU).
        metrics_argument: ``"weighted_metrics"`` or ``"metrics"``, the
            ``compile`` argument that receives ``metrics``.

    Returns:
        A :class:`Reported`.
    """
    K = keras_api(framework)
    logits = _check_token_logits(token_logits)
    items = _as_batches(batches)
    sizes = logits.shape
    checked = [
        Batch(*_check_batch(b.inputs, b.labels, b.sample_weight, *sizes))
        for b in items
    ]
    if metrics_argument not in ("weighted_metrics", "metrics"):
        raise ValueError(
            "metrics_argument must be 'weighted_metrics' or 'metrics'; "
            f"got {metrics_argument!r}"
        )
    quiet_retracing_warnings()
    if metrics is None:
        metrics = [K.metrics.SparseCategoricalCrossentropy(name="metric")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K.utils.set_random_seed(0)
        model = build_toy_model(
            framework, logits, mask_zero=mask_zero, middle=middle, head=head
        )
        model.compile(
            optimizer=K.optimizers.SGD(learning_rate=0.0),
            loss=loss,
            **{metrics_argument: list(metrics)},
        )
        history = {}
        if fit:
            history = model.fit(
                _dataset(checked), epochs=1, verbose=0, shuffle=False
            ).history
        evaluated = model.evaluate(
            _dataset(checked), verbose=0, return_dict=True
        )
        compute_loss, predictions, direct = float("nan"), None, float("nan")
        if len(checked) == 1:
            only = checked[0]
            x = tf.constant(only.inputs, dtype=tf.int32)
            y = tf.constant(only.labels, dtype=tf.int32)
            sw = None
            if only.sample_weight is not None:
                sw = tf.constant(only.sample_weight, tf.float32)
            y_pred = model(x)
            compute_loss = float(
                model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw)
            )
            predictions = np.asarray(y_pred)
            if isinstance(loss, (keras.losses.Loss, tf_keras.losses.Loss)):
                direct = float(loss(y, y_pred, sample_weight=sw))
    about_masks = {
        str(w.message) for w in caught if "mask" in str(w.message).lower()
    }
    other = [w for w in caught if "mask" not in str(w.message).lower()]
    for w in other:
        # Re-emit anything unexpected, so it is seen rather than swallowed.
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return Reported(
        fit={name: float(values[-1]) for name, values in history.items()},
        evaluate={name: float(value) for name, value in evaluated.items()},
        compute_loss=compute_loss,
        predictions=predictions,
        mask_warnings=tuple(sorted(about_masks)),
        call=direct,
    )


# ---------------------------------------------------------------------------
# The chapter's tables
# ---------------------------------------------------------------------------


def loss_kind_table(
    labels: ArrayLike = SOURCE_LABELS, num_classes: int = 5
) -> pd.DataFrame:
    """The source's toy under every loss kind and both Keras versions.

    The inputs are the labels themselves (padding where the labels pad), the
    model predicts ``1/C`` everywhere.  Columns: ``fit``, ``evaluate``,
    ``compute_loss`` (the loss) and ``metric`` (Keras's
    ``SparseCategoricalCrossentropy`` metric in ``evaluate``); the index is
    ``(framework, loss kind)``.
    """
    label_ids = _int_matrix(labels, "labels")
    logits = uniform_logits(num_classes)
    batch = Batch(label_ids, label_ids)
    rows = []
    for framework in FRAMEWORKS:
        for kind in LOSS_KINDS:
            got = report(framework, make_loss(framework, kind), batch, logits)
            rows.append(
                {
                    "framework": framework,
                    "loss kind": kind,
                    "fit": got.fit["loss"],
                    "evaluate": got.evaluate["loss"],
                    "compute_loss": got.compute_loss,
                    "metric": got.evaluate["metric"],
                }
            )
    return pd.DataFrame(rows).set_index(["framework", "loss kind"])


def sample_weight_masking_table(
    labels: ArrayLike = SOURCE_LABELS, num_classes: int = 5
) -> pd.DataFrame:
    """Masking by a 0/1 ``sample_weight`` alone (no ``mask_zero``).

    Rows ``(framework, loss)``: ``default``, the built-in loss with its
    default reduction (``sum_over_batch_size`` in Keras 3, ``auto`` in
    tf-keras); ``mean_with_sample_weight``, Keras 3's built-in loss with that
    reduction; ``fixed``, :class:`MaskedSparseCrossEntropy` or its twin.
    Columns: ``fit``, ``evaluate``, ``call`` (the loss object called on the
    model's output with the weights) and ``metric``.
    """
    label_ids = _int_matrix(labels, "labels")
    weights = (label_ids != PADDING_ID).astype(np.float64)
    logits = uniform_logits(num_classes)
    batch = Batch(label_ids, label_ids, weights)
    keras_ce = keras.losses.SparseCategoricalCrossentropy
    candidates: list[tuple[str, str, Callable[[], Any]]] = [
        ("keras", "default", lambda: keras_ce()),
        (
            "keras",
            "mean_with_sample_weight",
            lambda: keras_ce(reduction="mean_with_sample_weight"),
        ),
        ("keras", "fixed", lambda: fixed_loss("keras")),
        (
            "tf_keras",
            "default",
            lambda: tf_keras.losses.SparseCategoricalCrossentropy(),
        ),
        ("tf_keras", "fixed", lambda: fixed_loss("tf_keras")),
    ]
    probabilities = reference.softmax(logits)[label_ids].astype(np.float32)
    rows = []
    for framework, name, make in candidates:
        got = report(framework, make(), batch, logits, mask_zero=False)
        direct = make()(
            label_ids, probabilities, sample_weight=weights.astype(np.float32)
        )
        rows.append(
            {
                "framework": framework,
                "loss": name,
                "fit": got.fit["loss"],
                "evaluate": got.evaluate["loss"],
                "call": float(direct),
                "metric": got.evaluate["metric"],
            }
        )
    return pd.DataFrame(rows).set_index(["framework", "loss"])


def weighted_mask_table(
    labels: ArrayLike = SOURCE_LABELS,
    sample_weight: ArrayLike = ((2.0, 1.0, 1.0, 0.0, 0.0),),
    num_classes: int = 5,
) -> pd.DataFrame:
    """A Keras mask *and* non-binary weights: loss and metric disagree.

    Rows ``(framework, loss)`` for the built-in loss and the fixed loss;
    columns ``evaluate`` and ``compute_loss`` (the loss) and ``metric``
    (Keras's cross-entropy metric in ``evaluate``).
    """
    label_ids = _int_matrix(labels, "labels")
    weights = _float_array(sample_weight, "sample_weight", 2, "(B, T)")
    batch = Batch(label_ids, label_ids, weights)
    logits = uniform_logits(num_classes)
    rows = []
    for framework in FRAMEWORKS:
        K = keras_api(framework)
        for name, loss in (
            ("built-in Loss", K.losses.SparseCategoricalCrossentropy()),
            ("fixed", fixed_loss(framework)),
        ):
            got = report(framework, loss, batch, logits, fit=False)
            rows.append(
                {
                    "framework": framework,
                    "loss": name,
                    "evaluate": got.evaluate["loss"],
                    "compute_loss": got.compute_loss,
                    "metric": got.evaluate["metric"],
                }
            )
    return pd.DataFrame(rows).set_index(["framework", "loss"])


def lost_mask_table(
    labels: ArrayLike = SOURCE_LABELS,
    num_classes: int = 5,
    padding_logit: float = 8.0,
) -> pd.DataFrame:
    """Reported loss when a layer between embedding and output drops the mask.

    The model is uniform after real tokens and confident that padding
    follows padding (:func:`padding_confident_logits`), so losing the mask
    shows as a lower loss.  Rows ``(framework, middle)``; columns
    ``evaluate`` (the built-in loss), ``fixed`` (the fixed loss on the same
    model's output) and ``mask warning`` (whether Keras raised a
    ``UserWarning`` about the mask).
    """
    label_ids = _int_matrix(labels, "labels")
    logits = padding_confident_logits(num_classes, padding_logit)
    batch = Batch(label_ids, label_ids)
    rows = []
    for framework in FRAMEWORKS:
        built_in = make_loss(framework, "built-in Loss")
        for middle in MIDDLE_LAYERS:
            got = report(
                framework, built_in, batch, logits, middle=middle, fit=False
            )
            fixed = fixed_loss(framework)(label_ids, got.predictions)
            rows.append(
                {
                    "framework": framework,
                    "middle": middle,
                    "evaluate": got.evaluate["loss"],
                    "fixed": float(fixed),
                    "mask warning": bool(got.mask_warnings),
                }
            )
    return pd.DataFrame(rows).set_index(["framework", "middle"])


# ---------------------------------------------------------------------------
# The chapter's cases, for the built-in fix and the fixed loss
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskingCase:
    """One padded batch of the chapter and how it reaches the loss.

    ``mask_zero``: whether the embedding attaches a Keras mask; ``middle``:
    the layer between embedding and output (:data:`MIDDLE_LAYERS`).
    """

    batch: Batch
    mask_zero: bool = True
    middle: str = "none"


def masking_cases() -> dict[str, MaskingCase]:
    """The chapter's cases, by name, each one batch of five classes.

    ``"mask"``: the source's labels ``[1, 1, 2, 0, 0]`` as inputs and
    labels, right-padded; ``"0/1 sample_weight"``: no Keras mask, the
    padding weighted 0; ``"mask lost (Lambda)"``: a ``Lambda`` drops the
    mask; ``"weights 2,1,1,0,0"``: the mask and those weights;
    ``"left padding"``: inputs ``[0, 0, 1, 2]``, labels ``[0, 1, 2, 3]``.
    """
    labels = np.array(SOURCE_LABELS)
    real = (labels != PADDING_ID).astype(np.float64)
    return {
        "mask": MaskingCase(Batch(labels, labels)),
        "0/1 sample_weight": MaskingCase(
            Batch(labels, labels, real), mask_zero=False
        ),
        "mask lost (Lambda)": MaskingCase(Batch(labels, labels), middle="Lambda"),
        "weights 2,1,1,0,0": MaskingCase(
            Batch(labels, labels, np.array([[2.0, 1.0, 1.0, 0.0, 0.0]]))
        ),
        "left padding": MaskingCase(
            Batch(np.array([[0, 0, 1, 2]]), np.array([[0, 1, 2, 3]]))
        ),
    }


def case_token_mean(case: MaskingCase, token_logits: ArrayLike) -> float:
    """The float64 token mean the loss of ``case`` should report.

    A position counts when its label is not padding and, if the embedding's
    mask reaches the output, its input is not padding either (Keras scores
    only such positions); its weight is the sample weight, 1 without one.
    """
    b = case.batch
    per_token = reference_token_nll(token_logits, b.inputs, b.labels)
    weights = (b.labels != PADDING_ID).astype(np.float64)
    if case.mask_zero and case.middle in ("none", "custom layer, supports_masking"):
        weights = weights * (b.inputs != PADDING_ID)
    if b.sample_weight is not None:
        weights = weights * b.sample_weight
    return token_weighted_mean(per_token, weights)


def _keras3_ignore_class(reduction: str) -> Any:
    return keras.losses.SparseCategoricalCrossentropy(
        ignore_class=PADDING_ID, reduction=reduction
    )


BUILT_IN_FIXES: tuple[tuple[str, str], ...] = (
    ("keras", "ignore_class=0"),
    ("keras", "ignore_class=0, mean_with_sample_weight"),
    ("tf_keras", "ignore_class=0"),
)
"""``(framework, loss)`` rows of :func:`built_in_fix_table` before ``fixed``."""


def _built_in_fix(framework: str, name: str) -> Any:
    if name == "fixed":
        return fixed_loss(framework)
    if framework == "keras":
        if name == "ignore_class=0":
            return _keras3_ignore_class("sum_over_batch_size")
        return _keras3_ignore_class("mean_with_sample_weight")
    return tf_keras.losses.SparseCategoricalCrossentropy(
        ignore_class=PADDING_ID
    )


def built_in_fix_table(
    num_classes: int = 5, padding_logit: float = 8.0
) -> pd.DataFrame:
    """``evaluate``'s loss for Keras's own fix and the fixed loss, per case.

    The toy is the padding-confident one (:func:`padding_confident_logits`),
    so a denominator or a scored padding position shows.  Rows
    ``(framework, loss)``: :data:`BUILT_IN_FIXES`, then ``fixed`` for both
    versions, then ``("float64", "token mean")``, :func:`case_token_mean`;
    columns: the cases of :func:`masking_cases`.
    """
    logits = padding_confident_logits(num_classes, padding_logit)
    cases = masking_cases()
    rows = [*BUILT_IN_FIXES, ("keras", "fixed"), ("tf_keras", "fixed")]
    table = {}
    for framework, name in rows:
        values = {}
        for case_name, case in cases.items():
            got = report(
                framework, _built_in_fix(framework, name), case.batch, logits,
                mask_zero=case.mask_zero, middle=case.middle, fit=False,
            )
            values[case_name] = got.evaluate["loss"]
        table[(framework, name)] = values
    table[("float64", "token mean")] = {
        name: case_token_mean(case, logits) for name, case in cases.items()
    }
    frame = pd.DataFrame.from_dict(table, orient="index")
    frame.index = pd.MultiIndex.from_tuples(frame.index, names=["framework", "loss"])
    return frame


def fixed_loss_cases(
    framework: str, token_logits: ArrayLike | None = None
) -> pd.DataFrame:
    """The fixed loss and corpus metric of ``framework`` on every case.

    ``token_logits``: ``(V, C)`` with ``V, C >= 5``, default the
    padding-confident toy (:func:`padding_confident_logits`); random logits
    make every token cost something different, so a wrong weighting shows.
    Rows: the cases of :func:`masking_cases`; columns ``fit``,
    ``evaluate``, ``compute_loss``, ``call`` (the loss on the model's output
    tensor, Keras mask attached), ``corpus_ce`` (from ``evaluate``) and
    ``token mean`` (:func:`case_token_mean`).
    """
    if token_logits is None:
        token_logits = padding_confident_logits(5, 8.0)
    logits = _check_token_logits(token_logits)
    rows = {}
    for name, case in masking_cases().items():
        got = report(
            framework, fixed_loss(framework), case.batch, logits,
            metrics=corpus_metrics(framework)[:1],
            mask_zero=case.mask_zero, middle=case.middle,
        )
        rows[name] = {
            "fit": got.fit["loss"],
            "evaluate": got.evaluate["loss"],
            "compute_loss": got.compute_loss,
            "call": got.call,
            "corpus_ce": got.evaluate["corpus_ce"],
            "token mean": case_token_mean(case, logits),
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def metrics_argument_table(
    num_classes: int = 5, padding_logit: float = 8.0
) -> pd.DataFrame:
    """Keras's cross-entropy metric under ``weighted_metrics=`` and ``metrics=``.

    The ``"0/1 sample_weight"`` case of :func:`masking_cases` on the
    padding-confident toy.  Rows: frameworks; columns: the metric passed as
    ``weighted_metrics`` and as ``metrics``, and the ``token mean``.
    """
    logits = padding_confident_logits(num_classes, padding_logit)
    case = masking_cases()["0/1 sample_weight"]
    rows = {}
    for framework in FRAMEWORKS:
        row = {}
        for argument in ("weighted_metrics", "metrics"):
            got = report(
                framework, fixed_loss(framework), case.batch, logits,
                mask_zero=False, fit=False, metrics_argument=argument,
            )
            row[argument] = got.evaluate["metric"]
        row["token mean"] = case_token_mean(case, logits)
        rows[framework] = row
    return pd.DataFrame.from_dict(rows, orient="index")


def epoch_aggregation_batches(equal_lengths: bool) -> list[Batch]:
    """Two batches whose sequence counts and token counts disagree.

    Batch 1: two sequences with one real token each, both mispredicted.
    Batch 2: one sequence of ten real tokens, all predicted well (use with
    ``4 * identity`` token logits, see :func:`epoch_aggregation_table`).
    With ``equal_lengths`` both batches are padded to 10 positions;
    otherwise batch 1 is padded to 2.
    """
    length = 10 if equal_lengths else 2
    short_inputs = padded([[1], [2]], length)
    short_labels = padded([[2], [3]], length)
    long_tokens = padded([[1, 2, 3, 4, 1, 2, 3, 4, 1, 2]])
    return [Batch(short_inputs, short_labels), Batch(long_tokens, long_tokens)]


def epoch_aggregation_table(
    confidence: float = 4.0, num_classes: int = 5
) -> pd.DataFrame:
    """``fit``/``evaluate`` over several batches versus the corpus mean.

    The model is compiled with the fixed loss, so every batch's loss is its
    true token mean; what remains is how the epoch combines batches.  Rows
    ``(framework, padded to)``, the padded lengths of the two batches
    (``"10, 10"`` or ``"2, 10"``); columns: the epoch loss from ``fit`` and
    ``evaluate``, Keras's cross-entropy ``metric``, and the corpus metrics
    ``corpus_ce`` and ``corpus_perplexity`` (all from ``evaluate``).
    """
    logits = confidence * np.eye(num_classes)
    rows = []
    for framework in FRAMEWORKS:
        K = keras_api(framework)
        for equal in (True, False):
            batches = epoch_aggregation_batches(equal)
            metrics = [
                K.metrics.SparseCategoricalCrossentropy(name="metric"),
                *corpus_metrics(framework),
            ]
            got = report(
                framework, fixed_loss(framework), batches, logits,
                metrics=metrics,
            )
            rows.append(
                {
                    "framework": framework,
                    "padded to": "10, 10" if equal else "2, 10",
                    "fit": got.fit["loss"],
                    "evaluate": got.evaluate["loss"],
                    "metric": got.evaluate["metric"],
                    "corpus_ce": got.evaluate["corpus_ce"],
                    "corpus_perplexity": got.evaluate["corpus_perplexity"],
                }
            )
    return pd.DataFrame(rows).set_index(["framework", "padded to"])


def padding_sweep(
    padding_fractions: Sequence[float] = tuple(np.arange(0.0, 0.95, 0.1)),
    sequence_length: int = 20,
    num_classes: int = 5,
) -> pd.DataFrame:
    """Reported versus true loss and perplexity as padding grows.

    One sequence of ``sequence_length`` positions; the first
    ``round((1 - fraction) * T)`` are real tokens, the rest padding; the
    model predicts ``1/C`` everywhere, so the true token mean is ``log C``
    at every fraction.  ``wrong`` is Keras 3's built-in loss with the
    padding mask as a 0/1 ``sample_weight`` (equal to
    :func:`historical_masked_mean`); ``fixed`` is
    :class:`MaskedSparseCrossEntropy`.

    Returns:
        One row per fraction: ``padding_fraction`` (actual, after
        rounding), ``true``, ``wrong``, ``fixed`` (losses, nats per token)
        and ``true_ppl``, ``wrong_ppl``, ``fixed_ppl`` (their ``exp``).
    """
    length = require_positive_int(sequence_length, "sequence_length")
    fractions = np.asarray(padding_fractions, dtype=np.float64)
    if (
        fractions.ndim != 1
        or fractions.size == 0
        or fractions.min() < 0
        or fractions.max() >= 1
    ):
        raise ValueError(
            "padding_fractions must be a non-empty 1-D sequence in [0, 1)"
        )
    logits = uniform_logits(num_classes)
    wrong_loss = keras.losses.SparseCategoricalCrossentropy()
    fixed = MaskedSparseCrossEntropy()
    rows = []
    for fraction in fractions:
        real = max(1, int(round((1.0 - fraction) * length)))
        tokens = np.arange(real) % (num_classes - 1) + 1
        labels = padded([tokens.tolist()], length)
        mask = (labels != PADDING_ID).astype(np.float32)
        probabilities = reference.softmax(logits)[labels].astype(np.float32)
        per_token = reference_token_nll(logits, labels, labels)
        true = token_weighted_mean(per_token, mask)
        wrong = float(wrong_loss(labels, probabilities, sample_weight=mask))
        right = float(fixed(labels, probabilities))
        rows.append(
            {
                "padding_fraction": 1.0 - real / length,
                "true": true,
                "wrong": wrong,
                "fixed": right,
                "true_ppl": math.exp(true),
                "wrong_ppl": math.exp(wrong),
                "fixed_ppl": math.exp(right),
            }
        )
    return pd.DataFrame(rows)


def keras3_samplewise_mean(
    per_token: Sequence[ArrayLike], weights: Sequence[ArrayLike]
) -> float:
    """Keras 3's ``Mean``-based metrics over batches of different lengths.

    ``keras.metrics.Mean`` first reduces each sequence to
    ``sum_t w * x / T`` and its weight to ``sum_t w / T`` (a mean over the
    time axis, ``reduce_to_samplewise_values`` in
    ``keras/src/metrics/reduction_metrics.py``), then divides the totals.
    Within one batch the ``1/T`` cancels; across batches padded to different
    ``T`` it weights every token by ``1 / T`` of its batch.

    Args:
        per_token: one ``(B_k, T_k)`` float array per batch.
        weights: matching ``(B_k, T_k)`` arrays, the mask times any sample
            weight.
    """
    if len(per_token) != len(weights) or not per_token:
        raise ValueError(
            "per_token and weights must be non-empty sequences of equal "
            "length"
        )
    total, count = 0.0, 0.0
    for index, (values, w) in enumerate(zip(per_token, weights)):
        x = _float_array(values, f"per_token[{index}]", 2, "(B, T)")
        m = _float_array(w, f"weights[{index}]", 2, "(B, T)")
        if x.shape != m.shape:
            raise ValueError(
                f"weights[{index}] must have shape {x.shape}; got {m.shape}"
            )
        length = x.shape[1]
        total += float((m * x).sum(axis=1).sum() / length)
        count += float(m.sum(axis=1).sum() / length)
    return total / count if count else float("nan")


def installed_source(obj: Any) -> tuple[str, str]:
    """``(location, source)`` of a function or class of an installed package.

    ``location`` is ``"package/path/file.py, line N"``, relative to the
    directory the package is installed in, so it reads the same on every
    machine; ``source`` is the exact text of the installed definition.
    """
    import inspect

    path = inspect.getsourcefile(obj)
    if path is None:
        raise TypeError(
            "obj must be a Python function or class; "
            f"got {type(obj).__name__}"
        )
    top_package = obj.__module__.split(".")[0]
    root = Path(__import__(top_package).__file__).resolve().parent.parent
    relative = Path(path).resolve().relative_to(root).as_posix()
    _, first_line = inspect.getsourcelines(obj)
    return f"{relative}, line {first_line}", inspect.getsource(obj)


# ---------------------------------------------------------------------------
# The fixed loss on another Keras 3 backend
# ---------------------------------------------------------------------------

_ON_BACKEND_SCRIPT = """
import json, sys
import numpy as np
import keras
from companion import keras_loss

arrays = np.load(sys.argv[1])
labels, logits = arrays["labels"], arrays["logits"]
weights = arrays["weights"] if "weights" in arrays.files else None
loss = keras_loss.MaskedSparseCrossEntropy(from_logits=True)
metric = keras_loss.CorpusCrossEntropy(from_logits=True)
metric.update_state(labels, logits, sample_weight=weights)
print(json.dumps({
    "backend": keras.backend.backend(),
    "loss": float(loss(labels, logits, sample_weight=weights)),
    "corpus_ce": float(metric.result()),
}))
"""


def fixed_loss_on_backend(
    backend: str,
    labels: ArrayLike,
    logits: ArrayLike,
    sample_weight: ArrayLike | None = None,
) -> dict[str, Any]:
    """The fixed loss and corpus metric, run by Keras 3 on ``backend``.

    Keras chooses its backend once, at import, from ``KERAS_BACKEND``, so
    this starts a fresh Python process with that variable set, and there
    evaluates ``MaskedSparseCrossEntropy(from_logits=True)`` and
    ``CorpusCrossEntropy(from_logits=True)`` on one batch.

    Args:
        backend: one of :data:`BACKENDS` (installed in this environment).
        labels: ``(B, T)`` int, 0 = padding.
        logits: ``(B, T, C)`` float.
        sample_weight: optional ``(B, T)`` float.

    Returns:
        ``{"backend": name Keras reports, "loss": float,
        "corpus_ce": float}``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    scores, label_ids, weights = _check_logits_batch(
        logits, labels, sample_weight
    )
    arrays = {
        "labels": label_ids.astype(np.int32),
        "logits": scores.astype(np.float32),
    }
    if weights is not None:
        arrays["weights"] = weights.astype(np.float32)
    environment = dict(os.environ, KERAS_BACKEND=backend)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "batch.npz"
        np.savez(path, **arrays)
        done = subprocess.run(
            [sys.executable, "-c", _ON_BACKEND_SCRIPT, str(path)],
            capture_output=True,
            text=True,
            env=environment,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(
            f"the {backend} run failed:\n{done.stderr[-2000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


_CASES_ON_BACKEND_SCRIPT = """
import json, sys
import numpy as np
import keras
from companion.experiments import keras_masking as km
from companion import keras_loss

logits = np.array(json.loads(sys.argv[1]))
out = {"backend": keras.backend.backend(), "cases": {}}
for name, case in km.masking_cases().items():
    b = case.batch
    model = km.build_toy_model(
        "keras", logits, mask_zero=case.mask_zero, middle=case.middle
    )
    loss = keras_loss.MaskedSparseCrossEntropy()
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.0), loss=loss,
        weighted_metrics=[keras_loss.CorpusCrossEntropy()],
    )
    x, y = b.inputs.astype("int32"), b.labels.astype("int32")
    sw = None if b.sample_weight is None else b.sample_weight.astype("float32")
    fit = model.fit(x, y, sample_weight=sw, batch_size=len(x), epochs=1,
                    shuffle=False, verbose=0).history
    got = model.evaluate(x, y, sample_weight=sw, batch_size=len(x),
                         verbose=0, return_dict=True)
    direct = loss(keras.ops.convert_to_tensor(y), model(x), sample_weight=sw)
    out["cases"][name] = {
        "fit": float(fit["loss"][-1]), "evaluate": float(got["loss"]),
        "call": float(keras.ops.convert_to_numpy(direct)),
        "corpus_ce": float(got["corpus_ce"]),
    }
print(json.dumps(out))
"""


def fixed_loss_cases_on_backend(
    backend: str, token_logits: ArrayLike | None = None
) -> dict[str, Any]:
    """:func:`fixed_loss_cases` for Keras 3 on ``backend``, in a new process.

    Keras chooses its backend once, at import, so a fresh Python process
    runs with ``KERAS_BACKEND=backend``; ``token_logits`` as in
    :func:`fixed_loss_cases`.

    Returns ``{"backend": name Keras reports, "cases": {case: {"fit",
    "evaluate", "call", "corpus_ce"}}}`` (see :func:`masking_cases`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if token_logits is None:
        token_logits = padding_confident_logits(5, 8.0)
    logits = _check_token_logits(token_logits)
    environment = dict(os.environ, KERAS_BACKEND=backend)
    done = subprocess.run(
        [sys.executable, "-c", _CASES_ON_BACKEND_SCRIPT,
         json.dumps(logits.tolist())],
        capture_output=True, text=True, env=environment, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the {backend} run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
