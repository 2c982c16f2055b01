"""Side-by-side measurements for ``python -m pipelines.benchmark``: each row pits the studio against a reference
measured in the same process, on the same machine, with warm-up and repeats, and reports medians.

A row is ``{"name", "ours", "reference", "unit", "ratio"}``. ``ratio`` is oriented so that above 1 means the studio
is better: ours / reference for throughputs, reference / ours for costs (seconds, percent).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.callbacks import Callback
from core.config import DataConfig, ModelConfig, SampleConfig, TrainConfig
from core.trainer import Trainer


@dataclass(frozen=True)
class Row:
    """One benchmark result: the studio's figure, the reference's, and how they compare."""

    name: str
    """Stable identifier, e.g. ``log_overhead``."""
    ours: float
    """The studio's median."""
    reference: float
    """The reference's median, measured in the same run."""
    unit: str
    """Unit of ``ours`` and ``reference``."""
    ratio: float
    """Above 1 means the studio is better (see the module docstring)."""
    note: str = ""
    """What was measured, in a few words."""

    def to_dict(self) -> dict:
        return asdict(self)


def machine_description() -> str:
    """The CPU model, core count, torch threads and versions: where a table's figures were measured."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:  # not Linux: keep platform's answer
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def higher_is_better(name: str, ours: float, reference: float, unit: str, note: str = "") -> Row:
    """A throughput row: ratio = ours / reference."""
    return Row(name, ours, reference, unit, ours / reference if reference else math.inf, note)


def lower_is_better(name: str, ours: float, reference: float, unit: str, note: str = "") -> Row:
    """A cost row: ratio = reference / ours."""
    return Row(name, ours, reference, unit, reference / ours if ours else math.inf, note)


class _TimedLogger(Callback):
    """Forwards the step and eval reports to ``logger`` and adds up the time those calls take on the training
    thread, and the steps' own time (the trainer's ``time_per_batch``, which leaves callbacks out)."""

    def __init__(self, logger: Callback) -> None:
        self.logger = logger
        self.foreground_seconds = 0.0
        self.step_seconds: list[float] = []

    def _timed(self, hook: str, step: int, metrics: dict[str, float]) -> None:
        started = time.perf_counter()
        getattr(self.logger, hook)(step, metrics)
        self.foreground_seconds += time.perf_counter() - started

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.step_seconds.append(metrics["time_per_batch"])
        self._timed("on_step", step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._timed("on_eval", step, metrics)


def _tiny_trainer(corpus: str, steps: int, callbacks: list[Callback]) -> Trainer:
    """The tiny preset at its default batch (2,048 tokens), with no evaluation, periodic samples or resumable
    checkpoints."""
    model = ModelConfig.from_preset("tiny")
    data = DataConfig(source=corpus, batch_size=16, block_size=model.block_size)
    train = TrainConfig(
        max_steps=steps, target_loss=0, eval_interval=0, sample_interval=0, sample_tokens=1, checkpoint_interval=0
    )
    return Trainer(model, data, train, callbacks)


def logging_overhead(corpus: str, steps: int = 30, repeats: int = 3, log: Callable[[str], None] = print) -> Row:
    """MLflow logging cost as a percentage of the tiny preset's step time: the asynchronous batched
    :class:`core.tracking.MlflowLogger` (ours) against one synchronous ``log_batch`` per step (reference).

    Each repeat trains ``steps`` steps once per mode against a fresh SQLite store and adds up everything the
    logger costs: the time its calls take on the training thread, the CPU time of its background thread (which
    competes with training for the cores), and the final flush. Overhead = that cost / the steps' own time. Direct
    accounting rather than a difference of two noisy wall times: on a busy 2-core machine step times wander by
    more than the 2% being measured. Reported: the median over repeats.
    """
    from core.store import connect, ensure_experiment
    from core.tracking import MlflowLogger

    overheads: dict[str, list[float]] = {"async": [], "sync": []}
    with tempfile.TemporaryDirectory(prefix="studio-bench-") as scratch:
        client = connect(f"sqlite:///{Path(scratch) / 'mlflow.db'}")
        experiment_id = ensure_experiment(client, "benchmark")
        for repeat in range(repeats):
            step_ms = {}
            for mode in ("async", "sync"):
                run_id = client.create_run(experiment_id, run_name=f"{mode}-{repeat}").info.run_id
                logger = MlflowLogger(client, run_id, asynchronous=mode == "async")
                timed = _TimedLogger(logger)
                _tiny_trainer(corpus, steps, [timed]).fit(Path(scratch) / f"{mode}-{repeat}")
                started = time.perf_counter()
                logger.close()
                cost = timed.foreground_seconds + logger.background_cpu_seconds + time.perf_counter() - started
                overheads[mode].append(100 * cost / sum(timed.step_seconds))
                step_ms[mode] = 1000 * statistics.median(timed.step_seconds)
                stored = client.get_metric_history(run_id, "loss")
                if len(stored) != steps:
                    raise RuntimeError(f"{mode} logging stored {len(stored)} of {steps} loss points")
            log(
                f"  repeat {repeat + 1}/{repeats}: median step {step_ms['async']:.0f} ms; logging overhead "
                f"async {overheads['async'][-1]:.3f}%, sync {overheads['sync'][-1]:.3f}%"
            )
    return lower_is_better(
        "log_overhead",
        statistics.median(overheads["async"]),
        statistics.median(overheads["sync"]),
        "% of step time",
        "tiny preset B=16 T=128: async batched logger vs a synchronous log_batch per step",
    )


def _fill_long_runs(db_path: Path, client, experiment_id: str, runs: int, steps: int, metrics: list[str]) -> list[str]:
    """``runs`` finished runs with ``steps`` points of each metric. Fixture data only: the points are written with
    one ``executemany`` in MLflow's own SQLite schema (the API would take minutes for a million points), and then
    read back through the API like any run."""
    import sqlite3

    import numpy as np

    run_ids = [client.create_run(experiment_id, run_name=f"long-{r}").info.run_id for r in range(runs)]
    step_numbers = np.arange(1, steps + 1)
    with sqlite3.connect(db_path) as db:
        for r, run_id in enumerate(run_ids):
            for k, key in enumerate(metrics):
                values = (k + 1) * 10.0 / (1 + step_numbers / (100 * (r + 1)))
                rows = [
                    (key, float(v), 1_790_000_000_000 + 50 * int(s), run_id, int(s), 0)
                    for s, v in zip(step_numbers, values, strict=True)
                ]
                db.executemany(
                    "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?, ?, ?, ?, ?, ?)",
                    rows,
                )
                db.execute(
                    "INSERT INTO latest_metrics (key, value, timestamp, step, is_nan, run_uuid) "
                    "VALUES (?, ?, ?, ?, 0, ?)",
                    (key, float(values[-1]), rows[-1][2], steps, run_id),
                )
    for run_id in run_ids:
        client.set_terminated(run_id, "FINISHED")
    return run_ids


def compare_fetch(runs: int = 10, steps: int = 20_000, repeats: int = 3, log: Callable[[str], None] = print) -> Row:
    """Seconds for the Compare Runs page's data work on ``runs`` × ``steps`` steps of its 6 charted metrics:
    fetch every history, downsample each curve to 1,000 points and build the plotly figures (ours, via
    :func:`core.runs.metric_histories`), against fetching the same histories one by one with
    ``MlflowClient.get_metric_history`` and plotting every point (reference). Median of ``repeats``."""
    import plotly.graph_objects as go

    from core.runs import metric_histories
    from core.store import connect, ensure_experiment

    charted = ["loss", "avg_loss", "best_loss", "lr", "time_per_batch", "val_loss"]

    def figures(frame) -> int:
        built = 0
        for _, data in frame.groupby("metric", sort=False):
            figure = go.Figure()
            for run_id, series in data.groupby("run_id", sort=False):
                figure.add_trace(go.Scatter(x=series["step"], y=series["value"], mode="lines", name=run_id[:8]))
            figure.to_json()  # what Streamlit sends to the browser
            built += 1
        return built

    with tempfile.TemporaryDirectory(prefix="studio-bench-") as scratch:
        db = Path(scratch) / "mlflow.db"
        client = connect(f"sqlite:///{db}")
        run_ids = _fill_long_runs(db, client, ensure_experiment(client, "long"), runs, steps, charted)
        ours, reference = [], []
        for repeat in range(repeats):
            started = time.perf_counter()
            assert figures(metric_histories(client, run_ids, charted, max_points=1000)) == len(charted)
            ours.append(time.perf_counter() - started)

            import pandas as pd

            started = time.perf_counter()
            rows = [
                {"run_id": run_id, "metric": key, "step": m.step, "value": m.value}
                for run_id in run_ids
                for key in charted
                for m in client.get_metric_history(run_id, key)
            ]
            figures(pd.DataFrame(rows))
            reference.append(time.perf_counter() - started)
            log(f"  repeat {repeat + 1}/{repeats}: ours {ours[-1]:.2f} s, reference {reference[-1]:.2f} s")
    return lower_is_better(
        "compare_fetch",
        statistics.median(ours),
        statistics.median(reference),
        "s",
        f"{runs} runs × {steps:,} steps × {len(charted)} charts: fetch, downsample, build figures",
    )


# -- against Hugging Face transformers' GPT2LMHeadModel ------------------------------------------------------------

BENCH_SEED = 1234
SAMPLING = {"temperature": 0.8, "top_k": 200}
"""Sampling settings of the generation rows, the same on both sides."""
TRAIN_SHAPE = (8, 256)
"""(B, T) of the training rows, for every config."""
TRAIN_CONFIGS = {
    "tiny": ModelConfig.from_preset("tiny", block_size=256),
    "small": ModelConfig.from_preset("small"),
    "gpt2": ModelConfig.from_preset("gpt2"),
}
"""The training rows' model shapes: the presets, with a context of at least T (tiny's is 128)."""


def _shape(config: ModelConfig) -> str:
    """``gpt2 124M`` for the reference design, else the layers and width."""
    if config == ModelConfig.from_preset("gpt2"):
        return "gpt2 124M"
    return f"{config.n_layer} layers × {config.n_embd} dims"


def _seeded_gpt(config: ModelConfig):
    from core.model import GPT

    torch.manual_seed(BENCH_SEED)
    return GPT(config)


def hf_twin(model, *, train: bool):
    """A ``transformers.GPT2LMHeadModel`` with exactly ``model``'s weights (the reference side of a row)."""
    from core.hf import hf_config_dict, import_transformers, to_hf_state_dict

    transformers = import_transformers("the benchmark's reference (Hugging Face GPT2LMHeadModel)")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(**hf_config_dict(model.config))
    try:  # every weight is overwritten below: skip the random init (about 4 s of a --quick run for 124M)
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers version: initialise, only slower
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        twin = transformers.GPT2LMHeadModel(config)
    missing, unexpected = twin.load_state_dict(to_hf_state_dict(model), strict=False)
    if unexpected or any(not key.endswith(("attn.bias", "attn.masked_bias", "lm_head.weight")) for key in missing):
        raise RuntimeError(f"the reference model did not take every weight: {missing} {unexpected}")
    twin.tie_weights()
    if twin.lm_head.weight.data_ptr() != twin.transformer.wte.weight.data_ptr():
        raise RuntimeError("the reference model's LM head is not tied to its token embedding")
    twin.generation_config.eos_token_id = None  # random weights may emit <|endoftext|>: both sides run full length
    twin.generation_config.pad_token_id = 50256
    return twin.train(train)


