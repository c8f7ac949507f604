"""Tests of companion.cross_entropy and companion.plots.cross_entropy.

Every implementation is checked against the float64 NumPy reference over
random shapes, magnitudes, ignore patterns, weights and dtypes; every
library behaviour the chapter states is pinned, so an upgrade that changes
it fails here.
"""

from __future__ import annotations

import math
import pathlib

import keras
import matplotlib
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from companion import IGNORE_INDEX, reference
from companion import cross_entropy as ce
from companion.plots import cross_entropy as ce_plots

matplotlib.use("Agg")

DTYPES = {"float32": (torch.float32, np.float32), "float64": (torch.float64, np.float64)}
# Absolute error allowed per unit of logit magnitude: log-softmax subtracts the
# row maximum, so its rounding error grows with |x|, not with the loss.
EPS = {"float32": 2e-6, "float64": 1e-13}


@st.composite
def cross_entropy_cases(draw, *, with_weight: bool = True, max_scale: float = 1e4):
    """``(logits, targets, weight, ignore_index, dtype_name)`` as NumPy arrays."""
    num_rows = draw(st.integers(1, 9))
    num_classes = draw(st.integers(1, 7))
    dtype_name = draw(st.sampled_from(sorted(DTYPES)))
    scale = draw(st.sampled_from([s for s in (0.1, 1.0, 30.0, 1e3, 1e4) if s <= max_scale]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((num_rows, num_classes))).astype(DTYPES[dtype_name][1])
    ignore_index = draw(st.sampled_from([IGNORE_INDEX, -1, 0]))
    ignore_rate = draw(st.sampled_from([0.0, 0.3, 1.0]))
    targets = rng.integers(0, num_classes, num_rows)
    targets[rng.random(num_rows) < ignore_rate] = ignore_index
    weight = None
    if with_weight and draw(st.booleans()):
        weight = rng.uniform(0.1, 3.0, num_classes).astype(DTYPES[dtype_name][1])
    return logits, targets, weight, ignore_index, dtype_name


def tolerance(logits: np.ndarray, dtype_name: str) -> float:
    return EPS[dtype_name] * (1.0 + float(np.abs(logits).max())) * logits.shape[1]


def as_torch(logits, targets, weight=None):
    w = None if weight is None else torch.from_numpy(weight)
    return torch.from_numpy(logits), torch.from_numpy(targets), w


def assert_close(actual, expected, atol):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol, equal_nan=True)


# ---------------------------------------------------------------------------
# From scratch against the reference
# ---------------------------------------------------------------------------


@given(cross_entropy_cases(with_weight=False))
def test_log_softmax_matches_reference(case):
    logits, _, _, _, dtype_name = case
    ours = ce.log_softmax(torch.from_numpy(logits))
    assert ours.dtype == DTYPES[dtype_name][0]
    assert torch.isfinite(ours).all()
    assert_close(ours, reference.log_softmax(logits), tolerance(logits, dtype_name))


@given(cross_entropy_cases(), st.sampled_from(ce.REDUCTIONS))
def test_cross_entropy_matches_reference(case, reduction):
    logits, targets, weight, ignore_index, dtype_name = case
    x, y, w = as_torch(logits, targets, weight)
    ours = ce.cross_entropy(x, y, weight=w, ignore_index=ignore_index, reduction=reduction)
    expected = reference.cross_entropy(
        logits, targets, weight=weight, ignore_index=ignore_index, reduction=reduction
    )
    assert ours.dtype == x.dtype
    assert_close(ours, expected, tolerance(logits, dtype_name))


@given(cross_entropy_cases(), st.sampled_from(ce.REDUCTIONS))
def test_nll_loss_matches_torch(case, reduction):
    logits, targets, weight, ignore_index, _ = case
    x, y, w = as_torch(logits, targets, weight)
    log_probs = torch.log_softmax(x, dim=1)
    ours = ce.nll_loss(log_probs, y, weight=w, ignore_index=ignore_index, reduction=reduction)
    theirs = F.nll_loss(log_probs, y, weight=w, ignore_index=ignore_index, reduction=reduction)
    # Same arithmetic on the same log-probabilities: only the summation order may differ.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6, equal_nan=True)


