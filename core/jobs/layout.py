"""The job folder: its files, the :class:`JobInfo` read from them, and how a job's state is derived from them and
from its process (see :mod:`core.jobs` for the files and the rules). Reading never raises for a broken folder: it
is a job in state ``unknown`` with the reason."""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import JobError, UsageError
from core.jobs.processes import describe_exit, process_alive
from core.store import DEFAULT_STORE_DIR

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

SPEC_FILE = "spec.json"
"""What the job runs (its :class:`core.jobs.spec.JobSpec` as JSON): the training process reads it back."""

STATES = ("starting", "running", "cancelling", "finished", "killed", "failed", "died", "unknown")
"""Every state a :class:`JobInfo` can be in."""

ACTIVE_STATES = frozenset({"starting", "running", "cancelling"})
"""States whose process is alive: such a job can be cancelled and cannot be deleted."""

DIED_ERROR = "training process {pid} exited without finishing (killed or crashed)"
"""The ``error`` tag of a run ended KILLED because its training process died (a job's, or an orphaned run's)."""

_JOB_ID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
MAX_PROCESSES = 64
"""Most training processes one job may start on this machine."""
_SPAWN_GRACE = 60.0  # seconds a job may stay without a pid before it counts as never started


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
    spec: dict | None = None
    """What the job runs: its ``spec.json`` (a :class:`~core.jobs.spec.JobSpec` as JSON); None if unreadable."""
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
    """What the job runs, its spec's ``kind``: ``train`` (one training run) or ``sweep`` (a sweep of them)."""
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


def jobs_root_or_default(jobs_root: str | Path | None) -> Path:
    return Path(jobs_root) if jobs_root is not None else default_jobs_root()


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def job_folder(job_id: str, jobs_root: str | Path | None) -> Path:
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
        raise UsageError(f"invalid job id {job_id!r}: expected YYYYMMDD-HHMMSS-xxxxxx")
    path = jobs_root_or_default(jobs_root) / job_id
    if not path.is_dir():
        raise JobError(f"no job {job_id} in {jobs_root_or_default(jobs_root)}")
    return path


def read_json(path: Path) -> tuple[dict | None, str | None]:
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


def one_line(exc: BaseException) -> str:
    """``Type: message`` cut to its first line (database errors append the SQL and a link)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def read_job(job_dir: Path) -> JobInfo:
    """The job in ``job_dir`` with its state, never raising for a broken folder (see the module docstring)."""
    meta, problem = read_json(job_dir / JOB_FILE)
    if meta is None:
        return JobInfo(job_dir.name, job_dir, "unknown", reason=problem or f"{JOB_FILE} is missing")
    pid, create_time = meta.get("pid"), meta.get("create_time")
    if not (pid is None or (isinstance(pid, int) and pid > 0)) or not (
        create_time is None or isinstance(create_time, (int, float))
    ):
        return JobInfo(job_dir.name, job_dir, "unknown", reason=f"{JOB_FILE} is corrupt (bad pid or create_time)")
    # Whether the process lives is decided before its files are read: it writes result.json before it exits, so
    # a process found gone has all its files on disk (the other order could miss a result written in between).
    alive = process_alive(pid, create_time)
    info = JobInfo(
        job_id=job_dir.name,
        job_dir=job_dir,
        state="unknown",
        pid=pid,
        pgid=meta.get("pgid"),
        label=meta.get("label"),
        argv=list(meta.get("argv") or []),
        created_at=meta.get("created_at"),
        tracking_uri=meta.get("tracking_uri"),
    )
    notes = []
    run, problem = read_json(job_dir / RUN_FILE)
    notes.append(problem)
    info.run_id = run.get("run_id") if run else None
    info.trainer_pid = run.get("pid") if run else None
    info.processes = meta.get("processes") or 1
    info.kind = meta.get("kind") or "train"
    info.spec, problem = read_json(job_dir / SPEC_FILE)
    notes.append(problem)
    if info.kind == "sweep":
        info.sweep, problem = read_json(job_dir / SWEEP_FILE)
        notes.append(problem)
    info.progress, problem = read_json(job_dir / PROGRESS_FILE)
    notes.append(problem)
    info.result, problem = read_json(job_dir / RESULT_FILE)
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
        notes.insert(0, f"training process {info.pid} {what}{describe_exit(info.pid)}")
    reconciled, _ = read_json(job_dir / RECONCILED_FILE)  # a broken one only loses its note
    if reconciled and reconciled.get("note"):
        notes.append(reconciled["note"])
    info.reason = "; ".join(n for n in notes if n) or None
    return info
