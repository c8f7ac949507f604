"""The claims of chapters 3 and 4 about library behaviour, checked in general.

Each test checks one sentence of ``book/03_cross_entropy.ipynb`` (``c3``) or
``book/04_keras_masking.ipynb`` (``c4``); the test name carries the chapter
and the index of the cell that makes the claim, and the docstring quotes it.
The book's own cells check its one example; these tests try the cases the
example does not cover (other shapes, dtypes, paddings, ignore indices,
backends, reductions).  Every test asserts what the installed libraries
actually do (torch 2.13 CPU, transformers 5.23, Keras 3.15.1, tf-keras 2.21,
TensorFlow 2.21), so where a sentence is true only in part the test asserts
the boundary, and its docstring says so (``TRUE-ONLY-IN-CASE`` or
``FALSE``).

Keras on the torch backend needs ``KERAS_BACKEND=torch`` before Keras is
imported, so one fresh process (started by the first test, collected by the
last ones) runs those checks.

Claims about older releases (Keras 2.9-2.11, Keras 3.6/3.7, transformers
4.45-4.52) are not re-checked here: ``book/version_history.ipynb`` runs them.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import pathlib
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import companion  # noqa: F401  (first: quietens TensorFlow's C++ logging)
import keras
import tensorflow as tf
import tf_keras
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM, Trainer
from transformers.loss.loss_utils import ForCausalLMLoss

from companion.experiments import keras_masking as km
from companion.experiments.cross_entropy import keras_fit_class_weight
from companion.experiments.tiny_models import tiny_llama_config

SITE = pathlib.Path(torch.__file__).parents[1]
KERAS_SRC = pathlib.Path(keras.__file__).parent / "src"
EPS32 = 2.0**-24  # unit roundoff of float32
IGNORE = -100

km.quiet_retracing_warnings()

# ---------------------------------------------------------------------------
# Keras on the torch backend: one fresh process, started early
# ---------------------------------------------------------------------------

_TORCH_BACKEND_SCRIPT = r"""
import json, math
import numpy as np
import keras, torch

out = {"backend": keras.backend.backend()}
C = 5
rng = np.random.default_rng(0)
logits_scce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
probs_scce = keras.losses.SparseCategoricalCrossentropy()
zeros = np.zeros((2, C), np.float32)
for name, label in (("minus100", -100), ("minus1", -1)):
    try:
        out[name] = float(logits_scce(np.array([0, label]), zeros))
    except Exception as error:
        out[name] = type(error).__name__
for c in (5, 100000):
    row = np.zeros((1, c), np.float32)
    row[0, 1] = 40.0
    out[f"cap_{c}"] = float(probs_scce(np.array([0]), keras.ops.softmax(row)))
    out[f"from_logits_{c}"] = float(logits_scce(np.array([0]), row))
for name, row in (("all_far", [0.0, 40.0, 0.0, 0.0, 0.0]),
                  ("two_near", [0.0, 20.0, 20.0, 0.0, 0.0]),
                  ("inside", [0.0, 3.0, 0.0, 0.0, 0.0])):
    x = torch.tensor([row], requires_grad=True)
    probs_scce(np.array([0]), torch.softmax(x, dim=-1)).backward()
    out[f"grad_{name}"] = x.grad[0].tolist()
ignore = keras.losses.SparseCategoricalCrossentropy(
    from_logits=True, ignore_class=-100)
cases = []
for n, c in ((6, 5), (1, 3), (9, 9)):
    lg = rng.normal(size=(n, c)).astype(np.float32)
    y = rng.integers(0, c, n)
    y[rng.random(n) < 0.4] = -100
    y[0] = 0
    cases.append([float(ignore(y, lg)), float(torch.nn.functional.cross_entropy(
        torch.from_numpy(lg), torch.from_numpy(y)))])
out["ignore_class_vs_torch"] = cases
out["all_ignored"] = float(ignore(np.full(4, -100), rng.normal(size=(4, C))))
inputs = keras.Input(shape=(None,), dtype="int32")
emb = keras.layers.Embedding(6, C, mask_zero=True)
dense = keras.layers.Dense(C, activation="softmax")
model = keras.Model(inputs, dense(emb(inputs)))
table = rng.normal(size=(6, C)).astype(np.float32)
emb.set_weights([table])
dense.set_weights([np.eye(C, dtype=np.float32), np.zeros(C, np.float32)])
tokens = np.array([[1, 2, 3, 0, 0], [0, 0, 4, 1, 2], [5, 5, 5, 5, 5]], np.int32)
labels = rng.integers(0, C, tokens.shape).astype(np.int32)
pred = model(tokens)
out["masked_call"] = float(keras.losses.SparseCategoricalCrossentropy()(labels, pred))
model.compile(loss="sparse_categorical_crossentropy")
out["masked_evaluate"] = float(model.evaluate(tokens, labels, verbose=0))
logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
nll = -logp[tokens, labels]
real = tokens != 0
out["token_mean"] = float(nll[real].mean())
w = real.astype(np.float32)
out["sw_default"] = float(keras.losses.SparseCategoricalCrossentropy()(
    labels, pred.detach().cpu().numpy(), sample_weight=w))
out["sw_all_positions"] = float((nll * w).sum() / w.size)
keras.config.set_backend("tensorflow")
import keras as keras_again
out["after_set_backend"] = keras_again.backend.backend()
print(json.dumps(out))
"""

_torch_backend_process: subprocess.Popen | None = None


def _start_torch_backend() -> subprocess.Popen:
    global _torch_backend_process
    if _torch_backend_process is None:
        _torch_backend_process = subprocess.Popen(
            [sys.executable, "-c", _TORCH_BACKEND_SCRIPT],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, KERAS_BACKEND="torch",
                     TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1"),
        )
    return _torch_backend_process


@pytest.fixture(scope="module", autouse=True)
def _torch_backend_started():
    """Start the torch-backend process with the first test of this file, and
    run this file's tiny torch ops on one thread (on a busy 2-core machine,
    intra-op threads make them some 30 times slower); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _start_torch_backend()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def on_torch() -> dict:
    process = _start_torch_backend()
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert result["backend"] == "torch"
    return result


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _nll64(logits, labels) -> np.ndarray:
    """Exact float64 ``-log softmax(logits)[label]``; labels must be valid."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(labels)[..., None], axis=-1)
    return -picked[..., 0]


def _with_mask(tensor, mask):
    """A TensorFlow tensor carrying a Keras mask, as a masked model output."""
    out = tf.identity(tf.convert_to_tensor(tensor))
    out._keras_mask = tf.constant(np.asarray(mask, bool))
    return out


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])


def _fake_trainer(loss_shifts_labels: bool = True) -> SimpleNamespace:
    """The attributes ``Trainer._get_num_items_in_batch`` reads, one device."""
    return SimpleNamespace(
        model_accepts_loss_kwargs=True, compute_loss_func=None,
        _loss_shifts_labels=loss_shifts_labels,
        args=SimpleNamespace(average_tokens_across_devices=False,
                             world_size=1, n_gpu=1),
        get_tp_size=lambda: 1, get_cp_size=lambda: 1, get_sp_size=lambda: 1,
    )


class _RecordOps(TorchDispatchMode):
    """Every aten operator one call reaches, with its output's shape."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else ()
        self.ops.append((func._schema.name.split("::")[-1], shape))
        return out


@pytest.fixture(scope="module")
def llama():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture(scope="module")
def gpt2():
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1,
                        n_head=2, bos_token_id=1, eos_token_id=2,
                        pad_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return GPT2LMHeadModel(config).eval()


# ===========================================================================
# Chapter 3: Cross-entropy = log-softmax + NLL
# ===========================================================================


@settings(max_examples=8)
@given(seed=st.integers(0, 2**32 - 1), vocab=st.integers(2, 3),
       length=st.integers(1, 3))
def test_c3_cell6_chain_rule_factors_every_joint_distribution(seed, vocab, length):
    """Cell 6: "which is no approximation: every distribution over sequences
    factors this way", and "Dividing by the number of targets moves no
    minimum".  TRUE-GENERAL (mathematics): a random joint distribution over
    all ``V**T`` sequences, zeros included, equals the product of its
    conditionals on every sequence of positive probability."""
    rng = _rng(seed)
    joint = rng.random((vocab,) * length) * (rng.random((vocab,) * length) > 0.3)
    joint[(0,) * length] += 0.1
    joint /= joint.sum()
    def marginal(prefix):               # P(x_0, ..., x_t) = sum over the rest
        return joint[prefix].sum()

    for seq in np.ndindex(*joint.shape):
        if joint[seq] == 0:
            continue
        product = marginal(seq[:1])     # P(x_0)
        for t in range(1, length):      # P(x_t | x_0 .. x_{t-1})
            product *= marginal(seq[:t + 1]) / marginal(seq[:t])
        assert abs(product - joint[seq]) <= 1e-12 * max(1.0, joint[seq])
    # the argmin of a sum and of the same sum over |S| > 0 is the same model
    candidate_sums = rng.random(7)
    for count in (1, 3, 1000):
        assert np.argmin(candidate_sums / count) == np.argmin(candidate_sums)


def test_c3_cell6_label_minus_100_is_input_not_target(llama):
    """Cell 6: "A label of -100 puts a token among the inputs and not among
    the targets".  TRUE-GENERAL: with the prompt's labels at -100 the
    model's ``.loss`` is the mean ``-log p`` of the answer targets only, and
    the prompt tokens still change it (they are read as inputs)."""
    gen = torch.Generator().manual_seed(3)
    for batch, length, prompt in ((1, 6, 2), (3, 9, 4), (2, 3, 1)):
        ids = torch.randint(3, 63, (batch, length), generator=gen)
        labels = ids.clone()
        labels[:, :prompt] = IGNORE
        with torch.no_grad():
            out = llama(input_ids=ids, labels=labels)
            logp = torch.log_softmax(out.logits[:, :-1].double(), -1)
        targets = ids[:, 1:]
        scored = labels[:, 1:] != IGNORE
        picked = logp.gather(-1, targets[..., None])[..., 0]
        assert abs(out.loss.item() + picked[scored].mean().item()) < 1e-5
        other = ids.clone()
        other[:, 0] = (other[:, 0] - 3 + 7) % 60 + 3   # another prompt token
        with torch.no_grad():
            moved = llama(input_ids=other, labels=labels).loss
        assert abs(moved.item() - out.loss.item()) > 1e-6


@settings(max_examples=8)
@given(batch=st.integers(1, 3), length=st.integers(1, 10),
       seed=st.integers(0, 2**31 - 1), family=st.sampled_from(["llama", "gpt2"]))
def test_c3_cell11_one_pass_equals_prefix_passes(llama, gpt2, batch, length,
                                                 seed, family):
    """Cell 11: "one forward pass over a whole training text yields all T - 1
    distributions at once: the same ones that T - 1 separate passes over its
    prefixes ... would give".  TRUE-GENERAL for causal transformers: tiny
    Llama (RoPE) and GPT-2 (learned positions), B = 1..3, T = 1..10, float32
    rounding only."""
    model = llama if family == "llama" else gpt2
    ids = torch.randint(3, 63, (batch, length),
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        whole = model(input_ids=ids).logits
        prefixes = torch.stack([model(input_ids=ids[:, :t + 1]).logits[:, -1]
                                for t in range(length)], dim=1)
    assert (whole - prefixes).abs().max().item() < 1e-5


@settings(max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), classes=st.integers(2, 9))
def test_c3_cell13_kl_nonnegative_zero_only_at_q_and_decomposition(seed, classes):
    """Cell 13: "The KL divergence is never negative, and zero only for
    p = q", and H(q, p) = H(q) + KL(q || p).  TRUE-GENERAL: torch's
    ``F.kl_div``, ``F.cross_entropy`` with probability targets and
    ``Categorical.entropy`` in float64, with zeros in q."""
    rng = _rng(seed)
    q = rng.random(classes) * (rng.random(classes) > 0.3)
    q[0] += 0.05
    q = torch.from_numpy(q / q.sum())
    p = torch.from_numpy(rng.dirichlet(np.full(classes, 0.5)) + 1e-12)
    p = p / p.sum()
    kl = F.kl_div(p.log(), q, reduction="sum").item()
    kl_self = F.kl_div(q.clamp_min(1e-300).log(), q, reduction="sum").item()
    cross = F.cross_entropy(p.log()[None], q[None]).item()
    entropy = torch.distributions.Categorical(probs=q).entropy().item()
    assert kl >= -1e-12 and abs(kl_self) < 1e-12
    if (p - q).abs().max() > 1e-3:
        assert kl > 0
    assert abs(cross - (entropy + kl)) < 1e-10


@settings(max_examples=30)
@given(seed=st.integers(0, 2**32 - 1), vocab=st.integers(2, 6))
def test_c3_cell16_markov_expected_loss_is_rate_plus_weighted_kl(seed, vocab):
    """Cell 16: a bigram model Q on a stationary chain A pays
    "sum_i pi_i H(A_i, Q_i) = H_rate + sum_i pi_i KL(A_i || Q_i)", with
    H_rate = sum_i pi_i H(A_i).  TRUE-GENERAL (mathematics), random chains."""
    rng = _rng(seed)
    A = rng.dirichlet(np.ones(vocab), size=vocab) * 0.95 + 0.05 / vocab
    Q = rng.dirichlet(np.ones(vocab), size=vocab)
    values, vectors = np.linalg.eig(A.T)
    pi = np.real(vectors[:, np.argmin(np.abs(values - 1))])
    pi /= pi.sum()
    assert np.allclose(pi @ A, pi, atol=1e-12)
    rate = -(pi[:, None] * A * np.log(A)).sum()
    paid = -(pi[:, None] * A * np.log(Q)).sum()
    kl = (pi[:, None] * A * np.log(A / Q)).sum()
    assert abs(paid - (rate + kl)) < 1e-12 and kl >= 0