@given(
    cross_entropy_cases(),
    st.sampled_from(ce.REDUCTIONS),
    st.sampled_from([0.0, 0.1, 0.5, 1.0]),
)
def test_label_smoothing_matches_reference_and_torch(case, reduction, label_smoothing):
    logits, targets, weight, ignore_index, dtype_name = case
    x, y, w = as_torch(logits, targets, weight)
    options = dict(weight=w, ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=label_smoothing)
    ours = ce.cross_entropy(x, y, **options)
    theirs = F.cross_entropy(x, y, **options)
    expected = ce.reference_label_smoothed_cross_entropy(
        logits, targets, weight=weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing,
    )
    atol = tolerance(logits, dtype_name)
    assert_close(ours, expected, atol)
    assert_close(theirs, expected, atol)


@given(cross_entropy_cases(), st.sampled_from(ce.REDUCTIONS))
def test_label_smoothing_reference_at_zero_is_the_reference(case, reduction):
    logits, targets, weight, ignore_index, _ = case
    kwargs = dict(weight=weight, ignore_index=ignore_index, reduction=reduction)
    smoothed = ce.reference_label_smoothed_cross_entropy(logits, targets, label_smoothing=0.0,
                                                         **kwargs)
    assert_close(smoothed, reference.cross_entropy(logits, targets, **kwargs), 1e-12)


def test_label_smoothing_changes_the_loss():
    # A wrong smoothing formula that ignored eps would pass the eps=0 checks.
    logits = np.array([[2.0, 0.0, -1.0]])
    targets = np.array([0])
    plain = reference.cross_entropy(logits, targets)
    smoothed = ce.reference_label_smoothed_cross_entropy(logits, targets, label_smoothing=0.3)
    logp = reference.log_softmax(logits)[0]
    assert smoothed == pytest.approx(0.7 * -logp[0] + 0.1 * -logp.sum(), abs=1e-12)
    assert smoothed > plain


def test_naive_cross_entropy_agrees_for_moderate_logits():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(6, 4)))
    targets = torch.tensor([0, 1, 2, 3, IGNORE_INDEX, 1])
    torch.testing.assert_close(ce.naive_cross_entropy(logits, targets),
                               ce.cross_entropy(logits, targets), rtol=0, atol=1e-12)


def test_naive_log_softmax_breaks_where_float32_exp_does():
    # exp overflows float32 just above log(max float32) = 88.72...
    limit = math.log(torch.finfo(torch.float32).max)
    assert 88.72 < limit < 88.73
    below = torch.tensor([[limit - 0.01, 0.0]])
    above = torch.tensor([[limit + 0.01, 0.0]])
    assert torch.isfinite(ce.naive_log_softmax(below)).all()
    assert torch.isnan(ce.naive_log_softmax(above)[0, 0])
    # A probability below the smallest subnormal rounds to 0: log gives -inf.
    spread = torch.tensor([[60.0, -60.0]])
    assert ce.naive_log_softmax(spread)[0, 1] == -math.inf
    stable = ce.log_softmax(spread)
    assert stable[0, 1].item() == pytest.approx(-120.0, abs=1e-5)
    assert ce.naive_cross_entropy(spread, torch.tensor([1])).item() == math.inf
    assert ce.cross_entropy(spread, torch.tensor([1])).item() == pytest.approx(120.0, abs=1e-5)
    assert torch.isfinite(ce.log_softmax(above)).all()


# ---------------------------------------------------------------------------
# PyTorch behaviour the chapter states
# ---------------------------------------------------------------------------


@given(cross_entropy_cases(), st.sampled_from(ce.REDUCTIONS))
def test_torch_cross_entropy_is_nll_of_log_softmax_bit_for_bit(case, reduction):
    logits, targets, weight, ignore_index, _ = case
    x, y, w = as_torch(logits, targets, weight)
    fused = torch.nn.CrossEntropyLoss(weight=w, ignore_index=ignore_index, reduction=reduction)(x, y)
    composed = torch.nn.NLLLoss(weight=w, ignore_index=ignore_index, reduction=reduction)(
        torch.nn.LogSoftmax(dim=1)(x), y
    )
    assert torch.equal(fused, composed) or (fused.isnan().all() and composed.isnan().all())


@given(cross_entropy_cases(), st.sampled_from(ce.REDUCTIONS))
def test_torch_cross_entropy_matches_reference(case, reduction):
    logits, targets, weight, ignore_index, dtype_name = case
    x, y, w = as_torch(logits, targets, weight)
    theirs = F.cross_entropy(x, y, weight=w, ignore_index=ignore_index, reduction=reduction)
    expected = reference.cross_entropy(logits, targets, weight=weight, ignore_index=ignore_index,
                                       reduction=reduction)
    assert_close(theirs, expected, tolerance(logits, dtype_name))


