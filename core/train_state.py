"""Resumable training state, without pickle: what :class:`core.trainer.Trainer` writes at a checkpoint and reads
back to continue exactly where it stopped.

Each stateful part is saved as tensors (safetensors) plus JSON (:func:`core.checkpoint.save_resumable_checkpoint`):
the AdamW moments keyed by parameter name, the schedule's ``state_dict``, the batch position and generator, the
torch, CUDA, numpy and Python random states, and the loop's running state (:class:`LoopState`). Loading checks
everything against the trainer first (configs, corpus, number of processes, shapes) and only then applies it, so a
bad checkpoint raises :class:`CheckpointError` and changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from core.checkpoint import (
    TIED_KEY,
    TRAINING_STATE_FILE,
    CheckpointError,
    load_resumable_checkpoint,
    save_resumable_checkpoint,
)

if TYPE_CHECKING:
    from core.trainer import Trainer


def parameter_names(trainer: Trainer) -> dict[int, str]:
    """Each trained parameter's checkpoint name, by ``id``."""
    # named_parameters() lists the tied LM head once, as transformer.wte.weight, as the checkpoints store it.
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    if trainer.token_rows is not None:  # what the optimizer trains in place of the embedding: its compact rows
        names[id(trainer.token_rows)] = "transformer.wte.weight"
    return names


