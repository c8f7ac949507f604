"""One denominator: token means across batches, micro-batches and devices.

A token-level mean loss is ``sum of token losses / number of scored tokens``.
Whenever the tokens are split into groups (batches of an epoch, micro-batches
of gradient accumulation, ranks of data-parallel training) and each group is
averaged first, the result is a *mean of means*: every token of group ``k``
gets weight ``1 / (K n_k)`` instead of ``1 / N``.  The two agree only when
every group holds the same number of scored tokens.

This module holds

* the two reductions on per-group sums and counts (:func:`token_mean`,
  :func:`mean_of_means`, :func:`token_weight_factors`);
* the summed next-token loss of a ``(B, T, V)`` batch, its token count and
  the loss of every position (:func:`token_loss_sum`,
  :func:`count_scored_tokens`, :func:`token_losses`);
* a small causal language model (:class:`TinyCausalLM`) and structured data
  for it (:func:`make_counting_batch`), with a short warm-up
  (:func:`warm_up`) so that per-token losses differ as they do in practice;
* one optimizer step's loss and gradient on the full batch
  (:func:`full_batch_step`) and with gradient accumulation over
  micro-batches (:func:`accumulation_step`), naive or fixed, and with
  data parallelism on top, simulated in one process
  (:func:`data_parallel_accumulation_step`);
* the naive error as the token counts of two micro-batches drift apart
  (:func:`naive_error_by_imbalance`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from companion import IGNORE_INDEX
from companion._checks import (
    require_class_indices,
    require_floating,
    require_int,
    require_integer,
    require_nonempty_lists,
    require_labels_in_range,
    require_positive_int,
    require_rank,
    require_real_number,
    require_tensor,
)
from companion.shapes import check_logits_and_labels, flatten_for_cross_entropy

Reduction = Literal["mean_of_means", "token_mean"]
"""How an accumulated step turns micro-batch losses into one loss.

``"mean_of_means"``: each micro-batch's mean token loss divided by the number
of micro-batches (the Trainer's behaviour before October 2024).
``"token_mean"``: each micro-batch's *summed* token loss divided by the
scored tokens of the whole batch (``num_items_in_batch``).
"""

REDUCTIONS: tuple[str, ...] = ("mean_of_means", "token_mean")

PAD_TOKEN_ID: int = 0
"""Input id placed after a row's real tokens; its label is ``IGNORE_INDEX``."""

BOS_TOKEN_ID: int = 1
"""First token of every row of :func:`make_counting_batch`."""


# ---------------------------------------------------------------------------
# The two reductions, on per-group sums and counts
# ---------------------------------------------------------------------------


def _check_sums_and_counts(
    sums: Sequence[float], counts: Sequence[int]
) -> tuple[list[float], list[int]]:
    if isinstance(sums, (str, bytes)) or not isinstance(sums, Sequence):
        raise TypeError(
            f"sums must be a sequence of floats; got {type(sums).__name__}"
        )
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence):
        raise TypeError(
            f"counts must be a sequence of ints; got {type(counts).__name__}"
        )
    if len(sums) != len(counts):
        raise ValueError(
            "sums and counts must have one entry per group; "
            f"got {len(sums)} sums and {len(counts)} counts"
        )
    if len(counts) == 0:
        raise ValueError(
            "sums and counts must describe at least one group; got none"
        )
    float_sums = []
    for index, value in enumerate(sums):
        if isinstance(value, torch.Tensor) and value.dim() == 0:
            require_floating(value, f"sums[{index}]")
            float_sums.append(float(value))
        else:
            float_sums.append(require_real_number(value, f"sums[{index}]"))
    int_counts = []
    for index, count in enumerate(counts):
        count = require_int(count, f"counts[{index}]")
        if count < 0:
            raise ValueError(f"counts[{index}] must be >= 0; got {count}")
        int_counts.append(count)
    return float_sums, int_counts