def test_torch_weighted_mean_divides_by_the_sum_of_target_weights():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
    targets = torch.tensor([0, 2, IGNORE_INDEX])
    weight = torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    per_row = F.cross_entropy(logits, targets, weight=weight, reduction="none")
    mean = F.cross_entropy(logits, targets, weight=weight)
    assert mean.item() == pytest.approx(per_row.sum().item() / 3.5, abs=1e-15)
    assert mean.item() != pytest.approx(per_row.sum().item() / 2, abs=1e-3)


def test_torch_all_ignored_gives_nan_mean_zero_sum_and_zero_gradient():
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = torch.full((4,), IGNORE_INDEX)
    mean = F.cross_entropy(logits, targets)
    assert torch.isnan(mean)
    assert F.cross_entropy(logits, targets, reduction="sum").item() == 0.0
    mean.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 3))
    assert torch.isnan(ce.cross_entropy(logits.detach(), targets))
    assert ce.cross_entropy(logits.detach(), targets, reduction="sum").item() == 0.0
    assert torch.equal(ce.cross_entropy_grad(logits.detach(), targets), torch.zeros(4, 3))


@settings(max_examples=30)
@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_torch_class_second_layout_equals_the_flattened_one(batch, num_classes, time, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, time, generator=gen)
    targets = torch.randint(0, num_classes, (batch, time), generator=gen)
    targets[torch.rand(batch, time, generator=gen) < 0.3] = IGNORE_INDEX
    flat_logits, flat_targets = ce.flatten_class_axis(logits, targets)
    assert flat_logits.shape == (batch * time, num_classes)
    for reduction in ("sum", "mean"):
        torch.testing.assert_close(
            F.cross_entropy(logits, targets, reduction=reduction),
            F.cross_entropy(flat_logits, flat_targets, reduction=reduction),
            rtol=1e-6, atol=1e-6, equal_nan=True,
        )
    per_position = F.cross_entropy(logits, targets, reduction="none")
    assert per_position.shape == (batch, time)
    # Equal up to float32 rounding, not bit for bit: log-softmax over a
    # strided class axis may sum in a different order.
    torch.testing.assert_close(per_position.reshape(-1),
                               F.cross_entropy(flat_logits, flat_targets, reduction="none"),
                               rtol=1e-6, atol=1e-6)


def test_torch_reads_btv_logits_as_t_classes():
    # (B, T, V) logits passed straight in: dimension 1 (T) is taken as the classes.
    logits = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    wrong = F.cross_entropy(logits, targets)
    right = F.cross_entropy(logits.reshape(-1, 4), targets.reshape(-1))
    assert abs(wrong.item() - right.item()) > 1e-3
    with pytest.raises(RuntimeError):
        F.cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))


def test_torch_rejects_out_of_range_targets():
    with pytest.raises(IndexError, match="out of bounds"):
        F.cross_entropy(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_torch_ignored_rows_take_any_finite_logits():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    targets = torch.tensor([IGNORE_INDEX, 1, 2, IGNORE_INDEX])
    reference_loss = F.cross_entropy(logits, targets)
    scrambled = logits.clone()
    scrambled[[0, 3]] = 1e4 * torch.randn(2, 5, dtype=torch.float64,
                                          generator=gen)
    scrambled.requires_grad_(True)
    loss = F.cross_entropy(scrambled, targets)
    loss.backward()
    assert torch.equal(loss, reference_loss)
    assert (scrambled.grad[[0, 3]] == 0).all()


@pytest.mark.parametrize("bad_value", [math.inf, math.nan])
def test_torch_non_finite_logit_in_ignored_row_gives_nan_gradient(
    bad_value,
):
    # The loss stays finite, but the log-softmax backward turns the ignored
    # row's gradient into nan, and it reaches any parameter of the row.
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 4, dtype=torch.float64, generator=gen)
    targets = torch.tensor([IGNORE_INDEX, 1, 2])
    clean = F.cross_entropy(logits, targets)
    poisoned = logits.clone()
    poisoned[0, 2] = bad_value
    bias = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    with_bias = poisoned + bias
    with_bias.retain_grad()
    loss = F.cross_entropy(with_bias, targets)
    loss.backward()
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(clean.item(), abs=1e-12)
    assert with_bias.grad[0].isnan().all()
    assert torch.isfinite(with_bias.grad[1:]).all()
    assert bias.grad.isnan().all()


# ---------------------------------------------------------------------------
# Gradient
# ---------------------------------------------------------------------------


