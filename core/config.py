"""Validated dataclass configs, one per concern: model, data and generation.

Every config checks itself in ``__post_init__`` and raises ``ValueError`` with a message that says which field is
wrong and what would be accepted. Configs are plain data: they are passed explicitly and never read globals.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.names import check_alias, check_model_name

GPT2_VOCAB_SIZE = 50257
"""Size of the GPT-2 BPE vocabulary (tiktoken ``gpt2``)."""

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
"""Public address of the Tiny Shakespeare corpus (1,115,394 characters)."""

MAX_NEW_TOKENS_CAP = 4096
"""Largest ``max_new_tokens`` a generation request may ask for."""

NUM_SAMPLES_CAP = 16
"""Largest ``num_samples`` a generation request may ask for (they run as one batch)."""

QUANTIZE_CHOICES = ("none", "int8", "int4", "bf16", "f16", "auto")
"""How a model may be quantized for CPU generation (see :mod:`core.quantize`): none is fp32, auto the fastest
precision whose held-out loss stays within 1% of fp32's on this machine, measured (see :mod:`core.precision`)."""

TRAIN_PRECISIONS = ("auto", "fp32", "bf16")
"""Arithmetic a training run may use (see :func:`core.optim.training_precision`)."""

MAX_PEAK_TFLOPS = 100_000
"""Largest ``peak_tflops`` a training config accepts: far above any single accelerator, far below FLOP/s units."""

MIN_TIME_BUDGET = 10.0
"""Shortest time budget a training run accepts, in seconds: below it the first steps' timing is the whole run."""

