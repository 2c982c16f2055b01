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


IGNORE_INDEX = -1
"""Targets equal to this are left out of the loss (and of its mean)."""

LOSS_CHUNK_ELEMENTS = 2**25
"""Most logits per chunk of the fused LM head + cross-entropy (rows = this / vocab size: 667 rows of the GPT-2
vocabulary, a 128 MiB fp32 buffer, against 400 MiB for the full logits of 8 × 256 tokens). Measured on a 2-core
AVX2 CPU (N = 2048 rows, forward + backward): 32-row chunks take 1.5x as long as 512-row ones (the matmuls are
too thin), chunks past about 1,000 rows gain nothing."""

LOGITS_ROW_ALIGNMENT = 64
"""The logits buffer's rows start every this many floats (256 bytes). MKL writes a (rows, 50,257) product about
1.3x slower than one whose rows are 50,304 floats apart (measured on a 2-core AVX2 CPU: 198 ms against 145 ms for
667 × 384 × 50,257), so the logits go into an aligned buffer and the extra columns are masked out."""


def _loss_chunk_rows(vocab_size: int, chunk_rows: int | None, n_rows: int) -> int:
    """Rows per chunk: at most ``chunk_rows`` (default from LOSS_CHUNK_ELEMENTS), split evenly over ``n_rows`` so
    that no chunk is a thin remainder (2,048 rows at 667 per chunk become 4 × 512, not 3 × 667 + 47)."""
    most = max(1, LOSS_CHUNK_ELEMENTS // vocab_size) if chunk_rows is None else chunk_rows
    chunks = -(-n_rows // most)
    return max(1, -(-n_rows // chunks))


_SMALLEST_TRUSTED_P = 1e-30
"""Below this a softmax probability's log is computed from the row's top logit instead (fp32 denormals start at
1.2e-38 and lose digits)."""


def _softmax_in_place(z: torch.Tensor) -> torch.Tensor:
    """Row-wise softmax of z (n, V) written over z. The kernel works row by row, each row's passes in cache."""
    try:
        return torch.ops.aten._softmax.out(z, 1, False, out=z)
    except RuntimeError:  # a build that refuses the aliased output: one temporary (n, V) tensor
        return z.copy_(torch.softmax(z, dim=1))


@torch.no_grad()
def _lm_head_loss_and_grads(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None,
    grad_x: bool,
    grad_w: bool,
    offset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Mean cross-entropy of ``x @ weight.T (+ offset)`` against ``targets``, and its gradients w.r.t. ``x`` and
    ``weight``. ``offset`` (V,), a constant added to every row of logits, has no gradient.

    x: (N, C), weight: (V, C), targets: (N,) with IGNORE_INDEX rows left out. The logits are computed at most
    ``chunk_rows`` rows at a time into one reused buffer with aligned rows, and each chunk is turned into its
    softmax in place. A row's loss is -log p[target] (or, when p[target] is too small to trust, log-sum-exp from
    the row's top logit: z_top - log p_top, with p_top >= 1/V). Softmax minus the one-hot target, over the valid
    count, is the gradient of the logits, so two matmuls per chunk give grad_x and add to grad_w. The full (N, V)
    logits, their log-softmax and its gradient never exist, and the logits are touched only by the matmuls, the
    cache-friendly softmax kernel and a few gathers. Returns (loss (), grad_x (N, C) or None, grad_w (V, C) or
    None), the gradients being those of the mean loss.
    """
    with torch.autocast(x.device.type, enabled=False):  # fp32 throughout: the sums over V need it
        offset = None if offset is None else offset.float()
        return _loss_and_grads_fp32(x.float(), weight.float(), targets, chunk_rows, grad_x, grad_w, offset)


def _loss_and_grads_fp32(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None,
    grad_x: bool,
    grad_w: bool,
    offset: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    N, C = x.shape
    V = weight.size(0)
    keep = targets != IGNORE_INDEX  # (N,)
    n_valid = int(keep.sum())
    rows = None
    if n_valid < N:
        rows = keep.nonzero().squeeze(1)  # (n_valid,)
        x, targets = x[rows], targets[rows]  # (n_valid, C), (n_valid,)
    if n_valid == 0:  # like F.cross_entropy: the mean of nothing is NaN, and nothing has a gradient
        return (
            torch.full((), math.nan, dtype=x.dtype, device=x.device),
            torch.zeros(N, C, dtype=x.dtype, device=x.device) if grad_x else None,
            torch.zeros_like(weight) if grad_w else None,
        )
    chunk_rows = _loss_chunk_rows(V, chunk_rows, n_valid)
    row_stride = -(-V // LOGITS_ROW_ALIGNMENT) * LOGITS_ROW_ALIGNMENT
    # (chunk, row_stride), reused by every chunk; columns V.. are padding that the softmax must give probability 0
    buffer = torch.empty(chunk_rows, row_stride, dtype=x.dtype, device=x.device)
    loss_sum = torch.zeros((), dtype=x.dtype, device=x.device)
    gx = torch.empty_like(x) if grad_x else None  # (n_valid, C)
    gw = None  # (V, C), written by the first chunk's matmul, then accumulated
    for start in range(0, n_valid, chunk_rows):
        end = min(start + chunk_rows, n_valid)
        xc, tc = x[start:end], targets[start:end].unsqueeze(1)  # (n, C), (n, 1)
        rows_buffer = buffer[: end - start]  # (n, row_stride), contiguous
        z = torch.mm(xc, weight.t(), out=rows_buffer[:, :V])  # (n, V) logits, a view with aligned rows
        if offset is not None:
            z.add_(offset)  # (V,) broadcast over the rows
        rows_buffer[:, V:].fill_(-math.inf)  # padding: exp(-inf) = 0 (the previous chunk's softmax left zeros)
        target_logit = z.gather(1, tc)  # (n, 1)
        p = _softmax_in_place(rows_buffer)[:, :V]  # (n, V)
        p_target = p.gather(1, tc)  # (n, 1)
        nll = p_target.log().neg_()  # (n, 1): -log softmax at the target
        far = p_target < _SMALLEST_TRUSTED_P
        if bool(far.any()):  # rare: a target so unlikely that its probability lost precision or underflowed
            r = far.squeeze(1).nonzero().squeeze(1)  # (k,)
            p_top, top = p[r].max(dim=1)  # (k,), (k,): the most likely token's probability is >= 1/V
            z_top = (xc[r] * weight[top]).sum(dim=1)  # (k,) its logit, recomputed (z was overwritten)
            if offset is not None:
                z_top = z_top + offset[top]
            nll[r, 0] = z_top - p_top.log() - target_logit[r, 0]  # log-sum-exp minus the target's logit
        loss_sum += nll.sum()
        if not (grad_x or grad_w):
            continue
        p.scatter_add_(1, tc, torch.full_like(target_logit, -1.0))  # (n, V): n_valid · d(mean loss)/d(logits)
        if grad_x:
            torch.mm(p, weight, out=gx[start:end]).div_(n_valid)  # (n, C)
        if grad_w:
            xs = xc / n_valid  # (n, C)
            gw = torch.mm(p.t(), xs) if gw is None else gw.addmm_(p.t(), xs)  # (V, C)
    loss = loss_sum / n_valid
    if gx is not None and rows is not None:
        gx = torch.zeros(N, C, dtype=x.dtype, device=x.device).index_copy_(0, rows, gx)  # (N, C), 0 for ignored rows
    return loss, gx, gw


class _LMHeadCrossEntropy(torch.autograd.Function):
    """Fused LM head + mean cross-entropy. The gradients are computed during the forward pass, chunk by chunk (see
    :func:`_lm_head_loss_and_grads`), and only scaled by the incoming gradient in the backward pass."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_rows: int | None,
        offset: torch.Tensor | None,
    ) -> torch.Tensor:
        loss, gx, gw = _lm_head_loss_and_grads(
            x, weight, targets, chunk_rows, ctx.needs_input_grad[0], ctx.needs_input_grad[1], offset
        )
        ctx.grads = (gx, gw)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        gx, gw = ctx.grads
        del ctx.grads
        if not bool(grad_loss == 1):  # the usual loss.backward() passes exactly 1: no pass over the gradients
            gx = None if gx is None else gx * grad_loss
            gw = None if gw is None else gw * grad_loss
        return gx, gw, None, None, None


def lm_head_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the logits ``x @ weight.T (+ offset)`` against ``targets``, without materialising them.

    x: (N, C), weight: (V, C), targets: (N,) int64 where IGNORE_INDEX marks positions left out, offset: (V,) or
    None, a constant added to each row of logits. Equal (within fp32 rounding) to
    ``F.cross_entropy(x @ weight.T + offset, targets, ignore_index=IGNORE_INDEX)``, gradients included; memory holds
    one (chunk_rows, V) block of logits instead of (N, V) logits, log-probabilities and their gradient.
    """
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LMHeadCrossEntropy.apply(x, weight, targets, chunk_rows, offset)
    return _lm_head_loss_and_grads(x, weight, targets, chunk_rows, False, False, offset)[0]


SMALL_ROWS = 8
"""Up to this many rows (tokens in one forward), a CPU linear layer runs as ``weight @ x.T`` (see :class:`Linear`)."""


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, same results) with a faster route for decoding on the CPU.

    Decoding multiplies a few rows by each weight, which is bound by reading the weight from memory. For one row,
    ``F.linear`` becomes a matrix-vector product that MKL runs on one core at about half the memory bandwidth of
    the two-core machines this targets; ``weight @ x.T`` with at least two columns is a skinny matrix product that
    streams the weight on every core (measured here: 12-13 GB/s against 20-28 GB/s; ``pipelines.benchmark`` shows
    the end-to-end effect). One row is duplicated to make two columns: the arithmetic is free, the bytes are not.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.size(-1)
        if x.device.type != "cpu" or rows > SMALL_ROWS or rows == 0:
            return F.linear(x, self.weight, self.bias)
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
        elif T == 1:
            # One new query at the end attends to every cached position: no mask needed.
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


class SharedRows:
    """A training-time view of the vocabulary: the tokens a corpus uses keep rows of their own, every other token
    shares one row.

    A GPT whose unused tokens' embedding rows are all equal predicts each of them with the same probability, so its
    softmax over V tokens equals a softmax over the K used tokens plus one *shared* entry whose logit is that row's
    plus ``log(V - K)`` (it stands for V - K equal terms). Training through that K + 1 entry softmax is therefore
    exactly training the full model under the constraint "unused rows stay equal", with an LM head V / (K + 1) times
    cheaper (4.5x on Tiny Shakespeare: 11,234 of 50,257 tokens). The caller keeps the constraint true in the full
    weight (:meth:`tie_unused_rows`) before the model is used with the full vocabulary.

    ``used``: the sorted ids with rows of their own; ``shared``: the id whose row all other ids copy;
    ``vocab_size``: V. Tensors live on ``device``.
    """

    def __init__(self, used: torch.Tensor, vocab_size: int, device: torch.device | str | None = None) -> None:
        used = torch.unique(used.to(torch.long)).to(device)  # (K,) sorted
        if used.numel() == 0 or int(used[0]) < 0 or int(used[-1]) >= vocab_size:
            raise ValueError(f"used token ids must be a non-empty set within 0..{vocab_size - 1}")
        if used.numel() >= vocab_size:
            raise ValueError("every token is used: there is no row to share; train with the full vocabulary")
        is_used = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        is_used[used] = True
        self.unused = (~is_used).nonzero().squeeze(1)  # (V - K,)
        self.shared = int(self.unused[0])
        self.rows = torch.cat([used, self.unused[:1]])  # (K + 1,): the weight rows the loss reads
        # Full id -> index among `rows`; every unused id maps to the shared entry, the last one.
        self.index = torch.full((vocab_size,), used.numel(), dtype=torch.long, device=device)
        self.index[used] = torch.arange(used.numel(), device=device)
        self.offset = torch.zeros(used.numel() + 1, device=device)  # (K + 1,)
        self.offset[-1] = math.log(self.unused.numel())
        self.vocab_size = vocab_size

    @torch.no_grad()
    def tie_unused_rows(self, weight: torch.Tensor) -> None:
        """Copy the shared row over every unused token's row of ``weight`` (V or padded V, C), in place."""
        weight[self.unused] = weight[self.shared].clone()

    @torch.no_grad()
    def expand_into(self, token_rows: torch.Tensor, weight: torch.Tensor) -> None:
        """Write compact ``token_rows`` (K + 1, C) into the full ``weight`` (V or padded V, C): each used token's
        row, and the shared row into every unused token's row."""
        weight[self.rows[:-1]] = token_rows[:-1]
        weight[self.unused] = token_rows[-1]


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
