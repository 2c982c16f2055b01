import dataclasses
import math

import pytest
import torch

from core.config import ModelConfig
from core.lm_head import IGNORE_INDEX, SharedRows, _loss_chunk_rows, lm_head_cross_entropy
from core.model import GPT, KVCache, Linear, parameter_breakdown


def test_gpt2_preset_has_exact_parameter_count_and_size():
    with torch.device("meta"):  # shapes only: no weights allocated
        model = GPT(ModelConfig.from_preset("gpt2"))
    breakdown = parameter_breakdown(model)
    assert breakdown["total_params"] == 124_439_808
    assert breakdown["trainable_params"] == 124_439_808
    assert f"{breakdown['size_mb']:.2f}" == "474.70"


def test_breakdown_counts_every_parameter_once_and_shows_the_tied_head():
    with torch.device("meta"):
        model = GPT(ModelConfig.from_preset("gpt2"))
    breakdown = parameter_breakdown(model)
    by_group = {c["group"]: c["params"] for c in breakdown["components"]}
    assert by_group["token_embedding"] == 50257 * 768
    assert by_group["position_embedding"] == 1024 * 768
    assert by_group["attention"] == 12 * (768 * 3 * 768 + 3 * 768 + 768 * 768 + 768)
    assert by_group["mlp"] == 12 * (768 * 4 * 768 + 4 * 768 + 4 * 768 * 768 + 768)
    assert by_group["layernorm"] == 12 * 4 * 768
    assert by_group["final_layernorm"] == 2 * 768
    assert by_group["lm_head"] == 0
    head = next(c for c in breakdown["components"] if c["group"] == "lm_head")
    assert "tied" in head["note"]
    assert sum(by_group.values()) == breakdown["total_params"]
    assert len(breakdown["blocks"]) == 12 * 3
    assert sum(b["params"] for b in breakdown["blocks"] if b["block"] == 5) == 7_087_872


def test_forward_shapes_and_initial_loss(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (3, 16))
    logits, loss = tiny_model(idx)
    assert logits.shape == (3, 16, tiny_config.vocab_size)
    assert loss is None
    targets = torch.roll(idx, -1, 1)
    no_logits, loss = tiny_model(idx, targets=targets)
    assert no_logits is None  # the fused loss never builds the (B, T, V) logits
    # A freshly initialised model is close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(tiny_config.vocab_size)) < 0.5
    plain_logits, plain_loss = tiny_model(idx, targets=targets, return_logits=True)
    torch.testing.assert_close(plain_logits, logits)
    torch.testing.assert_close(plain_loss, loss)
    last, _ = tiny_model(idx, last_only=True)
    assert last.shape == (3, 1, tiny_config.vocab_size)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_ignored_targets_do_not_count(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (1, 8))
    targets = torch.randint(0, tiny_config.vocab_size, (1, 8))
    _, full = tiny_model(idx, targets)
    masked = targets.clone()
    masked[0, 4:] = -1
    _, partial = tiny_model(idx, masked)
    _, first_half = tiny_model(idx[:, :4], targets[:, :4])
    torch.testing.assert_close(partial, first_half)
    assert not torch.isclose(full, partial)


def test_changing_a_later_token_never_changes_earlier_logits(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % tiny_config.vocab_size
    before, _ = tiny_model(idx)
    after, _ = tiny_model(changed)
    torch.testing.assert_close(before[:, :12], after[:, :12])
    assert not torch.allclose(before[:, 12:], after[:, 12:])


def test_lm_head_is_tied_to_token_embedding(tiny_model):
    assert tiny_model.lm_head.weight is tiny_model.transformer.wte.weight
    assert tiny_model.lm_head.weight.data_ptr() == tiny_model.transformer.wte.weight.data_ptr()
    tiny_model.train()
    idx = torch.randint(0, 50257, (1, 8))
    _, loss = tiny_model(idx, targets=idx)
    loss.backward()
    # One tensor receives the gradient of both uses.
    assert tiny_model.transformer.wte.weight.grad is tiny_model.lm_head.weight.grad


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    config = ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=64)
    model = GPT(config)
    block = model.transformer.h[0]
    assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    expected = 0.02 / math.sqrt(2 * config.n_layer)
    assert block.attn.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(block.attn.c_attn.bias == 0)
    assert torch.all(block.ln_1.weight == 1)


def test_dropout_is_active_only_in_training(tiny_config):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**tiny_config.to_dict(), "dropout": 0.5}))
    idx = torch.randint(0, tiny_config.vocab_size, (1, 8))
    model.train()
    a, _ = model(idx)
    b, _ = model(idx)
    assert not torch.allclose(a, b)
    model.eval()
    c, _ = model(idx)
    d, _ = model(idx)
    torch.testing.assert_close(c, d)


def test_kv_cache_in_chunks_matches_the_full_forward(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocab_size, (2, 20))
    full, _ = tiny_model(idx)
    cache = KVCache(tiny_config, batch_size=2)
    first, _ = tiny_model(idx[:, :9], cache=cache, start_pos=0)
    chunk, _ = tiny_model(idx[:, 9:15], cache=cache, start_pos=9)
    steps = [tiny_model(idx[:, t : t + 1], cache=cache, start_pos=t)[0] for t in range(15, 20)]
    torch.testing.assert_close(torch.cat([first, chunk, *steps], dim=1), full, atol=1e-5, rtol=1e-4)


def test_sequence_longer_than_context_is_refused(tiny_model, tiny_config):
    with pytest.raises(ValueError, match="exceeds the context"):
        tiny_model(torch.zeros(1, tiny_config.block_size + 1, dtype=torch.long))