_DURATION = re.compile(r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+))\s*(s|sec|m|min|h)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``10m``, ``1.5h`` or ``600`` (plain numbers are seconds).

    Raises ``ValueError`` with a one-line message for anything else, a zero or negative duration included.
    """
    match = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"a duration looks like 90s, 10m or 1h, got {text!r}")
    seconds = float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]
    if seconds <= 0:
        raise ValueError(f"a duration must be longer than zero, got {text!r}")
    return seconds


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class JsonConfig:
    """JSON in and out for a config dataclass: :meth:`to_dict` gives plain values, :meth:`from_dict` rebuilds and so
    validates the config (a job folder, a checkpoint and a sweep's study store configs this way)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        """The config of a JSON-style dict; an unknown field or a bad value raises ``ValueError`` saying which."""
        what = cls.__name__.removesuffix("Config").lower() + " config"
        if not isinstance(values, dict):
            raise ValueError(f"{what} must be a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{what}: unknown field(s) {', '.join(unknown)}")
        return cls(**values)


@dataclass(frozen=True)
class ModelConfig(JsonConfig):
    """Shape of a GPT-2-style transformer. The defaults are the reference design (the ``gpt2`` preset)."""

    vocab_size: int = GPT2_VOCAB_SIZE
    """Number of token ids the embedding and the LM head cover."""
    block_size: int = 1024
    """Context length: the most positions the model attends over."""
    n_layer: int = 12
    """Number of transformer blocks."""
    n_head: int = 12
    """Attention heads per block; must divide ``n_embd``."""
    n_embd: int = 768
    """Width of the residual stream."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention weights and residual branches, in [0, 1)."""
    bias: bool = True
    """Whether linear layers and LayerNorms carry a bias (GPT-2 does)."""
    pad_vocab_multiple: int = 1
    """Round the embedding and LM head rows up to a multiple of this (64 suits GPU matmuls); padding rows are never
    predicted, and the tokenizer is unchanged. 1: no padding."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"model config: {name} must be a positive integer, got {value!r}",
            )
        _require(
            self.n_embd % self.n_head == 0,
            f"model config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})",
        )
        _require(
            isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
            f"model config: dropout must be in [0, 1), got {self.dropout!r}",
        )
        _require(isinstance(self.bias, bool), f"model config: bias must be true or false, got {self.bias!r}")
        _require(
            _is_int(self.pad_vocab_multiple) and 1 <= self.pad_vocab_multiple <= 1024,
            f"model config: pad_vocab_multiple must be an integer in 1..1024, got {self.pad_vocab_multiple!r}",
        )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the token embedding and the LM head: ``vocab_size`` rounded up to ``pad_vocab_multiple``."""
        return -(-self.vocab_size // self.pad_vocab_multiple) * self.pad_vocab_multiple

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> ModelConfig:
        """The named preset with any field overridden; ``None`` values in ``overrides`` are ignored."""
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        chosen = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(PRESETS[preset], **chosen)


PRESETS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "small": ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "tiny": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "shakespeare-cpu": ModelConfig(n_layer=4, n_head=6, n_embd=192, block_size=128),
}
"""Named model shapes. ``gpt2`` is the reference design: 124,439,808 parameters; ``shakespeare-cpu`` is the shape of
the CPU time-budget recipe (:data:`core.recipes.RECIPES`)."""


@dataclass(frozen=True)
class DataConfig(JsonConfig):
    """Where the corpus comes from, how it is split, and how batches are cut from it."""

    source: str = TINY_SHAKESPEARE_URL
    """A local UTF-8 text file or an http(s) URL of one."""
    cache_dir: str = "data"
    """Folder for downloads and the uint16 token caches (keyed by the source's content hash)."""
    val_fraction: float = 0.1
    """Fraction of the characters at the end of the corpus held out for validation."""
    batch_size: int = 2
    """Sequences per batch (B)."""
    block_size: int = 1024
    """Tokens per sequence (T); must not exceed the model's context."""
    order: str = "sequential"
    """``sequential``: consecutive B·T windows in corpus order (the reference); ``random``: random windows."""
    seed: int = 1337
    """Seed for random windows."""

    def __post_init__(self) -> None:
        _require(
            isinstance(self.source, str) and self.source.strip() != "", "data config: source must be a path or URL"
        )
        _require(
            isinstance(self.val_fraction, (int, float)) and 0.0 < self.val_fraction < 1.0,
            f"data config: val_fraction must be in (0, 1), got {self.val_fraction!r}",
        )
        for name in ("batch_size", "block_size"):
            value = getattr(self, name)
            _require(
                isinstance(value, int) and not isinstance(value, bool) and value > 0,
                f"data config: {name} must be a positive integer, got {value!r}",
            )
        _require(
            self.order in ("sequential", "random"),
            f"data config: order must be 'sequential' or 'random', got {self.order!r}",
        )
        _require(isinstance(self.seed, int), f"data config: seed must be an integer, got {self.seed!r}")


@dataclass(frozen=True)
class SampleConfig(JsonConfig):
    """How continuations are drawn from the model."""

    # The help of pipelines.generate is these docstrings: its test holds 4096 and 16 to the caps' constants.
    max_new_tokens: int = 200
    """Most new tokens per sample, 1..4096."""
    num_samples: int = 1
    """Independent continuations, run as one batch, 1..16."""
    temperature: float = 0.8
    """Softmax temperature; 0 means greedy (argmax) and deterministic."""
    top_k: int | None = 200
    """Keep only the k most likely tokens (None: no limit)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches p, in (0, 1]."""
    seed: int | None = None
    """Random seed; the same seed gives the same samples. None: a fresh seed, reported with the result."""
    stop_at_eot: bool = True
    """End a sample when it produces ``<|endoftext|>``."""

    def __post_init__(self) -> None:
        _require(
            _is_int(self.max_new_tokens) and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_CAP,
            f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS_CAP}, got {self.max_new_tokens!r}",
        )
        _require(
            _is_int(self.num_samples) and 1 <= self.num_samples <= NUM_SAMPLES_CAP,
            f"num_samples must be between 1 and {NUM_SAMPLES_CAP}, got {self.num_samples!r}",
        )
        # Finite only: an infinite temperature would silently mean "uniform over the vocabulary" (or top-k).
        _require(
            _is_number(self.temperature) and math.isfinite(self.temperature) and self.temperature >= 0,
            f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}",
        )
        _require(
            self.top_k is None or (_is_int(self.top_k) and self.top_k > 0),
            f"top_k must be a positive integer (or unset), got {self.top_k!r}",
        )
        _require(
            _is_number(self.top_p) and 0.0 < self.top_p <= 1.0,
            f"top_p must be in (0, 1], got {self.top_p!r}",
        )
        _require(
            self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**63),
            f"seed must be a non-negative integer, got {self.seed!r}",
        )

    @property
    def greedy(self) -> bool:
        """True when decoding is deterministic argmax."""
        return self.temperature == 0


