"""Tests of companion.chunked_loss, its memory model, and the benchmark script.

The chunked losses are checked against the float64 NumPy reference
(``companion.reference.causal_lm_loss``) and, for gradients, against
autograd through the eager ``F.cross_entropy`` path.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from companion import reference
from companion.chunked_loss import (
    CHUNKED_VARIANTS,
    LOSS_VARIANTS,
    TIME_TARGET,
    ChunkedLinearCrossEntropy,
    TensorMemoryTracker,
    checkpointed_chunked_loss,
    chunked_causal_lm_loss,
    eager_label_padding_loss,
    eager_shift_and_slice_loss,
    estimate_peak_bytes,
    find_results_file,
    measure_peak_tensor_bytes,
    memory_target_report,
    not_run_text,
    shift_labels_with_padding,
    time_target_report,
    was_not_run,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARK = REPO_ROOT / "benchmarks" / "loss_memory.py"
CHUNKED_LOSSES = [chunked_causal_lm_loss, checkpointed_chunked_loss]


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


def _leaves(problem: dict, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = torch.tensor(problem["hidden"], dtype=dtype, requires_grad=True)
    weight = torch.tensor(problem["weight"], dtype=dtype, requires_grad=True)
    labels = torch.tensor(problem["labels"], dtype=torch.long)
    return hidden, weight, labels


def _loss_and_grads(loss_fn, problem: dict, dtype: torch.dtype, **kwargs):
    hidden, weight, labels = _leaves(problem, dtype)
    loss = loss_fn(hidden, weight, labels, num_items_in_batch=problem["num_items"], **kwargs)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want|, the error relative to the tensor's scale."""
    scale = float(want.abs().max()) if want.numel() else 0.0
    error = float((got - want).abs().max()) if want.numel() else 0.0
    return error / scale if scale > 0 else error


# --------------------------------------------------------------------------
# Values and gradients
# --------------------------------------------------------------------------


@pytest.mark.parametrize("loss_fn", CHUNKED_LOSSES, ids=lambda f: f.__name__)
@given(problem=loss_problems())
def test_chunked_loss_matches_float64_reference(loss_fn, problem):
    hidden, weight, labels = _leaves(problem, torch.float64)
    loss = loss_fn(
        hidden, weight, labels, chunk_size=problem["chunk_size"], num_items_in_batch=problem["num_items"]
    )
    logits = problem["hidden"] @ problem["weight"].T
    expected = reference.causal_lm_loss(logits, problem["labels"], num_items_in_batch=problem["num_items"])
    if math.isnan(expected):
        assert math.isnan(loss.item())
    else:
        assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("loss_fn", CHUNKED_LOSSES, ids=lambda f: f.__name__)
@given(problem=loss_problems())
def test_chunked_gradients_match_eager_autograd_in_float64(loss_fn, problem):
    _, want_hidden, want_weight = _loss_and_grads(eager_label_padding_loss, problem, torch.float64)
    _, got_hidden, got_weight = _loss_and_grads(
        loss_fn, problem, torch.float64, chunk_size=problem["chunk_size"]
    )
    torch.testing.assert_close(got_hidden, want_hidden, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_weight, want_weight, rtol=1e-10, atol=1e-12)


@given(problem=loss_problems())
def test_float32_loss_and_gradients_within_1e5_of_eager(problem):
    want = _loss_and_grads(eager_label_padding_loss, problem, torch.float32)
    got = _loss_and_grads(chunked_causal_lm_loss, problem, torch.float32, chunk_size=problem["chunk_size"])
    if math.isnan(want[0].item()):
        assert math.isnan(got[0].item())
    else:
        assert _relative_error(got[0], want[0]) <= 1e-5
    assert _relative_error(got[1], want[1]) <= 1e-5
    assert _relative_error(got[2], want[2]) <= 1e-5


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 100, 1000])
def test_float32_realistic_scale_within_1e5(chunk_size):
    torch.manual_seed(0)
    batch, time, hidden_size, vocab = 2, 100, 32, 500
    problem = {
        "hidden": torch.randn(batch, time, hidden_size).double().numpy(),
        "weight": (0.2 * torch.randn(vocab, hidden_size)).double().numpy(),
        "labels": torch.randint(0, vocab, (batch, time)).numpy(),
        "num_items": None,
    }
    problem["labels"][0, 60:] = -100  # right padding
    problem["labels"][1] = -100  # a row with nothing to score
    want = _loss_and_grads(eager_label_padding_loss, problem, torch.float32)
    got = _loss_and_grads(chunked_causal_lm_loss, problem, torch.float32, chunk_size=chunk_size)
    for got_tensor, want_tensor in zip(got, want):
        assert _relative_error(got_tensor, want_tensor) <= 1e-5
    assert torch.count_nonzero(got[1][1]) == 0  # the unscored row gets no gradient


