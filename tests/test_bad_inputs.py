"""Every public entry point x every class of bad input: one clear error.

The project's rule: bad input to a public function raises ``TypeError`` or
``ValueError`` from the package's own checks (``companion/_checks.py`` and
the checks at the top of each function), with a message that names the
argument; never a traceback from deep inside PyTorch, TensorFlow or Keras,
never a silent answer.  :data:`CASES` is the table: one row per
``(function, bad input)``.  Each row asserts the exception type, that the
message names the argument and that the error was raised by ``companion``
code.  The one exception is the Keras loss and metrics *inside*
``model.fit``/``evaluate`` (a traced ``tf.function``), where values are only
known when the graph runs: there the package's ``tf.debugging`` assertions
raise ``tf.errors.InvalidArgumentError``, with the same message, before any
Keras op sees the bad value.

The second half checks that the formulations of one quantity (the causal-LM
loss, seven ways) agree on the edge cases that are *not* errors: ``T = 1``,
half-precision inputs, the accepted forms of ``num_items_in_batch`` and every
integer label dtype; and that inputs once answered silently now raise.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from companion import IGNORE_INDEX, reference, shapes
from companion import accumulation as acc
from companion import causal_lm_loss as clm
from companion import chunked_loss as chl
from companion import cross_entropy as ce
from companion import memory
from companion.experiments import cross_entropy as ce_exp
from companion.experiments import denominator as den
from companion.experiments import loss_memory as lm
from companion.experiments import shapes as exp_shapes
from companion.experiments import tiny_models as tm

B, T, V, D = 2, 5, 7, 4


@dataclass(frozen=True)
class Case:
    """One row of the table: calling ``call()`` must raise ``error``.

    ``name`` is the argument the message must name; ``in_package`` is
    ``False`` only where TensorFlow itself raises the package's graph
    assertion (inside ``model.fit``).
    """

    id: str
    call: Callable[[], Any]
    error: type[BaseException] | tuple[type[BaseException], ...]
    name: str
    in_package: bool = True


CASES: list[Case] = []


def add(id: str, function: Callable[..., Any], *args: Any,
        error: Any, name: str, in_package: bool = True, **kwargs: Any) -> None:
    CASES.append(Case(id, functools.partial(function, *args, **kwargs), error, name, in_package))


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def logits(b: int = B, t: int = T, v: int = V, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, t, v, generator=torch.Generator().manual_seed(0)).to(dtype)


def labels(b: int = B, t: int = T, v: int = V, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return (torch.arange(b * t).reshape(b, t) % v).to(dtype)


def hidden(b: int = B, t: int = T, d: int = D, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(1)).to(dtype)


def weight(v: int = V, d: int = D, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(v, d, generator=torch.Generator().manual_seed(2)).to(dtype)


def with_label(value: int) -> torch.Tensor:
    bad = labels()
    bad[1, 3] = value
    return bad


BAD_LOGITS = {
    "logits-numpy": (lambda: (logits().numpy(), labels()), TypeError),
    "logits-list": (lambda: (logits().tolist(), labels()), TypeError),
    "logits-None": (lambda: (None, labels()), TypeError),
    "logits-int64": (lambda: (logits().long(), labels()), TypeError),
    "logits-bool": (lambda: (logits() > 0, labels()), TypeError),
    "logits-complex": (lambda: (logits().to(torch.complex64), labels()), TypeError),
    "logits-rank2": (lambda: (logits()[0], labels()), ValueError),
    "logits-rank4": (lambda: (logits()[None], labels()), ValueError),
    "logits-vocab0": (lambda: (logits(v=0), labels()), ValueError),
    "logits-empty-batch": (lambda: (logits(b=0), labels(b=0)), ValueError),
    "logits-T0": (lambda: (logits(t=0), labels(t=0)), ValueError),
}
"""Bad ``(B, T, V)`` logits, each with labels that fit them: ``(logits, labels)``."""

BAD_LABELS = {
    "labels-numpy": (lambda: labels().numpy(), TypeError),
    "labels-list": (lambda: labels().tolist(), TypeError),
    "labels-None": (lambda: None, TypeError),
    "labels-float32": (lambda: labels().float(), TypeError),
    "labels-float64-whole": (lambda: labels().double(), TypeError),
    "labels-bool": (lambda: labels() > 2, TypeError),
    "labels-complex": (lambda: labels().to(torch.complex64), TypeError),
    "labels-rank1": (lambda: labels()[0], ValueError),
    "labels-rank3": (lambda: labels()[..., None], ValueError),
    "labels-batch-mismatch": (lambda: labels(b=B + 1), ValueError),
    "labels-time-mismatch": (lambda: labels(t=T - 1), ValueError),
}
"""Bad labels whose error does not depend on the vocabulary (shape functions too)."""

BAD_LABEL_VALUES = {
    "label-equal-V": (lambda: with_label(V), ValueError),
    "label-huge": (lambda: with_label(10**6), ValueError),
    "label-minus-1": (lambda: with_label(-1), ValueError),
    "label-int32-out-of-range": (lambda: with_label(V + 3).int(), ValueError),
    "label-uint8-out-of-range": (lambda: with_label(200).to(torch.uint8), ValueError),
}
"""Labels outside ``[0, V)`` that are not ``ignore_index`` (any integer dtype)."""

BAD_IGNORE_INDEX = {
    "ignore_index-None": None,
    "ignore_index-float-minus-100": -100.0,
    "ignore_index-float": 2.5,
    "ignore_index-bool": True,
    "ignore_index-str": "-100",
    "ignore_index-tensor": torch.tensor(-100),
    "ignore_index-list": [-100],
}
"""Every one a ``TypeError`` naming ``ignore_index``."""

BAD_NUM_ITEMS = {
    "num_items-float": (2.5, TypeError),
    "num_items-float-whole": (2.0, TypeError),
    "num_items-numpy-float": (np.float64(3.0), TypeError),
    "num_items-float-tensor": (torch.tensor(2.5), TypeError),
    "num_items-nan-tensor": (torch.tensor(math.nan), TypeError),
    "num_items-bool-tensor": (torch.tensor(True), TypeError),
    "num_items-complex-tensor": (torch.tensor(3 + 0j), TypeError),
    "num_items-bool": (True, TypeError),
    "num_items-str": ("3", TypeError),
    "num_items-list": ([3], TypeError),
    "num_items-zero": (0, ValueError),
    "num_items-negative": (-1, ValueError),
    "num_items-zero-tensor": (torch.tensor(0), ValueError),
    "num_items-negative-tensor": (torch.tensor(-4, dtype=torch.int32), ValueError),
    "num_items-1d-tensor": (torch.tensor([3]), ValueError),
    "num_items-2d-tensor": (torch.tensor([[3, 4]]), ValueError),
}
"""The same table for every function that takes ``num_items_in_batch``."""


# ---------------------------------------------------------------------------
# causal_lm_loss, shapes and the accumulation rule: (logits, labels)
# ---------------------------------------------------------------------------

ATTENTION_MASK = torch.ones(B, T, dtype=torch.long)

LOGIT_LOSSES: dict[str, Callable[..., Any]] = {
    "shift_and_slice_loss": clm.shift_and_slice_loss,
    "label_padding_loss": clm.label_padding_loss,
    "attention_mask_filter_loss": lambda x, y, **kw: clm.attention_mask_filter_loss(x, y, ATTENTION_MASK, **kw),
    "attention_mask_filter_loss[None]": lambda x, y, **kw: clm.attention_mask_filter_loss(x, y, None, **kw),
    "unshifted_token_loss": clm.unshifted_token_loss,
    "token_losses": clm.token_losses,
    "accumulation.micro_batch_loss": lambda x, y, **kw: acc.micro_batch_loss(
        x, y, num_items_in_batch=5, world_size=2, **kw),
}
"""Losses from logits with an ``ignore_index`` argument."""

SHAPE_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "shapes.check_logits_and_labels": shapes.check_logits_and_labels,
    "shapes.shift_for_next_token": shapes.shift_for_next_token,
    "shapes.flatten_for_cross_entropy": shapes.flatten_for_cross_entropy,
    "experiments.shapes.trace_shift_and_flatten": exp_shapes.trace_shift_and_flatten,
}
"""Shape functions: no label values are read, so no range check."""

for fname, fn in {**LOGIT_LOSSES, **SHAPE_FUNCTIONS}.items():
    for bad, (make, error) in BAD_LOGITS.items():
        add(f"{fname}-{bad}", lambda fn=fn, make=make: fn(*make()), error=error, name="logits")
    for bad, (make, error) in BAD_LABELS.items():
        add(f"{fname}-{bad}", lambda fn=fn, make=make: fn(logits(), make()), error=error, name="labels")
    if fname in SHAPE_FUNCTIONS:
        add(f"{fname}-T1-no-pair", lambda fn=fn: fn(logits(t=1), labels(t=1)), error=ValueError, name="logits")
        continue
    for bad, (make, error) in BAD_LABEL_VALUES.items():
        add(f"{fname}-{bad}", lambda fn=fn, make=make: fn(logits(), make()), error=error, name="labels")
    add(f"{fname}-label-minus-100-not-ignored",
        lambda fn=fn: fn(logits(), with_label(IGNORE_INDEX), ignore_index=-1), error=ValueError, name="labels")
    for bad, value in BAD_IGNORE_INDEX.items():
        add(f"{fname}-{bad}", lambda fn=fn, value=value: fn(logits(), labels(), ignore_index=value),
            error=TypeError, name="ignore_index")

for fname in ("label_padding_loss", "shift_and_slice_loss"):
    for bad, (value, error) in BAD_NUM_ITEMS.items():
        add(f"{fname}-{bad}", getattr(clm, fname), logits(), labels(),
            num_items_in_batch=value, error=error, name="num_items_in_batch")
for bad, (value, error) in {**BAD_NUM_ITEMS, "None": (None, TypeError)}.items():
    add(f"accumulation.micro_batch_loss-{bad}", acc.micro_batch_loss, logits(), labels(),
        num_items_in_batch=value, error=error, name="num_items_in_batch")
for bad, (value, error) in {"0": (0, ValueError), "float": (2.0, TypeError), "None": (None, TypeError)}.items():
    add(f"accumulation.micro_batch_loss-world_size-{bad}", acc.micro_batch_loss, logits(), labels(),
        num_items_in_batch=3, world_size=value, error=error, name="world_size")

for bad, (make, error) in {**BAD_LABELS, "labels-T1-fine-but-bool": (lambda: labels(t=1) > 0, TypeError)}.items():
    if bad in ("labels-batch-mismatch", "labels-time-mismatch"):
        continue
    add(f"count_scored_targets-{bad}", lambda make=make: clm.count_scored_targets(make()), error=error, name="labels")
    add(f"accumulation.count_items_in_batch-{bad}", lambda make=make: acc.count_items_in_batch([labels(), make()]),
        error=error, name="labels")
for bad, (value, error, name) in {"tensor": (labels(), TypeError, "micro_batch_labels"),
                                  "int": (3, TypeError, "micro_batch_labels"),
                                  "empty": ([], ValueError, "micro_batch_labels")}.items():
    add(f"accumulation.count_items_in_batch-{bad}", acc.count_items_in_batch, value, error=error, name=name)
for bad, value in BAD_IGNORE_INDEX.items():
    add(f"count_scored_targets-{bad}", clm.count_scored_targets, labels(), ignore_index=value,
        error=TypeError, name="ignore_index")

for bad, value in {
    "float": torch.ones(B, T),
    "rank1": torch.ones(T, dtype=torch.long),
    "batch-mismatch": torch.ones(B + 1, T, dtype=torch.long),
    "too-short": torch.ones(B, T - 2, dtype=torch.long),
    "list": [[1] * T] * B,
    "complex": torch.ones(B, T, dtype=torch.complex64),
}.items():
    error = ValueError if bad in ("rank1", "batch-mismatch", "too-short") else TypeError
    add(f"attention_mask_filter_loss-attention_mask-{bad}", clm.attention_mask_filter_loss,
        logits(), labels(), value, error=error, name="attention_mask")


# ---------------------------------------------------------------------------
# experiments.shapes: the TensorFlow twin and the size helpers
# ---------------------------------------------------------------------------

for bad, (x, y, error, name) in {
    "logits-None": (None, labels().numpy(), TypeError, "logits"),
    "logits-str": ("logits", labels().numpy(), TypeError, "logits"),
    "logits-ragged-list": ([[1.0, 2.0], [3.0]], labels().numpy(), TypeError, "logits"),
    "logits-rank2": (logits()[0].numpy(), labels().numpy(), ValueError, "logits"),
    "logits-int": (logits().long().numpy(), labels().numpy(), TypeError, "logits"),
    "logits-bool": (logits().numpy() > 0, labels().numpy(), TypeError, "logits"),
    "logits-vocab0": (logits(v=0).numpy(), labels().numpy(), ValueError, "logits"),
    "logits-empty-batch": (logits(b=0).numpy(), labels(b=0).numpy(), ValueError, "logits"),
    "T1-no-pair": (logits(t=1).numpy(), labels(t=1).numpy(), ValueError, "logits"),
    "labels-None": (logits().numpy(), None, TypeError, "labels"),
    "labels-float": (logits().numpy(), labels().float().numpy(), TypeError, "labels"),
    "labels-bool": (logits().numpy(), labels().numpy() > 2, TypeError, "labels"),
    "labels-rank1": (logits().numpy(), labels()[0].numpy(), ValueError, "labels"),
    "labels-time-mismatch": (logits().numpy(), labels(t=T - 1).numpy(), ValueError, "labels"),
}.items():
    add(f"experiments.shapes.tf_shift_and_flatten-{bad}", exp_shapes.tf_shift_and_flatten, x, y,
        error=error, name=name)

for fname, fn in {"experiments.shapes.slice_is_contiguous": exp_shapes.slice_is_contiguous,
                  "experiments.shapes.logits_nbytes": exp_shapes.logits_nbytes}.items():
    add(f"{fname}-batch-0", fn, 0, T, V, error=ValueError, name="batch")
    add(f"{fname}-time-float", fn, B, 2.0, V, error=TypeError, name="time")
    add(f"{fname}-vocab-str", fn, B, T, "7", error=TypeError, name="vocab")
    add(f"{fname}-vocab-negative", fn, B, T, -1, error=ValueError, name="vocab")
add("experiments.shapes.logits_nbytes-dtype-str", exp_shapes.logits_nbytes, B, T, V, "float32",
    error=TypeError, name="dtype")


# ---------------------------------------------------------------------------
# chunked_loss and the eager benchmark variants: (hidden, weight, labels)
# ---------------------------------------------------------------------------

CHUNKED: dict[str, Callable[..., Any]] = {
    "eager_shift_and_slice_loss": lm.eager_shift_and_slice_loss,
    "eager_label_padding_loss": lm.eager_label_padding_loss,
    "checkpointed_chunked_loss": chl.checkpointed_chunked_loss,
    "chunked_causal_lm_loss": chl.chunked_causal_lm_loss,
    "check_hidden_weight_labels": chl.check_hidden_weight_labels,
}

BAD_HIDDEN = {
    "hidden-numpy": (lambda: hidden().numpy(), TypeError),
    "hidden-None": (lambda: None, TypeError),
    "hidden-int": (lambda: hidden().long(), TypeError),
    "hidden-bool": (lambda: hidden() > 0, TypeError),
    "hidden-complex": (lambda: hidden().to(torch.complex64), TypeError),
    "hidden-rank2": (lambda: hidden()[0], ValueError),
    "hidden-empty-batch": (lambda: hidden(b=0), ValueError),
    "hidden-T0": (lambda: hidden(t=0), ValueError),
    "hidden-d0": (lambda: hidden(d=0), ValueError),
}
HIDDEN_LABELS = {"hidden-empty-batch": lambda: labels(b=0), "hidden-T0": lambda: labels(t=0)}
BAD_WEIGHT = {
    "weight-numpy": (lambda: weight().numpy(), TypeError),
    "weight-int": (lambda: weight().long(), TypeError),
    "weight-rank1": (lambda: weight()[0], ValueError),
    "weight-vocab0": (lambda: weight(v=0), ValueError),
    "weight-d-mismatch": (lambda: weight(d=D + 1), ValueError),
    "weight-dtype-mismatch": (lambda: weight(dtype=torch.float64), TypeError),
}

for fname, fn in CHUNKED.items():
    for bad, (make, error) in BAD_HIDDEN.items():
        add(f"{fname}-{bad}", lambda fn=fn, make=make, y=HIDDEN_LABELS.get(bad, labels): fn(make(), weight(), y()),
            error=error, name="hidden")
    for bad, (make, error) in BAD_WEIGHT.items():
        add(f"{fname}-{bad}", lambda fn=fn, make=make: fn(hidden(), make(), labels()), error=error, name="weight")
    for bad, (make, error) in {**BAD_LABELS, **BAD_LABEL_VALUES}.items():
        add(f"{fname}-{bad}", lambda fn=fn, make=make: fn(hidden(), weight(), make()), error=error, name="labels")
    add(f"{fname}-label-minus-100-not-ignored",
        lambda fn=fn: fn(hidden(), weight(), with_label(IGNORE_INDEX), ignore_index=-1),
        error=ValueError, name="labels")
    for bad, value in BAD_IGNORE_INDEX.items():
        add(f"{fname}-{bad}", lambda fn=fn, value=value: fn(hidden(), weight(), labels(), ignore_index=value),
            error=TypeError, name="ignore_index")
    if fname == "check_hidden_weight_labels":
        continue
    for bad, (value, error) in BAD_NUM_ITEMS.items():
        add(f"{fname}-{bad}", fn, hidden(), weight(), labels(), num_items_in_batch=value,
            error=error, name="num_items_in_batch")
    if fname in ("checkpointed_chunked_loss", "chunked_causal_lm_loss"):
        for bad, (value, error) in {"0": (0, ValueError), "negative": (-2, ValueError),
                                    "float": (2.0, TypeError), "bool": (True, TypeError),
                                    "str": ("4", TypeError)}.items():
            add(f"{fname}-chunk_size-{bad}", fn, hidden(), weight(), labels(), chunk_size=value,
                error=error, name="chunk_size")
        for bad, (value, error) in {"0": (0, ValueError), "negative": (-8, ValueError),
                                    "float": (4096.0, TypeError), "bool": (True, TypeError),
                                    "str": ("4096", TypeError),
                                    "under-one-row": (4 * V - 1, ValueError)}.items():
            add(f"{fname}-chunk_bytes-{bad}", fn, hidden(), weight(), labels(), chunk_bytes=value,
                error=error, name="chunk_bytes")
        add(f"{fname}-chunk_size-and-chunk_bytes", fn, hidden(), weight(), labels(), chunk_size=2,
            chunk_bytes=4096, error=ValueError, name="chunk_size")
    if fname in ("chunked_causal_lm_loss", "check_hidden_weight_labels"):
        for bad, value in {"int": 1, "str": "yes", "tensor": torch.tensor(True)}.items():
            add(f"{fname}-validate-{bad}", fn, hidden(), weight(), labels(), validate=value,
                error=TypeError, name="validate")

for bad, (args, kwargs, error, name) in {
    "variant-unknown": (("fused", B, T, V, D), {}, ValueError, "variant"),
    "batch-0": (("label_padding", 0, T, V, D), {}, ValueError, "batch"),
    "time-float": (("label_padding", B, 2.0, V, D), {}, TypeError, "time"),
    "hidden_size-None": (("chunked_function", B, T, V, None), {}, TypeError, "hidden_size"),
    "chunk_size-0": (("chunked_function", B, T, V, D), {"chunk_size": 0}, ValueError, "chunk_size"),
    "element_size-str": (("label_padding", B, T, V, D), {"element_size": "4"}, TypeError, "element_size"),
    "element_size-3": (("label_padding", B, T, V, D), {"element_size": 3}, ValueError, "element_size"),
}.items():
    add(f"memory.estimate_peak_bytes-{bad}", memory.estimate_peak_bytes, *args, **kwargs, error=error, name=name)

for bad, (args, kwargs, error, name) in {
    "vocab-0": ((0,), {}, ValueError, "vocab"),
    "vocab-float": ((7.0,), {}, TypeError, "vocab"),
    "dtype-int": ((7, torch.int64), {}, TypeError, "dtype"),
    "dtype-str": ((7, "float32"), {}, TypeError, "dtype"),
}.items():
    add(f"chunked_loss.logits_row_bytes-{bad}", chl.logits_row_bytes, *args, **kwargs,
        error=error, name=name)
for bad, (args, kwargs, error, name) in {
    "vocab-0": ((0, D), {}, ValueError, "vocab"),
    "hidden_size-0": ((V, 0), {}, ValueError, "hidden_size"),
    "hidden_size-None": ((V, None), {}, TypeError, "hidden_size"),
    "dtype-int": ((V, D, torch.int32), {}, TypeError, "dtype"),
    "chunk_bytes-0": ((V, D), {"chunk_bytes": 0}, ValueError, "chunk_bytes"),
    "chunk_bytes-float": ((V, D), {"chunk_bytes": 64.0}, TypeError, "chunk_bytes"),
    "chunk_bytes-under-one-row": ((V, D), {"chunk_bytes": 4 * V - 1}, ValueError, "chunk_bytes"),
}.items():
    add(f"chunked_loss.chunk_rows-{bad}", chl.chunk_rows, *args, **kwargs, error=error, name=name)


def _pass_args(**change):
    flat = hidden().reshape(-1, D)
    args = {"hidden_flat": flat, "weight": weight(), "targets": torch.zeros(flat.shape[0], dtype=torch.long),
            "rows": None, "chunk_size": 2, "inv_denominator": torch.tensor(0.5)}
    args.update(change)
    return args


def _chunk_pass(**change):
    args = _pass_args(**change)
    grad_hidden, weight_sum = args.pop("grad_hidden", None), args.pop("weight_sum", None)
    return chl.chunk_pass(**args, want_loss=True, grad_hidden=grad_hidden, weight_sum=weight_sum)


for bad, (change, error, name) in {
    "hidden_flat-rank3": ({"hidden_flat": hidden()}, ValueError, "hidden_flat"),
    "hidden_flat-numpy": ({"hidden_flat": hidden().reshape(-1, D).numpy()}, TypeError, "hidden_flat"),
    "weight-d-mismatch": ({"weight": weight(d=D + 1)}, ValueError, "weight"),
    "targets-int32": ({"targets": torch.zeros(B * T, dtype=torch.int32)}, TypeError, "targets"),
    "targets-too-few": ({"targets": torch.zeros(3, dtype=torch.long)}, ValueError, "targets"),
    "rows-mismatch": ({"rows": torch.zeros(2, dtype=torch.long)}, ValueError, "rows"),
    "chunk_size-0": ({"chunk_size": 0}, ValueError, "chunk_size"),
    "inv_denominator-None": ({"inv_denominator": None}, ValueError, "inv_denominator"),
    "inv_denominator-1d": ({"inv_denominator": torch.ones(2)}, ValueError, "inv_denominator"),
    "grad_hidden-shape": ({"grad_hidden": torch.zeros(1, D)}, ValueError, "grad_hidden"),
    "weight_sum-dtype": ({"weight_sum": weight().double()}, ValueError, "weight_sum"),
}.items():
    add(f"chunked_loss.chunk_pass-{bad}", lambda change=change: _chunk_pass(**change),
        error=error, name=name)

for bad, (make, error) in BAD_LABELS.items():
    if bad in ("labels-batch-mismatch", "labels-time-mismatch"):
        continue
    add(f"shift_labels_with_padding-{bad}", lambda make=make: clm.shift_labels_with_padding(make()),
        error=error, name="labels")
for bad, value in BAD_IGNORE_INDEX.items():
    add(f"shift_labels_with_padding-{bad}", clm.shift_labels_with_padding, labels(), value,
        error=TypeError, name="ignore_index")


# ---------------------------------------------------------------------------
# cross_entropy: (N, C) scores and (N,) targets
# ---------------------------------------------------------------------------

N, C = 6, 4


def rows(n: int = N, c: int = C, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(3)).to(dtype)


def targets(n: int = N, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return (torch.arange(n) % C).to(dtype)


def with_target(value: int) -> torch.Tensor:
    bad = targets()
    bad[2] = value
    return bad


FLAT_LOSSES: dict[str, tuple[Callable[..., Any], str]] = {
    "cross_entropy.cross_entropy": (ce.cross_entropy, "logits"),
    "cross_entropy.nll_loss": (ce.nll_loss, "log_probs"),
    "experiments.cross_entropy.naive_cross_entropy": (ce_exp.naive_cross_entropy, "logits"),
    "cross_entropy.cross_entropy_grad": (ce.cross_entropy_grad, "logits"),
    "cross_entropy.check_cross_entropy_inputs": (ce.check_cross_entropy_inputs, "logits"),
}

BAD_ROWS = {
    "numpy": (lambda: rows().numpy(), TypeError),
    "None": (lambda: None, TypeError),
    "int": (lambda: rows().long(), TypeError),
    "bool": (lambda: rows() > 0, TypeError),
    "complex": (lambda: rows().to(torch.complex64), TypeError),
    "rank1": (lambda: rows()[0], ValueError),
    "rank3": (lambda: rows()[None], ValueError),
    "C0": (lambda: rows(c=0), ValueError),
    "empty-batch": (lambda: rows(n=0), ValueError),
}
ROWS_TARGETS = {"empty-batch": lambda: targets(n=0)}
BAD_TARGETS = {
    "targets-numpy": (lambda: targets().numpy(), TypeError),
    "targets-float": (lambda: targets().float(), TypeError),
    "targets-bool": (lambda: targets() > 1, TypeError),
    "targets-complex": (lambda: targets().to(torch.complex64), TypeError),
    "targets-rank2": (lambda: targets()[None], ValueError),
    "targets-length-mismatch": (lambda: targets(n=N - 1), ValueError),
    "target-equal-C": (lambda: with_target(C), ValueError),
    "target-minus-1": (lambda: with_target(-1), ValueError),
    "target-int8-out-of-range": (lambda: with_target(-5).to(torch.int8), ValueError),
}

for fname, (fn, scores_name) in FLAT_LOSSES.items():
    for bad, (make, error) in BAD_ROWS.items():
        add(f"{fname}-{scores_name}-{bad}",
            lambda fn=fn, make=make, y=ROWS_TARGETS.get(bad, targets): fn(make(), y()),
            error=error, name=scores_name)
    for bad, (make, error) in BAD_TARGETS.items():
        add(f"{fname}-{bad}", lambda fn=fn, make=make: fn(rows(), make()), error=error, name="targets")
    add(f"{fname}-target-minus-100-not-ignored",
        lambda fn=fn: fn(rows(), with_target(IGNORE_INDEX), ignore_index=-1), error=ValueError, name="targets")
    for bad, value in BAD_IGNORE_INDEX.items():
        add(f"{fname}-{bad}", lambda fn=fn, value=value: fn(rows(), targets(), ignore_index=value),
            error=TypeError, name="ignore_index")
    if fname == "experiments.cross_entropy.naive_cross_entropy":
        continue
    for bad, (value, error) in {
        "weight-numpy": (np.ones(C), TypeError),
        "weight-int": (torch.ones(C, dtype=torch.long), TypeError),
        "weight-rank2": (torch.ones(1, C), ValueError),
        "weight-length": (torch.ones(C + 1), ValueError),
        "weight-dtype-mismatch": (torch.ones(C, dtype=torch.float64), TypeError),
    }.items():
        add(f"{fname}-{bad}", fn, rows(), targets(), weight=value, error=error, name="weight")
    add(f"{fname}-reduction-unknown", fn, rows(), targets(), reduction="avg", error=ValueError, name="reduction")
    add(f"{fname}-reduction-None", fn, rows(), targets(), reduction=None, error=ValueError, name="reduction")
    if fname == "cross_entropy.nll_loss":
        continue
    for bad, (value, error) in {"above-1": (1.5, ValueError), "negative": (-0.1, ValueError),
                                "nan": (math.nan, ValueError), "str": ("0.1", TypeError),
                                "bool": (True, TypeError)}.items():
        add(f"{fname}-label_smoothing-{bad}", fn, rows(), targets(), label_smoothing=value,
            error=error, name="label_smoothing")
add("cross_entropy.cross_entropy_grad-reduction-none", ce.cross_entropy_grad, rows(), targets(),
    reduction="none", error=ValueError, name="reduction")

for fname, fn in {"cross_entropy.log_softmax": ce.log_softmax,
                  "experiments.cross_entropy.naive_log_softmax": ce_exp.naive_log_softmax}.items():
    for bad, (value, error) in {"numpy": (rows().numpy(), TypeError), "int": (rows().long(), TypeError),
                                "bool": (rows() > 0, TypeError), "0-D": (torch.tensor(1.0), ValueError),
                                "C0": (rows(c=0), ValueError)}.items():
        add(f"{fname}-logits-{bad}", fn, value, error=error, name="logits")

for bad, (x, y, error, name) in {
    "logits-numpy": (rows()[None].numpy(), targets()[None].numpy(), TypeError, "logits"),
    "logits-rank2": (rows(), targets()[None], ValueError, "logits"),
    "logits-int": (rows()[None].long(), targets()[None], TypeError, "logits"),
    "logits-C0": (torch.zeros(1, 0, N), targets()[None], ValueError, "logits"),
    "logits-empty-batch": (torch.zeros(0, C, N), torch.zeros(0, N, dtype=torch.long), ValueError, "logits"),
    "targets-float": (rows().T[None], targets()[None].float(), TypeError, "targets"),
    "targets-bool": (rows().T[None], targets()[None] > 0, TypeError, "targets"),
    "targets-shape": (rows().T[None], targets(), ValueError, "targets"),
}.items():
    add(f"cross_entropy.flatten_class_axis-{bad}", ce.flatten_class_axis, x, y, error=error, name=name)

BAD_NATS = {
    "str": ("1.0", TypeError),
    "None": (None, TypeError),
    "bool": (True, TypeError),
    "list": ([1.0], TypeError),
    "negative": (-0.5, ValueError),
    "nan": (math.nan, ValueError),
    "tensor-rank1": (torch.ones(2), ValueError),
    "tensor-int": (torch.tensor(3), TypeError),
}
"""Bad summed losses (nats) for the unit conversions of ``cross_entropy``."""

for bad, (value, error) in BAD_NATS.items():
    add(f"cross_entropy.nats_to_bits-nats-{bad}", ce.nats_to_bits, value, error=error, name="nats")
    add(f"cross_entropy.perplexity-total_nll-{bad}", ce.perplexity, value, 3, error=error, name="total_nll")
    for fname, fn in {"bits_per_character": ce.bits_per_character, "bits_per_byte": ce.bits_per_byte}.items():
        add(f"cross_entropy.{fname}-total_nll-{bad}", fn, value, "text", error=error, name="total_nll")
for bad, (value, error) in {"0": (0, ValueError), "negative": (-2, ValueError), "float": (2.0, TypeError),
                            "bool": (True, TypeError), "None": (None, TypeError),
                            "tensor": (torch.tensor(2), TypeError)}.items():
    add(f"cross_entropy.perplexity-num_targets-{bad}", ce.perplexity, 1.0, value, error=error, name="num_targets")
for fname, fn in {"bits_per_character": ce.bits_per_character, "bits_per_byte": ce.bits_per_byte}.items():
    for bad, (value, error) in {"empty": ("", ValueError), "bytes": (b"text", TypeError),
                                "None": (None, TypeError), "list": (["text"], TypeError)}.items():
        add(f"cross_entropy.{fname}-text-{bad}", fn, 1.0, value, error=error, name="text")

REF = reference.label_smoothed_cross_entropy
for bad, (args, kwargs, error, name) in {
    "logits-rank1": ((np.zeros(4), np.zeros(4, int)), {}, ValueError, "logits"),
    "logits-str": (("abc", np.zeros(1, int)), {}, TypeError, "logits"),
    "logits-empty-batch": ((np.zeros((0, C)), np.zeros(0, int)), {}, ValueError, "logits"),
    "logits-C0": ((np.zeros((N, 0)), np.zeros(N, int)), {}, ValueError, "logits"),
    "targets-float-fraction": ((rows().numpy(), np.full(N, 1.5)), {}, TypeError, "targets"),
    "targets-float-whole": ((rows().numpy(), np.ones(N)), {}, TypeError, "targets"),
    "targets-bool": ((rows().numpy(), np.ones(N, bool)), {}, TypeError, "targets"),
    "targets-length": ((rows().numpy(), np.zeros(N - 1, int)), {}, ValueError, "targets"),
    "target-equal-C": ((rows().numpy(), with_target(C).numpy()), {}, ValueError, "targets"),
    "target-minus-1": ((rows().numpy(), with_target(-1).numpy()), {}, ValueError, "targets"),
    "ignore_index-float": ((rows().numpy(), targets().numpy()), {"ignore_index": -100.0}, TypeError,
                           "ignore_index"),
    "ignore_index-None": ((rows().numpy(), targets().numpy()), {"ignore_index": None}, TypeError,
                          "ignore_index"),
    "weight-length": ((rows().numpy(), targets().numpy()), {"weight": np.ones(C + 1)}, ValueError, "weight"),
    "reduction": ((rows().numpy(), targets().numpy()), {"reduction": "avg"}, ValueError, "reduction"),
    "label_smoothing": ((rows().numpy(), targets().numpy()), {"label_smoothing": 2.0}, ValueError,
                        "label_smoothing"),
}.items():
    add(f"reference.label_smoothed_cross_entropy-{bad}", REF, *args, **kwargs,
        error=error, name=name)

NUMPY_FRAMEWORK_CALLS: dict[str, Callable[..., Any]] = {
    "experiments.cross_entropy.tf_sparse_softmax_cross_entropy": ce_exp.tf_sparse_softmax_cross_entropy,
    "experiments.cross_entropy.keras_sparse_categorical_crossentropy": functools.partial(
        ce_exp.keras_sparse_categorical_crossentropy, from_logits=True),
    "experiments.cross_entropy.run_implementation": functools.partial(
        ce_exp.run_implementation, "torch CrossEntropyLoss"),
    "experiments.cross_entropy.compare_implementations": ce_exp.compare_implementations,
}
for fname, fn in NUMPY_FRAMEWORK_CALLS.items():
    for bad, (x, y, kwargs, error, name) in {
        "logits-list": (rows().tolist(), targets().numpy(), {}, TypeError, "logits"),
        "logits-tensor": (rows(), targets().numpy(), {}, TypeError, "logits"),
        "logits-float16": (rows().numpy().astype(np.float16), targets().numpy(), {}, TypeError, "logits"),
        "logits-int": (rows().long().numpy(), targets().numpy(), {}, TypeError, "logits"),
        "logits-rank1": (rows()[0].numpy(), targets().numpy(), {}, ValueError, "logits"),
        "logits-C0": (rows(c=0).numpy(), targets().numpy(), {}, ValueError, "logits"),
        "logits-empty-batch": (rows(n=0).numpy(), targets(n=0).numpy(), {}, ValueError, "logits"),
        "targets-list": (rows().numpy(), targets().tolist(), {}, TypeError, "targets"),
        "targets-float": (rows().numpy(), targets().float().numpy(), {}, TypeError, "targets"),
        "targets-bool": (rows().numpy(), targets().numpy() > 0, {}, TypeError, "targets"),
        "targets-length": (rows().numpy(), targets(n=N - 1).numpy(), {}, ValueError, "targets"),
        "target-equal-C": (rows().numpy(), with_target(C).numpy(), {}, ValueError, "targets"),
        "target-minus-1": (rows().numpy(), with_target(-1).numpy(), {}, ValueError, "targets"),
        "target-uint8-out-of-range": (rows().numpy(), with_target(9).to(torch.uint8).numpy(), {}, ValueError,
                                      "targets"),
        "ignore_index-float": (rows().numpy(), targets().numpy(), {"ignore_index": -100.0}, TypeError,
                               "ignore_index"),
        "ignore_index-None": (rows().numpy(), targets().numpy(), {"ignore_index": None}, TypeError,
                              "ignore_index"),
    }.items():
        add(f"{fname}-{bad}", fn, x, y, **kwargs, error=error, name=name)
add("experiments.cross_entropy.keras_sparse_categorical_crossentropy-from_logits-int",
    ce_exp.keras_sparse_categorical_crossentropy, rows().numpy(), targets().numpy(), from_logits=1,
    error=TypeError, name="from_logits")
add("experiments.cross_entropy.run_implementation-name-unknown", ce_exp.run_implementation, "torch",
    rows().numpy(), targets().numpy(), error=ValueError, name="name")
add("experiments.cross_entropy.naive_versus_stable_by_scale-scales-rank2", ce_exp.naive_versus_stable_by_scale,
    np.ones((2, 2)), error=ValueError, name="scales")
add("experiments.cross_entropy.naive_versus_stable_by_scale-dtype-int", ce_exp.naive_versus_stable_by_scale,
    [1.0], dtype=torch.int64, error=TypeError, name="dtype")
add("experiments.cross_entropy.naive_versus_stable_by_scale-dtype-str", ce_exp.naive_versus_stable_by_scale,
    [1.0], dtype="float32", error=TypeError, name="dtype")


# ---------------------------------------------------------------------------
# accumulation: lists of sums and counts; experiments.denominator: batches, models
# ---------------------------------------------------------------------------

for fname, fn in {"accumulation.token_mean": acc.token_mean, "accumulation.mean_of_means": acc.mean_of_means}.items():
    for bad, (sums, counts, error, name) in {
        "sums-str": ("ab", [1, 1], TypeError, "sums"),
        "sums-int": (3, [1], TypeError, "sums"),
        "sums-item-str": (["a", 1.0], [1, 1], TypeError, "sums[0]"),
        "sums-item-None": ([1.0, None], [1, 1], TypeError, "sums[1]"),
        "sums-item-bool": ([True], [1], TypeError, "sums[0]"),
        "sums-item-int-tensor": ([torch.tensor(2)], [1], TypeError, "sums[0]"),
        "counts-int": ([1.0], 3, TypeError, "counts"),
        "counts-item-float": ([1.0], [1.5], TypeError, "counts[0]"),
        "counts-item-bool": ([1.0], [True], TypeError, "counts[0]"),
        "counts-item-negative": ([1.0, 2.0], [1, -1], ValueError, "counts[1]"),
        "lengths-differ": ([1.0, 2.0], [1], ValueError, "sums"),
        "no-group": ([], [], ValueError, "sums"),
    }.items():
        add(f"{fname}-{bad}", fn, sums, counts, error=error, name=name)
add("accumulation.token_mean-counts-sum-0", acc.token_mean, [0.0], [0], error=ValueError, name="counts")
add("accumulation.mean_of_means-counts-item-0", acc.mean_of_means, [1.0, 0.0], [2, 0],
    error=ValueError, name="counts[1]")
for bad, (value, error, name) in {
    "weights-str": ("ab", TypeError, "weights"),
    "weights-int": (3, TypeError, "weights"),
    "weights-item-str": (["x", 1.0], TypeError, "weights[0]"),
    "weights-item-None": ([1.0, None], TypeError, "weights[1]"),
    "weights-negative": ([-1.0, 2.0], ValueError, "weights"),
    "weights-all-zero": ([0.0, 0.0], ValueError, "weights"),
    "weights-nan": ([math.nan, 1.0], ValueError, "weights"),
    "weights-length": ([1.0], ValueError, "weights"),
}.items():
    add(f"accumulation.mean_of_means-{bad}", acc.mean_of_means, [1.0, 2.0], [1, 2], value,
        error=error, name=name)
for bad, (value, error, name) in {
    "counts-int": (3, TypeError, "counts"),
    "counts-str": ("12", TypeError, "counts"),
    "counts-item-0": ([2, 0], ValueError, "counts[1]"),
    "counts-item-float": ([1.5], TypeError, "counts[0]"),
    "no-group": ([], ValueError, "counts"),
}.items():
    add(f"accumulation.token_weight_factors-{bad}", acc.token_weight_factors, value, error=error, name=name)

TINY = tm.TinyLMConfig(vocab_size=11, hidden_size=8, num_heads=2, max_length=8)


@functools.lru_cache(maxsize=1)
def tiny_model() -> tm.TinyCausalLM:
    return tm.build_tiny_lm(TINY, seed=0)


def batch(t: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return den.make_counting_batch([t, t - 2], vocab_size=TINY.vocab_size, seed=0, total_length=t)


BAD_BATCHES = {
    "input_ids-float": (lambda: (batch()[0].float(), batch()[1]), TypeError, "input_ids"),
    "input_ids-numpy": (lambda: (batch()[0].numpy(), batch()[1]), TypeError, "input_ids"),
    "input_ids-rank1": (lambda: (batch()[0][0], batch()[1]), ValueError, "input_ids"),
    "input_ids-T1": (lambda: (batch()[0][:, :1], batch()[1][:, :1]), ValueError, "input_ids"),
    "labels-float": (lambda: (batch()[0], batch()[1].float()), TypeError, "labels"),
    "labels-bool": (lambda: (batch()[0], batch()[1] > 0), TypeError, "labels"),
    "labels-shape": (lambda: (batch()[0], batch()[1][:, :-1]), ValueError, "labels"),
    "labels-all-ignored": (lambda: (batch()[0], torch.full_like(batch()[1], IGNORE_INDEX)), ValueError, "labels"),
    "labels-out-of-range": (lambda: (batch()[0], batch()[1].clamp(min=0) + TINY.vocab_size),
                            ValueError, "labels"),
    "input_ids-out-of-range": (lambda: (batch()[0] + TINY.vocab_size, batch()[1]), ValueError, "input_ids"),
    "input_ids-too-long": (lambda: batch(t=TINY.max_length + 1), ValueError, "input_ids"),
}
STEPS: dict[str, Callable[..., Any]] = {
    "experiments.denominator.full_batch_step": lambda ids, lab: den.full_batch_step(tiny_model(), ids, lab),
    "experiments.denominator.accumulation_step": lambda ids, lab: den.accumulation_step(
        tiny_model(), ids, lab, [1, 1], "token_mean"),
    "experiments.denominator.data_parallel_accumulation_step": lambda ids, lab: den.data_parallel_accumulation_step(
        tiny_model(), ids, lab, [[1], [1]], "global"),
}
for fname, fn in STEPS.items():
    for bad, (make, error, name) in BAD_BATCHES.items():
        add(f"{fname}-{bad}", lambda fn=fn, make=make: fn(*make()), error=error, name=name)
for bad, (make, error, name) in BAD_BATCHES.items():
    if name == "input_ids" and bad != "input_ids-T1":  # one token is a valid model input
        add(f"experiments.tiny_models.TinyCausalLM.forward-{bad}", lambda make=make: tiny_model()(make()[0]),
            error=error, name=name)
for fname, fn in {
    "experiments.denominator.full_batch_step": lambda m: den.full_batch_step(m, *batch()),
    "experiments.denominator.accumulation_step": lambda m: den.accumulation_step(m, *batch(), [1, 1], "token_mean"),
    "experiments.denominator.data_parallel_accumulation_step": lambda m: den.data_parallel_accumulation_step(
        m, *batch(), [[1], [1]], "global"),
    "experiments.denominator.naive_error_by_imbalance": lambda m: den.naive_error_by_imbalance(
        m, [1], vocab_size=TINY.vocab_size),
    "experiments.denominator.warm_up": lambda m: den.warm_up(m, steps=1),
}.items():
    add(f"{fname}-model-None", fn, None, error=TypeError, name="model")
    add(f"{fname}-model-function", fn, lambda ids: ids, error=TypeError, name="model")
for bad, (rows_, error, name) in {
    "int": (2, TypeError, "micro_batch_rows"),
    "sum-wrong": ([1, 2], ValueError, "micro_batch_rows"),
    "item-0": ([0, 2], ValueError, "micro_batch_rows[0]"),
    "item-float": ([1.0, 1], TypeError, "micro_batch_rows[0]"),
}.items():
    add(f"experiments.denominator.split_rows-micro_batch_rows-{bad}", lambda r=rows_: den.split_rows(*batch(), r),
        error=error, name=name)
add("experiments.denominator.accumulation_step-reduction", lambda: den.accumulation_step(
    tiny_model(), *batch(), [1, 1], "mean"), error=ValueError, name="reduction")
add("experiments.denominator.data_parallel_accumulation_step-count", lambda: den.data_parallel_accumulation_step(
    tiny_model(), *batch(), [[1], [1]], "local"), error=ValueError, name="count")
for bad, (value, error, name) in {
    "str": ("ab", TypeError, "rank_micro_batch_rows"),
    "empty-rank": ([[2], []], ValueError, "rank_micro_batch_rows[1]"),
    "int-rank": ([[1], 1], ValueError, "rank_micro_batch_rows[1]"),
}.items():
    add(f"experiments.denominator.data_parallel_accumulation_step-rank_micro_batch_rows-{bad}",
        lambda v=value: den.data_parallel_accumulation_step(tiny_model(), *batch(), v, "global"),
        error=error, name=name)
for bad, (x, ref, error, name) in {
    "result-numpy": (np.ones(3), torch.ones(3), TypeError, "result"),
    "reference-list": (torch.ones(3), [1.0, 1.0, 1.0], TypeError, "reference"),
    "result-int": (torch.ones(3, dtype=torch.long), torch.ones(3), TypeError, "result"),
    "reference-bool": (torch.ones(3), torch.ones(3, dtype=torch.bool), TypeError, "reference"),
    "shape-mismatch": (torch.ones(2), torch.ones(3), ValueError, "result"),
    "reference-zero": (torch.ones(3), torch.zeros(3), ValueError, "reference"),
}.items():
    add(f"experiments.denominator.relative_difference-{bad}", den.relative_difference, x, ref, error=error, name=name)
for bad, (args, kwargs, error, name) in {
    "lengths-empty": (([],), {"vocab_size": 5, "seed": 0}, ValueError, "lengths"),
    "lengths-int": ((3,), {"vocab_size": 5, "seed": 0}, ValueError, "lengths"),
    "lengths-item-0": (([2, 0],), {"vocab_size": 5, "seed": 0}, ValueError, "lengths[1]"),
    "lengths-item-float": (([2.0],), {"vocab_size": 5, "seed": 0}, TypeError, "lengths[0]"),
    "vocab_size-2": (([2],), {"vocab_size": 2, "seed": 0}, ValueError, "vocab_size"),
    "vocab_size-float": (([2],), {"vocab_size": 5.0, "seed": 0}, TypeError, "vocab_size"),
    "seed-str": (([2],), {"vocab_size": 5, "seed": "0"}, TypeError, "seed"),
    "seed-float": (([2],), {"vocab_size": 5, "seed": 0.5}, TypeError, "seed"),
    "total_length-short": (([4],), {"vocab_size": 5, "seed": 0, "total_length": 3}, ValueError,
                           "total_length"),
}.items():
    add(f"experiments.denominator.make_counting_batch-{bad}", den.make_counting_batch, *args, **kwargs,
        error=error, name=name)
for bad, (kwargs, error, name) in {
    "token_ratios-int": ({"token_ratios": 3}, TypeError, "token_ratios"),
    "token_ratios-item-0": ({"token_ratios": [2, 0]}, ValueError, "token_ratios[1]"),
    "token_ratios-item-float": ({"token_ratios": [1.5]}, TypeError, "token_ratios[0]"),
    "short_tokens-0": ({"token_ratios": [1], "short_tokens": 0}, ValueError, "short_tokens"),
    "seed-float": ({"token_ratios": [1], "seed": 1.5}, TypeError, "seed"),
}.items():
    add(f"experiments.denominator.naive_error_by_imbalance-{bad}",
        lambda kw=kwargs: den.naive_error_by_imbalance(tiny_model(), vocab_size=TINY.vocab_size, **kw),
        error=error, name=name)
for bad, (kwargs, error, name) in {
    "steps-0": ({"steps": 0}, ValueError, "steps"),
    "rows-float": ({"rows": 2.0}, TypeError, "rows"),
    "longest_row-1": ({"longest_row": 1}, ValueError, "longest_row"),
    "longest_row-too-long": ({"longest_row": TINY.max_length + 1}, ValueError, "longest_row"),
    "learning_rate-str": ({"learning_rate": "0.1"}, TypeError, "learning_rate"),
    "learning_rate-negative": ({"learning_rate": -0.1}, ValueError, "learning_rate"),
    "learning_rate-nan": ({"learning_rate": math.nan}, ValueError, "learning_rate"),
    "seed-None": ({"seed": None}, TypeError, "seed"),
}.items():
    add(f"experiments.denominator.warm_up-{bad}", lambda kw=kwargs: den.warm_up(tiny_model(), **kw), error=error, name=name)


# ---------------------------------------------------------------------------
# batch_check, testing and the command line: batches, models, files
# ---------------------------------------------------------------------------

from companion import batch_check as bchk  # noqa: E402
from companion import testing as ctest  # noqa: E402
from companion.__main__ import main as cli_main  # noqa: E402
from companion.experiments import batch_check as bchk_exp  # noqa: E402


def check_batch_input(**changes: Any) -> dict[str, Any]:
    """The counting batch as a collator returns it, with ``changes`` applied."""
    ids, lab = batch()
    out = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": lab}
    out.update(changes)
    return {key: value for key, value in out.items() if value is not None}


def load_written(write: Callable[[Path], None], name: str = "batch.pt") -> Any:
    """``load_batch`` on a file that ``write`` fills, in a fresh folder."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        write(path)
        return bchk.load_batch(path)


