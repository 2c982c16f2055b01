"""Speed rows: generation, training, first token and int8 decoding against transformers (or fp32), same weights."""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import ModelConfig, SampleConfig, TrainConfig
from pipelines.benchmarks.rows import BENCH_SEED, SAMPLING, Row, higher_is_better, lower_is_better

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
    precision: str = "int8",
) -> list[Row]:
    """What ``--quantize <precision>`` (:func:`core.quantize.quantize`) does to a trained ``model`` (fp32, CPU):
    ``generate_b1_<precision>``, its sampling tokens/s at batch 1 against the same model in fp32 (ratio = speed-up;
    one warm-up each, then ``repeats`` alternating runs, medians), and ``val_loss_<precision>``, its mean loss on the
    first ``eval_batches`` sequential batches of ``val_tokens`` against fp32's (ratio = fp32 / quantized, so just
    below 1 means a small loss increase; the note gives the change)."""
    from core.evaluation import mean_loss
    from core.quantize import quantize
    from core.tokenizer import get_tokenizer

    tokenizer = get_tokenizer()
    quantized = quantize(model, precision)

    def rate(which, n: int) -> float:
        return n / _sampling_seconds(which, tokenizer, prompt, 1, n)

    rate(quantized, 8), rate(model, 8)  # warm-up
    quantized_rates, fp32_rates = [], []
    for repeat in range(repeats):
        quantized_rates.append(rate(quantized, new_tokens))
        fp32_rates.append(rate(model, new_tokens))
        log(f"  repeat {repeat + 1}/{repeats}: {precision} {quantized_rates[-1]:.1f} tok/s, fp32 {fp32_rates[-1]:.1f}")
    B, T = INT8_EVAL_SHAPE[0], min(INT8_EVAL_SHAPE[1], model.config.block_size)
    eval_batches = max(1, min(eval_batches, (len(val_tokens) - 1) // (B * T)))
    quantized_loss = mean_loss(quantized, val_tokens, B, T, max_batches=eval_batches)
    fp32_loss = mean_loss(model, val_tokens, B, T, max_batches=eval_batches)
    change = quantized_loss - fp32_loss
    log(
        f"  validation loss over {eval_batches} × {B} × {T} tokens: {precision} {quantized_loss:.4f}, "
        f"fp32 {fp32_loss:.4f}"
    )
    spread = (
        f"ranges {min(quantized_rates):.1f}–{max(quantized_rates):.1f} vs {min(fp32_rates):.1f}–{max(fp32_rates):.1f}"
    )
    return [
        higher_is_better(
            f"generate_b1_{precision}",
            statistics.median(quantized_rates),
            statistics.median(fp32_rates),
            "tokens/s",
            f"{label}: {precision} vs fp32, 1 × {new_tokens} new tokens, temperature {SAMPLING['temperature']}, "
            f"top-k {SAMPLING['top_k']}; {spread}",
        ),
        lower_is_better(
            f"val_loss_{precision}",
            quantized_loss,
            fp32_loss,
            "nats/token",
            f"{label}: {precision} vs fp32 on {eval_batches * B * T:,} validation tokens, change {change:+.4f} "
            f"({100 * change / fp32_loss:+.2f}%)",
        ),
    ]


# -- the memorisation meter -----------------------------------------------------------------------------------------


# -- bf16 autocast training on a CPU ---------------------------------------------------------------------------------


def bf16_training(
    preset: str = "small", steps: int = 6, repeats: int = 3, log: Callable[[str], None] = print
) -> list[Row]:
    """bf16 autocast training on this CPU against fp32: ``train_bf16``, training tokens/s of ``preset`` at B×T =
    8×256 (median step times of ``repeats`` alternating runs of ``steps`` steps, the first of each untimed), and
    ``train_bf16_loss``, the largest relative gap between the two loss curves over those steps from the same
    initial weights and batches (ratio = 1 / (1 + gap)). Empty, with the reason logged, where this CPU runs bf16
    slower than fp32 (:func:`core.optim.training_precision` refuses it there)."""
    from core.errors import UsageError
    from core.optim import autocast_for, build_optimizer, training_precision

    cpu = torch.device("cpu")
    try:
        training_precision("bf16", cpu)
    except UsageError as exc:
        log(f"  no rows: {exc}")
        return []
    config = TRAIN_CONFIGS[preset]
    B, T = TRAIN_SHAPE
    batches = torch.randint(0, config.vocab_size, (steps, B, T), generator=torch.Generator().manual_seed(BENCH_SEED))

    def run(precision: str) -> tuple[float, list[float]]:
        model = _seeded_gpt(config).train()
        optimizer = build_optimizer(model, TrainConfig(), cpu)
        times, losses = [], []
        for x in batches:
            started = time.perf_counter()
            with autocast_for(cpu, precision):
                _, loss = model(x, x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
            losses.append(loss.item())
        return B * T / statistics.median(times[1:]), losses

    rates: dict[str, list[float]] = {"bf16": [], "fp32": []}
    curves: dict[str, list[float]] = {}
    for repeat in range(repeats):
        for precision in ("bf16", "fp32"):
            rate, curves[precision] = run(precision)
            rates[precision].append(rate)
        log(f"  repeat {repeat + 1}/{repeats}: bf16 {rates['bf16'][-1]:.0f} tok/s, fp32 {rates['fp32'][-1]:.0f}")
    gap = max(abs(b - f) / f for b, f in zip(curves["bf16"], curves["fp32"], strict=True))
    shape = _shape(config)
    return [
        higher_is_better(
            "train_bf16",
            statistics.median(rates["bf16"]),
            statistics.median(rates["fp32"]),
            "tokens/s",
            f"{shape} at {B}×{T}, bf16 autocast vs fp32 on this CPU; ranges "
            f"{min(rates['bf16']):.0f}–{max(rates['bf16']):.0f} vs {min(rates['fp32']):.0f}–{max(rates['fp32']):.0f}",
        ),
        Row(
            "train_bf16_loss",
            curves["bf16"][-1],
            curves["fp32"][-1],
            "nats/token",
            1 / (1 + gap),
            f"{shape}: loss after {steps} steps from the same weights and batches; largest gap over the curve "
            f"{100 * gap:.2f}%",
        ),
    ]
