"""int8 dynamic quantization: a separate copy that generates and evaluates close to the fp32 model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.config import SampleConfig
from core.errors import UsageError
from core.evaluation import mean_loss
from core.model import GPT, Linear
from core.quantize import PRECISIONS, CompactLinear, quantize, quantize_int8
from core.sampling import generate
from tests.conftest import TINY


@pytest.fixture
def trained_like() -> GPT:
    """A tiny model with weights far from the init's narrow range, so int8's rounding is really exercised."""
    torch.manual_seed(3)
    model = GPT(TINY).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(2)
    return model


def test_quantizing_makes_an_int8_copy_and_leaves_the_model_alone(trained_like):
    before = {k: v.clone() for k, v in trained_like.state_dict().items()}
    quantized = quantize_int8(trained_like)
    assert quantized is not trained_like
    int8_layers = [m for m in quantized.modules() if isinstance(m, CompactLinear)]
    assert len(int8_layers) == 4 * TINY.n_layer + 1  # c_attn, c_proj, c_fc, mlp c_proj per block, and the LM head
    assert all(m.kind == "int8" and m.weight.dtype == torch.int8 for m in int8_layers)
    assert not any(isinstance(m, Linear) for m in quantized.modules())
    assert quantized.transformer.wte.weight.dtype == torch.float32  # the embedding lookup stays fp32
    # The original still trains: its own modules, its tied head, its weights unchanged.
    assert isinstance(trained_like.lm_head, Linear)
    assert trained_like.lm_head.weight is trained_like.transformer.wte.weight
    for key, value in trained_like.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_int8_logits_and_loss_stay_close_to_fp32(trained_like):
    quantized = quantize_int8(trained_like)
    idx = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32_logits, _ = trained_like(idx)
        int8_logits, _ = quantized(idx)
        _, fp32_loss = trained_like(idx, idx)
        _, int8_loss = quantized(idx, idx)
    assert int8_logits.shape == fp32_logits.shape == (2, 16, TINY.vocab_size)
    relative = (int8_logits - fp32_logits).norm() / fp32_logits.norm()
    assert 0 < relative < 0.05  # really quantized, and close
    assert abs(int8_loss.item() - fp32_loss.item()) < 0.01 * fp32_loss.item()


def test_an_int8_model_samples_reproducibly(trained_like, tokenizer):
    quantized = quantize_int8(trained_like)
    config = SampleConfig(max_new_tokens=12, num_samples=2, seed=5, stop_at_eot=False)
    first = generate(quantized, tokenizer, "ROMEO:", config)
    second = generate(quantized, tokenizer, "ROMEO:", config)
    assert first.samples == second.samples and first.new_tokens == [12, 12]
    assert all(sample.startswith("ROMEO:") for sample in first.samples)


def test_only_cpu_models_are_quantized(trained_like):
    with pytest.raises(UsageError, match="CPU only"):
        quantize_int8(trained_like.to("meta"))


def test_mean_loss_averages_sequential_batches(tiny_model):
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, 4 * 16 * 3 + 1).astype(np.uint16)
    x = torch.from_numpy(tokens[: 2 * 16 + 1].astype(np.int64))
    with torch.no_grad():
        _, expected = tiny_model(x[:-1].view(2, 16), x[1:].view(2, 16))
    assert mean_loss(tiny_model, tokens, 2, 16, max_batches=1) == pytest.approx(expected.item(), rel=1e-6)
    assert mean_loss(tiny_model, tokens, 2, 16, max_batches=100) > 0
    with pytest.raises(ValueError, match="fewer than one batch"):
        mean_loss(tiny_model, tokens[:10], 2, 16, max_batches=1)


@pytest.mark.parametrize(
    ("precision", "dtype", "bytes_per_weight", "tolerance"),
    [
        ("int8", torch.int8, 1, 0.05),
        ("int4", torch.uint8, 0.5, 0.25),
        ("f16", torch.float16, 2, 0.002),
        ("bf16", torch.bfloat16, 2, 0.01),
    ],
)
def test_each_precision_stores_fewer_bytes_and_stays_close(trained_like, precision, dtype, bytes_per_weight, tolerance):
    variant = quantize(trained_like, precision)
    layers = [m for m in variant.modules() if isinstance(m, CompactLinear)]
    assert len(layers) == 4 * TINY.n_layer + 1 and not any(isinstance(m, nn.Linear) for m in variant.modules())
    head = variant.lm_head
    assert head.weight.dtype == dtype
    assert head.weight.numel() * head.weight.element_size() == int(
        TINY.padded_vocab_size * TINY.n_embd * bytes_per_weight
    )
    idx = torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, _ = trained_like(idx)
        logits, _ = variant(idx)  # 32 rows: the widened-weight route
        last, _ = variant(idx[:1, :4])  # 4 rows: the decoding route
        full, _ = variant(idx[:1, :16])
    relative = (logits - reference).norm() / reference.norm()
    assert 0 < relative < tolerance
    # The decoding route (few rows) and the widened-weight route (many rows) compute the same products.
    torch.testing.assert_close(last, full[:, :4], rtol=1e-4, atol=1e-4)


def test_unknown_precision_and_fp32_are_handled(trained_like):
    assert quantize(trained_like, "fp32") is trained_like
    with pytest.raises(UsageError, match="unknown precision 'int3'"):
        quantize(trained_like, "int3")
    assert PRECISIONS == ("fp32", "bf16", "f16", "int8", "int4")


def test_int4_needs_rows_in_blocks_of_32(trained_like):
    from core.config import ModelConfig

    odd = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=48, block_size=16)).eval()
    with pytest.raises(UsageError, match="blocks of 32"):
        quantize(odd, "int4")
    assert quantize(odd, "int8") is not odd  # int8 has one scale per row: any width


def test_without_the_kernels_int8_still_works_and_the_others_are_refused(trained_like, monkeypatch):
    from core import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "load", lambda: (False, "no C++ compiler"))
    monkeypatch.setattr("core.quantize.decoding_kernel", lambda name="linear_small": None)
    variant = quantize(trained_like, "int8")
    idx = torch.randint(0, TINY.vocab_size, (1, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(variant(idx)[0], trained_like(idx)[0], rtol=0.05, atol=0.05)
    with pytest.raises(UsageError, match="needs the studio's CPU kernels, and no C\\+\\+ compiler"):
        quantize(trained_like, "int4")
