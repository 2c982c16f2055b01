"""Shared fixtures: offline tokenizer cache, tiny model configs and checkpoints, and the real corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Tests run offline: use the GPT-2 BPE files beside the checkout unless the caller chose a cache.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")

from core.config import ModelConfig  # noqa: E402
from core.model import GPT  # noqa: E402

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
"""A model small enough to run anything in milliseconds, with the real GPT-2 vocabulary."""


@pytest.fixture
def tiny_config() -> ModelConfig:
    return TINY


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


@pytest.fixture
def tokenizer():
    from core.tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model) -> Path:
    from core.checkpoint import save_checkpoint

    return save_checkpoint(tiny_model, tmp_path / "tiny-checkpoint")


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The real Tiny Shakespeare file: $SHAKESPEARE_SOURCE (a path, or a URL already downloaded into data/), or
    the copy in ../shared."""
    from core.data import is_url, read_corpus

    source = os.environ.get("SHAKESPEARE_SOURCE")
    if source and is_url(source):
        _, _, path = read_corpus(source, REPO / "data")
        return path
    if source:
        return Path(source)
    candidate = SHARED / "data" / "tinyshakespeare" / "input.txt"
    if candidate.is_file():
        return candidate
    pytest.skip("Tiny Shakespeare not found: run `make data` or set SHAKESPEARE_SOURCE")
