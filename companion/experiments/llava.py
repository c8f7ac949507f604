"""LLaVA training batches, and the family's losses against the package's.

Chapter 2's experiments: :func:`build_llava_batch` lays a batch out as for
supervised fine-tuning (``<bos> <image>*N prompt answer <eos>``, right
padding, only the answer supervised), and :func:`check_family_losses` runs
every tiny model of :mod:`companion.experiments.tiny_models` on it and puts
each model's own ``.loss`` next to the formulations of
:mod:`companion.causal_lm_loss` (:func:`family_loss_table` prints them).
:func:`logits_copy_bytes` counts, on the ``meta`` device, the logits copies
each loss route makes at realistic sizes, with or without the float32
upcast.  :func:`release_filter_loss` replays LLaVA's old attention-mask
filter as a given release wrote it (:func:`filter_target_mask`: the crop of
4.45 or of 4.46-4.51), :func:`tiny_llava_processor` builds a
``LlavaProcessor`` offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from companion import IGNORE_INDEX
from companion._checks import (
    require_one_of,
    require_positive_int,
    require_rank,
    require_sequence,
    require_tensor,
)
from companion.causal_lm_loss import (
    label_padding_loss,
    shift_and_slice_loss,
    unshifted_token_loss,
)
from companion.experiments.shapes import trace_shift_and_flatten
from companion.experiments.tiny_models import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    FIRST_TEXT_TOKEN_ID,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    PATCH_SIZE,
    image_token_count,
    tiny_gpt_bigcode,
    tiny_gpt_neox_japanese,
    tiny_instructblip,
    tiny_llava,
    tiny_vip_llava,
)

__all__ = [
    "LOSS_ROUTES",
    "SEGMENT_CODES",
    "FILTER_RELEASES",
    "FamilyLossCheck",
    "LlavaTrainingBatch",
    "answer_only_labels",
    "build_llava_batch",
    "check_family_losses",
    "family_loss_table",
    "filter_target_mask",
    "first_answer_position",
    "logits_copy_bytes",
    "release_filter_loss",
    "tiny_llava_processor",
]

#: Segment codes of :class:`LlavaTrainingBatch` ``segments``.
SEGMENT_CODES: dict[str, int] = {
    "bos": 0, "image": 1, "prompt": 2, "answer": 3, "padding": 4,
}

#: The two routes from ``logits (B, T, V)`` to a loss that
#: :func:`logits_copy_bytes` compares: ``shift_and_slice_loss`` and
#: transformers' ``ForCausalLMLoss`` (``label_padding_loss``).
LOSS_ROUTES: tuple[str, ...] = ("shift and slice", "label padding")

#: The two forms of LLaVA's attention-mask crop: ``"4.45"`` (4.45.0 to
#: 4.45.2, ``attention_mask[..., 1:]``) and ``"4.46"`` (4.46.0 to 4.51.3,
#: ``attention_mask[:, -(logits.shape[1] - 1) :]``).  From 4.52 LLaVA calls
#: ``self.loss_function`` and filters nothing.
FILTER_RELEASES: tuple[str, ...] = ("4.45", "4.46")


@dataclass(frozen=True)
class LlavaTrainingBatch:
    """A padded batch laid out as for supervised fine-tuning of LLaVA.

    Each row is ``<bos> <image>*N prompt answer <eos>`` followed by right
    padding.  Only the answer (with its ``<eos>``) is supervised.

    Attributes:
        input_ids: ``(B, T)`` int64 token ids.
        attention_mask: ``(B, T)`` int64, ``1`` = real token, ``0`` =
            padding.
        labels: ``(B, T)`` int64, the answer's ids and ``-100`` everywhere
            else.
        pixel_values: ``(B, 3, IMAGE_SIZE, IMAGE_SIZE)`` float32 images.
        segments: ``(B, T)`` int64 codes from :data:`SEGMENT_CODES`.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    segments: torch.Tensor

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of a LLaVA or ViP-LLaVA forward pass."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "pixel_values": self.pixel_values,
            "labels": self.labels,
        }


