"""How much data an epoch is and how long a training run will take, before starting it.

Contracts:

* Token and batch counts follow :class:`core.data.TokenBatches` exactly: with batch B and sequence T, one
  sequential pass over ``n`` training tokens is ``(n - 1) // (B·T)`` batches covering that many times B·T tokens.
* :func:`training_flops_per_token` is the usual analytic estimate (PaLM / nanoGPT convention, see its docstring).
* :func:`measure_step` runs real optimizer steps (forward, backward, gradient clipping and AdamW, with the trainer's
  autocast) on random token ids for the exact model and batch shape on the chosen device, and reports the median
  step time; under a time budget too small for that shape, it extrapolates from two smaller shapes instead (see
  its docstring). It is the only function here with a cost; it leaves the caller's random state untouched.
* :func:`estimate_training` is pure arithmetic over what it is given, except that it measures (as above) when it
  is given neither earlier runs' step times nor a step time. Preference: earlier comparable runs (their median),
  then a given step time, then its own measurement.

Times cover optimizer steps only, as the trainer's ``time_per_batch`` does: evaluation and periodic samples come
on top, and a run that reaches ``target_loss`` stops before ``max_steps``, so ``total_seconds`` is the time of a
run that goes all the way.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from core.architecture import breakdown_for_config
from core.config import DataConfig, ModelConfig, TrainConfig
from core.device import resolve_device
from core.model import GPT

# The trainer's own optimizer and autocast, so a measured step is the step training will run.
from core.optim import autocast_for, build_optimizer


@dataclass(frozen=True)
class TrainingEstimate:
    """Size and duration of a planned training run."""

    tokens_per_epoch: int
    """Training tokens one sequential pass covers: ``batches_per_epoch × tokens_per_step`` (the tail is dropped)."""
    batches_per_epoch: int
    """Batches in one sequential pass: ``(train_tokens - 1) // tokens_per_step`` (as ``TokenBatches``)."""
    tokens_per_step: int
    """Tokens per optimizer step: batch size × sequence length (B·T)."""
    train_tokens: int
    """Tokens in the training split."""
    steps: int
    """Optimizer steps planned (``max_steps``)."""
    epochs: float
    """Passes over the training split the planned steps make: ``steps × tokens_per_step / train_tokens``."""
    seconds_per_step: float
    """Wall time of one optimizer step on ``device``."""
    total_seconds: float
    """``steps × seconds_per_step``: the optimizer steps of a run that reaches ``max_steps``, without evaluation."""
    flops_per_token: float
    """Training FLOPs per token (see :func:`training_flops_per_token`)."""
    device: str
    """Device the step time is for, e.g. ``cpu`` or ``cuda``."""
    method: str
    """How ``seconds_per_step`` was obtained, e.g. ``measured: 2 steps at batch 16 on cpu`` or ``from 3 earlier
    runs (median)``."""

    @property
    def tokens_per_second(self) -> float:
        """Training throughput the estimate assumes."""
        return self.tokens_per_step / self.seconds_per_step

    def to_dict(self) -> dict:
        """Plain dict of all fields (JSON-serialisable)."""
        return asdict(self)


@dataclass(frozen=True)
class StepMeasurement:
    """The outcome of :func:`measure_step`."""

    seconds: float
    """Seconds per optimizer step at the requested shape: the median of the timed steps, or when ``extrapolated``
    the estimate :func:`measure_step` derives from the two smaller shapes."""
    batch_size: int
    """Batch size the result is for."""
    block_size: int
    """Sequence length the result is for."""
    shapes: tuple[tuple[int, int], ...]
    """(batch, sequence) shapes actually timed, smallest first: the requested one alone, or two smaller ones that
    a time budget forced and that the result is extrapolated from."""
    steps: int
    """Timed steps at the largest shape (warm-up steps not counted)."""
    device: str
    """Device the steps ran on."""

    @property
    def extrapolated(self) -> bool:
        """Whether ``seconds`` was extrapolated from smaller shapes."""
        return self.shapes[-1] != (self.batch_size, self.block_size)

    def describe(self) -> str:
        """A short phrase for ``TrainingEstimate.method``, e.g. ``measured: 2 steps of 16×128 tokens on cpu``."""
        plural = "s" if self.steps != 1 else ""
        shapes = " and ".join(f"{b}×{t}" for b, t in self.shapes)
        text = f"measured: {self.steps} step{plural} of {shapes} tokens"
        if self.extrapolated:
            text += f", extrapolated to {self.batch_size}×{self.block_size} by FLOPs"
        return f"{text} on {self.device}"


