"""Measure the studio against a reference in the same run and print a table (medians of repeats).

Usage: python -m pipelines.benchmark [--quick] [--json] [--only NAME ...] [--data PATH|URL]

Rows: ``log_overhead`` (MLflow logging as % of the tiny preset's step time, asynchronous vs synchronous) and
``compare_fetch`` (the Compare Runs page's data work for 10 runs × 20,000 steps vs plain ``get_metric_history``).
--json writes {"rows": [{"name", "ours", "reference", "unit", "ratio", "note"}, ...]} to stdout, progress to stderr.
A ratio above 1 means the studio is better.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from pipelines.cli import ArgumentParser, run

SECTIONS = ("log_overhead", "compare_fetch")


def build_parser() -> ArgumentParser:
    from core.config import TINY_SHAKESPEARE_URL

    parser = ArgumentParser(prog="python -m pipelines.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (under 3 minutes)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these rows")
    parser.add_argument("--data", default=TINY_SHAKESPEARE_URL, help="corpus for the training rows")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core import benchmark

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    selected = args.only or SECTIONS
    rows = []
    if "log_overhead" in selected:
        progress("log_overhead: tiny preset steps without, with asynchronous and with synchronous MLflow logging")
        steps, repeats = (20, 2) if args.quick else (40, 3)
        rows.append(benchmark.logging_overhead(args.data, steps=steps, repeats=repeats, log=progress))
    if "compare_fetch" in selected:
        progress("compare_fetch: 10 runs × 20,000 steps of the 6 charted metrics")
        rows.append(benchmark.compare_fetch(repeats=2 if args.quick else 3, log=progress))

    if args.json:
        print(json.dumps({"rows": [row.to_dict() for row in rows]}, indent=2))
        return 0
    print(f"{'name':<16} {'ours':>12} {'reference':>12}  {'unit':<16} {'ratio':>7}  note")
    for row in rows:
        print(f"{row.name:<16} {row.ours:>12.3f} {row.reference:>12.3f}  {row.unit:<16} {row.ratio:>6.2f}×  {row.note}")
    return 0


if __name__ == "__main__":
    run(main)
