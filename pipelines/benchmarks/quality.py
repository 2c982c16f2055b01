"""Quality rows: the memorisation meter against a scan, and a time-budget run's held-out bits per character checked
by transformers."""

from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from core.config import DataConfig, SampleConfig
from pipelines.benchmarks.rows import BENCH_SEED, SAMPLING, Row, lower_is_better


def _held_out_windows(val_tokens, count: int, length: int) -> list:
    """``count`` windows of ``length`` tokens spread evenly over the validation split (shorter if it is short)."""
    import numpy as np

    val = np.asarray(val_tokens, dtype=np.int64)
    length = min(length, len(val))
    starts = np.linspace(0, len(val) - length, num=count).astype(int)
    return [val[s : s + length] for s in starts]


def _pooled_share(reports) -> float:
    """Copied spans of all ``reports`` over all their spans, in percent (0 when none has a span)."""
    spans = sum(r.spans for r in reports)
    return 100 * sum(r.copied_spans for r in reports) / spans if spans else 0.0


def memorization(
    corpus,
    model=None,
    *,
    samples: int = 8,
    new_tokens: int = 200,
    repeats: int = 3,
    label: str = "the model",
    log: Callable[[str], None] = print,
    prompt: str = "ROMEO:",
) -> list[Row]:
    """The memorisation meter (:mod:`core.memorization`) on ``corpus``, a :class:`core.data.PreparedCorpus`.

    ``memorization_speed``: milliseconds to measure one ``new_tokens``-token sample with the suffix-array index
    (ours; the index is built from scratch once, its build time in the note) against scanning the training tokens
    once per position of the sample (:func:`core.memorization.naive_longest_matches`, reference), on ``samples``
    windows of held-out text (what a model that writes produces); both must give the same reports. Ours is the
    median of ``repeats`` timings per sample; the reference is timed once per sample, then the medians over samples.

    ``memorization_share`` (with a ``model``): the share of 8-token spans of ``samples`` sampled continuations of
    ``prompt`` (the benchmark's temperature and top-k, ``new_tokens`` each, pooled) found verbatim in the training
    split (ours), against the same share for the held-out windows (reference: unseen Shakespeare shares some stock
    phrases with the training split too). Lower is better; the goal is under 5%.
    """
    import numpy as np

    from core.memorization import CopyIndex, naive_longest_matches, report_from_matches
    from core.sampling import generate
    from core.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    train = np.asarray(corpus.tokens("train"), dtype=np.int32)
    started = time.perf_counter()
    index = CopyIndex(train)
    build_seconds = time.perf_counter() - started
    log(f"  index of {len(train):,} training tokens built in {build_seconds:.2f} s")
    windows = _held_out_windows(corpus.tokens("val"), samples, new_tokens)
    ours_ms, reference_ms, held_out = [], [], []
    for i, window in enumerate(windows):
        index.report(window, tokenizer)  # warm-up
        timings = []
        for _ in range(repeats):
            started = time.perf_counter()
            report = index.report(window, tokenizer)
            timings.append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        naive = report_from_matches(window, naive_longest_matches(train, window), tokenizer)
        reference_ms.append(1000 * (time.perf_counter() - started))
        if naive != report:
            raise RuntimeError(f"the index and the scan disagree on held-out window {i}: {report} vs {naive}")
        ours_ms.append(statistics.median(timings))
        held_out.append(report)
        log(f"  sample {i + 1}/{len(windows)}: index {ours_ms[-1]:.2f} ms, scan {reference_ms[-1]:.1f} ms")
    ours, reference = statistics.median(ours_ms), statistics.median(reference_ms)
    if reference > ours:
        payoff = f"worth it from {math.ceil(build_seconds * 1000 / (reference - ours))} samples on"
    else:
        payoff = "the scan is faster on a corpus this small"
    rows = [
        lower_is_better(
            "memorization_speed",
            ours,
            reference,
            "ms/sample",
            f"{len(windows)} held-out samples × {len(windows[0])} tokens vs {len(train):,} training tokens; index "
            f"built once in {build_seconds:.2f} s ({payoff})",
        )
    ]
    if model is None:
        return rows
    config = SampleConfig(
        max_new_tokens=new_tokens, num_samples=samples, seed=BENCH_SEED, stop_at_eot=False, **SAMPLING
    )
    generated = generate(model, tokenizer, prompt, config)
    reports = [index.report_text(text, tokenizer) for text in generated.continuations]
    ours_share, reference_share = _pooled_share(reports), _pooled_share(held_out)
    longest = statistics.median(r.longest_copy_chars for r in reports)
    held_out_longest = statistics.median(r.longest_copy_chars for r in held_out)
    log(
        f"  {label}: {ours_share:.1f}% of spans copied, median longest copy {longest:.0f} chars; held-out text "
        f"{reference_share:.1f}%, {held_out_longest:.0f} chars"
    )
    rows.append(
        lower_is_better(
            "memorization_share",
            ours_share,
            reference_share,
            "% of 8-token spans",
            f"{label}: {samples} samples × {new_tokens} new tokens (temperature {SAMPLING['temperature']}, top-k "
            f"{SAMPLING['top_k']}) vs held-out text; goal < 5%; median longest copy {longest:.0f} chars "
            f"(held-out {held_out_longest:.0f})",
        )
    )
    return rows


