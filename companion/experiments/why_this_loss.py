"""Chapter 3's opening: why the loss is the mean of ``-log p``, and its units.

* :class:`MarkovSource` and :func:`word_chain`: text drawn from a Markov
  chain over a few words, whose entropy rate (the floor of the loss) is
  known exactly, and whose probability of any text can be computed;
* :class:`BigramLM` and :func:`train_bigram`: the smallest causal language
  model, one row of next-token logits per current token, trained with the
  library's causal-LM loss; :func:`generate` samples from it, and
  :func:`source_model` is the source itself as such a model;
* :func:`count_bigram` and :func:`table_nll`: the same model fitted by
  counting (its maximum-likelihood estimate), for any tokenization;
* :func:`train_bpe` and :func:`tokenizer_comparison`: one text under
  tokenizers of several vocabulary sizes, with perplexities and bits per
  character;
* :func:`entropy`, :func:`cross_entropy_of` and :func:`kl_divergence` of
  discrete distributions, and :func:`prefix_by_prefix_logits`, the logits a
  causal model gives each prefix on its own (teacher forcing computes them
  in one pass);
* :func:`words_first_table`: the worked example, one row per position;
  :func:`pad_sentences`, sentences as a right-padded batch.

Everything is float64 NumPy or PyTorch and seeded, so the chapter's numbers
are the same on every machine to the digits it shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from companion import IGNORE_INDEX
from companion._checks import (
    require_class_indices,
    require_positive_int,
    require_rank,
    require_real_number,
    require_tensor,
)
from companion.causal_lm_loss import label_padding_loss
from companion.cross_entropy import bits_per_byte, bits_per_character, perplexity

__all__ = [
    "LIKELY_NEXT_WORDS",
    "WORDS",
    "BigramLM",
    "MarkovSource",
    "count_bigram",
    "cross_entropy_of",
    "entropy",
    "generate",
    "kl_divergence",
    "pad_sentences",
    "prefix_by_prefix_logits",
    "source_model",
    "table_nll",
    "tokenizer_comparison",
    "train_bigram",
    "train_bpe",
    "word_chain",
    "words_first_table",
]

WORDS: tuple[str, ...] = (
    "the", "cat", "dog", "sat", "ran", "on", "to", "mat", "café", "and",
)
"""The vocabulary of :func:`word_chain`; ``"café"`` is there so that the
text has a character outside ASCII (2 bytes in UTF-8)."""

LIKELY_NEXT_WORDS: dict[str, dict[str, float]] = {
    "the": {"cat": 0.3, "dog": 0.3, "mat": 0.2, "café": 0.2},
    "cat": {"sat": 0.5, "ran": 0.4, "and": 0.1},
    "dog": {"ran": 0.5, "sat": 0.3, "and": 0.2},
    "sat": {"on": 0.8, "and": 0.2},
    "ran": {"to": 0.6, "and": 0.2, "on": 0.2},
    "on": {"the": 1.0},
    "to": {"the": 1.0},
    "mat": {"and": 1.0},
    "café": {"and": 1.0},
    "and": {"the": 1.0},
}
"""The grammar of :func:`word_chain`: which words follow each word, and how
often, before the uniform noise is mixed in."""


# ---------------------------------------------------------------------------
# Distributions
# ---------------------------------------------------------------------------


def _distribution(values: Any, name: str) -> np.ndarray:
    """``values`` as float64 ``(..., C)`` rows of non-negative numbers summing to 1."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0 or array.shape[-1] == 0:
        raise ValueError(f"{name} must have a class axis (..., C), C >= 1; got shape {array.shape}")
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError(f"{name} must hold finite probabilities >= 0")
    if not np.allclose(array.sum(axis=-1), 1.0, rtol=0, atol=1e-9):
        raise ValueError(f"{name} must sum to 1 over its last axis")
    return array


def entropy(q: Any) -> np.ndarray | float:
    """``H(q) = -sum_c q_c log q_c`` in nats, over the last axis (``0 log 0 = 0``).

    Args:
        q: ``(..., C)`` probabilities, each row summing to 1.
    """
    q = _distribution(q, "q")
    terms = np.where(q > 0, -q * np.log(np.where(q > 0, q, 1.0)), 0.0)
    result = terms.sum(axis=-1)
    return float(result) if result.ndim == 0 else result


