"""Export a registered model or a checkpoint folder to another format: Hugging Face GPT-2 (``GPT2LMHeadModel``) or
GGUF (llama.cpp, Ollama, LM Studio).

Usage: python -m pipelines.export [--model NAME|NAME/VERSION|NAME@ALIAS | --checkpoint DIR] [--format hf] --out DIR
       [--force] [--verify]
       python -m pipelines.export [--model REF | --checkpoint DIR] --format gguf [--dtype f32|f16|q8_0|q4_0]
       --out FILE.gguf [--force]

Without --model or --checkpoint it exports the latest version of the registered model ``shakespeare-gpt``.

--format gguf writes one file (see core/gguf_export.py): the weights at --dtype (default f32), the GPT-2 tokenizer,
the LM head tied. An existing --out is replaced only with --force, and only when it is a GGUF file; the file is
written under a temporary name and renamed when complete. Run it with ``llama-cli -m FILE.gguf -p "ROMEO:"``.

--format hf: the output folder gets config.json, model.safetensors and generation_config.json (see core/hf.py); it
loads with ``GPT2LMHeadModel.from_pretrained(DIR)``. No tokenizer files are written: the tokenizer is GPT-2's
(``AutoTokenizer.from_pretrained("gpt2")``). A non-empty --out is refused unless --force (and even then only a
folder holding a config.json is replaced). The folder is written under a temporary name and renamed when complete,
so a failure leaves nothing half-written. --verify loads the export with transformers before it is moved into place
and checks that its logits match the studio's (needs ``pip install transformers``; the export itself does not).
"""

from __future__ import annotations

from collections.abc import Sequence

from core.errors import UsageError
from pipelines.cli import ArgumentParser, run

FORMATS = ("hf", "gguf")
GGUF_DTYPE_CHOICES = ("f32", "f16", "q8_0", "q4_0")


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
        "--format",
        choices=FORMATS,
        default="hf",
        help="hf: Hugging Face transformers GPT-2 (the default); gguf: one file for llama.cpp, Ollama, LM Studio",
    )
    parser.add_argument(
        "--dtype",
        choices=GGUF_DTYPE_CHOICES,
        help="weights of a GGUF export: f32 (the default), f16, q8_0 or q4_0 (8 or 4 bits per weight in blocks of 32)",
    )
    parser.add_argument(
        "--out", metavar="DIR|FILE", required=True, help="output folder (hf: created, must be empty) or FILE.gguf"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing --out that holds a model")
    parser.add_argument("--verify", action="store_true", help="check the export's logits with transformers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format == "gguf":
        if args.verify:
            parser.error("--verify checks a Hugging Face export; leave it out with --format gguf")
        return _export_gguf(args)
    if args.dtype is not None:
        parser.error("--dtype chooses the weights of a GGUF export: add --format gguf, or leave --dtype out")
    from core.hf import check_export_target, export_hf, import_transformers

    out = check_export_target(args.out, overwrite=args.force).resolve()  # refuse before loading a model
    if args.verify:
        import_transformers("--verify")
    model, source = _load(args)
    written = export_hf(model, out, overwrite=args.force, source=source, verify=args.verify)
    print(
        f"exported {source} to {out} (Hugging Face GPT-2 format{', verified with transformers' if args.verify else ''})"
    )
    for path in written.values():
        print(f"  {path.name:<24} {path.stat().st_size:>14,} bytes")
    print('tokenizer: not included; it is GPT-2\'s: AutoTokenizer.from_pretrained("gpt2")')
    print(f"load it: from transformers import GPT2LMHeadModel; model = GPT2LMHeadModel.from_pretrained({str(out)!r})")
    return 0


def _load(args):
    """The model to export and a short name of where it came from."""
    if args.checkpoint is not None:
        from core.checkpoint import load_checkpoint

        model, _ = load_checkpoint(args.checkpoint, device="cpu")
        return model, f"checkpoint {args.checkpoint}"
    from core.registry import load_registered_model
    from core.store import DEFAULT_MODEL_NAME, connect

    model, version, _ = load_registered_model(connect(), args.model or DEFAULT_MODEL_NAME, device="cpu")
    return model, f"{version.name}/{version.version}"


def _export_gguf(args) -> int:
    from core.gguf_export import check_gguf_target, export_gguf, gguf_dtype, import_gguf, unsupported_reason
    from core.tokenizer import get_tokenizer

    import_gguf()
    dtype = gguf_dtype(args.dtype or "f32")
    out = check_gguf_target(args.out, overwrite=args.force).resolve()  # refuse before loading a model
    model, source = _load(args)
    reason = unsupported_reason(model, dtype)
    if reason is not None:
        raise UsageError(f"GGUF cannot hold {source}: {reason}")
    export_gguf(model, out, get_tokenizer(), dtype=dtype.name, overwrite=args.force, source=source)
    print(f"exported {source} to {out} (GGUF, {dtype.name} weights, GPT-2 tokenizer, LM head tied)")
    print(f"  {out.name:<24} {out.stat().st_size:>14,} bytes")
    print(f'run it: llama-cli -m {str(out)!r} -p "ROMEO:" -n 200   (or import it into Ollama or LM Studio)')
    return 0


if __name__ == "__main__":
    run(main)
