"""Chapter 7's experiments: a tiny model that learns, and what each label
mistake does to it.

* The text: a small question-and-answer grammar made in code
  (:func:`make_examples`), about six animals, what they eat and where they
  live, with a word-level vocabulary (:class:`Vocabulary`) that keeps the
  token layout of :mod:`companion.experiments.tiny_models` (``0`` padding,
  ``1`` begin-of-sequence, ``2`` end-of-sequence).  Each example is a prompt
  ``Q: ... A:`` and an answer that ends with ``.``; the answers are fully
  determined by the prompt, so a model that has learnt the facts answers
  every question exactly and stops.
* The labels: :func:`make_batch` pads a batch on the right and labels it
  by one of :data:`LABEL_RULES`: the right rule (only the answer and its
  end-of-sequence token are scored, padding found by position) and the
  common mistakes, each differing from it in one thing.
* Training: :func:`train_model` runs AdamW on
  :class:`~companion.experiments.tiny_models.TinyCausalLM` in float64, and
  records the loss the loop optimises (what a training log shows), the
  validation loss with the right labels, and what the model writes
  (:func:`answer_report`: exact answers, answers that stop, padding
  written after the end).
* The Hugging Face ``Trainer`` on the same model (:func:`run_trainer`),
  with a forward that takes ``**kwargs`` (:class:`TrainerLM`) and one that
  does not (:class:`TrainerLMWithoutKwargs`), and the loss it logs,
  evaluates and filters.
* A vision-language batch: the tiny ``LlavaForConditionalGeneration`` of
  :func:`~companion.experiments.tiny_models.tiny_llava` trained to describe
  images made in code, with the image placeholders masked or left in the
  labels (:func:`train_tiny_llava`).
* Packing: ``DataCollatorWithFlattening`` against a padded batch on a
  tiny ``LlamaForCausalLM`` (:func:`compare_flattened_and_padded`).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from companion import IGNORE_INDEX
from companion._checks import (
    require_int,
    require_one_of,
    require_positive_int,
    require_real_number,
    require_sequence,
)
from companion.causal_lm_loss import (
    count_scored_targets,
    label_padding_loss,
    token_losses,
)
from companion.experiments.tiny_models import (
    BOS_TOKEN_ID,
    EOS_TOKEN_ID,
    IMAGE_SIZE,
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    TinyCausalLM,
    TinyLMConfig,
    build_tiny_lm,
    image_token_count,
    tiny_llama_config,
    tiny_llava,
)

__all__ = [
    "ANIMALS",
    "COLORS",
    "FLATTENING_VARIANTS",
    "IMAGE_PROMPT",
    "LABEL_RULES",
    "OWNERS",
    "SPECIAL_TOKENS",
    "AnswerReport",
    "Example",
    "FlatteningComparison",
    "ImageBatch",
    "LabelledBatch",
    "LlavaRun",
    "SplitSequenceLosses",
    "TrainerLM",
    "TrainerLMWithoutKwargs",
    "TrainerRun",
    "TrainingRun",
    "Vocabulary",
    "answer_report",
    "chapter_model",
    "chapter_tokenizer",
    "collate_for_trainer",
    "compare_flattened_and_padded",
    "eval_loss_by_hand",
    "example_text",
    "generate_greedy",
    "image_word_ids",
    "make_batch",
    "make_examples",
    "make_image_batch",
    "make_vocabulary",
    "question_share",
    "run_trainer",
    "sample_from_bos",
    "split_examples",
    "split_sequence_losses",
    "train_model",
    "train_tiny_llava",
    "trainer_dataset",
    "validation_loss",
]

# ---------------------------------------------------------------------------
# The text: a question-and-answer grammar made in code
# ---------------------------------------------------------------------------

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>")
"""Ids 0, 1 and 2, as in :mod:`companion.experiments.tiny_models`."""

ANIMALS: dict[str, tuple[str, str]] = {
    "cat": ("fish", "house"),
    "dog": ("old bones", "yard"),
    "cow": ("fresh green grass", "field"),
    "owl": ("small grey mice", "tree"),
    "fox": ("red hens", "den"),
    "bee": ("sweet nectar", "hive"),
}
"""The facts the model learns: animal -> (what it eats, where it lives)."""

OWNERS: tuple[str, ...] = ("ann", "bob", "eva", "max", "kim", "tom")
"""Names that own the animals: copied from the question into the answer."""

COLORS: tuple[str, ...] = ("black", "white", "brown", "grey")
"""Optional colour of an animal, copied from the question into the answer."""

_GRAMMAR_WORDS: tuple[str, ...] = (
    "Q:", "A:", "what", "does", "eat", "eats", "where", "live", "lives",
    "in", "a", "?", ".", "'s", "and", "it",
)

LABEL_RULES: tuple[str, ...] = (
    "answer_only",
    "padding_in_labels",
    "pad_is_eos_masked",
    "prompt_in_labels",
)
"""How :func:`make_batch` labels a padded batch.

