"""The benchmark harness behind ``python -m pipelines.benchmark`` (out of the engine: it needs transformers, a dev
requirement, and times the studio from outside). Side-by-side measurements: each row pits the studio against a reference
measured in the same process, on the same machine, with warm-up and repeats, and reports medians.

A row is ``{"name", "ours", "reference", "unit", "ratio"}``. ``ratio`` is oriented so that above 1 means the studio
is better: ours / reference for throughputs, reference / ours for costs (seconds, percent).
"""

from pipelines.benchmarks.llamacpp import llamacpp_rows
from pipelines.benchmarks.pages import page_renders
from pipelines.benchmarks.quality import (
    QUALITY_ANCHORS,
    QUALITY_PROMPT,
    _held_out_windows,
    hf_bits_per_char,
    memorization,
    quality_budget,
)
from pipelines.benchmarks.rows import BENCH_SEED, SAMPLING, Row, higher_is_better, lower_is_better, machine_description
from pipelines.benchmarks.speed import (
    TRAIN_CONFIGS,
    TRAIN_SHAPE,
    InferencePair,
    bf16_training,
    first_token,
    generation,
    hf_twin,
    inference_pair,
    quantization,
    training,
)
from pipelines.benchmarks.tracking import compare_fetch, logging_overhead

__all__ = [
    "BENCH_SEED",
    "QUALITY_ANCHORS",
    "QUALITY_PROMPT",
    "SAMPLING",
    "TRAIN_CONFIGS",
    "TRAIN_SHAPE",
    "InferencePair",
    "Row",
    "_held_out_windows",
    "bf16_training",
    "compare_fetch",
    "first_token",
    "generation",
    "hf_bits_per_char",
    "hf_twin",
    "higher_is_better",
    "inference_pair",
    "llamacpp_rows",
    "logging_overhead",
    "lower_is_better",
    "machine_description",
    "memorization",
    "page_renders",
    "quality_budget",
    "quantization",
    "training",
]
