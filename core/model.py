"""The GPT-2 language model, its key/value cache, and its parameter breakdown.

Parameter names follow GPT-2 (``transformer.wte``, ``transformer.h.0.attn.c_attn``, ...), so checkpoints map one to
one onto other GPT-2 implementations. This module is pure: no file or network I/O and no printing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import ModelConfig
from core.lm_head import IGNORE_INDEX, SharedRows, lm_head_cross_entropy


class KVCache:
    """Preallocated keys and values for every layer, so each decoded token costs one position, not the context.

    Shapes: ``k`` and ``v`` are (n_layer, B, n_head, max_len, head_dim). Positions ``[0, length)`` are valid.
    """

    def __init__(self, config: ModelConfig, batch_size: int, *, device=None, dtype=None, max_len: int | None = None):
        max_len = config.block_size if max_len is None else max_len
        if not 0 < max_len <= config.block_size:
            raise ValueError(f"cache length must be in 1..{config.block_size}, got {max_len}")
        shape = (config.n_layer, batch_size, config.n_head, max_len, config.head_dim)
        # Uninitialised: a position is read only after update() wrote it, and zero-filling the 75 MB of a gpt2
        # cache cost about 20 ms per generation on a 2-core CPU (pages are then touched only as the cache fills).
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hd) at ``start_pos`` and return all keys/values so far, (B, nh, start_pos+T, hd)."""
        end = start_pos + k.size(2)
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


SMALL_ROWS = 8
"""Up to this many rows (tokens in one forward), a CPU linear layer takes the decoding route (see :class:`Linear`)."""


_FOUND_KERNELS: dict = {}  # each op once found: looking one up costs microseconds, and a token runs ~60 calls


def decoding_kernel(name: str = "linear_small"):
    """``torch.ops.studio.<name>`` once the studio's kernels are registered (core.cpu_kernels.load), else None."""
    op = _FOUND_KERNELS.get(name)
    if op is None:
        op = getattr(torch.ops.studio, name, None)
        if op is None:
            return None
        _FOUND_KERNELS[name] = op
    return op


