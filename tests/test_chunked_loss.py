"""Tests of companion.chunked_loss.

Values against the float64 NumPy reference
(``companion.reference.causal_lm_loss``) and, for gradients, against
autograd through the library's eager loss,
``companion.causal_lm_loss.label_padding_loss`` of ``hidden @ weight.T``;
the work the chunked Function does, and its errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from torch.utils._python_dispatch import TorchDispatchMode

from companion import reference
from companion.causal_lm_loss import label_padding_loss, shift_labels_with_padding
from companion.chunked_loss import (
    ChunkedLinearCrossEntropy,
    checkpointed_chunked_loss,
    chunk_rows,
    chunked_causal_lm_loss,
    logits_row_bytes,
)
from companion.memory import measure_peak_tensor_bytes
from tests.shared import loss_problems



def eager_label_padding_loss(hidden, weight, labels, **kwargs):
    """The library's eager loss of ``hidden @ weight.T``: the chunked losses' reference."""
    return label_padding_loss(hidden @ weight.T, labels, **kwargs)


CHUNKED_LOSSES = [chunked_causal_lm_loss, checkpointed_chunked_loss]


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


def test_shift_labels_with_padding():
    labels = torch.tensor([[5, 6, 7], [8, -100, 9]])
    expected = torch.tensor([[6, 7, -100], [-100, 9, -100]])
    assert torch.equal(shift_labels_with_padding(labels), expected)
    assert shift_labels_with_padding(labels.int()).dtype == torch.long


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
        value = loss_fn(hidden, weight, labels, chunk_size=6)
    # One (C, d) x (d, V) product per chunk (mm, or matmul under inference_mode), nothing else:
    # the Function chunks the 15 scored rows (6 + 6 + 3), the checkpointed loss all 20 (6+6+6+2).
    chunks = 3 if loss_fn is chunked_causal_lm_loss else 4
    assert sum(counter.counts.values()) == chunks, counter.counts
    assert set(counter.counts) <= {"mm", "matmul"}, counter.counts
    assert value.grad_fn is None and not value.requires_grad
    want = eager_label_padding_loss(hidden.detach(), weight.detach(), labels)
    assert value.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize(
    ("hidden_grad", "weight_grad", "expected"),
    [
        # 15 scored rows in chunks of 6: three chunks; per chunk the logits,
        # the grad of hidden and the grad of weight.
        (True, True, {"mm": 6, "addmm_": 3}),
        (True, False, {"mm": 6}),  # no grad of weight
        (False, True, {"mm": 3, "addmm_": 3}),  # no grad of hidden
        (False, False, {"mm": 3}),  # nothing requires grad: the loss only
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
    targets = shift_labels_with_padding(labels).view(-1).clamp(min=0)  # all 20 rows scored
    inverse = torch.tensor(1 / 20.0)
    loss = ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, 6), weight, targets, None, 6, inverse, False)
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


@pytest.mark.parametrize(
    ("num_items", "error"),
    [(0, ValueError), (-1, ValueError), (2.5, TypeError), (torch.tensor([1, 2]), ValueError)],
)
def test_bad_num_items_in_batch(num_items, error):
    with pytest.raises(error, match="num_items_in_batch"):
        chunked_causal_lm_loss(*_good(), num_items_in_batch=num_items)


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


# --------------------------------------------------------------------------
# The chunk size from a memory budget
# --------------------------------------------------------------------------


def test_chunk_rows_divides_the_budget_by_the_bytes_of_a_row():
    assert logits_row_bytes(1000) == 4000
    assert logits_row_bytes(1000, torch.float64) == 8000
    # bfloat16: a float32 row, a bfloat16 row, and an eighth of both for the weight-gradient slices
    assert logits_row_bytes(1000, torch.bfloat16) == 4000 + 2000 + 750
    assert chunk_rows(1000, 16, chunk_bytes=40_000) == 10
    assert chunk_rows(1000, 16, chunk_bytes=43_999) == 10
    assert chunk_rows(1000, 16, torch.bfloat16, chunk_bytes=67_500) == 10
    # The default: the bytes of the float32 weight gradient, 4 V d: d rows in float32.
    assert chunk_rows(32000, 512) == 512
    assert chunk_rows(128256, 2048) == 2048
    assert chunk_rows(128256, 512, torch.bfloat16) == (4 * 128256 * 512) // (6.75 * 128256)


def test_a_budget_smaller_than_one_row_is_an_error_the_default_is_one_row():
    with pytest.raises(ValueError, match=r"chunk_bytes must hold at least one row of logits, 4000 bytes"):
        chunk_rows(1000, 16, chunk_bytes=3999)
    assert chunk_rows(1000, 16, chunk_bytes=4000) == 1
    assert chunk_rows(10**6, 1) == 1  # a row larger than the default budget: still one row
    with pytest.raises(ValueError, match="chunk_bytes must hold at least one row"):
        chunked_causal_lm_loss(*_good(), chunk_bytes=27)


@pytest.mark.parametrize("loss_fn", CHUNKED_LOSSES, ids=lambda f: f.__name__)
def test_the_loop_takes_as_many_rows_as_the_budget_allows(loss_fn):
    hidden, weight, labels = _counting_problem(True, True)  # V = 13: 52 bytes a row
    labels = labels.clamp(min=0)  # every row scored but the last of each sequence: 18
    with torch.no_grad(), _MatmulCounter() as counter:
        by_budget = loss_fn(hidden, weight, labels, chunk_bytes=5 * 52 + 51)  # 5 rows
    rows = 18 if loss_fn is chunked_causal_lm_loss else 20
    assert sum(counter.counts.values()) == math.ceil(rows / 5)
    by_rows = loss_fn(hidden, weight, labels, chunk_size=5)
    assert by_budget.item() == pytest.approx(by_rows.item(), rel=1e-6)
    with pytest.raises(ValueError, match="chunk_size must be None when chunk_bytes is given"):
        loss_fn(hidden, weight, labels, chunk_size=5, chunk_bytes=400)


# --------------------------------------------------------------------------
# Ignored rows never enter a product
# --------------------------------------------------------------------------


class _ProductRows(TorchDispatchMode):
    """Rows of the (C, d) x (d, V) logits products, summed over the pass."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.rows = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ == "mm" and result.dim() == 2 and result.shape[1] == self.vocab:
            self.rows += result.shape[0]
        return result


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("ignored", ["none", "prompt", "scattered", "all"])
def test_ignored_rows_are_skipped_and_the_result_is_the_eager_one(dtype, ignored):
    torch.manual_seed(12)
    batch, time, hidden_size, vocab = 3, 40, 16, 97
    hidden = torch.randn(batch, time, hidden_size).to(dtype)
    weight = (0.3 * torch.randn(vocab, hidden_size)).to(dtype)
    labels = torch.randint(0, vocab, (batch, time))
    if ignored == "prompt":
        labels[:, :25] = -100  # masked prompts
    elif ignored == "scattered":
        labels[torch.rand(batch, time) < 0.5] = -100
    elif ignored == "all":
        labels[:] = -100
    scored = int((shift_labels_with_padding(labels) != -100).sum())
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _ProductRows(vocab) as products:
        loss = chunked_causal_lm_loss(h, w, labels, chunk_size=16)
        loss.backward()
    assert products.rows == scored  # each scored row once, no ignored row
    wide = torch.float64
    h64, w64 = hidden.to(wide).requires_grad_(), weight.to(wide).requires_grad_()
    want = eager_label_padding_loss(h64, w64, labels)
    want.backward()
    if ignored == "all":
        assert math.isnan(loss.item())
        assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0
        return
    tolerance = 1e-10 if dtype == torch.float64 else 4e-3
    assert _relative_error(loss.detach().double(), want.detach()) <= tolerance
    for got, expected in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert float((got.double() - expected).norm() / expected.norm()) <= tolerance
    unscored = (shift_labels_with_padding(labels) == -100).view(-1)
    assert torch.count_nonzero(h.grad.reshape(-1, hidden_size)[unscored]) == 0


