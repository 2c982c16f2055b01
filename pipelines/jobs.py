"""List, cancel and reap the studio's background training jobs, and end runs whose training process died.

Usage: python -m pipelines.jobs [--jobs-root DIR] (list [--json] | cancel JOB_ID [--timeout S] | reap)

The jobs are those of the current tracking store (``MLFLOW_TRACKING_URI``, else ``mlruns/``): the folders the
studio's Train page creates (see core/jobs/). ``list`` shows every job with its state, newest first; ``cancel``
sends SIGTERM to the job's process group (training stops after its current step, saves a checkpoint and ends its
run KILLED), then SIGKILL after --timeout seconds. ``list`` and ``cancel`` end the run of a job whose process died
KILLED. ``reap`` does that for every job, then ends KILLED every RUNNING run of the store whose training process on
this machine is gone (e.g. ``python -m pipelines.train`` killed with ``kill -9``), and prints what it changed. A
run of another machine is never touched.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from pipelines.cli import ArgumentParser, run

COLUMNS = ("JOB ID", "STATE", "PID", "RUN ID", "STEP", "LABEL")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m pipelines.jobs", description=__doc__.splitlines()[0])
    parser.add_argument("--jobs-root", metavar="DIR", help="the jobs folder (default: beside the tracking store)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,cancel,reap}")
    listing = commands.add_parser("list", help="every job, newest first")
    listing.add_argument("--json", action="store_true", help="print one JSON array instead of a table")
    cancel = commands.add_parser("cancel", help="stop a job: SIGTERM to its process group, then SIGKILL")
    cancel.add_argument("job_id", metavar="JOB_ID", help="as `list` shows it (YYYYMMDD-HHMMSS-xxxxxx)")
    cancel.add_argument(
        "--timeout", type=float, default=20.0, help="seconds to wait after SIGTERM before SIGKILL (default 20)"
    )
    commands.add_parser("reap", help="end KILLED every run whose training process is gone")
    return parser


def job_record(job) -> dict:
    """The JSON form of a :class:`core.jobs.JobInfo`."""
    progress = job.progress or {}
    return {
        "job_id": job.job_id,
        "state": job.state,
        "reason": job.reason,
        "pid": job.pid,
        "run_id": job.run_id,
        "step": progress.get("step"),
        "max_steps": progress.get("max_steps"),
        "label": job.label,
        "created_at": job.created_at,
        "tracking_uri": job.tracking_uri,
        "model_name": job.model_name,
        "model_version": job.model_version,
        "log": str(job.log_path),
    }


def format_table(jobs) -> str:
    """One line per job under a header, columns aligned."""
    rows = [COLUMNS]
    for job in jobs:
        progress = job.progress or {}
        step = f"{progress.get('step', 0)}/{progress.get('max_steps', '?')}" if progress else "-"
        rows.append((job.job_id, job.state, str(job.pid or "-"), job.run_id or "-", step, job.label or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    widths[-1] = 0  # the label is last: no padding after it
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core import jobs

    if args.command == "list":
        listed = jobs.list_jobs(args.jobs_root)
        if args.json:
            print(json.dumps([job_record(job) for job in listed], indent=1))
        elif not listed:
            print(f"no jobs in {args.jobs_root or jobs.default_jobs_root()}")
        else:
            print(format_table(listed))
        return 0

    if args.command == "cancel":
        if args.timeout < 0:
            raise ValueError(f"--timeout must be >= 0 seconds, got {args.timeout:g}")
        before = jobs.get_job(args.job_id, args.jobs_root)  # an unknown job is an error before anything is signalled
        job = jobs.cancel_job(args.job_id, args.jobs_root, timeout=args.timeout)
        verb = "had already ended" if not before.is_active else "is now"
        print(f"job {job.job_id} {verb} {job.state}" + (f" (run {job.run_id})" if job.run_id else ""))
        if job.reason:
            print(f"  {job.reason}")
        return 0

    from core.reaper import reap

    report = reap(args.jobs_root)
    for reaped in report.reaped:
        what = f"job {reaped.job_id}: run {reaped.run_id}" if reaped.job_id else f"run {reaped.run_id}"
        print(f"{what} was RUNNING; ended {reaped.status} ({reaped.reason})")
    if not report.reaped:
        print("nothing to reap: no RUNNING run of a job or of this machine has lost its training process")
    for problem in report.problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 1 if report.problems else 0


if __name__ == "__main__":
    run(main)
