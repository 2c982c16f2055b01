"""Sweeps as background jobs: a :class:`SweepJob` spec started by :func:`core.jobs.start_job` (``python -m
pipelines.sweep --spec <folder>/spec.json --job-dir <folder>``), listed, cancelled and reconciled like training jobs.

A sweep job's folder has the files of every job (see :mod:`core.jobs`), with these meanings:

- ``run.json``: the sweep's parent run (the job's run: the one a died job's reconciliation ends KILLED; a trial's
  run left RUNNING is ended by :func:`core.reaper.reap_orphan_runs`, like any run whose process died);
- ``progress.json``: the running trial's live progress (:class:`core.jobs.JobProgressRecorder`, started afresh for
  every trial);
- ``sweep.json`` (:data:`core.jobs.SWEEP_FILE`): the sweep's status, rewritten whenever it changes: the fields of
  :class:`core.sweep.SweepStatus` (trial ``trial_index`` of ``n_trials``, the running trial's ``trial_run_id``,
  counts, the best value, trial and run so far, the last trial's outcome) and ``updated_at``;
- ``result.json``: the sweep's outcome; ``run_id`` is the parent run, ``model_name``/``model_version`` the best
  trial's registered version (none when the sweep was stopped or no trial completed), ``stop_reason`` why it
  stopped and ``steps`` is null.

Cancelling (SIGTERM to the group) stops the running trial after its current step: its run ends KILLED, the parent
run KILLED, and the study can be resumed (``python -m pipelines.sweep --resume NAME``, or a new job of a
:class:`SweepJob` with ``resume``). This module knows nothing of Streamlit or of the entry points: a sweep job's spec
is checked in process (:meth:`SweepJob.check`, the checks ``python -m pipelines.sweep --check`` makes).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from core.atomic import write_json
from core.callbacks import Callback
from core.config import TrainConfig
from core.errors import JobError, UsageError
from core.jobs.layout import SWEEP_FILE
from core.jobs.recorder import JobProgressRecorder, JobRecorder
from core.recipes import RunConfigs
from core.sweep import SweepObserver, SweepOutcome, SweepPlan, SweepSettings, SweepStatus, plan_resume, plan_sweep


@dataclass(frozen=True)
class SweepJob:
    """A sweep job (a :class:`core.jobs.JobSpec`): a new sweep of ``settings`` over ``configs`` (every trial's base
    settings), or the stopped sweep ``resume`` continued with its stored settings."""

    settings: SweepSettings | None = None
    """The new sweep's search space, length, metric, sampler and pruner; None when resuming."""
    configs: RunConfigs | None = None
    """Every trial's settings besides the searched fields; None when resuming."""
    resume: str | None = None
    """The name of a stopped sweep to continue; None for a new sweep."""
    storage: str | None = None
    """Optuna storage URL; None: :func:`core.sweep.default_storage` of the job's tracking store."""

    kind: ClassVar[str] = "sweep"
    module: ClassVar[str] = "pipelines.sweep"

    def __post_init__(self) -> None:
        if (self.resume is None) == (self.settings is None or self.configs is None):
            raise UsageError("a sweep job is a new sweep (settings and configs) or a resumed one (a name), not both")

    def plan(self, tracking_uri: str | None = None) -> SweepPlan:
        """The checked plan (:func:`core.sweep.plan_sweep` or :func:`core.sweep.plan_resume`); UsageError (one line)
        otherwise. Creates nothing. The parent run is named after the sweep unless the configs name it."""
        if self.resume is not None:
            return plan_resume(self.resume, storage=self.storage, tracking_uri=tracking_uri)
        model, data, train, tracking = self.configs.astuple()
        tracking = dataclasses.replace(
            tracking,
            run_name=tracking.run_name or self.settings.name,
            tracking_uri=tracking_uri or tracking.tracking_uri,
        )
        return plan_sweep(self.settings, model, data, train, tracking, storage=self.storage)

    def check(self, processes: int, tracking_uri: str) -> None:
        """One process (trials run one after another), and a plan the sweep CLI would accept."""
        if processes != 1:
            raise UsageError("a sweep trains its trials one after another in one process; processes must be 1")
        self.plan(tracking_uri)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "settings": self.settings and self.settings.to_dict(),
            "configs": self.configs and self.configs.to_dict(),
            "resume": self.resume,
            "storage": self.storage,
        }

    @classmethod
    def from_dict(cls, values: Any) -> SweepJob:
        """The spec :meth:`to_dict` wrote; anything else raises ``ValueError`` saying what is wrong."""
        if not isinstance(values, dict) or values.get("kind") != cls.kind:
            raise ValueError("not a sweep job's spec (its kind is not 'sweep')")
        settings, configs = values.get("settings"), values.get("configs")
        return cls(
            settings=None if settings is None else SweepSettings.from_dict(settings),
            configs=None if configs is None else RunConfigs.from_dict(configs),
            resume=values.get("resume"),
            storage=values.get("storage"),
        )


class SweepJobObserver(SweepObserver):
    """Writes ``sweep.json`` on every status change and gives each trial a progress recorder."""

    def __init__(self, job_dir: str | Path):
        self.job_dir = Path(job_dir)

    def on_status(self, status: SweepStatus) -> None:
        write_json(self.job_dir / SWEEP_FILE, {**status.to_dict(), "updated_at": time.time()})

    def trial_callbacks(self, number: int, train: TrainConfig) -> list[Callback]:
        return [JobProgressRecorder(self.job_dir, train.max_steps)]


class SweepJobRecorder(JobRecorder):
    """The sweep process's side of a job: the parent run id (:meth:`run_created`), the sweep's status and each
    trial's progress (:meth:`observer`), and the outcome (:meth:`record_sweep_outcome`). As a context manager it
    records an exception that ends the sweep, as :class:`core.jobs.JobRecorder` does."""

    def observer(self) -> SweepJobObserver:
        """The sweep observer that writes this job's ``sweep.json`` and ``progress.json``."""
        return SweepJobObserver(self.job_dir)

    def record_sweep_outcome(self, outcome: SweepOutcome, exit_code: int) -> None:
        """Record a sweep that returned, and the exit code the process is about to exit with: the parent run,
        the best trial's registered version (if any), why it stopped; run_sweep ended the parent run already."""
        self.record_returned(
            status=outcome.status,
            exit_code=exit_code,
            run_id=outcome.parent_run_id,
            model_name=outcome.model_name,
            model_version=outcome.model_version,
            stop_reason=outcome.stop_reason,
            steps=None,
        )


def resume_spec(job_sweep: dict | None) -> SweepJob:
    """The spec of a job that resumes the sweep of a stopped sweep job (its ``sweep.json`` contents);
    :class:`JobError` when the job recorded no sweep (it stopped before its study existed)."""
    name = (job_sweep or {}).get("name")
    if not name:
        raise JobError("this job stopped before its sweep existed: there is nothing to resume; start a new sweep")
    return SweepJob(resume=str(name))
