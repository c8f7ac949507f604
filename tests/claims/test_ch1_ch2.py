"""The claims of chapters 1 and 2 about library behaviour, checked in general.

Each test checks one sentence (or one code comment) of
``book/01_tensor_shapes.ipynb`` (``c1``) or ``book/02_llava_loss.ipynb``
(``c2``); the test name carries the chapter and the index of the cell that
makes the claim, and the docstring quotes it.  The book's own cells check its
one example; these tests try the cases the example does not cover (B = 1,
T = 1, T = 2, T = V, empty tensors, float16/bfloat16/float64, int32 labels,
left/right/no/all padding, other ignore indices, ``num_items_in_batch``,
``meta`` tensors, TensorFlow).  Every test asserts what the installed
libraries actually do (torch 2.13 CPU, transformers 5.23, TensorFlow 2.21),
so where a sentence is true only in part the test asserts the boundary and
its docstring says so (``TRUE-ONLY-IN-CASE`` or ``FALSE``).

Chapters 1 and 2 make no claim about Keras, so no Keras backend is started
here.  Claims about older releases (transformers 4.45-4.52) are not
re-checked: ``book/version_history.ipynb`` runs those releases.
"""

from __future__ import annotations

import inspect
import itertools
import math
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import companion  # noqa: F401  (first: quietens TensorFlow's C++ logging)
import tensorflow as tf
import transformers
from transformers import LlamaForCausalLM, Trainer
from transformers.loss import loss_utils
from transformers.loss.loss_utils import ForCausalLMLoss, fixed_cross_entropy

from companion.causal_lm_loss import (
    _reduce,
    attention_mask_filter_loss,
    count_scored_targets,
    label_padding_loss,
    shift_and_slice_loss,
)
from companion.experiments import llava
from companion.experiments import tiny_models as tm
from companion.experiments.shapes import (
    slice_is_contiguous,
    tf_shift_and_flatten,
    trace_shift_and_flatten,
)
from companion.shapes import flatten_for_cross_entropy, shift_for_next_token

IGNORE = -100
HALF = (torch.float16, torch.bfloat16)
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """This file's tiny torch ops on one thread (the machine is shared);
    restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _storage(x: torch.Tensor) -> int:
    return x.untyped_storage().data_ptr()


def _next_token_loss64(logits, labels, ignore_index: int = IGNORE) -> float:
    """The chapters' formula, position by position, in float64 NumPy:
    mean over (b, t), t <= T-2, labels[b, t+1] != ignore, of
    -log softmax(logits[b, t])[labels[b, t+1]]; nan when no pair is kept."""
    z = np.asarray(logits, np.float64)
    y = np.asarray(labels)
    total, count = 0.0, 0
    for b in range(z.shape[0]):
        for t in range(z.shape[1] - 1):
            target = int(y[b, t + 1])
            if target == ignore_index:
                continue
            row = z[b, t]
            m = row.max()
            total += -(row[target] - m - math.log(np.exp(row - m).sum()))
            count += 1
    return total / count if count else float("nan")


def _same_float(a: float, b: float, tol: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol * max(1.0, abs(b))


def _random_labels(gen: torch.Generator, batch: int, time: int, vocab: int,
                   padding: str, dtype=torch.long) -> torch.Tensor:
    """Labels in [0, V) with -100 as ``padding`` says: "none", "right",
    "left", "all", or "random" (any position, column 0 included)."""
    labels = torch.randint(0, vocab, (batch, time), generator=gen)
    if padding == "all":
        labels[:] = IGNORE
    elif padding in ("right", "left"):
        for b in range(batch):
            n = int(torch.randint(0, time + 1, (1,), generator=gen))
            if padding == "right":
                labels[b, time - n:] = IGNORE
            else:
                labels[b, :n] = IGNORE
    elif padding == "random":
        labels[torch.rand(batch, time, generator=gen) < 0.4] = IGNORE
    return labels.to(dtype)


class _RecordOps(TorchDispatchMode):
    """Every aten operator one call reaches, with its output dtype."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        dtype = out.dtype if isinstance(out, torch.Tensor) else None
        self.ops.append((func._schema.name.split("::")[-1], dtype))
        return out


def _fake_trainer(loss_shifts_labels: bool = True, **args) -> SimpleNamespace:
    """The attributes ``Trainer._get_num_items_in_batch`` reads."""
    base = dict(average_tokens_across_devices=False, world_size=1, n_gpu=1)
    base.update(args)
    return SimpleNamespace(
        model_accepts_loss_kwargs=True, compute_loss_func=None,
        _loss_shifts_labels=loss_shifts_labels,
        args=SimpleNamespace(**base),
        accelerator=SimpleNamespace(
            gather=lambda x: torch.stack([x, x + 1])),  # two ranks
        get_tp_size=lambda: 1, get_cp_size=lambda: 1, get_sp_size=lambda: 1,
    )


@pytest.fixture(scope="module")
def llama():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(tm.tiny_llama_config()).eval()


@pytest.fixture(scope="module")
def tiny_llava():
    with torch.random.fork_rng():
        return tm.tiny_llava(seed=0)


@pytest.fixture(scope="module")
def tiny_t5():
    config = transformers.T5Config(
        vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1, dropout_rate=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.T5ForConditionalGeneration(config).eval()


# ===========================================================================
# Chapter 1: tensor shapes
# ===========================================================================


@settings(max_examples=15)
@given(batch=st.integers(1, 3), time=st.integers(1, 5), vocab=st.integers(1, 6),
       width=st.integers(1, 5), int32=st.booleans())
def test_c1_cell5_embedding_and_head_shapes(batch, time, vocab, width, int32):
    """Cell 5: ``hidden = embedding(input_ids)  # (B, T, d)`` and
    ``logits = lm_head(hidden)  # (B, T, V)``.  TRUE-GENERAL: any B, T
    (1 included), int32 or int64 ids; the head acts on the last axis only,
    row by row."""
    embedding = nn.Embedding(vocab, width)
    head = nn.Linear(width, vocab, bias=False)
    ids = torch.randint(0, vocab, (batch, time))
    if int32:
        ids = ids.int()
    hidden = embedding(ids)
    logits = head(hidden)
    assert hidden.shape == (batch, time, width)
    assert logits.shape == (batch, time, vocab)
    for b in range(batch):
        for t in range(time):
            assert torch.allclose(logits[b, t], head.weight @ hidden[b, t],
                                  atol=1e-6)


def test_c1_cell7_caller_passes_ids_as_labels_loss_shifts(llama):
    """Cell 7: "In Hugging Face transformers ... the caller passes the same
    ids as labels and the *loss function* performs the shift."
    TRUE-GENERAL for a causal LM in 5.23 (``ForCausalLMLoss``): B = 1..3,
    T = 2..9, ``labels=input_ids`` gives the next-token loss, never the
    unshifted one; T = 1 has no pair (nan).  ("as in most training code" is
    a survey claim: UNCHECKABLE-HERE.)"""
    gen = torch.Generator().manual_seed(0)
    for batch, time in ((1, 2), (3, 9), (2, 5)):
        ids = torch.randint(3, 63, (batch, time), generator=gen)
        with torch.no_grad():
            out = llama(input_ids=ids, labels=ids)
        shifted = F.cross_entropy(out.logits[:, :-1].reshape(-1, 64),
                                  ids[:, 1:].reshape(-1))
        unshifted = F.cross_entropy(out.logits.reshape(-1, 64), ids.reshape(-1))
        assert abs(out.loss.item() - shifted.item()) < 1e-5
        assert abs(out.loss.item() - unshifted.item()) > 1e-3
    with torch.no_grad():
        one = llama(input_ids=ids[:, :1], labels=ids[:, :1]).loss
    assert math.isnan(one.item())


def test_c1_cell7_minus_100_labels_are_not_scored(llama):
    """Cell 7: "Positions that should not be scored ... are set to -100 in
    ``labels``".  TRUE-GENERAL: -100 is the default ``ignore_index`` of
    ``nn.CrossEntropyLoss`` (torch/nn/functional.py:3477) and of
    ``ForCausalLMLoss`` (transformers/loss/loss_utils.py:56); the model's
    loss is the mean over the other targets, wherever the -100s sit; another
    negative value (-1) is not ignored but rejected."""
    assert inspect.signature(F.cross_entropy).parameters["ignore_index"].default == IGNORE
    assert inspect.signature(ForCausalLMLoss).parameters["ignore_index"].default == IGNORE
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 63, (3, 8), generator=gen)
    for padding in ("right", "left", "random"):
        labels = _random_labels(gen, 3, 8, 64, padding)
        labels[0, 3] = 5  # at least one target
        with torch.no_grad():
            out = llama(input_ids=ids, labels=labels)
        want = _next_token_loss64(out.logits.double(), labels)
        assert abs(out.loss.item() - want) < 1e-5
    bad = labels.clone()
    bad[0, 4] = -1
    with pytest.raises(IndexError):
        F.cross_entropy(torch.zeros(8, 64), bad[0])


@settings(max_examples=10)
@given(batch=st.integers(1, 2), time=st.integers(2, 8), data=st.data())
def test_c1_cell7_causal_logits_see_only_the_past(llama, batch, time, data):
    """Cell 7: "The logits at position t are computed from tokens 0..t only
    (a causal model cannot look ahead)."  TRUE-GENERAL for a causal
    transformer (tiny Llama), with and without a left-padded attention mask:
    changing tokens k.. leaves logits 0..k-1 unchanged and changes row k."""
    k = data.draw(st.integers(1, time - 1))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 63, (batch, time), generator=gen)
    other = ids.clone()
    other[:, k:] = (ids[:, k:] - 3 + 1 + torch.randint(0, 59, (1,), generator=gen)) % 60 + 3
    mask = torch.ones(batch, time, dtype=torch.long)
    mask[0, : k // 2] = 0  # left padding in the first row
    for attention_mask in (None, mask):
        with torch.no_grad():
            a = llama(input_ids=ids, attention_mask=attention_mask).logits
            b = llama(input_ids=other, attention_mask=attention_mask).logits
        assert torch.allclose(a[:, :k], b[:, :k], atol=1e-6)
        assert (a[:, k] - b[:, k]).abs().max().item() > 1e-4


def test_c1_cell11_ellipsis_slices_any_leading_dims():
    """Cell 11: "The ``...`` (Ellipsis) means 'all leading dimensions', so
    the slicing expressions themselves work for a single sequence (T, V) as
    well as a batch (B, T, V) (the package's functions insist on the batched
    form)."  TRUE-GENERAL: ranks 2 to 4, T = 1 included; the package rejects
    (T, V)."""
    for shape in ((5, 3), (2, 5, 3), (4, 2, 5, 3), (1, 3), (2, 1, 3)):
        logits = torch.randn(shape)
        labels = torch.zeros(shape[:-1], dtype=torch.long)
        sliced = logits[..., :-1, :]
        assert sliced.shape == (*shape[:-2], shape[-2] - 1, shape[-1])
        assert torch.equal(sliced, logits.narrow(-2, 0, shape[-2] - 1))
        assert labels[..., 1:].shape == (*shape[:-2], shape[-2] - 1)
    with pytest.raises(ValueError):
        shift_for_next_token(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))


_BASIC = st.one_of(
    st.builds(slice, st.none() | st.integers(-4, 4), st.none() | st.integers(-4, 4),
              st.none() | st.integers(1, 3)),
    st.integers(0, 1),
    st.just(None),
)


@settings(max_examples=40)
@given(index=st.lists(_BASIC, min_size=1, max_size=3), ellipsis=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int32]))
def test_c1_cell11_basic_slicing_returns_a_view(index, ellipsis, dtype):
    """Cell 11: "a *view* is a tensor that shares the storage of another, and
    basic slicing returns one".  TRUE-GENERAL: every basic index (slices with
    any step, ints, None, Ellipsis) on a (2, 4, 5) tensor of any dtype gives
    a view (``_base`` is the parent, same storage, writes show through);
    advanced indexing (a list, a bool mask), which the sentence excludes,
    copies."""
    x = torch.arange(40).reshape(2, 4, 5).to(dtype)
    key = tuple(index) + ((Ellipsis,) if ellipsis else ())
    view = x[key]
    assert view._base is x and _storage(view) == _storage(x)
    if view.numel():
        before = x.clone()
        view.fill_(7)
        assert not torch.equal(before, x)
    copied = x[[0, 1]]
    assert copied._base is None and _storage(copied) != _storage(x)
    assert _storage(x[x > 3]) != _storage(x)