BAD_CHECK_BATCH = {
    "batch-list": ([1, 2], {}, TypeError, "batch"),
    "batch-None": (None, {}, TypeError, "batch"),
    "batch-tensor": (torch.ones(2, 3, dtype=torch.long), {}, TypeError, "batch"),
    "batch-no-input_ids": ({"labels": labels()}, {}, ValueError, "batch"),
    "batch-no-labels": ({"input_ids": labels()}, {}, ValueError, "batch"),
    "input_ids-float": (check_batch_input(input_ids=batch()[0].float()), {}, TypeError, "input_ids"),
    "input_ids-bool": (check_batch_input(input_ids=batch()[0] > 0), {}, TypeError, "input_ids"),
    "input_ids-numpy": (check_batch_input(input_ids=batch()[0].numpy()), {}, TypeError, "input_ids"),
    "input_ids-list": (check_batch_input(input_ids=batch()[0].tolist()), {}, TypeError, "input_ids"),
    "input_ids-rank1": (check_batch_input(input_ids=batch()[0][0]), {}, ValueError, "input_ids"),
    "input_ids-rank3": (check_batch_input(input_ids=batch()[0][None]), {}, ValueError, "input_ids"),
    "input_ids-empty-batch": (check_batch_input(input_ids=batch()[0][:0]), {}, ValueError, "input_ids"),
    "input_ids-T0": (check_batch_input(input_ids=batch()[0][:, :0]), {}, ValueError, "input_ids"),
    "labels-None": (check_batch_input(labels=None) | {"labels": None}, {}, TypeError, "labels"),
    "labels-numpy": (check_batch_input(labels=batch()[1].numpy()), {}, TypeError, "labels"),
    "labels-list": (check_batch_input(labels=batch()[1].tolist()), {}, TypeError, "labels"),
    "attention_mask-float": (check_batch_input(attention_mask=torch.ones(2, 6)), {}, TypeError, "attention_mask"),
    "attention_mask-complex": (check_batch_input(attention_mask=torch.ones(2, 6, dtype=torch.complex64)), {},
                               TypeError, "attention_mask"),
    "attention_mask-shape": (check_batch_input(attention_mask=torch.ones(2, 5, dtype=torch.long)), {},
                             ValueError, "attention_mask"),
    "attention_mask-list": (check_batch_input(attention_mask=[[1] * 6] * 2), {}, TypeError, "attention_mask"),
    "position_ids-shape": (check_batch_input(position_ids=torch.zeros(1, 6, dtype=torch.long)), {},
                           ValueError, "position_ids"),
    "position_ids-float": (check_batch_input(position_ids=torch.zeros(2, 6)), {}, TypeError, "position_ids"),
    "assistant_masks-key-shape": (check_batch_input(assistant_masks=torch.ones(2, 7, dtype=torch.long)), {},
                                  ValueError, "assistant_mask"),
    "assistant_mask-float": (check_batch_input(), {"assistant_mask": torch.ones(2, 6)}, TypeError,
                             "assistant_mask"),
    "assistant_mask-numpy": (check_batch_input(), {"assistant_mask": np.ones((2, 6), int)}, TypeError,
                             "assistant_mask"),
    "pixel_values-list": (check_batch_input(pixel_values=[[0.0]]), {}, TypeError, "pixel_values"),
    "tokenizer-int": (check_batch_input(), {"tokenizer": 3}, TypeError, "tokenizer"),
    "tokenizer-str": (check_batch_input(), {"tokenizer": "gpt2"}, TypeError, "tokenizer"),
    "vocab_size-0": (check_batch_input(), {"vocab_size": 0}, ValueError, "vocab_size"),
    "vocab_size-float": (check_batch_input(), {"vocab_size": 11.0}, TypeError, "vocab_size"),
    "vocab_size-bool": (check_batch_input(), {"vocab_size": True}, TypeError, "vocab_size"),
    "pad_token_id-float": (check_batch_input(), {"pad_token_id": 0.0}, TypeError, "pad_token_id"),
    "pad_token_id-str": (check_batch_input(), {"pad_token_id": "0"}, TypeError, "pad_token_id"),
    "eos_token_id-float": (check_batch_input(), {"eos_token_id": 2.0}, TypeError, "eos_token_id"),
    "eos_token_id-tensor": (check_batch_input(), {"eos_token_id": torch.tensor(2)}, TypeError, "eos_token_id"),
    "placeholder_token_ids-int": (check_batch_input(), {"placeholder_token_ids": 63}, TypeError,
                                  "placeholder_token_ids"),
    "placeholder_token_ids-str": (check_batch_input(), {"placeholder_token_ids": "63"}, TypeError,
                                  "placeholder_token_ids"),
    "placeholder_token_ids-item-float": (check_batch_input(), {"placeholder_token_ids": [63.0]}, TypeError,
                                         "placeholder_token_ids[0]"),
    "micro_batch_size-0": (check_batch_input(), {"micro_batch_size": 0}, ValueError, "micro_batch_size"),
    "micro_batch_size-float": (check_batch_input(), {"micro_batch_size": 1.0}, TypeError, "micro_batch_size"),
    "imbalance_tolerance-str": (check_batch_input(), {"imbalance_tolerance": "0.1"}, TypeError,
                                "imbalance_tolerance"),
    "imbalance_tolerance-negative": (check_batch_input(), {"imbalance_tolerance": -0.1}, ValueError,
                                     "imbalance_tolerance"),
    "imbalance_tolerance-nan": (check_batch_input(), {"imbalance_tolerance": math.nan}, ValueError,
                                "imbalance_tolerance"),
    "max_positions-0": (check_batch_input(), {"max_positions": 0}, ValueError, "max_positions"),
    "max_positions-float": (check_batch_input(), {"max_positions": 8.0}, TypeError, "max_positions"),
    **{f"{bad}": (check_batch_input(), {"ignore_index": value}, TypeError, "ignore_index")
       for bad, value in BAD_IGNORE_INDEX.items()},
}
"""Bad arguments of ``check_batch``: ``(batch, options, error, name)``."""

