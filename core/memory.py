"""Running out of memory as a one-line, actionable error instead of an allocator traceback.

PyTorch reports a failed allocation as a ``RuntimeError`` (``torch.OutOfMemoryError`` on CUDA) whose message is
the allocator's, many lines long on CUDA, and says nothing about which setting to change. :func:`friendly_oom`
wraps the code that allocates per request (a training step, a generation batch) and turns exactly those errors
into :class:`NotEnoughMemory`, a :class:`~core.errors.UsageError` whose message ends with the caller's hint (a
smaller ``--batch-size``, fewer samples), so every front end shows it as one line. Any other error passes through.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from core.errors import UsageError

OOM_MARKERS = (
    "not enough memory",  # DefaultCPUAllocator: not enough memory: you tried to allocate ...
    "can't allocate memory",  # DefaultCPUAllocator: can't allocate memory: you tried to allocate ...
    "out of memory",  # CUDA out of memory. Tried to allocate ...; MPS backend out of memory ...
)
"""Fragments (compared lower-case) of the allocators' messages that mean an allocation failed."""

TRAINING_OOM_HINT = "use a smaller --batch-size (or --block-size)"
"""What to change when a training step does not fit."""

GENERATION_OOM_HINT = "ask for fewer samples at once (num_samples)"
"""What to change when a generation batch does not fit: its memory grows with the number of samples."""

_ASKED = re.compile(r"tried to allocate ([0-9][0-9.,]*\s*(?:[KMGT]i?B|bytes))", re.IGNORECASE)


class NotEnoughMemory(UsageError):
    """An allocation failed: the request is too large for the device's free memory."""


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocator's out-of-memory error (not any other ``RuntimeError``)."""
    if isinstance(exc, MemoryError):  # Python's own (e.g. numpy) allocation failures
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return any(marker in text for marker in OOM_MARKERS)


def describe_out_of_memory(exc: BaseException, hint: str) -> str:
    """One line: that memory ran out, how much was asked for when the allocator says so, and ``hint``."""
    asked = _ASKED.search(str(exc))
    size = f" (an allocation of {_readable(asked.group(1))} failed)" if asked else ""
    return f"not enough memory on the device{size}; {hint}"


def _readable(amount: str) -> str:
    """``68719476736 bytes`` as ``64.0 GiB``; sizes the allocator already gave in units stay as they are."""
    number, _, unit = amount.partition(" ")
    if unit.lower() != "bytes" or not number.isdigit():
        return amount
    value, name = float(number), "bytes"
    for bigger in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024:
            break
        value, name = value / 1024, bigger
    return f"{value:.0f} bytes" if name == "bytes" else f"{value:.1f} {name}"


@contextmanager
def friendly_oom(hint: str) -> Iterator[None]:
    """Inside the block, an out-of-memory error becomes :class:`NotEnoughMemory` with ``hint``; others pass.

    Usage: ``with friendly_oom(TRAINING_OOM_HINT): <one training step>``.
    """
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        # from None: the allocator's multi-line report (and its traceback) is noise for the user; the size asked for
        # is kept in the message.
        raise NotEnoughMemory(describe_out_of_memory(exc, hint)) from None
