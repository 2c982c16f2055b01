"""Export a registered model or a checkpoint folder to another format: Hugging Face GPT-2 (``GPT2LMHeadModel``).

Usage: python -m pipelines.export [--model NAME|NAME/VERSION|NAME@ALIAS | --checkpoint DIR] [--format hf] --out DIR
       [--force] [--verify]

Without --model or --checkpoint it exports the latest version of the registered model ``shakespeare-gpt``.
The output folder gets config.json, model.safetensors and generation_config.json (see core/hf.py); it loads with
``GPT2LMHeadModel.from_pretrained(DIR)``. No tokenizer files are written: the tokenizer is GPT-2's
(``AutoTokenizer.from_pretrained("gpt2")``). A non-empty --out is refused unless --force (and even then only a
folder holding a config.json is replaced). The folder is written under a temporary name and renamed when complete,
so a failure leaves nothing half-written. --verify loads the export with transformers before it is moved into place
and checks that its logits match the studio's (needs ``pip install transformers``; the export itself does not).
"""

from __future__ import annotations

from collections.abc import Sequence

from pipelines.cli import ArgumentParser, run

FORMATS = ("hf",)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m pipelines.export", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        metavar="REF",
        help="registered model: NAME (latest version), NAME/VERSION or NAME@ALIAS (default: shakespeare-gpt)",
    )
    source.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder to export instead")
    parser.add_argument(
        "--format", choices=FORMATS, default="hf", help="hf: Hugging Face transformers GPT-2 (the default)"
    )
    parser.add_argument("--out", metavar="DIR", required=True, help="output folder (created; must be empty)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out that holds a model")
    parser.add_argument("--verify", action="store_true", help="check the export's logits with transformers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.checkpoint import load_checkpoint
    from core.hf import check_export_target, export_hf, import_transformers

    out = check_export_target(args.out, overwrite=args.force).resolve()  # refuse before loading a model
    if args.verify:
        import_transformers("--verify")
    if args.checkpoint is not None:
        model, _ = load_checkpoint(args.checkpoint)
        source = f"checkpoint {args.checkpoint}"
    else:
        from core.registry import load_registered_model
        from core.store import DEFAULT_MODEL_NAME, connect

        model, version, _ = load_registered_model(connect(), args.model or DEFAULT_MODEL_NAME)
        source = f"{version.name}/{version.version}"
    written = export_hf(model, out, overwrite=args.force, source=source, verify=args.verify)
    print(
        f"exported {source} to {out} (Hugging Face GPT-2 format{', verified with transformers' if args.verify else ''})"
    )
    for path in written.values():
        print(f"  {path.name:<24} {path.stat().st_size:>14,} bytes")
    print('tokenizer: not included; it is GPT-2\'s: AutoTokenizer.from_pretrained("gpt2")')
    print(f"load it: from transformers import GPT2LMHeadModel; model = GPT2LMHeadModel.from_pretrained({str(out)!r})")
    return 0


if __name__ == "__main__":
    run(main)
