"""Generate Shakespeare-style text from a registered model or a checkpoint folder.

Usage: python -m pipelines.generate [--model NAME|NAME/VERSION|NAME@ALIAS ... | --checkpoint DIR] --prompt TEXT
       [--max-new-tokens N] [--num-samples K] [--temperature T] [--top-k K] [--top-p P] [--seed S] [--no-eot-stop]
       [--device auto|cpu|cuda|mps] [--quantize none|int8|int4|bf16|f16|auto] [--data PATH|URL | --no-memorization]
       [--json]

Without --model or --checkpoint it uses the latest version of the registered model ``shakespeare-gpt`` in the
tracking store (``MLFLOW_TRACKING_URI``, default the SQLite store under ``mlruns/``).

One sample streams to stdout as it is produced; several are printed one after another under a header each.
--json prints {"samples": [...], "tokens_per_sec": ..., "memorization": [...]}, each sample being the prompt plus its
continuation. A registered version's measured speed is kept as its ``decode_tokens_per_sec`` tag (the Models page
shows it).

--model repeated (2 to 4 versions, of any registered models) has them write side by side: the same prompt, settings
and seed (one drawn for all when --seed is not given), one token each in turn, each timed alone. --json then prints
{"prompt": ..., "seed": ..., "models": [{"model": "NAME/VERSION", "samples": [...], ...}, ...]}; the Generate
page's side-by-side texts are these.

Each sample's continuation is measured against the training split (the memorisation meter, core.memorization): the
share of its 8-token spans found verbatim there and its longest copied span, in characters. The training corpus is
--data, else the one the registered model's run trained on (its data_source param), else $SHAKESPEARE_SOURCE, else
Tiny Shakespeare's URL. A corpus that was not given and cannot be had (offline, not downloaded yet) is one line on
stderr, and the samples come without the figures; --no-memorization skips the measurement.
--quantize generates on the CPU with fewer bytes per weight (decoding is bound by reading the weights): the linear
layers' weights in int8, int4, bf16 or f16, widened to fp32 in registers by the studio's decoding kernels (no
half-precision arithmetic units needed; without a C++ compiler to build the kernels, only int8 runs). auto
measures every precision's decoding speed and held-out loss on this machine and picks the fastest whose loss stays
within 1% of fp32's; a registered version keeps the measurements (its precision_auto tag), so that happens once per
version and machine. ``python -m pipelines.benchmark --only int8 --model NAME`` measures them in more depth.
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
        action="append",
        help="registered model: NAME (latest version), NAME/VERSION or NAME@ALIAS (default: shakespeare-gpt); "
        "repeat it (up to 4 times) to have several versions write side by side from the same prompt and seed",
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
        help="CPU only: the linear layers' weights in int8, int4, bf16 or f16, or auto (the fastest within 1%% of "
        "fp32's held-out loss, measured here); default none: fp32",
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
    from core.device import resolve_device
    from core.errors import UsageError
    from core.sampling import SIDE_BY_SIDE_MAX
    from core.tokenizer import get_tokenizer

    config = sample_config(args)
    refs = args.model or [None]
    if len(refs) > SIDE_BY_SIDE_MAX:
        raise UsageError(f"at most {SIDE_BY_SIDE_MAX} models write side by side, got {len(refs)} --model options")
    if len(set(refs)) < len(refs):
        raise UsageError(f"a model is named twice in --model {' --model '.join(refs)}; name each version once")
    tokenizer = get_tokenizer()
    quantized = args.quantize != "none"
    device = resolve_device("cpu" if quantized and args.device == "auto" else args.device)
    if quantized and device.type != "cpu":
        raise UsageError(f"--quantize {args.quantize} runs on the CPU only, not {device.type}; use --device cpu")
    sources = [_load(args, ref, device, tokenizer) for ref in ([None] if args.checkpoint else refs)]
    if len(sources) == 1:
        return _generate_one(args, config, sources[0], tokenizer, device)
    return _generate_side_by_side(args, config, sources, tokenizer, device)


class _Source:
    """A model to generate from, with what its samples are measured against and where its speed is recorded."""

    def __init__(
        self, label: str, model, client=None, version=None, run_params=None, trained_sha256=None, precision="fp32"
    ) -> None:
        self.label, self.model, self.client, self.version, self.precision = label, model, client, version, precision
        self.run_params, self.trained_sha256 = run_params or {}, trained_sha256
        self.index, self.corpus_meta = None, None

    def measure_copies(self, args: argparse.Namespace, tokenizer) -> None:
        """Build the memorisation meter's index of this model's training split, unless --no-memorization (after the
        prompt has been checked: a bad prompt is refused before any corpus is read)."""
        if not args.no_memorization:
            self.index, self.corpus_meta = _copy_index(args.data, self.run_params, self.trained_sha256, tokenizer)


def _load(args: argparse.Namespace, ref: str | None, device, tokenizer) -> _Source:
    """The checkpoint (``ref`` None with --checkpoint) or the registered version ``ref`` (default: the latest
    shakespeare-gpt), at the precision --quantize asks for."""
    from core.checkpoint import load_checkpoint

    run_params: dict[str, str] = {}
    trained_sha256 = client = version = None
    if args.checkpoint is not None:
        model, _ = load_checkpoint(args.checkpoint, device=device)
        label = args.checkpoint
    else:
        from core.registry import load_registered_model
        from core.store import DEFAULT_MODEL_NAME, connect

        client = connect()
        model, version, _ = load_registered_model(client, ref or DEFAULT_MODEL_NAME, device=device)
        label = f"{version.name}/{version.version}"
        print(f"model: {label} (run {version.run_id})", file=sys.stderr)
        if version.run_id and (args.quantize == "auto" or not args.no_memorization):
            run_data = client.get_run(version.run_id).data
            run_params, trained_sha256 = dict(run_data.params), run_data.tags.get("dataset_sha256")
    precision = {"none": "fp32"}.get(args.quantize, args.quantize)
    if precision == "auto":
        precision = _auto_precision(model, client, version, run_params, args.data, tokenizer)
    from core.quantize import quantize

    model = quantize(model, precision)
    return _Source(label, model, client, version, run_params, trained_sha256, precision)


def _auto_precision(model, client, version, run_params: dict[str, str], data: str | None, tokenizer) -> str:
    """The precision --quantize auto picks: a registered version's stored choice for this machine, else measured
    now on the model's held-out split (and stored with the version)."""
    from mlflow.exceptions import MlflowException

    from core.data import prepare_corpus
    from core.memorization import training_data
    from core.precision import (
        PRECISION_TAG,
        choice_tag,
        choose_precision,
        describe,
        measure_precisions,
        stored_choice,
    )

    stored = None if version is None else stored_choice(version.tags)
    if stored is not None:
        chosen, measured = stored
        print(f"precision: {chosen} (measured on this machine before)\n{describe(measured, chosen)}", file=sys.stderr)
        return chosen
    corpus = prepare_corpus(training_data(run_params, data), tokenizer)
    print("measuring each precision's decoding speed and held-out loss on this CPU…", file=sys.stderr)
    measured = measure_precisions(model, corpus.tokens("val"))
    chosen = choose_precision(measured)
    print(f"precision: {chosen}\n{describe(measured, chosen)}", file=sys.stderr)
    if version is not None:
        try:
            client.set_model_version_tag(version.name, version.version, PRECISION_TAG, choice_tag(chosen, measured))
        except MlflowException as exc:
            print(f"note: the measurements were not kept in the registry: {exc.message}", file=sys.stderr)
    return chosen