def cross_entropy_of(q: Any, p: Any) -> np.ndarray | float:
    """``H(q, p) = -sum_c q_c log p_c`` in nats: the expected loss of ``p``
    on targets drawn from ``q``.

    Args:
        q: ``(..., C)`` the distribution of the targets.
        p: ``(..., C)`` the model's prediction; ``inf`` where ``p_c = 0 < q_c``.
    """
    q = _distribution(q, "q")
    p = _distribution(p, "p")
    with np.errstate(divide="ignore", invalid="ignore"):
        log_p = np.log(p)
        result = np.where(q > 0, -q * log_p, 0.0).sum(axis=-1)
    return float(result) if result.ndim == 0 else result


def kl_divergence(q: Any, p: Any) -> np.ndarray | float:
    """``KL(q || p) = sum_c q_c log(q_c / p_c) = H(q, p) - H(q)``, in nats.

    Args:
        q: ``(..., C)`` the distribution of the targets.
        p: ``(..., C)`` the model's prediction.
    """
    q = _distribution(q, "q")
    p = _distribution(p, "p")
    # 0 log(0 / p) = 0, whatever p; q log(q / 0) = inf for q > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(np.where(q > 0, q, 1.0)) - np.log(p)
        result = np.where(q > 0, q * ratio, 0.0).sum(axis=-1)
    return float(result) if result.ndim == 0 else result


# ---------------------------------------------------------------------------
# A source whose entropy is known
# ---------------------------------------------------------------------------


def _check_ids(ids: Any, vocab_size: int, name: str = "ids") -> np.ndarray:
    array = np.asarray(ids)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids; got dtype {array.dtype}")
    if array.ndim != 1 or array.size < 2:
        raise ValueError(f"{name} must be a 1-D sequence of at least 2 ids; got shape {array.shape}")
    if array.min() < 0 or array.max() >= vocab_size:
        raise ValueError(f"{name} must lie in [0, {vocab_size}); got values in "
                         f"[{array.min()}, {array.max()}]")
    return array.astype(np.int64)


@dataclass(frozen=True, eq=False)
class MarkovSource:
    """Words drawn one after another from a first-order Markov chain.

    Attributes:
        words: ``(V,)`` the vocabulary; word ``i`` has token id ``i``.
        transition: ``(V, V)`` float64, ``transition[i, j]`` the probability
            that word ``j`` follows word ``i``; every entry ``> 0``, so the
            chain is irreducible and has one stationary distribution.
    """

    words: tuple[str, ...]
    transition: np.ndarray
    stationary: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        transition = _distribution(self.transition, "transition")
        vocab = len(self.words)
        if transition.shape != (vocab, vocab) or not (transition > 0).all():
            raise ValueError(
                f"transition must be ({vocab}, {vocab}) with every entry > 0; "
                f"got shape {transition.shape}"
            )
        # The stationary distribution: the left eigenvector for eigenvalue 1.
        values, vectors = np.linalg.eig(transition.T)
        stationary = np.real(vectors[:, np.argmin(np.abs(values - 1.0))])
        object.__setattr__(self, "transition", transition)
        object.__setattr__(self, "stationary", stationary / stationary.sum())

    @property
    def vocab_size(self) -> int:
        """``V``, the number of words."""
        return len(self.words)

    @property
    def entropy_rate(self) -> float:
        """``-sum_i pi_i sum_j P_ij log P_ij`` in nats per word: the lowest
        mean loss any model can reach on long texts from this source."""
        return float(self.stationary @ entropy(self.transition))

    def sample(self, num_words: int, seed: int) -> np.ndarray:
        """``(num_words,)`` int64 word ids, the first drawn from the
        stationary distribution; ``np.random.default_rng(seed)``."""
        num_words = require_positive_int(num_words, "num_words")
        rng = np.random.default_rng(seed)
        cumulative = np.cumsum(self.transition, axis=1)
        ids = np.empty(num_words, dtype=np.int64)
        ids[0] = rng.choice(self.vocab_size, p=self.stationary)
        uniforms = rng.random(num_words)
        for t in range(1, num_words):
            row = cumulative[ids[t - 1]]
            ids[t] = min(int(np.searchsorted(row, uniforms[t], side="right")),
                         self.vocab_size - 1)
        return ids

    def text(self, ids: Any) -> str:
        """The words of ``ids`` joined by single spaces."""
        return " ".join(self.words[i] for i in np.asarray(ids).tolist())

    def nll(self, ids: Any) -> float:
        """``-log P(ids)`` in nats under the source itself:
        ``-log pi(x_0) - sum_t log P(x_t | x_{t-1})``."""
        ids = _check_ids(ids, self.vocab_size)
        return table_nll(np.log(self.stationary), np.log(self.transition), ids)

    def expected_loss(self, log_probs: Any) -> float:
        """The mean loss a bigram model with next-token log-probabilities
        ``log_probs (V, V)`` has on an endless text from this source:
        ``sum_i pi_i H(P_i, Q_i)``, which is ``entropy_rate`` plus
        :meth:`expected_kl`."""
        q = np.exp(np.asarray(log_probs, dtype=np.float64))
        return float(self.stationary @ cross_entropy_of(self.transition, q))

    def expected_kl(self, log_probs: Any) -> float:
        """``sum_i pi_i KL(P_i || Q_i)``: how far the bigram model
        ``log_probs (V, V)`` stays above the entropy rate."""
        q = np.exp(np.asarray(log_probs, dtype=np.float64))
        return float(self.stationary @ kl_divergence(self.transition, q))


