"""Generate Shakespeare-style text from a registered model or a checkpoint folder.

Usage: python -m pipelines.generate [--model NAME|NAME/VERSION|NAME@ALIAS | --checkpoint DIR] --prompt TEXT
       [--max-new-tokens N] [--num-samples K] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--no-eot-stop]
       [--device auto|cpu|cuda|mps] [--quantize none|int8] [--data PATH|URL | --no-memorization] [--json]

Without --model or --checkpoint it uses the latest version of the registered model ``shakespeare-gpt`` in the
tracking store (``MLFLOW_TRACKING_URI``, default the SQLite store under ``mlruns/``).

One sample streams to stdout as it is produced; several are printed one after another under a header each.
--json prints {"samples": [...], "tokens_per_sec": ..., "memorization": [...]}, each sample being the prompt plus its
continuation.

Each sample's continuation is measured against the training split (the memorisation meter, core.memorization): the
share of its 8-token spans found verbatim there and its longest copied span, in characters. The training corpus is
--data, else the one the registered model's run trained on (its data_source param), else $SHAKESPEARE_SOURCE, else
Tiny Shakespeare's URL. A corpus that was not given and cannot be had (offline, not downloaded yet) is one line on
stderr, and the samples come without the figures; --no-memorization skips the measurement.
--quantize int8 generates on the CPU with int8 linear layers: about 2.4x the fp32 speed for gpt2 on a 2-core laptop,
at a small cost in quality (``python -m pipelines.benchmark --only int8 --model NAME`` measures both).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from core.config import QUANTIZE_CHOICES, SampleConfig
from pipelines.cli import ArgumentParser, add_config_flags, given_fields, run

SAMPLING_FIELDS = ("max_new_tokens", "num_samples", "temperature", "top_k", "top_p", "seed", "stop_at_eot")
SAMPLING_FLAGS = {"stop_at_eot": "--eot-stop"}  # so --no-eot-stop reads as what it does


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m pipelines.generate", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--model",
        metavar="REF",
        help="registered model: NAME (latest version), NAME/VERSION or NAME@ALIAS (default: shakespeare-gpt)",
    )
    source.add_argument("--checkpoint", metavar="DIR", help="checkpoint folder to generate from instead")
    parser.add_argument("--prompt", required=True, help="text to continue (cropped to its last tokens if too long)")
    # The sampling flags are SampleConfig's fields: their help is the field's docstring, their default the field's.
    add_config_flags(parser, SampleConfig, SAMPLING_FIELDS, flags=SAMPLING_FLAGS)
    parser.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda or mps")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default="none",
        help="int8: int8 linear layers, CPU only, faster at a small cost in quality (default none: fp32)",
    )
    meter = parser.add_mutually_exclusive_group()
    meter.add_argument(
        "--data",
        metavar="PATH|URL",
        help="training corpus the samples' copied spans are looked up in (default: the model's training data, "
        "else $SHAKESPEARE_SOURCE, else Tiny Shakespeare's URL)",
    )
    meter.add_argument(
        "--no-memorization", action="store_true", help="do not measure how much of each sample is copied"
    )
    parser.add_argument(
        "--json", action="store_true", help='print {"samples": [...], "tokens_per_sec": ..., "memorization": [...]}'
    )
    return parser


def sample_config(args: argparse.Namespace) -> SampleConfig:
    """The sampling settings the flags ask for; a flag not given (None) keeps the field's default, which is written
    once, in :class:`SampleConfig`."""
    return SampleConfig(**given_fields(args, SAMPLING_FIELDS, flags=SAMPLING_FLAGS))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.checkpoint import load_checkpoint
    from core.device import resolve_device
    from core.errors import UsageError
    from core.sampling import TextStream
    from core.tokenizer import get_tokenizer

    config = sample_config(args)
    tokenizer = get_tokenizer()
    device = resolve_device("cpu" if args.quantize == "int8" and args.device == "auto" else args.device)
    if args.quantize == "int8" and device.type != "cpu":
        raise UsageError(f"--quantize int8 runs on the CPU only, not {device.type}; use --device cpu")
    run_params: dict[str, str] = {}
    trained_sha256 = None
    if args.checkpoint is not None:
        model, _ = load_checkpoint(args.checkpoint, device=device)
    else:
        from core.registry import load_registered_model
        from core.store import DEFAULT_MODEL_NAME, connect

        client = connect()
        model, version, _ = load_registered_model(client, args.model or DEFAULT_MODEL_NAME, device=device)
        print(f"model: {version.name}/{version.version} (run {version.run_id})", file=sys.stderr)
        if version.run_id and not args.no_memorization:
            run_data = client.get_run(version.run_id).data
            run_params, trained_sha256 = dict(run_data.params), run_data.tags.get("dataset_sha256")
    if args.quantize == "int8":
        from core.quantize import quantize_int8

        model = quantize_int8(model)
    stream = TextStream(model, tokenizer, args.prompt, config)  # checks the prompt
    index, corpus_meta = None, None
    if not args.no_memorization:
        index, corpus_meta = _copy_index(args.data, run_params, trained_sha256, tokenizer)
    if stream.prompt_cropped:
        print(
            f"notice: the prompt is longer than the {model.config.block_size}-token context; "
            "only its last tokens are used",
            file=sys.stderr,
        )

    live = not args.json and config.num_samples == 1  # one sample streams to the terminal as it is produced
    if live:
        sys.stdout.write(args.prompt)
    for pieces in stream:
        if live:
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
    result = stream.result()
    reports = None if index is None else [index.report_text(text, tokenizer) for text in result.continuations]
    if args.json:
        print(
            json.dumps(
                {
                    "samples": result.samples,
                    "tokens_per_sec": round(result.tokens_per_sec, 2),
                    "new_tokens": result.new_tokens,
                    "seed": result.seed,
                    "prompt_cropped": result.prompt_cropped,
                    "memorization": None if reports is None else [report.to_dict() for report in reports],
                    "memorization_corpus": corpus_meta,
                }
            )
        )
        return 0
    if live:
        sys.stdout.write("\n")
        if reports is not None:  # stdout keeps only the text of a streamed sample
            print(reports[0].summary(), file=sys.stderr)
    else:
        for i, sample in enumerate(result.samples, 1):
            print(f"──── sample {i}/{config.num_samples} ────")
            print(sample)
            if reports is not None:
                print(f"({reports[i - 1].summary()})")
    print(
        f"{sum(result.new_tokens)} new tokens at {result.tokens_per_sec:.1f} tokens/s, seed {result.seed}",
        file=sys.stderr,
    )
    return 0


def _copy_index(data: str | None, run_params: dict[str, str], trained_sha256: str | None, tokenizer):
    """The copy index of the training split (:func:`core.memorization.index_for`) and a description of its corpus,
    or ``(None, None)`` after one line on stderr when the default corpus cannot be had. A corpus given with --data
    that cannot be read is the caller's mistake: its error propagates (one line, exit 2)."""
    from core.data import CorpusError, prepare_corpus
    from core.memorization import corpus_mismatch, index_for, training_data

    try:
        corpus = prepare_corpus(training_data(run_params, data), tokenizer)
    except CorpusError as exc:
        if data is not None:
            raise
        print(f"memorisation not measured: {exc} (pass --data PATH, or --no-memorization)", file=sys.stderr)
        return None, None
    mismatch = corpus_mismatch(corpus, trained_sha256)
    if mismatch is not None:
        print(f"note: {mismatch}", file=sys.stderr)
    described = {key: corpus.meta[key] for key in ("source", "name", "sha256", "train_tokens")}
    return index_for(corpus), described


if __name__ == "__main__":
    run(main)