def build_llava_batch(
    prompt_lengths: Sequence[int],
    answer_lengths: Sequence[int],
    *,
    image_tokens: int | None = None,
    seed: int = 0,
) -> LlavaTrainingBatch:
    """Make a realistic, right-padded LLaVA training batch in code.

    Args:
        prompt_lengths: text tokens of each row's prompt (``>= 1`` each).
        answer_lengths: tokens of each row's answer, ``<eos>`` included
            (``>= 1`` each); same length as ``prompt_lengths``.
        image_tokens: placeholders per image; default
            :func:`image_token_count`.
        seed: seed of the random text ids and pixels.

    Returns:
        A :class:`LlavaTrainingBatch` of ``B = len(prompt_lengths)`` rows,
        ``T`` = the longest row.
    """
    if len(prompt_lengths) != len(answer_lengths) or not prompt_lengths:
        raise ValueError(
            "prompt_lengths and answer_lengths must be non-empty and of "
            "equal length; "
            f"got {len(prompt_lengths)} and {len(answer_lengths)}"
        )
    pairs = list(zip(prompt_lengths, answer_lengths, strict=True))
    for i, (p, a) in enumerate(pairs):
        require_positive_int(p, f"prompt_lengths[{i}]")
        require_positive_int(a, f"answer_lengths[{i}]")
    if image_tokens is None:
        n_image = image_token_count()
    else:
        n_image = require_positive_int(image_tokens, "image_tokens")
    generator = torch.Generator().manual_seed(seed)
    row_lengths = [1 + n_image + p + a for p, a in pairs]
    batch, time = len(row_lengths), max(row_lengths)

    input_ids = torch.full((batch, time), PAD_TOKEN_ID, dtype=torch.long)
    segments = torch.full(
        (batch, time), SEGMENT_CODES["padding"], dtype=torch.long
    )
    labels = torch.full((batch, time), IGNORE_INDEX, dtype=torch.long)
    for row, (p, a) in enumerate(pairs):
        text = torch.randint(
            FIRST_TEXT_TOKEN_ID, IMAGE_TOKEN_ID, (p + a,), generator=generator
        )
        text[-1] = EOS_TOKEN_ID
        image_end = 1 + n_image
        prompt_end = image_end + p
        answer_end = prompt_end + a
        input_ids[row, 0] = BOS_TOKEN_ID
        input_ids[row, 1:image_end] = IMAGE_TOKEN_ID
        input_ids[row, image_end:answer_end] = text
        segments[row, 0] = SEGMENT_CODES["bos"]
        segments[row, 1:image_end] = SEGMENT_CODES["image"]
        segments[row, image_end:prompt_end] = SEGMENT_CODES["prompt"]
        segments[row, prompt_end:answer_end] = SEGMENT_CODES["answer"]
        answer = slice(prompt_end, answer_end)
        labels[row, answer] = input_ids[row, answer]
    attention_mask = (segments != SEGMENT_CODES["padding"]).long()
    pixel_values = torch.randn(
        batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator
    )
    return LlavaTrainingBatch(
        input_ids, attention_mask, labels, pixel_values, segments
    )


def first_answer_position(batch: LlavaTrainingBatch) -> int:
    """The earliest position at which any row's answer starts.

    Truncating every row to this many positions leaves only the
    begin-of-sequence token, the image and prompts: no target at all.

    Args:
        batch: a :class:`LlavaTrainingBatch`.

    Returns:
        ``min`` over rows of the index of the row's first answer token.
    """
    is_answer = batch.segments == SEGMENT_CODES["answer"]
    if not bool(is_answer.any(dim=1).all()):
        raise ValueError("batch must have an answer in every row")
    return int(is_answer.int().argmax(dim=1).min())


def answer_only_labels(batch: LlavaTrainingBatch) -> torch.Tensor:
    """The answers of ``batch`` alone, left-aligned.

    These are the decoder labels of an encoder-decoder model.

    Args:
        batch: a :class:`LlavaTrainingBatch`.

    Returns:
        ``(B, A)`` int64, ``A`` = the longest answer; ``-100`` after each
        answer.
    """
    answers = [row[row != IGNORE_INDEX] for row in batch.labels]
    longest = max(len(a) for a in answers)
    out = torch.full((len(answers), longest), IGNORE_INDEX, dtype=torch.long)
    for row, answer in enumerate(answers):
        out[row, : len(answer)] = answer
    return out