@given(cross_entropy_cases(max_scale=30.0), st.sampled_from(["mean", "sum"]),
       st.sampled_from([0.0, 0.2]))
def test_gradient_matches_torch_autograd(case, reduction, label_smoothing):
    logits, targets, weight, ignore_index, dtype_name = case
    x, y, w = as_torch(logits, targets, weight)
    x.requires_grad_(True)
    F.cross_entropy(x, y, weight=w, ignore_index=ignore_index, reduction=reduction,
                    label_smoothing=label_smoothing).backward()
    ours = ce.cross_entropy_grad(x, y, weight=w, ignore_index=ignore_index, reduction=reduction,
                                 label_smoothing=label_smoothing)
    atol = 1e-5 if dtype_name == "float32" else 1e-12
    torch.testing.assert_close(ours, x.grad, rtol=1e-4, atol=atol)
    ignored = y == ignore_index
    assert torch.equal(ours[ignored], torch.zeros_like(ours[ignored]))
    assert torch.equal(x.grad[ignored], torch.zeros_like(x.grad[ignored]))


@settings(max_examples=20)
@given(cross_entropy_cases(max_scale=1.0), st.sampled_from([0.0, 0.3]))
def test_gradient_matches_finite_differences_of_reference(case, label_smoothing):
    logits, targets, weight, ignore_index, _ = case
    logits = logits.astype(np.float64)
    weight = None if weight is None else weight.astype(np.float64)
    if (targets == ignore_index).all():
        return
    step = 1e-6
    numeric = np.zeros_like(logits)
    for index in np.ndindex(*logits.shape):
        up, down = logits.copy(), logits.copy()
        up[index] += step
        down[index] -= step
        loss = [ce.reference_label_smoothed_cross_entropy(
            z, targets, weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
            for z in (up, down)]
        numeric[index] = (loss[0] - loss[1]) / (2 * step)
    x, y, w = as_torch(logits, targets, weight)
    analytic = ce.cross_entropy_grad(x, y, weight=w, ignore_index=ignore_index,
                                     label_smoothing=label_smoothing)
    assert_close(analytic, numeric, 1e-7)


def test_gradient_rows_sum_to_zero_and_target_entry_is_negative():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    targets = torch.tensor([1, 2])
    grad = ce.cross_entropy_grad(logits, targets)
    probs = torch.softmax(logits, dim=1)
    expected = (probs - F.one_hot(targets, 3)) / 2
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(grad.sum(dim=1), torch.zeros(2, dtype=torch.float64),
                               rtol=0, atol=1e-15)
    assert grad[0, 1] < 0 and grad[1, 2] < 0


@settings(max_examples=25)
@given(cross_entropy_cases(with_weight=False, max_scale=30.0))
def test_gradient_matches_tf_gradient_tape(case):
    logits, targets, _, ignore_index, dtype_name = case
    if (targets == ignore_index).all():
        return
    variable = tf.Variable(logits)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=ignore_index, dtype=dtype_name)
    with tf.GradientTape() as tape:
        loss = loss_fn(targets, variable)
    tf_grad = tape.gradient(loss, variable).numpy()
    ours = ce.cross_entropy_grad(torch.from_numpy(logits), torch.from_numpy(targets),
                                 ignore_index=ignore_index).numpy()
    atol = 1e-5 if dtype_name == "float32" else 1e-12
    np.testing.assert_allclose(tf_grad, ours, rtol=1e-4, atol=atol)
    assert (tf_grad[targets == ignore_index] == 0).all()


def test_gradient_rejects_reduction_none():
    with pytest.raises(ValueError, match="reduction"):
        ce.cross_entropy_grad(torch.zeros(2, 3), torch.tensor([0, 1]), reduction="none")


# ---------------------------------------------------------------------------
# TensorFlow and Keras
# ---------------------------------------------------------------------------


@settings(max_examples=25)
@given(cross_entropy_cases(with_weight=False))
def test_every_implementation_matches_the_reference_on_ordinary_logits(case):
    logits, targets, _, ignore_index, dtype_name = case
    if (targets == ignore_index).all():
        return
    table = ce.compare_implementations(logits, targets, ignore_index=ignore_index)
    atol = tolerance(logits, dtype_name)
    scale = float(np.abs(logits).max())
    exact = [n for n in ce.IMPLEMENTATIONS if n not in ("keras SCCE from_logits=False",
                                                          "naive log(softmax)")]
    for name in exact:
        assert table.loc[name, "max |row - ref|"] <= atol, name
        assert table.loc[name, "|mean - ref|"] <= atol, name
    assert table.loc["reference (NumPy float64)", "|mean - ref|"] == 0.0
    if scale < 5:
        # Every probability stays inside Keras' clipping range [1e-7, 1 - 1e-7]
        # when logits are this small and C <= 7.
        assert table.loc["keras SCCE from_logits=False", "max |row - ref|"] <= 1e-5


