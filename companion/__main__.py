"""The command line: ``python -m companion check FILE [FILE ...]``.

Reads each batch file (:func:`companion.batch_check.load_batch`: a dict
of tensors saved with ``torch.save``, or JSON Lines of token ids), checks
it (:func:`companion.batch_check.check_batch`) and prints the findings as a
table.  The exit status is 0 when no finding reaches ``--fail-on`` (default
``error``), 1 when one does, and 2 when a file cannot be read or the
arguments are wrong, so the command can sit in a CI job::

    python -m companion check batch.pt --pad-token-id 2 --eos-token-id 2 \\
        --vocab-size 32000 --micro-batch-size 4

Files are untrusted input: ``torch.load(..., weights_only=True)`` refuses a
pickle that holds anything but tensors and plain containers, before any of
it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from companion import IGNORE_INDEX

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m companion",
        description="Check training batches for the pitfalls of the book.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check",
        help="check batch files (torch.save dicts of tensors, or JSON Lines)",
        description=(
            "Check batch files and print the findings.  Exit status: 0 no "
            "finding at or above --fail-on, 1 some, 2 unreadable input."
        ),
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="a batch file")
    check.add_argument("--vocab-size", type=int, metavar="V",
                       help="the model's vocabulary size (its output layer's width)")
    check.add_argument("--pad-token-id", type=int, metavar="ID", help="the padding id")
    check.add_argument("--eos-token-id", type=int, metavar="ID", help="the end-of-sequence id")
    check.add_argument("--placeholder-token-id", type=int, action="append", metavar="ID",
                       help="an image (or other) placeholder id; repeat for several")
    check.add_argument("--micro-batch-size", type=int, metavar="ROWS",
                       help="rows per micro-batch when the batch is split")
    check.add_argument("--ignore-index", type=int, default=IGNORE_INDEX, metavar="ID",
                       help=f"the label that is not scored (default {IGNORE_INDEX})")
    check.add_argument("--max-positions", type=int, default=8, metavar="N",
                       help="positions listed per finding (default 8)")
    check.add_argument("--fail-on", choices=("error", "warning", "info"), default="error",
                       help="the least severity that makes the exit status 1 (default error)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``).

    Args:
        argv: the arguments after ``python -m companion``, e.g.
            ``["check", "batch.pt", "--pad-token-id", "0"]``.

    Returns:
        The exit status: 0 clean, 1 a finding at or above ``--fail-on``,
        2 an unreadable file or bad arguments (argparse exits with 2 itself
        on a malformed command line).
    """
    if argv is not None and (
        isinstance(argv, (str, bytes)) or not isinstance(argv, Sequence)
        or not all(isinstance(argument, str) for argument in argv)
    ):
        raise TypeError(
            f"argv must be a sequence of strings or None; got {type(argv).__name__}"
        )
    arguments = _parser().parse_args(None if argv is None else list(argv))
    from companion.batch_check import Severity, check_batch, format_findings, load_batch

    threshold = Severity(arguments.fail_on).rank
    status, printed = 0, False
    for name in arguments.files:
        try:
            batch = load_batch(
                name,
                pad_token_id=arguments.pad_token_id or 0,
                ignore_index=arguments.ignore_index,
            )
            findings = check_batch(
                batch,
                vocab_size=arguments.vocab_size,
                pad_token_id=arguments.pad_token_id,
                eos_token_id=arguments.eos_token_id,
                placeholder_token_ids=arguments.placeholder_token_id,
                micro_batch_size=arguments.micro_batch_size,
                ignore_index=arguments.ignore_index,
                max_positions=arguments.max_positions,
            )
        except (OSError, TypeError, ValueError) as error:
            print(f"{name}: error: {error}", file=sys.stderr)
            status = 2
            continue
        rows, columns = batch["input_ids"].shape
        if printed:
            print()
        printed = True
        print(f"{name}: {rows} x {columns} batch, keys {', '.join(sorted(batch))}")
        print(format_findings(findings))
        if status == 0 and any(f.severity.rank >= threshold for f in findings):
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