@dataclass(frozen=True)
class FamilyLossCheck:
    """One model's reported loss next to the package's formulations.

    Attributes:
        model: the transformers class name.
        language_model: the text model inside it (the model itself for the
            text-only ones).
        model_loss: ``model(...).loss``.
        shift_and_slice: :func:`companion.causal_lm_loss.shift_and_slice_loss`
            on the model's logits and the labels it was given.
        label_padding: :func:`companion.causal_lm_loss.label_padding_loss`
            on the same.
        unshifted: :func:`companion.causal_lm_loss.unshifted_token_loss` on
            the same.
    """

    model: str
    language_model: str
    model_loss: float
    shift_and_slice: float
    label_padding: float
    unshifted: float

    def as_row(self) -> dict[str, Any]:
        """The check as one table row, narrow enough for a 79-column table.

        ``model`` is the class name without its ``ForConditionalGeneration``
        or ``ForCausalLM`` suffix; ``diff shifted`` is
        ``|model_loss - shift_and_slice|``; ``diff unshifted`` is
        ``|model_loss - unshifted|``.
        """
        name = self.model
        for suffix in ("ForConditionalGeneration", "ForCausalLM"):
            name = name.removesuffix(suffix)
        return {
            "model": name,
            "text model": self.language_model,
            "model loss": self.model_loss,
            "diff shifted": abs(self.model_loss - self.shift_and_slice),
            "diff unshifted": abs(self.model_loss - self.unshifted),
        }


def check_family_losses(
    batch: LlavaTrainingBatch, seed: int = 0
) -> list[FamilyLossCheck]:
    """Run every tiny model of the family on ``batch`` and compare its loss.

    Multimodal models get the whole batch; the text-only ones
    (GPT BigCode, GPT-NeoX-Japanese) get its ``input_ids``, ``attention_mask``
    and ``labels``, the image placeholder being an ordinary token to them.
    InstructBLIP with T5 reads the batch in its encoder and is trained to
    produce :func:`answer_only_labels` from its decoder.

    Args:
        batch: a :class:`LlavaTrainingBatch` from :func:`build_llava_batch`.
        seed: seed of every model's random weights.

    Returns:
        One :class:`FamilyLossCheck` per model, in a fixed order.
    """
    text_inputs = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "labels": batch.labels,
    }
    multimodal_inputs = batch.model_inputs()
    instruct_inputs = {
        **multimodal_inputs,
        "qformer_input_ids": batch.input_ids,
        "qformer_attention_mask": batch.attention_mask,
    }
    t5_inputs = {**instruct_inputs, "labels": answer_only_labels(batch)}
    runs = [
        (tiny_llava(seed), "Llama", multimodal_inputs),
        (tiny_vip_llava(seed), "Llama", multimodal_inputs),
        (tiny_instructblip(seed, "llama"), "Llama", instruct_inputs),
        (tiny_instructblip(seed, "t5"), "T5 (encoder-decoder)", t5_inputs),
        (tiny_gpt_bigcode(seed), "GPT BigCode", text_inputs),
        (tiny_gpt_neox_japanese(seed), "GPT-NeoX-Japanese", text_inputs),
    ]
    checks = []
    with torch.no_grad():
        for model, language_model, inputs in runs:
            output = model(**inputs)
            logits, labels = output.logits, inputs["labels"]
            checks.append(
                FamilyLossCheck(
                    model=type(model).__name__,
                    language_model=language_model,
                    model_loss=float(output.loss),
                    shift_and_slice=float(
                        shift_and_slice_loss(logits, labels)
                    ),
                    label_padding=float(label_padding_loss(logits, labels)),
                    unshifted=float(unshifted_token_loss(logits, labels)),
                )
            )
    return checks


