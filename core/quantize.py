"""Int8 dynamic quantization of a trained model, for faster generation on the CPU.

Decoding one token reads every weight once, so on a CPU it is bound by memory bandwidth: an fp32 gpt2 reads about
500 MB per token. :func:`quantize_int8` stores the linear layers' weights as int8 (a quarter of the bytes) with one
scale per output channel, and quantizes each call's activations on the fly (PyTorch's dynamic quantization, run by
its x86/fbgemm or ARM/qnnpack int8 kernels). ``python -m pipelines.benchmark --only int8 --model NAME`` measures the
speed-up and the validation-loss change of a registered model.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

from core.errors import UsageError
from core.model import GPT


def _dynamic_quantization():
    """torch's dynamic quantized Linear module, or a one-line error saying what is missing."""
    engines = [engine for engine in torch.backends.quantized.supported_engines if engine != "none"]
    try:
        import torch.ao.nn.quantized.dynamic as dynamic
    except ImportError as exc:
        raise UsageError(
            f"int8 quantization needs torch's dynamic quantization (torch.ao.nn.quantized.dynamic), which torch "
            f"{torch.__version__} lacks; generate in fp32 (leave out --quantize)"
        ) from exc
    if not engines:
        raise UsageError(
            f"this torch build ({torch.__version__}) has no int8 CPU kernels; generate in fp32 (leave out --quantize)"
        )
    return dynamic


def _int8_linear(linear: nn.Linear, dynamic) -> nn.Module:
    """An int8 copy of ``linear``: symmetric per-output-channel weights (zero point 0, as the int8 kernels
    require), fp32 bias, activations quantized per call."""
    weight = linear.weight.detach().float()  # (out, in)
    scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,): each row's largest weight maps to ±127
    with warnings.catch_warnings():
        # torch marks its quantized tensor types as deprecated in favour of torchao; they still work here, and
        # the user asked for exactly this, so the warning would only be noise.
        warnings.filterwarnings("ignore", message=".*deprecated.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        quantized = dynamic.Linear(linear.in_features, linear.out_features, bias_=linear.bias is not None)
        weight_int8 = torch.quantize_per_channel(
            weight, scales.double(), torch.zeros(len(scales), dtype=torch.int64), 0, torch.qint8
        )
        quantized.set_weight_bias(weight_int8, None if linear.bias is None else linear.bias.detach().float())
    return quantized


def quantize_int8(model: GPT) -> GPT:
    """A copy of ``model`` for CPU inference whose linear layers (attention, MLP and the LM head) hold int8 weights.

    ``model`` itself is left unchanged (it may be a cached, shared instance). The token and position embeddings
    and the LayerNorms stay fp32; the LM head, tied to the token embedding in ``model``, gets its own int8 copy of
    that weight. The copy generates and evaluates like the original (logits of the real vocabulary, the same
    ``forward``), but it cannot be trained or saved. Raises :class:`~core.errors.UsageError` for a model that is
    not on the CPU or a torch without int8 kernels.
    """
    if model.transformer.wte.weight.device.type != "cpu":
        raise UsageError("int8 quantization runs on the CPU only; use --device cpu")
    dynamic = _dynamic_quantization()
    quantized = copy.deepcopy(model).float().eval()
    linears = [(name, module) for name, module in quantized.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in linears:
        parent_name, _, attribute = name.rpartition(".")
        parent = quantized.get_submodule(parent_name) if parent_name else quantized
        setattr(parent, attribute, _int8_linear(linear, dynamic))
    for parameter in quantized.parameters():
        parameter.requires_grad_(False)
    return quantized