def _needs_grad(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same results) with a faster route for decoding on the CPU.

    Decoding multiplies a few rows by each weight, which is bound by reading the weight from memory. For one row,
    ``F.linear`` becomes a matrix-vector product that MKL runs on one core at about half the memory bandwidth of
    the two-core machines this targets; ``weight @ x.T`` with at least two columns is a skinny matrix product that
    streams the weight on every core (measured here: 12-13 GB/s against 20-28 GB/s; ``pipelines.benchmark`` shows
    the end-to-end effect). One row is duplicated to make two columns: the arithmetic is free, the bytes are not.
    """

    def decoding_weights(self) -> tuple | None:
        """(weight, scales, bias, kind) as the decoding kernels read this layer (core.cpu_kernels.KINDS: fp32 is
        0), or None when they cannot (a weight not in fp32)."""
        if self.weight.dtype != torch.float32 or (self.bias is not None and self.bias.dtype != torch.float32):
            return None
        return self.weight, None, self.bias, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if x.device.type != "cpu" or rows > SMALL_ROWS or rows == 0:
            return F.linear(x, self.weight, self.bias)
        kernel = decoding_kernel()
        if kernel is not None and self.weight.dtype == torch.float32 and not _needs_grad(x, self.weight):
            # The studio's kernel (core/cpu_kernels.cpp, loaded by whoever generates): it streams the weight at
            # close to the memory bandwidth, where BLAS's skinny products reached 40-60% of it.
            y = kernel(x.reshape(rows, x.size(-1)), self.weight, None, self.bias, 0)  # (n, out)
            return y.view(*x.shape[:-1], self.weight.size(0))
        # As few operations as possible: a decoded token runs ~50 of these, and each op's dispatch costs
        # microseconds that add up next to the weights' streaming time.
        x2 = x.reshape(rows, x.size(-1))  # (n, in)
        # Row-major (n, in), so x2.t() is a column-major operand; one row is duplicated into a real copy (an
        # expanded view would make the product copy it badly).
        x2 = x2.expand(2, -1).contiguous() if rows == 1 else x2.contiguous()
        if self.bias is None:
            y = torch.mm(self.weight, x2.t())  # (out, n or 2)
        else:
            y = torch.addmm(self.bias.unsqueeze(1), self.weight, x2.t())  # (out, n or 2)
        return y.t()[:rows].contiguous().view(*x.shape[:-1], self.weight.size(0))  # (..., out)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v for all heads at once
        self.c_proj = Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True  # read by GPT._init_weights for GPT-2's scaled init
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, start_pos: int = 0
    ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        if cache is not None:
            k, v = cache.update(layer, k, v, start_pos)  # (B, nh, start_pos+T, hd)
        dropout_p = self.dropout if self.training else 0.0
        if start_pos == 0:
            # Queries and keys cover the same positions: the plain causal mask (and the fastest kernels).
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif T == 1 and not self.training:
            # One new query attends to every cached position: three small products. SDPA's kernel spent about 60 µs
            # per call here on set-up (a tenth of a 124M model's int8 decoding step, over its 12 layers).
            scores = torch.matmul(q, k.transpose(-2, -1)).mul_(1.0 / math.sqrt(q.size(-1)))  # (B, nh, 1, L)
            y = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, nh, 1, hd)
        elif T == 1:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:
            # A chunk appended after cached positions: query i sees keys up to start_pos + i.
            allowed = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, start_pos: int = 0
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, start_pos)
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass(frozen=True)
class DecodingPlan:
    """The tensors of one fused decoding step (``torch.ops.studio.decode_step``), gathered once per generation."""

    step: object
    """``torch.ops.studio.decode_step``."""
    norms: list
    """Per block ln_1's weight and bias, then ln_2's; ln_f's last (a bias may be None)."""
    weights: list
    """Per block c_attn, the attention's c_proj, c_fc and the MLP's c_proj; the LM head last."""
    scales: list
    """Each weight's scales (int8 and 4-bit layouts), else None."""
    biases: list
    """Each weight's bias, or None."""
    kinds: list
    """Each weight's layout (:data:`core.cpu_kernels.KINDS`)."""
    eps: float
    """The LayerNorms' epsilon (one for all)."""


