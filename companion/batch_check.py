"""Check a training batch, and a model's loss on it, for the book's pitfalls.

The chapters show how a correct-looking loss reports the wrong number when
the batch is wrong: padding that is scored, an end-of-sequence target
masked because the padding token is the end-of-sequence token, image
placeholders in the labels, a row left with nothing to score, a target
predicted across the boundary of two packed documents, a prompt that is
trained on, micro-batches whose token counts differ.  None of these raises
an error in training.  This module looks for them in what a training step
receives:

* :func:`check_batch` reads a batch (``input_ids``, ``labels`` and the
  optional tensors a collator returns) and the tokenizer's special ids, and
  returns a list of :class:`Finding`: a severity, a stable code, one
  sentence, the positions concerned and a link to the book's section;
* :func:`check_loss` runs a model on a batch and checks its own loss
  against the float64 reference (:func:`companion.reference.causal_lm_loss`),
  against the same batch split into micro-batches with
  ``num_items_in_batch``, and against the batch with right padding added;
  it also says whether the model's ``forward`` takes the loss keyword
  arguments that transformers' ``Trainer`` passes
  (:func:`accepts_loss_kwargs`);
* :func:`load_batch` reads a batch saved with ``torch.save`` or written as
  JSON Lines, treating the file as untrusted input, and
  :func:`format_findings` prints findings as a table.

``python -m companion check FILE`` does the same from the command line
(:mod:`companion.__main__`), and :mod:`companion.testing` wraps both checks
as assertions for a test suite.

Every check is a handful of tensor operations on ``(B, T)`` masks, with no
Python loop over tokens.  The rule for what is scored is the package's one
count (:func:`~companion.causal_lm_loss.count_scored_targets`): label
``t`` is a target when ``t >= 1`` and it is not ``ignore_index``; label 0
of a row is never a target, because no position precedes it.
"""

from __future__ import annotations

import enum
import inspect
import json
import math
import os
import re
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from companion import IGNORE_INDEX, reference
from companion._checks import (
    require_ignore_index,
    require_int,
    require_integer,
    require_mapping,
    require_no_empty_dim,
    require_positive_int,
    require_rank,
    require_real_number,
    require_sequence,
    require_tensor,
    require_token_matrix,
)
from companion.accumulation import micro_batch_loss, token_weight_factors
from companion.causal_lm_loss import count_scored_targets, label_padding_loss

__all__ = [
    "ASSISTANT_MASK_KEY",
    "FINDING_CODES",
    "MAX_POSITIONS",
    "Finding",
    "Severity",
    "accepts_loss_kwargs",
    "check_batch",
    "check_loss",
    "format_findings",
    "load_batch",
]


class Severity(enum.StrEnum):
    """How bad a :class:`Finding` is.

    ``error``: the loss or the gradient is wrong, or training fails;
    ``warning``: probably wrong, or wrong under a common way of training;
    ``info``: worth knowing, not a fault.
    """

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        """0 for ``info``, 1 for ``warning``, 2 for ``error``."""
        return list(Severity).index(self)


_CHAPTER_8 = "book/08_check_your_batch.html"

FINDING_CODES: dict[str, tuple[Severity, str]] = {
    "labels-shape": (Severity.ERROR, f"{_CHAPTER_8}#check-batch-labels"),
    "labels-dtype": (Severity.ERROR, f"{_CHAPTER_8}#check-batch-labels"),
    "label-out-of-range": (Severity.ERROR, f"{_CHAPTER_8}#check-batch-labels"),
    "input-id-out-of-range": (Severity.ERROR, f"{_CHAPTER_8}#check-batch-labels"),
    "padding-scored": (Severity.ERROR, "book/02_llava_loss.html#llava-attention-filter"),
    "target-after-padding": (Severity.WARNING, f"{_CHAPTER_8}#check-batch-padding"),
    "eos-targets-masked": (Severity.ERROR, f"{_CHAPTER_8}#check-batch-pad-eos"),
    "placeholder-scored": (Severity.ERROR, f"{_CHAPTER_8}#check-batch-images"),
    "image-count-mismatch": (Severity.ERROR, f"{_CHAPTER_8}#check-batch-images"),
    "placeholder-id-unknown": (Severity.WARNING, f"{_CHAPTER_8}#check-batch-images"),
    "batch-without-targets": (
        Severity.ERROR,
        "book/02_llava_loss.html#from-loss-to-perplexity-and-the-nan-loss",
    ),
    "row-without-targets": (
        Severity.WARNING,
        "book/02_llava_loss.html#from-loss-to-perplexity-and-the-nan-loss",
    ),
    "packed-boundary-scored": (Severity.ERROR, f"{_CHAPTER_8}#check-batch-packing"),
    "prompt-scored": (Severity.ERROR, f"{_CHAPTER_8}#check-batch-prompts"),
    "assistant-token-unscored": (Severity.WARNING, f"{_CHAPTER_8}#check-batch-prompts"),
    "micro-batch-imbalance": (
        Severity.WARNING, "book/05_one_denominator.html#gradient-accumulation",
    ),
    "loss-reference-mismatch": (
        Severity.ERROR,
        "book/02_llava_loss.html#what-transformers-5-23-computes-forcausallmloss",
    ),
    "micro-batch-mismatch": (
        Severity.ERROR, "book/05_one_denominator.html#gradient-accumulation",
    ),
    "padding-changes-loss": (
        Severity.ERROR, "book/04_keras_masking.html#keras-masking-denominators",
    ),
    "no-loss-kwargs": (
        Severity.WARNING,
        "book/05_one_denominator.html#what-num-items-in-batch-does-in-transformers",
    ),
    "model-computes-no-loss": (Severity.INFO, f"{_CHAPTER_8}#check-batch-loss"),
}
"""Every finding's code, with its severity and the book section that explains it.

The section is a path in the built site (``_build/html/`` locally) with
the anchor of the section: a MyST label or a heading of the chapter.
"""

