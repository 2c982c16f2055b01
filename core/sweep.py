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

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import signal
import threading
import time
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.callbacks import Callback
from core.config import _NAME, DataConfig, ModelConfig, TrackingConfig, TrainConfig
from core.errors import UsageError
from core.store import DEFAULT_STORE_DIR, sqlite_path

if TYPE_CHECKING:
    import optuna

    from core.trainer import Trainer

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
MAX_CORNERS = 4096
"""Most combinations of range ends and choices :func:`check_space` builds configs for."""
_OPEN_ATTEMPTS = 5
MAX_INT_VALUES = 10_000
"""Int ranges up to this many values have every value checked against the base configs."""

_SHAPE_FIELDS = {"model.n_layer", "model.n_head", "model.n_embd"}
KINDS = ("uniform", "loguniform", "int", "choice")
_KIND_HELP = "use uniform:LOW:HIGH, loguniform:LOW:HIGH, int:LOW:HIGH[:STEP] or choice:A,B,..."
_CONFIGS: dict[str, type] = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
_NOT_SEARCHABLE = {
    "model.vocab_size": "it is the tokenizer's",
    "model.pad_vocab_multiple": "padding changes speed, not what the model learns",
    "data.source": "every trial must train on the same corpus",
    "data.cache_dir": "it says where files go",
    "data.val_fraction": "every trial must be measured on the same held-out text",
    "train.eval_interval": "every trial must be evaluated (and pruned) at the same points",
    "train.eval_batches": "every trial must be measured on the same held-out text",
    "train.device": "it says where training runs",
    "train.init_from": "it says where the weights come from",
    "train.compile": "it changes speed, not what the model learns",
    "train.peak_tflops": "it only scales the reported MFU",
    "train.checkpoint_interval": "it says how often to save",
    "train.keep_checkpoints": "it says how many checkpoints to keep",
    "train.time_budget": "each trial's budget is --trial-budget",
    "train.sample_interval": "samples do not change training",
    "train.sample_prompt": "samples do not change training",
    "train.sample_tokens": "samples do not change training",
}


def _field_types() -> dict[str, Any]:
    """``config.field`` → the field's type, for every field of the model, data and train configs."""
    types = {}
    for key, cls in _CONFIGS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            types[f"{key}.{f.name}"] = hints[f.name]
    return types


def searchable_fields() -> list[str]:
    """The names a search space may use: bare field names (``block_size`` and ``seed`` set the field of every
    config that has it, as the training CLI's --block-size and --seed do) and ``config.field`` names."""
    qualified = [name for name in _field_types() if name not in _NOT_SEARCHABLE]
    return sorted({name.split(".", 1)[1] for name in qualified} | set(qualified))


def _targets(name: str, text: str) -> list[str]:
    """The ``config.field`` names a space name sets; UsageError for a name no config has or a field that is not
    searchable."""
    types = _field_types()
    if "." in name:
        targets = [name] if name in types else []
    else:
        targets = [key for key in types if key.split(".", 1)[1] == name]
    if not targets:
        raise UsageError(
            f"--param {text}: no training or model field is called {name!r}; a space can use: "
            + ", ".join(f for f in searchable_fields() if "." not in f)
        )
    refused = [t for t in targets if t in _NOT_SEARCHABLE]
    if refused:
        raise UsageError(f"--param {text}: {name} cannot be searched: {_NOT_SEARCHABLE[refused[0]]}")
    return targets


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(int, float, bool or str; whether None is allowed) of a field annotation such as ``int | None``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = len(args) != len(typing.get_args(annotation))
    return (args[0] if args else annotation), optional


@dataclass(frozen=True)
class ParamSpec:
    """One dimension of a search space, as parsed from ``name=kind:args`` by :func:`parse_param`."""

    name: str
    """The name as given (``lr``, ``block_size``, ``data.seed``); Optuna's parameter name."""
    kind: str
    """One of :data:`KINDS`."""
    targets: tuple[str, ...]
    """The ``config.field`` names it sets (two for ``block_size`` and ``seed``)."""
    low: float | int | None = None
    high: float | int | None = None
    step: int | None = None
    """Step of an ``int`` range (1 when not given)."""
    choices: tuple[Any, ...] = ()
    text: str = ""
    """The spec as the user wrote it, ``name=kind:args``."""

    def suggest(self, trial: optuna.Trial) -> Any:
        """This dimension's value for ``trial``, drawn by the study's sampler."""
        if self.kind == "uniform":
            return trial.suggest_float(self.name, self.low, self.high)
        if self.kind == "loguniform":
            return trial.suggest_float(self.name, self.low, self.high, log=True)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def corners(self) -> tuple[Any, ...]:
        """The values that bound this dimension: a range's two ends, or every choice."""
        return (self.low, self.high) if self.kind != "choice" else self.choices

    def values(self) -> tuple[Any, ...] | None:
        """Every value it can take when there are few enough to list (choices, short int ranges); else None."""
        if self.kind == "choice":
            return self.choices
        if self.kind == "int" and (self.high - self.low) // (self.step or 1) < MAX_INT_VALUES:
            return tuple(range(self.low, self.high + 1, self.step or 1))
        return None


