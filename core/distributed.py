"""Multi-process training on PyTorch's own engine: ``torchrun`` starts the processes, DDP averages the gradients.

``torchrun --nproc_per_node=N -m pipelines.train ...`` (or ``python -m torch.distributed.run``) starts N copies of
the trainer with ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE`` and the rendezvous address in their environment;
multi-node jobs use torchrun's usual ``--nnodes``/``--rdzv-*`` flags, nothing here changes. :func:`init_distributed`
reads that environment and joins the process group: gloo on the CPU, NCCL on CUDA (each process on the GPU of its
local rank). Without torchrun (no ``WORLD_SIZE``, or 1) it returns the single-process context and starts nothing.

The collectives here move plain numbers and UTF-8 text in tensors, never pickled objects (``broadcast_object_list``
would unpickle whatever rank 0 sent).
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.device import resolve_device
from core.errors import UsageError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) training job."""

    rank: int = 0
    """This process's global rank; rank 0 alone logs, writes checkpoints and registers the model."""
    world_size: int = 1
    """Number of training processes in the job."""
    local_rank: int = 0
    """Rank on this machine (picks the GPU on CUDA)."""
    device: torch.device | None = None
    """The device this process trains on (None: the single-process trainer resolves it itself)."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"local_rank must be non-negative, got {self.local_rank}")

    @property
    def enabled(self) -> bool:
        """True when there is more than one process (and so a process group to talk to)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0


SINGLE = DistContext()
"""The context of an ordinary one-process training."""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"${name} must be an integer (torchrun sets it), got {value!r}") from None


def init_distributed(device_name: str = "auto") -> DistContext:
    """Join the torchrun job this process belongs to, or return :data:`SINGLE` when there is none.

    ``device_name`` is the trainer's ``--device``: ``cpu`` trains with the gloo backend, ``cuda`` (or ``auto`` on a
    CUDA machine) with NCCL, one GPU per local rank. MPS has no multi-process backend and is refused, as is a
    CUDA job with more processes on a machine than it has GPUs.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return SINGLE
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_name)
    if device.type == "mps":
        raise UsageError("multi-process training does not run on MPS; use --device cpu (gloo) or a CUDA machine")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UsageError(
                f"local rank {local_rank} has no GPU: this machine has {count}; use --nproc_per_node={count} or fewer"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown(context: DistContext, *, synchronize: bool = True) -> None:
    """Leave the process group (if this process joined one).

    With ``synchronize`` (after a normal end) every rank first waits for the others at a barrier, so no rank tears
    down its side of the group while rank 0 is still registering the model; after an error there is no barrier, as
    the other ranks may never get there (torchrun stops them). Objects still holding the group (the DDP wrapper of
    a trainer caught in a reference cycle) are collected before it is destroyed: destroyed later, at interpreter
    exit, they abort the process.
    """
    if not (context.enabled and dist.is_initialized()):
        return
    if synchronize:
        dist.barrier()
    gc.collect()
    dist.destroy_process_group()


def all_reduce_sum(values: list[float], context: DistContext) -> list[float]:
    """The element-wise sum of ``values`` over all processes (``values`` itself in a single process)."""
    if not context.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device(context))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def broadcast_text(text: str | None, context: DistContext) -> str:
    """Rank 0's ``text`` on every process (other ranks pass None). UTF-8 bytes in a tensor: nothing is pickled."""
    if not context.enabled:
        if text is None:
            raise ValueError("a single process must pass the text itself")
        return text
    device = _collective_device(context)
    data = (text or "").encode("utf-8") if context.is_main else b""
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    buffer = torch.zeros(int(length.item()), dtype=torch.uint8, device=device)
    if context.is_main and data:
        buffer.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return bytes(buffer.cpu().tolist()).decode("utf-8")


def watch_launcher(on_exit: Callable[[str], None], interval: float = 1.0) -> Callable[[], None]:
    """Call ``on_exit(why)`` once if this process's parent, the torchrun launcher, goes away; returns the function
    that stops watching.

    torchrun starts every worker in a session of its own, so signals sent to the launcher's process group (a
    cancelled job, ``kill -9`` of the launcher) never reach the workers: without this they would train on, orphaned.
    A dead parent shows as a new parent pid (the process is handed to init or a subreaper).
    """
    parent = os.getppid()
    stopped = threading.Event()

    def watch() -> None:
        while not stopped.wait(interval):
            if os.getppid() != parent:
                on_exit(f"the torchrun launcher (pid {parent}) exited")
                return

    threading.Thread(target=watch, name="torchrun-launcher-watch", daemon=True).start()
    return stopped.set


def _collective_device(context: DistContext) -> torch.device:
    # NCCL moves only CUDA tensors; gloo only CPU ones.
    if context.device is not None and context.device.type == "cuda":
        return context.device
    return torch.device("cpu")