MAX_POSITIONS: int = 8
"""Positions (or rows) a finding lists at most; ``count`` gives them all."""

ASSISTANT_MASK_KEY: str = "assistant_masks"
"""The batch key :func:`check_batch` reads an assistant mask from.

It is the key ``tokenizer.apply_chat_template(...,
return_assistant_tokens_mask=True, return_dict=True)`` returns.
"""


@dataclass(frozen=True)
class Finding:
    """One problem found in a batch, or in a model's loss on it.

    Attributes:
        severity: a :class:`Severity`.
        code: a stable short id, a key of :data:`FINDING_CODES`.
        message: one sentence saying what is wrong and what it does.
        positions: up to ``max_positions`` ``(row, column)`` pairs of the
            batch concerned, in row-major order; empty for a finding about
            whole rows or the whole batch.
        rows: up to ``max_positions`` row indices, for a finding about whole
            rows; empty otherwise.
        count: how many positions (or rows) are concerned in all; 0 for a
            finding about the whole batch or the model.
        link: the book's section on it: a path in the built site with an
            anchor.
    """

    severity: Severity
    code: str
    message: str
    positions: tuple[tuple[int, int], ...] = ()
    rows: tuple[int, ...] = ()
    count: int = 0
    link: str = ""


def _finding(
    code: str,
    message: str,
    *,
    positions: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    limit: int = MAX_POSITIONS,
) -> Finding:
    """A :class:`Finding` of ``code``; ``positions``/``rows`` are bool masks."""
    severity, link = FINDING_CODES[code]
    listed_positions: tuple[tuple[int, int], ...] = ()
    listed_rows: tuple[int, ...] = ()
    count = 0
    if positions is not None:
        count = int(positions.sum())
        listed_positions = tuple(
            (int(b), int(t)) for b, t in positions.nonzero()[:limit].tolist()
        )
    elif rows is not None:
        count = int(rows.sum())
        listed_rows = tuple(int(b) for b in rows.nonzero()[:limit, 0].tolist())
    return Finding(
        severity, code, message, listed_positions, listed_rows, count, link
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _subject(count: int, noun: str, verb: str) -> str:
    """``"1 label lies"`` or ``"2 labels lie"``: ``verb`` in the plural form."""
    singular = {"are": "is", "have": "has"}.get(verb, verb + "s")
    return f"{_plural(count, noun)} {singular if count == 1 else verb}"


# ---------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------


def _tokenizer_ids(tokenizer: Any) -> dict[str, Any]:
    """``pad``, ``eos``, ``vocab`` and ``placeholders`` of a tokenizer or processor.

    A processor (``LlavaProcessor``) carries the image id itself and the
    rest in its ``.tokenizer``.
    """
    inner = getattr(tokenizer, "tokenizer", tokenizer)
    if not (
        hasattr(inner, "pad_token_id")
        and hasattr(inner, "eos_token_id")
        and hasattr(inner, "__len__")
    ):
        raise TypeError(
            "tokenizer must be a transformers tokenizer or processor (with "
            "pad_token_id, eos_token_id and len()); "
            f"got {type(tokenizer).__name__}"
        )
    placeholders = []
    for source in (tokenizer, inner):
        for name in ("image_token_id", "video_token_id"):
            value = getattr(source, name, None)
            if isinstance(value, int) and value not in placeholders:
                placeholders.append(value)
    return {
        "pad": inner.pad_token_id,
        "eos": inner.eos_token_id,
        "vocab": len(inner),
        "placeholders": placeholders,
    }


def _optional_int(value: Any, name: str) -> int | None:
    return None if value is None else require_int(value, name)


def _check_input_ids(batch: Mapping[str, Any]) -> torch.Tensor:
    if "input_ids" not in batch:
        raise ValueError(
            "batch must hold 'input_ids' (B, T); "
            f"got keys {sorted(map(str, batch))}"
        )
    input_ids = require_tensor(batch["input_ids"], "input_ids")
    require_rank(input_ids, 2, "input_ids", "(B, T)")
    require_integer(input_ids, "input_ids")
    require_no_empty_dim(input_ids, "input_ids", "(B, T)")
    return input_ids.long()


def _check_labels_present(batch: Mapping[str, Any]) -> torch.Tensor:
    if "labels" not in batch:
        raise ValueError(
            "batch must hold 'labels' (B, T), the targets of the loss; "
            f"got keys {sorted(map(str, batch))}"
        )
    return require_tensor(batch["labels"], "labels")


def _labels_findings(
    labels: torch.Tensor, shape: tuple[int, int], limit: int
) -> tuple[list[Finding], torch.Tensor | None]:
    """Shape and dtype findings; the labels as int64 when they can be read."""
    findings = []
    if tuple(labels.shape) != shape:
        findings.append(_finding(
            "labels-shape",
            f"labels have shape {tuple(labels.shape)} but input_ids {shape}: "
            "each position needs one label (B, T), -100 where nothing is "
            "scored.",
            limit=limit,
        ))
        return findings, None
    if labels.dtype != torch.int64:
        readable = not (
            labels.is_floating_point() or labels.is_complex()
            or labels.dtype == torch.bool
        )
        findings.append(_finding(
            "labels-dtype",
            f"labels are {labels.dtype}, but PyTorch's cross_entropy takes "
            "int64 class indices (int32 raises, uint8 cannot hold -100, "
            "floats are not class indices).",
            limit=limit,
        ))
        if not readable:
            return findings, None
    return findings, labels.long()


def _range_findings(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    scored: torch.Tensor,
    vocab: int | None,
    limit: int,
) -> list[Finding]:
    findings = []
    high = vocab if vocab is not None else None
    bad_labels = scored & (labels < 0)
    if high is not None:
        bad_labels |= scored & (labels >= high)
    if bool(bad_labels.any()):
        span = f"[0, {high})" if high is not None else "[0, V)"
        findings.append(_finding(
            "label-out-of-range",
            f"{_subject(int(bad_labels.sum()), 'label', 'lie')} outside {span}, "
            "where only the ignore index may lie: cross_entropy raises an "
            "IndexError on the CPU and a device-side assert on a GPU.",
            positions=bad_labels, limit=limit,
        ))
    bad_ids = input_ids < 0
    if high is not None:
        bad_ids |= input_ids >= high
    if bool(bad_ids.any()):
        span = f"[0, {high})" if high is not None else "[0, V)"
        findings.append(_finding(
            "input-id-out-of-range",
            f"{_subject(int(bad_ids.sum()), 'input id', 'lie')} outside {span}: "
            "the embedding lookup fails (were tokens added to the tokenizer "
            "without resizing the model's embeddings?).",
            positions=bad_ids, limit=limit,
        ))
    return findings


def _padding_findings(
    targets: torch.Tensor, attention_mask: torch.Tensor, limit: int
) -> list[Finding]:
    findings = []
    padding = attention_mask == 0
    scored_padding = targets & padding
    if bool(scored_padding.any()):
        findings.append(_finding(
            "padding-scored",
            f"{_subject(int(scored_padding.sum()), 'padding position', 'are')} "
            "(attention_mask 0) scored as targets: the model is trained to "
            "predict padding and the loss's denominator counts it.",
            positions=scored_padding, limit=limit,
        ))
    after_padding = torch.zeros_like(targets)
    after_padding[:, 1:] = targets[:, 1:] & padding[:, :-1] & ~padding[:, 1:]
    if bool(after_padding.any()):
        findings.append(_finding(
            "target-after-padding",
            f"{_subject(int(after_padding.sum()), 'target', 'are')} scored right "
            "after padding: with left padding a row's first token is "
            "predicted from a padding position.",
            positions=after_padding, limit=limit,
        ))
    return findings


def _eos_findings(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    attention_mask: torch.Tensor | None,
    eos: int,
    limit: int,
) -> list[Finding]:
    real_eos = input_ids == eos
    real_eos[:, 0] = False
    if attention_mask is not None:
        real_eos &= attention_mask != 0
    scored_eos = targets & (labels == eos)
    lost_rows = real_eos.any(dim=1) & ~scored_eos.any(dim=1)
    if not bool(lost_rows.any()):
        return []
    masked = real_eos & ~targets & lost_rows[:, None]
    return [_finding(
        "eos-targets-masked",
        f"pad_token_id = eos_token_id = {eos}, and in "
        f"{_plural(int(lost_rows.sum()), 'row')} every end-of-sequence "
        "target is -100 (masked as padding): the model never learns to "
        "stop.",
        positions=masked, limit=limit,
    )]


def _placeholder_findings(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    placeholders: Sequence[int],
    pixel_values: torch.Tensor | None,
    limit: int,
) -> list[Finding]:
    if not placeholders:
        if pixel_values is None:
            return []
        return [_finding(
            "placeholder-id-unknown",
            "pixel_values is given but no image placeholder id (pass "
            "placeholder_token_ids or a tokenizer with image_token_id): "
            "image tokens in the labels were not looked for.",
            limit=limit,
        )]
    ids = torch.tensor(list(placeholders), dtype=torch.long, device=input_ids.device)
    is_placeholder = torch.isin(input_ids, ids)
    findings = []
    scored = targets & (is_placeholder | torch.isin(labels, ids))
    if bool(scored.any()):
        findings.append(_finding(
            "placeholder-scored",
            f"{_subject(int(scored.sum()), 'image placeholder target', 'are')} "
            f"scored (ids {list(placeholders)}): the model is trained to "
            "write placeholder tokens whose embeddings the images replace.",
            positions=scored, limit=limit,
        ))
    if pixel_values is not None and pixel_values.dim() >= 1:
        starts = is_placeholder.clone()
        starts[:, 1:] &= ~is_placeholder[:, :-1]
        runs, images = int(starts.sum()), int(pixel_values.shape[0])
        if runs != images:
            findings.append(_finding(
                "image-count-mismatch",
                f"pixel_values holds {_plural(images, 'image')} but input_ids "
                f"{_plural(runs, 'run')} of placeholders: the model cannot "
                "put the image features in place (was the text truncated?).",
                positions=starts, limit=limit,
            ))
    return findings


def _packing_findings(
    targets: torch.Tensor, position_ids: torch.Tensor, limit: int
) -> list[Finding]:
    position_ids = position_ids.long()
    starts = torch.zeros_like(targets)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    crossing = starts & targets
    if not bool(crossing.any()):
        return []
    return [_finding(
        "packed-boundary-scored",
        f"{_subject(int(crossing.sum()), 'packed document', 'start')} with a "
        "scored target (position_ids restart there): each is predicted from "
        "the last position of the document before it.",
        positions=crossing, limit=limit,
    )]


def _assistant_findings(
    labels_scored: torch.Tensor,
    targets: torch.Tensor,
    assistant_mask: torch.Tensor,
    attention_mask: torch.Tensor | None,
    limit: int,
) -> list[Finding]:
    findings = []
    assistant = assistant_mask != 0
    prompt = targets & ~assistant
    if attention_mask is not None:
        prompt &= attention_mask != 0
    if bool(prompt.any()):
        findings.append(_finding(
            "prompt-scored",
            f"{_subject(int(prompt.sum()), 'target', 'are')} scored outside the "
            "assistant's part (assistant mask 0): the model is trained on the "
            "prompt, not only on the answers.",
            positions=prompt, limit=limit,
        ))
    unscored = assistant & ~labels_scored
    unscored[:, 0] = False
    if bool(unscored.any()):
        findings.append(_finding(
            "assistant-token-unscored",
            f"{_subject(int(unscored.sum()), 'assistant token', 'have')} label "
            "-100: part of the answers is not trained on.",
            positions=unscored, limit=limit,
        ))
    return findings


def _micro_batch_findings(
    labels: torch.Tensor,
    micro_batch_size: int,
    ignore_index: int,
    tolerance: float,
    limit: int,
) -> list[Finding]:
    rows = labels.shape[0]
    if micro_batch_size >= rows:
        return []
    counts = [
        count_scored_targets(labels[start : start + micro_batch_size], ignore_index)
        for start in range(0, rows, micro_batch_size)
    ]
    total, groups = sum(counts), len(counts)
    if total == 0:
        return []
    empty = [k for k, n in enumerate(counts) if n == 0]
    if empty:
        factors = [math.inf if n == 0 else total / (groups * n) for n in counts]
    else:
        factors = token_weight_factors(counts)
    worst = max(range(groups), key=lambda k: abs(factors[k] - 1.0))
    if abs(factors[worst] - 1.0) <= tolerance:
        return []
    low, high = min(counts), max(counts)
    if empty:
        effect = (
            f"micro-batch {empty[0]} has none, so its mean loss is nan"
        )
    else:
        effect = (
            f"averaged on its own, a token of micro-batch {worst} would "
            f"weigh {factors[worst]:.3g} times its share"
        )
    bad_rows = torch.zeros(rows, dtype=torch.bool)
    bad_rows[worst * micro_batch_size : (worst + 1) * micro_batch_size] = True
    return [_finding(
        "micro-batch-imbalance",
        f"micro-batches of {_plural(micro_batch_size, 'row')} hold {low} to "
        f"{high} of the {total} scored targets ({effect}): divide summed "
        "losses by num_items_in_batch rather than averaging means.",
        rows=bad_rows, limit=limit,
    )]


def check_batch(
    batch: Mapping[str, Any],
    *,
    tokenizer: Any = None,
    vocab_size: int | None = None,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    placeholder_token_ids: Sequence[int] | None = None,
    assistant_mask: torch.Tensor | None = None,
    micro_batch_size: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    imbalance_tolerance: float = 0.25,
    max_positions: int = MAX_POSITIONS,
) -> list[Finding]:
    """Look for the book's pitfalls in one training batch.

    Each check runs when what it needs is known, and is skipped otherwise:

    * ``labels`` not of shape ``(B, T)`` or not int64; labels outside
      ``[0, V)`` that are not ``ignore_index``, input ids outside
      ``[0, V)`` (``V`` from ``vocab_size`` or the tokenizer; without it
      only negative values are caught);
    * padding (``attention_mask`` 0) that is a scored target, and a target
      right after padding (left padding);
    * ``pad_token_id == eos_token_id`` with every end-of-sequence target
      of a row masked;
    * image placeholder tokens that are scored, and, with ``pixel_values``,
      a number of placeholder runs other than the number of images;
    * a batch, or rows, with no scored target (``nan`` loss);
    * with ``position_ids`` (packed batches): a document whose first token
      is a scored target, predicted from the document before it;
    * with an assistant mask: scored targets outside the assistant's part
      (the prompt), and assistant tokens left unscored;
    * with ``micro_batch_size``: micro-batches whose scored-target counts
      are so unequal that a mean of micro-batch means is off.

    Args:
        batch: what the training step receives: a mapping with
            ``input_ids`` ``(B, T)`` integer and ``labels`` (``(B, T)`` int64,
            ``ignore_index`` = not scored), and optionally
            ``attention_mask`` ``(B, T)`` (0 = padding), ``position_ids``
            ``(B, T)`` (packed rows restart them at each document),
            ``pixel_values`` (one image per entry of the first dimension) and
            :data:`ASSISTANT_MASK_KEY` ``(B, T)`` (1 = assistant token).
            Other keys are ignored.
        tokenizer: a transformers tokenizer or processor: its
            ``pad_token_id``, ``eos_token_id``, ``len()`` (as ``V``) and
            ``image_token_id`` are used unless given below.
        vocab_size: ``V``, the model's ``config.vocab_size``.
        pad_token_id: the padding id.
        eos_token_id: the end-of-sequence id.
        placeholder_token_ids: ids that stand for image (or other) features.
        assistant_mask: ``(B, T)``, 1 on the assistant's tokens, from
            ``apply_chat_template(..., return_assistant_tokens_mask=True)``;
            default the batch's :data:`ASSISTANT_MASK_KEY`.
        micro_batch_size: rows per micro-batch (or per rank) when the batch
            is split for gradient accumulation or data parallelism.
        ignore_index: the label value that is not scored.
        imbalance_tolerance: largest accepted ``|f_k - 1|``, where
            ``f_k = |S| / (K n_k)`` is how much a token of micro-batch ``k``
            weighs in a mean of means (chapter 5).
        max_positions: positions (or rows) listed per finding, ``>= 1``.

    Returns:
        The findings, errors first; an empty list for a batch with none.

    Raises:
        TypeError, ValueError: ``batch`` is not a mapping with a 2-D integer
            ``input_ids`` and a ``labels`` tensor, an optional tensor has
            another shape than ``input_ids`` or a float dtype, or an option
            is of the wrong type or out of range.
    """
    require_mapping(batch, "batch", "a mapping of tensors (a dict or BatchEncoding)")
    input_ids = _check_input_ids(batch)
    raw_labels = _check_labels_present(batch)
    ignore_index = require_ignore_index(ignore_index)
    shape = (input_ids.shape[0], input_ids.shape[1])
    optional = {}
    for key in ("attention_mask", "position_ids"):
        if batch.get(key) is not None:
            optional[key] = require_token_matrix(batch[key], key, shape)
    if assistant_mask is None:
        assistant_mask = batch.get(ASSISTANT_MASK_KEY)
    if assistant_mask is not None:
        assistant_mask = require_token_matrix(assistant_mask, "assistant_mask", shape)
    pixel_values = batch.get("pixel_values")
    if pixel_values is not None:
        require_tensor(pixel_values, "pixel_values")
    ids = _tokenizer_ids(tokenizer) if tokenizer is not None else {
        "pad": None, "eos": None, "vocab": None, "placeholders": [],
    }
    vocab = ids["vocab"] if vocab_size is None else require_positive_int(vocab_size, "vocab_size")
    pad = ids["pad"] if pad_token_id is None else require_int(pad_token_id, "pad_token_id")
    eos = ids["eos"] if eos_token_id is None else require_int(eos_token_id, "eos_token_id")
    if placeholder_token_ids is None:
        placeholders = list(ids["placeholders"])
    else:
        require_sequence(placeholder_token_ids, "placeholder_token_ids", "a sequence of ints")
        placeholders = [
            require_int(value, f"placeholder_token_ids[{index}]")
            for index, value in enumerate(placeholder_token_ids)
        ]
    if micro_batch_size is not None:
        micro_batch_size = require_positive_int(micro_batch_size, "micro_batch_size")
    tolerance = require_real_number(imbalance_tolerance, "imbalance_tolerance")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(
            f"imbalance_tolerance must be a finite number >= 0; got {tolerance}"
        )
    limit = require_positive_int(max_positions, "max_positions")

    findings, labels = _labels_findings(raw_labels, shape, limit)
    if labels is None:
        findings += _range_findings(
            input_ids, input_ids, torch.zeros_like(input_ids, dtype=torch.bool), vocab, limit
        )
        return _sorted(findings)
    device = labels.device
    input_ids = input_ids.to(device)
    attention_mask = optional.get("attention_mask")
    attention_mask = None if attention_mask is None else attention_mask.to(device)
    labels_scored = labels != ignore_index
    targets = labels_scored.clone()
    targets[:, 0] = False
    findings += _range_findings(input_ids, labels, labels_scored, vocab, limit)
    if attention_mask is not None:
        findings += _padding_findings(targets, attention_mask, limit)
    if pad is not None and eos is not None and pad == eos:
        findings += _eos_findings(input_ids, labels, targets, attention_mask, eos, limit)
    findings += _placeholder_findings(
        input_ids, labels, targets, placeholders, pixel_values, limit
    )
    if "position_ids" in optional:
        findings += _packing_findings(targets, optional["position_ids"].to(device), limit)
    if assistant_mask is not None:
        findings += _assistant_findings(
            labels_scored, targets, assistant_mask.to(device), attention_mask, limit
        )
    rows_with_targets = targets.any(dim=1)
    if not bool(rows_with_targets.any()):
        findings.append(_finding(
            "batch-without-targets",
            "no label after the first column is scored, so the mean loss is "
            "0/0 = nan (truncation that cut every answer off, or labels all "
            "-100).",
            limit=limit,
        ))
    elif not bool(rows_with_targets.all()):
        findings.append(_finding(
            "row-without-targets",
            f"{_subject(int((~rows_with_targets).sum()), 'row', 'have')} no scored "
            "target: such a row costs compute, and a per-row or per-micro-batch "
            "mean over it is nan.",
            rows=~rows_with_targets, limit=limit,
        ))
    if micro_batch_size is not None:
        findings += _micro_batch_findings(
            labels, micro_batch_size, ignore_index, tolerance, limit
        )
    return _sorted(findings)


def _sorted(findings: list[Finding]) -> list[Finding]:
    """Errors first, then warnings, then info; stable within a severity."""
    return sorted(findings, key=lambda finding: -finding.severity.rank)


# ---------------------------------------------------------------------------
# The model's loss
# ---------------------------------------------------------------------------


def accepts_loss_kwargs(model: nn.Module) -> bool:
    """Whether transformers' ``Trainer`` passes ``num_items_in_batch`` to ``model``.

    The ``Trainer`` of the pinned transformers decides it so: the model's
    ``accepts_loss_kwargs`` attribute when it has one, else whether its
    ``forward`` takes ``**kwargs``.  A ``forward`` that names
    ``num_items_in_batch`` without ``**kwargs`` is not given it.  When the
    answer is no, the ``Trainer`` divides each micro-batch's mean loss by
    the number of accumulation steps: a mean of means.

    Args:
        model: a ``torch.nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    parameters = inspect.signature(model.forward).parameters.values()
    return any(p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters)


def _forward_parameters(model: nn.Module) -> set[str]:
    return {
        name for name, parameter in inspect.signature(model.forward).parameters.items()
        if parameter.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }


def _run(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    num_items_in_batch: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(the model's own loss or None, logits)`` for ``batch``.

    Only the batch keys that ``forward`` names are passed; ``labels`` among
    them when it names ``labels``.
    """
    accepted = _forward_parameters(model)
    inputs = {key: value for key, value in batch.items() if key in accepted}
    if num_items_in_batch is not None:
        inputs["num_items_in_batch"] = num_items_in_batch
    output = model(**inputs)
    if isinstance(output, torch.Tensor):
        return None, output
    if isinstance(output, Mapping):
        if "logits" not in output:
            raise TypeError(
                "model must return logits, or a mapping with 'logits'; "
                f"got keys {sorted(output)}"
            )
        return output.get("loss"), output["logits"]
    if isinstance(output, (tuple, list)) and output:
        if "labels" in inputs and len(output) >= 2:
            return output[0], output[1]
        return None, output[0]
    raise TypeError(
        "model must return logits, a mapping with 'logits' or a tuple; "
        f"got {type(output).__name__}"
    )


def _rows(batch: Mapping[str, torch.Tensor], start: int, stop: int, rows: int) -> dict:
    """The rows ``start:stop`` of every tensor whose first dimension is ``B``."""
    return {
        key: value[start:stop]
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows
        else value
        for key, value in batch.items()
    }


def _right_padded(
    batch: Mapping[str, torch.Tensor],
    extra: int,
    pad_token_id: int,
    ignore_index: int,
) -> dict:
    """``batch`` with ``extra`` columns of right padding on every ``(B, T)`` tensor."""
    shape = tuple(batch["input_ids"].shape)
    fill = {"input_ids": pad_token_id, "labels": ignore_index}
    padded = {}
    for key, value in batch.items():
        if not (isinstance(value, torch.Tensor) and tuple(value.shape) == shape):
            padded[key] = value
        elif key == "position_ids":
            steps = torch.arange(1, extra + 1, device=value.device, dtype=value.dtype)
            padded[key] = torch.cat([value, value[:, -1:] + steps], dim=1)
        else:
            padded[key] = nn.functional.pad(value, (0, extra), value=fill.get(key, 0))
    return padded


def _value(loss: torch.Tensor) -> float:
    return float(loss.detach())


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * max(abs(b), 1e-12)


def _gradients(loss: torch.Tensor, parameters: list[nn.Parameter]) -> list[torch.Tensor]:
    grads = torch.autograd.grad(loss, parameters, allow_unused=True)
    return [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(parameters, grads, strict=True)
    ]


def _gradient_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """``||got - want|| / ||want||`` over all parameters at once."""
    difference = math.sqrt(sum(
        float((g - w).double().pow(2).sum()) for g, w in zip(got, want, strict=True)
    ))
    norm = math.sqrt(sum(float(w.double().pow(2).sum()) for w in want))
    return difference / norm if norm > 0 else difference


def check_loss(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    micro_batch_size: int = 1,
    extra_padding: int = 8,
    pad_token_id: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    rtol: float = 1e-4,
) -> list[Finding]:
    """Check a causal language model's loss on ``batch``, as training uses it.

    Four checks, the model in eval mode (its mode is restored after):

    * its loss against the float64 reference of the package,
      :func:`companion.reference.causal_lm_loss`, on its own logits;
    * the batch split into micro-batches of ``micro_batch_size`` rows, run
      as transformers' ``Trainer`` runs them: with ``num_items_in_batch``
      (the step's scored targets) when the model takes loss keyword
      arguments (:func:`accepts_loss_kwargs`), else each micro-batch's mean
      divided by their number.  The summed loss and the accumulated
      gradient must equal the full batch's;
    * the batch with ``extra_padding`` columns of right padding (pad id,
      attention mask 0, label ``ignore_index``) must give the same loss;
    * whether ``forward`` takes the loss keyword arguments at all.

    A model that returns logits without a loss (its ``forward`` names no
    ``labels``) is checked with the package's
    :func:`~companion.causal_lm_loss.label_padding_loss` and
    :func:`~companion.accumulation.micro_batch_loss`, what a training loop
    of one's own would call.  Only the batch keys that ``forward`` names are
    passed to it; every tensor whose first dimension is ``B`` is split by
    rows (``pixel_values`` with one image per row, for instance).

    Args:
        model: a ``torch.nn.Module`` whose ``forward`` returns logits
            ``(B, T, V)``, a mapping with ``logits`` (and ``loss``), or a
            tuple ``(loss, logits, ...)``.
        batch: a mapping with ``input_ids`` ``(B, T)`` and ``labels``
            ``(B, T)`` int64 with at least one scored target, and whatever
            else the model takes.
        micro_batch_size: rows per micro-batch, ``>= 1``.
        extra_padding: columns of right padding added, ``>= 1``.
        pad_token_id: id written into the added padding; default the
            model's ``config.pad_token_id``, else 0.
        ignore_index: the label value that is not scored.
        rtol: relative tolerance of every comparison (float32 logits
            differ in their last bits when shapes change).

    Returns:
        The findings, errors first; an empty list when the loss passes
        every check.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    require_mapping(batch, "batch", "a mapping of tensors (a dict or BatchEncoding)")
    input_ids = _check_input_ids(batch)
    labels = _check_labels_present(batch)
    require_rank(labels, 2, "labels", "(B, T)")
    require_integer(labels, "labels")
    if tuple(labels.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"labels must have the shape of input_ids {tuple(input_ids.shape)}; "
            f"got shape {tuple(labels.shape)}"
        )
    ignore_index = require_ignore_index(ignore_index)
    micro_batch_size = require_positive_int(micro_batch_size, "micro_batch_size")
    extra_padding = require_positive_int(extra_padding, "extra_padding")
    rtol = require_real_number(rtol, "rtol")
    if not (math.isfinite(rtol) and rtol > 0):
        raise ValueError(f"rtol must be a finite number > 0; got {rtol}")
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None)
        pad_token_id = 0 if not isinstance(pad_token_id, int) else pad_token_id
    else:
        pad_token_id = require_int(pad_token_id, "pad_token_id")
    total = count_scored_targets(labels, ignore_index)
    if total == 0:
        raise ValueError(
            "labels must hold at least one scored target (after the first "
            "column); the loss of this batch is nan"
        )
    batch = {**batch, "labels": labels.long()}
    was_training = model.training
    model.eval()
    try:
        return _sorted(_loss_findings(
            model, batch, total, micro_batch_size, extra_padding,
            pad_token_id, ignore_index, rtol,
        ))
    finally:
        model.train(was_training)


def _loss_findings(
    model: nn.Module,
    batch: dict,
    total: int,
    micro_batch_size: int,
    extra_padding: int,
    pad_token_id: int,
    ignore_index: int,
    rtol: float,
) -> list[Finding]:
    findings = []
    labels = batch["labels"]
    rows = labels.shape[0]
    parameters = [p for p in model.parameters() if p.requires_grad]
    own_loss, logits = _run(model, batch)
    computes_loss = own_loss is not None
    if not computes_loss:
        findings.append(_finding(
            "model-computes-no-loss",
            "the model returns logits without a loss; the checks used the "
            "package's label_padding_loss and micro_batch_loss on them.",
        ))
    full_loss = own_loss if computes_loss else label_padding_loss(
        logits, labels, ignore_index=ignore_index
    )
    expected = reference.causal_lm_loss(
        logits.detach().double().cpu().numpy(),
        labels.cpu().numpy(),
        ignore_index=ignore_index,
    )
    if not _close(_value(full_loss), expected, rtol):
        findings.append(_finding(
            "loss-reference-mismatch",
            f"the model's loss {_value(full_loss):.4g} differs from the float64 "
            f"next-token loss of its own logits, {expected:.4g} (a loss "
            "without the shift, or with another denominator?).",
        ))
    full_gradient = _gradients(full_loss, parameters) if parameters else []

    takes_kwargs = computes_loss and accepts_loss_kwargs(model)
    if computes_loss and not takes_kwargs:
        findings.append(_finding(
            "no-loss-kwargs",
            "forward takes no **kwargs, so transformers' Trainer passes it no "
            "num_items_in_batch and divides each micro-batch's mean loss by "
            "the number of accumulation steps: a mean of means.",
        ))
    starts = range(0, rows, micro_batch_size)
    summed = 0.0
    accumulated = [torch.zeros_like(p) for p in parameters]
    for start in starts:
        piece = _rows(batch, start, start + micro_batch_size, rows)
        if takes_kwargs:
            loss, _ = _run(model, piece, num_items_in_batch=total)
        elif computes_loss:
            loss, _ = _run(model, piece)
            loss = loss / len(starts)
        else:
            _, piece_logits = _run(model, piece)
            loss = micro_batch_loss(
                piece_logits, piece["labels"], num_items_in_batch=total,
                ignore_index=ignore_index,
            )
        summed += _value(loss)
        if parameters and loss.requires_grad:
            for sum_, grad in zip(accumulated, _gradients(loss, parameters), strict=True):
                sum_ += grad
    gradient_error = _gradient_error(accumulated, full_gradient) if parameters else 0.0
    if not (_close(summed, _value(full_loss), rtol) and gradient_error <= rtol):
        findings.append(_finding(
            "micro-batch-mismatch",
            f"split into micro-batches of {_plural(micro_batch_size, 'row')}, "
            f"the loss is {summed:.4g} against {_value(full_loss):.4g} on the "
            f"full batch and the gradient is {gradient_error:.2g} off "
            "(relative): accumulation does not reproduce the full-batch step.",
        ))

    with torch.no_grad():
        padded_batch = _right_padded(batch, extra_padding, pad_token_id, ignore_index)
        padded_loss, padded_logits = _run(model, padded_batch)
        if padded_loss is None:
            padded_loss = label_padding_loss(
                padded_logits, padded_batch["labels"], ignore_index=ignore_index
            )
    if not _close(_value(padded_loss), _value(full_loss), rtol):
        findings.append(_finding(
            "padding-changes-loss",
            f"{_plural(extra_padding, 'column')} of right padding (labels -100, "
            f"attention mask 0) changed the loss from {_value(full_loss):.4g} to "
            f"{_value(padded_loss):.4g}: padding enters the loss or its "
            "denominator.",
        ))
    return findings


# ---------------------------------------------------------------------------
# Files and tables
# ---------------------------------------------------------------------------


def _weights_only_refusal(path: Path, error: BaseException) -> str | None:
    """The message for what a ``weights_only`` load refused, or ``None``."""
    text = str(error)
    if "Weights only load failed" not in text:
        return None
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found is not None:
        return (
            f"path {path} holds more than tensors and plain containers and was "
            f"refused without running it (it names {found.group(1)})"
        )
    found = re.search(r"Unsupported operand (\d+)", text)
    detail = f"unsupported pickle operand {found.group(1)}" if found else "not tensors"
    return (
        f"path {path} is not a torch.save file of tensors and was refused "
        f"without running it ({detail})"
    )


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():
            # a pickle protocol other than torch's own draws a UserWarning
            warnings.simplefilter("ignore", UserWarning)
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        refusal = _weights_only_refusal(path, error)
        if refusal is not None:
            raise ValueError(refusal) from None
        detail = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"path {path} is truncated or not a torch.save file "
            f"({type(error).__name__}{': ' + detail if detail else ''})"
        ) from None
    if not isinstance(loaded, Mapping):
        raise ValueError(
            f"path {path} holds a {type(loaded).__name__}, not a dict of "
            "tensors (save the batch as torch.save(dict(batch), path))"
        )
    batch = {}
    for key, value in loaded.items():
        if not isinstance(key, str):
            raise ValueError(f"path {path} has a key {key!r} that is not a string")
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"path {path} has a non-tensor value under {key!r} "
                f"({type(value).__name__}); a batch file holds a dict of tensors"
            )
        batch[key] = value
    return batch


def _json_line(path: Path, number: int, line: str) -> dict[str, list[int]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"path {path}, line {number}: not valid JSON "
            f"({error.msg}, column {error.colno})"
        ) from None
    if not isinstance(record, dict):
        raise ValueError(
            f"path {path}, line {number}: expected a JSON object of token-id "
            f"lists; got {type(record).__name__}"
        )
    if "input_ids" not in record:
        raise ValueError(f"path {path}, line {number}: no 'input_ids'")
    length = None
    for key, value in record.items():
        if not (
            isinstance(value, list) and value
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            raise ValueError(
                f"path {path}, line {number}: {key!r} must be a non-empty list "
                "of integers"
            )
        if length is None:
            length = len(value)
        elif len(value) != length:
            raise ValueError(
                f"path {path}, line {number}: {key!r} has {len(value)} entries, "
                f"the line's other lists {length}"
            )
    return record


def _load_json_lines(
    path: Path, pad_token_id: int, ignore_index: int
) -> dict[str, torch.Tensor]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"path {path} is not UTF-8 text ({error.reason})") from None
    records = [
        (number, _json_line(path, number, line))
        for number, line in enumerate(text.splitlines(), start=1)
        if line.strip()
    ]
    keys = set(records[0][1])
    for number, record in records:
        if set(record) != keys:
            raise ValueError(
                f"path {path}, line {number}: keys {sorted(record)} differ from "
                f"line {records[0][0]}'s {sorted(keys)}"
            )
    lengths = [len(record["input_ids"]) for _, record in records]
    width = max(lengths)
    fill = {"input_ids": pad_token_id, "labels": ignore_index}
    batch = {}
    try:
        for key in sorted(keys):
            rows = [record[key] + [fill.get(key, 0)] * (width - len(record[key])) for _, record in records]
            batch[key] = torch.tensor(rows, dtype=torch.long)
    except (OverflowError, RuntimeError, ValueError) as error:
        raise ValueError(f"path {path}: a value does not fit in int64 ({error})") from None
    if "labels" not in batch:
        labels = batch["input_ids"].clone()
        for row, length in enumerate(lengths):
            labels[row, length:] = ignore_index
        batch["labels"] = labels
    if "attention_mask" not in batch and len(set(lengths)) > 1:
        columns = torch.arange(width)
        batch["attention_mask"] = (columns[None, :] < torch.tensor(lengths)[:, None]).long()
    return batch


def load_batch(
    path: Any,
    *,
    pad_token_id: int = 0,
    ignore_index: int = IGNORE_INDEX,
) -> dict[str, torch.Tensor]:
    """Read a batch from a file, as untrusted input.

    Two formats, told apart by the first byte:

    * a file written by ``torch.save`` holding a dict of tensors, read with
      ``torch.load(..., weights_only=True)``: a pickle holding anything but
      tensors and plain containers is refused before any of it runs, and so
      are a truncated file and a value that is not a tensor;
    * JSON Lines, one row per line: an object of lists of integers, with
      ``input_ids`` and optionally ``labels``, ``attention_mask``,
      ``position_ids``, :data:`ASSISTANT_MASK_KEY`.  Rows of different
      lengths are right-padded (``input_ids`` with ``pad_token_id``,
      ``labels`` with ``ignore_index``, others with 0) and, without an
      ``attention_mask``, given one; without ``labels``, the labels are a
      copy of ``input_ids`` (the causal language-modelling convention).

    Args:
        path: the file, a ``str`` or an ``os.PathLike`` such as a
            ``pathlib.Path``.
        pad_token_id: the id that pads short JSON Lines rows.
        ignore_index: the label that pads short JSON Lines rows.

    Returns:
        The batch, a dict of CPU tensors.

    Raises:
        TypeError: ``path`` is not a ``str`` or path.
        FileNotFoundError: no such file.
        ValueError: the file is refused; the message names it and the
            problem (the line, for JSON Lines).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    pad_token_id = require_int(pad_token_id, "pad_token_id")
    ignore_index = require_ignore_index(ignore_index)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"path {path} does not exist")
    if not path.is_file():
        raise ValueError(f"path {path} is not a file")
    with path.open("rb") as handle:
        head = handle.read(64)
    if not head.strip():
        raise ValueError(f"path {path} is empty")
    if head.lstrip()[:1] == b"{":
        return _load_json_lines(path, pad_token_id, ignore_index)
    return _load_torch_file(path)


