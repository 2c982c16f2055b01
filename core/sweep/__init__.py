"""Hyperparameter sweeps with Optuna: many short trainings, one MLflow parent run, the best model registered.

A sweep searches a space of training and model settings (:func:`parse_space`: ``lr=loguniform:1e-4:3e-3``,
``n_embd=choice:128,192``, ...) around a base set of configs. Optuna drives it: its sampler (TPE by default)
proposes each trial's values, its pruner stops a trial whose intermediate validation metric is worse than the others'
at the same evaluation, and its study (an SQLite file, :func:`default_storage`) remembers every trial, so a stopped
sweep resumes where it was.

In MLflow a sweep is one parent run and one nested run per trial (tag ``mlflow.parentRunId``), all in the base
settings' experiment. Each trial is an ordinary tracked training (:func:`core.experiment.run_training`, every param
logged) that does not register a model; its run carries the tags ``sweep.name``, ``sweep.trial_number``,
``sweep.params`` and ``sweep.state`` (Optuna's state of the trial: RUNNING, then COMPLETE, PRUNED or FAIL). Run
statuses: a completed *and a pruned* trial's run ends FINISHED (a pruned trial ended by a stop rule, like
``patience``: its run is complete and not resumable; its ``stop_reason`` is ``pruned``), a failed one FAILED, one
interrupted by a cancel KILLED. The parent run logs ``best_<metric>`` after each trial (step = the trial's number),
the space and settings as params, and ends FINISHED once the best trial's best-validation checkpoint is registered
with the sweep's alias, KILLED when cancelled (SIGTERM/SIGINT: the running trial stops after its current step), or
FAILED on an error.

A trial's objective is the lowest value of the metric (``val_bpc`` or ``val_loss``) over its evaluations, minimised;
it reports every evaluation to Optuna, which may prune it. Optuna's step is the evaluation's number (1, 2, ...), not
the training step: trials evaluate every ``eval_interval`` steps, so the two agree up to a factor, and trials under a
time budget evaluate at the same fractions of their budget but at different steps (their speeds differ), where a
pruner comparing trials at equal training steps would never find two to compare.

``--trials N`` counts the trials that ended COMPLETE, PRUNED or FAIL, not the ones a cancel or a killed process
interrupted: those are redone when the sweep resumes. A total time budget stops starting trials once less time is
left than one trial needs (its ``trial_budget``, else the mean duration of the trials so far).

Everything is validated before anything is created (:func:`plan_sweep`, :func:`plan_resume`): a bad space, a
metric training never logs or a name already taken raise :class:`core.errors.UsageError` with one line, and no run,
study or file exists afterwards. :func:`run_sweep` carries a plan out.
"""

from core.sweep.plan import SweepPlan, plan_resume, plan_sweep
from core.sweep.run import PRUNED, _Pruning, run_sweep, study_trials
from core.sweep.settings import (
    DEFAULT_ALIAS,
    DEFAULT_PRUNER,
    SAMPLERS,
    STUDY_FILE,
    SWEEP_METRICS,
    SweepSettings,
    default_storage,
    parse_pruner,
)
from core.sweep.space import ParamSpec, apply_params, check_space, parse_param, parse_space, searchable_fields
from core.sweep.status import ObserverGroup, SweepObserver, SweepOutcome, SweepStatus

__all__ = [
    "DEFAULT_ALIAS",
    "DEFAULT_PRUNER",
    "PRUNED",
    "SAMPLERS",
    "STUDY_FILE",
    "SWEEP_METRICS",
    "ObserverGroup",
    "ParamSpec",
    "SweepObserver",
    "SweepOutcome",
    "SweepPlan",
    "SweepSettings",
    "SweepStatus",
    "_Pruning",
    "apply_params",
    "check_space",
    "default_storage",
    "parse_param",
    "parse_pruner",
    "parse_space",
    "plan_resume",
    "plan_sweep",
    "run_sweep",
    "searchable_fields",
    "study_trials",
]
