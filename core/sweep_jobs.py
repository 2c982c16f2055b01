"""Sweeps as background jobs: ``python -m pipelines.sweep ... --job-dir <folder>``, started by
:func:`core.jobs.start_job` with ``kind="sweep"`` and listed, cancelled and reconciled like training jobs.

A sweep job's folder has the files of every job (see :mod:`core.jobs`), with these meanings:

- ``run.json``: the sweep's parent run (the job's run: the one a died job's reconciliation ends KILLED; a trial's
  run left RUNNING is ended by :func:`core.jobs.reap_orphan_runs`, like any run whose process died);
- ``progress.json``: the running trial's live progress (:class:`core.jobs.JobProgressRecorder`, started afresh for
  every trial);
- ``sweep.json`` (:data:`core.jobs.SWEEP_FILE`): the sweep's status, rewritten whenever it changes: the fields of
  :class:`core.sweep.SweepStatus` (trial ``trial_index`` of ``n_trials``, the running trial's ``trial_run_id``,
  counts, the best value, trial and run so far, the last trial's outcome) and ``updated_at``;
- ``result.json``: the sweep's outcome; ``run_id`` is the parent run, ``model_name``/``model_version`` the best
  trial's registered version (none when the sweep was stopped or no trial completed), ``stop_reason`` why it
  stopped and ``steps`` is null.

Cancelling (SIGTERM to the group) stops the running trial after its current step: its run ends KILLED, the parent
run KILLED, and the study can be resumed (``python -m pipelines.sweep --resume NAME``, or a new job with those
arguments). This module knows nothing of Streamlit and does not import :mod:`pipelines`: the arguments of a new
sweep job are checked by the sweep CLI itself, run with ``--check`` (:func:`validate_sweep_args`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from core.callbacks import Callback
from core.config import TrainConfig
from core.errors import UsageError
from core.jobs import SWEEP_FILE, JobError, JobProgressRecorder, JobRecorder, _write_json
from core.store import REPO_ROOT
from core.sweep import SweepObserver, SweepOutcome, SweepStatus

CHECK_TIMEOUT_S = 180.0
"""How long :func:`validate_sweep_args` waits for the sweep CLI's check (it imports torch and MLflow: seconds)."""


def validate_sweep_args(sweep_args: Sequence[str], tracking_uri: str) -> None:
    """Check ``sweep_args`` the way ``python -m pipelines.sweep`` does, by running it with ``--check`` (which
    creates nothing) against store ``tracking_uri``; a refusal raises :class:`UsageError` with its one line.

    ``--job-dir``, ``--check`` and ``--help`` are refused: the job manager owns those. A check that cannot run
    (it times out, or crashes) raises :class:`core.jobs.JobError`.
    """
    args = [str(a) for a in sweep_args]
    for owned in ("--job-dir", "--check", "-h", "--help"):
        if any(a == owned or a.startswith(owned + "=") for a in args):
            raise UsageError(f"{owned} is set by the job manager; leave it out of the sweep's arguments")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    try:
        checked = subprocess.run(
            [sys.executable, "-m", "pipelines.sweep", *args, "--check"],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        raise JobError(f"checking the sweep's arguments took more than {CHECK_TIMEOUT_S:g} s") from exc
    lines = checked.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    if checked.returncode == 2:
        # "error: ..." from pipelines.cli.run, or "python -m pipelines.sweep: error: ..." from argparse.
        raise UsageError(last.split("error: ", 1)[-1])
    if checked.returncode != 0:
        raise JobError(f"checking the sweep's arguments failed (exit code {checked.returncode}): {last}")


class SweepJobObserver(SweepObserver):
    """Writes ``sweep.json`` on every status change and gives each trial a progress recorder."""

    def __init__(self, job_dir: str | Path):
        self.job_dir = Path(job_dir)

    def on_status(self, status: SweepStatus) -> None:
        _write_json(self.job_dir / SWEEP_FILE, {**status.to_dict(), "updated_at": time.time()})

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
        """Record a sweep that returned, and the exit code the process is about to exit with."""
        self._record(
            status=outcome.status,
            exit_code=exit_code,
            run_id=outcome.parent_run_id,
            model_name=outcome.model_name,
            model_version=outcome.model_version,
            stop_reason=outcome.stop_reason,
            steps=None,
            error=None,
            run_ended=True,  # run_sweep ends the parent run before it returns
        )


def resume_args(job_sweep: dict | None) -> list[str]:
    """The arguments of a job that resumes the sweep of a stopped sweep job (its ``sweep.json`` contents);
    :class:`JobError` when the job recorded no sweep (it stopped before its study existed)."""
    name = (job_sweep or {}).get("name")
    if not name:
        raise JobError("this job stopped before its sweep existed: there is nothing to resume; start a new sweep")
    return ["--resume", str(name)]
