"""What a running sweep reports: its status after every change, to observers (the terminal, a job folder), and its
outcome."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from core.callbacks import Callback
from core.config import TrainConfig


@dataclass
class SweepStatus:
    """Where a sweep stands, given to :meth:`SweepObserver.on_status` whenever it changes."""

    name: str
    parent_run_id: str
    metric: str
    n_trials: int | None
    """The trials asked for (None: as many as the time budget allows)."""
    time_budget: float | None
    phase: str = "running"
    """``running`` (a trial trains or is about to), ``finishing`` (registering the best model) or ``ended``."""
    trial_number: int | None = None
    """Optuna's number of the trial that trains now (0-based, over the whole study)."""
    trial_index: int | None = None
    """1-based position of that trial among the counted ones ("trial 2 of 3")."""
    trial_run_id: str | None = None
    trial_params: dict[str, Any] = field(default_factory=dict)
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    """Trials of the study that ended each way (interrupted ones are not counted)."""
    best_value: float | None = None
    best_trial: int | None = None
    best_run_id: str | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    last_trial: dict[str, Any] | None = None
    """The latest trial that ended: ``number``, ``state``, ``value``, ``run_id``, ``steps``, ``error``."""
    elapsed_s: float = 0.0
    """Seconds since this session of the sweep started."""
    stop_reason: str | None = None
    """Why the sweep stopped: ``trials``, ``time_budget``, ``grid`` (every combination tried) or
    ``stopped: <signal>``; None while it runs."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-serialisable)."""
        return dataclasses.asdict(self)


class SweepObserver:
    """Receives a sweep's reports (a terminal, a background job's files). The base class does nothing."""

    def on_status(self, status: SweepStatus) -> None:
        """Whenever the status changes: the sweep starts, a trial starts or gets its run, a trial ends, the sweep
        ends."""

    def trial_callbacks(self, number: int, train: TrainConfig) -> list[Callback]:
        """Extra trainer callbacks for trial ``number`` (trained with ``train``)."""
        return []


class ObserverGroup(SweepObserver):
    """Several observers as one: each hook goes to every one of them, in order."""

    def __init__(self, *observers: SweepObserver):
        self.observers = observers

    def on_status(self, status: SweepStatus) -> None:
        for observer in self.observers:
            observer.on_status(status)

    def trial_callbacks(self, number: int, train: TrainConfig) -> list[Callback]:
        return [c for observer in self.observers for c in observer.trial_callbacks(number, train)]


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` produced."""

    name: str
    parent_run_id: str
    status: str
    """The parent run's end: FINISHED or KILLED."""
    stop_reason: str
    complete: int
    pruned: int
    failed: int
    best_trial: int | None
    best_value: float | None
    best_run_id: str | None
    best_params: dict[str, Any]
    model_name: str | None
    """The registered model (None when no trial completed, or the sweep was stopped)."""
    model_version: str | None
