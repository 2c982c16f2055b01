"""The search space: ``NAME=KIND:ARGS`` dimensions over the model, data and training configs' fields, parsed and
checked against the configs before any trial runs."""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from core.config import DataConfig, ModelConfig, TrainConfig
from core.errors import UsageError

if TYPE_CHECKING:
    import optuna


MAX_CORNERS = 4096
"""Most combinations of range ends and choices :func:`check_space` builds configs for."""
MAX_INT_VALUES = 10_000
"""Int ranges up to this many values have every value checked against the base configs."""

SHAPE_FIELDS = {"model.n_layer", "model.n_head", "model.n_embd"}
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