``"answer_only"`` (the right rule): the answer and its end-of-sequence
token are scored; the prompt and the padding are ``-100``, the padding
found by position (from the row lengths), not by token id.
``"padding_in_labels"``: as the right rule, but the padding positions keep
the padding id as their label.
``"pad_is_eos_masked"``: the batch is padded with the end-of-sequence id
(``pad_token = eos_token``), and every position whose token is the padding
id is set to ``-100``, which removes the end-of-sequence target too.
``"prompt_in_labels"``: as the right rule, but the prompt is scored too.
"""


@dataclass(frozen=True)
class Example:
    """One question and its answer, as words.

    Attributes:
        prompt: ``("Q:", ..., "A:")``, the question.
        answer: the answer's words, ending with ``"."``; the
            end-of-sequence token is added when the example is encoded.
    """

    prompt: tuple[str, ...]
    answer: tuple[str, ...]


@dataclass(frozen=True)
class Vocabulary:
    """A word-level vocabulary: ``words[i]`` is the word of token id ``i``.

    Ids 0, 1, 2 are :data:`SPECIAL_TOKENS`.
    """

    words: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(set(self.words)) != len(self.words):
            raise ValueError("words must not repeat")
        object.__setattr__(
            self, "_index", {word: i for i, word in enumerate(self.words)}
        )

    @property
    def size(self) -> int:
        """``V``, the number of token ids."""
        return len(self.words)

    def encode(self, words: Sequence[str]) -> list[int]:
        """Token ids of ``words``; raise ``ValueError`` for an unknown word."""
        unknown = [word for word in words if word not in self._index]
        if unknown:
            raise ValueError(f"words not in the vocabulary: {unknown}")
        return [self._index[word] for word in words]

    def decode(self, ids: Sequence[int]) -> str:
        """The words of ``ids``, joined by spaces."""
        return " ".join(self.words[int(i)] for i in ids)


def make_vocabulary() -> Vocabulary:
    """The vocabulary of :func:`make_examples`: special tokens, then words."""
    words: list[str] = list(SPECIAL_TOKENS)
    pieces = [*_GRAMMAR_WORDS, *ANIMALS, *OWNERS, *COLORS]
    for food, home in ANIMALS.values():
        pieces += [*food.split(), home]
    for word in pieces:
        if word not in words:
            words.append(word)
    return Vocabulary(tuple(words))


def make_examples() -> list[Example]:
    """Every question of the grammar with its answer, in a fixed order.

    A subject is an owner's animal, with or without a colour
    (``"ann 's grey cat"``).  For each subject there are three questions:
    where it lives (``"in a tree ."``), what it eats (the subject is
    repeated: ``"ann 's grey cat eats fish ."``) and both.  Answers range
    from four words to fourteen.
    """
    examples = []
    for owner, color, animal in itertools.product(
        OWNERS, (None, *COLORS), ANIMALS
    ):
        food, home = ANIMALS[animal]
        subject = f"{owner} 's " + (f"{color} " if color else "") + animal
        pairs = [
            (f"what does {subject} eat ?", f"{subject} eats {food} ."),
            (f"where does {subject} live ?", f"in a {home} ."),
            (
                f"what does {subject} eat and where does it live ?",
                f"{subject} eats {food} and lives in a {home} .",
            ),
        ]
        for question, answer in pairs:
            examples.append(
                Example(
                    tuple(["Q:", *question.split(), "A:"]),
                    tuple(answer.split()),
                )
            )
    return examples


def split_examples(
    examples: Sequence[Example], *, validation: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Shuffle with ``seed``; return ``(train, validation)``, disjoint.

    Args:
        examples: the examples to split.
        validation: how many go to the validation split (``>= 1`` and
            fewer than ``len(examples)``).
        seed: seed of the shuffle.
    """
    require_sequence(examples, "examples", "a sequence of Example")
    validation = require_positive_int(validation, "validation")
    require_int(seed, "seed")
    if validation >= len(examples):
        raise ValueError(
            f"validation must be < len(examples) = {len(examples)}; "
            f"got {validation}"
        )
    order = list(examples)
    random.Random(seed).shuffle(order)
    return order[validation:], order[:validation]


