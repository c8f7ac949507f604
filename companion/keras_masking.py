"""Padding, masks and the denominator of a Keras sequence loss.

A padded batch of token sequences has ``B * T`` positions, of which only the
real tokens should be scored.  A *masked token mean* divides the summed
negative log-likelihood by the number of real tokens::

    loss = sum_{b,t} m[b,t] * w[b,t] * nll[b,t] / sum_{b,t} m[b,t] * w[b,t]

where ``m`` is 1 on real tokens and 0 on padding, and ``w`` an optional
weight.  Up to Keras 2.10 the mask that ``Embedding(mask_zero=True)``
attaches to the model's output entered the loss as a sample weight, but the
sum was still divided by ``B * T``: the historical pitfall.  This module
rebuilds the toy that shows it, measures what the pinned Keras 3 and tf-keras
report in ``fit``, ``evaluate`` and ``compute_loss``, reproduces the old
reduction, and provides a loss and metrics that divide by the real tokens.

Everything here runs on TensorFlow: Keras 3 through its TensorFlow backend
(``import keras``) and legacy Keras 2 (``import tf_keras``).  Arrays follow
one convention throughout:

* ``inputs``: ``(B, T)`` int token ids, ``0`` = padding;
* ``labels``: ``(B, T)`` int class ids, ``0`` (``PADDING_ID``) = padding;
* ``sample_weight``: ``(B, T)`` float, ``>= 0``;
* ``token_logits``: ``(V, C)`` float, the scores the toy model outputs at a
  position whose input token is ``v`` (its row ``v``).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

import companion  # noqa: F401  (sets TensorFlow's log level before the imports below)
from companion import reference
from companion._checks import require_positive_int

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from tf_keras.__internal__.losses import compute_weighted_loss as _tf_keras_compute_weighted_loss  # noqa: E402

__all__ = [
    "FRAMEWORKS",
    "LOSS_KINDS",
    "MIDDLE_LAYERS",
    "PADDING_ID",
    "SOURCE_LABELS",
    "Batch",
    "CorpusCrossEntropy",
    "CorpusPerplexity",
    "HistoricalSparseCategoricalCrossentropy",
    "LegacyCorpusCrossEntropy",
    "LegacyCorpusPerplexity",
    "LegacyMaskedSparseCrossEntropy",
    "LegacySubclassedSparseCrossEntropy",
    "MaskedSparseCrossEntropy",
    "Reported",
    "SubclassedSparseCrossEntropy",
    "build_toy_model",
    "corpus_metrics",
    "epoch_aggregation_batches",
    "epoch_aggregation_table",
    "fixed_loss",
    "historical_masked_mean",
    "installed_source",
    "keras3_samplewise_mean",
    "keras_api",
    "loss_kind_table",
    "lost_mask_table",
    "make_loss",
    "padded",
    "padding_confident_logits",
    "padding_sweep",
    "quiet_retracing_warnings",
    "reference_token_nll",
    "report",
    "sample_weight_masking_table",
    "sequence_weighted_epoch_mean",
    "softmax_layer_probabilities",
    "token_weighted_mean",
    "uniform_logits",
    "weighted_mask_table",
]

FRAMEWORKS: tuple[str, ...] = ("keras", "tf_keras")
"""``"keras"``: Keras 3 as TensorFlow ships it; ``"tf_keras"``: legacy Keras 2."""

LOSS_KINDS: tuple[str, ...] = ("string", "built-in Loss", "function", "custom Loss")
"""The ways to hand ``compile`` a sparse cross-entropy."""

MIDDLE_LAYERS: tuple[str, ...] = (
    "none",
    "Lambda",
    "custom layer",
    "custom layer, supports_masking",
    "raw op",
)
"""What :func:`build_toy_model` can put between the embedding and the output layer."""

PADDING_ID: int = 0
"""Token and label id of padding, as with ``Embedding(mask_zero=True)``."""

SOURCE_LABELS: tuple[tuple[int, ...], ...] = ((1, 1, 2, 0, 0),)
"""The source's example: three real labels, then two padding positions."""

_RETRACING_MESSAGE = "triggered tf.function retracing"


# ---------------------------------------------------------------------------
# Argument checks (NumPy side, before any Keras code runs)
# ---------------------------------------------------------------------------


def keras_api(framework: str) -> ModuleType:
    """The Keras package that ``framework`` names: ``keras`` or ``tf_keras``.

    Raises:
        ValueError: ``framework`` is not one of :data:`FRAMEWORKS`.
    """
    if framework == "keras":
        return keras
    if framework == "tf_keras":
        return tf_keras
    raise ValueError(f"framework must be one of {FRAMEWORKS}; got {framework!r}")


def _int_matrix(value: ArrayLike, name: str) -> np.ndarray:
    """``value`` as a ``(B, T)`` int64 array, or a ``TypeError``/``ValueError``."""
    array = np.asarray(value)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integer ids (B, T); got dtype {array.dtype}")
    if array.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (B, T); got shape {array.shape}")
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"{name} must have B >= 1 and T >= 1; got shape {array.shape}")
    return array.astype(np.int64)


