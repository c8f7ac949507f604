"""Claims of chapter 5 (book/05_one_denominator.ipynb), each tested in general.

One test per claim about a library (PyTorch, transformers, Keras 3 on the
TensorFlow and torch backends, tf-keras) or about the mathematics the chapter
relies on.  Each docstring quotes the sentence (shortened) and names its cell.
Tests of claims that hold only in a case the sentence does not state, or not
at all, assert the actual behaviour, so that they document the corrected
claim.

Three slow checks run as background programs, started by the first test of
the module and read by the tests that need them: a 3-rank ``gloo``
``DistributedDataParallel`` run (forked workers), and a Keras ``fit`` on the
TensorFlow backend (Keras 3 and tf-keras) and on the torch backend
(``KERAS_BACKEND=torch`` must be set before Keras is imported).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from companion import reference
from companion.accumulation import mean_of_means, token_mean, token_weight_factors

IGNORE = -100
TIGHT = 1e-12
REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------
# Background programs
# ---------------------------------------------------------------------------

_DDP_SCRIPT = r'''
import json, os, sys, tempfile, time
t0 = time.perf_counter()
import torch
torch_import_s = time.perf_counter() - t0
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

R = 3
V, H = 7, 5
# rank r's rows (lengths incl. the first token); unequal scored counts
SHARDS = [[2, 3], [9], [4, 4, 5]]


def own_tcp_sockets():
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in inodes:
                addr, port = f[1].split(":")
                found.append([table, addr, int(port, 16), f[3]])
    return found


def flat_grad(module):
    return torch.cat([p.grad.flatten() for p in module.parameters()])


def gather(t):
    out = [torch.zeros_like(t) for _ in range(R)]
    dist.all_gather(out, t)
    return out


class TokLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, H)
        self.head = torch.nn.Linear(H, V)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)))


def shard_batch(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    T = max(max(lengths), 2)
    ids = torch.randint(0, V, (len(lengths), T), generator=g)
    labels = ids.clone()
    for i, n in enumerate(lengths):
        labels[i, n:] = -100
    return ids, labels


def summed(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def worker(rank, d):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    store = dist.FileStore(os.path.join(d, "store"), R)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=R)
    res = {"sockets": own_tcp_sockets()}
    torch.manual_seed(0)

    # (a) arbitrary, different losses per rank
    base = torch.nn.Linear(4, 3).double()
    local = torch.nn.Linear(4, 3).double()
    local.load_state_dict(base.state_dict())
    ddp = DDP(base)
    x = torch.randn(5, 4, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(rank))
    loss_fn = lambda out: (rank + 1) * (out ** (rank + 1)).sum()
    loss_fn(local(x)).backward()
    expect = sum(gather(flat_grad(local))) / R
    ddp.zero_grad()
    loss_fn(ddp(x)).backward()
    g = flat_grad(base)
    res["a_err"] = float((g - expect).abs().max() / expect.abs().max())
    res["a_gap"] = max(float((o - gather(g)[0]).abs().max()) for o in gather(g))
    # DDP does not slice a batch: every rank's forward sees all the rows it is given
    full_batch = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # a forward with grad and no backward would arm the next sync
        res["a_forward_rows"] = [ddp(full_batch).shape[0], ddp(x).shape[0]]

    # (b) float32 contributions whose sum depends on the order of addition
    lin = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    d2 = DDP(lin)
    (d2(torch.ones(1, 1)) * [1e8, 1.0, -1e8][rank]).sum().backward()
    res["b_grad"] = lin.weight.grad.item()

    # (c) no_sync: forward and backward of K-1 micro-batches inside, last outside
    base.zero_grad(set_to_none=True)
    local.zero_grad(set_to_none=True)
    xs = [torch.randn(2 + k + rank, 4, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(100 * rank + k))
          for k in range(3)]
    with ddp.no_sync():
        for k in range(2):
            ddp(xs[k]).pow(2).sum().backward()
    inside = flat_grad(base)
    res["c_inside_gap"] = max(float((o - gather(inside)[0]).abs().max())
                              for o in gather(inside))
    for k in range(2):
        local(xs[k]).pow(2).sum().backward()
    res["c_inside_is_local"] = float((inside - flat_grad(local)).abs().max())
    ddp(xs[2]).pow(2).sum().backward()
    local(xs[2]).pow(2).sum().backward()
    after = flat_grad(base)
    expect = sum(gather(flat_grad(local))) / R
    res["c_err"] = float((after - expect).abs().max() / expect.abs().max())
    # forward outside no_sync, backward inside: synchronised all the same
    base.zero_grad(set_to_none=True)
    out = ddp(xs[0])
    with ddp.no_sync():
        out.pow(2).sum().backward()
    res["c_forward_outside_gap"] = max(
        float((o - gather(flat_grad(base))[0]).abs().max())
        for o in gather(flat_grad(base)))

    # (d) token losses: s_r / n_r, s_r / |S|, R s_r / |S|
    torch.manual_seed(1)
    lm = TokLM().double()
    ref = TokLM().double()
    ref.load_state_dict(lm.state_dict())
    ddp_lm = DDP(lm)
    ids, labels = shard_batch(SHARDS[rank], seed=10 + rank)
    n_r = int((labels[:, 1:] != -100).sum())
    total = torch.tensor(n_r)
    dist.all_reduce(total)
    total = int(total)
    summed(ref(ids), labels).backward()
    local_sum_grad = flat_grad(ref)
    sum_grads = gather(local_sum_grad)
    counts = gather(torch.tensor([n_r]))
    counts = [int(c) for c in counts]
    full = sum(sum_grads) / total
    naive = sum(gk / nk for gk, nk in zip(sum_grads, counts)) / R
    # the full batch in one process, for an independent reference
    all_ids, all_labels = [], []
    for r in range(R):
        i_r, l_r = shard_batch(SHARDS[r], seed=10 + r)
        all_ids.append(i_r)
        all_labels.append(l_r)
    T = max(t.shape[1] for t in all_ids)
    pad = lambda t, v: F.pad(t, (0, T - t.shape[1]), value=v)
    cat_ids = torch.cat([pad(t, 0) for t in all_ids])
    cat_labels = torch.cat([pad(t, -100) for t in all_labels])
    ref.zero_grad(set_to_none=True)
    (summed(ref(cat_ids), cat_labels) / int((cat_labels[:, 1:] != -100).sum())).backward()
    single = flat_grad(ref)
    variants = {}
    for name in ("mean_of_means", "global_count_unscaled", "token_mean"):
        lm.zero_grad(set_to_none=True)
        s = summed(ddp_lm(ids), labels)
        loss = {"mean_of_means": s / n_r, "global_count_unscaled": s / total,
                "token_mean": R * s / total}[name]
        loss.backward()
        g = flat_grad(lm)
        step_loss = loss.detach().clone()
        dist.all_reduce(step_loss)
        variants[name] = {
            "loss": float(step_loss) / R,
            "gradient": g.tolist(),
        }
    res["d"] = {
        "counts": counts, "total": total, "variants": variants,
        "full": full.tolist(), "naive": naive.tolist(), "single": single.tolist(),
        "sums": [float(x) for x in gather(summed(ref(ids), labels).detach().reshape(1))],
    }
    with open(os.path.join(d, f"r{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(worker, args=(d,), nprocs=R, start_method="fork")
        ranks = [json.load(open(os.path.join(d, f"r{r}.json"))) for r in range(R)]
    t1 = time.perf_counter()
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401
    llama_import_s = time.perf_counter() - t1
    # Keras on the torch backend, in this process: Keras is not imported yet,
    # so setting KERAS_BACKEND now is setting it before the import
    os.environ["KERAS_BACKEND"] = "torch"
    sys.argv = ["-c", "torch"]
    keras_out = {}
    exec(KERAS_SCRIPT, {"__name__": "keras_torch", "print": lambda s: keras_out.setdefault("s", s)})
    print(json.dumps({"ranks": ranks, "torch_import_s": torch_import_s,
                      "llama_import_s": llama_import_s,
                      "keras_torch": json.loads(keras_out["s"])}))
'''

_KERAS_SCRIPT = r'''
import json, sys
import numpy as np

def experiment(keras, reduce_sum):
    rng = np.random.default_rng(0)
    N, T = 10, 6
    x = rng.uniform(0.0, 5.0, size=(N, T, 1)).astype("float32")
    lengths = np.array([1, 6, 2, 5, 1, 3, 6, 2, 1, 4])
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype("float32")[..., None]

    def batch_token_mean(y_true, y_pred):
        # one number per batch, not a mean of per-sequence numbers
        return reduce_sum(y_true * y_pred) / reduce_sum(y_true)

    def build(lr):
        inp = keras.Input(shape=(T, 1))
        layer = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")
        model = keras.Model(inp, layer(inp))
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=lr),
                      loss=batch_token_mean)
        return model, layer

    out = {"backend": keras.backend.backend(), "version": keras.__version__,
           "x": x.tolist(), "mask": mask.tolist(), "history": {}}
    for batch_size in (1, 3, 4, 10):
        model, _ = build(0.0)
        hist = model.fit(x, mask, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
        out["history"][str(batch_size)] = hist.history["loss"][0]
    model, layer = build(0.1)
    model.fit(x, mask, batch_size=4, epochs=1, shuffle=False, verbose=0)
    out["kernel_after_sgd"] = float(np.asarray(layer.kernel).reshape(()))
    return out

results = []
if sys.argv[1] == "tensorflow":
    import tensorflow as tf
    import keras
    results.append(experiment(keras, tf.reduce_sum))
    import tf_keras
    results.append(experiment(tf_keras, tf.reduce_sum))
else:
    import keras
    results.append(experiment(keras, keras.ops.sum))
print(json.dumps(results))
'''


def _quiet_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2", TF_ENABLE_ONEDNN_OPTS="0",
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


@pytest.fixture(scope="module", autouse=True)
def background():
    """Start the slow programs once, at the module's first test."""
    programs = {
        # the 3-rank DDP run, then the Keras torch-backend fit in the same process
        "ddp": ([sys.executable, "-c", _DDP_SCRIPT.replace("KERAS_SCRIPT", repr(_KERAS_SCRIPT))],
                _quiet_env()),
        "keras_tf": ([sys.executable, "-c", _KERAS_SCRIPT, "tensorflow"],
                     _quiet_env(KERAS_BACKEND="tensorflow")),
    }
    running = {
        name: subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        for name, (cmd, env) in programs.items()
    }
    results: dict[str, object] = {}

    def result(name: str):
        program = "ddp" if name == "keras_torch" else name
        if program not in results:
            out, err = running[program].communicate(timeout=300)
            assert running[program].returncode == 0, err[-3000:]
            results[program] = json.loads(out.strip().splitlines()[-1])
        if name == "keras_torch":
            return results["ddp"]["keras_torch"]
        return results[program]

    yield result
    for proc in running.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _ref_sum_count(logits: torch.Tensor, labels: torch.Tensor, ignore: int = IGNORE):
    """float64 summed next-token loss and target count, position by position."""
    x = logits.detach().to(torch.float64).numpy()
    y = labels.numpy()
    total, count = 0.0, 0
    for b in range(x.shape[0]):
        logp = reference.log_softmax(x[b])
        for t in range(x.shape[1] - 1):
            if y[b, t + 1] != ignore:
                total -= logp[t, y[b, t + 1]]
                count += 1
    return total, count


