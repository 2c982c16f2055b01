"""The studio's decoding kernels (core/cpu_kernels.cpp), built for this CPU on first use and cached.

:func:`load` compiles the C++ source with the machine's own vector instructions through
``torch.utils.cpp_extension`` (a C++ compiler is needed: g++ or clang++, as for torch.compile) into torch's extension
cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), and registers the ``torch.ops.studio``
operators: ``decode_step`` (a whole decoded token, :meth:`core.model.GPT.decode_one`), ``linear_small`` (a few-row
product per weight layout), ``top_k`` and ``rounds_activations``. The first build takes 15-30 s; later processes
load the cached library in milliseconds. Without a compiler, or when the build fails, :func:`load` says why and
decoding keeps PyTorch's own products (slower, the same results within rounding).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
from pathlib import Path

import torch

from core.device import cpp_compiler

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
KINDS = {"fp32": 0, "f16": 1, "bf16": 2, "int8": 3, "q4": 4}
"""The weight layouts ``linear_small`` reads (its ``kind`` argument)."""
MAX_ROWS = 8
"""Most rows of x one call takes (a decoding step of up to 8 samples)."""
DISABLE_ENV = "STUDIO_NO_CPU_KERNELS"
"""Set to 1 to decode with PyTorch's own products only (for comparison)."""


@functools.lru_cache(maxsize=1)
def build_stamp() -> str:
    """One build per source file (its place and content), CPU capability and torch: two checkouts, or a home folder
    shared by different machines, never rebuild each other's library, and figures measured with the kernels
    (core.precision) name the build they were measured with."""
    parts = str(SOURCE).encode() + SOURCE.read_bytes()
    parts += torch.backends.cpu.get_cpu_capability().encode() + torch.__version__.encode()
    return hashlib.sha256(parts).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def load() -> tuple[bool, str]:
    """Build (once per machine and source) and load the kernels; (True, where from) or (False, why not)."""
    if os.environ.get(DISABLE_ENV) == "1":
        return False, f"{DISABLE_ENV}=1"
    if hasattr(torch.ops, "studio") and hasattr(torch.ops.studio, "linear_small"):
        return True, "already loaded"
    if cpp_compiler() is None:
        return False, "no C++ compiler (install g++ to build the studio's decoding kernels)"
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:
        try:  # the ninja package from PyPI (requirements.txt) keeps its binary beside the venv's Python
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            return False, "ninja is not installed (pip install ninja) to build the studio's decoding kernels"

    try:
        cpp_extension.load(
            name=f"studio_cpu_kernels_{build_stamp()}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
    except (RuntimeError, OSError, ImportError) as exc:  # a failed build: say why, decode without the kernels
        return False, f"the decoding kernels did not build: {str(exc).strip().splitlines()[-1][:200]}"
    return True, "built for this CPU"
