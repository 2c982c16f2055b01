"""The Train page's *Sweep* section: a search-space form that starts a sweep as a background job, and the status of a
sweep job (trial i of N, the best value so far, Resume for a stopped one).

The page imports this module as ``sweep_panel`` (like ``studio_ui``). Jobs are started through ``core.jobs`` looked
up at call time, so that a test can replace ``core.jobs.start_job``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import streamlit as st

import core.jobs
from core.config import parse_duration
from core.errors import StudioError
from core.recipes import resolve_run_configs
from core.sweep import DEFAULT_ALIAS, SWEEP_METRICS, SweepSettings, parse_space
from core.sweep_jobs import SweepJob, resume_spec

DEFAULT_SPACE = "lr=loguniform:1e-4:3e-3\ndropout=uniform:0:0.2\nweight_decay=uniform:0:0.2"
SPACE_HELP = (
    "One field per line, NAME=KIND:ARGS: `uniform:LOW:HIGH`, `loguniform:LOW:HIGH`, `int:LOW:HIGH[:STEP]` or "
    "`choice:A,B,...`, e.g. `n_embd=choice:128,192`, `n_layer=int:2:6`. Any model or training field (n_layer, "
    "n_head, n_embd, dropout, block_size, batch_size, lr, weight_decay, warmup_fraction, ...); every other setting "
    "comes from the form above. Lines starting with # are ignored."
)


def space_lines(text: str) -> list[str]:
    """The ``NAME=SPEC`` lines of the search-space editor (blank lines and ``#`` comments dropped)."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def sweep_section(base_choices: dict[str, Any]) -> None:
    """The Sweep expander: its form, and on *Start sweep* a sweep job (:class:`core.sweep_jobs.SweepJob`) whose
    trials start from ``base_choices`` (the training form's settings, resolved by
    :func:`core.recipes.resolve_run_configs`). A refusal is one error line; nothing starts."""
    with st.expander("🔎 Sweep: search hyperparameters with Optuna"):
        st.caption(
            "Trials train one after another as one background job, each a nested MLflow run under the sweep's run, "
            "with the settings of the training form above (as last applied: press *Update estimate* after changing "
            "them) except the fields searched here. Optuna picks each trial's values "
            "and prunes a trial whose validation metric falls behind; the best trial's model is registered with "
            "the alias. A stopped sweep can be resumed."
        )
        with st.form("sweep"):
            space = st.text_area("Search space", DEFAULT_SPACE, help=SPACE_HELP, height=110)
            c = st.columns(3)
            trials = c[0].number_input("Trials", 0, 10_000, 10, help="0 = as many as the total time allows")
            trial_budget = c[1].text_input(
                "Time per trial", "1m", help="each trial's time budget (90s, 10m, 1h); empty = up to Max steps"
            )
            total_budget = c[2].text_input(
                "Total time (optional)",
                placeholder="e.g. 30m",
                help="no trial starts once less than one trial's time is left",
            )
            c = st.columns(3)
            metric = c[0].selectbox("Metric (minimised)", SWEEP_METRICS, help="measured on the held-out text")
            pruner = c[1].selectbox(
                "Pruner", ("median", "none"), help="median: stop a trial worse than the median of the others"
            )
            alias = c[2].text_input("Alias of the best model", DEFAULT_ALIAS)
            name = st.text_input("Sweep name (optional)", placeholder="sweep-<date>-<time>")
            start = st.form_submit_button("Start sweep", type="primary")
    if not start:
        return
    lines = space_lines(space)
    try:
        name = name.strip() or time.strftime("sweep-%Y%m%d-%H%M%S")
        trial_seconds = parse_duration(trial_budget) if trial_budget.strip() else None
        total_seconds = parse_duration(total_budget) if total_budget.strip() else None
        settings = SweepSettings(
            name=name,
            space=parse_space(lines),
            metric=metric,
            n_trials=int(trials) or None,
            time_budget=total_seconds,
            trial_budget=trial_seconds,
            pruner=pruner,
            seed=int(base_choices.get("seed") or SweepSettings.seed),
        )
        # As the sweep CLI does: each trial's time budget also picks the budget recipe for a preset that has one.
        configs = resolve_run_configs({**base_choices, "time_budget": trial_seconds, "alias": alias.strip() or None})
        with st.spinner("Checking the sweep…"):
            job = core.jobs.start_job(SweepJob(settings=settings, configs=configs), label=f"sweep {name}")
    except (StudioError, ValueError, OSError) as exc:
        st.error(f"The sweep was not started: {exc}", icon="⚠️")
        return
    st.toast(f"Started sweep {name} (job {job.job_id})", icon="🔎")


def resume_sweep(job_id: str) -> None:
    """Start a job that resumes the sweep of the stopped sweep job ``job_id``."""
    job = core.jobs.get_job(job_id)
    core.jobs.start_job(resume_spec(job.sweep), label=job.label)


def show_sweep(job, act: Callable[[str, Callable[[str], None], str], None]) -> None:
    """A sweep job's status: trials done of those asked for, the running trial, the best value so far and the
    latest trial's outcome; *Resume sweep* for one that stopped before its end (``act`` runs the button's action)."""
    sweep = job.sweep or {}
    if not sweep:
        st.caption("🔎 Sweep: starting…")
        return
    complete, pruned, failed = (int(sweep.get(k) or 0) for k in ("complete", "pruned", "failed"))
    done, wanted = complete + pruned + failed, sweep.get("n_trials")
    running = job.is_active and sweep.get("phase") == "running" and sweep.get("trial_number") is not None
    of = f" of {wanted}" if wanted else ""
    where = f"trial {sweep.get('trial_index')}{of} training" if running else f"{done}{of} trials done"
    if wanted:
        st.progress(min(1.0, done / wanted), text=f"sweep: {where}")
    metric, best = sweep.get("metric") or "val_bpc", sweep.get("best_value")
    line = f"🔎 Sweep **{sweep.get('name')}** · {where} · {complete} complete, {pruned} pruned, {failed} failed"
    if best is not None:
        line += f" · best {metric} **{best:.4f}** (trial {sweep.get('best_trial')})"
    st.markdown(line)
    last = sweep.get("last_trial")
    if last:
        value = "" if last.get("value") is None else f", {metric} {last['value']:.4f}"
        st.caption(
            f"Latest: trial {last['number']} {last['state'].lower()}{value}"
            + (f" ({last['error']})" if last.get("error") else "")
        )
    if job.state in ("killed", "died", "failed"):
        st.button(
            "Resume sweep",
            key=f"resume-{job.job_id}",
            help="continue this sweep as a new job: the same study and parent run, the trials done so far kept",
            on_click=act,
            args=("Resuming the sweep failed", resume_sweep, job.job_id),
        )
