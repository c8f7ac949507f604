"""Tests of companion.experiments.denominator: the accumulated and
data-parallel steps against the full batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from companion import reference
from companion.accumulation import mean_of_means
from companion.causal_lm_loss import count_scored_targets
from companion.experiments.denominator import (
    accumulation_step,
    cosine_from_norms,
    cosine_similarity,
    data_parallel_accumulation_step,
    flat_gradient,
    full_batch_step,
    make_counting_batch,
    make_packed_batch,
    naive_error_by_imbalance,
    norm_ratio,
    relative_difference,
    source_excerpt,
    split_rows,
    warm_up,
)
from companion.experiments.tiny_models import BOS_TOKEN_ID, PAD_TOKEN_ID, build_tiny_lm

from tests.shared import TINY_LM_CONFIG as CONFIG

TIGHT = 1e-12


# ---------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------


def test_counting_batch_layout():
    input_ids, labels = make_counting_batch([1, 4, 6], vocab_size=7, seed=3, total_length=8)
    assert input_ids.shape == labels.shape == (3, 8)
    assert torch.all(input_ids[:, 0] == BOS_TOKEN_ID)
    assert torch.all(input_ids[0, 1:] == PAD_TOKEN_ID)
    for row, length in enumerate([1, 4, 6]):
        tokens = input_ids[row, 1:length]
        assert torch.all((tokens >= 2) & (tokens < 7))
        # Counting up, wrapping inside ids 2..V-1.
        assert torch.all((tokens[1:] - 2) == (tokens[:-1] - 2 + 1) % 5)
        assert torch.all(labels[row, length:] == -100)
        assert torch.equal(labels[row, :length], input_ids[row, :length])
    assert count_scored_targets(labels) == 0 + 3 + 5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lengths": [], "vocab_size": 5}, "non-empty"),
        ({"lengths": [0], "vocab_size": 5}, r"lengths\[0\] must be >= 1"),
        ({"lengths": [3], "vocab_size": 2}, "vocab_size must be >= 3"),
        ({"lengths": [5], "vocab_size": 5, "total_length": 4}, "total_length must be >="),
    ],
)
def test_counting_batch_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_counting_batch(seed=0, **kwargs)


def test_warm_up_makes_the_first_target_the_hard_one():
    trained = build_tiny_lm(CONFIG, seed=0)
    history = warm_up(trained, steps=30, longest_row=16)
    assert history[-1] < 0.5 * history[0]
    input_ids, labels = make_counting_batch([12] * 4, vocab_size=CONFIG.vocab_size, seed=9)
    with torch.no_grad():
        logits = trained(input_ids)
    per_token = F.cross_entropy(
        logits[:, :-1].reshape(-1, CONFIG.vocab_size), labels[:, 1:].reshape(-1), reduction="none"
    ).view(4, -1)
    assert per_token[:, 0].mean() > 10 * per_token[:, 2:].mean()


# ---------------------------------------------------------------------------
# The accumulated step against the full batch
# ---------------------------------------------------------------------------


@st.composite
def batch_and_split(draw):
    rows = draw(st.integers(2, 5))
    lengths = draw(st.lists(st.integers(2, 12), min_size=rows, max_size=rows))
    cuts = sorted(draw(st.sets(st.integers(1, rows - 1), min_size=1, max_size=rows - 1)))
    sizes = [b - a for a, b in zip([0, *cuts], [*cuts, rows])]
    seed = draw(st.integers(0, 1000))
    return lengths, sizes, seed


@settings(max_examples=15)
@given(batch_and_split())
def test_token_mean_accumulation_equals_full_batch(model, case):
    lengths, sizes, seed = case
    input_ids, labels = make_counting_batch(lengths, vocab_size=CONFIG.vocab_size, seed=seed)
    full = full_batch_step(model, input_ids, labels)
    fixed = accumulation_step(model, input_ids, labels, sizes, "token_mean")
    with torch.no_grad():
        logits = model(input_ids)
    assert full.loss == pytest.approx(reference.causal_lm_loss(logits.numpy(), labels.numpy()), rel=TIGHT)
    assert fixed.loss == pytest.approx(full.loss, rel=TIGHT)
    assert relative_difference(fixed.gradient, full.gradient) < 1e-12
    assert sum(fixed.token_counts) == full.token_counts[0]


@settings(max_examples=15)
@given(batch_and_split())
def test_mean_of_means_accumulation_matches_its_formula(model, case):
    lengths, sizes, seed = case
    input_ids, labels = make_counting_batch(lengths, vocab_size=CONFIG.vocab_size, seed=seed)
    naive = accumulation_step(model, input_ids, labels, sizes, "mean_of_means")
    sums, counts = [], []
    with torch.no_grad():
        for piece_ids, piece_labels in split_rows(input_ids, labels, sizes):
            logits = model(piece_ids).numpy()
            sums.append(reference.causal_lm_loss(logits, piece_labels.numpy(), num_items_in_batch=1))
            counts.append(count_scored_targets(piece_labels))
    assert naive.loss == pytest.approx(mean_of_means(sums, counts), rel=1e-11)
    if len(set(counts)) == 1:
        full = full_batch_step(model, input_ids, labels)
        assert relative_difference(naive.gradient, full.gradient) < 1e-12


def test_naive_accumulation_is_off_when_counts_differ(model):
    input_ids, labels = make_counting_batch([3, 3, 20], vocab_size=CONFIG.vocab_size, seed=4)
    full = full_batch_step(model, input_ids, labels)
    naive = accumulation_step(model, input_ids, labels, [2, 1], "mean_of_means")
    assert naive.token_counts == (4, 19)
    assert abs(naive.loss - full.loss) / full.loss > 0.2
    assert relative_difference(naive.gradient, full.gradient) > 0.2


def test_token_mean_survives_an_empty_micro_batch_but_mean_of_means_refuses(model):
    input_ids, labels = make_counting_batch([1, 6], vocab_size=CONFIG.vocab_size, seed=2)
    full = full_batch_step(model, input_ids, labels)
    fixed = accumulation_step(model, input_ids, labels, [1, 1], "token_mean")
    assert fixed.token_counts == (0, 5)
    assert relative_difference(fixed.gradient, full.gradient) < 1e-12
    with pytest.raises(ValueError, match="micro-batch 0 has no scored token"):
        accumulation_step(model, input_ids, labels, [1, 1], "mean_of_means")


def test_zero_scored_tokens_in_the_whole_batch_is_an_error(model):
    input_ids, labels = make_counting_batch([1, 1], vocab_size=CONFIG.vocab_size, seed=0)
    with pytest.raises(ValueError, match="no scored token in the whole batch"):
        full_batch_step(model, input_ids, labels)
    with pytest.raises(ValueError, match="no scored token in the whole batch"):
        accumulation_step(model, input_ids, labels, [1, 1], "token_mean")


@pytest.mark.parametrize(
    ("sizes", "reduction", "error", "match"),
    [
        ([1, 1], "mean", ValueError, "reduction must be one of"),
        ([1, 2], "token_mean", ValueError, "add up to the batch's B=2"),
        ([2, 0], "token_mean", ValueError, r"micro_batch_rows\[1\] must be >= 1"),
        (2, "token_mean", TypeError, "micro_batch_rows must be a sequence"),
    ],
)
def test_accumulation_argument_errors(model, sizes, reduction, error, match):
    input_ids, labels = make_counting_batch([3, 4], vocab_size=CONFIG.vocab_size, seed=0)
    with pytest.raises(error, match=match):
        accumulation_step(model, input_ids, labels, sizes, reduction)


def test_batch_shape_errors(model):
    input_ids, labels = make_counting_batch([3, 4], vocab_size=CONFIG.vocab_size, seed=0)
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        full_batch_step(model, input_ids, labels[:1])
    with pytest.raises(TypeError, match="labels must hold integer"):
        full_batch_step(model, input_ids, labels.double())


@st.composite
def ranks_and_micro_batches(draw):
    ranks = draw(st.integers(1, 3))
    sizes = draw(
        st.lists(
            st.lists(st.integers(1, 2), min_size=1, max_size=3),
            min_size=ranks,
            max_size=ranks,
        )
    )
    rows = sum(sum(rank) for rank in sizes)
    lengths = draw(st.lists(st.integers(2, 12), min_size=rows, max_size=rows))
    seed = draw(st.integers(0, 1000))
    return lengths, sizes, seed


@settings(max_examples=15)
@given(ranks_and_micro_batches())
def test_data_parallel_accumulation_with_global_count_is_full_batch(
    model, case
):
    lengths, sizes, seed = case
    input_ids, labels = make_counting_batch(
        lengths, vocab_size=CONFIG.vocab_size, seed=seed
    )
    full = full_batch_step(model, input_ids, labels)
    step = data_parallel_accumulation_step(
        model, input_ids, labels, sizes, "global"
    )
    assert step.loss == pytest.approx(full.loss, rel=TIGHT)
    assert relative_difference(step.gradient, full.gradient) < 1e-12
    assert sum(step.token_counts) == full.token_counts[0]
    assert len(step.token_counts) == sum(len(rank) for rank in sizes)


@settings(max_examples=15)
@given(ranks_and_micro_batches())
def test_data_parallel_accumulation_per_rank_is_a_mean_of_rank_means(
    model, case
):
    lengths, sizes, seed = case
    input_ids, labels = make_counting_batch(
        lengths, vocab_size=CONFIG.vocab_size, seed=seed
    )
    step = data_parallel_accumulation_step(
        model, input_ids, labels, sizes, "per_rank"
    )
    rank_rows = [sum(rank) for rank in sizes]
    sums, counts = [], []
    with torch.no_grad():
        for ids, lab in split_rows(input_ids, labels, rank_rows):
            logits = model(ids).numpy()
            sums.append(
                reference.causal_lm_loss(
                    logits, lab.numpy(), num_items_in_batch=1
                )
            )
            counts.append(count_scored_targets(lab))
    assert step.loss == pytest.approx(mean_of_means(sums, counts), rel=1e-11)
    # Per rank it is the rank's own token mean: accumulation is right
    # inside a rank, and only the ranks are averaged with equal weights.
    gradients = []
    for ids, lab in split_rows(input_ids, labels, rank_rows):
        gradients.append(full_batch_step(model, ids, lab).gradient)
    expected = torch.stack(gradients).mean(dim=0)
    assert relative_difference(step.gradient, expected) < 1e-12


def test_data_parallel_accumulation_counts_across_ranks(model):
    input_ids, labels = make_counting_batch(
        [3, 4, 3, 5, 20, 9], vocab_size=CONFIG.vocab_size, seed=5
    )
    full = full_batch_step(model, input_ids, labels)
    right = data_parallel_accumulation_step(
        model, input_ids, labels, [[2, 2], [1, 1]], "global"
    )
    wrong = data_parallel_accumulation_step(
        model, input_ids, labels, [[2, 2], [1, 1]], "per_rank"
    )
    assert right.token_counts == (5, 6, 19, 8)
    assert relative_difference(right.gradient, full.gradient) < 1e-12
    assert relative_difference(wrong.gradient, full.gradient) > 0.2
    # The step leaves no gradient behind in the model.
    assert torch.count_nonzero(flat_gradient(model)) == 0


@pytest.mark.parametrize(
    ("sizes", "count", "error", "match"),
    [
        ([[1], [1]], "mean", ValueError, "count must be 'global'"),
        ([[1], []], "global", ValueError, r"rank_micro_batch_rows\[1\]"),
        ([], "global", ValueError, "at least 1 rank"),
        (3, "global", TypeError, "one list of micro-batch sizes per rank"),
        ([[1], [2]], "global", ValueError, "add up to the batch's B=2"),
        ([[1], [1]], "per_rank", ValueError, "rank 0 has no scored token"),
    ],
)
def test_data_parallel_accumulation_errors(model, sizes, count, error, match):
    input_ids, labels = make_counting_batch(
        [1, 4], vocab_size=CONFIG.vocab_size, seed=0
    )
    with pytest.raises(error, match=match):
        data_parallel_accumulation_step(model, input_ids, labels, sizes, count)


def test_relative_difference_errors():
    with pytest.raises(ValueError, match="norm 0"):
        relative_difference(torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="shape of reference"):
        relative_difference(torch.ones(3), torch.ones(2))


def test_naive_error_grows_with_imbalance_and_fix_stays_exact(model):
    rows = naive_error_by_imbalance(model, [1, 2, 4, 8], vocab_size=CONFIG.vocab_size)
    assert [row["token_ratio"] for row in rows] == [1.0, 2.0, 4.0, 8.0]
    assert rows[0]["naive_gradient_error"] < 1e-12
    assert all(row["fixed_gradient_error"] < 1e-12 for row in rows)
    assert all(row["fixed_loss_error"] < 1e-12 for row in rows)
    assert rows[-1]["naive_gradient_error"] > 0.5
    assert rows[-1]["naive_loss_error"] > rows[1]["naive_loss_error"] > 0.01
    # Equal counts: same direction and length; unequal: both change.
    assert rows[0]["naive_gradient_cosine"] > 1 - 1e-12
    assert abs(rows[0]["naive_gradient_norm_ratio"] - 1) < 1e-12
    assert rows[-1]["naive_gradient_cosine"] < 0.99
    assert rows[-1]["naive_gradient_norm_ratio"] > 1.1


# ---------------------------------------------------------------------------
# Direction and length of a gradient, apart
# ---------------------------------------------------------------------------


@settings(max_examples=30)
@given(
    st.integers(1, 50),
    st.floats(1e-3, 1e3),
    st.sampled_from([torch.float32, torch.float64]),
    st.integers(0, 1000),
)
def test_a_scaled_gradient_has_cosine_1_but_a_relative_difference(size, scale, dtype, seed):
    # The counterexample to "gradient error" as one number: a pure change of
    # scale is all length and no direction.
    g = torch.randn(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    assert cosine_similarity(scale * g, g) == pytest.approx(1.0, abs=1e-6)
    assert norm_ratio(scale * g, g) == pytest.approx(scale, rel=1e-6)
    assert relative_difference(scale * g, g) == pytest.approx(abs(scale - 1), rel=1e-5, abs=1e-6)


def test_a_turned_gradient_keeps_its_norm_but_loses_cosine():
    # Same relative difference (1.0), two different faults.
    g = torch.tensor([1.0, 0.0], dtype=torch.float64)
    doubled = 2 * g
    turned = torch.tensor([0.5, 3**0.5 / 2], dtype=torch.float64)  # 60 degrees
    assert relative_difference(doubled, g) == pytest.approx(1.0)
    assert relative_difference(turned, g) == pytest.approx(1.0)
    assert (cosine_similarity(doubled, g), norm_ratio(doubled, g)) == pytest.approx((1.0, 2.0))
    assert (cosine_similarity(turned, g), norm_ratio(turned, g)) == pytest.approx((0.5, 1.0))
    assert cosine_similarity(-g, g) == -1.0
    assert cosine_similarity(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0])) == 0.0


@settings(max_examples=30)
@given(st.integers(1, 40), st.integers(0, 1000), st.floats(0.01, 100))
def test_cosine_from_norms_is_the_direct_cosine(size, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    a = scale * torch.randn(size, generator=generator, dtype=torch.float64)
    b = torch.randn(size, generator=generator, dtype=torch.float64)
    derived = cosine_from_norms(norm_ratio(a, b), relative_difference(a, b))
    assert derived == pytest.approx(cosine_similarity(a, b), abs=1e-9)


def test_direction_and_length_errors():
    for function in (cosine_similarity, norm_ratio):
        with pytest.raises(ValueError, match="norm 0"):
            function(torch.ones(3), torch.zeros(3))
        with pytest.raises(ValueError, match="shape of reference"):
            function(torch.ones(3), torch.ones(2))
        with pytest.raises(TypeError, match="result"):
            function(torch.ones(3, dtype=torch.long), torch.ones(3))
    with pytest.raises(ValueError, match="result has norm 0"):
        cosine_similarity(torch.zeros(3), torch.ones(3))
    assert norm_ratio(torch.zeros(3), torch.ones(3)) == 0.0
    with pytest.raises(ValueError, match="gradient_norm_ratio must be finite and > 0"):
        cosine_from_norms(0.0, 0.5)
    with pytest.raises(ValueError, match="relative_gradient_error must be finite and >= 0"):
        cosine_from_norms(1.0, -0.1)
    with pytest.raises(ValueError, match="triangle inequality"):
        cosine_from_norms(1.0, 3.0)


# ---------------------------------------------------------------------------
# Packed rows: equal lengths are not equal scored counts
# ---------------------------------------------------------------------------


def test_packed_batch_layout():
    rows = [[(3, 2), (2, 1)], [(1, 4)]]
    input_ids, labels = make_packed_batch(rows, vocab_size=9, seed=0, total_length=9)
    assert input_ids.shape == labels.shape == (2, 9)
    # Examples start with BOS where the previous one ends.
    assert input_ids[0, 0] == input_ids[0, 5] == input_ids[1, 0] == BOS_TOKEN_ID
    assert torch.all(input_ids[0, 8:] == PAD_TOKEN_ID) and torch.all(input_ids[1, 5:] == PAD_TOKEN_ID)
    # Prompts masked: only answers are labels.
    scored = (labels != -100).tolist()
    assert scored[0] == [False, False, False, True, True, False, False, True, False]
    assert scored[1] == [False, True, True, True, True, False, False, False, False]
    assert count_scored_targets(labels) == 3 + 4
    # Answers count up from their own start.
    answer = input_ids[1, 1:5] - 2
    assert torch.all(answer[1:] == (answer[:-1] + 1) % 7)
    unmasked_ids, unmasked = make_packed_batch(rows, vocab_size=9, seed=0, total_length=9, mask_prompts=False)
    assert torch.equal(unmasked_ids, input_ids)
    assert torch.equal(unmasked == -100, input_ids == PAD_TOKEN_ID)


@settings(max_examples=20)
@given(
    st.lists(
        st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=1, max_size=3),
        min_size=1,
        max_size=4,
    ),
    st.integers(0, 1000),
)
def test_packed_counts_are_the_answers_when_prompts_are_masked(rows, seed):
    input_ids, labels = make_packed_batch(rows, vocab_size=CONFIG.vocab_size, seed=seed, total_length=50)
    for row, examples in enumerate(rows):
        assert count_scored_targets(labels[row : row + 1]) == sum(a for _, a in examples)
    _, unmasked = make_packed_batch(
        rows, vocab_size=CONFIG.vocab_size, seed=seed, total_length=50, mask_prompts=False
    )
    for row, examples in enumerate(rows):
        assert count_scored_targets(unmasked[row : row + 1]) == sum(p + a for p, a in examples) - 1


def test_packing_equalises_counts_only_when_every_token_is_scored(model):
    # The counterexample to "packed to a fixed length, counts are nearly
    # equal": every row holds the same 16 tokens, but masked prompts leave
    # rank 0 with 4 scored targets and rank 1 with 28.
    rows = [[(7, 1), (7, 1)]] * 2 + [[(1, 7), (1, 7)]] * 2
    assert {sum(p + a for p, a in examples) for examples in rows} == {16}
    ranks = [[1, 1], [1, 1]]
    masked = make_packed_batch(rows, vocab_size=CONFIG.vocab_size, seed=3)
    full = full_batch_step(model, *masked)
    per_rank = data_parallel_accumulation_step(model, *masked, ranks, "per_rank")
    assert per_rank.token_counts == (2, 2, 14, 14)
    assert abs(per_rank.loss - full.loss) / full.loss > 0.1
    assert cosine_similarity(per_rank.gradient, full.gradient) < 0.99
    glob = data_parallel_accumulation_step(model, *masked, ranks, "global")
    assert relative_difference(glob.gradient, full.gradient) < 1e-12
    # Pretraining-style packing: every token scored, counts equal, exact.
    pretraining = make_packed_batch(rows, vocab_size=CONFIG.vocab_size, seed=3, mask_prompts=False)
    full = full_batch_step(model, *pretraining)
    per_rank = data_parallel_accumulation_step(model, *pretraining, ranks, "per_rank")
    assert per_rank.token_counts == (15, 15, 15, 15)
    assert relative_difference(per_rank.gradient, full.gradient) < 1e-12


@pytest.mark.parametrize(
    ("rows", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "at least 1 row"),
        ("ab", {}, ValueError, "non-empty sequence"),
        ([[]], {}, ValueError, r"rows\[0\] must be a non-empty"),
        ([[(1, 2, 3)]], {}, ValueError, r"rows\[0\]\[0\] must be a pair"),
        ([[(0, 2)]], {}, ValueError, r"rows\[0\]\[0\]\[0\] must be >= 1"),
        ([[(1, 0)]], {}, ValueError, r"rows\[0\]\[0\]\[1\] must be >= 1"),
        ([[(1.5, 2)]], {}, TypeError, r"rows\[0\]\[0\]\[0\]"),
        ([[(2, 2)]], {"vocab_size": 2}, ValueError, "vocab_size must be >= 3"),
        ([[(2, 2)]], {"total_length": 3}, ValueError, "total_length must be >="),
        ([[(2, 2)]], {"mask_prompts": 1}, TypeError, "mask_prompts must be a bool"),
    ],
)
def test_packed_batch_errors(rows, kwargs, error, match):
    arguments = {"vocab_size": 9, "seed": 0, **kwargs}
    with pytest.raises(error, match=match):
        make_packed_batch(rows, **arguments)


# ---------------------------------------------------------------------------
# Quoting source by markers
# ---------------------------------------------------------------------------


def _quoted(value):
    total = 0
    if value:
        # start here
        total += value
        total *= 2  # stop here
    return total


class _Holder:
    def method(self):
        first = 1
        second = 2
        return first + second


def test_source_excerpt_runs_from_marker_to_marker_dedented():
    assert source_excerpt(_quoted, "start here", "stop here") == (
        "# start here\ntotal += value\ntotal *= 2  # stop here"
    )
    assert source_excerpt(_quoted, "start here", "stop here", before=1) == (
        "if value:\n    # start here\n    total += value\n"
        "    total *= 2  # stop here"
    )
    assert source_excerpt(_Holder().method, "second", "return") == (
        "second = 2\nreturn first + second"
    )


def test_source_excerpt_looks_for_the_last_marker_from_the_first():
    # "total" also occurs above the first marker ("total = 0").
    assert source_excerpt(_quoted, "start here", "total") == (
        "# start here\ntotal += value"
    )
    assert source_excerpt(_quoted, "total *= 2", "total") == (
        "total *= 2  # stop here"
    )


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((len, "a", "b"), {}, TypeError, "function must be a Python function"),
        ((_quoted, 1, "b"), {}, TypeError, "first_marker must be a str"),
        ((_quoted, "total", ""), {}, ValueError, "last_marker must be a non-empty"),
        ((_quoted, "absent", "total"), {}, ValueError, "first_marker 'absent' does not occur"),
        ((_quoted, "stop here", "if value"), {}, ValueError, "last_marker 'if value'"),
        ((_quoted, "total", "total"), {"before": -1}, ValueError, "before must be >= 0"),
        ((_quoted, "total", "total"), {"before": 1.0}, TypeError, "before must be an int"),
        ((_quoted, "total = 0", "total"), {"before": 3}, ValueError, "before must be <= 1"),
    ],
)
def test_source_excerpt_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        source_excerpt(*args, **kwargs)