@given(problem=loss_problems())
def test_shift_and_slice_equals_label_padding(problem):
    hidden, weight, labels = _leaves(problem, torch.float64)
    sliced = eager_shift_and_slice_loss(hidden, weight, labels, num_items_in_batch=problem["num_items"])
    padded = eager_label_padding_loss(hidden, weight, labels, num_items_in_batch=problem["num_items"])
    if math.isnan(padded.item()):
        assert math.isnan(sliced.item())
    else:
        assert sliced.item() == pytest.approx(padded.item(), rel=1e-12)


def test_shift_labels_with_padding():
    labels = torch.tensor([[5, 6, 7], [8, -100, 9]])
    expected = torch.tensor([[6, 7, -100], [-100, 9, -100]])
    assert torch.equal(shift_labels_with_padding(labels), expected)
    assert shift_labels_with_padding(labels.int()).dtype == torch.long


@pytest.mark.parametrize("loss_fn", list(LOSS_VARIANTS.values()), ids=list(LOSS_VARIANTS))
def test_nothing_scored_gives_nan_and_zero_gradients(loss_fn):
    hidden = torch.randn(2, 5, 4, requires_grad=True)
    weight = torch.randn(7, 4, requires_grad=True)
    labels = torch.full((2, 5), -100)
    labels[:, 0] = 3  # the first label is never a target
    loss = loss_fn(hidden, weight, labels)
    loss.backward()
    assert math.isnan(loss.item())
    assert torch.count_nonzero(hidden.grad) == 0
    assert torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize("loss_fn", CHUNKED_LOSSES, ids=lambda f: f.__name__)
def test_num_items_in_batch_divides_the_sum(loss_fn):
    torch.manual_seed(1)
    hidden, weight = torch.randn(2, 6, 4), torch.randn(9, 4)
    labels = torch.randint(0, 9, (2, 6))
    labels[1, 3:] = -100
    scored = int((shift_labels_with_padding(labels) != -100).sum())
    mean = loss_fn(hidden, weight, labels, chunk_size=4)
    for num_items in (25, torch.tensor(25)):
        summed = loss_fn(hidden, weight, labels, chunk_size=4, num_items_in_batch=num_items)
        assert summed.item() == pytest.approx(mean.item() * scored / 25, rel=1e-6)


def test_backward_scales_by_incoming_gradient():
    torch.manual_seed(2)
    problem = {
        "hidden": torch.randn(1, 9, 3).double().numpy(),
        "weight": torch.randn(5, 3).double().numpy(),
        "labels": torch.randint(0, 5, (1, 9)).numpy(),
    }
    hidden, weight, labels = _leaves(problem, torch.float64)
    chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4).backward()
    unit = hidden.grad.clone(), weight.grad.clone()
    hidden.grad, weight.grad = None, None
    (-2.5 * chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4)).backward()
    torch.testing.assert_close(hidden.grad, -2.5 * unit[0])
    torch.testing.assert_close(weight.grad, -2.5 * unit[1])


def test_frozen_weight_and_no_grad():
    torch.manual_seed(3)
    hidden = torch.randn(1, 8, 4, requires_grad=True)
    weight = torch.randn(6, 4)  # frozen output projection
    labels = torch.randint(0, 6, (1, 8))
    chunked_causal_lm_loss(hidden, weight, labels, chunk_size=3).backward()
    assert weight.grad is None
    hidden_ref = hidden.detach().clone().requires_grad_()
    eager_label_padding_loss(hidden_ref, weight, labels).backward()
    torch.testing.assert_close(hidden.grad, hidden_ref.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        value = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=3)
    assert value.grad_fn is None
    assert value.item() == pytest.approx(eager_label_padding_loss(hidden, weight, labels).item(), rel=1e-6)


