"""Tests of companion.experiments.cross_entropy, and the TensorFlow and Keras
behaviour chapter 3 states.

The naive formula is checked where it holds and where it breaks; every
implementation is compared with the float64 reference; each TensorFlow and
Keras behaviour the chapter states is pinned, so an upgrade that changes it
fails here.
"""

from __future__ import annotations

import math
import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf
import torch
import torch.nn.functional as F
from hypothesis import given, settings

from companion import IGNORE_INDEX, reference
from companion import cross_entropy as ce
from companion.experiments import cross_entropy as ce_exp
from tests.shared import cross_entropy_cases, tolerance


def test_naive_cross_entropy_agrees_for_moderate_logits():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.normal(size=(6, 4)))
    targets = torch.tensor([0, 1, 2, 3, IGNORE_INDEX, 1])
    torch.testing.assert_close(ce_exp.naive_cross_entropy(logits, targets),
                               ce.cross_entropy(logits, targets), rtol=0, atol=1e-12)


def test_naive_log_softmax_breaks_where_float32_exp_does():
    # exp overflows float32 just above log(max float32) = 88.72...
    limit = math.log(torch.finfo(torch.float32).max)
    assert 88.72 < limit < 88.73
    below = torch.tensor([[limit - 0.01, 0.0]])
    above = torch.tensor([[limit + 0.01, 0.0]])
    assert torch.isfinite(ce_exp.naive_log_softmax(below)).all()
    assert torch.isnan(ce_exp.naive_log_softmax(above)[0, 0])
    # A probability below the smallest subnormal rounds to 0: log gives -inf.
    spread = torch.tensor([[60.0, -60.0]])
    assert ce_exp.naive_log_softmax(spread)[0, 1] == -math.inf
    stable = ce.log_softmax(spread)
    assert stable[0, 1].item() == pytest.approx(-120.0, abs=1e-5)
    assert ce_exp.naive_cross_entropy(spread, torch.tensor([1])).item() == math.inf
    assert ce.cross_entropy(spread, torch.tensor([1])).item() == pytest.approx(120.0, abs=1e-5)
    assert torch.isfinite(ce.log_softmax(above)).all()


# ---------------------------------------------------------------------------
# TensorFlow and Keras
# ---------------------------------------------------------------------------