@st.composite
def lm_batches(draw, dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64)):
    """Logits ``(B, T, V)`` and labels with a padding side, ignore_index, dtype."""
    shape = draw(st.sampled_from(["free", "T=V", "B=T", "B=1", "T=1"]))
    B, T, V = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(2, 6))
    if shape == "T=V":
        T = V
    elif shape == "B=T":
        B = T
    elif shape == "B=1":
        B = 1
    elif shape == "T=1":
        T = 1
    padding = draw(st.sampled_from(["none", "right", "left", "all", "random"]))
    ignore = draw(st.sampled_from([IGNORE, -1, 99]))
    dtype = draw(st.sampled_from(dtypes))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    logits = (3 * torch.randn(B, T, V, generator=g, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    pos = torch.arange(T)[None, :]
    if padding == "right":
        labels[pos >= lengths[:, None]] = ignore
    elif padding == "left":
        labels[pos < (T - lengths)[:, None]] = ignore
    elif padding == "all":
        labels[:] = ignore
    elif padding == "random":
        labels[torch.rand(B, T, generator=g) < 0.4] = ignore
    return logits, labels, V, ignore


def _shift_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


def _count(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE).sum())


class _TokenModel(torch.nn.Module):
    """Any differentiable map from ids to logits will do for the identities."""

    def __init__(self, vocab: int = 7, hidden: int = 5, dtype=torch.float64):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, hidden, generator=g, dtype=dtype))
        self.mix = torch.nn.Parameter(torch.randn(hidden, hidden, generator=g, dtype=dtype) / 3)
        self.head = torch.nn.Parameter(torch.randn(hidden, vocab, generator=g, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb[ids]
        context = torch.cumsum(h, dim=1) / torch.arange(1, ids.shape[1] + 1, dtype=h.dtype)[:, None]
        return torch.tanh(h + context @ self.mix) @ self.head


def _rows(lengths: list[int], vocab: int = 7, seed: int = 0, T: int | None = None):
    g = torch.Generator().manual_seed(seed)
    T = T or max(max(lengths), 2)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=g)
    labels = ids.clone()
    for i, n in enumerate(lengths):
        labels[i, n:] = IGNORE
    return ids, labels


def _grad_of(model: torch.nn.Module, losses) -> torch.Tensor:
    """Back-propagate each loss in turn (gradient accumulation), return .grad."""
    for p in model.parameters():
        p.grad = None
    for loss in losses:
        loss().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


splits_of_rows = st.lists(st.integers(1, 9), min_size=1, max_size=6).flatmap(
    lambda lengths: st.tuples(
        st.just(lengths),
        st.lists(st.booleans(), min_size=len(lengths) - 1, max_size=len(lengths) - 1),
    )
)


def _pieces(lengths: list[int], cuts: list[bool]) -> list[int]:
    """Rows per micro-batch from a cut after row i where cuts[i]."""
    sizes, size = [], 1
    for cut in cuts:
        if cut:
            sizes.append(size)
            size = 1
        else:
            size += 1
    sizes.append(size)
    return sizes


# ---------------------------------------------------------------------------
# Cell 0 and cell 4: the principle
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).double().eval()


def test_cell0_causal_lm_reports_the_token_mean(tiny_llama):
    """Cell 0: "The loss a causal language model reports is a token-level mean:
    the sum of -log p over every scored token, divided by the number of scored
    tokens."  A transformers causal LM, B = 1 and T = 2 up to B = T, right, left,
    no and all padding: model.loss == float64 sum / count (nan for 0 tokens)."""
    g = torch.Generator().manual_seed(3)
    cases = []
    for B, T in ((1, 2), (3, 3), (4, 16)):
        ids = torch.randint(0, 16, (B, T), generator=g)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        pos = torch.arange(T)[None, :]
        for padding in ("none", "right", "left", "all"):
            labels = ids.clone()
            if padding == "right":
                labels[pos >= lengths[:, None]] = IGNORE
            elif padding == "left":
                labels[pos < (T - lengths)[:, None]] = IGNORE
            elif padding == "all":
                labels[:] = IGNORE
            cases.append((ids, labels))
    for ids, labels in cases:
        with torch.no_grad():
            out = tiny_llama(input_ids=ids, labels=labels)
        total, count = _ref_sum_count(out.logits, labels)
        if count == 0:
            assert math.isnan(float(out.loss))
        else:
            assert float(out.loss) == pytest.approx(total / count, rel=1e-5, abs=1e-6)


@settings(max_examples=20)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=6), st.integers(0, 2**16))
def test_cell4_mean_of_means_equals_token_mean_for_every_loss_iff_counts_equal(counts, seed):
    """Cell 4: "The two agree for every choice of losses only if all f_k = 1,
    that is if every group holds |S|/K tokens."  Equal counts: agree for random
    sums.  Unequal counts: a choice of losses (loss only in the smallest group)
    where they differ."""
    rng = np.random.default_rng(seed)
    sums = list(rng.uniform(0, 5, len(counts)) * np.array(counts))
    if len(set(counts)) == 1:
        assert mean_of_means(sums, counts) == pytest.approx(token_mean(sums, counts), rel=1e-12)
        assert all(f == pytest.approx(1.0) for f in token_weight_factors(counts))
    else:
        k = int(np.argmin(counts))
        only_small = [float(counts[k]) if i == k else 0.0 for i in range(len(counts))]
        assert mean_of_means(only_small, counts) != pytest.approx(token_mean(only_small, counts))


