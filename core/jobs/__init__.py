"""Background training jobs: training runs started as separate processes that outlive the page that started them.

A job is a folder ``<jobs_root>/<job_id>/`` (default ``mlruns/jobs``) and a ``python -m pipelines.train --spec
<folder>/spec.json --job-dir <folder>`` process in its own process group (its own session, so a Ctrl-C in the app's
terminal does not reach it and :func:`cancel_job` can signal the whole group). Everything about a job is on disk,
so any process (another browser tab, the app after a restart) sees the same jobs; nothing is kept only in memory.

On-disk layout of a job folder (every JSON file is replaced atomically, so a reader never sees half a file):

- ``job.json``: written by :func:`start_job`: ``kind``, ``job_id``, ``pid`` and ``pgid`` (null for the instant
  before the process exists), ``create_time`` (the process's start time, to tell it from a later process reusing
  the pid), ``processes``, ``argv``, ``label``, ``tracking_uri``, ``created_at`` (Unix seconds).
- ``spec.json``: what the job runs, its :class:`~core.jobs.spec.JobSpec` (the run's configs as JSON, or the run to
  resume), written with ``job.json``; the process rebuilds its configs from it (``--spec``), never from an argv.
- ``train.log``: the process's stdout and stderr.
- ``run.json``: written by the training process as soon as its MLflow run exists: ``run_id``, ``experiment_id``,
  ``pid``. The run is also tagged ``studio.job_id`` and ``studio.job_pid``.
- ``progress.json``: written by :class:`JobProgressRecorder` at most every ``min_interval`` seconds (and at the
  start, after each evaluation and at the end): ``phase`` (``training`` or ``finishing``), ``step``,
  ``max_steps``, ``loss``, ``avg_loss``, ``best_loss``, ``lr``, ``tokens_per_sec``, ``time_per_batch``,
  ``elapsed_s``, ``eta_s`` (to ``max_steps``: an upper bound, a target loss may stop the run earlier),
  ``val_loss``, ``val_bpc``, ``val_step``, ``updated_at``.
- ``result.json``: written by the training process when it ends (normally or by an exception): ``status``
  (FINISHED, KILLED or FAILED), ``exit_code``, ``run_id``, ``model_name``, ``model_version``, ``stop_reason``,
  ``steps``, ``error`` (one line, or null), ``run_ended`` (whether the process itself ended its MLflow run),
  ``ended_at``.
- ``cancel.json``: written by :func:`cancel_job` before it signals the process.
- ``reconciled.json``: written once the MLflow run of an ended job is known not to be RUNNING any more.

A job can also be a hyperparameter sweep (``kind`` ``sweep``, a :class:`core.sweep_jobs.SweepJob` spec):
``python -m pipelines.sweep --spec ... --job-dir <folder>``, whose trials train one after another in the same
process. Its folder has the same files (``run.json`` names the sweep's parent run, ``progress.json`` is the running
trial's) and ``sweep.json`` with the sweep's status; see :mod:`core.sweep_jobs`.

A job's state (:data:`STATES`) is derived on every read:

- its process is alive (same pid *and* start time, not a zombie): ``cancelling`` after a cancel request, else
  ``running`` once ``progress.json`` exists, else ``starting``;
- its process is gone: the status of ``result.json`` (``finished``, ``killed``, ``failed``); without one,
  ``killed`` if it was cancelled, else ``died`` (killed from outside, out of memory, crashed hard);
- ``unknown`` when ``job.json`` cannot be read (the reason says why). One bad folder never breaks
  :func:`list_jobs` and is never left out of it; it can be deleted.

The process that started a job reaps it when it exits (every state check polls it), so finished jobs leave no
zombies, and its exit status (e.g. "killed by SIGKILL") goes into the reason of a job that died. Another process
(the app after a restart) sees the same states, without the exit status.

Reconciliation: a process that dies without finishing (SIGKILL, the out-of-memory killer, a hard crash) leaves its
MLflow run RUNNING. :func:`list_jobs` and :func:`get_job` call :func:`reconcile_job` for every ended job not yet
reconciled: a RUNNING run is ended KILLED, with the tag ``error`` = "training process <pid> exited without finishing
(killed or crashed)" for a job that died, or ``stop_reason`` = "cancelled: ..." for one that was cancelled; the
job's ``reason`` then says so. (KILLED, not FAILED: nothing in the training failed, its process was stopped from
outside; a training error is recorded by the process itself and ends the run FAILED.) Each job costs at most one
MLflow lookup over its lifetime (``reconciled.json`` remembers it). If the store cannot be reached (a tracking
server gets a health check of a few seconds first, and each listing tries each store once), listing still works
and the job's ``reason`` carries the error; the next listing tries again. :func:`reconcile_job` does the same for
one job but raises the error. A RUNNING run whose :data:`core.tracking.PID_TAG` names another process than the
job's (the run was resumed by another process since) is left alone: that process is the run's now.

Runs left RUNNING outside any job are the reaper's (:mod:`core.reaper`).

Signals and process groups are POSIX: jobs work on Linux and macOS; on Windows :func:`start_job` and
:func:`cancel_job` raise :class:`JobError`. The package knows nothing of Streamlit or of the entry points.

Rooms: :mod:`~core.jobs.layout` (the folder's files and the state rules), :mod:`~core.jobs.processes` (POSIX
process control), :mod:`~core.jobs.recorder` (the training process's side), :mod:`~core.jobs.spec` (what a job
runs) and :mod:`~core.jobs.control` (start, list, reconcile, cancel, delete).
"""

from core.errors import JobError
from core.jobs.control import cancel_job, delete_job, get_job, list_jobs, reconcile_job, start_job
from core.jobs.layout import ACTIVE_STATES, DIED_ERROR, STATES, SWEEP_FILE, JobInfo, default_jobs_root
from core.jobs.recorder import JobProgressRecorder, JobRecorder
from core.jobs.spec import MAX_PROCESSES, JobSpec, TrainingJob

__all__ = [
    "ACTIVE_STATES",
    "DIED_ERROR",
    "MAX_PROCESSES",
    "STATES",
    "SWEEP_FILE",
    "JobError",
    "JobInfo",
    "JobProgressRecorder",
    "JobRecorder",
    "JobSpec",
    "TrainingJob",
    "cancel_job",
    "default_jobs_root",
    "delete_job",
    "get_job",
    "list_jobs",
    "reconcile_job",
    "start_job",
]