def _where(finding: Finding) -> str:
    if finding.positions:
        listed = " ".join(f"({b}, {t})" for b, t in finding.positions)
        more = finding.count - len(finding.positions)
        return listed + (f" +{more} more" if more > 0 else "")
    if finding.rows:
        listed = ", ".join(str(b) for b in finding.rows)
        more = finding.count - len(finding.rows)
        return ("row " if finding.count == 1 else "rows ") + listed + (
            f" +{more} more" if more > 0 else ""
        )
    return "-"


def format_findings(findings: Sequence[Finding], *, width: int = 78) -> str:
    """Findings as a table, or ``"no findings"``.

    One block per finding: severity, code and where (``(row, column)``
    positions, rows, or ``-`` for the whole batch or the model), then the
    message and the link, wrapped to ``width`` characters.

    Args:
        findings: from :func:`check_batch` or :func:`check_loss`.
        width: characters per line, ``>= 40``.

    Returns:
        The table, without a trailing newline.
    """
    require_sequence(findings, "findings", "a sequence of Finding")
    for index, finding in enumerate(findings):
        if not isinstance(finding, Finding):
            raise TypeError(
                f"findings[{index}] must be a Finding; got {type(finding).__name__}"
            )
    width = require_positive_int(width, "width")
    if width < 40:
        raise ValueError(f"width must be >= 40; got {width}")
    if not findings:
        return "no findings"
    code_width = max(len(finding.code) for finding in findings)
    lines = [f"{'severity':<8}  {'code':<{code_width}}  where"]
    indent = " " * 10
    for finding in findings:
        head = f"{finding.severity.value:<8}  {finding.code:<{code_width}}  "
        lines += textwrap.wrap(
            _where(finding), width, initial_indent=head,
            subsequent_indent=" " * len(head),
        )
        lines += textwrap.wrap(
            finding.message, width, initial_indent=indent, subsequent_indent=indent
        )
        lines.append(indent + "see " + finding.link)
    return "\n".join(lines)
