"""Checkers for chapter 5's exercises (one denominator, see book/05_one_denominator.ipynb).

The references are independent of the reader's function: PyTorch's own
``cross_entropy`` and ``torch.optim.Adam``, and the token mean of all the
step's rows run as *one* padded batch through the library's
:func:`~companion.causal_lm_loss.label_padding_loss` (the checkers' model
is causal, so right padding leaves every real position's logits alone).
Data-parallel ranks are simulated by threads that share a stand-in for
``torch.distributed`` (``all_reduce`` sums in place, ``get_world_size``,
``get_rank``).
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from companion.causal_lm_loss import label_padding_loss
from companion.exercises import ExerciseFailed, checker, expect, expect_close

__all__: list[str] = []

_VOCAB = 11


def _number(value: Any) -> float:
    """A float from a number or a 0-D tensor (detached first: no warning)."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def _model(seed: int = 0) -> torch.nn.Module:
    from companion.experiments.tiny_models import TinyLMConfig, build_tiny_lm

    config = TinyLMConfig(vocab_size=_VOCAB, hidden_size=8, num_heads=1, max_length=16)
    return build_tiny_lm(config, seed=seed)


def _rows(scored: Sequence[int], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose ``labels[:, 1:]`` score ``scored[i]`` targets, right-padded to ``width``.

    A row with 0 scored targets is a prompt whose answer was cut away:
    its tokens are real, every label is -100.
    """
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, _VOCAB, (len(scored), width), generator=generator)
    labels = ids.clone()
    for row, count in enumerate(scored):
        if count == 0:
            labels[row] = -100
        else:
            ids[row, count + 1:] = 0
            labels[row, count + 1:] = -100
    return ids, labels


def _one_batch(pieces: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of all micro-batches as one right-padded batch."""
    width = max(ids.shape[1] for ids, _ in pieces)
    ids = torch.cat([F.pad(i, (0, width - i.shape[1]), value=0) for i, _ in pieces])
    labels = torch.cat([F.pad(y, (0, width - y.shape[1]), value=-100) for _, y in pieces])
    return ids, labels


def _reference(model: torch.nn.Module, pieces) -> tuple[float, list[torch.Tensor]]:
    """Loss and gradients of the token mean over every row, as one batch."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    input_ids, labels = _one_batch(pieces)
    loss = label_padding_loss(model(input_ids), labels)
    loss.backward()
    return _number(loss), [p.grad.clone() for p in model.parameters()]


def _flat(grads: Sequence[torch.Tensor | None], where: str) -> torch.Tensor:
    for grad in grads:
        expect(grad is not None, f"{where}: a parameter's .grad is None after the call")
    return torch.cat([g.reshape(-1) for g in grads])


def _expect_gradient(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    scale = float(want.abs().max())
    error = float((got - want).abs().max()) / scale
    if error > 1e-6:
        ratio = float(got.norm() / want.norm())
        cosine = float(got @ want / (got.norm() * want.norm()))
        raise ExerciseFailed(
            f"{where}: the gradient is not the token mean's (norm ratio {ratio:.4g}, "
            f"cosine {cosine:.4g})"
        )


# ---------------------------------------------------------------------------
# one-denominator-ex1: the naive step with a micro-batch that scores nothing
# ---------------------------------------------------------------------------


def _pytorch_naive_step(counts: Sequence[int], seed: int):
    """Sums, and what PyTorch's mean / K loop reports and back-propagates."""
    generator = torch.Generator().manual_seed(seed)
    steps = len(counts)
    sums, reported, weights_seen = [], 0.0, []
    for count in counts:
        rows = count + 2
        logits = torch.randn(rows, 5, generator=generator, dtype=torch.float64)
        targets = torch.randint(0, 5, (rows,), generator=generator)
        targets[count:] = -100
        leaf = logits.clone().requires_grad_()
        total = F.cross_entropy(leaf, targets, reduction="sum")
        total.backward()
        grad_of_sum = leaf.grad.clone()
        leaf.grad = None
        mean = F.cross_entropy(leaf, targets, reduction="mean")
        (mean / steps).backward()
        sums.append(_number(total))
        reported += _number(mean) / steps
        weights_seen.append((leaf.grad.clone(), grad_of_sum))
    return sums, reported, weights_seen


@checker("one-denominator-ex1")
def _naive_step(answer: Callable[..., Any]) -> int:
    checks = 0
    for counts in ([3, 5], [4, 4, 1], [0, 7], [6, 0, 0, 2], [2]):
        sums, reported, seen = _pytorch_naive_step(counts, seed=len(counts) + sum(counts))
        result = answer(list(sums), list(counts))
        expect(
            isinstance(result, tuple) and len(result) == 2,
            f"counts {counts}: expected a pair (reported loss, weights); got {type(result).__name__}",
        )
        got_loss, weights = result
        expect_close(_number(got_loss), reported, f"counts {counts}: the reported loss", rtol=1e-9)
        weights = [_number(w) for w in weights]
        expect(len(weights) == len(counts), f"counts {counts}: expected {len(counts)} weights; got {len(weights)}")
        for k, (w, (grad, grad_of_sum)) in enumerate(zip(weights, seen, strict=True)):
            expect(math.isfinite(w), f"counts {counts}: weight {k} is {w}; the gradient PyTorch sends back is finite")
            if counts[k] == 0:
                expect(w == 0.0, f"counts {counts}: micro-batch {k} scores nothing; give it weight 0")
            expect_close(w * grad_of_sum, grad, f"counts {counts}: the gradient of micro-batch {k}", rtol=1e-9)
            checks += 1
        checks += 1
    return checks


# ---------------------------------------------------------------------------
# one-denominator-ex2: find the bug in a gradient-accumulation loop
# ---------------------------------------------------------------------------


@checker("one-denominator-ex2")
def _accumulate(answer: Callable[..., Any]) -> int:
    cases = [
        ("equal counts 6 + 6", [([3, 3], 8), ([6], 8)]),
        ("counts 3 + 12", [([1, 2], 6), ([12], 14)]),
        ("a micro-batch that scores nothing, 0 + 5", [([0, 0], 9), ([5], 7)]),
        ("one micro-batch", [([4, 2, 7], 9)]),
        ("three micro-batches 1 + 9 + 4", [([1], 3), ([4, 5], 10), ([4], 5)]),
    ]
    checks = 0
    for index, (name, layout) in enumerate(cases):
        model = _model(seed=index)
        pieces = [_rows(scored, width, seed=10 * index + k) for k, (scored, width) in enumerate(layout)]
        want_loss, want_grads = _reference(model, pieces)
        for p in model.parameters():  # stale gradients from an earlier step
            p.grad = torch.ones_like(p)
        got_loss = answer(model, [(ids.clone(), y.clone()) for ids, y in pieces])
        expect_close(_number(got_loss), want_loss, f"{name}: the returned loss", rtol=1e-9)
        got = _flat([p.grad for p in model.parameters()], name)
        _expect_gradient(got, torch.cat([g.reshape(-1) for g in want_grads]), name)
        checks += 2
    return checks


# ---------------------------------------------------------------------------
# one-denominator-ex3: Adam, and what a constant factor on the gradient does
# ---------------------------------------------------------------------------


def _torch_adam(params, gradients, lr, betas, eps, weight_decay) -> torch.Tensor:
    theta = params.clone().requires_grad_()
    optimizer = torch.optim.Adam([theta], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    path = []
    for gradient in gradients:
        theta.grad = gradient.clone()
        optimizer.step()
        path.append(theta.detach().clone())
    return torch.stack(path)


@checker("one-denominator-ex3")
def _adam(answer: Callable[..., Any]) -> int:
    generator = torch.Generator().manual_seed(3)
    params = torch.randn(6, generator=generator, dtype=torch.float64)
    gradients = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    tiny = gradients.clone()
    tiny[:, :3] *= 1e-8  # entries near eps, where the placement of eps shows
    cases = [
        ("one step", params, gradients[:1], dict(lr=0.1)),
        ("five steps", params, gradients, dict(lr=0.01)),
        ("five steps, gradient / 2", params, gradients / 2, dict(lr=0.01)),
        ("gradient entries near eps", params, tiny, dict(lr=0.01)),
        ("other betas", params, gradients, dict(lr=0.05, betas=(0.5, 0.9))),
        ("weight_decay=0.1", params, gradients, dict(lr=0.01, weight_decay=0.1)),
        ("a zero gradient", params, torch.zeros(3, 6, dtype=torch.float64), dict(lr=0.01)),
    ]
    checks = 0
    for name, start, grads, options in cases:
        full = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0) | options
        want = _torch_adam(start, grads, **full)
        got = answer(start.clone(), grads.clone(), **options)
        expect(isinstance(got, torch.Tensor), f"{name}: expected a tensor; got {type(got).__name__}")
        expect_close(got, want, f"{name}: the parameters after each step", rtol=1e-10, atol=1e-12)
        checks += 1
    return checks


# ---------------------------------------------------------------------------
# Data-parallel ranks as threads
# ---------------------------------------------------------------------------


class _Distributed:
    """A stand-in for ``torch.distributed`` shared by ``world_size`` threads."""

    def __init__(self, world_size: int) -> None:
        self._world_size = world_size
        self._barrier = threading.Barrier(world_size, timeout=10)
        self._slots: list[torch.Tensor | None] = [None] * world_size
        self._local = threading.local()
        self.calls = [0] * world_size

    def get_world_size(self) -> int:
        return self._world_size

    def get_rank(self) -> int:
        return self._local.rank

    def all_reduce(self, tensor: torch.Tensor, op: Any = None, group: Any = None, async_op: bool = False) -> None:
        """Sum ``tensor`` over the ranks, in place, as ``dist.all_reduce`` does."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"all_reduce takes a tensor; got {type(tensor).__name__}")
        rank = self._local.rank
        self.calls[rank] += 1
        self._slots[rank] = tensor.detach().clone()
        self._barrier.wait()
        total = sum(self._slots[1:], self._slots[0].clone())
        self._barrier.wait()
        with torch.no_grad():
            tensor.copy_(total)

    def run(self, work: Callable[[int], Any]) -> list[Any]:
        """``work(rank)`` on every rank at once; the results, rank by rank."""
        results: list[Any] = [None] * self._world_size
        errors: list[BaseException | None] = [None] * self._world_size

        def main(rank: int) -> None:
            self._local.rank = rank
            try:
                results[rank] = work(rank)
            except BaseException as error:  # reported below, in the caller's thread
                errors[rank] = error
                self._barrier.abort()

        threads = [threading.Thread(target=main, args=(r,)) for r in range(self._world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        for error in real:
            if isinstance(error, NotImplementedError):
                raise error
        if real:
            raise real[0]
        if any(errors):
            raise ExerciseFailed(
                f"the ranks called all_reduce {self.calls} times: every rank must join every "
                "collective, or the others wait for it forever"
            )
        return results


class _CountingModel(torch.nn.Module):
    """A rank's replica; counts its forward passes."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.forwards = 0

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.forwards += 1
        return self.inner(input_ids)


def _ddp_case(layout, seed: int):
    """Rank by rank, micro-batch by micro-batch: (input_ids, labels)."""
    return [
        [_rows(scored, width, seed=100 * seed + 10 * r + k) for k, (scored, width) in enumerate(rank)]
        for r, rank in enumerate(layout)
    ]


def _averaged_gradient(replicas, name: str) -> torch.Tensor:
    flats = [_flat([p.grad for p in replica.inner.parameters()], f"{name}, rank {r}") for r, replica in enumerate(replicas)]
    return torch.stack(flats).mean(dim=0)  # DDP's all-reduce, then / R


# ---------------------------------------------------------------------------
# one-denominator-ex4: find the bug in a data-parallel rank's loss
# ---------------------------------------------------------------------------


@checker("one-denominator-ex4")
def _rank_loss(answer: Callable[..., Any]) -> int:
    cases = [
        ("R = 1", [[([3, 4], 7)]]),
        ("R = 2, counts 11 + 11", [[([5, 6], 8)], [([11], 12)]]),
        ("R = 2, counts 3 + 12", [[([1, 2], 6)], [([12], 14)]]),
        ("R = 3, counts 2 + 9 + 5", [[([2], 4)], [([9], 10)], [([3, 2], 6)]]),
        ("R = 2, rank 0 scores nothing", [[([0, 0], 5)], [([6], 9)]]),
    ]
    checks = 0
    for index, (name, layout) in enumerate(cases):
        ranks = _ddp_case(layout, seed=index)
        model = _model(seed=index)
        _, want = _reference(model, [piece for rank in ranks for piece in rank])
        replicas = [_CountingModel(copy.deepcopy(model)) for _ in ranks]
        dist = _Distributed(len(ranks))

        def work(rank: int) -> None:
            ids, labels = ranks[rank][0]
            loss = answer(replicas[rank], ids.clone(), labels.clone(), dist)
            expect(isinstance(loss, torch.Tensor) and loss.dim() == 0, f"{name}: expected a 0-D tensor")
            loss.backward()

        dist.run(work)
        got = _averaged_gradient(replicas, name)
        _expect_gradient(got, torch.cat([g.reshape(-1) for g in want]), name)
        checks += 1
    return checks


# ---------------------------------------------------------------------------
# one-denominator-ex5: a rank's accumulation step, ranks with nothing scored
# ---------------------------------------------------------------------------


@checker("one-denominator-ex5")
def _rank_step(answer: Callable[..., Any]) -> int:
    cases = [
        ("R = 1, K = 2, counts 2 + 9", [[([2], 4), ([4, 5], 8)]]),
        ("R = 2, K = 2, counts 1 + 3 | 12 + 6", [[([1], 3), ([2, 1], 5)], [([12], 14), ([6], 8)]]),
        ("R = 3, K = 1, rank 1 scores nothing", [[([3, 4], 7)], [([0, 0], 6)], [([9], 11)]]),
        ("R = 2, K = 2, rank 0 scores nothing", [[([0], 4), ([0, 0], 5)], [([5], 7), ([2, 8], 9)]]),
        ("R = 2, K = 3, an empty micro-batch", [[([4], 6), ([0], 3), ([1], 5)], [([7], 9), ([2], 4), ([3], 6)]]),
    ]
    checks = 0
    for index, (name, layout) in enumerate(cases):
        ranks = _ddp_case(layout, seed=20 + index)
        model = _model(seed=index)
        want_loss, want = _reference(model, [piece for rank in ranks for piece in rank])
        replicas = [_CountingModel(copy.deepcopy(model)) for _ in ranks]
        for replica in replicas:  # stale gradients from an earlier step
            for p in replica.parameters():
                p.grad = torch.ones_like(p)
        dist = _Distributed(len(ranks))

        def work(rank: int) -> float:
            pieces = [(ids.clone(), y.clone()) for ids, y in ranks[rank]]
            return answer(replicas[rank], pieces, dist)

        reported = dist.run(work)
        for rank, (replica, pieces) in enumerate(zip(replicas, ranks, strict=True)):
            expect(
                replica.forwards == len(pieces),
                f"{name}: rank {rank} ran {replica.forwards} forward passes for its {len(pieces)} "
                "micro-batches (under DDP every rank runs each one, or the gradient all-reduce waits)",
            )
            expect_close(_number(reported[rank]), want_loss, f"{name}: the loss rank {rank} reports", rtol=1e-9)
        got = _averaged_gradient(replicas, name)
        _expect_gradient(got, torch.cat([g.reshape(-1) for g in want]), name)
        checks += 2 + len(ranks)
    return checks
