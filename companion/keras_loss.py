"""A Keras loss and metrics that divide by the real tokens, not the positions.

For a padded batch of token sequences, the loss a language model should
report is the *masked token mean*::

    loss = sum(m * w * nll) / sum(m * w)      (sums over b and t)

where ``m`` is 1 on real tokens and 0 on padding, and ``w`` an optional
sample weight.  Keras's own losses divide by every position, or by the sum
of the sample weights, or lose the mask on the way through the model
(chapter 4, ``companion.experiments.keras_masking``, measures each
case).  Here:

* :class:`MaskedSparseCrossEntropy`: the loss of one batch, ``-log p(label)``
  summed over real tokens and divided by their weight; the labels say what
  is padding, so a Keras mask lost on the way changes nothing, and a Keras
  mask that does arrive on ``y_pred`` drops its positions from the sum *and*
  the count;
* :class:`CorpusCrossEntropy` and :class:`CorpusPerplexity`: metrics that
  keep ``sum(w * nll)`` and ``sum(w)`` across batches, so batch sizes and
  padded lengths cannot change the epoch's value;
* their tf-keras (Keras 2) twins, ``Legacy*``, which share the code
  (:class:`MaskedTokenMean`, :class:`CorpusNLL`);
* :func:`fixed_loss` and :func:`corpus_metrics`, the right one for
  ``"keras"`` or ``"tf_keras"`` (:func:`keras_api`).

The loss and the metrics are written with ``keras.ops`` only, so the Keras 3
classes run on any Keras backend; the tf-keras twins run when Keras 3's
backend is TensorFlow, the book's pin.  Importing this module imports Keras
3, TensorFlow and tf-keras.

Arrays: ``y_true`` ``(B, T)`` int class ids, ``padding_id`` (default
:data:`PADDING_ID`) = padding; ``y_pred`` ``(B, T, C)`` float
probabilities, or logits with ``from_logits=True``; ``sample_weight``
``()``, ``(B,)``, ``(B, T)`` or ``(B, T, 1)`` float, ``>= 0``.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

# companion first: its __init__ sets TensorFlow's log level before the
# imports below.
from companion._checks import require_int

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from keras import ops  # noqa: E402
from keras.src.backend import get_keras_mask  # noqa: E402

__all__ = [
    "FRAMEWORKS",
    "PADDING_ID",
    "CorpusCrossEntropy",
    "CorpusNLL",
    "CorpusPerplexity",
    "LegacyCorpusCrossEntropy",
    "LegacyCorpusPerplexity",
    "LegacyMaskedSparseCrossEntropy",
    "MaskedSparseCrossEntropy",
    "MaskedTokenMean",
    "corpus_metrics",
    "fixed_loss",
    "keras_api",
    "labels_and_real",
    "token_nll",
    "token_weights",
]

FRAMEWORKS: tuple[str, ...] = ("keras", "tf_keras")
"""``"keras"``: Keras 3 as TensorFlow ships it; ``"tf_keras"``: Keras 2."""


PADDING_ID: int = 0
"""Token and label id of padding, as with ``Embedding(mask_zero=True)``."""


def keras_api(framework: str) -> ModuleType:
    """The Keras package that ``framework`` names: ``keras`` or ``tf_keras``.

    Raises:
        ValueError: ``framework`` is not one of :data:`FRAMEWORKS`.
    """
    if framework == "keras":
        return keras
    if framework == "tf_keras":
        return tf_keras
    raise ValueError(
        f"framework must be one of {FRAMEWORKS}; got {framework!r}"
    )



def _check_options(owner: object, padding_id: Any, from_logits: Any) -> None:
    """Checks shared by the fixed loss and the corpus metrics."""
    require_int(padding_id, "padding_id")
    if not isinstance(from_logits, bool):
        raise TypeError(
            f"from_logits must be a bool; got {type(from_logits).__name__}"
        )
    legacy = (tf_keras.losses.Loss, tf_keras.metrics.Metric)
    if isinstance(owner, legacy) and keras.backend.backend() != "tensorflow":
        # tf-keras feeds TensorFlow tensors to the shared keras.ops code.
        raise RuntimeError(
            f"{type(owner).__name__} needs Keras 3 on its TensorFlow "
            f"backend; got {keras.backend.backend()!r}"
        )


# ---------------------------------------------------------------------------
# Keras side: the fixed loss and the corpus metrics, in keras.ops
# ---------------------------------------------------------------------------


# The checks of y_true, y_pred and sample_weight.  Shapes are checked when
# they are known: always in eager mode (and on the torch backend), and
# mostly when TensorFlow traces a train step.  Values are checked in NumPy
# when they are concrete, raising ValueError; inside a tf.function (fit,
# evaluate, predict), where they are not, the same checks run as
# tf.debugging assertions, which TensorFlow raises as InvalidArgumentError
# with the same message, before any Keras op can fail on the bad value.
# XLA compiles assertions away: under jit_compile=True (Keras 3's "auto"
# on a TensorFlow GPU) only the shape checks remain.


def _as_tensor(value: Any, name: str, what: str) -> Any:
    """``value`` as a backend tensor, or ``TypeError`` naming ``name``."""
    if value is None or isinstance(value, (str, bytes)):
        raise TypeError(
            f"{name} must be a tensor or array of {what}; "
            f"got {type(value).__name__}"
        )
    try:
        return ops.convert_to_tensor(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{name} must be a tensor or array of {what}; "
            f"got {type(value).__name__}"
        ) from error


def _dtype(tensor: Any) -> str:
    """Keras's name of ``tensor``'s dtype: "float32", "int64", "bool" ..."""
    return keras.backend.standardize_dtype(tensor.dtype)


def _is_real_dtype(dtype: str) -> bool:
    return dtype.startswith(("float", "bfloat", "int", "uint"))


def _static_shape(tensor: Any) -> tuple[int | None, ...]:
    """``tensor``'s shape, ``None`` for a dimension not known yet."""
    return tuple(None if d is None else int(d) for d in tensor.shape)


