"""Tests of companion.accumulation: reductions, the accumulated step, and the library facts the chapter states."""

from __future__ import annotations

import inspect
import math

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

matplotlib.use("Agg")

from companion import reference  # noqa: E402
from companion.accumulation import (  # noqa: E402
    BOS_TOKEN_ID,
    PAD_TOKEN_ID,
    TinyCausalLM,
    TinyLMConfig,
    accumulation_step,
    build_tiny_lm,
    count_scored_tokens,
    data_parallel_accumulation_step,
    flat_gradient,
    full_batch_step,
    make_counting_batch,
    mean_of_means,
    naive_error_by_imbalance,
    relative_difference,
    split_rows,
    token_loss_sum,
    token_losses,
    token_mean,
    token_weight_factors,
    warm_up,
)
from companion.plots.denominator import (  # noqa: E402
    plot_naive_error_vs_imbalance,
    plot_token_weights,
)

CONFIG = TinyLMConfig(vocab_size=12, hidden_size=16, num_heads=2, max_length=24)
TIGHT = 1e-12


@pytest.fixture(scope="module")
def model() -> TinyCausalLM:
    trained = build_tiny_lm(CONFIG, seed=0)
    warm_up(trained, steps=15, longest_row=16)
    return trained


groups = st.lists(
    st.tuples(st.floats(0.0, 50.0, allow_nan=False), st.integers(1, 40)), min_size=1, max_size=8
)


# ---------------------------------------------------------------------------
# The reductions
# ---------------------------------------------------------------------------


@given(groups)
def test_token_mean_is_total_over_count(pairs):
    sums, counts = [p[0] for p in pairs], [p[1] for p in pairs]
    expected = np.sum(np.asarray(sums, dtype=np.float64)) / np.sum(counts)
    assert token_mean(sums, counts) == pytest.approx(expected, rel=TIGHT, abs=TIGHT)


@given(groups)
def test_mean_of_means_averages_group_means(pairs):
    sums, counts = [p[0] for p in pairs], [p[1] for p in pairs]
    expected = np.mean(np.asarray(sums, dtype=np.float64) / np.asarray(counts))
    assert mean_of_means(sums, counts) == pytest.approx(expected, rel=TIGHT, abs=TIGHT)


@given(groups, st.lists(st.integers(1, 9), min_size=8, max_size=8))
def test_weighted_mean_of_means(pairs, raw_weights):
    sums, counts = [p[0] for p in pairs], [p[1] for p in pairs]
    weights = raw_weights[: len(pairs)]
    means = np.asarray(sums, dtype=np.float64) / np.asarray(counts)
    expected = np.sum(np.asarray(weights) * means) / np.sum(weights)
    assert mean_of_means(sums, counts, weights) == pytest.approx(expected, rel=TIGHT, abs=TIGHT)


@given(groups)
def test_weight_factors_link_the_two_reductions(pairs):
    sums, counts = [p[0] for p in pairs], [p[1] for p in pairs]
    factors = token_weight_factors(counts)
    total = sum(counts)
    assert sum(n * f for n, f in zip(counts, factors)) == pytest.approx(total, rel=TIGHT)
    # mean of means = sum_k factor_k * S_k / N: each token of group k weighs factor_k / N.
    rebuilt = sum(f * s for f, s in zip(factors, sums)) / total
    assert mean_of_means(sums, counts) == pytest.approx(rebuilt, rel=1e-10, abs=TIGHT)


@given(st.lists(st.floats(0.0, 50.0, allow_nan=False), min_size=1, max_size=8), st.integers(1, 30))
def test_equal_counts_make_the_reductions_agree(sums, count):
    counts = [count] * len(sums)
    assert mean_of_means(sums, counts) == pytest.approx(token_mean(sums, counts), rel=1e-12, abs=TIGHT)


def test_worked_example_differs_a_lot():
    sums, counts = [2 * 3.0, 30 * 0.5], [2, 30]
    assert token_mean(sums, counts) == pytest.approx(21 / 32)
    assert mean_of_means(sums, counts) == pytest.approx(1.75)


