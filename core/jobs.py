"""Background training jobs: training runs started as separate processes that outlive the page that started them.

A job is a folder ``<jobs_root>/<job_id>/`` (default ``mlruns/jobs``) and a ``python -m pipelines.train ... --job-dir
<folder>`` process in its own process group (its own session, so a Ctrl-C in the app's terminal does not reach it
and :func:`cancel_job` can signal the whole group). Everything about a job is on disk, so any process (another
browser tab, the app after a restart) sees the same jobs; nothing is kept only in memory.

On-disk layout of a job folder (every JSON file is replaced atomically, so a reader never sees half a file):

- ``job.json``: written by :func:`start_job`: ``job_id``, ``pid`` and ``pgid`` (null for the instant before the
  process exists), ``create_time`` (the process's start time, to tell it from a later process reusing the pid),
  ``argv``, ``train_args``, ``label``, ``tracking_uri``, ``created_at`` (Unix seconds).
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

A job can also be a hyperparameter sweep (``kind`` ``sweep`` in ``job.json``): ``python -m pipelines.sweep ...
--job-dir <folder>``, whose trials train one after another in the same process. Its folder has the same files
(``run.json`` names the sweep's parent run, ``progress.json`` is the running trial's) and ``sweep.json`` with the
sweep's status; see :mod:`core.sweep_jobs`.

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

Runs started outside a job (``python -m pipelines.train`` in a terminal) have no job folder, but every training
run is created with the tags :data:`core.tracking.HOST_TAG`, :data:`~core.tracking.PID_TAG` and
:data:`~core.tracking.PROCESS_START_TAG` (:func:`core.tracking.run_tags`). :func:`reap_orphan_runs` ends KILLED
(tag ``error`` as above) every RUNNING run of a store whose host tag names this machine and whose process (same
pid *and* start time) is gone; a run of another host, or without those tags, is never touched. :func:`reap` does
both: every job, then every such run (``python -m pipelines.jobs reap``).

Signals and process groups are POSIX: jobs work on Linux and macOS; on Windows :func:`start_job` and
:func:`cancel_job` raise :class:`JobError`. The module knows nothing of Streamlit.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch

from core.callbacks import Callback, TrainResult
from core.errors import StudioError, UsageError
from core.store import DEFAULT_STORE_DIR, REPO_ROOT, sqlite_path

if TYPE_CHECKING:
    from core.experiment import TrainingOutcome

DEFAULT_JOBS_ROOT = DEFAULT_STORE_DIR / "jobs"
"""Where jobs of a store without a local folder (a tracking server) live (git-ignored with the rest of ``mlruns/``)."""


def default_jobs_root(uri: str | None = None) -> Path:
    """Where the jobs of tracking store ``uri`` (default: the current one) live: a ``jobs`` folder beside a SQLite
    store's database, so each local store keeps its own jobs, else :data:`DEFAULT_JOBS_ROOT`."""
    from core.store import sqlite_path, tracking_uri

    db = sqlite_path(uri or tracking_uri())
    return db.parent / "jobs" if db is not None else DEFAULT_JOBS_ROOT


JOB_FILE = "job.json"
RUN_FILE = "run.json"
PROGRESS_FILE = "progress.json"
RESULT_FILE = "result.json"
CANCEL_FILE = "cancel.json"
RECONCILED_FILE = "reconciled.json"
LOG_FILE = "train.log"
SWEEP_FILE = "sweep.json"

JOB_MODULES = {"train": "pipelines.train", "sweep": "pipelines.sweep"}
"""What each kind of job runs (``python -m <module> <args> --job-dir <folder>``)."""

STATES = ("starting", "running", "cancelling", "finished", "killed", "failed", "died", "unknown")
"""Every state a :class:`JobInfo` can be in."""

ACTIVE_STATES = frozenset({"starting", "running", "cancelling"})
"""States whose process is alive: such a job can be cancelled and cannot be deleted."""

DIED_ERROR = "training process {pid} exited without finishing (killed or crashed)"
"""The ``error`` tag of a run ended KILLED because its training process died (a job's, or an orphaned run's)."""

_JOB_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
_CREATE_TIME_TOLERANCE = 1.0  # seconds; psutil's start times of one process agree far closer than this
MAX_PROCESSES = 64
"""Most training processes one job may start on this machine."""
_SPAWN_GRACE = 60.0  # seconds a job may stay without a pid before it counts as never started
_POLL_INTERVAL = 0.1
_SIGKILL_WAIT = 5.0  # seconds to wait for a SIGKILLed group to disappear