def _concrete(tensor: Any) -> np.ndarray | None:
    """``tensor``'s values, or ``None`` while it is symbolic (traced)."""
    if tf.is_tensor(tensor):  # the TensorFlow backend, and tf-keras
        if not tf.executing_eagerly() or tf.is_symbolic_tensor(tensor):
            return None
        return np.asarray(tensor)
    if keras.backend.is_keras_tensor(tensor):
        return None
    try:
        return np.asarray(ops.convert_to_numpy(tensor))
    except TypeError:  # a traced value of another backend (jax.jit)
        return None


def _check_dims_agree(
    shape: tuple[int | None, ...],
    expected: tuple[int | None, ...],
    name: str,
    layout: str,
) -> None:
    """``ValueError`` if a known dimension of ``shape`` differs from ``expected``."""
    for got, want in zip(shape, expected, strict=False):
        if got is not None and want is not None and got != want:
            raise ValueError(
                f"{name} must have shape {layout} matching y_pred (B, T, C) "
                f"{expected} in B and T; got shape {shape}"
            )


def _as_float(y_pred: Any) -> Any:
    """``y_pred``, checked, as a tensor of a float dtype.

    ``y_pred`` must be ``(B, T, C)`` real numbers with ``C >= 1`` and no
    empty batch; an integer dtype is cast to float32.

    Raises:
        TypeError: ``y_pred`` is not an array of real numbers.
        ValueError: a rank other than 3, or an empty dimension.
    """
    y_pred = _as_tensor(y_pred, "y_pred", "probabilities or logits")
    dtype = _dtype(y_pred)
    if not _is_real_dtype(dtype):
        raise TypeError(
            "y_pred must hold real numbers (probabilities or logits, "
            f"(B, T, C)); got dtype {dtype}"
        )
    shape = _static_shape(y_pred)
    if len(shape) != 3:
        raise ValueError(
            f"y_pred must be a 3-D tensor (B, T, C); got shape {shape}"
        )
    if 0 in shape:
        raise ValueError(
            "y_pred (B, T, C) must have no empty dimension (an empty batch "
            f"or C = 0 classes); got shape {shape}"
        )
    if not keras.backend.is_float_dtype(dtype):
        y_pred = ops.cast(y_pred, "float32")
    return y_pred