@pytest.mark.parametrize(
    ("sums", "counts", "error", "match"),
    [
        ([1.0], [0], ValueError, "no scored token"),
        ([1.0, 2.0], [1], ValueError, "one entry per group"),
        ([], [], ValueError, "at least one group"),
        ([1.0], [-1], ValueError, r"counts\[0\] must be >= 0"),
        ([1.0], [True], TypeError, r"counts\[0\] must be an int"),
        ([1.0], [1.5], TypeError, r"counts\[0\] must be an int"),
        ("ab", [1, 1], TypeError, "sums must be a sequence"),
    ],
)
def test_reduction_errors_name_the_argument(sums, counts, error, match):
    with pytest.raises(error, match=match):
        mean_of_means(sums, counts)


def test_token_mean_rejects_zero_total_but_allows_an_empty_group():
    assert token_mean([0.0, 3.0], [0, 2]) == 1.5
    with pytest.raises(ValueError, match="0/0"):
        token_mean([0.0, 0.0], [0, 0])


def test_mean_of_means_rejects_bad_weights():
    with pytest.raises(ValueError, match="one entry per group"):
        mean_of_means([1.0, 2.0], [1, 1], [1.0])
    with pytest.raises(ValueError, match="not all 0"):
        mean_of_means([1.0, 2.0], [1, 1], [0.0, 0.0])


# ---------------------------------------------------------------------------
# Summed loss and token count against the float64 reference
# ---------------------------------------------------------------------------


@st.composite
def logits_and_labels(draw):
    batch = draw(st.integers(1, 4))
    time = draw(st.integers(2, 7))
    vocab = draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2**16))
    ignore_fraction = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, time, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    drop = torch.rand(batch, time, generator=generator) < ignore_fraction
    return logits, labels.masked_fill(drop, -100)


@given(logits_and_labels())
def test_count_scored_tokens_counts_shifted_labels(pair):
    _, labels = pair
    assert count_scored_tokens(labels) == int(np.sum(labels.numpy()[:, 1:] != -100))


@given(logits_and_labels())
def test_token_loss_sum_matches_reference(pair):
    logits, labels = pair
    expected = reference.causal_lm_loss(logits.numpy(), labels.numpy(), num_items_in_batch=1)
    got = token_loss_sum(logits, labels)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(logits_and_labels())