# Popen objects of the jobs this process started: polling them reaps the exited child (no zombie) and keeps
# subprocess from warning that a child it still tracks was garbage-collected while running.
_children: dict[int, subprocess.Popen] = {}
# Exit codes of children this process reaped (Popen convention: negative = killed by that signal).
_exit_codes: dict[int, int] = {}


class JobError(StudioError):
    """A job request that cannot be done (unknown job, deleting a running job, no POSIX signals)."""


# -- the training process's side --------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    """JSON has no NaN or infinity; a non-finite number is recorded as null."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` to ``path`` atomically: a reader sees the old file or the new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


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
        _write_json(self.path, self.state)
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
            self.state[key] = _finite(metrics.get(key))
        if "planned_steps" in metrics:  # a time-budget run: its plan, not the step cap, is where it ends
            self.max_steps = self.state["max_steps"] = int(metrics["planned_steps"])
        if step >= self.max_steps or time.monotonic() - self._last_write >= self.min_interval:
            self._write()

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Record the evaluation and write at once (evaluations are rare and worth showing immediately)."""
        self.state["val_loss"] = _finite(metrics.get("val_loss"))
        self.state["val_bpc"] = _finite(metrics.get("val_bpc"))
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
        _write_json(
            self.job_dir / RUN_FILE,
            {"run_id": run_id, "experiment_id": experiment_id, "pid": os.getpid(), "recorded_at": time.time()},
        )
        client.set_tag(run_id, "studio.job_id", self.job_id)
        client.set_tag(run_id, "studio.job_pid", str(os.getpid()))

    def record_outcome(self, outcome: TrainingOutcome, exit_code: int) -> None:
        """Record a training that returned, and the exit code the process is about to exit with."""
        self._record(
            status=outcome.status,
            exit_code=exit_code,
            run_id=outcome.run_id,
            model_name=outcome.model_name,
            model_version=outcome.model_version,
            stop_reason=outcome.result.stop_reason,
            steps=outcome.result.steps,
            error=None,
            run_ended=True,  # run_training ends the run before it returns
        )

    def _record(self, **fields) -> None:
        _write_json(self.job_dir / RESULT_FILE, {**fields, "ended_at": time.time()})
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
            error=_one_line(exc)[:2000],
            run_ended=None,  # run_training tries to end the run on an error; reconciliation checks it did
        )


# -- the app's side ------------------------------------------------------------------------------------------------


@dataclass
class JobInfo:
    """A job as read from its folder (see the module docstring for the files and the state rules)."""

    job_id: str
    job_dir: Path
    state: str
    """One of :data:`STATES`."""
    reason: str | None = None
    """Why the job is in its state when that needs saying (the error of a failed job, how a job died, why it
    is unknown, a reconciliation that could not reach the store); None otherwise."""
    pid: int | None = None
    pgid: int | None = None
    run_id: str | None = None
    """The MLflow run, None until the training process has created it."""
    label: str | None = None
    argv: list[str] = field(default_factory=list)
    """The command the job runs."""
    train_args: list[str] = field(default_factory=list)
    """The arguments given to :func:`start_job`."""
    created_at: float | None = None
    """Unix time the job was started."""
    tracking_uri: str | None = None
    progress: dict | None = None
    """The contents of ``progress.json``; None before training starts."""
    result: dict | None = None
    """The contents of ``result.json``; None while the process runs or if it died."""
    model_name: str | None = None
    model_version: str | None = None
    trainer_pid: int | None = None
    """The process that trains the run, from ``run.json``: the job's own, or rank 0's in a torchrun job."""
    processes: int = 1
    """Training processes of the job (more than one: started through torchrun)."""
    kind: str = "train"
    """A key of :data:`JOB_MODULES`: one training run, or a sweep of them."""
    sweep: dict | None = None
    """A sweep job's ``sweep.json`` (see :mod:`core.sweep_jobs`); None for a training job, or before it exists."""

    @property
    def log_path(self) -> Path:
        """The job's combined stdout and stderr."""
        return self.job_dir / LOG_FILE

    @property
    def is_active(self) -> bool:
        """Whether the job's process is alive."""
        return self.state in ACTIVE_STATES

    def log_tail(self, max_lines: int = 50, max_bytes: int = 64 * 1024) -> str:
        """The last ``max_lines`` lines of the log (reading at most its last ``max_bytes``); "" if there is none."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_bytes))
                data = f.read()
        except FileNotFoundError:
            return ""
        lines = data.decode("utf-8", errors="replace").splitlines()
        if size > max_bytes and lines:
            lines = lines[1:]  # the first line read is probably cut
        return "\n".join(lines[-max_lines:])


def _require_posix() -> None:
    if os.name != "posix":
        raise JobError("background training jobs need POSIX process groups and signals (Linux or macOS)")


def _jobs_root(jobs_root: str | Path | None) -> Path:
    return Path(jobs_root) if jobs_root is not None else default_jobs_root()


def _new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def _job_dir(job_id: str, jobs_root: str | Path | None) -> Path:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise UsageError(f"invalid job id {job_id!r}: expected YYYYMMDD-HHMMSS-xxxxxx")
    path = _jobs_root(jobs_root) / job_id
    if not path.is_dir():
        raise JobError(f"no job {job_id} in {_jobs_root(jobs_root)}")
    return path


def _absolute_tracking_uri(uri: str) -> str:
    """A relative ``sqlite:///`` path resolved against this process's cwd (the job runs in the repo root)."""
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"sqlite:///{db.resolve()}"
    return uri