def test_cell0_equal_counts_are_not_necessary_for_given_losses():
    """Cell 0: "It equals the token mean only when every group holds the same
    number of scored tokens."  TRUE-ONLY-IN-CASE: only-when holds for *every*
    choice of losses.  For given losses the means can agree with unequal counts:
    K = 2 with equal group means, K = 3 with different group means."""
    # K = 2: L_mm - L = (n_2 - n_1)(m_1 - m_2) / (2 |S|)
    for n1, n2, m1, m2 in ((2, 30, 3.0, 0.5), (5, 1, 0.1, 4.0), (7, 3, 1.25, 1.25)):
        gap = mean_of_means([n1 * m1, n2 * m2], [n1, n2]) - token_mean([n1 * m1, n2 * m2], [n1, n2])
        assert gap == pytest.approx((n2 - n1) * (m1 - m2) / (2 * (n1 + n2)), abs=1e-12)
    # equal means, unequal counts: equal
    assert mean_of_means([2 * 1.5, 30 * 1.5], [2, 30]) == pytest.approx(
        token_mean([2 * 1.5, 30 * 1.5], [2, 30]), abs=1e-15)
    # K = 3, counts 1, 2, 1 and means 0, 1, 2, all different: equal too
    counts, means = [1, 2, 1], [0.0, 1.0, 2.0]
    sums = [n * m for n, m in zip(counts, means)]
    assert len(set(counts)) > 1 and len(set(means)) == 3
    assert mean_of_means(sums, counts) == pytest.approx(token_mean(sums, counts), abs=1e-15)


@settings(max_examples=20)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=8))
def test_cell4_tokens_of_smaller_groups_count_more(counts):
    """Cell 4: "Tokens of groups smaller than average count more, tokens of larger
    groups count less." f_k = |S|/(K n_k) > 1 iff n_k < |S|/K, = 1 iff equal, < 1
    iff larger; sum_k n_k f_k = |S|."""
    factors = token_weight_factors(counts)
    total, K = sum(counts), len(counts)
    for n, f in zip(counts, factors):
        if n * K < total:
            assert f > 1
        elif n * K > total:
            assert f < 1
        else:
            assert f == pytest.approx(1.0, rel=1e-15)
    assert math.fsum(n * f for n, f in zip(counts, factors)) == pytest.approx(total, rel=1e-12)


@settings(max_examples=20)
@given(
    st.lists(st.tuples(st.integers(1, 30), st.floats(0, 10)), min_size=1, max_size=6),
    st.floats(-5, 5),
)
def test_cell4_gap_depends_only_on_how_group_means_differ(groups, shift):
    """Cell 4: "When the counts differ, the gap depends on how the losses differ
    between groups."  L_mm - L = sum_k (f_k - 1) n_k m_k / |S|, unchanged when every
    loss moves by the same constant, zero when all group means are equal."""
    counts = [n for n, _ in groups]
    means = [m for _, m in groups]
    total = sum(counts)

    def gap(ms):
        sums = [n * m for n, m in zip(counts, ms)]
        return mean_of_means(sums, counts) - token_mean(sums, counts)

    f = token_weight_factors(counts)
    formula = math.fsum((fk - 1) * n * m for fk, n, m in zip(f, counts, means)) / total
    assert gap(means) == pytest.approx(formula, abs=1e-9)
    assert gap([m + shift for m in means]) == pytest.approx(gap(means), abs=1e-9)
    assert gap([means[0]] * len(means)) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------
# Cell 10 to cell 14: the model, the loss's dtype, the data
# ---------------------------------------------------------------------------


@settings(max_examples=12)
@given(lm_batches())
def test_cell10_cell24_forcausallmloss_computes_in_float32_whatever_the_dtype(batch):
    """Cell 10: "transformers' causal-LM loss casts logits with .float(), which
    turns float64 into float32"; cell 24: "(It computes in float32, ...)".
    loss_utils.py:61.  float16, bfloat16, float32 and float64 logits, with and
    without num_items_in_batch: a float32 result."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, labels, V, ignore = batch
    for n in (None, 3, torch.tensor(3)):
        loss = ForCausalLMLoss(logits, labels, V, num_items_in_batch=n, ignore_index=ignore)
        assert loss.dtype == torch.float32
    # float64 in, float32 arithmetic: equal to the float32 rounding of the input
    x64 = torch.randn(2, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (2, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(ForCausalLMLoss(x64, y, 4), ForCausalLMLoss(x64.float(), y, 4))


def test_cell10_tiny_llama_loss_matches_the_float64_reference(tiny_llama):
    """Cell 10: "A tiny LlamaForCausalLM built from a config would work just as
    well, and the package's tests check its loss, with and without
    num_items_in_batch, against the same float64 reference."  Checked here over
    paddings and counts, and the package test is there."""
    source = (REPO / "tests" / "test_accumulation.py").read_text()
    assert "LlamaForCausalLM" in source and "num_items_in_batch" in source
    assert "reference.causal_lm_loss" in source
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 16, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, 4:] = IGNORE
    labels[1, :6] = IGNORE
    with torch.no_grad():
        for n in (None, 7, 40, torch.tensor(25)):
            out = tiny_llama(input_ids=ids, labels=labels, num_items_in_batch=n)
            expected = reference.causal_lm_loss(
                out.logits.numpy(), labels.numpy(),
                num_items_in_batch=None if n is None else int(n),
            )
            assert float(out.loss) == pytest.approx(expected, rel=1e-5)


def test_cell10_initial_loss_is_near_log_v_only_for_small_initial_weights():
    """Cell 10: "A model at initialisation gives every token a loss close to log V."
    TRUE-ONLY-IN-CASE: for small initial weights (the package's model; a Llama
    with the default initializer_range 0.02).  With initializer_range = 1.0 the
    same Llama starts far above log V."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from companion.causal_lm_loss import label_padding_loss
    from companion.experiments.denominator import make_counting_batch
    from companion.experiments.tiny_models import build_tiny_lm

    for seed in (0, 1):
        model = build_tiny_lm(seed=seed)
        V = model.config.vocab_size
        ids, labels = make_counting_batch([12] * 6, vocab_size=V, seed=seed)
        with torch.no_grad():
            loss = float(label_padding_loss(model(ids), labels))
        assert abs(loss - math.log(V)) < 0.1 * math.log(V)
    ids, labels = make_counting_batch([12] * 6, vocab_size=32, seed=0)
    losses = {}
    for init in (0.02, 1.0):
        config = LlamaConfig(
            vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
            initializer_range=init,
        )
        torch.manual_seed(0)
        with torch.no_grad():
            losses[init] = float(LlamaForCausalLM(config).double()(input_ids=ids, labels=labels).loss)
    assert abs(losses[0.02] - math.log(32)) < 0.02 * math.log(32)
    assert losses[1.0] > 1.5 * math.log(32)


@settings(max_examples=15)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=5), st.integers(3, 40), st.integers(0, 999))
def test_cell10_counting_rows_later_targets_follow_the_token_before(lengths, vocab, seed):
    """Cell 10: "each row is a begin token followed by a run that counts up from a
    random start ... every later one follows from the token before it."  Any
    lengths and V >= 3, wrap-around included (ids 2 .. V-1)."""
    from companion.experiments.denominator import make_counting_batch

    ids, labels = make_counting_batch(lengths, vocab_size=vocab, seed=seed)
    for row, n in enumerate(lengths):
        assert int(ids[row, 0]) == 1
        run = ids[row, 1:n].tolist()
        for before, after in zip(run, run[1:]):
            assert after == (before + 1 if before < vocab - 1 else 2)
        assert (labels[row, n:] == IGNORE).all() and torch.equal(labels[row, :n], ids[row, :n])


