"""Tests of companion.experiments.training: the grammar, the label rules,
the training loop, generation, the Trainer runs, the tiny LLaVA, packing and
``shift_labels``."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from companion import IGNORE_INDEX
from companion.causal_lm_loss import count_scored_targets, label_padding_loss
from companion.experiments import training
from companion.experiments.tiny_models import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    TinyLMConfig,
    image_token_count,
)

VOCAB = training.make_vocabulary()
EXAMPLES = training.make_examples()
TRAIN, VAL = training.split_examples(EXAMPLES, validation=100, seed=0)


# ---------------------------------------------------------------------------
# The grammar
# ---------------------------------------------------------------------------


def test_vocabulary_layout_and_round_trip():
    assert VOCAB.words[:3] == training.SPECIAL_TOKENS
    assert (PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID) == (0, 1, 2)
    assert len(set(VOCAB.words)) == VOCAB.size == 53
    words = ["Q:", "what", "does", "ann", "'s", "cat", "eat", "?", "A:"]
    ids = VOCAB.encode(words)
    assert VOCAB.decode(ids) == " ".join(words)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        VOCAB.encode(["zebra"])
    with pytest.raises(ValueError, match="must not repeat"):
        training.Vocabulary(("a", "a"))


def test_examples_are_distinct_and_answers_follow_from_questions():
    assert len(EXAMPLES) == len(training.OWNERS) * 5 * len(training.ANIMALS) * 3
    answers = {}
    for example in EXAMPLES:
        VOCAB.encode(example.prompt + example.answer)
        assert example.prompt[0] == "Q:" and example.prompt[-1] == "A:"
        assert example.answer[-1] == "."
        assert answers.setdefault(example.prompt, example.answer) == example.answer
    assert len(answers) == len(EXAMPLES)
    lengths = {len(example.answer) for example in EXAMPLES}
    assert min(lengths) == 4 and max(lengths) == 14


def test_split_is_disjoint_seeded_and_checked():
    assert len(TRAIN) == 440 and len(VAL) == 100
    assert not set(TRAIN) & set(VAL)
    again = training.split_examples(EXAMPLES, validation=100, seed=0)
    assert again == (TRAIN, VAL)
    assert training.split_examples(EXAMPLES, validation=100, seed=1)[1] != VAL
    with pytest.raises(ValueError, match="validation must be <"):
        training.split_examples(EXAMPLES, validation=len(EXAMPLES), seed=0)
    with pytest.raises(ValueError, match="validation must be >= 1"):
        training.split_examples(EXAMPLES, validation=0, seed=0)


# ---------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------


def _encoded(example):
    prompt = [BOS_TOKEN_ID, *VOCAB.encode(example.prompt)]
    return prompt, [*VOCAB.encode(example.answer), EOS_TOKEN_ID]


def test_right_rule_scores_answer_and_eos_by_position():
    batch = training.make_batch(VAL[:5], VOCAB)
    for row, example in enumerate(VAL[:5]):
        prompt, answer = _encoded(example)
        length = len(prompt) + len(answer)
        assert batch.lengths[row] == length
        assert batch.prompt_lengths[row] == len(prompt)
        assert batch.input_ids[row, :length].tolist() == prompt + answer
        assert (batch.input_ids[row, length:] == PAD_TOKEN_ID).all()
        assert batch.labels[row, len(prompt):length].tolist() == answer
        assert (batch.labels[row, : len(prompt)] == IGNORE_INDEX).all()
        assert (batch.labels[row, length:] == IGNORE_INDEX).all()


@given(st.lists(st.integers(0, len(EXAMPLES) - 1), min_size=1, max_size=8),
       st.integers(0, 6))
def test_each_mistake_differs_from_the_right_rule_in_one_thing(indices, extra):
    chosen = [EXAMPLES[i] for i in indices]
    width = max(len(p) + len(a) for p, a in map(_encoded, chosen)) + extra
    batches = {rule: training.make_batch(chosen, VOCAB, rule, total_length=width)
               for rule in training.LABEL_RULES}
    right = batches["answer_only"]
    counts = {rule: count_scored_targets(b.labels) for rule, b in batches.items()}
    rows = len(chosen)
    assert counts["answer_only"] == sum(len(a) for _, a in map(_encoded, chosen))
    assert counts["padding_in_labels"] == counts["answer_only"] + sum(
        width - n for n in right.lengths)
    assert counts["pad_is_eos_masked"] == counts["answer_only"] - rows
    assert counts["prompt_in_labels"] == counts["answer_only"] + sum(
        p - 1 for p in right.prompt_lengths)
    # The same tokens everywhere but in the padding of the eos rule.
    eos_batch = batches["pad_is_eos_masked"]
    for row, length in enumerate(right.lengths):
        assert torch.equal(eos_batch.input_ids[row, :length],
                           right.input_ids[row, :length])
        assert (eos_batch.input_ids[row, length:] == EOS_TOKEN_ID).all()
    assert not (eos_batch.labels == EOS_TOKEN_ID).any()
    assert (right.labels == EOS_TOKEN_ID).sum() == rows
    padded = batches["padding_in_labels"]
    assert torch.equal(padded.input_ids, right.input_ids)
    pad_positions = right.input_ids == PAD_TOKEN_ID
    assert (padded.labels[pad_positions] == PAD_TOKEN_ID).all()
    assert torch.equal(padded.labels[~pad_positions], right.labels[~pad_positions])


def test_make_batch_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rule must be one of"):
        training.make_batch(VAL[:2], VOCAB, "labels_everywhere")
    with pytest.raises(ValueError, match="total_length must be >="):
        training.make_batch(VAL[:2], VOCAB, total_length=3)
    with pytest.raises(ValueError, match="at least one example"):
        training.make_batch([], VOCAB)


# ---------------------------------------------------------------------------
# Generation and what a model writes, with stand-in models
# ---------------------------------------------------------------------------


class _Always(nn.Module):
    """Logits that always put the most weight on ``token``."""

    def __init__(self, token: int, vocab_size: int = VOCAB.size) -> None:
        super().__init__()
        self.config = TinyLMConfig(vocab_size=vocab_size, max_length=48)
        self.token = token
        self.calls = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        logits[..., self.token] = 100.0
        return logits


def test_answer_report_of_models_that_stop_at_once_or_never():
    stops = training.answer_report(_Always(EOS_TOKEN_ID), VAL[:7], VOCAB)
    assert (stops.stopped, stops.exact, stops.right_words) == (1, 0, 0)
    pads = training.answer_report(_Always(PAD_TOKEN_ID), VAL[:7], VOCAB,
                                  continue_past_eos=True, max_new_tokens=5)
    assert (pads.stopped, pads.padding_written) == (0, 1)
    assert pads.samples[0][1] == " ".join(["<pad>"] * 5)


def test_greedy_decoding_batches_equal_prompts_and_checks_the_budget():
    model = training.chapter_model(VOCAB, seed=3)
    prompts = [_encoded(e)[0] for e in VAL[:6]]
    together = training.generate_greedy(model, prompts, max_new_tokens=6,
                                        stop_token_id=None)
    alone = [training.generate_greedy(model, [p], max_new_tokens=6,
                                      stop_token_id=None)[0] for p in prompts]
    assert together == alone and all(len(x) == 6 for x in together)
    with pytest.raises(ValueError, match="max_length=48"):
        training.generate_greedy(model, prompts, max_new_tokens=40)
    with pytest.raises(ValueError, match=r"prompts\[0\] is empty"):
        training.generate_greedy(model, [[]], max_new_tokens=2)


def test_sampling_from_bos_and_counting_questions():
    answer_mark = VOCAB.encode(["A:"])[0]
    texts = training.sample_from_bos(_Always(answer_mark), VOCAB, samples=4)
    assert texts == ["A:"] * 4
    question = " ".join(VAL[0].prompt)
    assert training.question_share([question, "A:"], EXAMPLES) == 0.5
    with pytest.raises(ValueError, match="at least one text"):
        training.question_share([], EXAMPLES)


def test_tokenizer_matches_the_vocabulary():
    tokenizer = training.chapter_tokenizer(VOCAB)
    ids = tokenizer(training.example_text(VAL[0]))["input_ids"]
    prompt, answer = _encoded(VAL[0])
    assert ids == prompt + answer
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id,
            tokenizer.eos_token_id) == (0, 1, 2)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def test_training_is_seeded_and_rules_share_their_batches():
    kwargs = dict(steps=6, eval_every=3, learning_rate=1e-2)
    first = training.train_model(TRAIN, VAL[:10], VOCAB, **kwargs)
    again = training.train_model(TRAIN, VAL[:10], VOCAB, **kwargs)
    assert first.logged_losses == again.logged_losses
    assert first.eval_steps == [0, 3, 6]
    assert len(first.validation_losses) == len(first.exact_shares) == 3
    assert abs(first.logged_losses[0] - math.log(VOCAB.size)) < 0.5
    # Step 1 of every rule starts from the same weights on the same examples:
    # its loss is the untrained model's loss on that batch under the rule.
    import random

    chosen = random.Random(0).sample(list(TRAIN), 16)
    untrained = training.chapter_model(VOCAB, seed=0)
    for rule in training.LABEL_RULES:
        run = training.train_model(TRAIN, VAL[:10], VOCAB, rule=rule, steps=1)
        batch = training.make_batch(chosen, VOCAB, rule)
        with torch.no_grad():
            expected = label_padding_loss(untrained(batch.input_ids), batch.labels)
        assert run.logged_losses[0] == pytest.approx(float(expected), rel=1e-12)


def test_train_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="learning_rate must be finite"):
        training.train_model(TRAIN, VAL, VOCAB, learning_rate=float("nan"))
    with pytest.raises(ValueError, match="batch_size is 16"):
        training.train_model(TRAIN[:3], VAL, VOCAB)
    with pytest.raises(ValueError, match="rule must be one of"):
        training.train_model(TRAIN, VAL, VOCAB, rule="everything")


# ---------------------------------------------------------------------------
# The Trainer
# ---------------------------------------------------------------------------


def test_loss_as_transformers_matches_for_causal_lm_loss():
    from transformers.loss.loss_utils import ForCausalLMLoss

    from companion.experiments.training import _loss_as_transformers

    batch = training.make_batch(VAL[:4], VOCAB)
    logits = torch.randn(*batch.input_ids.shape, VOCAB.size, dtype=torch.float64)
    for count in (None, torch.tensor(50.0), 7):
        ours = _loss_as_transformers(logits, batch.labels, count)
        theirs = ForCausalLMLoss(logits, batch.labels, VOCAB.size,
                                 num_items_in_batch=count)
        assert ours.dtype == torch.float64
        assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    empty = torch.full_like(batch.labels, IGNORE_INDEX)
    assert math.isnan(float(_loss_as_transformers(logits, empty, None)))


def test_trainer_dataset_and_collator():
    rows = training.trainer_dataset(VAL[:3], VOCAB, without_answer=[1])
    prompt, answer = _encoded(VAL[0])
    assert rows[0]["input_ids"] == prompt + answer
    assert rows[0]["labels"] == [IGNORE_INDEX] * len(prompt) + answer
    assert set(rows[1]["labels"]) == {IGNORE_INDEX}
    batch = training.collate_for_trainer(rows)
    width = max(len(r["input_ids"]) for r in rows)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, width)
    assert count_scored_targets(batch["labels"]) == len(answer) + len(
        _encoded(VAL[2])[1])


@pytest.fixture(scope="module")
def trainer_runs():
    rows = training.trainer_dataset(TRAIN, VOCAB)
    return {
        "8x1": training.run_trainer(
            training.TrainerLM(training.chapter_model(VOCAB)), rows,
            batch_size=8, steps=5),
        "2x4": training.run_trainer(
            training.TrainerLM(training.chapter_model(VOCAB)), rows,
            batch_size=2, accumulation_steps=4, steps=5),
        "no kwargs": training.run_trainer(
            training.TrainerLMWithoutKwargs(training.chapter_model(VOCAB)),
            rows, batch_size=2, accumulation_steps=4, steps=5),
    }


def _weights(run):
    return torch.cat([p.detach().flatten() for p in run.model.parameters()])


def test_trainer_accumulation_matches_the_full_batch(trainer_runs):
    one, four, fallback = trainer_runs.values()
    assert one.accepts_loss_kwargs and not fallback.accepts_loss_kwargs
    assert len(one.logged_losses) == 5
    assert max(abs(a - b) for a, b in zip(one.logged_losses, four.logged_losses)) < 1e-5
    assert float((_weights(one) - _weights(four)).abs().max()) < 1e-10
    assert float((_weights(one) - _weights(fallback)).abs().max()) > 1e-4


def test_trainer_eval_loss_is_the_sequence_weighted_mean_of_batch_means():
    rows = training.trainer_dataset(TRAIN, VOCAB)
    eval_rows = training.trainer_dataset(
        sorted(VAL[:21], key=lambda e: len(e.answer)), VOCAB)
    run = training.run_trainer(
        training.TrainerLM(training.chapter_model(VOCAB)), rows, batch_size=8,
        steps=3, eval_rows=eval_rows, eval_batch_size=8)
    by_sequences, token_mean = training.eval_loss_by_hand(
        run.model, eval_rows, batch_size=8)
    assert run.eval_loss == pytest.approx(by_sequences, rel=1e-9)
    assert abs(by_sequences - token_mean) > 1e-3


def test_nan_filter_hides_batches_without_targets():
    rows = training.trainer_dataset(TRAIN[:40], VOCAB,
                                    without_answer=range(40))
    rows[:20] = training.trainer_dataset(TRAIN[:20], VOCAB)
    logs = {}
    for nan_filter in (True, False):
        run = training.run_trainer(
            training.TrainerLM(training.chapter_model(VOCAB)), rows,
            batch_size=1, steps=12, logging_steps=4, nan_inf_filter=nan_filter)
        logs[nan_filter] = run.logged_losses
        assert any(map(math.isnan, run.model.training_losses))
    assert all(map(math.isfinite, logs[True]))
    assert any(map(math.isnan, logs[False]))


def test_run_trainer_rejects_bad_arguments():
    rows = training.trainer_dataset(TRAIN[:8], VOCAB)
    with pytest.raises(TypeError, match="model must be a TrainerLM"):
        training.run_trainer(nn.Linear(2, 2), rows, batch_size=2)
    with pytest.raises(ValueError, match="accumulation_steps must be >= 1"):
        training.run_trainer(training.TrainerLM(training.chapter_model(VOCAB)),
                             rows, batch_size=2, accumulation_steps=0)
    with pytest.raises(TypeError, match="nan_inf_filter must be a bool"):
        training.run_trainer(training.TrainerLM(training.chapter_model(VOCAB)),
                             rows, batch_size=2, nan_inf_filter=1)


# ---------------------------------------------------------------------------
# The tiny LLaVA
# ---------------------------------------------------------------------------


def test_image_batch_layout_and_labels():
    batch = training.make_image_batch(6, seed=3)
    n = image_token_count()
    assert batch.prompt_length == 1 + n + len(training.IMAGE_PROMPT)
    assert (batch.input_ids[:, 1 : 1 + n] == IMAGE_TOKEN_ID).all()
    assert (batch.input_ids[:, -1] == EOS_TOKEN_ID).all()
    answers = batch.labels()
    kept = batch.labels(placeholders_in_labels=True)
    assert (answers[:, : batch.prompt_length] == IGNORE_INDEX).all()
    assert count_scored_targets(kept) - count_scored_targets(answers) == 6 * n
    # the square's colour is in the pixels: its channel is the brightest
    ids = training.image_word_ids()
    for row in range(6):
        word = [w for w, i in ids.items() if i == int(batch.input_ids[row, batch.prompt_length])]
        channel = ["red", "green", "blue"].index(word[0])
        assert int(batch.pixel_values[row].mean(dim=(1, 2)).argmax()) == channel


def test_tiny_llava_runs_record_the_placeholder_share():
    kept = training.train_tiny_llava(placeholders_in_labels=True, steps=3,
                                     batch_size=4, held_out=5)
    masked = training.train_tiny_llava(placeholders_in_labels=False, steps=3,
                                       batch_size=4, held_out=5)
    n = image_token_count()
    answer = 5  # colour, "square", two corner words, <eos>
    assert kept.placeholder_share == pytest.approx(n / (n + answer))
    assert masked.placeholder_share == 0
    assert masked.logged_losses == masked.answer_losses
    assert kept.logged_losses != kept.answer_losses
    assert kept.answer_losses[0] == masked.answer_losses[0]


# ---------------------------------------------------------------------------
# Packing and shift_labels
# ---------------------------------------------------------------------------


def test_flattening_matches_padding_and_each_mistake_does_not():
    result = training.compare_flattened_and_padded(VAL[:3], VOCAB, seed=1)
    assert set(result.losses) == set(training.FLATTENING_VARIANTS)
    assert result.losses["flattened"] == pytest.approx(result.losses["padded"], abs=1e-5)
    assert result.gradient_differences["flattened"] < 1e-5
    assert result.targets["flattened"] == result.targets["padded"]
    assert result.targets["flattened, separator <bos>"] == result.targets["padded"] + 2
    for name in ("flattened, cache on", "flattened, no position_ids",
                 "flattened, separator <bos>"):
        assert result.gradient_differences[name] > 1e-2, name
    with pytest.raises(ValueError, match="at least two examples"):
        training.compare_flattened_and_padded(VAL[:1], VOCAB)


@given(st.integers(1, 5), st.integers(0, 10_000), st.sampled_from([0.0, 0.4]))
def test_shift_labels_make_pieces_add_up_to_the_whole(pieces, seed, masked):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 9, 11, generator=generator)
    labels = torch.randint(0, 11, (3, 9), generator=generator)
    labels[torch.rand(3, 9, generator=generator) < masked] = IGNORE_INDEX
    if count_scored_targets(labels) == 0:
        labels[0, 1] = 3
    result = training.split_sequence_losses(logits, labels, pieces)
    assert result.pieces_with_shift_labels == pytest.approx(result.whole, rel=1e-5)
    boundaries = [int(t[0]) for t in torch.arange(9).tensor_split(pieces)[1:]]
    lost = sum(int((labels[:, b] != IGNORE_INDEX).sum()) for b in boundaries)
    assert result.lost_targets == lost
    if lost == 0:
        assert result.pieces_without_shift_labels == pytest.approx(result.whole, rel=1e-5)
    with pytest.raises(ValueError, match="pieces must be <= T"):
        training.split_sequence_losses(logits, labels, 10)


def test_training_on_a_named_device_gives_the_cpu_run_and_returns_a_cpu_model():
    vocab = training.make_vocabulary()
    train, val = training.split_examples(training.make_examples(), validation=8, seed=0)
    default = training.train_model(train, val, vocab, steps=3, eval_every=3, batch_size=4)
    named = training.train_model(train, val, vocab, steps=3, eval_every=3, batch_size=4,
                                 device=torch.device("cpu"))
    assert default.logged_losses == named.logged_losses
    assert default.validation_losses == named.validation_losses
    assert {p.device.type for p in named.model.parameters()} == {"cpu"}
    with pytest.raises(TypeError, match="^device"):
        training.train_model(train, val, vocab, steps=1, device=0)