for bad, (value, options, error, name) in BAD_CHECK_BATCH.items():
    add(f"batch_check.check_batch-{bad}", bchk.check_batch, value, **options, error=error, name=name)
    if bad.startswith(("batch-", "input_ids-", "tokenizer-", "vocab_size-")):
        add(f"testing.assert_batch_ok-{bad}", ctest.assert_batch_ok, value, **options, error=error, name=name)

for bad, (value, options, error, name) in {
    "model-None": (None, {}, TypeError, "model"),
    "model-function": (lambda ids: ids, {}, TypeError, "model"),
    "batch-list": ("model", {"batch": [1]}, TypeError, "batch"),
    "batch-no-labels": ("model", {"batch": {"input_ids": batch()[0]}}, ValueError, "batch"),
    "input_ids-float": ("model", {"batch": check_batch_input(input_ids=batch()[0].double())}, TypeError,
                        "input_ids"),
    "labels-float": ("model", {"batch": check_batch_input(labels=batch()[1].float())}, TypeError, "labels"),
    "labels-rank1": ("model", {"batch": check_batch_input(labels=batch()[1][0])}, ValueError, "labels"),
    "labels-shape": ("model", {"batch": check_batch_input(labels=batch()[1][:, :-1])}, ValueError, "labels"),
    "labels-list": ("model", {"batch": check_batch_input(labels=batch()[1].tolist())}, TypeError, "labels"),
    "labels-all-ignored": ("model", {"batch": check_batch_input(labels=torch.full((2, 6), IGNORE_INDEX))},
                           ValueError, "labels"),
    "micro_batch_size-0": ("model", {"micro_batch_size": 0}, ValueError, "micro_batch_size"),
    "micro_batch_size-float": ("model", {"micro_batch_size": 1.5}, TypeError, "micro_batch_size"),
    "extra_padding-0": ("model", {"extra_padding": 0}, ValueError, "extra_padding"),
    "extra_padding-None": ("model", {"extra_padding": None}, TypeError, "extra_padding"),
    "rtol-0": ("model", {"rtol": 0.0}, ValueError, "rtol"),
    "rtol-negative": ("model", {"rtol": -1e-4}, ValueError, "rtol"),
    "rtol-nan": ("model", {"rtol": math.nan}, ValueError, "rtol"),
    "rtol-str": ("model", {"rtol": "1e-4"}, TypeError, "rtol"),
    "pad_token_id-float": ("model", {"pad_token_id": 0.0}, TypeError, "pad_token_id"),
    "ignore_index-float": ("model", {"ignore_index": -100.0}, TypeError, "ignore_index"),
    "ignore_index-None": ("model", {"ignore_index": None}, TypeError, "ignore_index"),
}.items():
    options = {"batch": check_batch_input(), **options}
    for fname, fn in {"batch_check.check_loss": bchk.check_loss,
                      "testing.assert_loss_batch_invariant": ctest.assert_loss_batch_invariant}.items():
        if fname.startswith("testing") and not bad.startswith(("model-", "batch-", "rtol-")):
            continue
        add(f"{fname}-{bad}",
            lambda fn=fn, value=value, options=options: fn(tiny_model() if value == "model" else value, **options),
            error=error, name=name)