@settings(max_examples=12)
@given(lm_batches(dtypes=(torch.float32, torch.float64)))
def test_cell14_cell27_first_label_never_a_target_row_has_t_minus_1(batch):
    """Cell 14: "A row of T tokens has T-1 targets"; cell 27: "A causal LM scores
    position t against label t+1, so the first label of every row is never a
    target."  ForCausalLMLoss: changing labels[:, 0] or the last logits changes
    nothing; the summed loss counts labels[:, 1:] only (T-1 per full row, 0 for T=1)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, labels, V, ignore = batch
    other = labels.clone()
    other[:, 0] = torch.where(labels[:, 0] == ignore, torch.zeros_like(labels[:, 0]),
                              torch.full_like(labels[:, 0], ignore))
    moved = logits.clone()
    moved[:, -1] = moved[:, -1] + 10
    for n in (None, 1):
        base = ForCausalLMLoss(logits, labels, V, num_items_in_batch=n, ignore_index=ignore)
        for la, lo in ((other, logits), (labels, moved)):
            changed = ForCausalLMLoss(lo, la, V, num_items_in_batch=n, ignore_index=ignore)
            assert torch.equal(base, changed) or (base.isnan() and changed.isnan())
    # with uniform logits each target costs log V: the summed loss counts targets
    full = torch.randint(0, V, labels.shape)
    summed = ForCausalLMLoss(torch.zeros(*labels.shape, V), full, V, num_items_in_batch=1)
    B, T = labels.shape
    assert float(summed) == pytest.approx(B * (T - 1) * math.log(V), rel=1e-5, abs=1e-6)
    # cell 4: |S| <= N = B (T - 1), fewer exactly when a label of columns 1: is ignored
    scored = int((labels[:, 1:] != ignore).sum())
    assert scored <= B * (T - 1)
    assert (scored < B * (T - 1)) == bool((labels[:, 1:] == ignore).any())


# ---------------------------------------------------------------------------
# Cell 15 to cell 30: gradient accumulation and num_items_in_batch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cell15_backward_adds_up_in_grad(dtype):
    """Cell 15: "runs forward and backward on each, lets the gradients add up in
    .grad".  Two backward passes without zero_grad: .grad == g1 + g2, any dtype."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, dtype=torch.float64, generator=g).to(dtype).requires_grad_()
    xs = [torch.randn(6, dtype=torch.float64, generator=g).to(dtype) for _ in range(2)]
    singles = []
    for x in xs:
        w.grad = None
        (w * x).sum().backward()
        singles.append(w.grad.clone())
    w.grad = None
    for x in xs:
        (w * x).sum().backward()
    assert torch.equal(w.grad, singles[0] + singles[1])


@settings(max_examples=12)
@given(splits_of_rows, st.integers(0, 999))
def test_cell15_sums_over_the_step_count_give_the_full_batch_step(split, seed):
    """Cell 15: "Each micro-batch then back-propagates s_k/|S|, and
    sum_k s_k/|S| = L exactly."  Any rows, any split into K = 1 .. B micro-batches,
    micro-batches without targets included: loss and gradient equal the full
    batch's (float64: 1e-12; float32 agrees only to rounding)."""
    lengths, cuts = split
    if sum(n - 1 for n in lengths) == 0:
        return
    sizes = _pieces(lengths, cuts)
    ids, labels = _rows(lengths, seed=seed)
    total = _count(labels)
    for dtype, tol in ((torch.float64, TIGHT), (torch.float32, 2e-5)):
        model = _TokenModel(dtype=dtype)
        full = _grad_of(model, [lambda: _shift_sum(model(ids), labels) / total])
        pieces = list(zip(ids.split(sizes), labels.split(sizes)))
        acc = _grad_of(model, [lambda i=i, la=la: _shift_sum(model(i), la) / total for i, la in pieces])
        assert _rel(acc, full) < tol
        with torch.no_grad():
            full_loss = float(_shift_sum(model(ids), labels)) / total
            acc_loss = sum(float(_shift_sum(model(i), la)) / total for i, la in pieces)
        assert acc_loss == pytest.approx(full_loss, rel=tol)


@settings(max_examples=12)
@given(lm_batches(), st.sampled_from(["none", "int", "tensor", "float-tensor"]), st.integers(1, 50))
def test_cell15_cell22_forcausallmloss_sums_and_divides_by_the_given_count(batch, kind, n):
    """Cell 15: "the model's default loss divides its summed loss by the count it
    is given"; cell 22: "with num_items_in_batch it sums the token losses and
    divides by the given count; without it, it takes the micro-batch's own mean."
    loss_utils.py:41-47.  Shapes B = 1, T = 1, T = V, B = T; padding none, right,
    left, all, random; four dtypes; ignore_index -100, -1, 99; the count as int,
    int tensor or float tensor, and not checked against the labels."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits, labels, V, ignore = batch
    count_arg = {"none": None, "int": n, "tensor": torch.tensor(n), "float-tensor": torch.tensor(float(n))}[kind]
    loss = float(ForCausalLMLoss(logits, labels, V, num_items_in_batch=count_arg, ignore_index=ignore))
    total, count = _ref_sum_count(logits.float(), labels, ignore)
    if count_arg is None:
        if count == 0:
            assert math.isnan(loss)
        else:
            assert loss == pytest.approx(total / count, rel=2e-5, abs=1e-5)
    else:
        assert loss == pytest.approx(total / n, rel=2e-5, abs=1e-5)
    # labels must be int64 (or uint8): int32 labels are refused by cross_entropy
    with pytest.raises(RuntimeError, match="Long"):
        ForCausalLMLoss(logits, labels.to(torch.int32), V, ignore_index=ignore)


def test_cell22_forcausallmloss_is_the_default_causal_lm_loss(tiny_llama):
    """Cell 22: "the default causal-LM loss, ForCausalLMLoss in
    transformers/loss/loss_utils.py".  LOSS_MAPPING["ForCausalLM"]
    (loss_utils.py:176); modeling_utils.py:4766-4774 falls back to it."""
    from transformers import LlamaForCausalLM
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    assert LOSS_MAPPING["ForCausalLM"] is ForCausalLMLoss
    assert tiny_llama.loss_function is ForCausalLMLoss
    assert isinstance(tiny_llama, LlamaForCausalLM)


class _CountingDataset(torch.utils.data.Dataset):
    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


class _PlainModel(torch.nn.Module):
    """A causal LM whose forward takes no **kwargs (not a transformers model)."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.head = torch.nn.Linear(8, 16)

    def forward(self, input_ids, labels=None):
        logits = self.head(self.emb(input_ids))
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, 16), labels[:, 1:].reshape(-1))
        return {"loss": loss, "logits": logits}


def _train_one_step(model, ids, labels, **trainer_kwargs):
    """One optimizer step of 2 micro-batches of 2 rows; record forward and step."""
    from transformers import Trainer, TrainingArguments

    seen, returned = [], []

    def hook(module, args, kwargs, out):
        seen.append({"num_items_in_batch": kwargs.get("num_items_in_batch"),
                     "loss": float(out["loss"].detach()), "logits": out["logits"].detach(),
                     "labels": kwargs["labels"]})

    class Recording(Trainer):
        def training_step(self, *args, **kwargs):
            out = super().training_step(*args, **kwargs)
            returned.append(float(out))
            return out

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            args = TrainingArguments(
                output_dir=scratch, report_to=[], use_cpu=True, gradient_accumulation_steps=2,
                per_device_train_batch_size=2, max_steps=1, learning_rate=0.0,
                save_strategy="no", logging_strategy="no", disable_tqdm=True,
            )
            trainer = Recording(model=model, args=args, train_dataset=_CountingDataset(ids, labels),
                                **trainer_kwargs)
            trainer.train()
    finally:
        handle.remove()
    return trainer, seen, returned


def _llama_batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 16, (4, 7), generator=g)
    labels = ids.clone()
    labels[0, 2:] = IGNORE
    labels[1, 3:] = IGNORE
    labels[2, :3] = IGNORE  # a masked prompt: the first label is not a target anyway
    return ids, labels


def test_cell15_trainer_counts_the_step_ahead_and_passes_the_count(tiny_llama):
    """Cell 15: "The Trainer gets there by fetching a step's micro-batches ahead,
    counting their tokens before the first forward pass and passing that count to
    the loss as num_items_in_batch."  trainer.py:1873, 2281-2296, 2159-2163,
    2106-2111.  A real 1-step, K = 2 run: both forward passes get the step's count
    (labels[:, 1:] of all 4 rows); each loss is s_k / |S| and is not divided by K."""
    import copy

    model = copy.deepcopy(tiny_llama).float().train()
    ids, labels = _llama_batch()
    total = _count(labels)
    trainer, seen, returned = _train_one_step(model, ids, labels)
    assert trainer.model_accepts_loss_kwargs
    assert len(seen) == 2
    for record, step_loss in zip(seen, returned):
        assert float(record["num_items_in_batch"]) == total
        s_k, _ = _ref_sum_count(record["logits"], record["labels"])
        assert record["loss"] == pytest.approx(s_k / total, rel=1e-5)
        assert step_loss == pytest.approx(record["loss"], rel=1e-6)
    model.eval()
    with torch.no_grad():
        full = float(model(input_ids=ids, labels=labels).loss)
    assert sum(r["loss"] for r in seen) == pytest.approx(full, rel=1e-5)


