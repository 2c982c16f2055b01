"""The decoding kernels (core/cpu_kernels.cpp): built for this CPU, the same products as PyTorch's for every weight
layout and row count they take, and used by the model's linear layers only where no gradient is needed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core import cpu_kernels
from core.model import GPT, Linear
from core.quantize import CompactLinear, q8_blocks
from tests.conftest import TINY


@pytest.fixture(scope="module")
def kernels():
    built, why = cpu_kernels.load()
    assert built, f"the decoding kernels must build on a machine with a C++ compiler: {why}"
    return torch.ops.studio.linear_small


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("kind", ["fp32", "f16", "bf16", "int8", "q4"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("inputs", [96, 128])  # 4-bit rows of 3 blocks, and of 2 pairs (AVX-512's two-block loop)
def test_each_layout_computes_what_its_weights_stand_for(kernels, rows, kind, with_bias, inputs):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(inputs, 80, bias=with_bias)
    x = torch.randn(rows, inputs)
    if kind == "fp32":
        weight, scales, expected_weight = linear.weight.detach(), None, linear.weight.detach()
    else:
        compact = CompactLinear(linear, kind)
        weight, scales, expected_weight = compact.weight, compact.scales, compact.dequantized()
    bias = None if linear.bias is None else linear.bias.detach()
    y = kernels(x, weight, scales, bias, cpu_kernels.KINDS[kind])
    exact = F.linear(x, expected_weight, bias)
    if kind in ("q4", "int8") and not torch.allclose(y, exact, rtol=1e-4, atol=1e-4):
        # With integer dot products (AVX-VNNI), the activations are rounded like llama.cpp's Q8_0 first: int8
        # codes per block of 32, the block's largest magnitude at 127. Exactly that, and nothing else, may differ.
        assert torch.ops.studio.rounds_activations() == 1
        exact = F.linear(q8_blocks(x), expected_weight, bias)
    torch.testing.assert_close(y, exact, rtol=1e-4, atol=1e-4)


def test_bad_shapes_are_refused_by_the_kernel(kernels):
    with pytest.raises(RuntimeError, match="1..8"):
        kernels(torch.randn(9, 32), torch.randn(4, 32), None, None, 0)
    with pytest.raises(RuntimeError, match="scales"):
        kernels(torch.randn(1, 32), torch.zeros(4, 32, dtype=torch.int8), None, None, 3)


def test_the_model_decodes_through_the_kernel_and_trains_without_it(kernels, monkeypatch):
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    calls = []

    def counting(*args):
        calls.append(args[-1])
        return kernels(*args)

    monkeypatch.setattr("core.model.decoding_kernel", lambda name="linear_small": counting)
    idx = torch.randint(0, TINY.vocab_size, (1, 3))
    with torch.inference_mode():
        logits, _ = model(idx)
    assert len(calls) == 4 * TINY.n_layer + 1 and set(calls) == {0}
    monkeypatch.setattr("core.model.decoding_kernel", lambda name="linear_small": None)
    with torch.inference_mode():
        reference, _ = model(idx)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    # Training a few rows needs gradients: PyTorch's product, not the kernel.
    monkeypatch.setattr("core.model.decoding_kernel", lambda name="linear_small": counting)
    calls.clear()
    model.train()
    _, loss = model(idx, idx)
    loss.backward()
    assert not calls and model.transformer.wte.weight.grad is not None
    assert isinstance(model.lm_head, Linear)


def test_the_kernels_can_be_switched_off(monkeypatch):
    cpu_kernels.load.cache_clear()
    monkeypatch.setenv(cpu_kernels.DISABLE_ENV, "1")
    try:
        assert cpu_kernels.load() == (False, f"{cpu_kernels.DISABLE_ENV}=1")
    finally:
        cpu_kernels.load.cache_clear()


def test_sampling_through_the_kernels_draws_what_the_modules_draw(kernels, monkeypatch):
    from core.config import SampleConfig
    from core.sampling import stream_tokens

    torch.manual_seed(2)
    model = GPT(TINY).eval()
    prompt = [5, 17, 300, 42]
    # 40 new tokens: past the 32-position context, so the cache is also rebuilt from the window once
    config = SampleConfig(max_new_tokens=40, num_samples=3, seed=4, stop_at_eot=False)
    fast = [tokens.tolist() for tokens, _ in stream_tokens(model, prompt, config)]
    monkeypatch.setattr("core.model.decoding_kernel", lambda name="linear_small": None)
    assert model.decoding_plan() is None
    plain = [tokens.tolist() for tokens, _ in stream_tokens(model, prompt, config)]
    assert fast == plain


@pytest.mark.parametrize("k", [1, 7, 200])
def test_top_k_returns_what_torch_topk_returns(kernels, k):
    logits = torch.randn(3, 50257, generator=torch.Generator().manual_seed(k)) * 4
    values, indices = torch.ops.studio.top_k(logits, k)
    expected_values, expected_indices = torch.topk(logits, k, dim=-1)
    assert torch.equal(values, expected_values) and torch.equal(indices, expected_indices)
    ties = torch.zeros(1, 10)
    ties[0, 7] = 1.0
    assert torch.ops.studio.top_k(ties, 3)[1].tolist() == [[7, 0, 1]]  # equal values: the lower index first


def _decode_against_forward(model, batch: int, positions: int = 3):
    """The fused step's logits and caches next to the module path's, position by position."""
    from core.model import KVCache

    config = model.config
    idx = torch.randint(0, config.vocab_size, (batch, 3 + positions), generator=torch.Generator().manual_seed(batch))
    fused_cache, plain_cache = KVCache(config, batch), KVCache(config, batch)
    with torch.inference_mode():
        model(idx[:, :3], cache=fused_cache, start_pos=0)
        model(idx[:, :3], cache=plain_cache, start_pos=0)
        plan = model.decoding_plan()
        assert plan is not None
        for position in range(3, 3 + positions):
            fused = model.decode_one(plan, idx[:, position], fused_cache, position)  # (B, V)
            plain, _ = model(idx[:, position : position + 1], cache=plain_cache, start_pos=position)
            yield fused, plain[:, 0], fused_cache, plain_cache, position


@pytest.mark.parametrize("precision", ["fp32", "bf16", "f16", "int8", "int4"])
@pytest.mark.parametrize("batch", [1, 3, 9])
def test_the_fused_decoding_step_computes_what_the_modules_compute(kernels, precision, batch):
    from core.quantize import quantize

    torch.manual_seed(3)
    model = quantize(GPT(TINY).eval(), precision)
    for fused, plain, fused_cache, plain_cache, position in _decode_against_forward(model, batch):
        assert fused.shape == (batch, TINY.vocab_size)
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)
        length = position + 1
        torch.testing.assert_close(fused_cache.k[..., :length, :], plain_cache.k[..., :length, :])
        torch.testing.assert_close(fused_cache.v[..., :length, :], plain_cache.v[..., :length, :])


def test_the_fused_step_holds_for_large_activations_and_no_biases(kernels):
    # GELU's exponential is the kernel's own approximation: inputs across [-20, 20] must still match PyTorch's GELU.
    from core.config import ModelConfig

    torch.manual_seed(4)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_fc.weight.mul_(60)
    for fused, plain, *_ in _decode_against_forward(model, 2):
        torch.testing.assert_close(fused, plain, rtol=1e-4, atol=1e-4)


def test_the_fused_step_refuses_what_it_cannot_read(kernels):
    from core.model import KVCache

    torch.manual_seed(5)
    model = GPT(TINY).eval()
    plan = model.decoding_plan()
    cache = KVCache(TINY, 1)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="token id out of range"):
        model.decode_one(plan, torch.tensor([TINY.padded_vocab_size]), cache, 0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="position outside the cache"):
        model.decode_one(plan, torch.tensor([1]), cache, TINY.block_size)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="caches must be"):
        model.decode_one(plan, torch.tensor([1, 2]), cache, 0)  # two samples, a cache for one
    # Where the step cannot apply, there is no plan, and decoding goes through the modules.
    assert model.train().decoding_plan() is None
    assert GPT(TINY).eval().to(torch.bfloat16).decoding_plan() is None
