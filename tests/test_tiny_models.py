"""Tests of companion.tiny_models: the real models' losses equal the package's."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

from companion import IGNORE_INDEX, reference
from companion import tiny_models as tm
from companion.causal_lm_loss import (
    attention_mask_filter_loss,
    count_scored_targets,
    label_padding_loss,
    shift_and_slice_loss,
    unshifted_token_loss,
)
from companion.plots import TEXT_WIDTH_IN
from companion.plots.labels import (
    PADDING,
    SCORED,
    label_layout_grid,
    plot_label_layout,
)

matplotlib.use("Agg")

PROMPTS, ANSWERS = (2, 5, 3), (6, 2, 3)


@pytest.fixture(scope="module")
def batch() -> tm.LlavaTrainingBatch:
    return tm.build_llava_batch(PROMPTS, ANSWERS, seed=0)


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
    codes = tm.SEGMENT_CODES
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
    cut = tm.first_answer_position(batch)
    assert cut == 1 + tm.image_token_count() + min(PROMPTS)
    assert not (batch.segments[:, :cut] == tm.SEGMENT_CODES["answer"]).any()
    assert (batch.segments[:, cut] == tm.SEGMENT_CODES["answer"]).any()
    assert count_scored_targets(batch.labels[:, :cut]) == 0
    no_answer = tm.LlavaTrainingBatch(
        batch.input_ids, batch.attention_mask, batch.labels,
        batch.pixel_values,
        batch.segments.masked_fill(
            batch.segments == tm.SEGMENT_CODES["answer"],
            tm.SEGMENT_CODES["prompt"],
        ),
    )
    with pytest.raises(ValueError, match="answer in every row"):
        tm.first_answer_position(no_answer)


def test_batch_is_deterministic_per_seed():
    a = tm.build_llava_batch(PROMPTS, ANSWERS, seed=1)
    b = tm.build_llava_batch(PROMPTS, ANSWERS, seed=1)
    c = tm.build_llava_batch(PROMPTS, ANSWERS, seed=2)
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
        tm.build_llava_batch(prompts, answers)


def test_answer_only_labels(batch):
    answers = tm.answer_only_labels(batch)
    assert answers.shape == (3, max(ANSWERS))
    for row, a in enumerate(ANSWERS):
        assert torch.equal(answers[row, :a], batch.labels[row][batch.labels[row] != IGNORE_INDEX])
        assert (answers[row, a:] == IGNORE_INDEX).all()


# --- the configs --------------------------------------------------------------------


def test_special_ids_lie_inside_the_vocabulary():
    # Out-of-vocabulary special ids make transformers log a warning per model.
    models = [tm.tiny_llava(), tm.tiny_gpt_bigcode(), tm.tiny_gpt_neox_japanese(),
              tm.tiny_instructblip(language_model="t5")]
    for model in models:
        text = model.config.get_text_config()
        assert text.vocab_size == tm.VOCAB_SIZE
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            assert 0 <= getattr(text, name) < tm.VOCAB_SIZE


def test_unknown_language_model_is_rejected():
    with pytest.raises(ValueError, match="language_model must be 'llama' or 't5'"):
        tm.tiny_instructblip(language_model="opt")


def test_layer_counts_and_sizes_are_the_module_constants():
    config = tm.tiny_llava().config
    vision, text = config.vision_config, config.text_config
    assert vision.num_hidden_layers == tm.VISION_LAYERS
    assert (vision.image_size, vision.patch_size) == (
        tm.IMAGE_SIZE, tm.PATCH_SIZE
    )
    assert text.num_hidden_layers == tm.TEXT_LAYERS
    assert text.hidden_size == tm.HIDDEN_SIZE
    assert text.initializer_range == tm.TEXT_INIT_STD
    for model in (tm.tiny_gpt_bigcode(), tm.tiny_gpt_neox_japanese(),
                  tm.tiny_instructblip(language_model="t5")):
        assert model.config.get_text_config().num_hidden_layers == (
            tm.TEXT_LAYERS
        )


def test_text_init_std_sets_the_spread_of_the_llama_weights():
    from transformers import LlamaConfig

    default = LlamaConfig().initializer_range
    model = tm.tiny_llava(seed=0, text_init_std=default)
    assert model.config.text_config.initializer_range == default
    assert tm.tiny_llava().config.text_config.initializer_range == (
        tm.TEXT_INIT_STD
    )
    weight = model.lm_head.weight.detach()
    assert float(weight.std()) == pytest.approx(default, rel=0.1)
    with pytest.raises(ValueError, match="init_std must be > 0"):
        tm.tiny_llama_config(0.0)
    with pytest.raises(TypeError, match="init_std must be a float"):
        tm.tiny_llama_config("0.02")


def test_models_are_seeded():
    a, b = tm.tiny_llava(seed=3), tm.tiny_llava(seed=3)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), name


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
    padding = batch.segments == tm.SEGMENT_CODES["padding"]
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
    checks = tm.check_family_losses(batch, seed=0)
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
    labels = tm.answer_only_labels(batch)
    shifted = model.language_model._shift_right(labels)
    assert (shifted[:, 0] == tm.PAD_TOKEN_ID).all()
    expected = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, tm.PAD_TOKEN_ID)
    assert torch.equal(shifted[:, 1:], expected)
    with torch.no_grad():
        out = model(**batch.model_inputs() | {"labels": labels,
                                               "qformer_input_ids": batch.input_ids})
    assert out.logits.shape[:2] == labels.shape
    assert abs(float(out.loss) - float(unshifted_token_loss(out.logits, labels))) < 1e-6


# --- the figure ------------------------------------------------------------------------


def test_label_layout_grid_and_figure(batch):
    grid = label_layout_grid(batch.labels, batch.attention_mask)
    assert int((grid == SCORED).sum()) == count_scored_targets(batch.labels)
    assert np.array_equal(grid == PADDING, (batch.attention_mask == 0).numpy())
    fig = plot_label_layout(batch.labels, batch.attention_mask, batch.segments, tm.SEGMENT_CODES)
    ax = fig.axes[0]
    assert ax.get_xlabel() and ax.get_ylabel()
    assert np.array_equal(ax.images[0].get_array(), grid)
    assert f"{count_scored_targets(batch.labels)} of" in ax.get_title()
    # drawn at the text width, every text at least 9 pt
    assert fig.get_size_inches()[0] == pytest.approx(TEXT_WIDTH_IN)
    texts = [*ax.texts, *ax.get_legend().get_texts(),
             *ax.get_xticklabels(), *ax.get_yticklabels(),
             ax.xaxis.label, ax.yaxis.label, ax.title]
    assert all(t.get_fontsize() >= 9 for t in texts)
    matplotlib.pyplot.close(fig)


def test_label_layout_checks_its_arguments(batch):
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        label_layout_grid(batch.labels, batch.attention_mask[:, :-1])
    with pytest.raises(TypeError, match="labels must hold integer"):
        label_layout_grid(batch.labels.float(), batch.attention_mask)