def _record_speed(source: _Source, result, device) -> None:
    """Keep a registered version's measured decoding speed for the Models page; a store that refuses the tag is a
    note, not a failed generation."""
    if source.version is None or sum(result.new_tokens) < 8:  # too few tokens to say anything about speed
        return
    from mlflow.exceptions import MlflowException

    from core.leaderboard import record_decode_speed

    where = f"{device.type}, {source.precision}"
    try:
        version = source.version
        samples, tokens = len(result.new_tokens), max(result.new_tokens)
        record_decode_speed(
            source.client, version.name, int(version.version), result.tokens_per_sec, samples, tokens, where
        )
    except MlflowException as exc:
        print(f"note: the decoding speed was not recorded in the registry: {exc.message}", file=sys.stderr)


def _generate_one(args: argparse.Namespace, config, source: _Source, tokenizer, device) -> int:
    from core.sampling import TextStream

    stream = TextStream(source.model, tokenizer, args.prompt, config)  # checks the prompt
    source.measure_copies(args, tokenizer)
    if stream.prompt_cropped:
        print(
            f"notice: the prompt is longer than the {source.model.config.block_size}-token context; "
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
    _record_speed(source, result, device)
    reports = _reports(source, result, tokenizer)
    if args.json:
        print(json.dumps(_document(result, source, reports)))
        return 0
    if live:
        sys.stdout.write("\n")
        if reports is not None:  # stdout keeps only the text of a streamed sample
            print(reports[0].summary(), file=sys.stderr)
    else:
        _print_samples(result, reports)
    print(
        f"{sum(result.new_tokens)} new tokens at {result.tokens_per_sec:.1f} tokens/s, seed {result.seed}",
        file=sys.stderr,
    )
    return 0


def _generate_side_by_side(args: argparse.Namespace, config, sources: list[_Source], tokenizer, device) -> int:
    """Every model writes from the same prompt, settings and seed, one token each in turn (each timed alone)."""
    import dataclasses

    from core.sampling import TextStream, fresh_seed, side_by_side

    if config.seed is None:  # one seed for all: the comparison is of the models, not of their luck
        config = dataclasses.replace(config, seed=fresh_seed())
    streams = [TextStream(source.model, tokenizer, args.prompt, config) for source in sources]  # check the prompt
    for source in sources:
        source.measure_copies(args, tokenizer)
    for _ in side_by_side(streams):
        pass
    results = [stream.result() for stream in streams]
    for source, result in zip(sources, results, strict=True):
        _record_speed(source, result, device)
    reports = [_reports(source, result, tokenizer) for source, result in zip(sources, results, strict=True)]
    if args.json:
        documents = [
            {"model": source.label, **_document(result, source, report)}
            for source, result, report in zip(sources, results, reports, strict=True)
        ]
        print(json.dumps({"prompt": args.prompt, "seed": config.seed, "models": documents}))
        return 0
    for source, result, report in zip(sources, results, reports, strict=True):
        print(f"════ {source.label} ════")
        _print_samples(result, report)
        print(f"{sum(result.new_tokens)} new tokens at {result.tokens_per_sec:.1f} tokens/s")
    print(f"seed {config.seed} (the same for every model)", file=sys.stderr)
    return 0


def _reports(source: _Source, result, tokenizer) -> list | None:
    if source.index is None:
        return None
    return [source.index.report_text(text, tokenizer) for text in result.continuations]


def _document(result, source: _Source, reports) -> dict:
    return {
        "samples": result.samples,
        "tokens_per_sec": round(result.tokens_per_sec, 2),
        "new_tokens": result.new_tokens,
        "seed": result.seed,
        "prompt_cropped": result.prompt_cropped,
        "memorization": None if reports is None else [report.to_dict() for report in reports],
        "memorization_corpus": source.corpus_meta,
    }


def _print_samples(result, reports) -> None:
    for i, sample in enumerate(result.samples, 1):
        print(f"──── sample {i}/{len(result.samples)} ────")
        print(sample)
        if reports is not None:
            print(f"({reports[i - 1].summary()})")


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
