"""The parts of the resumable training state: each one's pickle-free state_dict/load_state_dict round trip, and a
state that does not fit refused without changing anything (the whole checkpoint is tested in test_trainer.py)."""

from __future__ import annotations

import json
import math
import random
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from core.checkpoint import CheckpointError
from core.model import GPT
from core.train_state import BatchPosition, LoopState, OptimizerState, RandomStates, ScheduleState
from tests.conftest import TINY

WHERE = Path("step-00000003")


def trained_optimizer(seed: int = 0) -> tuple[GPT, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = GPT(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, TINY.vocab_size, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    optimizer.step()
    return model, optimizer


def names_of(model: GPT) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def test_the_optimizer_state_goes_by_parameter_name_and_comes_back_whole():
    model, optimizer = trained_optimizer()
    values, tensors = OptimizerState(optimizer, names_of(model)).state_dict()
    json.dumps(values)  # the values are plain JSON
    assert "exp_avg/transformer.h.0.attn.c_attn.weight" in tensors

    fresh_model, fresh = trained_optimizer(seed=1)
    OptimizerState(fresh, names_of(fresh_model)).load_state_dict((values, tensors), WHERE)
    for parameter, name in ((p, n) for n, p in fresh_model.named_parameters()):
        torch.testing.assert_close(fresh.state[parameter]["exp_avg"], tensors[f"exp_avg/{name}"])


def test_an_optimizer_state_of_another_shape_is_refused_and_changes_nothing():
    model, optimizer = trained_optimizer()
    values, tensors = OptimizerState(optimizer, names_of(model)).state_dict()
    key = "exp_avg/transformer.h.0.attn.c_attn.weight"
    bad = {**tensors, key: torch.zeros(3, 3)}
    fresh_model, fresh = trained_optimizer(seed=1)
    before = {k: v.clone() for k, v in fresh.state[fresh_model.transformer.h[0].attn.c_attn.weight].items()}
    with pytest.raises(CheckpointError, match="wrong shape"):
        OptimizerState(fresh, names_of(fresh_model)).load_state_dict((values, bad), WHERE)
    after = fresh.state[fresh_model.transformer.h[0].attn.c_attn.weight]
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(CheckpointError, match="unknown parameters"):
        OptimizerState(fresh, names_of(fresh_model)).load_state_dict((values, {**tensors, "exp_avg/nope": 1}), WHERE)


def test_the_random_states_replay_every_generator():
    generator = torch.Generator().manual_seed(5)
    part = RandomStates(generator, torch.device("cpu"))
    state = part.state_dict()
    json.dumps(state[0])

    def draws():
        return (torch.rand(3).tolist(), torch.rand(2, generator=generator).tolist(), np.random.rand(), random.random())

    first = draws()
    part.load_state_dict(state, WHERE)
    assert draws() == first


def test_the_loop_state_round_trips_and_its_best_weights_must_fit_the_model(tiny_model):
    best = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    loop = LoopState(window=deque([3.0, 2.5], maxlen=4), step=9, best_loss=2.5, best_val=3.1, best_val_step=8)
    loop.best_state, loop.last_eval, loop.budget_used = best, {"val_loss": 3.1}, 12.5
    values, tensors = loop.state_dict()
    json.dumps(values)
    back = LoopState.from_state_dict((values, tensors), step=9, avg_window=4, model=tiny_model, where=WHERE)
    assert (back.step, list(back.window), back.best_val_step, back.budget_used) == (9, [3.0, 2.5], 8, 12.5)
    assert back.window.maxlen == 4 and math.isnan(back.loss_value)
    torch.testing.assert_close(
        back.best_state["transformer.h.0.mlp.c_fc.weight"], best["transformer.h.0.mlp.c_fc.weight"]
    )
    with pytest.raises(CheckpointError, match="does not match the model"):
        wrong = {**tensors, "transformer.wte.weight": torch.zeros(2, 2)}
        LoopState.from_state_dict((values, wrong), step=9, avg_window=4, model=tiny_model, where=WHERE)
    with pytest.raises(CheckpointError, match="disagree"):
        LoopState.from_state_dict((values, {}), step=9, avg_window=4, model=tiny_model, where=WHERE)


def test_a_batch_position_outside_the_corpus_and_a_schedule_without_a_step_are_refused():
    batches = SimpleNamespace(tokens=np.zeros(100, dtype=np.uint16), position=7)
    part = BatchPosition(batches)
    assert part.state_dict() == ({"position": 7}, {})
    part.load_state_dict(({"position": 42}, {}), WHERE)
    assert batches.position == 42
    with pytest.raises(CheckpointError, match="outside the corpus"):
        part.load_state_dict(({"position": 100}, {}), WHERE)
    assert batches.position == 42

    _, optimizer = trained_optimizer()
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=10)
    values, _ = ScheduleState(schedule).state_dict()
    with pytest.raises(CheckpointError, match="no step"):
        ScheduleState(schedule).load_state_dict(({k: v for k, v in values.items() if k != "last_epoch"}, {}), WHERE)
