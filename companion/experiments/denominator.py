"""Chapter 5's experiments: one optimizer step, split three ways.

* :func:`make_counting_batch`, structured data for
  :class:`~companion.experiments.tiny_models.TinyCausalLM`, and
  :func:`warm_up`, a short training run on it, so that per-token losses
  differ as they do in practice;
* one optimizer step's loss and gradient on the full batch
  (:func:`full_batch_step`), with gradient accumulation over micro-batches
  (:func:`accumulation_step`), naive or with the library's rule
  (:func:`companion.accumulation.micro_batch_loss`), and with data
  parallelism on top, simulated in one process
  (:func:`data_parallel_accumulation_step`);
* how far apart two gradients are, in direction
  (:func:`cosine_similarity`) and in length (:func:`norm_ratio`), kept
  apart because Adam ignores a constant scale but not a turned direction;
* the naive error as the token counts of two micro-batches drift apart
  (:func:`naive_error_by_imbalance`);
* rows packed to a fixed length from prompt-and-answer examples
  (:func:`make_packed_batch`), whose scored counts differ from row to row
  once the prompts are masked;
* the lines of ``transformers``' ``Trainer`` that the chapter quotes
  (:func:`source_excerpt`).

The same comparison with real processes is
:mod:`companion.experiments.ddp_demo`.
"""

from __future__ import annotations

import inspect
import math
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from companion import IGNORE_INDEX
from companion._checks import (
    require_floating,
    require_int,
    require_integer,
    require_nonempty_lists,
    require_positive_int,
    require_positive_ints,
    require_rank,
    require_real_number,
    require_sequence,
    require_tensor,
)
from companion.accumulation import micro_batch_loss
from companion.causal_lm_loss import count_scored_targets, label_padding_loss
from companion.experiments.tiny_models import (
    BOS_TOKEN_ID,
    PAD_TOKEN_ID,
    TinyCausalLM,
)

__all__ = [
    "REDUCTIONS",
    "CountScope",
    "Reduction",
    "StepResult",
    "accumulation_step",
    "cosine_from_norms",
    "cosine_similarity",
    "data_parallel_accumulation_step",
    "flat_gradient",
    "full_batch_step",
    "make_counting_batch",
    "make_packed_batch",
    "naive_error_by_imbalance",
    "norm_ratio",
    "relative_difference",
    "source_excerpt",
    "split_rows",
    "warm_up",
]

Reduction = Literal["mean_of_means", "token_mean"]
"""How an accumulated step turns micro-batch losses into one loss.

``"mean_of_means"``: each micro-batch's mean token loss divided by the number
of micro-batches (the Trainer's behaviour before October 2024).
``"token_mean"``: each micro-batch's *summed* token loss divided by the
scored tokens of the whole batch (``num_items_in_batch``).
"""

REDUCTIONS: tuple[str, ...] = ("mean_of_means", "token_mean")


# ---------------------------------------------------------------------------
# Data for the tiny model, and a short warm-up
# ---------------------------------------------------------------------------