def validate_train_args(train_args: Sequence[str], processes: int = 1) -> None:
    """Check ``train_args`` the way ``python -m pipelines.train`` would, raising :class:`UsageError` (one line).

    Checks the arguments themselves, the config values they make, that a local ``--data`` file exists, that a
    named ``--device`` is available, and that ``processes`` can run there (CPU or one GPU each, never MPS);
    ``--job-dir`` and ``--help`` are refused (the job manager owns those).
    """
    if isinstance(processes, bool) or not isinstance(processes, int) or not 1 <= processes <= MAX_PROCESSES:
        raise UsageError(f"processes must be an integer from 1 to {MAX_PROCESSES}, got {processes!r}")
    from core.data import is_url
    from core.device import resolve_device
    from pipelines.train import build_configs, build_parser

    args = [str(a) for a in train_args]
    for arg in args:
        if arg in ("-h", "--help"):
            raise UsageError("--help is not a training argument")
    parser = build_parser()

    def refuse(message: str):
        raise UsageError(f"invalid training arguments: {message}")

    parser.error = refuse  # argparse calls error(); the parser's own version prints and exits
    parsed = parser.parse_args(args)
    if parsed.job_dir is not None:
        raise UsageError("--job-dir is set by the job manager; leave it out")
    try:
        _, data_config, train_config, _ = build_configs(parsed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not is_url(data_config.source):
        source = Path(data_config.source)
        if not (source if source.is_absolute() else REPO_ROOT / source).is_file():
            raise UsageError(f"corpus file not found: {data_config.source}")
    device = resolve_device(train_config.device)
    if processes > 1 and device.type == "mps":
        raise UsageError("multi-process training does not run on MPS; use 1 process or the CPU device")
    if processes > 1 and device.type == "cuda" and processes > torch.cuda.device_count():
        raise UsageError(f"{processes} processes need {processes} GPUs; this machine has {torch.cuda.device_count()}")


def start_job(
    train_args: Sequence[str],
    *,
    jobs_root: str | Path | None = None,
    tracking_uri: str | None = None,
    label: str | None = None,
    processes: int = 1,
    kind: str = "train",
) -> JobInfo:
    """Start ``python -m pipelines.train <train_args> --job-dir <folder>`` as a background job.

    With ``kind="sweep"`` the job is ``python -m pipelines.sweep <train_args> --job-dir <folder>`` instead, a
    hyperparameter sweep whose arguments are checked by the sweep CLI's ``--check``
    (:func:`core.sweep_jobs.validate_sweep_args`); it runs as one process.

    With ``processes`` > 1 the job is a torchrun job of that many training processes on this machine
    (``python -m torch.distributed.run --standalone --nproc_per_node=N -m pipelines.train ...``); the launcher
    heads the process group, so cancelling stops every process.

    ``train_args`` are validated first (:func:`validate_train_args`): a bad one raises :class:`UsageError` and
    nothing is created or spawned. The process runs in the repository root, in its own session and process group,
    with stdout and stderr in ``train.log`` and ``MLFLOW_TRACKING_URI`` set to ``tracking_uri`` (default: the
    current store, :func:`core.store.tracking_uri`). Returns the job, normally in state ``starting``.
    """
    from core.store import tracking_uri as current_tracking_uri

    _require_posix()
    uri = _absolute_tracking_uri(tracking_uri or current_tracking_uri())
    if kind == "sweep":
        from core.sweep_jobs import validate_sweep_args

        if processes != 1:
            raise UsageError("a sweep trains its trials one after another in one process; processes must be 1")
        validate_sweep_args(train_args, uri)
    elif kind == "train":
        validate_train_args(train_args, processes)
    else:
        raise UsageError(f"unknown job kind {kind!r}; choose one of: {', '.join(JOB_MODULES)}")
    train_args = [str(a) for a in train_args]
    root = _jobs_root(jobs_root)
    root.mkdir(parents=True, exist_ok=True)

    # The folder is prepared under a hidden name and renamed into place, so a listing never sees a job folder
    # without its job.json.
    while True:
        job_id = _new_job_id()
        job_dir = root / job_id
        if not job_dir.exists():
            break
    staging = root / f".{job_id}.staging"
    staging.mkdir()
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    argv = [*launcher, "-m", JOB_MODULES[kind], *train_args, "--job-dir", str(job_dir)]
    meta: dict[str, Any] = {
        "kind": kind,
        "processes": processes,
        "job_id": job_id,
        "pid": None,
        "pgid": None,
        "create_time": None,
        "argv": argv,
        "train_args": train_args,
        "label": label,
        "tracking_uri": uri,
        "created_at": time.time(),
    }
    _write_json(staging / JOB_FILE, meta)
    os.rename(staging, job_dir)

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    with open(job_dir / LOG_FILE, "ab") as log:
        try:
            process = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own session and process group (pgid == pid), detached from our terminal
            )
        except OSError as exc:
            _write_json(
                job_dir / RESULT_FILE,
                {"status": "FAILED", "exit_code": None, "error": f"could not start the training process: {exc}"},
            )
            raise JobError(f"could not start the training process: {exc}") from exc
    _children[process.pid] = process
    try:
        create_time = psutil.Process(process.pid).create_time()
    except psutil.NoSuchProcess:
        # It exited (and was reaped) already; the state logic then reads its result or reports it died.
        create_time = None
    meta.update(pid=process.pid, pgid=process.pid, create_time=create_time)
    _write_json(job_dir / JOB_FILE, meta)
    return get_job(job_id, jobs_root=root)


