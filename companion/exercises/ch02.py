"""Checkers for chapter 2's exercises (the LLaVA loss, see book/02_llava_loss.ipynb).

Expected values come from the library (``label_padding_loss``,
``attention_mask_filter_loss``, ``token_losses``, ``perplexity``) or from
float64 NumPy references written position by position.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from companion import IGNORE_INDEX, reference
from companion.causal_lm_loss import attention_mask_filter_loss, label_padding_loss, token_losses
from companion.cross_entropy import perplexity
from companion.exercises import call, checker, expect, expect_close

__all__: list[str] = []


def _logits(batch: int, time: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(batch, time, vocab, generator=generator, dtype=torch.float64)


def _labels(batch: int, time: int, vocab: int, seed: int, drop: float = 0.3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + seed)
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    ignored = torch.rand(batch, time, generator=generator) < drop
    return labels.masked_fill(ignored, IGNORE_INDEX)


def _right_padding_mask(lengths: list[int], time: int) -> torch.Tensor:
    return (torch.arange(time)[None, :] < torch.tensor(lengths)[:, None]).long()


def _scored(labels: torch.Tensor) -> int:
    """Targets other than -100 in columns 1 .. T-1 (column 0 has no predictor)."""
    return int(np.count_nonzero(labels.numpy()[:, 1:] != IGNORE_INDEX))


@checker("llava-ex1")
def _loss_with_scored_padding(answer: Callable[..., Any]) -> int:
    vocab, lengths, time = 9, [7, 4, 5], 7
    mask = _right_padding_mask(lengths, time)
    base = _labels(3, time, vocab, seed=0, drop=0.2)
    cases = {
        "answers and labelled padding": base,
        "padding labelled -100": base.masked_fill(mask == 0, IGNORE_INDEX),
        "only the padding labelled": base.masked_fill(mask == 1, IGNORE_INDEX).masked_fill(
            mask == 0, 3
        ),
        "nothing labelled": torch.full_like(base, IGNORE_INDEX),
    }
    logits = _logits(3, time, vocab, seed=1)
    for case, labels in cases.items():
        targets = labels[:, 1:] != IGNORE_INDEX
        padded = targets & (mask[:, 1:] == 0)
        legacy = float(attention_mask_filter_loss(logits, labels, mask))
        n_answer = int((targets & (mask[:, 1:] != 0)).sum())
        pad_losses = token_losses(logits, labels)[padded]  # (|S_pad|,)
        got = call(answer, case, legacy, n_answer, pad_losses.clone())
        want = float(label_padding_loss(logits, labels))
        expect_close(got, want, f"{case} (|S_ans|={n_answer}, |S_pad|={pad_losses.numel()})", rtol=1e-9)
    return len(cases)


def _sum_reference(micro_batches: list[tuple[torch.Tensor, torch.Tensor]], denominator: int) -> float:
    return sum(reference.causal_lm_loss(x.numpy(), y.numpy(), num_items_in_batch=denominator) for x, y in micro_batches)


def _micro_batch_cases(vocab: int) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    first_labelled = _labels(2, 6, vocab, seed=3, drop=0.2)
    first_labelled[:, 0] = 1  # a collator that copies input_ids into labels
    second = _labels(3, 4, vocab, seed=4)
    second[:, 0] = 2
    last_only = torch.full((2, 5), IGNORE_INDEX)
    last_only[:, -1] = 4  # first label -100, last one scored
    return {
        "rows that label their first token, T=6 and T=4": [
            (_logits(2, 6, vocab, seed=5), first_labelled),
            (_logits(3, 4, vocab, seed=6), second),
        ],
        "first labels -100, last labels scored": [
            (_logits(2, 5, vocab, seed=7), last_only),
            (_logits(1, 3, vocab, seed=8), torch.tensor([[IGNORE_INDEX, 5, 6]])),
        ],
        "a micro-batch with no target": [
            (_logits(2, 5, vocab, seed=9), _labels(2, 5, vocab, seed=10)),
            (_logits(2, 3, vocab, seed=11), torch.full((2, 3), IGNORE_INDEX)),
            (_logits(1, 7, vocab, seed=12), _labels(1, 7, vocab, seed=13)),
        ],
        "one micro-batch, B=1": [(_logits(1, 6, vocab, seed=14), _labels(1, 6, vocab, seed=15))],
    }


@checker("llava-ex2")
def _accumulated_loss(answer: Callable[..., Any]) -> int:
    for case, micro_batches in _micro_batch_cases(vocab=8).items():
        copies = [(x.clone(), y.clone()) for x, y in micro_batches]
        got = call(answer, case, copies)
        denominator = sum(_scored(y) for _, y in micro_batches)
        want = _sum_reference(micro_batches, denominator)
        expect_close(got, want, f"{case}: step loss", rtol=1e-9)
    return 4


@checker("llava-ex3")
def _corpus_perplexity(answer: Callable[..., Any]) -> int:
    vocab = 8
    cases = _micro_batch_cases(vocab)
    cases["equal counts"] = [
        (_logits(2, 4, vocab, seed=20), torch.tensor([[IGNORE_INDEX, 1, 2, 3], [IGNORE_INDEX, 4, 5, 6]])),
        (_logits(1, 7, vocab, seed=21), torch.tensor([[IGNORE_INDEX, 1, 2, 3, 4, 5, 6]])),
    ]
    for case, batches in cases.items():
        logged = [float(label_padding_loss(x, y)) for x, y in batches]
        labels = [y.clone() for _, y in batches]
        got = call(answer, case, list(logged), labels)
        scored = [(x, y) for x, y in batches if _scored(y) > 0]
        total = _sum_reference(scored, 1)
        want = perplexity(total, sum(_scored(y) for _, y in scored))
        expect(
            isinstance(got, (float, int, np.floating, torch.Tensor)) and not math.isnan(float(got)),
            f"{case}: expected a number; got {got!r}",
        )
        expect_close(got, want, f"{case}: perplexity", rtol=1e-9)
    return len(cases)


def _kept_reference(
    micro_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]],
) -> tuple[float, int]:
    """Sum of -log p over the pairs the old filter keeps, and their number.

    ``attended[b][t]`` (written out by hand for each case) is 1 when the
    filter's mask column facing the target ``labels[b, t + 1]`` is 1.
    """
    total, count = 0.0, 0
    for logits, labels, _, attended in micro_batches:
        x, y = logits.numpy(), labels.numpy()
        for b, row in enumerate(attended):
            logp = reference.log_softmax(x[b])
            for t, kept in enumerate(row):
                if kept and y[b, t + 1] != IGNORE_INDEX:
                    total -= logp[t, y[b, t + 1]]
                    count += 1
    return total, count


def _port_cases(
    vocab: int,
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]]]:
    """Each micro-batch: logits, labels, mask, and the attended targets by hand."""
    padded = _labels(3, 7, vocab, seed=30, drop=0.1)  # padding labelled with ids
    padded[:, 0] = 1
    prefix_mask = torch.cat([torch.ones(2, 3, dtype=torch.long), _right_padding_mask([5, 3], 5)], dim=1)
    left = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    return {
        "one micro-batch, right padding labelled": [
            (
                _logits(3, 7, vocab, 31),
                padded,
                _right_padding_mask([7, 4, 5], 7),
                [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]],
            ),
        ],
        "T=5 with 3 prefix mask columns, and T=4": [
            (
                _logits(2, 5, vocab, 32),
                _labels(2, 5, vocab, 33, drop=0.0),
                prefix_mask,
                [[1, 1, 1, 1], [1, 1, 0, 0]],
            ),
            (
                _logits(2, 4, vocab, 34),
                _labels(2, 4, vocab, 35),
                _right_padding_mask([4, 2], 4),
                [[1, 1, 1], [1, 0, 0]],
            ),
        ],
        "a T=1 micro-batch (2 prefix mask columns) and a fully masked one": [
            (_logits(2, 1, vocab, 36), torch.tensor([[3], [4]]), torch.ones(2, 3, dtype=torch.long), [[], []]),
            (_logits(1, 4, vocab, 37), torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 0, 0, 0]]), [[0, 0, 0]]),
            (
                _logits(2, 6, vocab, 38),
                _labels(2, 6, vocab, 39),
                _right_padding_mask([6, 3], 6),
                [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]],
            ),
        ],
        "left padding, a bool mask": [
            (
                _logits(2, 6, vocab, 40),
                _labels(2, 6, vocab, 41, drop=0.0),
                left,
                [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]],
            ),
        ],
    }


@checker("llava-ex4")
def _port_to_labels(answer: Callable[..., Any]) -> int:
    checks = 0
    for case, micro_batches in _port_cases(vocab=8).items():
        inputs = [(y.clone(), m.clone()) for _, y, m, _ in micro_batches]
        result = call(answer, case, inputs)
        for k, ((given_labels, given_mask), (_, labels, mask, _)) in enumerate(zip(inputs, micro_batches)):
            expect(
                torch.equal(given_labels, labels) and torch.equal(given_mask, mask),
                f"{case}: micro-batch {k + 1}: the function changed its input tensors (leave them unchanged)",
            )
        expect(
            isinstance(result, tuple) and len(result) == 2,
            f"{case}: expected a pair (labels per micro-batch, num_items_in_batch); got {type(result).__name__}",
        )
        new_labels, num_items = result
        expect(
            len(new_labels) == len(micro_batches),
            f"{case}: expected {len(micro_batches)} label tensors; got {len(new_labels)}",
        )
        total, count = _kept_reference(micro_batches)
        expect(
            isinstance(num_items, (int, np.integer, torch.Tensor)) and int(num_items) == count,
            f"{case}: num_items_in_batch: expected {count}; got {num_items!r}",
        )
        step = 0.0
        for k, ((logits, labels, _, _), ported) in enumerate(zip(micro_batches, new_labels, strict=True)):
            expect(
                isinstance(ported, torch.Tensor) and ported.shape == labels.shape,
                f"{case}: micro-batch {k + 1}: expected labels of shape {tuple(labels.shape)}",
            )
            loss = call(
                lambda x, y: label_padding_loss(x, y, num_items_in_batch=int(num_items)),
                f"{case}: micro-batch {k + 1}: label_padding_loss on the returned labels",
                logits,
                ported,
            )
            step += float(loss)
        expect_close(step, total / count, f"{case}: step loss", rtol=1e-9)
        checks += 2
    return checks