def _float_array(value: ArrayLike, name: str, ndim: int, layout: str) -> np.ndarray:
    """``value`` as a float64 array of rank ``ndim`` with finite entries."""
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers {layout}; got dtype {array.dtype}")
    if array.dtype == bool:
        raise TypeError(f"{name} must hold real numbers {layout}; got dtype bool")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be a {ndim}-D array {layout}; got shape {array.shape}")
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
    """Validate one ``(inputs, labels, sample_weight)`` triple against the model's sizes."""
    token_ids = _int_matrix(inputs, "inputs")
    label_ids = _int_matrix(labels, "labels")
    if label_ids.shape != token_ids.shape:
        raise ValueError(
            f"labels must have the shape of inputs {token_ids.shape} (B, T); got {label_ids.shape}"
        )
    if token_ids.min() < 0 or token_ids.max() >= num_tokens:
        raise ValueError(f"inputs must lie in [0, {num_tokens}) (rows of token_logits)")
    if label_ids.min() < 0 or label_ids.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) (columns of token_logits)")
    weights = None
    if sample_weight is not None:
        weights = _float_array(sample_weight, "sample_weight", 2, "(B, T)")
        if weights.shape != token_ids.shape:
            raise ValueError(
                f"sample_weight must have the shape of inputs {token_ids.shape} (B, T); "
                f"got {weights.shape}"
            )
        if weights.min() < 0:
            raise ValueError("sample_weight must be >= 0")
    return token_ids, label_ids, weights


def _check_token_logits(token_logits: ArrayLike) -> np.ndarray:
    logits = _float_array(token_logits, "token_logits", 2, "(V, C)")
    if logits.shape[0] < 1 or logits.shape[1] < 2:
        raise ValueError(f"token_logits must have V >= 1 rows and C >= 2 columns; got {logits.shape}")
    return logits


# ---------------------------------------------------------------------------
# NumPy side: the toy's exact values and the historical reduction
# ---------------------------------------------------------------------------


def uniform_logits(num_classes: int = 5) -> np.ndarray:
    """``(C, C)`` zeros: the toy predicts ``1/C`` for every class at every position."""
    require_positive_int(num_classes, "num_classes")
    return np.zeros((num_classes, num_classes))


def padding_confident_logits(num_classes: int = 5, padding_logit: float = 8.0) -> np.ndarray:
    """``(C, C)`` logits: uniform after a real token, confident "padding" after padding.

    Row 0 (the padding token) scores class 0 with ``padding_logit`` and every
    other class with 0, as a model does once it has learned that padding
    follows padding.  The other rows are zeros (uniform predictions).
    """
    logits = uniform_logits(num_classes)
    logits[PADDING_ID, PADDING_ID] = float(padding_logit)
    return logits