def _checked_labels(y_true: Any, y_pred: Any, padding_id: int) -> Any:
    """``y_true`` as a tensor, after checking it against ``y_pred``.

    ``y_true`` is ``(B, T)`` or ``(B, T, 1)`` class ids: integers, or
    floats holding whole numbers (Keras's ``Loss.__call__`` casts labels to
    the loss dtype, so ``call`` sees ``1.0``), each in ``[0, C)`` or equal
    to ``padding_id``.

    Raises:
        TypeError: ``y_true`` of a ``bool``, complex or string dtype.
        ValueError: a wrong shape, a label that is not a whole number, or
            a label outside ``[0, C)`` that is not ``padding_id``.  Inside
            a ``tf.function`` the value checks raise
            ``tf.errors.InvalidArgumentError`` with the same message.
    """
    labels = _as_tensor(y_true, "y_true", "class ids")
    dtype = _dtype(labels)
    if not _is_real_dtype(dtype):
        raise TypeError(
            "y_true must hold class ids (integers, or floats holding whole "
            f"numbers); got dtype {dtype}"
        )
    shape, pred_shape = _static_shape(labels), _static_shape(y_pred)
    layout = "(B, T) or (B, T, 1)"
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, None)):
        raise ValueError(
            f"y_true must have shape {layout} matching y_pred (B, T, C) "
            f"{pred_shape}; got shape {shape}"
        )
    _check_dims_agree(shape[:2], pred_shape[:2], "y_true", layout)
    num_classes = pred_shape[2]
    values = _concrete(labels)
    whole = "y_true must hold whole-number class ids (1.0 is class 1)"
    classes = "y_pred.shape[-1]" if num_classes is None else num_classes
    in_range = (
        f"y_true must lie in [0, C) (C = {classes}, the classes of y_pred) "
        f"or equal padding_id={padding_id}"
    )
    is_float = keras.backend.is_float_dtype(dtype)
    if values is not None:
        values = values.astype(np.float64)
        fractional = values != np.round(values)
        if is_float and fractional.any():
            raise ValueError(f"{whole}; found {values[fractional][0]:g}")
        real = values != padding_id
        bad = real & ((values < 0) | (values >= num_classes))
        if bad.any():
            raise ValueError(f"{in_range}; found {values[bad][0]:g}")
        return labels
    # Traced by TensorFlow: the same checks as graph assertions.
    as_float = tf.cast(labels, tf.float64)
    pred_dims = tf.shape(y_pred)
    real = tf.not_equal(as_float, float(padding_id))
    classes = tf.cast(pred_dims[2], tf.float64)
    outside = real & ((as_float < 0) | (as_float >= classes))
    checks = [
        tf.debugging.assert_equal(
            tf.shape(labels)[:2], pred_dims[:2],
            message=f"y_true must have shape {layout} matching y_pred "
            "(B, T, C) in B and T",
        ),
        tf.debugging.assert_equal(
            tf.reduce_any(outside), False, message=in_range
        ),
    ]
    if is_float:
        checks.append(tf.debugging.assert_equal(
            as_float, tf.round(as_float), message=whole
        ))
    with tf.control_dependencies(checks):
        return tf.identity(labels)


def _checked_sample_weight(sample_weight: Any, labels: Any) -> Any:
    """``sample_weight`` as a tensor: ``()``, ``(B,)``, ``(B, T)`` or
    ``(B, T, 1)`` real numbers, with ``B`` and ``T`` those of ``labels``.
    """
    weights = _as_tensor(sample_weight, "sample_weight", "weights")
    dtype = _dtype(weights)
    if not _is_real_dtype(dtype):
        raise TypeError(
            f"sample_weight must hold real numbers; got dtype {dtype}"
        )
    shape = _static_shape(weights)
    layout = "(), (B,), (B, T) or (B, T, 1)"
    if len(shape) > 3 or (len(shape) == 3 and shape[2] not in (1, None)):
        raise ValueError(
            f"sample_weight must have shape {layout}; got shape {shape}"
        )
    _check_dims_agree(shape[:2], _static_shape(labels)[:2], "sample_weight", layout)
    return weights


