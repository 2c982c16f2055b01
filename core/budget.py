"""Time-budget training: a learning-rate schedule whose length is planned from the measured speed of the run.

A budget run does not know in advance how many steps fit into its wall-clock budget: that depends on the machine,
on what else runs on it, and on what evaluations, samples and checkpoints cost. So it probes: the first
:data:`PROBE_STEPS` steps run at the schedule's starting rate while they are timed, then :class:`BudgetPlanner`
sizes the schedule (warm-up, then cosine decay to the final rate) so that it completes inside the budget, and
re-plans after every step from the latest timings. The warm-up's length is fixed at the first plan; later plans only
move the end of the decay, so a machine that slows down shortens the decay instead of cutting it off.

:class:`BudgetSchedule` is the schedule itself, a multiplier for ``torch.optim.lr_scheduler.LambdaLR``. Its state is
plain numbers (``LambdaLR.state_dict`` keeps a callable object's ``__dict__``), so it is saved in and restored from
the pickle-free resumable checkpoints like any other scheduler state.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from dataclasses import dataclass

PROBE_STEPS = 5
"""Steps timed at the starting rate before the first plan (the first one, which allocates, is not counted)."""

PERIODIC_EVENTS = 10
"""A budget run evaluates (and samples, and checkpoints, where those are enabled) this many times, evenly over its
planned steps, plus once at the end: a fixed step interval would mean one evaluation in a short budget and hundreds
in a long one."""

MAX_PERIODIC_SHARE = 0.1
"""Most of the budget periodic work may take: when :data:`PERIODIC_EVENTS` rounds of it would take more (a large
validation split, a short budget), the run makes fewer rounds rather than fewer steps."""

_TIMING_WINDOW = 20  # recent step times whose median is the planner's step time: robust to a slow outlier


class BudgetSchedule:
    """Multiplier of the peak learning rate for step index ``i`` (0-based: the rate used by step ``i + 1``).

    Before :meth:`plan` it is ``1 / div_factor`` (the probe runs at the starting rate). Once planned for ``total``
    steps with ``warmup`` of them warming up: linear from ``1 / div_factor`` to 1 over ``[0, warmup]``, then a cosine
    from 1 down to ``1 / (div_factor · final_div_factor)``, reached exactly at the last step (index ``total - 1``).
    """

    def __init__(self, div_factor: float, final_div_factor: float) -> None:
        self.start = 1.0 / div_factor
        self.final = self.start / final_div_factor
        self.total = 0
        """Planned steps (0: not planned yet)."""
        self.warmup = 0
        """Steps of the warm-up, fixed by the first plan."""

    def plan(self, total: int, warmup_fraction: float) -> None:
        """Set the schedule's length to ``total`` steps; the first call also fixes the warm-up's length."""
        if self.total == 0:
            self.warmup = max(1, round(warmup_fraction * total))
        self.total = max(total, self.warmup + 1)

    def __call__(self, index: int) -> float:
        if self.total == 0:
            return self.start
        if index < self.warmup:
            return self.start + (1.0 - self.start) * index / self.warmup
        progress = min(1.0, (index - self.warmup) / max(1, self.total - 1 - self.warmup))
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Overheads:
    """Measured (or estimated) seconds of the periodic work a budget run has to fit besides its steps."""

    eval_seconds: float
    """One evaluation of the validation split."""
    sample_seconds: float = 0.0
    """One periodic text sample."""
    checkpoint_seconds: float = 0.0
    """One resumable checkpoint."""


class BudgetPlanner:
    """Decides how many steps a budget run takes, from the budget and the timings it is fed.

    ``seconds`` is the whole budget; ``used`` what an earlier process of the same run already spent (a resumed run).
    ``cap`` is the most steps the run may take anyway (``max_steps``). ``periodic`` says which periodic work is on:
    ``{"eval": bool, "sample": bool, "checkpoint": bool}``; each runs :data:`PERIODIC_EVENTS` times over the plan
    and once more at the end (the end's evaluation, sample and checkpoint are reserved before any step is planned).
    """

    def __init__(self, seconds: float, cap: int, periodic: dict[str, bool], overheads: Overheads) -> None:
        self.seconds = seconds
        self.cap = cap
        self.periodic = periodic
        self.overheads = overheads
        self._step_times: deque[float] = deque(maxlen=_TIMING_WINDOW)
        self.events = PERIODIC_EVENTS
        """Rounds of periodic work over the plan (fewer than :data:`PERIODIC_EVENTS` when they would cost too much)."""

    def record_step(self, seconds: float) -> None:
        """Feed the duration of one optimizer step."""
        self._step_times.append(seconds)

    @property
    def step_seconds(self) -> float | None:
        """The planner's current estimate of one step (median of the recent ones), None before any."""
        return statistics.median(self._step_times) if self._step_times else None

    def _event_seconds(self) -> float:
        """Seconds of one round of periodic work (an evaluation, a sample and a checkpoint, where enabled)."""
        o = self.overheads
        return (
            o.eval_seconds * self.periodic.get("eval", False)
            + o.sample_seconds * self.periodic.get("sample", False)
            + o.checkpoint_seconds * self.periodic.get("checkpoint", False)
        )

    def end_reserve(self) -> float:
        """Seconds kept for the work after the last step: final evaluation, sample and checkpoint."""
        return self._event_seconds()

    def plan(self, step: int, elapsed: float) -> int:
        """Total steps to plan for, given ``step`` steps taken in ``elapsed`` seconds of the budget: at most ``cap``
        and otherwise at least ``step + 1``. The periodic events still to come are those of the plan after ``step``."""
        step_seconds = self.step_seconds
        if step_seconds is None:
            raise ValueError("the budget planner needs at least one timed step")
        remaining = self.seconds - elapsed - self.end_reserve()
        event = self._event_seconds()
        if event > 0:
            self.events = max(1, min(PERIODIC_EVENTS, int(MAX_PERIODIC_SHARE * self.seconds / event)))
        # With E events spread over the total T, the steps after `step` carry about E·(T - step)/T of them; solve
        # (T - step)·(step_s + E·event_s/T) <= remaining for T by iterating (it converges in a few rounds).
        total = step + max(1, int(remaining / step_seconds))
        for _ in range(8):
            per_step = step_seconds + self.events * event / max(total, 1)
            total = step + max(1, int(remaining / per_step))
        return min(self.cap, max(step + 1, total))

    def out_of_time(self, elapsed: float) -> bool:
        """Whether one more step would overrun the budget (its end work included)."""
        step_seconds = self.step_seconds or 0.0
        return elapsed + step_seconds + self.end_reserve() > self.seconds


def periodic_due(step: int, rounds: int, last: int, total: int, events: int = PERIODIC_EVENTS) -> bool:
    """Whether step ``step`` (1-based) of a plan of ``total`` steps gets a round of periodic work, ``rounds`` rounds
    having been done, the latest at step ``last``: the next round falls at ``(rounds + 1) · total / events``, never
    at the end (which has its own), and never within half a spacing of the latest. On a fixed plan that is
    ``events - 1`` rounds, evenly spaced; a plan that moves moves the rounds still to come with it."""
    if total <= 0 or events <= 0 or step >= total:
        return False
    return step >= (rounds + 1) * total / events and step - last >= total / events / 2
