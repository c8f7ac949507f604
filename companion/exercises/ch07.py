"""Checkers for chapter 7's exercises (training with right and wrong labels,
the ``Trainer``, packing; see book/07_training.ipynb)."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

from companion import IGNORE_INDEX
from companion.exercises import ExerciseFailed, call, checker, expect, expect_close

__all__: list[str] = []


def _expect_labels(got: Any, want: torch.Tensor, case: str) -> None:
    expect(isinstance(got, torch.Tensor), f"{case}: expected a tensor; got {type(got).__name__}")
    expect(tuple(got.shape) == tuple(want.shape), f"{case}: expected shape {tuple(want.shape)}; got {tuple(got.shape)}")
    wrong = (got.long() != want).nonzero()
    if len(wrong):
        b, t = (int(i) for i in wrong[0])
        raise ExerciseFailed(
            f"{case}: {len(wrong)} labels differ; first at (b={b}, t={t}): "
            f"expected {int(want[b, t])}, got {int(got[b, t])}"
        )


@lru_cache(maxsize=1)
def _data() -> tuple[Any, list[Any]]:
    from companion.experiments import training

    vocab = training.make_vocabulary()
    return vocab, training.make_examples()


# ---------------------------------------------------------------------------
# training-ex1: keep the first end-of-sequence token of each row
# ---------------------------------------------------------------------------


@checker("training-ex1")
def _keep_first_eos(answer: Callable[..., Any]) -> int:
    from companion.experiments import training

    vocab, examples = _data()
    checks = 0
    # rows of different lengths (a 4-word and a 14-word answer among them)
    picks = {
        "B = 4, right-padded to the longest row": (examples[0:400:100], None),
        "B = 3, every row padded (T = 40)": (examples[5:300:120], 40),
        "B = 1, no padding": (examples[7:8], None),
    }
    for case, (chosen, width) in picks.items():
        masked = training.make_batch(chosen, vocab, "pad_is_eos_masked", total_length=width)
        right = training.make_batch(chosen, vocab, "answer_only", total_length=width)
        got = call(answer, case, masked.input_ids.clone(), masked.labels.clone(), 2)
        _expect_labels(got, right.labels, case)
        checks += 1
    # another end-of-sequence id, a prompt masked, a row without padding
    input_ids = torch.tensor([[1, 5, 6, 8, 7, 7, 7], [1, 5, 5, 6, 6, 8, 7], [1, 6, 8, 7, 7, 7, 7]])
    labels = torch.tensor([
        [-100, -100, 6, 8, -100, -100, -100],
        [-100, -100, -100, -100, 6, 8, -100],
        [-100, 6, 8, -100, -100, -100, -100],
    ])
    want = torch.tensor([
        [-100, -100, 6, 8, 7, -100, -100],
        [-100, -100, -100, -100, 6, 8, 7],
        [-100, 6, 8, 7, -100, -100, -100],
    ])
    case = "eos_token_id = 7, prompts masked"
    _expect_labels(call(answer, case, input_ids.clone(), labels.clone(), 7), want, case)
    return checks + 1


# ---------------------------------------------------------------------------
# training-ex2: a compute_loss_func for the Trainer
# ---------------------------------------------------------------------------


def _reference_loss(logits: torch.Tensor, labels: torch.Tensor, count: float) -> float:
    from companion.reference import causal_lm_loss

    return causal_lm_loss(logits.detach().numpy(), labels.numpy(), num_items_in_batch=count)


@checker("training-ex2")
def _summed_loss_over_step_count(answer: Callable[..., Any]) -> int:
    from companion.causal_lm_loss import count_scored_targets

    generator = torch.Generator().manual_seed(7)
    B, T, V = 5, 7, 11
    logits = torch.randn(B, T, V, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=generator)
    labels[0, 1:4] = IGNORE_INDEX  # a masked prompt; column 0 stays a real id
    labels[3, 1:] = IGNORE_INDEX  # a row without a target
    total = count_scored_targets(labels)
    checks = 0
    # the step cut into micro-batches of 2, 2 and 1 rows: the Trainer passes
    # every micro-batch the step's count, as a float tensor
    pieces, got_sum = [(0, 2), (2, 4), (4, 5)], 0.0
    for start, stop in pieces:
        piece = logits[start:stop].clone().requires_grad_(True)
        case = f"micro-batch rows {start}..{stop - 1}, num_items_in_batch = tensor({total}.)"
        got = call(answer, case, {"logits": piece}, labels[start:stop].clone(),
                    torch.tensor(float(total)))
        expect(isinstance(got, torch.Tensor) and got.dim() == 0,
               f"{case}: expected a 0-D tensor; got {type(got).__name__}")
        expect(got.requires_grad, f"{case}: the loss has no gradient (was it detached?)")
        expect_close(got, _reference_loss(piece, labels[start:stop], total), case, rtol=1e-5)
        got_sum += float(got.detach())
        checks += 1
    expect_close(got_sum, _reference_loss(logits, labels, total),
                 "the micro-batches' losses summed, against the step's token mean", rtol=1e-5)
    # a micro-batch with no target at all: its share of the step is 0
    case = "a micro-batch whose labels are all -100"
    got = call(answer, case, {"logits": logits[3:4].clone()}, labels[3:4].clone(),
                torch.tensor(float(total)))
    expect_close(got, 0.0, case)
    # an int count, B = 1, T = V
    logits_1 = torch.randn(1, V, V, generator=generator, dtype=torch.float64)
    labels_1 = torch.randint(0, V, (1, V), generator=generator)
    case = "B = 1, T = V, num_items_in_batch = 40 (an int)"
    got = call(answer, case, {"logits": logits_1}, labels_1.clone(), 40)
    expect_close(got, _reference_loss(logits_1, labels_1, 40), case, rtol=1e-5)
    return checks + 3


# ---------------------------------------------------------------------------
# training-ex3: find the bug in a packed loss
# ---------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _tiny_llama() -> Any:
    from transformers import LlamaForCausalLM

    from companion.experiments.tiny_models import tiny_llama_config

    config = tiny_llama_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(3)
    return LlamaForCausalLM(config).double().eval()


def _padded_loss(model: Any, documents: list[list[int]]) -> float:
    """The documents as right-padded rows: every token after the first scored."""
    from companion.causal_lm_loss import label_padding_loss

    width = max(map(len, documents))
    input_ids = torch.zeros(len(documents), width, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(documents):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits
    return float(label_padding_loss(logits, input_ids.masked_fill(mask == 0, IGNORE_INDEX)))


@checker("training-ex3")
def _packed_loss(answer: Callable[..., Any]) -> int:
    model = _tiny_llama()
    cases = {
        "one document": [[1, 9, 12, 15, 20, 2]],
        "three documents (6, 9, 4 tokens)": [
            [1, 9, 12, 15, 20, 2], [1, 30, 31, 32, 9, 9, 40, 41, 2], [1, 50, 51, 2]],
        "two documents (11, 3 tokens)": [[1, *range(10, 19), 2], [1, 7, 2]],
        "four documents, one of 1 token": [[1, 5, 6, 2], [1], [1, 8, 9, 10, 2], [1, 4, 2]],
    }
    checks = 0
    for case, documents in cases.items():
        with torch.no_grad():
            got = call(answer, case, model, [list(d) for d in documents])
        expect(isinstance(got, torch.Tensor) and got.numel() == 1,
               f"{case}: expected a 0-D tensor; got {type(got).__name__}")
        expect_close(got, _padded_loss(model, documents),
                     f"{case}: the packed loss against the padded batch's", rtol=1e-9)
        checks += 1
    return checks


# ---------------------------------------------------------------------------
# training-ex4: labels `ahead` tokens on, in packed rows
# ---------------------------------------------------------------------------


def _expected_ahead(labels: torch.Tensor, layout: list[list[int]], ahead: int) -> list[list[int]]:
    """The definition, position by position, from the document lengths the
    checker packed (``layout``, row by row), not from the position ids."""
    expected = []
    for b, lengths in enumerate(layout):
        row, offset = [], 0
        for length in lengths:
            for i in range(length):
                inside = i + ahead < length  # the target lies in the same document
                row.append(int(labels[b, offset + i + ahead]) if inside else IGNORE_INDEX)
            offset += length
        expected.append(row)
    return expected


def _packed(lengths: list[list[int]], generator: torch.Generator, masked: float = 0.0) -> tuple[torch.Tensor, ...]:
    """Rows packed from documents of the given lengths (labels: the collator's)."""
    rows_ids, rows_labels, rows_pos = [], [], []
    for row in lengths:
        ids = torch.randint(3, 60, (sum(row),), generator=generator)
        position_ids = torch.cat([torch.arange(n) for n in row])
        labels = ids.clone()
        labels[position_ids == 0] = IGNORE_INDEX
        drop = torch.rand(sum(row), generator=generator) < masked
        labels[drop] = IGNORE_INDEX
        rows_ids.append(ids), rows_labels.append(labels), rows_pos.append(position_ids)
    return torch.stack(rows_ids), torch.stack(rows_labels), torch.stack(rows_pos)


@checker("training-ex4")
def _ahead_labels(answer: Callable[..., Any]) -> int:
    from companion.causal_lm_loss import shift_labels_with_padding

    generator = torch.Generator().manual_seed(11)
    checks = 0
    _, labels, position_ids = _packed([[5, 7, 4]], generator)
    case = "ahead = 1, one packed row (5, 7, 4 tokens)"
    _expect_labels(call(answer, case, labels.clone(), position_ids.clone(), 1),
                   shift_labels_with_padding(labels), case)
    checks += 1
    one_row = torch.arange(12)[None]
    _, plain, _ = _packed([[12]], generator, masked=0.3)
    for ahead in (2, 3):
        case = f"ahead = {ahead}, one unpacked row (T = 12)"
        want = torch.nn.functional.pad(plain, (0, ahead), value=IGNORE_INDEX)[..., ahead:]
        _expect_labels(call(answer, case, plain.clone(), one_row.clone(), ahead), want, case)
        checks += 1
    layouts = {
        "B = 2, packed rows (6, 1, 5 | 3, 4, 5 tokens)": [[6, 1, 5], [3, 4, 5]],
        "B = 1, documents shorter than the shift (2, 2, 8)": [[2, 2, 8]],
        "B = 3, prompts masked (4, 8 | 12 | 1, 1, 10)": [[4, 8], [12], [1, 1, 10]],
    }
    for layout_case, layout in layouts.items():
        _, labels, position_ids = _packed(layout, generator, masked=0.25)
        for ahead in (2, 3, 13):
            case = f"ahead = {ahead}, {layout_case}"
            want = torch.tensor(_expected_ahead(labels, layout, ahead))
            _expect_labels(call(answer, case, labels.clone(), position_ids.clone(), ahead), want, case)
            checks += 1
    return checks
