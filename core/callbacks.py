"""What the trainer reports and to whom: the :class:`Callback` interface and the :class:`TrainResult` it ends with.

The terminal progress bar, MLflow logging, the app's job recorder and a sweep's pruner are all callbacks; the loop
(:mod:`core.trainer`) knows none of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class Callback:
    """Receives the trainer's reports. Every hook is optional; the base class does nothing."""

    def on_train_start(self, summary: dict) -> None:
        """Once, before the first step: model size, data and device facts (see :meth:`Trainer.summary`)."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """After every optimizer step (1-based)."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """After every evaluation: ``val_loss`` and ``val_bpc``, and the lowest of each so far, ``best_val_loss``
        and ``best_val_bpc``."""

    def on_sample(self, step: int, text: str) -> None:
        """After every periodic sample and the final one."""

    def on_sample_report(self, step: int, metrics: dict[str, float]) -> None:
        """Just before each ``on_sample``: how much of that sample's continuation is copied from the training split,
        ``sample_copied_share`` (absent when it has fewer than 8 tokens) and ``sample_longest_copy_chars`` (see
        :class:`core.memorization.CopyReport`)."""

    def before_checkpoint(self, step: int) -> None:
        """Just before a resumable checkpoint of ``step`` is written: make everything reported so far durable (a
        run resumed from that checkpoint repeats no step up to ``step``, so anything reported and then lost would
        leave a gap)."""

    def on_train_end(self, result: TrainResult) -> None:
        """Once, after the final checkpoint is written (also when training was stopped early)."""


@dataclass
class TrainResult:
    """What a finished (or stopped) training produced."""

    steps: int
    """Optimizer steps taken."""
    stop_reason: str
    """``target_loss``, ``max_steps``, ``patience``, ``time_budget`` or ``stopped: <why>`` (a stop request such as a
    signal)."""
    final_loss: float
    """Training loss of the last step."""
    avg_loss: float
    """Running-average training loss at the end."""
    best_val_loss: float | None
    """Lowest validation loss seen (None without evaluation)."""
    best_val_step: int | None
    """Step of the lowest validation loss."""
    final_checkpoint: Path
    """Checkpoint of the last weights."""
    best_checkpoint: Path | None
    """Checkpoint of the best-validation weights (None without evaluation)."""
    seconds: float
    """Wall time of the loop."""
    last_eval: dict[str, float] = field(default_factory=dict)
    """Metrics of the final evaluation."""
    planned_steps: int | None = None
    """A time-budget run's final plan of steps (None without a budget)."""
