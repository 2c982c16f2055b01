"""The model's architecture as data: a Graphviz DOT flow diagram and a parameter breakdown, for any ModelConfig.

Both are computed from the config alone, analytically, without allocating a model: they cost microseconds even
for the ``gpt2`` preset. :func:`breakdown_for_config` returns exactly what
``core.model.parameter_breakdown(GPT(config))`` returns (the tests hold the two equal), and every count printed in
:func:`architecture_dot` comes from that breakdown, so the diagram and the table can never disagree.

The DOT text is plain Graphviz (``digraph``, top to bottom, UTF-8 labels) meant for ``st.graphviz_chart``, which
renders it in the browser; nothing here needs the ``dot`` binary or the ``graphviz`` Python package.
"""

from __future__ import annotations

from core.config import ModelConfig

# Fill / border colours per kind of component (Tailwind's 100 / 500 shades: light fills, readable black text).
_STYLE = {
    "io": ("#f3f4f6", "#6b7280"),
    "embedding": ("#dbeafe", "#3b82f6"),
    "attention": ("#ffedd5", "#f97316"),
    "mlp": ("#dcfce7", "#22c55e"),
    "norm": ("#ede9fe", "#8b5cf6"),
    "head": ("#fee2e2", "#ef4444"),
    "add": ("#ffffff", "#374151"),
}


# The main data path, drawn as one straight column; the embeddings and skip connections sit beside it.
_SPINE = (
    *("input", "embed_add", "block_in", "ln_1", "attn", "add_1"),
    *("ln_2", "mlp", "add_2", "ln_f", "lm_head", "logits"),
)


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _layernorm(width: int, bias: bool) -> int:
    return width * (2 if bias else 1)


def _counts(config: ModelConfig) -> dict[str, int]:
    """Parameters per module of ``GPT(config)``, mirroring the layers built in core/model.py."""
    c, b = config.n_embd, config.bias
    return {
        "wte": config.padded_vocab_size * c,  # vocabulary padding rows are parameters too
        "wpe": config.block_size * c,
        "c_attn": _linear(c, 3 * c, b),
        "attn_proj": _linear(c, c, b),
        "attn": _linear(c, 3 * c, b) + _linear(c, c, b),
        "c_fc": _linear(c, 4 * c, b),
        "mlp_proj": _linear(4 * c, c, b),
        "mlp": _linear(c, 4 * c, b) + _linear(4 * c, c, b),
        "ln": _layernorm(c, b),  # one LayerNorm; a block has two (ln_1, ln_2)
        "ln_f": _layernorm(c, b),
    }


def breakdown_for_config(config: ModelConfig) -> dict:
    """What ``parameter_breakdown(GPT(config))`` returns, computed from the shapes instead of allocated weights.

    Same keys, rows, names, order and rounding: ``config``, ``total_params``, ``trainable_params``, ``size_mb``
    (fp32 MiB, 2 decimals), ``tied_lm_head``, ``components`` and ``blocks``. ``GPT`` always ties the LM head to the
    token embedding, so the head counts 0 parameters here too. Costs microseconds for any size.
    """
    n = _counts(config)
    per_block: list[tuple[str, str, int | None, int, str]] = []
    for i in range(config.n_layer):
        per_block += [
            (f"block {i} attention", "attention", i, n["attn"], ""),
            (f"block {i} mlp", "mlp", i, n["mlp"], ""),
            (f"block {i} layernorms", "layernorm", i, 2 * n["ln"], ""),
        ]
    layers = config.n_layer
    components = [
        ("token embedding (wte)", "token_embedding", None, n["wte"], ""),
        ("position embedding (wpe)", "position_embedding", None, n["wpe"], ""),
        (f"attention ({layers} blocks)", "attention", None, layers * n["attn"], ""),
        (f"mlp ({layers} blocks)", "mlp", None, layers * n["mlp"], ""),
        (f"layernorms ({layers} blocks)", "layernorm", None, layers * 2 * n["ln"], ""),
        ("final layernorm (ln_f)", "final_layernorm", None, n["ln_f"], ""),
        ("lm head", "lm_head", None, 0, "tied: shares the token embedding's weight"),
    ]
    total = sum(row[3] for row in components)

    def rows(items: list[tuple[str, str, int | None, int, str]]) -> list[dict]:
        return [
            {
                "name": name,
                "group": group,
                "block": block,
                "params": params,
                "share": params / total if total else 0.0,
                "size_mb": round(params * 4 / 2**20, 2),
                "note": note,
            }
            for name, group, block, params, note in items
        ]

    return {
        "config": config.to_dict(),
        "total_params": total,
        "trainable_params": total,
        "size_mb": round(total * 4 / 2**20, 2),
        "tied_lm_head": True,
        "components": rows(components),
        "blocks": rows(per_block),
    }


