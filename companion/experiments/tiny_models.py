"""The book's tiny models: random weights, built in code, nothing downloaded.

Two families:

* Hugging Face transformers models of the LLaVA family and two text-only
  relatives (chapter 2), each built from a configuration object: no
  weights, tokenizer or processor is downloaded.  The models are a few
  thousand parameters, so building one and running a forward pass takes
  milliseconds on a CPU, yet the code path from ``input_ids`` to ``.loss``
  is the library's own.
* :class:`TinyCausalLM`, a small causal language model written out in
  PyTorch (chapter 5): one attention block, float64 by default, and no
  ``transformers`` import, so that the data-parallel demo's fresh processes
  start fast and every line of the model can be read here.

All text models share one token layout: ``0`` padding, ``1``
begin-of-sequence.  The Hugging Face models have a vocabulary of
:data:`VOCAB_SIZE` ids: ``2`` end-of-sequence, ``3 .. 62`` ordinary text,
``63`` the image placeholder.  Special ids are set explicitly in every
config because the library's defaults (for example 50256 in GPT BigCode)
lie outside a 64-token vocabulary, and transformers logs a warning for each
such id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from companion._checks import (
    require_class_indices,
    require_positive_int,
    require_rank,
    require_tensor,
)

__all__ = [
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "FIRST_TEXT_TOKEN_ID",
    "HIDDEN_SIZE",
    "IMAGE_SIZE",
    "IMAGE_TOKEN_ID",
    "INSTRUCTBLIP_QUERY_TOKENS",
    "PAD_TOKEN_ID",
    "PATCH_SIZE",
    "TEXT_INIT_STD",
    "TEXT_LAYERS",
    "TinyCausalLM",
    "TinyLMConfig",
    "VISION_LAYERS",
    "VOCAB_SIZE",
    "build_tiny_lm",
    "image_token_count",
    "tiny_gpt_bigcode",
    "tiny_gpt_neox_japanese",
    "tiny_instructblip",
    "tiny_llama_config",
    "tiny_llava",
    "tiny_vip_llava",
]

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


# ---------------------------------------------------------------------------
# Hugging Face models of the LLaVA family
# ---------------------------------------------------------------------------


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
#: batch from :func:`companion.experiments.llava.build_llava_batch` fits LLaVA,
#: ViP-LLaVA and InstructBLIP.
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


# ---------------------------------------------------------------------------
# A small causal language model, written out
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyLMConfig:
    """Sizes of :class:`TinyCausalLM`.

    Attributes:
        vocab_size: ``V``; id ``0`` is the padding token.
        hidden_size: width of the residual stream.
        num_heads: attention heads (``hidden_size`` must be divisible by it).
        max_length: longest sequence ``T`` the position table covers.
    """

    vocab_size: int = 24
    hidden_size: int = 32
    num_heads: int = 2
    max_length: int = 96


class TinyCausalLM(nn.Module):
    """Embeddings, one pre-norm causal attention block and an LM head.

    ``forward(input_ids: (B, T) int) -> logits: (B, T, V)`` in the module's
    dtype.  Attention is causal, so with right padding the logits of a real
    position never depend on the padding after it: no attention mask is
    needed, and a row gives the same logits alone or inside a batch.
    """

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        require_positive_int(config.vocab_size, "config.vocab_size")
        require_positive_int(config.hidden_size, "config.hidden_size")
        require_positive_int(config.num_heads, "config.num_heads")
        require_positive_int(config.max_length, "config.max_length")
        if config.hidden_size % config.num_heads:
            raise ValueError(
                f"config.hidden_size ({config.hidden_size}) must be "
                f"divisible by config.num_heads ({config.num_heads})"
            )
        self.config = config
        hidden = config.hidden_size
        self.token_embedding = nn.Embedding(config.vocab_size, hidden)
        self.position_embedding = nn.Embedding(config.max_length, hidden)
        self.attention_norm = nn.LayerNorm(hidden)
        self.query_key_value = nn.Linear(hidden, 3 * hidden)
        self.attention_output = nn.Linear(hidden, hidden)
        self.mlp_norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, 4 * hidden),
            nn.GELU(),
            nn.Linear(4 * hidden, hidden),
        )
        self.final_norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, config.vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` for ``input_ids: (B, T)`` in ``[0, V)``.

        ``input_ids`` may have any integer dtype; it is converted to int64.
        """
        require_tensor(input_ids, "input_ids")
        require_rank(input_ids, 2, "input_ids", "(B, T)")
        input_ids = require_class_indices(input_ids, "input_ids")
        if input_ids.numel() and (
            int(input_ids.min()) < 0
            or int(input_ids.max()) >= self.config.vocab_size
        ):
            raise ValueError(
                "input_ids must lie in [0, config.vocab_size="
                f"{self.config.vocab_size}); got values in "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        batch, time = input_ids.shape
        if time > self.config.max_length:
            raise ValueError(
                f"input_ids has T={time} positions; the model covers at most "
                f"config.max_length={self.config.max_length}"
            )
        positions = torch.arange(time, device=input_ids.device)
        hidden = self.token_embedding(input_ids)
        hidden = hidden + self.position_embedding(positions)
        heads = self.config.num_heads
        width = self.config.hidden_size // heads
        qkv = self.query_key_value(self.attention_norm(hidden))
        query, key, value = qkv.chunk(3, dim=-1)

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, time, heads, width).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split_heads(query),
            split_heads(key),
            split_heads(value),
            is_causal=True,
        )
        merged = attended.transpose(1, 2).reshape(batch, time, -1)
        hidden = hidden + self.attention_output(merged)
        hidden = hidden + self.mlp(self.mlp_norm(hidden))
        return self.lm_head(self.final_norm(hidden))


def build_tiny_lm(
    config: TinyLMConfig | None = None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> TinyCausalLM:
    """A :class:`TinyCausalLM`, weights drawn from ``torch.manual_seed(seed)``.

    float64 by default, so that comparisons between reductions measure the
    reduction and not float32 rounding.
    """
    torch.manual_seed(seed)
    return TinyCausalLM(config or TinyLMConfig()).to(dtype)
