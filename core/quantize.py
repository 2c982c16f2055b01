"""Lower-precision copies of a trained model for faster generation on the CPU: int8, int4, bf16 and f16 weights.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth: an fp32 gpt2 reads about
500 MB per token. Fewer bytes per weight is more tokens per second. Each precision stores the linear layers'
weights (the LM head included, as its own copy of the tied embedding) in a :class:`CompactLinear`, and activations
stay fp32:

- ``int8``: one scale per output row, symmetric (Q8_0 has one per 32 weights): a quarter of the bytes.
- ``int4``: Q4_0's blocks, 32 weights sharing one scale: about a seventh of the bytes.
- ``bf16`` / ``f16``: half the bytes; the weights are widened to fp32 in registers, so no half-precision
  arithmetic units are needed.

A decoding step runs the studio's kernels (:mod:`core.cpu_kernels`, built for the machine on first use); without
them int8 falls back to PyTorch's weight-only int8 kernel and the other precisions are refused (widening a whole
layer per token would be slower than fp32). Which precision is fastest, at what cost in held-out loss, depends on
the machine: :mod:`core.precision` measures both, and ``--quantize auto`` picks from those measurements.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.cpu_kernels import KINDS, MAX_ROWS
from core.errors import UsageError
from core.huge_pages import move_to_huge_pages
from core.model import GPT, decoding_kernel

PRECISIONS = ("fp32", "bf16", "f16", "int8", "int4")
"""Every weight precision a model can generate in (fp32 is the trained model itself)."""

HALF_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}
INT4_GROUP = 32
"""Weights per int4 scale (Q4_0's block size): rows must be a multiple of this long."""


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes (out, in) and one fp32 scale per row (out,): each row's largest magnitude maps to ±127."""
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8), scales.contiguous()


