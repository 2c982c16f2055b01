"""The architecture diagram (DOT text) and the allocation-free parameter breakdown."""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest
import torch

from core.architecture import architecture_dot, breakdown_for_config
from core.config import ModelConfig
from core.model import GPT, parameter_breakdown

GPT2 = ModelConfig.from_preset("gpt2")
TINY_PRESET = ModelConfig.from_preset("tiny")
CUSTOM = ModelConfig(vocab_size=300, block_size=24, n_layer=3, n_head=3, n_embd=48, dropout=0.1, bias=False)

_NODE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*\[", re.MULTILINE)
_EDGE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*->\s*([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)
_QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')


def _structure(dot: str) -> tuple[set[str], list[tuple[str, str]]]:
    """Declared node ids and edges of ``dot``, checking that quotes and braces balance outside strings."""
    assert dot.count('"') - dot.count('\\"') == 2 * len(_QUOTED.findall(dot)), "unbalanced quotes"
    bare = _QUOTED.sub('""', dot)
    depth = 0
    for char in bare:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0, "a closing brace without its opening one"
    assert depth == 0, "unclosed brace"
    assert bare.count("[") == bare.count("]")
    nodes = set(_NODE.findall(bare)) - {"graph", "node", "edge"}
    return nodes, _EDGE.findall(bare)


@pytest.mark.parametrize("config", [TINY_PRESET, GPT2, CUSTOM], ids=["tiny", "gpt2", "custom"])
def test_dot_is_well_formed_and_every_edge_joins_declared_nodes(config):
    dot = architecture_dot(config)
    assert dot.startswith("digraph gpt {") and dot.rstrip().endswith("}")
    assert 'rankdir="TB"' in dot
    nodes, edges = _structure(dot)
    expected = {"input", "wte", "wpe", "embed_add", "block_in", "ln_1", "attn", "add_1", "ln_2", "mlp", "add_2"}
    assert expected | {"ln_f", "lm_head", "logits"} <= nodes
    assert edges, "no edges parsed"
    for tail, head in edges:
        assert tail in nodes and head in nodes, f"edge {tail} -> {head} names an undeclared node"
    # The flow runs from the input to the logits through every stage.
    graph = {}
    for tail, head in edges:
        graph.setdefault(tail, set()).add(head)
    path = ["input", "wte", "embed_add", "block_in", "ln_1", "attn", "add_1", "ln_2", "mlp", "add_2", "ln_f"]
    for tail, head in zip(path + ["lm_head"], path[1:] + ["lm_head", "logits"], strict=True):
        assert head in graph.get(tail, set()), f"missing flow edge {tail} -> {head}"


def test_gpt2_dot_shows_the_reference_sizes():
    dot = architecture_dot(GPT2)
    for text in (
        "124,439,808",
        "474.70 MB",
        "12 × Transformer block",
        "50,257 × 768 · 38,597,376 params",
        "1,024 × 768 · 786,432 params",
        "12 heads × 64",
        "c_attn 768 → 2,304",
        "c_proj 768 → 768",
        "2,362,368 params",  # attention per block
        "c_fc 768 → 3,072",
        "4,722,432 params",  # MLP per block
        "768 · 1,536 params",  # each LayerNorm
        "768 → 50,257",
        "weights tied to wte",
        "(B × T × 50,257)",
        "T ≤ 1,024",
    ):
        assert text in dot, f"{text!r} missing from the gpt2 diagram"
    # Both skip connections are drawn dashed.
    assert re.search(r'block_in -> add_1 \[[^]]*style="dashed"', dot)
    assert re.search(r'add_1 -> add_2 \[[^]]*style="dashed"', dot)


def test_tiny_dot_counts_match_the_breakdown_and_name_the_batch():
    dot = architecture_dot(TINY_PRESET, batch_size=16)
    breakdown = parameter_breakdown(GPT(TINY_PRESET))
    block0 = {row["group"]: row["params"] for row in breakdown["blocks"] if row["block"] == 0}
    for text in (
        f"{breakdown['total_params']:,} parameters",
        "4 × Transformer block",
        f"{block0['attention']:,} params",
        f"{block0['mlp']:,} params",
        f"128 · {block0['layernorm'] // 2:,} params",
        "4 heads × 32",
        "c_attn 128 → 384",
        "c_fc 128 → 512",
        "(16 × T), T ≤ 128",
        "(16 × T × 50,257)",
    ):
        assert text in dot, f"{text!r} missing from the tiny diagram"


def test_dot_reflects_dropout_and_bias_free_layers():
    dot = architecture_dot(CUSTOM)
    assert "dropout 0.1" in dot and "no bias" in dot
    assert "3 × Transformer block" in dot and "48 · 48 params" in dot  # a LayerNorm without bias: weight only


def test_labels_are_escaped_for_dot():
    from core.architecture import _quote

    assert _quote('say "hi"\\ now\nnext') == '"say \\"hi\\"\\\\ now\\nnext"'


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_bad_batch_size_is_refused(bad):
    with pytest.raises(ValueError, match="batch_size"):
        architecture_dot(TINY_PRESET, batch_size=bad)


@pytest.mark.skipif(shutil.which("dot") is None, reason="the Graphviz dot binary is not installed")
def test_graphviz_accepts_the_dot():
    for config in (TINY_PRESET, GPT2, CUSTOM):
        done = subprocess.run(["dot", "-Tsvg"], input=architecture_dot(config, 8).encode(), capture_output=True)
        assert done.returncode == 0, done.stderr.decode()
        assert b"<svg" in done.stdout and not done.stderr, done.stderr.decode()


@pytest.mark.parametrize(
    "config",
    [
        TINY_PRESET,
        CUSTOM,
        ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=4),
        ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, pad_vocab_multiple=64),
    ],
)
def test_breakdown_for_config_equals_the_model_breakdown(config):
    assert breakdown_for_config(config) == parameter_breakdown(GPT(config))


def test_gpt2_breakdown_is_exact_and_cheap():
    started = time.perf_counter()
    breakdown = breakdown_for_config(GPT2)
    assert time.perf_counter() - started < 0.1
    assert breakdown["total_params"] == breakdown["trainable_params"] == 124_439_808
    assert breakdown["size_mb"] == 474.70
    assert breakdown["tied_lm_head"] is True
    assert len(breakdown["blocks"]) == 3 * 12
    # The full model, built on the meta device (no weights allocated), agrees row for row.
    with torch.device("meta"):
        model = GPT(GPT2)
    assert breakdown == parameter_breakdown(model)
