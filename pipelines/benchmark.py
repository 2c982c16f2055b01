"""Measure the studio against a reference in the same run and print a table (medians of repeats).

Usage: python -m pipelines.benchmark [--quick] [--json] [--only NAME ...] [--data PATH|URL] [--model REF]
       [--budgets DURATION ...]

Rows (the reference is measured in the same process, on identical weights and inputs):
  generate_b1, generate_b5   sampling tokens/s of gpt2 (124M) vs transformers' GPT2LMHeadModel.generate
  train_tiny, train_small, train_gpt2
                             training tokens/s at B=8, T=256 vs a GPT2LMHeadModel step with the same AdamW and clipping
  train_bf16                 train_bf16, train_bf16_loss: bf16 autocast training of the small preset on this CPU vs
                             fp32 (tokens/s, and the gap between the two loss curves); no rows where bf16 is slower
  first_token                seconds from a registered 124M model to its first token vs from_pretrained + generate
  log_overhead               MLflow logging as % of the tiny preset's step time, asynchronous vs synchronous
  compare_fetch              Compare Runs' data work for 10 runs × 20,000 steps vs plain get_metric_history
  pages                      models_page, compare_runs_page: seconds to render each page cold with 50 registered
                             versions and 20 runs × 2,000 steps (samples included) vs the 2 s target
  llamacpp                   llamacpp_f32, llamacpp_q8_0, llamacpp_f16, llamacpp_f16_bf16, llamacpp_q4_0: batch-1
                             sampling tokens/s of gpt2 (124M) at fp32, int8, f16, bf16 and int4 vs llama.cpp
                             (llama-cpp-python) at F32, Q8_0, F16, F16 and Q4_0 on the studio's GGUF export of the same
                             weights, the same threads, prompt and new tokens; runs by default when llama-cpp-python
                             is installed (pip install -r requirements-llamacpp.txt)
  int8                       generate_b1_<p> and val_loss_<p> for p = bf16, f16, int8, int4 (each this machine can
                             run): a registered model (--model) at that precision vs the same model in fp32, speed
                             at batch 1 and validation loss on --data
  quality                    quality_<budget>: held-out bits per character of `python -m pipelines.train
                             --time-budget <budget>` (the CPU recipe) vs nanoGPT's char-level CPU model (2.71);
                             budget_wall_<budget>: that command's wall time vs the budget; quality_hf_<budget>: the
                             same bits per character computed by transformers on the model's HF export. Budgets:
                             --budgets (default 10m; --quick 2m)
  memorization               memorization_speed: ms to measure a 200-token sample's copied spans with the
                             suffix-array index vs a scan of the training split; with --model, memorization_share:
                             % of the model's 8-token spans found in the training split vs held-out text's
--json writes {"rows": [{"name", "ours", "reference", "unit", "ratio", "note"}, ...]} to stdout, progress to stderr.
A ratio above 1 means the studio is better. --quick (under 3 minutes on a 2-core laptop) uses fewer tokens, steps
and repeats (64 new tokens per generation) and leaves out compare_fetch, whose reference alone takes about 40 s,
and pages, whose store takes a minute to build (ask for them with --only). The int8 rows run when --model names a
trained model. The memorization rows use --data, else the model's training data (its run's data_source), else the
default corpus. The generation and training rows need transformers (pip install -r requirements-dev.txt).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence

from core.errors import UsageError
from pipelines.cli import ArgumentParser, duration, run

SECTIONS = (
    "generate_b1",
    "generate_b5",
    "train_tiny",
    "train_small",
    "train_gpt2",
    "train_bf16",
    "first_token",
    "log_overhead",
    "compare_fetch",
    "pages",
    "llamacpp",
    "int8",
    "memorization",
    "quality",
)
SLOW_SECTIONS = ("compare_fetch", "pages")
"""Rows --quick leaves out unless --only names them."""
MODEL_SECTIONS = ("int8",)
"""Rows that measure a trained model: they run when --model names one."""
OPTIONAL_SECTIONS = {"llamacpp": "llama_cpp"}
"""Rows that need an optional package: they run by default when it is installed."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m pipelines.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (under 3 minutes)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON on stdout")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these rows")
    parser.add_argument(
        "--data",
        help="corpus of the log_overhead, int8 and memorization rows (default: $SHAKESPEARE_SOURCE, else Tiny "
        "Shakespeare's URL; for the memorization rows with --model, the model's training data first)",
    )
    parser.add_argument(
        "--model",
        metavar="REF",
        help="registered model for the int8 and memorization rows: NAME (latest version), NAME/VERSION or NAME@ALIAS",
    )
    parser.add_argument(
        "--budgets",
        nargs="+",
        type=duration,
        metavar="DURATION",
        help="time budgets of the quality rows, e.g. 2m 10m 30m (default: 10m; with --quick 2m)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.memorization import default_source

    explicit_data, args.data = args.data, args.data or default_source()
    # Progress goes to stderr line by line: no MLflow or transformers loading bars in between.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from pipelines import benchmarks as benchmark

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    selected = args.only or [
        s
        for s in SECTIONS
        if not (args.quick and s in SLOW_SECTIONS)
        and (s not in MODEL_SECTIONS or args.model is not None)
        and (s not in OPTIONAL_SECTIONS or _installed(OPTIONAL_SECTIONS[s]))
    ]
    if "llamacpp" in selected:
        from pipelines.benchmarks.llamacpp import import_llama_cpp

        import_llama_cpp()  # missing: one line now, not after minutes of other rows
    if "int8" in selected and args.model is None:
        raise UsageError("the int8 rows measure a trained model: add --model NAME (for example shakespeare-gpt)")
    machine = benchmark.machine_description()
    # A missing corpus or model fails now, not after minutes of other rows.
    if "log_overhead" in selected or "int8" in selected:
        from core.data import read_corpus

        read_corpus(args.data)
    model_ref = None
    run_params: dict[str, str] = {}  # of the model's training run: where its training data came from
    if "int8" in selected or ("memorization" in selected and args.model is not None):
        from core.registry import resolve_model_version
        from core.store import connect

        # Pinned now: a version registered while the other rows run must not change which one the rows load.
        version = resolve_model_version(connect(), args.model)
        model_ref = f"{version.name}/{version.version}"
        if "memorization" in selected and version.run_id:
            run_params = dict(connect().get_run(version.run_id).data.params)
    memorization_data = None
    if "memorization" in selected:
        from core.data import read_corpus
        from core.memorization import training_data

        memorization_data = training_data(run_params, explicit_data)  # --data, else the run's, else the default
        read_corpus(memorization_data.source)
    rows = []

    def measure(title: str, section: Callable[..., benchmark.Row | list[benchmark.Row]], *args, **kwargs) -> None:
        """Run one section (its row, or its rows), printing its title, then its ratios and time."""
        progress(title)
        started = time.perf_counter()
        measured = section(*args, log=progress, **kwargs)
        measured = measured if isinstance(measured, list) else [measured]
        rows.extend(measured)
        ratios = ", ".join(f"{row.ratio:.2f}×" for row in measured)
        progress(f"  ratio {ratios} ({time.perf_counter() - started:.0f} s)")

    generation_rows = {"generate_b1", "generate_b5", "first_token"}.intersection(selected)
    pair = benchmark.inference_pair() if generation_rows else None  # one 124M pair for these rows
    for batch in (1, 5):
        if f"generate_b{batch}" in selected:
            # --quick: batch 1, bound by memory bandwidth, wanders most on a shared machine (±15% from one second
            # to the next here), so its median takes more repeats
            new_tokens, repeats = (64, 5 if batch == 1 else 2) if args.quick else (256, 5)
            measure(
                f"generate_b{batch}: gpt2, {batch} × {new_tokens} sampled tokens vs GPT2LMHeadModel.generate",
                benchmark.generation,
                batch,
                new_tokens,
                repeats=repeats,
                pair=pair,
            )
    if "first_token" in selected:
        measure(
            "first_token: a registered 124M model to its first sampled token",
            benchmark.first_token,
            repeats=2 if args.quick else 5,
            pair=pair,
        )
    del pair
    for preset in benchmark.TRAIN_CONFIGS:
        if f"train_{preset}" in selected:
            # (warm-up, timed) steps per config; a gpt2 step at 8×256 takes 10 to 20 s on a 2-core CPU. Warm-ups are
            # full size: a smaller one left the first full step about 15% slower (glibc maps fresh pages for the
            # larger activations until it has freed some).
            quick = {"tiny": (2, 3), "small": (1, 2), "gpt2": (1, 1)}
            full = {"tiny": (3, 7), "small": (2, 5), "gpt2": (1, 3)}
            warmup, steps = (quick if args.quick else full)[preset]
            measure(
                f"train_{preset}: training steps at B×T = 8×256, ours vs a GPT2LMHeadModel step",
                benchmark.training,
                preset,
                steps=steps,
                warmup=warmup,
            )
    if "train_bf16" in selected:
        measure(
            "train_bf16: small preset steps at B×T = 8×256 under bf16 autocast vs fp32, and their loss curves",
            benchmark.bf16_training,
            steps=4 if args.quick else 8,
            repeats=2 if args.quick else 3,
        )
    if "log_overhead" in selected:
        steps, repeats = (6, 2) if args.quick else (40, 3)
        measure(
            "log_overhead: tiny preset steps with asynchronous and with synchronous MLflow logging",
            benchmark.logging_overhead,
            args.data,
            steps=steps,
            repeats=repeats,
        )
    if "compare_fetch" in selected:
        measure(
            "compare_fetch: 10 runs × 20,000 steps of the 6 charted metrics",
            benchmark.compare_fetch,
            repeats=2 if args.quick else 3,
        )
    if "pages" in selected:
        measure(
            "pages: the Models page over 50 versions, Compare Runs over 20 runs × 2,000 steps, cold",
            benchmark.page_renders,
            repeats=2 if args.quick else 3,
        )
    if "llamacpp" in selected:
        new_tokens, repeats = (64, 2) if args.quick else (128, 3)
        measure(
            f"llamacpp: gpt2 124M, 1 × {new_tokens} sampled tokens per precision vs llama.cpp on the GGUF export",
            benchmark.llamacpp_rows,
            new_tokens=new_tokens,
            repeats=repeats,
        )
    if "int8" in selected:
        measure(
            f"int8: {model_ref} at bf16, f16, int8 and int4 vs fp32, sampling at batch 1 and validation loss",
            _int8_rows,
            model_ref,
            args,
        )

    if "quality" in selected:
        from core.data import read_corpus

        read_corpus(args.data)  # downloaded once here, so the budget runs do not spend their time on it
        for budget in args.budgets or ([120.0] if args.quick else [600.0]):
            measure(
                f"quality: a {budget / 60:g}-minute time-budget training run, held-out bits per character",
                benchmark.quality_budget,
                budget,
                args.data,
                hf_check=_has_transformers(),
            )

    if "memorization" in selected:
        with_model = f" and {model_ref}'s copied share" if model_ref else ""
        measure(
            f"memorization: the copy index vs a scan of the training split{with_model}",
            _memorization_rows,
            model_ref,
            memorization_data,
            args,
        )

    if args.json:
        print(json.dumps({"machine": machine, "rows": [row.to_dict() for row in rows]}, indent=2))
        return 0
    print(f"machine: {machine}")
    print(f"{'name':<16} {'ours':>12} {'reference':>12}  {'unit':<16} {'ratio':>7}  note")
    for row in rows:
        print(f"{row.name:<16} {row.ours:>12.3f} {row.reference:>12.3f}  {row.unit:<16} {row.ratio:>6.2f}×  {row.note}")
    return 0


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def _has_transformers() -> bool:
    return _installed("transformers")


def _int8_rows(model_ref: str, args, log: Callable[[str], None]) -> list:
    """The ``int8`` section: every lower precision of :mod:`core.quantize` this machine can run, against fp32."""
    from core.config import DataConfig
    from core.data import prepare_corpus
    from core.errors import UsageError
    from core.quantize import PRECISIONS
    from core.registry import load_registered_model
    from core.store import connect
    from core.tokenizer import get_tokenizer
    from pipelines import benchmarks as benchmark

    model, _, _ = load_registered_model(connect(), model_ref, device="cpu")
    corpus = prepare_corpus(DataConfig(source=args.data), get_tokenizer())
    rows = []
    for precision in [p for p in PRECISIONS if p != "fp32"]:
        try:
            rows += benchmark.quantization(
                model,
                corpus.tokens("val"),
                new_tokens=64 if args.quick else 256,
                repeats=2 if args.quick else 3,
                eval_batches=4 if args.quick else 16,
                label=model_ref,
                log=log,
                precision=precision,
            )
        except UsageError as exc:
            log(f"  {precision}: no rows, {exc}")
    return rows


def _memorization_rows(model_ref: str | None, data, args, log: Callable[[str], None]) -> list:
    from core.data import prepare_corpus
    from core.tokenizer import get_tokenizer
    from pipelines import benchmarks as benchmark

    model = None
    if model_ref is not None:
        from core.registry import load_registered_model
        from core.store import connect

        model, _, _ = load_registered_model(connect(), model_ref, device="cpu")
    return benchmark.memorization(
        prepare_corpus(data, get_tokenizer()),
        model,
        samples=4 if args.quick else 8,
        new_tokens=200,
        repeats=3 if args.quick else 5,
        label=model_ref or "the model",
        log=log,
    )


if __name__ == "__main__":
    run(main)