def test_cell15_trainer_falls_back_to_mean_over_k_without_loss_kwargs():
    """Cell 15 (where the previous claim stops holding): a model whose forward
    takes no **kwargs, and no compute_loss_func: the Trainer counts nothing
    (trainer.py:2308-2321), passes no count, and divides each micro-batch's own
    mean by K (trainer.py:2103-2111) -- the mean of means, as before the fix."""
    torch.manual_seed(0)
    model = _PlainModel()
    ids, labels = _llama_batch()
    trainer, seen, returned = _train_one_step(model, ids, labels)
    assert trainer.model_accepts_loss_kwargs is False
    assert all(r["num_items_in_batch"] is None for r in seen)
    for record, step_loss in zip(seen, returned):
        assert step_loss == pytest.approx(record["loss"] / 2, rel=1e-6)


def _num_items_stub(*, shifts=True, accepts=True, func=None, average=True, world_size=1,
                    n_gpu=0, tp=1, other_ranks=()):
    def gather(t):
        return torch.stack([t.reshape(())] + [torch.tensor(o, dtype=t.dtype) for o in other_ranks])

    return SimpleNamespace(
        _loss_shifts_labels=shifts, model_accepts_loss_kwargs=accepts, compute_loss_func=func,
        args=SimpleNamespace(average_tokens_across_devices=average, world_size=world_size, n_gpu=n_gpu),
        accelerator=SimpleNamespace(gather=gather, num_processes=world_size, parallelism_config=None),
        get_tp_size=lambda: tp, get_cp_size=lambda: 1, get_sp_size=lambda: 1, label_smoother=None,
    )


def test_cell27_trainer_counts_labels_from_column_1_only_for_forcausallm_models(tiny_llama):
    """Cell 27: "The Trainer of transformers 5.23 counts accordingly, over
    labels[..., 1:] of every micro-batch of the step."  TRUE-ONLY-IN-CASE:
    only when the model's loss_type maps to ForCausalLMLoss and it is not
    encoder-decoder (trainer.py:543-545, 2327-2335).  A non-transformers model
    with a compute_loss_func is counted over all columns (one too many per row
    whose first label is scored); a batch with shift_labels is counted as is."""
    from transformers import Trainer, TrainingArguments

    ids, labels = _llama_batch()
    batches = [{"input_ids": ids[:2], "labels": labels[:2]}, {"input_ids": ids[2:], "labels": labels[2:]}]
    shifted = _count(labels)
    all_columns = int((labels != IGNORE).sum())
    rows_with_first_label = int((labels[:, 0] != IGNORE).sum())
    assert all_columns == shifted + rows_with_first_label
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, report_to=[], use_cpu=True)
        llama = Trainer(model=tiny_llama, args=args)
        custom = Trainer(model=_PlainModel(), args=args,
                         compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs["loss"])
        plain = Trainer(model=_PlainModel(), args=args)
        cpu = torch.device("cpu")
        assert llama._loss_shifts_labels and not custom._loss_shifts_labels
        assert float(llama.get_batch_samples(iter(batches), 2, cpu)[1]) == shifted
        assert float(custom.get_batch_samples(iter(batches), 2, cpu)[1]) == all_columns
        assert plain.get_batch_samples(iter(batches), 2, cpu)[1] is None
        with_shift = [dict(b, shift_labels=torch.full_like(b["labels"], 5)) for b in batches]
        assert float(llama.get_batch_samples(iter(with_shift), 2, cpu)[1]) == labels.numel()


@settings(max_examples=15)
@given(lm_batches(dtypes=(torch.float32,)))
def test_cell30_counting_all_labels_adds_one_per_row_whose_first_label_is_scored(batch):
    """Cell 30: "Counting labels != -100 instead would have given 56 here, one too
    many per row."  TRUE-ONLY-IN-CASE: one too many per row whose first label is
    not ignored; rows that start with padding (left padding) or a masked prompt
    add nothing."""
    _, labels, _, ignore = batch
    all_columns = int((labels != ignore).sum())
    targets = int((labels[:, 1:] != ignore).sum())
    assert all_columns - targets == int((labels[:, 0] != ignore).sum())
    left = torch.tensor([[IGNORE, IGNORE, 4, 5], [IGNORE, 3, 4, 5]])
    assert int((left != IGNORE).sum()) == _count(left)


# ---------------------------------------------------------------------------
# Cell 31 to cell 36: imbalance
# ---------------------------------------------------------------------------


@st.composite
def equal_count_splits(draw):
    K = draw(st.integers(1, 4))
    c = draw(st.integers(1, 8))
    rows = []
    sizes = []
    for _ in range(K):
        parts = draw(st.lists(st.integers(0, c), min_size=0, max_size=3))
        cuts = sorted(set(p for p in parts if 0 < p < c))
        counts = [b - a for a, b in zip([0] + cuts, cuts + [c])]
        rows += [n + 1 for n in counts]
        sizes.append(len(counts))
    return rows, sizes


@settings(max_examples=12)
@given(equal_count_splits(), st.integers(0, 999))
def test_cell36_cell74_naive_step_is_exact_at_equal_counts(split, seed):
    """Cell 36: "At equal counts the naive step is exact."; cell 74: "It is the
    token counts that must match, not the row counts."  Micro-batches with equal
    target counts but different numbers of rows: mean / K == full batch, loss and
    gradient, to 1e-12 in float64."""
    lengths, sizes = split
    ids, labels = _rows(lengths, seed=seed)
    K, total = len(sizes), _count(labels)
    model = _TokenModel()
    full = _grad_of(model, [lambda: _shift_sum(model(ids), labels) / total])
    pieces = list(zip(ids.split(sizes), labels.split(sizes)))
    naive = _grad_of(model, [lambda i=i, la=la: _shift_sum(model(i), la) / _count(la) / K
                             for i, la in pieces])
    assert _rel(naive, full) < TIGHT


def test_cell36_naive_error_can_vanish_with_unequal_counts():
    """Cell 36: "it vanishes only when the counts are equal."  TRUE-ONLY-IN-CASE:
    for every batch only with equal counts, but a batch can make it vanish at
    unequal counts: micro-batch 1 one row, micro-batch 2 two copies of it
    (counts n and 2n): naive loss and gradient equal the full batch's, whereas a
    different second row (same counts) does not."""
    ids, labels = _rows([6], seed=4, T=6)
    model = _TokenModel()
    for second, exact in ((torch.cat([ids, ids]), True), (None, False)):
        if second is None:
            other, other_labels = _rows([6, 6], seed=9, T=6)
        else:
            other, other_labels = second, torch.cat([labels, labels])
        all_ids, all_labels = torch.cat([ids, other]), torch.cat([labels, other_labels])
        total = _count(all_labels)
        assert (_count(labels), _count(other_labels)) == (5, 10)
        full = _grad_of(model, [lambda: _shift_sum(model(all_ids), all_labels) / total])
        naive = _grad_of(model, [
            lambda: _shift_sum(model(ids), labels) / 5 / 2,
            lambda: _shift_sum(model(other), other_labels) / 10 / 2,
        ])
        assert (_rel(naive, full) < TIGHT) is exact


# ---------------------------------------------------------------------------
# Cell 37 to cell 51: data parallelism
# ---------------------------------------------------------------------------


def test_cell37_ddp_gradient_is_the_mean_of_the_ranks_gradients(background):
    """Cell 37: "during backward all-reduces the gradients and divides them by
    the world size R ... Whatever loss L_r rank r back-propagates, the step follows
    g = 1/R sum_r grad L_r."  distributed.py:546-551.  Three gloo ranks, each with
    a different loss function: DDP's gradient == mean of the local gradients."""
    for rank in background("ddp")["ranks"]:
        assert rank["a_err"] < 1e-12


