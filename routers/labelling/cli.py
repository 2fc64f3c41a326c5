"""The ``label`` command of the ``switchyard`` CLI (needs no torch).

    switchyard label --config FILE --input PROMPTS.jsonl --output LABELLED.jsonl
                     [--max-cost USD] [--dry-run [--expected-output-tokens N]] [--no-progress]

Asks every model of ``--config`` each prompt of ``--input``, grades the answers and appends
the labelled rows to ``--output`` (rows already there are skipped: rerun to resume). Prints
a JSON summary (or, with ``--dry-run``, the cost estimate) on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from pathlib import Path

__all__ = ["add_label_parser", "run_label"]


def add_label_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``label`` to the top-level CLI's subparsers."""
    from routers.labelling.labeller import DEFAULT_EXPECTED_OUTPUT_TOKENS

    label = subparsers.add_parser(
        "label",
        help="Label prompts by asking your models: write the labelled JSONL that `train` reads.",
        description="Ask every model of --config each prompt of --input (JSONL of OpenAI chat requests), grade "
                    "the answers (against `reference`, or by a judge model) and append one labelled row per "
                    "prompt to --output. Rows already in --output are skipped, so a rerun resumes. API keys "
                    "come from the config's api_key_env / api_key_file, never from the command line.",
    )
    label.add_argument("--config", type=Path, required=True, metavar="FILE",
                       help="Label config YAML: models, grading, retries (errors as FILE:LINE:COLUMN).")
    label.add_argument("--input", type=Path, required=True, metavar="FILE",
                       help="JSONL of OpenAI chat requests: `messages`, optional `id` (default: a hash of the "
                            "messages) and `reference` (the expected answer).")
    label.add_argument("--output", type=Path, required=True, metavar="FILE",
                       help="Labelled JSONL to append to (created if missing; its ids are skipped).")
    label.add_argument("--max-cost", type=float, metavar="USD",
                       help="Stop starting rows once a row's estimated cost would take the money spent (models "
                            "and judge) past USD; rerun with a higher value to go on (default: no limit).")
    label.add_argument("--dry-run", action="store_true",
                       help="Print the estimated cost of the rows still to label (prompt tokens = characters / 4) "
                            "and call nothing.")
    label.add_argument("--expected-output-tokens", type=int, default=DEFAULT_EXPECTED_OUTPUT_TOKENS, metavar="N",
                       help="Completion length assumed for estimates before any answer has come "
                            f"(default {DEFAULT_EXPECTED_OUTPUT_TOKENS}).")
    label.add_argument("--no-progress", action="store_true",
                       help="No progress bar (rows/s and money spent, on stderr).")
    label.set_defaults(handler=run_label)


def run_label(args: argparse.Namespace) -> int:
    """``switchyard label``."""
    from extproc import SwitchyardError
    from routers.labelling import LabelOptions, estimate_file, label_file, load_label_config

    if args.max_cost is not None and not (math.isfinite(args.max_cost) and args.max_cost >= 0):
        raise SwitchyardError(f"--max-cost must be a number of USD >= 0, got {args.max_cost}.")
    if args.expected_output_tokens < 1:
        raise SwitchyardError(f"--expected-output-tokens must be >= 1, got {args.expected_output_tokens}.")
    config = load_label_config(args.config, need_keys=not args.dry_run)
    if args.dry_run:
        estimate = estimate_file(config, args.input, args.output, args.expected_output_tokens)
        print(json.dumps(estimate.as_dict(), indent=2))
        return 0
    options = LabelOptions(max_cost=args.max_cost, expected_output_tokens=args.expected_output_tokens,
                           progress=not args.no_progress)
    summary = asyncio.run(label_file(config, args.input, args.output, options))
    print(json.dumps(summary.as_dict(), indent=2))
    if summary.stopped_by_budget:
        print(f"switchyard: stopped before passing --max-cost {args.max_cost:g} USD: {summary.not_started} row(s) "
              "not labelled; run again with a higher --max-cost to go on.", file=sys.stderr)
    return 0