def test_compare_implementations_table_layout():
    logits = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    targets = np.array([2, IGNORE_INDEX])
    table = ce.compare_implementations(logits, targets)
    assert list(table.index) == ["reference (NumPy float64)", *ce.IMPLEMENTATIONS]
    assert list(table.columns) == ["dtype", "mean loss", "|mean - ref|", "max |row - ref|"]
    expected = -reference.log_softmax(logits)[0, 2]
    assert table.loc["reference (NumPy float64)", "mean loss"] == pytest.approx(expected, abs=1e-12)
    assert (table["dtype"].iloc[1:] == "float32").all()


def test_naive_row_shows_nan_for_huge_logits():
    logits = np.array([[100.0, 0.0, -1.0]], dtype=np.float32)
    table = ce.compare_implementations(logits, np.array([0]))
    assert math.isnan(table.loc["naive log(softmax)", "max |row - ref|"])
    assert table.loc["torch CrossEntropyLoss", "max |row - ref|"] < 1e-4


def test_tf_sparse_softmax_rejects_ignore_label():
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside the valid range"):
        tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=np.array([0, IGNORE_INDEX]), logits=np.zeros((2, 3), np.float32))


def test_keras_epsilon_and_clipping_cap():
    assert keras.config.epsilon() == 1e-7
    logits = np.array([[0.0, 40.0, 0.0]], dtype=np.float32)
    targets = np.array([0])
    true_loss = float(reference.cross_entropy(logits, targets))
    assert true_loss == pytest.approx(40.0, abs=1e-5)
    probs_loss = ce.run_implementation("keras SCCE from_logits=False", logits, targets).mean
    # Clipped p_y = 1e-7, then re-normalised by the clipped sum ~ 1.
    assert probs_loss == pytest.approx(-math.log(1e-7), abs=1e-4)
    logits_loss = ce.run_implementation("keras SCCE from_logits=True", logits, targets).mean
    assert logits_loss == pytest.approx(true_loss, abs=1e-5)


def test_keras_clipping_stops_the_gradient():
    variable = tf.Variable(np.array([[0.0, 40.0, 0.0]], dtype=np.float32))
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    with tf.GradientTape() as tape:
        loss = loss_fn(np.array([0]), tf.nn.softmax(variable))
    assert np.array_equal(tape.gradient(loss, variable).numpy(), np.zeros((1, 3), np.float32))


def test_keras_recovers_logits_from_keras_softmax():
    logits = np.array([[0.0, 40.0, 0.0]], dtype=np.float32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    via_keras = float(loss_fn(np.array([0]), keras.ops.softmax(logits)))
    via_tf = float(loss_fn(np.array([0]), tf.nn.softmax(logits)))
    assert via_keras == pytest.approx(40.0, abs=1e-5)
    assert via_tf == pytest.approx(-math.log(1e-7), abs=1e-4)


def test_keras_recovers_logits_from_a_softmax_op_in_graph_mode():
    logits = np.array([[0.0, 40.0, 0.0]], dtype=np.float32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=False)

    @tf.function
    def in_graph(z):
        return loss_fn(np.array([0]), tf.nn.softmax(z))

    assert float(in_graph(logits)) == pytest.approx(40.0, abs=1e-5)


@pytest.mark.parametrize("method", ["fit", "evaluate"])
@pytest.mark.parametrize(("run_eagerly", "expected"),
                         [(False, 40.0), (True, -math.log(1e-7))])
def test_keras_training_loop_recovers_logits_unless_run_eagerly(
    method, run_eagerly, expected,
):
    bias = np.array([0.0, 40.0, 0.0, 0.0, 0.0], dtype=np.float32)
    inputs = keras.Input((1,))
    dense = keras.layers.Dense(5)
    outputs = keras.layers.Lambda(tf.nn.softmax)(dense(inputs))
    model = keras.Model(inputs, outputs)
    dense.set_weights([np.zeros((1, 5), np.float32), bias])
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(),
                  run_eagerly=run_eagerly)
    x, y = np.ones((1, 1), np.float32), np.array([0])
    if method == "fit":  # one batch: the loss is taken before the update
        loss = model.fit(x, y, epochs=1, verbose=0).history["loss"][0]
    else:
        loss = model.evaluate(x, y, verbose=0)
    assert float(loss) == pytest.approx(expected, abs=1e-4)


