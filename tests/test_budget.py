"""Time-budget training: the schedule, the planner, and the trainer spending a budget on a simulated clock.

The trainer's clock is replaced by a virtual one that advances by a fixed cost whenever a step, an evaluation or a
sample runs, so these tests check the planning itself, exactly and fast, whatever the machine is doing. The real
wall-clock behaviour is a benchmark row (``python -m pipelines.benchmark --only quality``).
"""

from __future__ import annotations

import math

import pytest
import torch

from core.budget import PERIODIC_EVENTS, BudgetPlanner, BudgetSchedule, Overheads, periodic_due
from core.callbacks import Callback
from core.config import DataConfig, ModelConfig, TrainConfig
from core.trainer import Trainer

MODEL = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16)


# -- the schedule ------------------------------------------------------------------------------------------------


def test_the_schedule_starts_low_warms_up_then_decays_exactly_to_its_final_rate():
    schedule = BudgetSchedule(div_factor=25, final_div_factor=1e4)
    assert schedule(0) == pytest.approx(1 / 25)  # the probe runs at the starting rate, before any plan
    schedule.plan(100, warmup_fraction=0.1)
    values = [schedule(i) for i in range(100)]
    assert values[0] == pytest.approx(1 / 25)
    assert values[10] == pytest.approx(1.0)  # the end of the warm-up is the peak
    assert all(a < b for a, b in zip(values[:10], values[1:11], strict=True))  # rising
    assert all(a > b for a, b in zip(values[10:], values[11:], strict=False))  # falling
    assert values[99] == pytest.approx(1 / 25 / 1e4)  # the last step runs at the final rate


def test_replanning_keeps_the_warm_up_and_moves_the_end_of_the_decay():
    schedule = BudgetSchedule(div_factor=10, final_div_factor=100)
    schedule.plan(200, warmup_fraction=0.1)
    schedule.plan(120, warmup_fraction=0.1)  # the machine slowed down
    assert (schedule.warmup, schedule.total) == (20, 120)
    assert schedule(119) == pytest.approx(1 / 10 / 100)
    schedule.plan(5, warmup_fraction=0.1)  # never shorter than the warm-up plus one step
    assert schedule.total == 21


def test_the_schedule_state_is_plain_numbers_so_it_survives_a_json_checkpoint():
    import json

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, BudgetSchedule(25, 1e4))
    scheduler.lr_lambdas[0].plan(50, 0.1)
    state = json.loads(json.dumps(scheduler.state_dict()))
    fresh = torch.optim.lr_scheduler.LambdaLR(torch.optim.AdamW(model.parameters(), lr=1e-3), BudgetSchedule(25, 1e4))
    fresh.load_state_dict(state)
    assert (fresh.lr_lambdas[0].total, fresh.lr_lambdas[0].warmup) == (50, 5)


# -- the planner -------------------------------------------------------------------------------------------------


def test_periodic_work_falls_on_evenly_spaced_steps_before_the_end():
    for total in (97, 250, 1000):  # (a plan of a few steps gets rounds at most every step: fewer than that)
        due, last = [], 0
        for step in range(1, total + 1):
            if periodic_due(step, len(due), last, total):
                due.append(step)
                last = step
        assert len(due) == PERIODIC_EVENTS - 1 and all(step < total for step in due)
        gaps = [b - a for a, b in zip([0, *due], [*due, total], strict=True)]
        spacing = total / PERIODIC_EVENTS  # even spacing, the end itself being the last round
        assert all(abs(gap - spacing) <= 1 for gap in gaps)
    assert not periodic_due(5, 0, 0, 0) and not periodic_due(10, 0, 0, 10) and not periodic_due(5, 0, 0, 100, 0)
    # A plan that grows moves the next round with it; one that shrinks does not crowd the rounds it owes.
    assert not periodic_due(150, 1, 100, 1000) and periodic_due(200, 1, 100, 1000)
    assert not periodic_due(110, 1, 100, 500) and periodic_due(125, 1, 100, 500)


