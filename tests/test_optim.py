"""Training precision: bf16 where this machine measures it fast (CUDA, a CPU with bf16 units), fp32 elsewhere, and a
bf16 request the CPU would run slower refused with the figures."""

from __future__ import annotations

import pytest
import torch

from core import device as device_module
from core.errors import UsageError
from core.optim import autocast_for, training_precision

CPU = torch.device("cpu")


def measured(monkeypatch, bf16: float, fp32: float) -> None:
    monkeypatch.setattr(
        device_module, "matmul_gflops", lambda dtype, size=512: bf16 if dtype == torch.bfloat16 else fp32
    )


def test_a_cpu_trains_in_bf16_when_asked_and_only_where_bf16_measures_no_slower(monkeypatch):
    measured(monkeypatch, bf16=380.0, fp32=144.0)  # AVX-512 BF16, as measured on one machine of this kind
    assert training_precision("bf16", CPU) == "bf16"
    assert training_precision("auto", CPU) == "fp32"  # a CPU step is mostly the fp32 LM-head loss: asked for only
    measured(monkeypatch, bf16=0.3, fp32=144.0)  # AVX2 only: hundreds of times slower
    assert training_precision("auto", CPU) == "fp32"
    with pytest.raises(UsageError, match="bf16 matmuls run at 0 GFLOP/s against 144 for fp32"):
        training_precision("bf16", CPU)
    assert training_precision("fp32", CPU) == "fp32"


def test_other_devices():
    assert training_precision("auto", torch.device("cuda")) == "bf16"
    assert training_precision("fp32", torch.device("cuda")) == "fp32"
    assert training_precision("auto", torch.device("mps")) == "fp32"
    with pytest.raises(UsageError, match="not mps"):
        training_precision("bf16", torch.device("mps"))


def test_autocast_follows_the_precision():
    with autocast_for(CPU, "bf16"):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.bfloat16
    with autocast_for(CPU, "fp32"):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32
    with autocast_for(CPU):
        assert (torch.ones(4, 4) @ torch.ones(4, 4)).dtype == torch.float32


def test_the_probe_measures_each_dtype_on_this_machine():
    device_module.matmul_gflops.cache_clear()
    assert device_module.matmul_gflops(torch.float32, size=64) > 0
    assert device_module.matmul_gflops(torch.bfloat16, size=64) > 0
