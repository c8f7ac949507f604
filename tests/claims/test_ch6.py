"""Claims of chapter 6 (book/06_loss_memory.ipynb), each tested in general.

One test per claim about a library (PyTorch and autograd, transformers,
glibc, Linux, torchtune, Liger Kernel, Cut Cross-Entropy) or about the
mathematics the chapter relies on.  Each docstring quotes the sentence
(shortened) and names its cell.  Tests of claims that hold only in a case
the sentence does not state, or not at all, assert the actual behaviour, so
that they document the corrected claim.

Claims about the benchmark's measured numbers (cells 47-64) come from the
committed results file and are asserted by the chapter's hidden cells; they
are not repeated here.  The peers' sources are read as text from
``.bench-deps`` (torchtune is imported from there, the others are Triton
code that needs a GPU).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from companion.chunked_loss import checkpointed_chunked_loss, chunked_causal_lm_loss
from companion.experiments.loss_memory import (
    eager_label_padding_loss,
    eager_shift_and_slice_loss,
    kept_logits_peaks,
)
from companion.memory import TensorMemoryTracker, measure_peak_tensor_bytes

IGNORE = -100
REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / ".bench-deps"
SITE = Path(torch.__file__).resolve().parents[1]
FEW = settings(max_examples=15, deadline=None)


def _problem(batch, time, hidden, vocab, dtype=torch.float32, seed=0, ignored=()):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, time, hidden, generator=generator, dtype=torch.float64)
    w = 0.1 * torch.randn(vocab, hidden, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, time), generator=generator)
    for row, start in ignored:
        labels[row, start:] = IGNORE
    return (
        h.to(dtype).requires_grad_(),
        w.to(dtype).requires_grad_(),
        labels,
    )


def _source_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _line_of(path: Path, text: str) -> int:
    """1-based line of the first line containing ``text`` (asserts it is there)."""
    for number, line in enumerate(_source_lines(path), 1):
        if text in line:
            return number
    raise AssertionError(f"{text!r} not in {path}")


class _Ops(TorchDispatchMode):
    """Counts the aten operators dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


# --------------------------------------------------------------------------
# Cell 4: one logits tensor
# --------------------------------------------------------------------------


@FEW
@given(
    batch=st.integers(1, 4),
    time=st.integers(1, 9),
    vocab=st.integers(1, 50),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_cell4_logits_bytes(batch, time, vocab, dtype):
    """Cell 4: "A float32 tensor of shape (B, T, V) takes 4 B T V bytes."

    Checked with B = 1, T = 1, T = V, and the other dtypes' sizes.
    """
    logits = torch.empty(batch, time, vocab, dtype=dtype)
    element = {torch.float32: 4, torch.bfloat16: 2, torch.float64: 8}[dtype]
    assert logits.untyped_storage().nbytes() == element * batch * time * vocab
    assert logits.nbytes == element * batch * time * vocab


def test_cell4_llava_default_vocabulary():
    """Cell 4: "the 32000 entries of the vocabulary in transformers' default
    LLaVA configuration"."""
    from transformers import LlamaConfig, LlavaConfig

    assert LlavaConfig().text_config.vocab_size == 32000
    assert LlamaConfig().vocab_size == 32000


# --------------------------------------------------------------------------
# Cell 8: what autograd keeps
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [IGNORE, 0, 7])
def test_cell8_cross_entropy_is_log_softmax_then_nll(dtype, reduction, ignore_index):
    """Cell 8: "`F.cross_entropy` is exactly `log_softmax` followed by
    `nll_loss`."

    Bitwise, value and gradient, for integer class targets without label
    smoothing (torch/nn/functional.py:3555 calls
    ``torch._C._nn.cross_entropy_loss``, whose class-index branch is
    ``nll_loss_nd(log_softmax(self, 1, self.scalar_type()), ...)``).
    """
    torch.manual_seed(0)
    logits = torch.randn(6, 11, dtype=dtype)
    targets = torch.randint(0, 11, (6,))
    targets[1] = ignore_index if ignore_index >= 0 else IGNORE
    targets[4] = ignore_index
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    fused = F.cross_entropy(a, targets, ignore_index=ignore_index, reduction=reduction)
    split = F.nll_loss(
        F.log_softmax(b, dim=-1), targets, ignore_index=ignore_index, reduction=reduction
    )
    assert torch.equal(fused, split) or (fused.isnan().all() and split.isnan().all())
    fused.sum().backward()
    split.sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_cell8_cross_entropy_differs_with_label_smoothing_or_probabilities():
    """Cell 8, where "exactly log_softmax then nll_loss" stops holding:
    with ``label_smoothing > 0`` or probability targets, ``cross_entropy``
    is not ``nll_loss(log_softmax)`` of the class indices."""
    torch.manual_seed(0)
    logits = torch.randn(5, 7)
    targets = torch.randint(0, 7, (5,))
    split = F.nll_loss(F.log_softmax(logits, -1), targets)
    smoothed = F.cross_entropy(logits, targets, label_smoothing=0.1)
    assert not torch.allclose(smoothed, split)
    probabilities = torch.softmax(torch.randn(5, 7), -1)
    soft = F.cross_entropy(logits, probabilities)
    assert torch.allclose(soft, -(probabilities * F.log_softmax(logits, -1)).sum(-1).mean())
    assert not torch.allclose(soft, split)


