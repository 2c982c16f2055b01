"""Choosing the compute device, and what is known about it: peak FLOP/s for MFU, and torch.compile's needs."""

from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import time

import torch

from core.errors import UsageError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")

PEAK_BF16_FLOPS: tuple[tuple[tuple[str, ...], float], ...] = (
    (("h100", "pcie"), 756e12),
    (("h100",), 989e12),  # any other H100 (e.g. "NVIDIA H100 80GB HBM3") is taken for the SXM part
    (("h200",), 989e12),
    (("a100",), 312e12),
    (("l4",), 121e12),
    (("a10",), 125e12),
    (("rtx", "4090"), 165e12),
)
"""Dense (no sparsity) bf16 tensor-core peaks in FLOP/s from the vendors' datasheets, keyed by the words that must
all appear in ``torch.cuda.get_device_name``. Checked in order, so a family's more specific entry comes first."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; a named device must be available or :class:`UsageError` is raised."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise UsageError(f"unknown device {name!r}; choose one of: {', '.join(DEVICE_CHOICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UsageError("device 'mps' was asked for but MPS is not available; use --device cpu or auto")
    return torch.device(name)


def peak_flops_for_name(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s of a CUDA device called ``device_name`` (case-insensitive), or None if unknown.

    Names are compared word by word, not as raw substrings, so that "L4" does not claim an "L40S" nor "A10" an
    "A100" or "A10G", which have other peaks: an unlisted GPU gets no MFU rather than a wrong one.
    """
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    for required, flops in PEAK_BF16_FLOPS:
        if words.issuperset(required):
            return flops
    return None


def peak_flops(device: str | torch.device) -> float | None:
    """The peak dense bf16 FLOP/s of ``device`` when it is a CUDA GPU in :data:`PEAK_BF16_FLOPS`, else None.

    CPUs and MPS have no entry: their peaks depend on the exact chip, clocks and core count, so MFU there needs an
    explicit figure (``TrainConfig.peak_tflops``).
    """
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` says of the processor."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            name = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), name)
    except OSError:  # not Linux: keep platform's answer
        pass
    return name


def cpp_compiler() -> str | None:
    """Path of the C++ compiler torch.compile's CPU backend (Inductor) would run: ``$CXX``, else g++ (clang++ on
    macOS), or None when it is not installed."""
    return shutil.which(os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++"))


PROBE_SIZE = 512
"""Side of the square matmul :func:`matmul_gflops` times (a few milliseconds in fp32 on a laptop core)."""


@functools.cache
def matmul_gflops(dtype: torch.dtype, size: int = PROBE_SIZE) -> float:
    """GFLOP/s of a ``size``³ matmul in ``dtype`` on this CPU, measured now (best of a few runs after a warm-up).

    CPUs differ by hundreds of times in half precision: one with AVX-512 BF16 units ran bf16 2.6x faster than fp32,
    one with AVX2 only ran it about 500x slower. Measured once per process.
    """
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, kernel selection
    best = float("inf")
    deadline = time.perf_counter() + 0.5  # a CPU without the units is slow: stop early, the answer is clear
    for _ in range(5):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
        if time.perf_counter() > deadline:
            break
    return 2 * size**3 / best / 1e9