def _reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is an exited child of this process, so it is no zombie."""
    if os.name != "posix":
        return
    process = _children.get(pid)
    if process is not None:
        if process.poll() is not None:
            _exit_codes[pid] = process.returncode
            del _children[pid]
        return
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return  # not our child (started by another process, or already reaped): its parent reaps it
    if reaped == pid:
        _exit_codes[pid] = os.waitstatus_to_exitcode(status)


def _process_alive(pid: int | None, create_time: float | None) -> bool:
    """Whether the job's process still runs: same pid and start time (not a reused pid), and not a zombie."""
    if pid is None:
        return False
    _reap(pid)
    if pid in _children:
        # Our own child, not reapable yet: still running, or exiting. (A multi-threaded process can already look
        # like a zombie while its other threads finish; it has ended only once it can be reaped.)
        return True
    if create_time is None:
        return False  # start_job could not read it: the process had exited already
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - create_time) > _CREATE_TIME_TOLERANCE:
            return False  # the pid now belongs to another process
        return process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return False  # another user's process: jobs run as the user who started them, so not one of ours


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    """(contents, None), (None, None) if the file is missing, or (None, what is wrong with it)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"{path.name} unreadable: {exc}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"{path.name} is corrupt ({exc})"
    if not isinstance(data, dict):
        return None, f"{path.name} is corrupt (not a JSON object)"
    return data, None


def _one_line(exc: BaseException) -> str:
    """``Type: message`` cut to its first line (database errors append the SQL and a link)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _describe_exit(pid: int | None) -> str:
    code = _exit_codes.get(pid) if pid is not None else None
    if code is None:
        return ""
    if code < 0:
        try:
            return f"; killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"; killed by signal {-code}"
    return f"; exit code {code}"


