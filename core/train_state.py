"""Resumable training state, without pickle: what :class:`core.trainer.Trainer` writes at a checkpoint and reads
back to continue exactly where it stopped.

Each stateful part has PyTorch's ``state_dict()`` / ``load_state_dict(state, where)`` pair in a pickle-free form,
a :data:`PartState` of JSON values and named tensors: :class:`OptimizerState` (AdamW keyed by parameter name),
:class:`ScheduleState`, :class:`BatchPosition`, :class:`RandomStates` (torch, CUDA, numpy, Python and the batch
sampler) and :class:`LoopState` (loss window, best losses and weights, patience, budget).

Every part checks a saved state before it changes anything (``prepare_load`` returns the function that applies
it), and :func:`load_training_state` prepares all parts before it applies any: a bad checkpoint raises
:class:`CheckpointError` and leaves the trainer as it was. On disk (:func:`core.checkpoint.save_resumable_checkpoint`)
the parts' values share one JSON file and their tensors go to ``optimizer``, ``rng`` and ``best`` safetensors.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

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
    from core.data import TokenBatches
    from core.trainer import Trainer

PartState = tuple[dict[str, Any], dict[str, torch.Tensor]]
"""A stateful part's state without pickle: JSON-serialisable values, and tensors by name."""


class Stateful(Protocol):
    """A part of the training state (see the module docstring)."""

    def state_dict(self) -> PartState: ...

    def prepare_load(self, state: PartState, where: Path) -> Callable[[], None]:
        """Check ``state`` against this part and return the function that applies it (which cannot fail on a bad
        state); raises :class:`CheckpointError`, naming ``where``, and changes nothing when it does not fit.
        ``load_state_dict(state, where)`` is the two in one (:class:`_LoadsByPreparing`)."""


class _LoadsByPreparing:
    """``load_state_dict`` as :meth:`prepare_load`, then apply: a state that does not fit changes nothing."""

    def load_state_dict(self, state: PartState, where: Path) -> None:
        self.prepare_load(state, where)()  # type: ignore[attr-defined]


# ---- the parts ---------------------------------------------------------------------------------------------------


_OPTIMIZER_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")
"""AdamW group settings that choose an implementation, not the mathematics: a resumed trainer keeps its own."""


@dataclass
class OptimizerState(_LoadsByPreparing):
    """The optimizer's state keyed by parameter name: ``{"param_groups", "values"}`` and tensors named
    ``<key>/<parameter name>`` (``exp_avg/transformer.h.0.attn.c_attn.weight``)."""

    optimizer: torch.optim.Optimizer
    names: dict[int, str]
    """Each trained parameter's checkpoint name, by ``id`` (:func:`parameter_names`)."""

    def state_dict(self) -> PartState:
        tensors: dict[str, torch.Tensor] = {}
        values: dict[str, dict] = {}
        for parameter, entries in self.optimizer.state.items():
            for key, value in entries.items():
                if torch.is_tensor(value):
                    tensors[f"{key}/{self.names[id(parameter)]}"] = value
                else:
                    values.setdefault(self.names[id(parameter)], {})[key] = value
        groups = [
            {
                **{k: v for k, v in group.items() if k != "params"},
                "params": [self.names[id(p)] for p in group["params"]],
            }
            for group in self.optimizer.param_groups
        ]
        return {"param_groups": groups, "values": values}, tensors

    def prepare_load(self, state: PartState, where: Path) -> Callable[[], None]:
        saved, tensors = state
        groups = saved["param_groups"]
        current_groups = self.optimizer.param_groups
        if [g["params"] for g in groups] != [[self.names[id(p)] for p in g["params"]] for g in current_groups]:
            raise CheckpointError(f"{where}: the optimizer state is for other parameters than the model's")
        values = saved["values"]
        unused = set(tensors)
        entries: dict[int, dict] = {}
        param_groups = []
        index = 0
        for current, group in zip(current_groups, groups, strict=True):
            indices = []
            for parameter in current["params"]:
                name = self.names[id(parameter)]
                entry = {key.split("/", 1)[0]: tensors[key] for key in tensors if key.split("/", 1)[1] == name}
                unused -= {f"{key}/{name}" for key in entry}
                for key, tensor in entry.items():
                    if key != "step" and tensor.shape != parameter.shape:
                        raise CheckpointError(f"{where}: optimizer {key} of {name} has the wrong shape")
                entry.update(values.get(name, {}))
                if entry:
                    entries[index] = entry
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
            raise CheckpointError(f"{where}: optimizer state for unknown parameters: {sorted(unused)[:3]}")
        if len({frozenset(entry) for entry in entries.values()}) > 1:
            raise CheckpointError(f"{where}: the optimizer state is incomplete")
        torch_state = {"state": entries, "param_groups": param_groups}
        return lambda: self.optimizer.load_state_dict(torch_state)