@pytest.mark.parametrize("loss_fn", CHUNKED_LOSSES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("scale", [1.0, -2.5])
def test_backward_through_retained_graph_accumulates_like_eager(loss_fn, scale):
    """retain_graph=True, then backward again: the same gradient added twice, three times."""
    torch.manual_seed(9)
    hidden = torch.randn(2, 7, 4, dtype=torch.float64)
    weight = torch.randn(9, 4, dtype=torch.float64)
    labels = torch.randint(0, 9, (2, 7))
    labels[1, 4:] = -100
    grads = {}
    for name, fn, kwargs in (("eager", eager_label_padding_loss, {}), ("chunked", loss_fn, {"chunk_size": 3})):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = scale * fn(h, w, labels, **kwargs)
        steps = []
        for retain in (True, True, False):
            loss.backward(retain_graph=retain)
            steps.append((h.grad.clone(), w.grad.clone()))
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            loss.backward()  # freed after the last pass, as eager's
        grads[name] = steps
    for (got_h, got_w), (want_h, want_w) in zip(grads["chunked"], grads["eager"]):
        torch.testing.assert_close(got_h, want_h, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_w, want_w, rtol=1e-10, atol=1e-12)
    first_h, first_w = grads["chunked"][0]
    torch.testing.assert_close(grads["chunked"][2][0], 3 * first_h)
    torch.testing.assert_close(grads["chunked"][2][1], 3 * first_w)


def test_autograd_grad_with_retained_graph_returns_equal_gradients():
    torch.manual_seed(10)
    hidden = torch.randn(1, 6, 3, requires_grad=True)
    weight = torch.randn(5, 3, requires_grad=True)
    labels = torch.randint(0, 5, (1, 6))
    loss = -2.5 * chunked_causal_lm_loss(hidden, weight, labels, chunk_size=4)
    first = torch.autograd.grad(loss, (hidden, weight), retain_graph=True)
    kept = [grad.clone() for grad in first]
    second = torch.autograd.grad(loss, (hidden, weight))
    for got, want in zip(first, kept):  # the second pass did not modify the first's results
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(second, kept):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


class _MatmulCounter(TorchDispatchMode):
    """Counts the matrix products PyTorch runs, by operator name."""

    NAMES = ("mm", "addmm", "addmm_", "bmm", "baddbmm", "matmul", "linear")

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.NAMES:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _counting_problem(hidden_grad: bool = True, weight_grad: bool = True):
    torch.manual_seed(11)
    hidden = torch.randn(2, 10, 6, requires_grad=hidden_grad)  # N = 20 positions
    weight = torch.randn(13, 6, requires_grad=weight_grad)
    labels = torch.randint(0, 13, (2, 10))
    labels[0, 7:] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("loss_fn", CHUNKED_LOSSES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_computes_the_loss_only(loss_fn, mode):
    """An evaluation loop: parameters require grad, grad mode is off; one product per chunk, no gradient."""
    hidden, weight, labels = _counting_problem()
    with mode(), _MatmulCounter() as counter:
        value = loss_fn(hidden, weight, labels, chunk_size=6)  # 4 chunks: 6 + 6 + 6 + 2
    # One (C, d) x (d, V) product per chunk (mm, or matmul under inference_mode), nothing else.
    assert sum(counter.counts.values()) == 4, counter.counts
    assert set(counter.counts) <= {"mm", "matmul"}, counter.counts
    assert value.grad_fn is None and not value.requires_grad
    want = eager_label_padding_loss(hidden.detach(), weight.detach(), labels)
    assert value.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("hidden_grad", "weight_grad", "expected"),
    [
        (True, True, {"mm": 8, "addmm_": 4}),  # logits, grad of hidden, grad of weight per chunk
        (True, False, {"mm": 8}),  # no grad of weight
        (False, True, {"mm": 4, "addmm_": 4}),  # no grad of hidden
        (False, False, {"mm": 4}),  # nothing requires grad: the loss only
    ],
)
def test_forward_computes_only_the_gradients_required(hidden_grad, weight_grad, expected):
    hidden, weight, labels = _counting_problem(hidden_grad, weight_grad)
    with _MatmulCounter() as counter:
        loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=6)
    assert counter.counts == expected
    if not (hidden_grad or weight_grad):
        assert loss.grad_fn is None
        return
    with _MatmulCounter() as counter:
        loss.backward()
    assert counter.counts == {}  # the backward pass only scales
    want_hidden = hidden.detach().clone().requires_grad_(hidden_grad)
    want_weight = weight.detach().clone().requires_grad_(weight_grad)
    eager_label_padding_loss(want_hidden, want_weight, labels).backward()
    for got, want in ((hidden, want_hidden), (weight, want_weight)):
        if got.requires_grad:
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-5, atol=1e-7)
        else:
            assert got.grad is None