def _number(raw: str, kind: type, text: str) -> Any:
    """``raw`` as an int or a finite float, or UsageError naming the spec."""
    try:
        value = int(raw) if kind is int else float(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise UsageError(f"--param {text}: {raw.strip()!r} is not {what}") from None
    if not math.isfinite(value):
        raise UsageError(f"--param {text}: {raw.strip()!r} is not a finite number")
    return value


def _choice(raw: str, kind: type, optional: bool, text: str) -> Any:
    """One value of a ``choice`` list, parsed as the field's type (``none`` for a field that may be unset)."""
    raw = raw.strip()
    if optional and raw.lower() == "none":
        return None
    if kind is bool:
        if raw.lower() not in ("true", "false"):
            raise UsageError(f"--param {text}: {raw!r} is not true or false")
        return raw.lower() == "true"
    if kind is str:
        if not raw:
            raise UsageError(f"--param {text}: a choice value is empty")
        return raw
    return _number(raw, kind, text)


def parse_param(text: str) -> ParamSpec:
    """Parse one dimension: ``NAME=uniform:LOW:HIGH``, ``NAME=loguniform:LOW:HIGH`` (LOW > 0, sampled evenly in
    log space), ``NAME=int:LOW:HIGH[:STEP]`` or ``NAME=choice:A,B,...`` (one value or more; ``true``/``false`` for
    a yes/no field, ``none`` for a field that may be unset). Ranges include both ends and need LOW < HIGH; ranges fit
    the field's type (``uniform``/``loguniform`` for decimal fields, ``int`` for whole-number ones).

    Raises :class:`UsageError` with one line naming the spec for anything else.
    """
    if not isinstance(text, str) or "=" not in text:
        raise UsageError(f"--param {text}: expected NAME=KIND:ARGS, e.g. lr=loguniform:1e-4:3e-3")
    name, _, spec = (part.strip() for part in text.partition("="))
    text = f"{name}={spec}"
    targets = _targets(name, text)
    types = _field_types()
    kind, optional = _base_type(types[targets[0]])
    if any(_base_type(types[t])[0] is not kind for t in targets):  # never happens for today's shared fields
        raise UsageError(f"--param {text}: {name} names fields of different types; qualify it, e.g. model.{name}")
    family, _, args = spec.partition(":")
    family = family.strip().lower()
    if family not in KINDS:
        raise UsageError(f"--param {text}: unknown kind {family!r}; {_KIND_HELP}")
    if family == "choice":
        raw = [a for a in args.split(",")] if args.strip() else []
        if not raw:
            raise UsageError(f"--param {text}: a choice needs at least one value, e.g. {name}=choice:A,B")
        choices = tuple(_choice(r, kind, optional, text) for r in raw)
        repeated = sorted({repr(c) for c in choices if choices.count(c) > 1})
        if repeated:
            raise UsageError(f"--param {text}: the choice {repeated[0]} is given twice")
        return ParamSpec(name, family, tuple(targets), choices=choices, text=text)
    parts = args.split(":")
    if family in ("uniform", "loguniform"):
        if kind is not float:
            raise UsageError(f"--param {text}: {name} is a whole number; use int:LOW:HIGH or choice:A,B,...")
        if len(parts) != 2:
            raise UsageError(f"--param {text}: expected {family}:LOW:HIGH")
        low, high = (_number(p, float, text) for p in parts)
        if family == "loguniform" and low <= 0:
            raise UsageError(f"--param {text}: a loguniform range needs LOW > 0, got {low:g}")
        step = None
    else:
        if kind is not int:
            raise UsageError(f"--param {text}: {name} is not a whole number; use uniform:, loguniform: or choice:")
        if len(parts) not in (2, 3):
            raise UsageError(f"--param {text}: expected int:LOW:HIGH or int:LOW:HIGH:STEP")
        low, high = (_number(p, int, text) for p in parts[:2])
        step = _number(parts[2], int, text) if len(parts) == 3 else None
        if step is not None and step <= 0:
            raise UsageError(f"--param {text}: the step must be a positive integer, got {step}")
        if step is not None and (high - low) % step:
            raise UsageError(f"--param {text}: the range {low}..{high} is not a whole number of steps of {step}")
    if low >= high:
        raise UsageError(
            f"--param {text}: LOW must be below HIGH, got {low:g} and {high:g} (for one value use choice:{low:g})"
        )
    return ParamSpec(name, family, tuple(targets), low=low, high=high, step=step, text=text)


def parse_space(texts: Sequence[str]) -> tuple[ParamSpec, ...]:
    """Parse every ``--param`` (see :func:`parse_param`); UsageError for an empty space or a field set twice."""
    if not texts:
        raise UsageError("the search space is empty: give at least one --param NAME=SPEC, e.g. lr=loguniform:1e-4:3e-3")
    space: list[ParamSpec] = []
    for text in texts:
        spec = parse_param(text)
        for earlier in space:
            shared = sorted(set(spec.targets) & set(earlier.targets))
            if shared:
                same = spec.name == earlier.name
                raise UsageError(
                    f"--param {spec.name} is given twice; give each field once"
                    if same
                    else f"--param {earlier.name} and --param {spec.name} both set {shared[0]}; give it once"
                )
        space.append(spec)
    return tuple(space)


def apply_params(
    model: ModelConfig, data: DataConfig, train: TrainConfig, params: dict[str, Any], space: Sequence[ParamSpec]
) -> tuple[ModelConfig, DataConfig, TrainConfig]:
    """The base configs with the value in ``params`` (name → value) of each dimension it names set; ``ValueError``
    with the configs' own message when they refuse the combination (or a block longer than the model's context)."""
    changes: dict[str, dict[str, Any]] = {key: {} for key in _CONFIGS}
    for spec in space:
        if spec.name not in params:
            continue
        for target in spec.targets:
            key, name = target.split(".", 1)
            changes[key][name] = params[spec.name]
    model = dataclasses.replace(model, **changes["model"])
    data = dataclasses.replace(data, **changes["data"])
    train = dataclasses.replace(train, **changes["train"])
    if data.block_size > model.block_size:  # the trainer refuses it: refuse it here, before any run exists
        raise ValueError(f"block size {data.block_size} is above the model's context of {model.block_size}")
    return model, data, train


def check_space(space: Sequence[ParamSpec], model: ModelConfig, data: DataConfig, train: TrainConfig) -> None:
    """Raise :class:`UsageError` (one line) if the configs refuse a value the space can take.

    Checked: every value of each choice and short int range on the base configs (the other fields at their base
    values), then every combination of
    the dimensions' corners (range ends and choices, up to :data:`MAX_CORNERS`), so that e.g. ``n_embd=choice:96,128``
    with ``n_head=choice:3,4`` is refused. Values inside a float range are not checked: the configs' limits are
    ranges themselves. A trial whose values are refused anyway (``n_embd=int:64:256`` with 4 heads draws 65) fails
    without a run, and the sweep goes on.
    """
    for spec in space:
        for value in spec.values() or spec.corners():
            try:
                apply_params(model, data, train, {spec.name: value}, space)
            except ValueError as exc:
                raise UsageError(f"--param {spec.text}: {spec.name}={value} is refused: {exc}") from None
    combos = math.prod(len(spec.corners()) for spec in space)
    if len(space) < 2 or combos > MAX_CORNERS:
        return
    for values in itertools.product(*(spec.corners() for spec in space)):
        params = dict(zip((spec.name for spec in space), values, strict=True))
        try:
            apply_params(model, data, train, params, space)
        except ValueError as exc:
            together = ", ".join(f"{name}={value}" for name, value in params.items())
            raise UsageError(f"the search space contradicts itself: {together} is refused: {exc}") from None


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


def _open_storage(storage: str) -> optuna.storages.RDBStorage:
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


def _existing_study_id(storage: str, name: str) -> tuple[optuna.storages.RDBStorage | None, int | None]:
    """(the storage, the study's id) if study ``name`` exists; no file is created for a storage that is not there."""
    db = sqlite_path(storage)
    if db is not None and not db.is_file():
        return None, None
    opened = _open_storage(storage)
    try:
        return opened, opened.get_study_id_from_name(name)
    except KeyError:
        return opened, None


@dataclass
class SweepPlan:
    """A validated sweep, ready for :func:`run_sweep`; making one creates nothing."""

    settings: SweepSettings
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    """The base configs every trial starts from (``train.time_budget`` is the trial budget)."""
    tracking: TrackingConfig
    """Experiment, registered model name and alias, store and checkpoint root; ``run_name`` names the parent run."""
    storage: str
    """The Optuna storage URL of the study."""
    parent_run_id: str | None = None
    """The parent run of a sweep being resumed; None for a new sweep."""


def plan_sweep(
    settings: SweepSettings,
    model: ModelConfig,
    data: DataConfig,
    train: TrainConfig,
    tracking: TrackingConfig,
    *,
    storage: str | None = None,
) -> SweepPlan:
    """Check a new sweep: the space against the configs (:func:`check_space`), that the metric gets logged, that a
    local corpus exists and that no study of that name exists in ``storage`` (default: :func:`default_storage` of
    the tracking store). Raises :class:`UsageError` (one line); creates nothing."""
    from core.data import is_url, prepare_corpus
    from core.tokenizer import get_tokenizer

    if train.eval_interval == 0:
        raise UsageError(
            f"--metric {settings.metric} is never logged: --eval-interval 0 turns validation off; give an interval"
        )
    if not is_url(data.source) and not Path(data.source).is_file():
        raise UsageError(f"corpus file not found: {data.source}")
    # Prepared (downloaded and tokenised, cached) before anything is created: a corpus every trial would fail on
    # stops the sweep here, with the corpus's own message, instead of leaving a study of failed trials.
    prepare_corpus(data, get_tokenizer())
    shaped = [spec.text for spec in settings.space if set(spec.targets) & _SHAPE_FIELDS]
    if train.init_from is not None and shaped:
        raise UsageError(f"--param {shaped[0]}: with --init-from the model's shape comes from the checkpoint")
    train = dataclasses.replace(train, time_budget=settings.trial_budget)
    check_space(settings.space, model, data, train)
    storage = storage or default_storage(tracking.tracking_uri)
    _, study_id = _existing_study_id(storage, settings.name)
    if study_id is not None:
        raise UsageError(
            f"a sweep named {settings.name!r} already exists in {storage}; continue it with --resume {settings.name}, "
            "or choose another --name"
        )
    return SweepPlan(settings, model, data, train, tracking, storage)


def plan_resume(
    name: str,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    n_trials: int | None = None,
    time_budget: float | None = None,
) -> SweepPlan:
    """Check that sweep ``name`` can go on, with its stored settings (``n_trials`` and ``time_budget``, when given,
    replace the stored ones). Refused (:class:`UsageError`): no such study, a finished sweep, or one whose process
    still runs. Creates and changes nothing."""
    from mlflow.exceptions import MlflowException

    from core.store import connect
    from core.store import tracking_uri as current_tracking_uri
    from core.tracking import HOST_TAG, PID_TAG

    uri = tracking_uri or current_tracking_uri()
    storage = storage or default_storage(uri)
    opened, study_id = _existing_study_id(storage, name)
    if study_id is None:
        raise UsageError(f"no sweep named {name!r} in {storage}")
    attrs = opened.get_study_user_attrs(study_id)
    try:
        stored = attrs["sweep"]
        settings = SweepSettings.from_dict(stored["settings"])
        model = ModelConfig.from_dict(stored["model"])
        data, train = DataConfig(**stored["data"]), TrainConfig(**stored["train"])
        tracking = TrackingConfig(**{**stored["tracking"], "tracking_uri": uri})
        parent_run_id = attrs["parent_run_id"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"study {name!r} in {storage} was not made by pipelines.sweep ({exc})") from None
    changes = {k: v for k, v in (("n_trials", n_trials), ("time_budget", time_budget)) if v is not None}
    settings = dataclasses.replace(settings, **changes)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UsageError(f"sweep {name!r} has its runs in another tracking store: {uri} does not exist")
    client = connect(uri)
    try:
        parent = client.get_run(parent_run_id)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise UsageError(f"sweep {name!r}: its parent run {parent_run_id} is not in {uri}") from None
    status = parent.info.status
    if parent.info.lifecycle_stage == "deleted":
        raise UsageError(f"sweep {name!r}: its parent run {parent_run_id} is deleted; restore it to resume")
    if status == "FINISHED":
        raise UsageError(f"sweep {name!r} is finished (run {parent_run_id}); start another with a new --name")
    if status == "RUNNING" and _owner_alive(parent.data.tags):
        tags = parent.data.tags
        raise UsageError(
            f"sweep {name!r} is running (process {tags.get(PID_TAG)} on {tags.get(HOST_TAG)}); cancel it before "
            "resuming"
        )
    return SweepPlan(settings, model, data, train, tracking, storage, parent_run_id)


def _owner_alive(tags: dict[str, str]) -> bool:
    """Whether the process named by a run's process tags (:func:`core.tracking.process_tags`) runs on this machine
    (same pid *and* start time); a run of another machine counts as alive: it cannot be checked from here."""
    import socket

    import psutil

    from core.tracking import HOST_TAG, PID_TAG, PROCESS_START_TAG

    if tags.get(HOST_TAG) != socket.gethostname():
        return HOST_TAG in tags
    try:
        process = psutil.Process(int(tags[PID_TAG]))
        return abs(process.create_time() - float(tags[PROCESS_START_TAG])) < 1.0
    except (KeyError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
        return False


# -- running a sweep -----------------------------------------------------------------------------------------------


@dataclass
class SweepStatus:
    """Where a sweep stands, given to :meth:`SweepObserver.on_status` whenever it changes."""

    name: str
    parent_run_id: str
    metric: str
    n_trials: int | None
    """The trials asked for (None: as many as the time budget allows)."""
    time_budget: float | None
    phase: str = "running"
    """``running`` (a trial trains or is about to), ``finishing`` (registering the best model) or ``ended``."""
    trial_number: int | None = None
    """Optuna's number of the trial that trains now (0-based, over the whole study)."""
    trial_index: int | None = None
    """1-based position of that trial among the counted ones ("trial 2 of 3")."""
    trial_run_id: str | None = None
    trial_params: dict[str, Any] = field(default_factory=dict)
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    """Trials of the study that ended each way (interrupted ones are not counted)."""
    best_value: float | None = None
    best_trial: int | None = None
    best_run_id: str | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    last_trial: dict[str, Any] | None = None
    """The latest trial that ended: ``number``, ``state``, ``value``, ``run_id``, ``steps``, ``error``."""
    elapsed_s: float = 0.0
    """Seconds since this session of the sweep started."""
    stop_reason: str | None = None
    """Why the sweep stopped: ``trials``, ``time_budget``, ``grid`` (every combination tried) or
    ``stopped: <signal>``; None while it runs."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-serialisable)."""
        return dataclasses.asdict(self)


class SweepObserver:
    """Receives a sweep's reports (a terminal, a background job's files). The base class does nothing."""

    def on_status(self, status: SweepStatus) -> None:
        """Whenever the status changes: the sweep starts, a trial starts or gets its run, a trial ends, the sweep
        ends."""

    def trial_callbacks(self, number: int, train: TrainConfig) -> list[Callback]:
        """Extra trainer callbacks for trial ``number`` (trained with ``train``)."""
        return []


class ObserverGroup(SweepObserver):
    """Several observers as one: each hook goes to every one of them, in order."""

    def __init__(self, *observers: SweepObserver):
        self.observers = observers

    def on_status(self, status: SweepStatus) -> None:
        for observer in self.observers:
            observer.on_status(status)

    def trial_callbacks(self, number: int, train: TrainConfig) -> list[Callback]:
        return [c for observer in self.observers for c in observer.trial_callbacks(number, train)]


@dataclass
class SweepOutcome:
    """What :func:`run_sweep` produced."""

    name: str
    parent_run_id: str
    status: str
    """The parent run's end: FINISHED or KILLED."""
    stop_reason: str
    complete: int
    pruned: int
    failed: int
    best_trial: int | None
    best_value: float | None
    best_run_id: str | None
    best_params: dict[str, Any]
    model_name: str | None
    """The registered model (None when no trial completed, or the sweep was stopped)."""
    model_version: str | None


class _Interrupted(Exception):
    """The sweep was asked to stop (SIGTERM/SIGINT) while this trial was due to train or training."""


class _TrialFailed(Exception):
    """This trial failed on its own (refused values, diverged, out of memory); the sweep goes on."""


def _interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    return bool(trial.user_attrs.get("interrupted"))


def _counts(study: optuna.Study) -> tuple[int, int, int]:
    """(complete, pruned, failed) trials of ``study``; failed ones interrupted by a stop are not counted."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state == TrialState.COMPLETE for t in trials)
    pruned = sum(t.state == TrialState.PRUNED for t in trials)
    failed = sum(t.state == TrialState.FAIL and not _interrupted(t) for t in trials)
    return complete, pruned, failed


class _Pruning(Callback):
    """Trainer callback of one trial: reports each evaluation's metric to Optuna (step = the evaluation's number,
    see the module docstring) and stops the trainer with the stop rule :data:`PRUNED` when the pruner says so (the
    final evaluation, after the loop, cannot stop anything)."""

    def __init__(self, trial: optuna.Trial, metric: str, trainer_of: typing.Callable[[], Trainer | None]):
        self.trial = trial
        self.metric = metric
        self.trainer_of = trainer_of
        self.values: list[float] = []
        self.pruned_at: int | None = None

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        value = float(metrics[self.metric])
        self.values.append(value)
        self.trial.report(value, len(self.values))
        trainer = self.trainer_of()
        if self.pruned_at is None and trainer is not None and self.trial.should_prune():
            self.pruned_at = step
            trainer.request_stop(PRUNED)


class _Sweep:
    """One session of a sweep: the study, the parent run, the signal flag and the observer."""

    def __init__(self, plan: SweepPlan, observer: SweepObserver):
        from core.store import connect

        self.plan = plan
        self.settings = plan.settings
        self.observer = observer
        self.client = connect(plan.tracking.tracking_uri)
        self.started = time.monotonic()
        self.stop_signal: str | None = None
        self.trainer: Trainer | None = None
        self.out_of_time = False
        self.durations: list[float] = []
        self.status: SweepStatus | None = None
        self.study: optuna.Study | None = None

    # -- signals ---------------------------------------------------------------------------------------------------

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signal.Signals(signum).name
        if self.trainer is not None:
            self.trainer.request_stop(self.stop_signal)

    @contextmanager
    def signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT stop the sweep: the training trial after its current step, and no new trial starts."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # -- the parent run and the study ------------------------------------------------------------------------------

    def _sampler(self, n_existing: int) -> optuna.samplers.BaseSampler:
        import optuna

        if self.settings.sampler == "grid":
            # The seed shuffles the grid, whose positions the study records: a resumed sweep needs the same one.
            space = {s.name: list(s.choices) for s in self.settings.space}
            return optuna.samplers.GridSampler(space, seed=self.settings.seed)
        # A resumed study gets another seed: the same one would draw the first trials' values again.
        seed = self.settings.seed + n_existing
        if self.settings.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed)

    def create(self) -> None:
        """Create the parent run, then the study that names it; if the study cannot be made the run ends FAILED."""
        import optuna

        from core.store import ensure_experiment
        from core.tracking import log_params, process_tags

        plan, settings = self.plan, self.settings
        experiment_id = ensure_experiment(self.client, plan.tracking.experiment)
        tags = {"sweep.name": settings.name, "sweep.storage": plan.storage, "sweep.role": "parent", **process_tags()}
        run = self.client.create_run(experiment_id, run_name=plan.tracking.run_name or settings.name, tags=tags)
        parent_run_id = run.info.run_id
        try:
            params = {
                "sweep.metric": settings.metric,
                "sweep.sampler": settings.sampler,
                "sweep.pruner": settings.pruner,
                "sweep.seed": settings.seed,
                "sweep.trial_budget": settings.trial_budget,
                **{f"space.{spec.name}": spec.text.partition("=")[2] for spec in settings.space},
            }
            log_params(self.client, parent_run_id, params)
            self._log_limits(parent_run_id)
            stored = {
                "settings": settings.to_dict(),
                "model": plan.model.to_dict(),
                "data": dataclasses.asdict(plan.data),
                "train": plan.train.to_dict(),
                "tracking": {k: v for k, v in dataclasses.asdict(plan.tracking).items() if k not in ("tracking_uri",)},
            }
            self.client.log_text(parent_run_id, json.dumps(stored, indent=2), "sweep.json")
            study = optuna.create_study(
                storage=_open_storage(plan.storage),
                study_name=settings.name,
                direction="minimize",
                sampler=self._sampler(0),
                pruner=parse_pruner(settings.pruner),
            )
            study.set_user_attr("sweep", stored)
            study.set_user_attr("parent_run_id", parent_run_id)
        except BaseException as exc:
            self.client.set_tag(parent_run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
            self.client.set_terminated(parent_run_id, "FAILED")
            raise
        plan.parent_run_id = parent_run_id
        self.study = study

    def _log_limits(self, parent_run_id: str) -> None:
        # Tags, not params: a resumed sweep may be given other limits, and MLflow params never change.
        self.client.set_tag(parent_run_id, "sweep.trials", str(self.settings.n_trials))
        self.client.set_tag(parent_run_id, "sweep.time_budget", str(self.settings.time_budget))

    def reopen(self) -> None:
        """Load the study of a resumed sweep, mark the trials its stopped process left RUNNING failed and
        interrupted (their runs end KILLED), queue every interrupted trial's values to be tried again (once), and
        take the parent run over (RUNNING again, with this process's tags)."""
        import optuna
        from mlflow.entities import RunTag
        from optuna.trial import TrialState

        from core.jobs import DIED_ERROR
        from core.tracking import PID_TAG, process_tags

        plan = self.plan
        storage = _open_storage(plan.storage)
        study = optuna.load_study(study_name=self.settings.name, storage=storage)
        study_id = storage.get_study_id_from_name(self.settings.name)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            run_id = trial.user_attrs.get("run_id")
            if run_id is not None:
                run = self.client.get_run(run_id)
                if run.info.status == "RUNNING":
                    self.client.set_tag(run_id, "error", DIED_ERROR.format(pid=run.data.tags.get(PID_TAG)))
                    self.client.set_terminated(run_id, "KILLED")
                self.client.set_tag(run_id, "sweep.state", "FAIL")
        # Queued trials run before any new one (a grid sampler counts an interrupted combination as tried). The
        # study remembers which were queued, so that a sweep stopped again does not queue them twice.
        retried = set(study.user_attrs.get("retried", []))
        for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
            if _interrupted(trial) and trial.params and trial.number not in retried:
                study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
                retried.add(trial.number)
        study.set_user_attr("retried", sorted(retried))
        study.sampler = self._sampler(len(study.trials))
        study.pruner = parse_pruner(self.settings.pruner)
        parent_run_id = plan.parent_run_id
        parent = self.client.get_run(parent_run_id)
        self.client.log_batch(parent_run_id, tags=[RunTag(k, v) for k, v in process_tags().items()])
        for key in ("error", "stop_reason"):  # they described how the previous session ended
            if key in parent.data.tags:
                self.client.delete_tag(parent_run_id, key)
        self._log_limits(parent_run_id)
        self.client.update_run(parent_run_id, status="RUNNING")
        self.study = study

    # -- trials ----------------------------------------------------------------------------------------------------

    def report(self, **changes) -> None:
        complete, pruned, failed = _counts(self.study)
        self.status = dataclasses.replace(
            self.status,
            complete=complete,
            pruned=pruned,
            failed=failed,
            elapsed_s=time.monotonic() - self.started,
            **changes,
        )
        self.observer.on_status(self.status)

    def objective(self, trial: optuna.Trial) -> float:
        """Train one trial as a nested run; its value is the lowest metric over its evaluations."""
        from core.errors import StudioError
        from core.experiment import run_training

        plan, settings = self.plan, self.settings
        if self.stop_signal is not None:
            trial.set_user_attr("interrupted", True)
            raise _Interrupted(self.stop_signal)
        params = {spec.name: spec.suggest(trial) for spec in settings.space}
        complete, pruned, failed = _counts(self.study)
        self.report(
            trial_number=trial.number,
            trial_index=complete + pruned + failed + 1,
            trial_run_id=None,
            trial_params=params,
        )
        started = time.monotonic()
        try:
            model, data, train = apply_params(plan.model, plan.data, plan.train, params, settings.space)
        except ValueError as exc:  # e.g. n_embd=int:64:256 drew 65 with 4 heads: this trial only, no run
            trial.set_user_attr("error", str(exc))
            raise _TrialFailed(str(exc)) from None
        tracking = dataclasses.replace(
            plan.tracking,
            run_name=f"{settings.name}-trial-{trial.number}",
            parent_run_id=plan.parent_run_id,
            register=False,
            alias=None,
        )
        pruning = _Pruning(trial, settings.metric, lambda: self.trainer)
        callbacks = [pruning, *self.observer.trial_callbacks(trial.number, train)]

        def on_trainer(trainer: Trainer) -> None:
            self.trainer = trainer
            if self.stop_signal is not None:  # a signal while the trainer was being built
                trainer.request_stop(self.stop_signal)

        def on_run_created(run_id: str) -> None:
            trial.set_user_attr("run_id", run_id)
            tags = {
                "sweep.name": settings.name,
                "sweep.trial_number": str(trial.number),
                "sweep.params": json.dumps(params),
                "sweep.state": "RUNNING",
            }
            for key, value in tags.items():
                self.client.set_tag(run_id, key, value)
            self.report(trial_run_id=run_id)

        try:
            outcome = run_training(
                model,
                data,
                train,
                tracking,
                callbacks,
                on_run_created=on_run_created,
                on_trainer=on_trainer,
                stop_rules=(PRUNED,),
                handle_signals=False,
            )
        except BaseException as exc:
            run_id = trial.user_attrs.get("run_id")
            if run_id is not None:  # run_training has ended it FAILED
                self.client.set_tag(run_id, "sweep.state", "FAIL")
            if isinstance(exc, (FloatingPointError, StudioError)):
                # This trial's own failure (a diverging learning rate, a batch too large for the device): the
                # sweep goes on with the next trial. Anything else (the store failing, a bug) stops the sweep.
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:1000])
                raise _TrialFailed(str(exc)) from exc
            raise
        finally:
            self.trainer = None
        self.durations.append(time.monotonic() - started)
        result = outcome.result
        trial.set_user_attr("steps", result.steps)
        trial.set_user_attr("stop_reason", result.stop_reason)
        if outcome.status == "KILLED":  # stopped by the sweep's signal: redone when the sweep resumes
            self.client.set_tag(outcome.run_id, "sweep.state", "FAIL")
            trial.set_user_attr("interrupted", True)
            raise _Interrupted(result.stop_reason)
        if result.best_checkpoint is not None:
            trial.set_user_attr("checkpoint", str(result.best_checkpoint))
        if not pruning.values:
            self.client.set_tag(outcome.run_id, "sweep.state", "FAIL")
            raise _TrialFailed(f"trial {trial.number} logged no {settings.metric}")
        best = min(pruning.values)
        self.client.set_tag(outcome.run_id, f"sweep.{settings.metric}", repr(best))
        if result.stop_reason == PRUNED:
            self.client.set_tag(outcome.run_id, "sweep.state", "PRUNED")
            import optuna

            raise optuna.TrialPruned(f"pruned at step {pruning.pruned_at}")
        self.client.set_tag(outcome.run_id, "sweep.state", "COMPLETE")
        return best

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback after each trial: the parent run's best so far, the observer, and the stop checks."""
        from optuna.trial import TrialState

        best = self._best()
        if best is not None:
            parent = self.plan.parent_run_id
            self.client.log_metric(parent, f"best_{self.settings.metric}", best.value, step=trial.number)
            self.client.set_tag(parent, "sweep.best_trial", str(best.number))
            self.client.set_tag(parent, "sweep.best_run_id", str(best.user_attrs.get("run_id")))
        value = trial.value if trial.state == TrialState.COMPLETE else None
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            value = trial.intermediate_values[max(trial.intermediate_values)]
        last = {
            "number": trial.number,
            "state": trial.state.name,
            "value": value,
            "run_id": trial.user_attrs.get("run_id"),
            "steps": trial.user_attrs.get("steps"),
            "error": trial.user_attrs.get("error"),
        }
        self.report(last_trial=last, **self._best_fields(best))
        if self.stop_signal is not None:
            study.stop()
        elif self.settings.time_budget is not None:
            left = self.settings.time_budget - (time.monotonic() - self.started)
            needed = self.settings.trial_budget or (sum(self.durations) / len(self.durations) if self.durations else 0)
            if left < needed:
                self.out_of_time = True
                study.stop()

    def _best(self) -> optuna.trial.FrozenTrial | None:
        from optuna.trial import TrialState

        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return min(complete, key=lambda t: t.value) if complete else None

    @staticmethod
    def _best_fields(best: optuna.trial.FrozenTrial | None) -> dict[str, Any]:
        if best is None:
            return {"best_value": None, "best_trial": None, "best_run_id": None, "best_params": {}}
        return {
            "best_value": best.value,
            "best_trial": best.number,
            "best_run_id": best.user_attrs.get("run_id"),
            "best_params": dict(best.params),
        }

    # -- the end ---------------------------------------------------------------------------------------------------

    def finish(self, stop_reason: str) -> SweepOutcome:
        """Register the best trial's best-validation checkpoint with the alias and end the parent run FINISHED
        (without a model when no trial completed)."""
        from core.registry import log_and_register

        plan, parent = self.plan, self.plan.parent_run_id
        best = self._best()
        name = version = None
        self.report(phase="finishing", trial_number=None, trial_run_id=None, **self._best_fields(best))
        if best is not None:
            checkpoint = best.user_attrs.get("checkpoint")
            if checkpoint is None:
                raise UsageError(f"the best trial, {best.number}, has no best-validation checkpoint to register")
            registered = log_and_register(
                self.client,
                best.user_attrs["run_id"],
                checkpoint,
                name=plan.tracking.register_as,
                alias=plan.tracking.alias,
                description=f"best trial ({best.number}) of sweep {self.settings.name}: "
                f"{self.settings.metric} {best.value:.4f}",
            )
            name, version = registered.name, str(registered.version)
            self.client.set_tag(parent, "registered_model", f"{name}/{version}")
            self.client.set_tag(best.user_attrs["run_id"], "registered_model", f"{name}/{version}")
        self.client.set_tag(parent, "stop_reason", stop_reason)
        self.client.set_terminated(parent, "FINISHED")
        return self._outcome("FINISHED", stop_reason, best, name, version)

    def stopped(self, stop_reason: str) -> SweepOutcome:
        """End the parent run KILLED: the study stays as it is, to be resumed."""
        parent = self.plan.parent_run_id
        self.client.set_tag(parent, "stop_reason", stop_reason)
        self.client.set_terminated(parent, "KILLED")
        return self._outcome("KILLED", stop_reason, self._best(), None, None)

    def _outcome(self, status, stop_reason, best, name, version) -> SweepOutcome:
        complete, pruned, failed = _counts(self.study)
        self.report(phase="ended", trial_number=None, trial_run_id=None, stop_reason=stop_reason)
        fields = self._best_fields(best)
        return SweepOutcome(
            name=self.settings.name,
            parent_run_id=self.plan.parent_run_id,
            status=status,
            stop_reason=stop_reason,
            complete=complete,
            pruned=pruned,
            failed=failed,
            best_trial=fields["best_trial"],
            best_value=fields["best_value"],
            best_run_id=fields["best_run_id"],
            best_params=fields["best_params"],
            model_name=name,
            model_version=version,
        )