for fname, fn in {"testing.assert_batch_ok": lambda **kw: ctest.assert_batch_ok(check_batch_input(), **kw),
                  "testing.assert_loss_batch_invariant": lambda **kw: ctest.assert_loss_batch_invariant(
                      tiny_model(), check_batch_input(), **kw)}.items():
    for bad, value in {"unknown": "fatal", "upper": "ERROR", "None": None, "int": 2}.items():
        add(f"{fname}-fail_on-{bad}", fn, fail_on=value, error=ValueError, name="fail_on")

for bad, value in {"None": None, "int": 3, "function": len}.items():
    add(f"batch_check.accepts_loss_kwargs-model-{bad}", bchk.accepts_loss_kwargs, value,
        error=TypeError, name="model")

for bad, (args, kwargs, error, name) in {
    "findings-int": ((3,), {}, TypeError, "findings"),
    "findings-str": (("error",), {}, TypeError, "findings"),
    "findings-item-dict": (([{"code": "x"}],), {}, TypeError, "findings[0]"),
    "width-small": (([],), {"width": 10}, ValueError, "width"),
    "width-float": (([],), {"width": 78.0}, TypeError, "width"),
}.items():
    add(f"batch_check.format_findings-{bad}", bchk.format_findings, *args, **kwargs, error=error, name=name)


