"""Checkpoint folders: ``model.safetensors`` (weights) + ``config.json`` (model config and metadata).

Nothing here unpickles: safetensors holds raw tensors and JSON holds the rest. The tied LM head is stored once,
as ``transformer.wte.weight``, and re-tied on load. Saving writes a temporary sibling folder and renames it into
place, so a crash mid-save never leaves a half-written checkpoint where a good one was.

Resumable checkpoints (what a stopped or crashed training continues from) live in one folder per training,
``<run folder>/resume/``::

    resume/
      latest.json              {"checkpoint": "step-00000500", "step": 500}: the one to resume from
      step-00000500/
        model.safetensors      the weights, as in any checkpoint
        config.json            the model config; metadata.step is the step
        training_state.json    step, configs, optimizer hyperparameters, scheduler, trainer and RNG state
        optimizer.safetensors  AdamW's per-parameter state, keyed ``<state>/<parameter name>``
        rng.safetensors        torch's CPU (and CUDA) generators, the batch sampler's, numpy's MT19937 key
        best.safetensors       the best-validation weights so far (only once an evaluation ran)
      step-00000400/ ...       older ones: the newest ``keep`` are kept

:func:`save_resumable_checkpoint` writes a step folder atomically, then points ``latest.json`` at it (itself
replaced atomically), then prunes; a crash at any point leaves ``latest.json`` naming a complete checkpoint.
What the state means is the trainer's business (:meth:`core.trainer.Trainer.load_training_state`); this module
only stores, finds and validates the files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from core.atomic import atomic_folder, restore_interrupted, write_json
from core.config import ModelConfig
from core.errors import StudioError
from core.huge_pages import move_to_huge_pages
from core.model import GPT

CHECKPOINT_FORMAT = "shakespeare-gpt-checkpoint"
CHECKPOINT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TIED_KEY = "lm_head.weight"

RESUME_DIR = "resume"
"""Sub-folder of a training's output folder that holds its resumable checkpoints."""
LATEST_FILE = "latest.json"
"""The pointer, in :data:`RESUME_DIR`, to the checkpoint to resume from."""
TRAINING_STATE_FILE = "training_state.json"
TRAINING_STATE_FORMAT = "shakespeare-gpt-training-state"
TRAINING_STATE_VERSION = 1
STATE_TENSOR_FILES = ("optimizer.safetensors", "rng.safetensors", "best.safetensors")
"""The tensor files a resumable checkpoint may hold besides the weights (``best`` only once an evaluation ran)."""
_STEP_FOLDER = re.compile(r"step-(\d{8,})")


class CheckpointError(StudioError):
    """A checkpoint folder is missing, incomplete, corrupt, or not one this studio wrote."""


def _write_model_files(model: GPT, folder: Path, metadata: dict[str, Any] | None) -> None:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != TIED_KEY}
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise CheckpointError("only models with the LM head tied to the token embedding can be saved")
    document = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "model": model.config.to_dict(),
        "tokenizer": "gpt2",
        "dtype": str(next(iter(state.values())).dtype).removeprefix("torch."),
        "metadata": metadata or {},
    }
    save_file({k: v.cpu() for k, v in state.items()}, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(document, indent=2))


