"""Checkers for chapter 8's exercises (checking a batch and a model's loss
before training; see book/08_check_your_batch.ipynb)."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch

from companion import IGNORE_INDEX
from companion.exercises import ExerciseFailed, call, checker, expect, expect_close

__all__: list[str] = []


def _expect_targets(got: Any, want: torch.Tensor, case: str, *, from_column: int = 0) -> None:
    """``got`` equals ``want`` from ``from_column`` on (1: column 0 is no target)."""
    expect(isinstance(got, torch.Tensor), f"{case}: expected a (B, T) tensor; got {type(got).__name__}")
    expect(tuple(got.shape) == tuple(want.shape),
           f"{case}: expected shape {tuple(want.shape)}; got {tuple(got.shape)}")
    wrong = (got[:, from_column:].long() != want[:, from_column:]).nonzero()
    if len(wrong):
        b, t = int(wrong[0, 0]), int(wrong[0, 1]) + from_column
        raise ExerciseFailed(
            f"{case}: {len(wrong)} labels differ; first at (b={b}, t={t}): "
            f"expected {int(want[b, t])}, got {int(got[b, t])}"
        )


def _copy(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in batch.items()}


@lru_cache(maxsize=4)
def _collated(pad_is_eos: bool, padding_side: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """``DataCollatorForLanguageModeling``'s batch, its pad and eos ids."""
    from companion.experiments.batch_check import TEXTS, bpe_tokenizer, language_model_batch

    tokenizer = bpe_tokenizer(pad_is_eos=pad_is_eos, padding_side=padding_side)
    texts = [*TEXTS, "a"]  # one row short enough to be padded a lot
    batch = language_model_batch(tokenizer, texts)
    return batch, tokenizer.pad_token_id, tokenizer.eos_token_id


# ---------------------------------------------------------------------------
# bc-ex1: score the end-of-sequence targets again
# ---------------------------------------------------------------------------