# --------------------------------------------------------------------------
# bfloat16: products in bfloat16, the rest in float32
# --------------------------------------------------------------------------


def _bf16_problem(seed=13, batch=2, time=160, hidden_size=64, vocab=3000):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, time, hidden_size, generator=generator).bfloat16()
    weight = (0.05 * torch.randn(vocab, hidden_size, generator=generator)).bfloat16()
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    labels[1, :50] = -100
    return hidden, weight, labels


@pytest.mark.parametrize("chunk_size", [None, 7, 100])
def test_bfloat16_against_the_float64_reference(chunk_size):
    """The loss within 2e-3; each gradient within bfloat16's unit roundoff (2**-8, norm-wise),
    about the error of storing the exact gradient in bfloat16 at all, and close to eager's."""
    hidden, weight, labels = _bf16_problem()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = chunked_causal_lm_loss(h, w, labels, chunk_size=chunk_size)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits = (h64 @ w64.T).detach().numpy()
    expected = reference.causal_lm_loss(logits, labels.numpy())
    assert abs(loss.item() - expected) / expected <= 2e-3
    eager_label_padding_loss(h64, w64, labels).backward()
    hb, wb = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    from transformers.loss.loss_utils import ForCausalLMLoss

    ForCausalLMLoss(hb @ wb.T, labels, weight.shape[0]).backward()
    for got, eager, exact in ((h.grad, hb.grad, h64.grad), (w.grad, wb.grad, w64.grad)):
        error = float((got.double() - exact).norm() / exact.norm())
        eager_error = float((eager.double() - exact).norm() / exact.norm())
        assert error <= 2.0**-8
        assert error <= 1.5 * eager_error