# ---------------------------------------------------------------------------
# Labels: the right rule and the mistakes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledBatch:
    """A right-padded batch and its labels under one rule.

    Attributes:
        input_ids: ``(B, T)`` int64.
        labels: ``(B, T)`` int64, ``-100`` = not scored.
        prompt_lengths: ``(B,)`` tokens of each prompt, ``<bos>`` included.
        lengths: ``(B,)`` real tokens of each row (prompt, answer and
            ``<eos>``); the rest of the row is padding.
        rule: the entry of :data:`LABEL_RULES` that made ``labels``.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    prompt_lengths: tuple[int, ...]
    lengths: tuple[int, ...]
    rule: str


def _encode_example(example: Example, vocab: Vocabulary) -> tuple[list[int], list[int]]:
    prompt = [BOS_TOKEN_ID, *vocab.encode(example.prompt)]
    answer = [*vocab.encode(example.answer), EOS_TOKEN_ID]
    return prompt, answer


def make_batch(
    examples: Sequence[Example],
    vocab: Vocabulary,
    rule: str = "answer_only",
    *,
    total_length: int | None = None,
) -> LabelledBatch:
    """Encode, right-pad and label ``examples`` by ``rule``.

    Each row is ``<bos> prompt answer <eos>`` and then padding: id ``0``,
    or ``<eos>`` under ``"pad_is_eos_masked"``.

    Args:
        examples: ``B >= 1`` examples.
        vocab: the vocabulary of the examples.
        rule: one of :data:`LABEL_RULES`.
        total_length: ``T``; default the longest row.

    Returns:
        A :class:`LabelledBatch`.
    """
    require_sequence(examples, "examples", "a sequence of Example")
    if not examples:
        raise ValueError("examples must hold at least one example")
    require_one_of(rule, LABEL_RULES, "rule")
    encoded = [_encode_example(example, vocab) for example in examples]
    lengths = [len(p) + len(a) for p, a in encoded]
    width = max(lengths)
    if total_length is not None:
        total_length = require_positive_int(total_length, "total_length")
        if total_length < width:
            raise ValueError(
                f"total_length must be >= the longest row ({width}); "
                f"got {total_length}"
            )
        width = total_length
    pad_id = EOS_TOKEN_ID if rule == "pad_is_eos_masked" else PAD_TOKEN_ID
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, (prompt, answer) in enumerate(encoded):
        tokens = torch.tensor(prompt + answer)
        input_ids[row, : len(tokens)] = tokens
        first_scored = 0 if rule == "prompt_in_labels" else len(prompt)
        labels[row, first_scored : len(tokens)] = tokens[first_scored:]
        if rule == "padding_in_labels":
            labels[row, len(tokens) :] = PAD_TOKEN_ID
    if rule == "pad_is_eos_masked":
        # The mistake: padding recognised by its id, which is also <eos>'s.
        labels[input_ids == pad_id] = IGNORE_INDEX
    return LabelledBatch(
        input_ids,
        labels,
        tuple(len(p) for p, _ in encoded),
        tuple(lengths),
        rule,
    )


# ---------------------------------------------------------------------------
# The model, and a training loop
# ---------------------------------------------------------------------------


def chapter_model(vocab: Vocabulary, *, seed: int = 0) -> TinyCausalLM:
    """The chapter's model: a :class:`TinyCausalLM` sized for ``vocab``.

    Hidden width 48, two heads, positions up to 48, float64 (about 37
    thousand parameters for the chapter's vocabulary).
    """
    require_int(seed, "seed")
    config = TinyLMConfig(
        vocab_size=vocab.size, hidden_size=48, num_heads=2, max_length=48
    )
    return build_tiny_lm(config, seed=seed)


@dataclass
class TrainingRun:
    """What :func:`train_model` measured.

    Attributes:
        rule: the labelling rule trained with.
        logged_losses: ``(steps,)`` the loss the loop optimised at each step,
            what a training log shows.
        eval_steps: the steps after which the model was evaluated (``0`` =
            before training).
        validation_losses: at each of ``eval_steps``, the token mean of the
            validation answers' loss, right labels (:func:`validation_loss`).
        exact_shares: at each of ``eval_steps``, the share of validation
            prompts answered exactly (:func:`answer_report`).
        model: the trained model.
    """

    rule: str
    logged_losses: list[float]
    eval_steps: list[int]
    validation_losses: list[float]
    exact_shares: list[float]
    model: TinyCausalLM = field(repr=False)


def validation_loss(
    model: TinyCausalLM,
    examples: Sequence[Example],
    vocab: Vocabulary,
    rule: str = "answer_only",
    *,
    total_length: int | None = None,
) -> float:
    """Token-mean next-token loss of ``model`` on ``examples`` under ``rule``.

    With the default rule this is the loss of the answers and their
    end-of-sequence tokens: the number that measures what the model was
    meant to learn.  One batch, no gradient.
    """
    batch = make_batch(examples, vocab, rule, total_length=total_length)
    device = _device_of(model)
    with torch.no_grad():
        logits = model(batch.input_ids.to(device))
        return float(label_padding_loss(logits, batch.labels.to(device)))


def train_model(
    train_examples: Sequence[Example],
    validation_examples: Sequence[Example],
    vocab: Vocabulary,
    *,
    rule: str = "answer_only",
    steps: int = 300,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    eval_every: int = 25,
    seed: int = 0,
    total_length: int | None = None,
    device: torch.device | str = "cpu",
) -> TrainingRun:
    """Train :func:`chapter_model` with AdamW on batches labelled by ``rule``.

    The batches are drawn from ``train_examples`` with ``seed``, so two
    runs with the same seed see the same examples in the same order and
    differ only in their labels.  Every ``eval_every`` steps (and before
    the first) the model is evaluated on ``validation_examples`` with the
    right labels.

    Args:
        train_examples, validation_examples: the two splits.
        vocab: their vocabulary.
        rule: one of :data:`LABEL_RULES`.
        steps: optimiser steps.
        batch_size: examples per step.
        learning_rate: AdamW's learning rate (no weight decay).
        eval_every: steps between evaluations.
        seed: seeds the weights and the order of the examples.
        total_length: pad every batch to this width; default the longest
            row of each batch.
        device: where to train (the chapter passes
            :func:`companion.device.book_device`, the CPU unless the reader
            opts in); the returned model is on the CPU whatever the device.

    Returns:
        A :class:`TrainingRun`.
    """
    require_one_of(rule, LABEL_RULES, "rule")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a torch.device or a str such as 'cpu'; got {type(device).__name__}")
    device = torch.device(device)
    steps = require_positive_int(steps, "steps")
    batch_size = require_positive_int(batch_size, "batch_size")
    eval_every = require_positive_int(eval_every, "eval_every")
    rate = require_real_number(learning_rate, "learning_rate")
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"learning_rate must be finite and > 0; got {rate}")
    if len(train_examples) < batch_size:
        raise ValueError(
            f"train_examples holds {len(train_examples)} examples; "
            f"batch_size is {batch_size}"
        )
    model = chapter_model(vocab, seed=seed).to(device)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=rate, weight_decay=0.0
    )
    sampler = random.Random(seed)
    run = TrainingRun(rule, [], [], [], [], model)

    def evaluate(step: int) -> None:
        model.eval()
        run.eval_steps.append(step)
        run.validation_losses.append(
            validation_loss(model, validation_examples, vocab)
        )
        run.exact_shares.append(
            answer_report(model, validation_examples, vocab).exact
        )
        model.train()

    evaluate(0)
    for step in range(1, steps + 1):
        chosen = sampler.sample(list(train_examples), batch_size)
        batch = make_batch(chosen, vocab, rule, total_length=total_length)
        optimizer.zero_grad(set_to_none=True)
        loss = label_padding_loss(model(batch.input_ids.to(device)), batch.labels.to(device))
        loss.backward()
        optimizer.step()
        run.logged_losses.append(loss.item())
        if step % eval_every == 0 or step == steps:
            evaluate(step)
    model.to("cpu").eval()
    return run


# ---------------------------------------------------------------------------
# What the model writes
# ---------------------------------------------------------------------------


def _device_of(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (the CPU for a model without any)."""
    return next(iter(model.parameters()), torch.empty(0)).device


def generate_greedy(
    model: TinyCausalLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_token_id: int | None = EOS_TOKEN_ID,
) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids, ``<bos>`` included).

    Prompts of equal length are decoded together as one batch (the model
    has absolute positions and no attention mask, so rows of a batch must
    start at position 0 and grow together).  A row stops after it writes
    ``stop_token_id`` (kept in its output); ``None`` never stops.

    Returns:
        One list of new token ids per prompt, at most ``max_new_tokens``.
    """
    require_sequence(prompts, "prompts", "a sequence of token-id lists")
    max_new_tokens = require_positive_int(max_new_tokens, "max_new_tokens")
    limit = model.config.max_length
    outputs: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for index, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompts[{index}] is empty")
        if len(prompt) + max_new_tokens > limit:
            raise ValueError(
                f"prompts[{index}] has {len(prompt)} tokens; with "
                f"max_new_tokens={max_new_tokens} it passes the model's "
                f"max_length={limit}"
            )
        by_length.setdefault(len(prompt), []).append(index)
    with torch.no_grad():
        for indices in by_length.values():
            ids = torch.tensor([list(prompts[i]) for i in indices], device=_device_of(model))
            done = torch.zeros(len(indices), dtype=torch.bool, device=ids.device)
            for _ in range(max_new_tokens):
                following = model(ids)[:, -1].argmax(dim=-1)
                for row, index in enumerate(indices):
                    if not done[row]:
                        outputs[index].append(int(following[row]))
                if stop_token_id is not None:
                    done |= following == stop_token_id
                if bool(done.all()):
                    break
                ids = torch.cat([ids, following[:, None]], dim=1)
    return outputs


@dataclass(frozen=True)
class AnswerReport:
    """What a model writes after each prompt, greedy decoding.

    Attributes:
        exact: share of prompts answered exactly, ``<eos>`` included.
        stopped: share of continuations that write ``<eos>`` within the
            budget.
        right_words: share whose first words are the answer (whether or
            not they stop after it).
        padding_written: share that write the padding id ``0`` anywhere,
            when decoding goes on past ``<eos>`` (``continue_past_eos``).
        samples: ``(prompt, continuation)`` strings of the first prompts.
    """

    exact: float
    stopped: float
    right_words: float
    padding_written: float
    samples: tuple[tuple[str, str], ...]


def answer_report(
    model: TinyCausalLM,
    examples: Sequence[Example],
    vocab: Vocabulary,
    *,
    max_new_tokens: int = 24,
    samples: int = 3,
    continue_past_eos: bool = False,
) -> AnswerReport:
    """Decode every prompt of ``examples`` greedily and score what is written.

    Args:
        model: a :class:`TinyCausalLM` of ``vocab``.
        examples: prompts and the answers expected.
        vocab: the vocabulary.
        max_new_tokens: budget of new tokens per prompt.
        samples: how many ``(prompt, continuation)`` pairs to keep.
        continue_past_eos: decode the whole budget even after ``<eos>``
            (to see what the model writes after the end).

    Returns:
        An :class:`AnswerReport`.
    """
    require_sequence(examples, "examples", "a sequence of Example")
    if not examples:
        raise ValueError("examples must hold at least one example")
    encoded = [_encode_example(example, vocab) for example in examples]
    outputs = generate_greedy(
        model,
        [prompt for prompt, _ in encoded],
        max_new_tokens=max_new_tokens,
        stop_token_id=None if continue_past_eos else EOS_TOKEN_ID,
    )
    exact = stopped = right = padded = 0
    for (_, answer), written in zip(encoded, outputs, strict=True):
        until_eos = (
            written[: written.index(EOS_TOKEN_ID) + 1]
            if EOS_TOKEN_ID in written
            else written
        )
        exact += until_eos == answer
        stopped += EOS_TOKEN_ID in written
        right += written[: len(answer) - 1] == answer[:-1]
        padded += PAD_TOKEN_ID in written
    count = len(examples)
    kept = tuple(
        (" ".join(example.prompt), vocab.decode(written))
        for example, written in list(zip(examples, outputs))[:samples]
    )
    return AnswerReport(
        exact / count, stopped / count, right / count, padded / count, kept
    )


def sample_from_bos(
    model: TinyCausalLM,
    vocab: Vocabulary,
    *,
    samples: int = 100,
    max_new_tokens: int = 20,
    seed: int = 0,
) -> list[str]:
    """Texts the model writes from ``<bos>`` alone, sampled at temperature 1.

    Decoding stops at ``"A:"`` (the end of a question), at ``<eos>`` or
    after ``max_new_tokens``; every sample is drawn from one
    ``torch.Generator`` seeded with ``seed``.

    Returns:
        ``samples`` strings of words (special tokens included).
    """
    samples = require_positive_int(samples, "samples")
    max_new_tokens = require_positive_int(max_new_tokens, "max_new_tokens")
    require_int(seed, "seed")
    generator = torch.Generator().manual_seed(seed)
    stop_ids = {EOS_TOKEN_ID, *vocab.encode(["A:"])}
    ids = torch.full((samples, 1), BOS_TOKEN_ID, dtype=torch.long)
    done = torch.zeros(samples, dtype=torch.bool)
    written: list[list[int]] = [[] for _ in range(samples)]
    with torch.no_grad():
        for _ in range(max_new_tokens):
            probabilities = model(ids)[:, -1].softmax(dim=-1)
            following = torch.multinomial(probabilities, 1, generator=generator)
            for row in range(samples):
                if not done[row]:
                    written[row].append(int(following[row]))
                    done[row] = int(following[row]) in stop_ids
            if bool(done.all()):
                break
            ids = torch.cat([ids, following], dim=1)
    return [vocab.decode(row) for row in written]


def question_share(texts: Sequence[str], examples: Sequence[Example]) -> float:
    """Share of ``texts`` that are exactly a question of ``examples``.

    A question is the words of an example's prompt, ``"Q:"`` to ``"A:"``.
    """
    require_sequence(texts, "texts", "a sequence of str")
    if not texts:
        raise ValueError("texts must hold at least one text")
    questions = {" ".join(example.prompt) for example in examples}
    return sum(text in questions for text in texts) / len(texts)


def chapter_tokenizer(vocab: Vocabulary) -> Any:
    """A ``PreTrainedTokenizerFast`` for ``vocab``, built in code, offline.

    A word-level ``tokenizers`` model that splits on whitespace, with
    ``<bos>``, ``<eos>`` and ``<pad>`` as its special tokens (unknown words
    map to ``<pad>``; the chapter's texts have none).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = models.WordLevel(
        vocab={word: i for i, word in enumerate(vocab.words)},
        unk_token=SPECIAL_TOKENS[PAD_TOKEN_ID],
    )
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=SPECIAL_TOKENS[PAD_TOKEN_ID],
        bos_token=SPECIAL_TOKENS[BOS_TOKEN_ID],
        eos_token=SPECIAL_TOKENS[EOS_TOKEN_ID],
    )