def family_loss_table(checks: Sequence[FamilyLossCheck]) -> str:
    """The checks of :func:`check_family_losses` as the chapter prints them.

    One row per check (:meth:`FamilyLossCheck.as_row`), at most 79
    characters wide: losses with 4 decimals; a difference below ``1e-6``,
    float32 rounding, as ``"< 1e-6"`` on every machine; a larger one with 4
    decimals.

    Args:
        checks: one or more :class:`FamilyLossCheck`.

    Returns:
        The table as text, without a trailing newline.
    """
    require_sequence(checks, "checks", "a sequence of FamilyLossCheck")
    if not checks:
        raise ValueError("checks must hold at least one FamilyLossCheck")
    for index, check in enumerate(checks):
        if not isinstance(check, FamilyLossCheck):
            raise TypeError(
                f"checks[{index}] must be a FamilyLossCheck; "
                f"got {type(check).__name__}"
            )

    def difference(value: float) -> str:
        return "< 1e-6" if value < 1e-6 else f"{value:.4f}"

    table = pd.DataFrame([check.as_row() for check in checks])
    return table.to_string(index=False, formatters={
        "model loss": "{:.4f}".format,
        "diff shifted": difference,
        "diff unshifted": difference,
    })


def logits_copy_bytes(
    batch: int,
    time: int,
    vocab: int,
    route: str,
    dtype: torch.dtype = torch.float32,
    *,
    upcast: bool = True,
) -> int:
    """Bytes of the logits copies one loss route makes, counted on ``meta``.

    The logits are ``(batch, time, vocab)`` of ``dtype``, laid out as a
    model returns them (contiguous).  Nothing is allocated, so realistic
    sizes are free to ask about.

    * ``upcast=True``: first ``logits.float()``, as transformers'
      ``ForCausalLMLoss`` does whether it pads the labels or is handed
      ``shift_labels``, and as every loss of the package does for half
      precision: a ``(B, T, V)`` float32 copy unless the logits are float32
      already (float64 is rounded down, half precision upcast).  This is a
      precision choice, the same for both routes.  ``upcast=False``: no
      cast; the route works on the logits in ``dtype``.
    * ``"shift and slice"`` (``shift_and_slice_loss``): then the
      ``.contiguous()`` of the sliced logits ``(B, T - 1, V)``, traced by
      :func:`companion.experiments.shapes.trace_shift_and_flatten`: a copy
      when ``B > 1``, nothing when ``B = 1``.
    * ``"label padding"`` (``ForCausalLMLoss``): then ``.view(-1, V)``,
      which never copies.

    Args:
        batch: ``B >= 1``.
        time: ``T >= 2`` (one next-token pair at least).
        vocab: ``V >= 1``.
        route: one of :data:`LOSS_ROUTES`.
        dtype: a floating ``torch.dtype`` of the logits.
        upcast: whether ``logits.float()`` comes first (a ``bool``).

    Returns:
        The bytes copied, upcast and slice together; 0 when nothing is
        copied.
    """
    batch = require_positive_int(batch, "batch")
    time = require_positive_int(time, "time")
    vocab = require_positive_int(vocab, "vocab")
    if time < 2:
        raise ValueError(
            f"time must be >= 2 (one next-token pair at least); got {time}"
        )
    require_one_of(route, LOSS_ROUTES, "route")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype; got {type(dtype).__name__}")
    if not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point dtype; got {dtype}")
    if not isinstance(upcast, bool):
        raise TypeError(f"upcast must be a bool; got {type(upcast).__name__}")
    logits = torch.empty(batch, time, vocab, dtype=dtype, device="meta")
    copied = 0
    if upcast:
        cast = logits.float()  # ForCausalLMLoss's first line
        if cast is not logits:
            copied += cast.numel() * cast.element_size()
        logits = cast
    if route == "shift and slice":
        labels = torch.empty(batch, time, dtype=torch.long, device="meta")
        steps = trace_shift_and_flatten(logits, labels)
        return copied + sum(
            step.nbytes for step in steps
            if step.tensor == "logits" and step.copied
        )
    logits.view(-1, vocab)  # raises rather than copy
    return copied