def word_chain(noise: float = 0.05) -> MarkovSource:
    """The chapter's source: :data:`LIKELY_NEXT_WORDS` mixed with uniform noise.

    Row ``i`` of the transition matrix is ``(1 - noise) * likely + noise / V``,
    so every word can follow every word (the chain is irreducible) while
    most text reads like "the cat sat on the mat and the dog ran to the café".

    Args:
        noise: the weight of the uniform distribution, in ``(0, 1]``.
    """
    noise = require_real_number(noise, "noise")
    if not 0 < noise <= 1:
        raise ValueError(f"noise must lie in (0, 1]; got {noise}")
    index = {word: i for i, word in enumerate(WORDS)}
    vocab = len(WORDS)
    transition = np.full((vocab, vocab), noise / vocab)
    for word, followers in LIKELY_NEXT_WORDS.items():
        for follower, probability in followers.items():
            transition[index[word], index[follower]] += (1 - noise) * probability
    return MarkovSource(WORDS, transition)


# ---------------------------------------------------------------------------
# The smallest causal language model
# ---------------------------------------------------------------------------


class BigramLM(nn.Module):
    """A causal language model that looks back one token.

    ``forward(input_ids: (B, T) int) -> logits: (B, T, V)``: the logits at
    position ``t`` are row ``input_ids[b, t]`` of a learned ``(V, V)`` table.
    The table starts at zero, so the first prediction is uniform and the
    first loss is exactly ``log V``.
    """

    def __init__(self, vocab_size: int, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        vocab_size = require_positive_int(vocab_size, "vocab_size")
        # Given its weight, nn.Embedding draws no random numbers: building
        # the model leaves torch's global generator where it was.
        self.next_token_logits = nn.Embedding(
            vocab_size, vocab_size,
            _weight=torch.zeros(vocab_size, vocab_size, dtype=dtype))

    @property
    def vocab_size(self) -> int:
        """``V``."""
        return self.next_token_logits.num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, V)`` for ``input_ids (B, T)`` in ``[0, V)``."""
        require_tensor(input_ids, "input_ids")
        require_rank(input_ids, 2, "input_ids", "(B, T)")
        input_ids = require_class_indices(input_ids, "input_ids")
        if input_ids.numel() and (int(input_ids.min()) < 0
                                  or int(input_ids.max()) >= self.vocab_size):
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size})")
        return self.next_token_logits(input_ids)

    def log_prob_table(self) -> np.ndarray:
        """``(V, V)`` float64: row ``i`` is ``log p(next | current = i)``."""
        with torch.no_grad():
            weight = self.next_token_logits.weight.double()
            return torch.log_softmax(weight, dim=1).numpy()


def source_model(source: MarkovSource) -> BigramLM:
    """The source as a causal language model: a :class:`BigramLM` whose
    logits at position ``t`` are ``log A[x_t]``, the source's own
    next-word log-probabilities (so its softmax is the source itself)."""
    if not isinstance(source, MarkovSource):
        raise TypeError(f"source must be a MarkovSource; got {type(source).__name__}")
    model = BigramLM(source.vocab_size)
    with torch.no_grad():
        model.next_token_logits.weight.copy_(torch.from_numpy(np.log(source.transition)))
    return model


def pad_sentences(
    sentences: Sequence[str], words: Sequence[str], padding_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, labels)``, both ``(B, T)`` int64, for
    space-separated ``sentences`` over the vocabulary ``words``.

    Padding positions hold ``padding_id`` in ``input_ids`` (any id: a causal
    model never reads them for a real position) and ``-100`` in ``labels``.
    """
    if isinstance(sentences, str) or not sentences:
        raise TypeError("sentences must be a non-empty list of str")
    index = {word: i for i, word in enumerate(words)}
    rows = []
    for sentence in sentences:
        try:
            rows.append([index[word] for word in sentence.split()])
        except KeyError as error:
            raise ValueError(f"sentences: {error.args[0]!r} is not in words") from None
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), padding_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        labels[b, : len(row)] = torch.tensor(row)
    return input_ids, labels