@dataclass
class ScheduleState(_LoadsByPreparing):
    """The learning-rate schedule (its own ``state_dict`` is plain numbers already)."""

    scheduler: torch.optim.lr_scheduler.LRScheduler

    def state_dict(self) -> PartState:
        return self.scheduler.state_dict(), {}

    def prepare_load(self, state: PartState, where: Path) -> Callable[[], None]:
        saved = dict(state[0])
        if not isinstance(saved.get("last_epoch"), int):
            raise CheckpointError(f"{where}: the schedule state has no step")
        return lambda: self.scheduler.load_state_dict(saved)


@dataclass
class BatchPosition(_LoadsByPreparing):
    """Where the training batches continue (their sampling generator is one of :class:`RandomStates`)."""

    batches: TokenBatches

    def state_dict(self) -> PartState:
        return {"position": self.batches.position}, {}

    def prepare_load(self, state: PartState, where: Path) -> Callable[[], None]:
        position = int(state[0]["position"])
        if not 0 <= position < len(self.batches.tokens):
            raise CheckpointError(f"{where}: batch position {position} is outside the corpus")

        def apply() -> None:
            self.batches.position = position

        return apply


@dataclass
class RandomStates(_LoadsByPreparing):
    """Every random generator a training draws from: torch's (and each CUDA device's), numpy's, Python's and the
    batch sampler's. Values: numpy's and Python's scalar state; tensors: ``torch``, ``batches``, ``numpy`` (its key)
    and ``cuda/<i>``."""

    batch_generator: torch.Generator
    device: torch.device

    def state_dict(self) -> PartState:
        tensors = {"torch": torch.get_rng_state(), "batches": self.batch_generator.get_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors.update({f"cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        np_kind, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        tensors["numpy"] = torch.from_numpy(np_key.astype(np.int64))  # int64 holds any uint32, in every torch
        version, internal, gauss_next = random.getstate()
        values = {
            "numpy": {"kind": np_kind, "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": np_gauss},
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        }
        return values, tensors

    def prepare_load(self, state: PartState, where: Path) -> Callable[[], None]:
        values, tensors = state
        saved_numpy, saved_python = values["numpy"], values["python"]
        numpy_state = (
            saved_numpy["kind"],
            tensors["numpy"].numpy().astype(np.uint32),
            int(saved_numpy["pos"]),
            int(saved_numpy["has_gauss"]),
            float(saved_numpy["gauss"]),
        )
        python_state = (
            int(saved_python["version"]),
            tuple(int(v) for v in saved_python["state"]),
            saved_python["gauss_next"],
        )
        torch_state, batch_state = tensors["torch"], tensors["batches"]
        cuda_states = [tensors[f"cuda/{i}"] for i in range(len([k for k in tensors if k.startswith("cuda/")]))]

        def apply() -> None:
            torch.set_rng_state(torch_state)
            self.batch_generator.set_state(batch_state)
            if cuda_states and self.device.type == "cuda":
                # Same number of GPUs as when saved, or as many as both have: only the trainer's device matters.
                count = min(len(cuda_states), torch.cuda.device_count())
                torch.cuda.set_rng_state_all(cuda_states[:count])
            np.random.set_state(numpy_state)
            random.setstate(python_state)

        return apply


@dataclass
class LoopState:
    """The running state of :meth:`Trainer.fit` that a resumed training needs besides the model, optimizer,
    schedule, batch position and RNGs. Saved by :meth:`state_dict` and read back by :meth:`from_state_dict` (the
    trainer swaps in the new object: see :class:`_LoopPart`)."""

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

    def state_dict(self) -> PartState:
        """Everything but the step (the checkpoint's own) as JSON values; the best weights (without the tied LM
        head, which is the embedding) as tensors."""
        values = {
            "window": list(self.window),
            "best_loss": _finite_or_none(self.best_loss),
            "best_val": _finite_or_none(self.best_val),
            "best_val_step": self.best_val_step,
            "evals_without_improvement": self.evals_without_improvement,
            "last_eval": self.last_eval,
            "last_eval_step": self.last_eval_step,
            "loss_value": _finite_or_none(self.loss_value),
            "budget_used": self.budget_used,
            "last_sample_step": self.last_sample_step,
            "last_event_step": self.last_event_step,
            "budget_rounds": self.budget_rounds,
        }
        best = {} if self.best_state is None else {k: v for k, v in self.best_state.items() if k != TIED_KEY}
        return values, best

    @classmethod
    def from_state_dict(
        cls, state: PartState, *, step: int, avg_window: int, model: torch.nn.Module, where: Path
    ) -> LoopState:
        """The loop state saved at ``step`` for a training of ``model`` (its best weights must fit it)."""
        saved, best = state
        model_keys = {k: v.shape for k, v in model.state_dict().items() if k != TIED_KEY}
        if best and {k: v.shape for k, v in best.items()} != model_keys:
            raise CheckpointError(f"{where}: best.safetensors does not match the model")
        if bool(best) != (saved["best_val_step"] is not None):
            raise CheckpointError(f"{where}: best.safetensors and the best validation step disagree")
        loop = cls(
            step=step,
            window=deque((float(v) for v in saved["window"]), maxlen=avg_window),
            best_loss=_none_to_inf(saved["best_loss"]),
            best_val=_none_to_inf(saved["best_val"]),
            best_val_step=saved["best_val_step"],
            evals_without_improvement=int(saved["evals_without_improvement"]),
            last_eval={k: float(v) for k, v in saved["last_eval"].items()},
            last_eval_step=int(saved["last_eval_step"]),
            loss_value=math.nan if saved["loss_value"] is None else float(saved["loss_value"]),
            # Absent from checkpoints written before time budgets existed: nothing was spent then.
            budget_used=float(saved.get("budget_used", 0.0)),
            last_sample_step=int(saved.get("last_sample_step", 0)),
            last_event_step=int(saved.get("last_event_step", 0)),
            budget_rounds=int(saved.get("budget_rounds", 0)),
        )
        if best:
            device = next(model.parameters()).device
            loop.best_state = {k: v.to(device) for k, v in best.items()}
            loop.best_state[TIED_KEY] = loop.best_state["transformer.wte.weight"]
        return loop


@dataclass
class _LoopPart(_LoadsByPreparing):
    """The trainer's :class:`LoopState` as a stateful part: loading swaps in the saved one."""

    trainer: Trainer
    step: int = 0
    """The checkpoint's step (loading only)."""

    def state_dict(self) -> PartState:
        return self.trainer._loop.state_dict()

    def prepare_load(self, state: PartState, where: Path) -> Callable[[], None]:
        loop = LoopState.from_state_dict(
            state, step=self.step, avg_window=self.trainer.config.avg_window, model=self.trainer.model, where=where
        )

        def apply() -> None:
            self.trainer._loop = loop

        return apply


# ---- the checkpoint: every part, the header that says which training it belongs to ------------------------------


def parameter_names(trainer: Trainer) -> dict[int, str]:
    """Each trained parameter's checkpoint name, by ``id``."""
    # named_parameters() lists the tied LM head once, as transformer.wte.weight, as the checkpoints store it.
    names = {id(p): name for name, p in trainer.model.named_parameters()}
    if trainer.token_rows is not None:  # what the optimizer trains in place of the embedding: its compact rows
        names[id(trainer.token_rows)] = "transformer.wte.weight"
    return names


def _parts(trainer: Trainer, step: int = 0) -> dict[tuple[str, str | None], Stateful]:
    """Every stateful part of ``trainer``, by (its key in training_state.json, its tensor file or None)."""
    return {
        ("optimizer", "optimizer"): OptimizerState(trainer.optimizer, parameter_names(trainer)),
        ("scheduler", None): ScheduleState(trainer.scheduler),
        ("batches", None): BatchPosition(trainer.batches),
        ("rng", "rng"): RandomStates(trainer.batches.generator, trainer.device),
        ("trainer", "best"): _LoopPart(trainer, step),
    }


def save_training_state(trainer: Trainer, out_dir: str | Path) -> Path:
    """Write a resumable checkpoint of the current step to ``out_dir/resume`` (see
    :func:`core.checkpoint.save_resumable_checkpoint`), keeping the newest ``keep_checkpoints``; returns it."""
    state: dict[str, Any] = {
        "config": {
            "model": trainer.model_config.to_dict(),
            "data": dataclasses.asdict(trainer.data_config),
            "train": trainer.config.to_dict(),
        },
        "dataset_sha256": trainer.corpus.meta["sha256"],
        "world_size": trainer.dist.world_size,
    }
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for (key, tensor_file), part in _parts(trainer).items():
        values, part_tensors = part.state_dict()
        state[key] = values
        if tensor_file is not None and (part_tensors or tensor_file != "best"):  # best: only once evaluated
            tensors[tensor_file] = part_tensors
    return save_resumable_checkpoint(
        trainer.full_model(), out_dir, trainer._loop.step, state, tensors, keep=trainer.config.keep_checkpoints
    )


def load_training_state(trainer: Trainer, directory: str | Path) -> LoopState:
    """Continue from the resumable checkpoint ``directory``: weights, optimizer, schedule, batch position, RNGs
    and the loop's running state (loss window, best losses, patience count, last evaluation); returns the loop
    state (its ``step`` is the checkpoint's).

    The checkpoint must come from a training with the same model, data and training configs and the same
    corpus content; anything else, or a missing, corrupt or inconsistent file, raises :class:`CheckpointError`
    and leaves the trainer as it was.
    """
    checkpoint = load_resumable_checkpoint(directory)
    where = checkpoint.directory
    state, tensors = checkpoint.state, checkpoint.tensors
    try:
        _check_same_training(trainer, where, state)
        appliers = [
            part.prepare_load((state[key], tensors.get(tensor_file, {}) if tensor_file else {}), where)
            for (key, tensor_file), part in _parts(trainer, int(state["step"])).items()
        ]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        # A well-formed file with a field missing or of the wrong type: the checkpoint, not the caller, is wrong.
        raise CheckpointError(f"{where / TRAINING_STATE_FILE} is incomplete or corrupt ({exc!r})") from exc
    trainer.model.load_state_dict(checkpoint.model.state_dict())
    if trainer.token_rows is not None:
        with torch.no_grad():
            trainer.token_rows.copy_(trainer.model.transformer.wte.weight[trainer.shared_rows.rows])
    for apply in appliers:
        apply()
    return trainer._loop


def _check_same_training(trainer: Trainer, where: Path, state: dict) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's header (configs, processes, corpus) is this
    trainer's."""
    configs = state["config"]
    for what, mine in (("model", trainer.model_config), ("data", trainer.data_config), ("train", trainer.config)):
        # A field added since the checkpoint was written counts at its default (what that training used).
        saved = {**_field_defaults(type(mine)), **configs[what]}
        current = dataclasses.asdict(mine)
        for key in sorted(set(saved) | set(current)):
            if saved.get(key, "<unset>") != current.get(key, "<unset>"):
                raise CheckpointError(
                    f"{where} comes from a training with another {what} config: {key} is "
                    f"{saved.get(key, '<unset>')!r} there, {current.get(key, '<unset>')!r} here"
                )
    saved_world = int(state.get("world_size", 1))
    if saved_world != trainer.dist.world_size:
        # Each process's shard of the batches depends on the number of processes.
        raise CheckpointError(
            f"{where} comes from a training with {saved_world} process(es); resume it with "
            f"{saved_world} (torchrun --nproc_per_node={saved_world}), not {trainer.dist.world_size}"
        )
    if state["dataset_sha256"] != trainer.corpus.meta["sha256"]:
        raise CheckpointError(
            f"{where} was trained on other data (sha256 {state['dataset_sha256'][:12]}…); "
            f"{trainer.data_config.source} now has sha256 {trainer.corpus.meta['sha256'][:12]}…"
        )


def _field_defaults(config_type: type) -> dict:  # each field of a config dataclass that has a default
    return {f.name: f.default for f in dataclasses.fields(config_type) if f.default is not dataclasses.MISSING}


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no infinity or NaN: "none yet" is stored as null


def _none_to_inf(value: float | None) -> float:  # the inverse of _finite_or_none
    return math.inf if value is None else float(value)