@settings(max_examples=30)
@given(perm=st.permutations([0, 1, 2]), step=st.integers(1, 3),
       start=st.integers(0, 2),
       dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float64,
                              torch.int32, torch.int8]))
def test_c1_cell11_stride_counts_elements_of_the_storage(perm, step, start, dtype):
    """Cell 11: "The stride of a dimension is the jump, in elements of the
    storage, from one element to the next along that dimension."
    TRUE-GENERAL: for permuted, stepped and offset views of every element
    size (1, 2, 4, 8 bytes), element ``[i, j, k]`` sits at
    ``storage_offset + i*s0 + j*s1 + k*s2`` elements (times the element size
    in bytes) from the start of the storage; strides do not depend on the
    element size."""
    base = torch.arange(3 * 4 * 5).reshape(3, 4, 5)
    x = base.to(dtype) if dtype != torch.int8 else (base % 100).to(dtype)
    view = x.permute(*perm)[start:, ::step]
    flat = x.reshape(-1)
    size = x.element_size()
    assert view.stride() == base.permute(*perm)[start:, ::step].stride()
    for idx in np.ndindex(*view.shape):
        offset = view.storage_offset() + sum(i * s for i, s in zip(idx, view.stride()))
        assert view[idx] == flat[offset]
        assert view[idx].data_ptr() - x.data_ptr() == offset * size


def test_c1_cell11_fresh_tensor_strides():
    """Cell 11: "A freshly created (B, T, V) tensor is laid out row by row, so
    its strides are (TV, V, 1)".  TRUE-ONLY-IN-CASE: true for a tensor
    created from a shape (``torch.empty``, ``zeros``, ``randn``, ``full``,
    on CPU and ``meta``, B, T or V of 1 or 0 included) and for a Linear
    head's output; but the ``*_like`` factories keep the layout of their
    argument (``memory_format=torch.preserve_format``), so
    ``torch.empty_like`` of a permuted tensor is fresh yet not (TV, V, 1)."""
    for b, t, v in ((2, 6, 10), (1, 1, 1), (1, 4, 3), (3, 1, 5), (2, 0, 4), (4, 4, 4)):
        expected = (t * v, v, 1) if t else _fresh_strides([b, t, v])  # T = 0: max(T, 1)
        for make in (torch.empty, torch.zeros, torch.randn):
            assert make(b, t, v).stride() == expected
        assert torch.full((b, t, v), 1.0, dtype=torch.bfloat16).stride() == expected
        assert torch.empty(b, t, v, device="meta").stride() == expected
        if b * t:
            head = nn.Linear(3, v)
            assert head(torch.randn(b, t, 3)).stride() == expected
    permuted = torch.randn(10, 6, 2).permute(2, 1, 0)  # shape (2, 6, 10)
    for like in (torch.empty_like, torch.zeros_like, torch.randn_like):
        fresh = like(permuted)
        assert fresh.shape == (2, 6, 10) and fresh.stride() != (60, 10, 1)
        assert fresh.stride() == permuted.stride()
    assert torch.empty_like(permuted, memory_format=torch.contiguous_format).stride() == (60, 10, 1)


@settings(max_examples=25)
@given(batch=st.integers(1, 4), time=st.integers(1, 6), vocab=st.integers(1, 5),
       dtype=st.sampled_from(FLOATS), meta=st.booleans())
def test_c1_cell14_slice_is_view_with_parent_strides(batch, time, vocab, dtype, meta):
    """Cells 12-14: "Slicing copies nothing.  ``shift_logits`` is a *view*: it
    shares the storage of ``logits``, keeps its strides, and only has a
    smaller shape."  TRUE-GENERAL for ``logits[..., :-1, :]``: any B, T
    (T = 1 gives an empty view with the same strides), V, dtype, CPU or
    ``meta``; the offset stays 0.  (``labels[..., 1:]`` keeps its strides
    too but starts one element later.)"""
    device = "meta" if meta else "cpu"
    logits = torch.empty(batch, time, vocab, dtype=dtype, device=device)
    sliced = logits[..., :-1, :]
    assert sliced._base is logits
    assert sliced.stride() == logits.stride() == (time * vocab, vocab, 1)
    assert sliced.storage_offset() == 0
    assert sliced.shape == (batch, time - 1, vocab)
    labels = torch.zeros(batch, time, dtype=torch.int32, device=device)
    assert labels[..., 1:].stride() == labels.stride()
    assert labels[..., 1:].storage_offset() == 1
    if not meta:
        assert _storage(sliced) == _storage(logits)


def _fresh_strides(sizes):
    strides, step = [], 1
    for s in reversed(sizes):
        strides.append(step)
        step *= max(s, 1)
    return tuple(reversed(strides))


@settings(max_examples=80)
@given(sizes=st.lists(st.integers(0, 3), min_size=1, max_size=4),
       data=st.data())
def test_c1_cell14_contiguity_rule(sizes, data):
    """Cell 14: "a tensor is *contiguous* only if its strides are exactly
    those of a fresh tensor of its shape ... (dimensions of size one aside:
    their stride never matters)".  TRUE-ONLY-IN-CASE: for tensors with at
    least one element.  A tensor with no element is contiguous whatever its
    strides (c10/core/Contiguity.h:16-18, ``if (numel == 0) return true``):
    ``torch.empty(4, 5)[:, :0]`` has strides (5, 1), a fresh (4, 0) has
    (1, 1), and it is contiguous.  Checked on random ``as_strided`` tensors."""
    strides = data.draw(st.lists(st.integers(0, 13), min_size=len(sizes),
                                 max_size=len(sizes)))
    numel = math.prod(sizes)
    extent = 1 + sum((n - 1) * s for n, s in zip(sizes, strides)) if numel else 0
    x = torch.empty(extent + 1).as_strided(sizes, strides)
    fresh = _fresh_strides(sizes)
    book_rule = all(s == f for n, s, f in zip(sizes, strides, fresh) if n != 1)
    if numel:
        assert x.is_contiguous() == book_rule
    else:
        assert x.is_contiguous()  # whatever the strides
    empty = torch.empty(4, 5)[:, :0]
    assert empty.is_contiguous() and empty.stride() != torch.empty(4, 0).stride()


@settings(max_examples=40)
@given(batch=st.integers(1, 9), time=st.integers(1, 9), vocab=st.integers(1, 9))
def test_c1_cell16_slice_contiguous_iff_batch_of_one(batch, time, vocab):
    """Cells 16-18 and the summary: "With B = 1 ... the slice is contiguous.
    With B > 1 a dropped row sits between every pair of sequences", and
    "a view; contiguous only if B = 1".  TRUE-ONLY-IN-CASE: for T >= 2.
    At T = 1 the slices are empty, and empty tensors are contiguous for
    every B (``slice_is_contiguous(8, 1, 3)`` is True); the package's shift
    functions reject T = 1, its ``slice_is_contiguous`` does not."""
    logits = torch.empty(batch, time, vocab, device="meta")
    labels = torch.empty(batch, time, dtype=torch.long, device="meta")
    got = logits[..., :-1, :].is_contiguous()
    assert got == labels[..., 1:].is_contiguous()
    assert got == slice_is_contiguous(batch, time, vocab)
    if time >= 2:
        assert got == (batch == 1)
    else:
        assert got  # T = 1: empty slice, contiguous for any B
    assert slice_is_contiguous(8, 1, 3)


@settings(max_examples=20)
@given(batch=st.integers(1, 3), time=st.integers(2, 5), vocab=st.integers(1, 4),
       dtype=st.sampled_from(FLOATS))
def test_c1_cell16_meta_device_has_strides_but_no_memory(batch, time, vocab, dtype):
    """Cell 16: "PyTorch's ``meta`` device, where tensors have shapes and
    strides but no memory, so any size can be asked about for free".
    TRUE-GENERAL: a 16 GiB and a 4 TiB ``meta`` tensor are created, sliced
    and made contiguous at once without memory; on small sizes every step
    of the trace (shape, stride, contiguity, copied, bytes) is the same on
    ``meta`` as on CPU."""
    huge = torch.empty(8, 4096, 128256, device="meta")
    assert huge[..., :-1, :].contiguous().is_contiguous()
    four_tib = torch.empty(2**20, 2**20, device="meta")  # 4 TiB of float32
    assert four_tib.untyped_storage().data_ptr() == 0  # no buffer behind it
    cpu = trace_shift_and_flatten(torch.randn(batch, time, vocab).to(dtype),
                                  torch.zeros(batch, time, dtype=torch.long))
    meta = trace_shift_and_flatten(
        torch.empty(batch, time, vocab, dtype=dtype, device="meta"),
        torch.empty(batch, time, dtype=torch.long, device="meta"))
    assert cpu == meta


@settings(max_examples=30)
@given(sizes=st.lists(st.integers(0, 4), min_size=1, max_size=3),
       transpose=st.booleans(), step=st.integers(1, 2),
       dtype=st.sampled_from([torch.float16, torch.float32, torch.int64]))
def test_c1_cell19_contiguous_returns_self_or_packed_copy(sizes, transpose, step, dtype):
    """Cell 19: "That method returns the tensor itself when it is already
    contiguous, and otherwise copies the elements into a new, packed
    storage."  TRUE-GENERAL (torch/_tensor_docs.py:1145-1147): the same
    Python object when ``is_contiguous()`` (empty tensors and odd size-1
    strides included, requires_grad too), else new storage with fresh
    strides and equal values."""
    x = torch.arange(math.prod(sizes)).reshape(sizes).to(dtype)
    if transpose and x.dim() >= 2:
        x = x.transpose(0, -1)
    x = x[..., ::step]
    packed = x.contiguous()
    if x.is_contiguous():
        assert packed is x
    else:
        assert _storage(packed) != _storage(x)
        assert packed.stride() == _fresh_strides(list(x.shape))
        assert torch.equal(packed, x)
    leaf = torch.zeros(3, 1, 4, requires_grad=True)
    assert leaf.contiguous() is leaf
    odd = torch.empty(20).as_strided((3, 1, 4), (4, 99, 1))
    assert odd.contiguous() is odd


@settings(max_examples=25)
@given(batch=st.integers(1, 4), time=st.integers(2, 6), vocab=st.integers(1, 5),
       dtype=st.sampled_from(FLOATS),
       label_dtype=st.sampled_from([torch.int64, torch.int32, torch.uint8]))
def test_c1_cell21_which_steps_copy(batch, time, vocab, dtype, label_dtype):
    """Cells 21 and 24, the summary, and cell 30: "the slices are views (no
    copy, not contiguous); ``.contiguous()`` copies; ``.view`` reinterprets
    the packed result without copying; and ``.to(logits.device)`` does
    nothing ... With a batch of one, the same steps copy nothing at all";
    "After the packing copy, ``.view(-1, V)`` merges B and T-1 ... for
    free".  TRUE-GENERAL for T >= 2 (what the package's shift accepts), any
    V, logit dtype and label dtype."""
    steps = trace_shift_and_flatten(torch.randn(batch, time, vocab).to(dtype),
                                    torch.zeros(batch, time, dtype=label_dtype))
    copied = {(s.tensor, s.code) for s in steps if s.copied}
    if batch == 1:
        assert not copied
    else:
        assert copied == {("logits", ".contiguous()"), ("labels", ".contiguous()")}
        sliced = [s for s in steps if s.code in ("logits[..., :-1, :]", "labels[..., 1:]")]
        assert not any(s.contiguous for s in sliced)
    views = [s for s in steps if s.code.startswith(".view")]
    assert all(not s.copied and s.contiguous for s in views)
    assert views[0].shape == (batch * (time - 1), vocab)
    assert views[1].shape == (batch * (time - 1),)


@settings(max_examples=40)
@given(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4),
       data=st.data())