def example_text(example: Example) -> str:
    """``"<bos> prompt answer <eos>"`` as one string, for a tokenizer."""
    words = [
        SPECIAL_TOKENS[BOS_TOKEN_ID],
        *example.prompt,
        *example.answer,
        SPECIAL_TOKENS[EOS_TOKEN_ID],
    ]
    return " ".join(words)


# ---------------------------------------------------------------------------
# The Hugging Face Trainer on the chapter's model
# ---------------------------------------------------------------------------


def _loss_as_transformers(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None,
) -> torch.Tensor:
    """``ForCausalLMLoss``'s rule, kept in the logits' dtype (float64 here).

    The summed next-token losses divided by ``num_items_in_batch`` when it
    is given (the ``Trainer`` passes a float tensor), else by this batch's
    own count: a batch without any target gives ``0 / 0 = nan``, as in
    transformers.
    """
    total = token_losses(logits, labels).sum()
    if num_items_in_batch is None:
        return total / count_scored_targets(labels)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.dtype)
    return total / num_items_in_batch


class TrainerLM(nn.Module):
    """The chapter's model as the ``Trainer`` sees it.

    ``forward(input_ids: (B, T), labels: (B, T) | None = None,
    num_items_in_batch=None, **kwargs)`` returns ``{"loss", "logits"}``
    (``"loss"`` only with ``labels``).  The ``**kwargs`` make the
    ``Trainer`` set ``model_accepts_loss_kwargs`` and pass
    ``num_items_in_batch``: the scored targets of every micro-batch of the
    optimiser step.  The loss is transformers' rule, kept in float64.

    Attributes:
        lm: the wrapped :class:`TinyCausalLM`.
        training_losses: every loss computed in training mode, in order
            (one per micro-batch), to see what the ``Trainer`` did not log.
    """

    def __init__(self, lm: TinyCausalLM) -> None:
        super().__init__()
        if not isinstance(lm, TinyCausalLM):
            raise TypeError(f"lm must be a TinyCausalLM; got {type(lm).__name__}")
        self.lm = lm
        self.training_losses: list[float] = []

    def _output(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> dict[str, torch.Tensor]:
        logits = self.lm(input_ids)
        if labels is None:
            return {"logits": logits}
        loss = _loss_as_transformers(logits, labels, num_items_in_batch)
        if self.training:
            self.training_losses.append(loss.item())
        return {"loss": loss, "logits": logits}

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Logits and, with ``labels``, the loss (see the class)."""
        return self._output(input_ids, labels, num_items_in_batch)


class TrainerLMWithoutKwargs(TrainerLM):
    """:class:`TrainerLM` whose ``forward`` takes no ``**kwargs``.

    The ``Trainer`` inspects the signature, finds no ``**kwargs``, sets
    ``model_accepts_loss_kwargs = False`` and passes no
    ``num_items_in_batch``: each micro-batch returns its own token mean, and
    the ``Trainer`` divides it by the number of accumulation steps.
    """

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Logits and, with ``labels``, this micro-batch's own mean loss."""
        return self._output(input_ids, labels, None)


def trainer_dataset(
    examples: Sequence[Example],
    vocab: Vocabulary,
    *,
    without_answer: Sequence[int] = (),
) -> list[dict[str, list[int]]]:
    """``{"input_ids", "labels"}`` per example, prompt labels ``-100``.

    Args:
        examples: the examples.
        vocab: their vocabulary.
        without_answer: indices of examples whose labels are all ``-100``,
            as when truncation cuts the whole answer away.
    """
    require_sequence(without_answer, "without_answer", "a sequence of int")
    cut = {require_int(i, "without_answer[]") for i in without_answer}
    rows = []
    for index, example in enumerate(examples):
        prompt, answer = _encode_example(example, vocab)
        labels = [IGNORE_INDEX] * len(prompt) + answer
        if index in cut:
            labels = [IGNORE_INDEX] * len(labels)
        rows.append({"input_ids": prompt + answer, "labels": labels})
    return rows


def collate_for_trainer(
    features: Sequence[dict[str, Sequence[int]]],
) -> dict[str, torch.Tensor]:
    """Right-pad ``input_ids`` with ``0`` and ``labels`` with ``-100``."""
    require_sequence(features, "features", "a sequence of dicts")
    if not features:
        raise ValueError("features must hold at least one example")
    width = max(len(feature["input_ids"]) for feature in features)
    input_ids = torch.full((len(features), width), PAD_TOKEN_ID, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, feature in enumerate(features):
        input_ids[row, : len(feature["input_ids"])] = torch.tensor(
            feature["input_ids"]
        )
        labels[row, : len(feature["labels"])] = torch.tensor(feature["labels"])
    return {"input_ids": input_ids, "labels": labels}


@dataclass
class TrainerRun:
    """What :func:`run_trainer` measured.

    Attributes:
        logged_losses: the ``"loss"`` entries of ``trainer.state.log_history``.
        eval_loss: ``trainer.evaluate()["eval_loss"]``, or ``None``.
        accepts_loss_kwargs: ``trainer.model_accepts_loss_kwargs``.
        model: the trained wrapper.
    """

    logged_losses: list[float]
    eval_loss: float | None
    accepts_loss_kwargs: bool
    model: TrainerLM = field(repr=False)


def run_trainer(
    model: TrainerLM,
    train_rows: Sequence[dict[str, list[int]]],
    *,
    batch_size: int,
    accumulation_steps: int = 1,
    steps: int = 40,
    eval_rows: Sequence[dict[str, list[int]]] | None = None,
    eval_batch_size: int = 8,
    logging_steps: int = 1,
    nan_inf_filter: bool = True,
    learning_rate: float = 3e-3,
    seed: int = 0,
    compute_loss_func: Callable[..., torch.Tensor] | None = None,
) -> TrainerRun:
    """Train ``model`` with ``transformers.Trainer`` on the CPU, offline.

    ``report_to="none"``, nothing saved (the output directory is a
    temporary one), no progress bar or printed logs, a constant learning
    rate, AdamW without weight decay, ``max_grad_norm`` at its default.

    Args:
        model: a :class:`TrainerLM` (or the subclass without ``**kwargs``).
        train_rows: :func:`trainer_dataset` rows.
        batch_size: ``per_device_train_batch_size``.
        accumulation_steps: ``gradient_accumulation_steps``.
        steps: ``max_steps``, optimiser steps.
        eval_rows: rows for ``trainer.evaluate()`` after training.
        eval_batch_size: ``per_device_eval_batch_size``.
        logging_steps: optimiser steps per logged loss.
        nan_inf_filter: ``logging_nan_inf_filter``.
        learning_rate: AdamW's learning rate.
        seed: ``TrainingArguments.seed`` (the order of the examples).
        compute_loss_func: passed to the ``Trainer``: called with the
            model's outputs, the labels and ``num_items_in_batch``.

    Returns:
        A :class:`TrainerRun`.
    """
    import tempfile

    from transformers import Trainer, TrainingArguments
    from transformers import logging as transformers_logging
    from transformers.trainer_callback import PrinterCallback

    if not isinstance(model, TrainerLM):
        raise TypeError(f"model must be a TrainerLM; got {type(model).__name__}")
    for name, value in (
        ("batch_size", batch_size),
        ("accumulation_steps", accumulation_steps),
        ("steps", steps),
        ("eval_batch_size", eval_batch_size),
        ("logging_steps", logging_steps),
    ):
        require_positive_int(value, name)
    if not isinstance(nan_inf_filter, bool):
        raise TypeError(
            f"nan_inf_filter must be a bool; got {type(nan_inf_filter).__name__}"
        )
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with tempfile.TemporaryDirectory(prefix="trainer-") as output_dir:
            args = TrainingArguments(
                output_dir=output_dir,
                report_to="none",
                save_strategy="no",
                use_cpu=True,
                per_device_train_batch_size=batch_size,
                per_device_eval_batch_size=eval_batch_size,
                gradient_accumulation_steps=accumulation_steps,
                max_steps=steps,
                logging_steps=logging_steps,
                logging_nan_inf_filter=nan_inf_filter,
                learning_rate=learning_rate,
                lr_scheduler_type="constant",
                weight_decay=0.0,
                optim="adamw_torch",
                seed=seed,
                data_seed=seed,
                remove_unused_columns=False,
                disable_tqdm=True,
                dataloader_num_workers=0,
            )
            trainer = Trainer(
                model=model,
                args=args,
                train_dataset=list(train_rows),
                eval_dataset=None if eval_rows is None else list(eval_rows),
                data_collator=collate_for_trainer,
                compute_loss_func=compute_loss_func,
            )
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            logged = [
                float(entry["loss"])
                for entry in trainer.state.log_history
                if "loss" in entry
            ]
            eval_loss = None
            if eval_rows is not None:
                eval_loss = float(trainer.evaluate()["eval_loss"])
    finally:
        transformers_logging.set_verbosity(verbosity)
    model.eval()
    return TrainerRun(logged, eval_loss, bool(trainer.model_accepts_loss_kwargs), model)


def eval_loss_by_hand(
    model: TrainerLM,
    eval_rows: Sequence[dict[str, list[int]]],
    *,
    batch_size: int,
) -> tuple[float, float]:
    """The evaluation loss two ways: ``(mean of batch means, token mean)``.

    The first weighs each batch's token mean by its number of sequences,
    as the ``Trainer``'s evaluation loop does (a loss repeated once per
    sequence, then averaged); the second divides the summed loss of every
    target by their number.
    """
    batch_size = require_positive_int(batch_size, "batch_size")
    if not eval_rows:
        raise ValueError("eval_rows must hold at least one row")
    sums, counts, means, sizes = [], [], [], []
    with torch.no_grad():
        for first in range(0, len(eval_rows), batch_size):
            batch = collate_for_trainer(eval_rows[first : first + batch_size])
            losses = token_losses(model.lm(batch["input_ids"]), batch["labels"])
            count = count_scored_targets(batch["labels"])
            sums.append(float(losses.sum()))
            counts.append(count)
            means.append(sums[-1] / count)
            sizes.append(len(batch["input_ids"]))
    by_sequences = math.fsum(m * n for m, n in zip(means, sizes)) / sum(sizes)
    return by_sequences, math.fsum(sums) / sum(counts)


# ---------------------------------------------------------------------------
# A vision-language batch: image placeholders in the labels
# ---------------------------------------------------------------------------

_IMAGE_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
}
_IMAGE_CORNERS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
_IMAGE_WORDS: tuple[str, ...] = (
    "what", "is", "here", "?", "square", *_IMAGE_COLORS, "top", "bottom",
    "left", "right",
)
IMAGE_PROMPT: tuple[str, ...] = ("what", "is", "here", "?")
"""The question asked about every image."""


def image_word_ids() -> dict[str, int]:
    """Token ids of the image captions' words (ordinary text ids from 3)."""
    return {word: 3 + i for i, word in enumerate(_IMAGE_WORDS)}


@dataclass(frozen=True)
class ImageBatch:
    """Images made in code and their captions, laid out as LLaVA trains.

    Each row is ``<bos> <image>*N what is here ? <colour> square <corner>
    <eos>``: a coloured square in one corner of a noisy image, and its
    description.

    Attributes:
        input_ids: ``(B, T)`` int64, ``N`` = :func:`image_token_count`
            placeholders after ``<bos>``.
        pixel_values: ``(B, 3, IMAGE_SIZE, IMAGE_SIZE)`` float64.
        prompt_length: ``<bos>``, placeholders and question: the answer
            starts here.
    """

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    prompt_length: int

    def labels(self, placeholders_in_labels: bool = False) -> torch.Tensor:
        """``(B, T)`` labels: the answer only, or the placeholders too.

        The question and ``<bos>`` are ``-100`` either way.
        """
        labels = self.input_ids.clone()
        labels[:, : self.prompt_length] = IGNORE_INDEX
        if placeholders_in_labels:
            placeholders = self.input_ids == IMAGE_TOKEN_ID
            labels[placeholders] = self.input_ids[placeholders]
        return labels


def make_image_batch(size: int, *, seed: int) -> ImageBatch:
    """``size`` images with a red, green or blue square in a random corner.

    The pixels are Gaussian noise (standard deviation 0.1) plus the
    square's colour over one quarter of the image; the caption names the
    colour and the corner.
    """
    size = require_positive_int(size, "size")
    require_int(seed, "seed")
    generator = torch.Generator().manual_seed(seed)
    colors = torch.randint(0, len(_IMAGE_COLORS), (size,), generator=generator)
    corners = torch.randint(0, len(_IMAGE_CORNERS), (size,), generator=generator)
    pixels = 0.1 * torch.randn(
        size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator, dtype=torch.float64
    )
    half = IMAGE_SIZE // 2
    ids = image_word_ids()
    prompt = [BOS_TOKEN_ID] + [IMAGE_TOKEN_ID] * image_token_count()
    prompt += [ids[word] for word in IMAGE_PROMPT]
    rows = []
    for index in range(size):
        color = list(_IMAGE_COLORS)[int(colors[index])]
        row, column = divmod(int(corners[index]), 2)
        square = torch.tensor(_IMAGE_COLORS[color], dtype=torch.float64)
        pixels[
            index, :, row * half : (row + 1) * half,
            column * half : (column + 1) * half,
        ] += square.view(3, 1, 1)
        caption = [color, "square", *_IMAGE_CORNERS[int(corners[index])].split()]
        rows.append(prompt + [ids[word] for word in caption] + [EOS_TOKEN_ID])
    return ImageBatch(torch.tensor(rows), pixels, len(prompt))


@dataclass
class LlavaRun:
    """What :func:`train_tiny_llava` measured.

    Attributes:
        placeholders_in_labels: how the run was labelled.
        logged_losses: ``(steps,)`` the loss optimised at each step.
        answer_losses: ``(steps,)`` the same batch's loss on the answers
            alone (before the step's update).
        placeholder_share: share of the scored targets that are
            placeholders, in the training batches.
        exact: share of held-out images whose caption the model writes
            exactly, greedy decoding (the placeholder is never chosen).
        image_after_bos: mean probability the model gives ``<image>`` as
            the token after ``<bos>``, held-out batch.
        model: the trained model.
    """

    placeholders_in_labels: bool
    logged_losses: list[float]
    answer_losses: list[float]
    placeholder_share: float
    exact: float
    image_after_bos: float
    model: Any = field(repr=False)


def train_tiny_llava(
    *,
    placeholders_in_labels: bool,
    steps: int = 200,
    batch_size: int = 16,
    learning_rate: float = 3e-3,
    seed: int = 0,
    held_out: int = 100,
) -> LlavaRun:
    """Train the tiny ``LlavaForConditionalGeneration`` to describe images.

    The model of :func:`~companion.experiments.tiny_models.tiny_llava`
    (seed ``seed``) in float64, AdamW; batch ``k`` is
    ``make_image_batch(batch_size, seed=1000 * seed + k)`` and the held-out
    batch uses seed ``-1 - seed``.  The loss is computed from the model's
    logits with :func:`~companion.causal_lm_loss.label_padding_loss` (the
    model's own ``.loss`` is the same rule in float32).

    Returns:
        A :class:`LlavaRun`.
    """
    if not isinstance(placeholders_in_labels, bool):
        raise TypeError("placeholders_in_labels must be a bool")
    steps = require_positive_int(steps, "steps")
    batch_size = require_positive_int(batch_size, "batch_size")
    held_out = require_positive_int(held_out, "held_out")
    require_int(seed, "seed")
    model = tiny_llava(seed=seed).double().train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=learning_rate, weight_decay=0.0
    )
    logged, answers, placeholder_targets, targets = [], [], 0, 0
    for step in range(steps):
        batch = make_image_batch(batch_size, seed=1000 * seed + step)
        labels = batch.labels(placeholders_in_labels)
        logits = model(
            input_ids=batch.input_ids, pixel_values=batch.pixel_values
        ).logits
        loss = label_padding_loss(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        logged.append(loss.item())
        answers.append(float(label_padding_loss(logits.detach(), batch.labels())))
        scored = labels[:, 1:] != IGNORE_INDEX
        targets += int(scored.sum())
        placeholder_targets += int(
            (scored & (labels[:, 1:] == IMAGE_TOKEN_ID)).sum()
        )
    model.eval()
    test = make_image_batch(held_out, seed=-1 - seed)
    answer_length = test.input_ids.shape[1] - test.prompt_length
    with torch.no_grad():
        ids = test.input_ids[:, : test.prompt_length]
        for _ in range(answer_length):
            scores = model(
                input_ids=ids, pixel_values=test.pixel_values
            ).logits[:, -1]
            # A placeholder written into the caption would need an image
            # feature of its own; it is never a right word, so skip it.
            scores[:, IMAGE_TOKEN_ID] = -math.inf
            following = scores.argmax(dim=-1)
            ids = torch.cat([ids, following[:, None]], dim=1)
        exact = float(
            (ids[:, test.prompt_length :] == test.input_ids[:, test.prompt_length :])
            .all(dim=1)
            .double()
            .mean()
        )
        first = model(
            input_ids=test.input_ids, pixel_values=test.pixel_values
        ).logits[:, 0].softmax(dim=-1)
    return LlavaRun(
        placeholders_in_labels,
        logged,
        answers,
        placeholder_targets / targets,
        exact,
        float(first[:, IMAGE_TOKEN_ID].mean()),
        model,
    )


# ---------------------------------------------------------------------------
# Packing: DataCollatorWithFlattening against a padded batch
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FlatteningComparison:
    """One batch through a tiny ``LlamaForCausalLM``, padded and flattened.

    Every token is a target (pretraining-style labels).  Losses are the
    model's own ``.loss`` (``ForCausalLMLoss``, float32); a gradient
    difference is relative to the padded batch's gradient,
    ``||g - g_padded|| / ||g_padded||``.  Each entry of ``losses``,
    ``targets`` and ``gradient_differences`` is keyed by
    :data:`FLATTENING_VARIANTS`.

    Attributes:
        losses: the loss of each variant.
        targets: its scored targets (``num_items_in_batch``).
        gradient_differences: its gradient against the padded batch's
            (``0.0`` for ``"padded"`` itself).
        flattened: the collator's output, for display.
    """

    losses: dict[str, float]
    targets: dict[str, int]
    gradient_differences: dict[str, float]
    flattened: dict[str, torch.Tensor] = field(repr=False)


FLATTENING_VARIANTS: tuple[str, ...] = (
    "padded",
    "flattened",
    "flattened, cache on",
    "flattened, no position_ids",
    "flattened, separator <bos>",
)
"""What :func:`compare_flattened_and_padded` runs.

``"padded"``: the examples right-padded, ``attention_mask`` and labels
``-100`` on padding.  ``"flattened"``: ``DataCollatorWithFlattening``'s
one row (``position_ids`` restart at 0, ``-100`` as each example's first
label), forward with ``use_cache=False`` as the ``Trainer`` runs it.
``"flattened, cache on"``: the same row with the model's default
``use_cache`` (``True`` in the config): the forward pass creates a cache,
and with a cache transformers does not look for packed sequences, so
attention crosses the examples.  ``"flattened, no position_ids"``: the row
without its ``position_ids``: one long sequence.  ``"flattened, separator
<bos>"``: ``separator_id`` set to the ``<bos>`` id, which is what
concatenating each example's own labels gives: the last token of an
example is trained to predict the next example's first token.
"""


def _loss_and_gradient(
    model: nn.Module, inputs: dict[str, Any]
) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    gradient = torch.cat(
        [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
    )
    model.zero_grad(set_to_none=True)
    return loss.item(), gradient


def compare_flattened_and_padded(
    examples: Sequence[Example], vocab: Vocabulary, *, seed: int = 0
) -> FlatteningComparison:
    """Pack ``examples`` with ``DataCollatorWithFlattening``; compare.

    The model is a float64 ``LlamaForCausalLM`` of
    :func:`~companion.experiments.tiny_models.tiny_llama_config` (its
    vocabulary of 64 ids covers ``vocab``), weights drawn from ``seed``,
    SDPA attention: with ``position_ids`` that restart, no attention mask
    and no cache, transformers builds a block-diagonal causal mask, one
    block per example.  See :data:`FLATTENING_VARIANTS`.
    """
    from transformers import DataCollatorWithFlattening, LlamaForCausalLM

    require_sequence(examples, "examples", "a sequence of Example")
    if len(examples) < 2:
        raise ValueError("examples must hold at least two examples to pack")
    require_int(seed, "seed")
    config = tiny_llama_config()
    if vocab.size > config.vocab_size:
        raise ValueError(
            f"vocab has {vocab.size} ids; the tiny Llama covers "
            f"{config.vocab_size}"
        )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).double().train()

    sequences = [sum(_encode_example(example, vocab), []) for example in examples]
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full(
        (len(sequences), width), PAD_TOKEN_ID, dtype=torch.long
    )
    attention_mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
    features = [{"input_ids": ids} for ids in sequences]
    flattened = DataCollatorWithFlattening()(features)
    separated = DataCollatorWithFlattening(separator_id=BOS_TOKEN_ID)(features)
    batches: dict[str, dict[str, Any]] = {
        "padded": {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX),
            "use_cache": False,
        },
        "flattened": dict(flattened, use_cache=False),
        "flattened, cache on": dict(flattened),
        "flattened, no position_ids": {
            "input_ids": flattened["input_ids"],
            "labels": flattened["labels"],
            "use_cache": False,
        },
        "flattened, separator <bos>": dict(separated, use_cache=False),
    }
    losses, targets, gradients = {}, {}, {}
    for name in FLATTENING_VARIANTS:
        losses[name], gradients[name] = _loss_and_gradient(model, batches[name])
        targets[name] = count_scored_targets(batches[name]["labels"])
    reference = gradients["padded"]
    differences = {
        name: float(
            torch.linalg.vector_norm(gradient - reference)
            / torch.linalg.vector_norm(reference)
        )
        for name, gradient in gradients.items()
    }
    return FlatteningComparison(losses, targets, differences, flattened)


