"""Device facts: the peak-FLOP/s table behind MFU and the C++ compiler torch.compile needs on the CPU."""

import sys

import pytest
import torch

from core.device import cpp_compiler, peak_flops, peak_flops_for_name


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # the SXM part's name says nothing of SXM
        ("NVIDIA H100 PCIe", 756e12),
        ("nvidia h100 pcie", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-PCIE-40GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA GeForce RTX 4090", 165e12),
        # Look-alikes with other peaks get no figure rather than a neighbour's
        ("NVIDIA L40S", None),
        ("NVIDIA A10G", None),
        ("Tesla T4", None),
    ],
)
def test_cuda_peaks_are_looked_up_by_device_name(monkeypatch, name, peak):
    asked = []

    def device_name(device=None):
        asked.append(device)
        return name

    monkeypatch.setattr(torch.cuda, "get_device_name", device_name)
    assert peak_flops_for_name(name) == peak
    assert peak_flops("cuda") == peak
    assert peak_flops(torch.device("cuda", 1)) == peak
    assert asked == [torch.device("cuda"), torch.device("cuda", 1)]  # the trainer's own GPU, not always GPU 0


@pytest.mark.parametrize("device", ["cpu", "mps", torch.device("cpu")])
def test_no_peak_without_cuda(monkeypatch, device):
    def device_name(device=None):
        raise AssertionError("a non-CUDA device must not ask CUDA for its name")

    monkeypatch.setattr(torch.cuda, "get_device_name", device_name)
    assert peak_flops(device) is None


def test_the_cpp_compiler_is_cxx_or_gxx(monkeypatch, tmp_path):
    compiler = tmp_path / "my-c++"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    assert cpp_compiler() == str(compiler)
    monkeypatch.setenv("CXX", str(tmp_path / "missing-c++"))
    assert cpp_compiler() is None
    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cpp_compiler() is None  # no default compiler on this PATH
    default = "clang++" if sys.platform == "darwin" else "g++"  # what Inductor runs when $CXX is unset
    (tmp_path / default).symlink_to(compiler)
    assert cpp_compiler() == str(tmp_path / default)
