"""Search hyperparameters with Optuna: trials trained one after another, tracked as nested MLflow runs.

Usage: python -m pipelines.sweep --param NAME=SPEC [--param NAME=SPEC ...] (--trials N | --time-budget T | both)
       [--trial-budget T] [--metric val_bpc|val_loss] [--name NAME] [--alias A] [--sampler tpe|random|grid]
       [--pruner median|median:N|threshold:X|none] [--storage URL] [--check] [--job-dir DIR]
       [any option of pipelines.train: the base settings of every trial, e.g. --preset tiny --max-steps 300]
       python -m pipelines.sweep --resume NAME [--trials N] [--time-budget T] [--storage URL] [--job-dir DIR]

Search space: one --param per field, NAME=KIND:ARGS, where NAME is a field of the model, data or training config
(n_layer, n_head, n_embd, dropout, bias, block_size, batch_size, order, lr, weight_decay, warmup_fraction,
grad_clip, beta2, max_steps, seed, ...; block_size and seed set both configs' field, as --block-size and --seed do;
model.block_size or data.seed name one) and KIND is

  uniform:LOW:HIGH         a decimal number in [LOW, HIGH]               dropout=uniform:0:0.2
  loguniform:LOW:HIGH      the same, drawn evenly in log space (LOW > 0)  lr=loguniform:1e-4:3e-3
  int:LOW:HIGH[:STEP]      a whole number in [LOW, HIGH]                 n_layer=int:2:6, n_embd=int:64:256:64
  choice:A,B,...           one of the values (true/false, none)           n_embd=choice:128,192,256

Every other setting comes from the training options, with pipelines.train's defaults (--trial-budget without
--preset picks the time-budget recipe, as pipelines.train --time-budget does), except --checkpoint-interval: 0 here,
a trial is never resumed on its own. Each trial trains for --trial-budget (e.g. 1m; the trainer sizes its schedule
to it) or else up to --max-steps, and is evaluated every --eval-interval steps: each evaluation's --metric
(default val_bpc, held-out bits per character; minimised) goes to Optuna's pruner, which stops a trial that is doing
worse than the others were at the same evaluation (median, after 2 completed trials; threshold:X prunes above X:
the k-th evaluation of each trial is compared, every --eval-interval steps, or spread over a trial's budget). The
sweep stops after --trials trials (pruned and failed ones count), or when less than one trial's time is left of
--time-budget. Then the best trial's best-validation checkpoint is registered (--register-as) with --alias
(default sweep-best). Exit codes: 0 with a registered model, 1 when no trial completed, 130 when stopped, 2 for a
bad request (nothing is created then).

In MLflow the sweep is one parent run (named --run-name, else the sweep's name) with a nested run per trial; the
parent logs best_<metric> after every trial. The Optuna study lives in --storage (default: sweeps.db beside the
tracking store's database, e.g. mlruns/sweeps.db). Ctrl-C or SIGTERM stops the running trial after its current
step and ends the parent run KILLED; --resume NAME goes on with the stored settings (only --trials and --time-budget
may change), the same parent run and every trial done so far (a trial that was interrupted is tried again).
--check validates everything and exits without creating anything. With --job-dir (the studio app's background jobs,
see core/sweep_jobs.py) the sweep's progress and outcome are also written to that folder.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from pipelines.cli import ArgumentParser, duration, positive_int, read_json_file, run

if TYPE_CHECKING:
    from core.sweep import SweepOutcome, SweepPlan, SweepStatus
    from core.sweep_jobs import SweepJob, SweepJobRecorder

RESUME_OPTIONS = ("resume", "trials", "sweep_budget", "storage", "job_dir", "log_interval", "check")

SPEC_OPTIONS = ("spec", "job_dir", "log_interval", "check")
"""The options --spec may be combined with: the file holds every setting of the sweep."""
"""The options --resume may be combined with: how much longer, where things are and how progress shows."""


def build_parser() -> ArgumentParser:
    from core.sweep import DEFAULT_ALIAS, DEFAULT_PRUNER, SAMPLERS, SWEEP_METRICS
    from pipelines.train import build_parser as train_parser

    p = train_parser()
    p.prog = "python -m pipelines.sweep"
    p.description = __doc__.splitlines()[0]
    # The sweep's own --time-budget (the whole sweep's), --alias and --resume replace the training options of
    # those names.
    p.conflict_handler = "resolve"
    p.set_defaults(checkpoint_interval=0)
    sweep = p.add_argument_group("sweep")
    sweep.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="a dimension of the search space, e.g. lr=loguniform:1e-4:3e-3 (repeat it; see the usage above)",
    )
    sweep.add_argument("--trials", type=positive_int, metavar="N", help="stop after N trials")
    sweep.add_argument(
        "--time-budget",
        dest="sweep_budget",
        type=duration,
        metavar="T",
        help="wall time of the whole sweep (90s, 10m, 1h): no trial starts once less than one trial's time is left",
    )
    sweep.add_argument("--trial-budget", type=duration, metavar="T", help="each trial's time budget (e.g. 1m)")
    sweep.add_argument(
        "--metric", default="val_bpc", help=f"what the sweep minimises: {' or '.join(SWEEP_METRICS)} (default val_bpc)"
    )
    sweep.add_argument("--name", help="the sweep's (study's) name (default: sweep-<date>-<time>)")
    sweep.add_argument(
        "--alias", default=DEFAULT_ALIAS, help=f"alias of the best trial's registered version (default {DEFAULT_ALIAS})"
    )
    sweep.add_argument("--sampler", default="tpe", help=f"Optuna sampler: {', '.join(SAMPLERS)} (default tpe)")
    sweep.add_argument(
        "--pruner",
        default=DEFAULT_PRUNER,
        help="median, median:N (N completed trials first), threshold:X or none (default median)",
    )
    sweep.add_argument("--storage", metavar="URL", help="Optuna storage (default: sweeps.db beside the tracking store)")
    sweep.add_argument("--resume", metavar="NAME", help="continue the stopped sweep NAME with its stored settings")
    sweep.add_argument("--check", action="store_true", help="validate everything, create nothing, and exit")
    sweep.add_argument(
        "--spec",
        metavar="JSON",
        help="run the sweep job this file describes (a job folder's spec.json: settings and configs, or a sweep to "
        "resume) instead of the flags above",
    )
    return p


def explicit_options(argv: Sequence[str] | None) -> list[str]:
    """The destinations of the options given in ``argv`` (default: the command line), whatever their values."""
    parser = build_parser()
    # With every default suppressed, the namespace holds only what was typed (as pipelines.train does it).
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    parser._defaults.clear()  # set_defaults' values (--checkpoint-interval 0) would read as typed
    return list(vars(parser.parse_args(argv)))


def make_plan(args: argparse.Namespace, argv: Sequence[str] | None) -> SweepPlan:
    """The validated plan of parsed arguments (a new sweep or ``--resume``); UsageError otherwise. Creates nothing."""
    from core.errors import UsageError
    from core.sweep import plan_resume
    from core.sweep_jobs import SweepJob

    if args.spec is not None:
        extra = [f"--{d.replace('_', '-')}" for d in explicit_options(argv) if d not in SPEC_OPTIONS]
        if extra:
            raise UsageError(f"--spec holds every setting of the sweep; drop {', '.join(extra)}")
        return SweepJob.from_dict(read_json_file(args.spec, "--spec")).plan()
    if args.resume is not None:
        conflicting = [f"--{d.replace('_', '-')}" for d in explicit_options(argv) if d not in RESUME_OPTIONS]
        if conflicting:
            conflicting = ["--time-budget" if c == "--sweep-budget" else c for c in conflicting]
            raise UsageError(
                f"--resume {args.resume} goes on with the settings the sweep was started with; drop "
                + ", ".join(conflicting)
            )
        return plan_resume(args.resume, storage=args.storage, n_trials=args.trials, time_budget=args.sweep_budget)
    return make_spec(args).plan()


def make_spec(args: argparse.Namespace) -> SweepJob:
    """The spec of the new sweep that parsed arguments ask for (what a background job of it stores); UsageError
    (one line) for a bad space or settings. Creates nothing."""
    from core.errors import UsageError
    from core.recipes import RunConfigs
    from core.sweep import SweepSettings, parse_space
    from core.sweep_jobs import SweepJob
    from pipelines.train import build_configs

    if args.register_best:
        raise UsageError("--register-best: a sweep always registers its best trial's best-validation checkpoint")
    space = parse_space(args.param)
    # The training options' --time-budget is the sweep's own here (the whole sweep's); each trial's budget is
    # --trial-budget, which, as pipelines.train's --time-budget does, also picks the budget recipe without --preset.
    args.time_budget = args.trial_budget
    configs = RunConfigs(*build_configs(args))
    settings = SweepSettings(
        name=args.name or time.strftime("sweep-%Y%m%d-%H%M%S"),
        space=space,
        metric=args.metric,
        n_trials=args.trials,
        time_budget=args.sweep_budget,
        trial_budget=args.trial_budget,
        sampler=args.sampler,
        pruner=args.pruner,
        seed=configs.train.seed,
    )
    return SweepJob(settings=settings, configs=configs, storage=args.storage)


def main(argv: Sequence[str] | None = None) -> int:
    from core.errors import UsageError

    args = build_parser().parse_args(argv)
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise UsageError("a sweep trains its trials one after another in one process: run python -m pipelines.sweep")
    # MLflow draws a progress bar for every artifact transfer; an explicit setting in the environment wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    plan = make_plan(args, argv)
    if args.check:
        print(describe(plan) + " (checked; nothing created)")
        return 0
    if args.job_dir is None:
        return sweep(args, plan)
    from core.sweep_jobs import SweepJobRecorder

    with SweepJobRecorder(args.job_dir) as job:  # records a failure (and re-raises) if the sweep raises
        return sweep(args, plan, job)


def describe(plan: SweepPlan) -> str:
    """One line: what the plan will do."""
    s = plan.settings
    limits = [f"{s.n_trials} trial{'s' * (s.n_trials != 1)}" if s.n_trials else None]
    limits.append(f"at most {s.time_budget:g} s" if s.time_budget else None)
    limits.append(f"{s.trial_budget:g} s per trial" if s.trial_budget else f"up to {plan.train.max_steps:,} steps")
    verb = "resume" if plan.parent_run_id else "search"
    fields = ", ".join(spec.text for spec in s.space)
    return (
        f"sweep {s.name}: {verb} {fields} ({', '.join(x for x in limits if x)}), minimising {s.metric} "
        f"with the {s.sampler} sampler and the {s.pruner} pruner"
    )


def sweep(args: argparse.Namespace, plan: SweepPlan, job: SweepJobRecorder | None = None) -> int:
    """Run ``plan``, reporting to the terminal (and to ``job``); returns the exit code."""
    import optuna

    from core.store import tracking_uri
    from core.sweep import ObserverGroup, run_sweep

    # Optuna logs each trial (failures with a traceback); the terminal lines below say the same, once.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    print(f"tracking store: {tracking_uri()}")
    print(f"optuna study: {plan.storage}")
    print(describe(plan), flush=True)
    terminal = TerminalSweep(args.log_interval)
    observer = ObserverGroup(terminal, job.observer()) if job is not None else terminal

    def on_parent_created(run_id: str) -> None:
        print(f"mlflow parent run: {run_id}", flush=True)
        if job is not None:
            job.run_created(run_id)

    outcome = run_sweep(plan, observer, on_parent_created=on_parent_created)
    code = exit_code(outcome)
    if job is not None:
        job.record_sweep_outcome(outcome, code)
    report(outcome, plan)
    return code


def exit_code(outcome: SweepOutcome) -> int:
    """0 with a registered model, 130 when stopped, 1 when no trial completed."""
    if outcome.model_version is not None:
        return 0
    return 130 if outcome.status == "KILLED" else 1


def report(outcome: SweepOutcome, plan: SweepPlan) -> None:
    metric = plan.settings.metric
    print(
        f"sweep {outcome.name} ended {outcome.status} ({outcome.stop_reason}): {outcome.complete} complete, "
        f"{outcome.pruned} pruned, {outcome.failed} failed; parent run {outcome.parent_run_id}"
    )
    if outcome.best_trial is not None:
        params = ", ".join(f"{k}={_short(v)}" for k, v in outcome.best_params.items())
        best = f"trial {outcome.best_trial}, {metric} {outcome.best_value:.4f} ({params})"
        print(f"best: {best}, run {outcome.best_run_id}")
    if outcome.model_version is not None:
        print(f"registered model: {outcome.model_name} version {outcome.model_version} (alias @{plan.tracking.alias})")
    elif outcome.status == "KILLED":
        print(f"continue it with: python -m pipelines.sweep --resume {outcome.name}")
    else:
        print("no trial completed: nothing registered")


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class TerminalSweep:
    """Prints a line when a trial starts and when it ends, and each trial's training lines (no samples)."""

    def __init__(self, log_interval: int):
        self.log_interval = log_interval
        self._announced: int | None = None
        self._ended: int | None = None

    def on_status(self, status: SweepStatus) -> None:
        if status.trial_number is not None and status.trial_number != self._announced:
            self._announced = status.trial_number
            of = f" of {status.n_trials}" if status.n_trials else ""
            params = ", ".join(f"{k}={_short(v)}" for k, v in status.trial_params.items())
            print(f"=== trial {status.trial_index}{of} (number {status.trial_number}): {params}", flush=True)
        last = status.last_trial
        if last is not None and last["number"] != self._ended:
            self._ended = last["number"]
            value = "" if last["value"] is None else f": {status.metric} {last['value']:.4f}"
            error = f": {last['error']}" if last.get("error") else ""
            best = "" if status.best_value is None else f"; best {status.best_value:.4f} (trial {status.best_trial})"
            print(f"=== trial {last['number']} {last['state']}{value}{error}{best}", flush=True)

    def trial_callbacks(self, number: int, train) -> list:
        from pipelines.progress import TerminalProgress

        return [TerminalProgress(train.max_steps, log_interval=self.log_interval, show_samples=False)]


if __name__ == "__main__":
    run(main)