def _quote(text: str) -> str:
    """``text`` as a DOT double-quoted string: backslashes and quotes escaped, line breaks as centred ``\\n``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\r\n", "\n").replace("\n", "\\n") + '"'


def _node(node_id: str, label: str, kind: str, **attrs: str) -> str:
    fill, border = _STYLE[kind]
    fields = {"label": label, "fillcolor": fill, "color": border, **attrs}
    if node_id in _SPINE:
        fields["group"] = "spine"  # dot keeps nodes of one group in a straight column
    return f"{node_id} [" + ", ".join(f"{key}={_quote(value)}" for key, value in fields.items()) + "];"


def _edge(tail: str, head: str, **attrs: str) -> str:
    if not attrs:
        return f"{tail} -> {head};"
    return f"{tail} -> {head} [" + ", ".join(f"{key}={_quote(value)}" for key, value in attrs.items()) + "];"


def architecture_dot(config: ModelConfig, batch_size: int | None = None) -> str:
    """A Graphviz DOT flow diagram of ``GPT(config)`` with its real shapes and parameter counts.

    The flow, top to bottom: input token ids → token embeddings (wte) and position encoding (wpe) → add → a cluster
    "N × Transformer block" (LayerNorm 1, causal self-attention, residual add, LayerNorm 2, MLP, residual add, with
    the skip connections drawn dashed) → final LayerNorm (ln_f) → LM head → output logits. Shapes name the batch
    ``B`` (or ``batch_size`` when given) and the sequence ``T`` (at most ``config.block_size``). Parameter counts
    are those of :func:`breakdown_for_config`, so they match ``parameter_breakdown`` exactly.
    """
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0):
        raise ValueError(f"batch_size must be a positive integer (or None), got {batch_size!r}")
    n = _counts(config)
    breakdown = breakdown_for_config(config)
    C, V, L = config.n_embd, config.vocab_size, config.n_layer
    padded_V = config.padded_vocab_size  # embedding rows, with any vocabulary padding
    B = "B" if batch_size is None else f"{batch_size:,}"
    residual = f"{B} × T × {C:,}"
    dropout = f" · dropout {config.dropout:g}" if config.dropout > 0 else ""
    bias = "" if config.bias else " · no bias"
    block_params = n["attn"] + n["mlp"] + 2 * n["ln"]
    title = (
        f"GPT · {breakdown['total_params']:,} parameters · {breakdown['size_mb']:.2f} MB (fp32)\n"
        f"{L} layers · {config.n_head} heads · width {C:,} · context {config.block_size:,} · vocabulary {V:,}"
    )
    edge_style = {"fontcolor": "#4b5563"}

    lines = [
        "digraph gpt {",
        f'graph [rankdir="TB", label={_quote(title)}, labelloc="t", fontname="Helvetica", fontsize="14", '
        'nodesep="0.3", ranksep="0.3", newrank="true", bgcolor="white", pad="0.15"];',
        'node [shape="box", style="rounded,filled", fontname="Helvetica", fontsize="11", margin="0.18,0.06", '
        'penwidth="1.2"];',
        'edge [fontname="Helvetica", fontsize="9", color="#6b7280", arrowsize="0.7"];',
        _node("input", f"Input token ids\n({B} × T), T ≤ {config.block_size:,}", "io"),
        _node("wte", f"Token embeddings wte\n{padded_V:,} × {C:,} · {n['wte']:,} params", "embedding"),
        _node("wpe", f"Position encoding wpe\n{config.block_size:,} × {C:,} · {n['wpe']:,} params", "embedding"),
        _node("embed_add", "+", "add", shape="circle", fontsize="16", width="0.35", fixedsize="true"),
        "{ rank=same; wte; wpe; }",
        _edge("input", "wte", label=" token ids", **edge_style),
        _edge("input", "wpe", label=" positions 0…T−1", **edge_style),
        _edge("wte", "embed_add"),
        _edge("wpe", "embed_add"),
        "subgraph cluster_block {",
        f"label={_quote(f'{L} × Transformer block · {block_params:,} params each · {L * block_params:,} in all')};",
        'style="rounded,dashed"; color="#9ca3af"; fontname="Helvetica"; fontsize="12"; margin="12";',
        _node("block_in", f"x ({residual})", "io", shape="box", style="rounded", fontsize="10"),
        _node("ln_1", f"LayerNorm 1 (ln_1)\n{C:,} · {n['ln']:,} params", "norm"),
        _node(
            "attn",
            f"Causal self-attention (attn)\n{config.n_head} heads × {config.head_dim:,}{dropout}\n"
            f"c_attn {C:,} → {3 * C:,} (q, k, v) · c_proj {C:,} → {C:,}{bias}\n{n['attn']:,} params",
            "attention",
        ),
        _node("add_1", "+", "add", shape="circle", fontsize="16", width="0.35", fixedsize="true"),
        _node("ln_2", f"LayerNorm 2 (ln_2)\n{C:,} · {n['ln']:,} params", "norm"),
        _node(
            "mlp",
            f"MLP (mlp){dropout}\nc_fc {C:,} → {4 * C:,} · GELU · c_proj {4 * C:,} → {C:,}{bias}\n{n['mlp']:,} params",
            "mlp",
        ),
        _node("add_2", "+", "add", shape="circle", fontsize="16", width="0.35", fixedsize="true"),
        _edge("block_in", "ln_1"),
        _edge("ln_1", "attn"),
        _edge("attn", "add_1"),
        _edge("add_1", "ln_2"),
        _edge("ln_2", "mlp"),
        _edge("mlp", "add_2"),
        # The skip connections: each sub-layer adds its output to its own input (pre-LayerNorm residual stream).
        _edge("block_in", "add_1", style="dashed", weight="0", label=" residual", **edge_style),
        _edge("add_1", "add_2", style="dashed", weight="0", label=" residual", **edge_style),
        "}",
        _edge("embed_add", "block_in", label=f" {residual}{dropout}", **edge_style),
        _node("ln_f", f"Final LayerNorm ln_f\n{C:,} · {n['ln_f']:,} params", "norm"),
        _edge("add_2", "ln_f", label=f" after block {L}", **edge_style),
        _node(
            "lm_head",
            f"LM head (lm_head)\n{C:,} → {V:,}, no bias\nweights tied to wte · 0 extra params",
            "head",
        ),
        _node("logits", f"Output logits\n({B} × T × {V:,})", "io"),
        _edge("ln_f", "lm_head"),
        _edge("lm_head", "logits"),
        "}",
    ]
    return "\n".join(lines) + "\n"