def test_function_without_computed_gradients_refuses_backward():
    hidden, weight, labels = _counting_problem()
    targets = shift_labels_with_padding(labels).view(-1)
    loss = ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, 6), weight, targets, 6, -100, 15.0, False)
    with pytest.raises(RuntimeError, match="gradient of hidden was not computed"):
        loss.backward()


def test_bfloat16_inputs_reduce_in_float32():
    torch.manual_seed(4)
    hidden = torch.randn(1, 16, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(11, 8, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 11, (1, 16))
    loss = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=5)
    loss.backward()
    assert loss.dtype == torch.float32
    assert hidden.grad.dtype == weight.grad.dtype == torch.bfloat16
    eager = eager_label_padding_loss(hidden.detach(), weight.detach(), labels)
    assert loss.item() == pytest.approx(eager.item(), rel=1e-2)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def _good():
    return torch.randn(2, 5, 4), torch.randn(7, 4), torch.randint(0, 7, (2, 5))


@pytest.mark.parametrize("loss_fn", list(LOSS_VARIANTS.values()), ids=list(LOSS_VARIANTS))
@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda h, w, y: (h, torch.randn(7, 3), y), ValueError, r"weight must have shape \(V, d\) with d"),
        (lambda h, w, y: (h, w, y[:, :4]), ValueError, r"labels must have shape \(B, T\)"),
        (lambda h, w, y: (h, w, y[0]), ValueError, r"labels must be a 2-D tensor"),
        (lambda h, w, y: (h, w, y.float()), TypeError, r"labels must hold integer"),
        (lambda h, w, y: (h[0], w, y), ValueError, r"hidden must be a 3-D tensor \(B, T, d\)"),
        (lambda h, w, y: (h, w.double(), y), TypeError, r"weight must have hidden's dtype"),
        (lambda h, w, y: (h, w, y + 7), ValueError, r"labels must lie in \[0, 7\)"),
        (lambda h, w, y: (h.numpy(), w, y), TypeError, r"hidden must be a torch.Tensor"),
        (lambda h, w, y: (h[:, :0], w, y[:, :0]), ValueError, r"hidden \(B, T, d\) must have no empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(loss_fn, change, error, message):
    with pytest.raises(error, match=message):
        loss_fn(*change(*_good()))


@pytest.mark.parametrize("variant", sorted(CHUNKED_VARIANTS))
@pytest.mark.parametrize(
    ("chunk_size", "error"), [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)]
)
def test_bad_chunk_size(variant, chunk_size, error):
    with pytest.raises(error, match="chunk_size"):
        LOSS_VARIANTS[variant](*_good(), chunk_size=chunk_size)


@pytest.mark.parametrize(
    ("num_items", "error"),
    [(0, ValueError), (-1, ValueError), (2.5, TypeError), (torch.tensor([1, 2]), ValueError)],
)
def test_bad_num_items_in_batch(num_items, error):
    with pytest.raises(error, match="num_items_in_batch"):
        chunked_causal_lm_loss(*_good(), num_items_in_batch=num_items)


# --------------------------------------------------------------------------
# Memory: the count from first principles against the exact tracker
# --------------------------------------------------------------------------


def test_tracker_counts_live_storage_exactly():
    with TensorMemoryTracker() as tracker:
        first = torch.empty(1000, dtype=torch.float32).fill_(1.0)
        view = first[10:]  # a view: no new memory
        del first, view
        second = torch.ones(300, dtype=torch.float64)
    assert tracker.peak_bytes == 4000
    assert tracker.live_bytes == 2400
    del second