def _saved_storages(fn):
    """Storages autograd saves while ``fn()`` runs (pack hook), and its output."""
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("batch,time", [(1, 5), (3, 4), (2, 1), (1, 1)])
def test_cell8_matmul_saves_inputs_not_output(batch, time):
    """Cell 8: "the matrix product keeps its *inputs* H and W ..., not its
    output Z"."""
    h, w, _ = _problem(batch, time, 6, 13)
    z, saved = _saved_storages(lambda: h @ w.T)
    ptrs = {t.untyped_storage().data_ptr() for t in saved}
    assert z.untyped_storage().data_ptr() not in ptrs
    assert ptrs == {h.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}
    # Only the input the other's gradient needs is kept when one input
    # does not require grad: W alone requires grad -> only H is saved.
    h_const = h.detach()
    _, saved = _saved_storages(lambda: h_const @ w.T)
    assert {t.untyped_storage().data_ptr() for t in saved} == {
        h_const.untyped_storage().data_ptr()
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cell8_log_softmax_saves_output(dtype):
    """Cell 8: "`log_softmax` keeps its *output* A"."""
    z = torch.randn(4, 9, dtype=dtype, requires_grad=True)
    a, saved = _saved_storages(lambda: F.log_softmax(z, -1))
    assert len(saved) == 1 and saved[0].untyped_storage().data_ptr() == a.untyped_storage().data_ptr()
    assert a.grad_fn._saved_result.data_ptr() == a.data_ptr()


@pytest.mark.parametrize("ignored", [0, 3, 6])
def test_cell8_nll_loss_saves_input_target_total_weight(ignored):
    """Cell 8: "`nll_loss` keeps its input, the targets, and `total_weight`,
    a scalar (the number of scored positions ...).  Its input is A itself"."""
    z = torch.randn(6, 9, requires_grad=True)
    a = F.log_softmax(z, -1)
    targets = torch.randint(0, 9, (6,))
    targets[:ignored] = IGNORE
    loss = F.nll_loss(a, targets)
    node = loss.grad_fn
    assert node._saved_self.data_ptr() == a.data_ptr()
    assert torch.equal(node._saved_target, targets)
    total = node._saved_total_weight
    assert total.dim() == 0 and float(total) == 6 - ignored


def test_cell8_total_weight_is_sum_of_class_weights():
    """Cell 8, where "total_weight = the number of scored positions" stops
    holding: with class weights it is the sum of the targets' weights."""
    a = F.log_softmax(torch.randn(5, 4, requires_grad=True), -1)
    targets = torch.tensor([0, 1, 1, 3, IGNORE])
    weight = torch.tensor([2.0, 0.5, 1.0, 3.0])
    node = F.nll_loss(a, targets, weight=weight).grad_fn
    assert float(node._saved_total_weight) == 2.0 + 0.5 + 0.5 + 3.0 != 4


@FEW
@given(
    rows=st.integers(1, 8),
    vocab=st.integers(1, 12),
    ignored=st.sampled_from(["none", "some", "all_but_one", "all"]),
    num_items=st.one_of(st.none(), st.integers(1, 20)),
)
def test_cell8_nll_backward_is_dense_minus_one_over_d(rows, vocab, ignored, num_items):
    """Cell 8: "`nll_loss`'s backward returns dL/dA, a dense (B, T, V)
    tensor with -1/D at each scored (n, y_n) and zeros elsewhere"."""
    z = torch.randn(rows, vocab, dtype=torch.float64, requires_grad=True)
    a = F.log_softmax(z, -1)
    targets = torch.randint(0, vocab, (rows,))
    if ignored == "some":
        targets[::2] = IGNORE
    elif ignored == "all_but_one":
        targets[1:] = IGNORE
    elif ignored == "all":
        targets[:] = IGNORE
    scored = targets != IGNORE
    grads = []
    a.register_hook(grads.append)
    if num_items is None:
        loss = F.nll_loss(a, targets)
        denominator = int(scored.sum())
    else:
        loss = F.nll_loss(a, targets, reduction="sum") / num_items
        denominator = num_items
    loss.backward()
    (grad,) = grads
    assert grad.shape == a.shape and grad.layout == torch.strided
    expected = torch.zeros_like(a)
    if denominator:
        expected[scored.nonzero().flatten(), targets[scored]] = -1.0 / denominator
    assert torch.equal(grad, expected)


@FEW
@given(rows=st.integers(1, 6), vocab=st.integers(1, 10), seed=st.integers(0, 99))
def test_cell8_log_softmax_backward_formula(rows, vocab, seed):
    """Cell 8: "G_nc = dL/dA_nc - e^{A_nc} sum_c' dL/dA_nc'"."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, dtype=torch.float64, generator=generator, requires_grad=True)
    upstream = torch.randn(rows, vocab, dtype=torch.float64, generator=generator)
    a = F.log_softmax(z, -1)
    (g,) = torch.autograd.grad(a, z, upstream)
    formula = upstream - a.exp() * upstream.sum(-1, keepdim=True)
    assert torch.allclose(g, formula, rtol=1e-12, atol=1e-14)


# Shapes where the logits dominate (V >> d): B = 1, T = 1 (nothing scored),
# B = T, T = V.
PEAK_SHAPES = [(1, 64, 4, 1500), (3, 3, 4, 1500), (2, 40, 4, 1200), (1, 1, 4, 2000), (1, 200, 4, 200)]


@pytest.mark.parametrize("batch,time,hidden,vocab", PEAK_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cell8_eager_peak_is_three_logits(batch, time, hidden, vocab, dtype):
    """Cell 8: "That moment is the peak: **three** logits-sized tensors" and
    "Both eager formulations ... reach the same peak"."""
    h, w, labels = _problem(batch, time, hidden, vocab, dtype, ignored=[(0, time // 2)])
    logits_bytes = batch * time * vocab * h.element_size()
    small = (batch * time * (hidden + 4) + vocab * hidden) * 8 + 256
    pad = measure_peak_tensor_bytes(eager_label_padding_loss, h, w, labels)
    assert 3 * logits_bytes <= pad <= 3 * logits_bytes + small
    sliced = measure_peak_tensor_bytes(eager_shift_and_slice_loss, h, w, labels)
    # T - 1 rows after the slice: 3 (T - 1)/T logits tensors at B = 1,
    # between that and 3 for B > 1 (the fresh zero tensor of the slice's
    # backward is counted in full, but after A and dL/dA are freed).
    sliced_rows = 3 * batch * (time - 1) * vocab * h.element_size()
    assert sliced_rows <= sliced <= max(sliced_rows, logits_bytes) + small + logits_bytes * (batch > 1)
    assert sliced <= 3 * logits_bytes + small


@FEW
@given(time=st.integers(1, 12), vocab=st.integers(1, 12), batch=st.integers(2, 4))
def test_cell8_slice_contiguous_only_at_batch_one(time, vocab, batch):
    """Cell 8: "`logits[..., :-1, :]` is a view and, at B = 1, already
    contiguous, so `.contiguous()` copies nothing"; for B > 1 (and T > 1)
    it copies (the exercise of cell 70)."""
    one = torch.randn(1, time, vocab)
    view = one[..., :-1, :]
    assert view.untyped_storage().data_ptr() == one.untyped_storage().data_ptr()
    assert view.is_contiguous() and view.contiguous().data_ptr() == view.data_ptr()
    many = torch.randn(batch, time, vocab)
    sliced = many[..., :-1, :]
    copies = sliced.contiguous().data_ptr() != sliced.data_ptr()
    assert copies == (time > 1 and vocab > 0)


@pytest.mark.parametrize("batch", [1, 2])
def test_cell8_slice_backward_writes_fresh_full_zero_tensor(batch):
    """Cell 8: "the slice's backward writes G into a fresh zero (B, T, V)
    tensor"."""
    h, w, labels = _problem(batch, 6, 4, 50)
    z = h @ w.T
    grads = []
    z.register_hook(grads.append)
    F.cross_entropy(
        z[..., :-1, :].contiguous().view(-1, 50), labels[..., 1:].reshape(-1)
    ).backward()
    (grad,) = grads
    assert grad.shape == z.shape
    assert torch.equal(grad[:, -1], torch.zeros(batch, 50))
    assert grad.untyped_storage().nbytes() == z.untyped_storage().nbytes()


@pytest.mark.parametrize("batch,time,hidden,vocab", PEAK_SHAPES)
def test_cell12_forward_holds_z_and_a(batch, time, hidden, vocab):
    """Cell 12: "During the forward pass the eager formulations briefly hold
    two logits-sized tensors, Z and A ...; one, A, when the loss is
    returned"."""
    h, w, labels = _problem(batch, time, hidden, vocab)
    logits_bytes = 4 * batch * time * vocab
    slack = 8 * batch * time + 256
    with TensorMemoryTracker() as tracker:
        loss = eager_label_padding_loss(h, w, labels)
    assert 2 * logits_bytes <= tracker.peak_bytes <= 2 * logits_bytes + slack
    assert logits_bytes <= tracker.live_bytes <= logits_bytes + slack
    del loss


@pytest.mark.parametrize("batch,time,chunk", [(1, 64, 16), (2, 17, 5), (1, 1, 1), (3, 8, 64)])
def test_cell12_chunked_backward_allocates_nothing(batch, time, chunk):
    """Cell 12: "The chunked Function computes its gradients in its forward
    pass, so its backward pass allocates nothing (unless the graph is kept
    for a second backward pass)"."""
    h, w, labels = _problem(batch, time, 8, 300, ignored=[(0, time // 2)])
    loss = chunked_causal_lm_loss(h, w, labels, chunk_size=chunk)
    with TensorMemoryTracker() as tracker:
        loss.backward()
    # the 0-d seed gradient that backward() itself creates, nothing else
    assert tracker.peak_bytes <= 4
    h.grad = w.grad = None
    loss = chunked_causal_lm_loss(h, w, labels, chunk_size=chunk)
    with TensorMemoryTracker() as tracker:
        loss.backward(retain_graph=True)
    assert tracker.peak_bytes >= 4 * 300 * 8  # copies are scaled instead


# --------------------------------------------------------------------------
# Cells 16-19: kept logits, bfloat16
# --------------------------------------------------------------------------


def test_cell16_forcausallmloss_upcasts_with_float():
    """Cell 16: "`ForCausalLMLoss` upcasts with `logits.float()`": a copy
    for bfloat16, the same tensor for float32."""
    path = SITE / "transformers" / "loss" / "loss_utils.py"
    line = _line_of(path, "logits = logits.float()")
    assert "def ForCausalLMLoss" in "\n".join(_source_lines(path)[:line])
    z32 = torch.randn(2, 3)
    assert z32.float() is z32
    z16 = z32.bfloat16()
    assert z16.float().data_ptr() != z16.data_ptr()


@pytest.mark.parametrize("batch,time,vocab", [(1, 256, 1000), (2, 64, 1500), (1, 300, 300)])
def test_cell19_kept_logits_peaks(batch, time, vocab):
    """Cells 16/19: kept float32 logits peak at 4 (Z, A, dL/dA, G); kept
    bfloat16 logits hold 2.5 in the forward pass and peak at 3.5: "Computing
    the model in half precision halves only Z"."""
    h, w, labels = _problem(batch, time, 4, vocab, ignored=[(0, time // 3)])
    forward32, peak32 = kept_logits_peaks(h, w, labels, torch.float32)
    forward16, peak16 = kept_logits_peaks(h, w, labels, torch.bfloat16)
    assert 4.0 <= peak32 < 4.02
    assert 2.5 <= forward16 < 2.52
    assert 3.5 <= peak16 < 3.52
    assert 2.0 <= forward32 < 2.02


# --------------------------------------------------------------------------
# Cell 20: the gradient chunk by chunk
# --------------------------------------------------------------------------


@FEW
@given(
    rows=st.integers(1, 7),
    hidden=st.integers(1, 5),
    vocab=st.integers(1, 9),
    num_items=st.one_of(st.none(), st.integers(1, 30)),
    seed=st.integers(0, 99),
)
def test_cell20_softmax_minus_one_hot_and_matmul_gradients(rows, hidden, vocab, num_items, seed):
    """Cell 20: "dl_n/dZ_nc = p_nc - [c = y_n]", rows of G = (p_n - e_yn)/D
    or zero when ignored, "dL/dH = G W", "dL/dW = G^T H = sum_n G_n^T H_n"."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, dtype=torch.float64, generator=generator, requires_grad=True)
    w = torch.randn(vocab, hidden, dtype=torch.float64, generator=generator, requires_grad=True)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::3] = IGNORE
    scored = targets != IGNORE
    denominator = num_items if num_items is not None else int(scored.sum())
    z = h @ w.T
    z.retain_grad()
    loss = F.cross_entropy(z, targets, reduction="sum") / max(denominator, 1)
    loss.backward()
    p = torch.softmax(z.detach(), -1)
    g = torch.zeros_like(p)
    if scored.any():
        onehot = F.one_hot(targets[scored], vocab).double()
        g[scored] = (p[scored] - onehot) / max(denominator, 1)
    assert torch.allclose(z.grad, g, atol=1e-14)
    assert torch.allclose(h.grad, g @ w.detach(), atol=1e-13)
    by_rows = sum(g[n : n + 1].T @ h.detach()[n : n + 1] for n in range(rows))
    assert torch.allclose(w.grad, by_rows, atol=1e-13)


@pytest.mark.parametrize("scale", [1.0, 3.0, -0.5, 0.0])
def test_cell20_backward_receives_single_number_g(scale):
    """Cell 20: "its backward pass receives a single number g (1 for
    `loss.backward()`), and the gradients are g times what the forward pass
    already computed"."""
    seen = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.sum()

        @staticmethod
        def backward(ctx, grad):
            seen.append(grad.clone())
            return grad.expand(3)

    x = torch.ones(3, requires_grad=True)
    (Probe.apply(x) * scale).backward()
    assert seen[0].dim() == 0 and float(seen[0]) == scale
    h, w, labels = _problem(2, 9, 4, 40, dtype=torch.float64)
    chunked_causal_lm_loss(h, w, labels, chunk_size=4).backward()
    unit = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (scale * chunked_causal_lm_loss(h, w, labels, chunk_size=4)).backward()
    assert torch.allclose(h.grad, scale * unit[0], atol=1e-15)
    assert torch.allclose(w.grad, scale * unit[1], atol=1e-15)


@FEW
@given(
    rows=st.integers(1, 12),
    micro=st.integers(1, 4),
    seed=st.integers(0, 99),
)
def test_cell74_accumulation_with_whole_batch_count(rows, micro, seed):
    """Cells 31/74: summing micro-batch gradients, each divided by the
    *whole* batch's scored count, gives the whole batch's gradient."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, 6, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 6, (rows,), generator=generator)
    targets[::2] = IGNORE
    total = max(int((targets != IGNORE).sum()), 1)
    whole = z.clone().requires_grad_()
    (F.cross_entropy(whole, targets, reduction="sum") / total).backward()
    parts = z.clone().requires_grad_()
    for piece in torch.arange(rows).tensor_split(micro):
        (F.cross_entropy(parts[piece], targets[piece], reduction="sum") / total).backward()
    assert torch.allclose(parts.grad, whole.grad, rtol=0, atol=1e-15)
    # ...whereas the mean of micro-batch means does not, unless the counts agree
    counts = [int((targets[p] != IGNORE).sum()) for p in torch.arange(rows).tensor_split(2)]
    if len(set(counts)) > 1 and min(counts) > 0:
        means = z.clone().requires_grad_()
        for piece in torch.arange(rows).tensor_split(2):
            (F.cross_entropy(means[piece], targets[piece]) / 2).backward()
        assert not torch.allclose(means.grad, whole.grad)


# --------------------------------------------------------------------------
# Cell 24: the loop's operators
# --------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_cell24_mm_out_reuses_buffer(rows):
    """Cell 24: "The (M, V) buffer is allocated once and every chunk writes
    into it (`torch.mm(..., out=)`)": no new storage when ``out`` has the
    right shape and dtype (a wrong shape is resized, which allocates)."""
    buffer = torch.empty(16, 30)
    a, b = torch.randn(rows, 8), torch.randn(30, 8)
    before = buffer.data_ptr()
    with TensorMemoryTracker() as tracker:
        torch.mm(a, b.T, out=buffer[:rows])
    assert tracker.peak_bytes == 0 and buffer.data_ptr() == before
    assert torch.allclose(buffer[:rows], a @ b.T)
    wrong = torch.empty(2, 2)
    with pytest.warns(UserWarning, match="resized"):
        torch.mm(a, b.T, out=wrong)  # resized: a new storage
    assert wrong.shape == (rows, 30)


def test_cell24_mm_cannot_write_bfloat16_product_into_float32():
    """Cells 28/58: bfloat16 products are "copied into the float32 block",
    and "a CPU matrix product with bfloat16 inputs and a float32 output ...
    PyTorch offers only on CUDA (`out_dtype=`)": on a CPU both routes fail."""
    a = torch.randn(4, 3, dtype=torch.bfloat16)
    b = torch.randn(3, 5, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError):
        torch.mm(a, b, out=torch.empty(4, 5))
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.mm(a, b, out_dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_cell24_log_softmax_in_place_and_stable(dtype, scale):
    """Cell 24: "`log_softmax` runs in place, one fused pass that subtracts
    the row maximum (the stable log-sum-exp)": ``out=`` its own input
    allocates nothing, and is finite for logits of size 1e4."""
    torch.manual_seed(0)
    block = scale * torch.randn(5, 40, dtype=dtype)
    want = block.double() - torch.logsumexp(block.double(), 1, keepdim=True)
    before = block.data_ptr()
    with TensorMemoryTracker() as tracker, _Ops() as ops:
        torch.log_softmax(block, 1, out=block)
    assert sum(ops.counts.values()) == 1  # one operator, one kernel call
    assert block.data_ptr() == before and tracker.peak_bytes == 0
    assert torch.isfinite(block).all()
    assert torch.allclose(block.double(), want, rtol=1e-5, atol=1e-4 * scale)
    assert torch.allclose(block.exp().sum(1).double(), torch.ones(5, dtype=torch.float64), atol=1e-5)


def test_cell24_once_differentiable_forbids_double_backward():
    """Cell 24: "(The `once_differentiable` decorator says ... that this
    backward pass is not itself differentiated.)"."""
    h, w, labels = _problem(1, 6, 3, 20, dtype=torch.float64)
    loss = chunked_causal_lm_loss(h, w, labels, chunk_size=2)
    # With a plain seed the double-backward graph is simply not built ...
    (grad_h,) = torch.autograd.grad(loss, h, create_graph=True)
    assert not grad_h.requires_grad
    # ... and with a seed that requires grad, differentiating it raises.
    seed = torch.ones((), dtype=torch.float64, requires_grad=True)
    loss = chunked_causal_lm_loss(h, w, labels, chunk_size=2)
    (grad_h,) = torch.autograd.grad(loss, h, seed, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        grad_h.sum().backward()


@pytest.mark.parametrize(
    "loss_fn", [eager_label_padding_loss, chunked_causal_lm_loss], ids=["eager", "chunked"]
)
def test_cell24_retained_graph_second_pass_adds_again(loss_fn):
    """Cell 24: "a second pass adds the same gradients again, as with the
    eager loss" (``retain_graph=True``)."""
    h, w, labels = _problem(2, 7, 3, 25, dtype=torch.float64, ignored=[(1, 3)])
    loss = loss_fn(h, w, labels)
    loss.backward(retain_graph=True)
    once = h.grad.clone(), w.grad.clone()
    loss.backward()
    assert torch.allclose(h.grad, 2 * once[0], atol=1e-15)
    assert torch.allclose(w.grad, 2 * once[1], atol=1e-15)


# --------------------------------------------------------------------------
# Cell 31: bfloat16 rounding and autograd's rules for .grad
# --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.floats(
        min_value=2.0**-120, max_value=2.0**120, allow_nan=False, allow_infinity=False
    ),
    st.booleans(),
)
def test_cell31_bfloat16_unit_roundoff(magnitude, negative):
    """Cell 31: bfloat16's "8-bit significand rounds with a relative error of
    up to 2^-8" (normal range)."""
    x = torch.tensor(-magnitude if negative else magnitude, dtype=torch.float64)
    rounded = x.to(torch.float32).to(torch.bfloat16).double()
    # one rounding via float32 first can only add float32's 2^-24
    assert abs(float(rounded - x)) <= (2.0**-8 + 2.0**-23) * abs(float(x))


def test_cell31_bfloat16_bound_fails_for_subnormals():
    """Cell 31, where "relative error of up to 2^-8" stops holding: below
    bfloat16's smallest normal, 2^-126, the spacing is fixed (2^-133) and
    the relative error grows without bound."""
    x = torch.tensor(1.49 * 2.0**-133, dtype=torch.float32)
    assert float(x) != 0.0
    rounded = float(x.bfloat16().float())
    assert rounded == 2.0**-133
    assert abs(rounded - float(x)) / float(x) > 0.3 > 2.0**-8


def test_cell31_bfloat16_bound_is_attained():
    """Cell 31: the 2^-8 bound is tight: 1 + 2^-8 (a tie) rounds to 1."""
    x = torch.tensor(1 + 2.0**-8, dtype=torch.float32)
    err = abs(float(x.bfloat16().float() - x)) / float(x)
    assert 0.99 * 2.0**-8 < err <= 2.0**-8


def test_cell31_autograd_rules_for_grad():
    """Cell 31: the fast path is safe only for a leaf without hooks whose
    `.grad` autograd would write: "a hook must see the gradient", and
    `torch.autograd.grad` / `backward(inputs=...)` without the weight do
    not write `weight.grad`; AccumulateGrad adds into an existing `.grad`
    in place."""
    w = torch.randn(3, requires_grad=True)
    x = torch.randn(3, requires_grad=True)
    seen = []
    w.register_hook(lambda grad: seen.append(None if grad is None else grad.clone()))
    (w * x).sum().backward()
    assert len(seen) == 1 and torch.equal(seen[0], x.detach())

    class NoneForW(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            return (a * b).sum()

        @staticmethod
        def backward(ctx, grad):
            return None, grad.expand(3)

    before = w.grad.clone()
    NoneForW.apply(w, x).backward()
    # the hook runs, but sees None, not the gradient the weight received
    assert len(seen) == 2 and seen[1] is None and torch.equal(w.grad, before)

    w.grad = torch.zeros(3)
    ptr = w.grad.data_ptr()
    (w * x).sum().backward()
    assert w.grad.data_ptr() == ptr  # accumulated in place
    torch.autograd.grad((w * x).sum(), [w])
    assert torch.equal(w.grad, x.detach())
    x.grad = None
    (w * x).sum().backward(inputs=[x])
    assert torch.equal(w.grad, x.detach()) and x.grad is not None
    non_leaf = w * 2
    with pytest.warns(UserWarning):
        (non_leaf * x).sum().backward()
        assert non_leaf.grad is None


# --------------------------------------------------------------------------
# Cells 34-37: what reads a value on the host
# --------------------------------------------------------------------------


def test_cell34_host_reads_dispatch_local_scalar_dense_and_nonzero():
    """Cell 34: `.item()`, `int()`, `bool()` of a tensor read its value (the
    operator ``_local_scalar_dense``), and `torch.nonzero` has a
    data-dependent size.  (That they *synchronise* on a GPU cannot be seen
    on a CPU.)"""
    t = torch.tensor(3)
    for read in (lambda: t.item(), lambda: int(t), lambda: bool(t), lambda: float(t)):
        with _Ops() as ops:
            read()
        assert ops.counts == {"_local_scalar_dense": 1}
    mask = torch.tensor([True, False, True])
    with _Ops() as ops:
        rows = torch.nonzero(mask)
    assert ops.counts == {"nonzero": 1} and rows.shape == (2, 1)


@pytest.mark.parametrize("num_items", [None, 7, "tensor"])
@pytest.mark.parametrize("ignore_index", [IGNORE, 0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cell37_forcausallmloss_reads_nothing(num_items, ignore_index, dtype):
    """Cell 37: "transformers' `ForCausalLMLoss` does not validate, and
    reads nothing" -- with num_items_in_batch an int or a tensor, any
    ignore_index, bfloat16 logits, and an out-of-range label."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(2, 6, 11, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 3:] = ignore_index
    count = torch.tensor(7) if num_items == "tensor" else num_items
    with _Ops() as ops:
        ForCausalLMLoss(
            logits, labels, 11, num_items_in_batch=count, ignore_index=ignore_index
        ).backward()
    assert "_local_scalar_dense" not in ops.counts and "nonzero" not in ops.counts
    # no validation: an out-of-range *ignored-looking* label is not refused
    # by a check of its own (the error, if any, comes from nll_loss itself)
    bad = labels.clone()
    bad[1, 2] = 50
    with pytest.raises((IndexError, RuntimeError)) as error:
        ForCausalLMLoss(logits.detach(), bad, 11, ignore_index=ignore_index)
    assert "out of bounds" in str(error.value) or "Target" in str(error.value)


# --------------------------------------------------------------------------
# Cells 38-41: activation checkpointing
# --------------------------------------------------------------------------


def test_cell38_checkpoint_keeps_only_inputs_and_recomputes():
    """Cell 38: `checkpoint` "keeps only the chunk's inputs during the
    forward pass and recomputes the chunk when its gradient is needed"."""
    from torch.utils.checkpoint import checkpoint

    calls = []

    def chunk(h, w):
        calls.append(1)
        return F.cross_entropy(h @ w.T, torch.zeros(h.shape[0], dtype=torch.long), reduction="sum")

    h, w, _ = _problem(1, 8, 4, 30)
    hidden = h.view(8, 4)
    loss, saved = _saved_storages(lambda: checkpoint(chunk, hidden, w, use_reentrant=False))
    inputs = {h.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}
    assert {t.untyped_storage().data_ptr() for t in saved} <= inputs
    assert len(calls) == 1
    loss.backward()
    assert len(calls) == 2


@pytest.mark.parametrize("chunk", [3, 8, 64])
def test_cell41_checkpointed_runs_four_products_per_chunk(chunk):
    """Cell 41: "a fourth matrix product per chunk ...: about 4/3 of the
    eager loss's matrix work" (when both H and W require grad)."""
    h, w, labels = _problem(1, 24, 4, 30)
    with _Ops() as eager:
        eager_label_padding_loss(h, w, labels).backward()
    with _Ops() as ckpt:
        checkpointed_chunked_loss(h, w, labels, chunk_size=chunk).backward()
    chunks = -(-24 // chunk)
    eager_products = sum(eager.counts.get(k, 0) for k in ("mm", "bmm"))
    ckpt_products = sum(ckpt.counts.get(k, 0) for k in ("mm", "bmm"))
    assert eager_products == 3
    assert ckpt_products == 4 * chunks


def test_cell41_products_when_hidden_needs_no_gradient():
    """Cell 41, where "about 4/3 of the eager loss's matrix work" stops
    holding: if only W requires grad, eager runs 2 products and the
    checkpointed loss 3 per chunk, 3/2."""
    h, w, labels = _problem(1, 24, 4, 30)
    h = h.detach()
    with _Ops() as eager:
        eager_label_padding_loss(h, w, labels).backward()
    with _Ops() as ckpt:
        checkpointed_chunked_loss(h, w, labels, chunk_size=24).backward()
    assert sum(eager.counts.get(k, 0) for k in ("mm", "bmm")) == 2
    assert sum(ckpt.counts.get(k, 0) for k in ("mm", "bmm")) == 3


@pytest.mark.parametrize(
    "vocab,hidden,chunk,positions",
    [(500, 64, 8, 64), (500, 64, 32, 64), (800, 12, 16, 48), (400, 30, 19, 60)],
)
def test_cell41_checkpointed_peak_is_larger_moment(vocab, hidden, chunk, positions):
    """Cell 41: peak = max(3CV + Vd, 3Vd) + Nd: "three (V, d) tensors ...
    the sum, the addend and the result", and the second moment is the
    larger "whenever 3C < 2d"."""
    h, w, labels = _problem(1, positions, hidden, vocab)
    peak = measure_peak_tensor_bytes(checkpointed_chunked_loss, h, w, labels, chunk_size=chunk)
    first, second = 3 * chunk * vocab + vocab * hidden, 3 * vocab * hidden
    assert (second > first) == (3 * chunk < 2 * hidden)
    want = 4 * (max(first, second) + positions * hidden)
    assert want <= peak <= want * 1.03


# --------------------------------------------------------------------------
# Cell 47: glibc and Linux
# --------------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent(
    """
    import json, torch
    def status(key):
        for line in open('/proc/self/status'):
            if line.startswith(key + ':'):
                return int(line.split()[1]) * 1024
    out = {}
    # pay torch's one-time costs (kernels, thread pool) before measuring
    warm = torch.ones(4 * 2**20 // 4); warm.add_(1).sum(); del warm
    base = status('VmRSS')
    big = torch.ones(48 * 2**20 // 4)
    out['big_up'] = status('VmRSS') - base
    del big
    out['big_left'] = status('VmRSS') - base
    # many blocks below the threshold, pinned by one allocated after them
    base = status('VmRSS')
    small = [torch.ones(512 * 1024 // 4) for _ in range(64)]
    pin = torch.ones(512 * 1024 // 4)
    out['small_up'] = status('VmRSS') - base
    del small
    out['small_left'] = status('VmRSS') - base
    # /proc/self/clear_refs: 5 resets the high-water mark to the current RSS
    peak = torch.ones(64 * 2**20 // 4); del peak
    out['hwm_gap_before'] = status('VmHWM') - status('VmRSS')
    open('/proc/self/clear_refs', 'w').write('5')
    out['hwm_gap_after'] = status('VmHWM') - status('VmRSS')
    print(json.dumps(out))
    """
)


def test_cell47_mmap_threshold_returns_large_blocks_only():
    """Cell 47: "glibc's `MALLOC_MMAP_THRESHOLD_` set to 1 MiB so that freed
    blocks go back to the kernel at once" -- blocks of at least 1 MiB (each
    its own mmap); smaller ones stay in the heap.  And writing 5 to
    `/proc/self/clear_refs` resets `VmHWM`."""
    import os

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(2**20), OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", _RSS_SCRIPT], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    mib = 2**20
    # the 48 MiB block goes back: what stays is a small fraction of it
    # (lazy allocations of torch's first operations are not the block)
    assert out["big_up"] > 40 * mib and out["big_left"] < 0.25 * out["big_up"]
    assert out["small_up"] > 28 * mib
    assert out["small_left"] > 0.75 * out["small_up"]  # not returned
    assert out["hwm_gap_before"] > 50 * mib
    assert out["hwm_gap_after"] < 2 * mib


# --------------------------------------------------------------------------
# Cell 65: the peers' sources
# --------------------------------------------------------------------------

needs_bench = pytest.mark.skipif(not BENCH.is_dir(), reason=".bench-deps not installed")


@needs_bench
def test_cell65_cce_cpu_path_is_compiled_eager():
    """Cell 65: CCE's `impl="torch_compile"` "drops the ignored positions and
    calls `torch.compile` on the eager loss, `e @ c.T` then
    `F.cross_entropy(logits.float(), ...)`"; its kernel "skips gradient
    entries whose softmax value is below numerical precision" (filter_eps)."""
    path = BENCH / "cut_cross_entropy" / "torch_compile.py"
    compiled = _line_of(path, "@torch.compile(")
    product = _line_of(path, "logits = e @ c.T")
    loss = _line_of(path, "F.cross_entropy(logits.float()")
    assert compiled < product < loss
    valids = _line_of(path, "e = e[valids]")
    assert valids > loss  # in the wrapper, before the compiled call
    assert _line_of(path, "torch_compile_linear_cross_entropy_apply(") < valids < max(
        n for n, line in enumerate(_source_lines(path), 1)
        if "torch_compile_linear_cross_entropy_apply(" in line
    )
    assert _line_of(BENCH / "cut_cross_entropy" / "cce.py", "filter_eps")


@needs_bench
def test_cell65_liger_source():
    """Cell 65: Liger 0.8.5: "`torch.zeros_like(weight)` ... unless
    `accum_dtype` is set; every row is multiplied, scored or not; and the
    count of scored targets is read with `.item()`"; only the per-row step
    is the Triton kernel."""
    path = BENCH / "liger_kernel" / "ops" / "fused_linear_cross_entropy.py"
    lines = _source_lines(path)
    zeros = _line_of(path, "grad_weight = torch.zeros_like(weight, device=device)")
    assert "if accum_dtype is None" in lines[zeros - 2]
    assert _line_of(path, "total_n_non_ignore = target_mask.sum().item()")
    chunk = _line_of(path, "_input_chunk = _input[start_idx:end_idx]")
    product = _line_of(path, "torch.mm(_input_chunk, weight.t(), out=logits_chunk)")
    kernel = _line_of(path, "liger_cross_entropy_kernel[(end_idx - start_idx,)](")
    assert chunk < product < kernel  # all rows of the chunk, then the kernel
    assert "0.8.5" in " ".join(p.name for p in BENCH.glob("liger_kernel-*.dist-info"))


@needs_bench
def test_cell65_torchtune_upcasts_per_chunk_but_saves_every_chunk():
    """Cells 65/68: torchtune's `CEWithChunkedOutputLoss` (8 chunks by
    default) upcasts "one chunk at a time", but "each chunk's `log_softmax`
    saves its float32 output", so after the forward pass one whole float32
    (B, T, V) tensor of log-probabilities is alive."""
    sys.path.append(str(BENCH))
    try:
        from torchtune.modules.loss import CEWithChunkedOutputLoss
    finally:
        sys.path.remove(str(BENCH))
    loss_fn = CEWithChunkedOutputLoss()
    assert loss_fn.num_output_chunks == 8
    for batch, time, vocab in ((1, 64, 300), (2, 24, 500), (1, 8, 64)):
        logits = torch.randn(batch, time, vocab, dtype=torch.bfloat16, requires_grad=True)
        chunks = list(logits.chunk(8, dim=1))
        labels = torch.randint(0, vocab, (batch, time))
        labels[0, : time // 2] = IGNORE
        loss, saved = _saved_storages(lambda: loss_fn(chunks, labels))
        float32_saved = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in saved
            if t.dtype == torch.float32 and t.dim() == 2
        }
        assert sum(float32_saved.values()) == 4 * batch * time * vocab
        loss.backward()