def reference_token_nll(token_logits: ArrayLike, inputs: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Exact float64 ``-log p(label)`` of the toy at every position.

    Args:
        token_logits: ``(V, C)`` float, the toy's scores per input token.
        inputs: ``(B, T)`` int token ids in ``[0, V)``.
        labels: ``(B, T)`` int class ids in ``[0, C)``.

    Returns:
        ``(B, T)`` float64, padding positions included (masking is the caller's choice).
    """
    logits = _check_token_logits(token_logits)
    token_ids, label_ids, _ = _check_batch(inputs, labels, None, *logits.shape)
    log_probs = reference.log_softmax(logits)[token_ids]
    return -np.take_along_axis(log_probs, label_ids[..., None], axis=-1)[..., 0]


def token_weighted_mean(per_token: ArrayLike, weights: ArrayLike) -> float:
    """``sum(w * x) / sum(w)`` over all positions, in float64 (``nan`` if ``sum(w) == 0``).

    Args:
        per_token: ``(B, T)`` float, e.g. per-token negative log-likelihoods.
        weights: ``(B, T)`` float ``>= 0``: the real-token mask times any sample weight.
    """
    values = _float_array(per_token, "per_token", 2, "(B, T)")
    w = _float_array(weights, "weights", 2, "(B, T)")
    if w.shape != values.shape:
        raise ValueError(f"weights must have the shape of per_token {values.shape}; got {w.shape}")
    total = float(w.sum())
    return float((w * values).sum() / total) if total else float("nan")


def historical_masked_mean(per_token_loss: ArrayLike, mask: ArrayLike) -> float:
    """HISTORICAL: the reduction tf.keras applied to a masked output up to Keras 2.10.

    ``compile`` turned the output's mask into a 0/1 sample weight; ``Loss.__call__``
    then reduced with ``SUM_OVER_BATCH_SIZE``, which divides by the number of
    elements, padding included::

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
        raise ValueError(f"mask must have the shape of per_token_loss {values.shape}; got {m.shape}")
    if not np.all((m == 0) | (m == 1)):
        raise ValueError("mask must hold only 0 and 1")
    return float((m * values).sum() / values.size)


def sequence_weighted_epoch_mean(batch_means: Sequence[float], batch_sizes: Sequence[int]) -> float:
    """What ``fit``/``evaluate`` report for an epoch: batch means weighted by sequences.

    Both Keras versions feed each batch's loss to a ``Mean`` metric with
    ``sample_weight = B`` (the batch's number of sequences), so the epoch
    value is ``sum_k B_k * loss_k / sum_k B_k`` whatever the number of tokens.
    """
    means = np.asarray(batch_means, dtype=np.float64)
    sizes = np.asarray(batch_sizes, dtype=np.float64)
    if means.ndim != 1 or means.shape != sizes.shape or means.size == 0:
        raise ValueError("batch_means and batch_sizes must be non-empty 1-D sequences of equal length")
    if np.any(sizes < 1):
        raise ValueError("batch_sizes must be >= 1")
    return float((sizes * means).sum() / sizes.sum())


def padded(sequences: Sequence[Sequence[int]], length: int | None = None) -> np.ndarray:
    """Right-pad integer sequences with :data:`PADDING_ID` to ``(B, length)`` int32.

    ``length`` defaults to the longest sequence.
    """
    if not sequences:
        raise ValueError("sequences must contain at least one sequence")
    longest = max(len(s) for s in sequences)
    width = longest if length is None else require_positive_int(length, "length")
    if width < longest:
        raise ValueError(f"length must be >= the longest sequence ({longest}); got {width}")
    out = np.full((len(sequences), width), PADDING_ID, dtype=np.int32)
    for row, sequence in enumerate(sequences):
        out[row, : len(sequence)] = np.asarray(sequence, dtype=np.int32)
    return out


# ---------------------------------------------------------------------------
# TensorFlow side: losses and metrics
# ---------------------------------------------------------------------------


def _token_nll_and_weights(
    y_true: Any,
    y_pred: Any,
    sample_weight: Any,
    padding_id: int,
    from_logits: bool,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-token ``-log p(label)`` and weights ``w`` = real-token indicator x sample weight.

    The labels, not a Keras mask, decide what is padding: a mask can be lost
    on the way through the model (this chapter shows how), labels cannot.

    Args:
        y_true: ``(B, T)`` or ``(B, T, 1)`` int labels, ``padding_id`` = padding.
        y_pred: ``(B, T, C)`` float probabilities (or logits if ``from_logits``).
        sample_weight: ``None``, ``(B,)``, ``(B, T)`` or ``(B, T, 1)`` float.

    Returns:
        ``(nll, weights)``, both ``(B, T)`` float; ``nll`` is 0 on padding.
    """
    y_pred = tf.convert_to_tensor(y_pred)
    if not y_pred.dtype.is_floating:
        y_pred = tf.cast(y_pred, tf.float32)
    labels = tf.convert_to_tensor(y_true)
    if labels.shape.rank == y_pred.shape.rank:
        labels = tf.squeeze(labels, axis=-1)
    labels = tf.cast(labels, tf.int32)
    is_real = tf.not_equal(labels, padding_id)
    # Padding may use an id outside [0, C) (e.g. -100); gather a valid class there.
    safe_labels = tf.where(is_real, labels, tf.zeros_like(labels))
    if from_logits:
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=safe_labels, logits=y_pred)
    else:
        # Same clipping as Keras's own sparse cross-entropy on probabilities.
        epsilon = keras.backend.epsilon()
        probs = tf.clip_by_value(y_pred, epsilon, 1.0 - epsilon)
        picked = tf.gather(probs, safe_labels, axis=-1, batch_dims=labels.shape.rank)
        nll = -tf.math.log(picked)
    weights = tf.cast(is_real, nll.dtype)
    nll = nll * weights
    if sample_weight is not None:
        sample_weight = tf.cast(tf.convert_to_tensor(sample_weight), nll.dtype)
        if sample_weight.shape.rank == 1:
            sample_weight = sample_weight[:, tf.newaxis]
        elif sample_weight.shape.rank == 3:
            sample_weight = tf.squeeze(sample_weight, axis=-1)
        weights = weights * sample_weight
    return nll, weights


def _token_nll_sums(
    y_true: Any,
    y_pred: Any,
    sample_weight: Any,
    padding_id: int,
    from_logits: bool,
) -> tuple[tf.Tensor, tf.Tensor]:
    """``(sum of w * nll, sum of w)`` over a batch; see :func:`_token_nll_and_weights`."""
    nll, weights = _token_nll_and_weights(y_true, y_pred, sample_weight, padding_id, from_logits)
    return tf.reduce_sum(nll * weights), tf.reduce_sum(weights)


class _MaskedTokenMean:
    """Shared body of :class:`MaskedSparseCrossEntropy` for both Keras versions."""

    def __init__(
        self, padding_id: int = PADDING_ID, from_logits: bool = False, name: str = "masked_sparse_ce"
    ) -> None:
        if isinstance(padding_id, bool) or not isinstance(padding_id, int):
            raise TypeError(f"padding_id must be an int; got {type(padding_id).__name__}")
        if not isinstance(from_logits, bool):
            raise TypeError(f"from_logits must be a bool; got {type(from_logits).__name__}")
        super().__init__(name=name, reduction="sum_over_batch_size")
        self.padding_id = padding_id
        self.from_logits = from_logits

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> tf.Tensor:
        # The whole reduction lives here, so neither Keras version can rescale it.
        total, count = _token_nll_sums(
            y_true, y_pred, sample_weight, self.padding_id, self.from_logits
        )
        # A batch of padding only contributes 0 (and no gradient), not nan.
        return tf.math.divide_no_nan(total, count)

    def call(self, y_true: Any, y_pred: Any) -> tf.Tensor:
        """``(B, T)`` per-token losses, 0 on padding (``__call__`` does the reduction)."""
        nll, _ = _token_nll_and_weights(y_true, y_pred, None, self.padding_id, self.from_logits)
        return nll

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "padding_id": self.padding_id, "from_logits": self.from_logits}


class MaskedSparseCrossEntropy(_MaskedTokenMean, keras.losses.Loss):
    """Keras 3 loss: summed ``-log p(label)`` over real tokens / their (weighted) count.

    ``loss(y_true, y_pred, sample_weight)``:

    * ``y_true``: ``(B, T)`` int, ``padding_id`` = padding (default 0);
    * ``y_pred``: ``(B, T, C)`` float probabilities (logits if ``from_logits=True``);
    * ``sample_weight``: optional ``(B,)`` or ``(B, T)`` float.

    Returns ``sum(w * nll) / sum(w)`` with ``w`` = (label != padding_id) x weight,
    a scalar; 0 when the batch holds no real token.  The labels decide what is
    padding, so a Keras mask lost on the way does not matter, and a
    ``sample_weight`` never dilutes the denominator.
    """


class LegacyMaskedSparseCrossEntropy(_MaskedTokenMean, tf_keras.losses.Loss):
    """tf-keras (Keras 2) twin of :class:`MaskedSparseCrossEntropy`, same arguments."""


class _CorpusNLL:
    """Shared body of the corpus-level metrics for both Keras versions."""

    def __init__(
        self, padding_id: int = PADDING_ID, from_logits: bool = False, name: str = "corpus_ce"
    ) -> None:
        if isinstance(padding_id, bool) or not isinstance(padding_id, int):
            raise TypeError(f"padding_id must be an int; got {type(padding_id).__name__}")
        if not isinstance(from_logits, bool):
            raise TypeError(f"from_logits must be a bool; got {type(from_logits).__name__}")
        super().__init__(name=name)
        self.padding_id = padding_id
        self.from_logits = from_logits
        self.total_nll = self.add_weight(name="total_nll", shape=(), initializer="zeros")
        self.total_tokens = self.add_weight(name="total_tokens", shape=(), initializer="zeros")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        total, count = _token_nll_sums(
            y_true, y_pred, sample_weight, self.padding_id, self.from_logits
        )
        self.total_nll.assign_add(tf.cast(total, self.total_nll.dtype))
        self.total_tokens.assign_add(tf.cast(count, self.total_tokens.dtype))

    def result(self) -> tf.Tensor:
        return tf.math.divide_no_nan(
            tf.convert_to_tensor(self.total_nll), tf.convert_to_tensor(self.total_tokens)
        )

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name, "padding_id": self.padding_id, "from_logits": self.from_logits}


class CorpusCrossEntropy(_CorpusNLL, keras.metrics.Metric):
    """Keras 3 metric: token-level mean ``-log p(label)`` over everything seen.

    It keeps two sums across batches, ``sum(w * nll)`` and ``sum(w)``
    (``w`` = real-token indicator x optional weight), and reports their ratio,
    so batch sizes and padded lengths do not change the result.  Arguments and
    shapes as :class:`MaskedSparseCrossEntropy`.
    """


class CorpusPerplexity(CorpusCrossEntropy):
    """Keras 3 metric: ``exp`` of :class:`CorpusCrossEntropy`, the corpus perplexity."""

    def __init__(
        self, padding_id: int = PADDING_ID, from_logits: bool = False, name: str = "corpus_perplexity"
    ) -> None:
        super().__init__(padding_id=padding_id, from_logits=from_logits, name=name)

    def result(self) -> tf.Tensor:
        return tf.exp(super().result())


class LegacyCorpusCrossEntropy(_CorpusNLL, tf_keras.metrics.Metric):
    """tf-keras (Keras 2) twin of :class:`CorpusCrossEntropy`."""


class LegacyCorpusPerplexity(LegacyCorpusCrossEntropy):
    """tf-keras (Keras 2) twin of :class:`CorpusPerplexity`."""

    def __init__(
        self, padding_id: int = PADDING_ID, from_logits: bool = False, name: str = "corpus_perplexity"
    ) -> None:
        super().__init__(padding_id=padding_id, from_logits=from_logits, name=name)

    def result(self) -> tf.Tensor:
        return tf.exp(super().result())


class HistoricalSparseCategoricalCrossentropy(tf_keras.losses.SparseCategoricalCrossentropy):
    """HISTORICAL: tf-keras's sparse cross-entropy with ``Loss.__call__`` as of Keras 2.9/2.10.

    Up to Keras 2.10, ``Loss.__call__`` ended with
    ``compute_weighted_loss(losses, sample_weight, reduction)``: no rescaling of
    the mask that ``compile`` had already folded into ``sample_weight``.  Keras
    2.11 inserted ``apply_valid_mask`` (``total / valid``) before it, for the
    mask on ``y_pred``.  This class removes that step again, so ``fit`` and
    ``evaluate`` of a tf-keras model report what TensorFlow 2.0-2.10 reported.
    Do not train with it: it is here to reproduce old numbers.
    """

    def __call__(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> tf.Tensor:
        losses = self.call(y_true, y_pred)
        return _tf_keras_compute_weighted_loss(
            losses, sample_weight, reduction=self._get_reduction()
        )


# ---------------------------------------------------------------------------
# The four kinds of loss the source lists, for each Keras version
# ---------------------------------------------------------------------------


def _keras_sparse_ce(y_true: Any, y_pred: Any) -> Any:
    """A plain function loss for Keras 3: per-token cross-entropy, no reduction."""
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


def _tf_keras_sparse_ce(y_true: Any, y_pred: Any) -> Any:
    """A plain function loss for tf-keras: per-token cross-entropy, no reduction."""
    return tf_keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


class SubclassedSparseCrossEntropy(keras.losses.Loss):
    """A user-written Keras 3 ``Loss`` subclass: ``call`` returns ``(B, T)`` per-token losses."""

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


class LegacySubclassedSparseCrossEntropy(tf_keras.losses.Loss):
    """A user-written tf-keras ``Loss`` subclass: ``call`` returns ``(B, T)`` per-token losses."""

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return tf_keras.losses.sparse_categorical_crossentropy(y_true, y_pred)


def make_loss(framework: str, kind: str) -> Any:
    """A sparse cross-entropy of the given ``kind`` (one of :data:`LOSS_KINDS`) for ``compile``."""
    K = keras_api(framework)
    if kind == "string":
        return "sparse_categorical_crossentropy"
    if kind == "built-in Loss":
        return K.losses.SparseCategoricalCrossentropy()
    if kind == "function":
        return _keras_sparse_ce if framework == "keras" else _tf_keras_sparse_ce
    if kind == "custom Loss":
        return SubclassedSparseCrossEntropy() if framework == "keras" else LegacySubclassedSparseCrossEntropy()
    raise ValueError(f"kind must be one of {LOSS_KINDS}; got {kind!r}")


def fixed_loss(framework: str, padding_id: int = PADDING_ID) -> Any:
    """:class:`MaskedSparseCrossEntropy` or its tf-keras twin."""
    if keras_api(framework) is keras:
        return MaskedSparseCrossEntropy(padding_id=padding_id)
    return LegacyMaskedSparseCrossEntropy(padding_id=padding_id)


def corpus_metrics(framework: str, padding_id: int = PADDING_ID) -> list[Any]:
    """``[corpus cross-entropy, corpus perplexity]`` metrics for ``framework``."""
    if keras_api(framework) is keras:
        return [CorpusCrossEntropy(padding_id), CorpusPerplexity(padding_id)]
    return [LegacyCorpusCrossEntropy(padding_id), LegacyCorpusPerplexity(padding_id)]


# ---------------------------------------------------------------------------
# The toy model
# ---------------------------------------------------------------------------


class _KerasIdentityNoMask(keras.layers.Layer):
    """A Keras 3 layer written without ``supports_masking``: returns its input."""

    def call(self, inputs: Any) -> Any:
        return inputs * 1.0


class _KerasIdentityWithMask(keras.layers.Layer):
    """The same layer declaring ``supports_masking = True``: the mask passes through."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs: Any) -> Any:
        return inputs * 1.0


class _TfKerasIdentityNoMask(tf_keras.layers.Layer):
    """A tf-keras layer written without ``supports_masking``: returns its input."""

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
        return _KerasIdentityNoMask() if K is keras else _TfKerasIdentityNoMask()
    if middle == "custom layer, supports_masking":
        return _KerasIdentityWithMask() if K is keras else _TfKerasIdentityWithMask()
    if middle == "raw op":
        # An op applied to a symbolic tensor outside any layer, as in `h = h * scale`.
        if K is keras:
            return lambda t: keras.ops.multiply(t, 1.0)
        return lambda t: tf.multiply(t, 1.0)
    raise ValueError(f"middle must be one of {MIDDLE_LAYERS}; got {middle!r}")


def build_toy_model(
    framework: str,
    token_logits: ArrayLike,
    *,
    mask_zero: bool = True,
    middle: str = "none",
    softmax_layer: bool = False,
) -> Any:
    """The source's toy: ``Embedding(mask_zero=True)`` -> ``Dense(C, softmax)``.

    The embedding holds ``token_logits`` and the dense layer is the identity,
    so the model's output at a position whose input token is ``v`` is exactly
    ``softmax(token_logits[v])``.  With :func:`uniform_logits` that is
    ``1/C`` everywhere, the source's "probability 0.2 for every class".

    Args:
        framework: ``"keras"`` or ``"tf_keras"``.
        token_logits: ``(V, C)`` float.
        mask_zero: whether the embedding attaches a padding mask (token 0).
        middle: one of :data:`MIDDLE_LAYERS`, inserted after the embedding.
        softmax_layer: use ``Dense(C)`` then ``layers.Softmax()`` instead of
            ``Dense(C, activation="softmax")``.

    Returns:
        An uncompiled functional model, ``(B, T)`` int32 -> ``(B, T, C)`` float32.
    """
    K = keras_api(framework)
    logits = _check_token_logits(token_logits)
    if not isinstance(mask_zero, bool):
        raise TypeError(f"mask_zero must be a bool; got {type(mask_zero).__name__}")
    if middle not in MIDDLE_LAYERS:
        raise ValueError(f"middle must be one of {MIDDLE_LAYERS}; got {middle!r}")
    num_tokens, num_classes = logits.shape
    inputs = K.Input(shape=(None,), dtype="int32")
    embedding = K.layers.Embedding(num_tokens, num_classes, mask_zero=mask_zero)
    hidden = embedding(inputs)
    between = _middle(framework, middle)
    if between is not None:
        hidden = between(hidden)
    dense = K.layers.Dense(num_classes, activation=None if softmax_layer else "softmax")
    outputs = dense(hidden)
    if softmax_layer:
        outputs = K.layers.Softmax()(outputs)
    model = K.Model(inputs, outputs)
    embedding.set_weights([logits.astype(np.float32)])
    dense.set_weights([np.eye(num_classes, dtype=np.float32), np.zeros(num_classes, np.float32)])
    return model


def softmax_layer_probabilities(framework: str, inputs: ArrayLike, token_logits: ArrayLike) -> np.ndarray:
    """Output of the toy built with ``layers.Softmax()`` on ``inputs``, ``(B, T, C)`` float32.

    Raises whatever the Keras version raises when the ``(B, T)`` mask does not
    broadcast against ``(B, T, C)``.
    """
    logits = _check_token_logits(token_logits)
    token_ids, _, _ = _check_batch(inputs, np.zeros_like(np.asarray(inputs)), None, *logits.shape)
    model = build_toy_model(framework, logits, softmax_layer=True)
    return np.asarray(model(token_ids.astype(np.int32)))


# ---------------------------------------------------------------------------
# Running a loss through compile / fit / evaluate / compute_loss
# ---------------------------------------------------------------------------


class _DropRetracingWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _RETRACING_MESSAGE not in record.getMessage()


def quiet_retracing_warnings() -> None:
    """Drop TensorFlow's "triggered tf.function retracing" log warning, and only that.

    This chapter builds dozens of tiny models on purpose; each traces its own
    train step, which TensorFlow reports as excessive retracing of one Python
    function.  That performance hint does not apply here.  Idempotent.
    """
    logger = tf.get_logger()
    if not any(isinstance(f, _DropRetracingWarning) for f in logger.filters):
        logger.addFilter(_DropRetracingWarning())


@dataclass(frozen=True)
class Batch:
    """One batch: ``inputs`` and ``labels`` ``(B, T)`` int, optional ``sample_weight`` ``(B, T)``."""

    inputs: np.ndarray
    labels: np.ndarray
    sample_weight: np.ndarray | None = None


@dataclass(frozen=True)
class Reported:
    """What Keras reported for one model and loss.

    Attributes:
        fit: ``history.history`` after one epoch (learning rate 0), name -> value;
            empty when ``fit`` was not run.
        evaluate: ``evaluate(..., return_dict=True)``, name -> value.
        compute_loss: ``model.compute_loss`` on the single batch (``nan`` with several batches).
        predictions: the model's ``(B, T, C)`` output on the single batch (``None`` with several).
        mask_warnings: messages of the ``UserWarning``s Keras raised about masks.
    """

    fit: dict[str, float]
    evaluate: dict[str, float]
    compute_loss: float
    predictions: np.ndarray | None = None
    mask_warnings: tuple[str, ...] = field(default_factory=tuple)


def _as_batches(batches: Batch | Sequence[Batch]) -> list[Batch]:
    items = [batches] if isinstance(batches, Batch) else list(batches)
    if not items or not all(isinstance(b, Batch) for b in items):
        raise TypeError("batches must be a Batch or a non-empty sequence of Batch")
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
        dataset = dataset.concatenate(tf.data.Dataset.from_tensors(element(b)))
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
    fit: bool = True,
) -> Reported:
    """Compile the toy with ``loss``, run one ``fit`` epoch and ``evaluate``, and read the numbers.

    The optimizer has learning rate 0, so ``fit`` sees the same weights as
    ``evaluate``.  Each :class:`Batch` is one step (its own padded length).
    ``metrics`` go to ``weighted_metrics``, so they see the sample weights;
    the default is Keras's own ``SparseCategoricalCrossentropy`` metric, named
    ``"metric"``.

    Args:
        framework: ``"keras"`` or ``"tf_keras"``.
        loss: anything ``compile(loss=...)`` takes (see :func:`make_loss`).
        batches: one :class:`Batch` or several.
        token_logits: ``(V, C)`` float, see :func:`build_toy_model`.
        metrics: metric objects for ``weighted_metrics``.
        mask_zero, middle: passed to :func:`build_toy_model`.
        fit: run the ``fit`` epoch (skip it where only ``evaluate`` matters;
            each traced step costs about a second on a small CPU).

    Returns:
        A :class:`Reported`.
    """
    K = keras_api(framework)
    logits = _check_token_logits(token_logits)
    items = _as_batches(batches)
    checked = [
        Batch(*_check_batch(b.inputs, b.labels, b.sample_weight, *logits.shape)) for b in items
    ]
    quiet_retracing_warnings()
    if metrics is None:
        metrics = [K.metrics.SparseCategoricalCrossentropy(name="metric")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        K.utils.set_random_seed(0)
        model = build_toy_model(framework, logits, mask_zero=mask_zero, middle=middle)
        model.compile(
            optimizer=K.optimizers.SGD(learning_rate=0.0),
            loss=loss,
            weighted_metrics=list(metrics),
        )
        history = {}
        if fit:
            history = model.fit(_dataset(checked), epochs=1, verbose=0, shuffle=False).history
        evaluated = model.evaluate(_dataset(checked), verbose=0, return_dict=True)
        compute_loss, predictions = float("nan"), None
        if len(checked) == 1:
            only = checked[0]
            x = tf.constant(only.inputs, dtype=tf.int32)
            y = tf.constant(only.labels, dtype=tf.int32)
            sw = None if only.sample_weight is None else tf.constant(only.sample_weight, tf.float32)
            y_pred = model(x)
            compute_loss = float(model.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sw))
            predictions = np.asarray(y_pred)
    mask_messages = tuple(
        sorted({str(w.message) for w in caught if "mask" in str(w.message).lower()})
    )
    other = [w for w in caught if "mask" not in str(w.message).lower()]
    for w in other:
        # Re-emit anything unexpected, so it is seen rather than swallowed.
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return Reported(
        fit={name: float(values[-1]) for name, values in history.items()},
        evaluate={name: float(value) for name, value in evaluated.items()},
        compute_loss=compute_loss,
        predictions=predictions,
        mask_warnings=mask_messages,
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
    """Masking by a 0/1 ``sample_weight`` alone (no ``mask_zero``), per reduction.

    Rows ``(framework, loss)``: the built-in loss with its default reduction,
    Keras 3's ``reduction="mean_with_sample_weight"``, and the fixed loss.
    Columns: ``fit``, ``evaluate``, ``direct call`` (the loss object called on
    the model's output with the weights) and ``metric``.
    """
    label_ids = _int_matrix(labels, "labels")
    weights = (label_ids != PADDING_ID).astype(np.float64)
    logits = uniform_logits(num_classes)
    batch = Batch(label_ids, label_ids, weights)
    candidates: list[tuple[str, str, Callable[[], Any]]] = [
        ("keras", "default (sum_over_batch_size)", lambda: keras.losses.SparseCategoricalCrossentropy()),
        (
            "keras",
            "mean_with_sample_weight",
            lambda: keras.losses.SparseCategoricalCrossentropy(reduction="mean_with_sample_weight"),
        ),
        ("keras", "MaskedSparseCrossEntropy", lambda: MaskedSparseCrossEntropy()),
        ("tf_keras", "default (auto)", lambda: tf_keras.losses.SparseCategoricalCrossentropy()),
        ("tf_keras", "LegacyMaskedSparseCrossEntropy", lambda: LegacyMaskedSparseCrossEntropy()),
    ]
    probabilities = reference.softmax(logits)[label_ids].astype(np.float32)
    rows = []
    for framework, name, make in candidates:
        got = report(framework, make(), batch, logits, mask_zero=False)
        direct = float(make()(label_ids, probabilities, sample_weight=weights.astype(np.float32)))
        rows.append(
            {
                "framework": framework,
                "loss": name,
                "fit": got.fit["loss"],
                "evaluate": got.evaluate["loss"],
                "direct call": direct,
                "metric": got.evaluate["metric"],
            }
        )
    return pd.DataFrame(rows).set_index(["framework", "loss"])


def weighted_mask_table(
    labels: ArrayLike = SOURCE_LABELS,
    sample_weight: ArrayLike = ((2.0, 1.0, 1.0, 0.0, 0.0),),
    num_classes: int = 5,
) -> pd.DataFrame:
    """A Keras mask *and* non-binary weights: the loss and the metric divide differently.

    Rows ``(framework, loss)`` for the built-in loss and the fixed loss;
    columns ``evaluate`` and ``compute_loss`` (the loss) and ``metric``
    (Keras's cross-entropy metric in ``evaluate``).
    """
    label_ids = _int_matrix(labels, "labels")
    batch = Batch(label_ids, label_ids, _float_array(sample_weight, "sample_weight", 2, "(B, T)"))
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
    labels: ArrayLike = SOURCE_LABELS, num_classes: int = 5, padding_logit: float = 8.0
) -> pd.DataFrame:
    """The reported loss when a layer between embedding and output drops the mask.

    The model is uniform after real tokens and confident that padding follows
    padding (:func:`padding_confident_logits`), so losing the mask shows as a
    lower loss.  Rows ``(framework, middle)``; columns ``evaluate`` (the
    built-in loss), ``fixed`` (the fixed loss on the same model's output) and
    ``mask warning`` (whether Keras raised a ``UserWarning`` about the mask).
    """
    label_ids = _int_matrix(labels, "labels")
    logits = padding_confident_logits(num_classes, padding_logit)
    batch = Batch(label_ids, label_ids)
    rows = []
    for framework in FRAMEWORKS:
        for middle in MIDDLE_LAYERS:
            got = report(
                framework, make_loss(framework, "built-in Loss"), batch, logits, middle=middle, fit=False
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


def epoch_aggregation_batches(equal_lengths: bool) -> list[Batch]:
    """Two batches whose sequence counts and token counts disagree.

    Batch 1: two sequences with one real token each, both mispredicted.
    Batch 2: one sequence of ten real tokens, all predicted well (use with
    ``4 * identity`` token logits, see :func:`epoch_aggregation_table`).
    With ``equal_lengths`` both batches are padded to 10 positions; otherwise
    batch 1 is padded to 2.
    """
    length = 10 if equal_lengths else 2
    short_inputs = padded([[1], [2]], length)
    short_labels = padded([[2], [3]], length)
    long_tokens = padded([[1, 2, 3, 4, 1, 2, 3, 4, 1, 2]])
    return [Batch(short_inputs, short_labels), Batch(long_tokens, long_tokens)]


def epoch_aggregation_table(confidence: float = 4.0, num_classes: int = 5) -> pd.DataFrame:
    """``fit``/``evaluate`` over several batches versus the corpus token mean.

    The model is compiled with the fixed loss, so every batch's loss is its
    true token mean; what remains is how the epoch combines batches.  Rows
    ``(framework, batch lengths)``; columns: the epoch loss from ``fit`` and
    ``evaluate``, Keras's cross-entropy ``metric``, and the corpus metrics
    ``corpus_ce`` and ``corpus_perplexity`` (all from ``evaluate``).
    """
    logits = confidence * np.eye(num_classes)
    rows = []
    for framework in FRAMEWORKS:
        K = keras_api(framework)
        for equal in (True, False):
            batches = epoch_aggregation_batches(equal)
            metrics = [K.metrics.SparseCategoricalCrossentropy(name="metric"), *corpus_metrics(framework)]
            got = report(framework, fixed_loss(framework), batches, logits, metrics=metrics)
            rows.append(
                {
                    "framework": framework,
                    "batch lengths": "equal (10, 10)" if equal else "different (2, 10)",
                    "fit loss": got.fit["loss"],
                    "evaluate loss": got.evaluate["loss"],
                    "metric": got.evaluate["metric"],
                    "corpus_ce": got.evaluate["corpus_ce"],
                    "corpus_perplexity": got.evaluate["corpus_perplexity"],
                }
            )
    return pd.DataFrame(rows).set_index(["framework", "batch lengths"])


def padding_sweep(
    padding_fractions: Sequence[float] = tuple(np.arange(0.0, 0.95, 0.1)),
    sequence_length: int = 20,
    num_classes: int = 5,
) -> pd.DataFrame:
    """Reported versus true loss and perplexity as padding grows.

    One sequence of ``sequence_length`` positions; the first
    ``round((1 - fraction) * T)`` are real tokens, the rest padding; the model
    predicts ``1/C`` everywhere, so the true token mean is ``log C`` at every
    fraction.  ``wrong`` is Keras 3's built-in loss with the padding mask as a
    0/1 ``sample_weight`` (equal to :func:`historical_masked_mean`); ``fixed``
    is :class:`MaskedSparseCrossEntropy`.

    Returns:
        One row per fraction: ``padding_fraction`` (actual, after rounding),
        ``true``, ``wrong``, ``fixed`` (losses, nats per token) and
        ``true_ppl``, ``wrong_ppl``, ``fixed_ppl`` (their ``exp``).
    """
    length = require_positive_int(sequence_length, "sequence_length")
    fractions = np.asarray(padding_fractions, dtype=np.float64)
    if fractions.ndim != 1 or fractions.size == 0 or fractions.min() < 0 or fractions.max() >= 1:
        raise ValueError("padding_fractions must be a non-empty 1-D sequence in [0, 1)")
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
        true = token_weighted_mean(reference_token_nll(logits, labels, labels), mask)
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


def keras3_samplewise_mean(per_token: Sequence[ArrayLike], weights: Sequence[ArrayLike]) -> float:
    """What Keras 3's ``Mean``-based metrics report over batches of different lengths.

    ``keras.metrics.Mean`` first reduces each sequence to
    ``sum_t w * x / T`` and its weight to ``sum_t w / T`` (a mean over the
    time axis, ``reduce_to_samplewise_values`` in
    ``keras/src/metrics/reduction_metrics.py``), then divides the totals.
    Within one batch the ``1/T`` cancels; across batches padded to different
    ``T`` it weights every token by ``1 / T`` of its batch.

    Args:
        per_token: one ``(B_k, T_k)`` float array per batch.
        weights: matching ``(B_k, T_k)`` arrays, the mask times any sample weight.
    """
    if len(per_token) != len(weights) or not per_token:
        raise ValueError("per_token and weights must be non-empty sequences of equal length")
    total, count = 0.0, 0.0
    for index, (values, w) in enumerate(zip(per_token, weights)):
        x = _float_array(values, f"per_token[{index}]", 2, "(B, T)")
        m = _float_array(w, f"weights[{index}]", 2, "(B, T)")
        if x.shape != m.shape:
            raise ValueError(f"weights[{index}] must have shape {x.shape}; got {m.shape}")
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
    from pathlib import Path

    path = inspect.getsourcefile(obj)
    if path is None:
        raise TypeError(f"obj must be a Python function or class; got {type(obj).__name__}")
    top_package = obj.__module__.split(".")[0]
    root = Path(__import__(top_package).__file__).resolve().parent.parent
    relative = Path(path).resolve().relative_to(root).as_posix()
    _, first_line = inspect.getsourcelines(obj)
    return f"{relative}, line {first_line}", inspect.getsource(obj)
