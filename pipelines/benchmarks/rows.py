"""Benchmark rows: the studio's figure against a reference measured in the same run, and the machine they ran on."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Row:
    """One benchmark result: the studio's figure, the reference's, and how they compare."""

    name: str
    """Stable identifier, e.g. ``log_overhead``."""
    ours: float
    """The studio's median."""
    reference: float
    """The reference's median, measured in the same run."""
    unit: str
    """Unit of ``ours`` and ``reference``."""
    ratio: float
    """Above 1 means the studio is better (see the module docstring)."""
    note: str = ""
    """What was measured, in a few words."""

    def to_dict(self) -> dict:
        return asdict(self)


def machine_description() -> str:
    """The CPU model, core count, torch threads and versions: where a table's figures were measured."""
    import platform

    from core.device import cpu_name

    return (
        f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def higher_is_better(name: str, ours: float, reference: float, unit: str, note: str = "") -> Row:
    """A throughput row: ratio = ours / reference."""
    return Row(name, ours, reference, unit, ours / reference if reference else math.inf, note)


def lower_is_better(name: str, ours: float, reference: float, unit: str, note: str = "") -> Row:
    """A cost row: ratio = reference / ours."""
    return Row(name, ours, reference, unit, reference / ours if ours else math.inf, note)


BENCH_SEED = 1234
SAMPLING = {"temperature": 0.8, "top_k": 200}
"""Sampling settings of the generation rows, the same on both sides."""