@pytest.mark.parametrize(("batch", "time"), [(1, 256), (2, 128)])
@pytest.mark.parametrize("variant", list(LOSS_VARIANTS))
def test_estimate_matches_tracked_peak(variant, batch, time):
    """The chapter's buffer count (three (B, T, V) tensors for eager, ...) holds in torch 2.13."""
    torch.manual_seed(5)
    hidden_size, vocab, chunk_size = 64, 3000, 64
    hidden = torch.randn(batch, time, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, time))
    kwargs = {"chunk_size": chunk_size} if variant in CHUNKED_VARIANTS else {}
    measured = measure_peak_tensor_bytes(LOSS_VARIANTS[variant], hidden, weight, labels, **kwargs)
    estimate = estimate_peak_bytes(variant, batch, time, vocab, hidden_size, chunk_size=chunk_size)
    assert measured == pytest.approx(estimate, rel=0.03)


def test_eager_peak_is_three_logits_tensors():
    torch.manual_seed(6)
    batch, time, hidden_size, vocab = 1, 200, 16, 5000
    hidden = torch.randn(batch, time, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, time))
    logits_bytes = batch * time * vocab * 4
    peak = measure_peak_tensor_bytes(eager_label_padding_loss, hidden, weight, labels)
    assert 3 * logits_bytes <= peak < 3.01 * logits_bytes


def test_estimate_rejects_unknown_variant_and_bad_sizes():
    with pytest.raises(ValueError, match="variant must be one of"):
        estimate_peak_bytes("fused", 1, 2, 3, 4)
    with pytest.raises(ValueError, match="time must be >= 1"):
        estimate_peak_bytes("label_padding", 1, 0, 3, 4)


# --------------------------------------------------------------------------
# Benchmark results and targets
# --------------------------------------------------------------------------


def _records(eager_peak, chunked_peak, eager_s=1.0, chunked_s=1.1, time=2048, vocab=32000, status="ok"):
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


def test_memory_target_report_verdicts():
    met = memory_target_report(_records(800.0, 200.0))
    verdicts = [row["verdict"] for row in met]
    assert verdicts == ["met", "not measured", "not measured"]
    assert met[0]["ratio"] == pytest.approx(4.0)
    missed = memory_target_report(_records(800.0, 201.0))
    assert missed[0]["verdict"] == "missed"


def _skipped(status: str, **extra) -> list[dict]:
    records = _records(None, 400.0, time=8192, vocab=128256, status=status)
    for record in records:
        if record["status"] != "ok":
            record.update(estimate_bytes=12 * 2**30, **extra)
    return records


def test_memory_target_report_never_judges_an_estimate():
    """An eager run skipped on its estimate gives no ratio and no verdict."""
    records = _skipped(
        "not_run", needed_bytes=13.5 * 2**30, budget_bytes=8 * 2**30
    )
    assert all(was_not_run(r) for r in records if r["status"] != "ok")
    row = memory_target_report(records)[2]
    assert row["verdict"] == "eager not run" and row["ratio"] is None
    assert row["note"] == (
        "eager not run (estimated 13.5 GiB > budget 8.0 GiB)"
    )
    # Older files: status "oom" with "not run" in the detail.
    legacy = _skipped("oom", detail="estimated 13.5 GiB > 8.0 GiB; not run")
    assert memory_target_report(legacy)[2]["verdict"] == "eager not run"
    # An eager run that started and failed to allocate is no estimate.
    ran = _skipped("oom", detail="can't allocate memory")
    row = memory_target_report(ran)[2]
    assert row["verdict"] == "eager out of memory" and row["ratio"] is None


def test_not_run_text_names_the_estimate_and_the_budget():
    record = {"status": "not_run", "estimate_bytes": 2**30}
    assert not_run_text(record) == "not run (estimated 1.0 GiB > budget)"
    record.update(needed_bytes=3 * 2**30, budget_bytes=2 * 2**30)
    assert not_run_text(record) == (
        "not run (estimated 3.0 GiB > budget 2.0 GiB)"
    )


