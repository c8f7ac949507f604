"""Tests of companion.experiments.llava: the batch, and the real models'
losses equal the package's."""

from __future__ import annotations

import math

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
    table = lv.family_loss_table(checks)
    assert max(len(line) for line in table.splitlines()) <= 79
    assert len(table.splitlines()) == 1 + len(checks)


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


# --- the chapter's table, copy sizes and wording ------------------------------------


def _check(model, model_loss, shift_and_slice, unshifted):
    return lv.FamilyLossCheck(
        model=model, language_model="Llama", model_loss=model_loss,
        shift_and_slice=shift_and_slice, label_padding=shift_and_slice,
        unshifted=unshifted,
    )


def test_family_loss_table_shows_rounding_as_a_bound_and_the_rest_to_4_decimals():
    table = lv.family_loss_table([
        _check("LlavaForConditionalGeneration", 5.574510574, 5.574510812, 5.341210574),
        _check("GPTBigCodeForCausalLM", 4.79903, 4.61829, 4.7990301),
    ])
    header, llava_row, bigcode_row = table.splitlines()
    assert header.split() == [
        "model", "text", "model", "model", "loss", "diff", "shifted",
        "diff", "unshifted",
    ]
    # 2.4e-7 is float32 rounding: a bound on every machine, never 0.0000
    assert llava_row.split() == ["Llava", "Llama", "5.5745", "<", "1e-6", "0.2333"]
    assert bigcode_row.split() == ["GPTBigCode", "Llama", "4.7990", "0.1807", "<", "1e-6"]


@pytest.mark.parametrize(
    ("checks", "error", "pattern"),
    [
        ([], ValueError, r"checks must hold at least one"),
        ("checks", TypeError, r"checks must be a sequence of FamilyLossCheck"),
        ([{"model": "Llava"}], TypeError, r"checks\[0\] must be a FamilyLossCheck"),
    ],
)
def test_family_loss_table_bad_input_names_the_argument(checks, error, pattern):
    with pytest.raises(error, match=pattern):
        lv.family_loss_table(checks)


BTV = (8, 2048, 32000)


FULL32 = 8 * 2048 * 32000 * 4  # a (B, T, V) float32 copy
SLICE32 = 8 * 2047 * 32000 * 4  # a (B, T - 1, V) float32 copy


