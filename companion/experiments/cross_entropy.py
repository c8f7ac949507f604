"""Chapter 3's experiments: the textbook formula, and one input everywhere.

* :func:`naive_log_softmax` / :func:`naive_cross_entropy`, the textbook
  formula that overflows, for contrast with
  :func:`companion.cross_entropy.log_softmax`, and
  :func:`naive_versus_stable_by_scale`, both at growing logit scale;
* :func:`tf_sparse_softmax_cross_entropy` and
  :func:`keras_sparse_categorical_crossentropy`, the TensorFlow and Keras
  calls with the same ignore-index semantics;
* :func:`run_implementation` and :func:`compare_implementations`, which push
  one NumPy input through every implementation (the package's, PyTorch,
  ``tf.nn``, Keras) and tabulate the differences from the float64
  reference, and :func:`format_comparison` to display that table;
* :func:`keras_probability_loss_and_gradient` and
  :func:`tf_softmax_model_loss`, Keras's loss given probabilities: the
  gradient that its clipping leaves, and what ``fit`` and ``evaluate``
  report for a model that ends in ``tf.nn.softmax``;
* :func:`non_finite_logit_gradients`, which ``+inf``, ``-inf`` and ``nan``
  logits poison the gradient; :func:`dispatched_aten_ops`, the kernels a
  loss call runs; :func:`keras_fit_class_weight`, what a real
  ``Model.fit(class_weight=...)`` does with ``(B, T)`` labels.

TensorFlow and Keras are imported inside the functions that need them, so
importing this module does not start TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from companion import IGNORE_INDEX, reference
from companion._checks import require_class_axis, require_int, require_one_of
from companion.cross_entropy import (
    Reduction,
    check_cross_entropy_inputs,
    cross_entropy,
    nll_loss,
)
from companion.experiments.display import bound

__all__ = [
    "IMPLEMENTATIONS",
    "ImplementationResult",
    "NON_FINITE_PLACEMENTS",
    "compare_implementations",
    "dispatched_aten_ops",
    "format_comparison",
    "keras_fit_class_weight",
    "keras_probability_loss_and_gradient",
    "keras_sparse_categorical_crossentropy",
    "naive_cross_entropy",
    "naive_log_softmax",
    "naive_versus_stable_by_scale",
    "non_finite_logit_gradients",
    "run_implementation",
    "tf_softmax_model_loss",
    "tf_sparse_softmax_cross_entropy",
]


# ---------------------------------------------------------------------------
# The textbook formula, for contrast
# ---------------------------------------------------------------------------


def naive_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """``log(exp(x) / sum_k exp(x_k))`` evaluated exactly as written.

    Kept for contrast with :func:`companion.cross_entropy.log_softmax`.  In float32, ``exp`` overflows
    to ``inf`` once a logit exceeds about 88.72 (then ``inf / inf = nan``), and
    a probability below half the smallest subnormal (``2**-150``, about
    ``7e-46``) rounds to 0, whose log is ``-inf``.

    Args:
        logits: ``(..., C)`` float.

    Returns:
        ``(..., C)`` of ``logits``' dtype; ``nan``/``-inf`` where the
        formula breaks.
    """
    require_class_axis(logits, "logits")
    exps = torch.exp(logits)
    return torch.log(exps / exps.sum(dim=-1, keepdim=True))


def naive_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """:func:`~companion.cross_entropy.nll_loss` of :func:`naive_log_softmax`.

    Right in exact arithmetic, fragile in floating point.

    Args:
        logits: ``(N, C)`` float.
        targets: ``(N,)`` int, ``ignore_index`` = skipped.
        ignore_index: target value that contributes nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Like :func:`companion.cross_entropy.cross_entropy`, with ``inf``/``nan`` where ``exp``
        over- or underflows.
    """
    check_cross_entropy_inputs(
        logits, targets, ignore_index=ignore_index, reduction=reduction
    )
    return nll_loss(
        naive_log_softmax(logits), targets, ignore_index=ignore_index,
        reduction=reduction,
    )


def naive_versus_stable_by_scale(
    scales: ArrayLike, *, dtype: torch.dtype = torch.float32
) -> dict[str, np.ndarray]:
    """Mean loss of a two-row batch at growing logit scale, naive and stable.

    Both rows hold the logits ``s * [1, 0, -1]``; row 0 targets the top class
    (0), row 1 the bottom class (2).  The exact mean is
    ``s + log(1 + exp(-s) + exp(-2s))``.  In float32 the naive formula gives
    ``inf`` once row 1's probability, about ``exp(-2s)``, rounds to 0 (``s``
    above ``75 ln 2``, about 51.99) and
    ``nan`` once ``exp(s)`` overflows (``s`` above about 88.72), which turns
    row 0's probability into ``inf / inf``.

    Args:
        scales: ``(S,)`` values of ``s``.
        dtype: floating dtype to compute in.

    Returns:
        ``{"scale": (S,), "naive": (S,), "stable": (S,)}``, float64 arrays.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"dtype must be a floating-point torch dtype; got "
            f"{type(dtype).__name__}"
        )
    s = np.asarray(scales, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(
            f"scales must be a 1-D array (S,); got shape {s.shape}"
        )
    if not dtype.is_floating_point:
        raise TypeError(
            f"dtype must be a floating-point torch dtype; got {dtype}"
        )
    row = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)
    targets = torch.tensor([0, 2])
    naive, stable = [], []
    for scale in s:
        logits = (scale * row).expand(2, 3).to(dtype)
        naive.append(naive_cross_entropy(logits, targets).item())
        stable.append(cross_entropy(logits, targets).item())
    return {"scale": s, "naive": np.array(naive), "stable": np.array(stable)}




