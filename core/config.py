"""Validated dataclass configs, one per concern: model, data and generation.

Every config checks itself in ``__post_init__`` and raises ``ValueError`` with a message that says which field is
wrong and what would be accepted. Configs are plain data: they are passed explicitly and never read globals.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

GPT2_VOCAB_SIZE = 50257
"""Size of the GPT-2 BPE vocabulary (tiktoken ``gpt2``)."""

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
"""Public address of the Tiny Shakespeare corpus (1,115,394 characters)."""

MAX_NEW_TOKENS_CAP = 4096
"""Largest ``max_new_tokens`` a generation request may ask for."""

NUM_SAMPLES_CAP = 16
"""Largest ``num_samples`` a generation request may ask for (they run as one batch)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelConfig:
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

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head

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

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build from a JSON-style dict, refusing unknown or missing-typed fields with a clear message."""
        if not isinstance(values, dict):
            raise ValueError(f"model config must be a JSON object, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model config: unknown field(s) {', '.join(unknown)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (JSON-serialisable)."""
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelConfig] = {
    "gpt2": ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
    "small": ModelConfig(n_layer=6, n_head=6, n_embd=384, block_size=256),
    "tiny": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=128),
}
"""Named model shapes. ``gpt2`` is the reference design: 124,439,808 parameters."""


@dataclass(frozen=True)
class DataConfig:
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
class SampleConfig:
    """How continuations are drawn from the model."""

    max_new_tokens: int = 200
    """Most new tokens per sample, 1 to MAX_NEW_TOKENS_CAP."""
    num_samples: int = 1
    """Independent continuations, run as one batch, 1 to NUM_SAMPLES_CAP."""
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
        _require(
            isinstance(self.temperature, (int, float))
            and self.temperature >= 0
            and self.temperature == self.temperature,
            f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}",
        )
        _require(
            self.top_k is None or (_is_int(self.top_k) and self.top_k > 0),
            f"top_k must be a positive integer (or unset), got {self.top_k!r}",
        )
        _require(
            isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