def _positive_int(name: str, value: object, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _positive_seconds(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value!r}")
    return float(value)


def _check_block_size(model_config: ModelConfig, block_size: int) -> None:
    _positive_int("block_size", block_size)
    if block_size > model_config.block_size:
        raise ValueError(
            f"block_size {block_size} exceeds the model's context of {model_config.block_size}; use at most that"
        )


def training_flops_per_token(config: ModelConfig, block_size: int) -> float:
    """Training FLOPs (forward + backward) per token for sequences of ``block_size`` tokens.

    ``6·N + 12·L·T·d`` (the PaLM paper's appendix B convention, as in nanoGPT's MFU estimate): N counts the
    parameters every token multiplies through, that is all parameters except the embeddings, plus the LM head's
    ``d × V`` matmul (its weight is tied to the token embedding, and with GPT-2's 50,257-token vocabulary it
    dominates small models); a forward pass costs 2 FLOPs per such parameter and the backward pass twice that.
    The attention term counts ``Q·Kᵀ`` and ``A·V`` at 2·T·d each per layer, forward, without discounting the causal
    mask (Kaplan et al. halve it, giving ``6·L·T·d``). Biases and LayerNorms are in N; the softmax is not counted.
    """
    _check_block_size(config, block_size)
    breakdown = breakdown_for_config(config)
    by_group = {row["group"]: row["params"] for row in breakdown["components"]}
    embeddings = by_group["token_embedding"] + by_group["position_embedding"]
    lm_head_matmul = config.n_embd * config.vocab_size
    n = breakdown["total_params"] - embeddings + lm_head_matmul
    return float(6 * n + 12 * config.n_layer * block_size * config.n_embd)


def _as_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


def _step_flops(config: ModelConfig, batch_size: int, block_size: int) -> float:
    return batch_size * block_size * training_flops_per_token(config, block_size)


PROBE_BLOCK_SIZE = 64
"""Longest sequence of the batch-1 warm-up and probe steps that a time budget starts with."""


def measure_step(
    model_config: ModelConfig,
    batch_size: int,
    block_size: int,
    device: str | torch.device = "auto",
    steps: int = 2,
    warmup: int = 1,
    time_budget: float | None = None,
) -> StepMeasurement:
    """Time real training steps of ``model_config`` at batch ``batch_size`` × ``block_size`` tokens on ``device``.

    Each step is what the trainer runs: forward with the trainer's autocast (bf16 on CUDA, fp32 elsewhere), cross
    entropy, backward, gradient-norm clipping, fused AdamW, on random token ids. ``warmup`` untimed steps
    come first (the first step allocates the optimizer state and warms allocators); the result is the median of
    ``steps`` timed ones.

    ``time_budget`` (seconds, optional) caps the cost for models too slow to time at full size (gpt2 at 2×1024
    tokens takes 10 to 20 s a step on a small CPU). Steps first run at a probe shape, batch 1 of at most
    :data:`PROBE_BLOCK_SIZE` tokens (one warm-up, then ``steps`` timed); then at the largest shape predicted to fit
    in what is left of the budget: the full shape (whose median is then the result), else a smaller batch, else
    batch 1 with a halved, quartered... sequence. When the full shape did not fit, the step time is extrapolated
    along the straight line through the two measured (training FLOPs per step, seconds) points, each shape's
    fastest step, from the larger one: a step has a large fixed part (the optimizer update, the dense gradient of
    the 50,257-row embedding, kernel launches) plus a part that grows with the FLOPs
    (:func:`training_flops_per_token`). The approximation: the growing part is taken as linear in FLOPs, which a
    device that is underused at small shapes (a GPU above all) makes err on the slow side, and fastest steps make
    it err on the fast side on a busy machine; expect it within a factor of about 2 on a busy CPU. The budget is a
    soft cap: building the model, the probe steps and one step at a second shape always run. A shape of batch 1
    and at most ``PROBE_BLOCK_SIZE`` tokens is always measured as it is, budget or not.
    """
    _positive_int("batch_size", batch_size)
    _check_block_size(model_config, block_size)
    _positive_int("steps", steps)
    _positive_int("warmup", warmup, minimum=0)
    if time_budget is not None:
        time_budget = _positive_seconds("time_budget", time_budget)
    target = _as_device(device)
    started = time.perf_counter()
    full = (batch_size, block_size)
    # Seeded model and data inside a forked RNG: measuring must not change the caller's random streams.
    cuda_devices = [target.index or 0] if target.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(0)
        model = GPT(model_config).to(target)
        model.train()
        optimizer = build_optimizer(model, TrainConfig(), target)
        grad_clip = TrainConfig().grad_clip

        def one_step(shape: tuple[int, int]) -> float:
            x = torch.randint(model_config.vocab_size, shape, device=target)
            y = torch.randint(model_config.vocab_size, shape, device=target)
            begun = time.perf_counter()
            with autocast_for(target):
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # waits for the device, so the time is the work's, not the launches'
            if target.type == "cuda":
                torch.cuda.synchronize(target)
            return time.perf_counter() - begun

        def time_steps(shape: tuple[int, int], warm: int, timed: int) -> list[float]:
            for _ in range(warm):
                one_step(shape)
            return [one_step(shape) for _ in range(timed)]

        probe = (1, min(block_size, PROBE_BLOCK_SIZE))
        if time_budget is None or probe == full:
            seconds = statistics.median(time_steps(full, warmup, steps))
            return StepMeasurement(seconds, batch_size, block_size, (full,), steps, str(target))

        probe_times = time_steps(probe, 1, steps)
        probe_flops = _step_flops(model_config, *probe)
        left = time_budget - (time.perf_counter() - started)
        # Candidates above the probe, largest first: the full batch, smaller batches, then batch 1 with halved
        # sequences. Costs are predicted in proportion to FLOPs, which overstates larger shapes: a safe choice.
        candidates = [(b, block_size) for b in range(batch_size, 0, -1)]
        length = block_size // 2
        while length > probe[1]:
            candidates.append((1, length))
            length //= 2
        candidates = [shape for shape in candidates if shape != probe]

        def flops_ratio(shape: tuple[int, int]) -> float:
            return _step_flops(model_config, *shape) / probe_flops

        chosen = next(
            (shape for shape in candidates if (warmup + steps) * min(probe_times) * flops_ratio(shape) <= left), None
        )
        if chosen is not None:
            second, second_times = chosen, time_steps(chosen, warmup, steps)
        else:
            # Nothing fits: one step at a shape of about 4× the probe's FLOPs (closer points make a noisier slope).
            second = next((shape for shape in reversed(candidates) if flops_ratio(shape) >= 4), candidates[0])
            second_times = time_steps(second, 0, 1)
    if second == full:
        seconds = statistics.median(second_times)
        return StepMeasurement(seconds, batch_size, block_size, (probe, full), len(second_times), str(target))
    second_flops = _step_flops(model_config, *second)
    # Extrapolate from each shape's fastest step: background load only ever adds time, and one slow step among
    # two would swing a slope fitted across a 10× range of work. Time never falls with work: the slope is >= 0.
    slope = max((min(second_times) - min(probe_times)) / (second_flops - probe_flops), 0.0)
    seconds = min(second_times) + slope * (_step_flops(model_config, *full) - second_flops)
    return StepMeasurement(seconds, batch_size, block_size, (probe, second), len(second_times), str(target))


def measure_step_seconds(
    model_config: ModelConfig,
    batch_size: int,
    block_size: int,
    device: str | torch.device = "auto",
    steps: int = 2,
    warmup: int = 1,
    time_budget: float | None = None,
) -> float:
    """Median seconds per training step, as measured by :func:`measure_step` (same arguments)."""
    return measure_step(model_config, batch_size, block_size, device, steps, warmup, time_budget).seconds


def estimate_training(
    model_config: ModelConfig,
    data_config: DataConfig,
    train_config: TrainConfig,
    *,
    train_tokens: int,
    step_seconds: float | None = None,
    history_step_seconds: list[float] | None = None,
    device: str | torch.device = "auto",
    time_budget: float | None = 10.0,
) -> TrainingEstimate:
    """Tokens per epoch, epochs, and time for ``train_config.max_steps`` steps of this model and batch.

    The step time comes from, in order of preference: ``history_step_seconds`` when not empty (the
    ``time_per_batch`` of earlier comparable runs, same model, batch and device; their median), ``step_seconds``
    (a measurement the caller already has), or a measurement of its own via :func:`measure_step` with
    ``time_budget`` seconds. Only that last case costs anything. ``train_tokens`` is the size of the training
    split; it must hold one batch (B·T + 1 tokens in sequential order, T + 1 in random order, as ``TokenBatches``
    requires). Raises ``ValueError`` for invalid input.
    """
    _positive_int("train_tokens", train_tokens)
    B, T = data_config.batch_size, data_config.block_size
    _check_block_size(model_config, T)
    tokens_per_step = B * T
    needed = tokens_per_step + 1 if data_config.order == "sequential" else T + 1
    if train_tokens < needed:
        raise ValueError(
            f"the training split has {train_tokens:,} tokens, too few for batch_size={B} × block_size={T} "
            f"({needed:,} needed); use a smaller batch or block size or a longer corpus"
        )
    batches_per_epoch = (train_tokens - 1) // tokens_per_step  # as TokenBatches.batches_per_epoch
    target = _as_device(device)

    if history_step_seconds:
        values = [_positive_seconds("history_step_seconds entry", v) for v in history_step_seconds]
        seconds = statistics.median(values)
        method = f"from {len(values)} earlier run{'s' if len(values) != 1 else ''} (median)"
    elif step_seconds is not None:
        seconds = _positive_seconds("step_seconds", step_seconds)
        method = "given step time"
    else:
        measurement = measure_step(model_config, B, T, target, time_budget=time_budget)
        seconds, method = measurement.seconds, measurement.describe()

    steps = train_config.max_steps
    return TrainingEstimate(
        tokens_per_epoch=batches_per_epoch * tokens_per_step,
        batches_per_epoch=batches_per_epoch,
        tokens_per_step=tokens_per_step,
        train_tokens=train_tokens,
        steps=steps,
        epochs=steps * tokens_per_step / train_tokens,
        seconds_per_step=seconds,
        total_seconds=steps * seconds,
        flops_per_token=training_flops_per_token(model_config, T),
        device=str(target),
        method=method,
    )
