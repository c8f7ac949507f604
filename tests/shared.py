"""Hypothesis strategies, tolerances and sample data shared by test modules."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st

from companion import IGNORE_INDEX
from companion.experiments.loss_memory import LOSS_VARIANTS
from companion.experiments.tiny_models import TinyLMConfig


DTYPES = {"float32": (torch.float32, np.float32), "float64": (torch.float64, np.float64)}


# Absolute error allowed per unit of logit magnitude: log-softmax subtracts the
# row maximum, so its rounding error grows with |x|, not with the loss.
EPS = {"float32": 2e-6, "float64": 1e-13}


@st.composite
def cross_entropy_cases(draw, *, with_weight: bool = True, max_scale: float = 1e4):
    """``(logits, targets, weight, ignore_index, dtype_name)`` as NumPy arrays."""
    num_rows = draw(st.integers(1, 9))
    num_classes = draw(st.integers(1, 7))
    dtype_name = draw(st.sampled_from(sorted(DTYPES)))
    scale = draw(st.sampled_from([s for s in (0.1, 1.0, 30.0, 1e3, 1e4) if s <= max_scale]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((num_rows, num_classes))).astype(DTYPES[dtype_name][1])
    ignore_index = draw(st.sampled_from([IGNORE_INDEX, -1, 0]))
    ignore_rate = draw(st.sampled_from([0.0, 0.3, 1.0]))
    targets = rng.integers(0, num_classes, num_rows)
    targets[rng.random(num_rows) < ignore_rate] = ignore_index
    weight = None
    if with_weight and draw(st.booleans()):
        weight = rng.uniform(0.1, 3.0, num_classes).astype(DTYPES[dtype_name][1])
    return logits, targets, weight, ignore_index, dtype_name


def tolerance(logits: np.ndarray, dtype_name: str) -> float:
    return EPS[dtype_name] * (1.0 + float(np.abs(logits).max())) * logits.shape[1]


def as_torch(logits, targets, weight=None):
    w = None if weight is None else torch.from_numpy(weight)
    return torch.from_numpy(logits), torch.from_numpy(targets), w


def assert_close(actual, expected, atol):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol, equal_nan=True)


# ---------------------------------------------------------------------------
# Summed loss and token count against the float64 reference
# ---------------------------------------------------------------------------


@st.composite
def logits_and_labels(draw):
    batch = draw(st.integers(1, 4))
    time = draw(st.integers(2, 7))
    vocab = draw(st.integers(2, 9))
    seed = draw(st.integers(0, 2**16))
    ignore_fraction = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    generator = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, time, vocab, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    drop = torch.rand(batch, time, generator=generator) < ignore_fraction
    return logits, labels.masked_fill(drop, -100)


@st.composite
def loss_problems(draw: st.DrawFn) -> dict:
    """Random sizes, labels with ignored positions (sometimes whole rows), chunk sizes."""
    batch = draw(st.integers(1, 3))
    time = draw(st.integers(1, 11))
    hidden_size = draw(st.integers(1, 9))
    vocab = draw(st.integers(2, 17))
    chunk_size = draw(st.integers(1, batch * time + 3))
    seed = draw(st.integers(0, 2**31 - 1))
    ignore_fraction = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    ignored_row = draw(st.one_of(st.none(), st.integers(0, batch - 1)))
    use_num_items = draw(st.booleans())
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(batch, time, hidden_size))
    weight = rng.normal(size=(vocab, hidden_size))
    labels = rng.integers(0, vocab, size=(batch, time))
    labels[rng.random((batch, time)) < ignore_fraction] = -100
    if ignored_row is not None:
        labels[ignored_row] = -100
    num_items = int(rng.integers(1, 2 * batch * time + 1)) if use_num_items else None
    return {
        "hidden": hidden,
        "weight": weight,
        "labels": labels,
        "chunk_size": chunk_size,
        "num_items": num_items,
    }


# --------------------------------------------------------------------------
# Benchmark results and targets
# --------------------------------------------------------------------------


def benchmark_records(eager_peak, chunked_peak, eager_s=1.0, chunked_s=1.1, time=2048, vocab=32000, status="ok"):
    rows = []
    for variant in LOSS_VARIANTS:
        eager = variant in ("shift_and_slice", "label_padding")
        rows.append(
            {
                "variant": variant,
                "time": time,
                "vocab": vocab,
                "status": status if eager else "ok",
                "peak_bytes": eager_peak if eager else chunked_peak,
                "median_s": eager_s if eager else chunked_s,
            }
        )
    return rows


btv_dims = st.tuples(
    st.integers(min_value=1, max_value=4),
    st.integers(min_value=2, max_value=7),
    st.integers(min_value=1, max_value=9),
)


def make_logits_and_labels(batch: int, time: int, vocab: int, seed: int = 0, ignore_fraction: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, time, vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    ignored = torch.rand(batch, time, generator=generator) < ignore_fraction
    return logits, labels.masked_fill(ignored, IGNORE_INDEX)



TINY_LM_CONFIG = TinyLMConfig(vocab_size=12, hidden_size=16, num_heads=2, max_length=24)
"""Sizes of the tiny model the experiments' tests warm up (``model`` fixture)."""
