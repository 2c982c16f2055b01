"""Show a model's parameter breakdown: totals, fp32 size, and parameters by component and by block.

Usage: python -m pipelines.inspect (--preset NAME [--n-layer N ...] | --checkpoint DIR) [--per-block] [--json]

``--preset gpt2`` reports 124,439,808 parameters and 474.70 MB. The model is built on PyTorch's meta device, so
even large shapes are inspected instantly without allocating their weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from pipelines.cli import ArgumentParser, add_config_flags, positive_int, run

SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")


def build_parser() -> ArgumentParser:
    from core.config import PRESETS, ModelConfig

    parser = ArgumentParser(prog="python -m pipelines.inspect", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", choices=sorted(PRESETS), help="a named model shape (default: gpt2)")
    source.add_argument("--checkpoint", metavar="DIR", help="a checkpoint folder (reads only its config.json)")
    add_config_flags(
        parser,
        ModelConfig,
        SHAPE_FIELDS,
        types=dict.fromkeys(SHAPE_FIELDS, positive_int),
        prefix="override the preset: ",
        show_defaults=False,
    )
    parser.add_argument("--per-block", action="store_true", help="also list every block's components")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _format_table(breakdown: dict, per_block: bool) -> str:
    rows = breakdown["components"] + (breakdown["blocks"] if per_block else [])
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'component':<{width}}  {'params':>13}  {'share':>7}  {'MB':>8}"]
    for r in rows:
        note = f"  ({r['note']})" if r["note"] else ""
        lines.append(f"{r['name']:<{width}}  {r['params']:>13,}  {r['share']:>7.2%}  {r['size_mb']:>8.2f}{note}")
    lines.append(f"{'total':<{width}}  {breakdown['total_params']:>13,}  {1:>7.2%}  {breakdown['size_mb']:>8.2f}")
    lines.append(f"trainable parameters: {breakdown['trainable_params']:,}")
    lines.append(f"size in fp32: {breakdown['size_mb']:.2f} MB")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from core.checkpoint import read_checkpoint_config
    from core.config import ModelConfig
    from core.model import GPT, parameter_breakdown

    overrides = {k: getattr(args, k) for k in SHAPE_FIELDS}
    if args.checkpoint:
        if any(v is not None for v in overrides.values()):
            raise ValueError("shape overrides apply to --preset only, not to --checkpoint")
        config, _ = read_checkpoint_config(args.checkpoint)
    else:
        config = ModelConfig.from_preset(args.preset or "gpt2", **overrides)
    with torch.device("meta"):  # shapes only: no memory, no init time
        model = GPT(config)
    breakdown = parameter_breakdown(model)
    if args.json:
        print(json.dumps({**breakdown, "size": f"{breakdown['size_mb']:.2f} MB"}))
    else:
        c = config
        print(f"{c.n_layer} layers, {c.n_head} heads, {c.n_embd} dims, context {c.block_size}, vocab {c.vocab_size}")
        print(_format_table(breakdown, args.per_block))
    return 0


if __name__ == "__main__":
    run(main)