def _read_job(job_dir: Path) -> JobInfo:
    """The job in ``job_dir`` with its state, never raising for a broken folder (see the module docstring)."""
    meta, problem = _read_json(job_dir / JOB_FILE)
    if meta is None:
        return JobInfo(job_dir.name, job_dir, "unknown", reason=problem or f"{JOB_FILE} is missing")
    pid, create_time = meta.get("pid"), meta.get("create_time")
    if not (pid is None or (isinstance(pid, int) and pid > 0)) or not (
        create_time is None or isinstance(create_time, (int, float))
    ):
        return JobInfo(job_dir.name, job_dir, "unknown", reason=f"{JOB_FILE} is corrupt (bad pid or create_time)")
    # Whether the process lives is decided before its files are read: it writes result.json before it exits, so
    # a process found gone has all its files on disk (the other order could miss a result written in between).
    alive = _process_alive(pid, create_time)
    info = JobInfo(
        job_id=job_dir.name,
        job_dir=job_dir,
        state="unknown",
        pid=pid,
        pgid=meta.get("pgid"),
        label=meta.get("label"),
        argv=list(meta.get("argv") or []),
        train_args=list(meta.get("train_args") or []),
        created_at=meta.get("created_at"),
        tracking_uri=meta.get("tracking_uri"),
    )
    notes = []
    run, problem = _read_json(job_dir / RUN_FILE)
    notes.append(problem)
    info.run_id = run.get("run_id") if run else None
    info.trainer_pid = run.get("pid") if run else None
    info.processes = meta.get("processes") or 1
    info.kind = meta.get("kind") or "train"
    if info.kind == "sweep":
        info.sweep, problem = _read_json(job_dir / SWEEP_FILE)
        notes.append(problem)
    info.progress, problem = _read_json(job_dir / PROGRESS_FILE)
    notes.append(problem)
    info.result, problem = _read_json(job_dir / RESULT_FILE)
    notes.append(problem)
    cancelled = (job_dir / CANCEL_FILE).exists()  # only its presence matters
    if info.result:
        info.run_id = info.run_id or info.result.get("run_id")
        info.model_name = info.result.get("model_name")
        info.model_version = info.result.get("model_version")

    if alive:
        info.state = "cancelling" if cancelled else ("running" if info.progress else "starting")
    elif info.result and str(info.result.get("status", "")).lower() in ("finished", "killed", "failed"):
        info.state = str(info.result["status"]).lower()
        if info.state == "failed":
            notes.insert(0, info.result.get("error"))
    elif info.pid is None and time.time() - (info.created_at or 0) < _SPAWN_GRACE:
        info.state = "starting"  # start_job is between creating the folder and spawning the process
    elif info.pid is None:
        info.state = "died"
        notes.insert(0, "the job was created but its training process never started")
    else:
        info.state = "killed" if cancelled else "died"
        what = "was cancelled and killed before it could finish" if cancelled else "exited without finishing"
        notes.insert(0, f"training process {info.pid} {what}{_describe_exit(info.pid)}")
    reconciled, _ = _read_json(job_dir / RECONCILED_FILE)  # a broken one only loses its note
    if reconciled and reconciled.get("note"):
        notes.append(reconciled["note"])
    info.reason = "; ".join(n for n in notes if n) or None
    return info


def _needs_reconcile(info: JobInfo) -> bool:
    if info.is_active or info.state == "unknown" or info.run_id is None:
        return False
    if (info.job_dir / RECONCILED_FILE).exists():
        return False
    return not (info.result and info.result.get("run_ended"))


