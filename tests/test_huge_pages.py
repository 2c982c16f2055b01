"""Weights in huge pages (core/huge_pages.py): moved in place with their values, ties and Parameter objects kept, in
mappings that ask the kernel for 2 MiB pages; left alone where the system has none."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core import huge_pages
from core.checkpoint import load_checkpoint, save_checkpoint
from core.model import GPT
from tests.conftest import TINY


def _advised_huge(address: int) -> bool:
    """Whether the mapping holding ``address`` carries the kernel's huge-page advice (``hg`` in its VmFlags)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and line.startswith("VmFlags:"):
            return "hg" in line.split()
    return False


needs_huge_pages = pytest.mark.skipif(
    not huge_pages.huge_pages_available(), reason="this system offers no transparent huge pages"
)


@needs_huge_pages
def test_large_weights_move_with_their_values_and_ties():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    wte = model.transformer.wte.weight
    small = model.transformer.h[0].attn.c_attn.weight
    small_address = small.data_ptr()
    moved = huge_pages.move_to_huge_pages(model)
    assert moved == wte.numel() * 4  # the only tensor of at least 1 MiB in the tiny model: the tied embedding
    assert model.transformer.wte.weight is wte and model.lm_head.weight is wte  # the same Parameter, still tied
    assert _advised_huge(wte.data_ptr()) and not _advised_huge(small_address)
    assert small.data_ptr() == small_address  # small tensors stay where they were
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert huge_pages.move_to_huge_pages(model) == moved  # again: copied again, nothing lost


@needs_huge_pages
def test_a_checkpoint_loaded_on_the_cpu_decodes_from_huge_pages(tmp_path):
    torch.manual_seed(1)
    model = GPT(TINY)
    save_checkpoint(model, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert _advised_huge(loaded.transformer.wte.weight.data_ptr())
    assert torch.equal(loaded.transformer.wte.weight, model.transformer.wte.weight.detach())
    # Training from such a model works like from any other: the weights are ordinary memory.
    loaded.train()
    _, loss = loaded(torch.randint(0, TINY.vocab_size, (2, 8)), torch.randint(0, TINY.vocab_size, (2, 8)))
    loss.backward()
    assert loaded.transformer.wte.weight.grad is not None


def test_nothing_moves_where_the_system_has_no_huge_pages(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    setting.write_text("always madvise [never]\n")
    monkeypatch.setattr(huge_pages, "THP_SETTING", setting)
    model = GPT(TINY).eval()
    address = model.transformer.wte.weight.data_ptr()
    assert not huge_pages.huge_pages_available()
    assert huge_pages.move_to_huge_pages(model) == 0
    assert model.transformer.wte.weight.data_ptr() == address
    monkeypatch.setattr(huge_pages, "THP_SETTING", tmp_path / "missing")
    assert not huge_pages.huge_pages_available()


@needs_huge_pages
def test_a_lower_precision_copy_decodes_from_huge_pages():
    from core.quantize import quantize

    torch.manual_seed(2)
    model = GPT(TINY).eval()
    copy = quantize(model, "int8")
    assert _advised_huge(copy.transformer.wte.weight.data_ptr())  # the copy's embedding: its only large tensor
    assert not _advised_huge(model.transformer.wte.weight.data_ptr())  # the original is left as it was
