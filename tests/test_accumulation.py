"""Tests of companion.accumulation: the reductions, the rule for the loss of a
micro-batch, and the library facts the chapter states."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from companion import reference
from companion.accumulation import (
    count_items_in_batch,
    mean_of_means,
    micro_batch_loss,
    token_mean,
    token_weight_factors,
)
from companion.causal_lm_loss import count_scored_targets, label_padding_loss
from companion.experiments.denominator import make_counting_batch
from tests.shared import logits_and_labels

TIGHT = 1e-12


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
# The rule: count once, divide every micro-batch's sum by it, times R
# ---------------------------------------------------------------------------


@given(logits_and_labels(), st.integers(1, 3), st.integers(1, 4))
def test_micro_batch_loss_is_world_size_times_the_sum_over_num_items(pair, num_items, world_size):
    logits, labels = pair
    got = micro_batch_loss(logits, labels, num_items_in_batch=num_items, world_size=world_size)
    expected = world_size * reference.causal_lm_loss(
        logits.numpy(), labels.numpy(), num_items_in_batch=num_items
    )
    assert float(got) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@given(logits_and_labels(), st.data())
def test_micro_batches_with_the_counted_items_add_up_to_the_full_batch(pair, data):
    logits, labels = pair
    batch = logits.shape[0]
    cut = data.draw(st.integers(0, batch))
    pieces = [(logits[:cut], labels[:cut]), (logits[cut:], labels[cut:])]
    pieces = [(x, y) for x, y in pieces if len(y)]
    total = count_items_in_batch([y for _, y in pieces])
    assert total == count_scored_targets(labels)
    if total == 0:
        return
    summed = sum(float(micro_batch_loss(x, y, num_items_in_batch=total)) for x, y in pieces)
    assert summed == pytest.approx(float(label_padding_loss(logits, labels)), rel=1e-12)


def test_micro_batch_loss_needs_a_count_and_a_world_size():
    logits, labels = torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]])
    with pytest.raises(TypeError, match="num_items_in_batch must be the scored targets"):
        micro_batch_loss(logits, labels, num_items_in_batch=None)
    with pytest.raises(ValueError, match="num_items_in_batch must be >= 1"):
        micro_batch_loss(logits, labels, num_items_in_batch=0)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        micro_batch_loss(logits, labels, num_items_in_batch=2, world_size=0)
    with pytest.raises(TypeError, match="micro_batch_labels must be a sequence"):
        count_items_in_batch(labels)
    with pytest.raises(ValueError, match="at least one micro-batch"):
        count_items_in_batch([])


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
