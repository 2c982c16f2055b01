"""The LM head's loss, computed without materialising the logits of a whole batch, and the shared rows of tokens a
corpus never uses.

:func:`lm_head_cross_entropy` is an autograd function: it walks the (B·T, V) logits in row chunks, turning each into
its loss and its gradient at once, so the memory a step needs grows with a chunk, not with the batch. With
:class:`SharedRows` the head covers only the tokens the training split uses plus one row they all share, offset so
that the loss is the full softmax's (the same GPT-2, a fraction of the head's work).
"""

from __future__ import annotations

import math

import torch

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
