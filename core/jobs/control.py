"""Starting, listing, reconciling, cancelling and deleting jobs (see :mod:`core.jobs` for the rules)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from core.atomic import atomic_folder, write_json
from core.errors import JobError
from core.jobs.layout import (
    CANCEL_FILE,
    DIED_ERROR,
    JOB_FILE,
    LOG_FILE,
    RECONCILED_FILE,
    RESULT_FILE,
    SPEC_FILE,
    JobInfo,
    job_folder,
    jobs_root_or_default,
    new_job_id,
    one_line,
    read_job,
    read_json,
)
from core.jobs.processes import (
    POLL_INTERVAL,
    SIGKILL_WAIT,
    children,
    descendants,
    exit_codes,
    process_alive,
    require_posix,
    wait_until_gone,
)
from core.jobs.spec import JobSpec
from core.store import REPO_ROOT, sqlite_path
from core.store import client as store_client


def absolute_tracking_uri(uri: str) -> str:
    """A relative ``sqlite:///`` path resolved against this process's cwd (the job runs in the repo root)."""
    db = sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"sqlite:///{db.resolve()}"
    return uri


def start_job(
    spec: JobSpec,
    *,
    jobs_root: str | Path | None = None,
    tracking_uri: str | None = None,
    label: str | None = None,
    processes: int = 1,
) -> JobInfo:
    """Start ``spec`` (a :class:`~core.jobs.spec.TrainingJob` or a :class:`~core.sweep_jobs.SweepJob`) as a
    background job: ``python -m <spec.module> --spec <folder>/spec.json --job-dir <folder>``.

    With ``processes`` > 1 the job is a torchrun job of that many training processes on this machine
    (``python -m torch.distributed.run --standalone --nproc_per_node=N -m pipelines.train ...``); the launcher
    heads the process group, so cancelling stops every process.

    The spec is checked first (:meth:`~core.jobs.spec.JobSpec.check`): a bad one raises :class:`UsageError` and
    nothing is created or spawned. The folder (``job.json`` and ``spec.json``) appears complete or not at all. The
    process runs in the repository root, in its own session and process group, with stdout and stderr in
    ``train.log`` and ``MLFLOW_TRACKING_URI`` set to ``tracking_uri`` (default: the current store,
    :func:`core.store.tracking_uri`). Returns the job, normally in state ``starting``.
    """
    from core.store import tracking_uri as current_tracking_uri

    require_posix()
    uri = absolute_tracking_uri(tracking_uri or current_tracking_uri())
    spec.check(processes, uri)
    root = jobs_root_or_default(jobs_root)
    root.mkdir(parents=True, exist_ok=True)
    while True:
        job_id = new_job_id()
        job_dir = root / job_id
        if not job_dir.exists():
            break
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    argv = [*launcher, "-m", spec.module, "--spec", str(job_dir / SPEC_FILE), "--job-dir", str(job_dir)]
    meta: dict[str, Any] = {
        "kind": spec.kind,
        "processes": processes,
        "job_id": job_id,
        "pid": None,
        "pgid": None,
        "create_time": None,
        "argv": argv,
        "label": label,
        "tracking_uri": uri,
        "created_at": time.time(),
    }
    # Staged under a hidden name and renamed into place: a listing never sees a job folder without its files.
    with atomic_folder(job_dir) as staging:
        write_json(staging / JOB_FILE, meta)
        write_json(staging / SPEC_FILE, spec.to_dict())

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
            write_json(
                job_dir / RESULT_FILE,
                {"status": "FAILED", "exit_code": None, "error": f"could not start the training process: {exc}"},
            )
            raise JobError(f"could not start the training process: {exc}") from exc
    children[process.pid] = process
    try:
        create_time = psutil.Process(process.pid).create_time()
    except psutil.NoSuchProcess:
        # It exited (and was reaped) already; the state logic then reads its result or reports it died.
        create_time = None
    meta.update(pid=process.pid, pgid=process.pid, create_time=create_time)
    write_json(job_dir / JOB_FILE, meta)
    return get_job(job_id, jobs_root=root)


def needs_reconcile(info: JobInfo) -> bool:
    if info.is_active or info.state == "unknown" or info.run_id is None:
        return False
    if (info.job_dir / RECONCILED_FILE).exists():
        return False
    return not (info.result and info.result.get("run_ended"))


def reconcile(info: JobInfo) -> JobInfo:
    """End the MLflow run of an ended job if it is still RUNNING; raises if the store cannot be reached."""
    from mlflow.exceptions import MlflowException

    from core.tracking import PID_TAG

    uri = info.tracking_uri
    db = sqlite_path(uri) if uri else None
    if uri is None or (db is not None and not db.exists()):
        # No store to fix (it was removed): opening the URI would create an empty database instead.
        write_json(info.job_dir / RECONCILED_FILE, {"run_status": None, "note": f"tracking store {uri} is gone"})
        return read_job(info.job_dir)
    client = store_client(uri)  # not core.store.connect: no global URI change; a server is health-checked first
    try:
        run = client.get_run(info.run_id)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        note = f"MLflow run {info.run_id} no longer exists in {uri}"
        write_json(info.job_dir / RECONCILED_FILE, {"run_status": None, "note": note})
        return read_job(info.job_dir)
    status = run.info.status
    record: dict[str, Any] = {"run_status": status, "at": time.time(), "exit_code": exit_codes.get(info.pid)}
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
    write_json(info.job_dir / RECONCILED_FILE, record)
    return read_job(info.job_dir)


