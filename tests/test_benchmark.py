"""The benchmark's rows on tiny shapes: each side really runs, the reference is a true twin, ratios are oriented.

Timings themselves are not asserted (that is what ``python -m pipelines.benchmark`` reports); these tests check
that the comparison is fair and the output well formed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core import benchmark
from core.config import ModelConfig
from pipelines.cli import run
from tests.conftest import TINY

pytest.importorskip("transformers", reason="the benchmark's reference needs transformers")

TINY_256 = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)


def test_rows_orient_ratios_so_above_one_is_better():
    assert benchmark.higher_is_better("x", 30.0, 20.0, "tokens/s").ratio == pytest.approx(1.5)
    assert benchmark.lower_is_better("x", 0.5, 2.0, "s").ratio == pytest.approx(4.0)
    assert set(benchmark.Row("x", 1, 2, "s", 2).to_dict()) == {"name", "ours", "reference", "unit", "ratio", "note"}


def test_the_reference_twin_computes_the_same_logits(tiny_model):
    twin = benchmark.hf_twin(tiny_model, train=False)
    idx = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(twin(idx).logits, tiny_model(idx)[0], atol=1e-4, rtol=1e-4)


def test_generation_row_runs_both_sides_at_full_length(tokenizer):
    lines: list[str] = []
    row = benchmark.generation(2, 6, repeats=1, log=lines.append, config=TINY)
    assert row.name == "generate_b2" and row.unit == "tokens/s"
    assert row.ours > 0 and row.reference > 0
    assert row.ratio == pytest.approx(row.ours / row.reference)
    assert len(lines) == 1 and "reference" in lines[0]


def test_training_row_steps_both_models_from_the_same_weights():
    row = benchmark.training("tiny", steps=2, warmup=1, log=lambda _: None, config=TINY_256, shape=(2, 16))
    assert row.name == "train_tiny" and row.ours > 0 and row.reference > 0
    assert "B=2 T=16" in row.note


@pytest.mark.slow
def test_first_token_row_loads_a_registered_model(tokenizer):
    row = benchmark.first_token(repeats=1, log=lambda _: None, config=TINY)
    assert row.name == "first_token" and row.unit == "s"
    assert 0 < row.ours < 60 and 0 < row.reference < 60


def test_cli_refuses_an_unknown_row(capsys):
    from pipelines import benchmark as cli

    with pytest.raises(SystemExit) as exited:
        run(cli.main, ["--only", "nope"])
    assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_json_has_the_rows_and_the_machine(monkeypatch, capsys):
    from pipelines import benchmark as cli

    fake = benchmark.higher_is_better("generate_b1", 40.0, 20.0, "tokens/s", "fake")
    monkeypatch.setattr(benchmark, "generation", lambda batch, new_tokens, repeats, log, pair: fake)
    monkeypatch.setattr(benchmark, "inference_pair", lambda: None)
    assert cli.main(["--quick", "--json", "--only", "generate_b1"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["rows"] == [fake.to_dict()]
    assert "cores" in document["machine"]


def test_int8_rows_compare_the_quantized_model_with_itself_in_fp32(tiny_model, tokenizer):
    val_tokens = np.asarray(tokenizer.encode("ROMEO: What light through yonder window breaks? " * 60), dtype=np.uint16)
    lines: list[str] = []
    speed, loss = benchmark.quantization(
        tiny_model, val_tokens, new_tokens=6, repeats=1, eval_batches=2, label="tiny/1", log=lines.append
    )
    assert speed.name == "generate_b1_int8" and speed.unit == "tokens/s" and speed.ours > 0 and speed.reference > 0
    assert loss.name == "val_loss_int8" and loss.unit == "nats/token"
    assert loss.ratio == pytest.approx(loss.reference / loss.ours)
    assert abs(loss.ours - loss.reference) < 0.05 * loss.reference
    assert "tiny/1" in loss.note and "change" in loss.note
    assert any("validation loss" in line for line in lines)


def test_cli_int8_rows_need_a_model(capsys):
    from pipelines import benchmark as cli

    with pytest.raises(SystemExit) as exited:
        run(cli.main, ["--only", "int8"])
    assert exited.value.code == 2
    assert "add --model" in capsys.readouterr().err


def test_cli_int8_rows_measure_the_version_the_reference_named_at_the_start(studio_store, shakespeare_path, capsys):
    from pipelines import benchmark as cli

    model = ["--model", "shakespeare-gpt@champion"]
    assert cli.main(["--quick", "--json", "--only", "int8", *model, "--data", str(shakespeare_path)]) == 0
    captured = capsys.readouterr()
    speed, loss = json.loads(captured.out)["rows"]
    assert (speed["name"], loss["name"]) == ("generate_b1_int8", "val_loss_int8")
    assert speed["note"].startswith("shakespeare-gpt/1: int8 vs fp32") and loss["ratio"] > 0
    assert "int8: shakespeare-gpt/1 with int8 linear layers" in captured.err