# ---------------------------------------------------------------------------
# shift_labels: a sequence cut into pieces, as sequence parallelism cuts it
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSequenceLosses:
    """A batch's loss with its sequence cut into pieces along ``T``.

    Attributes:
        whole: ``ForCausalLMLoss`` of the whole batch.
        pieces_without_shift_labels: the pieces' summed losses over the
            whole batch's count, each piece shifting its own labels: the
            target of each piece's last position is lost.
        pieces_with_shift_labels: the same with ``shift_labels`` taken from
            the whole batch before cutting it.
        lost_targets: targets the pieces lose without ``shift_labels``.
    """

    whole: float
    pieces_without_shift_labels: float
    pieces_with_shift_labels: float
    lost_targets: int


def split_sequence_losses(
    logits: torch.Tensor, labels: torch.Tensor, pieces: int
) -> SplitSequenceLosses:
    """Cut ``(B, T, V)`` logits and ``(B, T)`` labels into ``pieces`` along ``T``.

    Each piece is scored with transformers' ``ForCausalLMLoss`` and the
    whole batch's ``num_items_in_batch``, as ranks of sequence parallelism
    would, once from its own labels and once with ``shift_labels``: the
    whole batch's labels shifted before the cut.
    """
    from transformers.loss.loss_utils import ForCausalLMLoss

    pieces = require_positive_int(pieces, "pieces")
    if pieces > labels.shape[1]:
        raise ValueError(
            f"pieces must be <= T = {labels.shape[1]}; got {pieces}"
        )
    vocab = logits.shape[-1]
    count = torch.tensor(count_scored_targets(labels))
    whole = ForCausalLMLoss(logits, labels, vocab, num_items_in_batch=count)
    shifted = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    without = with_shift = 0.0
    kept = 0
    for logit_piece, label_piece, shift_piece in zip(
        logits.tensor_split(pieces, dim=1),
        labels.tensor_split(pieces, dim=1),
        shifted.tensor_split(pieces, dim=1),
        strict=True,
    ):
        # each rank holds its own piece, a contiguous tensor
        logit_piece = logit_piece.contiguous()
        label_piece = label_piece.contiguous()
        without += float(
            ForCausalLMLoss(logit_piece, label_piece, vocab, num_items_in_batch=count)
        )
        with_shift += float(
            ForCausalLMLoss(
                logit_piece,
                label_piece,
                vocab,
                num_items_in_batch=count,
                shift_labels=shift_piece.contiguous(),
            )
        )
        kept += count_scored_targets(label_piece)
    return SplitSequenceLosses(
        float(whole), without, with_shift, int(count) - kept
    )