def test_only_the_tensorflow_backend_recovers_logits():
    backends = pathlib.Path(keras.__file__).parent / "src" / "backend"
    assert "_get_logits" in (backends / "tensorflow" / "nn.py").read_text()
    for backend in ("jax", "torch"):
        source = (backends / backend / "nn.py").read_text()
        assert "_get_logits" not in source and "_keras_logits" not in source
        assert "clip(" in source


def test_keras_clipping_shrinks_the_target_gradient_to_about_p_y():
    # Only the target (and two small entries) are clipped: the gradient on
    # the target logit is about -p_y instead of p_y - 1 = -1.
    row = np.array([[0.0, 20.0, 20.0, 0.0, 0.0]], dtype=np.float32)
    variable = tf.Variable(row)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    with tf.GradientTape() as tape:
        loss = loss_fn(np.array([0]), tf.nn.softmax(variable))
    grad = tape.gradient(loss, variable).numpy()[0]
    p_y = float(torch.softmax(torch.from_numpy(row[0]), dim=0)[0])
    assert p_y < keras.config.epsilon()
    assert grad[0] < 0 and grad[0] == pytest.approx(-p_y, rel=1e-2)


def test_keras_class_weight_is_one_weight_per_example():
    # fit(class_weight=...) becomes sample weights; (B, T) labels are
    # reduced by argmax over T, giving one weight per sequence.
    from keras.src.trainers.data_adapters import data_adapter_utils

    labels = np.array([[5, 8, 9, 1], [6, 4, 0, 7]])
    weight = {c: float(c) for c in range(10)}
    per_sequence = data_adapter_utils.class_weight_to_sample_weights(
        labels, weight)
    assert per_sequence.tolist() == [2.0, 3.0]
    per_row = data_adapter_utils.class_weight_to_sample_weights(
        labels.reshape(-1), weight)
    assert per_row.tolist() == labels.reshape(-1).astype(float).tolist()


def test_tf_documents_cpu_error_and_gpu_nan_for_bad_labels():
    doc = " ".join(
        tf.nn.sparse_softmax_cross_entropy_with_logits.__doc__.split())
    assert ("Other values will raise an exception when this op is run on "
            "CPU, and return `NaN` for corresponding loss and gradient rows "
            "on GPU.") in doc


def test_keras_all_ignored_gives_zero_not_nan():
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=IGNORE_INDEX)
    loss = float(loss_fn(np.full(3, IGNORE_INDEX), np.zeros((3, 4), np.float32)))
    assert loss == 0.0


def test_keras_sample_weight_reductions():
    # Default reduction divides by N; mean_with_sample_weight by the sum of weights,
    # which with sample_weight = w[y] is PyTorch's weighted mean.
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, 4))
    targets = np.array([0, 3, 1, 1, 2])
    weight = np.array([2.0, 0.5, 1.0, 3.0])
    sample_weight = weight[targets]
    torch_mean = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(targets),
                                 weight=torch.from_numpy(weight)).item()
    by_weight = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight", dtype="float64")
    by_count = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    assert float(by_weight(targets, logits, sample_weight=sample_weight)) == pytest.approx(
        torch_mean, abs=1e-12)
    assert float(by_count(targets, logits, sample_weight=sample_weight)) == pytest.approx(
        torch_mean * sample_weight.sum() / 5, abs=1e-12)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


