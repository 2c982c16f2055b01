"""A sweep's settings (what it searches, how long, which metric, sampler and pruner), validated, and where its
Optuna study is stored."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.config import _NAME
from core.errors import UsageError
from core.store import DEFAULT_STORE_DIR, sqlite_path

if TYPE_CHECKING:
    import optuna

from core.sweep.space import ParamSpec, parse_space

SWEEP_METRICS = ("val_bpc", "val_loss")
"""The metrics a sweep can minimise: the ones every evaluation of the trainer logs."""
SAMPLERS = ("tpe", "random", "grid")
"""Optuna samplers a sweep can use; ``grid`` tries every combination of a space made only of choices."""
DEFAULT_PRUNER = "median"
DEFAULT_ALIAS = "sweep-best"
"""Alias given to the best trial's registered model unless another is asked for."""
MEDIAN_STARTUP_TRIALS = 2
"""Completed trials the median pruner waits for before it prunes (Optuna's default, 5, would never prune a short
sweep)."""
PRUNED = "pruned"
"""The ``stop_reason`` of a pruned trial's run."""
STUDY_FILE = "sweeps.db"
_OPEN_ATTEMPTS = 5


def parse_pruner(text: str) -> optuna.pruners.BasePruner:
    """``median`` (median:N: wait for N completed trials, default :data:`MEDIAN_STARTUP_TRIALS`), ``threshold:X``
    (prune a trial once its metric is above X) or ``none``; UsageError otherwise."""
    import optuna

    kind, _, arg = (text or "").partition(":")
    kind = kind.strip().lower()
    try:
        if kind == "none" and not arg:
            return optuna.pruners.NopPruner()
        if kind == "median":
            startup = int(arg) if arg else MEDIAN_STARTUP_TRIALS
            if startup < 0:
                raise ValueError(startup)
            return optuna.pruners.MedianPruner(n_startup_trials=startup, n_warmup_steps=0, n_min_trials=1)
        if kind == "threshold":
            upper = float(arg)
            if not math.isfinite(upper):
                raise ValueError(upper)
            return optuna.pruners.ThresholdPruner(upper=upper)
    except ValueError:
        pass
    raise UsageError(f"--pruner {text}: use median, median:N (N completed trials before pruning), threshold:X or none")


@dataclass(frozen=True)
class SweepSettings:
    """What a sweep searches and how long; validated on construction (UsageError, one line)."""

    name: str
    """The study's name, unique in its storage (letters, digits, '-', '_', '.')."""
    space: tuple[ParamSpec, ...]
    metric: str = "val_bpc"
    """One of :data:`SWEEP_METRICS`, minimised."""
    n_trials: int | None = None
    """Trials that end COMPLETE, PRUNED or FAIL before the sweep stops (a resumed sweep counts the earlier ones);
    None: as many as ``time_budget`` allows."""
    time_budget: float | None = None
    """Seconds this session of the sweep may take: no trial starts once less than one trial's time is left."""
    trial_budget: float | None = None
    """Each trial's ``TrainConfig.time_budget`` (seconds); None: each trial runs to its step limit."""
    sampler: str = "tpe"
    """One of :data:`SAMPLERS`."""
    pruner: str = DEFAULT_PRUNER
    """See :func:`parse_pruner`."""
    seed: int = 1337
    """Seed of the sampler."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _NAME.fullmatch(self.name) is None:
            raise UsageError(f"sweep name {self.name!r} is invalid: use letters, digits, '-', '_' or '.'")
        if not self.space:
            raise UsageError("the search space is empty: give at least one --param NAME=SPEC")
        if self.metric not in SWEEP_METRICS:
            raise UsageError(
                f"--metric {self.metric} is never logged by training; a sweep can minimise {' or '.join(SWEEP_METRICS)}"
            )
        if self.n_trials is None and self.time_budget is None:
            raise UsageError("say how long the sweep runs: --trials N, --time-budget T, or both")
        if self.n_trials is not None and (not isinstance(self.n_trials, int) or self.n_trials <= 0):
            raise UsageError(f"--trials must be a positive integer, got {self.n_trials!r}")
        for flag, value in (("--time-budget", self.time_budget), ("--trial-budget", self.trial_budget)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise UsageError(f"{flag} must be a positive duration, got {value!r}")
        if self.time_budget is not None and self.trial_budget is not None and self.trial_budget > self.time_budget:
            raise UsageError(
                f"--trial-budget ({self.trial_budget:g} s) is longer than the whole --time-budget "
                f"({self.time_budget:g} s): not one trial would fit"
            )
        if self.sampler not in SAMPLERS:
            raise UsageError(f"--sampler {self.sampler}: choose one of {', '.join(SAMPLERS)}")
        if self.sampler == "grid" and any(spec.kind != "choice" for spec in self.space):
            ranged = next(spec.text for spec in self.space if spec.kind != "choice")
            raise UsageError(f"--sampler grid needs choices only; --param {ranged} is a range")
        parse_pruner(self.pruner)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the space as its specs' texts), the inverse of :meth:`from_dict`."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**values, "space": [spec.text for spec in self.space]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SweepSettings:
        """Settings stored by :meth:`to_dict`, parsed and validated again."""
        return cls(**{**values, "space": parse_space(values["space"])})


def default_storage(tracking_uri: str | None = None) -> str:
    """Where studies live: ``sweeps.db`` beside a SQLite tracking store's database (each local store keeps its own
    sweeps, like its jobs), else ``mlruns/sweeps.db``. A separate file: Optuna and MLflow each keep their own
    schema version in their database."""
    from core.store import tracking_uri as current_tracking_uri

    db = sqlite_path(tracking_uri or current_tracking_uri())
    folder = db.parent if db is not None else DEFAULT_STORE_DIR
    return f"sqlite:///{(folder / STUDY_FILE).resolve()}"


def open_storage(storage: str) -> optuna.storages.RDBStorage:
    """Optuna's storage at URL ``storage`` (its tables are created on first use)."""
    import optuna
    from sqlalchemy.exc import IntegrityError, OperationalError

    db = sqlite_path(storage)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    # A reader (the app, a test) may hold the file for a moment: wait for it rather than fail at once.
    engine = {"connect_args": {"timeout": 30}} if db is not None else {}
    attempt = 0
    while True:
        try:
            return optuna.storages.RDBStorage(storage, engine_kwargs=engine)
        except (IntegrityError, OperationalError):
            # Every opener of a new storage creates its tables: two at once (a starting sweep and a --check or a
            # reader) collide on a table or the schema version row. The other one has made them by now: open again.
            attempt += 1
            if attempt == _OPEN_ATTEMPTS:
                raise
            time.sleep(0.2 * attempt)


def existing_study_id(storage: str, name: str) -> tuple[optuna.storages.RDBStorage | None, int | None]:
    """(the storage, the study's id) if study ``name`` exists; no file is created for a storage that is not there."""
    db = sqlite_path(storage)
    if db is not None and not db.is_file():
        return None, None
    opened = open_storage(storage)
    try:
        return opened, opened.get_study_id_from_name(name)
    except KeyError:
        return opened, None