def test_cell37_ddp_does_not_slice_the_batch(background):
    """Cell 37: "DistributedDataParallel (DDP) runs one copy of the model per
    process ("rank"), gives each rank its own slice of the batch".  FALSE as
    worded: DDP's forward runs on whatever the rank passes (6 rows in, 6 rows out
    on every rank); the data loader slices, e.g. DistributedSampler, which pads
    by repeating samples when the dataset does not divide by R."""
    from torch.utils.data.distributed import DistributedSampler

    ranks = background("ddp")["ranks"]
    assert [r["a_forward_rows"] for r in ranks] == [[6, 5]] * 3
    for n in (9, 10):
        parts = [list(DistributedSampler(range(n), num_replicas=3, rank=r, shuffle=False)) for r in range(3)]
        flat = sorted(i for part in parts for i in part)
        assert len({len(part) for part in parts}) == 1
        assert set(flat) == set(range(n))
        assert len(flat) - n == (-n) % 3  # repeated samples


def test_cell46_ddp_ranks_hold_the_same_gradient_to_the_last_bit(background):
    """Cell 46: "After DDP's all-reduce every rank holds the same gradient to the
    last bit, whichever loss it used."  Three ranks (with two, a + b = b + a);
    float32 contributions 1e8, 1, -1e8 whose sum depends on the order: every rank
    gets the same bits (here 0.0, not the exact mean 1/3)."""
    ranks = background("ddp")["ranks"]
    assert all(r["a_gap"] == 0.0 for r in ranks)
    values = {r["b_grad"] for r in ranks}
    assert len(values) == 1
    assert all(float(np.float32(v)) == v for v in values)  # a float32 result, whichever order


def test_cell37_cell46_ddp_per_rank_token_losses(background):
    """Cell 37: dividing by the global count "leaves DDP's 1/R: the gradient is R
    times too small"; R s_r/|S| gives grad L; cell 46: per-rank means' "loss is
    exactly the naive accumulated loss".  Three ranks with 3, 8 and 10 targets."""
    d = background("ddp")["ranks"][0]["d"]
    R, total, counts = 3, d["total"], d["counts"]
    assert len(set(counts)) == R and total == sum(counts)
    full, naive, single = (torch.tensor(d[k], dtype=torch.float64) for k in ("full", "naive", "single"))
    assert _rel(full, single) < TIGHT
    v = {k: torch.tensor(x["gradient"], dtype=torch.float64) for k, x in d["variants"].items()}
    assert _rel(v["token_mean"], full) < TIGHT
    assert _rel(v["global_count_unscaled"], full / R) < TIGHT
    assert _cos(v["global_count_unscaled"], full) > 1 - TIGHT
    assert _rel(v["mean_of_means"], naive) < TIGHT
    assert _cos(v["mean_of_means"], full) < 0.999
    sums = d["sums"]
    losses = {k: x["loss"] for k, x in d["variants"].items()}
    assert losses["token_mean"] == pytest.approx(token_mean(sums, counts), rel=TIGHT)
    assert losses["mean_of_means"] == pytest.approx(mean_of_means(sums, counts), rel=TIGHT)


def test_cell47_no_sync_accumulates_locally_and_the_last_backward_syncs(background):
    """Cell 47: "DDP all-reduces the gradients in every backward pass ... runs
    their forward and backward passes inside no_sync(), which lets the gradients
    accumulate locally; the backward pass of the last micro-batch, outside the
    context, synchronises the accumulated sum."  distributed.py:1659-1679.  Also:
    a forward outside no_sync is synchronised even if its backward is inside."""
    for rank in background("ddp")["ranks"]:
        assert rank["c_inside_gap"] > 1e-3
        assert rank["c_inside_is_local"] == 0.0
        assert rank["c_err"] < 1e-12
        assert rank["c_forward_outside_gap"] == 0.0


def test_cell37_average_tokens_across_devices_defaults_to_true():
    """Cell 37: "(when average_tokens_across_devices is true, the default)".
    training_args.py:858-859, not changed by __post_init__."""
    from transformers import TrainingArguments

    assert TrainingArguments.__dataclass_fields__["average_tokens_across_devices"].default is True
    with tempfile.TemporaryDirectory() as scratch:
        assert TrainingArguments(output_dir=scratch, report_to=[], use_cpu=True).average_tokens_across_devices


def test_cell37_cell47_trainer_gathers_counts_and_scales_by_data_parallel_ranks():
    """Cell 37/47: "_get_num_items_in_batch gathers the counts of all ranks ...
    and compute_loss multiplies the loss by the number of processes."
    TRUE-ONLY-IN-CASE: trainer.py:2199-2207 multiplies by num_processes // tp_size
    (data-parallel groups, not processes, under tensor parallelism, whose count
    is also divided by tp, trainer.py:2355), and only when the model takes loss
    kwargs or a compute_loss_func is given; otherwise nothing is counted or scaled."""
    from transformers import Trainer

    labels = torch.tensor([[1, 2, 3, IGNORE], [IGNORE, IGNORE, 5, 6]])
    batches = [{"labels": labels}, {"labels": labels}]
    local = 2 * _count(labels)

    def model(**inputs):
        model.seen = inputs.get("num_items_in_batch")
        return {"loss": torch.tensor(2.0)}

    cases = [  # (stub settings, expected count, expected loss scale)
        (dict(world_size=4, other_ranks=(5, 6, 7)), local + 18, 4),
        (dict(world_size=4, other_ranks=(5, 6, 7), tp=2), (local + 18) / 2, 2),
        (dict(world_size=4, other_ranks=(5, 6, 7), accepts=False), None, 1),
        (dict(world_size=4, other_ranks=(5, 6, 7), accepts=False,
              func=lambda o, l, num_items_in_batch=None: o["loss"]), local + 18, 4),
        (dict(world_size=1), local, 1),
    ]
    for settings_, count, scale in cases:
        stub = _num_items_stub(**settings_)
        got = Trainer._get_num_items_in_batch(stub, batches, torch.device("cpu"))
        assert (got is None) if count is None else float(got) == count
        inputs = {} if stub.compute_loss_func is None else {"labels": labels}
        loss = Trainer.compute_loss(stub, model, inputs, num_items_in_batch=got)
        assert float(loss) == 2.0 * scale


def test_cell47_without_average_tokens_each_rank_divides_by_its_own_count():
    """Cell 47: "With average_tokens_across_devices=False, each rank divides by its
    own count n_r = sum_k n_r,k, and DDP's average over ranks is a mean of per-rank
    means again."  No gather, no scaling (n_gpu <= 1), so the step is
    (1/R) sum_r s_r / n_r."""
    from transformers import Trainer

    labels = torch.tensor([[1, 2, 3, IGNORE], [IGNORE, IGNORE, 5, 6]])
    stub = _num_items_stub(average=False, world_size=4, other_ranks=(50, 60, 70))
    got = Trainer._get_num_items_in_batch(stub, [{"labels": labels}] * 2, torch.device("cpu"))
    assert float(got) == 2 * _count(labels)
    loss = Trainer.compute_loss(stub, lambda **kw: {"loss": torch.tensor(3.0)}, {}, num_items_in_batch=got)
    assert float(loss) == 3.0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp")
def test_cell40_gloo_with_a_file_store_still_uses_loopback_tcp_ports(background):
    """Cell 40: "they find each other through a file in a temporary directory, so
    no port, host name or name server is involved."  FALSE as worded: the
    rendezvous needs no port, but gloo's connections listen and connect on TCP
    ports the kernel assigns, on 127.0.0.1 when GLOO_SOCKET_IFNAME names the
    loopback interface (ddp_demo.py sets it, so no host name is resolved)."""
    for rank in background("ddp")["ranks"]:
        sockets = rank["sockets"]
        assert sockets, "gloo opened no TCP socket"
        assert all(addr == "0100007F" and port > 0 for _, addr, port, _ in sockets)
        assert any(state == "0A" for *_, state in sockets)  # a listening port


# ---------------------------------------------------------------------------
# Cell 52 to cell 56: packing
# ---------------------------------------------------------------------------


@st.composite
def packed_rows(draw):
    """Rows of T tokens, each filled with (prompt >= 1, answer >= 0) examples."""
    T = draw(st.integers(4, 16))
    rows = []
    for _ in range(draw(st.integers(2, 4))):
        left, examples = T, []
        while left > 0:
            p = draw(st.integers(1, left))
            a = draw(st.integers(0, left - p))
            examples.append((p, a))
            left -= p + a
        rows.append(examples)
    return T, rows