def labels_and_real(y_true: Any, y_pred: Any, padding_id: int) -> Any:
    """``(labels, real)``: class ids safe to gather, and the real tokens.

    Args:
        y_true: ``(B, T)`` or ``(B, T, 1)`` labels, ``padding_id`` = padding.
        y_pred: ``(B, T, C)`` float tensor (only its rank and dtype are used).

    Returns:
        ``labels``: ``(B, T)`` int32, padding replaced by class 0 (padding
        may be an id outside ``[0, C)``, e.g. -100); ``real``: ``(B, T)``
        of ``y_pred``'s dtype, 1 on real tokens and 0 on padding.
    """
    labels = _checked_labels(y_true, y_pred, padding_id)
    if len(labels.shape) == len(y_pred.shape):
        labels = ops.squeeze(labels, axis=-1)
    labels = ops.cast(labels, "int32")
    is_real = ops.not_equal(labels, padding_id)
    return ops.where(is_real, labels, 0), ops.cast(is_real, y_pred.dtype)


def token_nll(
    y_true: Any, y_pred: Any, padding_id: int, from_logits: bool
) -> Any:
    """``(B, T)`` per-token ``-log p(label)``, 0 on padding.

    The labels decide what is padding: a Keras mask can be lost on the way
    through the model (the chapter shows how), labels cannot.  ``y_pred`` is ``(B, T, C)`` probabilities, clipped as Keras's
    own sparse cross-entropy clips them, or logits if ``from_logits``.
    """
    y_pred = _as_float(y_pred)
    labels, real = labels_and_real(y_true, y_pred, padding_id)
    nll = ops.sparse_categorical_crossentropy(
        labels, y_pred, from_logits=from_logits
    )
    return nll * real


def _keras_mask_of(y_pred: Any) -> Any:
    """The Keras mask ``y_pred`` carries (``_keras_mask``), or ``None``.

    ``Embedding(mask_zero=True)`` attaches it and masking layers pass it on;
    Keras 3's ``Loss.__call__`` reads it with this same function, tf-keras's
    reads the same attribute.
    """
    return get_keras_mask(y_pred)


def token_weights(
    y_true: Any, y_pred: Any, sample_weight: Any, padding_id: int
) -> Any:
    """``(B, T)`` weights ``w``: real tokens x Keras mask x ``sample_weight``.

    A position counts when its label is not ``padding_id`` and, if
    ``y_pred`` carries a Keras mask, the mask keeps it: the positions both
    Keras versions score (``Loss.__call__`` multiplies that mask into the
    weighted sum, and tf-keras's ``compile`` folds it into the sample
    weight), so the same weights divide.  ``sample_weight`` is ``None``,
    ``(B,)`` (one weight per sequence), ``(B, T)`` or ``(B, T, 1)``,
    broadcast as Keras broadcasts it.
    """
    keras_mask = _keras_mask_of(y_pred)
    _, weights = labels_and_real(y_true, _as_float(y_pred), padding_id)
    if keras_mask is not None:
        keras_mask = ops.cast(keras_mask, weights.dtype)
        if len(keras_mask.shape) == len(weights.shape) + 1:
            keras_mask = ops.squeeze(keras_mask, axis=-1)
        weights = weights * keras_mask
    if sample_weight is None:
        return weights
    sample_weight = _checked_sample_weight(sample_weight, weights)
    sample_weight = ops.cast(sample_weight, weights.dtype)
    if len(sample_weight.shape) == 1:
        sample_weight = ops.expand_dims(sample_weight, axis=-1)
    elif len(sample_weight.shape) == 3:
        sample_weight = ops.squeeze(sample_weight, axis=-1)
    return weights * sample_weight