def _truncated(path: Path) -> None:
    torch.save({"input_ids": labels()}, path)
    path.write_bytes(path.read_bytes()[:80])


for bad, (call, error, name) in {
    "path-None": (lambda: bchk.load_batch(None), TypeError, "path"),
    "path-int": (lambda: bchk.load_batch(3), TypeError, "path"),
    "path-list": (lambda: bchk.load_batch(["batch.pt"]), TypeError, "path"),
    "path-directory": (lambda: bchk.load_batch(Path(__file__).parent), ValueError, "path"),
    "pad_token_id-float": (lambda: bchk.load_batch(__file__, pad_token_id=0.0), TypeError, "pad_token_id"),
    "ignore_index-None": (lambda: bchk.load_batch(__file__, ignore_index=None), TypeError, "ignore_index"),
    "file-empty": (lambda: load_written(lambda p: p.write_bytes(b"")), ValueError, "path"),
    "file-truncated": (lambda: load_written(_truncated), ValueError, "path"),
    "file-runs-code": (lambda: load_written(lambda p: bchk_exp.write_code_running_pickle(p, p.with_suffix(".ran"))),
                       ValueError, "path"),
    "file-non-tensor-value": (lambda: load_written(lambda p: torch.save({"input_ids": [1, 2]}, p)),
                              ValueError, "path"),
    "file-not-a-dict": (lambda: load_written(lambda p: torch.save(labels(), p)), ValueError, "path"),
    "file-json-lines-malformed": (lambda: load_written(lambda p: p.write_text('{"input_ids": [1, 2]}\n{"input'),
                                                       "batch.jsonl"), ValueError, "path"),
    "file-json-lines-floats": (lambda: load_written(lambda p: p.write_text('{"input_ids": [1.5]}\n'),
                                                    "batch.jsonl"), ValueError, "path"),
}.items():
    add(f"batch_check.load_batch-{bad}", call, error=error, name=name)