class _Allocations(TorchDispatchMode):
    """(dtype, shape) of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.made: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                self.made.append((value.dtype, tuple(value.shape)))
        return result


def test_bfloat16_makes_no_float32_copy_of_an_input():
    hidden, weight, labels = _bf16_problem()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with _Allocations() as allocations:
        chunked_causal_lm_loss(h, w, labels, chunk_size=32).backward()
    flat_hidden = (hidden.shape[0] * hidden.shape[1], hidden.shape[2])
    float32 = [shape for dtype, shape in allocations.made if dtype == torch.float32]
    assert flat_hidden not in float32 and tuple(hidden.shape) not in float32
    # One float32 (V, d) tensor: the weight gradient's sum, by design.
    assert float32.count(tuple(weight.shape)) == 1
    # The float32 blocks are (C, V): at most the chunk's rows.
    assert all(shape[0] <= 32 for shape in float32 if len(shape) == 2 and shape[1] == weight.shape[0])


# --------------------------------------------------------------------------
# Accumulation into an existing weight.grad
# --------------------------------------------------------------------------


def _micro_batches(dtype, parts=3, seed=14):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(parts, 2, 30, 8, generator=generator).to(dtype)
    weight = (0.3 * torch.randn(50, 8, generator=generator)).to(dtype)
    labels = torch.randint(0, 50, (parts, 2, 30), generator=generator)
    labels[0, 1, 20:] = -100
    labels[2, :, :10] = -100
    num_items = int(sum((shift_labels_with_padding(y) != -100).sum() for y in labels))
    return hidden, weight, labels, num_items


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_accumulation_into_weight_grad_equals_eager_accumulation(dtype, tolerance):
    hidden, weight, labels, num_items = _micro_batches(dtype)
    chunked_w, eager_w = weight.clone().requires_grad_(), weight.clone().double().requires_grad_()
    for part in range(hidden.shape[0]):
        before = chunked_w.grad
        chunked_causal_lm_loss(hidden[part], chunked_w, labels[part], chunk_size=7,
                               num_items_in_batch=num_items).backward()
        if before is not None:
            assert chunked_w.grad is before  # added in place, not replaced
        eager_label_padding_loss(hidden[part].double(), eager_w, labels[part],
                                 num_items_in_batch=num_items).backward()
        assert _relative_error(chunked_w.grad.double(), eager_w.grad) <= tolerance


def test_accumulation_into_weight_grad_saves_a_weight_sized_tensor():
    from companion.memory import TensorMemoryTracker

    hidden, weight, labels, num_items = _micro_batches(torch.float32)
    w = weight.clone().requires_grad_()
    peaks = []
    for _ in range(2):  # the same micro-batch: first weight.grad is None, then it exists
        with TensorMemoryTracker() as tracker:
            chunked_causal_lm_loss(hidden[0], w, labels[0], chunk_size=7,
                                   num_items_in_batch=num_items).backward()
        peaks.append(tracker.peak_bytes)
    assert peaks[0] - peaks[1] == w.numel() * 4


@pytest.mark.parametrize("case", ["scaled", "retain_graph", "autograd_grad", "set_to_none", "inputs"])
def test_accumulation_in_place_stays_exact_off_the_usual_path(case):
    """g != 1, a second pass, autograd.grad, grad set to None in between, backward(inputs=...)."""
    hidden, weight, labels, _ = _micro_batches(torch.float64)
    grads = {}
    for name, fn, kwargs in (("chunked", chunked_causal_lm_loss, {"chunk_size": 7}),
                             ("eager", eager_label_padding_loss, {})):
        w = weight.clone().requires_grad_()
        h1 = hidden[1].clone().requires_grad_()
        fn(hidden[0], w, labels[0], **kwargs).backward()  # weight.grad now exists
        loss = fn(h1, w, labels[1], **kwargs)
        returned = None
        if case == "scaled":
            (-2.5 * loss).backward()
        elif case == "retain_graph":
            loss.backward(retain_graph=True)
            loss.backward()
        elif case == "autograd_grad":
            returned = torch.autograd.grad(loss, w)[0]
        elif case == "set_to_none":
            w.grad = None  # zero_grad() between the forward and the backward pass
            loss.backward()
        else:
            loss.backward(inputs=[h1])  # weight.grad must not change
        grads[name] = (w.grad, returned, h1.grad)
    for got, want in zip(grads["chunked"], grads["eager"]):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_hooks_and_non_leaf_weights_take_the_ordinary_path():
    hidden, weight, labels, _ = _micro_batches(torch.float64)
    seen = []
    w = weight.clone().requires_grad_()
    w.grad = torch.zeros_like(w)
    w.register_hook(lambda grad: seen.append(grad.clone()))
    chunked_causal_lm_loss(hidden[0], w, labels[0], chunk_size=7).backward()
    e = weight.clone().requires_grad_()
    eager_label_padding_loss(hidden[0], e, labels[0]).backward()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], e.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w.grad, e.grad, rtol=1e-12, atol=1e-14)
    base = weight.clone().requires_grad_()
    base.grad = torch.ones_like(base)
    tied = base * 1.0  # not a leaf: its gradient flows on to base
    chunked_causal_lm_loss(hidden[0], tied, labels[0], chunk_size=7).backward()
    torch.testing.assert_close(base.grad, 1 + e.grad, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------
# What would wait for a GPU: validate=
# --------------------------------------------------------------------------


def test_validate_false_reads_only_the_count_of_scored_rows():
    from companion.experiments.loss_memory import host_reads

    hidden, weight, labels = _counting_problem()
    quiet = host_reads(chunked_causal_lm_loss, hidden, weight, labels, validate=False,
                       num_items_in_batch=torch.tensor(40))
    assert quiet == {"nonzero": 1}
    checked = host_reads(chunked_causal_lm_loss, hidden, weight, labels, validate=True,
                         num_items_in_batch=torch.tensor(40))
    assert checked["nonzero"] == 1 and checked.get("_local_scalar_dense", 0) >= 3
    # The default on CPU tensors is to validate.
    assert host_reads(chunked_causal_lm_loss, hidden, weight, labels) == host_reads(
        chunked_causal_lm_loss, hidden, weight, labels, validate=True)


def test_validate_false_skips_the_label_range_check():
    hidden, weight, labels = _good()
    labels[0, 3] = 7  # V = 7: out of range
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 7\)"):
        chunked_causal_lm_loss(hidden, weight, labels)
    with pytest.raises((IndexError, RuntimeError)):
        chunked_causal_lm_loss(hidden, weight, labels, validate=False)


@pytest.mark.parametrize(("value", "error"), [(1, TypeError), ("yes", TypeError), (None, None)])
def test_validate_must_be_a_bool_or_none(value, error):
    if error is None:
        chunked_causal_lm_loss(*_good(), validate=value)
        return
    with pytest.raises(error, match="validate must be a bool"):
        chunked_causal_lm_loss(*_good(), validate=value)