def test_the_plan_fits_steps_and_periodic_work_into_what_is_left():
    planner = BudgetPlanner(100.0, cap=10_000, periodic={"eval": True}, overheads=Overheads(eval_seconds=2.0))
    for _ in range(5):
        planner.record_step(0.1)
    total = planner.plan(step=5, elapsed=1.0)
    # 10 evaluations of 2 s would take a fifth of the budget: 5 take a tenth. 100 s - 1 s spent - 2 s for the final
    # evaluation - 5 evaluations of 2 s leave 87 s of 0.1 s steps after step 5.
    assert planner.events == 5
    assert total == pytest.approx(5 + 870, abs=2)
    assert planner.plan(step=5, elapsed=99.0) == 6  # nothing left: at least one more step is planned...
    assert planner.out_of_time(99.0)  # ...but the trainer asks this first and stops
    assert BudgetPlanner(100.0, cap=50, periodic={}, overheads=Overheads(0.0)).plan is not None


def test_the_plan_is_capped_by_max_steps_and_expensive_evaluations_are_made_fewer():
    planner = BudgetPlanner(100.0, cap=300, periodic={"eval": True}, overheads=Overheads(eval_seconds=5.0))
    planner.record_step(0.01)
    assert planner.plan(step=1, elapsed=0.0) == 300
    assert planner.events == 2  # 10 evaluations of 5 s would take half the budget; 2 stay within a tenth
    with pytest.raises(ValueError, match="timed step"):
        BudgetPlanner(10.0, cap=5, periodic={}, overheads=Overheads(0.0)).plan(step=0, elapsed=0.0)


# -- the trainer on a virtual clock --------------------------------------------------------------------------------


class VirtualClock:
    """Time that passes only when the trainer works: ``step_cost`` per optimizer step, ``eval_cost`` per
    evaluation, ``sample_cost`` per sample; ``slowdown_at`` multiplies the step cost from that step on."""

    def __init__(self, trainer: Trainer, step_cost=0.5, eval_cost=0.2, sample_cost=0.05, slowdown_at=None):
        self.now = 0.0
        self.steps = 0
        train_step, evaluate, sample = trainer._train_step, trainer.evaluate, trainer.sample

        def timed_step():
            self.steps += 1
            slow = slowdown_at is not None and self.steps >= slowdown_at
            self.now += step_cost * (2.0 if slow else 1.0)
            return train_step()

        def timed_eval():
            self.now += eval_cost
            return evaluate()

        def timed_sample(step):
            self.now += sample_cost
            return sample(step)

        trainer._train_step, trainer.evaluate, trainer.sample = timed_step, timed_eval, timed_sample
        trainer.clock = lambda: self.now


class Recorder(Callback):
    def __init__(self):
        self.steps, self.evals, self.samples = [], [], []

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_eval(self, step, metrics):
        self.evals.append(step)

    def on_sample(self, step, text):
        self.samples.append(step)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, shakespeare_path):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare-head.txt"
    path.write_text(shakespeare_path.read_text()[:8_000])
    return path


def budget_trainer(small_corpus, tmp_path, **fields) -> tuple[Trainer, Recorder]:
    data = DataConfig(source=str(small_corpus), cache_dir=str(tmp_path / "data"), batch_size=2, block_size=16)
    settings = dict(
        time_budget=30.0,
        max_steps=100_000,
        target_loss=0,
        lr=1e-3,
        eval_interval=1,
        sample_interval=1,
        sample_tokens=4,
        checkpoint_interval=0,
        device="cpu",
    )
    recorder = Recorder()
    trainer = Trainer(MODEL, data, TrainConfig(**{**settings, **fields}), [recorder])
    return trainer, recorder


