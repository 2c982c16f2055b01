"""The training process's side of a job: :class:`JobRecorder` writes the run id, the outcome (or the error that
ended the process) and, through :class:`JobProgressRecorder` (a trainer callback), the live progress into the job
folder."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.atomic import write_json
from core.callbacks import Callback, TrainResult
from core.errors import StudioError
from core.jobs.layout import PROGRESS_FILE, RESULT_FILE, RUN_FILE, one_line

if TYPE_CHECKING:
    from core.experiment import TrainingOutcome


def finite(value: Any) -> float | None:
    """JSON has no NaN or infinity; a non-finite number is recorded as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class JobProgressRecorder(Callback):
    """Trainer callback writing the live progress of a job to ``<job_dir>/progress.json``.

    The file is rewritten at most every ``min_interval`` seconds while steps run (a step can take a millisecond;
    rewriting a file that often would cost more than the step), and always at the start, after each evaluation
    and at the end, so the last step is always on disk.
    """

    def __init__(self, job_dir: str | Path, max_steps: int, *, min_interval: float = 0.5):
        self.path = Path(job_dir) / PROGRESS_FILE
        self.max_steps = max_steps
        self.min_interval = min_interval
        self.state: dict[str, Any] = {
            "phase": "training",
            "step": 0,
            "max_steps": max_steps,
            "loss": None,
            "avg_loss": None,
            "best_loss": None,
            "lr": None,
            "tokens_per_sec": None,
            "time_per_batch": None,
            "elapsed_s": 0.0,
            "eta_s": None,
            "val_loss": None,
            "val_bpc": None,
            "val_step": None,
            "updated_at": None,
        }
        self._started = time.monotonic()
        self._last_write = -math.inf

    def _write(self) -> None:
        now = time.monotonic()
        elapsed = now - self._started
        step = self.state["step"]
        self.state["elapsed_s"] = elapsed
        self.state["eta_s"] = elapsed / step * (self.max_steps - step) if step else None
        self.state["updated_at"] = time.time()
        write_json(self.path, self.state)
        self._last_write = now

    def on_train_start(self, summary: dict) -> None:
        """Record the start (step 0) and a few facts about the run."""
        self._started = time.monotonic()
        self.state.update(
            device=summary.get("device"),
            total_params=summary.get("total_params"),
            tokens_per_batch=summary.get("tokens_per_batch"),
        )
        self._write()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Keep the step's metrics; write them if the last write is ``min_interval`` old (or it is the last step)."""
        self.state["step"] = step
        for key in ("loss", "avg_loss", "best_loss", "lr", "tokens_per_sec", "time_per_batch"):
            self.state[key] = finite(metrics.get(key))
        if "planned_steps" in metrics:  # a time-budget run: its plan, not the step cap, is where it ends
            self.max_steps = self.state["max_steps"] = int(metrics["planned_steps"])
        if step >= self.max_steps or time.monotonic() - self._last_write >= self.min_interval:
            self._write()

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Record the evaluation and write at once (evaluations are rare and worth showing immediately)."""
        self.state["val_loss"] = finite(metrics.get("val_loss"))
        self.state["val_bpc"] = finite(metrics.get("val_bpc"))
        self.state["val_step"] = step
        self._write()

    def on_train_end(self, result: TrainResult) -> None:
        """Record the final step; the process goes on to register the model (phase ``finishing``)."""
        self.state["step"] = result.steps
        self.state["phase"] = "finishing"
        self.state["stop_reason"] = result.stop_reason
        self._write()


class JobRecorder:
    """The training process's side of a job: records the run id, progress and outcome in ``job_dir``.

    Use as a context manager around training: an exception leaving the block is recorded in ``result.json``
    (status FAILED, or KILLED for a KeyboardInterrupt) and re-raised; a normal end is recorded by
    :meth:`record_outcome`.
    """

    def __init__(self, job_dir: str | Path):
        self.job_dir = Path(job_dir)
        self.job_dir.mkdir(parents=True, exist_ok=True)
        self.job_id = self.job_dir.name
        self.run_id: str | None = None
        self._recorded = False

    def progress_recorder(self, max_steps: int) -> JobProgressRecorder:
        """The trainer callback that writes ``progress.json``."""
        return JobProgressRecorder(self.job_dir, max_steps)

    def run_created(self, run_id: str) -> None:
        """Record the MLflow run id on disk, then tag the run with the job id and this process id."""
        from core.store import connect

        self.run_id = run_id
        client = connect()  # the training process's store: MLFLOW_TRACKING_URI, set by start_job
        experiment_id = client.get_run(run_id).info.experiment_id
        write_json(
            self.job_dir / RUN_FILE,
            {"run_id": run_id, "experiment_id": experiment_id, "pid": os.getpid(), "recorded_at": time.time()},
        )
        client.set_tag(run_id, "studio.job_id", self.job_id)
        client.set_tag(run_id, "studio.job_pid", str(os.getpid()))

    def record_outcome(self, outcome: TrainingOutcome, exit_code: int) -> None:
        """Record a training that returned, and the exit code the process is about to exit with."""
        self.record_returned(
            status=outcome.status,
            exit_code=exit_code,
            run_id=outcome.run_id,
            model_name=outcome.model_name,
            model_version=outcome.model_version,
            stop_reason=outcome.result.stop_reason,
            steps=outcome.result.steps,
        )

    def record_returned(self, **fields) -> None:
        """Record work that returned (its ``status``, ``exit_code``, ``run_id``, ``model_name``, ``model_version``,
        ``stop_reason`` and ``steps``): no error, and the run already ended by the process itself."""
        self._record(**fields, error=None, run_ended=True)

    def _record(self, **fields) -> None:
        write_json(self.job_dir / RESULT_FILE, {**fields, "ended_at": time.time()})
        self._recorded = True

    def __enter__(self) -> JobRecorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None or self._recorded:
            return
        # The exit codes pipelines.cli.run gives these exceptions.
        if isinstance(exc, KeyboardInterrupt):
            status, code = "KILLED", 130
        else:
            status, code = "FAILED", 2 if isinstance(exc, (StudioError, ValueError)) else 1
        self._record(
            status=status,
            exit_code=code,
            run_id=self.run_id,
            model_name=None,
            model_version=None,
            stop_reason=None,
            steps=None,
            error=one_line(exc)[:2000],
            run_ended=None,  # run_training tries to end the run on an error; reconciliation checks it did
        )
