"""Out-of-memory errors become one actionable line: the helper itself, and generation through it."""

import pytest
import torch

from core.config import SampleConfig
from core.errors import UsageError
from core.memory import (
    GENERATION_OOM_HINT,
    TRAINING_OOM_HINT,
    NotEnoughMemory,
    friendly_oom,
    is_out_of_memory,
)
from core.sampling import generate

# The allocators' own messages, as PyTorch raises them.
CPU_NOT_ENOUGH = (
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
    "you tried to allocate 68719476736 bytes."
)
CPU_CANT_ALLOCATE = (
    "[enforce fail at alloc_cpu.cpp:83] err == 0. DefaultCPUAllocator: can't allocate memory: "
    "you tried to allocate 137438953472 bytes. Error code 12 (Cannot allocate memory)"
)
CUDA_OOM = (
    "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is "
    "free. Including non-PyTorch memory, this process has 78.12 GiB memory in use.\n"
    "Of the allocated memory 76.50 GiB is allocated by PyTorch, and 1.10 GiB is reserved by PyTorch but unallocated. "
    "If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"
)


@pytest.mark.parametrize(
    ("error", "size"),
    [
        (RuntimeError(CPU_NOT_ENOUGH), "an allocation of 64.0 GiB failed"),
        (RuntimeError(CPU_CANT_ALLOCATE), "an allocation of 128.0 GiB failed"),
        (torch.OutOfMemoryError(CUDA_OOM), "an allocation of 2.00 GiB failed"),
        (RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 1000 bytes."), "1000 bytes"),
        (RuntimeError("MPS backend out of memory (MPS allocated: 17.00 GB)"), None),
        (MemoryError(), None),
    ],
)
def test_allocation_failures_become_one_line_with_the_hint(error, size):
    with pytest.raises(NotEnoughMemory) as caught, friendly_oom(TRAINING_OOM_HINT):
        raise error
    message = str(caught.value)
    assert isinstance(caught.value, UsageError)  # the CLIs print it as `error: ...` and exit 2
    assert "\n" not in message
    assert message.startswith("not enough memory") and message.endswith(TRAINING_OOM_HINT)
    assert "--batch-size" in message
    if size is not None:
        assert size in message
    assert caught.value.__suppress_context__  # the allocator's report is not shown under the line


@pytest.mark.parametrize(
    "error",
    [RuntimeError("Expected all tensors to be on the same device"), ValueError("memory"), KeyError("out of memory")],
)
def test_other_errors_pass_through_unchanged(error):
    assert not is_out_of_memory(error)
    with pytest.raises(type(error)) as caught, friendly_oom(TRAINING_OOM_HINT):
        raise error
    assert caught.value is error


def test_nothing_happens_without_an_error():
    with friendly_oom(TRAINING_OOM_HINT):
        value = 1 + 1
    assert value == 2


def test_a_real_failed_allocation_on_the_cpu_is_caught():
    # 1 EiB: beyond any machine's address space, so the allocator refuses at once, whatever the overcommit policy.
    with pytest.raises(NotEnoughMemory, match=r"allocation of 1.0 EiB failed"), friendly_oom("x"):
        torch.empty(2**60, dtype=torch.uint8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_real_failed_allocation_on_cuda_is_caught():
    with pytest.raises(NotEnoughMemory, match="allocation of .* failed"), friendly_oom("x"):
        torch.empty(2**50, dtype=torch.uint8, device="cuda")  # 1 PiB


def test_generation_that_runs_out_of_memory_asks_for_fewer_samples(tiny_model, tokenizer, monkeypatch):
    def exhausted(*args, **kwargs):
        raise RuntimeError(CPU_NOT_ENOUGH)

    monkeypatch.setattr(tiny_model, "forward", exhausted)
    was_training = tiny_model.train().training
    with pytest.raises(NotEnoughMemory, match="fewer samples") as caught:
        generate(tiny_model, tokenizer, "ROMEO:", SampleConfig(max_new_tokens=4, num_samples=16))
    assert str(caught.value).endswith(GENERATION_OOM_HINT)
    assert tiny_model.training == was_training  # the model's mode is restored even so