# ---------------------------------------------------------------------------
# The same input through every implementation
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ImplementationResult:
    """One implementation's answer on one input.

    Attributes:
        name: the implementation's key in :data:`IMPLEMENTATIONS`.
        per_row: ``(N,)`` float64 per-row losses, 0 on ignored rows.
        mean: the implementation's own mean over kept rows, as a float.
    """

    name: str
    per_row: np.ndarray
    mean: float


def _check_numpy_inputs(
    logits: Any, targets: Any, ignore_index: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Validate NumPy inputs with the tensor checks, before any framework."""
    if not isinstance(logits, np.ndarray):
        raise TypeError(
            "logits must be a numpy.ndarray (N, C); got "
            f"{type(logits).__name__}"
        )
    if not isinstance(targets, np.ndarray):
        raise TypeError(
            "targets must be a numpy.ndarray (N,); got "
            f"{type(targets).__name__}"
        )
    if logits.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"logits must be float32 or float64; got {logits.dtype}"
        )
    if not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(
            f"targets must hold integer class indices; got {targets.dtype}"
        )
    # Private writable copies: torch.from_numpy warns on read-only arrays.
    logits, targets = np.array(logits), targets.astype(np.int64)
    check_cross_entropy_inputs(
        torch.from_numpy(logits), torch.from_numpy(targets),
        ignore_index=ignore_index,
    )
    return logits, targets


def _require_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def _per_row_and_mean(
    loss: Callable[..., torch.Tensor],
) -> Callable[[np.ndarray, np.ndarray, int], tuple[Any, Any]]:
    """One of this package's losses as an entry of :data:`IMPLEMENTATIONS`."""

    def run(
        logits: np.ndarray, targets: np.ndarray, ignore_index: int
    ) -> tuple[Any, Any]:
        x, y = torch.from_numpy(logits), torch.from_numpy(targets)
        per_row = loss(x, y, ignore_index=ignore_index, reduction="none")
        return per_row, loss(x, y, ignore_index=ignore_index)

    return run


def _torch_cross_entropy_loss(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[Any, Any]:
    x, y = torch.from_numpy(logits), torch.from_numpy(targets)
    per_row = torch.nn.CrossEntropyLoss(
        ignore_index=ignore_index, reduction="none"
    )(x, y)
    mean = torch.nn.CrossEntropyLoss(ignore_index=ignore_index)(x, y)
    return per_row, mean


def _torch_nll_of_log_softmax(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[Any, Any]:
    x, y = torch.from_numpy(logits), torch.from_numpy(targets)
    log_probs = torch.nn.LogSoftmax(dim=1)(x)
    per_row = torch.nn.NLLLoss(
        ignore_index=ignore_index, reduction="none"
    )(log_probs, y)
    mean = torch.nn.NLLLoss(ignore_index=ignore_index)(log_probs, y)
    return per_row, mean


def tf_sparse_softmax_cross_entropy(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Any, Any]:
    """``tf.nn.sparse_softmax_cross_entropy_with_logits`` with an ignore
    index added.

    ``tf.nn`` has neither an ignore index nor a reduction, and on CPU it
    raises for a label outside ``[0, C)``: ignored rows get class 0, and
    their losses are then replaced by 0 and left out of the count.

    Args:
        logits: ``(N, C)`` float32 or float64 ``numpy.ndarray``.
        targets: ``(N,)`` integer ``numpy.ndarray``,
            ``ignore_index`` = skipped.
        ignore_index: target value that contributes nothing.

    Returns:
        ``(per_row, mean)`` as ``tf.Tensor``: ``(N,)`` losses (0 on ignored
        rows) and their sum over the number of kept rows (``nan`` if none).
    """
    logits, targets = _check_numpy_inputs(logits, targets, ignore_index)
    import tensorflow as tf

    kept = tf.not_equal(targets, ignore_index)
    safe_targets = tf.where(kept, targets, tf.zeros_like(targets))
    per_row = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=safe_targets, logits=logits
    )
    per_row = tf.where(kept, per_row, tf.zeros_like(per_row))
    kept_count = tf.reduce_sum(tf.cast(kept, per_row.dtype))
    return per_row, tf.reduce_sum(per_row) / kept_count


def keras_sparse_categorical_crossentropy(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    from_logits: bool,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Any, Any]:
    """``keras.losses.SparseCategoricalCrossentropy`` on logits or on
    their softmax.

    With ``from_logits=False`` the loss receives ``tf.nn.softmax(logits)``:
    unlike ``keras.ops.softmax``, it leaves no logits behind for Keras to
    recover, so the probability path (with its clipping) is what runs.

    Args:
        logits: ``(N, C)`` float32 or float64 ``numpy.ndarray``; the loss
            object computes in this dtype.
        targets: ``(N,)`` integer ``numpy.ndarray``, ``ignore_index`` = skipped
            (passed as ``ignore_class``).
        from_logits: give Keras the logits (``True``) or probabilities
            (``False``).
        ignore_index: target value that contributes nothing.

    Returns:
        ``(per_row, mean)`` as ``tf.Tensor``: ``reduction="none"`` (0 on
        ignored rows) and the default ``"sum_over_batch_size"`` reduction.
    """
    _require_bool(from_logits, "from_logits")
    logits, targets = _check_numpy_inputs(logits, targets, ignore_index)
    import keras
    import tensorflow as tf

    y_pred = logits if from_logits else tf.nn.softmax(logits)
    options = dict(
        from_logits=from_logits, ignore_class=ignore_index,
        dtype=logits.dtype.name,
    )
    scce = keras.losses.SparseCategoricalCrossentropy
    per_row = scce(reduction="none", **options)(targets, y_pred)
    mean = scce(**options)(targets, y_pred)
    return per_row, mean


def _tf_sparse_softmax(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[Any, Any]:
    return tf_sparse_softmax_cross_entropy(
        logits, targets, ignore_index=ignore_index
    )


def _keras_from_logits(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[Any, Any]:
    return keras_sparse_categorical_crossentropy(
        logits, targets, from_logits=True, ignore_index=ignore_index
    )


def _keras_from_probs(
    logits: np.ndarray, targets: np.ndarray, ignore_index: int
) -> tuple[Any, Any]:
    return keras_sparse_categorical_crossentropy(
        logits, targets, from_logits=False, ignore_index=ignore_index
    )


_Implementation = Callable[[np.ndarray, np.ndarray, int], tuple[Any, Any]]

IMPLEMENTATIONS: dict[str, _Implementation] = {
    "companion cross_entropy": _per_row_and_mean(cross_entropy),
    "torch CrossEntropyLoss": _torch_cross_entropy_loss,
    "torch NLLLoss(LogSoftmax)": _torch_nll_of_log_softmax,
    "tf.nn sparse_softmax_ce + mask": _tf_sparse_softmax,
    "keras SCCE from_logits=True": _keras_from_logits,
    "keras SCCE from_logits=False": _keras_from_probs,
    "naive log(softmax)": _per_row_and_mean(naive_cross_entropy),
}
"""Every implementation :func:`compare_implementations` runs, by name.

Each takes ``(logits (N, C) float32|float64, targets (N,) int64,
ignore_index)`` and returns ``(per_row, mean)`` in its own framework's
tensor type.  The Keras entries pass ``ignore_class=ignore_index``;
``from_logits=False`` receives ``tf.nn.softmax(logits)``.
"""


def _to_float64(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to(torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def run_implementation(
    name: str,
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> ImplementationResult:
    """Run one implementation of :data:`IMPLEMENTATIONS` on NumPy inputs.

    Args:
        name: a key of :data:`IMPLEMENTATIONS`.
        logits: ``(N, C)`` float32 or float64 ``numpy.ndarray``; every
            implementation computes in this dtype.
        targets: ``(N,)`` integer ``numpy.ndarray``,
            ``ignore_index`` = skipped.
        ignore_index: target value that contributes nothing.

    Returns:
        The :class:`ImplementationResult`, converted to float64 NumPy.
    """
    if name not in IMPLEMENTATIONS:
        raise ValueError(
            f"name must be one of {tuple(IMPLEMENTATIONS)}; got {name!r}"
        )
    logits, targets = _check_numpy_inputs(logits, targets, ignore_index)
    per_row, mean = IMPLEMENTATIONS[name](logits, targets, ignore_index)
    return ImplementationResult(
        name=name, per_row=_to_float64(per_row),
        mean=float(_to_float64(mean)),
    )


def compare_implementations(
    logits: np.ndarray,
    targets: np.ndarray,
    *,
    ignore_index: int = IGNORE_INDEX,
    names: tuple[str, ...] | None = None,
) -> Any:
    """One input through every implementation, against the float64 reference.

    Args:
        logits: ``(N, C)`` float32 or float64 ``numpy.ndarray``.
        targets: ``(N,)`` integer ``numpy.ndarray``,
            ``ignore_index`` = skipped.
        ignore_index: target value that contributes nothing.
        names: which implementations (default: all of :data:`IMPLEMENTATIONS`).

    Returns:
        A ``pandas.DataFrame`` indexed by implementation, first row
        ``"reference (NumPy float64)"``, with columns ``dtype``, ``mean loss``,
        ``|mean - ref|`` and ``max |row - ref|`` (the largest per-row
        difference).  ``inf``/``nan`` propagate, so a broken implementation
        shows as such.
    """
    import pandas as pd

    logits, targets = _check_numpy_inputs(logits, targets, ignore_index)
    selected = tuple(IMPLEMENTATIONS) if names is None else names
    ref_rows = np.asarray(reference.cross_entropy(
        logits, targets, ignore_index=ignore_index, reduction="none"
    ))
    ref_mean = float(reference.cross_entropy(
        logits, targets, ignore_index=ignore_index
    ))
    records = [
        {"implementation": "reference (NumPy float64)", "dtype": "float64",
         "mean loss": ref_mean, "|mean - ref|": 0.0, "max |row - ref|": 0.0}
    ]
    for name in selected:
        result = run_implementation(
            name, logits, targets, ignore_index=ignore_index
        )
        row_errors = np.abs(result.per_row - ref_rows)
        records.append(
            {"implementation": name, "dtype": logits.dtype.name,
             "mean loss": result.mean,
             "|mean - ref|": abs(result.mean - ref_mean),
             # np.max propagates nan, so a nan row shows as nan;
             # initial covers N = 0.
             "max |row - ref|": float(np.max(row_errors, initial=0.0))}
        )
    return pd.DataFrame.from_records(records).set_index("implementation")


def format_comparison(table: Any, threshold: float = 1e-4) -> Any:
    """:func:`compare_implementations`' table with display-stable strings.

    Args:
        table: the ``pandas.DataFrame`` that
            :func:`compare_implementations` returns.
        threshold: differences below it are shown as the bound
            ``"< 1e-4"`` (:func:`companion.experiments.display.bound`),
            the same on every machine; float32 rows differ from the
            float64 reference by rounding noise far below the default.

    Returns:
        A copy whose ``mean loss`` has 5 significant digits and whose
        difference columns go through
        :func:`companion.experiments.display.bound`.
    """
    shown = table.copy()
    shown["mean loss"] = [f"{v:.5g}" for v in table["mean loss"]]
    for column in ("|mean - ref|", "max |row - ref|"):
        shown[column] = [bound(v, threshold) for v in table[column]]
    return shown


# ---------------------------------------------------------------------------
# Keras given probabilities: the clipping, its gradient, the training loop
# ---------------------------------------------------------------------------


def keras_probability_loss_and_gradient(
    logits: np.ndarray, targets: np.ndarray
) -> tuple[float, np.ndarray]:
    """Keras's loss given ``tf.nn.softmax(logits)``, and its gradient.

    The logits become probabilities through ``tf.nn.softmax`` (eagerly, so
    Keras cannot recover the logits), which
    ``keras.losses.SparseCategoricalCrossentropy(from_logits=False)`` clips
    into ``[eps, 1 - eps]`` (``eps = keras.config.epsilon()``) before taking
    their log; ``tf.GradientTape`` differentiates the mean loss back to the
    logits.  A clipped probability is a constant, so its entries pass no
    gradient: a row whose probabilities all lie outside the range gets none.

    Args:
        logits: ``(N, C)`` float32 or float64 ``numpy.ndarray``; the loss
            computes in this dtype.
        targets: ``(N,)`` integer ``numpy.ndarray`` in ``[0, C)``; there is
            no ignore index.

    Returns:
        ``(loss, gradient)``: the default ``"sum_over_batch_size"`` mean as
        a ``float``, and its ``(N, C)`` gradient with respect to ``logits``,
        a ``numpy.ndarray`` of ``logits``' dtype.
    """
    logits, targets = _check_numpy_inputs(logits, targets, IGNORE_INDEX)
    if (targets < 0).any():
        raise ValueError(
            f"targets must lie in [0, {logits.shape[1]}) (this loss has no "
            f"ignore index); found {int(targets.min())}"
        )
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=False, dtype=logits.dtype.name
    )
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        loss = loss_fn(targets, tf.nn.softmax(variable))
    return float(loss), tape.gradient(loss, variable).numpy()


def tf_softmax_model_loss(
    logits: np.ndarray,
    target: int,
    *,
    method: str,
    run_eagerly: bool = False,
) -> float:
    """The loss that ``fit`` or ``evaluate`` reports for a model ending in
    ``tf.nn.softmax``, with ``from_logits=False``.

    The model maps one input, 1, through ``Dense(C)`` with a zero kernel and
    the bias ``logits`` (so its logits are ``logits``), then a ``Lambda``
    layer applying ``tf.nn.softmax``; it is compiled with
    ``keras.losses.SparseCategoricalCrossentropy(from_logits=False)`` and
    plain SGD.  Unless ``run_eagerly``, Keras runs the loss inside a
    ``tf.function``, where it recognises the ``Softmax`` op and takes its
    input: no clipping.  Eagerly it gets only the probabilities and clips
    them.

    Args:
        logits: ``(C,)`` float32 or float64 ``numpy.ndarray``, the logits
            of the one row (the model computes in float32).
        target: the row's class, an ``int`` in ``[0, C)``.
        method: ``"fit"`` (one epoch on the one example: the loss of the
            batch before the update) or ``"evaluate"``.
        run_eagerly: passed to ``Model.compile``.

    Returns:
        The reported loss, a ``float``.
    """
    if not isinstance(logits, np.ndarray):
        raise TypeError(
            f"logits must be a numpy.ndarray (C,); got {type(logits).__name__}"
        )
    if logits.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"logits must be float32 or float64; got {logits.dtype}"
        )
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(
            f"logits must be a 1-D array (C,) with C >= 1; got shape "
            f"{logits.shape}"
        )
    num_classes = logits.shape[0]
    target = require_int(target, "target")
    if not 0 <= target < num_classes:
        raise ValueError(
            f"target must lie in [0, {num_classes}); got {target}"
        )
    require_one_of(method, ("fit", "evaluate"), "method")
    _require_bool(run_eagerly, "run_eagerly")
    import keras
    import tensorflow as tf

    inputs = keras.Input((1,))
    dense = keras.layers.Dense(num_classes)
    outputs = keras.layers.Lambda(tf.nn.softmax)(dense(inputs))
    model = keras.Model(inputs, outputs)
    dense.set_weights([
        np.zeros((1, num_classes), np.float32), logits.astype(np.float32)
    ])
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False),
        run_eagerly=run_eagerly,
    )
    one, label = np.ones((1, 1), np.float32), np.array([target])
    if method == "fit":
        history = model.fit(one, label, epochs=1, verbose=0)
        return float(history.history["loss"][0])
    return float(model.evaluate(one, label, verbose=0))


# ---------------------------------------------------------------------------
# Non-finite logits, the kernels behind the loss, and Keras's class_weight
# ---------------------------------------------------------------------------

#: Where :func:`non_finite_logit_gradients` puts the bad logit.
NON_FINITE_PLACEMENTS = (
    "ignored row, one class",
    "ignored row, every class",
    "scored row, other class",
    "scored row, target class",
)


def _finiteness(tensor: torch.Tensor) -> str:
    if torch.isnan(tensor).any():
        return "nan"
    if torch.isinf(tensor).any():
        return "inf"
    return "finite"


def non_finite_logit_gradients(
    dtype: torch.dtype = torch.float32,
) -> Any:
    """What one ``+inf``, ``-inf`` or ``nan`` logit does to
    ``F.cross_entropy`` (mean) and its gradient.

    A batch of 4 rows and 5 classes (seeded normal logits, targets
    ``[-100, 2, 1, 3]``: row 0 ignored) gets the bad value at one place of
    :data:`NON_FINITE_PLACEMENTS`: class 3 of the ignored row 0, every class
    of row 0, class 4 of the scored row 1 (not its target), or class 2, row
    1's target.  Then ``loss.backward()`` runs.

    Args:
        dtype: ``torch.float32`` or ``torch.float64``.

    Returns:
        A ``pandas.DataFrame`` with one row per bad value and placement, and
        the columns ``logit`` (``"+inf"``, ``"-inf"``, ``"nan"``),
        ``placed in``, ``loss`` and ``gradient`` (each ``"finite"``,
        ``"inf"`` or ``"nan"``: the worst entry) and ``row 0 gradient``
        (``"exactly 0"`` or ``"nan"``; the ignored row's).
    """
    require_one_of(dtype, (torch.float32, torch.float64), "dtype")
    import pandas as pd

    generator = torch.Generator().manual_seed(0)
    clean = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    targets = torch.tensor([IGNORE_INDEX, 2, 1, 3])
    places = {
        NON_FINITE_PLACEMENTS[0]: (0, 3),
        NON_FINITE_PLACEMENTS[1]: (0, slice(None)),
        NON_FINITE_PLACEMENTS[2]: (1, 4),
        NON_FINITE_PLACEMENTS[3]: (1, 2),
    }
    rows = []
    for name, value in (("+inf", float("inf")), ("-inf", float("-inf")),
                        ("nan", float("nan"))):
        for placement, index in places.items():
            logits = clean.to(dtype).clone()
            logits[index] = value
            logits.requires_grad_(True)
            loss = torch.nn.functional.cross_entropy(logits, targets)
            loss.backward()
            row_0 = logits.grad[0]
            rows.append({
                "logit": name,
                "placed in": placement,
                "loss": _finiteness(loss.detach()),
                "gradient": _finiteness(logits.grad),
                "row 0 gradient": (
                    "exactly 0" if bool((row_0 == 0).all())
                    else _finiteness(row_0)
                ),
            })
    return pd.DataFrame(rows)


def dispatched_aten_ops(
    run: Callable[[], Any],
) -> list[tuple[str, tuple[int, ...]]]:
    """The ATen operators that ``run()`` dispatches to, in order.

    Recorded with ``torch.utils._python_dispatch.TorchDispatchMode``, which
    sees every call that reaches PyTorch's operator dispatcher below
    autograd (forward and backward kernels alike).  ``aten.detach``, which
    autograd calls to save tensors for the backward pass, is left out.

    Args:
        run: a callable with no arguments, e.g.
            ``lambda: F.cross_entropy(x, y).backward()``.

    Returns:
        A list of ``(name, shape)``: the operator's name without the
        ``aten.`` prefix and the overload (``"_log_softmax"``), and the
        shape of its (first) tensor output, ``()`` for a scalar or none.
    """
    if not callable(run):
        raise TypeError(
            f"run must be a callable with no arguments; got "
            f"{type(run).__name__}"
        )
    from torch.utils._python_dispatch import TorchDispatchMode

    calls: list[tuple[str, tuple[int, ...]]] = []

    class _Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name != "detach":
                first = out[0] if isinstance(out, (tuple, list)) else out
                shape = (tuple(first.shape)
                         if isinstance(first, torch.Tensor) else ())
                calls.append((name, shape))
            return out

    with _Recorder():
        run()
    return calls


def keras_fit_class_weight(
    batch_size: int,
    seq_len: int,
    *,
    framework: str = "keras",
    num_classes: int = 10,
) -> dict[str, float]:
    """Run a real ``Model.fit(class_weight=...)`` on ``(B, T)`` token labels
    and compare the loss it reports with hand computations.

    The model is ``Embedding(C, 4)`` then ``Dense(C)`` (logits) over
    ``(B, T)`` token inputs, compiled with
    ``SparseCategoricalCrossentropy(from_logits=True)`` and SGD at learning
    rate 0, so the logits do not change; one epoch of one batch of ``B``
    sequences with labels drawn with ``numpy.random.default_rng(0)``, and
    the class weights ``w_c = c + 1``.  Keras turns ``class_weight`` into
    sample weights with the class of ``argmax`` over the last axis, so each
    sequence ``b`` gets the weight ``s_b = w[argmax_t y[b, t]]``.

    Args:
        batch_size: ``B``, an ``int`` >= 1.
        seq_len: ``T``, an ``int`` >= 1.
        framework: ``"keras"`` (Keras 3, on its configured backend) or
            ``"tf_keras"`` (Keras 2).
        num_classes: ``C``, an ``int`` >= 2.

    Returns:
        A dict of floats: ``reported`` (the epoch loss in the history),
        ``unweighted`` (the mean of the ``B*T`` token losses
        ``l[b, t]``), ``per_sequence`` (the mean of ``s_b * l[b, t]``),
        ``along_time`` (the mean of ``s_t * l[b, t]``: sequence ``t``'s
        weight applied to token ``t`` of every sequence, defined when
        ``B == T``, else nan) and ``per_token`` (the mean of
        ``w[y[b, t]] * l[b, t]``).

    Raises:
        Whatever ``fit`` raises: with ``B != T``, Keras 3 on the TensorFlow
        backend raises ``ValueError`` ("Dimensions must be equal") because
        the ``(B,)`` weights do not broadcast against the ``(B, T)`` losses
        along the last axis; tf-keras does not raise.
    """
    batch_size = require_int(batch_size, "batch_size")
    seq_len = require_int(seq_len, "seq_len")
    num_classes = require_int(num_classes, "num_classes")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(
            f"batch_size and seq_len must be >= 1; got {batch_size}, "
            f"{seq_len}"
        )
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2; got {num_classes}")
    require_one_of(framework, ("keras", "tf_keras"), "framework")
    if framework == "keras":
        import keras
    else:
        import tf_keras as keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((seq_len,)),
        keras.layers.Embedding(num_classes, 4),
        keras.layers.Dense(num_classes),
    ])
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, num_classes, (batch_size, seq_len))
    labels = rng.integers(0, num_classes, (batch_size, seq_len))
    class_weight = {c: float(c + 1) for c in range(num_classes)}
    history = model.fit(inputs, labels, class_weight=class_weight,
                        batch_size=batch_size, epochs=1, verbose=0,
                        shuffle=False)
    logp = reference.log_softmax(np.asarray(model(inputs)))
    token_loss = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    weight = np.arange(1.0, num_classes + 1.0)
    per_sequence = weight[labels.argmax(axis=-1)]
    along_time = (float(np.mean(token_loss * per_sequence[None, :]))
                  if batch_size == seq_len else float("nan"))
    return {
        "reported": float(history.history["loss"][0]),
        "unweighted": float(token_loss.mean()),
        "per_sequence": float(np.mean(token_loss * per_sequence[:, None])),
        "along_time": along_time,
        "per_token": float(np.mean(token_loss * weight[labels])),
    }