class GPT(nn.Module):
    """GPT-2: token + position embeddings, ``n_layer`` blocks, final LayerNorm, LM head tied to the embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Make the LM head share the token embedding's weight (GPT-2's weight tying)."""
        self.lm_head.weight = self.transformer.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                # GPT-2 scales residual projections so the residual stream's variance does not grow with depth.
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        start_pos: int = 0,
        last_only: bool = False,
        return_logits: bool = False,
        shared_rows: SharedRows | None = None,
        token_rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Logits for token ids ``idx`` (B, T), and the mean cross-entropy against ``targets`` (B, T) if given.

        With ``cache``, ``idx`` holds positions ``start_pos .. start_pos+T-1`` and earlier positions come from the
        cache. ``last_only`` returns logits for the last position only (B, 1, V), which is all sampling needs.
        Targets equal to -1 (IGNORE_INDEX) are ignored in the loss. With ``targets`` on the CPU the loss comes from
        the fused, chunked LM head + cross-entropy and the logits returned are None, unless ``return_logits`` asks
        for the plain (B, T, V) logits and ``F.cross_entropy`` on them (slower, and several times the memory). On
        other devices the loss always uses plain logits (returned only with ``return_logits``). V is always
        ``config.vocab_size``: vocabulary padding rows never appear in logits or the loss.

        With ``shared_rows`` (training only: ``targets`` given, no logits returned) the loss is the softmax over
        the used tokens plus the shared entry (see :class:`SharedRows`), equal to the full loss whenever the unused
        rows are tied. ``token_rows`` (K + 1, C), with ``shared_rows``, stands in for those rows of the token
        embedding (input and LM head alike): a trainer's compact copy that its optimizer updates instead of the
        whole (V, C) weight.
        """
        B, T = idx.shape
        if start_pos + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start_pos + T} positions exceeds the context of {self.config.block_size}; crop it first"
            )
        pos = torch.arange(start_pos, start_pos + T, dtype=torch.long, device=idx.device)  # (T,)
        if token_rows is not None:
            if shared_rows is None:
                raise ValueError("token_rows stand for the rows of shared_rows: pass both")
            tokens = F.embedding(shared_rows.index[idx], token_rows)  # (B, T, C)
        else:
            tokens = self.transformer.wte(idx)  # (B, T, C)
        x = self.transformer.drop(tokens + self.transformer.wpe(pos))  # (B, T, C)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, start_pos)
        x = self.transformer.ln_f(x)  # (B, T, C)
        V = self.config.vocab_size  # rows past V (vocabulary padding) are never predicted
        if shared_rows is not None:
            if targets is None or return_logits:
                raise ValueError("shared_rows is for the training loss only: pass targets and no return_logits")
            weight = self.lm_head.weight.index_select(0, shared_rows.rows) if token_rows is None else token_rows
            targets = shared_rows.index[targets.clamp(min=0)].masked_fill_(targets == IGNORE_INDEX, IGNORE_INDEX)
            x, targets = x.reshape(B * T, -1), targets.reshape(-1)  # (B·T, C), (B·T,)
            # The fused CPU loss is a hand-written autograd Function that Inductor cannot compile (see the trainer).
            if x.device.type == "cpu" and not torch.compiler.is_compiling():
                loss = lm_head_cross_entropy(x, weight, targets, offset=shared_rows.offset)
            else:
                logits = F.linear(x, weight) + shared_rows.offset  # (B·T, K + 1)
                loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
            # An unused target is one of the V - K tokens the shared entry stands for: log(V - K) more to predict it.
            valid = targets != IGNORE_INDEX
            per_target = shared_rows.offset[targets.clamp(min=0)] * valid  # (B·T,): log(V - K) or 0
            return None, loss + per_target.sum() / valid.sum()
        if targets is not None:
            if return_logits or x.device.type != "cpu" or not isinstance(self.lm_head, nn.Linear):
                # Plain logits: what return_logits asks for; on accelerators, where the (B·T, V) matmul in bf16
                # and a compiled cross-entropy beat the CPU-oriented chunked loss; and with a quantized LM head
                # (core.quantize), whose int8 weight only its own module can multiply.
                logits = self._logits(x)  # (B, T, V)
                loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=IGNORE_INDEX)
                return (logits if return_logits else None), loss
            # Fused LM head + cross-entropy, chunk by chunk: the (B·T, V) logits are never materialised.
            weight = self.lm_head.weight  # (padded V, C)
            if weight.size(0) != V:
                weight = weight[:V]  # a slice only when needed: its backward writes a zero-filled (padded V, C)
            loss = lm_head_cross_entropy(x.reshape(B * T, -1), weight, targets.reshape(B * T))
            return None, loss
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C): the only position sampling needs, skipping T-1 rows of the big LM head
        return self._logits(x), None  # (B, T or 1, V)

    def decoding_plan(self) -> DecodingPlan | None:
        """What :meth:`decode_one` needs, gathered once per generation, or None where that route does not apply:
        in training mode, off the CPU, without the studio's kernels (core.cpu_kernels), or with a layer or
        embedding the kernels cannot read (see :meth:`Linear.decoding_weights`)."""
        step = decoding_kernel("decode_step")
        wte, wpe = self.transformer.wte.weight, self.transformer.wpe.weight
        if step is None or self.training or wte.device.type != "cpu" or {wte.dtype, wpe.dtype} != {torch.float32}:
            return None
        blocks = self.transformer.h
        layers = [layer for b in blocks for layer in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]
        parts = [getattr(layer, "decoding_weights", lambda: None)() for layer in layers + [self.lm_head]]
        norms = [ln for b in blocks for ln in (b.ln_1, b.ln_2)] + [self.transformer.ln_f]
        if any(part is None for part in parts) or len({ln.eps for ln in norms}) != 1:
            return None
        weights, scales, biases, kinds = (list(column) for column in zip(*parts, strict=True))
        return DecodingPlan(
            step, [t for ln in norms for t in (ln.weight, ln.bias)], weights, scales, biases, kinds, norms[0].eps
        )

    def decode_one(self, plan: DecodingPlan, tokens: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        """Logits (B, vocab_size) of the next token after ``tokens`` (B,), the tokens at position ``pos``, whose
        keys and values are added to ``cache`` (fp32). The same arithmetic as ``forward`` on one position, in one
        call of the studio's kernel (core/cpu_kernels.cpp): layer by layer through modules, a token cost ~100
        small operations whose dispatch took as long as a 4-bit model's weights take to stream."""
        wte, wpe, n_head = self.transformer.wte.weight, self.transformer.wpe.weight, self.config.n_head
        linears = (plan.weights, plan.scales, plan.biases, plan.kinds)
        return plan.step(
            tokens, pos, wte, wpe, plan.norms, *linears, cache.k, cache.v, n_head, plan.eps, self.config.vocab_size
        )  # (B, vocab_size)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """LM head over the real vocabulary: (..., C) -> (..., vocab_size), padding rows dropped."""
        logits = self.lm_head(x)  # (..., padded V)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        return logits