def save_checkpoint(model: GPT, directory: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` atomically (replacing an existing checkpoint there) and return the path.

    ``metadata`` (JSON-serialisable) is stored in config.json under ``metadata``.
    """
    directory = Path(directory)
    with atomic_folder(directory) as staging:
        _write_model_files(model, staging, metadata)
    return directory


def read_checkpoint_config(directory: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """The model config and the whole config.json document of a checkpoint, validated."""
    directory = Path(directory)
    restore_interrupted(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {directory}")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {CONFIG_FILE} is missing")
    try:
        document = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from exc
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{directory} was not written by this studio (format is not {CHECKPOINT_FORMAT!r})")
    if document.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{directory} has checkpoint version {document.get('version')!r}; expected 1")
    try:
        config = ModelConfig.from_dict(document.get("model"))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{config_path} holds an invalid model config: {exc}") from exc
    return config, document


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN or infinity (integer tensors always do).

    One pass over the data with nothing allocated: the extremes are NaN when any element is (min/max propagate
    NaN) and infinite when any element is. ``isfinite(t).all()`` would allocate a bool tensor as large as ``t``
    and take several times longer on a 124M-parameter model, on the path to a first generated token.
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """The model stored in ``directory`` (in eval mode, on ``device``) and its config.json document. On the CPU its
    large weights are placed in huge memory pages where the system offers them (core.huge_pages: faster decoding).

    Raises :class:`CheckpointError` if the folder is incomplete, the weights file is truncated or corrupt, the
    tensors do not match the config, or any weight is NaN or infinite.
    """
    directory = Path(directory)
    config, document = read_checkpoint_config(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {WEIGHTS_FILE} is missing")
    try:
        state = load_file(str(weights_path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path} is truncated or corrupt ({exc}); re-save or re-download it") from exc
    with torch.device("meta"):
        model = GPT(config)
    expected = {k: v.shape for k, v in model.state_dict().items() if k != TIED_KEY}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_path} does not match its config: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    for name, tensor in state.items():
        if tensor.shape != expected[name]:
            raise CheckpointError(
                f"{weights_path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name])}"
            )
        if not all_finite(tensor):
            raise CheckpointError(f"{weights_path}: {name} contains NaN or infinite values; the checkpoint is unusable")
    state[TIED_KEY] = state["transformer.wte.weight"]
    model.load_state_dict(state, assign=True)
    model.tie_weights()
    if torch.device(device).type == "cpu":
        move_to_huge_pages(model)
    return model.eval(), document


# -- resumable checkpoints -------------------------------------------------------------------------------------


@dataclass
class ResumableCheckpoint:
    """A resumable checkpoint read back by :func:`load_resumable_checkpoint`, every file validated."""

    directory: Path
    """The ``step-*`` folder."""
    step: int
    """Optimizer steps taken when it was written."""
    model: GPT
    """The weights (on the CPU, in eval mode)."""
    state: dict[str, Any]
    """``training_state.json``: the trainer's JSON state, with ``format``, ``version`` and ``step``."""
    tensors: dict[str, dict[str, torch.Tensor]]
    """Each tensor file present (``optimizer``, ``rng``, ``best``) by name without the suffix, on the CPU."""


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    write_json(path, data, indent=None)


def resume_dir(out_dir: str | Path) -> Path:
    """The folder holding the resumable checkpoints of the training whose output folder is ``out_dir``."""
    return Path(out_dir) / RESUME_DIR


def save_resumable_checkpoint(
    model: GPT,
    out_dir: str | Path,
    step: int,
    state: dict[str, Any],
    tensors: dict[str, dict[str, torch.Tensor]],
    keep: int,
) -> Path:
    """Write a resumable checkpoint of ``step`` under ``out_dir/resume``, point ``latest.json`` at it, and delete
    all but the newest ``keep`` checkpoints; returns its folder.

    ``state`` (JSON-serialisable) becomes training_state.json; ``tensors`` maps a name of
    :data:`STATE_TENSOR_FILES` (without ``.safetensors``) to the tensors of that file. The folder is complete and
    fsynced before ``latest.json`` names it, so an exception or a crash anywhere in here leaves ``latest.json``
    naming the previous checkpoint, intact.
    """
    unknown = sorted(set(tensors) - {name.removesuffix(".safetensors") for name in STATE_TENSOR_FILES})
    if unknown:
        raise ValueError(f"unknown resumable checkpoint file(s): {', '.join(unknown)}")
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    root = resume_dir(out_dir)
    directory = root / f"step-{step:08d}"
    document = {"format": TRAINING_STATE_FORMAT, "version": TRAINING_STATE_VERSION, "step": step, **state}
    with atomic_folder(directory) as staging:
        _write_model_files(model, staging, {"step": step})
        for name, group in tensors.items():
            # .contiguous().cpu() copies nothing that is already a contiguous CPU tensor
            flat = {key: value.detach().contiguous().cpu() for key, value in group.items()}
            save_file(flat, str(staging / f"{name}.safetensors"))
        (staging / TRAINING_STATE_FILE).write_text(json.dumps(document, indent=1))
    _write_json_atomic(root / LATEST_FILE, {"checkpoint": directory.name, "step": step})
    prune_resumable_checkpoints(root, keep)
    return directory


def prune_resumable_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` ``step-*`` folders in ``root`` (never the one ``latest.json`` names) and
    the leftovers of saves a crash interrupted; returns the checkpoints deleted."""
    root = Path(root)
    try:
        latest = json.loads((root / LATEST_FILE).read_text(encoding="utf-8")).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        latest = None
    found = sorted(
        (int(match.group(1)), path)
        for path in root.iterdir()
        if (match := _STEP_FOLDER.fullmatch(path.name)) and path.is_dir()
    )
    deleted = []
    for _, path in found[: max(0, len(found) - keep)]:
        if path.name == latest:
            continue
        # Renamed out of sight first: a crash mid-delete must not leave a half-deleted folder named like a checkpoint.
        doomed = root / f".{path.name}.deleting-{os.getpid()}"
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        deleted.append(path)
    for leftover in root.glob(".*"):  # staging and retired folders, temporary pointer files
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return deleted


def list_resumable_checkpoints(out_dir: str | Path) -> list[Path]:
    """The ``step-*`` folders under ``out_dir/resume``, oldest first (none when the folder does not exist)."""
    root = resume_dir(out_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_FOLDER.fullmatch(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found)]


def latest_resumable_checkpoint(out_dir: str | Path) -> Path:
    """The checkpoint ``out_dir/resume/latest.json`` names.

    Raises :class:`CheckpointError` when there is no resumable checkpoint, or the pointer is unreadable or names a
    folder that is not there.
    """
    root = resume_dir(out_dir)
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        raise CheckpointError(f"no resumable checkpoint in {root}")
    try:
        name = json.loads(pointer.read_text(encoding="utf-8"))["checkpoint"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{pointer} is corrupt ({exc})") from exc
    if not isinstance(name, str) or _STEP_FOLDER.fullmatch(name) is None:
        raise CheckpointError(f"{pointer} is corrupt: it names {name!r}, not a step-* folder")
    directory = root / name
    if not directory.is_dir():
        raise CheckpointError(f"{pointer} names {name}, which is missing")
    return directory


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc})") from exc
    for name, tensor in tensors.items():
        if not all_finite(tensor):
            raise CheckpointError(f"{path}: {name} contains NaN or infinite values; the checkpoint is unusable")
    return tensors


def read_training_state(directory: str | Path) -> dict[str, Any]:
    """The validated ``training_state.json`` of a resumable checkpoint folder, without reading any tensor.

    Raises :class:`CheckpointError` when it is missing, not JSON, of another format or version, or has no step.
    """
    state_path = Path(directory) / TRAINING_STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{directory} is not resumable: {TRAINING_STATE_FILE} is missing")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{state_path} is not valid JSON: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise CheckpointError(f"{state_path} was not written by this studio (format is not {TRAINING_STATE_FORMAT!r})")
    if state.get("version") != TRAINING_STATE_VERSION:
        raise CheckpointError(f"{state_path} has version {state.get('version')!r}; expected {TRAINING_STATE_VERSION}")
    if not isinstance(state.get("step"), int) or isinstance(state["step"], bool) or state["step"] < 0:
        raise CheckpointError(f"{state_path} is corrupt: step is {state.get('step')!r}")
    return state


def load_resumable_checkpoint(directory: str | Path) -> ResumableCheckpoint:
    """Read and validate a resumable checkpoint folder (everything on the CPU).

    Raises :class:`CheckpointError` when a file is missing, truncated, corrupt, not finite, or of another format,
    or when its parts disagree on the step.
    """
    directory = Path(directory)
    state = read_training_state(directory)
    model, document = load_checkpoint(directory)
    step = state["step"]
    match = _STEP_FOLDER.fullmatch(directory.name)
    if step != document["metadata"].get("step") or (match and int(match[1]) != step):
        raise CheckpointError(f"{directory} is inconsistent: its files disagree on the step")
    tensors = {}
    for name in STATE_TENSOR_FILES:
        path = directory / name
        if path.is_file():
            tensors[name.removesuffix(".safetensors")] = _load_tensors(path)
    for required in ("optimizer", "rng"):
        if required not in tensors:
            raise CheckpointError(f"{directory} is not resumable: {required}.safetensors is missing")
    return ResumableCheckpoint(directory, step, model, state, tensors)
