"""Assertions for a test suite: the batch checks of :mod:`companion.batch_check`.

Put them in your own tests, next to the collator and the model they check::

    from companion.testing import assert_batch_ok, assert_loss_batch_invariant

    def test_the_collator_masks_what_it_should():
        batch = collator([dataset[i] for i in range(8)])
        assert_batch_ok(batch, tokenizer=tokenizer, micro_batch_size=2)

    def test_the_loss_does_not_depend_on_how_the_batch_is_cut():
        assert_loss_batch_invariant(model, batch, micro_batch_size=2)

Each runs the check, and raises ``AssertionError`` with the findings table
(:func:`~companion.batch_check.format_findings`) when a finding is at least
as severe as ``fail_on``; otherwise it returns the findings.  pytest is not
needed: any runner that reports an ``AssertionError`` works.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from companion._checks import require_one_of
from companion.batch_check import (
    Finding,
    Severity,
    check_batch,
    check_loss,
    format_findings,
)

__all__ = ["assert_batch_ok", "assert_loss_batch_invariant"]


def _raise_at(findings: list[Finding], fail_on: str, what: str) -> list[Finding]:
    threshold = Severity(fail_on).rank
    failing = [finding for finding in findings if finding.severity.rank >= threshold]
    if failing:
        codes = ", ".join(sorted({finding.code for finding in failing}))
        raise AssertionError(
            f"{what}: {len(failing)} finding(s) at or above {fail_on} ({codes})\n"
            + format_findings(findings)
        )
    return findings


def assert_batch_ok(
    batch: Mapping[str, Any], *, fail_on: str = "error", **options: Any
) -> list[Finding]:
    """Assert that :func:`~companion.batch_check.check_batch` finds nothing serious.

    Args:
        batch: what the training step receives (``input_ids``, ``labels``
            and the optional tensors, see
            :func:`~companion.batch_check.check_batch`).
        fail_on: ``"error"``, ``"warning"`` or ``"info"``: the least
            severity that fails.
        **options: keyword arguments of
            :func:`~companion.batch_check.check_batch` (``tokenizer``,
            ``vocab_size``, ``micro_batch_size``, ...).

    Returns:
        The findings, all below ``fail_on``.

    Raises:
        AssertionError: a finding at or above ``fail_on``; the message holds
            the findings table.
    """
    require_one_of(fail_on, [s.value for s in Severity], "fail_on")
    return _raise_at(check_batch(batch, **options), fail_on, "batch check")


def assert_loss_batch_invariant(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    *,
    fail_on: str = "error",
    **options: Any,
) -> list[Finding]:
    """Assert that the model's loss does not depend on how the batch is cut.

    Runs :func:`~companion.batch_check.check_loss`: the loss against the
    float64 reference, the batch split into micro-batches as the
    ``Trainer`` splits it, and the batch with extra right padding.

    Args:
        model: a ``torch.nn.Module`` (see
            :func:`~companion.batch_check.check_loss`).
        batch: a mapping with ``input_ids`` and ``labels`` ``(B, T)``.
        fail_on: ``"error"``, ``"warning"`` or ``"info"``: the least
            severity that fails.
        **options: keyword arguments of
            :func:`~companion.batch_check.check_loss`
            (``micro_batch_size``, ``extra_padding``, ``rtol``, ...).

    Returns and raises as :func:`assert_batch_ok` does.
    """
    require_one_of(fail_on, [s.value for s in Severity], "fail_on")
    return _raise_at(check_loss(model, batch, **options), fail_on, "loss check")