def test_c3_cell16_zero_logits_give_log_v():
    """Cell 16/47: "every first prediction is uniform and the first loss is
    exactly log V"; "all-equal logits give ... l_n = log C".  TRUE-GENERAL
    up to rounding: float64 within a few ulps (not always bit-equal to
    ``math.log(V)`` once the mean runs over N > 1 rows), float32 to its
    rounding, for V = 1 .. 50257 and any constant logit."""
    for vocab in (1, 2, 3, 10, 1000, 32000, 50257):
        for rows in (1, 7, 64):
            for const in (0.0, -3.5, 1e4):
                for dtype, tol in ((torch.float64, 8 * 2.0**-52),
                                   (torch.float32, 8 * EPS32)):
                    loss = F.cross_entropy(
                        torch.full((rows, vocab), const, dtype=dtype),
                        torch.zeros(rows, dtype=torch.long)).item()
                    assert abs(loss - math.log(vocab)) <= tol * max(
                        1.0, math.log(vocab) + abs(const)), (vocab, rows, dtype)


def test_c3_cell20_every_library_reports_nats():
    """Cell 20: "PyTorch, TensorFlow and transformers report nats".
    TRUE-GENERAL: uniform logits over k classes give ln k (not log2 k) in
    ``F.cross_entropy``, ``tf.nn.sparse_softmax_cross_entropy_with_logits``,
    Keras 3 and tf-keras ``SparseCategoricalCrossentropy`` and
    ``ForCausalLMLoss``."""
    for k in (2, 10, 1000):
        z = np.zeros((3, k), np.float32)
        y = np.array([0, 1, k - 1])
        values = {
            "torch": F.cross_entropy(torch.from_numpy(z), torch.from_numpy(y)).item(),
            "tf.nn": float(tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=z))),
            "keras": float(keras.losses.SparseCategoricalCrossentropy(
                from_logits=True)(y, z)),
            "tf_keras": float(tf_keras.losses.SparseCategoricalCrossentropy(
                from_logits=True)(y, z)),
            "transformers": ForCausalLMLoss(
                torch.zeros(1, 4, k), torch.tensor([[0, 1, k - 1, 0]]),
                vocab_size=k).item(),
        }
        for name, value in values.items():
            assert abs(value - math.log(k)) < 1e-5 * math.log(k), name
            assert abs(value - math.log2(k)) > 0.1, name


@settings(max_examples=40)
@given(probs=st.lists(st.floats(1e-6, 1.0), min_size=1, max_size=30),
       k=st.integers(1, 50000))
def test_c3_cell20_perplexity_identities(probs, k):
    """Cell 20: "PPL = exp(L) = 2^(L / ln 2) = (prod 1/p)^(1/|S|), the
    geometric mean of 1/p", and a model uniform over k tokens has perplexity
    k; one nat is 1/ln 2 bits.  TRUE-GENERAL (mathematics), and the
    package's ``perplexity``/``nats_to_bits`` agree."""
    from companion import cross_entropy as ce

    p = np.array(probs)
    loss = float(-np.log(p).mean())
    geometric = float(np.exp(np.log(1 / p).mean()))
    assert math.isclose(math.exp(loss), 2 ** (loss / math.log(2)), rel_tol=1e-12)
    assert math.isclose(math.exp(loss), geometric, rel_tol=1e-12)
    assert math.isclose(ce.perplexity(-np.log(p).sum(), len(p)), geometric,
                        rel_tol=1e-12)
    assert math.isclose(ce.perplexity(len(p) * math.log(k), len(p)), k,
                        rel_tol=1e-12)
    assert math.isclose(ce.nats_to_bits(1.0), 1 / math.log(2), rel_tol=1e-15)


@settings(max_examples=25)
@given(seed=st.integers(0, 2**32 - 1), vocab=st.integers(2, 5),
       length=st.integers(2, 40))
def test_c3_cell20_counting_is_the_maximum_likelihood_table(seed, vocab, length):
    """Cell 20: "That lowest table is the maximum-likelihood estimate, and
    for a table it is found by counting: the frequency of each word pair".
    TRUE-GENERAL (mathematics): the counted table's NLL is below that of
    random tables and of perturbations of the counts."""
    rng = _rng(seed)
    text = rng.integers(0, vocab, length)
    counts = np.zeros((vocab, vocab))
    np.add.at(counts, (text[:-1], text[1:]), 1.0)
    rows = counts.sum(1, keepdims=True)
    counted = np.where(rows > 0, counts / np.where(rows > 0, rows, 1), 1 / vocab)

    def nll(table):
        return -np.log(table[text[:-1], text[1:]]).sum()

    best = nll(counted)
    for _ in range(20):
        other = rng.dirichlet(np.ones(vocab), size=vocab)
        assert nll(other) >= best - 1e-9
        mixed = 0.9 * counted + 0.1 * other
        assert nll(mixed) >= best - 1e-9


@settings(max_examples=40)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)),
                    min_size=1, max_size=40))
def test_c3_cell28_characters_are_not_bytes(text):
    """Cell 28: ""café" is 4 characters and 5 bytes in UTF-8", so bits per
    byte are at most the bits per character.  TRUE-GENERAL: a character is
    1 to 4 UTF-8 bytes."""
    assert (len("café"), len("café".encode("utf-8"))) == (4, 5)
    chars, nbytes = len(text), len(text.encode("utf-8"))
    assert chars <= nbytes <= 4 * chars
    total_nats = 123.4
    assert total_nats / nbytes / math.log(2) <= total_nats / chars / math.log(2)


def test_c3_cell35_forcausallmloss_returns_float32_for_every_dtype():
    """Cell 35: "Transformers returns it in float32: ForCausalLMLoss casts
    the logits with .float() first" (transformers/loss/loss_utils.py:61).
    TRUE-GENERAL, including float64 logits, which it *down*casts: the
    float64 result is the float32 one."""
    gen = torch.Generator().manual_seed(0)
    logits64 = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 7, (2, 5), generator=gen)
    labels[0, :2] = IGNORE
    exact = F.cross_entropy(logits64[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        loss = ForCausalLMLoss(logits64.to(dtype), labels, vocab_size=7)
        assert loss.dtype == torch.float32, dtype
        assert abs(loss.item() - exact.item()) < 2e-2
    as64 = ForCausalLMLoss(logits64, labels, vocab_size=7)
    as32 = ForCausalLMLoss(logits64.float(), labels, vocab_size=7)
    assert torch.equal(as64, as32)


@settings(max_examples=12)
@given(batch=st.integers(1, 4), length=st.integers(2, 8),
       side=st.sampled_from(["right", "left", "none", "mixed"]),
       seed=st.integers(0, 2**31 - 1))
def test_c3_cell38_transformers_loss_is_the_token_mean(llama, batch, length,
                                                       side, seed):
    """Cell 38: "Transformers 5.23 computes the token mean: ForCausalLMLoss
    ... and the .loss of the tiny LlamaForCausalLM on padded batches ...
    match it and not the sequence mean".  TRUE-GENERAL (without
    ``num_items_in_batch``): any B, T, left/right/no padding, sequences with
    no target at all."""
    rng = _rng(seed)
    ids = torch.from_numpy(rng.integers(3, 63, (batch, length)))
    labels = ids.clone()
    lengths = rng.integers(1, length + 1, batch)
    if side == "none":
        lengths[:] = length
    lengths[0] = max(lengths[0], 2)          # at least one target overall
    for b, n in enumerate(lengths):
        pad = length - n
        if side == "right" or (side == "mixed" and b % 2):
            labels[b, n:] = IGNORE
        else:
            labels[b, :pad] = IGNORE
    attention = (labels != IGNORE).long()
    with torch.no_grad():
        out = llama(input_ids=ids, attention_mask=attention, labels=labels)
    logp = torch.log_softmax(out.logits[:, :-1].double(), -1)
    targets = labels[:, 1:]
    scored = targets != IGNORE
    nll = -logp.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    token_mean = nll[scored].mean().item()
    assert abs(out.loss.item() - token_mean) < 1e-5 * max(1.0, token_mean)
    direct = ForCausalLMLoss(out.logits, labels, vocab_size=64)
    assert abs(direct.item() - token_mean) < 1e-5 * max(1.0, token_mean)


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(2, 5),
       length=st.integers(2, 6), as_int=st.booleans())
def test_c3_cell38_num_items_in_batch_makes_the_split_the_token_mean(
        seed, batch, length, as_int):
    """Cell 38: "every micro-batch must divide its summed loss by one count,
    the scored targets of the whole step, which transformers passes to the
    loss as num_items_in_batch".  TRUE-GENERAL: for random splits (an empty
    micro-batch included), the micro-batch losses with the step's count add
    up to the full batch's token mean; ``num_items_in_batch`` as int or
    tensor."""
    rng = _rng(seed)
    logits = torch.from_numpy(rng.normal(size=(batch, length, 6)))
    labels = torch.from_numpy(rng.integers(0, 6, (batch, length)))
    labels[torch.from_numpy(rng.random((batch, length)) < 0.4)] = IGNORE
    labels[0, :] = IGNORE                     # a sequence with no target
    labels[-1, -1] = 1                        # ... and one target somewhere
    labels[-1, :-1] = IGNORE
    count = int((labels[:, 1:] != IGNORE).sum())
    assert count >= 1
    full = ForCausalLMLoss(logits, labels, vocab_size=6)
    cuts = sorted(set(rng.integers(1, batch, size=2).tolist()))
    bounds = [0, *cuts, batch]
    total = 0.0
    for start, stop in zip(bounds[:-1], bounds[1:]):
        items = count if as_int else torch.tensor(count)
        total += ForCausalLMLoss(logits[start:stop], labels[start:stop],
                                 vocab_size=6, num_items_in_batch=items).item()
    assert abs(total - full.item()) < 1e-6
    empty = ForCausalLMLoss(logits[:1], labels[:1], vocab_size=6,
                            num_items_in_batch=torch.tensor(count))
    assert empty.item() == 0.0


def test_c3_cell47_untrained_model_starts_near_log_v_only_with_small_init():
    """Cell 47: "an untrained language model starts near log V".
    TRUE-ONLY-IN-CASE: only when the initial logits are small (a small
    ``initializer_range`` relative to the hidden size).  The book's own tiny
    Llama (``initializer_range=0.4``, the default of ``tiny_llama_config``)
    starts more than 1 nat above log 64; at 0.02 it starts within 0.05."""
    ids = torch.randint(3, 63, (4, 16), generator=torch.Generator().manual_seed(0))
    start = {}
    for std in (0.02, 0.4):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = LlamaForCausalLM(tiny_llama_config(std)).eval()
        with torch.no_grad():
            start[std] = model(input_ids=ids, labels=ids).loss.item()
    assert abs(start[0.02] - math.log(64)) < 0.05
    assert start[0.4] - math.log(64) > 1.0


def test_c3_cell47_float32_and_float16_limits():
    """Cells 47 and 56: float32's largest finite number is about 3.40e38,
    exp overflows above z = 88.72; its smallest positive (subnormal) number
    is 2^-149 "so a ratio below half of that rounds to 0"; float16 overflows
    in exp above z = 11.09.  TRUE-GENERAL in the default floating-point
    mode (subnormals on).  Boundary: with ``torch.set_flush_denormal(True)``
    (flush-to-zero) every result below 2^-126 is already 0."""
    f32 = torch.float32
    assert f"{torch.finfo(f32).max:.2e}" == "3.40e+38"
    limit = math.log(torch.finfo(f32).max)
    assert 88.72 < limit < 88.73
    assert torch.isfinite(torch.exp(torch.tensor(88.72, dtype=f32)))
    assert torch.isinf(torch.exp(torch.tensor(88.73, dtype=f32)))
    tiny = torch.tensor(2.0**-149, dtype=f32)
    assert tiny.item() == 2.0**-149 and tiny.item() > 0
    num, den = torch.tensor(2.0**-100, dtype=f32), torch.tensor(2.0**50, dtype=f32)
    assert (num / den).item() == 0.0                          # exactly half: 0
    assert ((0.9 * num) / den).item() == 0.0                  # below half: 0
    assert ((1.5 * num) / den).item() == 2.0**-149            # above half: kept
    assert np.float32(2.0**-100) / np.float32(2.0**50) == 0    # NumPy alike
    half_limit = math.log(torch.finfo(torch.float16).max)
    assert 11.08 < half_limit < 11.10
    assert torch.isfinite(torch.exp(torch.tensor(11.08, dtype=torch.float16)))
    assert torch.isinf(torch.exp(torch.tensor(11.10, dtype=torch.float16)))
    # bfloat16 shares float32's exponent range: the same limit, not float16's
    assert torch.isfinite(torch.exp(torch.tensor(80.0, dtype=torch.bfloat16)))
    if torch.set_flush_denormal(True):
        try:
            a, b = torch.tensor(2.0**-70, dtype=f32), torch.tensor(2.0**70, dtype=f32)
            assert (a / b).item() == 0.0          # 2^-140, a subnormal, flushed
        finally:
            torch.set_flush_denormal(False)
    a, b = torch.tensor(2.0**-70, dtype=f32), torch.tensor(2.0**70, dtype=f32)
    assert (a / b).item() == 2.0**-140


_F32_MAX = float(np.finfo(np.float32).max)
_finite32 = st.floats(-_F32_MAX, _F32_MAX, allow_nan=False, allow_infinity=False,
                      width=32)


@settings(max_examples=60)
@given(row=st.lists(_finite32, min_size=1, max_size=40))
def test_c3_cell47_shifted_sum_lies_in_1_C_and_its_log_is_finite(row):
    """Cell 47: "Now every exponent is <= 0, so nothing overflows, and ...
    the sum lies in [1, C] and its log is finite".  TRUE-GENERAL for finite
    float32 logits of any size (up to +-3.4e38); ``torch.log_softmax``
    never returns nan or +inf for them (an entry more than float32's range
    below the maximum is -inf, the correctly rounded value)."""
    z = torch.tensor([row], dtype=torch.float32)
    shifted = z - z.max(dim=1, keepdim=True).values
    total = torch.exp(shifted).sum(dim=1)
    assert 1.0 <= total.item() <= len(row)
    assert math.isfinite(torch.log(total).item())
    out = torch.log_softmax(z, dim=1)
    assert not torch.isnan(out).any() and not torch.isposinf(out).any()
    assert out.max().item() <= 0.0


@settings(max_examples=40)
@given(exponent=st.integers(-2, 30), classes=st.integers(2, 100),
       seed=st.integers(0, 2**31 - 1))
def test_c3_cell47_log_softmax_rounding_scales_with_logit_size(exponent, classes,
                                                               seed):
    """Cell 47: "What rounding remains is proportional to the size of the
    logits times the unit roundoff, rather than unbounded".  TRUE-GENERAL:
    float32 ``torch.log_softmax`` and per-row ``F.cross_entropy`` stay
    within 4 u (max|z| + log C) of the float64 result on the same inputs,
    for logits up to 1e30."""
    rng = _rng(seed)
    z = torch.from_numpy((rng.normal(size=(8, classes)) * 10.0**exponent)
                         .astype(np.float32))
    y = torch.from_numpy(rng.integers(0, classes, 8))
    bound = 4 * EPS32 * (z.abs().max().item() + math.log(classes))
    err = (torch.log_softmax(z, 1).double() - torch.log_softmax(z.double(), 1)).abs()
    assert err.max().item() <= bound
    row32 = F.cross_entropy(z, y, reduction="none").double()
    row64 = F.cross_entropy(z.double(), y, reduction="none")
    assert (row32 - row64).abs().max().item() <= bound


@settings(max_examples=40)
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32,
                              torch.float64]),
       fractions=st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=20))