def test_token_losses_match_reference_per_position(pair):
    logits, labels = pair
    batch, time, vocab = logits.shape
    got = token_losses(logits, labels)
    assert got.shape == (batch, time - 1)
    expected = reference.cross_entropy(
        logits[:, :-1].reshape(-1, vocab).numpy(), labels[:, 1:].reshape(-1).numpy(), reduction="none"
    ).reshape(batch, time - 1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_token_loss_sum_without_targets_is_zero_and_differentiable():
    logits = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = torch.full((2, 3), -100)
    total = token_loss_sum(logits, labels)
    total.backward()
    assert total.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_token_loss_sum_errors():
    with pytest.raises(TypeError, match="labels must hold integer"):
        token_loss_sum(torch.zeros(1, 2, 3), torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        token_loss_sum(torch.zeros(1, 2, 3), torch.tensor([[0, 5]]))
    with pytest.raises(ValueError, match="logits must be a 3-D"):
        token_loss_sum(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long))


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
    assert count_scored_tokens(labels) == 0 + 3 + 5


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


def test_tiny_lm_is_causal_so_right_padding_changes_nothing(model):
    input_ids, _ = make_counting_batch([5, 9], vocab_size=CONFIG.vocab_size, seed=1)
    with torch.no_grad():
        together = model(input_ids)
        alone = model(input_ids[:1, :5])
        changed = input_ids.clone()
        changed[0, 5:] = 3
        with_other_padding = model(changed)
    assert torch.allclose(together[0, :5], alone[0], rtol=0, atol=1e-12)
    assert torch.allclose(together[0, :5], with_other_padding[0, :5], rtol=0, atol=1e-12)


def test_tiny_lm_rejects_bad_input(model):
    with pytest.raises(TypeError, match="input_ids must hold integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="config.max_length"):
        model(torch.zeros(1, CONFIG.max_length + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        TinyCausalLM(TinyLMConfig(hidden_size=10, num_heads=3))


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
            counts.append(count_scored_tokens(piece_labels))
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
            counts.append(count_scored_tokens(lab))
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


# ---------------------------------------------------------------------------
# Library behaviour the chapter states
# ---------------------------------------------------------------------------


def test_pytorch_mean_over_no_target_is_nan_with_a_zero_gradient():
    logits = torch.zeros(3, 4, requires_grad=True)
    targets = torch.full((3,), -100)
    mean = F.cross_entropy(logits, targets, reduction="mean")
    assert math.isnan(mean.item())
    assert F.cross_entropy(logits, targets, reduction="sum").item() == 0.0
    # The nan does not reach the gradient: no target, nothing to push.
    (mean / 2).backward()
    assert torch.count_nonzero(logits.grad) == 0


@given(logits_and_labels(), st.integers(1, 50))
@settings(max_examples=30)
def test_transformers_causal_lm_loss_divides_the_sum_by_num_items(pair, num_items):
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, labels = pair
    vocab = logits.shape[-1]
    with_items = ForCausalLMLoss(logits, labels, vocab, num_items_in_batch=torch.tensor(num_items))
    # ForCausalLMLoss calls logits.float(): float64 logits are scored in float32.
    assert with_items.dtype == torch.float32
    expected = reference.causal_lm_loss(logits.numpy(), labels.numpy(), num_items_in_batch=num_items)
    assert float(with_items) == pytest.approx(expected, rel=1e-5, abs=1e-5)
    without = float(ForCausalLMLoss(logits, labels, vocab))
    mean = reference.causal_lm_loss(logits.numpy(), labels.numpy())
    if math.isnan(mean):
        assert math.isnan(without)
    else:
        assert without == pytest.approx(mean, rel=1e-5, abs=1e-5)


def test_llama_forward_uses_num_items_in_batch():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).double().eval()
    input_ids, labels = make_counting_batch([4, 9], vocab_size=16, seed=0)
    with torch.no_grad():
        out = llama(input_ids=input_ids, labels=labels, num_items_in_batch=torch.tensor(40))
        plain = llama(input_ids=input_ids, labels=labels)
    logits = out.logits.numpy()
    assert float(out.loss) == pytest.approx(
        reference.causal_lm_loss(logits, labels.numpy(), num_items_in_batch=40), rel=1e-5
    )
    assert float(plain.loss) == pytest.approx(reference.causal_lm_loss(logits, labels.numpy()), rel=1e-5)
    # The same logits with the sum divided by 40 instead of the 11 scored targets.
    assert float(out.loss) == pytest.approx(float(plain.loss) * 11 / 40, rel=1e-5)


def test_trainer_counts_shifted_labels_and_rescales_for_data_parallel():
    from transformers import Trainer, TrainingArguments

    counting = inspect.getsource(Trainer._get_num_items_in_batch)
    assert 'batch["labels"][..., 1:]' in counting
    assert "labels.ne(-100).sum()" in counting
    assert "self.accelerator.gather(num_items_in_batch" in counting
    compute_loss = inspect.getsource(Trainer.compute_loss)
    assert "loss_scale = self.accelerator.num_processes" in compute_loss
    assert "loss *= loss_scale" in compute_loss
    fields = TrainingArguments.__dataclass_fields__
    assert fields["average_tokens_across_devices"].default is True


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def test_token_weight_figure_shows_both_reductions():
    fig = plot_token_weights([2, 30])
    ax = fig.axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == pytest.approx([1.0, 1.0, 32 / 4, 32 / 60])
    assert ax.get_ylabel() and ax.get_xlabel()
    matplotlib.pyplot.close(fig)


def test_imbalance_figure_plots_its_data():
    fig = plot_naive_error_vs_imbalance([1, 2, 4], [0.0, 0.1, 0.2], [0.0, 0.3, 0.6], [0.0, 0.0, 0.0])
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 3
    assert list(lines[0].get_ydata()) == pytest.approx([0.0, 30.0, 60.0])
    assert "%" in ax.get_ylabel() and ax.get_xlabel()
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="same length"):
        plot_naive_error_vs_imbalance([1, 2], [0.0], [0.0], [0.0])