@dataclass(frozen=True)
class Component:
    """One row of the parameter breakdown."""

    name: str
    """Human name, e.g. ``block 3 attention``."""
    group: str
    """Component kind: token_embedding, position_embedding, attention, mlp, layernorm, final_layernorm, lm_head."""
    block: int | None
    """Block index for per-block rows, else None."""
    params: int
    """Parameters counted here (0 for the tied LM head, whose weight is the token embedding's)."""
    note: str = ""
    """Free text, e.g. that a weight is shared."""


def parameter_breakdown(model: GPT) -> dict:
    """Totals and a per-component breakdown of ``model``'s parameters.

    Returns a dict with ``total_params`` and ``trainable_params`` (shared tensors counted once), ``size_mb`` (fp32
    bytes / 2**20, rounded to 2 decimals), ``components`` (per-kind totals across blocks) and ``blocks`` (one row per
    component per block). The tied LM head appears with 0 parameters and a note, never counted twice.
    """
    config = model.config
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)

    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    per_block: list[Component] = []
    for i, block in enumerate(model.transformer.h):
        per_block += [
            Component(f"block {i} attention", "attention", i, count(block.attn)),
            Component(f"block {i} mlp", "mlp", i, count(block.mlp)),
            Component(f"block {i} layernorms", "layernorm", i, count(block.ln_1) + count(block.ln_2)),
        ]

    def group_total(group: str) -> int:
        return sum(c.params for c in per_block if c.group == group)

    tied = model.lm_head.weight is model.transformer.wte.weight
    components = [
        Component("token embedding (wte)", "token_embedding", None, count(model.transformer.wte)),
        Component("position embedding (wpe)", "position_embedding", None, count(model.transformer.wpe)),
        Component(f"attention ({config.n_layer} blocks)", "attention", None, group_total("attention")),
        Component(f"mlp ({config.n_layer} blocks)", "mlp", None, group_total("mlp")),
        Component(f"layernorms ({config.n_layer} blocks)", "layernorm", None, group_total("layernorm")),
        Component("final layernorm (ln_f)", "final_layernorm", None, count(model.transformer.ln_f)),
        Component(
            "lm head",
            "lm_head",
            None,
            0 if tied else count(model.lm_head),
            "tied: shares the token embedding's weight" if tied else "untied",
        ),
    ]
    assert sum(c.params for c in components) == total, "breakdown must account for every parameter exactly once"

    def rows(items: list[Component]) -> list[dict]:
        return [
            {
                "name": c.name,
                "group": c.group,
                "block": c.block,
                "params": c.params,
                "share": c.params / total if total else 0.0,
                "size_mb": round(c.params * 4 / 2**20, 2),
                "note": c.note,
            }
            for c in items
        ]

    return {
        "config": config.to_dict(),
        "total_params": total,
        "trainable_params": trainable,
        "size_mb": round(total * 4 / 2**20, 2),
        "tied_lm_head": tied,
        "components": rows(components),
        "blocks": rows(per_block),
    }