@pytest.mark.parametrize("vocab", [1000, 1024])  # logits rows padded to 1024 floats, and already aligned
@pytest.mark.parametrize("chunk_rows", [3, 8, None])
def test_fused_lm_head_loss_matches_cross_entropy_with_gradients(chunk_rows, vocab):
    torch.manual_seed(0)
    x = torch.randn(37, 16, dtype=torch.float64)
    weight = torch.randn(vocab, 16, dtype=torch.float64)
    targets = torch.randint(0, vocab, (37,))
    targets[::5] = IGNORE_INDEX
    xf, wf = x.float().requires_grad_(), weight.float().requires_grad_()
    (3 * lm_head_cross_entropy(xf, wf, targets, chunk_rows)).backward()
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    reference = torch.nn.functional.cross_entropy(xr @ wr.T, targets, ignore_index=IGNORE_INDEX)
    (3 * reference).backward()
    loss = lm_head_cross_entropy(xf.detach(), wf.detach(), targets, chunk_rows)
    torch.testing.assert_close(loss.double(), reference.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xf.grad.double(), xr.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(wf.grad.double(), wr.grad, atol=1e-6, rtol=1e-4)


def test_loss_chunks_are_even_and_never_above_the_limit():
    assert _loss_chunk_rows(50257, None, 2048) == 512  # 4 × 512 rather than 3 × 667 + 47
    assert _loss_chunk_rows(50257, None, 100) == 100
    assert _loss_chunk_rows(1000, 8, 37) == 8  # 5 chunks of at most 8 rows: 8, 8, 8, 8, 5
    assert _loss_chunk_rows(1000, 3, 1) == 1


def test_fused_loss_survives_extreme_logits_and_all_ignored_targets():
    torch.manual_seed(0)
    x, weight = torch.randn(4, 8) * 100, torch.randn(50, 8) * 100  # probabilities far below fp32's range
    targets = torch.tensor([0, 1, 2, 3])
    reference = torch.nn.functional.cross_entropy(x @ weight.T, targets)
    torch.testing.assert_close(lm_head_cross_entropy(x, weight, targets), reference, rtol=1e-5, atol=1e-2)
    ignored = torch.full((4,), IGNORE_INDEX)
    assert math.isnan(lm_head_cross_entropy(x, weight, ignored).item())


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9])
@pytest.mark.parametrize("bias", [True, False])
def test_small_row_linear_matches_nn_linear(rows, bias):
    torch.manual_seed(0)
    layer = Linear(24, 40, bias=bias)
    x = torch.randn(1, rows, 24)
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == (1, rows, 40) and out.is_contiguous()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_padded_vocabulary_predicts_only_real_tokens(tiny_model, tiny_config):
    padded_config = dataclasses.replace(tiny_config, pad_vocab_multiple=64)
    assert padded_config.padded_vocab_size == 50304
    torch.manual_seed(1)
    padded = GPT(padded_config).eval()
    state = tiny_model.state_dict()
    wte = padded.transformer.wte.weight.detach().clone()
    wte[: tiny_config.vocab_size] = state["transformer.wte.weight"]
    wte[tiny_config.vocab_size :] = 50.0  # padding rows that would win every argmax if they were ever predicted
    state["transformer.wte.weight"] = state["lm_head.weight"] = wte
    padded.load_state_dict(state)
    idx = torch.randint(0, tiny_config.vocab_size, (2, 12))
    logits, _ = padded(idx)
    assert logits.shape == (2, 12, tiny_config.vocab_size)
    torch.testing.assert_close(logits, tiny_model(idx)[0])
    torch.testing.assert_close(padded(idx, idx)[1], tiny_model(idx, idx)[1])
    assert parameter_breakdown(padded)["total_params"] == parameter_breakdown(tiny_model)["total_params"] + 47 * 32


def test_shared_rows_give_the_full_models_loss_and_gradients_at_a_fraction_of_the_head():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=300, n_layer=1, n_head=2, n_embd=16, block_size=8)
    model = GPT(config)
    used = torch.randint(0, 300, (40,))
    shared = SharedRows(used, 300)
    assert shared.rows.numel() == torch.unique(used).numel() + 1  # the used tokens and one shared row
    shared.tie_unused_rows(model.transformer.wte.weight)
    weight = model.transformer.wte.weight
    assert torch.equal(weight[shared.unused], weight[shared.shared].expand(len(shared.unused), -1))
    x = used[torch.randint(0, 40, (2, 8))]
    y = torch.randint(0, 300, (2, 8))  # unused tokens among the targets too
    y[0, 0] = -1  # and an ignored one
    full_loss = model(x, y)[1]
    full_loss.backward()
    full = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    shared_loss = model(x, y, shared_rows=shared)[1]
    shared_loss.backward()
    torch.testing.assert_close(shared_loss, full_loss)
    for name, p in model.named_parameters():
        if name != "transformer.wte.weight":
            torch.testing.assert_close(p.grad, full[name], rtol=1e-5, atol=1e-6)
    # Used rows get their own gradient; the shared row gets the sum over the rows it stands for.
    torch.testing.assert_close(weight.grad[shared.rows[:-1]], full["transformer.wte.weight"][shared.rows[:-1]])
    torch.testing.assert_close(weight.grad[shared.shared], full["transformer.wte.weight"][shared.unused].sum(0))
    with torch.no_grad():  # and without gradients (evaluation), the same loss
        torch.testing.assert_close(model(x, y, shared_rows=shared)[1], full_loss)
    with pytest.raises(ValueError, match="training loss only"):
        model(x, shared_rows=shared)
    with pytest.raises(ValueError, match="no row to share"):
        SharedRows(torch.arange(300), 300)
