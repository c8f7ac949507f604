"""Tests of companion.experiments.llava: the batch, and the real models'
losses equal the package's."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from companion import IGNORE_INDEX, reference
from companion.causal_lm_loss import (
    attention_mask_filter_loss,
    count_scored_targets,
    label_padding_loss,
    shift_and_slice_loss,
    unshifted_token_loss,
)
from companion.experiments import llava as lv
from companion.experiments import tiny_models as tm


PROMPTS, ANSWERS = (2, 5, 3), (6, 2, 3)


@pytest.fixture(scope="module")
def batch() -> lv.LlavaTrainingBatch:
    return lv.build_llava_batch(PROMPTS, ANSWERS, seed=0)


@pytest.fixture(scope="module")
def llava():
    return tm.tiny_llava(seed=0)


@pytest.fixture(scope="module")
def llava_logits(llava, batch) -> torch.Tensor:
    with torch.no_grad():
        return llava(**batch.model_inputs()).logits


# --- the batch ----------------------------------------------------------------------


def test_batch_layout(batch):
    n_image = tm.image_token_count()
    lengths = [1 + n_image + p + a for p, a in zip(PROMPTS, ANSWERS)]
    assert batch.input_ids.shape == (3, max(lengths))
    assert batch.pixel_values.shape == (3, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE)
    codes = lv.SEGMENT_CODES
    for row, (p, a) in enumerate(zip(PROMPTS, ANSWERS)):
        ids, seg, lab = batch.input_ids[row], batch.segments[row], batch.labels[row]
        assert ids[0] == tm.BOS_TOKEN_ID
        assert (ids[1 : 1 + n_image] == tm.IMAGE_TOKEN_ID).all()
        assert int((ids == tm.IMAGE_TOKEN_ID).sum()) == n_image
        answer = seg == codes["answer"]
        assert int(answer.sum()) == a and int((seg == codes["prompt"]).sum()) == p
        # only the answer is supervised, and with the input's own ids
        assert torch.equal(lab[answer], ids[answer])
        assert (lab[~answer] == IGNORE_INDEX).all()
        assert ids[answer][-1] == tm.EOS_TOKEN_ID
        padding = seg == codes["padding"]
        assert int(padding.sum()) == max(lengths) - lengths[row]
        assert (ids[padding] == tm.PAD_TOKEN_ID).all()
        assert torch.equal(batch.attention_mask[row], (~padding).long())
    assert count_scored_targets(batch.labels) == sum(ANSWERS)


def test_first_answer_position(batch):
    cut = lv.first_answer_position(batch)
    assert cut == 1 + tm.image_token_count() + min(PROMPTS)
    assert not (batch.segments[:, :cut] == lv.SEGMENT_CODES["answer"]).any()
    assert (batch.segments[:, cut] == lv.SEGMENT_CODES["answer"]).any()
    assert count_scored_targets(batch.labels[:, :cut]) == 0
    no_answer = lv.LlavaTrainingBatch(
        batch.input_ids, batch.attention_mask, batch.labels,
        batch.pixel_values,
        batch.segments.masked_fill(
            batch.segments == lv.SEGMENT_CODES["answer"],
            lv.SEGMENT_CODES["prompt"],
        ),
    )
    with pytest.raises(ValueError, match="answer in every row"):
        lv.first_answer_position(no_answer)


def test_batch_is_deterministic_per_seed():
    a = lv.build_llava_batch(PROMPTS, ANSWERS, seed=1)
    b = lv.build_llava_batch(PROMPTS, ANSWERS, seed=1)
    c = lv.build_llava_batch(PROMPTS, ANSWERS, seed=2)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize(
    ("prompts", "answers", "error", "message"),
    [
        ((2, 3), (1,), ValueError, "equal length"),
        ((), (), ValueError, "non-empty"),
        ((0,), (2,), ValueError, r"prompt_lengths\[0\] must be >= 1"),
        ((2,), (1.5,), TypeError, r"answer_lengths\[0\] must be an int"),
    ],
)
def test_batch_arguments_are_checked(prompts, answers, error, message):
    with pytest.raises(error, match=message):
        lv.build_llava_batch(prompts, answers)


def test_answer_only_labels(batch):
    answers = lv.answer_only_labels(batch)
    assert answers.shape == (3, max(ANSWERS))
    for row, a in enumerate(ANSWERS):
        assert torch.equal(answers[row, :a], batch.labels[row][batch.labels[row] != IGNORE_INDEX])
        assert (answers[row, a:] == IGNORE_INDEX).all()


# --- LLaVA's loss is the package's loss ----------------------------------------------


def test_llava_uses_for_causal_lm_loss(llava):
    from transformers.loss.loss_utils import ForCausalLMLoss

    assert llava.loss_type == "ForConditionalGeneration"
    assert llava.loss_function is ForCausalLMLoss


@pytest.mark.parametrize(
    "build",
    [tm.tiny_vip_llava, tm.tiny_instructblip, tm.tiny_gpt_bigcode, tm.tiny_gpt_neox_japanese],
)
def test_the_family_uses_for_causal_lm_loss(build):
    from transformers.loss.loss_utils import ForCausalLMLoss

    assert build().loss_function is ForCausalLMLoss


def test_llava_loss_equals_every_formulation(llava, batch, llava_logits):
    with torch.no_grad():
        model_loss = float(llava(**batch.model_inputs()).loss)
    for ours in (
        shift_and_slice_loss(llava_logits, batch.labels),
        label_padding_loss(llava_logits, batch.labels),
        attention_mask_filter_loss(llava_logits, batch.labels, batch.attention_mask),
    ):
        assert abs(float(ours) - model_loss) < 1e-6
    expected = reference.causal_lm_loss(llava_logits.double().numpy(), batch.labels.numpy())
    assert model_loss == pytest.approx(expected, rel=1e-6)


def test_llava_loss_with_num_items_in_batch(llava, batch, llava_logits):
    total = count_scored_targets(batch.labels) + 4
    with torch.no_grad():
        model_loss = float(llava(**batch.model_inputs(), num_items_in_batch=torch.tensor(total)).loss)
    ours = float(label_padding_loss(llava_logits, batch.labels, num_items_in_batch=total))
    assert abs(model_loss - ours) < 1e-6
    expected = reference.causal_lm_loss(
        llava_logits.double().numpy(), batch.labels.numpy(), num_items_in_batch=total
    )
    assert model_loss == pytest.approx(expected, rel=1e-6)


def test_llava_padding_labelled_with_pad_ids_splits_old_and_new(llava, batch, llava_logits):
    padding = batch.segments == lv.SEGMENT_CODES["padding"]
    labels = torch.where(padding, batch.input_ids, batch.labels)
    with torch.no_grad():
        model_loss = float(llava(**{**batch.model_inputs(), "labels": labels}).loss)
    legacy = float(attention_mask_filter_loss(llava_logits, labels, batch.attention_mask))
    assert abs(model_loss - float(label_padding_loss(llava_logits, labels))) < 1e-6
    # the old mask filter removes the padded targets: back to the answer-only loss
    assert abs(legacy - float(label_padding_loss(llava_logits, batch.labels))) < 1e-6
    assert abs(model_loss - legacy) > 1e-3


def test_llava_all_labels_ignored_gives_nan_and_zero_gradients(batch):
    model = tm.tiny_llava(seed=0)
    labels = torch.full_like(batch.labels, IGNORE_INDEX)
    loss = model(**{**batch.model_inputs(), "labels": labels}).loss
    loss.backward()
    assert math.isnan(float(loss.detach()))
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert gradients and all(torch.count_nonzero(g) == 0 for g in gradients)


# --- the family ------------------------------------------------------------------------


def test_family_losses(batch):
    checks = lv.check_family_losses(batch, seed=0)
    names = [(c.model, c.language_model) for c in checks]
    assert names == [
        ("LlavaForConditionalGeneration", "Llama"),
        ("VipLlavaForConditionalGeneration", "Llama"),
        ("InstructBlipForConditionalGeneration", "Llama"),
        ("InstructBlipForConditionalGeneration", "T5 (encoder-decoder)"),
        ("GPTBigCodeForCausalLM", "GPT BigCode"),
        ("GPTNeoXJapaneseForCausalLM", "GPT-NeoX-Japanese"),
    ]
    for check in checks:
        assert math.isfinite(check.model_loss)
        if check.language_model.startswith("T5"):
            # the decoder is fed the labels shifted right: no shift in the loss
            assert abs(check.model_loss - check.unshifted) < 1e-6
            assert abs(check.model_loss - check.shift_and_slice) > 1e-3
        else:
            assert abs(check.model_loss - check.shift_and_slice) < 1e-6
            assert abs(check.model_loss - check.label_padding) < 1e-6
            assert abs(check.model_loss - check.unshifted) > 1e-3
        row = check.as_row()
        assert row["diff shifted"] == abs(check.model_loss - check.shift_and_slice)
        assert row["diff unshifted"] == abs(check.model_loss - check.unshifted)
        assert check.model.startswith(row["model"])
        assert not row["model"].endswith(("ForConditionalGeneration",
                                          "ForCausalLM"))
    # the table the chapter prints fits in 79 columns
    table = pd.DataFrame([c.as_row() for c in checks]).to_string(
        index=False, float_format="{:.4f}".format
    )
    assert max(len(line) for line in table.splitlines()) <= 79


def test_t5_decoder_input_is_labels_shifted_right(batch):
    model = tm.tiny_instructblip(language_model="t5")
    labels = lv.answer_only_labels(batch)
    shifted = model.language_model._shift_right(labels)
    assert (shifted[:, 0] == tm.PAD_TOKEN_ID).all()
    expected = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, tm.PAD_TOKEN_ID)
    assert torch.equal(shifted[:, 1:], expected)
    with torch.no_grad():
        out = model(**batch.model_inputs() | {"labels": labels,
                                               "qformer_input_ids": batch.input_ids})
    assert out.logits.shape[:2] == labels.shape
    assert abs(float(out.loss) - float(unshifted_token_loss(out.logits, labels))) < 1e-6