for bad, value in {"int": 3, "str": "check batch.pt", "items-int": ["check", 3], "bytes": b"check"}.items():
    add(f"__main__.main-argv-{bad}", cli_main, value, error=TypeError, name="argv")

TOKENIZER_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "experiments.batch_check.language_model_batch": bchk_exp.language_model_batch,
    "experiments.batch_check.flattened_batch": bchk_exp.flattened_batch,
}
for fname, fn in TOKENIZER_FUNCTIONS.items():
    for bad, (value, error) in {"str": ("the cat", TypeError), "empty": ([], ValueError),
                                "item-empty": (["a", ""], ValueError), "item-int": ([3], ValueError)}.items():
        add(f"{fname}-texts-{bad}", lambda fn=fn, value=value: fn(bchk_exp.bpe_tokenizer(), value),
            error=error, name="texts")
for bad, (call, error, name) in {
    "bpe_tokenizer-pad_is_eos-int": (lambda: bchk_exp.bpe_tokenizer(pad_is_eos=1), TypeError, "pad_is_eos"),
    "bpe_tokenizer-padding_side-unknown": (lambda: bchk_exp.bpe_tokenizer(padding_side="up"), ValueError,
                                           "padding_side"),
    "flattened_batch-labels_from_input_ids-int": (
        lambda: bchk_exp.flattened_batch(bchk_exp.bpe_tokenizer(), labels_from_input_ids=1), TypeError,
        "labels_from_input_ids"),
    "seq2seq_batch-pairs-str": (lambda: bchk_exp.seq2seq_batch(bchk_exp.bpe_tokenizer(), "ab"), TypeError, "pairs"),
    "seq2seq_batch-label_pad_token_id-float": (
        lambda: bchk_exp.seq2seq_batch(bchk_exp.bpe_tokenizer(), label_pad_token_id=-100.0), TypeError,
        "label_pad_token_id"),
    "chat_batch-conversations-int": (lambda: bchk_exp.chat_batch(bchk_exp.bpe_tokenizer(), 3), TypeError,
                                     "conversations"),
    "chat_batch-use_assistant_mask-str": (
        lambda: bchk_exp.chat_batch(bchk_exp.bpe_tokenizer(), use_assistant_mask="yes"), TypeError,
        "use_assistant_mask"),
    "chat_batch-max_length-0": (lambda: bchk_exp.chat_batch(bchk_exp.bpe_tokenizer(), max_length=0), ValueError,
                                "max_length"),
    "findings_table-cases-int": (lambda: bchk_exp.findings_table(3), TypeError, "cases"),
    "findings_table-cases-item": (lambda: bchk_exp.findings_table([3]), TypeError, "cases[0]"),
    "run_cli-batch-list": (lambda: bchk_exp.run_cli([1]), TypeError, "batch"),
    "run_cli-arguments-str": (lambda: bchk_exp.run_cli({}, "--fail-on"), TypeError, "arguments"),
    "run_cli-file_name-path": (lambda: bchk_exp.run_cli({}, file_name="../x.pt"), ValueError, "file_name"),
    "write_code_running_pickle-path-None": (lambda: bchk_exp.write_code_running_pickle(None, "m"), TypeError,
                                            "path"),
    "write_code_running_pickle-marker-int": (lambda: bchk_exp.write_code_running_pickle("p", 3), TypeError,
                                             "marker"),
    "benchmark_batch-batch-0": (lambda: bchk_exp.benchmark_batch(0, 64), ValueError, "batch"),
    "benchmark_batch-time-short": (lambda: bchk_exp.benchmark_batch(2, 63), ValueError, "time"),
    "benchmark_batch-seed-float": (lambda: bchk_exp.benchmark_batch(2, 64, seed=0.5), TypeError, "seed"),
    "benchmark_results-start-int": (lambda: bchk_exp.benchmark_results(3), TypeError, "start"),
    "MeanLossModel-language_model-linear": (lambda: bchk_exp.MeanLossModel(torch.nn.Linear(2, 2)), TypeError,
                                            "language_model"),
}.items():
    add(f"experiments.batch_check.{bad}", call, error=error, name=name)


# ---------------------------------------------------------------------------
# Keras: the fixed loss and the corpus metrics, called directly
# ---------------------------------------------------------------------------

keras_loss = pytest.importorskip("companion.keras_loss")
km = pytest.importorskip("companion.experiments.keras_masking")
tf = pytest.importorskip("tensorflow")

KERAS_LABELS = np.array([[1, 2, 3, 0], [4, 1, 0, 0]], dtype=np.int32)
KERAS_PROBS = np.full((2, 4, 5), 0.2, dtype=np.float32)


def keras_labels(value: float, dtype: Any = np.int32) -> np.ndarray:
    bad = KERAS_LABELS.astype(dtype)
    bad[0, 1] = value
    return bad


KERAS_OBJECTS: dict[str, Callable[[], Any]] = {
    "MaskedSparseCrossEntropy": keras_loss.MaskedSparseCrossEntropy,
    "LegacyMaskedSparseCrossEntropy": keras_loss.LegacyMaskedSparseCrossEntropy,
    "fixed_loss(keras)": lambda: keras_loss.fixed_loss("keras"),
    "fixed_loss(tf_keras)": lambda: keras_loss.fixed_loss("tf_keras"),
    "CorpusCrossEntropy": keras_loss.CorpusCrossEntropy,
    "CorpusPerplexity": keras_loss.CorpusPerplexity,
    "LegacyCorpusCrossEntropy": keras_loss.LegacyCorpusCrossEntropy,
    "LegacyCorpusPerplexity": keras_loss.LegacyCorpusPerplexity,
    "corpus_metrics(keras)[0]": lambda: keras_loss.corpus_metrics("keras")[0],
    "corpus_metrics(tf_keras)[1]": lambda: keras_loss.corpus_metrics("tf_keras")[1],
}


def keras_call(make: Callable[[], Any], y_true: Any, y_pred: Any, sample_weight: Any = None) -> Any:
    """A loss's ``__call__`` or a metric's ``update_state`` then ``result``."""
    obj = make()
    if hasattr(obj, "update_state"):
        obj.update_state(y_true, y_pred, sample_weight=sample_weight)
        return obj.result()
    return obj(y_true, y_pred, sample_weight=sample_weight)