@pytest.mark.parametrize(
    ("batch", "dtype", "route", "upcast", "expected"),
    [
        # B = 1: the slice is already contiguous; float32 needs no cast
        (1, torch.float32, "shift and slice", True, 0),
        (1, torch.float32, "label padding", True, 0),
        (1, torch.float32, "shift and slice", False, 0),
        # B > 1: .contiguous() copies the (B, T - 1, V) slice, in its dtype
        (8, torch.float32, "shift and slice", True, SLICE32),
        (8, torch.float32, "shift and slice", False, SLICE32),
        (8, torch.bfloat16, "shift and slice", False, SLICE32 // 2),
        # logits.float() first: the same (B, T, V) float32 copy on both
        # routes, then shift and slice copies its float32 slice as well
        (8, torch.bfloat16, "shift and slice", True, FULL32 + SLICE32),
        (8, torch.bfloat16, "label padding", True, FULL32),
        (8, torch.float16, "label padding", True, FULL32),
        (8, torch.float64, "label padding", True, FULL32),
        (1, torch.bfloat16, "label padding", True, FULL32 // 8),
        (1, torch.bfloat16, "shift and slice", True, FULL32 // 8),
        # no cast: label padding copies nothing in any dtype
        (8, torch.float32, "label padding", False, 0),
        (8, torch.bfloat16, "label padding", False, 0),
        (8, torch.float64, "label padding", False, 0),
    ],
)
def test_logits_copy_bytes(batch, dtype, route, upcast, expected):
    got = lv.logits_copy_bytes(batch, BTV[1], BTV[2], route, dtype, upcast=upcast)
    assert got == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, 2, 8])
def test_the_upcast_costs_the_same_on_both_routes(batch, dtype):
    """The copy of .float() belongs to the cast, not to the label route."""
    def cost(route, upcast):
        return lv.logits_copy_bytes(batch, 64, 50, route, dtype, upcast=upcast)

    upcast_cost = {r: cost(r, True) - cost(r, False) for r in lv.LOSS_ROUTES}
    if dtype == torch.float32:
        assert set(upcast_cost.values()) == {0}
    elif batch == 1:
        # the slice is free both ways: the cast is the whole difference
        assert upcast_cost["label padding"] == upcast_cost["shift and slice"] == batch * 64 * 50 * 4
    else:
        # label padding pays exactly the cast; shift and slice the cast
        # plus the difference between a float32 and a `dtype` slice
        assert upcast_cost["label padding"] == batch * 64 * 50 * 4
        slice_delta = batch * 63 * 50 * (4 - dtype.itemsize)
        assert upcast_cost["shift and slice"] == upcast_cost["label padding"] + slice_delta
    # like for like, label padding never copies more than shift and slice
    for upcast in (True, False):
        assert cost("label padding", upcast) <= cost("shift and slice", upcast)


def test_logits_copy_bytes_agrees_with_real_tensors():
    """On real memory, the copies are the results that share no storage."""
    from companion.experiments.shapes import shares_storage
    from companion.shapes import flatten_for_cross_entropy

    for batch in (1, 3):
        for dtype in (torch.float32, torch.bfloat16):
            logits = torch.zeros(batch, 5, 7, dtype=dtype)
            labels = torch.zeros(batch, 5, dtype=torch.long)
            flat, _ = flatten_for_cross_entropy(logits, labels)
            sliced = 0 if shares_storage(flat, logits) else flat.nbytes
            upcast = logits.float()
            cast = 0 if shares_storage(upcast, logits) else upcast.nbytes
            flat32, _ = flatten_for_cross_entropy(upcast, labels)
            sliced32 = 0 if shares_storage(flat32, upcast) else flat32.nbytes
            assert lv.logits_copy_bytes(batch, 5, 7, "shift and slice", dtype, upcast=False) == sliced
            assert lv.logits_copy_bytes(batch, 5, 7, "label padding", dtype, upcast=False) == 0
            assert lv.logits_copy_bytes(batch, 5, 7, "shift and slice", dtype) == cast + sliced32
            assert lv.logits_copy_bytes(batch, 5, 7, "label padding", dtype) == cast


@pytest.mark.parametrize(
    ("args", "error", "pattern"),
    [
        ((0, 4, 5, "label padding"), ValueError, r"batch must be >= 1"),
        ((2, 1, 5, "label padding"), ValueError, r"time must be >= 2"),
        ((2, 4, 2.0, "label padding"), TypeError, r"vocab must be an int"),
        ((2, 4, 5, "sliced"), ValueError, r"route must be one of"),
        ((2, 4, 5, "label padding", torch.long), TypeError, r"dtype must be a floating"),
        ((2, 4, 5, "label padding", "float32"), TypeError, r"dtype must be a torch.dtype"),
    ],
)
def test_logits_copy_bytes_bad_input_names_the_argument(args, error, pattern):
    with pytest.raises(error, match=pattern):
        lv.logits_copy_bytes(*args)
    with pytest.raises(TypeError, match="upcast must be a bool"):
        lv.logits_copy_bytes(2, 4, 5, "label padding", upcast=1)


# --- the attention-mask filter of 4.45 and of 4.46-4.51 ---------------------------


@pytest.mark.parametrize("release", lv.FILTER_RELEASES)
def test_release_filter_loss_is_the_package_filter(batch, llava_logits, release):
    """Same-length mask: both crops give the package's loss, padding labelled too."""
    padding = batch.segments == lv.SEGMENT_CODES["padding"]
    for labels in (batch.labels, torch.where(padding, batch.input_ids, batch.labels)):
        got = lv.release_filter_loss(llava_logits, labels, batch.attention_mask, release)
        want = attention_mask_filter_loss(llava_logits, labels, batch.attention_mask)
        assert abs(float(got) - float(want)) < 1e-6


@pytest.mark.parametrize("time", [2, 3, 7])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_two_crops_agree_for_a_mask_of_the_logits_length(time, batch_size):
    generator = torch.Generator().manual_seed(time * 10 + batch_size)
    logits = torch.randn(batch_size, time, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (batch_size, time), generator=generator)
    labels[0, -1] = IGNORE_INDEX
    for mask in (
        torch.randint(0, 2, (batch_size, time), generator=generator),
        torch.randint(0, 2, (batch_size, time), generator=generator).bool(),
        torch.ones(batch_size, time, dtype=torch.long),
    ):
        crops = [lv.filter_target_mask(mask, time, r) for r in lv.FILTER_RELEASES]
        assert torch.equal(crops[0], crops[1]) and torch.equal(crops[0], mask[:, 1:])
        losses = [lv.release_filter_loss(logits, labels, mask, r) for r in lv.FILTER_RELEASES]
        both_nan = all(math.isnan(float(x)) for x in losses)
        assert both_nan or float(losses[0]) == float(losses[1])


@pytest.mark.parametrize("prefix", [1, 3])
def test_a_longer_mask_splits_the_crops(prefix, batch, llava_logits):
    """Prefix tuning: 4.46 crops the front away, 4.45 cannot index with it."""
    prefixed = torch.cat(
        [torch.ones(batch.attention_mask.shape[0], prefix, dtype=torch.long), batch.attention_mask], dim=1
    )
    time = llava_logits.shape[1]
    assert lv.filter_target_mask(prefixed, time, "4.46").shape[1] == time - 1
    assert lv.filter_target_mask(prefixed, time, "4.45").shape[1] == time - 1 + prefix
    new = lv.release_filter_loss(llava_logits, batch.labels, prefixed, "4.46")
    assert abs(float(new) - float(label_padding_loss(llava_logits, batch.labels))) < 1e-6
    with pytest.raises(IndexError, match="shape of the mask"):
        lv.release_filter_loss(llava_logits, batch.labels, prefixed, "4.45")


def test_at_t_1_the_4_46_crop_keeps_the_whole_mask():
    """-(T - 1) = -0 keeps every column: 4.46 fails where 4.45 gives nan."""
    logits, labels = torch.zeros(2, 1, 3), torch.zeros(2, 1, dtype=torch.long)
    mask = torch.ones(2, 1, dtype=torch.long)
    assert lv.filter_target_mask(mask, 1, "4.46").shape == (2, 1)
    assert lv.filter_target_mask(mask, 1, "4.45").shape == (2, 0)
    assert math.isnan(float(lv.release_filter_loss(logits, labels, mask, "4.45")))
    with pytest.raises(IndexError):
        lv.release_filter_loss(logits, labels, mask, "4.46")
    # the package's version takes the last T - 1 = 0 columns instead
    assert math.isnan(float(attention_mask_filter_loss(logits, labels, mask)))


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda: lv.filter_target_mask([[1]], 2, "4.46"), TypeError, "attention_mask must be a"),
        (lambda: lv.filter_target_mask(torch.ones(3), 2, "4.46"), ValueError, "attention_mask"),
        (lambda: lv.filter_target_mask(torch.ones(1, 3), 0, "4.46"), ValueError, "time must be >= 1"),
        (lambda: lv.filter_target_mask(torch.ones(1, 3), 2, "4.47"), ValueError, "release must be one of"),
        (lambda: lv.release_filter_loss(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 3), "4.46"),
         ValueError, "logits"),
    ],
)
def test_filter_bad_input_names_the_argument(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


# --- the processor --------------------------------------------------------------------


def test_llava_processor_always_returns_an_attention_mask():
    """Padded or not, one text or many, tensors or lists: the mask is there."""
    import numpy as np

    processor = lv.tiny_llava_processor()
    image = np.zeros((tm.IMAGE_SIZE, tm.IMAGE_SIZE, 3), dtype=np.uint8)
    texts = ["<image> what is in the picture", "<image> a cat"]
    calls = [
        dict(text=texts, images=[image, image], padding=True, return_tensors="pt"),
        dict(text=texts, images=[image, image], padding="longest"),
        dict(text=texts[1], images=image),
        dict(text=texts[1], images=image, padding=False, return_tensors="pt"),
        dict(text=["a cat", "what is in the picture"], padding=True),
    ]
    for kwargs in calls:
        out = processor(**kwargs)
        assert "attention_mask" in out, kwargs
    padded = processor(**calls[0])
    assert padded["attention_mask"].shape == padded["input_ids"].shape
    assert (padded["attention_mask"] == 0).any()  # right padding is masked
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((padded["input_ids"][0] == image_id).sum()) == tm.image_token_count()
    with pytest.raises(ValueError, match="patch_size must be >= 1"):
        lv.tiny_llava_processor(patch_size=0)