def _as_batch(ids: Any, vocab_size: int, name: str) -> torch.Tensor:
    return torch.from_numpy(_check_ids(ids, vocab_size, name)).unsqueeze(0)


def train_bigram(
    model: BigramLM,
    train_ids: Any,
    validation_ids: Any,
    *,
    steps: int = 150,
    learning_rate: float = 0.1,
    source: MarkovSource | None = None,
) -> pd.DataFrame:
    """Full-batch Adam on one long text; the loss is the library's
    :func:`companion.causal_lm_loss.label_padding_loss`.

    Args:
        model: a :class:`BigramLM`, trained in place.
        train_ids, validation_ids: ``(N,)`` token ids in ``[0, V)``, one text each.
        steps: optimiser steps.
        learning_rate: Adam's learning rate.
        source: if given, the ``expected`` column holds the model's loss on
            an endless text from it (:meth:`MarkovSource.expected_loss`).

    Returns:
        One row per step ``0 .. steps`` (step 0 is before any update) with
        the ``train`` and ``validation`` mean losses in nats, and
        ``expected`` when ``source`` is given.
    """
    if not isinstance(model, BigramLM):
        raise TypeError(f"model must be a BigramLM; got {type(model).__name__}")
    steps = require_positive_int(steps, "steps")
    learning_rate = require_real_number(learning_rate, "learning_rate")
    train = _as_batch(train_ids, model.vocab_size, "train_ids")
    validation = _as_batch(validation_ids, model.vocab_size, "validation_ids")
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    rows = []
    # Tensors this small run fastest on one thread; the caller's setting is
    # restored afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(steps + 1):
            loss = label_padding_loss(model(train), train)
            with torch.no_grad():
                validation_loss = label_padding_loss(model(validation), validation)
            row = {"step": step, "train": loss.item(),
                   "validation": validation_loss.item()}
            if source is not None:
                row["expected"] = source.expected_loss(model.log_prob_table())
            rows.append(row)
            if step == steps:
                break
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return pd.DataFrame(rows)


def generate(model: BigramLM, start_id: int, num_tokens: int, seed: int) -> list[int]:
    """Sample ``num_tokens`` ids after ``start_id``, each fed back as the next input.

    This is generation: the model reads its own previous output, where
    training (teacher forcing) feeds it the text's true previous token.
    Sampling uses ``torch.Generator().manual_seed(seed)``.

    Returns:
        ``[start_id, x_1, ..., x_num_tokens]``.
    """
    if not isinstance(model, BigramLM):
        raise TypeError(f"model must be a BigramLM; got {type(model).__name__}")
    num_tokens = require_positive_int(num_tokens, "num_tokens")
    generator = torch.Generator().manual_seed(seed)
    ids = [int(start_id)]
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids]))[0, -1]
            probabilities = torch.softmax(logits, dim=0)
            ids.append(int(torch.multinomial(probabilities, 1, generator=generator)))
    return ids