def _reconcile(info: JobInfo) -> JobInfo:
    """End the MLflow run of an ended job if it is still RUNNING; raises if the store cannot be reached."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from core.store import check_server
    from core.tracking import PID_TAG

    uri = info.tracking_uri
    db = sqlite_path(uri) if uri else None
    if uri is None or (db is not None and not db.exists()):
        # No store to fix (it was removed): opening the URI would create an empty database instead.
        _write_json(info.job_dir / RECONCILED_FILE, {"run_status": None, "note": f"tracking store {uri} is gone"})
        return _read_job(info.job_dir)
    if db is None and uri.startswith(("http://", "https://")):
        check_server(uri)  # fails in seconds; MLflow's client would retry an unreachable server for minutes
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not core.store.connect: no global URI change
    try:
        run = client.get_run(info.run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        note = f"MLflow run {info.run_id} no longer exists in {uri}"
        _write_json(info.job_dir / RECONCILED_FILE, {"run_status": None, "note": note})
        return _read_job(info.job_dir)
    status = run.info.status
    record: dict[str, Any] = {"run_status": status, "at": time.time(), "exit_code": _exit_codes.get(info.pid)}
    trainer_pid = run.data.tags.get(PID_TAG)
    if status == "RUNNING" and trainer_pid not in (None, str(info.pid), str(info.trainer_pid)):
        # Another process has taken the run over since (it was resumed): its liveness is not this job's to judge;
        # reap_orphan_runs ends the run if that process dies too.
        record["note"] = f"its MLflow run {info.run_id} is now trained by process {trainer_pid}"
    elif status == "RUNNING":
        if info.state == "killed":
            tag, why, new_status = "stop_reason", f"cancelled: training process {info.pid} was killed", "KILLED"
        elif info.state == "failed":
            # The process recorded its training error but could not end the run (e.g. the store failed too).
            tag, why, new_status = "error", (info.result or {}).get("error") or "training failed", "FAILED"
        else:
            # Died: killed from outside or crashed hard, with no chance to say why; KILLED like any stopped run.
            tag, why, new_status = "error", DIED_ERROR.format(pid=info.pid), "KILLED"
        client.set_tag(info.run_id, tag, why)
        client.set_terminated(info.run_id, new_status)
        record.update(
            run_status=new_status,
            previous_status=status,
            run_reason=why,
            note=f"its MLflow run {info.run_id} was still RUNNING and has been ended {new_status}",
        )
    _write_json(info.job_dir / RECONCILED_FILE, record)
    return _read_job(info.job_dir)


def reconcile_job(job_id: str, jobs_root: str | Path | None = None) -> JobInfo:
    """End the MLflow run of job ``job_id`` if its process is gone but the run is still RUNNING.

    A died job's run becomes KILLED with the tag ``error`` = :data:`DIED_ERROR`; a cancelled job's run becomes
    KILLED with a ``stop_reason``; a failed job's run becomes FAILED with its error. A no-op for a running job or
    one already reconciled. Unlike :func:`list_jobs`, MLflow errors raise.
    """
    info = _read_job(_job_dir(job_id, jobs_root))
    return _reconcile(info) if _needs_reconcile(info) else info


def _read_and_reconcile(job_dir: Path, failed_stores: dict[str, str] | None = None) -> JobInfo:
    """:func:`_read_job`, then :func:`_reconcile` if needed; a store error goes into the job's ``reason``.

    ``failed_stores`` (tracking URI → error) lets one listing try an unreachable store once, not once per job.
    """
    info = _read_job(job_dir)
    if not _needs_reconcile(info):
        return info
    failed_stores = {} if failed_stores is None else failed_stores
    error = failed_stores.get(info.tracking_uri or "")
    if error is None:
        try:
            return _reconcile(info)
        except Exception as exc:  # one unreachable store must not hide the other jobs; the error is shown instead
            error = failed_stores[info.tracking_uri or ""] = _one_line(exc)
    info.reason = "; ".join(filter(None, [info.reason, f"could not check MLflow run {info.run_id}: {error}"]))
    return info


def list_jobs(jobs_root: str | Path | None = None) -> list[JobInfo]:
    """Every job under ``jobs_root``, newest first, reconciling the MLflow runs of jobs that died.

    A folder whose files are broken is listed as ``unknown`` with the reason; a missing ``jobs_root`` has no jobs.
    """
    root = _jobs_root(jobs_root)
    if not root.is_dir():
        return []
    # Hidden folders are jobs still being created by start_job; anything else is shown, even if it is broken.
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    failed_stores: dict[str, str] = {}
    jobs = [_read_and_reconcile(p, failed_stores) for p in folders]
    # A folder deleted (delete_job in another session) while this listing read it is gone, not broken.
    jobs = [j for j in jobs if j.state != "unknown" or j.job_dir.exists()]
    return sorted(jobs, key=lambda j: (j.job_id[:15], j.created_at or 0.0, j.job_id), reverse=True)


def get_job(job_id: str, jobs_root: str | Path | None = None) -> JobInfo:
    """The job ``job_id`` (reconciled like :func:`list_jobs`); :class:`JobError` if there is no such job."""
    return _read_and_reconcile(_job_dir(job_id, jobs_root))


def _live_group_members(pgid: int) -> list[int]:
    """Pids of the processes of group ``pgid`` that are not zombies."""
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid and process.status() != psutil.STATUS_ZOMBIE:
                members.append(process.pid)
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # it exited while we looked, or it is another user's: not a member of our job's group
    return members


def _descendants(pid: int) -> list[psutil.Process]:
    """Every process that ``pid`` has started, in its group or not: torchrun starts each worker in a session of its
    own, out of reach of the group's signals."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []  # it exited while we looked


