"""Reaping: every MLflow run left RUNNING by a training process that is gone, ended KILLED with the reason.

Runs started outside a job (``python -m pipelines.train`` in a terminal) have no job folder, but every training run
is created with the tags :data:`core.tracking.HOST_TAG`, :data:`~core.tracking.PID_TAG` and
:data:`~core.tracking.PROCESS_START_TAG` (:func:`core.tracking.run_tags`). :func:`reap_orphan_runs` ends KILLED (tag
``error`` = :data:`core.jobs.DIED_ERROR`) every RUNNING run of a store whose host tag names this machine and whose
process (same pid *and* start time) is gone; a run of another host, or without those tags, is never touched.
:func:`reap` does both: every job (:func:`core.jobs.reconcile_job`'s rule), then every such run
(``python -m pipelines.jobs reap``).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import StudioError
from core.jobs.control import absolute_tracking_uri, needs_reconcile, reconcile
from core.jobs.layout import DIED_ERROR, RECONCILED_FILE, default_jobs_root, one_line, read_job, read_json
from core.jobs.processes import process_alive
from core.store import all_pages, sqlite_path
from core.store import client as store_client


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
    from mlflow.entities import ViewType

    from core.store import tracking_uri as current_tracking_uri
    from core.tracking import HOST_TAG, PID_TAG, PROCESS_START_TAG

    uri = absolute_tracking_uri(tracking_uri or current_tracking_uri())
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return []  # no store, no runs (opening the URI would create an empty database)
    client = store_client(uri)  # not core.store.connect: no global URI change; a server is health-checked first
    experiment_ids = [e.experiment_id for e in all_pages(client.search_experiments, view_type=ViewType.ACTIVE_ONLY)]
    if not experiment_ids:
        return []
    running = all_pages(
        client.search_runs, experiment_ids=experiment_ids, filter_string="attributes.status = 'RUNNING'"
    )
    host = socket.gethostname()
    process_keys = (HOST_TAG, PID_TAG, PROCESS_START_TAG)
    reaped = []
    for run in running:
        tags = run.data.tags
        pid, started = _number(tags.get(PID_TAG), int), _number(tags.get(PROCESS_START_TAG), float)
        if tags.get(HOST_TAG) != host or pid is None or started is None or process_alive(pid, started):
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
        info = read_job(folder)
        if not needs_reconcile(info):
            continue
        error = failed_stores.get(info.tracking_uri or "")
        if error is None:
            try:
                reconcile(info)
            except Exception as exc:  # one unreachable store must not stop the rest, as in list_jobs
                error = failed_stores[info.tracking_uri or ""] = one_line(exc)
        if error is not None:
            report.problems.append(f"job {info.job_id}: could not check MLflow run {info.run_id}: {error}")
            continue
        record, _ = read_json(folder / RECONCILED_FILE)
        if record and record.get("previous_status") == "RUNNING":
            reason = record.get("run_reason") or ""
            report.reaped.append(Reaped(info.run_id, record["run_status"], info.pid, reason, job_id=info.job_id))
    try:
        report.reaped += reap_orphan_runs(uri)
    except (StudioError, MlflowException, OSError) as exc:
        report.problems.append(f"could not check the RUNNING runs of {uri}: {one_line(exc)}")
    return report