QUALITY_ANCHORS = {"char-level CPU": 2.71, "char-level GPU": 2.12, "small preset, 250 steps": 2.66}
"""Held-out bits per character to compare a budget run with: nanoGPT's character-level Shakespeare model in about 3
CPU minutes (2.71) and on a GPU (2.12), and the studio's `small` preset after 250 steps (about 10 CPU minutes), the
best a user got before time budgets (2.66). Published or earlier figures, not measured in the same run."""

QUALITY_PROMPT = "ROMEO:"


def hf_bits_per_char(model_dir: str | Path, val_tokens, val_characters: int, batch_size: int, block_size: int) -> float:
    """Held-out bits per character of a Hugging Face GPT-2 folder, computed by ``transformers``' own forward and
    cross-entropy: the mean next-token loss over the validation batches the studio's evaluation uses
    (:func:`core.data.epoch_batches` of ``batch_size`` × ``block_size``), times tokens per character, over ln 2. An
    independent check of the studio's figure."""
    from core.data import epoch_batches
    from core.hf import import_transformers

    transformers = import_transformers("checking a budget run's quality with transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(str(model_dir)).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in epoch_batches(val_tokens, batch_size, block_size):
            logits = model(x).logits  # (B, T, V)
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
    return total / count * len(val_tokens) / val_characters / math.log(2)


def quality_budget(
    budget_s: float,
    source: str,
    *,
    hf_check: bool = True,
    train_args: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> list[Row]:
    """Train the way a user does, ``python -m pipelines.train --time-budget <budget_s>s --data <source>`` (the
    recipe's defaults) into a scratch store, then report the registered model's held-out bits per character against
    the character-level CPU anchor (:data:`QUALITY_ANCHORS`), the command's wall time against the budget, and, with
    ``hf_check``, the same bits per character computed by ``transformers`` on the model's Hugging Face export.
    ``train_args`` are more flags for the train command (the tests shrink the model with them)."""
    import subprocess
    import sys

    from core.data import prepare_corpus
    from core.hf import export_hf
    from core.memorization import index_for
    from core.registry import load_registered_model, resolve_model_version
    from core.sampling import generate
    from core.store import connect
    from core.tokenizer import get_tokenizer

    label = f"{budget_s / 60:g}m"
    with tempfile.TemporaryDirectory(prefix="studio-quality-") as scratch:
        uri = f"sqlite:///{Path(scratch) / 'mlflow.db'}"
        command = [sys.executable, "-m", "pipelines.train", "--time-budget", f"{budget_s:g}s", "--data", source]
        command += ["--checkpoint-root", str(Path(scratch) / "checkpoints"), "--register-as", "budget-run"]
        command += list(train_args)
        log(f"  {' '.join(command[1:])}")
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
        started = time.perf_counter()
        finished = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        wall = time.perf_counter() - started
        if finished.returncode != 0:
            tail = (finished.stderr or finished.stdout).strip().splitlines()[-1:]
            raise RuntimeError(f"the budget run failed (exit {finished.returncode}): {' '.join(tail)}")
        client = connect(uri)
        version = resolve_model_version(client, "budget-run")
        run = client.get_run(version.run_id)
        bpc = run.data.metrics["best_val_bpc"]
        steps = int(run.data.params["budget_steps"])
        model, _, _ = load_registered_model(client, f"budget-run/{version.version}", device="cpu")
        tokenizer = get_tokenizer()
        config = SampleConfig(max_new_tokens=80, temperature=0.8, top_k=200, seed=0)
        sample = generate(model, tokenizer, QUALITY_PROMPT, config).samples[0]
        corpus = prepare_corpus(DataConfig(source=source), tokenizer)
        copied = index_for(corpus).report_text(sample[len(QUALITY_PROMPT) :], tokenizer)
        shown = " / ".join(line.strip() for line in sample.splitlines() if line.strip())[:160]
        log(f"  {steps} steps, {wall:.0f} s, held-out {bpc:.3f} bits/char; sample: {shown}")
        anchors = ", ".join(f"{name} {value}" for name, value in QUALITY_ANCHORS.items())
        rows = [
            lower_is_better(
                f"quality_{label}",
                bpc,
                QUALITY_ANCHORS["char-level CPU"],
                "bits/char",
                f"held-out, {steps} steps (anchors: {anchors}); sample {copied.summary()}: {shown}",
            ),
            lower_is_better(
                f"budget_wall_{label}",
                wall,
                budget_s,
                "s",
                "the whole train command, start-up and registration included, vs its --time-budget",
            ),
        ]
        if hf_check:
            hf_dir = Path(scratch) / "hf"
            export_hf(model, hf_dir)
            meta = corpus.meta
            batch, block = int(run.data.params["batch_size"]), int(run.data.params["block_size"])
            hf_bpc = hf_bits_per_char(hf_dir, corpus.tokens("val"), meta["val_characters"], batch, block)
            log(f"  transformers on the Hugging Face export: {hf_bpc:.3f} bits/char")
            rows.append(
                lower_is_better(
                    f"quality_hf_{label}",
                    hf_bpc,
                    bpc,
                    "bits/char",
                    "the registered model's HF export evaluated by transformers vs the studio's own figure",
                )
            )
        return rows