def prefix_by_prefix_logits(
    forward: Callable[[torch.Tensor], torch.Tensor], input_ids: torch.Tensor
) -> torch.Tensor:
    """The logits at each position, computed from that prefix alone.

    Calls ``forward(input_ids[:, :t + 1])`` for ``t = 0 .. T-1`` and keeps
    the last position of each: ``T`` forward passes, as generation would
    make them.  For a causal model the result equals ``forward(input_ids)``,
    which is why one teacher-forced pass scores every position at once.

    Args:
        forward: ``(B, t) int -> (B, t, V)`` logits.
        input_ids: ``(B, T)`` int.

    Returns:
        ``(B, T, V)``.
    """
    require_tensor(input_ids, "input_ids")
    require_rank(input_ids, 2, "input_ids", "(B, T)")
    with torch.no_grad():
        return torch.stack(
            [forward(input_ids[:, : t + 1])[:, -1] for t in range(input_ids.shape[1])],
            dim=1,
        )


# ---------------------------------------------------------------------------
# Counting: the maximum-likelihood bigram of any tokenization
# ---------------------------------------------------------------------------


def count_bigram(ids: Any, vocab_size: int, alpha: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """A bigram model fitted by counting, with ``alpha`` added to every count.

    With ``alpha = 0`` this is the maximum-likelihood estimate of a bigram
    table: ``p(j | i) = count(i, j) / count(i, .)``.  A small ``alpha``
    keeps pairs never seen in ``ids`` possible.

    Returns:
        ``(initial, transition)`` log-probabilities, ``(V,)`` (the unigram
        frequencies, used for the first token) and ``(V, V)``.
    """
    vocab_size = require_positive_int(vocab_size, "vocab_size")
    alpha = require_real_number(alpha, "alpha")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")
    ids = _check_ids(ids, vocab_size)
    pairs = np.full((vocab_size, vocab_size), alpha)
    np.add.at(pairs, (ids[:-1], ids[1:]), 1.0)
    singles = np.full(vocab_size, alpha)
    np.add.at(singles, ids, 1.0)
    return (np.log(singles / singles.sum()),
            np.log(pairs / pairs.sum(axis=1, keepdims=True)))


def table_nll(initial: np.ndarray, transition: np.ndarray, ids: Any) -> float:
    """``-log p(ids)`` in nats: every token scored, the first by ``initial``
    ``(V,)``, each later one by row ``ids[t - 1]`` of ``transition (V, V)``
    (both log-probabilities)."""
    ids = _check_ids(ids, len(initial))
    return float(-(initial[ids[0]] + transition[ids[:-1], ids[1:]].sum()))


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------


def train_bpe(text: str, vocab_size: int) -> Any:
    """A byte-pair-encoding tokenizer trained on ``text`` with ``tokenizers``.

    Spaces become ``"▁"`` at the start of the next word (SentencePiece's
    convention, ``Metaspace``), so decoding gives back the text exactly.
    A ``vocab_size`` no larger than the number of distinct characters gives
    a character-level tokenizer (no merge is learnt).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(text, str) or not text:
        raise TypeError("text must be a non-empty str")
    vocab_size = require_positive_int(vocab_size, "vocab_size")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    tokenizer.train_from_iterator([text], trainer=trainer)
    return tokenizer


def tokenizer_comparison(
    source: MarkovSource,
    train_ids: Any,
    validation_ids: Any,
    vocab_sizes: Sequence[int],
    *,
    alpha: float = 0.1,
) -> pd.DataFrame:
    """One validation text, several tokenizers, two models for each.

    For each vocabulary size a BPE tokenizer is trained on the training
    text (:func:`train_bpe`); the validation text is split into tokens and
    scored by two models:

    * ``source``, the chain itself: the probability of the text does not
      depend on how it is cut, so its total ``-log p`` is the same on every
      row, and only the number of tokens changes;
    * a bigram over that tokenizer's tokens, fitted by counting on the
      training text (:func:`count_bigram`).

    Returns:
        One row per tokenizer: ``vocabulary``, ``tokens``,
        ``characters per token``, and for each model (``source``,
        ``bigram``) its ``nats per token``, ``perplexity`` and
        ``bits per character``; ``bits per byte`` for both.  The columns
        are a two-level index ``(model, quantity)``.
    """
    train_text = source.text(_check_ids(train_ids, source.vocab_size, "train_ids"))
    validation_ids = _check_ids(validation_ids, source.vocab_size, "validation_ids")
    text = source.text(validation_ids)
    source_nll = source.nll(validation_ids)
    rows = []
    for vocab_size in vocab_sizes:
        tokenizer = train_bpe(train_text, vocab_size)
        size = tokenizer.get_vocab_size()
        tokens = np.array(tokenizer.encode(text).ids)
        if tokenizer.decode(tokens.tolist()) != text:
            raise RuntimeError("the tokenizer does not give back the text")
        initial, transition = count_bigram(
            np.array(tokenizer.encode(train_text).ids), size, alpha)
        bigram_nll = table_nll(initial, transition, tokens)
        row: dict[tuple[str, str], Any] = {
            ("tokenizer", "vocabulary"): size,
            ("tokenizer", "tokens"): len(tokens),
            ("tokenizer", "characters per token"): len(text) / len(tokens),
        }
        for model, total in (("source", source_nll), ("bigram", bigram_nll)):
            row[(model, "nats per token")] = total / len(tokens)
            row[(model, "perplexity")] = perplexity(total, len(tokens))
            row[(model, "bits per character")] = bits_per_character(total, text)
            row[(model, "bits per byte")] = bits_per_byte(total, text)
        rows.append(row)
    table = pd.DataFrame(rows)
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table


# ---------------------------------------------------------------------------
# The worked example
# ---------------------------------------------------------------------------


def words_first_table(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    words: Sequence[str],
) -> pd.DataFrame:
    """One row per position of one sequence: from the logit row to ``-log p``.

    Args:
        logits: ``(T, V)`` float, row ``t`` scores the token at ``t + 1``.
        input_ids: ``(T,)`` int, the sequence.
        labels: ``(T,)`` int, its labels (``-100`` = not scored); row ``t``
            is scored when ``labels[t + 1]`` is not ``-100``.
        words: ``(V,)`` the word of each token id.

    Returns:
        ``T - 1`` rows: ``t``, the ``input`` word, the ``next word``, the
        next word's logit ``z[next]``, the row's log-sum-exp ``LSE(z_t)``,
        ``p(next) = exp(z[next] - LSE)``, ``-log p`` and whether the target
        is ``scored``.  An unscored row keeps its ``-log p`` (the model
        computes it all the same); the mean leaves it out.
    """
    require_tensor(logits, "logits")
    require_rank(logits, 2, "logits", "(T, V)")
    for tensor, name in ((input_ids, "input_ids"), (labels, "labels")):
        require_tensor(tensor, name)
        require_rank(tensor, 1, name, "(T,)")
    input_ids = require_class_indices(input_ids, "input_ids")
    labels = require_class_indices(labels, "labels")
    time, vocab = logits.shape
    if input_ids.shape[0] != time or labels.shape[0] != time or len(words) != vocab:
        raise ValueError(
            "input_ids and labels must have T entries and words V, as logits "
            f"(T, V) = {(time, vocab)}"
        )
    rows = logits[:-1].detach().double()
    following = input_ids[1:]
    target_logit = rows.gather(1, following.unsqueeze(1)).squeeze(1)
    log_sum_exp = torch.logsumexp(rows, dim=1)
    nll = log_sum_exp - target_logit
    return pd.DataFrame({
        "t": np.arange(time - 1),
        "input": [words[i] for i in input_ids[:-1].tolist()],
        "next word": [words[i] for i in following.tolist()],
        "z[next]": target_logit.numpy(),
        "LSE(z_t)": log_sum_exp.numpy(),
        "p(next)": torch.exp(-nll).numpy(),
        "-log p": nll.numpy(),
        "scored": (labels[1:] != IGNORE_INDEX).numpy(),
    })