def test_c1_cell23_size_one_strides_are_ignored(sizes, data):
    """Cell 23: "a dimension of size one is never stepped along, so PyTorch
    ignores its stride when it decides contiguity".  TRUE-GENERAL: giving
    every size-1 dimension of a contiguous tensor an arbitrary stride never
    changes ``is_contiguous()``."""
    fresh = list(_fresh_strides(sizes))
    strides = [data.draw(st.integers(0, 50)) if n == 1 else f
               for n, f in zip(sizes, fresh)]
    extent = 1 + sum((n - 1) * s for n, s in zip(sizes, strides))
    x = torch.empty(extent).as_strided(sizes, strides)
    assert x.is_contiguous()
    assert x.contiguous() is x


def _factor_shapes(n: int) -> list[tuple[int, ...]]:
    shapes = [(n,), (-1,)]
    for a in range(1, n + 1):
        if n % a == 0:
            shapes += [(a, n // a), (a, -1)]
            for b in range(1, n // a + 1):
                if (n // a) % b == 0:
                    shapes.append((a, b, n // a // b))
    return shapes


@settings(max_examples=40)
@given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=3),
       perm_seed=st.integers(0, 5), step=st.integers(1, 2),
       drop_last=st.booleans(), data=st.data())
def test_c1_cell25_view_never_copies_reshape_copies_only_when_needed(
        sizes, perm_seed, step, drop_last, data):
    """Cell 25: "``.view(shape)`` never copies: it only computes new strides
    over the same storage, and raises an error when no such strides exist.
    ``.reshape(shape)`` returns a view when one exists and *silently copies*
    otherwise."  TRUE-GENERAL: on permuted, stepped and sliced tensors and
    every target shape, ``view`` either shares the storage or raises
    ``RuntimeError``, and ``reshape`` shares the storage exactly when
    ``view`` succeeds (both use ``computeStride``; torch/_tensor_docs.py:
    6053-6068), with the same values as ``contiguous().view``."""
    x = torch.randn(*sizes, 3)
    perms = list(itertools.permutations(range(x.dim())))
    x = x.permute(*perms[perm_seed % len(perms)])[..., ::step]
    if drop_last and x.shape[1] > 1:
        x = x[:, :-1]
    target = data.draw(st.sampled_from(_factor_shapes(x.numel())))
    try:
        viewed = x.view(target)
    except RuntimeError:
        viewed = None
    reshaped = x.reshape(target)
    assert torch.equal(reshaped, x.contiguous().view(target))
    if viewed is not None:
        assert _storage(viewed) == _storage(x) and viewed._base is not None
        assert _storage(reshaped) == _storage(x)
    else:
        assert _storage(reshaped) != _storage(x)


@settings(max_examples=30)
@given(batch=st.integers(1, 4), time=st.integers(1, 6), vocab=st.integers(1, 5))
def test_c1_cell27_contiguous_view_and_reshape_copy_in_same_cases(batch, time, vocab):
    """Cell 27: "For this flattening to (-1, V), ``x.contiguous().view(...)``
    and ``x.reshape(...)`` compute the same thing and copy in the same cases
    (for other target shapes ``.reshape`` can find a view where
    ``.contiguous()`` would copy)".  TRUE-ONLY-IN-CASE: the values always
    agree, and the copies agree for B = 1 or T != 2.  At T = 2 with B > 1
    the slice (B, 1, V) is not contiguous, so ``.contiguous()`` copies, yet
    its size-1 time axis lets ``.reshape(-1, V)`` return a view (strides
    (2V, 1)).  The parenthesis is true: ``reshape(B, -1)`` of a B > 1 slice
    is a view while ``.contiguous()`` copies.  "What ``.view`` adds is a
    guarantee: if it succeeds, no memory was spent": true."""
    logits = torch.randn(batch, time, vocab)
    x = logits[..., :-1, :]
    packed = x.contiguous().view(-1, vocab)
    reshaped = x.reshape(-1, vocab)
    assert torch.equal(packed, reshaped)
    contiguous_copies = _storage(x.contiguous()) != _storage(logits)
    reshape_copies = _storage(reshaped) != _storage(logits)
    if batch > 1 and time == 2:
        assert contiguous_copies and not reshape_copies  # the exception
        assert x.view(-1, vocab).stride() == (2 * vocab, 1)
    else:
        assert contiguous_copies == reshape_copies
    if batch > 1 and time >= 2 and vocab > 1:
        assert _storage(x.reshape(batch, -1)) == _storage(logits)
    try:
        assert _storage(x.view(-1, vocab)) == _storage(logits)
    except RuntimeError:
        pass


def test_c1_cell27_llava_default_text_vocabulary():
    """Cells 27 and 29: "the default vocabulary of transformers'
    ``LlavaConfig``, whose default text model is a ``LlamaConfig`` with
    V = 32000".  TRUE-GENERAL at 5.23: ``LlavaConfig.sub_configs_defaults``
    builds ``model_type="llama"`` (models/llava/configuration_llava.py:67)
    and ``LlamaConfig.vocab_size = 32000`` (models/llama/
    configuration_llama.py:64)."""
    config = transformers.LlavaConfig()
    assert type(config.text_config) is transformers.LlamaConfig
    assert config.text_config.vocab_size == 32000 == transformers.LlamaConfig().vocab_size


@settings(max_examples=20)
@given(batch=st.integers(1, 8), time=st.integers(2, 4096), vocab=st.integers(1, 50000),
       dtype=st.sampled_from(FLOATS))
def test_c1_cell30_copy_is_logits_less_one_row_per_sequence(batch, time, vocab, dtype):
    """Cell 30: "The copy made by ``.contiguous()`` is almost as large as the
    logits themselves: only one row of V values per sequence is left out",
    and "The same line costs nothing at B = 1."  TRUE-GENERAL (T >= 2):
    on ``meta``, B(T-1)V elements of the logits' size for B > 1, 0 for
    B = 1, at any size and dtype."""
    steps = trace_shift_and_flatten(
        torch.empty(batch, time, vocab, dtype=dtype, device="meta"),
        torch.empty(batch, time, dtype=torch.long, device="meta"))
    copied = sum(s.nbytes for s in steps if s.copied and s.tensor == "logits")
    size = torch.empty((), dtype=dtype).element_size()
    assert copied == (0 if batch == 1 else batch * (time - 1) * vocab * size)


def test_c1_cell30_cross_entropy_shapes():
    """Cell 30: "``nn.CrossEntropyLoss`` takes scores of shape (N, V) and
    targets of shape (N,): one row per prediction, and no notion of
    sequences."  FALSE as to "no notion of sequences": the loss also takes
    (N, C, d_1, ..., d_K) with targets (N, d_1, ..., d_K)
    (torch/nn/modules/loss.py:1299-1301), i.e. (B, V, T) scores with (B, T)
    targets, and gives the flat loss on them.  What it cannot take is the
    model's (B, T, V): the class axis must be second.  (B, T, V) with
    T != V raises; with T = V it runs silently and scores the wrong axis."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen)
    labels = torch.randint(0, 7, (3, 5), generator=gen)
    flat = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1))
    per_sequence = F.cross_entropy(logits.transpose(1, 2), labels)
    assert torch.allclose(flat, per_sequence, atol=1e-6)
    assert F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").shape == (3, 5)
    with pytest.raises(RuntimeError):
        F.cross_entropy(logits, labels)
    square = torch.randn(2, 6, 6, generator=gen)  # T = V
    square_labels = torch.randint(0, 6, (2, 6), generator=gen)
    wrong = F.cross_entropy(square, square_labels)  # no error
    right = F.cross_entropy(square.reshape(-1, 6), square_labels.reshape(-1))
    assert abs(wrong.item() - right.item()) > 1e-3


@settings(max_examples=20)
@given(shape=st.lists(st.integers(0, 4), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.int64, torch.int32, torch.float16]),
       transpose=st.booleans())
def test_c1_cell32_to_same_device_returns_input(shape, dtype, transpose):
    """Cells 32 and 34, and the summary: "on the same device, .to returns its
    input: no copy, no new tensor"; ``.to(logits.device)`` copies "only
    across devices".  TRUE-GENERAL (torch/_tensor_docs.py:5138-5140): the
    same object for any shape, dtype and layout (non-contiguous too), given
    as a ``torch.device`` or a string; only ``copy=True`` or a new dtype
    makes a new tensor on the same device."""
    x = torch.zeros(shape, dtype=dtype)
    if transpose and x.dim() >= 2:
        x = x.transpose(0, 1)
    for device in (x.device, "cpu", torch.device("cpu")):
        assert x.to(device) is x
    assert x.to(x.device, copy=True) is not x
    meta = torch.empty(3, device="meta")
    assert meta.to(meta.device) is meta


def test_c1_cell34_cross_entropy_needs_one_device():
    """Cell 34: "cross-entropy requires both on the same device".
    UNCHECKABLE-HERE for GPUs (this machine has one CPU and no accelerator;
    the check below also runs a CUDA case when one is present).  As a
    stand-in, two devices that do exist here: CPU labels with ``meta``
    logits are refused."""
    with pytest.raises(RuntimeError, match="device"):
        F.cross_entropy(torch.empty(4, 3, device="meta"), torch.zeros(4, dtype=torch.long))
    same = F.cross_entropy(torch.empty(4, 3, device="meta"),
                           torch.zeros(4, dtype=torch.long, device="meta"))
    assert same.device.type == "meta"  # one device: accepted
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            F.cross_entropy(torch.randn(4, 3, device="cuda"), torch.zeros(4, dtype=torch.long))


@settings(max_examples=25)
@given(batch=st.integers(1, 4), time=st.integers(2, 6), vocab=st.integers(1, 5))
def test_c1_cell34_flat_row_is_position_and_next_label(batch, time, vocab):
    """Cell 34: "Row b(T-1) + t of the flat logits is position t of sequence
    b, paired with label t+1 of that sequence."  TRUE-GENERAL: every B, T,
    V."""
    logits = torch.randn(batch, time, vocab)
    labels = torch.randint(0, max(vocab, 1), (batch, time))
    flat_logits, flat_labels = flatten_for_cross_entropy(logits, labels)
    for b in range(batch):
        for t in range(time - 1):
            n = b * (time - 1) + t
            assert torch.equal(flat_logits[n], logits[b, t])
            assert flat_labels[n] == labels[b, t + 1]


@settings(max_examples=30)
@given(batch=st.integers(1, 4), time=st.integers(2, 7), vocab=st.integers(1, 9),
       dtype=st.sampled_from(FLOATS),
       padding=st.sampled_from(["none", "right", "left", "all", "random"]),
       seed=st.integers(0, 2**31 - 1))
def test_c1_cell34_flat_cross_entropy_is_the_formula(batch, time, vocab, dtype,
                                                     padding, seed):
    """Cells 7 and 34: the loss "is the mean over the N = B(T-1) pairs", or,
    with -100 labels, "the sum runs over the scored pairs only ... and
    divides by their number |S|"; "Cross-entropy over the flat tensors is
    therefore the next-token loss of the formula above".  TRUE-GENERAL: any
    shape (T = V included), padding (none, left, right, random, all: then
    0/0 = nan on both sides) and dtype, to the dtype's rounding."""
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, time, vocab, generator=gen)).to(dtype)
    labels = _random_labels(gen, batch, time, vocab, padding)
    flat_logits, flat_labels = flatten_for_cross_entropy(logits, labels)
    got = F.cross_entropy(flat_logits, flat_labels).float().item()
    want = _next_token_loss64(logits.double(), labels)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-5)
    assert _same_float(got, want, tol)


@settings(max_examples=25)
@given(batch=st.integers(1, 4), time=st.integers(2, 7), vocab=st.integers(2, 6),
       padding=st.sampled_from(["none", "right", "left", "all", "random"]),
       label_dtype=st.sampled_from([torch.int64, torch.int32]),
       seed=st.integers(0, 2**31 - 1))
def test_c1_cell51_padding_anywhere_removes_only_its_pairs(batch, time, vocab,
                                                          padding, label_dtype, seed):
    """Cell 51: "The shift does not care where the padding is: every position
    still predicts its successor, and a -100 label removes a pair from the
    loss wherever it occurs", and the -100 at position 0 "is dropped by the
    shift anyway".  TRUE-GENERAL: left, right, random, all or no padding,
    int32 or int64 labels; the flat loss is the formula's, only pairs whose
    *target* is -100 leave, and column 0 never counts."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, time, vocab, generator=gen, dtype=torch.float64)
    labels = _random_labels(gen, batch, time, vocab, padding, label_dtype)
    flat_logits, flat_labels = flatten_for_cross_entropy(logits, labels)
    got = F.cross_entropy(flat_logits, flat_labels.long()).item()
    assert _same_float(got, _next_token_loss64(logits, labels), 1e-12)
    assert int((flat_labels != IGNORE).sum()) == int((labels[:, 1:] != IGNORE).sum())
    other = labels.clone()
    other[:, 0] = IGNORE if padding != "all" else 0
    _, other_flat = flatten_for_cross_entropy(logits, other)
    assert torch.equal(other_flat, flat_labels)


def test_c1_cell37_tf_tensor_is_immutable():
    """Cell 37 (and cell 40's comment): "it exposes neither strides nor views:
    a ``tf.Tensor`` is immutable: its contents are never updated, only new
    tensors created".  TRUE-ONLY-IN-CASE: through TensorFlow's own API (no
    strides, ``view``, ``contiguous``, item assignment or ``assign``;
    ``.numpy()`` returns a copy, tensorflow/python/framework/ops.py:417-421;
    ``np.asarray`` and ``memoryview`` are read-only).  But a DLPack export
    hands the same buffer to another framework, and a write there updates
    the ``tf.Tensor`` in place."""
    t = tf.constant(np.arange(6, dtype=np.float32).reshape(2, 3))
    for name in ("stride", "contiguous", "view", "assign"):
        assert not hasattr(t, name)
    with pytest.raises(TypeError):
        t[0, 0] = 1.0
    a = t.numpy()
    a[0, 0] = 99.0
    assert t.numpy()[0, 0] == 0.0
    assert not np.asarray(t).flags.writeable and memoryview(t).readonly
    alias = torch.from_dlpack(tf.experimental.dlpack.to_dlpack(t))
    alias[1, 2] = -5.0
    assert t.numpy()[1, 2] == -5.0  # the "immutable" tensor changed


@settings(max_examples=20)
@given(sizes=st.lists(st.integers(1, 4), min_size=2, max_size=3),
       view=st.sampled_from(["slice", "step", "transpose", "none"]),
       data=st.data())
def test_c1_cell37_tf_reshape_keeps_order_and_fails_only_on_count(sizes, view, data):
    """Cell 37: "``tf.reshape`` keeps the elements and their order, so it can
    reuse the input's buffer, and the one failure its documentation shows is
    a shape that does not hold the same number of elements
    (tensorflow/python/ops/array_ops.py:86-94); memory layout never
    enters."  TRUE-GENERAL: after a slice, a strided slice or a transpose,
    ``tf.reshape`` to any shape of the same size gives NumPy's row-major
    reshape of the logical array; a contiguous input's buffer is reused
    (same address through DLPack); a wrong count raises
    ``InvalidArgumentError``."""
    array = np.random.default_rng(len(sizes)).normal(size=sizes).astype(np.float32)
    t = tf.constant(array)
    if view == "slice":
        t, array = t[:-1] if sizes[0] > 1 else t, array[:-1] if sizes[0] > 1 else array
    elif view == "step":
        t, array = t[::2], array[::2]
    elif view == "transpose":
        t, array = tf.transpose(t), array.T
    target = data.draw(st.sampled_from(_factor_shapes(array.size)))
    np.testing.assert_array_equal(tf.reshape(t, target).numpy(), array.reshape(target))
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.reshape(t, [array.size + 1])
    dense = tf.constant(np.ones((4, 5, 6), np.float32))

    def address(x):
        return torch.from_dlpack(tf.experimental.dlpack.to_dlpack(x)).data_ptr()

    assert address(tf.reshape(dense, [-1, 6])) == address(dense)


def test_c1_cell37_copies_are_invisible_in_the_api():
    """Cell 37: "Whether the runtime copies is its own business, and nothing
    in the API reports it."  TRUE-ONLY-IN-CASE: nothing in the ``tf.Tensor``
    API reports it, but the DLPack export does: the buffer address shows
    that ``tf.reshape`` of a dense tensor reuses the buffer while a slice
    ``t[:, :-1]`` lives in a new one."""
    dense = tf.constant(np.ones((4, 5, 6), np.float32))

    def address(x):
        return torch.from_dlpack(tf.experimental.dlpack.to_dlpack(x)).data_ptr()

    assert address(tf.reshape(dense, [-1, 6])) == address(dense)
    assert address(dense[:, :-1]) != address(dense)


def test_c1_cell40_tf_reshape_fails_only_on_wrong_count():
    """Cell 40, code comment: "``tf.reshape`` flattens what PyTorch's
    ``.view`` refuses (a slice, a strided slice, a transpose) and fails only
    on a wrong element count."  FALSE as to "only": a shape with two -1
    raises ``InvalidArgumentError`` ("Only one input size may be -1") with
    the right count, as the documentation states ("At most one component of
    ``shape`` can be -1", tensorflow/python/ops/array_ops.py:112-113).  The
    first half is true."""
    t = tf.constant(np.zeros((2, 6, 10), np.float32))
    for shaped in (t[:, :-1, :], t[:, ::2, :], tf.transpose(t, [1, 0, 2])):
        assert tf.reshape(shaped, [-1, 10]).shape[1] == 10
    with pytest.raises(tf.errors.InvalidArgumentError, match="-1"):
        tf.reshape(t, [-1, -1])  # 120 elements: the count is not the issue
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.reshape(t, [-1, 11])


@settings(max_examples=15)
@given(batch=st.integers(1, 4), time=st.integers(2, 8), vocab=st.integers(1, 40),
       scale=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 2**31 - 1))
def test_c1_cell41_tensorflow_gives_the_same_flat_tensors_and_loss(batch, time, vocab,
                                                                   scale, seed):
    """Cell 41: "The flattened tensors are identical element for element, and
    so is the loss up to float32 rounding."  TRUE-GENERAL: any B, T, V
    (1 included) and logit scale; the losses agree to a few float32 units
    in the last place of the loss (relative 2e-6)."""
    gen = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(batch, time, vocab, generator=gen)
    labels = torch.randint(0, vocab, (batch, time), generator=gen)
    flat_logits, flat_labels = flatten_for_cross_entropy(logits, labels)
    tf_logits, tf_labels = tf_shift_and_flatten(logits.numpy(), labels.numpy())
    np.testing.assert_array_equal(tf_logits.numpy(), flat_logits.numpy())
    np.testing.assert_array_equal(tf_labels.numpy(), flat_labels.numpy())
    tf_loss = float(tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf_labels, logits=tf_logits)))
    torch_loss = F.cross_entropy(flat_logits, flat_labels).item()
    assert abs(tf_loss - torch_loss) <= 2e-6 * max(1.0, abs(torch_loss)) + 1e-7


def test_c1_cell41_tensorflow_function_has_no_ignore_index():
    """Cell 41: "the TensorFlow function has no ignore index".  TRUE-GENERAL:
    ``tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits, name)``
    has no such parameter, and a -100 label raises ``InvalidArgumentError``
    on CPU (on GPU it returns NaN for that row, as its docstring says,
    tensorflow/python/ops/nn_ops.py:4449-4451; no GPU here)."""
    params = inspect.signature(tf.nn.sparse_softmax_cross_entropy_with_logits).parameters
    assert list(params) == ["labels", "logits", "name"]
    with pytest.raises(tf.errors.InvalidArgumentError):
        tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.constant([1, IGNORE]), logits=tf.zeros((2, 3)))


# ===========================================================================
# Chapter 2: the LLaVA loss
# ===========================================================================


def _source_material_loss(logits, labels, ignore_index=IGNORE, num_items=None):
    """LLaVA's lines without an attention_mask, as the chapter lists them."""
    vocab = logits.size(-1)
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    reduction = "mean" if num_items is None else "sum"
    loss = nn.CrossEntropyLoss(ignore_index=ignore_index, reduction=reduction)(
        shift_logits.view(-1, vocab), shift_labels.view(-1).to(shift_logits.device))
    return loss if num_items is None else loss / num_items


_LLAVA_BATCHES = [([3], [4]), ([2, 5, 3], [6, 2, 3]), ([1, 1], [1, 7])]


def test_c2_cell0_llava_loss_is_next_token_cross_entropy(tiny_llava):
    """Cell 0: "Its training loss in Hugging Face transformers is the ordinary
    next-token cross-entropy of a causal language model."  TRUE-GENERAL in
    5.23: B = 1 to 3, answer-only labels, labels copied from ``input_ids``
    (first column labelled, image placeholders included) and random -100s:
    the model's ``.loss`` is the float64 formula on its own logits."""
    gen = torch.Generator().manual_seed(0)
    for prompts, answers in _LLAVA_BATCHES:
        batch = llava.build_llava_batch(prompts, answers, seed=len(prompts))
        for labels in (batch.labels, batch.input_ids.clone(),
                       batch.input_ids.masked_fill(
                           torch.rand(batch.input_ids.shape, generator=gen) < 0.5, IGNORE)):
            with torch.no_grad():
                out = tiny_llava(**{**batch.model_inputs(), "labels": labels})
            want = _next_token_loss64(out.logits.double(), labels)
            assert _same_float(out.loss.item(), want, 1e-5)


def test_c2_cell4_processor_always_returns_attention_mask():
    """Cell 4: "``LlavaProcessor`` ... returns an ``attention_mask`` with
    every batch, padded or not".  TRUE-ONLY-IN-CASE: by default, yes (one
    text or several, padding True/False/"max_length", truncation, tensors
    "pt"/"np"/none, text without an image), because the tokenizer returns
    the mask when ``"attention_mask" in self.model_input_names``
    (transformers/tokenization_utils_base.py:2826); but a caller who passes
    ``return_attention_mask=False`` gets a batch without one."""
    processor = llava.tiny_llava_processor()
    image = torch.zeros(3, tm.IMAGE_SIZE, tm.IMAGE_SIZE, dtype=torch.uint8)
    texts = ["<image> a cat", "<image> what is in the picture"]
    calls = [
        dict(text=texts, images=[image, image], padding=True),
        dict(text=texts, images=[image, image], padding="max_length", max_length=40),
        dict(text=texts, images=[image, image], padding=True, return_tensors="np"),
        dict(text=texts, images=[image, image], padding=True, return_tensors=None),
        dict(text=texts[0], images=image, padding=False),
        dict(text=texts[0], images=image, truncation=True, max_length=30),
        dict(text="a cat"),
    ]
    for call in calls:
        call.setdefault("return_tensors", "pt")
        assert "attention_mask" in processor(**call)
    off = processor(text=texts, images=[image, image], padding=True,
                    return_attention_mask=False, return_tensors="pt")
    assert "attention_mask" not in off and "input_ids" in off


def _mask_and_labels(gen, batch, time, vocab, padding):
    mask = torch.ones(batch, time, dtype=torch.long)
    for b in range(batch):
        n = int(torch.randint(0, time + 1, (1,), generator=gen))
        if padding == "right":
            mask[b, time - n:] = 0
        elif padding == "left":
            mask[b, :n] = 0
        elif padding == "random":
            mask[b] = (torch.rand(time, generator=gen) < 0.7).long()
        elif padding == "all":
            mask[b] = 0
    labels = _random_labels(gen, batch, time, vocab, "random")
    return mask, labels


@settings(max_examples=30)
@given(batch=st.integers(1, 3), time=st.integers(1, 7), vocab=st.integers(1, 6),
       padding=st.sampled_from(["none", "right", "left", "random", "all"]),
       seed=st.integers(0, 2**31 - 1))
def test_c2_cell4_filter_equals_no_mask_when_padding_is_minus_100(batch, time, vocab,
                                                                 padding, seed):
    """Cells 4 and 52: "On batches whose padded labels are -100 the two
    branches give the same loss"; "set padded labels to -100, and both
    formulations give the same number".  TRUE-GENERAL: left, right, random,
    full or no padding, B = 1..3, T = 1..7 (T = 1: nan on both): the
    attention-mask filter (the package's 4.46 form, and the releases' lines
    for T >= 2) equals the branch without a mask."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, time, vocab, generator=gen, dtype=torch.float64)
    mask, labels = _mask_and_labels(gen, batch, time, vocab, padding)
    labels = labels.masked_fill(mask == 0, IGNORE)
    no_mask = _next_token_loss64(logits, labels)
    assert _same_float(float(attention_mask_filter_loss(logits, labels, mask)), no_mask, 1e-12)
    assert _same_float(float(shift_and_slice_loss(logits, labels)), no_mask, 1e-12)
    if time >= 2:
        for release in llava.FILTER_RELEASES:
            got = float(llava.release_filter_loss(logits, labels, mask, release))
            assert _same_float(got, no_mask, 1e-12)


@settings(max_examples=20)
@given(ignore_index=st.sampled_from([-100, -1, 0, 3]),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       smoothing=st.sampled_from([0.0, 0.2]), weighted=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_c2_cell4_ignore_index_labels_are_skipped(ignore_index, reduction, smoothing,
                                                   weighted, seed):
    """Cell 4: "Labels equal to the ignore index are skipped by step 5."
    TRUE-GENERAL: for any ``ignore_index`` (negative, or a real class id
    such as 0), every reduction, with label smoothing and class weights,
    the rows whose label is the ignore index change neither the loss nor
    anyone's gradient (their own gradient is 0; ``"none"`` gives 0)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (6,), generator=gen)
    labels[[1, 4]] = ignore_index
    if ignore_index == 3:
        labels[labels == 3] = 2
        labels[[1, 4]] = 3
    kwargs = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing,
                  weight=torch.rand(5, generator=gen, dtype=torch.float64) if weighted else None)
    loss = F.cross_entropy(logits, labels, **kwargs)
    loss.sum().backward()
    moved = logits.detach().clone()
    moved[[1, 4]] = 50 * torch.randn(2, 5, generator=gen, dtype=torch.float64)
    assert torch.allclose(F.cross_entropy(moved, labels, **kwargs), loss.detach(), atol=1e-12)
    assert logits.grad[[1, 4]].abs().max().item() == 0.0
    if reduction == "none":
        assert (loss.detach()[[1, 4]] == 0).all()