@dataclass(frozen=True)
class InferencePair:
    """A seeded studio model in eval mode and its ``GPT2LMHeadModel`` twin, shared by the generation rows and
    ``first_token`` (building a 124M pair takes several seconds, a good share of ``--quick``'s budget)."""

    model: torch.nn.Module
    """The studio's :class:`core.model.GPT`."""
    twin: torch.nn.Module
    """``transformers.GPT2LMHeadModel`` with the same weights."""


def inference_pair(config: ModelConfig | None = None) -> InferencePair:
    """The :class:`InferencePair` of the ``gpt2`` preset, or of ``config`` (for tests)."""
    model = _seeded_gpt(config or ModelConfig.from_preset("gpt2")).eval()
    return InferencePair(model, hf_twin(model, train=False))


def _sampling_seconds(model, tokenizer, prompt: str, batch: int, new_tokens: int) -> float:
    """Seconds :func:`core.sampling.generate` takes for ``batch`` samples of exactly ``new_tokens`` new tokens each
    (the benchmark's sampling settings and seed, no early stop)."""
    from core.sampling import generate

    config = SampleConfig(max_new_tokens=new_tokens, num_samples=batch, seed=BENCH_SEED, stop_at_eot=False, **SAMPLING)
    result = generate(model, tokenizer, prompt, config)
    if sum(result.new_tokens) != batch * new_tokens:
        raise RuntimeError(f"ours made {sum(result.new_tokens)} tokens, expected {batch * new_tokens}")
    return result.seconds