@settings(max_examples=25)
@given(cross_entropy_cases(with_weight=False))
def test_every_implementation_matches_the_reference_on_ordinary_logits(case):
    logits, targets, _, ignore_index, dtype_name = case
    if (targets == ignore_index).all():
        return
    table = ce_exp.compare_implementations(logits, targets, ignore_index=ignore_index)
    atol = tolerance(logits, dtype_name)
    scale = float(np.abs(logits).max())
    exact = [n for n in ce_exp.IMPLEMENTATIONS if n not in ("keras SCCE from_logits=False",
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
    table = ce_exp.compare_implementations(logits, targets)
    assert list(table.index) == ["reference (NumPy float64)", *ce_exp.IMPLEMENTATIONS]
    assert list(table.columns) == ["dtype", "mean loss", "|mean - ref|", "max |row - ref|"]
    expected = -reference.log_softmax(logits)[0, 2]
    assert table.loc["reference (NumPy float64)", "mean loss"] == pytest.approx(expected, abs=1e-12)
    assert (table["dtype"].iloc[1:] == "float32").all()


def test_naive_row_shows_nan_for_huge_logits():
    logits = np.array([[100.0, 0.0, -1.0]], dtype=np.float32)
    table = ce_exp.compare_implementations(logits, np.array([0]))
    assert math.isnan(table.loc["naive log(softmax)", "max |row - ref|"])
    assert table.loc["torch CrossEntropyLoss", "max |row - ref|"] < 1e-4


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
    probs_loss = ce_exp.run_implementation("keras SCCE from_logits=False", logits, targets).mean
    # Clipped p_y = 1e-7, then re-normalised by the clipped sum ~ 1.
    assert probs_loss == pytest.approx(-math.log(1e-7), abs=1e-4)
    logits_loss = ce_exp.run_implementation("keras SCCE from_logits=True", logits, targets).mean
    assert logits_loss == pytest.approx(true_loss, abs=1e-5)


def test_keras_clipping_stops_the_gradient():
    loss, gradient = ce_exp.keras_probability_loss_and_gradient(
        np.array([[0.0, 40.0, 0.0]], dtype=np.float32), np.array([0]))
    assert loss == pytest.approx(-math.log(1e-7), abs=1e-4)
    assert gradient.dtype == np.float32
    assert np.array_equal(gradient, np.zeros((1, 3), np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_keras_probability_gradient_is_softmax_minus_one_hot_inside_the_clip_range(dtype):
    # Logits this small keep every probability inside [1e-7, 1 - 1e-7]: no
    # clipping, so the loss and gradient are the exact mean cross-entropy's.
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 4)).astype(dtype)
    targets = np.array([2, 0, 3])
    loss, gradient = ce_exp.keras_probability_loss_and_gradient(logits, targets)
    expected = ce.cross_entropy_grad(torch.from_numpy(logits.astype(np.float64)),
                                     torch.from_numpy(targets)).numpy()
    atol = 1e-6 if dtype == np.float32 else 1e-12
    assert gradient.shape == (3, 4) and gradient.dtype == dtype
    np.testing.assert_allclose(gradient, expected, rtol=0, atol=atol)
    assert loss == pytest.approx(float(reference.cross_entropy(logits, targets)), abs=10 * atol)


def test_keras_probability_gradient_leaves_clipped_rows_out_only():
    # Row 0 is clipped everywhere (no gradient); row 1 is not, and keeps the
    # exact gradient of the two-row mean.
    logits = np.array([[0.0, 40.0, 0.0], [0.5, -0.5, 1.0]], dtype=np.float32)
    targets = np.array([0, 1])
    _, gradient = ce_exp.keras_probability_loss_and_gradient(logits, targets)
    exact = ce.cross_entropy_grad(torch.from_numpy(logits), torch.from_numpy(targets)).numpy()
    assert np.array_equal(gradient[0], np.zeros(3, np.float32))
    np.testing.assert_allclose(gradient[1], exact[1], rtol=0, atol=1e-6)


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
    logits = np.array([0.0, 40.0, 0.0, 0.0, 0.0], dtype=np.float32)
    loss = ce_exp.tf_softmax_model_loss(logits, 0, method=method, run_eagerly=run_eagerly)
    assert isinstance(loss, float)
    assert loss == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("method", ["fit", "evaluate"])
@pytest.mark.parametrize("run_eagerly", [False, True])
def test_tf_softmax_model_loss_is_the_loss_of_its_target_before_any_update(method, run_eagerly):
    # Nothing is clipped at these logits: every mode reports the exact loss
    # of the given target (fit: of the batch before the SGD step).
    logits = np.array([0.3, -1.2, 2.0, 0.4], dtype=np.float32)
    for target in (1, 2):
        exact = float(reference.cross_entropy(logits[None, :], np.array([target])))
        loss = ce_exp.tf_softmax_model_loss(logits, target, method=method,
                                            run_eagerly=run_eagerly)
        assert loss == pytest.approx(exact, abs=1e-5)


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
    _, gradient = ce_exp.keras_probability_loss_and_gradient(row, np.array([0]))
    grad = gradient[0]
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
        ce_exp.compare_implementations(logits, targets)


def test_framework_wrappers_validate_before_running():
    with pytest.raises(TypeError, match="from_logits must be a bool"):
        ce_exp.keras_sparse_categorical_crossentropy(np.zeros((1, 2), np.float32), np.array([0]),
                                                 from_logits=1)
    with pytest.raises(ValueError, match="targets must lie in"):
        ce_exp.tf_sparse_softmax_cross_entropy(np.zeros((1, 2), np.float32), np.array([5]))


def test_tf_wrapper_all_ignored_gives_nan_mean():
    per_row, mean = ce_exp.tf_sparse_softmax_cross_entropy(
        np.zeros((2, 3), np.float32), np.array([IGNORE_INDEX, IGNORE_INDEX]))
    assert np.array_equal(per_row.numpy(), np.zeros(2, np.float32))
    assert math.isnan(float(mean))


def test_format_comparison_keeps_rows_and_formats_columns():
    logits = np.array([[0.0, 40.0, 0.0], [1.0, 0.0, 0.0]], dtype=np.float32)
    table = ce_exp.compare_implementations(logits, np.array([0, 1]))
    shown = ce_exp.format_comparison(table)
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
        ce_exp.run_implementation("jax", np.zeros((1, 2), np.float32), np.array([0]))



def test_naive_functions_reject_bad_input():
    with pytest.raises(ValueError, match="targets must lie in"):
        ce_exp.naive_cross_entropy(GOOD_LOGITS, torch.tensor([0, 1, 9]))
    with pytest.raises(ValueError, match="class axis"):
        ce_exp.naive_log_softmax(torch.tensor(1.0))


KERAS_ROW = np.array([[0.0, 1.0, 2.0]], dtype=np.float32)


@pytest.mark.parametrize(
    ("logits", "targets", "error", "name"),
    [
        (KERAS_ROW.tolist(), np.array([0]), TypeError, "logits"),
        (KERAS_ROW.astype(np.float16), np.array([0]), TypeError, "logits"),
        (KERAS_ROW[0], np.array([0]), ValueError, "logits"),
        (KERAS_ROW, np.array([0.0]), TypeError, "targets"),
        (KERAS_ROW, np.array([0, 1]), ValueError, "targets"),
        (KERAS_ROW, np.array([3]), ValueError, "targets"),
        (KERAS_ROW, np.array([-1]), ValueError, "targets"),
        (KERAS_ROW, np.array([IGNORE_INDEX]), ValueError, "targets"),
    ],
)
def test_keras_probability_loss_and_gradient_rejects_bad_input(logits, targets, error, name):
    with pytest.raises(error, match=rf"^{name}\b") as info:
        ce_exp.keras_probability_loss_and_gradient(logits, targets)
    assert "companion" in pathlib.Path(str(info.traceback[-1].path)).parts


@pytest.mark.parametrize(
    ("logits", "target", "kwargs", "error", "name"),
    [
        (KERAS_ROW[0].tolist(), 0, {}, TypeError, "logits"),
        (KERAS_ROW[0].astype(np.int64), 0, {}, TypeError, "logits"),
        (KERAS_ROW, 0, {}, ValueError, "logits"),
        (np.zeros(0, np.float32), 0, {}, ValueError, "logits"),
        (KERAS_ROW[0], 0.0, {}, TypeError, "target"),
        (KERAS_ROW[0], True, {}, TypeError, "target"),
        (KERAS_ROW[0], 3, {}, ValueError, "target"),
        (KERAS_ROW[0], IGNORE_INDEX, {}, ValueError, "target"),
        (KERAS_ROW[0], 0, {"method": "predict"}, ValueError, "method"),
        (KERAS_ROW[0], 0, {"run_eagerly": 1}, TypeError, "run_eagerly"),
    ],
)
def test_tf_softmax_model_loss_rejects_bad_input(logits, target, kwargs, error, name):
    options = {"method": "evaluate", **kwargs}
    with pytest.raises(error, match=rf"^{name}\b") as info:
        ce_exp.tf_softmax_model_loss(logits, target, **options)
    assert "companion" in pathlib.Path(str(info.traceback[-1].path)).parts


# ---------------------------------------------------------------------------
# Non-finite logits: only +inf and nan poison the gradient
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_only_plus_inf_and_nan_make_the_gradient_nan(dtype):
    table = ce_exp.non_finite_logit_gradients(dtype)
    assert len(table) == 3 * len(ce_exp.NON_FINITE_PLACEMENTS)
    harmless = (table["logit"] == "-inf") & (table["placed in"] != "ignored row, every class")
    assert (table["gradient"][harmless] == "finite").all()
    assert (table["gradient"][~harmless] == "nan").all()
    ignored = table["placed in"].str.startswith("ignored")
    assert (table["loss"][ignored] == "finite").all()
    minus_inf_target = (table["logit"] == "-inf") & (table["placed in"] == "scored row, target class")
    assert table["loss"][minus_inf_target].tolist() == ["inf"]
    assert (table["row 0 gradient"][~ignored] == "exactly 0").all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 2), (7, 3), (3, 50)])