def run_sweep(plan: SweepPlan, observer: SweepObserver | None = None, *, on_parent_created=None) -> SweepOutcome:
    """Carry out ``plan``: create (or, for a resumed plan, take over) the parent run and the study, run trials one
    after another with ``study.optimize`` until the trials asked for are done (counting a resumed study's earlier
    ones), the time budget is spent, a grid is exhausted or a signal stops it; then register the best trial's model.

    ``on_parent_created(run_id)`` is called once the parent run exists (or is taken over). SIGTERM and SIGINT (in the
    main thread) stop the running trial after its current step; the sweep then ends KILLED and can be resumed. An
    error ends the parent run FAILED and is raised; a trial's own failure (refused values, divergence, a too large
    batch) only fails that trial.
    """
    observer = observer or SweepObserver()
    sweep = _Sweep(plan, observer)
    settings = plan.settings
    with sweep.signals():
        if plan.parent_run_id is None:
            sweep.create()
        else:
            sweep.reopen()
        if on_parent_created is not None:
            on_parent_created(plan.parent_run_id)
        sweep.status = SweepStatus(
            name=settings.name,
            parent_run_id=plan.parent_run_id,
            metric=settings.metric,
            n_trials=settings.n_trials,
            time_budget=settings.time_budget,
        )
        try:
            sweep.report(**sweep._best_fields(sweep._best()))
            complete, pruned, failed = _counts(sweep.study)
            left = None if settings.n_trials is None else settings.n_trials - (complete + pruned + failed)
            if left is None or left > 0:
                # An interrupted trial is marked FAIL (and interrupted) by Optuna; the stop reason is the signal's.
                with contextlib.suppress(_Interrupted):
                    sweep.study.optimize(
                        sweep.objective, n_trials=left, catch=(_TrialFailed,), callbacks=[sweep.after_trial]
                    )
            if sweep.stop_signal is not None:
                return sweep.stopped(f"stopped: {sweep.stop_signal}")
            complete, pruned, failed = _counts(sweep.study)
            if sweep.out_of_time:
                reason = "time_budget"
            elif settings.n_trials is not None and complete + pruned + failed < settings.n_trials:
                reason = "grid"  # the grid sampler stops the study once every combination was tried
            else:
                reason = "trials"
            return sweep.finish(reason)
        except BaseException as exc:
            client, parent = sweep.client, plan.parent_run_id
            client.set_tag(parent, "error", f"{type(exc).__name__}: {exc}"[:5000])
            client.set_terminated(parent, "FAILED")
            raise


def study_trials(name: str, storage: str | None = None) -> list[dict[str, Any]]:
    """Every trial of sweep ``name``: ``number``, ``state``, ``value``, ``params``, ``run_id``, ``interrupted``.
    UsageError when there is no such sweep."""
    storage = storage or default_storage()
    opened, study_id = _existing_study_id(storage, name)
    if study_id is None:
        raise UsageError(f"no sweep named {name!r} in {storage}")
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "params": dict(t.params),
            "run_id": t.user_attrs.get("run_id"),
            "interrupted": _interrupted(t),
        }
        for t in opened.get_all_trials(study_id, deepcopy=False)
    ]
