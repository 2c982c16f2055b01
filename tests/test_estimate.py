"""Tokens per epoch, the FLOPs formula, step-time measurement and the training estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import core.estimate as estimate_module
from core.config import DataConfig, ModelConfig, TrainConfig
from core.data import TokenBatches
from core.estimate import (
    PROBE_BLOCK_SIZE,
    TrainingEstimate,
    estimate_training,
    measure_step,
    measure_step_seconds,
    training_flops_per_token,
)

MICRO = ModelConfig(n_layer=1, n_head=1, n_embd=32, block_size=32)
"""The smallest useful model with the real vocabulary: a step takes milliseconds."""


def _data(batch_size: int, block_size: int, order: str = "sequential") -> DataConfig:
    return DataConfig(source="unused.txt", batch_size=batch_size, block_size=block_size, order=order)


def _no_measuring(*args, **kwargs):
    raise AssertionError("estimate_training measured although it had a step time")


def test_flops_per_token_matches_a_hand_computation():
    config = ModelConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_embd=32)
    # Per block: attention 32·96+96 + 32·32+32 = 4,224; MLP 32·128+128 + 128·32+32 = 8,352; two LayerNorms 128.
    # Two blocks 25,408 + ln_f 64 = 25,472 non-embedding; the LM head matmul adds 32·100 = 3,200: N = 28,672.
    # 6·N = 172,032; attention 12·L·T·d = 12·2·16·32 = 12,288.
    assert training_flops_per_token(config, 16) == 172_032 + 12_288
    assert training_flops_per_token(config, 8) == 172_032 + 6_144  # the attention term follows the sequence length


def test_flops_per_token_for_gpt2_is_in_the_known_range():
    # nanoGPT's figure for GPT-2 small at T=1024: 6·(124.4M - 0.8M wpe) + 12·12·1024·768 ≈ 8.5e8.
    flops = training_flops_per_token(ModelConfig.from_preset("gpt2"), 1024)
    assert flops == 6 * (124_439_808 - 786_432) + 12 * 12 * 1024 * 768


@pytest.mark.parametrize(("batch_size", "block_size", "n_tokens"), [(2, 8, 1_000), (4, 16, 64 + 1), (3, 5, 777)])
def test_tokens_and_batches_per_epoch_follow_token_batches(batch_size, block_size, n_tokens):
    tokens = np.arange(n_tokens, dtype=np.uint16)
    batches = TokenBatches(tokens, batch_size, block_size)
    result = estimate_training(
        ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=16),
        _data(batch_size, block_size),
        TrainConfig(max_steps=50),
        train_tokens=n_tokens,
        step_seconds=0.5,
        device="cpu",
    )
    assert result.batches_per_epoch == batches.batches_per_epoch
    # One pass of next_batch() calls covers exactly tokens_per_epoch tokens, then wraps to the start.
    seen = 0
    for _ in range(batches.batches_per_epoch):
        x, _ = batches.next_batch()
        seen += x.numel()
    assert batches.position == 0 and seen == result.tokens_per_epoch
    assert result.tokens_per_step == batch_size * block_size
    assert result.epochs == pytest.approx(50 * batch_size * block_size / n_tokens)
    assert result.seconds_per_step == 0.5 and result.total_seconds == pytest.approx(25.0)
    assert result.method == "given step time" and result.device == "cpu"


def test_history_beats_a_given_step_time_and_no_measurement_runs(monkeypatch):
    monkeypatch.setattr(estimate_module, "measure_step", _no_measuring)
    result = estimate_training(
        MICRO,
        _data(2, 32),
        TrainConfig(max_steps=1_000),
        train_tokens=10_000,
        step_seconds=9.0,
        history_step_seconds=[0.3, 0.1, 0.2],
        device="cpu",
    )
    assert result.seconds_per_step == pytest.approx(0.2)
    assert result.total_seconds == pytest.approx(200.0)
    assert result.method == "from 3 earlier runs (median)"
    assert result.tokens_per_second == pytest.approx(64 / 0.2)
    assert isinstance(result, TrainingEstimate) and result.to_dict()["steps"] == 1_000


def test_without_history_or_step_time_it_measures(monkeypatch):
    calls = []

    def fake_measure(model_config, batch_size, block_size, device, time_budget=None):
        calls.append((batch_size, block_size, str(device), time_budget))
        shapes = ((1, block_size), (2, block_size))
        return estimate_module.StepMeasurement(0.25, batch_size, block_size, shapes, 2, str(device))

    monkeypatch.setattr(estimate_module, "measure_step", fake_measure)
    result = estimate_training(
        MICRO, _data(4, 16), TrainConfig(max_steps=8), train_tokens=500, history_step_seconds=[], device="cpu"
    )
    assert calls == [(4, 16, "cpu", 10.0)]
    assert result.seconds_per_step == 0.25 and result.total_seconds == 2.0
    assert result.method == "measured: 2 steps of 1×16 and 2×16 tokens, extrapolated to 4×16 by FLOPs on cpu"


def test_estimate_training_measures_for_real_when_given_nothing():
    result = estimate_training(MICRO, _data(2, 32), TrainConfig(max_steps=10), train_tokens=1_000, device="cpu")
    assert result.method.startswith("measured: ") and result.method.endswith(" on cpu")
    assert "2×32 tokens" in result.method  # the full shape fits the default budget: no extrapolation
    assert math.isfinite(result.seconds_per_step) and result.seconds_per_step > 0
    assert result.total_seconds == pytest.approx(10 * result.seconds_per_step)
    assert result.flops_per_token == training_flops_per_token(MICRO, 32)


def test_measure_step_seconds_runs_real_steps_quickly():
    state = torch.random.get_rng_state()
    seconds = measure_step_seconds(MICRO, batch_size=2, block_size=32, device="cpu", steps=2, warmup=1)
    assert math.isfinite(seconds) and 0 < seconds < 5
    assert torch.equal(torch.random.get_rng_state(), state), "measuring changed the caller's random state"


def test_a_tight_budget_extrapolates_from_two_smaller_batches():
    result = measure_step(MICRO, batch_size=8, block_size=32, device="cpu", steps=2, warmup=1, time_budget=1e-6)
    # Nothing fits a budget of a microsecond: the probe, then one step at the first batch of 4× its FLOPs.
    assert result.shapes == ((1, 32), (4, 32)) and result.extrapolated and result.steps == 1
    assert math.isfinite(result.seconds) and result.seconds > 0
    assert result.describe() == "measured: 1 step of 1×32 and 4×32 tokens, extrapolated to 8×32 by FLOPs on cpu"


def test_a_tight_budget_shortens_a_long_sequence():
    config = ModelConfig(n_layer=1, n_head=1, n_embd=16, block_size=512)
    result = measure_step(config, batch_size=2, block_size=512, device="cpu", time_budget=1e-6)
    assert result.shapes == ((1, PROBE_BLOCK_SIZE), (1, 256)) and result.extrapolated
    assert math.isfinite(result.seconds) and result.seconds > 0


def test_a_generous_budget_measures_the_full_shape():
    result = measure_step(MICRO, batch_size=2, block_size=16, device="cpu", steps=1, warmup=0, time_budget=600)
    assert result.shapes == ((1, 16), (2, 16)) and not result.extrapolated and result.steps == 1
    assert result.describe() == "measured: 1 step of 1×16 and 2×16 tokens on cpu"


def test_the_probe_shape_itself_is_measured_as_it_is():
    result = measure_step(MICRO, batch_size=1, block_size=32, device="cpu", steps=1, warmup=0, time_budget=1e-6)
    assert result.shapes == ((1, 32),) and not result.extrapolated
    assert result.describe() == "measured: 1 step of 1×32 tokens on cpu"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"warmup": -1}, "warmup must be an integer >= 0"),
        ({"time_budget": -1.0}, "time_budget must be a finite number of seconds > 0"),
        ({"time_budget": 0}, "time_budget must be a finite number of seconds > 0"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"block_size": 64}, "exceeds the model's context of 32"),
    ],
)
def test_measure_step_refuses_bad_input(kwargs, message):
    arguments = {"batch_size": 2, "block_size": 32, "device": "cpu", **kwargs}
    with pytest.raises(ValueError, match=message):
        measure_step(MICRO, **arguments)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"train_tokens": 64}, "too few for batch_size=2 × block_size=32"),
        ({"train_tokens": 0}, "train_tokens must be an integer >= 1"),
        ({"step_seconds": 0.0}, "step_seconds must be a finite number of seconds > 0"),
        ({"step_seconds": math.nan}, "step_seconds must be a finite number of seconds > 0"),
        ({"history_step_seconds": [0.1, -0.2]}, "history_step_seconds entry must be a finite number"),
    ],
)
def test_estimate_training_refuses_bad_input(kwargs, message):
    arguments = {"train_tokens": 10_000, "step_seconds": 0.1, "device": "cpu", **kwargs}
    with pytest.raises(ValueError, match=message):
        estimate_training(MICRO, _data(2, 32), TrainConfig(), **arguments)


def test_estimate_refuses_a_sequence_longer_than_the_context():
    with pytest.raises(ValueError, match="exceeds the model's context"):
        estimate_training(MICRO, _data(1, 64), TrainConfig(), train_tokens=10_000, step_seconds=0.1, device="cpu")


def test_training_flops_refuses_a_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        training_flops_per_token(MICRO, 0)