def test_minus_inf_masking_keeps_gradients_finite_and_ignored_rows_zero(dtype, shape):
    # vocabulary masking: -inf on half the non-target classes of every row,
    # in ignored and scored rows alike, and other shapes than the table's
    n, c = shape
    generator = torch.Generator().manual_seed(n * c)
    logits = torch.randn(n, c, generator=generator, dtype=dtype)
    targets = torch.zeros(n, dtype=torch.long)
    targets[::2] = IGNORE_INDEX
    if n == 1:
        targets[0] = 0
    logits[:, 1::2] = -math.inf
    logits.requires_grad_(True)
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert (logits.grad[targets == IGNORE_INDEX] == 0).all()
    assert (logits.grad[:, 1::2] == 0).all()


@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plus_inf_or_nan_in_an_ignored_row_makes_its_gradient_nan(bad, dtype):
    logits = torch.zeros(3, 4, dtype=dtype)
    logits[0, 1] = bad
    logits.requires_grad_(True)
    loss = F.cross_entropy(logits, torch.tensor([IGNORE_INDEX, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss)
    assert logits.grad[0].isnan().all() and torch.isfinite(logits.grad[1:]).all()


# ---------------------------------------------------------------------------
# The kernels behind F.cross_entropy: log_softmax, then nll_loss
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [{}, {"reduction": "sum"}, {"reduction": "none"},
                                     {"label_smoothing": 0.2}, {"weight": "w"}])
def test_cross_entropy_dispatches_to_log_softmax_then_nll_loss(dtype, options):
    logits = torch.randn(6, 5, dtype=dtype, requires_grad=True)
    targets = torch.tensor([0, 1, IGNORE_INDEX, 3, 4, 2])
    if options.get("weight") == "w":
        options = {"weight": torch.linspace(0.5, 2.0, 5, dtype=dtype)}

    def run():
        loss = F.cross_entropy(logits, targets, **options)
        loss.sum().backward()

    calls = ce_exp.dispatched_aten_ops(run)
    names = [name for name, _ in calls]
    assert calls[0] == ("_log_softmax", (6, 5))
    assert "nll_loss_forward" in names and "nll_loss_backward" in names
    assert "_log_softmax_backward_data" in names
    assert not any("cross_entropy" in name for name in names)


def test_dispatched_aten_ops_sees_the_nd_loss_and_rejects_a_non_callable():
    logits, targets = torch.zeros(2, 5, 3, 4), torch.zeros(2, 3, 4, dtype=torch.long)
    calls = ce_exp.dispatched_aten_ops(lambda: F.cross_entropy(logits, targets))
    assert calls[0] == ("_log_softmax", (2, 5, 3, 4))
    assert any(name.startswith("nll_loss") for name, _ in calls)
    with pytest.raises(TypeError, match=r"^run\b"):
        ce_exp.dispatched_aten_ops(3)


# ---------------------------------------------------------------------------
# A real Model.fit(class_weight=...) with (B, T) labels
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("batch_size", "seq_len"), [(2, 4), (5, 3)])
def test_keras3_fit_class_weight_raises_when_b_differs_from_t(batch_size, seq_len):
    with pytest.raises(ValueError, match="Dimensions must be equal"):
        ce_exp.keras_fit_class_weight(batch_size, seq_len, framework="keras")