def generation(
    batch: int,
    new_tokens: int,
    repeats: int = 3,
    log: Callable[[str], None] = print,
    prompt: str = "ROMEO:",
    config: ModelConfig | None = None,
    pair: InferencePair | None = None,
) -> Row:
    """Sampling tokens/s of the ``gpt2`` preset (124M, fp32) at ``batch`` samples × ``new_tokens`` new tokens:
    :func:`core.sampling.generate` (ours: text out) against ``GPT2LMHeadModel.generate`` (reference: token ids out),
    on identical weights and prompt, with the same temperature and top-k, neither stopping early. One short
    warm-up each, then ``repeats`` alternating runs; medians. ``pair`` is the models to use (default: a new
    :func:`inference_pair` of ``config``, whose default is the gpt2 preset)."""
    from core.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    pair = pair or inference_pair(config)
    model, twin = pair.model, pair.twin
    prompt_ids = torch.tensor([tokenizer.encode(prompt)] * batch)

    def ours(n: int) -> float:
        return _sampling_seconds(model, tokenizer, prompt, batch, n)

    def reference(n: int) -> float:
        started = time.perf_counter()
        with torch.inference_mode():
            out = twin.generate(
                prompt_ids,
                attention_mask=torch.ones_like(prompt_ids),
                do_sample=True,
                max_new_tokens=n,
                **SAMPLING,
            )
        seconds = time.perf_counter() - started
        if out.shape != (batch, prompt_ids.size(1) + n):
            raise RuntimeError(f"the reference made {tuple(out.shape)} tokens, expected {batch} × {n} new")
        return seconds

    ours(8), reference(8)  # warm-up: allocators, thread pools, lazy imports
    ours_rates, reference_rates = [], []
    for repeat in range(repeats):
        ours_rates.append(batch * new_tokens / ours(new_tokens))
        reference_rates.append(batch * new_tokens / reference(new_tokens))
        log(f"  repeat {repeat + 1}/{repeats}: ours {ours_rates[-1]:.1f} tok/s, reference {reference_rates[-1]:.1f}")
    return higher_is_better(
        f"generate_b{batch}",
        statistics.median(ours_rates),
        statistics.median(reference_rates),
        "tokens/s",
        f"{_shape(model.config)} fp32, {batch} × {new_tokens} new tokens, "
        f"temperature {SAMPLING['temperature']}, top-k {SAMPLING['top_k']}",
    )