GOOD_LOGITS = torch.zeros(3, 4)
GOOD_TARGETS = torch.tensor([0, 1, IGNORE_INDEX])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(logits=[[0.0]]), TypeError, "logits must be a torch.Tensor"),
        (dict(logits=torch.zeros(3, 4, dtype=torch.long)), TypeError, "logits must have a floating"),
        (dict(logits=torch.zeros(3)), ValueError, r"logits must be a 2-D tensor \(N, C\)"),
        (dict(targets=torch.tensor([0.0, 1.0, 2.0])), TypeError, "targets must hold integer"),
        (dict(targets=torch.tensor([0, 1])), ValueError, r"targets must have shape \(N,\)"),
        (dict(targets=torch.tensor([[0, 1, 2]])), ValueError, r"targets must be a 1-D tensor"),
        (dict(targets=torch.tensor([0, 4, 1])), ValueError, r"targets must lie in \[0, 4\).*found 4"),
        (dict(targets=torch.tensor([0, -1, 1])), ValueError, "found -1"),
        (dict(weight=torch.ones(3)), ValueError, r"weight must have shape \(C,\) = \(4,\)"),
        (dict(weight=torch.ones(4, dtype=torch.float64)), TypeError, "weight must have the dtype"),
        (dict(weight=[1.0, 1.0, 1.0, 1.0]), TypeError, "weight must be a torch.Tensor"),
        (dict(reduction="average"), ValueError, "reduction must be one of"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing must lie in \[0, 1\]"),
        (dict(label_smoothing="0.1"), TypeError, "label_smoothing must be a float"),
        (dict(ignore_index=-100.0), TypeError, "ignore_index must be an int"),
    ],
)
def test_cross_entropy_rejects_bad_input(kwargs, error, match):
    arguments = dict(logits=GOOD_LOGITS, targets=GOOD_TARGETS) | kwargs
    logits, targets = arguments.pop("logits"), arguments.pop("targets")
    with pytest.raises(error, match=match):
        ce.cross_entropy(logits, targets, **arguments)


def test_other_functions_reject_bad_input():
    with pytest.raises(ValueError, match=r"log_probs must be a 2-D tensor"):
        ce.nll_loss(torch.zeros(4), GOOD_TARGETS)
    with pytest.raises(ValueError, match="targets must lie in"):
        ce.naive_cross_entropy(GOOD_LOGITS, torch.tensor([0, 1, 9]))
    with pytest.raises(TypeError, match="logits must have a floating"):
        ce.log_softmax(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="class axis"):
        ce.naive_log_softmax(torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"targets must have shape \(B, T\)"):
        ce.flatten_class_axis(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"logits must have shape \(N, C\)|targets must have"):
        ce.reference_label_smoothed_cross_entropy(np.zeros((2, 3)), np.zeros(3, dtype=int))


@pytest.mark.parametrize(
    ("logits", "targets", "error", "match"),
    [
        (torch.zeros(2, 3), np.array([0, 1]), TypeError, "logits must be a numpy.ndarray"),
        (np.zeros((2, 3), np.float16), np.array([0, 1]), TypeError, "float32 or float64"),
        (np.zeros((2, 3), np.float32), np.array([0.0, 1.0]), TypeError, "targets must hold integer"),
        (np.zeros((2, 3), np.float32), np.array([0, 1, 2]), ValueError, r"targets must have shape"),
        (np.zeros((2, 3), np.float32), np.array([0, 3]), ValueError, "targets must lie in"),
    ],
)
def test_compare_implementations_rejects_bad_input(logits, targets, error, match):
    with pytest.raises(error, match=match):
        ce.compare_implementations(logits, targets)


def test_framework_wrappers_validate_before_running():
    with pytest.raises(TypeError, match="from_logits must be a bool"):
        ce.keras_sparse_categorical_crossentropy(np.zeros((1, 2), np.float32), np.array([0]),
                                                 from_logits=1)
    with pytest.raises(ValueError, match="targets must lie in"):
        ce.tf_sparse_softmax_cross_entropy(np.zeros((1, 2), np.float32), np.array([5]))


def test_tf_wrapper_all_ignored_gives_nan_mean():
    per_row, mean = ce.tf_sparse_softmax_cross_entropy(
        np.zeros((2, 3), np.float32), np.array([IGNORE_INDEX, IGNORE_INDEX]))
    assert np.array_equal(per_row.numpy(), np.zeros(2, np.float32))
    assert math.isnan(float(mean))