@settings(max_examples=10)
@given(dtype=st.sampled_from(FLOATS), time=st.integers(1, 5), seed=st.integers(0, 99))
def test_c2_cell4_package_upcasts_half_to_one_dtype(dtype, time, seed):
    """Cell 4: the package "upcasts half-precision logits to float32 first,
    as every formulation in the package does, so that all of them return
    the same dtype".  TRUE-GENERAL (package): float16 and bfloat16 give
    float32 from all three formulations, float32 and float64 keep theirs,
    T = 1 included."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, time, 4, generator=gen).to(dtype)
    labels = torch.randint(0, 4, (2, time), generator=gen)
    want = torch.float32 if dtype in HALF else dtype
    for loss in (shift_and_slice_loss(logits, labels), label_padding_loss(logits, labels),
                 attention_mask_filter_loss(logits, labels, torch.ones(2, time, dtype=torch.long))):
        assert loss.dtype == want


@settings(max_examples=20)
@given(num_items=st.sampled_from([None, 1, 7, "tensor"]),
       ignore_index=st.sampled_from([-100, -1]), rows=st.integers(0, 6),
       seed=st.integers(0, 2**31 - 1))
def test_c2_cell7_reduce_is_fixed_cross_entropy(num_items, ignore_index, rows, seed):
    """Cell 7: step 5 is "``nn.functional.cross_entropy(flat_logits,
    flat_labels, ignore_index=ignore_index)`` with the default mean, or,
    when ``num_items_in_batch`` is given, the same call with
    ``reduction="sum"`` divided by it, as transformers'
    ``fixed_cross_entropy`` does".  TRUE-GENERAL: bit for bit, with None,
    an int or a tensor count, any ignore index, 0 rows included
    (transformers/loss/loss_utils.py:41-47)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, 5, generator=gen)
    labels = torch.randint(0, 5, (rows,), generator=gen)
    labels[torch.rand(rows, generator=gen) < 0.3] = ignore_index
    count = torch.tensor(9) if num_items == "tensor" else num_items
    ours = _reduce(logits, labels, count, ignore_index)
    theirs = fixed_cross_entropy(logits, labels, count, ignore_index)
    assert torch.equal(ours, theirs) or (ours.isnan() and theirs.isnan())