def test_c3_cell52_torch_softmax_never_overflows(dtype, fractions):
    """Cell 52: "torch.softmax itself subtracts the maximum, so it never
    overflows, but taking the log afterwards cannot recover a probability of
    e^-120 that has already rounded to 0".  TRUE-GENERAL for finite logits
    up to each dtype's largest number; and only float32 (and narrower)
    loses e^-120: float64 keeps it, so log(softmax) is finite there."""
    big = torch.finfo(dtype).max
    z = torch.tensor([[f * big for f in fractions]], dtype=torch.float64).to(dtype)
    p = torch.softmax(z, dim=1)
    assert torch.isfinite(p).all()
    assert abs(p.double().sum().item() - 1.0) < 1e-2
    row = torch.tensor([[90.0, 0.0, -30.0]])
    assert torch.isneginf(torch.log(torch.softmax(row, 1)))[0, 2]
    assert F.nll_loss(torch.log(torch.softmax(row, 1)), torch.tensor([2])).item() == math.inf
    log64 = torch.log(torch.softmax(row.double(), 1))
    assert abs(log64[0, 2].item() + 120.0) < 1e-9


def test_c3_cell56_module_forward_calls_functional_and_cpp_kernel(monkeypatch):
    """Cell 56: "its forward ... hands everything to F.cross_entropy, which
    calls the C++ kernel cross_entropy_loss" (torch/nn/modules/loss.py:1400,
    torch/nn/functional.py:3555).  TRUE-GENERAL: both calls are made, with
    the module's arguments."""
    seen = {}
    real_functional = torch.nn.modules.loss.F.cross_entropy

    def spy_functional(*args, **kwargs):
        seen["functional"] = kwargs
        return real_functional(*args, **kwargs)

    real_kernel = torch._C._nn.cross_entropy_loss

    def spy_kernel(*args, **kwargs):
        seen["kernel"] = args
        return real_kernel(*args, **kwargs)

    monkeypatch.setattr(torch.nn.modules.loss.F, "cross_entropy", spy_functional)
    monkeypatch.setattr(torch._C._nn, "cross_entropy_loss", spy_kernel)
    module = torch.nn.CrossEntropyLoss(ignore_index=3, label_smoothing=0.2,
                                       reduction="sum")
    module(torch.randn(4, 5), torch.tensor([0, 3, 1, 2]))
    assert seen["functional"]["ignore_index"] == 3
    assert seen["functional"]["label_smoothing"] == 0.2
    # cross_entropy_loss(input, target, weight, reduction, ignore_index, smoothing)
    assert tuple(seen["kernel"][4:6]) == (3, 0.2)


@settings(max_examples=60)
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32,
                              torch.float64]),
       layout=st.sampled_from(["NC", "BCT", "BCHW", "N1"]),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       weighted=st.booleans(), ignore_index=st.sampled_from([-100, 0, 2]),
       all_ignored=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_c3_cell59_cross_entropy_is_nll_of_log_softmax_bit_for_bit(
        dtype, layout, reduction, weighted, ignore_index, all_ignored, seed):
    """Cells 59, 65 and 144: CrossEntropyLoss "is equivalent to applying
    LogSoftmax on an input, followed by NLLLoss", "In both dtypes and for
    every reduction ... the same bits".  TRUE-GENERAL for class-index
    targets without label smoothing: float16, bfloat16, float32, float64;
    (N, C), (B, C, T), (B, C, H, W) and N = 1 inputs; class weights; any
    ignore_index; every target ignored."""
    gen = torch.Generator().manual_seed(seed)
    classes = 4
    shape = {"NC": (6, classes), "BCT": (2, classes, 3),
             "BCHW": (2, classes, 2, 3), "N1": (1, classes)}[layout]
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    target_shape = (shape[0],) + shape[2:]
    y = torch.randint(0, classes, target_shape, generator=gen)
    y[torch.rand(target_shape, generator=gen) < 0.3] = ignore_index
    if all_ignored:
        y[...] = ignore_index
    w = torch.rand(classes, generator=gen).to(dtype) + 0.1 if weighted else None
    one_call = torch.nn.CrossEntropyLoss(weight=w, ignore_index=ignore_index,
                                         reduction=reduction)(x, y)
    composed = torch.nn.NLLLoss(weight=w, ignore_index=ignore_index,
                                reduction=reduction)(torch.nn.LogSoftmax(dim=1)(x), y)
    assert _same_bits(one_call, composed)


@pytest.mark.parametrize("shape", [(5, 4), (2, 4, 3), (2, 4, 2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"reduction": "sum"},
                                     {"label_smoothing": 0.1},
                                     {"weight": "w", "reduction": "none"}])
def test_c3_cell68_two_kernels_and_no_fusion_for_class_targets(shape, dtype, options):
    """Cells 65-68: "Two kernels run forward, _log_softmax and
    nll_loss_forward, and their backward counterparts in reverse; the same
    holds in float64, for every reduction, with label smoothing, and for
    (B, C, T) inputs.  Nothing is fused."  TRUE-GENERAL for class-index
    targets on this CPU build (for 4-D inputs the second kernel is
    ``nll_loss2d_forward``).  Boundary: with *probability* targets there is
    no nll_loss kernel at all (log-softmax, then mul and sum)."""
    options = dict(options)
    if options.get("weight") == "w":
        options["weight"] = torch.rand(shape[1]).to(dtype)
    x = torch.randn(shape).to(dtype).requires_grad_(True)
    y = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    with _RecordOps() as rec:
        loss = F.cross_entropy(x, y, **options)
        loss.backward(torch.ones_like(loss))
    names = [name for name, _ in rec.ops]
    first = [n for n in names if n in ("_log_softmax",) or n.startswith("nll_loss")]
    assert first[0] == "_log_softmax" and first[1].startswith("nll_loss")
    assert first[1].endswith("_forward")
    assert rec.ops[names.index("_log_softmax")][1] == shape
    assert any(n.startswith("nll_loss") and n.endswith("_backward") for n in names)
    assert "_log_softmax_backward_data" in names
    assert not any("cross_entropy" in n for n in names)
    if shape == (5, 4) and dtype == torch.float32 and not options:
        soft = torch.softmax(torch.randn(shape), 1)
        with _RecordOps() as rec_soft:
            F.cross_entropy(x, soft)
        soft_names = [n for n, _ in rec_soft.ops]
        assert "_log_softmax" in soft_names
        assert not any(n.startswith("nll_loss") for n in soft_names)


@pytest.mark.parametrize("shape", [(7, 5), (2, 5, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c3_cell68_log_probabilities_are_saved_for_backward(shape, dtype):
    """Cell 68: "_log_softmax writes a full (N, C) tensor of
    log-probabilities, as large as the logits, and keeps it for the backward
    pass".  TRUE-GENERAL: autograd saves a tensor equal to
    ``log_softmax(x)``, of the logits' shape."""
    x = torch.randn(shape).to(dtype).requires_grad_(True)
    y = torch.randint(0, shape[1], (shape[0],) + shape[2:])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        F.cross_entropy(x, y)
    expected = torch.log_softmax(x.detach(), dim=1)
    assert any(t.shape == x.shape and t.dtype == dtype and torch.equal(t, expected)
               for t in saved)


@settings(max_examples=50)
@given(rows=st.integers(1, 12), classes=st.integers(1, 12),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31 - 1))
def test_c3_cell70_reductions(rows, classes, dtype, seed):
    """Cell 70: ""none" returns the N per-row losses, with 0 on ignored rows;
    "sum" adds them; "mean" divides the sum by the number of rows that are
    not ignored".  TRUE-GENERAL: N = 1, C = 1, any ignore pattern (every
    row ignored is cell 89's case)."""
    rng = _rng(seed)
    x = torch.from_numpy(rng.normal(size=(rows, classes))).to(dtype)
    y = torch.from_numpy(rng.integers(0, classes, rows))
    y[torch.from_numpy(rng.random(rows) < 0.4)] = IGNORE
    y[0] = 0
    kept = y != IGNORE
    none = F.cross_entropy(x, y, reduction="none")
    ref = _nll64(x.double().numpy()[kept.numpy()], y[kept].numpy())
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert (none[~kept] == 0).all()
    assert np.allclose(none[kept].double().numpy(), ref, atol=tol, rtol=tol)
    total = F.cross_entropy(x, y, reduction="sum")
    mean = F.cross_entropy(x, y)
    assert abs(total.item() - none.sum().item()) <= tol * (1 + abs(total.item()))
    assert abs(mean.item() - total.item() / int(kept.sum())) <= tol * (1 + mean.item())


_BAD = st.sampled_from([math.inf, -math.inf, math.nan, 1e30, -1e30, 0.0])


@settings(max_examples=60)
@given(seed=st.integers(0, 2**31 - 1),
       values=st.lists(_BAD, min_size=5, max_size=5),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       weighted=st.booleans(), reduction=st.sampled_from(["mean", "sum"]))
def test_c3_cell73_ignored_rows_any_values_same_loss(seed, values, dtype,
                                                     weighted, reduction):
    """Cell 73: "any values, even inf or nan, give the same loss, and the
    row's gradient is exactly zero unless the row holds a +inf or nan
    logit".  The loss part is TRUE-GENERAL (bit for bit, with weights, both
    reductions).  The gradient part is FALSE as stated: the gradient is
    zero exactly when the ignored row has no +inf/nan *and is not entirely
    -inf*; an all -inf row gets nan (see the next test)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 5, generator=gen).to(dtype)
    y = torch.tensor([IGNORE, 1, IGNORE, 3])
    w = (torch.rand(5, generator=gen) + 0.1).to(dtype) if weighted else None
    clean = F.cross_entropy(x, y, weight=w, reduction=reduction)
    dirty = x.clone()
    dirty[0] = torch.tensor(values, dtype=torch.float64).to(dtype)
    dirty[2] = -math.inf if seed % 3 == 0 else dirty[2]
    dirty.requires_grad_(True)
    loss = F.cross_entropy(dirty, y, weight=w, reduction=reduction)
    assert _same_bits(loss.detach(), clean)
    loss.backward()
    for r in (0, 2):
        row = dirty.detach()[r]
        poisoned = bool(torch.isposinf(row).any() or torch.isnan(row).any()
                        or torch.isneginf(row).all())
        if poisoned:
            assert torch.isnan(dirty.grad[r]).all()
        else:
            assert (dirty.grad[r] == 0).all()
    assert torch.isfinite(dirty.grad[[1, 3]]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
def test_c3_cell73_an_all_minus_inf_ignored_row_poisons_the_gradient(dtype):
    """Cells 73, 76, 99 and 144: "the row's gradient is exactly zero unless
    the row holds a +inf or nan logit"; "-inf (vocabulary masking) leaves
    every gradient finite".  FALSE: an ignored row whose logits are all
    -inf (a fully masked position) holds neither +inf nor nan, yet its
    softmax is 0/0 and its gradient is nan, which reaches every parameter
    that produced it; the loss stays finite.  (Cell 82 states the exception;
    these sentences do not.)"""
    x = torch.randn(3, 4).to(dtype)
    x[0] = -math.inf
    bias = torch.zeros(4, dtype=dtype, requires_grad=True)
    logits = x + bias
    logits.retain_grad()
    loss = F.cross_entropy(logits, torch.tensor([IGNORE, 1, 2]))
    loss.backward()
    assert math.isfinite(loss.item())
    assert torch.isnan(logits.grad[0]).all()
    assert torch.isnan(bias.grad).all()


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 8),
       classes=st.integers(2, 8), weighted=st.booleans())
def test_c3_cell76_the_two_backward_kernels(seed, rows, classes, weighted):
    """Cell 76: "nll_loss_backward writes -w_{y_n} / sum w into the target
    entry of each kept row and nothing anywhere else", and the log-softmax
    backward "maps a row's g to g - p_n sum_c g_c".  TRUE-GENERAL."""
    rng = _rng(seed)
    logp = torch.log_softmax(torch.from_numpy(rng.normal(size=(rows, classes))), 1)
    y = torch.from_numpy(rng.integers(0, classes, rows))
    y[torch.from_numpy(rng.random(rows) < 0.3)] = IGNORE
    y[0] = 1
    w = torch.from_numpy(rng.random(classes) + 0.1) if weighted else torch.ones(
        classes, dtype=torch.float64)
    kept = y != IGNORE
    total_weight = w[y[kept]].sum()
    grad = torch.ops.aten.nll_loss_backward(
        torch.tensor(1.0, dtype=torch.float64), logp, y,
        w if weighted else None, 1, IGNORE, total_weight)
    expected = torch.zeros_like(logp)
    expected[kept.nonzero()[:, 0], y[kept]] = -w[y[kept]] / total_weight
    assert torch.allclose(grad, expected, rtol=0, atol=1e-15)
    g = torch.from_numpy(rng.normal(size=(rows, classes)))
    back = torch.ops.aten._log_softmax_backward_data(g, logp, 1, torch.float64)
    assert torch.allclose(back, g - logp.exp() * g.sum(1, keepdim=True),
                          rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_c3_cell82_non_finite_logits_case_by_case(dtype):
    """Cell 82: "Only -inf is harmless, wherever it sits, unless it fills a
    whole row ... On the target class of a scored row it makes that row's
    loss inf, but the gradient stays the finite (p_n - e_{y_n})/|S|.  +inf
    and nan make the gradient of their row nan wherever they sit, and in a
    scored row the loss too."  TRUE-GENERAL, three dtypes."""
    y = torch.tensor([IGNORE, 1, 2])
    base = torch.tensor([[0.5, -1.0, 2.0, 0.0]] * 3).to(dtype)

    def run(row, col, value):
        x = base.clone()
        if col is None:
            x[row] = value
        else:
            x[row, col] = value
        x.requires_grad_(True)
        loss = F.cross_entropy(x, y)
        loss.backward()
        return loss.detach(), x.grad

    for value in (math.inf, math.nan):
        for row, col in ((0, 3), (1, 0), (1, 1), (2, None)):
            loss, grad = run(row, col, value)
            assert torch.isnan(grad[row]).all()
            others = [r for r in range(3) if r != row]
            assert torch.isfinite(grad[others]).all()
            assert torch.isnan(loss) if row > 0 else torch.isfinite(loss)
    loss, grad = run(1, 1, -math.inf)                 # -inf at the target
    assert torch.isposinf(loss) and torch.isfinite(grad).all()
    p = torch.softmax(base[1].double().clone().index_fill_(0, torch.tensor([1]),
                                                           -math.inf), 0)
    expected = (p - F.one_hot(torch.tensor(1), 4)) / 2
    assert torch.allclose(grad[1].double(), expected, atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    for row, col in ((0, 3), (1, 0)):
        loss, grad = run(row, col, -math.inf)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss, grad = run(1, None, -math.inf)              # a scored row all -inf
    assert torch.isnan(loss) and torch.isnan(grad[1]).all()


def test_c3_cell82_any_integer_as_ignore_index_in_torch_but_not_in_the_trainer():
    """Cell 82: "The value -100 is only a convention shared by PyTorch and
    Hugging Face transformers: it is not a class, and any integer can be
    chosen."  TRUE-ONLY-IN-CASE: in PyTorch (and ``ForCausalLMLoss``'s
    ``ignore_index=``) any int64 works, C and 2**40 included; but the
    transformers ``Trainer`` counts ``num_items_in_batch`` with
    ``labels.ne(-100)`` hard-coded (transformers/trainer.py:2335), so
    labels padded with another value are counted as targets."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, generator=gen)
    for ignore in (-1, -100, 4, 2**40, -(2**62)):
        y = torch.tensor([0, ignore, 3, ignore, 1])
        loss = F.cross_entropy(x, y, ignore_index=ignore)
        kept = torch.tensor([0, 2, 4])
        assert abs(loss.item() - F.cross_entropy(x[kept], y[kept]).item()) < 1e-6
    logits = torch.randn(1, 5, 4, generator=gen)
    minus1 = torch.tensor([[-1, -1, 2, 3, 1]])
    minus100 = torch.where(minus1 == -1, IGNORE, minus1)
    assert torch.equal(ForCausalLMLoss(logits, minus1, vocab_size=4, ignore_index=-1),
                       ForCausalLMLoss(logits, minus100, vocab_size=4))
    count = {}
    for name, labels in (("-100", minus100), ("-1", minus1)):
        count[name] = Trainer._get_num_items_in_batch(
            _fake_trainer(), [{"labels": labels}], torch.device("cpu")).item()
    assert count["-100"] == 3 and count["-1"] == 4


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), classes=st.integers(2, 6))
def test_c3_cell82_ignore_index_on_a_real_class_drops_its_rows(seed, classes):
    """Cell 82: "Choosing a real class (say ignore_index=0) silently removes
    every row whose target is that class".  TRUE-GENERAL."""
    rng = _rng(seed)
    x = torch.from_numpy(rng.normal(size=(10, classes)))
    y = torch.from_numpy(rng.integers(0, classes, 10))
    y[0], y[1] = 0, 1
    kept = y != 0
    dropped = F.cross_entropy(x, y, ignore_index=0)
    assert abs(dropped.item() - F.cross_entropy(x[kept], y[kept]).item()) < 1e-12
    assert (F.cross_entropy(x, y, ignore_index=0, reduction="none")[~kept] == 0).all()


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]),
       scale=st.sampled_from([10.0, 0.001, 3.7]))