@dataclass(frozen=True)
class TrainConfig(JsonConfig):
    """Optimisation, schedule, stop rules and periodic work of a training run (the reference's defaults)."""

    max_steps: int = 20_000
    """Hard limit on optimizer steps; also the length of the OneCycle schedule."""
    target_loss: float = 0.1
    """Stop once the running-average training loss falls below this (the reference's criterion); 0 disables."""
    avg_window: int = 100
    """Number of most recent steps averaged into ``avg_loss``."""
    lr: float = 6e-4
    """Peak learning rate of the OneCycle schedule."""
    warmup_fraction: float = 0.1
    """Fraction of ``max_steps`` spent warming up to the peak (OneCycle's ``pct_start``)."""
    div_factor: float = 25.0
    """The schedule starts at ``lr / div_factor``."""
    final_div_factor: float = 1e4
    """The schedule ends at ``lr / div_factor / final_div_factor``."""
    beta1: float = 0.9
    """AdamW's first-moment decay."""
    beta2: float = 0.95
    """AdamW's second-moment decay."""
    eps: float = 1e-8
    """AdamW's epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied to 2-D weights only (not to biases, LayerNorms or embeddings' 1-D params)."""
    grad_clip: float = 0.5
    """Clip the global gradient norm to this; 0 disables clipping."""
    grad_accum: int = 1
    """Micro-batches whose gradients are accumulated into each optimizer step: the global batch is
    ``batch_size × grad_accum × processes`` sequences."""
    eval_interval: int = 200
    """Compute validation loss and bits per character every this many steps (and at the end); 0 disables."""
    eval_batches: int | None = None
    """Validation batches per evaluation; None evaluates the whole validation split."""
    patience: int | None = None
    """Stop after this many evaluations without a new best validation loss; None disables."""
    sample_interval: int = 500
    """Generate a text sample every this many steps (and at the end); 0 disables the periodic ones."""
    sample_prompt: str = "ROMEO:"
    """Prompt of the periodic samples."""
    sample_tokens: int = 100
    """New tokens per periodic sample."""
    seed: int = 1337
    """Seed for initialisation, batch order and samples."""
    device: str = "auto"
    """``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda`` or ``mps``."""
    init_from: str | None = None
    """A Hugging Face GPT-2 folder (config.json + model.safetensors) whose weights replace the random
    initialisation, to fine-tune; the model config must have its shape (see :func:`core.hf.read_hf_config`).
    None trains from scratch."""
    compile: bool = False
    """Wrap the model in ``torch.compile`` for training steps (pays on CUDA; needs a C++ compiler on CPU)."""
    precision: str = "auto"
    """Training arithmetic: ``bf16`` autocast (on a CPU only where bf16 matmuls measure no slower than fp32), ``fp32``,
    or ``auto``: bf16 on CUDA, fp32 elsewhere."""
    peak_tflops: float | None = None
    """The device's peak dense TFLOP/s for MFU; None: looked up for known CUDA GPUs, else no MFU."""
    checkpoint_interval: int = 500
    """Write a resumable checkpoint every this many steps and when training ends or is stopped; 0 writes none
    (a stopped run then cannot be resumed)."""
    keep_checkpoints: int = 3
    """How many resumable checkpoints to keep: the newest; older ones are deleted once a newer one is written."""
    tie_unused_tokens: bool = False
    """Give every token the training split never uses one shared embedding row, and train the LM head over the used
    tokens plus that row (:class:`core.lm_head.SharedRows`): the same GPT-2, predicting the same probabilities, for a
    head about 4x cheaper on Tiny Shakespeare. False trains all 50,257 rows (the reference)."""
    time_budget: float | None = None
    """Wall-clock seconds the run may take, evaluations, samples and checkpoints included: the trainer times its
    first steps, sizes the schedule to end inside the budget (``max_steps`` becomes a cap) and stops on time with
    ``stop_reason`` ``time_budget``. None: no budget."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "avg_window", "sample_tokens", "keep_checkpoints", "grad_accum"):
            value = getattr(self, name)
            _require(_is_int(value) and value > 0, f"train config: {name} must be a positive integer, got {value!r}")
        for name in ("eval_interval", "sample_interval", "checkpoint_interval"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 0, f"train config: {name} must be an integer >= 0, got {value!r}")
        for name in ("eval_batches", "patience"):
            value = getattr(self, name)
            _require(
                value is None or (_is_int(value) and value > 0),
                f"train config: {name} must be a positive integer (or unset), got {value!r}",
            )
        _require(_is_number(self.lr) and self.lr > 0, f"train config: lr must be > 0, got {self.lr!r}")
        _require(
            _is_number(self.target_loss) and self.target_loss >= 0,
            f"train config: target_loss must be >= 0 (0 disables), got {self.target_loss!r}",
        )
        _require(
            _is_number(self.warmup_fraction) and 0 < self.warmup_fraction < 1,
            f"train config: warmup_fraction must be in (0, 1), got {self.warmup_fraction!r}",
        )
        for name in ("div_factor", "final_div_factor", "eps"):
            value = getattr(self, name)
            _require(_is_number(value) and value > 0, f"train config: {name} must be > 0, got {value!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(_is_number(value) and 0 <= value < 1, f"train config: {name} must be in [0, 1), got {value!r}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            _require(_is_number(value) and value >= 0, f"train config: {name} must be >= 0, got {value!r}")
        _require(
            isinstance(self.sample_prompt, str) and self.sample_prompt.strip() != "",
            "train config: sample_prompt must not be empty",
        )
        _require(
            _is_int(self.seed) and self.seed >= 0, f"train config: seed must be an integer >= 0, got {self.seed!r}"
        )
        _require(
            self.init_from is None or (isinstance(self.init_from, str) and Path(self.init_from).is_dir()),
            f"train config: init_from must be an existing folder (a Hugging Face GPT-2 model), got {self.init_from!r}",
        )
        _require(isinstance(self.compile, bool), f"train config: compile must be true or false, got {self.compile!r}")
        _require(
            self.precision in TRAIN_PRECISIONS,
            f"train config: precision must be one of {', '.join(TRAIN_PRECISIONS)}, got {self.precision!r}",
        )
        _require(
            isinstance(self.tie_unused_tokens, bool),
            f"train config: tie_unused_tokens must be true or false, got {self.tie_unused_tokens!r}",
        )
        budget = self.time_budget
        _require(
            budget is None or (_is_number(budget) and math.isfinite(budget) and budget >= MIN_TIME_BUDGET),
            f"train config: time_budget must be at least {MIN_TIME_BUDGET:g} seconds (or unset), got {budget!r}",
        )
        # The upper bound catches FLOP/s given where TFLOP/s are meant (989e12 for an H100), which would make every
        # MFU a near-zero number instead of an error.
        _require(
            self.peak_tflops is None or (_is_number(self.peak_tflops) and 0 < self.peak_tflops <= MAX_PEAK_TFLOPS),
            f"train config: peak_tflops must be a number of TFLOP/s in (0, {MAX_PEAK_TFLOPS:,}] "
            f"(e.g. 989 for an H100 SXM), or unset, got {self.peak_tflops!r}",
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass(frozen=True)
class TrackingConfig(JsonConfig):
    """Where a training run is recorded and how its model is registered."""

    experiment: str = "shakespeare-gpt"
    """MLflow experiment name (created if missing)."""
    run_name: str | None = None
    """MLflow run name; None lets MLflow pick one."""
    register_as: str = "shakespeare-gpt"
    """Registered model name; each finished run adds a version."""
    alias: str | None = None
    """Alias to point at the new version (e.g. ``champion``); None sets none."""
    register_best: bool = False
    """Register the best-validation checkpoint instead of the final one."""
    preset: str = "custom"
    """Name of the model preset the run started from (recorded as a tag)."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None uses MLFLOW_TRACKING_URI or the local SQLite store under mlruns/."""
    checkpoint_root: str | None = None
    """Folder for local checkpoints (one sub-folder per run id); None uses mlruns/checkpoints."""
    parent_run_id: str | None = None
    """Create the run nested under this MLflow run (tag ``mlflow.parentRunId``), e.g. a sweep's trial under the
    sweep's run; None: a top-level run."""
    register: bool = True
    """Register the model when the run finishes; False ends the run FINISHED with its checkpoints only (a sweep's
    trials: the sweep registers its best trial's model itself)."""

    def __post_init__(self) -> None:
        _require(isinstance(self.experiment, str) and self.experiment.strip() != "", "experiment name is empty")
        _require(
            self.parent_run_id is None
            or (isinstance(self.parent_run_id, str) and _RUN_ID.fullmatch(self.parent_run_id) is not None),
            f"parent run id {self.parent_run_id!r} is invalid: expected an MLflow run id",
        )
        _require(isinstance(self.register, bool), f"register must be true or false, got {self.register!r}")
        check_model_name(self.register_as)
        if self.alias is not None:  # refused now, not by the registry after the whole training
            check_alias(self.alias)