def token_mean(sums: Sequence[float], counts: Sequence[int]) -> float:
    """Token-level mean of grouped token losses: ``sum(sums) / sum(counts)``.

    Args:
        sums: ``(K,)`` summed token losses of each group.
        counts: ``(K,)`` scored tokens of each group (``>= 0``).

    Raises:
        ValueError: no group, lengths differ, a negative count, or
            ``sum(counts) == 0`` (the mean 0/0 is undefined).
    """
    float_sums, int_counts = _check_sums_and_counts(sums, counts)
    total = sum(int_counts)
    if total == 0:
        raise ValueError(
            "counts sum to 0: there is no scored token, so the token mean "
            "is 0/0"
        )
    return math.fsum(float_sums) / total


def mean_of_means(
    sums: Sequence[float],
    counts: Sequence[int],
    weights: Sequence[float] | None = None,
) -> float:
    """Average the groups' own means.

    ``sum_k w_k (sums_k / counts_k) / sum_k w_k``.

    With ``weights=None`` every group counts the same, which is what dividing
    each micro-batch's mean loss by the number of micro-batches does.  With
    ``weights`` = number of sequences per batch it is Keras's epoch loss.

    Args:
        sums: ``(K,)`` summed token losses of each group.
        counts: ``(K,)`` scored tokens of each group, all ``>= 1``.
        weights: optional ``(K,)`` non-negative group weights, not all zero.

    Raises:
        ValueError: a group without scored tokens (its mean is 0/0), or bad
            weights.
    """
    float_sums, int_counts = _check_sums_and_counts(sums, counts)
    for index, count in enumerate(int_counts):
        if count == 0:
            raise ValueError(
                f"counts[{index}] is 0: group {index} has no scored token, "
                "so its mean is 0/0"
            )
    if weights is None:
        group_weights = [1.0] * len(int_counts)
    else:
        if isinstance(weights, (str, bytes)) or not isinstance(
            weights, Sequence
        ):
            raise TypeError(
                "weights must be a sequence of floats; "
                f"got {type(weights).__name__}"
            )
        group_weights = [
            require_real_number(w, f"weights[{index}]")
            for index, w in enumerate(weights)
        ]
        if not all(math.isfinite(w) for w in group_weights):
            raise ValueError(f"weights must be finite; got {group_weights}")
        if len(group_weights) != len(int_counts):
            raise ValueError(
                f"weights must have one entry per group ({len(int_counts)}); "
                f"got {len(group_weights)}"
            )
        if any(w < 0 for w in group_weights) or sum(group_weights) == 0:
            raise ValueError(
                f"weights must be >= 0 and not all 0; got {group_weights}"
            )
    weighted = [
        w * s / n
        for w, s, n in zip(group_weights, float_sums, int_counts, strict=True)
    ]
    return math.fsum(weighted) / math.fsum(group_weights)


def token_weight_factors(counts: Sequence[int]) -> list[float]:
    """How much more (or less) a token of each group counts, mean of means.

    The token mean weighs every token ``1 / N``; the equal-weight mean of
    means weighs a token of group ``k`` ``1 / (K n_k)``.  The ratio is
    ``N / (K n_k)``: above 1 in groups with fewer tokens than average.

    Args:
        counts: ``(K,)`` scored tokens of each group, all ``>= 1``.

    Returns:
        ``(K,)`` factors; ``sum_k n_k * factor_k == N``.
    """
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence):
        raise TypeError(
            f"counts must be a sequence of ints; got {type(counts).__name__}"
        )
    if len(counts) == 0:
        raise ValueError("counts must describe at least one group; got none")
    _, int_counts = _check_sums_and_counts([0.0] * len(counts), counts)
    for index, count in enumerate(int_counts):
        if count == 0:
            raise ValueError(
                f"counts[{index}] is 0: group {index} has no scored token"
            )
    total, groups = sum(int_counts), len(int_counts)
    return [total / (groups * count) for count in int_counts]


# ---------------------------------------------------------------------------
# The summed next-token loss of a batch
# ---------------------------------------------------------------------------


def _check_labels(labels: torch.Tensor, name: str = "labels") -> None:
    require_tensor(labels, name)
    require_rank(labels, 2, name, "(B, T)")
    require_integer(labels, name)