def test_c2_cell8_cross_entropy_defaults():
    """Cell 8: the defaults of ``nn.CrossEntropyLoss()``: reduction 'mean',
    ignore_index -100, weight None, label_smoothing 0.0.  TRUE-GENERAL: the
    module's and the function's defaults (torch/nn/functional.py:3472-3481)
    are the same four."""
    module = nn.CrossEntropyLoss()
    assert (module.reduction, module.ignore_index, module.weight, module.label_smoothing) == (
        "mean", -100, None, 0.0)
    params = inspect.signature(F.cross_entropy).parameters
    assert {k: params[k].default for k in ("reduction", "ignore_index", "weight",
                                           "label_smoothing")} == {
        "reduction": "mean", "ignore_index": -100, "weight": None, "label_smoothing": 0.0}


@settings(max_examples=25)
@given(rows=st.integers(1, 8), classes=st.integers(1, 6),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_c2_cell10_mean_divides_by_kept_rows(rows, classes, dtype, seed):
    """Cell 10: "with no class weights and no smoothing ... the mean divides
    by the number of rows that are **kept**, not by all B(T-1) rows".
    TRUE-GENERAL with the stated qualifier: mean = sum / |S| for any kept
    count; with class weights the mean divides by the kept rows' weights
    instead (the qualifier is needed)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, classes, generator=gen, dtype=dtype)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    labels[torch.rand(rows, generator=gen) < 0.4] = IGNORE
    kept = int((labels != IGNORE).sum())
    mean = F.cross_entropy(logits, labels).item()
    total = F.cross_entropy(logits, labels, reduction="sum").item()
    if kept == 0:
        assert math.isnan(mean)
        return
    assert _same_float(mean, total / kept, 1e-6)
    weight = torch.rand(classes, generator=gen, dtype=dtype) + 0.5
    weighted = F.cross_entropy(logits, labels, weight=weight).item()
    weighted_sum = F.cross_entropy(logits, labels, weight=weight, reduction="sum").item()
    assert _same_float(weighted, weighted_sum / weight[labels[labels != IGNORE]].sum().item(), 1e-6)


@settings(max_examples=20)
@given(batch=st.integers(1, 3), time=st.integers(1, 6),
       padding=st.sampled_from(["none", "right", "left", "random", "all"]),
       first=st.sampled_from([IGNORE, 0, 5]), seed=st.integers(0, 2**31 - 1))
def test_c2_cell14_column_zero_never_matters(llama, batch, time, padding, first, seed):
    """Cell 14: "A label of -100 in column 0 never matters: the shift
    discards that column before anything is counted."  TRUE-GENERAL: any
    value in column 0 leaves the package's losses, ``ForCausalLMLoss``,
    ``count_scored_targets`` and a model's ``.loss`` unchanged (T = 1
    included)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 63, (batch, time), generator=gen)
    labels = _random_labels(gen, batch, time, 64, padding)
    other = labels.clone()
    other[:, 0] = first
    with torch.no_grad():
        logits = llama(input_ids=ids).logits
        losses = [llama(input_ids=ids, labels=y).loss for y in (labels, other)]
    for fn in (shift_and_slice_loss, label_padding_loss):
        a, b = fn(logits, labels), fn(logits, other)
        assert torch.equal(a, b) or (a.isnan() and b.isnan())
    a, b = (ForCausalLMLoss(logits, y, vocab_size=64) for y in (labels, other))
    assert torch.equal(a, b) or (a.isnan() and b.isnan())
    assert torch.equal(losses[0], losses[1]) or (losses[0].isnan() and losses[1].isnan())
    assert count_scored_targets(labels) == count_scored_targets(other)


def test_c2_cell14_loss_function_picked_from_class_name(tiny_llava):
    """Cell 14: LLaVA's ``forward`` calls ``self.loss_function``, "which
    transformers picks from the class name: ``PreTrainedModel`` takes the
    model's ``loss_type`` from its class name and looks it up in
    ``LOSS_MAPPING``, where ``LlavaForConditionalGeneration``'s ending,
    ``ForConditionalGeneration``, maps to ``ForCausalLMLoss``".  TRUE-GENERAL
    for LLaVA (models/llava/modeling_llava.py:371; modeling_utils.py:
    1277-1285 and 4762-4774; loss/loss_utils.py:187).  The lookup is a regex
    search for a key anywhere in the name, not a suffix match: a subclass
    named ``LlavaForConditionalGenerationWithExtras`` gets the same loss;
    a name with no key falls back to ``ForCausalLMLoss``."""
    assert tiny_llava.loss_type == "ForConditionalGeneration"
    assert tiny_llava.loss_function is ForCausalLMLoss
    assert loss_utils.LOSS_MAPPING["ForConditionalGeneration"] is ForCausalLMLoss
    assert "self.loss_function(" in inspect.getsource(
        transformers.LlavaForConditionalGeneration.forward)
    extras = type("LlavaForConditionalGenerationWithExtras",
                  (transformers.LlavaForConditionalGeneration,), {})
    assert extras(tiny_llava.config).loss_type == "ForConditionalGeneration"
    plain = type("TinyLlavaModelNoKey", (transformers.LlavaForConditionalGeneration,), {})
    model = plain(tiny_llava.config)
    assert model.loss_type is None and model.loss_function is ForCausalLMLoss


@settings(max_examples=30)
@given(batch=st.integers(1, 3), time=st.integers(1, 7), vocab=st.integers(1, 6),
       padding=st.sampled_from(["none", "right", "left", "random", "all"]),
       ignore_index=st.sampled_from([-100, -1]),
       num_items=st.sampled_from([None, 1, 5]), seed=st.integers(0, 2**31 - 1))
def test_c2_cell17_label_padding_and_slicing_are_one_function(batch, time, vocab, padding,
                                                              ignore_index, num_items, seed):
    """Cell 17: the labels get "one extra column of ``ignore_index`` on the
    right ... giving (B, T+1), and ``[..., 1:]`` then shifts them back to
    (B, T)", the last row of each sequence "meets a -100 and is ignored",
    and "the two formulations are one function".  TRUE-GENERAL: any shape
    (T = 1: nan on both), padding, ignore index and ``num_items_in_batch``;
    ``ForCausalLMLoss`` equals the source material's lines to float32
    rounding, and the package's two losses agree in float64 to 1e-12."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, time, vocab, generator=gen)
    labels = _random_labels(gen, batch, time, vocab, padding)
    labels[labels == IGNORE] = ignore_index
    padded = F.pad(labels, (0, 1), value=ignore_index)
    assert padded.shape == (batch, time + 1)
    shifted = padded[..., 1:]
    assert shifted.shape == (batch, time)
    assert torch.equal(shifted[:, :-1], labels[:, 1:])
    assert (shifted[:, -1] == ignore_index).all()
    theirs = ForCausalLMLoss(logits, labels, vocab_size=vocab, ignore_index=ignore_index,
                             num_items_in_batch=num_items).item()
    source = _source_material_loss(logits, labels, ignore_index, num_items).item()
    assert _same_float(theirs, source, 2e-6)
    x64 = logits.double()
    a = label_padding_loss(x64, labels, ignore_index=ignore_index, num_items_in_batch=num_items)
    b = shift_and_slice_loss(x64, labels, ignore_index=ignore_index, num_items_in_batch=num_items)
    assert _same_float(a.item(), b.item(), 1e-12)


def test_c2_cell17_float_cast_first_on_both_routes():
    """Cell 17: "``ForCausalLMLoss`` begins with ``logits.float()``, before
    it touches the labels, so it makes this cast whether it pads the labels
    itself or a collator hands it ``shift_labels``", and "It casts every
    dtype to float32: half precision is upcast, float64 is rounded down,
    and float32 is returned as it is."  TRUE-GENERAL: the first aten op on
    both routes is the float32 ``_to_copy`` for float16/bfloat16/float64
    logits, and none for float32 (``.float()`` returns the same object);
    the loss is float32 for every input dtype and equals the loss of the
    logits rounded to float32 first (loss/loss_utils.py:61)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    shift = F.pad(labels, (0, 1), value=IGNORE)[:, 1:].contiguous()
    for dtype in FLOATS:
        logits = torch.randn(2, 5, 7, generator=gen).to(dtype)
        for kwargs in ({}, {"shift_labels": shift}):
            with _RecordOps() as rec:
                loss = ForCausalLMLoss(logits, labels, vocab_size=7, **kwargs)
            assert loss.dtype == torch.float32
            if dtype != torch.float32:
                assert rec.ops[0] == ("_to_copy", torch.float32)
            else:
                assert "_to_copy" not in [op for op, _ in rec.ops]
            assert torch.equal(loss, ForCausalLMLoss(logits.float(), labels, vocab_size=7, **kwargs))
        assert logits.float().dtype == torch.float32
    same = torch.randn(3)
    assert same.float() is same


