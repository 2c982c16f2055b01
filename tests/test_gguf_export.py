"""GGUF export: the file llama.cpp loads (tokenizer, tied head, every dtype), greedy tokens equal to the studio's, and
refusals that leave nothing half-written."""

from __future__ import annotations

import gguf
import pytest
import torch

from core.checkpoint import save_checkpoint
from core.config import ModelConfig, SampleConfig
from core.gguf_export import GGUF_DTYPES, export_gguf, gpt2_tokenizer_tables
from core.model import GPT
from core.sampling import stream_tokens
from tests.conftest import assert_usage_error, cli_in_process, require_llama_cpp

EXPORT = "pipelines.export"


@pytest.fixture(scope="module")
def trained_like() -> GPT:
    """A tiny model whose weights are far from the init's narrow range, so greedy choices are clear-cut."""
    torch.manual_seed(11)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(8)
    return model


@pytest.fixture(scope="module")
def exported(trained_like, tmp_path_factory) -> dict:
    from core.tokenizer import get_tokenizer

    folder = tmp_path_factory.mktemp("gguf")
    return {d: export_gguf(trained_like, folder / f"tiny-{d}.gguf", get_tokenizer(), dtype=d) for d in GGUF_DTYPES}


def test_the_file_holds_gpt2_tensors_a_tied_head_and_the_tokenizer(exported, trained_like):
    reader = gguf.GGUFReader(exported["q8_0"])
    fields = {name: field for name, field in reader.fields.items()}
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "gpt2"
    assert int(fields["gpt2.block_count"].parts[-1][0]) == 2 and int(fields["gpt2.embedding_length"].parts[-1][0]) == 64
    assert len(fields["tokenizer.ggml.tokens"].data) == 50257 and len(fields["tokenizer.ggml.merges"].data) == 50000
    types = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    assert "output.weight" not in types  # the LM head is the token embedding: stored once
    assert types["token_embd.weight"] == "Q8_0" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32" and types["blk.0.attn_qkv.bias"] == "F32"
    # Dequantized, the file's weights are the model's (within Q8_0's rounding); the embedding has only real tokens.
    embedding = {t.name: t for t in reader.tensors}["token_embd.weight"]
    values = torch.from_numpy(gguf.quants.dequantize(embedding.data, embedding.tensor_type).copy())
    expected = trained_like.transformer.wte.weight[:50257].detach()
    assert values.shape == expected.shape
    assert (values - expected).abs().max() < 0.01 * expected.abs().max()
    sizes = {d: path.stat().st_size for d, path in exported.items()}
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_0"]


def test_merges_rebuild_tiktokens_bpe(tokenizer):
    tokens, merges = gpt2_tokenizer_tables(tokenizer)
    assert tokens[50256] == "<|endoftext|>" and tokens[220] == "Ġ" and tokens[198] == "Ċ"
    assert merges[0] == "Ġ t" and merges[1] == "Ġ a"  # GPT-2's first two merges, in rank order


def test_llama_cpp_loads_every_dtype_and_f32_decodes_the_studios_greedy_tokens(exported, trained_like, tokenizer):
    require_llama_cpp()
    from pipelines.benchmarks.llamacpp import open_gguf

    prompt = "ROMEO: But soft, what light"
    config = SampleConfig(max_new_tokens=24, num_samples=1, temperature=0.0, stop_at_eot=False)
    ours_ids = [int(tokens[0]) for tokens, _ in stream_tokens(trained_like, tokenizer.encode(prompt), config)]
    for dtype, path in exported.items():
        llm = open_gguf(path, threads=1, context=64)
        assert llm.tokenize(prompt.encode(), add_bos=False) == tokenizer.encode(prompt)  # the same tokenizer
        ids = []
        for token in llm.generate(llm.tokenize(prompt.encode(), add_bos=False), temp=0.0, reset=True):
            ids.append(token)
            if len(ids) == 24:
                break
        if dtype == "f32":
            assert ids == ours_ids
        else:
            assert len(ids) == 24  # loads and decodes; quantized logits may choose differently
        del llm


def test_export_cli_writes_a_gguf_and_refuses_to_overwrite(tmp_path, trained_like):
    checkpoint = save_checkpoint(trained_like, tmp_path / "ckpt")
    out = tmp_path / "model.gguf"
    result = cli_in_process(
        EXPORT, "--checkpoint", str(checkpoint), "--format", "gguf", "--dtype", "q4_0", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    assert "GGUF, q4_0 weights" in result.stdout and "llama-cli -m" in result.stdout
    first = out.read_bytes()
    assert first[:4] == b"GGUF"
    again = cli_in_process(EXPORT, "--checkpoint", str(checkpoint), "--format", "gguf", "--out", str(out))
    assert_usage_error(again, "already exists; choose another output file or pass --force")
    assert out.read_bytes() == first
    forced = cli_in_process(EXPORT, "--checkpoint", str(checkpoint), "--format", "gguf", "--out", str(out), "--force")
    assert forced.returncode == 0 and out.stat().st_size > len(first)  # f32 replaced q4_0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "model.gguf"]  # no temporary left


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--format", "gguf", "--dtype", "q5_k"], "invalid choice: 'q5_k'"),
        (["--dtype", "f16"], "--dtype chooses the weights of a GGUF export"),
        (["--format", "gguf", "--verify"], "--verify checks a Hugging Face export"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, args, fragment):
    result = cli_in_process(EXPORT, *args, "--out", str(tmp_path / "x.gguf"))
    assert_usage_error(result, fragment)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("config", "dtype", "fragment"),
    [
        (ModelConfig(n_layer=1, n_head=2, n_embd=64, block_size=16, bias=False), "f32", "has no biases"),
        (ModelConfig(n_layer=1, n_head=2, n_embd=48, block_size=16), "q8_0", "n_embd 48 is not a multiple of 32"),
        (ModelConfig(n_layer=1, n_head=2, n_embd=64, block_size=16, vocab_size=1000), "f16", "not GPT-2's 50257"),
    ],
)
def test_a_model_gguf_cannot_hold_is_refused_and_nothing_is_written(tmp_path, config, dtype, fragment):
    checkpoint = save_checkpoint(GPT(config), tmp_path / "ckpt")
    out = tmp_path / "out.gguf"
    result = cli_in_process(
        EXPORT, "--checkpoint", str(checkpoint), "--format", "gguf", "--dtype", dtype, "--out", str(out)
    )
    assert_usage_error(result, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_target_that_is_not_a_gguf_file_is_never_replaced(tmp_path, trained_like):
    checkpoint = save_checkpoint(trained_like, tmp_path / "ckpt")
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    result = cli_in_process(EXPORT, "--checkpoint", str(checkpoint), "--format", "gguf", "--out", str(notes), "--force")
    assert_usage_error(result, "is not a GGUF file: refusing to replace it, even with --force")
    assert notes.read_text() == "my notes"
    wrong_name = cli_in_process(
        EXPORT, "--checkpoint", str(checkpoint), "--format", "gguf", "--out", str(tmp_path / "m.bin")
    )
    assert_usage_error(wrong_name, "does not end in .gguf")


def test_a_failure_while_writing_leaves_the_old_file(tmp_path, trained_like, tokenizer, monkeypatch):
    out = export_gguf(trained_like, tmp_path / "m.gguf", tokenizer, dtype="f16")
    before = out.read_bytes()

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(trained_like, out, tokenizer, dtype="q8_0", overwrite=True)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