def reconcile_job(job_id: str, jobs_root: str | Path | None = None) -> JobInfo:
    """End the MLflow run of job ``job_id`` if its process is gone but the run is still RUNNING.

    A died job's run becomes KILLED with the tag ``error`` = :data:`DIED_ERROR`; a cancelled job's run becomes
    KILLED with a ``stop_reason``; a failed job's run becomes FAILED with its error. A no-op for a running job or
    one already reconciled. Unlike :func:`list_jobs`, MLflow errors raise.
    """
    info = read_job(job_folder(job_id, jobs_root))
    return reconcile(info) if needs_reconcile(info) else info


def read_and_reconcile(job_dir: Path, failed_stores: dict[str, str] | None = None) -> JobInfo:
    """:func:`read_job`, then :func:`reconcile` if needed; a store error goes into the job's ``reason``.

    ``failed_stores`` (tracking URI → error) lets one listing try an unreachable store once, not once per job.
    """
    info = read_job(job_dir)
    if not needs_reconcile(info):
        return info
    failed_stores = {} if failed_stores is None else failed_stores
    error = failed_stores.get(info.tracking_uri or "")
    if error is None:
        try:
            return reconcile(info)
        except Exception as exc:  # one unreachable store must not hide the other jobs; the error is shown instead
            error = failed_stores[info.tracking_uri or ""] = one_line(exc)
    info.reason = "; ".join(filter(None, [info.reason, f"could not check MLflow run {info.run_id}: {error}"]))
    return info


def list_jobs(jobs_root: str | Path | None = None) -> list[JobInfo]:
    """Every job under ``jobs_root``, newest first, reconciling the MLflow runs of jobs that died.

    A folder whose files are broken is listed as ``unknown`` with the reason; a missing ``jobs_root`` has no jobs.
    """
    root = jobs_root_or_default(jobs_root)
    if not root.is_dir():
        return []
    # Hidden folders are jobs still being created by start_job; anything else is shown, even if it is broken.
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    failed_stores: dict[str, str] = {}
    jobs = [read_and_reconcile(p, failed_stores) for p in folders]
    # A folder deleted (delete_job in another session) while this listing read it is gone, not broken.
    jobs = [j for j in jobs if j.state != "unknown" or j.job_dir.exists()]
    return sorted(jobs, key=lambda j: (j.job_id[:15], j.created_at or 0.0, j.job_id), reverse=True)


def get_job(job_id: str, jobs_root: str | Path | None = None) -> JobInfo:
    """The job ``job_id`` (reconciled like :func:`list_jobs`); :class:`JobError` if there is no such job."""
    return read_and_reconcile(job_folder(job_id, jobs_root))


def cancel_job(job_id: str, jobs_root: str | Path | None = None, timeout: float = 20.0) -> JobInfo:
    """Stop job ``job_id`` and return it in its final state (normally ``killed``).

    Sends SIGTERM to the job's process group, so training stops after its current step, saves a checkpoint and
    ends its run KILLED (torchrun's launcher passes it on to its workers); if the processes have not exited after
    ``timeout`` seconds, the group and every process the job started get SIGKILL. If the run is then still RUNNING
    it is set KILLED. Cancelling a job that has already ended does nothing and returns it.
    Blocks until the process is gone (at most ``timeout`` + a few seconds). POSIX only.
    """
    require_posix()
    job_dir = job_folder(job_id, jobs_root)
    info = read_job(job_dir)
    if not info.is_active:
        return get_job(job_id, jobs_root)
    if not (job_dir / CANCEL_FILE).exists():
        write_json(job_dir / CANCEL_FILE, {"requested_at": time.time(), "by_pid": os.getpid()})
    deadline = time.monotonic() + timeout
    meta, _ = read_json(job_dir / JOB_FILE)
    while (meta or {}).get("pid") is None and time.monotonic() < deadline:
        # start_job (maybe in another process) is about to spawn it: wait for the pid to signal.
        time.sleep(POLL_INTERVAL)
        meta, _ = read_json(job_dir / JOB_FILE)
    pid, create_time = (meta or {}).get("pid"), (meta or {}).get("create_time")
    if pid is None:
        return get_job(job_id, jobs_root)  # never spawned: with the cancel file it reads as killed
    pgid = meta.get("pgid") or pid
    # Signal the group only while its leader is verifiably our process: a reused pid must never be signalled.
    if process_alive(pid, create_time):
        # torchrun's workers, in sessions of their own, get the SIGTERM from the launcher, which waits for them;
        # taken now, while the launcher is their parent, so that they can be waited for and killed too.
        started = descendants(pid)
        with contextlib.suppress(ProcessLookupError):  # it exited between the check and the signal
            os.killpg(pgid, signal.SIGTERM)
        if not wait_until_gone(pid, pgid, create_time, started, max(0.0, deadline - time.monotonic())):
            # Still there after the timeout (a long final evaluation, or hung): no more waiting. The group was
            # verifiably the job's a moment ago, and its members (the trainer and anything it started) all go.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            for process in started:
                # psutil refuses a pid that no longer belongs to the process it listed
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    process.kill()
            if not wait_until_gone(pid, pgid, create_time, started, SIGKILL_WAIT):
                raise JobError(f"job {job_id}: processes of group {pgid} are still alive after SIGKILL")
    # Ends a still-RUNNING run KILLED; an unreachable store shows in the job's reason (the process is gone anyway).
    return get_job(job_id, jobs_root)


def delete_job(job_id: str, jobs_root: str | Path | None = None) -> None:
    """Remove the folder of job ``job_id`` (never its MLflow run, checkpoints or model versions).

    Refuses (:class:`JobError`) while the job's process is alive: cancel it first.
    """
    job_dir = job_folder(job_id, jobs_root)
    info = read_job(job_dir)
    if info.is_active:
        raise JobError(f"job {job_id} is {info.state}; cancel it before deleting it")
    shutil.rmtree(job_dir)