def filter_target_mask(
    attention_mask: torch.Tensor, time: int, release: str
) -> torch.Tensor:
    """LLaVA's crop of the attention mask, as the given release wrote it.

    * ``"4.45"``: ``attention_mask[..., 1:]`` (transformers 4.45.0-4.45.2);
    * ``"4.46"``: ``attention_mask[:, -(time - 1) :]`` (4.46.0-4.51.3,
      with the comment that the mask is cropped "in case it is longer,
      which happens in PrefixTuning with peft").

    For a mask of the logits' length ``T >= 2`` both give columns
    ``1 .. T-1``.  For a longer mask 4.45's crop is longer than the
    ``T - 1`` logit rows, and for ``T = 1`` 4.46's ``-0:`` keeps the whole
    mask: then :func:`release_filter_loss` fails as the release did.

    Args:
        attention_mask: ``(B, T')`` int or bool, ``0`` = padding.
        time: ``T >= 1``, the logits' sequence length.
        release: one of :data:`FILTER_RELEASES`.

    Returns:
        The cropped mask, a view of ``attention_mask``.
    """
    require_tensor(attention_mask, "attention_mask")
    require_rank(attention_mask, 2, "attention_mask", "(B, T')")
    time = require_positive_int(time, "time")
    require_one_of(release, FILTER_RELEASES, "release")
    if release == "4.45":
        return attention_mask[..., 1:]
    return attention_mask[:, -(time - 1) :]


def release_filter_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor,
    release: str,
) -> torch.Tensor:
    """LLaVA's filter branch line by line, with the crop of ``release``.

    No upcast and no argument check beyond the crop's: the lines are those
    of the release, so a mask whose crop does not match the ``T - 1``
    logit rows raises the ``IndexError`` the release raised.
    :func:`companion.causal_lm_loss.attention_mask_filter_loss` is the
    checked version of the 4.46 form.

    Args:
        logits: ``(B, T, V)`` float.
        labels: ``(B, T)`` int64, ``-100`` = ignored.
        attention_mask: ``(B, T')`` int or bool, ``0`` = padding.
        release: one of :data:`FILTER_RELEASES`.

    Returns:
        0-D tensor in ``logits``' dtype: the mean over pairs whose target
        column of the cropped mask is not 0 and whose label is not -100.
    """
    require_tensor(logits, "logits")
    require_rank(logits, 3, "logits", "(B, T, V)")
    require_tensor(labels, "labels")
    shift_attention_mask = filter_target_mask(
        attention_mask, logits.shape[1], release
    ).to(logits.device)
    shift_logits = logits[..., :-1, :][shift_attention_mask != 0].contiguous()
    shift_labels = labels[..., 1:][
        shift_attention_mask.to(labels.device) != 0
    ].contiguous()
    loss_fct = nn.CrossEntropyLoss()
    return loss_fct(
        shift_logits.view(-1, shift_logits.size(-1)),
        shift_labels.view(-1).to(shift_logits.device),
    )


def tiny_llava_processor(patch_size: int = PATCH_SIZE) -> Any:
    """A ``LlavaProcessor`` built offline: a word-level tokenizer, CLIP images.

    The tokenizer is trained in code with the ``tokenizers`` library on two
    sentences (special tokens ``<unk> <pad> <s> </s> <image>``, right
    padding); the image processor is a ``CLIPImageProcessorPil`` for
    square images of :data:`~companion.experiments.tiny_models.IMAGE_SIZE`
    pixels.  Nothing is downloaded.

    Args:
        patch_size: ``>= 1``, pixels per patch side; each ``<image>`` in a
            text becomes ``(IMAGE_SIZE // patch_size) ** 2`` tokens.

    Returns:
        A ``transformers.LlavaProcessor``.
    """
    patch_size = require_positive_int(patch_size, "patch_size")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        CLIPImageProcessorPil,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
    word_level = Tokenizer(models.WordLevel(unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.train_from_iterator(
        ["what is in the picture", "a cat on a mat"],
        trainers.WordLevelTrainer(special_tokens=specials),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        unk_token="<unk>", pad_token="<pad>",
        bos_token="<s>", eos_token="</s>",
        extra_special_tokens={"image_token": "<image>"},
    )
    images = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
    )