def count_scored_tokens(labels: torch.Tensor) -> int:
    """Number of next-token targets that a causal-LM loss scores.

    Position ``t`` predicts ``labels[:, t + 1]``, so the first label of every
    row is never a target: the count is ``(labels[:, 1:] != -100).sum()``.

    Args:
        labels: ``(B, T)`` of any integer dtype, ``-100`` = ignored.
    """
    _check_labels(labels)
    return int((labels[:, 1:].long() != IGNORE_INDEX).sum())


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of a batch (no division).

    Args:
        logits: ``(B, T, V)`` float, ``T >= 2``.
        labels: ``(B, T)`` of any integer dtype (converted to int64),
            ``-100`` = ignored.

    Returns:
        A 0-d tensor of ``logits``' dtype, differentiable, ``0`` (still
        attached to the graph) when no position is scored.
    """
    _, _, vocab = check_logits_and_labels(logits, labels)
    labels = require_class_indices(labels, "labels")
    require_labels_in_range(labels, vocab, IGNORE_INDEX, "labels")
    flat_logits, flat_labels = flatten_for_cross_entropy(logits, labels)
    return F.cross_entropy(
        flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"
    )


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token loss of every position, ``0`` where the target is ignored.

    Args:
        logits: ``(B, T, V)`` float, ``T >= 2``.
        labels: ``(B, T)`` of any integer dtype (converted to int64),
            ``-100`` = ignored.

    Returns:
        ``(B, T-1)`` in ``logits``' dtype: entry ``[b, t]`` is
        ``-log p(labels[b, t+1] | tokens <= t)``.
    """
    batch, time, vocab = check_logits_and_labels(logits, labels)
    labels = require_class_indices(labels, "labels")
    require_labels_in_range(labels, vocab, IGNORE_INDEX, "labels")
    flat_logits, flat_labels = flatten_for_cross_entropy(logits, labels)
    per_position = F.cross_entropy(
        flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return per_position.view(batch, time - 1)


# ---------------------------------------------------------------------------
# A small causal language model and data for it
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


def make_counting_batch(
    lengths: Sequence[int],
    *,
    vocab_size: int,
    seed: int,
    total_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that start with a begin token, then count up from a random token.

    Row ``i`` is ``[BOS, s, s+1, s+2, ...]`` (``lengths[i]`` tokens; counting
    wraps around within ids ``2 .. V-1``) with a random start ``s``.  The first
    target of a row, ``s``, cannot be predicted from ``BOS``; every later one
    follows from the token before it.  A trained model therefore has a high
    loss on the first target of each row and a low loss on the others, so
    short rows have a higher mean loss than long ones, much as the first
    positions of real text, with the least context, have the highest loss.

    Args:
        lengths: ``(B,)`` real tokens per row (``BOS`` included), each
            ``>= 1``.
        vocab_size: ``V >= 3``; id ``0`` is padding, id ``1`` is ``BOS``.
        seed: seed of the generator that draws the starts.
        total_length: ``T``, at least ``max(lengths)`` and 2; default
            ``max(lengths, 2)``.

    Returns:
        ``input_ids: (B, T)`` int64 with ``0`` after each row's tokens, and
        ``labels: (B, T)`` int64, equal to ``input_ids`` on real tokens and
        ``-100`` on padding.  Row ``i`` has ``lengths[i] - 1`` scored targets.
    """
    if (
        isinstance(lengths, (str, bytes))
        or not isinstance(lengths, Sequence)
        or not lengths
    ):
        raise ValueError(
            "lengths must be a non-empty sequence of ints, one per row"
        )
    for index, length in enumerate(lengths):
        require_positive_int(length, f"lengths[{index}]")
    require_positive_int(vocab_size, "vocab_size")
    require_int(seed, "seed")
    if vocab_size < 3:
        raise ValueError(
            "vocab_size must be >= 3 (id 0 is padding, id 1 is BOS); "
            f"got {vocab_size}"
        )
    longest = max(max(lengths), 2)
    if total_length is None:
        total_length = longest
    require_positive_int(total_length, "total_length")
    if total_length < longest:
        raise ValueError(
            f"total_length must be >= max(lengths, 2) = {longest}; "
            f"got {total_length}"
        )
    cycle = vocab_size - 2
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, cycle, (len(lengths),), generator=generator)
    input_ids = torch.full(
        (len(lengths), total_length), PAD_TOKEN_ID, dtype=torch.long
    )
    for row, length in enumerate(lengths):
        input_ids[row, 0] = BOS_TOKEN_ID
        counting = (starts[row] + torch.arange(length - 1)) % cycle
        input_ids[row, 1:length] = 2 + counting
    labels = torch.where(input_ids == PAD_TOKEN_ID, IGNORE_INDEX, input_ids)
    return input_ids, labels


def warm_up(
    model: TinyCausalLM,
    *,
    steps: int = 40,
    rows: int = 8,
    longest_row: int = 24,
    seed: int = 1,
    learning_rate: float = 3e-2,
) -> list[float]:
    """Train ``model`` briefly on counting rows; return the loss of each step.

    A model at initialisation gives every token a loss near ``log V``, which
    hides how unequal per-token losses are during training.  A few dozen
    Adam steps on :func:`make_counting_batch` rows (lengths drawn from
    ``2 .. longest_row`` with ``seed``) make the first target of a row hard
    and the others easy.
    """
    if not isinstance(model, TinyCausalLM):
        raise TypeError(
            f"model must be a TinyCausalLM; got {type(model).__name__}"
        )
    require_positive_int(steps, "steps")
    require_positive_int(rows, "rows")
    require_positive_int(longest_row, "longest_row")
    require_int(seed, "seed")
    rate = require_real_number(learning_rate, "learning_rate")
    if not (math.isfinite(rate) and rate >= 0):
        raise ValueError(
            f"learning_rate must be finite and >= 0; got {learning_rate}"
        )
    config = model.config
    if not 2 <= longest_row <= config.max_length:
        raise ValueError(
            "longest_row must lie in "
            f"[2, config.max_length={config.max_length}]; got {longest_row}"
        )
    generator = torch.Generator().manual_seed(seed)
    parameters = list(model.parameters())
    first_moments = [torch.zeros_like(p) for p in parameters]
    second_moments = [torch.zeros_like(p) for p in parameters]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    history = []
    for step in range(1, steps + 1):
        lengths = torch.randint(
            2, longest_row + 1, (rows,), generator=generator
        ).tolist()
        input_ids, labels = make_counting_batch(
            lengths, vocab_size=config.vocab_size, seed=seed * 100_003 + step
        )
        model.zero_grad(set_to_none=True)
        loss = token_loss_sum(model(input_ids), labels)
        loss = loss / count_scored_tokens(labels)
        loss.backward()
        # Adam written out: torch.optim imports the compiler stack
        # (torch._dynamo) on first use, seconds of start-up in every
        # data-parallel worker.
        with torch.no_grad():
            moments = zip(first_moments, second_moments, strict=True)
            for p, (m, v) in zip(parameters, moments, strict=True):
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = m / (1 - beta1**step)
                v_hat = v / (1 - beta2**step)
                p.sub_(learning_rate * m_hat / (v_hat.sqrt() + eps))
        history.append(loss.item())
    model.zero_grad(set_to_none=True)
    return history


# ---------------------------------------------------------------------------
# One optimizer step: full batch versus accumulated micro-batches
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    """Loss and gradient of one optimizer step, before the update.

    Attributes:
        reduction: ``"full_batch"``, ``"mean_of_means"`` or ``"token_mean"``.
        loss: the loss the step reports (sum of the scaled micro-batch losses).
        gradient: ``(P,)`` all parameter gradients, flattened in
            ``model.parameters()`` order, in the model's dtype.
        token_counts: scored tokens of each micro-batch (one entry for the
            full batch).
    """

    reduction: str
    loss: float
    gradient: torch.Tensor
    token_counts: tuple[int, ...]


def flat_gradient(model: nn.Module) -> torch.Tensor:
    """``(P,)`` all parameters' ``.grad``, concatenated (0 where ``None``)."""
    return torch.cat(
        [
            (p.grad if p.grad is not None else torch.zeros_like(p))
            .detach()
            .reshape(-1)
            for p in model.parameters()
        ]
    ).clone()


def _check_batch(input_ids: torch.Tensor, labels: torch.Tensor) -> None:
    require_tensor(input_ids, "input_ids")
    require_rank(input_ids, 2, "input_ids", "(B, T)")
    require_integer(input_ids, "input_ids")
    _check_labels(labels)
    if labels.shape != input_ids.shape:
        raise ValueError(
            "labels must have the shape of input_ids "
            f"{tuple(input_ids.shape)}; got {tuple(labels.shape)}"
        )
    if input_ids.shape[1] < 2:
        raise ValueError(
            f"input_ids needs T >= 2 positions; got T={input_ids.shape[1]}"
        )


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(
            "model must be a torch.nn.Module mapping input_ids (B, T) to "
            f"logits (B, T, V); got {type(model).__name__}"
        )


def _require_scored_tokens(labels: torch.Tensor) -> int:
    total = count_scored_tokens(labels)
    if total == 0:
        raise ValueError(
            "labels has no scored token in the whole batch "
            "(every labels[:, 1:] is -100): the token mean is 0/0"
        )
    return total


def full_batch_step(
    model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor
) -> StepResult:
    """Loss and gradient of the token mean over the whole batch at once.

    Args:
        model: maps ``input_ids (B, T) int`` to ``logits (B, T, V)`` float.
        input_ids: ``(B, T)`` int.
        labels: ``(B, T)`` int, ``-100`` = ignored.

    Raises:
        ValueError: no scored token in the batch.
    """
    _check_model(model)
    _check_batch(input_ids, labels)
    total = _require_scored_tokens(labels)
    model.zero_grad(set_to_none=True)
    loss = token_loss_sum(model(input_ids), labels) / total
    loss.backward()
    return StepResult(
        "full_batch", loss.item(), flat_gradient(model), (total,)
    )


def split_rows(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    micro_batch_rows: Sequence[int],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a batch into consecutive micro-batches of ``micro_batch_rows`` rows.

    Raises:
        ValueError: a size ``< 1`` or sizes that do not add up to ``B``.
    """
    _check_batch(input_ids, labels)
    if isinstance(micro_batch_rows, (str, bytes)) or not isinstance(
        micro_batch_rows, Sequence
    ):
        raise TypeError(
            "micro_batch_rows must be a sequence of ints; "
            f"got {type(micro_batch_rows).__name__}"
        )
    for index, rows in enumerate(micro_batch_rows):
        require_positive_int(rows, f"micro_batch_rows[{index}]")
    if sum(micro_batch_rows) != input_ids.shape[0]:
        raise ValueError(
            "micro_batch_rows must add up to the batch's "
            f"B={input_ids.shape[0]} rows; "
            f"got {list(micro_batch_rows)} (sum {sum(micro_batch_rows)})"
        )
    pieces, start = [], 0
    for rows in micro_batch_rows:
        stop = start + rows
        pieces.append((input_ids[start:stop], labels[start:stop]))
        start += rows
    return pieces


def accumulation_step(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    micro_batch_rows: Sequence[int],
    reduction: Reduction,
) -> StepResult:
    """One step with gradient accumulation over micro-batches.

    Each micro-batch runs forward and backward on its own and the gradients
    add up in ``.grad``, as a training loop with accumulation does.  The
    micro-batch loss that is back-propagated is

    * ``"mean_of_means"``: ``(S_k / n_k) / K``, its own token mean divided by
      the number of micro-batches ``K``;
    * ``"token_mean"``: ``S_k / N``, its summed token loss divided by the
      scored tokens ``N`` of the whole batch, counted before the first
      forward pass (``num_items_in_batch``).

    Args:
        model: maps ``input_ids (B, T) int`` to ``logits (B, T, V)`` float.
        input_ids: ``(B, T)`` int.
        labels: ``(B, T)`` int, ``-100`` = ignored.
        micro_batch_rows: rows of each micro-batch, adding up to ``B``.
        reduction: ``"mean_of_means"`` or ``"token_mean"``.

    Raises:
        ValueError: no scored token in the batch; for ``"mean_of_means"``, a
            micro-batch without a scored token (its own mean is 0/0).
    """
    _check_model(model)
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction must be one of {REDUCTIONS}; got {reduction!r}"
        )
    pieces = split_rows(input_ids, labels, micro_batch_rows)
    total = _require_scored_tokens(labels)
    counts = tuple(count_scored_tokens(lab) for _, lab in pieces)
    if reduction == "mean_of_means":
        for index, count in enumerate(counts):
            if count == 0:
                raise ValueError(
                    f"micro-batch {index} has no scored token: its mean "
                    "loss is 0/0 (PyTorch's reduction='mean' returns nan)"
                )
    model.zero_grad(set_to_none=True)
    reported = 0.0
    for (piece_ids, piece_labels), count in zip(pieces, counts, strict=True):
        piece_sum = token_loss_sum(model(piece_ids), piece_labels)
        if reduction == "mean_of_means":
            piece_loss = piece_sum / count / len(pieces)
        else:
            piece_loss = piece_sum / total
        piece_loss.backward()
        reported += piece_loss.item()
    return StepResult(reduction, reported, flat_gradient(model), counts)


CountScope = Literal["global", "per_rank"]
"""Which tokens a data-parallel step's denominator counts.

``"global"``: every rank's micro-batches (``average_tokens_across_devices``
true, the Trainer's default), with the loss multiplied by the number of
ranks.  ``"per_rank"``: each rank counts only its own micro-batches.
"""


def data_parallel_accumulation_step(
    model: nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    rank_micro_batch_rows: Sequence[Sequence[int]],
    count: CountScope,
) -> StepResult:
    """Data parallelism with gradient accumulation, simulated in one process.

    The rows are dealt out in order: rank 0 takes the first
    ``sum(rank_micro_batch_rows[0])`` rows, rank 1 the next, and so on; each
    rank cuts its rows into micro-batches of the given sizes.  Micro-batch
    ``k`` of rank ``r`` back-propagates

    * ``"global"``: ``R * S_rk / N``, with ``N`` the scored tokens of all
      ranks and micro-batches and ``R`` the number of ranks;
    * ``"per_rank"``: ``S_rk / n_r``, with ``n_r`` the scored tokens of
      rank ``r``'s micro-batches only.

    Each rank's gradients add up over its micro-batches, then the ranks'
    gradients are averaged, as ``DistributedDataParallel``'s all-reduce does.

    Args:
        model: maps ``input_ids (B, T) int`` to ``logits (B, T, V)`` float.
        input_ids: ``(B, T)`` int.
        labels: ``(B, T)`` int, ``-100`` = ignored.
        rank_micro_batch_rows: per rank, the rows of each of its
            micro-batches; all sizes ``>= 1``, adding up to ``B``.
        count: ``"global"`` or ``"per_rank"``.

    Returns:
        A :class:`StepResult` whose ``loss`` is the mean over ranks of each
        rank's summed micro-batch losses and whose ``token_counts`` are the
        scored tokens of every micro-batch, rank by rank.

    Raises:
        ValueError: no scored token in the batch; for ``"per_rank"``, a rank
            without a scored token (its own count is 0).
    """
    _check_model(model)
    if count not in ("global", "per_rank"):
        raise ValueError(
            f"count must be 'global' or 'per_rank'; got {count!r}"
        )
    if isinstance(rank_micro_batch_rows, (str, bytes)) or not isinstance(
        rank_micro_batch_rows, Sequence
    ):
        raise TypeError(
            "rank_micro_batch_rows must be a sequence with one list of "
            "micro-batch sizes per rank; "
            f"got {type(rank_micro_batch_rows).__name__}"
        )
    require_nonempty_lists(
        rank_micro_batch_rows, "rank_micro_batch_rows", "micro-batch sizes"
    )
    ranks = len(rank_micro_batch_rows)
    if ranks == 0:
        raise ValueError("rank_micro_batch_rows must describe at least 1 rank")
    flat_rows = [rows for sizes in rank_micro_batch_rows for rows in sizes]
    pieces = split_rows(input_ids, labels, flat_rows)
    total = _require_scored_tokens(labels)
    counts = tuple(count_scored_tokens(lab) for _, lab in pieces)
    rank_pieces, first = [], 0
    for sizes in rank_micro_batch_rows:
        rank_pieces.append(range(first, first + len(sizes)))
        first += len(sizes)
    rank_counts = [sum(counts[i] for i in piece) for piece in rank_pieces]
    if count == "per_rank":
        for rank, rank_count in enumerate(rank_counts):
            if rank_count == 0:
                raise ValueError(
                    f"rank {rank} has no scored token: its own count is 0"
                )
    rank_gradients, reported = [], 0.0
    for rank, piece_indices in enumerate(rank_pieces):
        model.zero_grad(set_to_none=True)
        for index in piece_indices:
            piece_ids, piece_labels = pieces[index]
            piece_sum = token_loss_sum(model(piece_ids), piece_labels)
            if count == "global":
                piece_loss = ranks * piece_sum / total
            else:
                piece_loss = piece_sum / rank_counts[rank]
            piece_loss.backward()
            reported += piece_loss.item() / ranks
        rank_gradients.append(flat_gradient(model))
    # DistributedDataParallel's all-reduce: the mean of the ranks' gradients.
    gradient = torch.stack(rank_gradients).sum(dim=0) / ranks
    model.zero_grad(set_to_none=True)
    return StepResult(f"data_parallel_{count}", reported, gradient, counts)


def relative_difference(
    result: torch.Tensor, reference: torch.Tensor
) -> float:
    """``||result - reference|| / ||reference||`` (Euclidean norms)."""
    require_tensor(result, "result")
    require_tensor(reference, "reference")
    require_floating(result, "result")
    require_floating(reference, "reference")
    if result.shape != reference.shape:
        raise ValueError(
            "result must have the shape of reference "
            f"{tuple(reference.shape)}; got {tuple(result.shape)}"
        )
    scale = float(torch.linalg.vector_norm(reference))
    if scale == 0.0:
        raise ValueError(
            "reference has norm 0: a relative difference is undefined"
        )
    return float(torch.linalg.vector_norm(result - reference)) / scale


# ---------------------------------------------------------------------------
# How the naive error grows with imbalance
# ---------------------------------------------------------------------------


def naive_error_by_imbalance(
    model: nn.Module,
    token_ratios: Sequence[int],
    *,
    short_tokens: int = 2,
    vocab_size: int,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Errors of both reductions for two micro-batches of unequal token counts.

    Micro-batch 1 is one row with ``short_tokens`` scored tokens, micro-batch
    2 one row with ``ratio * short_tokens``.  For each ratio, the full-batch
    step is the reference.

    Returns:
        One dict per ratio: ``token_ratio``, ``naive_loss_error`` and
        ``naive_gradient_error`` (relative), and ``fixed_loss_error`` and
        ``fixed_gradient_error`` (relative, rounding only).
    """
    _check_model(model)
    require_positive_int(short_tokens, "short_tokens")
    require_int(seed, "seed")
    if isinstance(token_ratios, (str, bytes)) or not isinstance(
        token_ratios, Sequence
    ):
        raise TypeError(
            "token_ratios must be a sequence of ints; "
            f"got {type(token_ratios).__name__}"
        )
    for index, ratio in enumerate(token_ratios):
        require_positive_int(ratio, f"token_ratios[{index}]")
    rows = []
    for ratio in token_ratios:
        lengths = [short_tokens + 1, ratio * short_tokens + 1]
        input_ids, labels = make_counting_batch(
            lengths, vocab_size=vocab_size, seed=seed + ratio
        )
        full = full_batch_step(model, input_ids, labels)
        naive = accumulation_step(
            model, input_ids, labels, [1, 1], "mean_of_means"
        )
        fixed = accumulation_step(
            model, input_ids, labels, [1, 1], "token_mean"
        )
        naive_grad = relative_difference(naive.gradient, full.gradient)
        fixed_grad = relative_difference(fixed.gradient, full.gradient)
        rows.append(
            {
                "token_ratio": float(ratio),
                "naive_loss_error": abs(naive.loss - full.loss)
                / abs(full.loss),
                "naive_gradient_error": naive_grad,
                "fixed_loss_error": abs(fixed.loss - full.loss)
                / abs(full.loss),
                "fixed_gradient_error": fixed_grad,
            }
        )
    model.zero_grad(set_to_none=True)
    return rows