def _pack(T, rows, *, mask_prompts, mask_boundaries=False, start_inside_answer=False):
    labels = torch.zeros(len(rows), T, dtype=torch.long)
    for r, examples in enumerate(rows):
        pos = 0
        for p, a in examples:
            if mask_prompts:
                labels[r, pos:pos + p] = IGNORE
            if mask_boundaries:
                labels[r, pos] = IGNORE
            pos += p + a
        if start_inside_answer:
            labels[r, 0] = 3  # the row opens with the tail of an answer
    return labels


@settings(max_examples=15)
@given(packed_rows())
def test_cell36_cell52_packing_equalises_counts_when_every_token_is_scored(packed):
    """Cell 52: "In pretraining usually every token is a target, and full rows of
    T tokens hold T-1 targets each"; cell 36: "Packing sequences into rows of a
    fixed length equalises the counts only when every token is scored."
    TRUE-ONLY-IN-CASE: with every label kept, yes (T-1 per row).  A packer that
    masks each example's first label (as DataCollatorWithFlattening does) leaves
    T - (examples in the row): unequal whenever rows hold different numbers of
    examples."""
    T, rows = packed
    every = _pack(T, rows, mask_prompts=False)
    assert {_count(every[r:r + 1]) for r in range(len(rows))} == {T - 1}
    bounded = _pack(T, rows, mask_prompts=False, mask_boundaries=True)
    for r, examples in enumerate(rows):
        assert _count(bounded[r:r + 1]) == T - len(examples)


@settings(max_examples=15)
@given(packed_rows())
def test_cell52_masked_prompt_row_counts_its_answers(packed):
    """Cell 52: "In supervised fine-tuning the prompts' labels are -100, and a
    row's count is the sum of its answers' lengths, whatever the row's length."
    TRUE-ONLY-IN-CASE: when the row begins with a prompt token; a row that begins
    inside an answer (an example split across rows) counts one fewer."""
    T, rows = packed
    masked = _pack(T, rows, mask_prompts=True)
    for r, examples in enumerate(rows):
        assert _count(masked[r:r + 1]) == sum(a for _, a in examples)
    split = _pack(T, rows, mask_prompts=True, start_inside_answer=True)
    for r, examples in enumerate(rows):
        assert _count(split[r:r + 1]) == sum(a for _, a in examples)  # label 0 never counts
        assert int((split[r] != IGNORE).sum()) == sum(a for _, a in examples) + 1


@settings(max_examples=15)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=5))
def test_cell56_flattening_collator_makes_one_row_counting_each_example_minus_one(lengths):
    """Cell 56: "DataCollatorWithFlattening concatenate[s] a micro-batch's examples
    into one row without padding, so even with every token scored a micro-batch's
    count is whatever its examples add up to."  data_collator.py:1343: one
    (1, sum n_i) row, each example's first label -100, count sum (n_i - 1)."""
    from transformers import DataCollatorWithFlattening

    features = [{"input_ids": list(range(2, 2 + n)), "labels": list(range(2, 2 + n))} for n in lengths]
    batch = DataCollatorWithFlattening()(features)
    assert tuple(batch["input_ids"].shape) == (1, sum(lengths))
    assert tuple(batch["labels"].shape) == (1, sum(lengths))
    assert _count(batch["labels"]) == sum(n - 1 for n in lengths)
    assert batch["position_ids"][0].tolist() == [i for n in lengths for i in range(n)]


@settings(max_examples=12)
@given(st.lists(st.integers(1, 9), min_size=2, max_size=6), st.integers(1, 3), st.integers(0, 999))
def test_cell56_cell60_one_global_count_is_right_in_every_case(lengths, per_micro, seed):
    """Cell 56: "The global count is right in every case."; cell 60: "carry sums
    and counts through every level, and divide once, at the end, by the total
    count."  Flattened micro-batches (DataCollatorWithFlattening) of any examples,
    ForCausalLMLoss with the step's count: the sum over micro-batches equals the
    token mean over all examples taken one by one."""
    from transformers import DataCollatorWithFlattening
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(seed)
    V = 9
    logit_rows = [torch.randn(n, V, generator=g) for n in lengths]
    examples = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    collate = DataCollatorWithFlattening()
    micro = [list(range(i, min(i + per_micro, len(lengths)))) for i in range(0, len(lengths), per_micro)]
    batches = [collate([{"input_ids": examples[i].tolist(), "labels": examples[i].tolist()} for i in m])
               for m in micro]
    total = sum(_count(b["labels"]) for b in batches)
    if total == 0:
        return
    step = sum(
        float(ForCausalLMLoss(torch.cat([logit_rows[i] for i in m])[None], b["labels"], V,
                              num_items_in_batch=torch.tensor(total)))
        for m, b in zip(micro, batches)
    )
    one_by_one = [_ref_sum_count(logit_rows[i][None], examples[i][None]) for i in range(len(lengths))]
    assert step == pytest.approx(token_mean([s for s, _ in one_by_one], [c for _, c in one_by_one]),
                                 rel=1e-5)


# ---------------------------------------------------------------------------
# Cell 57 to cell 60: Keras
# ---------------------------------------------------------------------------


def _keras_expected(run):
    x, mask = np.array(run["x"]), np.array(run["mask"])
    out = {}
    for batch_size in run["history"]:
        b = int(batch_size)
        means = [float((x[i:i + b] * mask[i:i + b]).sum() / mask[i:i + b].sum()) for i in range(0, len(x), b)]
        sizes = [len(x[i:i + b]) for i in range(0, len(x), b)]
        out[batch_size] = (float(np.dot(means, sizes) / sum(sizes)), float(np.mean(means)),
                           float((x * mask).sum() / mask.sum()))
    return out


@pytest.mark.parametrize("program", ["keras_tf", "keras_torch"])
def test_cell57_keras_fit_weights_batch_means_by_sequences(background, program):
    """Cell 57: "Keras's fit history reports, for an epoch, the per-batch mean
    losses averaged with weights equal to the number of sequences in each batch."
    Keras 3.15.1 on TensorFlow (backend/tensorflow/trainer.py:69-74) and torch
    (backend/torch/trainer.py:57-62), tf-keras 2.21 (compile_utils.py:287-296);
    batch sizes 1, 3, 4, 10 of 10 sequences; a loss that is one number per batch."""
    runs = background(program)
    if program == "keras_tf":  # Keras 3 and tf-keras
        assert [(r["backend"], r["version"].split(".")[0]) for r in runs] == [("tensorflow", "3"),
                                                                               ("tensorflow", "2")]
    else:
        assert [(r["backend"], r["version"].split(".")[0]) for r in runs] == [("torch", "3")]
    for run in runs:
        expected = _keras_expected(run)
        for batch_size, got in run["history"].items():
            by_sequences, unweighted, by_tokens = expected[batch_size]
            assert got == pytest.approx(by_sequences, rel=1e-5)
            if batch_size in ("3", "4"):  # unequal batches: the three differ
                assert got != pytest.approx(unweighted, rel=1e-3)
                assert got != pytest.approx(by_tokens, rel=1e-3)


@pytest.mark.parametrize("program", ["keras_tf", "keras_torch"])
def test_cell60_keras_epoch_weighting_is_reporting_not_gradient(background, program):
    """Cell 60: "It is a reporting error, not a gradient error."  Each SGD step
    uses its own batch's loss: after one epoch (batches of 4, 4, 2) the kernel is
    1 - lr * sum_b dm_b/dw, whatever the epoch's weighting."""
    for run in background(program):
        x, mask = np.array(run["x"]), np.array(run["mask"])
        slopes = [float((x[i:i + 4] * mask[i:i + 4]).sum() / mask[i:i + 4].sum()) for i in range(0, 10, 4)]
        assert run["kernel_after_sgd"] == pytest.approx(1 - 0.1 * sum(slopes), rel=1e-5)


@settings(max_examples=20)
@given(st.lists(st.tuples(st.integers(1, 8), st.integers(1, 20), st.floats(0, 5)), min_size=2, max_size=5))
def test_cell57_sequence_weighting_is_right_when_tokens_are_proportional(batches):
    """Cell 57: "mean_of_means(sums, counts, weights=sequences): right when the
    token count of each batch is proportional to its number of sequences, wrong
    otherwise."  Proportional counts: equal for any losses.  'Wrong otherwise'
    holds for *some* losses only: with equal batch means it is right anyway."""
    sequences = [b for b, _, _ in batches]
    per_sequence = batches[0][1]
    counts = [b * per_sequence for b in sequences]
    sums = [n * m for n, (_, _, m) in zip(counts, batches)]
    assert mean_of_means(sums, counts, weights=sequences) == pytest.approx(token_mean(sums, counts), rel=1e-9,
                                                                           abs=1e-12)
    counts = [c for _, c, _ in batches]
    equal_means = [n * 2.5 for n in counts]
    assert mean_of_means(equal_means, counts, weights=sequences) == pytest.approx(2.5, rel=1e-12)