BAD_KERAS = {
    "y_true-None": (None, KERAS_PROBS, None, TypeError, "y_true"),
    "y_true-str": ("labels", KERAS_PROBS, None, TypeError, "y_true"),
    "y_true-bool": (KERAS_LABELS > 1, KERAS_PROBS, None, TypeError, "y_true"),
    "y_true-complex": (KERAS_LABELS.astype(np.complex64), KERAS_PROBS, None, TypeError, "y_true"),
    "y_true-rank1": (KERAS_LABELS[0], KERAS_PROBS, None, ValueError, "y_true"),
    "y_true-rank3-last-2": (np.stack([KERAS_LABELS] * 2, -1), KERAS_PROBS, None, ValueError, "y_true"),
    "y_true-batch-mismatch": (KERAS_LABELS[:1], KERAS_PROBS, None, ValueError, "y_true"),
    "y_true-time-mismatch": (KERAS_LABELS[:, :3], KERAS_PROBS, None, ValueError, "y_true"),
    "label-equal-C": (keras_labels(5), KERAS_PROBS, None, ValueError, "y_true"),
    "label-minus-1": (keras_labels(-1), KERAS_PROBS, None, ValueError, "y_true"),
    "label-minus-100-not-padding": (keras_labels(-100), KERAS_PROBS, None, ValueError, "y_true"),
    "label-float-fraction": (keras_labels(1.5, np.float32), KERAS_PROBS, None, ValueError, "y_true"),
    "label-float-nan": (keras_labels(math.nan, np.float32), KERAS_PROBS, None, ValueError, "y_true"),
    "label-float-inf": (keras_labels(math.inf, np.float32), KERAS_PROBS, None, ValueError, "y_true"),
    "label-uint8-out-of-range": (keras_labels(200, np.uint8), KERAS_PROBS, None, ValueError, "y_true"),
    "y_pred-None": (KERAS_LABELS, None, None, TypeError, "y_pred"),
    "y_pred-bool": (KERAS_LABELS, KERAS_PROBS > 0, None, TypeError, "y_pred"),
    "y_pred-complex": (KERAS_LABELS, KERAS_PROBS.astype(np.complex64), None, TypeError, "y_pred"),
    "y_pred-rank2": (KERAS_LABELS, KERAS_PROBS[0], None, ValueError, "y_pred"),
    "y_pred-rank4": (KERAS_LABELS, KERAS_PROBS[..., None], None, ValueError, "y_pred"),
    "y_pred-C0": (KERAS_LABELS, KERAS_PROBS[..., :0], None, ValueError, "y_pred"),
    "y_pred-empty-batch": (KERAS_LABELS[:0], KERAS_PROBS[:0], None, ValueError, "y_pred"),
    "sample_weight-str": (KERAS_LABELS, KERAS_PROBS, "w", TypeError, "sample_weight"),
    "sample_weight-bool": (KERAS_LABELS, KERAS_PROBS, KERAS_LABELS > 0, TypeError, "sample_weight"),
    "sample_weight-rank4": (KERAS_LABELS, KERAS_PROBS, np.ones((2, 4, 1, 1)), ValueError, "sample_weight"),
    "sample_weight-rank3-last-2": (KERAS_LABELS, KERAS_PROBS, np.ones((2, 4, 2)), ValueError, "sample_weight"),
    "sample_weight-batch-mismatch": (KERAS_LABELS, KERAS_PROBS, np.ones(3), ValueError, "sample_weight"),
    "sample_weight-time-mismatch": (KERAS_LABELS, KERAS_PROBS, np.ones((2, 3)), ValueError, "sample_weight"),
}
FACTORY_SAMPLE = ("y_true-rank1", "label-equal-C", "label-float-fraction", "y_pred-rank2",
                  "y_pred-bool", "sample_weight-rank4")
"""``fixed_loss`` and ``corpus_metrics`` return the classes above: a sample suffices."""

for oname, make in KERAS_OBJECTS.items():
    # One object per class for the whole table: every bad call raises before
    # a metric's state changes, and building Keras objects is what costs time.
    shared = functools.lru_cache(maxsize=1)(make)
    for bad, (y_true, y_pred, sample_weight, error, name) in BAD_KERAS.items():
        if "(" in oname and bad not in FACTORY_SAMPLE:
            continue
        add(f"keras.{oname}-{bad}", keras_call, shared, y_true, y_pred, sample_weight, error=error, name=name)

for cname, cls in {"MaskedSparseCrossEntropy": keras_loss.MaskedSparseCrossEntropy,
                   "LegacyMaskedSparseCrossEntropy": keras_loss.LegacyMaskedSparseCrossEntropy,
                   "CorpusCrossEntropy": keras_loss.CorpusCrossEntropy,
                   "CorpusPerplexity": keras_loss.CorpusPerplexity,
                   "LegacyCorpusCrossEntropy": keras_loss.LegacyCorpusCrossEntropy,
                   "LegacyCorpusPerplexity": keras_loss.LegacyCorpusPerplexity}.items():
    for bad, (kwargs, error, name) in {
        "padding_id-None": ({"padding_id": None}, TypeError, "padding_id"),
        "padding_id-float": ({"padding_id": 0.0}, TypeError, "padding_id"),
        "padding_id-bool": ({"padding_id": False}, TypeError, "padding_id"),
        "from_logits-int": ({"from_logits": 1}, TypeError, "from_logits"),
        "from_logits-str": ({"from_logits": "yes"}, TypeError, "from_logits"),
    }.items():
        add(f"keras.{cname}()-{bad}", cls, **kwargs, error=error, name=name)
for fname, fn in {"fixed_loss": keras_loss.fixed_loss, "corpus_metrics": keras_loss.corpus_metrics}.items():
    add(f"keras.{fname}-framework-unknown", fn, "pytorch", error=ValueError, name="framework")
    add(f"keras.{fname}-padding_id-float", fn, "keras", 0.5, error=TypeError, name="padding_id")
    add(f"keras.{fname}-padding_id-None", fn, "tf_keras", None, error=TypeError, name="padding_id")
ON_BACKEND_LOGITS = np.zeros((2, 4, 5))
for bad, (args, error, name) in {
    "backend-unknown": (("numpy", KERAS_LABELS, ON_BACKEND_LOGITS), ValueError, "backend"),
    "labels-float": (("torch", KERAS_LABELS.astype(float), ON_BACKEND_LOGITS), TypeError, "labels"),
    "labels-rank1": (("torch", KERAS_LABELS[0], ON_BACKEND_LOGITS), ValueError, "labels"),
    "label-equal-C": (("torch", keras_labels(5), ON_BACKEND_LOGITS), ValueError, "labels"),
    "label-negative": (("torch", keras_labels(-1), ON_BACKEND_LOGITS), ValueError, "labels"),
    "logits-rank2": (("torch", KERAS_LABELS, ON_BACKEND_LOGITS[0]), ValueError, "logits"),
    "logits-shape": (("torch", KERAS_LABELS, ON_BACKEND_LOGITS[:, :3]), ValueError, "logits"),
    "logits-C0": (("torch", KERAS_LABELS, ON_BACKEND_LOGITS[..., :0]), ValueError, "logits"),
    "logits-nan": (("torch", KERAS_LABELS, ON_BACKEND_LOGITS + math.nan), ValueError, "logits"),
    "sample_weight-shape": (("torch", KERAS_LABELS, ON_BACKEND_LOGITS, np.ones((2, 3))), ValueError,
                            "sample_weight"),
}.items():
    add(f"keras.fixed_loss_on_backend-{bad}", km.fixed_loss_on_backend, *args, error=error, name=name)


# ---------------------------------------------------------------------------
# Keras: inside model.fit and model.evaluate (traced train and test steps)
# ---------------------------------------------------------------------------


def keras_fit(framework: str, method: str, y: np.ndarray, metrics_only: bool = False) -> Any:
    """The toy compiled with the fixed loss (or only the corpus metrics)."""
    K = keras_loss.keras_api(framework)
    km.quiet_retracing_warnings()
    model = km.build_toy_model(framework, km.uniform_logits(5))
    # metrics_only: a loss that never reads the labels, so the metrics meet them first
    loss = (lambda y_true, y_pred: tf.reduce_mean(y_pred) * 0.0) if metrics_only else keras_loss.fixed_loss(framework)
    model.compile(optimizer=K.optimizers.SGD(learning_rate=0.0), loss=loss,
                  weighted_metrics=keras_loss.corpus_metrics(framework))
    x = np.array([[1, 2, 3, 0], [4, 1, 0, 0]], dtype=np.int32)
    if method == "fit":
        return model.fit(x, y, epochs=1, verbose=0)
    return model.evaluate(x, y, verbose=0)


GRAPH_ERRORS = (ValueError, tf.errors.InvalidArgumentError)
for framework in keras_loss.FRAMEWORKS:
    for method in ("fit", "evaluate"):
        for bad, y in {
            "label-equal-C": keras_labels(5),
            "label-minus-3": keras_labels(-3),
            "label-float-fraction": keras_labels(1.5, np.float32),
            "y-time-mismatch": KERAS_LABELS[:, :3],
        }.items():
            add(f"keras.{framework}.{method}-fixed_loss-{bad}", keras_fit, framework, method, y,
                error=GRAPH_ERRORS, name="y_true", in_package=False)
        add(f"keras.{framework}.{method}-corpus_metrics-label-equal-C", keras_fit, framework, method,
            keras_labels(7), True, error=GRAPH_ERRORS, name="y_true", in_package=False)


# ---------------------------------------------------------------------------
# The environment check, the device switch and the exercises' grader
# ---------------------------------------------------------------------------

from companion import check_env, device  # noqa: E402
from companion import exercises as grading  # noqa: E402

add("check_env.read_requirements-path-int", check_env.read_requirements, 3, error=TypeError, name="path")
add("check_env.installed_version-name-empty", check_env.installed_version, "", error=TypeError, name="name")
add("check_env.installed_version-name-none", check_env.installed_version, None, error=TypeError, name="name")
add("check_env.check_requirements-lines-range", check_env.check_requirements, ["torch>=2"],
    error=ValueError, name="lines")
add("check_env.check_requirements-lines-unpinned", check_env.check_requirements, ["numpy"],
    error=ValueError, name="lines")
add("check_env.check_environment-root-empty-dir", check_env.check_environment, Path(__file__).parent / "exercises",
    error=ValueError, name="root")
add("device.book_device-environ-int", device.book_device, 3, error=TypeError, name="environ")
add("device.book_device-variable-tpu", device.book_device, {"COMPANION_DEVICE": "tpu"},
    error=ValueError, name="COMPANION_DEVICE")
if not torch.cuda.is_available():
    add("device.book_device-variable-cuda-absent", device.book_device, {"COMPANION_DEVICE": "cuda"},
        error=ValueError, name="COMPANION_DEVICE")
if not torch.backends.mps.is_available():
    add("device.book_device-variable-mps-absent", device.book_device, {"COMPANION_DEVICE": "mps"},
        error=ValueError, name="COMPANION_DEVICE")
add("exercises.grade-label-int", grading.grade, 1, print, error=TypeError, name="label")
add("exercises.grade-label-unknown", grading.grade, "nothing-ex1", print, error=ValueError, name="label")
add("exercises.grade-label-no-number", grading.grade, "shapes-exA", print, error=ValueError, name="label")
add("exercises.grade-function-int", grading.grade, "shapes-ex1", 3, error=TypeError, name="function")
add("exercises.check-function-none", grading.check, "shapes-ex1", None, error=TypeError, name="function")


# ---------------------------------------------------------------------------
# The table's test
# ---------------------------------------------------------------------------


def _names(message: str, name: str, *, first: bool = True) -> bool:
    """Whether ``message`` names ``name``: as its first word, by default."""
    pattern = rf"(?<![\w.]){re.escape(name)}(?!\w)"
    if first:
        pattern = "^" + pattern
    return re.search(pattern, message) is not None


def _raised_by_companion(info: pytest.ExceptionInfo) -> bool:
    return "companion" in Path(str(info.traceback[-1].path)).parts


def test_the_table_covers_every_entry_point_and_input_class():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    print(f"\n{len(CASES)} (function, bad input) cases")
    assert len(CASES) >= 1300
    functions = {case.id.split("-")[0] for case in CASES}
    assert len(functions) >= 70, sorted(functions)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_raises_a_clear_error_naming_the_argument(case: Case):
    with pytest.raises(case.error) as info:
        case.call()
    message = str(info.value)
    assert _names(message, case.name, first=case.in_package), (
        f"message does not name {case.name!r}: {message}")
    if case.in_package:
        assert isinstance(info.value, ValueError | TypeError)
        assert _raised_by_companion(info), f"raised outside the package: {info.traceback[-1]}"


# ---------------------------------------------------------------------------
# The Keras 3 classes on the torch backend (fixed_loss_on_backend's backend)
# ---------------------------------------------------------------------------