def _q4_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0's 4-bit blocks: per 32 weights one fp32 scale d (the block's largest-magnitude weight is -8·d) and codes
    0..15 standing for (code - 8)·d; byte j of a block holds weight j (low nibble) and weight j + 16 (high).
    Returns (packed (out, in/2) uint8, scales (out, in/32) fp32)."""
    out_features, in_features = weight.shape
    blocks = weight.reshape(out_features, -1, INT4_GROUP)  # (out, in/32, 32)
    extreme = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))  # (out, in/32, 1), signed
    scales = extreme / -8
    inverse = torch.where(scales == 0, torch.zeros_like(scales), 1 / scales)
    codes = torch.trunc(blocks * inverse + 8.5).clamp(0, 15).to(torch.uint8)  # (out, in/32, 32)
    packed = codes[..., :16] | (codes[..., 16:] << 4)  # (out, in/32, 16)
    return packed.reshape(out_features, in_features // 2).contiguous(), scales.squeeze(-1).contiguous()


def _q4_dequantize(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    out_features = packed.size(0)
    blocks = packed.reshape(out_features, -1, 16)
    codes = torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).float() - 8  # (out, in/32, 32)
    return (codes * scales.unsqueeze(-1)).reshape(out_features, -1)


def q8_blocks(x: torch.Tensor) -> torch.Tensor:
    """``x`` (n, in) rounded as the int8 and 4-bit decoding kernels round activations where they use integer dot
    products (llama.cpp's Q8_0: per block of 32 values, int8 codes with the block's largest magnitude at 127)."""
    blocks = x.reshape(x.size(0), -1, INT4_GROUP)
    scales = blocks.abs().amax(dim=-1, keepdim=True) / 127
    codes = torch.round(blocks / torch.where(scales == 0, torch.ones_like(scales), scales))
    return (codes * scales).reshape_as(x)


def kernels_round_activations() -> bool:
    """Whether the loaded kernels round int8 and 4-bit layers' activations (built with integer dot products:
    AVX-VNNI), as :func:`q8_blocks` does."""
    op = decoding_kernel("rounds_activations")
    return op is not None and bool(op())


class CompactLinear(nn.Module):
    """A linear layer whose weight is stored in fewer bytes (``kind``: f16, bf16, int8 or q4), fp32 in and out.

    A decoding step (up to :data:`core.cpu_kernels.MAX_ROWS` rows) runs the studio's kernel, which widens each
    weight in registers as it streams; without the kernels, or for more rows (a prompt, an evaluation batch), the
    weight is widened to fp32 for one ordinary product. int8: one scale per output row (symmetric, ±127); q4: Q4_0's
    blocks of 32 (see :func:`_q4_blocks`).
    """

    def __init__(self, linear: nn.Linear, kind: str):
        super().__init__()
        weight = linear.weight.detach().float()  # (out, in)
        self.in_features, self.out_features, self.kind = linear.in_features, linear.out_features, kind
        scales = None
        if kind in HALF_DTYPES:
            stored = weight.to(HALF_DTYPES[kind]).contiguous()
        elif kind == "int8":
            stored, scales = _int8_rows(weight)
        elif kind == "q4":
            if self.in_features % INT4_GROUP:
                raise UsageError(
                    f"int4 stores weights in blocks of {INT4_GROUP}, and a layer has {self.in_features} inputs, "
                    f"not a multiple of {INT4_GROUP}; use int8"
                )
            stored, scales = _q4_blocks(weight)
        else:
            raise ValueError(f"unknown compact weight kind {kind!r}")
        self.register_buffer("weight", stored)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self._kind_code = KINDS[kind]

    def dequantized(self) -> torch.Tensor:
        """The weight as fp32 (out, in): what the stored codes stand for."""
        if self.kind == "int8":
            return self.weight.float() * self.scales[:, None]
        if self.kind == "q4":
            return _q4_dequantize(self.weight, self.scales)
        return self.weight.float()

    def decoding_weights(self) -> tuple:
        """(weight, scales, bias, kind) as the decoding kernels read this layer (see core.model.Linear)."""
        return self.weight, self.scales, self.bias, self._kind_code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (n, in)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        kernel = decoding_kernel() if x2.size(0) <= MAX_ROWS else None
        if kernel is not None:
            y = kernel(x2, self.weight, self.scales, self.bias, self._kind_code)  # (n, out)
        elif x2.size(0) <= MAX_ROWS and self.kind == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)  # PyTorch's weight-only int8 kernel
            y = y if self.bias is None else y.add_(self.bias)
        else:
            if self.kind in ("q4", "int8") and self.in_features % INT4_GROUP == 0 and kernels_round_activations():
                x2 = q8_blocks(x2)  # what the decoding kernel multiplies: held-out losses measure the same products
            y = F.linear(x2, self.dequantized(), self.bias)
        return y.view(*x.shape[:-1], self.out_features)


COMPACT_KIND = {"int8": "int8", "int4": "q4", "bf16": "bf16", "f16": "f16"}
"""The :class:`CompactLinear` layout of each precision."""


def _check_cpu(model: GPT, precision: str) -> None:
    if model.transformer.wte.weight.device.type != "cpu":
        raise UsageError(f"{precision} generation runs on the CPU only; use --device cpu")


def _inference_copy(model: GPT) -> GPT:
    copied = copy.deepcopy(model).float().eval()
    for parameter in copied.parameters():
        parameter.requires_grad_(False)
    return copied


def quantize(model: GPT, precision: str) -> GPT:
    """A copy of ``model`` for CPU inference at ``precision`` (one of :data:`PRECISIONS`; ``fp32`` gives ``model``
    itself).

    ``model`` is left unchanged (it may be a cached, shared instance). The copy generates and evaluates like the
    original (logits of the real vocabulary, the same ``forward``), but it cannot be trained or saved. Raises
    :class:`~core.errors.UsageError` for an unknown precision, a model not on the CPU, a layer int4 cannot group,
    or a precision other than int8 when the decoding kernels cannot be built here.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return model
    _check_cpu(model, precision)
    from core.cpu_kernels import load

    built, why = load()  # the decoding kernels, built once per machine
    if not built and precision != "int8":
        raise UsageError(f"{precision} decoding needs the studio's CPU kernels, and {why}; use int8 or fp32")
    kind = COMPACT_KIND[precision]
    copied = _inference_copy(model)
    linears = [(name, module) for name, module in copied.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in linears:
        parent_name, _, attribute = name.rpartition(".")
        parent = copied.get_submodule(parent_name) if parent_name else copied
        setattr(parent, attribute, CompactLinear(linear, kind))
    move_to_huge_pages(copied)  # the copy is made to decode: its weights stream faster from huge pages
    return copied


def quantize_int8(model: GPT) -> GPT:
    """:func:`quantize` at int8."""
    return quantize(model, "int8")