@pytest.mark.parametrize("size", [3, 4])
def test_keras3_fit_class_weight_weights_along_time_when_b_equals_t(size):
    fit = ce_exp.keras_fit_class_weight(size, size, framework="keras")
    assert fit["reported"] == pytest.approx(fit["along_time"], rel=1e-5)
    for other in ("per_sequence", "per_token", "unweighted"):
        assert abs(fit["reported"] - fit[other]) > 1e-3


@pytest.mark.parametrize(("batch_size", "seq_len"), [(2, 4), (4, 4)])
def test_tf_keras_fit_class_weight_weights_whole_sequences(batch_size, seq_len):
    fit = ce_exp.keras_fit_class_weight(batch_size, seq_len, framework="tf_keras")
    assert fit["reported"] == pytest.approx(fit["per_sequence"], rel=1e-5)
    assert abs(fit["reported"] - fit["per_token"]) > 1e-3


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "name"),
    [
        ((2.0, 4), {}, TypeError, "batch_size"),
        ((0, 4), {}, ValueError, "batch_size"),
        ((2, "4"), {}, TypeError, "seq_len"),
        ((2, 4), {"framework": "jax"}, ValueError, "framework"),
        ((2, 4), {"num_classes": 1}, ValueError, "num_classes"),
    ],
)
def test_keras_fit_class_weight_rejects_bad_input(args, kwargs, error, name):
    with pytest.raises(error, match=rf"^{name}\b"):
        ce_exp.keras_fit_class_weight(*args, **kwargs)


def test_non_finite_logit_gradients_rejects_other_dtypes():
    with pytest.raises(ValueError, match=r"^dtype\b"):
        ce_exp.non_finite_logit_gradients(torch.float16)