def test_time_target_report_uses_faster_eager():
    records = _records(800.0, 100.0, eager_s=2.0, chunked_s=2.4)
    records[0]["median_s"] = 1.9  # shift_and_slice is the faster eager formulation
    (row,) = time_target_report(records)
    assert row["eager_s"] == 1.9
    assert row["ratio"] == pytest.approx(2.4 / 1.9)
    assert row["verdict"] == ("met" if 2.4 / 1.9 <= TIME_TARGET else "missed") == "missed"


def test_find_results_file_prefers_full_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no benchmark results"):
        find_results_file(tmp_path)
    (tmp_path / "loss_memory_cpu_quick.json").write_text("{}")
    assert find_results_file(tmp_path).name == "loss_memory_cpu_quick.json"
    (tmp_path / "loss_memory_cpu.json").write_text("{}")
    assert find_results_file(tmp_path).name == "loss_memory_cpu.json"


def test_committed_results_file_is_complete():
    payload = json.loads(find_results_file(REPO_ROOT / "benchmarks" / "results").read_text())
    assert {"machine", "libraries", "memory_method", "time_method", "results"} <= set(payload)
    assert payload["libraries"]["torch"].startswith("2.13")
    variants = {record["variant"] for record in payload["results"]}
    assert variants == set(LOSS_VARIANTS)
    for record in payload["results"]:
        if record["status"] == "ok":
            assert record["peak_bytes"] > 0
            assert len(record["times_s"]) >= 3


def _run_benchmark(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(BENCHMARK), *args], capture_output=True, text=True, check=False, timeout=120
    )


def test_benchmark_skips_what_its_estimate_says_cannot_fit(tmp_path):
    completed = _run_benchmark(
        "--quick", "--device", "cpu", "--memory-limit-gib", "0.5",
        "--results-dir", str(tmp_path),
    )
    assert completed.returncode == 0, completed.stderr
    payload = json.loads(
        (tmp_path / "loss_memory_cpu_quick.json").read_text()
    )
    assert {record["status"] for record in payload["results"]} == {"not_run"}
    for record in payload["results"]:
        assert "peak_bytes" not in record  # an estimate, not a measurement
        assert record["needed_bytes"] > record["budget_bytes"]
        assert was_not_run(record)
    assert "[8/8]" in completed.stderr  # progress is shown on stderr
    assert (tmp_path / "loss_memory_cpu_quick.csv").read_text().startswith("variant,")


def test_benchmark_worker_turns_allocation_failure_into_oom():
    completed = _run_benchmark(
        "--worker", "--variant", "label_padding", "--time", "512", "--vocab", "32000",
        "--device", "cpu", "--budget-bytes", str(16 * 2**20),
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.splitlines()[-1])["status"] == "oom"


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def test_plot_peak_memory_draws_one_line_per_variant_and_marks_oom():
    from companion.plots.loss_memory import plot_peak_memory

    records = []
    for vocab in (32000, 128256):
        for time in (512, 2048):
            records += _records(3.0 * time * vocab * 4, 1e8, time=time, vocab=vocab)
    for record in records:
        record["estimate_bytes"] = 1e9
    records[0]["status"] = "oom"
    fig = plot_peak_memory(records)
    axes = fig.axes
    assert len(axes) == 2
    assert fig.get_figwidth() == pytest.approx(6.3)
    assert axes[0].get_yscale() == "log" and axes[0].get_xscale() == "log"
    assert axes[0].get_ylabel() == "peak RSS growth (MiB)"
    assert "tokens" in axes[0].get_xlabel()
    drawn = [line for line in axes[1].get_lines() if line.get_marker() != "x"]
    assert len(drawn) == len(LOSS_VARIANTS)
    (legend,) = fig.legends  # below the panels, for both
    texts = [text.get_text() for text in legend.get_texts()]
    assert len(texts) == len(LOSS_VARIANTS) + 1
    assert "out of memory" in texts[-1]
    assert min(text.get_fontsize() for text in legend.get_texts()) >= 9
    crosses = [line for line in axes[0].get_lines() if line.get_marker() == "x" and len(line.get_xdata())]
    assert len(crosses) == 1