def test_c2_cell17_model_logits_are_contiguous(tiny_llava):
    """Cells 17 and 40: "The model's float32 logits are contiguous, so
    ``logits.view(-1, V)`` is free."  TRUE-GENERAL for LLaVA's forward:
    B = 1 and 3, with ``logits_to_keep`` too, the logits are contiguous and
    the view shares their memory.  (Not a property of ``ForCausalLMLoss``:
    handed float32 logits that are not viewable, such as a slice, its
    ``.view`` raises, while the same slice in bfloat16 passes, because the
    cast packs it.)"""
    for prompts, answers in _LLAVA_BATCHES:
        batch = llava.build_llava_batch(prompts, answers, seed=1)
        inputs = {**batch.model_inputs(), "labels": None}
        for keep in (0, 1):
            with torch.no_grad():
                logits = tiny_llava(**inputs, logits_to_keep=keep).logits
            assert logits.dtype == torch.float32 and logits.is_contiguous()
            assert logits.view(-1, logits.size(-1)).data_ptr() == logits.data_ptr()
    sliced = torch.randn(2, 6, 7)[:, :5]
    labels = torch.randint(0, 7, (2, 5))
    with pytest.raises(RuntimeError):
        ForCausalLMLoss(sliced, labels, vocab_size=7)
    ForCausalLMLoss(sliced.bfloat16(), labels, vocab_size=7)


@settings(max_examples=20)
@given(batch=st.integers(1, 4), time=st.integers(1, 5), vocab=st.integers(1, 4))
def test_c2_cell17_shift_and_slice_copies_whenever_batch_above_one(batch, time, vocab):
    """Cell 17: "Shift-and-slice, in contrast, copies in ``.contiguous()``
    whenever B > 1."  TRUE-ONLY-IN-CASE: for T >= 2.  At T = 1 the source
    material's lines run (and give nan) on empty slices, which are
    contiguous, so nothing is copied for any B."""
    logits = torch.randn(batch, time, vocab)
    packed = logits[..., :-1, :].contiguous()
    copied = _storage(packed) != _storage(logits)
    assert copied == (batch > 1 and time >= 2)
    if time == 1:
        assert math.isnan(_source_material_loss(logits, torch.zeros(batch, 1, dtype=torch.long)).item())


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("batch", [1, 3])
def test_c2_cell20_bytes_each_route_copies(dtype, batch):
    """Cell 20: "For float32 logits ``.float()`` copies nothing"; "With
    bfloat16 logits ... ``logits.float()`` writes a full (B, T, V) float32
    copy ... on either route"; with the upcast label padding copies the cast
    "where shift-and-slice copies ... the cast, then its float32 slice";
    "without the upcast it copies nothing where shift-and-slice copies its
    ... bfloat16 slice"; "at B = 1 the slice is already contiguous".
    TRUE-GENERAL (T >= 2), measured on real CPU tensors by storage address
    and size for every float dtype (float16 and float64 behave as bfloat16:
    float64 is cast too)."""
    time, vocab = 4, 5
    logits = torch.randn(batch, time, vocab).to(dtype)
    size = logits.element_size()

    def new_bytes(result, *sources):
        return 0 if any(_storage(result) == _storage(s) for s in sources) else (
            result.numel() * result.element_size())

    cast = logits.float()
    cast_bytes = new_bytes(cast, logits)
    assert cast_bytes == (0 if dtype == torch.float32 else batch * time * vocab * 4)
    padding_view = cast.view(-1, vocab)  # label padding after the cast
    assert new_bytes(padding_view, cast) == 0
    slice_with = new_bytes(cast[..., :-1, :].contiguous(), cast)
    slice_without = new_bytes(logits[..., :-1, :].contiguous(), logits)
    assert slice_with == (0 if batch == 1 else batch * (time - 1) * vocab * 4)
    assert slice_without == (0 if batch == 1 else batch * (time - 1) * vocab * size)
    assert new_bytes(logits.view(-1, vocab), logits) == 0  # label padding, no cast
    # like for like: label padding copies cast_bytes (with) or 0 (without);
    # shift-and-slice copies cast_bytes + slice_with or slice_without
    assert (slice_with > 0) == (slice_without > 0) == (batch > 1)


@settings(max_examples=25)
@given(rows=st.integers(0, 9), num_items=st.integers(1, 40),
       as_tensor=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_c2_cell24_fixed_cross_entropy_sums_and_divides(rows, num_items, as_tensor, seed):
    """Cell 24: "When it is given, ``fixed_cross_entropy`` sums instead of
    averaging and divides by the number it was handed", and "With
    D = |S| this is the mean again."  TRUE-GENERAL: for any D (int or
    tensor), 0 rows included (then 0/D = 0); with D = |S| > 0 it equals the
    mean to float32 rounding."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, 6, generator=gen)
    labels = torch.randint(0, 6, (rows,), generator=gen)
    labels[torch.rand(rows, generator=gen) < 0.3] = IGNORE
    count = torch.tensor(num_items) if as_tensor else num_items
    got = fixed_cross_entropy(logits, labels, count).item()
    total = F.cross_entropy(logits, labels, reduction="sum").item()
    assert _same_float(got, total / num_items, 1e-6)
    kept = int((labels != IGNORE).sum())
    if kept:
        mean = F.cross_entropy(logits, labels).item()
        assert _same_float(fixed_cross_entropy(logits, labels, kept).item(), mean, 2e-6)


@settings(max_examples=20)
@given(counts=st.lists(st.integers(0, 6), min_size=2, max_size=4),
       seed=st.integers(0, 2**31 - 1))
def test_c2_cell24_shared_denominator_gives_the_mean(counts, seed):
    """Cell 24: the average of micro-batch means "gives a target in a short
    micro-batch more weight than one in a long micro-batch", and "Passing
    the total D = sum_k n_k ... to every micro-batch makes the sum of their
    losses exactly the mean over all targets".  TRUE-GENERAL (arithmetic;
    "exactly" up to float rounding, 1e-12 in float64): any K, counts,
    micro-batches of different lengths; a target's weight in the mean of
    means is 1/(K n_k); a micro-batch with no target contributes 0 with D,
    but makes the mean of means nan."""
    gen = torch.Generator().manual_seed(seed)
    if sum(counts) == 0:
        counts = [*counts[:-1], 1]
    micro = []
    for n in counts:
        time = n + 1 + int(torch.randint(0, 3, (1,), generator=gen))
        labels = torch.full((1, time), IGNORE)
        labels[0, 1:n + 1] = torch.randint(0, 5, (n,), generator=gen)
        micro.append((torch.randn(1, time, 5, generator=gen, dtype=torch.float64), labels))
    total = sum(counts)
    shared = sum(label_padding_loss(x, y, num_items_in_batch=total).item() for x, y in micro)
    all_sum = sum(_next_token_loss64(x, y) * n for (x, y), n in zip(micro, counts) if n)
    assert abs(shared - all_sum / total) < 1e-12
    means = [label_padding_loss(x, y).item() for x, y in micro]
    if 0 in counts:
        assert math.isnan(sum(means) / len(means))
        return
    token_losses = [torch.rand(n, dtype=torch.float64, requires_grad=True) for n in counts]
    mean_of_means = sum(t.mean() for t in token_losses) / len(counts)
    mean_of_means.backward()
    for t, n in zip(token_losses, counts):
        assert torch.allclose(t.grad, torch.full_like(t, 1 / (len(counts) * n)))


@settings(max_examples=20)
@given(n_micro=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       first_labelled=st.booleans())
def test_c2_cell28_trainer_counts_labels_after_column_0(n_micro, seed, first_labelled):
    """Cell 28: "In the pinned release, 5.23, its ``num_items_in_batch``
    counts the labels other than -100 in ``labels[..., 1:]`` over the
    micro-batches of one optimiser step when the model's loss maps to
    ``ForCausalLMLoss`` and the model is not an encoder-decoder ..., and
    gathers the count across devices when ``average_tokens_across_devices``
    is on"; ``count_scored_targets`` "follows that 5.23 rule".
    TRUE-ONLY-IN-CASE: when the batch has no ``shift_labels`` key; a batch
    that carries ``shift_labels`` (padding-free collators) is counted on
    those instead, whatever ``labels`` holds (trainer.py:2327-2335).  The
    gather (trainer.py:2340-2342) is checked with a stand-in accelerator.
    Otherwise the rule holds, and ``count_scored_targets`` agrees."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_micro):
        labels = _random_labels(gen, 2, 6, 9, "random")
        if first_labelled:
            labels[:, 0] = 4
        batches.append({"labels": labels})
    got = Trainer._get_num_items_in_batch(_fake_trainer(), batches, torch.device("cpu"))
    want = sum(int(b["labels"][..., 1:].ne(IGNORE).sum()) for b in batches)
    assert int(got) == want == sum(count_scored_targets(b["labels"]) for b in batches)
    unshifted = Trainer._get_num_items_in_batch(_fake_trainer(False), batches,
                                                torch.device("cpu"))
    assert int(unshifted) == sum(int(b["labels"].ne(IGNORE).sum()) for b in batches)
    with_shift = [{**b, "shift_labels": torch.full_like(b["labels"], 1)} for b in batches]
    counted = Trainer._get_num_items_in_batch(_fake_trainer(), with_shift, torch.device("cpu"))
    assert int(counted) == sum(b["labels"].numel() for b in batches)  # not labels[..., 1:]
    gathered = Trainer._get_num_items_in_batch(
        _fake_trainer(average_tokens_across_devices=True, world_size=2), batches,
        torch.device("cpu"))
    assert int(gathered) == 2 * want + 1  # the stand-in's two ranks: x and x + 1


def test_c2_cell28_loss_shifts_labels_condition():
    """Cell 28: the 5.23 rule applies "when the model's loss maps to
    ``ForCausalLMLoss`` and the model is not an encoder-decoder (LLaVA's
    loss does and it is not)".  TRUE-GENERAL: the ``Trainer.__init__``
    condition (trainer.py:543-545) is True for the tiny LLaVA and False for
    T5.  (Aside, not a claim of the chapter: it is also True for
    InstructBLIP with T5, whose top-level config is not encoder-decoder
    although its loss is T5's unshifted one; such a model would be counted
    on ``labels[..., 1:]``.)"""
    def shifts(model):
        return loss_utils.LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss \
            and not getattr(getattr(model, "config", None), "is_encoder_decoder", False)

    assert shifts(tm.tiny_llava(seed=0))
    t5 = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    assert not shifts(t5)
    assert shifts(tm.tiny_instructblip(seed=0, language_model="t5"))
    source = inspect.getsource(Trainer.__init__)
    assert "self._loss_shifts_labels = LOSS_MAPPING.get(" in source
    assert ') is ForCausalLMLoss and not getattr(getattr(model_to_inspect, "config", None), "is_encoder_decoder", False)' in source


