"""How a run's configs are chosen: presets' recipes and the rule that turns a user's choices into validated configs.

A user (the CLI's flags, the Train page's fields) names a preset and the fields they want to set; everything else
comes from the preset's recipe (:data:`RECIPES`, measured for a CPU time budget) when it has one, else from the
config classes' defaults (the reference's). :func:`resolve_run_configs` is that rule, written once for every entry
point, and :class:`RunConfigs` is its result: what a job folder stores and a training process rebuilds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.config import PRESETS, DataConfig, ModelConfig, TrackingConfig, TrainConfig
from core.errors import UsageError

DEFAULT_PRESET = "tiny"
"""The preset of a run that names none and has no time budget."""

DEFAULT_TOKENS_PER_BATCH = 2048
"""The reference's B·T: a run that sets no batch size gets this many tokens per batch."""

RECIPES: dict[str, dict[str, Any]] = {
    "shakespeare-cpu": {
        "batch_size": 16,
        "block_size": 128,
        "order": "random",
        "max_steps": 1_000_000,
        "target_loss": 0.0,
        "lr": 3e-3,
        "warmup_fraction": 0.05,
        "weight_decay": 0.1,
        "grad_clip": 1.0,
        "tie_unused_tokens": True,
        "eval_interval": 200,
        "sample_interval": 200,
        "checkpoint_interval": 200,
    },
}
"""Data and training settings measured to give the lowest held-out bits per character for a preset on a CPU time
budget (README, "Quality per CPU-minute"); any setting chosen explicitly overrides them. Fields of
:class:`~core.config.DataConfig` and :class:`~core.config.TrainConfig`; a preset without a recipe trains with those
classes' defaults (the reference's)."""

LONG_BUDGET_SETTINGS: dict[str, list[tuple[float, dict[str, Any]]]] = {
    "shakespeare-cpu": [(1200.0, {"dropout": 0.2})],
}
"""Changes to a recipe for time budgets of at least so many seconds. A 30-minute run of the 10-minute recipe makes
about 20 passes over Tiny Shakespeare and overfits: its held-out bits per character bottomed out at 2.29 halfway
and rose after, while the training loss kept falling; dropout is what a longer budget needs."""

BUDGET_PRESET = "shakespeare-cpu"
"""The preset a time-budget run uses when none is named."""


def recipe_defaults(preset: str, time_budget: float | None = None) -> dict[str, Any]:
    """The recipe's field values for ``preset`` (empty for a preset without one), with the changes
    :data:`LONG_BUDGET_SETTINGS` makes for a ``time_budget`` of that many seconds."""
    values = dict(RECIPES.get(preset, {}))
    for threshold, changes in LONG_BUDGET_SETTINGS.get(preset, []):
        if time_budget is not None and time_budget >= threshold:
            values.update(changes)
    return values


@dataclass(frozen=True)
class RunConfigs:
    """The four configs of one training run."""

    model: ModelConfig
    """The model's shape."""
    data: DataConfig
    """The corpus and its batches."""
    train: TrainConfig
    """Optimisation and stopping."""
    tracking: TrackingConfig
    """Where the run is recorded and how its model is registered."""

    def to_dict(self) -> dict[str, Any]:
        """``{"model": ..., "data": ..., "train": ..., "tracking": ...}``, each a plain dict."""
        return {field.name: getattr(self, field.name).to_dict() for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfigs:
        """Rebuild (and so validate) the configs; a missing part or a bad value raises ``ValueError``."""
        if not isinstance(values, dict):
            raise ValueError(f"run configs must be a JSON object, got {type(values).__name__}")
        parts = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "tracking": TrackingConfig}
        missing = sorted(set(parts) - set(values))
        if missing:
            raise ValueError(f"run configs: missing {', '.join(missing)}")
        unknown = sorted(set(values) - set(parts))
        if unknown:
            raise ValueError(f"run configs: unknown part(s) {', '.join(unknown)}")
        return cls(**{name: kind.from_dict(values[name]) for name, kind in parts.items()})

    def astuple(self) -> tuple[ModelConfig, DataConfig, TrainConfig, TrackingConfig]:
        """(model, data, train, tracking)."""
        return self.model, self.data, self.train, self.tracking


RECIPE_FIELDS = (
    "max_steps",
    "target_loss",
    "lr",
    "warmup_fraction",
    "final_div_factor",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "grad_clip",
    "eval_interval",
    "sample_interval",
    "checkpoint_interval",
    "tie_unused_tokens",
)
"""The training fields a recipe may set (a choice left unset takes the recipe's value, then the class default)."""

PLAIN_TRAIN_FIELDS = (
    "time_budget",
    "grad_accum",
    "eval_batches",
    "patience",
    "sample_prompt",
    "seed",
    "device",
    "compile",
    "precision",
    "peak_tflops",
    "keep_checkpoints",
)
"""The training fields taken as chosen, or at the class default (no recipe sets them)."""

TRACKING_FIELDS = ("experiment", "run_name", "register_as", "alias", "register_best", "checkpoint_root")
"""The tracking fields a user chooses (the preset is recorded from the choice of preset)."""