def training(
    preset: str,
    steps: int = 3,
    warmup: int = 1,
    log: Callable[[str], None] = print,
    config: ModelConfig | None = None,
    shape: tuple[int, int] = TRAIN_SHAPE,
) -> Row:
    """Training tokens/s of one config at B×T = :data:`TRAIN_SHAPE`: the studio's step (fused LM head + cross
    entropy, backward, clipping at 0.5, AdamW as the trainer builds it) against ``GPT2LMHeadModel(labels=...)``
    with the same AdamW settings and clipping, from identical weights on identical batches. Steps alternate
    between the two; medians of ``steps`` timed steps after ``warmup`` untimed ones. ``config`` and ``shape``
    replace the preset's shape and (B, T) (for tests)."""
    from core.optim import build_optimizer, build_scheduler

    config = config or TRAIN_CONFIGS[preset]
    B, T = shape
    train_config = TrainConfig(max_steps=1000)  # only the schedule's length: it must outlast the steps taken
    model = _seeded_gpt(config).train()
    twin = hf_twin(model, train=True)
    optimizer = build_optimizer(model, train_config, torch.device("cpu"))
    scheduler = build_scheduler(optimizer, train_config)
    twin_optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in twin.parameters() if p.dim() >= 2], "weight_decay": train_config.weight_decay},
            {"params": [p for p in twin.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=train_config.lr,
        betas=(train_config.beta1, train_config.beta2),
        eps=train_config.eps,
        fused=True,  # the same (fused) AdamW kernel as ours: the rows compare the models and losses, not optimizers
    )
    generator = torch.Generator().manual_seed(BENCH_SEED)
    # Full-size warm-up steps: the first steps at a shape are slower (AdamW's state is created, and the allocator
    # only learns to keep large blocks, such as the reference's full logits, after freeing a few of them).
    batches = [torch.randint(0, config.vocab_size, (B, T + 1), generator=generator) for _ in range(steps + warmup)]

    def ours(batch: torch.Tensor) -> float:
        started = time.perf_counter()
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - started

    def reference(batch: torch.Tensor) -> float:
        started = time.perf_counter()
        inputs = batch[:, :-1]  # the same T positions as ours (transformers shifts the labels itself)
        loss = twin(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), train_config.grad_clip)
        twin_optimizer.step()
        twin_optimizer.zero_grad(set_to_none=True)
        loss.item()
        return time.perf_counter() - started

    ours_rates, reference_rates = [], []
    for i, batch in enumerate(batches):
        ours_seconds, reference_seconds = ours(batch), reference(batch)
        if i >= warmup:
            ours_rates.append(B * T / ours_seconds)
            reference_rates.append(B * T / reference_seconds)
            log(
                f"  step {i - warmup + 1}/{steps}: ours {ours_rates[-1]:,.0f} tok/s, "
                f"reference {reference_rates[-1]:,.0f}"
            )
    return higher_is_better(
        f"train_{preset}",
        statistics.median(ours_rates),
        statistics.median(reference_rates),
        "tokens/s",
        f"{_shape(config)}, B={B} T={T}, AdamW + clip 0.5, fp32",
    )


