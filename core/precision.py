"""Which precision a model should generate in on this machine, decided by measurement.

:func:`measure_precisions` times batch-1 decoding of every precision of :mod:`core.quantize` that this CPU can run
and measures each one's held-out loss; :func:`choose_precision` picks the fastest whose loss stays within
:data:`LOSS_TOLERANCE` of fp32's. Nothing is assumed about the CPU: a precision it cannot run is measured as
unusable with its reason (e.g. no C++ compiler for the kernels it needs), not guessed. A registered version keeps
its measurements as the ``precision_auto`` tag, per machine and kernel build, so ``--quantize auto`` measures once
per version and machine.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from core.config import SampleConfig
from core.errors import UsageError
from core.evaluation import mean_loss
from core.model import GPT
from core.quantize import PRECISIONS, quantize

LOSS_TOLERANCE = 0.01
"""``auto`` keeps a precision whose held-out loss is at most this much (relative) above fp32's."""
PRECISION_TAG = "precision_auto"
"""Registry tag of a version: :func:`measure_precisions`'s figures and choice on one machine, as JSON."""
PROBE_TOKENS = 32
PROBE_EVAL_SHAPE = (4, 256)
PROBE_EVAL_BATCHES = 2


@dataclass(frozen=True)
class PrecisionMeasurement:
    """One precision of one model on this machine."""

    precision: str
    """One of :data:`core.quantize.PRECISIONS`."""
    tokens_per_sec: float | None
    """Batch-1 decoding speed, or None when the precision cannot run here."""
    val_loss: float | None
    """Mean held-out loss per token on the probe's batches, or None when it cannot run here."""
    note: str = ""
    """Why it cannot run here, when it cannot."""


def machine_fingerprint() -> str:
    """What decides the figures: CPU model, its vector capability, torch threads and version, and the build of the
    decoding kernels (a new version of them is measured again)."""
    from core.cpu_kernels import build_stamp
    from core.device import cpu_name

    capability = torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    return f"{cpu_name()} | {capability} | {threads} threads | torch {torch.__version__} | kernels {build_stamp()}"


def decode_speed(model: GPT, prompt_ids: list[int], new_tokens: int = PROBE_TOKENS) -> float:
    """Tokens/s of batch-1 sampling (top-k 200, fixed seed, no early stop) after a short warm-up."""
    from core.sampling import stream_tokens

    config = SampleConfig(max_new_tokens=new_tokens, num_samples=1, seed=0, stop_at_eot=False, top_k=200)
    warm = SampleConfig(max_new_tokens=4, num_samples=1, seed=0, stop_at_eot=False, top_k=200)
    for _ in stream_tokens(model, prompt_ids, warm):
        pass
    started = time.perf_counter()
    count = sum(1 for _ in stream_tokens(model, prompt_ids, config))
    return count / (time.perf_counter() - started)


def measure_precisions(
    model: GPT,
    val_tokens: np.ndarray,
    *,
    precisions: tuple[str, ...] = PRECISIONS,
    new_tokens: int = PROBE_TOKENS,
    eval_batches: int = PROBE_EVAL_BATCHES,
) -> list[PrecisionMeasurement]:
    """Speed and held-out loss of ``model`` (fp32, CPU) at each of ``precisions`` on this machine.

    The loss is over the first ``eval_batches`` sequential batches of ``val_tokens`` (held-out text), the same for
    every precision. A precision this machine cannot run gets a measurement with its reason and no figures.
    """
    B, T = PROBE_EVAL_SHAPE[0], min(PROBE_EVAL_SHAPE[1], model.config.block_size)
    batches = max(1, min(eval_batches, (len(val_tokens) - 1) // (B * T)))
    prompt_ids = [int(t) for t in val_tokens[:16]]
    measured = []
    for precision in precisions:
        try:
            variant = quantize(model, precision)
        except UsageError as exc:
            measured.append(PrecisionMeasurement(precision, None, None, str(exc)))
            continue
        loss = mean_loss(variant, val_tokens, B, T, max_batches=batches)
        measured.append(PrecisionMeasurement(precision, decode_speed(variant, prompt_ids, new_tokens), loss))
        del variant
    return measured


def choose_precision(measured: list[PrecisionMeasurement], tolerance: float = LOSS_TOLERANCE) -> str:
    """The fastest measured precision whose loss is within ``tolerance`` (relative) of fp32's; fp32 when nothing
    else qualifies. ``measured`` must include fp32."""
    reference = next((m for m in measured if m.precision == "fp32" and m.val_loss is not None), None)
    if reference is None:
        raise ValueError("choose_precision needs the fp32 measurement as its reference")
    ceiling = reference.val_loss * (1 + tolerance)
    eligible = [
        m for m in measured if m.tokens_per_sec is not None and m.val_loss is not None and m.val_loss <= ceiling
    ]
    return max(eligible, key=lambda m: m.tokens_per_sec).precision


def describe(measured: list[PrecisionMeasurement], chosen: str) -> str:
    """One line per precision: speed, loss change against fp32, and which one was chosen."""
    reference = next(m.val_loss for m in measured if m.precision == "fp32")
    lines = []
    for m in measured:
        if m.tokens_per_sec is None:
            lines.append(f"  {m.precision:<5} not usable here: {m.note}")
            continue
        change = 100 * (m.val_loss - reference) / reference
        mark = "  <- chosen" if m.precision == chosen else ""
        lines.append(f"  {m.precision:<5} {m.tokens_per_sec:7.1f} tokens/s, held-out loss {change:+.2f}% vs fp32{mark}")
    return "\n".join(lines)


def stored_choice(tags: dict[str, str]) -> tuple[str, list[PrecisionMeasurement]] | None:
    """The choice and measurements a version's tags hold for this machine, or None when they hold none for it (a
    tag that cannot be read counts as none: it is measured again and replaced)."""
    raw = tags.get(PRECISION_TAG)
    if not raw:
        return None
    try:
        document = json.loads(raw)
        if document.get("machine") != machine_fingerprint():
            return None
        return document["choice"], [PrecisionMeasurement(**m) for m in document["measurements"]]
    except (ValueError, KeyError, TypeError):
        return None


def choice_tag(chosen: str, measured: list[PrecisionMeasurement]) -> str:
    """The ``precision_auto`` tag value for this machine (MLflow tag values hold up to 8,000 characters)."""
    document = {"machine": machine_fingerprint(), "choice": chosen, "measurements": [asdict(m) for m in measured]}
    return json.dumps(document, separators=(",", ":"))