def resolve_run_configs(choices: Mapping[str, Any]) -> RunConfigs:
    """The validated configs of a user's ``choices``: a flat mapping of field names to values, where a missing key
    or ``None`` means "not chosen".

    Keys: ``preset``, the model overrides ``n_layer``, ``n_head``, ``n_embd``, ``context`` (the model's block size),
    ``dropout``, ``pad_vocab`` (``pad_vocab_multiple``) and ``init_from`` (a Hugging Face GPT-2 folder whose config
    sets the shape); ``data`` (the corpus source), ``batch_size``, ``block_size``, ``order``; the fields of
    :data:`RECIPE_FIELDS`, :data:`PLAIN_TRAIN_FIELDS` and :data:`TRACKING_FIELDS`. A run with a time budget and no
    preset uses :data:`BUDGET_PRESET`; otherwise :data:`DEFAULT_PRESET`. A chosen value wins over the preset's recipe
    (:func:`recipe_defaults`), which wins over the config classes' defaults. A bad value raises ``ValueError`` (one
    line); a shape that contradicts ``init_from`` raises :class:`UsageError`.
    """
    chosen = {key: value for key, value in choices.items() if value is not None}
    unknown = sorted(set(chosen) - CHOICE_KEYS)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(CHOICE_KEYS))}")
    init_from = chosen.get("init_from")
    time_budget = chosen.get("time_budget")
    preset = chosen.get("preset") or (BUDGET_PRESET if time_budget is not None and init_from is None else None)
    recipe = recipe_defaults(preset, time_budget) if preset is not None else {}

    def setting(name: str, fallback: Any) -> Any:
        """The chosen value, else the preset's recipe, else ``fallback``."""
        return chosen[name] if name in chosen else recipe.get(name, fallback)

    if init_from is not None:
        model = model_config_from_checkpoint(chosen)
        if "pad_vocab" in chosen:  # padding is the studio's layout, not part of the checkpoint's shape
            model = dataclasses.replace(model, pad_vocab_multiple=chosen["pad_vocab"])
    else:
        model = ModelConfig.from_preset(
            preset or DEFAULT_PRESET,
            n_layer=chosen.get("n_layer"),
            n_head=chosen.get("n_head"),
            n_embd=chosen.get("n_embd"),
            block_size=chosen.get("context"),
            dropout=setting("dropout", None),
            pad_vocab_multiple=chosen.get("pad_vocab"),
        )
    block_size = setting("block_size", None) or model.block_size
    batch_size = setting("batch_size", None) or max(1, DEFAULT_TOKENS_PER_BATCH // block_size)
    data_defaults, train_defaults, tracking_defaults = DataConfig(), TrainConfig(), TrackingConfig()
    data = DataConfig(
        source=chosen.get("data", data_defaults.source),
        batch_size=batch_size,
        block_size=block_size,
        order=setting("order", data_defaults.order),
        seed=chosen.get("seed", data_defaults.seed),
    )
    train = TrainConfig(
        **{name: setting(name, getattr(train_defaults, name)) for name in RECIPE_FIELDS},
        **{name: chosen.get(name, getattr(train_defaults, name)) for name in PLAIN_TRAIN_FIELDS},
        init_from=None if init_from is None else str(Path(init_from).resolve()),
    )
    tracking = TrackingConfig(
        **{name: chosen.get(name, getattr(tracking_defaults, name)) for name in TRACKING_FIELDS},
        preset=preset or ("custom" if init_from is not None else DEFAULT_PRESET),
    )
    return RunConfigs(model, data, train, tracking)


CHOICE_KEYS = frozenset(
    {"preset", "n_layer", "n_head", "n_embd", "context", "dropout", "pad_vocab", "init_from"}
    | {"data", "batch_size", "block_size", "order"}
    | set(RECIPE_FIELDS)
    | set(PLAIN_TRAIN_FIELDS)
    | set(TRACKING_FIELDS)
)
"""Every key :func:`resolve_run_configs` takes."""


def model_config_from_checkpoint(chosen: Mapping[str, Any]) -> ModelConfig:
    """The model config of ``chosen["init_from"]``'s Hugging Face checkpoint, with ``context`` and ``dropout``
    applied. Raises :class:`UsageError` when ``preset``, ``n_layer``, ``n_head`` or ``n_embd`` asks for another shape
    than the checkpoint's."""
    from core.hf import read_hf_config

    init_from = chosen["init_from"]
    config, _ = read_hf_config(init_from, block_size=chosen.get("context"), dropout=chosen.get("dropout"))
    shape = ("n_layer", "n_head", "n_embd")
    asked: list[tuple[str, str, int | None]] = []  # (flag as typed, field, value it asks for)
    if chosen.get("preset") is not None:
        asked += [(f"--preset {chosen['preset']}", f, getattr(PRESETS[chosen["preset"]], f)) for f in shape]
    asked += [(f"--{f.replace('_', '-')} {chosen.get(f)}", f, chosen.get(f)) for f in shape]
    for flag, field, value in asked:
        if value is None:
            continue
        if value != getattr(config, field):
            raise UsageError(
                f"{flag} asks for {field} {value}, but --init-from {init_from} has {field} "
                f"{getattr(config, field)}; drop it: the shape comes from the checkpoint"
            )
    return config