class _TokenOptions:
    """``padding_id`` and ``from_logits``: checked, kept, and in the config.

    The first base of :class:`MaskedTokenMean` and :class:`CorpusNLL`;
    ``base_options`` go to the Keras base class after it.
    """

    def __init__(
        self, padding_id: int, from_logits: bool, name: str, **base_options: Any
    ) -> None:
        _check_options(self, padding_id, from_logits)
        super().__init__(name=name, **base_options)
        self.padding_id = padding_id
        self.from_logits = from_logits

    def get_config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "padding_id": self.padding_id,
            "from_logits": self.from_logits,
        }


class MaskedTokenMean(_TokenOptions):
    """The body of :class:`MaskedSparseCrossEntropy` and its tf-keras twin.

    A mixin: put it before a Keras ``Loss`` base class (Keras 3 or
    tf-keras); it is not a loss on its own.
    """

    def __init__(
        self,
        padding_id: int = PADDING_ID,
        from_logits: bool = False,
        name: str = "masked_sparse_ce",
    ) -> None:
        # Keras weights the per-token losses of `call` and sums them.
        super().__init__(padding_id, from_logits, name, reduction="sum")

    def call(self, y_true: Any, y_pred: Any) -> Any:
        """``(B, T)`` per-token losses, 0 on padding."""
        return token_nll(y_true, y_pred, self.padding_id, self.from_logits)

    def __call__(
        self, y_true: Any, y_pred: Any, sample_weight: Any = None
    ) -> Any:
        # `call` never sees sample_weight: form the weights here (real
        # labels x any Keras mask of y_pred x sample_weight), let Keras's
        # "sum" apply them, then divide by their sum.  Keras multiplies
        # y_pred's mask into that sum again; it is 0/1, so the numerator
        # and the denominator count the same positions.
        weights = token_weights(
            y_true, y_pred, sample_weight, self.padding_id
        )
        total = super().__call__(y_true, y_pred, sample_weight=weights)
        count = ops.cast(ops.sum(weights), total.dtype)
        # A batch of padding alone gives 0 (and no gradient), not nan.
        return ops.divide_no_nan(total, count)


class MaskedSparseCrossEntropy(MaskedTokenMean, keras.losses.Loss):
    """Keras 3 loss: ``-log p(label)`` summed over real tokens / their weight.

    ``loss(y_true, y_pred, sample_weight)``:

    * ``y_true``: ``(B, T)`` (or ``(B, T, 1)``) class ids in ``[0, C)``,
      ``padding_id`` = padding (default 0).  Any integer dtype, or floats
      holding whole numbers (Keras casts labels to float, so ``1.0`` is
      class 1); ``1.5``, ``nan`` and ``bool`` labels are rejected;
    * ``y_pred``: ``(B, T, C)`` float probabilities (logits if
      ``from_logits=True``), ``C >= 1``, no empty batch;
    * ``sample_weight``: optional ``()``, ``(B,)``, ``(B, T)`` or
      ``(B, T, 1)`` float.

    Returns ``sum(w * nll) / sum(w)`` with ``w`` = (label != padding_id) x
    (Keras mask of ``y_pred``, if any) x weight, a scalar; 0 when the batch
    holds no real token.  The labels decide what is padding, so a Keras mask
    lost on the way does not matter; a mask that arrives (left padding, say)
    drops its positions from the numerator and the denominator alike; a
    ``sample_weight`` never dilutes the denominator.  ``call`` gives
    the per-token losses, Keras's ``"sum"`` reduction weights and adds them,
    and ``__call__`` divides.  Written in ``keras.ops``: any backend.

    Bad arguments raise ``TypeError``/``ValueError`` naming ``y_true``,
    ``y_pred`` or ``sample_weight``.  Inside a ``tf.function`` (``fit``,
    ``evaluate``), where label values are not known while the step is
    traced, the value checks are ``tf.debugging`` assertions: TensorFlow
    raises them as ``tf.errors.InvalidArgumentError`` with the same message
    (XLA drops assertions: compile with ``jit_compile=False`` to keep them).
    """


