"""Tests of companion.keras_loss: the fixed loss and the corpus metrics.

The property tests check the loss and metrics, in Keras 3 and tf-keras,
against the float64 NumPy reference over random shapes, lengths, paddings
and weights.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from companion import keras_loss, reference
from companion.experiments import keras_masking as km

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

FLOAT32_TOL = 1e-5
LOSS_CLASSES = [keras_loss.MaskedSparseCrossEntropy, keras_loss.LegacyMaskedSparseCrossEntropy]


# ---------------------------------------------------------------------------
# Argument checks
# ---------------------------------------------------------------------------


def test_keras_api_names_the_framework() -> None:
    assert keras_loss.keras_api("keras") is keras
    assert keras_loss.keras_api("tf_keras") is tf_keras
    with pytest.raises(ValueError, match="framework must be one of"):
        keras_loss.keras_api("tf.keras")



def test_constructors_check_their_arguments() -> None:
    with pytest.raises(TypeError, match="padding_id must be an int"):
        keras_loss.MaskedSparseCrossEntropy(padding_id="0")
    with pytest.raises(TypeError, match="from_logits must be a bool"):
        keras_loss.LegacyCorpusCrossEntropy(from_logits=1)


# ---------------------------------------------------------------------------
# The fixed loss and metrics against the reference
# ---------------------------------------------------------------------------


@st.composite
def padded_batches(draw, max_batches: int = 1):
    """Random logits, right-padded labels (0 = padding) and weights."""
    num_classes = draw(st.integers(2, 6))
    num_batches = draw(st.integers(1, max_batches))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(num_batches):
        rows = draw(st.integers(1, 4))
        width = draw(st.integers(1, 8))
        lengths = draw(
            st.lists(st.integers(0, width), min_size=rows, max_size=rows)
        )
        labels = km.padded(
            [rng.integers(1, num_classes, size=n).tolist() for n in lengths],
            length=width,
        )
        logits = rng.normal(scale=2.0, size=(rows, width, num_classes))
        weights = rng.uniform(0.1, 3.0, size=(rows, width))
        batches.append(
            (logits.astype(np.float32), labels, weights.astype(np.float32))
        )
    return batches


def reference_masked_mean(batches, use_weights: bool) -> float:
    """Token mean of -log softmax over real labels, float64, reference."""
    total, count = 0.0, 0.0
    for logits, labels, weights in batches:
        num_classes = logits.shape[-1]
        targets = np.where(
            labels == keras_loss.PADDING_ID, reference.IGNORE_INDEX, labels
        ).reshape(-1)
        nll = reference.cross_entropy(
            logits.reshape(-1, num_classes), targets, reduction="none"
        )
        w = (targets != reference.IGNORE_INDEX).astype(np.float64)
        if use_weights:
            w = w * weights.reshape(-1).astype(np.float64)
        total += float((w * nll).sum())
        count += float(w.sum())
    return total / count if count else 0.0


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
@given(
    batches=padded_batches(),
    use_weights=st.booleans(),
    from_logits=st.booleans(),
)
def test_masked_loss_matches_reference(
    loss_class, batches, use_weights, from_logits
) -> None:
    logits, labels, weights = batches[0]
    if from_logits:
        y_pred = logits
    else:
        y_pred = reference.softmax(logits).astype(np.float32)
    loss = loss_class(from_logits=from_logits)
    weight = weights if use_weights else None
    got = float(loss(labels, y_pred, sample_weight=weight))
    expected = reference_masked_mean(batches, use_weights)
    assert got == pytest.approx(expected, rel=FLOAT32_TOL, abs=FLOAT32_TOL)


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
def test_masked_loss_broadcasts_one_weight_per_sequence(loss_class) -> None:
    rng = np.random.default_rng(1)
    labels = km.padded([[1, 2, 3], [4], [2, 2]], length=4)
    logits = rng.normal(size=(3, 4, 5)).astype(np.float32)
    per_sequence = np.array([0.5, 2.0, 1.0], dtype=np.float32)
    loss = loss_class(from_logits=True)
    per_token = np.repeat(per_sequence[:, None], 4, axis=1)
    expected = reference_masked_mean([(logits, labels, per_token)], True)
    for weights in (per_sequence, per_token, per_token[..., None]):
        got = float(loss(labels, logits, sample_weight=weights))
        assert got == pytest.approx(expected, abs=FLOAT32_TOL)


@pytest.mark.parametrize(
    ("ce_class", "ppl_class"),
    [
        (keras_loss.CorpusCrossEntropy, keras_loss.CorpusPerplexity),
        (keras_loss.LegacyCorpusCrossEntropy, keras_loss.LegacyCorpusPerplexity),
    ],
)
@given(batches=padded_batches(max_batches=4), use_weights=st.booleans())
def test_corpus_metrics_match_reference_over_batches_of_any_length(
    ce_class, ppl_class, batches, use_weights
) -> None:
    cross_entropy = ce_class(from_logits=True)
    perplexity = ppl_class(from_logits=True)
    for logits, labels, weights in batches:
        weight = weights if use_weights else None
        for metric in (cross_entropy, perplexity):
            metric.update_state(labels, logits, sample_weight=weight)
    expected = reference_masked_mean(batches, use_weights)
    assert float(cross_entropy.result()) == pytest.approx(
        expected, rel=FLOAT32_TOL, abs=FLOAT32_TOL
    )
    assert float(perplexity.result()) == pytest.approx(
        math.exp(expected), rel=1e-4
    )
    cross_entropy.reset_state()
    assert float(cross_entropy.result()) == 0.0


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
def test_masked_loss_gradient_is_zero_on_padding_and_over_real_tokens(
    loss_class,
) -> None:
    rng = np.random.default_rng(3)
    labels = km.padded([[1, 2, 3], [4]], length=5)
    logits = tf.Variable(rng.normal(size=(2, 5, 5)).astype(np.float32))
    with tf.GradientTape() as tape:
        value = loss_class(from_logits=True)(labels, logits)
    gradient = tape.gradient(value, logits).numpy()
    real = labels != keras_loss.PADDING_ID
    expected = reference.softmax(logits.numpy()) - np.eye(5)[labels]
    expected = np.where(real[..., None], expected / real.sum(), 0.0)
    np.testing.assert_allclose(gradient, expected, atol=1e-6)
    assert np.all(gradient[~real] == 0.0)


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
def test_masked_loss_of_a_padding_only_batch_is_zero_not_nan(
    loss_class,
) -> None:
    labels = np.zeros((2, 3), dtype=np.int32)
    probabilities = np.full((2, 3, 4), 0.25, dtype=np.float32)
    assert float(loss_class()(labels, probabilities)) == 0.0


def test_masked_loss_accepts_an_ignore_index_outside_the_classes() -> None:
    labels = np.array([[1, 2, -100, -100]])
    probabilities = np.full((1, 4, 3), 1 / 3, dtype=np.float32)
    loss = keras_loss.MaskedSparseCrossEntropy(padding_id=-100)
    assert float(loss(labels, probabilities)) == pytest.approx(
        math.log(3.0), abs=1e-6
    )


@pytest.mark.parametrize("loss_class", LOSS_CLASSES)
def test_masked_loss_uses_keras_sum_reduction_and_round_trips(
    loss_class,
) -> None:
    loss = loss_class(padding_id=-100, from_logits=True)
    assert str(loss.reduction).lower().endswith("sum")
    again = loss_class.from_config(loss.get_config())
    assert (again.padding_id, again.from_logits) == (-100, True)


def test_fixed_loss_runs_on_the_torch_backend() -> None:
    pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    labels = km.padded([[1, 2, 3], [4]], length=5)
    logits = rng.normal(size=(2, 5, 6))
    weights = rng.uniform(0.5, 2.0, size=(2, 5))
    got = km.fixed_loss_on_backend("torch", labels, logits, weights)
    batch = [(logits, labels, weights)]
    expected = reference_masked_mean(batch, use_weights=True)
    assert got["backend"] == "torch"
    assert got["loss"] == pytest.approx(expected, abs=FLOAT32_TOL)
    assert got["corpus_ce"] == pytest.approx(expected, abs=FLOAT32_TOL)


# ---------------------------------------------------------------------------
# A Keras mask on y_pred (issue #13): the numerator and the denominator
# count the same positions, in every case and every way Keras calls a loss
# ---------------------------------------------------------------------------

RANDOM_TOKEN_LOGITS = np.random.default_rng(13).normal(scale=2.0, size=(5, 5))


def test_random_token_logits_tell_the_denominators_apart() -> None:
    # Otherwise the case tests below could not fail on a wrong weighting.
    cases = km.masking_cases()
    left = cases["left padding"].batch
    nll = km.reference_token_nll(RANDOM_TOKEN_LOGITS, left.inputs, left.labels)
    real = (left.labels != 0).astype(float)
    both = real * (left.inputs != 0)
    token_mean = km.case_token_mean(cases["left padding"], RANDOM_TOKEN_LOGITS)
    assert token_mean == pytest.approx(km.token_weighted_mean(nll, both))
    old_bug = float((nll * both).sum() / real.sum())
    labels_only = km.token_weighted_mean(nll, real)
    assert abs(token_mean - old_bug) > 0.1
    assert abs(token_mean - labels_only) > 0.1
    weighted = cases["weights 2,1,1,0,0"]
    unweighted = km.MaskingCase(km.Batch(weighted.batch.inputs, weighted.batch.labels))
    assert abs(
        km.case_token_mean(weighted, RANDOM_TOKEN_LOGITS)
        - km.case_token_mean(unweighted, RANDOM_TOKEN_LOGITS)
    ) > 0.05


@pytest.mark.parametrize("framework", keras_loss.FRAMEWORKS)
def test_fixed_loss_is_the_token_mean_in_every_case_fit_evaluate_and_call(
    framework,
) -> None:
    # Left padding put the mask of y_pred into Keras 3's numerator only:
    # 2/3 of the token mean (1.0730 for log 5) before the fix.
    table = km.fixed_loss_cases(framework, RANDOM_TOKEN_LOGITS)
    expected = table["token mean"].to_numpy(float)
    for column in ["fit", "evaluate", "compute_loss", "call", "corpus_ce"]:
        np.testing.assert_allclose(
            table[column].to_numpy(float), expected, atol=FLOAT32_TOL,
            err_msg=f"{framework} {column}",
        )


def test_fixed_loss_is_the_token_mean_in_every_case_on_the_torch_backend() -> None:
    pytest.importorskip("torch")
    got = km.fixed_loss_cases_on_backend("torch", RANDOM_TOKEN_LOGITS)
    assert got["backend"] == "torch"
    for name, case in km.masking_cases().items():
        expected = km.case_token_mean(case, RANDOM_TOKEN_LOGITS)
        for column, value in got["cases"][name].items():
            assert value == pytest.approx(expected, abs=FLOAT32_TOL), (
                name, column
            )


@pytest.mark.parametrize("framework", keras_loss.FRAMEWORKS)
def test_a_keras_mask_on_y_pred_drops_positions_from_both_sums(
    framework,
) -> None:
    # A mask that disagrees with the labels in both directions, on a
    # (2, 4) batch with random logits and weights, attached by hand.
    rng = np.random.default_rng(7)
    labels = np.array([[0, 1, 2, 3], [4, 2, 0, 0]])
    mask = np.array([[False, False, True, True], [True, False, True, False]])
    logits = rng.normal(scale=2.0, size=(2, 4, 6)).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, size=(2, 4)).astype(np.float32)
    both = (labels != 0) * mask * weights
    nll = -np.take_along_axis(
        reference.log_softmax(logits.astype(np.float64)), labels[..., None], -1
    )[..., 0]
    expected = float((nll * both).sum() / both.sum())
    index = keras_loss.FRAMEWORKS.index(framework)
    loss = LOSS_CLASSES[index](from_logits=True)
    metric_class = (
        keras_loss.CorpusCrossEntropy, keras_loss.LegacyCorpusCrossEntropy
    )[index]
    for sample_weight, want in [
        (weights, expected),
        (None, km.token_weighted_mean(nll, ((labels != 0) * mask).astype(float))),
    ]:
        y_pred = tf.constant(logits)
        y_pred._keras_mask = tf.constant(mask)
        assert float(loss(labels, y_pred, sample_weight=sample_weight)) == (
            pytest.approx(want, abs=FLOAT32_TOL)
        )
        metric = metric_class(from_logits=True)
        metric.update_state(labels, y_pred, sample_weight=sample_weight)
        assert float(metric.result()) == pytest.approx(want, abs=FLOAT32_TOL)
