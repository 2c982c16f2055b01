"""Optimisation pieces the trainer and the estimate share: AdamW with decoupled weight decay on matrices only, the
OneCycle (or time-budget) schedule, autocast and TF32 per device, and the module a training step calls."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from core.budget import BudgetSchedule
from core.config import TrainConfig
from core.errors import UsageError
from core.lm_head import SharedRows
from core.model import GPT


def training_precision(asked: str, device: torch.device) -> str:
    """``fp32`` or ``bf16``: what a run asked for (``TrainConfig.precision``) on ``device``, ``auto`` resolved.

    ``auto`` is bf16 on CUDA and fp32 elsewhere. On a CPU, bf16 autocast speeds up the matmuls only where the CPU has
    bf16 units, and a CPU step is dominated by the fused fp32 LM-head loss: on a 2-core AVX-512 BF16 machine whose
    bf16 matmuls ran 3.5x fp32's, a step of the small preset ran 1.15x faster and one of the tiny preset no faster
    (``python -m pipelines.benchmark --only train_bf16`` measures it on yours). So a CPU run uses bf16 when asked
    to, and only where :func:`core.device.matmul_gflops` measures bf16 no slower than fp32 (without bf16 units it
    was measured hundreds of times slower): elsewhere the request is refused with the figures (:class:`UsageError`).
    """
    if asked == "fp32" or (asked == "auto" and device.type != "cuda"):
        return "fp32"
    if device.type == "cuda":
        return "bf16"
    if device.type != "cpu":
        raise UsageError(f"bf16 training runs on CUDA or a CPU with bf16 units, not {device.type}; use fp32")
    from core.device import matmul_gflops

    bf16, fp32 = matmul_gflops(torch.bfloat16), matmul_gflops(torch.float32)
    if bf16 < fp32:
        capability = torch.backends.cpu.get_cpu_capability()
        raise UsageError(
            f"bf16 matmuls run at {bf16:,.0f} GFLOP/s against {fp32:,.0f} for fp32 on this CPU ({capability}): bf16 "
            "training would be slower here; use --precision fp32 or auto"
        )
    return "bf16"


def autocast_for(device: torch.device, precision: str | None = None):
    """bf16 autocast when ``precision`` is bf16, or (``precision`` None) on CUDA; else a context that does nothing."""
    if precision == "bf16" or (precision is None and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def enable_tf32(device: torch.device) -> None:
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores; elsewhere do nothing.

    Most of a step already runs in bf16 under autocast; the fp32 matmuls that remain (outside autocast, or kept in
    fp32 by it) get several times faster for a precision loss training does not notice. The switches are global to
    the process, which is why this runs only for a CUDA trainer.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def training_module(model: GPT, compile: bool) -> Callable[..., tuple[torch.Tensor | None, torch.Tensor | None]]:
    """What training steps call: ``torch.compile(model)`` when ``compile`` is set, else ``model`` itself.

    The compiled wrapper shares ``model``'s parameters (it holds the module, not a copy), so the optimizer, the
    checkpoints and evaluation keep working on ``model``. Compilation happens lazily, on the first step.
    """
    return torch.compile(model) if compile else model


def build_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights only (matmuls and embeddings), none on biases and LayerNorms."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        # The fused kernel exists for CUDA and CPU: one pass over all parameters instead of a loop of small ops
        # per tensor (on the CPU, 11 ms instead of 100 ms a step for the small preset).
        fused=device.type in ("cuda", "cpu"),
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig
) -> torch.optim.lr_scheduler.OneCycleLR | torch.optim.lr_scheduler.LambdaLR:
    """OneCycle: warm up to ``lr`` over ``warmup_fraction`` of ``max_steps``, then cosine-anneal down. With a time
    budget, the same shape over a number of steps planned during the run (:class:`core.budget.BudgetSchedule`)."""
    if config.time_budget is not None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, BudgetSchedule(config.div_factor, config.final_div_factor))
    total_steps = config.max_steps + 1  # the schedule is stepped after every step, including the last
    pct_start = config.warmup_fraction
    if math.isclose(pct_start * total_steps, 1.0):
        # OneCycleLR divides by the warm-up's length in steps, pct_start · total_steps - 1, which is zero here
        # (e.g. 10% of --max-steps 9): make the warm-up half a step longer.
        pct_start = 1.5 / total_steps
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=config.div_factor,
        final_div_factor=config.final_div_factor,
        anneal_strategy="cos",
        cycle_momentum=False,  # keep AdamW's betas fixed
    )


class SharedRowsTraining(torch.nn.Module):
    """What training steps call with tied unused tokens: the GPT with its compact token rows (see
    :class:`core.lm_head.SharedRows`). A module of its own so that DDP and ``torch.compile`` see the rows as a
    parameter; the GPT's full embedding weight is frozen meanwhile and written from the rows when it is needed."""

    def __init__(self, model: GPT, token_rows: torch.nn.Parameter, shared_rows: SharedRows) -> None:
        super().__init__()
        self.model = model
        self.token_rows = token_rows
        self.shared_rows = shared_rows

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[None, torch.Tensor]:
        return self.model(idx, targets, shared_rows=self.shared_rows, token_rows=self.token_rows)