class LegacyMaskedSparseCrossEntropy(MaskedTokenMean, tf_keras.losses.Loss):
    """tf-keras (Keras 2) twin of :class:`MaskedSparseCrossEntropy`."""


class CorpusNLL(_TokenOptions):
    """The body of the corpus-level metrics for both Keras versions.

    A mixin: put it before a Keras ``Metric`` base class (Keras 3 or
    tf-keras); it is not a metric on its own.
    """

    def __init__(
        self,
        padding_id: int = PADDING_ID,
        from_logits: bool = False,
        name: str = "corpus_ce",
    ) -> None:
        super().__init__(padding_id, from_logits, name)
        self.total_nll = self.add_weight(
            name="total_nll", shape=(), initializer="zeros"
        )
        self.total_tokens = self.add_weight(
            name="total_tokens", shape=(), initializer="zeros"
        )

    # tf-keras would AutoGraph-convert it, rewrapping the argument checks'
    # errors; nothing in it branches on a tensor, so conversion is not needed
    @tf.autograph.experimental.do_not_convert
    def update_state(
        self, y_true: Any, y_pred: Any, sample_weight: Any = None
    ) -> None:
        nll = token_nll(y_true, y_pred, self.padding_id, self.from_logits)
        weights = token_weights(
            y_true, y_pred, sample_weight, self.padding_id
        )
        total = ops.sum(nll * weights)
        self.total_nll.assign_add(ops.cast(total, self.total_nll.dtype))
        count = ops.sum(weights)
        self.total_tokens.assign_add(ops.cast(count, self.total_tokens.dtype))

    def result(self) -> Any:
        return ops.divide_no_nan(self.total_nll, self.total_tokens)


class CorpusCrossEntropy(CorpusNLL, keras.metrics.Metric):
    """Keras 3 metric: token-level mean ``-log p(label)`` over all it sees.

    It keeps two sums across batches, ``sum(w * nll)`` and ``sum(w)``
    (``w`` = real-token indicator x optional weight), and reports their
    ratio, so batch sizes and padded lengths do not change the result.
    Arguments and shapes as :class:`MaskedSparseCrossEntropy`.
    """


class _Perplexity:
    """``exp`` of the corpus cross-entropy metric it is put before."""

    def __init__(
        self,
        padding_id: int = PADDING_ID,
        from_logits: bool = False,
        name: str = "corpus_perplexity",
    ) -> None:
        super().__init__(padding_id, from_logits, name)

    def result(self) -> Any:
        return ops.exp(super().result())


class CorpusPerplexity(_Perplexity, CorpusCrossEntropy):
    """Keras 3 metric: ``exp`` of :class:`CorpusCrossEntropy`."""


class LegacyCorpusCrossEntropy(CorpusNLL, tf_keras.metrics.Metric):
    """tf-keras (Keras 2) twin of :class:`CorpusCrossEntropy`."""


class LegacyCorpusPerplexity(_Perplexity, LegacyCorpusCrossEntropy):
    """tf-keras (Keras 2) twin of :class:`CorpusPerplexity`."""


# ---------------------------------------------------------------------------
# The right classes for each Keras version
# ---------------------------------------------------------------------------


def fixed_loss(framework: str, padding_id: int = PADDING_ID) -> Any:
    """:class:`MaskedSparseCrossEntropy` or its tf-keras twin."""
    if keras_api(framework) is keras:
        return MaskedSparseCrossEntropy(padding_id=padding_id)
    return LegacyMaskedSparseCrossEntropy(padding_id=padding_id)


def corpus_metrics(framework: str, padding_id: int = PADDING_ID) -> list[Any]:
    """``[corpus cross-entropy, corpus perplexity]`` for ``framework``."""
    if keras_api(framework) is keras:
        return [CorpusCrossEntropy(padding_id), CorpusPerplexity(padding_id)]
    return [
        LegacyCorpusCrossEntropy(padding_id),
        LegacyCorpusPerplexity(padding_id),
    ]