def first_token(
    repeats: int = 3,
    log: Callable[[str], None] = print,
    prompt: str = "ROMEO:",
    config: ModelConfig | None = None,
    pair: InferencePair | None = None,
) -> Row:
    """Seconds from a registered 124M model (``gpt2`` preset) to its first generated token, in a warm process:
    resolve the version in a SQLite registry, load it with :func:`core.registry.load_registered_model`
    (safetensors, the studio's cache emptied first) and sample one token (ours), against loading the same weights
    exported in Hugging Face layout with ``GPT2LMHeadModel.from_pretrained`` and ``generate`` of one token
    (reference). Both read files the page cache already holds. Median of ``repeats``. The weights are
    ``pair``'s studio model (default: a new :func:`inference_pair` of ``config``)."""
    from core.checkpoint import save_checkpoint
    from core.hf import export_hf, import_transformers
    from core.registry import clear_model_cache, load_registered_model, log_and_register
    from core.sampling import generate
    from core.store import connect, ensure_experiment
    from core.tokenizer import get_tokenizer

    transformers = import_transformers("the benchmark's reference (Hugging Face GPT2LMHeadModel)")
    tokenizer = get_tokenizer()
    one_token = SampleConfig(max_new_tokens=1, seed=BENCH_SEED, stop_at_eot=False, **SAMPLING)
    with tempfile.TemporaryDirectory(prefix="studio-bench-") as scratch:
        scratch = Path(scratch)
        model = pair.model if pair else _seeded_gpt(config or ModelConfig.from_preset("gpt2")).eval()
        shape = _shape(model.config)
        checkpoint = save_checkpoint(model, scratch / "checkpoint")
        export_hf(model, scratch / "hf")
        del model  # (ours loads its own copy from the registry)
        client = connect(f"sqlite:///{scratch / 'mlflow.db'}")
        run_id = client.create_run(ensure_experiment(client, "benchmark")).info.run_id
        log_and_register(client, run_id, checkpoint, name="bench-gpt2")
        client.set_terminated(run_id, "FINISHED")
        log("  registered a 124M model; timing load + first token")

        def ours() -> float:
            clear_model_cache()
            started = time.perf_counter()
            loaded, _, _ = load_registered_model(client, "bench-gpt2")
            generate(loaded, tokenizer, prompt, one_token)
            return time.perf_counter() - started

        def reference() -> float:
            started = time.perf_counter()
            loaded = transformers.GPT2LMHeadModel.from_pretrained(scratch / "hf").eval()
            ids = torch.tensor([tokenizer.encode(prompt)])
            with torch.inference_mode():
                loaded.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=1, **SAMPLING)
            return time.perf_counter() - started

        ours(), reference()  # warm-up: the page cache and lazy imports
        ours_times, reference_times = [], []
        for repeat in range(repeats):
            ours_times.append(ours())
            reference_times.append(reference())
            log(f"  repeat {repeat + 1}/{repeats}: ours {ours_times[-1]:.2f} s, reference {reference_times[-1]:.2f} s")
        clear_model_cache()
    return lower_is_better(
        "first_token",
        statistics.median(ours_times),
        statistics.median(reference_times),
        "s",
        f"registered {shape}: resolve + load (safetensors) + 1 sampled token, vs from_pretrained + generate",
    )