def test_a_budget_run_completes_its_schedule_on_time(small_corpus, tmp_path):
    trainer, rec = budget_trainer(small_corpus, tmp_path)
    clock = VirtualClock(trainer)
    result = trainer.fit(tmp_path / "out")
    config = trainer.config
    assert result.stop_reason == "time_budget"
    assert clock.now <= config.time_budget  # evaluations, samples and the end's work included
    assert clock.now >= 0.9 * config.time_budget  # and the budget was used, not wasted
    assert result.planned_steps == result.steps == rec.steps[-1][0]
    final_lr = config.lr / config.div_factor / config.final_div_factor
    assert rec.steps[-1][1]["lr"] == pytest.approx(final_lr)  # the schedule ran to its end
    assert max(m["lr"] for _, m in rec.steps) == pytest.approx(config.lr, rel=1e-3)
    assert all(abs(m["planned_steps"] - result.steps) <= 2 for _, m in rec.steps[-20:])  # the plan had settled
    assert "planned_steps" not in rec.steps[0][1]  # the first steps are the probe: no plan yet
    # Ten evaluations spread over the plan, then the final one at the last step.
    assert len(rec.evals) == PERIODIC_EVENTS and rec.evals[-1] == result.steps
    gaps = [b - a for a, b in zip(rec.evals, rec.evals[1:], strict=False)]
    assert max(gaps) - min(gaps) <= 2
    assert rec.samples[-1] == result.steps and len(rec.samples) == PERIODIC_EVENTS


def test_a_machine_that_slows_down_shortens_the_decay_and_still_ends_on_time(small_corpus, tmp_path):
    trainer, rec = budget_trainer(small_corpus, tmp_path)
    clock = VirtualClock(trainer, slowdown_at=25)
    result = trainer.fit(tmp_path / "out")
    assert result.stop_reason == "time_budget" and clock.now <= trainer.config.time_budget
    config = trainer.config
    assert rec.steps[-1][1]["lr"] == pytest.approx(config.lr / config.div_factor / config.final_div_factor)
    plans = [m["planned_steps"] for _, m in rec.steps if "planned_steps" in m]
    assert plans[-1] < max(plans)  # the plan shrank when the steps got slower
    # A moving plan never crowds its evaluations: consecutive rounds stay at least half a spacing apart.
    periodic = rec.evals[:-1]  # the last one is the end's
    assert min(b - a for a, b in zip(periodic, periodic[1:], strict=False)) >= result.steps / PERIODIC_EVENTS / 2 - 1


def test_max_steps_caps_a_budget_run(small_corpus, tmp_path):
    trainer, rec = budget_trainer(small_corpus, tmp_path, max_steps=30)
    VirtualClock(trainer)
    result = trainer.fit(tmp_path / "out")
    assert result.steps == result.planned_steps == 30 and result.stop_reason == "max_steps"
    assert rec.steps[-1][1]["lr"] == pytest.approx(1e-3 / 25 / 1e4)


def test_a_resumed_budget_run_spends_only_what_is_left(small_corpus, tmp_path):
    trainer, rec = budget_trainer(small_corpus, tmp_path, checkpoint_interval=1)
    clock = VirtualClock(trainer)

    class StopAt(Callback):
        def on_step(self, step, metrics):
            if step == 20:
                trainer.request_stop("test")

    trainer.callbacks.append(StopAt())
    first = trainer.fit(tmp_path / "out")
    assert first.stop_reason == "stopped: test"
    spent = clock.now
    resumed, rec2 = budget_trainer(small_corpus, tmp_path, checkpoint_interval=1)
    clock2 = VirtualClock(resumed)
    resumed.load_training_state(sorted((tmp_path / "out" / "resume").glob("step-*"))[-1])
    result = resumed.fit(tmp_path / "out")
    assert result.stop_reason == "time_budget"
    assert spent + clock2.now <= resumed.config.time_budget + 1.0  # +1: the stopped run's own end work
    assert rec2.steps[0][0] == 21 and "planned_steps" in rec2.steps[-1][1]
    final = resumed.config.lr / resumed.config.div_factor / resumed.config.final_div_factor
    assert rec2.steps[-1][1]["lr"] == pytest.approx(final)


def test_a_budget_is_validated():
    with pytest.raises(ValueError, match="time_budget must be at least 10 seconds"):
        TrainConfig(time_budget=5)
    for bad in (math.inf, math.nan, "10m", True):
        with pytest.raises(ValueError, match="time_budget"):
            TrainConfig(time_budget=bad)