def save_training_state(trainer: Trainer, out_dir: str | Path) -> Path:
    """Write a resumable checkpoint of the current step to ``out_dir/resume`` (see
    :func:`core.checkpoint.save_resumable_checkpoint`), keeping the newest ``keep_checkpoints``; returns it."""
    run = trainer._loop
    names = parameter_names(trainer)
    optimizer_tensors: dict[str, torch.Tensor] = {}
    optimizer_values: dict[str, dict] = {}
    for parameter, values in trainer.optimizer.state.items():
        for key, value in values.items():
            if torch.is_tensor(value):
                optimizer_tensors[f"{key}/{names[id(parameter)]}"] = value
            else:
                optimizer_values.setdefault(names[id(parameter)], {})[key] = value
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "params": [names[id(p)] for p in group["params"]]}
        for group in trainer.optimizer.param_groups
    ]
    rng = {"torch": torch.get_rng_state(), "batches": trainer.batches.generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    np_kind, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    rng["numpy"] = torch.from_numpy(np_key.astype(np.int64))  # int64 holds any uint32, in every torch version
    tensors = {"optimizer": optimizer_tensors, "rng": rng}
    if run.best_state is not None:
        tensors["best"] = {k: v for k, v in run.best_state.items() if k != TIED_KEY}
    state = {
        "config": {
            "model": trainer.model_config.to_dict(),
            "data": dataclasses.asdict(trainer.data_config),
            "train": trainer.config.to_dict(),
        },
        "dataset_sha256": trainer.corpus.meta["sha256"],
        "world_size": trainer.dist.world_size,
        "optimizer": {"param_groups": groups, "values": optimizer_values},
        "scheduler": trainer.scheduler.state_dict(),
        "batches": {"position": trainer.batches.position},
        "rng": {
            "numpy": {"kind": np_kind, "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": np_gauss},
            "python": _python_rng_state(),
        },
        "trainer": {
            "window": list(run.window),
            "best_loss": _finite_or_none(run.best_loss),
            "best_val": _finite_or_none(run.best_val),
            "best_val_step": run.best_val_step,
            "evals_without_improvement": run.evals_without_improvement,
            "last_eval": run.last_eval,
            "last_eval_step": run.last_eval_step,
            "loss_value": _finite_or_none(run.loss_value),
            "budget_used": run.budget_used,
            "last_sample_step": run.last_sample_step,
            "last_event_step": run.last_event_step,
            "budget_rounds": run.budget_rounds,
        },
    }
    directory = save_resumable_checkpoint(
        trainer.full_model(), out_dir, run.step, state, tensors, keep=trainer.config.keep_checkpoints
    )
    return directory


def load_training_state(trainer: Trainer, directory: str | Path) -> LoopState:
    """Continue from the resumable checkpoint ``directory``: weights, optimizer, schedule, batch position, RNGs
    and the loop's running state (loss window, best losses, patience count, last evaluation); returns its step.

    The checkpoint must come from a training with the same model, data and training configs and the same
    corpus content; anything else, or a missing, corrupt or inconsistent file, raises :class:`CheckpointError`
    and leaves the trainer as it was.
    """
    checkpoint = load_resumable_checkpoint(directory)
    state, tensors = checkpoint.state, checkpoint.tensors
    try:
        restore, loop = _restorer(trainer, checkpoint.directory, state, tensors)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        # A well-formed file with a field missing or of the wrong type: the checkpoint, not the caller, is wrong.
        path = checkpoint.directory / TRAINING_STATE_FILE
        raise CheckpointError(f"{path} is incomplete or corrupt ({exc!r})") from exc
    trainer.model.load_state_dict(checkpoint.model.state_dict())
    if trainer.token_rows is not None:
        with torch.no_grad():
            trainer.token_rows.copy_(trainer.model.transformer.wte.weight[trainer.shared_rows.rows])
    restore()
    return loop


def _restorer(
    trainer: Trainer, directory: Path, state: dict, tensors: dict[str, dict[str, torch.Tensor]]
) -> tuple[Callable[[], None], LoopState]:
    """Check everything in a read checkpoint against this trainer and return the function that applies it
    (which cannot fail half-way on a bad checkpoint)."""
    configs = state["config"]
    for what, mine in (("model", trainer.model_config), ("data", trainer.data_config), ("train", trainer.config)):
        # A field added since the checkpoint was written counts at its default (what that training used).
        saved = {**_field_defaults(type(mine)), **configs[what]}
        current = dataclasses.asdict(mine)
        for key in sorted(set(saved) | set(current)):
            if saved.get(key, "<unset>") != current.get(key, "<unset>"):
                raise CheckpointError(
                    f"{directory} comes from a training with another {what} config: {key} is "
                    f"{saved.get(key, '<unset>')!r} there, {current.get(key, '<unset>')!r} here"
                )
    saved_world = int(state.get("world_size", 1))
    if saved_world != trainer.dist.world_size:
        # Each process's shard of the batches depends on the number of processes.
        raise CheckpointError(
            f"{directory} comes from a training with {saved_world} process(es); resume it with "
            f"{saved_world} (torchrun --nproc_per_node={saved_world}), not {trainer.dist.world_size}"
        )
    if state["dataset_sha256"] != trainer.corpus.meta["sha256"]:
        raise CheckpointError(
            f"{directory} was trained on other data (sha256 {state['dataset_sha256'][:12]}…); "
            f"{trainer.data_config.source} now has sha256 {trainer.corpus.meta['sha256'][:12]}…"
        )
    optimizer_state = _optimizer_state_dict(trainer, directory, state["optimizer"], tensors["optimizer"])
    scheduler_state = dict(state["scheduler"])
    position = int(state["batches"]["position"])
    if not 0 <= position < len(trainer.batches.tokens):
        raise CheckpointError(f"{directory}: batch position {position} is outside the corpus")
    rng = tensors["rng"]
    numpy_state = state["rng"]["numpy"]
    numpy_rng = (
        numpy_state["kind"],
        rng["numpy"].numpy().astype(np.uint32),
        int(numpy_state["pos"]),
        int(numpy_state["has_gauss"]),
        float(numpy_state["gauss"]),
    )
    python_rng = _python_rng_from_json(state["rng"]["python"])
    saved_loop = state["trainer"]
    model_keys = {k: v.shape for k, v in trainer.model.state_dict().items() if k != TIED_KEY}
    best = tensors.get("best")
    if best is not None and {k: v.shape for k, v in best.items()} != model_keys:
        raise CheckpointError(f"{directory}: best.safetensors does not match the model")
    if (best is None) != (saved_loop["best_val_step"] is None):
        raise CheckpointError(f"{directory}: best.safetensors and the best validation step disagree")
    loop = LoopState(
        step=int(state["step"]),
        window=deque((float(v) for v in saved_loop["window"]), maxlen=trainer.config.avg_window),
        best_loss=_none_to_inf(saved_loop["best_loss"]),
        best_val=_none_to_inf(saved_loop["best_val"]),
        best_val_step=saved_loop["best_val_step"],
        best_state=None,
        evals_without_improvement=int(saved_loop["evals_without_improvement"]),
        last_eval={k: float(v) for k, v in saved_loop["last_eval"].items()},
        last_eval_step=int(saved_loop["last_eval_step"]),
        loss_value=math.nan if saved_loop["loss_value"] is None else float(saved_loop["loss_value"]),
        # Absent from checkpoints written before time budgets existed: nothing was spent then.
        budget_used=float(saved_loop.get("budget_used", 0.0)),
        last_sample_step=int(saved_loop.get("last_sample_step", 0)),
        last_event_step=int(saved_loop.get("last_event_step", 0)),
        budget_rounds=int(saved_loop.get("budget_rounds", 0)),
    )
    if best is not None:
        loop.best_state = {k: v.to(trainer.device) for k, v in best.items()}
        loop.best_state[TIED_KEY] = loop.best_state["transformer.wte.weight"]
    cuda_states = [rng[f"cuda/{i}"] for i in range(len([k for k in rng if k.startswith("cuda/")]))]

    def apply() -> None:
        trainer.optimizer.load_state_dict(optimizer_state)
        trainer.scheduler.load_state_dict(scheduler_state)
        trainer.batches.load_state_dict({"position": position, "rng": rng["batches"]})
        torch.set_rng_state(rng["torch"])
        if cuda_states and trainer.device.type == "cuda":
            # Same number of GPUs as when saved, or as many as both have: only the trainer's device matters.
            count = min(len(cuda_states), torch.cuda.device_count())
            torch.cuda.set_rng_state_all(cuda_states[:count])
        np.random.set_state(numpy_rng)
        random.setstate(python_rng)
        trainer._loop = loop
        trainer._saved_step = loop.step

    return apply, loop


def _optimizer_state_dict(trainer: Trainer, directory: Path, saved: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The ``optimizer.load_state_dict`` argument for the saved AdamW state, after checking it fits the model."""
    names = parameter_names(trainer)
    groups = saved["param_groups"]
    if [g["params"] for g in groups] != [[names[id(p)] for p in g["params"]] for g in trainer.optimizer.param_groups]:
        raise CheckpointError(f"{directory}: the optimizer state is for other parameters than the model's")
    values = saved["values"]
    unused = set(tensors)
    state: dict[int, dict] = {}
    param_groups = []
    index = 0
    for current, group in zip(trainer.optimizer.param_groups, groups, strict=True):
        indices = []
        for parameter in current["params"]:
            name = names[id(parameter)]
            entry = {key.split("/", 1)[0]: tensors[key] for key in tensors if key.split("/", 1)[1] == name}
            unused -= {f"{key}/{name}" for key in entry}
            for key, tensor in entry.items():
                if key != "step" and tensor.shape != parameter.shape:
                    raise CheckpointError(f"{directory}: optimizer {key} of {name} has the wrong shape")
            entry.update(values.get(name, {}))
            if entry:
                state[index] = entry
            indices.append(index)
            index += 1
        # The hyperparameters come from the checkpoint (the schedule moved lr); how AdamW runs (fused on CUDA,
        # foreach) stays this trainer's, which may be on another device.
        hyper = {k: v for k, v in group.items() if k != "params" and k not in _OPTIMIZER_IMPLEMENTATION}
        if "betas" in hyper:
            hyper["betas"] = tuple(hyper["betas"])
        kept = {k: v for k, v in current.items() if k != "params"}
        param_groups.append({**kept, **hyper, "params": indices})
    if unused:
        raise CheckpointError(f"{directory}: optimizer state for unknown parameters: {sorted(unused)[:3]}")
    if len({frozenset(entry) for entry in state.values()}) > 1:
        raise CheckpointError(f"{directory}: the optimizer state is incomplete")
    return {"state": state, "param_groups": param_groups}


_OPTIMIZER_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")
"""AdamW group settings that choose an implementation, not the mathematics: a resumed trainer keeps its own."""


@dataclass
class LoopState:
    """The running state of :meth:`Trainer.fit` that a resumed training needs besides the model, optimizer,
    schedule, batch position and RNGs."""

    window: deque
    """The last ``avg_window`` step losses (``avg_loss`` is their mean)."""
    step: int = 0
    """Optimizer steps taken."""
    best_loss: float = math.inf
    """Lowest single-step loss so far."""
    best_val: float = math.inf
    """Lowest validation loss so far."""
    best_val_step: int | None = None
    """Step of ``best_val`` (None before the first evaluation)."""
    best_state: dict[str, torch.Tensor] | None = None
    """The weights at ``best_val_step``."""
    evals_without_improvement: int = 0
    """Evaluations since the last new best validation loss (for ``patience``)."""
    last_eval: dict[str, float] = field(default_factory=dict)
    """Metrics of the latest evaluation."""
    last_eval_step: int = 0
    """Step of the latest evaluation (0: none yet)."""
    loss_value: float = math.nan
    """Loss of the latest step."""
    budget_used: float = 0.0
    """Seconds of a time budget spent up to the latest resumable checkpoint (a resumed run spends the rest)."""
    last_sample_step: int = 0
    """Step of the latest periodic sample (a budget run's sampling steps move with its plan)."""
    last_event_step: int = 0
    """Step of a budget run's latest round of periodic work."""
    budget_rounds: int = 0
    """Rounds of periodic work a budget run has done."""


def _field_defaults(config_type: type) -> dict:
    """The default of every field of a config dataclass that has one."""
    return {f.name: f.default for f in dataclasses.fields(config_type) if f.default is not dataclasses.MISSING}


def _finite_or_none(value: float) -> float | None:
    # JSON has no infinity or NaN: "none yet" is stored as null.
    return value if math.isfinite(value) else None


def _none_to_inf(value: float | None) -> float:
    return math.inf if value is None else float(value)


def _python_rng_state() -> dict:
    version, internal, gauss_next = random.getstate()
    return {"version": version, "state": list(internal), "gauss_next": gauss_next}


def _python_rng_from_json(saved: dict) -> tuple:
    return int(saved["version"]), tuple(int(v) for v in saved["state"]), saved["gauss_next"]
