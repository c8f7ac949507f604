"""Tiny random-weight models of the LLaVA family, built from configs alone.

Every builder here constructs a Hugging Face transformers model from a
configuration object: no weights, tokenizer or processor is downloaded.  The
models are a few thousand parameters, so building one and running a forward
pass takes milliseconds on a CPU, yet the code path from ``input_ids`` to
``.loss`` is the library's own.

All text models share one token layout over a vocabulary of
:data:`VOCAB_SIZE` ids: ``0`` padding, ``1`` begin-of-sequence, ``2``
end-of-sequence, ``3 .. 62`` ordinary text, ``63`` the image placeholder.
Special ids are set explicitly in every config because the library's
defaults (for example 50256 in GPT BigCode) lie outside a 64-token
vocabulary, and transformers logs a warning for each such id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from companion import IGNORE_INDEX
from companion._checks import require_positive_int

VOCAB_SIZE: int = 64
PAD_TOKEN_ID: int = 0
BOS_TOKEN_ID: int = 1
EOS_TOKEN_ID: int = 2
FIRST_TEXT_TOKEN_ID: int = 3
IMAGE_TOKEN_ID: int = VOCAB_SIZE - 1

IMAGE_SIZE: int = 8
PATCH_SIZE: int = 4
HIDDEN_SIZE: int = 16
#: Transformer layers of the tiny vision towers (CLIP, InstructBLIP).
VISION_LAYERS: int = 2
#: Transformer layers of the tiny text models (Llama, T5, GPT BigCode, ...).
TEXT_LAYERS: int = 1

#: Standard deviation of the random weights of the text models.  The
#: libraries' default (0.02) makes every logit nearly 0 and every loss nearly
#: ``log V``; a larger spread gives predictions that differ from token to
#: token, so that formulations which score different positions give visibly
#: different numbers.
TEXT_INIT_STD: float = 0.4

#: Segment codes of :class:`LlavaTrainingBatch` ``segments``.
SEGMENT_CODES: dict[str, int] = {
    "bos": 0, "image": 1, "prompt": 2, "answer": 3, "padding": 4,
}


def _special_ids() -> dict[str, int]:
    return {
        "pad_token_id": PAD_TOKEN_ID,
        "bos_token_id": BOS_TOKEN_ID,
        "eos_token_id": EOS_TOKEN_ID,
    }


def _vision_kwargs() -> dict[str, Any]:
    """A :data:`VISION_LAYERS`-layer vision transformer.

    Images of :data:`IMAGE_SIZE` pixels square are cut into patches of
    :data:`PATCH_SIZE` pixels square.
    """
    return {
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": 2 * HIDDEN_SIZE,
        "num_hidden_layers": VISION_LAYERS,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": PATCH_SIZE,
    }


def tiny_llama_config(init_std: float = TEXT_INIT_STD) -> Any:
    """A tiny ``LlamaConfig`` with :data:`VOCAB_SIZE` token ids.

    :data:`TEXT_LAYERS` layer(s), hidden size :data:`HIDDEN_SIZE`.

    Args:
        init_std: standard deviation of the random weights
            (``initializer_range``); default :data:`TEXT_INIT_STD`.
    """
    from transformers import LlamaConfig

    if isinstance(init_std, bool) or not isinstance(init_std, (int, float)):
        raise TypeError(
            f"init_std must be a float; got {type(init_std).__name__}"
        )
    if not init_std > 0:
        raise ValueError(f"init_std must be > 0; got {init_std}")

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=2 * HIDDEN_SIZE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=float(init_std),
        **_special_ids(),
    )


def image_token_count() -> int:
    """Image placeholders per image for the tiny LLaVA and ViP-LLaVA.

    The vision tower cuts an ``IMAGE_SIZE``-pixel square into
    ``(IMAGE_SIZE / PATCH_SIZE)**2`` patches; LLaVA's default feature
    strategy drops the class token, so each patch becomes one token.
    """
    return (IMAGE_SIZE // PATCH_SIZE) ** 2


def tiny_llava(seed: int = 0, text_init_std: float = TEXT_INIT_STD) -> Any:
    """A random-weight ``LlavaForConditionalGeneration``: tiny CLIP + Llama.

    Args:
        seed: ``torch.manual_seed`` applied before the weights are drawn.
        text_init_std: standard deviation of the Llama's random weights;
            default :data:`TEXT_INIT_STD`.

    Returns:
        The model in eval mode, float32.  ``image_token_id`` is
        :data:`IMAGE_TOKEN_ID`; each image fills :func:`image_token_count`
        placeholders.
    """
    from transformers import (
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs()),
        text_config=tiny_llama_config(text_init_std),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=image_token_count(),
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def tiny_vip_llava(seed: int = 0) -> Any:
    """A random-weight ``VipLlavaForConditionalGeneration``.

    Its image features come from two vision layers.

    Same token layout and image-token count as :func:`tiny_llava`.
    """
    from transformers import (
        CLIPVisionConfig,
        VipLlavaConfig,
        VipLlavaForConditionalGeneration,
    )

    config = VipLlavaConfig(
        vision_config=CLIPVisionConfig(**_vision_kwargs()),
        text_config=tiny_llama_config(),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layers=[-1, -2],
        image_seq_length=image_token_count(),
    )
    torch.manual_seed(seed)
    return VipLlavaForConditionalGeneration(config).eval()


#: Query tokens of the tiny InstructBLIP: its Q-Former turns each image into
#: this many embeddings.  Chosen equal to :func:`image_token_count` so that one
#: batch from :func:`build_llava_batch` fits LLaVA, ViP-LLaVA and InstructBLIP.
INSTRUCTBLIP_QUERY_TOKENS: int = (IMAGE_SIZE // PATCH_SIZE) ** 2


def tiny_instructblip(seed: int = 0, language_model: str = "llama") -> Any:
    """A random-weight ``InstructBlipForConditionalGeneration``.

    Args:
        seed: ``torch.manual_seed`` applied before the weights are drawn.
        language_model: ``"llama"`` (decoder-only: the model computes
            ``self.loss_function``, i.e. ``ForCausalLMLoss``) or ``"t5"``
            (encoder-decoder: the loss is T5's own, without a shift).

    Returns:
        The model in eval mode, float32, with
        :data:`INSTRUCTBLIP_QUERY_TOKENS` image placeholders per image.
    """
    from transformers import (
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        T5Config,
    )

    if language_model == "llama":
        text_config: Any = tiny_llama_config()
    elif language_model == "t5":
        text_config = T5Config(
            vocab_size=VOCAB_SIZE,
            d_model=HIDDEN_SIZE,
            d_kv=HIDDEN_SIZE // 2,
            d_ff=2 * HIDDEN_SIZE,
            num_layers=TEXT_LAYERS,
            num_heads=2,
            decoder_start_token_id=PAD_TOKEN_ID,
            initializer_factor=1.0,
            **_special_ids(),
        )
    else:
        raise ValueError(
            "language_model must be 'llama' or 't5'; "
            f"got {language_model!r}"
        )
    config = InstructBlipConfig(
        vision_config=InstructBlipVisionConfig(
            **_vision_kwargs(), initializer_range=0.02
        ),
        qformer_config=InstructBlipQFormerConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN_SIZE,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=2 * HIDDEN_SIZE,
            max_position_embeddings=32,
        ),
        text_config=text_config,
        num_query_tokens=INSTRUCTBLIP_QUERY_TOKENS,
        image_token_index=IMAGE_TOKEN_ID,
    )
    torch.manual_seed(seed)
    return InstructBlipForConditionalGeneration(config).eval()


def tiny_gpt_bigcode(seed: int = 0) -> Any:
    """A random-weight ``GPTBigCodeForCausalLM`` (multi-query attention)."""
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    config = GPTBigCodeConfig(
        vocab_size=VOCAB_SIZE,
        n_embd=HIDDEN_SIZE,
        n_layer=TEXT_LAYERS,
        n_head=2,
        n_positions=64,
        initializer_range=TEXT_INIT_STD,
        **_special_ids(),
    )
    torch.manual_seed(seed)
    return GPTBigCodeForCausalLM(config).eval()


def tiny_gpt_neox_japanese(seed: int = 0) -> Any:
    """A random-weight ``GPTNeoXJapaneseForCausalLM``."""
    from transformers import GPTNeoXJapaneseConfig, GPTNeoXJapaneseForCausalLM

    config = GPTNeoXJapaneseConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=2,
        intermediate_multiple_size=2,
        max_position_embeddings=64,
        initializer_range=TEXT_INIT_STD,
        **_special_ids(),
    )
    torch.manual_seed(seed)
    return GPTNeoXJapaneseForCausalLM(config).eval()


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
    from companion.causal_lm_loss import (
        label_padding_loss,
        shift_and_slice_loss,
        unshifted_token_loss,
    )

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