def _row_width(
    vocab_size: int, lengths: Sequence[int], total_length: int | None, what: str
) -> int:
    """The padded row width: ``total_length``, or the longest row (at least 2).

    Also checks ``vocab_size >= 3`` (id 0 is padding, id 1 is BOS).
    """
    if vocab_size < 3:
        raise ValueError(
            "vocab_size must be >= 3 (id 0 is padding, id 1 is BOS); "
            f"got {vocab_size}"
        )
    longest = max(max(lengths), 2)
    if total_length is None:
        return longest
    require_positive_int(total_length, "total_length")
    if total_length < longest:
        raise ValueError(
            f"total_length must be >= {what} = {longest}; got {total_length}"
        )
    return total_length

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
    total_length = _row_width(
        vocab_size, lengths, total_length, "max(lengths, 2)"
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


def make_packed_batch(
    rows: Sequence[Sequence[tuple[int, int]]],
    *,
    vocab_size: int,
    seed: int,
    total_length: int | None = None,
    mask_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows packed with prompt-and-answer examples, prompts optionally masked.

    Row ``i`` concatenates the examples ``rows[i]``, one after the other,
    without attention masking between them (plain packing).  An example
    ``(prompt_tokens, answer_tokens)`` is ``BOS`` and ``prompt_tokens - 1``
    tokens counting up from a random start, then ``answer_tokens`` tokens
    counting up from a *new* random start: the answer's first token does not
    follow from the prompt (except by chance), its later ones do.  Counting wraps within
    ids ``2 .. V-1``, as in :func:`make_counting_batch`.

    With ``mask_prompts=True`` (supervised fine-tuning) the labels of every
    prompt position are ``-100``, so a row's scored targets are the sum of
    its examples' ``answer_tokens``, however full the row is.  With
    ``mask_prompts=False`` (pretraining-style packing) every real position
    is a label, and a full row of ``T`` tokens has ``T - 1`` targets.

    Args:
        rows: ``(B,)`` lists of ``(prompt_tokens, answer_tokens)`` pairs,
            ``prompt_tokens >= 1`` (``BOS`` included), ``answer_tokens >= 1``.
        vocab_size: ``V >= 3``; id ``0`` is padding, id ``1`` is ``BOS``.
        seed: seed of the generator that draws the starts.
        total_length: ``T``, at least the longest row and 2; default the
            longest row (at least 2).
        mask_prompts: set the prompts' labels to ``-100``.

    Returns:
        ``input_ids: (B, T)`` int64, ``0`` after each row's tokens, and
        ``labels: (B, T)`` int64, ``-100`` on padding (and on prompts when
        ``mask_prompts``), ``input_ids`` elsewhere.

    Raises:
        ValueError: no rows, a row without examples, a count below 1,
            ``vocab_size < 3`` or ``total_length`` shorter than a row.
        TypeError: a count, ``vocab_size``, ``seed`` or ``total_length``
            that is not an ``int``, or ``mask_prompts`` not a ``bool``.
    """
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise ValueError(
            "rows must be a non-empty sequence, one list of "
            "(prompt_tokens, answer_tokens) pairs per row"
        )
    if not rows:
        raise ValueError("rows must describe at least 1 row")
    for row, examples in enumerate(rows):
        if (
            isinstance(examples, (str, bytes))
            or not isinstance(examples, Sequence)
            or not examples
        ):
            raise ValueError(
                f"rows[{row}] must be a non-empty sequence of "
                "(prompt_tokens, answer_tokens) pairs"
            )
        for index, example in enumerate(examples):
            if not isinstance(example, Sequence) or len(example) != 2:
                raise ValueError(
                    f"rows[{row}][{index}] must be a pair "
                    f"(prompt_tokens, answer_tokens); got {example!r}"
                )
            require_positive_int(example[0], f"rows[{row}][{index}][0]")
            require_positive_int(example[1], f"rows[{row}][{index}][1]")
    require_positive_int(vocab_size, "vocab_size")
    require_int(seed, "seed")
    if not isinstance(mask_prompts, bool):
        raise TypeError(
            f"mask_prompts must be a bool; got {type(mask_prompts).__name__}"
        )
    lengths = [sum(p + a for p, a in examples) for examples in rows]
    total_length = _row_width(
        vocab_size, lengths, total_length, "the longest row (and 2)"
    )
    cycle = vocab_size - 2
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.full(
        (len(rows), total_length), PAD_TOKEN_ID, dtype=torch.long
    )
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for row, examples in enumerate(rows):
        position = 0
        for prompt_tokens, answer_tokens in examples:
            prompt_start, answer_start = torch.randint(
                0, cycle, (2,), generator=generator
            ).tolist()
            prompt = 2 + (prompt_start + torch.arange(prompt_tokens - 1)) % cycle
            answer = 2 + (answer_start + torch.arange(answer_tokens)) % cycle
            stop = position + prompt_tokens + answer_tokens
            input_ids[row, position] = BOS_TOKEN_ID
            input_ids[row, position + 1 : position + prompt_tokens] = prompt
            input_ids[row, position + prompt_tokens : stop] = answer
            first_label = position + prompt_tokens if mask_prompts else position
            labels[row, first_label:stop] = input_ids[row, first_label:stop]
            position = stop
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
        loss = label_padding_loss(model(input_ids), labels)
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


def _check_token_ids(tensor: torch.Tensor, name: str) -> None:
    require_tensor(tensor, name)
    require_rank(tensor, 2, name, "(B, T)")
    require_integer(tensor, name)


def _check_batch(input_ids: torch.Tensor, labels: torch.Tensor) -> None:
    _check_token_ids(input_ids, "input_ids")
    _check_token_ids(labels, "labels")
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
    total = count_scored_targets(labels)
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
    loss = label_padding_loss(model(input_ids), labels)
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
    require_positive_ints(micro_batch_rows, "micro_batch_rows")
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
    counts = tuple(count_scored_targets(lab) for _, lab in pieces)
    if reduction == "mean_of_means":
        for index, count in enumerate(counts):
            if count == 0:
                raise ValueError(
                    f"micro-batch {index} has no scored token: its mean "
                    "loss is 0/0 (PyTorch's reduction='mean' returns nan)"
                )
    model.zero_grad(set_to_none=True)
    reported = 0.0
    for piece_ids, piece_labels in pieces:
        logits = model(piece_ids)
        if reduction == "mean_of_means":
            piece_loss = label_padding_loss(logits, piece_labels) / len(pieces)
        else:
            piece_loss = micro_batch_loss(
                logits, piece_labels, num_items_in_batch=total
            )
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
    require_sequence(
        rank_micro_batch_rows,
        "rank_micro_batch_rows",
        "a sequence with one list of micro-batch sizes per rank",
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
    counts = tuple(count_scored_targets(lab) for _, lab in pieces)
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
            logits = model(piece_ids)
            if count == "global":
                piece_loss = micro_batch_loss(
                    logits,
                    piece_labels,
                    num_items_in_batch=total,
                    world_size=ranks,
                )
            else:
                piece_loss = label_padding_loss(
                    logits, piece_labels, num_items_in_batch=rank_counts[rank]
                )
            piece_loss.backward()
            reported += piece_loss.item() / ranks
        rank_gradients.append(flat_gradient(model))
    # DistributedDataParallel's all-reduce: the mean of the ranks' gradients.
    gradient = torch.stack(rank_gradients).sum(dim=0) / ranks
    model.zero_grad(set_to_none=True)
    return StepResult(f"data_parallel_{count}", reported, gradient, counts)


def _check_pair(result: torch.Tensor, reference: torch.Tensor) -> None:
    require_tensor(result, "result")
    require_tensor(reference, "reference")
    require_floating(result, "result")
    require_floating(reference, "reference")
    if result.shape != reference.shape:
        raise ValueError(
            "result must have the shape of reference "
            f"{tuple(reference.shape)}; got {tuple(result.shape)}"
        )


def relative_difference(
    result: torch.Tensor, reference: torch.Tensor
) -> float:
    """``||result - reference|| / ||reference||`` (Euclidean norms).

    One number for two different faults: a gradient of the right direction
    but twice the length is ``1`` (100 %) off, and so is one of the right
    length turned by 60 degrees.  :func:`cosine_similarity` and
    :func:`norm_ratio` tell them apart.
    """
    _check_pair(result, reference)
    scale = float(torch.linalg.vector_norm(reference))
    if scale == 0.0:
        raise ValueError(
            "reference has norm 0: a relative difference is undefined"
        )
    return float(torch.linalg.vector_norm(result - reference)) / scale


def cosine_similarity(
    result: torch.Tensor, reference: torch.Tensor
) -> float:
    """``<result, reference> / (||result|| ||reference||)``: direction only.

    ``1`` when the two point the same way, whatever their lengths; a
    gradient scaled by any positive constant has cosine ``1`` with the
    original.  Computed in float64.

    Args:
        result: ``(P,)`` float (any shape; flattened).
        reference: float, the shape of ``result``.

    Raises:
        ValueError: shapes differ, or either has norm 0 (no direction).
    """
    _check_pair(result, reference)
    a = result.detach().reshape(-1).to(torch.float64)
    b = reference.detach().reshape(-1).to(torch.float64)
    norms = float(torch.linalg.vector_norm(a)), float(
        torch.linalg.vector_norm(b)
    )
    for name, value in zip(("result", "reference"), norms, strict=True):
        if value == 0.0:
            raise ValueError(f"{name} has norm 0: it has no direction")
    cosine = float(torch.dot(a, b)) / (norms[0] * norms[1])
    return max(-1.0, min(1.0, cosine))


def norm_ratio(result: torch.Tensor, reference: torch.Tensor) -> float:
    """``||result|| / ||reference||``: length only (Euclidean norms).

    ``1`` for a gradient of the right length, whatever its direction.  Only
    a plain SGD step scales with it; Adam's first steps do not.

    Raises:
        ValueError: shapes differ, or ``reference`` has norm 0.
    """
    _check_pair(result, reference)
    scale = float(torch.linalg.vector_norm(reference.detach().double()))
    if scale == 0.0:
        raise ValueError("reference has norm 0: a norm ratio is undefined")
    return float(torch.linalg.vector_norm(result.detach().double())) / scale


def cosine_from_norms(
    gradient_norm_ratio: float, relative_gradient_error: float
) -> float:
    """The cosine of two gradients from their norm ratio and relative error.

    With ``rho = ||a|| / ||b||`` and ``e = ||a - b|| / ||b||``, the law of
    cosines ``e^2 = rho^2 + 1 - 2 rho cos`` gives
    ``cos = (rho^2 + 1 - e^2) / (2 rho)``.  For results that report only
    these two numbers (the data-parallel demo's JSON); float64 rounding of
    the inputs shows up in the cosine, about ``1e-15`` near ``cos = 1``.

    Raises:
        ValueError: ``gradient_norm_ratio <= 0``,
            ``relative_gradient_error < 0``, either
            not finite, or a pair no two vectors have (``|cos| > 1`` beyond
            rounding).
    """
    rho = require_real_number(gradient_norm_ratio, "gradient_norm_ratio")
    error = require_real_number(
        relative_gradient_error, "relative_gradient_error"
    )
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(
            "gradient_norm_ratio must be finite and > 0; "
            f"got {gradient_norm_ratio}"
        )
    if not (math.isfinite(error) and error >= 0):
        raise ValueError(
            "relative_gradient_error must be finite and >= 0; "
            f"got {relative_gradient_error}"
        )
    cosine = (rho * rho + 1.0 - error * error) / (2.0 * rho)
    if abs(cosine) > 1.0 + 1e-9:
        raise ValueError(
            f"gradient_norm_ratio {gradient_norm_ratio} and "
            f"relative_gradient_error {relative_gradient_error} "
            "violate the triangle inequality"
        )
    return max(-1.0, min(1.0, cosine))


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
        ``naive_gradient_error`` (relative, :func:`relative_difference`),
        the naive gradient's ``naive_gradient_cosine``
        (:func:`cosine_similarity`) and ``naive_gradient_norm_ratio``
        (:func:`norm_ratio`) against the full batch's, and
        ``fixed_loss_error`` and ``fixed_gradient_error`` (relative,
        rounding only).
    """
    _check_model(model)
    require_positive_int(short_tokens, "short_tokens")
    require_int(seed, "seed")
    require_positive_ints(token_ratios, "token_ratios")
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
                "naive_gradient_cosine": cosine_similarity(
                    naive.gradient, full.gradient
                ),
                "naive_gradient_norm_ratio": norm_ratio(
                    naive.gradient, full.gradient
                ),
                "fixed_loss_error": abs(fixed.loss - full.loss)
                / abs(full.loss),
                "fixed_gradient_error": fixed_grad,
            }
        )
    model.zero_grad(set_to_none=True)
    return rows


# ---------------------------------------------------------------------------
# Quoting the installed transformers
# ---------------------------------------------------------------------------


def source_excerpt(
    function: Callable[..., Any],
    first_marker: str,
    last_marker: str,
    *,
    before: int = 0,
) -> str:
    """Consecutive lines of a function's source, from marker to marker.

    The excerpt runs from the first line containing ``first_marker`` to the
    first line at or after it containing ``last_marker``, starting
    ``before`` lines earlier, and is dedented.  Quoting by markers rather
    than by line numbers keeps the quote on the lines the chapter talks
    about when the installed version moves them.

    Args:
        function: a function or method defined in Python source, e.g.
            ``transformers.Trainer.compute_loss``.
        first_marker: text on the excerpt's first line (before ``before``).
        last_marker: text on the excerpt's last line.
        before: lines to include above the ``first_marker`` line, ``>= 0``.

    Returns:
        The excerpt's lines joined by newlines, without a trailing newline.

    Raises:
        TypeError: ``function`` is not a function or method, a marker is
            not a ``str``, ``before`` is not an ``int``.
        ValueError: an empty marker, a marker that does not occur (the
            last one at or after the first), ``before < 0`` or reaching
            above the source's first line.
    """
    if not (inspect.isfunction(function) or inspect.ismethod(function)):
        raise TypeError(
            "function must be a Python function or method; "
            f"got {type(function).__name__}"
        )
    for name, marker in (
        ("first_marker", first_marker),
        ("last_marker", last_marker),
    ):
        if not isinstance(marker, str):
            raise TypeError(
                f"{name} must be a str; got {type(marker).__name__}"
            )
        if not marker:
            raise ValueError(f"{name} must be a non-empty str")
    before = require_int(before, "before")
    if before < 0:
        raise ValueError(f"before must be >= 0; got {before}")
    lines = inspect.getsource(function).splitlines()
    where = f"the source of {function.__qualname__}"
    first = next(
        (i for i, line in enumerate(lines) if first_marker in line), None
    )
    if first is None:
        raise ValueError(
            f"first_marker {first_marker!r} does not occur in {where}"
        )
    last = next(
        (i for i in range(first, len(lines)) if last_marker in lines[i]),
        None,
    )
    if last is None:
        raise ValueError(
            f"last_marker {last_marker!r} does not occur in {where} "
            f"at or after first_marker {first_marker!r}"
        )
    if before > first:
        raise ValueError(
            f"before must be <= {first}, the lines above first_marker in "
            f"{where}; got {before}"
        )
    return textwrap.dedent("\n".join(lines[first - before : last + 1]))