def test_format_comparison_keeps_rows_and_formats_columns():
    logits = np.array([[0.0, 40.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    table = ce.compare_implementations(logits, np.array([0, 1]))
    shown = ce.format_comparison(table)
    assert list(shown.index) == list(table.index)
    assert shown.loc["keras SCCE from_logits=False", "max |row - ref|"] == format(
        table.loc["keras SCCE from_logits=False", "max |row - ref|"], ".3g")
    # exactly 0 here, 1e-17 elsewhere: the same bound on every machine
    assert shown.loc["reference (NumPy float64)", "|mean - ref|"] == "< 1e-4"
    assert shown.loc["torch CrossEntropyLoss", "max |row - ref|"] == "< 1e-4"
    assert shown.loc["torch CrossEntropyLoss", "mean loss"] == format(
        table.loc["torch CrossEntropyLoss", "mean loss"], ".5g")


def test_run_implementation_rejects_unknown_name():
    with pytest.raises(ValueError, match="name must be one of"):
        ce.run_implementation("jax", np.zeros((1, 2), np.float32), np.array([0]))


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def test_plot_naive_versus_stable():
    scales = np.linspace(0.0, 100.0, 401)
    data = ce.naive_versus_stable_by_scale(scales)
    assert set(data) == {"scale", "naive", "stable"}
    fig = ce_plots.plot_naive_versus_stable(data["scale"], data["naive"], data["stable"])
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel() and "nats" in ax.get_ylabel()
    assert np.isinf(data["naive"]).any() and np.isnan(data["naive"]).any()
    assert np.isfinite(data["stable"]).all()
    exact = data["scale"] + np.log1p(np.exp(-data["scale"]) + np.exp(-2 * data["scale"]))
    np.testing.assert_allclose(data["stable"], exact, rtol=1e-6, atol=1e-6)
    naive_breaks = ~np.isfinite(data["naive"])
    # Row 1's probability exp(-2s) rounds to 0 below 2**-150, i.e. for s > 75 ln 2.
    assert 0 < data["scale"][naive_breaks].min() - 75 * math.log(2) <= 0.25
    assert data["scale"][np.isnan(data["naive"])].min() > 88.7
    assert data["scale"][np.isinf(data["naive"])].max() < 88.8
    stable_line = [line for line in ax.get_lines() if line.get_label().startswith("stable")][0]
    np.testing.assert_array_equal(stable_line.get_ydata(), data["stable"])


def test_plot_gradient_rows():
    grad = np.array([[0.1, -0.2, 0.1], [0.0, 0.0, 0.0]])
    fig = ce_plots.plot_gradient_rows(grad, np.array([1, IGNORE_INDEX]))
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel()
    np.testing.assert_array_equal(ax.images[0].get_array(), grad)
    assert "ignored" in ax.get_yticklabels()[1].get_text()
    with pytest.raises(ValueError, match="targets"):
        ce_plots.plot_gradient_rows(grad, np.array([1]))


def test_plot_clipped_probability_loss():
    margins = np.linspace(0.0, 40.0, 41)
    fig = ce_plots.plot_clipped_probability_loss(margins, margins, np.minimum(margins, 16.1),
                                                 epsilon=1e-7)
    ax = fig.axes[0]
    assert "nats" in ax.get_xlabel() and "nats" in ax.get_ylabel()
    cap = [line for line in ax.get_lines() if "ε" in line.get_label()]
    assert cap and cap[0].get_ydata()[0] == pytest.approx(-math.log(1e-7))


def test_plots_reject_mismatched_lengths():
    with pytest.raises(ValueError, match="one length"):
        ce_plots.plot_naive_versus_stable(np.arange(3.0), np.arange(2.0), np.arange(3.0))
    with pytest.raises(ValueError, match="one length"):
        ce_plots.plot_clipped_probability_loss(np.arange(3.0), np.arange(3.0), np.arange(2.0),
                                               epsilon=1e-7)
    with pytest.raises(ValueError, match="epsilon"):
        ce_plots.plot_clipped_probability_loss(np.arange(3.0), np.arange(3.0), np.arange(3.0),
                                               epsilon=0.0)


@pytest.mark.parametrize("name", ["naive", "gradient", "clipped"])
def test_plots_fit_the_text_width_with_readable_fonts(name):
    from matplotlib.text import Text

    from companion.plots import TEXT_WIDTH_IN

    if name == "naive":
        data = ce.naive_versus_stable_by_scale(np.linspace(0.0, 100.0, 21))
        fig = ce_plots.plot_naive_versus_stable(data["scale"], data["naive"],
                                                data["stable"])
    elif name == "gradient":
        fig = ce_plots.plot_gradient_rows(
            np.array([[0.1, -0.2, 0.1], [0.0, 0.0, 0.0]]),
            np.array([1, IGNORE_INDEX]))
    else:
        margins = np.linspace(0.0, 40.0, 41)
        fig = ce_plots.plot_clipped_probability_loss(
            margins, margins, np.minimum(margins, 16.1), epsilon=1e-7)
    assert fig.get_size_inches()[0] == pytest.approx(TEXT_WIDTH_IN)
    fig.canvas.draw()
    texts = [text for text in fig.findobj(Text)
             if text.get_text() and text.get_visible()]
    assert texts
    assert min(text.get_fontsize() for text in texts) >= 9