def _wait_until_gone(
    pid: int, pgid: int, create_time: float | None, descendants: list[psutil.Process], timeout: float
) -> bool:
    """Wait until the job's process has exited (and is reaped, if it is our child), its group has no live member
    left and none of ``descendants`` runs; False if that takes more than ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (
        _process_alive(pid, create_time)
        or _live_group_members(pgid)
        or any(_process_alive(process.pid, process.create_time()) for process in descendants)
    ):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_INTERVAL)
    return True


def cancel_job(job_id: str, jobs_root: str | Path | None = None, timeout: float = 20.0) -> JobInfo:
    """Stop job ``job_id`` and return it in its final state (normally ``killed``).

    Sends SIGTERM to the job's process group, so training stops after its current step, saves a checkpoint and
    ends its run KILLED (torchrun's launcher passes it on to its workers); if the processes have not exited after
    ``timeout`` seconds, the group and every process the job started get SIGKILL. If the run is then still RUNNING
    it is set KILLED. Cancelling a job that has already ended does nothing and returns it.
    Blocks until the process is gone (at most ``timeout`` + a few seconds). POSIX only.
    """
    _require_posix()
    job_dir = _job_dir(job_id, jobs_root)
    info = _read_job(job_dir)
    if not info.is_active:
        return get_job(job_id, jobs_root)
    if not (job_dir / CANCEL_FILE).exists():
        _write_json(job_dir / CANCEL_FILE, {"requested_at": time.time(), "by_pid": os.getpid()})
    deadline = time.monotonic() + timeout
    meta, _ = _read_json(job_dir / JOB_FILE)
    while (meta or {}).get("pid") is None and time.monotonic() < deadline:
        # start_job (maybe in another process) is about to spawn it: wait for the pid to signal.
        time.sleep(_POLL_INTERVAL)
        meta, _ = _read_json(job_dir / JOB_FILE)
    pid, create_time = (meta or {}).get("pid"), (meta or {}).get("create_time")
    if pid is None:
        return get_job(job_id, jobs_root)  # never spawned: with the cancel file it reads as killed
    pgid = meta.get("pgid") or pid
    # Signal the group only while its leader is verifiably our process: a reused pid must never be signalled.
    if _process_alive(pid, create_time):
        # torchrun's workers, in sessions of their own, get the SIGTERM from the launcher, which waits for them;
        # taken now, while the launcher is their parent, so that they can be waited for and killed too.
        descendants = _descendants(pid)
        with contextlib.suppress(ProcessLookupError):  # it exited between the check and the signal
            os.killpg(pgid, signal.SIGTERM)
        if not _wait_until_gone(pid, pgid, create_time, descendants, max(0.0, deadline - time.monotonic())):
            # Still there after the timeout (a long final evaluation, or hung): no more waiting. The group was
            # verifiably the job's a moment ago, and its members (the trainer and anything it started) all go.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            for process in descendants:
                # psutil refuses a pid that no longer belongs to the process it listed
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    process.kill()
            if not _wait_until_gone(pid, pgid, create_time, descendants, _SIGKILL_WAIT):
                raise JobError(f"job {job_id}: processes of group {pgid} are still alive after SIGKILL")
    # Ends a still-RUNNING run KILLED; an unreachable store shows in the job's reason (the process is gone anyway).
    return get_job(job_id, jobs_root)


def delete_job(job_id: str, jobs_root: str | Path | None = None) -> None:
    """Remove the folder of job ``job_id`` (never its MLflow run, checkpoints or model versions).

    Refuses (:class:`JobError`) while the job's process is alive: cancel it first.
    """
    job_dir = _job_dir(job_id, jobs_root)
    info = _read_job(job_dir)
    if info.is_active:
        raise JobError(f"job {job_id} is {info.state}; cancel it before deleting it")
    shutil.rmtree(job_dir)


# -- reaping: every run left RUNNING by a process that is gone ----------------------------------------------------


@dataclass
class Reaped:
    """A RUNNING MLflow run whose training process was gone, ended by :func:`reap` or :func:`reap_orphan_runs`."""

    run_id: str
    status: str
    """The status the run was ended with: KILLED (FAILED for the run of a job whose training failed)."""
    pid: int | None
    """The training process that was gone."""
    reason: str
    """The tag set on the run to say why (``error`` or ``stop_reason``)."""
    job_id: str | None = None
    """The job the run belongs to; None for a run started outside a job."""


@dataclass
class ReapReport:
    """What :func:`reap` did."""

    reaped: list[Reaped]
    """Every run it ended, jobs' runs first."""
    problems: list[str]
    """One line per store or job it could not check (e.g. an unreachable tracking server); empty if none."""


def _all_pages(search, **kwargs) -> list:
    """Every result of a paginated MLflow search call."""
    results, token = [], None
    while True:
        page = search(page_token=token, **kwargs)
        results.extend(page)
        token = page.token
        if not token:
            return results


def _number(text: str | None, kind: type) -> Any:
    try:
        return kind(text) if text is not None else None
    except ValueError:
        return None


def reap_orphan_runs(tracking_uri: str | None = None) -> list[Reaped]:
    """End KILLED every RUNNING run of store ``tracking_uri`` (default: the current one) whose process died here.

    A run qualifies when its :data:`core.tracking.HOST_TAG` is this machine's host name and no live process has
    its :data:`~core.tracking.PID_TAG` *and* :data:`~core.tracking.PROCESS_START_TAG` (a pid reused by another
    process does not count as alive); it gets the tag ``error`` = :data:`DIED_ERROR`. A run of another host, or
    without those tags (made by other tools, or before the tags existed), is never touched. Returns the runs it
    ended; MLflow errors and an unreachable server (:class:`core.store.StoreError`) raise.
    """
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    from core.store import check_server
    from core.store import tracking_uri as current_tracking_uri
    from core.tracking import HOST_TAG, PID_TAG, PROCESS_START_TAG

    uri = _absolute_tracking_uri(tracking_uri or current_tracking_uri())
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return []  # no store, no runs (opening the URI would create an empty database)
    if db is None and uri.startswith(("http://", "https://")):
        check_server(uri)  # fails in seconds; MLflow's client would retry an unreachable server for minutes
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not core.store.connect: no global URI change
    experiment_ids = [e.experiment_id for e in _all_pages(client.search_experiments, view_type=ViewType.ACTIVE_ONLY)]
    if not experiment_ids:
        return []
    running = _all_pages(
        client.search_runs, experiment_ids=experiment_ids, filter_string="attributes.status = 'RUNNING'"
    )
    host = socket.gethostname()
    process_keys = (HOST_TAG, PID_TAG, PROCESS_START_TAG)
    reaped = []
    for run in running:
        tags = run.data.tags
        pid, started = _number(tags.get(PID_TAG), int), _number(tags.get(PROCESS_START_TAG), float)
        if tags.get(HOST_TAG) != host or pid is None or started is None or _process_alive(pid, started):
            continue
        run_id = run.info.run_id
        # Its process is gone, but the run may have ended, or been resumed by another process, in between: a
        # finished run must never be turned KILLED, nor a live one.
        current = client.get_run(run_id)
        if current.info.status != "RUNNING" or any(current.data.tags.get(k) != tags.get(k) for k in process_keys):
            continue  # it ended, or another process resumed it, between the search and the process check
        error = DIED_ERROR.format(pid=pid)
        client.set_tag(run_id, "error", error)
        client.set_terminated(run_id, "KILLED")
        reaped.append(Reaped(run_id, "KILLED", pid, error, job_id=tags.get("studio.job_id")))
    return reaped


def reap(jobs_root: str | Path | None = None, tracking_uri: str | None = None) -> ReapReport:
    """Reconcile every ended job under ``jobs_root``, then :func:`reap_orphan_runs` of ``tracking_uri``.

    ``tracking_uri`` defaults to the current store and ``jobs_root`` to that store's (:func:`default_jobs_root`).
    Never raises for a store it cannot reach: each job or store that could not be checked is one line of
    :attr:`ReapReport.problems`, and the rest is still done.
    """
    from mlflow.exceptions import MlflowException

    from core.store import tracking_uri as current_tracking_uri

    uri = tracking_uri or current_tracking_uri()
    root = Path(jobs_root) if jobs_root is not None else default_jobs_root(uri)
    report = ReapReport([], [])
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    failed_stores: dict[str, str] = {}
    for folder in folders:
        info = _read_job(folder)
        if not _needs_reconcile(info):
            continue
        error = failed_stores.get(info.tracking_uri or "")
        if error is None:
            try:
                _reconcile(info)
            except Exception as exc:  # one unreachable store must not stop the rest, as in list_jobs
                error = failed_stores[info.tracking_uri or ""] = _one_line(exc)
        if error is not None:
            report.problems.append(f"job {info.job_id}: could not check MLflow run {info.run_id}: {error}")
            continue
        record, _ = _read_json(folder / RECONCILED_FILE)
        if record and record.get("previous_status") == "RUNNING":
            reason = record.get("run_reason") or ""
            report.reaped.append(Reaped(info.run_id, record["run_status"], info.pid, reason, job_id=info.job_id))
    try:
        report.reaped += reap_orphan_runs(uri)
    except (StudioError, MlflowException, OSError) as exc:
        report.problems.append(f"could not check the RUNNING runs of {uri}: {_one_line(exc)}")
    return report