def test_plot_live_memory_timeline_in_logits_units():
    from companion.plots.loss_memory import plot_live_memory_timeline

    fig = plot_live_memory_timeline(
        {"label_padding": [0, 100, 300, 100], "chunked_function": [0, 30]},
        100,
    )
    (ax,) = fig.axes
    assert max(ax.get_lines()[0].get_ydata()) == 3.0
    assert "logits" in ax.get_ylabel()
    with pytest.raises(ValueError, match="logits_bytes"):
        plot_live_memory_timeline({}, 0)


# --------------------------------------------------------------------------
# Same semantics as transformers' ForCausalLMLoss
# --------------------------------------------------------------------------


@pytest.mark.parametrize("num_items", [None, 37])
def test_matches_transformers_for_causal_lm_loss(num_items):
    from transformers.loss.loss_utils import ForCausalLMLoss

    torch.manual_seed(7)
    batch, time, hidden_size, vocab = 3, 40, 16, 250
    hidden = torch.randn(batch, time, hidden_size, requires_grad=True)
    weight = (0.3 * torch.randn(vocab, hidden_size)).requires_grad_()
    labels = torch.randint(0, vocab, (batch, time))
    labels[0, 25:] = -100
    labels[2] = -100
    want = ForCausalLMLoss(hidden @ weight.T, labels, vocab, num_items_in_batch=num_items)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got = chunked_causal_lm_loss(hidden, weight, labels, chunk_size=9, num_items_in_batch=num_items)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    assert _relative_error(got.detach(), want.detach()) <= 1e-5
    for got_grad, want_grad in zip(got_grads, want_grads):
        assert _relative_error(got_grad, want_grad) <= 1e-5


def test_peak_memory_axis_has_labelled_ticks_within_one_decade():
    from companion.plots.loss_memory import plot_peak_memory

    records = _records(700 * 2**20, 120 * 2**20)
    for record in records:
        record["estimate_bytes"] = 1.0
    fig = plot_peak_memory(records)
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    labels = [tick.get_text() for tick in ax.get_yticklabels() if low <= tick.get_position()[1] <= high]
    assert {"100", "200", "500"} <= set(labels)  # a tick below the data
    assert min(t.get_fontsize() for t in ax.get_yticklabels()) >= 9


def test_plot_live_memory_timeline_marks_passes_and_buffers():
    from companion.plots.loss_memory import plot_live_memory_timeline

    # Z; Z and A; A (forward ends); A and dL/dA; all three; G; G and grads.
    eager = [100, 200, 100, 200, 300, 100, 110]
    fig = plot_live_memory_timeline(
        {"label_padding": eager, "chunked_function": [50, 60, 60]},
        100,
        backward_starts={"label_padding": 3, "chunked_function": 2},
    )
    (ax,) = fig.axes
    assert fig.get_figwidth() == pytest.approx(6.3)
    assert ax.get_title()
    texts = {text.get_text() for text in ax.texts}
    assert {"forward", "backward"} <= texts
    assert {"Z", "Z, A", "A", "A, ∂L/∂A", "A, ∂L/∂A, G", "G"} <= texts
    xs = ax.get_lines()[0].get_xdata()
    assert max(xs[:3]) < 0.5 <= min(xs[3:])  # forward left, backward right


def test_backward_scales_in_place_without_allocating():
    """g != 1 costs no second (V, d) or (N, d) tensor."""
    torch.manual_seed(8)
    hidden = torch.randn(1, 64, 16, requires_grad=True)
    weight = torch.randn(500, 16, requires_grad=True)
    labels = torch.randint(0, 500, (1, 64))

    def scaled(*args, **kwargs):
        return -2.5 * chunked_causal_lm_loss(*args, **kwargs)

    unit = measure_peak_tensor_bytes(
        chunked_causal_lm_loss, hidden, weight, labels, chunk_size=16
    )
    unit_grads = hidden.grad.clone(), weight.grad.clone()
    peak = measure_peak_tensor_bytes(
        scaled, hidden, weight, labels, chunk_size=16
    )
    assert peak <= unit + 64  # a few scalars at most
    torch.testing.assert_close(hidden.grad, -2.5 * unit_grads[0])
    torch.testing.assert_close(weight.grad, -2.5 * unit_grads[1])
