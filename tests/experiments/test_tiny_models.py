"""Tests of companion.experiments.tiny_models: configs, seeds, and the tiny
causal language model."""

from __future__ import annotations

import pytest
import torch

from companion.experiments import tiny_models as tm
from companion.experiments.denominator import make_counting_batch
from companion.experiments.tiny_models import TinyCausalLM, TinyLMConfig
from tests.shared import TINY_LM_CONFIG as CONFIG


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