def test_c3_cell82_weighted_mean_divides_by_the_weights(seed, dtype, scale):
    """Cell 82: with weights "the mean becomes a weighted average ...
    sum w l / sum w", and "multiplying every weight by 10 leaves the mean
    unchanged (and multiplies "sum" by 10)".  TRUE-GENERAL up to rounding,
    any positive factor."""
    rng = _rng(seed)
    x = torch.from_numpy(rng.normal(size=(9, 5))).to(dtype)
    y = torch.from_numpy(rng.integers(0, 5, 9))
    y[[2, 5]] = IGNORE
    w = torch.from_numpy(rng.random(5) + 0.05).to(dtype)
    rows = F.cross_entropy(x, y, weight=w, reduction="none")
    kept = y != IGNORE
    mean = F.cross_entropy(x, y, weight=w)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(mean.item() - (rows.sum() / w[y[kept]].sum()).item()) <= tol
    assert abs(F.cross_entropy(x, y, weight=scale * w).item() - mean.item()) <= tol * (1 + mean.item())
    total = F.cross_entropy(x, y, weight=w, reduction="sum")
    assert abs(F.cross_entropy(x, y, weight=scale * w, reduction="sum").item()
               - scale * total.item()) <= tol * scale * (1 + total.item())


def test_c3_cell85_per_row_weights_then_mean_divides_by_all_rows():
    """Cell 85: "Code that "applies class weights" by multiplying the
    per-row losses and then taking .mean() computes the second number
    [sum w l / |S|], not the first."  FALSE when rows are ignored, as in the
    chapter's batch: ``.mean()`` of the ``reduction="none"`` output divides
    by all N rows (ignored ones hold 0), giving sum w l / N.  It gives
    sum w l / |S| only when no row is ignored (or when the ignored rows are
    dropped first)."""
    rng = _rng(0)
    n_rows, classes = 12, 10
    x = torch.from_numpy(rng.normal(scale=3.0, size=(n_rows, classes)))
    y = torch.from_numpy(rng.integers(0, classes, n_rows))
    y[[0, 1, 6]] = IGNORE
    w = torch.linspace(0.2, 2.0, classes, dtype=torch.float64)
    kept = y != IGNORE
    per_row = F.cross_entropy(x, y, reduction="none") * w[y.clamp(min=0)] * kept
    weighted_sum = per_row.sum().item()
    naive = per_row.mean().item()
    assert abs(naive - weighted_sum / n_rows) < 1e-12
    assert abs(naive - weighted_sum / int(kept.sum())) > 1e-2
    assert abs(per_row[kept].mean().item() - weighted_sum / int(kept.sum())) < 1e-12
    all_kept = y.clamp(min=0)
    per_row_all = F.cross_entropy(x, all_kept, reduction="none") * w[all_kept]
    assert abs(per_row_all.mean().item() - per_row_all.sum().item() / n_rows) < 1e-12


@settings(max_examples=50)
@given(seed=st.integers(0, 2**31 - 1), epsilon=st.floats(0.0, 1.0),
       weighted=st.booleans(), reduction=st.sampled_from(["mean", "sum", "none"]),
       classes=st.integers(2, 7))
def test_c3_cell85_label_smoothing_formula_with_weights(seed, epsilon, weighted,
                                                         reduction, classes):
    """Cell 85: l = (1 - eps)(-log p_y) + eps/C sum_c (-log p_c); "With
    weights, PyTorch weights each class's term by w_c, l = -sum_c w_c q_c
    log p_c, and still divides the mean by sum_n w_{y_n}".  TRUE-GENERAL:
    every reduction, ignored rows, eps in [0, 1]."""
    rng = _rng(seed)
    x = torch.from_numpy(rng.normal(size=(7, classes)))
    y = torch.from_numpy(rng.integers(0, classes, 7))
    y[torch.from_numpy(rng.random(7) < 0.3)] = IGNORE
    y[0] = 0
    w = torch.from_numpy(rng.random(classes) + 0.1) if weighted else None
    got = F.cross_entropy(x, y, weight=w, label_smoothing=epsilon,
                          reduction=reduction)
    kept = y != IGNORE
    logp = torch.log_softmax(x, 1)
    wc = w if weighted else torch.ones(classes, dtype=torch.float64)
    q = torch.full_like(logp, epsilon / classes)
    q[torch.arange(7), y.clamp(min=0)] += 1 - epsilon
    rows = -(wc * q * logp).sum(1) * kept
    if reduction == "none":
        assert torch.allclose(got, rows, atol=1e-12)
    elif reduction == "sum":
        assert abs(got.item() - rows.sum().item()) < 1e-12
    else:
        assert abs(got.item() - (rows.sum() / wc[y[kept]].sum()).item()) < 1e-12