@checker("bc-ex1")
def _restore_eos_targets(answer: Callable[..., Any]) -> int:
    from companion.batch_check import check_batch

    checks = 0
    for side in ("right", "left"):
        batch, pad, eos = _collated(True, side)
        case = f"DataCollatorForLanguageModeling, pad = eos, {side} padding"
        got = call(answer, case, _copy(batch), eos)
        # the collator's labels are input_ids with every pad id masked: with
        # the end of sequence restored, they are input_ids on the real tokens
        want = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        _expect_targets(got, want, case)
        found = [f.code for f in check_batch({**batch, "labels": got}, pad_token_id=pad, eos_token_id=eos)]
        expect("eos-targets-masked" not in found, f"{case}: check_batch still reports {found}")
        checks += 2
    # eos id 7, prompts masked by the caller, left and right padding mixed
    input_ids = torch.tensor([[1, 5, 6, 8, 7, 7, 7], [7, 7, 1, 5, 6, 8, 7], [1, 5, 5, 6, 6, 8, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    labels = torch.tensor([
        [-100, -100, 6, 8, -100, -100, -100],
        [-100, -100, -100, -100, 6, 8, -100],
        [-100, -100, -100, -100, 6, 8, -100],
    ])
    want = torch.tensor([
        [-100, -100, 6, 8, 7, -100, -100],
        [-100, -100, -100, -100, 6, 8, 7],
        [-100, -100, -100, -100, 6, 8, 7],
    ])
    case = "eos_token_id = 7, prompts masked, B = 3"
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    _expect_targets(call(answer, case, _copy(batch), 7), want, case)
    # two turns in a row: each ends in its own end-of-sequence token
    input_ids = torch.tensor([[1, 5, 7, 6, 8, 7, 7], [7, 7, 1, 5, 7, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]])
    labels = torch.tensor([[-100, 5, -100, 6, 8, -100, -100], [-100, -100, -100, 5, -100, 6, -100]])
    want = torch.tensor([[-100, 5, 7, 6, 8, 7, -100], [-100, -100, -100, 5, 7, 6, 7]])
    case = "eos_token_id = 7, two turns per row, B = 2"
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    _expect_targets(call(answer, case, _copy(batch), 7), want, case)
    return checks + 2


# ---------------------------------------------------------------------------
# bc-ex2: no target right after padding
# ---------------------------------------------------------------------------


@checker("bc-ex2")
def _mask_first_real_token(answer: Callable[..., Any]) -> int:
    from companion.batch_check import check_batch

    checks = 0
    for side in ("left", "right"):
        batch, pad, eos = _collated(False, side)
        case = f"DataCollatorForLanguageModeling, {side} padding"
        found = check_batch(batch, pad_token_id=pad, eos_token_id=eos, max_positions=10**6)
        want = batch["labels"].clone()
        for finding in found:  # the library's own finding says which targets
            if finding.code == "target-after-padding":
                for b, t in finding.positions:
                    want[b, t] = IGNORE_INDEX
        got = call(answer, case, _copy(batch))
        _expect_targets(got, want, case, from_column=1)
        checks += 1
    # no <bos>, a first label already -100, a row that is all padding, and a
    # row that is not padded at all
    input_ids = torch.tensor([
        [0, 0, 5, 6, 8, 9],
        [0, 0, 0, 5, 6, 8],
        [0, 0, 0, 0, 0, 0],
        [9, 5, 6, 8, 9, 8],
        [0, 9, 8, 7, 6, 5],
    ])
    mask = (input_ids != 0).long()
    mask[3] = 1
    labels = torch.tensor([
        [-100, -100, 5, 6, 8, 9],
        [-100, -100, -100, -100, 6, 8],
        [-100, -100, -100, -100, -100, -100],
        [9, 5, 6, 8, 9, 8],
        [-100, 9, 8, 7, 6, 5],
    ])
    want = labels.clone()
    want[0, 2] = want[4, 1] = IGNORE_INDEX
    case = "left padding without <bos>, B = 5"
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    _expect_targets(call(answer, case, _copy(batch)), want, case, from_column=1)
    case = "B = 1, one column of left padding"
    one = {"input_ids": input_ids[4:], "attention_mask": mask[4:], "labels": labels[4:]}
    _expect_targets(call(answer, case, _copy(one)), want[4:], case, from_column=1)
    # padding labelled with the pad id (0): those labels stay as they are
    input_ids = torch.tensor([[0, 0, 5, 6, 8], [5, 6, 8, 0, 0], [0, 5, 0, 6, 8]])
    mask = (input_ids != 0).long()
    labels = input_ids.clone()
    want = torch.tensor([[0, 0, -100, 6, 8], [5, 6, 8, 0, 0], [0, -100, 0, -100, 8]])
    case = "padding labelled with the pad id, B = 3"
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    _expect_targets(call(answer, case, _copy(batch)), want, case, from_column=1)
    return checks + 3


# ---------------------------------------------------------------------------
# bc-ex3: find the bug in a model that should take num_items_in_batch
# ---------------------------------------------------------------------------


def _inputs(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    ids = torch.tensor(rows)
    return {"input_ids": ids, "attention_mask": (ids != 0).long(),
            "labels": torch.where(ids == 0, IGNORE_INDEX, ids)}


@checker("bc-ex3")
def _summed_loss_model(answer: Callable[..., Any]) -> int:
    from companion.batch_check import check_loss
    from companion.experiments.tiny_models import build_tiny_lm
    from companion.reference import causal_lm_loss

    inner = build_tiny_lm(seed=0)
    model = call(answer, "building the model around build_tiny_lm(seed=0)", inner)
    expect(isinstance(model, torch.nn.Module), f"expected a torch.nn.Module; got {type(model).__name__}")
    batches = {
        "B = 2 of 3 and 9 targets, micro-batches of 1 row": (
            _inputs([[1, 3, 4, 5, 0, 0, 0, 0, 0, 0], [1, 6, 7, 8, 9, 10, 11, 12, 13, 14]]), 1),
        "B = 3 of 8, 2 and 5 targets, micro-batches of 2 rows": (
            _inputs([[1, 3, 4, 5, 6, 7, 8, 9, 10], [1, 5, 6, 0, 0, 0, 0, 0, 0], [1, 9, 8, 7, 6, 5, 0, 0, 0]]), 2),
    }
    checks = 0
    for case, (batch, rows) in batches.items():
        with torch.no_grad():
            output = call(model, case, batch["input_ids"], labels=batch["labels"])
        expect(isinstance(output, dict) and "loss" in output and "logits" in output,
               f"{case}: forward should return a dict with 'loss' and 'logits'")
        want = causal_lm_loss(output["logits"].double().numpy(), batch["labels"].numpy())
        expect_close(output["loss"], want, f"{case}: loss without num_items_in_batch", rtol=1e-6)
        with torch.no_grad():
            output = call(model, case, batch["input_ids"], labels=batch["labels"],
                           num_items_in_batch=torch.tensor(40.0))
        want = causal_lm_loss(output["logits"].double().numpy(), batch["labels"].numpy(), num_items_in_batch=40)
        expect_close(output["loss"], want, f"{case}: loss with num_items_in_batch = 40", rtol=1e-6)
        findings = check_loss(model, batch, micro_batch_size=rows)
        expect(findings == [], f"{case}: check_loss reports {[f.code for f in findings]}")
        checks += 3
    return checks


# ---------------------------------------------------------------------------
# bc-ex4: a test that accumulation reproduces the full batch
# ---------------------------------------------------------------------------


def _library_loss(logits, labels, num_items_in_batch=None):  # noqa: ANN001, ANN202
    from companion.causal_lm_loss import label_padding_loss

    return label_padding_loss(logits, labels, num_items_in_batch=num_items_in_batch)


def _library_loss_float32(logits, labels, num_items_in_batch=None):  # noqa: ANN001, ANN202
    from companion.causal_lm_loss import label_padding_loss

    return label_padding_loss(logits.float(), labels, num_items_in_batch=num_items_in_batch)


def _own_mean(logits, labels, num_items_in_batch=None):  # noqa: ANN001, ANN202
    from companion.causal_lm_loss import label_padding_loss

    return label_padding_loss(logits, labels)


def _every_position(logits, labels, num_items_in_batch=None):  # noqa: ANN001, ANN202
    from companion.causal_lm_loss import token_losses

    losses = token_losses(logits, labels)
    return losses.sum() / losses.numel()


def _column_zero_counted(logits, labels, num_items_in_batch=None):  # noqa: ANN001, ANN202
    from companion.causal_lm_loss import token_losses

    total = token_losses(logits, labels).sum()
    if num_items_in_batch is None:
        num_items_in_batch = int((labels != IGNORE_INDEX).sum())
    return total / num_items_in_batch


# each loss, and whether a split reproduces the full batch: always, never,
# or only when there is a single micro-batch
_LOSSES: dict[str, tuple[Callable[..., Any], str]] = {
    "label_padding_loss": (_library_loss, "always"),
    "label_padding_loss in float32": (_library_loss_float32, "always"),
    "each micro-batch's own mean": (_own_mean, "one micro-batch"),
    "a sum over every position B (T - 1)": (_every_position, "one micro-batch"),
    "a fallback count that includes column 0": (_column_zero_counted, "never"),
}


def _batch(B: int, T: int, V: int, seed: int, empty_rows: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=generator)
    lengths = torch.randint(2, T + 1, (B,), generator=generator)
    labels[torch.arange(T)[None] >= lengths[:, None]] = IGNORE_INDEX
    for row in empty_rows:
        labels[row, 1:] = IGNORE_INDEX
    return logits, labels


@checker("bc-ex4")
def _accumulation_preserved(answer: Callable[..., Any]) -> int:
    cases = {
        "B = 5, micro-batches of 2 rows (the last of 1)": (_batch(5, 8, 7, seed=1), 2),
        "B = 4, micro-batches of 2, rows 2 and 3 without a target": (_batch(4, 6, 5, seed=2, empty_rows=(2, 3)), 2),
        "B = 3, micro-batches of 1 row, T = V": (_batch(3, 9, 9, seed=3), 1),
        "B = 3, one micro-batch of 3 rows": (_batch(3, 7, 5, seed=4), 3),
    }
    checks = 0
    for case, ((logits, labels), rows) in cases.items():
        B = labels.shape[0]
        for name, (loss, preserved) in _LOSSES.items():
            want = preserved == "always" or (preserved == "one micro-batch" and rows >= B)
            where = f"{case}, loss = {name}"
            got = call(answer, where, loss, logits.clone(), labels.clone(), rows)
            if isinstance(got, torch.Tensor) and got.dtype == torch.bool and got.numel() == 1:
                got = bool(got)
            if type(got).__name__ == "bool_":  # numpy's bool
                got = bool(got)
            expect(isinstance(got, bool), f"{where}: expected a bool; got {type(got).__name__}")
            expect(got == want, f"{where}: expected {want}; got {got}")
            checks += 1
    return checks