# -- int8 dynamic quantization of a trained model -------------------------------------------------------------------

INT8_EVAL_SHAPE = (8, 256)
"""(B, T) of the validation batches the int8 rows evaluate (T capped at the model's context)."""


def quantization(
    model,
    val_tokens,
    *,
    new_tokens: int = 256,
    repeats: int = 3,
    eval_batches: int = 8,
    label: str = "the model",
    log: Callable[[str], None] = print,
    prompt: str = "ROMEO:",
) -> list[Row]:
    """What ``--quantize int8`` (:func:`core.quantize.quantize_int8`) does to a trained ``model`` (fp32, CPU):
    ``generate_b1_int8``, its sampling tokens/s at batch 1 against the same model in fp32 (ratio = speed-up;
    one warm-up each, then ``repeats`` alternating runs, medians), and ``val_loss_int8``, its mean loss on the
    first ``eval_batches`` sequential batches of ``val_tokens`` against fp32's (ratio = fp32 / int8, so just
    below 1 means a small loss increase; the note gives the change)."""
    from core.evaluation import mean_loss
    from core.quantize import quantize_int8
    from core.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    quantized = quantize_int8(model)

    def rate(which, n: int) -> float:
        return n / _sampling_seconds(which, tokenizer, prompt, 1, n)

    rate(quantized, 8), rate(model, 8)  # warm-up
    int8_rates, fp32_rates = [], []
    for repeat in range(repeats):
        int8_rates.append(rate(quantized, new_tokens))
        fp32_rates.append(rate(model, new_tokens))
        log(f"  repeat {repeat + 1}/{repeats}: int8 {int8_rates[-1]:.1f} tok/s, fp32 {fp32_rates[-1]:.1f}")
    B, T = INT8_EVAL_SHAPE[0], min(INT8_EVAL_SHAPE[1], model.config.block_size)
    eval_batches = max(1, min(eval_batches, (len(val_tokens) - 1) // (B * T)))
    int8_loss = mean_loss(quantized, val_tokens, B, T, max_batches=eval_batches)
    fp32_loss = mean_loss(model, val_tokens, B, T, max_batches=eval_batches)
    change = int8_loss - fp32_loss
    log(f"  validation loss over {eval_batches} × {B} × {T} tokens: int8 {int8_loss:.4f}, fp32 {fp32_loss:.4f}")
    return [
        higher_is_better(
            "generate_b1_int8",
            statistics.median(int8_rates),
            statistics.median(fp32_rates),
            "tokens/s",
            f"{label}: int8 vs fp32, 1 × {new_tokens} new tokens, temperature {SAMPLING['temperature']}, "
            f"top-k {SAMPLING['top_k']}",
        ),
        lower_is_better(
            "val_loss_int8",
            int8_loss,
            fp32_loss,
            "nats/token",
            f"{label}: int8 vs fp32 on {eval_batches * B * T:,} validation tokens, change {change:+.4f} "
            f"({100 * change / fp32_loss:+.2f}%)",
        ),
    ]


# -- the memorisation meter -----------------------------------------------------------------------------------------


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
