"""Tests of companion.testing: the assertions pass on good batches and models,
fail with the findings table on bad ones, and honour ``fail_on``."""

from __future__ import annotations

import pytest
import torch

from companion import IGNORE_INDEX
from companion.batch_check import Severity
from companion.experiments import tiny_models as tm
from companion.experiments.batch_check import MeanLossModel
from companion.experiments.denominator import make_counting_batch
from companion.testing import assert_batch_ok, assert_loss_batch_invariant


def padded_batch() -> dict[str, torch.Tensor]:
    ids, labels = make_counting_batch([3, 9, 20, 6], vocab_size=24, seed=0)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": labels}


def test_assert_batch_ok_returns_the_findings_of_a_good_batch():
    assert assert_batch_ok(padded_batch(), vocab_size=24) == []
    # a warning does not fail by default ...
    findings = assert_batch_ok(padded_batch(), micro_batch_size=1)
    assert [f.code for f in findings] == ["micro-batch-imbalance"]
    assert findings[0].severity is Severity.WARNING
    # ... and does with fail_on="warning"
    with pytest.raises(AssertionError, match="micro-batch-imbalance"):
        assert_batch_ok(padded_batch(), micro_batch_size=1, fail_on="warning")


def test_assert_batch_ok_fails_with_the_table():
    batch = padded_batch()
    batch["labels"] = batch["input_ids"].clone()
    with pytest.raises(AssertionError) as info:
        assert_batch_ok(batch)
    message = str(info.value)
    assert message.startswith("batch check: 1 finding(s) at or above error (padding-scored)")
    assert "see book/02_llava_loss.html#llava-attention-filter" in message


def test_assert_batch_ok_passes_its_options_on():
    batch = padded_batch()
    with pytest.raises(AssertionError, match="input-id-out-of-range"):
        assert_batch_ok(batch, vocab_size=10)
    with pytest.raises(TypeError, match="^vocab_size"):
        assert_batch_ok(batch, vocab_size=10.0)


def test_assert_loss_batch_invariant_on_the_tiny_models():
    batch = padded_batch()
    tiny = tm.build_tiny_lm(seed=0)
    findings = assert_loss_batch_invariant(tiny, batch)
    assert [f.code for f in findings] == ["model-computes-no-loss"]
    with pytest.raises(AssertionError, match="model-computes-no-loss"):
        assert_loss_batch_invariant(tiny, batch, fail_on="info")
    with pytest.raises(AssertionError, match=r"loss check: 1 finding\(s\) at or above error \(micro-batch-mismatch\)"):
        assert_loss_batch_invariant(MeanLossModel(tiny), batch)
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(tm.tiny_llama_config()).eval()
    assert assert_loss_batch_invariant(llama, batch, micro_batch_size=2, fail_on="info") == []


@pytest.mark.parametrize("fail_on", ["fatal", "ERROR", None, 2, Severity])
def test_fail_on_must_be_a_severity(fail_on):
    with pytest.raises(ValueError, match="^fail_on must be one of"):
        assert_batch_ok(padded_batch(), fail_on=fail_on)


def test_fail_on_accepts_the_enum_itself():
    batch = padded_batch()
    batch["labels"][:, 1:] = IGNORE_INDEX
    with pytest.raises(AssertionError, match="batch-without-targets"):
        assert_batch_ok(batch, fail_on=Severity.ERROR)