@settings(max_examples=20)
@given(batch=st.integers(1, 4), time=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_c2_cell28_counting_rules_differ_by_first_column(batch, time, seed):
    """Cell 28's table: the 4.51.3/4.52.1 line ``labels.ne(-100).sum()``
    counts "one too many per row whose first label is not -100", and "A
    row whose first label is -100 ... is counted the same by all three".
    TRUE-GENERAL as arithmetic on the quoted expressions (the releases
    themselves are run by ``book/version_history.ipynb``)."""
    gen = torch.Generator().manual_seed(seed)
    labels = _random_labels(gen, batch, time, 7, "random")
    every_column = int(labels.ne(IGNORE).sum())
    targets_only = int(labels[..., 1:].ne(IGNORE).sum())
    assert every_column - targets_only == int(labels[:, 0].ne(IGNORE).sum())


def test_c2_cell30_tiny_llava_needs_no_download(monkeypatch):
    """Cell 30 (and cell 6's comment): ``tiny_llava`` "builds a complete
    ``LlavaForConditionalGeneration`` from configuration objects alone, with
    random weights and nothing downloaded"; the processor is "built
    offline".  TRUE-GENERAL: with every socket connection refused, the
    model, the processor and a forward pass work."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    model = tm.tiny_llava(seed=3)
    processor = llava.tiny_llava_processor()
    assert type(model) is transformers.LlavaForConditionalGeneration
    assert type(processor) is transformers.LlavaProcessor
    batch = llava.build_llava_batch([2], [3], seed=0)
    with torch.no_grad():
        assert math.isfinite(model(**batch.model_inputs()).loss.item())


def _default_init_gap(width: int) -> tuple[float, float]:
    """(loss - log V, logit std) of an untrained Llama of hidden size
    ``width`` with the library's default initialisation, V = 64."""
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=width, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        ids = torch.randint(3, 64, (4, 32))
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    return out.loss.item() - math.log(64), out.logits.std().item()


def test_c2_cell30_default_init_tiny_model_near_log_v():
    """Cell 30: "With the default, every logit is nearly 0 and every
    formulation gives nearly log V" (the tiny model, hidden size 16).
    TRUE-GENERAL for that model: default ``initializer_range`` 0.02
    (models/llama/configuration_llama.py:72), logits' spread below 0.2,
    loss within 0.05 of log V; the tiny LLaVA with it too."""
    assert transformers.LlamaConfig().initializer_range == 0.02
    gap, spread = _default_init_gap(tm.HIDDEN_SIZE)
    assert abs(gap) < 0.05 and spread < 0.2
    batch = llava.build_llava_batch([2, 5, 3], [6, 2, 3], seed=0)
    with torch.no_grad():
        loss = tm.tiny_llava(seed=0, text_init_std=0.02)(**batch.model_inputs()).loss
    assert abs(loss.item() - math.log(tm.VOCAB_SIZE)) < 0.05


def test_c2_cell61_default_init_near_log_v_only_when_narrow():
    """Cell 61: "an untrained model with the usual initialisation starts
    near log V".  TRUE-ONLY-IN-CASE: for a narrow model.  With the default
    ``initializer_range`` 0.02 and a normalised final hidden state, the
    logits' spread is about 0.02 * sqrt(d) and the start lies about
    (0.02^2 d) / 2 above log V: within 0.05 at d = 16, but about 0.8 nats
    above at d = 4096 (Llama-2-7B's width), a perplexity some 2.3 times
    V."""
    small, _ = _default_init_gap(16)
    wide, spread = _default_init_gap(4096)
    assert abs(small) < 0.05
    assert wide > 0.5 and spread > 1.0


def test_c2_cell33_one_placeholder_per_patch(tiny_llava):
    """Cell 33: "one per patch; the vision tower's class token is dropped".
    TRUE-GENERAL for LLaVA's default ``vision_feature_select_strategy``
    ("default", models/llava/configuration_llava.py:75), which drops the
    first token (models/llava/modeling_llava.py:166-167); with "full" the
    class token is kept and each image gives one more feature."""
    assert tiny_llava.config.vision_feature_select_strategy == "default"
    pixels = torch.randn(2, 3, tm.IMAGE_SIZE, tm.IMAGE_SIZE)
    layer = tiny_llava.config.vision_feature_layer
    patches = (tm.IMAGE_SIZE // tm.PATCH_SIZE) ** 2
    with torch.no_grad():
        for strategy, expected in (("default", patches), ("full", patches + 1)):
            features = tiny_llava.get_image_features(
                pixel_values=pixels, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy).pooler_output
            assert [f.shape[0] for f in features] == [expected, expected]


@pytest.mark.parametrize("count", [1, 11, 20, "tensor"])
def test_c2_cell41_model_passes_num_items_through(tiny_llava, count):
    """Cell 41: "The same holds with ``num_items_in_batch``, which the model
    passes through to its loss function".  TRUE-GENERAL: for an int or a
    tensor D, the model's loss is the summed loss divided by D."""
    batch = llava.build_llava_batch([2, 5, 3], [6, 2, 3], seed=0)
    d = torch.tensor(7) if count == "tensor" else count
    with torch.no_grad():
        out = tiny_llava(**batch.model_inputs(), num_items_in_batch=d)
    total = _next_token_loss64(out.logits.double(), batch.labels) * count_scored_targets(batch.labels)
    assert _same_float(out.loss.item(), total / int(d), 1e-5)


@pytest.mark.parametrize("mask_len,time", [(13, 13), (16, 13), (5, 2), (4, 1), (1, 1)])
def test_c2_cell44_the_crop_keeps_the_last_t_minus_1_columns(mask_len, time):
    """Cell 44: "The crop keeps the **last** T-1 columns of the mask."
    TRUE-ONLY-IN-CASE: for T >= 2.  At T = 1, ``attention_mask[:, -(T-1):]``
    is ``[:, -0:]`` = ``[:, 0:]``: the whole mask, not zero columns."""
    mask = torch.arange(mask_len).repeat(2, 1)
    crop = mask[:, -(time - 1):]
    if time >= 2:
        assert torch.equal(crop, mask[:, mask_len - (time - 1):])
    else:
        assert crop.shape[1] == mask_len  # everything kept


@pytest.mark.parametrize("time", [1, 2, 3, 13])
def test_c2_cell44_both_crops_agree_on_a_mask_of_logits_length(time):
    """Cells 44 and 46: "For a mask of the logits' length T >= 2 both crops
    keep columns 1, ..., T-1 ... and give the same loss".  TRUE-GENERAL
    with the stated T >= 2; at T = 1 they part (4.45 keeps no column, 4.46
    keeps the whole mask)."""
    mask = torch.arange(time).repeat(3, 1)
    old, new = mask[..., 1:], mask[:, -(time - 1):]
    if time >= 2:
        assert torch.equal(old, new) and torch.equal(new, mask[:, 1:])
    else:
        assert old.shape[1] == 0 and new.shape[1] == 1


@pytest.mark.parametrize("prefix", [1, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_c2_cell44_longer_mask_breaks_the_old_crop(prefix, batch):
    """Cells 44 and 49: with a longer mask (prefix tuning) "the 4.46 crop
    drops them, while the 4.45 crop keeps them, no longer matches the T-1
    logit rows, and the indexing raises an ``IndexError``".  TRUE-GENERAL:
    the quoted lines, any prefix length and batch size."""
    gen = torch.Generator().manual_seed(prefix + batch)
    time, vocab = 6, 5
    logits = torch.randn(batch, time, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, time), generator=gen)
    mask = torch.ones(batch, time, dtype=torch.long)
    mask[0, -2:] = 0
    labels = labels.masked_fill(mask == 0, IGNORE)
    longer = torch.cat([torch.ones(batch, prefix, dtype=torch.long), mask], dim=1)
    with pytest.raises(IndexError):
        logits[..., :-1, :][longer[..., 1:] != 0]
    crop = longer[:, -(logits.shape[1] - 1):]
    kept = F.cross_entropy(logits[..., :-1, :][crop != 0], labels[..., 1:][crop != 0])
    assert abs(kept.item() - _next_token_loss64(logits, labels)) < 1e-12


@settings(max_examples=20)
@given(batch=st.integers(1, 3), time=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_c2_cell44_boolean_indexing_flattens_row_major(batch, time, seed):
    """Cell 44: "Boolean indexing with a (B, T-1) mask flattens as it
    selects, so the pair (b, t) survives when m_{b,t+1} != 0".
    TRUE-GENERAL: the result is (K, V), K the mask's ones, in row-major
    (b, then t) order."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, time, 3, generator=gen)
    mask = torch.rand(batch, time, generator=gen) < 0.6
    picked = logits[..., :-1, :][mask[:, 1:]]
    pairs = [(b, t) for b in range(batch) for t in range(time - 1) if mask[b, t + 1]]
    assert picked.shape == (len(pairs), 3)
    for row, (b, t) in zip(picked, pairs):
        assert torch.equal(row, logits[b, t])


def test_c2_cell44_sets_and_losses_equal_exactly_when_padding_is_minus_100():
    """Cell 44: "The two sets are equal, and so are the losses, exactly when
    every padded target is already -100".  TRUE-ONLY-IN-CASE: the sets are
    equal exactly then, and then the losses are; but the losses can also be
    equal when the sets differ, whenever the padded targets' mean loss
    equals the others' (cell 66's weighted average): with uniform logits,
    for instance, every pair costs log V on both sides."""
    gen = torch.Generator().manual_seed(0)
    batch, time, vocab = 2, 6, 5
    labels = torch.randint(0, vocab, (batch, time), generator=gen)
    mask = torch.ones(batch, time, dtype=torch.long)
    mask[0, -2:] = 0  # padding that carries real labels
    for logits, equal in ((torch.zeros(batch, time, vocab), True),
                          (3 * torch.randn(batch, time, vocab, generator=gen), False)):
        with_mask = attention_mask_filter_loss(logits, labels, mask).item()
        without = label_padding_loss(logits, labels).item()
        assert (abs(with_mask - without) < 1e-6) == equal
    filtered = labels.masked_fill(mask == 0, IGNORE)
    assert int((labels[:, 1:] != IGNORE).sum()) != int((filtered[:, 1:] != IGNORE).sum())


@pytest.mark.parametrize("prompts,answers", [([3], [4]), ([2, 5, 3], [6, 2, 3]),
                                             ([1, 4], [7, 1])])
def test_c2_cell55_family_losses_on_other_batches(prompts, answers):
    """Cell 55: "Every decoder-only model reports the package's
    shift-and-slice loss to within 1e-6 ...  The exception is InstructBLIP
    with T5, whose loss ... equals the *unshifted* cross-entropy".
    TRUE-GENERAL: on other batches (B = 1, one-token answers), for all five
    decoder-only models and for T5; the five classes' ``forward`` calls
    ``self.loss_function`` ("in 5.23 all of them call self.loss_function")."""
    for cls in (transformers.LlavaForConditionalGeneration,
                transformers.VipLlavaForConditionalGeneration,
                transformers.InstructBlipForConditionalGeneration,
                transformers.GPTBigCodeForCausalLM, transformers.GPTNeoXJapaneseForCausalLM):
        assert "self.loss_function(" in inspect.getsource(cls.forward)
    batch = llava.build_llava_batch(prompts, answers, seed=len(prompts))
    for check in llava.check_family_losses(batch, seed=1):
        if check.language_model.startswith("T5"):
            assert abs(check.model_loss - check.unshifted) < 1e-6
        else:
            assert abs(check.model_loss - check.shift_and_slice) < 1e-6


@settings(max_examples=25)
@given(batch=st.integers(1, 3), time=st.integers(1, 6),
       padding=st.sampled_from(["none", "right", "left", "random", "all"]),
       seed=st.integers(0, 2**31 - 1))
def test_c2_cell55_t5_decoder_input_is_labels_shifted_right(tiny_t5, batch, time, padding, seed):
    """Cells 55-58: "its decoder receives the answer shifted one step to the
    **right**, starting from a start token", and "the same id later in a row
    is padding, where ``_shift_right`` replaced a -100".  TRUE-GENERAL
    (models/t5/modeling_t5.py:628-635): any labels, -100 anywhere (the last
    column is dropped whatever it holds)."""
    gen = torch.Generator().manual_seed(seed)
    labels = _random_labels(gen, batch, time, 32, padding)
    shifted = tiny_t5._shift_right(labels)
    assert (shifted[:, 0] == tiny_t5.config.decoder_start_token_id).all()
    previous = labels[:, :-1]
    assert torch.equal(shifted[:, 1:], previous.masked_fill(previous == IGNORE,
                                                            tiny_t5.config.pad_token_id))


def test_c2_cell58_t5_start_token_is_its_padding_token():
    """Cell 58: "T5's start token is its padding token".  TRUE-ONLY-IN-CASE:
    it is the convention of T5's checkpoints (``_shift_right``'s own message:
    "In T5 it is usually set to the pad_token_id", models/t5/modeling_t5.py:
    624), and the tiny model sets it so; the library's ``T5Config`` has
    no start token at all, so a T5 built from a bare config cannot shift its
    labels."""
    config = transformers.T5Config(vocab_size=16, d_model=8, d_kv=4, d_ff=8, num_layers=1,
                                   num_heads=2)
    assert config.pad_token_id == 0
    assert getattr(config, "decoder_start_token_id", None) is None
    with pytest.raises((AttributeError, ValueError)):
        transformers.T5ForConditionalGeneration(config)._shift_right(torch.tensor([[3, 4]]))
    blip = tm.tiny_instructblip(seed=0, language_model="t5").config.text_config
    assert blip.decoder_start_token_id == blip.pad_token_id


def test_c2_cell58_t5_loss_is_unshifted_cross_entropy(tiny_t5):
    """Cell 58: "Decoder position t has seen the answer up to token t-1, so
    its logits are already aligned with label t, and T5's loss is a plain
    ``CrossEntropyLoss`` over ``logits.view(-1, V)`` and ``labels.view(-1)``.
    Shifting the labels again ... would score each position against the
    token after the one it should predict."  TRUE-GENERAL
    (models/t5/modeling_t5.py:1049-1054): changing label k leaves decoder
    logits 0..k unchanged and changes k+1; the loss is the unshifted
    cross-entropy (with -100s too), not the shifted one."""
    gen = torch.Generator().manual_seed(0)
    encoder_ids = torch.randint(2, 32, (2, 5), generator=gen)
    labels = torch.randint(2, 32, (2, 6), generator=gen)
    labels[1, 4:] = IGNORE
    with torch.no_grad():
        out = tiny_t5(input_ids=encoder_ids, labels=labels)
        for k in range(labels.shape[1] - 1):
            other = labels.clone()
            other[:, k] = (other[:, k] + 5) % 30 + 2
            moved = tiny_t5(input_ids=encoder_ids, labels=other).logits
            assert torch.allclose(moved[:, :k + 1], out.logits[:, :k + 1], atol=1e-6)
            assert (moved[:, k + 1] - out.logits[:, k + 1]).abs().max() > 1e-6
    unshifted = F.cross_entropy(out.logits.view(-1, 32), labels.view(-1))
    shifted = F.cross_entropy(out.logits[:, :-1].reshape(-1, 32), labels[:, 1:].reshape(-1))
    assert abs(out.loss.item() - unshifted.item()) < 1e-6
    assert abs(out.loss.item() - shifted.item()) > 1e-3


@settings(max_examples=20)
@given(vocab=st.integers(1, 50), rows=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_c2_cell58_loss_in_nats_and_perplexity(vocab, rows, seed):
    """Cell 58: "The loss is a mean negative log-likelihood per target token,
    in nats.  Its exponential is the perplexity, ... the inverse of the
    geometric-mean probability given to the correct next token: a model
    that spread its probability evenly over V tokens would have perplexity
    V."  TRUE-GENERAL: natural logarithms; exp(loss) = 1 / geometric mean of
    p(target); uniform logits give exactly log V and V."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    loss = F.cross_entropy(logits, labels).item()
    p = torch.softmax(logits, -1)[torch.arange(rows), labels]
    geometric = math.exp(torch.log(p).mean().item())
    assert abs(math.exp(loss) - 1 / geometric) < 1e-9 * math.exp(loss)
    uniform = F.cross_entropy(torch.zeros(rows, vocab, dtype=torch.float64), labels).item()
    assert abs(uniform - math.log(vocab)) < 1e-12
    assert abs(math.exp(uniform) - vocab) < 1e-9 * vocab


@settings(max_examples=20)
@given(counts=st.lists(st.integers(1, 6), min_size=2, max_size=4),
       seed=st.integers(0, 2**31 - 1))
def test_c2_cell58_exp_of_mean_of_means_is_not_perplexity(counts, seed):
    """Cell 58: "the exponential of an average of per-batch means is not the
    perplexity".  TRUE-ONLY-IN-CASE: not when the batches hold different
    numbers of targets (and their means differ): the average of means
    misses the overall mean by sum_k (1/K - n_k/N) m_k; when every batch
    holds the same number of targets that gap is 0, and the exponential of
    the average of means is the perplexity."""
    gen = torch.Generator().manual_seed(seed)
    per_token = [torch.rand(n, generator=gen, dtype=torch.float64) * 5 for n in counts]
    means = [t.mean().item() for t in per_token]
    overall = torch.cat(per_token).mean().item()
    k, total = len(counts), sum(counts)
    gap = sum((1 / k - n / total) * m for n, m in zip(counts, means))
    assert abs(sum(means) / k - overall - gap) < 1e-12
    equal = [t[: min(counts)] for t in per_token]
    equal_mean_of_means = sum(t.mean().item() for t in equal) / k
    assert abs(math.exp(equal_mean_of_means) - math.exp(torch.cat(equal).mean().item())) \
        < 1e-9 * math.exp(overall)
    skew = [torch.tensor([1.0], dtype=torch.float64),
            torch.tensor([3.0, 3.0, 3.0], dtype=torch.float64)]
    assert abs(math.exp((1.0 + 3.0) / 2) - math.exp(torch.cat(skew).mean().item())) > 1.0


@settings(max_examples=15)
@given(dtype=st.sampled_from(FLOATS), rows=st.integers(0, 5),
       smoothing=st.sampled_from([0.0, 0.1]), weighted=st.booleans())
def test_c2_cell61_no_target_gives_nan(dtype, rows, smoothing, weighted):
    """Cell 61: "When **no** label survives, |S| = 0 and the mean is 0/0,
    which PyTorch reports as ``nan``."  TRUE-GENERAL: every float dtype,
    zero rows or all rows ignored, with label smoothing or class weights;
    ``ForCausalLMLoss`` too, T = 1 included."""
    logits = torch.randn(rows, 4).to(dtype)
    labels = torch.full((rows,), IGNORE)
    weight = torch.rand(4).to(dtype) if weighted else None
    loss = F.cross_entropy(logits, labels, weight=weight, label_smoothing=smoothing)
    assert math.isnan(loss.float().item())
    for time in (1, 3):
        assert math.isnan(ForCausalLMLoss(torch.randn(2, time, 4).to(dtype),
                                          torch.full((2, time), IGNORE), vocab_size=4).item())


@pytest.mark.parametrize("dtype", FLOATS)
def test_c2_cell65_summed_reduction_gives_zero(dtype):
    """Cell 65: "The summed reduction has no division, and with
    ``num_items_in_batch`` the micro-batch contributes 0".  TRUE-GENERAL:
    every dtype, int or tensor count, ``ForCausalLMLoss`` and the package."""
    logits = torch.randn(2, 4, 6).to(dtype)
    labels = torch.full((2, 4), IGNORE)
    for count in (1, torch.tensor(17)):
        assert ForCausalLMLoss(logits, labels, vocab_size=6, num_items_in_batch=count).item() == 0.0
        assert label_padding_loss(logits, labels, num_items_in_batch=count).item() == 0.0


def test_c2_cell65_nan_mean_has_zero_gradient():
    """Cell 65: "The backward pass of the ``nan`` mean puts a zero gradient
    on every parameter".  TRUE-GENERAL: the tiny LLaVA in float32 and
    bfloat16, B = 1 and 3, and plain cross-entropy in every float dtype:
    every gradient is exactly 0, none is nan."""
    for prompts, answers in ((([2, 5, 3], [6, 2, 3])), ([4], [1])):
        batch = llava.build_llava_batch(prompts, answers, seed=0)
        inputs = {**batch.model_inputs(), "labels": torch.full_like(batch.labels, IGNORE)}
        for dtype in (torch.float32, torch.bfloat16):
            model = tm.tiny_llava(seed=0).to(dtype)
            inputs["pixel_values"] = batch.pixel_values.to(dtype)
            loss = model(**inputs).loss
            assert math.isnan(loss.item())
            loss.backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            assert grads and all(torch.count_nonzero(g) == 0 for g in grads)
    for dtype in FLOATS:
        z = torch.randn(3, 4).to(dtype).requires_grad_()
        F.cross_entropy(z, torch.full((3,), IGNORE)).backward()
        assert torch.count_nonzero(z.grad) == 0


def test_c2_cell65_optimizer_moves_weights_on_zero_gradient():
    """Cell 65: "an optimiser step taken on it alone can still move the
    weights through momentum or weight decay".  TRUE-GENERAL: with zero
    gradients, AdamW's decoupled weight decay and SGD's momentum buffer
    move the weights; plain SGD (neither) does not."""
    def step(opt_cls, warm, **kwargs):
        w = nn.Parameter(torch.ones(3))
        opt = opt_cls([w], lr=0.1, **kwargs)
        if warm:
            w.grad = torch.ones(3)
            opt.step()
        before = w.detach().clone()
        w.grad = torch.zeros(3)
        opt.step()
        return not torch.equal(before, w.detach())

    assert step(torch.optim.AdamW, False, weight_decay=0.1)
    assert step(torch.optim.SGD, True, momentum=0.9)
    assert step(torch.optim.Adam, True)  # its running averages
    assert not step(torch.optim.SGD, True)


def test_c2_cell65_one_nan_poisons_a_running_average():
    """Cell 65: "one ``nan`` in a logged running average makes the whole
    average ``nan``".  TRUE-GENERAL (IEEE 754): a sum, a mean and an
    exponential moving average with one nan are nan, in Python floats,
    NumPy and torch."""
    values = [2.0, 3.0, float("nan"), 1.0]
    assert math.isnan(sum(values) / len(values))
    assert np.isnan(np.mean(values)) and torch.tensor(values).mean().isnan()
    ema = 0.0
    for v in values:
        ema = 0.9 * ema + 0.1 * v
    assert math.isnan(ema)


@settings(max_examples=20)
@given(batch=st.integers(1, 3), time=st.integers(2, 7), seed=st.integers(0, 2**31 - 1))
def test_c2_cell67_loss_is_weighted_average_of_subsets(batch, time, seed):
    """Cell 67: "Both losses are means of the same per-pair terms: the sum
    over S_ans u S_pad splits into a sum over S_ans plus a sum over S_pad,
    and each of those is its size times its mean."  TRUE-GENERAL
    (arithmetic): for any split of the targets into two non-empty sets the
    whole mean is the count-weighted average of the two means."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, time, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 6, (batch, time), generator=gen)
    split = torch.rand(batch, time, generator=gen) < 0.5
    a = labels.masked_fill(split, IGNORE)
    b = labels.masked_fill(~split, IGNORE)
    na, nb = count_scored_targets(a), count_scored_targets(b)
    whole = label_padding_loss(logits, labels).item()
    if na and nb:
        weighted = (na * label_padding_loss(logits, a).item()
                    + nb * label_padding_loss(logits, b).item()) / (na + nb)
        assert abs(weighted - whole) < 1e-12


@settings(max_examples=20)
@given(batch=st.integers(1, 3), time=st.integers(1, 6), extra=st.integers(1, 8),
       tail=st.sampled_from(["random", "huge", "nan", "inf"]),
       seed=st.integers(0, 2**31 - 1))
def test_c2_cell75_appended_ignored_columns_change_nothing(batch, time, extra, tail, seed):
    """Cells 74-75: padding to a fixed length with -100 columns leaves the
    loss unchanged, "whatever the logits of ignored rows are, they do not
    enter the result".  TRUE-GENERAL for the loss value: random, huge
    (1e30), nan and inf logits in the appended rows, T = 1 included (nan
    stays nan).  (The gradient is another matter: ignored rows with nan or
    inf logits get a nan gradient, finite ones a zero gradient.)"""
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(batch, time, 5, generator=gen)
    labels = _random_labels(gen, batch, time, 5, "random")
    fill = {"random": 5 * torch.randn(batch, extra, 5, generator=gen),
            "huge": torch.full((batch, extra, 5), 1e30),
            "nan": torch.full((batch, extra, 5), float("nan")),
            "inf": torch.full((batch, extra, 5), float("inf"))}[tail]
    longer = torch.cat([logits, fill], dim=1).requires_grad_()
    longer_labels = F.pad(labels, (0, extra), value=IGNORE)
    a = label_padding_loss(logits, labels).item()
    b = label_padding_loss(longer, longer_labels)
    assert _same_float(b.item(), a, 1e-6)
    if not math.isnan(a):
        b.backward()
        tail_grad = longer.grad[:, time:]
        if tail in ("nan", "inf"):
            assert tail_grad.isnan().all()
        else:
            assert torch.count_nonzero(tail_grad) == 0