_TORCH_BACKEND_SCRIPT = """
import json, math
import numpy as np
from companion import keras_loss

labels = np.array([[1, 2, 0]], np.int32)
logits = np.zeros((1, 3, 4), np.float32)
def bad(value, dtype=np.int32):
    out = labels.astype(dtype)
    out[0, 0] = value
    return out
cases = {
    "ok": (labels, logits, None),
    "float-whole": (labels.astype(np.float32), logits, None),
    "label-float-fraction": (bad(1.5, np.float32), logits, None),
    "label-equal-C": (bad(4), logits, None),
    "label-minus-1": (bad(-1), logits, None),
    "y_true-bool": (labels > 0, logits, None),
    "y_true-time-mismatch": (labels[:, :2], logits, None),
    "y_pred-rank2": (labels, logits[0], None),
    "sample_weight-rank4": (labels, logits, np.ones((1, 3, 1, 1), np.float32)),
}
out = {}
for name, (y, p, w) in cases.items():
    for cls in (keras_loss.MaskedSparseCrossEntropy, keras_loss.CorpusCrossEntropy):
        obj = cls(from_logits=True)
        try:
            if hasattr(obj, "update_state"):
                obj.update_state(y, p, sample_weight=w)
                value = float(obj.result())
            else:
                value = float(obj(y, p, sample_weight=w))
            out[f"{cls.__name__}/{name}"] = ["ok", value]
        except Exception as error:
            out[f"{cls.__name__}/{name}"] = [type(error).__name__, str(error)]
print(json.dumps(out))
"""


def test_keras_checks_work_on_the_torch_backend():
    pytest.importorskip("torch")
    done = subprocess.run(
        [sys.executable, "-c", _TORCH_BACKEND_SCRIPT], capture_output=True, text=True,
        env=dict(os.environ, KERAS_BACKEND="torch"), check=False, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {
        "ok": ("ok", None), "float-whole": ("ok", None),
        "label-float-fraction": ("ValueError", "y_true"), "label-equal-C": ("ValueError", "y_true"),
        "label-minus-1": ("ValueError", "y_true"), "y_true-bool": ("TypeError", "y_true"),
        "y_true-time-mismatch": ("ValueError", "y_true"), "y_pred-rank2": ("ValueError", "y_pred"),
        "sample_weight-rank4": ("ValueError", "sample_weight"),
    }
    for name, (kind, argument) in expected.items():
        for cls in ("MaskedSparseCrossEntropy", "CorpusCrossEntropy"):
            outcome, detail = got[f"{cls}/{name}"]
            assert outcome == kind, (cls, name, detail)
            if argument is None:
                assert detail == pytest.approx(math.log(4.0), abs=1e-6)
            else:
                assert _names(detail, argument), (cls, name, detail)


# ---------------------------------------------------------------------------
# The formulations of one quantity agree on the edge cases that are not errors
# ---------------------------------------------------------------------------


def _from_logits(function: Callable[..., Any], takes_num_items: bool) -> Callable[..., Any]:
    """A hidden-state signature for a loss of logits: logits = hidden @ weight.T."""

    def loss(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if not takes_num_items:
            kwargs.pop("num_items_in_batch", None)
        return function(h @ w.T, y, **kwargs)

    return loss


FORMULATIONS: dict[str, tuple[Callable[..., Any], bool]] = {
    "shift_and_slice_loss": (_from_logits(clm.shift_and_slice_loss, True), True),
    "label_padding_loss": (_from_logits(clm.label_padding_loss, True), True),
    "attention_mask_filter_loss": (
        _from_logits(lambda x, y, **kw: clm.attention_mask_filter_loss(
            x, y, torch.ones(y.shape, dtype=torch.long), **kw), False), False),
    "eager_shift_and_slice_loss": (lm.eager_shift_and_slice_loss, True),
    "eager_label_padding_loss": (lm.eager_label_padding_loss, True),
    "checkpointed_chunked_loss": (functools.partial(chl.checkpointed_chunked_loss, chunk_size=3), True),
    "chunked_causal_lm_loss": (functools.partial(chl.chunked_causal_lm_loss, chunk_size=3), True),
}
"""The seven formulations of the causal-LM loss, all ``(hidden, weight, labels)``;
the flag says whether it takes ``num_items_in_batch``."""

WITH_NUM_ITEMS = [name for name, (_, takes) in FORMULATIONS.items() if takes]


@pytest.mark.parametrize("name", list(FORMULATIONS))
def test_t_equal_1_has_no_pair_nan_and_a_zero_gradient_everywhere(name):
    function, takes_num_items = FORMULATIONS[name]
    h = hidden(t=1).requires_grad_()
    w = weight().requires_grad_()
    loss = function(h, w, labels(t=1))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert math.isnan(loss.item())
    loss.backward()
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))
    if takes_num_items:
        assert function(hidden(t=1), weight(), labels(t=1), num_items_in_batch=3).item() == 0.0


@pytest.mark.parametrize("name", list(FORMULATIONS))
@pytest.mark.parametrize(
    ("dtype", "returned"),
    [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
     (torch.float32, torch.float32), (torch.float64, torch.float64)],
)
def test_every_formulation_returns_the_same_dtype(name, dtype, returned):
    function, _ = FORMULATIONS[name]
    h, w = hidden(dtype=dtype), weight(dtype=dtype)
    loss = function(h, w, labels())
    assert loss.dtype == returned
    exact = FORMULATIONS["label_padding_loss"][0](h.double(), w.double(), labels())
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5 if dtype == torch.float32 else 3e-2
    assert loss.item() == pytest.approx(exact.item(), rel=tolerance)


def test_the_seven_formulations_agree_with_ignored_labels():
    y = labels()
    y[0, 2] = y[1, 4] = IGNORE_INDEX
    values = {name: function(hidden(dtype=torch.float64), weight(dtype=torch.float64), y).item()
              for name, (function, _) in FORMULATIONS.items()}
    first = values["label_padding_loss"]
    assert all(v == pytest.approx(first, rel=1e-12) for v in values.values()), values


INTEGER_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64,
                  torch.uint8, torch.uint16, torch.uint32, torch.uint64]


@pytest.mark.parametrize("name", list(FORMULATIONS))
@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
def test_every_integer_label_dtype_gives_the_int64_answer(name, dtype):
    function, _ = FORMULATIONS[name]
    y = labels()
    if dtype.is_signed:  # -100 fits: keep an ignored label in
        y[1, 2] = IGNORE_INDEX
    h, w = hidden(dtype=torch.float64), weight(dtype=torch.float64)
    assert function(h, w, y.to(dtype)).item() == pytest.approx(function(h, w, y).item(), rel=1e-12)


@pytest.mark.parametrize("dtype", INTEGER_DTYPES, ids=str)
def test_every_integer_dtype_works_in_the_other_entry_points(dtype):
    y = labels()
    x = logits(dtype=torch.float64)
    long_targets = targets()
    expected_ce = ce.cross_entropy(rows(dtype=torch.float64), long_targets)
    assert ce.cross_entropy(rows(dtype=torch.float64), long_targets.to(dtype)).item() == expected_ce.item()
    assert torch.equal(ce.cross_entropy_grad(rows(), long_targets.to(dtype)),
                       ce.cross_entropy_grad(rows(), long_targets))
    assert ce.flatten_class_axis(x.transpose(1, 2), y.to(dtype))[1].dtype == torch.int64
    assert acc.micro_batch_loss(x, y.to(dtype), num_items_in_batch=3).item() == pytest.approx(
        acc.micro_batch_loss(x, y, num_items_in_batch=3).item())
    assert torch.equal(clm.token_losses(x, y.to(dtype)), clm.token_losses(x, y))
    assert clm.unshifted_token_loss(x, y.to(dtype)).item() == pytest.approx(
        clm.unshifted_token_loss(x, y).item())
    assert clm.count_scored_targets(y.to(dtype)) == clm.count_scored_targets(y)
    assert acc.count_items_in_batch([y.to(dtype), y]) == 2 * clm.count_scored_targets(y)
    assert torch.equal(clm.shift_labels_with_padding(y.to(dtype)), clm.shift_labels_with_padding(y))
    ids, _ = batch()
    torch.testing.assert_close(tiny_model()(ids.to(dtype)), tiny_model()(ids))


@pytest.mark.parametrize("name", WITH_NUM_ITEMS)
def test_num_items_in_batch_is_accepted_in_the_same_forms_everywhere(name):
    function, _ = FORMULATIONS[name]
    h, w, y = hidden(dtype=torch.float64), weight(dtype=torch.float64), labels()
    expected = function(h, w, y, num_items_in_batch=7).item()
    for count in (np.int64(7), torch.tensor(7), torch.tensor(7, dtype=torch.int32),
                  torch.tensor(7, dtype=torch.uint8)):
        assert function(h, w, y, num_items_in_batch=count).item() == pytest.approx(expected, rel=1e-12)
    reference_value = FORMULATIONS["label_padding_loss"][0](h, w, y, num_items_in_batch=7).item()
    assert expected == pytest.approx(reference_value, rel=1e-12)


@pytest.mark.parametrize("bad", list(BAD_NUM_ITEMS))
def test_num_items_in_batch_is_rejected_with_one_message_everywhere(bad):
    value, error = BAD_NUM_ITEMS[bad]
    messages = set()
    for name in WITH_NUM_ITEMS:
        function, _ = FORMULATIONS[name]
        with pytest.raises(error, match="num_items_in_batch") as info:
            function(hidden(), weight(), labels(), num_items_in_batch=value)
        messages.add(str(info.value))
    assert len(messages) == 1, messages


@pytest.mark.parametrize("bad", list(BAD_IGNORE_INDEX))
def test_ignore_index_is_rejected_with_one_message_everywhere(bad):
    value = BAD_IGNORE_INDEX[bad]
    messages = set()
    for function, _ in FORMULATIONS.values():
        with pytest.raises(TypeError, match="ignore_index") as info:
            function(hidden(), weight(), labels(), ignore_index=value)
        messages.add(str(info.value))
    assert len(messages) == 1, messages


# ---------------------------------------------------------------------------
# Inputs that were once answered silently
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(FORMULATIONS))
def test_a_float_ignore_index_is_no_longer_silently_accepted(name):
    function, _ = FORMULATIONS[name]
    with pytest.raises(TypeError, match="ignore_index must be an int; got float"):
        function(hidden(), weight(), labels(), ignore_index=-100.0)


@pytest.mark.parametrize("name", WITH_NUM_ITEMS)
def test_a_float_num_items_tensor_is_no_longer_silently_used(name):
    function, _ = FORMULATIONS[name]
    with pytest.raises(TypeError, match="num_items_in_batch must hold integer"):
        function(hidden(), weight(), labels(), num_items_in_batch=torch.tensor(2.5))


@pytest.mark.parametrize("oname", list(KERAS_OBJECTS))
def test_keras_no_longer_truncates_fractional_labels_or_accepts_bool_labels(oname):
    make = KERAS_OBJECTS[oname]
    whole = float(keras_call(make, KERAS_LABELS.astype(np.float32), KERAS_PROBS))
    assert whole == pytest.approx(float(keras_call(make, KERAS_LABELS, KERAS_PROBS)))
    with pytest.raises(ValueError, match="y_true must hold whole-number class ids"):
        keras_call(make, keras_labels(1.5, np.float32), KERAS_PROBS)
    with pytest.raises(TypeError, match="y_true must hold class ids"):
        keras_call(make, KERAS_LABELS > 0, KERAS_PROBS)


@pytest.mark.parametrize("framework", keras_loss.FRAMEWORKS)
def test_keras_fit_accepts_the_float_labels_keras_makes(framework):
    history = keras_fit(framework, "fit", KERAS_LABELS.astype(np.float32))
    assert history.history["loss"][0] == pytest.approx(math.log(5.0), rel=1e-6)
    assert history.history["corpus_ce"][0] == pytest.approx(math.log(5.0), rel=1e-6)


def test_numpy_ints_are_ints_everywhere():
    x, y = logits(dtype=torch.float64), labels()
    assert clm.label_padding_loss(x, y, ignore_index=np.int64(-100), num_items_in_batch=np.int32(4)).item() == \
        pytest.approx(clm.label_padding_loss(x, y, num_items_in_batch=4).item())
    assert keras_loss.MaskedSparseCrossEntropy(padding_id=np.int64(0)).padding_id == 0