# ---------------------------------------------------------------------------
# Cell 62 to cell 69: micro-batches without targets
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore", [IGNORE, 3])
def test_cell69_mean_of_no_targets_is_nan_and_sends_back_zeros(dtype, label_smoothing, ignore):
    """Cell 69: "The first micro-batch's mean is 0/0, nan ... a loss without
    targets sends nothing back through cross_entropy, so the nan micro-batch adds
    zeros, every gradient entry stays finite."  Four dtypes, label smoothing,
    class weights, another ignore_index, (N, C) and (B, C, T) inputs."""
    g = torch.Generator().manual_seed(0)
    for shape, target_shape in (((6, 5), (6,)), ((2, 5, 3), (2, 3))):
        for weight in (None, torch.rand(5, generator=g, dtype=torch.float64).to(dtype)):
            x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
            t = torch.full(target_shape, ignore)
            mean = F.cross_entropy(x, t, weight=weight, ignore_index=ignore, label_smoothing=label_smoothing)
            assert mean.isnan()
            (mean / 2).backward()
            assert torch.equal(x.grad, torch.zeros_like(x))


def test_cell69_naive_step_with_an_empty_micro_batch_is_the_other_over_k():
    """Cell 69: "the step silently uses the second micro-batch's gradient divided
    by K, that is 1/K times the full-batch gradient."  K = 2, one empty
    micro-batch: the accumulated gradient is finite and equal to full / K."""
    ids, labels = _rows([8, 8, 8], seed=3)
    labels[:2] = IGNORE
    model = _TokenModel()
    total = _count(labels)
    full = _grad_of(model, [lambda: _shift_sum(model(ids), labels) / total])
    for p in model.parameters():
        p.grad = None
    reported = []
    for i, la in ((ids[:2], labels[:2]), (ids[2:], labels[2:])):
        V = 7
        mean = F.cross_entropy(model(i)[:, :-1].reshape(-1, V), la[:, 1:].reshape(-1), reduction="mean")
        (mean / 2).backward()
        reported.append(float(mean.detach()) / 2)
    naive = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert math.isnan(sum(reported))
    assert torch.isfinite(naive).all()
    assert _rel(naive, full / 2) < TIGHT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cell69_summed_loss_of_an_empty_micro_batch_is_zero(dtype):
    """Cell 69: "The summed loss of an empty micro-batch is 0 with a zero
    gradient, so dividing sums by the step's total count needs no special case."
    torch cross_entropy(reduction='sum') and ForCausalLMLoss with a count, with
    label smoothing too."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    labels = torch.full((2, 4), IGNORE)
    for loss in (
        F.cross_entropy(x.reshape(-1, 5), labels.reshape(-1), reduction="sum"),
        F.cross_entropy(x.reshape(-1, 5), labels.reshape(-1), reduction="sum", label_smoothing=0.1),
        ForCausalLMLoss(x, labels, 5, num_items_in_batch=torch.tensor(17)),
    ):
        x.grad = None
        assert float(loss.detach()) == 0.0
        loss.backward()
        assert torch.equal(x.grad, torch.zeros_like(x))


# ---------------------------------------------------------------------------
# Cell 15, 42, 75-80: gradients and optimizers
# ---------------------------------------------------------------------------


@settings(max_examples=15)
@given(st.integers(1, 20), st.integers(0, 999), st.floats(0.05, 20))
def test_cell42_cosine_follows_from_norm_ratio_and_relative_error(n, seed, scale):
    """Cell 42: "the cosine follows from the two by the law of cosines".
    cos = (rho^2 + 1 - e^2) / (2 rho) for any two vectors (n = 1 included)."""
    from companion.experiments.denominator import cosine_from_norms

    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, dtype=torch.float64, generator=g)
    a = scale * torch.randn(n, dtype=torch.float64, generator=g)
    rho = float(a.norm() / b.norm())
    e = float((a - b).norm() / b.norm())
    assert cosine_from_norms(rho, e) == pytest.approx(_cos(a, b), abs=1e-9)


def _updates(opt_cls, grads, scale, **kwargs):
    p = torch.nn.Parameter(torch.linspace(-1, 1, grads[0].numel(), dtype=torch.float64))
    opt = opt_cls([p], lr=0.1, **kwargs)
    start = p.detach().clone()
    for gr in grads:
        p.grad = scale * gr.clone()
        opt.step()
    return p.detach() - start


_GRADS = [torch.randn(200, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) for k in range(5)]


def test_cell15_cell80_sgd_scales_adam_ignores_a_constant_factor():
    """Cell 15: "Plain SGD scales its step with the length; Adam, to first order,
    ignores a constant factor"; cell 80: "SGD's update scales with the gradient,
    so it moves half as far ... Adam divides the first moment by the square root
    of the second, so a constant factor cancels except where |g| is comparable
    to eps."  torch.optim, 5 steps: SGD (plain, momentum, Nesterov) exactly 1/2;
    Adam, AdamW, AMSGrad equal to 1e-6 for |g| ~ 1 and not for |g| ~ eps."""
    for kwargs in ({}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}):
        a, b = _updates(torch.optim.SGD, _GRADS, 1.0, **kwargs), _updates(torch.optim.SGD, _GRADS, 0.5, **kwargs)
        assert _rel(b, a / 2) < TIGHT
    for cls, kwargs in ((torch.optim.Adam, {}), (torch.optim.AdamW, {"weight_decay": 0.0}),
                        (torch.optim.Adam, {"amsgrad": True})):
        a, b = _updates(cls, _GRADS, 1.0, **kwargs), _updates(cls, _GRADS, 0.5, **kwargs)
        assert _rel(b, a) < 1e-6
        tiny = [gr * 1e-8 for gr in _GRADS]
        a, b = _updates(cls, tiny, 1.0, **kwargs), _updates(cls, tiny, 0.5, **kwargs)
        assert _rel(b, a) > 0.1
    # the exercise's first Adam update, -lr g / (|g| + eps), is torch's first step
    g = _GRADS[0]
    first = _updates(torch.optim.Adam, [g], 1.0, eps=1e-8)
    assert _rel(first, -0.1 * g / (g.abs() + 1e-8)) < 1e-12


def test_cell80_weight_decay_shifts_the_balance_except_adamw():
    """Cell 80: "gradient clipping thresholds and weight decay, which do not scale
    with g, shift their balance against it."  TRUE-ONLY-IN-CASE: for SGD (clipping,
    weight decay) and Adam's coupled weight_decay (adam.py:426-428); AdamW's
    decoupled decay (adam.py:419) does not: its update with g/2 equals that with g."""
    a, b = _updates(torch.optim.SGD, _GRADS, 1.0, weight_decay=0.5), _updates(torch.optim.SGD, _GRADS, 0.5,
                                                                                weight_decay=0.5)
    assert _rel(b, a / 2) > 0.01
    a, b = _updates(torch.optim.Adam, _GRADS, 1.0, weight_decay=0.5), _updates(torch.optim.Adam, _GRADS, 0.5,
                                                                                 weight_decay=0.5)
    assert _rel(b, a) > 0.01
    a, b = _updates(torch.optim.AdamW, _GRADS, 1.0, weight_decay=0.5), _updates(torch.optim.AdamW, _GRADS, 0.5,
                                                                                  weight_decay=0.5)
    assert _rel(b, a) < 1e-6
    # clipping: a threshold between |g/2| and |g| clips g only, so SGD's steps
    # are no longer in the ratio 1/2
    g = _GRADS[0]
    norm = float(g.norm())
    clipped = []
    for scale in (1.0, 0.5):
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = scale * g.clone()
        torch.nn.utils.clip_grad_norm_([p], max_norm=0.75 * norm)
        clipped.append(p.grad.clone())
    assert float(clipped[1].norm() / clipped[0].norm()) == pytest.approx(0.5 / 0.75, rel=1e-6)
