"""Tests of companion.experiments.keras_masking: pinned Keras behaviours.

The behaviour tests pin what chapter 4 states about Keras 3.15.1 and
tf-keras 2.21.0; if an upgrade changes one, the test fails and the text is
revisited.
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from companion import keras_loss, reference
from companion.experiments import keras_masking as km

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

LOG5 = math.log(5.0)
SOURCE = np.array(km.SOURCE_LABELS)
SOURCE_MASK = (SOURCE != keras_loss.PADDING_ID).astype(np.float64)
FLOAT32_TOL = 1e-5


# ---------------------------------------------------------------------------
# Versions and the source locations the chapter quotes
# ---------------------------------------------------------------------------


def test_pinned_versions_are_the_ones_the_chapter_describes() -> None:
    assert keras.__version__ == "3.15.1"
    assert tf_keras.__version__ == "2.21.0"
    assert keras.backend.backend() == "tensorflow"


def test_keras3_apply_mask_rescales_by_total_over_valid() -> None:
    from keras.src.losses import loss as keras_loss

    source = inspect.getsource(keras_loss.apply_mask)
    assert 'reduction in ("mean", "sum_over_batch_size")' in source
    assert "mask_weight = ops.divide_no_nan(total, valid)" in source
    call_source = inspect.getsource(keras_loss.Loss.__call__)
    assert "get_keras_mask(y_pred)" in call_source


def test_tf_keras_apply_valid_mask_rescales_and_uses_the_y_pred_mask() -> None:
    from tf_keras.src import losses as tf_keras_losses
    from tf_keras.src.utils import losses_utils

    source = inspect.getsource(losses_utils.apply_valid_mask)
    assert "mask *= total / valid" in source
    call_source = inspect.getsource(tf_keras_losses.Loss.__call__)
    assert "in_mask = losses_utils.get_mask(y_pred)" in call_source
    assert "losses_utils.apply_valid_mask(" in call_source


def test_epoch_loss_tracker_is_weighted_by_number_of_sequences() -> None:
    from keras.src.backend.tensorflow import trainer as keras_tf_trainer
    from tf_keras.src.engine import compile_utils

    keras_source = inspect.getsource(
        keras_tf_trainer.TensorFlowTrainer.train_step
    )
    assert "self._loss_tracker.update_state(" in keras_source
    assert "sample_weight=tf.shape(" in keras_source
    legacy_source = inspect.getsource(compile_utils.LossesContainer.__call__)
    assert "sample_weight=batch_dim" in legacy_source


def test_both_lambda_layers_accept_a_mask_argument() -> None:
    from tf_keras.src.layers.core import lambda_layer

    assert "mask" in inspect.signature(keras.layers.Lambda).parameters
    legacy = inspect.signature(lambda_layer.Lambda).parameters
    assert "mask" in legacy
    assert tf_keras.layers.Lambda is lambda_layer.Lambda


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (
            {"token_logits": np.zeros(5)},
            ValueError,
            "token_logits must be a 2-D array",
        ),
        ({"token_logits": np.zeros((5, 1))}, ValueError, "C >= 2"),
        (
            {"token_logits": np.full((2, 2), np.nan)},
            ValueError,
            "token_logits must be finite",
        ),
        ({"middle": "Dropout"}, ValueError, "middle must be one of"),
        ({"head": "Dense"}, ValueError, "head must be one of"),
        ({"mask_zero": 1}, TypeError, "mask_zero must be a bool"),
    ],
)
def test_build_toy_model_rejects_bad_arguments(kwargs, error, message) -> None:
    arguments = {"framework": "keras", "token_logits": km.uniform_logits(5)}
    with pytest.raises(error, match=message):
        km.build_toy_model(**(arguments | kwargs))


def test_report_checks_batches_before_running_keras() -> None:
    logits = km.uniform_logits(5)
    loss = "sparse_categorical_crossentropy"
    with pytest.raises(TypeError, match="labels must hold integer ids"):
        km.report("keras", loss, km.Batch(SOURCE, SOURCE * 1.0), logits)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
        km.report("keras", loss, km.Batch(SOURCE, SOURCE + 5), logits)
    with pytest.raises(
        ValueError, match="sample_weight must have the shape of inputs"
    ):
        batch = km.Batch(SOURCE, SOURCE, np.ones((1, 4)))
        km.report("keras", loss, batch, logits)
    with pytest.raises(ValueError, match="sample_weight must be >= 0"):
        batch = km.Batch(SOURCE, SOURCE, -SOURCE_MASK)
        km.report("keras", loss, batch, logits)
    with pytest.raises(TypeError, match="batches must be a Batch"):
        km.report("keras", loss, [], logits)



def test_other_argument_checks() -> None:
    with pytest.raises(ValueError, match="kind must be one of"):
        km.make_loss("keras", "lambda")
    with pytest.raises(
        ValueError, match="length must be >= the longest sequence"
    ):
        km.padded([[1, 2, 3]], length=2)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        km.historical_masked_mean(np.ones((1, 5)), np.full((1, 5), 0.5))
    with pytest.raises(ValueError, match="padding_fractions must be"):
        km.padding_sweep([0.5, 1.0])
    with pytest.raises(ValueError, match="batch_sizes must be >= 1"):
        km.sequence_weighted_epoch_mean([1.0], [0])
    with pytest.raises(ValueError, match="backend must be one of"):
        km.fixed_loss_on_backend("numpy", SOURCE, np.zeros((1, 5, 5)))
    with pytest.raises(ValueError, match="logits must have shape"):
        km.fixed_loss_on_backend("torch", SOURCE, np.zeros((1, 4, 5)))


# ---------------------------------------------------------------------------
# NumPy side
# ---------------------------------------------------------------------------


def test_toy_model_outputs_softmax_of_its_token_logits() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4))
    inputs = rng.integers(0, 6, size=(2, 7))
    expected = reference.softmax(logits)[inputs]
    for framework in keras_loss.FRAMEWORKS:
        for head in ("Dense(softmax)", "Activation"):
            model = km.build_toy_model(framework, logits, head=head)
            got = np.asarray(model(inputs.astype(np.int32)))
            np.testing.assert_allclose(got, expected, atol=1e-6)


def test_reference_token_nll_of_the_uniform_toy_is_log_c() -> None:
    np.testing.assert_allclose(
        km.reference_token_nll(km.uniform_logits(5), SOURCE, SOURCE), LOG5
    )


def test_historical_masked_mean_is_the_sources_number() -> None:
    per_token = km.reference_token_nll(km.uniform_logits(5), SOURCE, SOURCE)
    historical = km.historical_masked_mean(per_token, SOURCE_MASK)
    assert historical == pytest.approx(3 * LOG5 / 5, abs=1e-12)
    assert historical == pytest.approx(0.965663, abs=1e-6)
    true = km.token_weighted_mean(per_token, SOURCE_MASK)
    assert true == pytest.approx(1.609438, abs=1e-6)


def test_reference_nll_sums_of_uniform_logits_count_real_weights_only() -> None:
    labels = np.array([[1, 2, 0], [3, 0, 0]])
    weights = np.array([[2.0, 1.0, 5.0], [0.5, 7.0, 7.0]])
    total, weight = km.reference_nll_sums(np.zeros((2, 3, 4)), labels, weights)
    # Real tokens weigh 2 + 1 + 0.5; padding, however heavy, weighs nothing.
    assert weight == 3.5
    assert total == pytest.approx(3.5 * math.log(4), rel=1e-15)
    unweighted = km.reference_nll_sums(np.zeros((2, 3, 4)), labels)
    assert unweighted == pytest.approx((3 * math.log(4), 3.0), rel=1e-15)


def test_reference_nll_sums_match_a_loop_over_tokens() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3.0, size=(3, 5, 6)).astype(np.float32)
    labels = rng.integers(0, 6, size=(3, 5))
    weights = rng.uniform(0.0, 2.0, size=(3, 5))
    total, weight = 0.0, 0.0
    for b in range(3):
        for t in range(5):
            if labels[b, t] == keras_loss.PADDING_ID:
                continue
            row = logits[b, t].astype(np.float64)
            log_z = math.log(sum(math.exp(x) for x in row))
            total += weights[b, t] * (log_z - row[labels[b, t]])
            weight += weights[b, t]
    got = km.reference_nll_sums(logits, labels, weights)
    assert got == pytest.approx((total, weight), rel=1e-12)


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ((np.zeros((1, 3, 4)), np.ones((1, 3))), TypeError, "labels must hold integer"),
        ((np.zeros((1, 3, 4)), np.ones((1, 2), int)), ValueError, "logits must have shape"),
        ((np.zeros((1, 3, 4)), np.full((1, 3), 4)), ValueError, r"labels must lie in \[0, 4\)"),
        ((np.zeros((3, 4)), np.ones((1, 3), int)), ValueError, "logits must be a 3-D"),
        ((np.zeros((1, 3, 4)), np.ones((1, 3), int), np.ones((1, 2))), ValueError,
         "sample_weight must have the shape"),
        ((np.zeros((1, 3, 4)), np.ones((1, 3), int), -np.ones((1, 3))), ValueError,
         "sample_weight must be >= 0"),
        ((np.full((1, 3, 4), np.nan), np.ones((1, 3), int)), ValueError, "logits must be finite"),
    ],
)
def test_reference_nll_sums_errors(args, error, match) -> None:
    with pytest.raises(error, match=match):
        km.reference_nll_sums(*args)


@given(
    lengths=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    data=st.data(),
)
def test_keras3_samplewise_mean_equals_token_mean_when_lengths_agree(
    lengths, data
) -> None:
    width = max(lengths)
    rng = np.random.default_rng(len(lengths) * 100 + width)
    values = rng.uniform(0, 3, size=(len(lengths), width))
    weights = km.padded([[1] * n for n in lengths]).astype(np.float64)
    split = data.draw(st.integers(1, len(lengths)))
    if split < len(lengths):
        batches = [values[:split], values[split:]]
        masks = [weights[:split], weights[split:]]
    else:
        batches, masks = [values], [weights]
    assert km.keras3_samplewise_mean(batches, masks) == pytest.approx(
        km.token_weighted_mean(values, weights), rel=1e-12
    )


# ---------------------------------------------------------------------------
# What the pinned Keras versions report (each behaviour the chapter states)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loss_kinds() -> pd.DataFrame:
    return km.loss_kind_table()


def test_every_loss_kind_reports_the_masked_mean_in_both_versions(
    loss_kinds,
) -> None:
    assert list(loss_kinds.index) == [
        (f, k) for f in keras_loss.FRAMEWORKS for k in km.LOSS_KINDS
    ]
    np.testing.assert_allclose(
        loss_kinds.to_numpy(), LOG5, atol=FLOAT32_TOL
    )


def test_historical_loss_reproduces_0_9657_and_the_metric_is_right() -> None:
    got = km.report(
        "tf_keras",
        km.HistoricalSparseCategoricalCrossentropy(),
        km.Batch(SOURCE, SOURCE),
        km.uniform_logits(5),
    )
    historical = km.historical_masked_mean(
        km.reference_token_nll(km.uniform_logits(5), SOURCE, SOURCE),
        SOURCE_MASK,
    )
    assert got.fit["loss"] == pytest.approx(historical, abs=FLOAT32_TOL)
    assert got.evaluate["loss"] == pytest.approx(historical, abs=FLOAT32_TOL)
    assert got.compute_loss == pytest.approx(historical, abs=FLOAT32_TOL)
    assert got.evaluate["metric"] == pytest.approx(LOG5, abs=FLOAT32_TOL)


def test_sample_weight_masking_divides_by_all_positions_by_default() -> None:
    table = km.sample_weight_masking_table()
    wrong = 3 * LOG5 / 5
    columns = ["fit", "evaluate", "call"]
    for row in [("keras", "default"), ("tf_keras", "default")]:
        np.testing.assert_allclose(
            table.loc[row, columns].to_numpy(float), wrong, atol=FLOAT32_TOL
        )
    for row in [
        ("keras", "mean_with_sample_weight"),
        ("keras", "fixed"),
        ("tf_keras", "fixed"),
    ]:
        np.testing.assert_allclose(
            table.loc[row, columns].to_numpy(float), LOG5, atol=FLOAT32_TOL
        )
    np.testing.assert_allclose(
        table["metric"].to_numpy(float), LOG5, atol=FLOAT32_TOL
    )


def test_tf_keras_has_no_mean_with_sample_weight_reduction() -> None:
    with pytest.raises(ValueError):
        tf_keras.losses.SparseCategoricalCrossentropy(
            reduction="mean_with_sample_weight"
        )


def test_mask_with_non_binary_weights_loss_and_metric_disagree() -> None:
    table = km.weighted_mask_table()
    weights = np.array([[2.0, 1, 1, 0, 0]])
    by_valid_tokens = float((weights * LOG5).sum() / SOURCE_MASK.sum())
    assert by_valid_tokens == pytest.approx(2.145917, abs=1e-6)
    for framework in keras_loss.FRAMEWORKS:
        built_in = table.loc[(framework, "built-in Loss")]
        assert built_in["evaluate"] == pytest.approx(
            by_valid_tokens, abs=FLOAT32_TOL
        )
        assert built_in["compute_loss"] == pytest.approx(
            by_valid_tokens, abs=FLOAT32_TOL
        )
        assert built_in["metric"] == pytest.approx(LOG5, abs=FLOAT32_TOL)
        fixed = table.loc[(framework, "fixed")]
        assert fixed["evaluate"] == pytest.approx(LOG5, abs=FLOAT32_TOL)


def test_layers_that_drop_the_mask_make_the_loss_score_padding() -> None:
    table = km.lost_mask_table()
    logits = km.padding_confident_logits(5, 8.0)
    per_token = km.reference_token_nll(logits, SOURCE, SOURCE)
    masked = km.token_weighted_mean(per_token, SOURCE_MASK)
    unmasked = float(per_token.mean())
    assert masked == pytest.approx(LOG5)
    assert unmasked == pytest.approx(0.966199, abs=1e-6)
    for framework in keras_loss.FRAMEWORKS:
        for middle in ("Lambda", "custom layer", "raw op"):
            assert table.loc[(framework, middle), "evaluate"] == pytest.approx(
                unmasked, abs=FLOAT32_TOL
            )
        for middle in ("none", "custom layer, supports_masking"):
            assert table.loc[(framework, middle), "evaluate"] == pytest.approx(
                masked, abs=FLOAT32_TOL
            )
    np.testing.assert_allclose(
        table["fixed"].to_numpy(float), masked, atol=FLOAT32_TOL
    )
    warned = table["mask warning"]
    assert warned[("keras", "Lambda")] and warned[("keras", "custom layer")]
    assert not warned[("keras", "raw op")]
    assert not warned.loc["tf_keras"].any()


@pytest.mark.parametrize("framework", keras_loss.FRAMEWORKS)
def test_softmax_layer_applies_the_time_mask_to_the_class_axis(
    framework,
) -> None:
    probabilities = km.softmax_layer_probabilities(
        framework, SOURCE, km.uniform_logits(5)
    )
    expected_row = np.array([1 / 3, 1 / 3, 1 / 3, 0.0, 0.0])
    np.testing.assert_allclose(
        probabilities[0], np.tile(expected_row, (5, 1)), atol=1e-6
    )
    K = keras_loss.keras_api(framework)
    label_3_cost = float(
        K.losses.SparseCategoricalCrossentropy()(
            np.array([[3]]), probabilities[:, :1]
        )
    )
    assert label_3_cost == pytest.approx(-math.log(1e-7), abs=1e-3)
    error = (
        ValueError if framework == "keras" else tf.errors.InvalidArgumentError
    )
    with pytest.raises(error):
        km.softmax_layer_probabilities(
            framework, SOURCE[:, :4], km.uniform_logits(5)
        )


@pytest.mark.parametrize("framework", keras_loss.FRAMEWORKS)
def test_activation_head_passes_the_mask_on_without_applying_it(
    framework,
) -> None:
    logits = km.padding_confident_logits(5, 8.0)
    got = km.report(
        framework,
        km.make_loss(framework, "built-in Loss"),
        km.Batch(SOURCE, SOURCE),
        logits,
        head="Activation",
        fit=False,
    )
    np.testing.assert_allclose(
        got.predictions, reference.softmax(logits)[SOURCE], atol=1e-6
    )
    assert got.evaluate["loss"] == pytest.approx(LOG5, abs=FLOAT32_TOL)


def test_epoch_loss_is_a_sequence_weighted_mean_of_batch_means() -> None:
    table = km.epoch_aggregation_table()
    logits = 4.0 * np.eye(5)
    batches = km.epoch_aggregation_batches(equal_lengths=True)
    per_token = [
        km.reference_token_nll(logits, b.inputs, b.labels) for b in batches
    ]
    masks = [(b.labels != keras_loss.PADDING_ID).astype(np.float64) for b in batches]
    batch_means = [
        km.token_weighted_mean(x, m) for x, m in zip(per_token, masks)
    ]
    epoch = km.sequence_weighted_epoch_mean(batch_means, [2, 1])
    token_mean = km.token_weighted_mean(
        np.concatenate([x.ravel() for x in per_token])[None, :],
        np.concatenate([m.ravel() for m in masks])[None, :],
    )
    assert epoch == pytest.approx(2.73737, abs=1e-5)
    assert token_mean == pytest.approx(0.73737, abs=1e-5)

    def column(name: str) -> np.ndarray:
        return table[name].to_numpy(float)

    np.testing.assert_allclose(column("fit"), epoch, atol=FLOAT32_TOL)
    np.testing.assert_allclose(column("evaluate"), epoch, atol=FLOAT32_TOL)
    np.testing.assert_allclose(
        column("corpus_ce"), token_mean, atol=FLOAT32_TOL
    )
    np.testing.assert_allclose(
        column("corpus_perplexity"), math.exp(token_mean), rtol=1e-5
    )
    equal, different = "10, 10", "2, 10"
    for framework in keras_loss.FRAMEWORKS:
        assert table.loc[(framework, equal), "metric"] == pytest.approx(
            token_mean, abs=FLOAT32_TOL
        )
    assert table.loc[("tf_keras", different), "metric"] == pytest.approx(
        token_mean, abs=FLOAT32_TOL
    )
    short = km.epoch_aggregation_batches(equal_lengths=False)
    samplewise = km.keras3_samplewise_mean(
        [km.reference_token_nll(logits, b.inputs, b.labels) for b in short],
        [(b.labels != keras_loss.PADDING_ID).astype(np.float64) for b in short],
    )
    assert samplewise == pytest.approx(2.070703, abs=1e-5)
    assert table.loc[("keras", different), "metric"] == pytest.approx(
        samplewise, abs=FLOAT32_TOL
    )


def test_padding_sweep_wrong_is_historical_and_fixed_is_true() -> None:
    sweep = km.padding_sweep()
    assert sweep["padding_fraction"].iloc[0] == 0.0
    assert sweep["padding_fraction"].iloc[-1] == pytest.approx(0.9)
    np.testing.assert_allclose(sweep["true"], LOG5)
    np.testing.assert_allclose(sweep["fixed"], LOG5, atol=FLOAT32_TOL)
    np.testing.assert_allclose(
        sweep["wrong"],
        (1 - sweep["padding_fraction"]) * LOG5,
        atol=FLOAT32_TOL,
    )
    np.testing.assert_allclose(sweep["wrong_ppl"], np.exp(sweep["wrong"]))


def test_keras3_mean_metric_reduces_each_sequence_by_a_time_mean() -> None:
    from keras.src.metrics import reduction_metrics

    source = inspect.getsource(reduction_metrics.Mean.update_state)
    assert "reduce_fn=ops.mean" in source


def _masked_head_loss(framework: str, head: str) -> float:
    """Built-in loss of the padding-confident toy without a Dense layer."""
    K = keras_loss.keras_api(framework)
    logits = km.padding_confident_logits(5, 8.0)
    inputs = K.Input(shape=(None,), dtype="int32")
    embedding = K.layers.Embedding(5, 5, mask_zero=True)
    hidden = embedding(inputs)
    if head == "Activation":
        outputs = K.layers.Activation("softmax")(hidden)
    else:
        outputs = K.layers.Lambda(
            lambda t: K.activations.softmax(t), mask=lambda t, m: m
        )(hidden)
    model = K.Model(inputs, outputs)
    embedding.set_weights([logits.astype(np.float32)])
    y_pred = model(tf.constant(SOURCE, dtype=tf.int32))
    return float(K.losses.SparseCategoricalCrossentropy()(SOURCE, y_pred))


@pytest.mark.parametrize("framework", keras_loss.FRAMEWORKS)
def test_activation_softmax_passes_the_mask_to_the_loss(framework) -> None:
    assert _masked_head_loss(framework, "Activation") == pytest.approx(
        LOG5, abs=FLOAT32_TOL
    )


@pytest.mark.parametrize("framework", keras_loss.FRAMEWORKS)
def test_lambda_with_a_mask_function_keeps_the_mask(framework) -> None:
    assert _masked_head_loss(framework, "Lambda with mask") == pytest.approx(
        LOG5, abs=FLOAT32_TOL
    )


# ---------------------------------------------------------------------------
# Keras's own fix, ignore_class (issue #13), and metrics= against
# weighted_metrics=
# ---------------------------------------------------------------------------


def test_built_in_fix_table_ignore_class_and_mean_with_sample_weight() -> None:
    table = km.built_in_fix_table()
    truth = table.loc[("float64", "token mean")].to_numpy(float)
    cases = list(table.columns)
    weighted = cases.index("weights 2,1,1,0,0")
    # The padding-confident toy: scoring padding would move every case.
    np.testing.assert_allclose(truth, LOG5, atol=1e-12)
    for row in [
        ("keras", "ignore_class=0, mean_with_sample_weight"),
        ("keras", "fixed"),
        ("tf_keras", "fixed"),
    ]:
        np.testing.assert_allclose(
            table.loc[row].to_numpy(float), truth, atol=FLOAT32_TOL
        )
    for framework in keras_loss.FRAMEWORKS:
        alone = table.loc[(framework, "ignore_class=0")].to_numpy(float)
        others = [i for i in range(len(cases)) if i != weighted]
        np.testing.assert_allclose(alone[others], truth[others], atol=FLOAT32_TOL)
        # With weights 2,1,1,0,0 it divides by the 3 valid tokens.
        assert alone[weighted] == pytest.approx(4 * LOG5 / 3, abs=FLOAT32_TOL)


def test_mean_with_sample_weight_needs_keras_3_7_and_ignore_class_2_10() -> None:
    from keras.src.losses import loss as keras_loss_module

    assert "mean_with_sample_weight" in inspect.getsource(
        keras_loss_module.standardize_reduction
    )
    for K in (keras, tf_keras):
        signature = inspect.signature(K.losses.SparseCategoricalCrossentropy)
        assert "ignore_class" in signature.parameters


def test_metrics_argument_ignores_sample_weights_and_scores_padding() -> None:
    table = km.metrics_argument_table()
    logits = km.padding_confident_logits(5, 8.0)
    unweighted = float(km.reference_token_nll(logits, SOURCE, SOURCE).mean())
    assert unweighted == pytest.approx(0.9662, abs=1e-4)
    np.testing.assert_allclose(
        table["metrics"].to_numpy(float), unweighted, atol=FLOAT32_TOL
    )
    np.testing.assert_allclose(
        table["weighted_metrics"].to_numpy(float), LOG5, atol=FLOAT32_TOL
    )
    np.testing.assert_allclose(table["token mean"].to_numpy(float), LOG5)


def test_report_rejects_an_unknown_metrics_argument() -> None:
    batch = km.Batch(SOURCE, SOURCE)
    with pytest.raises(ValueError, match="metrics_argument"):
        km.report("keras", "sparse_categorical_crossentropy", batch,
                  km.uniform_logits(5), metrics_argument="metric")


@pytest.mark.parametrize("framework", keras_loss.FRAMEWORKS)
def test_a_plain_function_is_compiled_into_a_loss_function_wrapper(
    framework,
) -> None:
    K = keras_loss.keras_api(framework)
    model = km.build_toy_model(framework, km.uniform_logits(5))
    model.compile(loss=km.make_loss(framework, "function"))
    model.evaluate(SOURCE, SOURCE, verbose=0)
    if K is keras:
        wrapped = model._compile_loss._flat_losses[0].loss
        from keras.src.losses.losses import LossFunctionWrapper as wrapper
    else:
        wrapped = model.compiled_loss._losses[0]
        from tf_keras.src.losses import LossFunctionWrapper as wrapper
    assert isinstance(wrapped, wrapper)
    assert wrapped.reduction in ("sum_over_batch_size", "auto")
