"""Held-out loss, written once: the trainer's periodic evaluation, the quantisation check and the benchmarks all
measure a model with :func:`mean_loss`, and turn it into bits per character with :func:`bits_per_char`."""

from __future__ import annotations

import math

import numpy as np
import torch

from core.data import epoch_batches
from core.distributed import SINGLE, DistContext, all_reduce_sum
from core.model import GPT
from core.optim import autocast_for


@torch.no_grad()
def mean_loss(
    model: GPT,
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    *,
    max_batches: int | None = None,
    device: torch.device | None = None,
    dist: DistContext = SINGLE,
    **forward_kwargs,
) -> float:
    """Mean cross-entropy per token of ``model`` over the sequential (batch_size, block_size) batches of ``tokens``
    (the first ``max_batches`` of them, or all), in eval mode, restoring the model's mode afterwards.

    Batches go to ``device`` (default: the model's) under its autocast. In a torchrun job (``dist``) each process
    evaluates every world_size-th batch and the sums are reduced, so every rank returns the same value.
    ``forward_kwargs`` go to the model's forward (e.g. the shared rows of tied unused tokens). Raises ValueError when
    ``tokens`` holds less than one batch.
    """
    if len(tokens) <= batch_size * block_size:
        raise ValueError(f"{len(tokens)} tokens are fewer than one batch of {batch_size} × {block_size} + 1")
    if device is None:  # the model's own device (a quantized model may hold only buffers)
        device = next(iter([*model.parameters(), *model.buffers()]), torch.empty(0)).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, (x, y) in enumerate(epoch_batches(tokens, batch_size, block_size)):
            if max_batches is not None and i >= max_batches:
                break
            if i % dist.world_size != dist.rank:
                continue
            with autocast_for(device):
                _, loss = model(x.to(device), y.to(device), **forward_kwargs)
            total += loss.item() * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    total, count = all_reduce_sum([total, count], dist)
    return total / count


def bits_per_char(loss_per_token: float, tokens: int, characters: int) -> float:
    """Bits per character of a text of ``tokens`` tokens and ``characters`` characters whose mean loss per token is
    ``loss_per_token`` nats: comparable across tokenisers (BPE here, characters in nanoGPT's reference)."""
    return loss_per_token * tokens / characters / math.log(2)