@settings(max_examples=40)
@given(classes=st.integers(2, 30), epsilon=st.floats(1e-6, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_c3_cell88_smoothed_loss_floor_is_the_entropy(classes, epsilon, seed):
    """Cell 88 and exercise 1: a smoothed loss "cannot even reach 0"; it is
    smallest at p = q, where it equals H(q) and its gradient is zero.
    TRUE-GENERAL for eps in (0, 1], any C."""
    q = torch.full((classes,), epsilon / classes, dtype=torch.float64)
    q[1] += 1 - epsilon
    entropy = -(q * q.log()).sum().item()
    at_q = q.log()[None].clone().requires_grad_(True)
    loss = F.cross_entropy(at_q, torch.tensor([1]), label_smoothing=epsilon)
    loss.backward()
    assert abs(loss.item() - entropy) < 1e-12 and entropy > 0
    assert at_q.grad.abs().max().item() < 1e-12
    gen = torch.Generator().manual_seed(seed)
    random_logits = 30 * torch.randn(200, classes, dtype=torch.float64, generator=gen)
    random_logits[0] = 0.0
    random_logits[1, 1] = 1e4                 # all mass on the target
    losses = F.cross_entropy(random_logits, torch.ones(200, dtype=torch.long),
                             label_smoothing=epsilon, reduction="none")
    assert (losses >= entropy - 1e-12).all() and (losses > 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
@pytest.mark.parametrize("options", [{}, {"weight": True},
                                     {"label_smoothing": 0.1}, {"bct": True}])
def test_c3_cell89_every_target_ignored(dtype, options):
    """Cells 89-91: every target ignored: "the mean is 0/0" (nan), "sum"
    is 0, and "The gradient is zero rather than nan".  TRUE-GENERAL: four
    dtypes, with class weights, with label smoothing, (B, C, T) input."""
    options = dict(options)
    shape, tshape = ((2, 5, 3), (2, 3)) if options.pop("bct", False) else ((4, 5), (4,))
    if options.pop("weight", False):
        options["weight"] = (torch.rand(5) + 0.1).to(dtype)
    x = torch.randn(shape).to(dtype).requires_grad_(True)
    y = torch.full(tshape, IGNORE)
    mean = F.cross_entropy(x, y, **options)
    mean.backward()
    assert torch.isnan(mean)
    assert (x.grad == 0).all()
    assert F.cross_entropy(x, y, reduction="sum", **options).item() == 0.0


def test_c3_cell91_trainer_counts_the_step_and_filters_non_finite_losses(llama):
    """Cell 91: the Trainer "counts the scored tokens of the whole
    accumulation step ... and passes that count to the model as
    num_items_in_batch"; "a micro-batch with no scored token contributes 0,
    not nan (only a step with no scored token at all divides 0 by 0)";
    ``logging_nan_inf_filter``, True by default, keeps a nan/inf training
    loss out of the logged value and "leaves such batches out of the
    evaluation loss".  TRUE-ONLY-IN-CASE for the filter: the training-loss
    filter is skipped when torch_xla is installed (trainer.py:1911-1914),
    and the evaluation filter only drops non-finite losses when at least one
    is finite (trainer.py:3092), so an evaluation with no finite batch
    still reports nan.  The count (over ``labels[..., 1:]`` for a causal LM,
    trainer.py:2326-2335) and the 0 / nan behaviour are TRUE-GENERAL."""
    import transformers
    from transformers.loss.loss_utils import LOSS_MAPPING

    # "for a model that accepts it, as its causal language models do"
    # (trainer.py:517-523): Llama's forward takes **kwargs, its loss is the
    # shifting ForCausalLMLoss, and .loss with the count is a sum / count.
    assert getattr(llama, "accepts_loss_kwargs", True)
    assert any(p.kind == inspect.Parameter.VAR_KEYWORD
               for p in inspect.signature(llama.forward).parameters.values())
    assert LOSS_MAPPING.get(llama.loss_type) is ForCausalLMLoss
    ids = torch.randint(3, 63, (2, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mean = llama(input_ids=ids, labels=ids).loss
        over_count = llama(input_ids=ids, labels=ids,
                           num_items_in_batch=torch.tensor(16)).loss
    assert abs(over_count.item() - mean.item() * 8 / 16) < 1e-6

    step = [{"labels": torch.tensor([[5, IGNORE, IGNORE, IGNORE]])},
            {"labels": torch.tensor([[IGNORE, 3, 4, IGNORE], [7, 7, IGNORE, 2]])}]
    count = Trainer._get_num_items_in_batch(_fake_trainer(), step, torch.device("cpu"))
    assert count.item() == sum(int((b["labels"][..., 1:] != IGNORE).sum()) for b in step) == 4
    unshifted = Trainer._get_num_items_in_batch(_fake_trainer(False), step,
                                                torch.device("cpu"))
    assert unshifted.item() == 6
    logits = torch.randn(2, 4, 9)
    empty = ForCausalLMLoss(logits[:1], step[0]["labels"], vocab_size=9,
                            num_items_in_batch=count)
    assert empty.item() == 0.0
    none_at_all = ForCausalLMLoss(logits[:1], step[0]["labels"], vocab_size=9,
                                  num_items_in_batch=torch.tensor(0))
    assert math.isnan(none_at_all.item())
    root = pathlib.Path(transformers.__file__).parent
    args_source = (root / "training_args.py").read_text()
    trainer_source = (root / "trainer.py").read_text()
    assert "logging_nan_inf_filter: bool = field(\n        default=True," in args_source
    assert transformers.TrainingArguments(output_dir="unused",
                                          report_to=[]).logging_nan_inf_filter
    train_filter = ("self.args.logging_nan_inf_filter\n"
                    "                    and not is_torch_xla_available()\n"
                    "                    and (torch.isnan(tr_loss_step) or "
                    "torch.isinf(tr_loss_step))")
    assert train_filter in trainer_source
    assert "if self.args.logging_nan_inf_filter and finite.any():" in trainer_source


@settings(max_examples=40)
@given(batch=st.integers(1, 3), length=st.integers(1, 5), classes=st.integers(1, 6),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       smoothing=st.sampled_from([0.0, 0.2]), weighted=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_c3_cell93_class_axis_second_equals_flattening(batch, length, classes,
                                                       reduction, smoothing,
                                                       weighted, seed):
    """Cell 93: "(B, C, T) with targets (B, T) ... gives the same loss as
    flattening to (B*T, C) and (B*T,)".  TRUE-GENERAL: every reduction
    (``none`` comes back as (B, T)), weights, label smoothing, ignored
    positions, B = 1, T = 1, C = 1."""
    rng = _rng(seed)
    x = torch.from_numpy(rng.normal(size=(batch, classes, length)))
    y = torch.from_numpy(rng.integers(0, classes, (batch, length)))
    y[torch.from_numpy(rng.random((batch, length)) < 0.3)] = IGNORE
    y[0, 0] = 0
    w = torch.from_numpy(rng.random(classes) + 0.1) if weighted else None
    options = dict(weight=w, label_smoothing=smoothing, reduction=reduction)
    bct = F.cross_entropy(x, y, **options)
    flat = F.cross_entropy(x.transpose(1, 2).reshape(-1, classes), y.reshape(-1),
                           **options)
    if reduction == "none":
        assert bct.shape == (batch, length)
        flat = flat.reshape(batch, length)
    assert torch.allclose(bct, flat, rtol=1e-12, atol=1e-12)


@settings(max_examples=40)
@given(batch=st.integers(1, 4), length=st.integers(1, 6), vocab=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_c3_cell96_class_axis_last_raises_unless_t_equals_v(batch, length, vocab,
                                                           seed):
    """Cell 96: "(B, T, V) ... Passed straight in with (B, T) labels,
    PyTorch reads dimension 1, the time axis, as the classes.  When T != V
    the shapes do not fit and it raises; when they happen to be equal, it
    computes a loss over the wrong axis without a word."  TRUE-GENERAL:
    raises RuntimeError exactly when T != V (B = T included); when T = V
    the result is the loss of ``logits.transpose(1, 2)``."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    if length != vocab:
        with pytest.raises(RuntimeError):
            F.cross_entropy(logits, labels)
        return
    as_is = F.cross_entropy(logits, labels)
    time_as_classes = F.cross_entropy(
        logits.reshape(batch, length, vocab).permute(0, 2, 1).reshape(-1, length),
        labels.reshape(-1))
    assert abs(as_is.item() - time_as_classes.item()) < 1e-12


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 10),
       classes=st.integers(2, 10), weighted=st.booleans())
def test_c3_cell99_gradient_is_softmax_minus_one_hot(seed, rows, classes, weighted):
    """Cell 99: d L_mean / d z_n = (p_n - e_{y_n}) / |S|, scaled by
    w_{y_n} / sum w with weights; ignored rows zero; rows sum to zero;
    "Every entry lies in [-1, 1] / |S|".  TRUE-GENERAL (to rounding)."""
    rng = _rng(seed)
    x = torch.from_numpy(rng.normal(scale=4.0, size=(rows, classes))).requires_grad_(True)
    y = torch.from_numpy(rng.integers(0, classes, rows))
    y[torch.from_numpy(rng.random(rows) < 0.3)] = IGNORE
    y[0] = 1
    w = torch.from_numpy(rng.random(classes) + 0.1) if weighted else None
    F.cross_entropy(x, y, weight=w).backward()
    kept = y != IGNORE
    wc = w if weighted else torch.ones(classes, dtype=torch.float64)
    scale = torch.where(kept, wc[y.clamp(min=0)], 0.0) / wc[y[kept]].sum()
    p = torch.softmax(x.detach(), 1)
    expected = (p - F.one_hot(y.clamp(min=0), classes)) * scale[:, None]
    assert torch.allclose(x.grad, expected, rtol=0, atol=1e-15)
    assert x.grad.sum(1).abs().max().item() < 1e-15
    if not weighted:
        assert (x.grad.abs() <= 1.0 / int(kept.sum())).all()


def test_c3_cell99_target_entry_is_negative_only_until_p_rounds_to_one():
    """Cell 99: "The target entry is the only negative one, p_{n,y_n} - 1 <
    0".  TRUE-ONLY-IN-CASE: true in exact arithmetic and while p_{n,y_n}
    rounds below 1; once it rounds to 1 (float32 margin 20, bfloat16 10,
    float16 12, float64 40) the target entry is exactly 0 and the row has
    no negative entry at all."""
    for dtype, confident in ((torch.float32, 20.0), (torch.bfloat16, 10.0),
                             (torch.float16, 12.0), (torch.float64, 40.0)):
        for margin, zero_expected in ((2.0, False), (confident, True)):
            z = torch.tensor([[margin, 0.0, 0.0, 0.0]], dtype=dtype,
                             requires_grad=True)
            F.cross_entropy(z, torch.tensor([0])).backward()
            g = z.grad[0]
            if zero_expected:
                assert g[0].item() == 0.0 and not (g < 0).any(), dtype
            else:
                assert g[0].item() < 0 and (g[1:] > 0).all(), dtype


def test_c3_cell105_tf_op_has_no_reduction_and_rejects_out_of_range_labels():
    """Cells 105-108: ``tf.nn.sparse_softmax_cross_entropy_with_logits`` "has
    no reduction, no weights and no ignore index", and on CPU a label
    outside [0, C) raises.  TRUE-GENERAL on CPU: its only parameters are
    labels, logits, name; -1, C, -100 and 2**31 - 1 raise
    ``InvalidArgumentError`` for int32 and int64 labels, eagerly and inside
    ``tf.function``.  (The documented nan on GPU: UNCHECKABLE-HERE, no
    GPU build of TensorFlow.)"""
    op = tf.nn.sparse_softmax_cross_entropy_with_logits
    assert list(inspect.signature(op).parameters) == ["labels", "logits", "name"]
    logits = np.zeros((2, 5), np.float32)
    graph_op = tf.function(lambda lab, lg: op(labels=lab, logits=lg))
    with tf.device("/CPU:0"):
        per_row = op(labels=np.array([0, 4]), logits=logits)
        assert per_row.shape == (2,)
        for bad in (-1, 5, IGNORE, 2**31 - 1):
            for dtype in (np.int32, np.int64):
                labels = np.array([0, bad], dtype=dtype)
                for call in (op, graph_op):
                    with pytest.raises(tf.errors.InvalidArgumentError):
                        if call is op:
                            call(labels=labels, logits=logits)
                        else:
                            call(labels, logits)


def test_c3_cell113_keras_wraps_the_tf_op_only_on_the_tensorflow_backend():
    """Cell 113: "keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    wraps that op".  TRUE-ONLY-IN-CASE: on the TensorFlow backend
    (keras/src/backend/tensorflow/nn.py:1438); the torch backend calls
    ``torch.nn.functional.cross_entropy`` (keras/src/backend/torch/nn.py:912),
    which silently ignores a label of -100 (see
    ``test_c3_cell150_torch_backend_accepts_minus_100``)."""
    tf_source = (KERAS_SRC / "backend" / "tensorflow" / "nn.py").read_text()
    torch_source = (KERAS_SRC / "backend" / "torch" / "nn.py").read_text()
    assert "tf.nn.sparse_softmax_cross_entropy_with_logits(" in tf_source
    assert 'result = tnn.cross_entropy(output, target, reduction="none")' in torch_source
    assert "sparse_softmax_cross_entropy_with_logits" not in torch_source
    with pytest.raises(tf.errors.InvalidArgumentError):
        keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
            np.array([0, IGNORE]), np.zeros((2, 5), np.float32))


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), shape=st.sampled_from([(1,), (7,), (2, 5), (3, 1)]),
       ignore=st.sampled_from([-100, -1, 0, 3]),
       dtype=st.sampled_from(["float32", "float64"]))
def test_c3_cell113_ignore_class_gives_pytorchs_mean(seed, shape, ignore, dtype):
    """Cells 113-118: with ``ignore_class``, "ignored rows get a loss of 0
    and a mask ... the result is the mean over valid rows", matching
    PyTorch's mean; with every target ignored Keras reports 0 where PyTorch
    reports nan.  TRUE-GENERAL on the TensorFlow backend (the torch backend
    is checked in ``test_c3_cell113_ignore_class_on_the_torch_backend``):
    (N,) and (B, T) labels, N = 1, a negative or a real class ignored,
    float32 and float64."""
    rng = _rng(seed)
    classes = 5
    logits = rng.normal(size=shape + (classes,))
    labels = rng.integers(0, classes, shape)
    labels[rng.random(shape) < 0.4] = ignore
    flat = labels.reshape(-1)
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=ignore, dtype=dtype)
    none = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=ignore, dtype=dtype, reduction="none")
    got = float(loss(labels, logits))
    torch_mean = F.cross_entropy(torch.from_numpy(logits.reshape(-1, classes)),
                                 torch.from_numpy(flat), ignore_index=ignore).item()
    tol = 1e-5 if dtype == "float32" else 1e-12
    if (flat != ignore).any():
        assert abs(got - torch_mean) < tol * (1 + torch_mean)
    else:
        assert got == 0.0 and math.isnan(torch_mean)
    per_row = np.asarray(none(labels, logits))
    assert (per_row[labels == ignore] == 0).all()


@settings(max_examples=30)
@given(batch=st.integers(1, 5), length=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_c3_cell118_class_weight_helper_argmax_only_when_t_above_1(batch, length, seed):
    """Cell 118: ``class_weight_to_sample_weights`` gives "For labels of
    shape (N,) ... w_{y_n} per row.  For the (B, T) token labels ... one
    weight per sequence, looked up at the argmax over the last axis".
    TRUE-ONLY-IN-CASE: T > 1.  With T = 1 the helper squeezes the last axis
    (data_adapter_utils.py:126-130) and returns the class weight of the
    label itself, i.e. per-token weights."""
    from keras.src.trainers.data_adapters import data_adapter_utils as dau

    rng = _rng(seed)
    weights = {c: float(c + 1) for c in range(10)}
    labels = rng.integers(0, 10, (batch, length))
    got = dau.class_weight_to_sample_weights(labels, weights)
    flat = dau.class_weight_to_sample_weights(labels[:, 0], weights)
    assert got.shape == (batch,)
    assert flat.tolist() == (labels[:, 0] + 1.0).tolist()
    if length > 1:
        assert got.tolist() == (labels.argmax(-1) + 1.0).tolist()
    else:
        assert got.tolist() == (labels[:, 0] + 1.0).tolist()


def test_c3_cell124_keras3_fit_class_weight_raises_only_for_b_t_above_1():
    """Cells 121-124 and 144: "Keras 3 raises when B != T and, when B = T,
    weights token t of every sequence by sequence t's weight".
    TRUE-ONLY-IN-CASE: it raises only when B > 1, T > 1 and B != T.  With
    B = 1 the one weight broadcasts over the sequence (the reported loss is
    the per-sequence one); with T = 1 the labels are squeezed and fit gives
    true per-token class weights (the per-token computation)."""
    with pytest.raises(ValueError, match="Dimensions must be equal"):
        keras_fit_class_weight(2, 4, framework="keras")
    one_sequence = keras_fit_class_weight(1, 4, framework="keras")
    assert abs(one_sequence["reported"] - one_sequence["per_sequence"]) < 1e-5
    one_token = keras_fit_class_weight(3, 1, framework="keras")
    assert abs(one_token["reported"] - one_token["per_token"]) < 1e-5
    assert abs(one_token["reported"] - one_token["unweighted"]) > 1e-2


def test_c3_cell127_clipping_uses_keras_config_epsilon():
    """Cell 127: Keras "clips every probability into [eps, 1 - eps], with
    eps = keras.config.epsilon()".  TRUE-GENERAL on the TensorFlow backend:
    changing the epsilon changes the cap to -log(eps)."""
    probs = np.array([[1e-20, 1.0 - 1e-20, 0.0]], np.float32)
    loss = keras.losses.SparseCategoricalCrossentropy()
    before = keras.config.epsilon()
    try:
        for eps in (1e-7, 1e-3):
            keras.config.set_epsilon(eps)
            value = float(loss(np.array([0]), probs))
            assert abs(value + math.log(eps)) < 2 * eps + 1e-5
    finally:
        keras.config.set_epsilon(before)
    assert keras.config.epsilon() == 1e-7


@settings(max_examples=15)
@given(margin=st.floats(0.0, 60.0), second=st.floats(0.0, 60.0),
       classes=st.integers(3, 8))
def test_c3_cell127_gradient_through_clipping_on_the_tensorflow_backend(
        margin, second, classes):
    """Cell 127: "Once the target's probability is below eps ... the gradient
    on the target logit shrinks from about -1 ... to about -p_{n,y_n},
    smaller than eps; when every probability of the row lies outside
    [eps, 1 - eps], the row gets no gradient at all."  TRUE-ONLY-IN-CASE:
    on the TensorFlow backend (checked here for random rows); on the torch
    backend the whole row's gradient is exactly 0 as soon as the target is
    clipped (``test_c3_cell127_torch_backend_clipped_target_has_no_gradient``)."""
    row = np.zeros((1, classes), np.float32)
    row[0, 1], row[0, 2] = margin, second
    z = tf.Variable(row)
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy()(
            np.array([0]), tf.nn.softmax(z))
    grad = tape.gradient(loss, z).numpy()[0]
    p = np.exp(-np.array([_nll64(row, np.array([c]))[0] for c in range(classes)]))
    eps = keras.config.epsilon()
    if p[0] < eps * 0.99:
        assert abs(grad[0]) <= eps
        if ((p < eps * 0.99) | (p > 1 - eps * 0.99)).all():
            assert (grad == 0).all()
    elif p[0] > eps * 1.01 and p[0] < 1 - 1e-3:
        assert abs(grad[0] - (p[0] - 1)) < 1e-4


def test_c3_cell131_the_cap_grows_with_the_vocabulary_on_tensorflow():
    """Cell 131: "Keras given probabilities reports ... the cap -log eps
    itself: every row whose exact loss exceeds the cap reports this same
    value".  TRUE-ONLY-IN-CASE: on the TensorFlow backend the clipped
    probabilities are renormalised by the op, so the value is
    -log eps + log(sum of the clipped row), about -log eps + log(1 + (C -
    2) eps): 16.118 for C = 5 but 16.128 for C = 100000.  On the torch
    backend it is -log eps for every C (checked in the torch-backend test)."""
    loss = keras.losses.SparseCategoricalCrossentropy()
    eps = keras.config.epsilon()
    for classes in (5, 1000, 100000):
        row = np.zeros((1, classes), np.float32)
        row[0, 1] = 40.0
        value = float(loss(np.array([0]), tf.nn.softmax(row)))
        predicted = -math.log(eps) + math.log(1 + (classes - 2) * eps)
        assert abs(value - predicted) < 1e-4
    assert predicted - (-math.log(eps)) > 0.009


def test_c3_cell134_keras_logits_are_lost_on_a_dtype_change_or_a_masked_softmax():
    """Cells 134 and 144: "Probabilities produced by Keras's own softmax ...
    carry the logits ... so the clipping never happens"; "On the TensorFlow
    backend this happens only where Keras cannot recover the logits: not for
    Keras's own softmax".  FALSE: the loss converts ``y_pred`` to its own
    dtype (keras/src/losses/loss.py:60-62), and a cast is a new tensor
    without ``_keras_logits``: float16 probabilities (mixed precision), or a
    float64 loss on float32 probabilities, are clipped.  So is the output of
    ``layers.Softmax`` called with a mask, which is a ``where`` of the
    softmax (keras/src/layers/activations/softmax.py:105)."""
    row = np.array([[0.0, 40.0, 0.0, 0.0, 0.0]], np.float32)
    label = np.array([0])
    loss32 = keras.losses.SparseCategoricalCrossentropy()
    loss64 = keras.losses.SparseCategoricalCrossentropy(dtype="float64")
    cap = -math.log(keras.config.epsilon())
    assert abs(float(loss32(label, keras.ops.softmax(row))) - 40.0) < 1e-4
    assert abs(float(loss32(label, keras.layers.Softmax()(row))) - 40.0) < 1e-4
    assert abs(float(loss32(label, keras.ops.softmax(row.astype(np.float16)))) - cap) < 1e-3
    assert abs(float(loss64(label, keras.ops.softmax(row))) - cap) < 1e-3
    masked = keras.layers.Softmax()(row, mask=np.ones((1, 5), bool))
    assert abs(float(loss32(label, masked)) - cap) < 1e-3


def test_c3_cell134_softmax_op_recovered_in_graphs_only_when_it_is_the_output():
    """Cells 134 and 144: "_get_logits also recognises a graph-mode tensor
    made by a Softmax op ... fit and evaluate run the loss inside a
    tf.function ..., so there even the output of tf.nn.softmax is not
    clipped"; "not for any Softmax op inside fit or evaluate".
    TRUE-ONLY-IN-CASE: only when the Softmax op directly produces
    ``y_pred``.  A cast after it (mixed precision: a ``Dense(...,
    activation="softmax", dtype="mixed_float16")`` head) hides it, and
    ``evaluate`` reports the clipped 16.12 instead of 40."""
    row = np.array([[0.0, 40.0, 0.0, 0.0, 0.0]], np.float32)
    loss = keras.losses.SparseCategoricalCrossentropy()
    cap = -math.log(keras.config.epsilon())
    direct = tf.function(lambda x: loss(tf.constant([0]), tf.nn.softmax(x)))
    cast = tf.function(lambda x: loss(tf.constant([0]), tf.cast(
        tf.nn.softmax(tf.cast(x, tf.float16)), tf.float32)))
    assert abs(float(direct(row)) - 40.0) < 1e-4
    assert abs(float(cast(row)) - cap) < 1e-3
    inputs = keras.Input((1,))
    head = keras.layers.Dense(5, activation="softmax", dtype="mixed_float16")
    model = keras.Model(inputs, head(inputs))
    head.set_weights([np.zeros((1, 5), np.float32), row[0]])
    model.compile(loss="sparse_categorical_crossentropy")
    reported = model.evaluate(np.ones((1, 1)), np.array([0]), verbose=0)
    assert abs(reported - cap) < 1e-3   # float32 head: 40 (the chapter's cell 137)


def test_c3_cell138_from_logits_never_clips():
    """Cell 138: "keep the model's output as logits and let the loss apply
    the log-softmax (from_logits=True), a path with no clipping at all".
    TRUE-GENERAL on the TensorFlow backend (torch backend: torch-backend
    test), margins up to 1e4, Keras 3 and tf-keras."""
    for margin in (20.0, 40.0, 100.0, 1e4):
        row = np.array([[0.0, margin, 0.0, 0.0, 0.0]], np.float32)
        exact = _nll64(row, np.array([0]))[0]
        for K in (keras, tf_keras):
            value = float(K.losses.SparseCategoricalCrossentropy(from_logits=True)(
                np.array([0]), row))
            assert abs(value - exact) <= 1e-6 * exact


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 9))
def test_c3_cell150_sum_over_batch_size_and_mean_with_sample_weight(seed, rows):
    """Exercise 2 (cell 150): "The default "sum_over_batch_size" divides the
    weighted sum by the number of rows, N; "mean_with_sample_weight"
    divides by the sum of the sample weights".  TRUE-GENERAL (weights with
    zeros, N = 1)."""
    rng = _rng(seed)
    logits = rng.normal(size=(rows, 4))
    labels = rng.integers(0, 4, rows)
    w = rng.random(rows) * (rng.random(rows) > 0.3)
    w[0] = 0.5
    nll = _nll64(logits, labels)
    default = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    by_weights = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, dtype="float64", reduction="mean_with_sample_weight")
    assert abs(float(default(labels, logits, sample_weight=w)) - (w * nll).sum() / rows) < 1e-12
    assert abs(float(by_weights(labels, logits, sample_weight=w)) - (w * nll).sum() / w.sum()) < 1e-12


@settings(max_examples=30)
@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1.0, 50.0, 1e3]))
def test_c3_cell155_shift_invariance(seed, scale):
    """Exercise 3 (cells 153-155): adding a constant to every logit of a row
    "changes neither the row's loss nor its gradient", and each gradient row
    sums to zero.  TRUE-GENERAL (to float64 rounding of the shifted
    logits)."""
    rng = _rng(seed)
    x = torch.from_numpy(rng.normal(size=(6, 5)))
    y = torch.from_numpy(rng.integers(0, 5, 6))
    y[2] = IGNORE
    shifted = x + torch.from_numpy(rng.normal(scale=scale, size=(6, 1)))
    a, b = x.clone().requires_grad_(True), shifted.clone().requires_grad_(True)
    la, lb = F.cross_entropy(a, y), F.cross_entropy(b, y)
    la.backward()
    lb.backward()
    tol = 64 * 2.0**-52 * scale
    assert abs(la.item() - lb.item()) <= tol
    assert (a.grad - b.grad).abs().max().item() <= tol
    assert b.grad.sum(1).abs().max().item() < 1e-15


# ===========================================================================
# Chapter 4: the Keras masking pitfall
# ===========================================================================

FRAMEWORKS = (("keras", keras), ("tf_keras", tf_keras))


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), length=st.integers(1, 5))
def test_c4_cell3_labels_are_aligned_with_positions(seed, batch, length):
    """Cell 3: "A Keras model scores each position against the label at the
    same position (the labels arrive aligned, with no shift)".
    TRUE-GENERAL, Keras 3 and tf-keras: the loss of (B, T, C) logits is the
    mean of -log p_t[y_t] at the same t."""
    rng = _rng(seed)
    logits = rng.normal(size=(batch, length, 6)).astype(np.float32)
    labels = rng.integers(0, 6, (batch, length))
    for _, K in FRAMEWORKS:
        value = float(K.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits))
        assert abs(value - _nll64(logits, labels).mean()) < 1e-5


@pytest.mark.parametrize("name,K", FRAMEWORKS)
def test_c4_cell3_padding_weighted_loss_is_scaled_value_and_gradient(name, K):
    """Cell 3: L_all = |S| / (B T) L, "The gradient carries the same factor
    ... (padding gets no gradient either way)".  TRUE-GENERAL: the default
    reduction with a 0/1 sample weight, value and gradient, for left, right
    and mixed padding."""
    rng = _rng(1)
    logits = rng.normal(size=(3, 5, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (3, 5))
    w = np.array([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 0, 1, 0, 1]], np.float32)
    z = tf.Variable(logits)
    with tf.GradientTape(persistent=True) as tape:
        all_positions = K.losses.SparseCategoricalCrossentropy(from_logits=True)(
            labels, z, sample_weight=w)
        per_token = K.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="none")(labels, z)
        token_mean = tf.reduce_sum(per_token * w) / w.sum()
    factor = w.sum() / w.size
    assert abs(float(all_positions) - factor * float(token_mean)) < 1e-6
    g_all = tape.gradient(all_positions, z).numpy()
    g_true = tape.gradient(token_mean, z).numpy()
    assert np.allclose(g_all, factor * g_true, atol=1e-7)
    assert (g_all[w == 0] == 0).all()


def _random_toy(seed: int, vocab: int = 6, classes: int = 6) -> np.ndarray:
    return _rng(seed).normal(scale=2.0, size=(vocab, classes))


_PADDED_INPUTS = np.array([[1, 2, 3, 0, 0], [0, 0, 4, 5, 1], [2, 0, 3, 0, 4],
                           [5, 5, 5, 5, 5]])
_PADDED_LABELS = np.array([[3, 1, 4, 0, 0], [0, 0, 2, 5, 1], [5, 0, 1, 0, 2],
                           [1, 2, 3, 4, 5]])


@pytest.mark.parametrize("name", ["keras", "tf_keras"])
def test_c4_cell9_a_plain_function_loss_gets_the_mask_handling(name):
    """Cell 9: "compile wraps it in LossFunctionWrapper, a Loss subclass ...
    whose reduction is the default ... so the mask handling of
    Loss.__call__ applies to it too".  TRUE-GENERAL: ``get_loss`` /
    ``_get_loss_object`` return a ``LossFunctionWrapper`` with the default
    reduction, and ``evaluate`` with a plain function on a random masked toy
    (right, left and inner padding) is the masked token mean."""
    if name == "keras":
        from keras.src.trainers import compile_utils

        wrapped = compile_utils.get_loss(km._keras_sparse_ce, None, None)
        assert type(wrapped).__name__ == "LossFunctionWrapper"
        assert wrapped.reduction == "sum_over_batch_size"
    else:
        from tf_keras.src.engine import compile_utils

        container = compile_utils.LossesContainer(km._tf_keras_sparse_ce)
        wrapped = container._get_loss_object(km._tf_keras_sparse_ce)
        assert type(wrapped).__name__ == "LossFunctionWrapper"
        assert wrapped.reduction == "auto"
    table = _random_toy(4)
    reported = km.report(name, km.make_loss(name, "function"),
                         km.Batch(_PADDED_INPUTS, _PADDED_LABELS), table, fit=False)
    nll = km.reference_token_nll(table, _PADDED_INPUTS, _PADDED_LABELS)
    real = _PADDED_INPUTS != 0
    assert abs(reported.evaluate["loss"] - nll[real].mean()) < 1e-5


@pytest.mark.parametrize("name", ["keras", "tf_keras"])
def test_c4_cell12_mask_on_the_output_gives_the_token_mean(name):
    """Cell 12: "the loss of the source's toy is the masked token mean, in
    fit, in evaluate and in compute_loss".  TRUE-GENERAL beyond the uniform
    toy: random logits, labels different from the inputs, right, left and
    inner padding, a row without padding; ``evaluate``, ``compute_loss`` and
    a direct call.  (A batch of padding alone, not a claim of the chapter,
    gives 0 in Keras 3 and nan in tf-keras.)"""
    table = _random_toy(7)
    reported = km.report(name, km.make_loss(name, "built-in Loss"),
                         km.Batch(_PADDED_INPUTS, _PADDED_LABELS), table, fit=False)
    nll = km.reference_token_nll(table, _PADDED_INPUTS, _PADDED_LABELS)
    truth = nll[_PADDED_INPUTS != 0].mean()
    for value in (reported.evaluate["loss"], reported.compute_loss, reported.call):
        assert abs(value - truth) < 1e-5
    K = dict(FRAMEWORKS)[name]
    nothing = _with_mask(tf.nn.softmax(tf.zeros((1, 3, 5))), np.zeros((1, 3)))
    empty = float(K.losses.SparseCategoricalCrossentropy()(np.zeros((1, 3), int), nothing))
    assert (empty == 0.0) if name == "keras" else math.isnan(empty)


@settings(max_examples=20)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 4), length=st.integers(1, 6))
def test_c4_cell19_real_positions_get_total_over_valid(seed, batch, length):
    """Cells 13-19: both versions "give each real position the weight
    total/valid = BT/|S| and padding the weight 0" (Keras 3 ``apply_mask``,
    keras/src/losses/loss.py:197; tf-keras ``apply_valid_mask``,
    tf_keras/src/utils/losses_utils.py:415), and the reduction then yields
    the masked mean.  TRUE-GENERAL; with the "sum" reduction the mask is
    used as it is."""
    from keras.src.losses.loss import apply_mask
    from tf_keras.src.utils import losses_utils

    rng = _rng(seed)
    mask = rng.random((batch, length)) < 0.6
    mask[0, 0] = True
    losses = rng.random((batch, length)).astype(np.float32) + 0.1
    expected = mask * (mask.size / mask.sum())
    k3 = np.asarray(apply_mask(None, tf.constant(mask), "float32", "sum_over_batch_size"))
    assert np.allclose(k3, expected, rtol=1e-6)
    assert np.allclose(np.asarray(apply_mask(None, tf.constant(mask), "float32", "sum")), mask)
    legacy = losses_utils.apply_valid_mask(     # returns the sample weights
        tf.constant(losses), None, tf.constant(mask), losses_utils.ReductionV2.AUTO)
    assert np.allclose(np.asarray(legacy), expected, rtol=1e-6)
    assert abs((losses * expected).mean() - losses[mask].mean()) < 1e-5


@settings(max_examples=12)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), length=st.integers(1, 6))
def test_c4_cell23_a_metric_divides_by_the_sum_of_its_weights(seed, batch, length):
    """Cell 23: "a metric divides by the sum of its sample weights".
    TRUE-GENERAL for one update, both versions, any non-negative weights.
    Boundary (not a claim of the chapter): called directly, tf-keras's
    metric ignores the Keras mask of ``y_pred`` (it reads the mask of its
    own output, tf_keras/src/metrics/base_metric.py:723); only
    compile/evaluate multiply it into the weights.  Keras 3's metric uses
    it."""
    rng = _rng(seed)
    logits = rng.normal(size=(batch, length, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (batch, length))
    w = (rng.random((batch, length)) * 2).astype(np.float32)
    w[0, 0] = 1.0
    nll = _nll64(logits, labels)
    probs = tf.nn.softmax(logits)
    for _, K in FRAMEWORKS:
        metric = K.metrics.SparseCategoricalCrossentropy()
        metric.update_state(labels, probs, sample_weight=w)
        assert abs(float(metric.result()) - (w * nll).sum() / w.sum()) < 1e-4
    mask = rng.random((batch, length)) < 0.5
    mask[0, 0] = True
    results = {}
    for name, K in FRAMEWORKS:
        metric = K.metrics.SparseCategoricalCrossentropy()
        metric.update_state(labels, _with_mask(probs, mask), sample_weight=w)
        results[name] = float(metric.result())
    assert abs(results["keras"] - (w * mask * nll).sum() / (w * mask).sum()) < 1e-4
    assert abs(results["tf_keras"] - (w * nll).sum() / w.sum()) < 1e-4


@settings(max_examples=12)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), length=st.integers(1, 6))
def test_c4_cell24_zero_one_sample_weight_divides_by_every_position(seed, batch, length):
    """Cells 24-27: with a 0/1 sample weight and no Keras mask, "the default
    reduction divides by every position again"; Keras 3's
    "mean_with_sample_weight" divides by the sum of the weights; tf-keras
    "has no such reduction (asking for it raises ValueError)".
    TRUE-GENERAL (random shapes; torch backend in the torch-backend test)."""
    rng = _rng(seed)
    logits = rng.normal(size=(batch, length, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (batch, length))
    w = (rng.random((batch, length)) < 0.6).astype(np.float32)
    w[0, 0] = 1.0
    nll = _nll64(logits, labels)
    for _, K in FRAMEWORKS:
        value = float(K.losses.SparseCategoricalCrossentropy(from_logits=True)(
            labels, logits, sample_weight=w))
        assert abs(value - (w * nll).sum() / w.size) < 1e-5
    by_weights = float(keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight")(labels, logits, sample_weight=w))
    assert abs(by_weights - (w * nll).sum() / w.sum()) < 1e-5
    with pytest.raises(ValueError):
        tf_keras.losses.SparseCategoricalCrossentropy(reduction="mean_with_sample_weight")


def test_c4_cell27_ignore_class_right_only_when_zero_weights_sit_on_padding():
    """Cells 27 and 82: "Keras's ignore_class=0 and the fixed loss give the
    right value in both, because they read the padding from the labels";
    "Masking by a 0/1 sample_weight: ... use
    SparseCategoricalCrossentropy(ignore_class=0)".  TRUE-ONLY-IN-CASE:
    only when the zero weights fall exactly on the padding labels.  When
    the 0/1 weights also hide real labels (a prompt masked by weight),
    ``ignore_class=0`` still divides by the number of non-padding labels;
    Keras 3's ``mean_with_sample_weight`` (with or without
    ``ignore_class``) divides by the weights."""
    rng = _rng(2)
    logits = rng.normal(size=(2, 6, 5)).astype(np.float32)
    labels = np.array([[3, 1, 4, 2, 0, 0], [2, 2, 1, 3, 4, 0]])
    nll = _nll64(logits, labels)
    on_padding = (labels != 0).astype(np.float32)
    prompt_too = on_padding.copy()
    prompt_too[:, :2] = 0.0                       # the prompt, weighted 0
    for name, K in FRAMEWORKS:
        loss = K.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=0)
        right = float(loss(labels, logits, sample_weight=on_padding))
        assert abs(right - nll[labels != 0].mean()) < 1e-5, name
        prompt = float(loss(labels, logits, sample_weight=prompt_too))
        assert abs(prompt - (prompt_too * nll).sum() / (labels != 0).sum()) < 1e-5, name
        assert abs(prompt - (prompt_too * nll).sum() / prompt_too.sum()) > 0.1, name
    both = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=0, reduction="mean_with_sample_weight")
    assert abs(float(both(labels, logits, sample_weight=prompt_too))
               - (prompt_too * nll).sum() / prompt_too.sum()) < 1e-5


@pytest.mark.parametrize("name", ["keras", "tf_keras"])
def test_c4_cell28_metrics_argument_scores_every_position(name):
    """Cell 28: "A metric passed as metrics= receives no sample weight, so
    with the padding weighted 0 (and no Keras mask) it averages over every
    position, padding included."  TRUE-GENERAL: random toy logits, labels
    different from inputs, left and right padding, both versions;
    ``weighted_metrics=`` gives sum w l / sum w."""
    table = _random_toy(11)
    w = (_PADDED_INPUTS != 0).astype(np.float32)
    nll = km.reference_token_nll(table, _PADDED_INPUTS, _PADDED_LABELS)
    loss = km.make_loss(name, "built-in Loss")
    batch = km.Batch(_PADDED_INPUTS, _PADDED_LABELS, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = km.report(name, loss, batch, table, mask_zero=False, fit=False,
                          metrics_argument="metrics")
        weighted = km.report(name, loss, batch, table, mask_zero=False, fit=False)
    assert abs(plain.evaluate["metric"] - nll.mean()) < 1e-5
    assert abs(weighted.evaluate["metric"] - (w * nll).sum() / w.sum()) < 1e-5


def _mask_after(name: str, middle: str):
    """Whether the output of Embedding(mask_zero) -> middle -> Dense carries
    a Keras mask, and the mask warnings raised building and calling it."""
    K = dict(FRAMEWORKS)[name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inputs = K.Input(shape=(None,), dtype="int32")
        hidden = K.layers.Embedding(6, 4, mask_zero=True)(inputs)
        layer = {
            "Dense": lambda: K.layers.Dense(4),
            "Dropout": lambda: K.layers.Dropout(0.1),
            "LayerNormalization": lambda: K.layers.LayerNormalization(),
            "Activation": lambda: K.layers.Activation("relu"),
            "GRU": lambda: K.layers.GRU(4, return_sequences=True),
            "Lambda": lambda: K.layers.Lambda(lambda t: t * 1.0),
            "Lambda(mask=...)": lambda: K.layers.Lambda(
                lambda t: t * 1.0, mask=lambda inputs, previous_mask: previous_mask),
            "Reshape": lambda: K.layers.Reshape((-1, 4)),
            "Conv1D": lambda: K.layers.Conv1D(4, 1),
            "custom layer": lambda: km._middle(name, "custom layer"),
            "custom layer, supports_masking": lambda: km._middle(
                name, "custom layer, supports_masking"),
            "raw op": lambda: km._middle(name, "raw op"),
        }[middle]()
        model = K.Model(inputs, K.layers.Dense(3)(layer(hidden)))
        out = model(np.array([[1, 2, 0]], np.int32))
    warned = any("mask" in str(w.message).lower() for w in caught)
    return getattr(out, "_keras_mask", None) is not None, warned


_KEEPS = ["Dense", "Dropout", "GRU", "custom layer, supports_masking",
          "Lambda(mask=...)"]
_DROPS = ["Lambda", "custom layer", "raw op", "Conv1D"]


@pytest.mark.parametrize("name", ["keras", "tf_keras"])
def test_c4_cell32_which_layers_carry_the_mask_and_which_warn(name):
    """Cells 32-36: "A mask travels from layer to layer only through layers
    that declare supports_masking (or compute their own mask).  A Lambda, a
    custom layer written without it, or a bare operation on the symbolic
    tensor drops it"; "Keras 3 emits a UserWarning for the Lambda and the
    custom layer ... but says nothing about the bare operation; tf-keras
    says nothing at all"; ``supports_masking = True`` and
    ``Lambda(..., mask=...)`` restore it.  TRUE-GENERAL over nine layer
    kinds (Dense, Dropout and GRU keep it; Conv1D drops it too, with the
    same Keras 3 warning)."""
    for middle in _KEEPS:
        kept, warned = _mask_after(name, middle)
        assert kept and not warned, middle
    for middle in _DROPS:
        kept, warned = _mask_after(name, middle)
        assert not kept, middle
        assert warned == (name == "keras" and middle != "raw op"), middle


def test_c4_cell44_when_the_softmax_layer_raises():
    """Cell 44: "With one sequence of five positions and five classes the
    shapes broadcast ... When T != C the shapes do not broadcast and the
    layer raises."  FALSE as a rule: the (B, T) mask is aligned with the
    (T, C) axes of the (B, T, C) scores, so it broadcasts when T is 1 or C
    *and* B is 1 or T.  Keras 3 raises for B = 2, T = C = 5; both versions
    broadcast B = T = C silently (sequence t's padding masks the classes at
    position t of every sequence); tf-keras with T = 1 != C and B = 2 does
    not raise but returns (B, B, C) = (2, 2, 5) scores."""
    uniform = km.uniform_logits(5)
    outcome = {}
    for name, _ in FRAMEWORKS:
        for shape_name, inputs in (("1x5", [[1, 1, 2, 0, 0]]), ("1x4", [[1, 1, 2, 0]]),
                                   ("2x5", [[1, 2, 0, 0, 0], [1, 0, 0, 0, 0]]),
                                   ("2x1", [[1], [2]]),
                                   ("5x5", [[1, 2, 0, 0, 0], [1, 0, 0, 0, 0],
                                            [1, 1, 1, 1, 0], [2, 2, 0, 0, 0],
                                            [1, 2, 3, 4, 0]])):
            try:
                probs = km.softmax_layer_probabilities(name, inputs, uniform)
                outcome[name, shape_name] = probs.shape
                if shape_name == "5x5":
                    mask = np.array(inputs) != 0
                    for b in range(5):
                        assert np.array_equal(probs[b] > 0, mask), name
            except (ValueError, tf.errors.InvalidArgumentError):
                outcome[name, shape_name] = "raises"
    assert outcome["keras", "1x5"] == outcome["tf_keras", "1x5"] == (1, 5, 5)
    assert outcome["keras", "1x4"] == outcome["tf_keras", "1x4"] == "raises"
    assert outcome["keras", "2x5"] == outcome["tf_keras", "2x5"] == "raises"
    assert outcome["keras", "5x5"] == outcome["tf_keras", "5x5"] == (5, 5, 5)
    assert outcome["keras", "2x1"] == "raises"
    assert outcome["tf_keras", "2x1"] == (2, 2, 5)


def test_c4_cell44_a_real_label_of_a_masked_class_costs_1e9_in_tf_keras():
    """Cell 44: "a real label 3 or 4 would cost -log eps = 16.12 nats (Keras
    clips probabilities ...)".  FALSE for tf-keras: its Softmax layer's
    output is a Softmax op on the masked scores, the loss recovers those
    logits (masked classes at about -1e9), and a label 3 costs about 1e9
    nats, in ``evaluate`` and in a direct call (tf-keras's softmax keeps
    ``_keras_logits``, tf_keras/src/backend.py:5458, and its loss takes
    them, :5496-5498; the layer adds -1e9 to masked classes,
    tf_keras/src/layers/activation/softmax.py:106-112).  TRUE for Keras 3,
    whose Softmax layer returns a ``where`` of the softmax
    (keras/src/layers/activations/softmax.py:105) that the loss cannot see
    through, so it clips."""
    inputs = np.array([[1, 1, 2, 0, 0]])
    labels = np.array([[3, 1, 2, 0, 0]])           # a real label 3, classes 3-4 masked
    expected_keras3 = (-math.log(keras.config.epsilon()) + 2 * math.log(3)) / 3
    for name, K in FRAMEWORKS:
        model = km.build_toy_model(name, km.uniform_logits(5), head="Softmax")
        model.compile(loss="sparse_categorical_crossentropy")
        evaluated = model.evaluate(inputs, labels, verbose=0)
        direct = float(K.losses.SparseCategoricalCrossentropy()(labels, model(inputs)))
        for value in (evaluated, direct):
            if name == "keras":
                assert abs(value - expected_keras3) < 1e-3
            else:
                assert 3e8 < value < 4e8            # about 1e9 / 3 real tokens


@pytest.mark.parametrize("name", ["keras", "tf_keras"])
def test_c4_cell44_activation_softmax_keeps_probabilities_and_mask(name):
    """Cell 44: "Activation leaves the probabilities as they are and passes
    the mask on, so the loss is the masked token mean".  TRUE-GENERAL on a
    random toy with mixed padding, both versions."""
    K = dict(FRAMEWORKS)[name]
    table = _random_toy(5)
    model = km.build_toy_model(name, table, head="Activation")
    out = model(_PADDED_INPUTS.astype(np.int32))
    logits = table[_PADDED_INPUTS]
    assert np.allclose(np.asarray(out), np.exp(-np.stack([
        _nll64(logits, np.full(_PADDED_INPUTS.shape, c)) for c in range(6)], -1)),
        atol=1e-6)
    assert getattr(out, "_keras_mask", None) is not None
    nll = km.reference_token_nll(table, _PADDED_INPUTS, _PADDED_LABELS)
    value = float(K.losses.SparseCategoricalCrossentropy()(_PADDED_LABELS, out))
    assert abs(value - nll[_PADDED_INPUTS != 0].mean()) < 1e-5


@pytest.mark.parametrize("name", ["keras", "tf_keras"])
def test_c4_cell45_mask_and_weights_loss_and_metric_denominators(name):
    """Cells 45-48: "the loss rescales the mask by BT/|S|, multiplies in the
    weights and divides by BT; the metric divides by the sum of the
    weights": L_loss = sum w m l / |S|, L_metric = sum w m l / sum w m.
    TRUE-GENERAL in compile/evaluate, on a random toy where real tokens
    have different losses (on the chapter's uniform toy every weighting of
    the real tokens gives log 5, so the metric's denominator is not
    tested there)."""
    table = _random_toy(8)
    w = _rng(9).uniform(0.3, 3.0, _PADDED_INPUTS.shape).astype(np.float32)
    reported = km.report(name, km.make_loss(name, "built-in Loss"),
                         km.Batch(_PADDED_INPUTS, _PADDED_LABELS, w), table, fit=False)
    nll = km.reference_token_nll(table, _PADDED_INPUTS, _PADDED_LABELS)
    m = (_PADDED_INPUTS != 0).astype(float)
    assert abs(reported.evaluate["loss"] - (w * m * nll).sum() / m.sum()) < 1e-4
    assert abs(reported.compute_loss - (w * m * nll).sum() / m.sum()) < 1e-4
    assert abs(reported.evaluate["metric"] - (w * m * nll).sum() / (w * m).sum()) < 1e-4
    assert abs((w * m * nll).sum() / m.sum() - (w * m * nll).sum() / (w * m).sum()) > 0.05


@pytest.mark.parametrize("name", ["keras", "tf_keras"])
def test_c4_cell49_epoch_loss_is_weighted_by_sequences(name):
    """Cell 49: "Both versions feed each batch's loss L_k to a Mean with the
    batch's number of sequences B_k as weight", so the epoch value is
    sum B_k L_k / sum B_k.  TRUE-GENERAL: three batches of different B and
    T with random logits in ``evaluate``; and every Keras 3 backend's
    trainer passes the batch size (keras/src/backend/*/trainer.py)."""
    table = _random_toy(3)
    worst, best = table.argmin(axis=1), table.argmax(axis=1)
    rng = _rng(3)
    batches = []
    # short sequences of badly predicted tokens, then long well-predicted ones
    for rows, width, real, pick in ((3, 4, 1, worst), (1, 7, 7, best),
                                    (2, 3, 2, best)):
        inputs = rng.integers(1, 6, (rows, width))
        inputs[:, real:] = 0
        labels = np.where(inputs != 0, pick[inputs], rng.integers(0, 6, (rows, width)))
        batches.append(km.Batch(inputs, labels))
    reported = km.report(name, km.make_loss(name, "built-in Loss"), batches, table,
                         fit=False)
    means, sizes, sums, counts = [], [], 0.0, 0
    for b in batches:
        nll = km.reference_token_nll(table, b.inputs, b.labels)
        real = b.inputs != 0
        means.append(nll[real].mean())
        sizes.append(len(b.inputs))
        sums, counts = sums + nll[real].sum(), counts + real.sum()
    by_sequences = np.dot(sizes, means) / sum(sizes)
    assert abs(reported.evaluate["loss"] - by_sequences) < 1e-4
    assert abs(by_sequences - sums / counts) > 0.5
    for backend in ("tensorflow", "torch", "jax", "numpy", "openvino"):
        source = (KERAS_SRC / "backend" / backend / "trainer.py").read_text()
        assert "self._loss_tracker.update_state(" in source
        assert "i for i in tree.flatten(x) if i is not None" in source or \
            "sample_weight=tree.flatten(x)[0].shape[0]" in source, backend


@settings(max_examples=40)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 5))
def test_c4_cell49_sequence_and_token_weighting_agree_when_proportional(seed, k):
    """Cell 49: the two epoch means "agree when every batch has the same
    number of real tokens per sequence, n_k/B_k (or when all L_k are
    equal)".  TRUE-GENERAL (mathematics)."""
    rng = _rng(seed)
    sizes = rng.integers(1, 6, k)
    losses = rng.random(k) * 5
    ratio = rng.integers(1, 9)
    tokens = sizes * ratio
    assert math.isclose(np.dot(sizes, losses) / sizes.sum(),
                        np.dot(tokens, losses) / tokens.sum(), rel_tol=1e-12)
    equal = np.full(k, losses[0])
    other = rng.integers(1, 20, k)
    assert math.isclose(np.dot(sizes, equal) / sizes.sum(),
                        np.dot(other, equal) / other.sum(), rel_tol=1e-12)


@settings(max_examples=12)
@given(seed=st.integers(0, 2**31 - 1), lengths=st.lists(st.integers(1, 6), min_size=2, max_size=3))
def test_c4_cell54_keras3_metric_weights_tokens_by_inverse_padded_length(seed, lengths):
    """Cells 54-60: Keras 3's ``Mean`` "first reduces every sequence over the
    time axis by a mean, for the values and for the weights alike", so
    "across batches of different T_k every token is weighted by 1/T_k"; in
    tf-keras the metric is the token mean.  TRUE-GENERAL: random batches
    and weights, 2-3 updates."""
    rng = _rng(seed)
    k3 = keras.metrics.SparseCategoricalCrossentropy()
    legacy = tf_keras.metrics.SparseCategoricalCrossentropy()
    num = den = tok_num = tok_den = 0.0
    for width in lengths:
        rows = int(rng.integers(1, 4))
        logits = rng.normal(size=(rows, width, 4)).astype(np.float32)
        labels = rng.integers(0, 4, (rows, width))
        w = (rng.random((rows, width)) < 0.7).astype(np.float32)
        w[0, 0] = 1.0
        probs = tf.nn.softmax(logits)
        k3.update_state(labels, probs, sample_weight=w)
        legacy.update_state(labels, probs, sample_weight=w)
        nll = _nll64(logits, labels)
        num += (w * nll).sum() / width
        den += w.sum() / width
        tok_num += (w * nll).sum()
        tok_den += w.sum()
    assert abs(float(k3.result()) - num / den) < 1e-4
    assert abs(float(legacy.result()) - tok_num / tok_den) < 1e-4


@settings(max_examples=12)
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), length=st.integers(1, 6))
def test_c4_cell61_ignore_class_mask_combines_with_the_output_mask(seed, batch, length):
    """Cell 61: with ``ignore_class``, "labels equal to it cost 0, and the
    loss values carry a Keras mask of the other labels, which Loss.__call__
    combines with any mask of y_pred and rescales"; Keras 3's
    "mean_with_sample_weight" divides by sum w m.  TRUE-GENERAL: the loss
    is the mean over positions valid in both masks, in both versions."""
    rng = _rng(seed)
    logits = rng.normal(size=(batch, length, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (batch, length))
    out_mask = rng.random((batch, length)) < 0.7
    out_mask[0, 0] = True
    labels[0, 0] = 1
    both = out_mask & (labels != 0)
    nll = _nll64(logits, labels)
    probs = tf.nn.softmax(logits)
    for name, K in FRAMEWORKS:
        loss = K.losses.SparseCategoricalCrossentropy(ignore_class=0)
        value = float(loss(labels, _with_mask(probs, out_mask)))
        assert abs(value - nll[both].mean()) < 1e-4, name
        none = K.losses.SparseCategoricalCrossentropy(ignore_class=0, reduction="none")
        assert (np.asarray(none(labels, probs))[labels == 0] == 0).all()
    w = rng.uniform(0.2, 2.0, (batch, length)).astype(np.float32)
    by_weights = keras.losses.SparseCategoricalCrossentropy(
        reduction="mean_with_sample_weight")
    value = float(by_weights(labels, _with_mask(probs, out_mask), sample_weight=w))
    m = out_mask.astype(float)
    assert abs(value - (w * m * nll).sum() / (w * m).sum()) < 1e-4


def test_c4_cell64_keras_ignore_class_already_takes_minus_100():
    """Cell 64: "What a custom class still adds is ... a padding id outside
    the classes (such as -100)".  FALSE for the loss: Keras 3's and
    tf-keras's ``SparseCategoricalCrossentropy(ignore_class=-100)`` accept
    -100 labels and give the token mean (chapter 3 uses it).  What is true:
    Keras 3's *metric* with ``ignore_class`` and no sample weight still
    counts the ignored positions in its denominator (the mask is read only
    when a sample weight is given, keras/src/metrics/reduction_metrics.py:14-19),
    while tf-keras's metric does not."""
    rng = _rng(6)
    logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 4))
    labels[0, 2:] = IGNORE
    labels[1, 3] = IGNORE
    real = labels != IGNORE
    nll = _nll64(logits, np.where(real, labels, 0))
    for name, K in FRAMEWORKS:
        loss = K.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=IGNORE)
        assert abs(float(loss(labels, logits)) - nll[real].mean()) < 1e-5, name
    metrics = {}
    for name, K in FRAMEWORKS:
        metric = K.metrics.SparseCategoricalCrossentropy(from_logits=True,
                                                         ignore_class=IGNORE)
        metric.update_state(labels, logits)
        metrics[name] = float(metric.result())
    assert abs(metrics["tf_keras"] - nll[real].mean()) < 1e-5
    assert abs(metrics["keras"] - nll[real].sum() / labels.size) < 1e-5


def test_c4_cell65_loss_parts_reductions_and_the_sum_uses_the_mask():
    """Cell 65: "call never sees the sample weight, and only Keras 3 (3.7
    and later) has a reduction that divides by the weights; tf-keras has
    none"; "Loss.__call__ multiplies it [the mask of y_pred] into the sum in
    any case".  TRUE-GENERAL: ``call(y_true, y_pred)`` in both; tf-keras's
    reductions are auto, none, sum, sum_over_batch_size; with
    ``reduction="sum"`` both return sum m l."""
    from tf_keras.src.utils import losses_utils

    for _, K in FRAMEWORKS:
        assert list(inspect.signature(K.losses.Loss.call).parameters) == [
            "self", "y_true", "y_pred"]
    assert set(losses_utils.ReductionV2.all()) == {
        "auto", "none", "sum", "sum_over_batch_size"}
    rng = _rng(12)
    logits = rng.normal(size=(2, 4, 5)).astype(np.float32)
    labels = rng.integers(0, 5, (2, 4))
    mask = np.array([[1, 1, 0, 0], [0, 1, 1, 1]], bool)
    nll = _nll64(logits, labels)
    for name, K in FRAMEWORKS:
        total = K.losses.SparseCategoricalCrossentropy(reduction="sum")(
            labels, _with_mask(tf.nn.softmax(logits), mask))
        assert abs(float(total) - nll[mask].sum()) < 1e-4, name


# ---------------------------------------------------------------------------
# Keras on the torch backend (the process started with the first test)
# ---------------------------------------------------------------------------


def test_c3_cell150_torch_backend_accepts_minus_100(on_torch):
    """Exercise 2 (cell 150): "The ignored rows need a valid class index
    too, since Keras checks labels in tf.nn".  TRUE-ONLY-IN-CASE: on the
    TensorFlow backend.  On the torch backend Keras calls
    ``F.cross_entropy`` (ignore_index=-100 by default), so a label of -100
    gives a silent 0 that the default reduction still counts (log 5 / 2
    for two rows), while -1 raises ``IndexError``."""
    assert abs(on_torch["minus100"] - math.log(5) / 2) < 1e-6
    assert on_torch["minus1"] == "IndexError"


def test_c3_cell127_torch_backend_clipped_target_has_no_gradient(on_torch):
    """Cells 127-131 on the torch backend: the cap is exactly -log eps for
    every C (it clips the renormalised target probability, torch/nn.py:914-
    917), and once the target is clipped the *whole row* gets no gradient
    (both the all-far row and the two-near row): not "about -p" on the
    target.  Inside the range the gradient is the exact p - e_y."""
    cap = -math.log(1e-7)
    assert abs(on_torch["cap_5"] - cap) < 1e-4
    assert abs(on_torch["cap_100000"] - cap) < 1e-4
    assert on_torch["grad_all_far"] == [0.0] * 5
    assert on_torch["grad_two_near"] == [0.0] * 5
    inside = np.array(on_torch["grad_inside"])
    p = np.exp([-_nll64(np.array([[0.0, 3.0, 0.0, 0.0, 0.0]]), np.array([c]))[0]
                for c in range(5)])
    assert np.allclose(inside, p - np.eye(5)[0], atol=1e-6)


def test_c3_cell134_torch_backend_always_clips_and_from_logits_does_not(on_torch):
    """Cells 134-138: "The JAX and PyTorch backends' nn.py have no
    _get_logits and always clip"; from_logits=True has "no clipping at
    all".  TRUE-GENERAL on the torch backend: ``keras.ops.softmax`` output
    is clipped (16.12 instead of 40), logits are not (40).  JAX:
    UNCHECKABLE-HERE (not installed); its nn.py has no ``_get_logits``."""
    cap = -math.log(1e-7)
    assert abs(on_torch["cap_5"] - cap) < 1e-4
    assert abs(on_torch["from_logits_5"] - 40.0) < 1e-4
    assert abs(on_torch["from_logits_100000"] - (40.0 + math.log1p(99999 * math.exp(-40)))) < 1e-4
    for backend in ("jax", "torch"):
        source = (KERAS_SRC / "backend" / backend / "nn.py").read_text()
        assert "_get_logits" not in source


def test_c3_cell113_ignore_class_on_the_torch_backend(on_torch):
    """Cells 113-118 on the torch backend: ``ignore_class`` gives PyTorch's
    mean (N = 6, 1, 9), and 0 when every target is ignored.  TRUE-GENERAL."""
    for keras_value, torch_value in on_torch["ignore_class_vs_torch"]:
        assert abs(keras_value - torch_value) < 1e-5
    assert on_torch["all_ignored"] == 0.0


def test_c4_cell12_and_cell24_on_the_torch_backend(on_torch):
    """Cells 12 and 24 on the torch backend: a Keras mask on the output gives
    the token mean (direct call and ``evaluate``, right/left padding, a row
    without padding); a 0/1 sample weight without a mask divides by every
    position.  TRUE-GENERAL: the same as on TensorFlow."""
    assert abs(on_torch["masked_call"] - on_torch["token_mean"]) < 1e-5
    assert abs(on_torch["masked_evaluate"] - on_torch["token_mean"]) < 1e-5
    assert abs(on_torch["sw_default"] - on_torch["sw_all_positions"]) < 1e-5


def test_c4_cell71_the_backend_can_be_switched_after_import(on_torch):
    """Cell 71: "Keras picks its backend once, when it is imported".
    TRUE-ONLY-IN-CASE: it picks it at import, but
    ``keras.config.set_backend`` (keras/src/utils/backend_utils.py:123)
    reloads Keras on another backend in the same process (objects built
    before keep the old one): the torch-backend process switched to
    TensorFlow."""
    assert on_torch["backend"] == "torch"
    assert on_torch["after_set_backend"] == "tensorflow"
