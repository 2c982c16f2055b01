"""The benchmark's rows on tiny shapes: each side really runs, the reference is a true twin, ratios are oriented.

Timings themselves are not asserted (that is what ``python -m pipelines.benchmark`` reports); these tests check
that the comparison is fair and the output well formed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.config import ModelConfig
from pipelines import benchmarks as benchmark
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
    rows = {row["name"]: row for row in json.loads(captured.out)["rows"]}
    # Every lower precision this machine can run, each against the same model in fp32 (the tiny model's width is a
    # multiple of 32, so int4 can group it).
    assert {"generate_b1_int8", "val_loss_int8", "generate_b1_int4", "val_loss_int4"} <= set(rows)
    speed, loss = rows["generate_b1_int8"], rows["val_loss_int8"]
    assert speed["note"].startswith("shakespeare-gpt/1: int8 vs fp32") and loss["ratio"] > 0
    assert "int8: shakespeare-gpt/1 at bf16, f16, int8 and int4 vs fp32" in captured.err


SCENE = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n\n" * 40


def test_memorization_rows_time_the_index_against_a_scan_and_measure_a_model(tmp_path, tiny_model, tokenizer):
    from core.config import DataConfig
    from core.data import prepare_corpus
    from core.memorization import CopyIndex

    (tmp_path / "scene.txt").write_text(SCENE + "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n" * 5)
    corpus = prepare_corpus(DataConfig(source=str(tmp_path / "scene.txt"), cache_dir=str(tmp_path)), tokenizer)
    lines: list[str] = []
    speed, share = benchmark.memorization(
        corpus, tiny_model, samples=2, new_tokens=20, repeats=1, label="tiny/1", log=lines.append
    )
    assert speed.name == "memorization_speed" and speed.unit == "ms/sample"
    assert speed.ours > 0 and speed.reference > 0 and speed.ratio == pytest.approx(speed.reference / speed.ours)
    assert "2 held-out samples × 20 tokens" in speed.note and "index built once in" in speed.note
    assert share.name == "memorization_share" and share.unit == "% of 8-token spans" and "tiny/1" in share.note
    # The reference is the held-out windows' pooled share, as the meter gives it.
    index = CopyIndex(corpus.tokens("train"))
    reports = [
        index.report_text(tokenizer.decode(w.tolist()), tokenizer)
        for w in benchmark._held_out_windows(corpus.tokens("val"), 2, 20)
    ]
    assert share.reference == pytest.approx(100 * sum(r.copied_spans for r in reports) / sum(r.spans for r in reports))
    assert any("index of" in line for line in lines)
    only_speed = benchmark.memorization(corpus, samples=1, new_tokens=20, repeats=1, log=lambda _: None)
    assert [row.name for row in only_speed] == ["memorization_speed"]


@pytest.mark.slow
def test_cli_memorization_rows_measure_the_named_model(studio_store, tmp_path, monkeypatch, capsys):
    from pipelines import benchmark as cli

    monkeypatch.chdir(tmp_path)  # the corpus cache (data/) goes to the scratch folder
    (tmp_path / "scene.txt").write_text(SCENE)
    args = ["--quick", "--json", "--only", "memorization", "--data", str(tmp_path / "scene.txt")]
    assert cli.main(args) == 0
    assert [row["name"] for row in json.loads(capsys.readouterr().out)["rows"]] == ["memorization_speed"]
    assert cli.main([*args, "--model", "shakespeare-gpt@champion"]) == 0
    captured = capsys.readouterr()
    speed, share = json.loads(captured.out)["rows"]
    assert (speed["name"], share["name"]) == ("memorization_speed", "memorization_share")
    assert share["note"].startswith("shakespeare-gpt/1: 4 samples × 200 new tokens")
    assert "memorization: the copy index vs a scan of the training split and shakespeare-gpt/1" in captured.err


@pytest.mark.slow  # a real `pipelines.train --time-budget` process, then its model through transformers
def test_the_quality_row_trains_a_budget_run_as_a_user_does_and_checks_it_with_transformers(tmp_path, shakespeare_path):
    corpus = tmp_path / "head.txt"
    corpus.write_text(shakespeare_path.read_text()[:30_000])
    shape = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--batch-size", "4", "--block-size", "32"]
    lines: list[str] = []
    quality, wall, hf = benchmark.quality_budget(12.0, str(corpus), train_args=shape, log=lines.append)
    assert quality.name == "quality_0.2m" and quality.unit == "bits/char"
    assert quality.reference == 2.71 and quality.ratio == pytest.approx(2.71 / quality.ours)
    assert 2.0 < quality.ours < 12.0  # a 1-layer model after seconds: far from good, far from uniform (15.6)
    assert "steps (anchors: char-level CPU 2.71" in quality.note and "ROMEO:" in quality.note
    assert wall.name == "budget_wall_0.2m" and wall.reference == 12.0 and wall.ours > 12.0 * 0.5
    # transformers, on the registered model's Hugging Face export, computes the run's best held-out figure: the
    # version registered is the best-validation checkpoint, and the shared-row training is a plain GPT-2.
    assert hf.name == "quality_hf_0.2m" and hf.reference == quality.ours
    assert hf.ours == pytest.approx(quality.ours, rel=1e-3)
    assert any("--time-budget 12s" in line for line in lines)


def test_the_compare_fetch_row_reads_back_every_point_of_its_fixture_through_mlflow():
    lines: list[str] = []
    row = benchmark.compare_fetch(runs=2, steps=300, repeats=1, log=lines.append)  # raises if a point is missing
    assert row.name == "compare_fetch" and row.unit == "s" and row.ours > 0 and row.reference > 0
    assert "2 runs × 300 steps × 6 charts" in row.note and len(lines) == 1


def test_the_page_rows_render_the_models_page_and_compare_runs_over_a_real_store():
    lines: list[str] = []
    rows = benchmark.page_renders(versions=3, runs=2, steps=400, repeats=1, log=lines.append)
    assert [row.name for row in rows] == ["models_page", "compare_runs_page"]
    assert all(row.unit == "s" and row.ours > 0 and row.reference == 2.0 for row in rows)
    assert "3 versions over 2 runs of 400 steps" in rows[0].note and len(lines) == 2


def test_llamacpp_rows_time_both_engines_on_the_same_weights_per_precision():
    from tests.conftest import require_llama_cpp

    require_llama_cpp()
    lines: list[str] = []
    rows = benchmark.llamacpp_rows(new_tokens=6, repeats=1, log=lines.append, config=TINY_256)
    assert [row.name for row in rows] == [
        "llamacpp_f32",
        "llamacpp_q8_0",
        "llamacpp_f16",
        "llamacpp_f16_bf16",
        "llamacpp_q4_0",
    ]
    for row in rows:
        assert row.unit == "tokens/s" and row.ours > 0 and row.reference > 0
        assert row.ratio == pytest.approx(row.ours / row.reference)
        assert "2 layers × 32 dims" in row.note and "ranges" in row.note
    assert any("int4 vs Q4_0 1/1" in line for line in lines)


def test_cli_llamacpp_rows_say_how_to_install_llama_cpp_when_it_is_missing(monkeypatch, capsys):
    import builtins

    from pipelines import benchmark as cli

    real_import = builtins.__import__

    def without_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_llama_cpp)
    with pytest.raises(SystemExit) as exited:
        run(cli.main, ["--only", "llamacpp"])
    assert exited.value.code == 2
    assert "pip install -r requirements-llamacpp.txt" in capsys.readouterr().err


def test_bf16_training_rows_compare_speed_and_loss_curves_or_say_why_not(monkeypatch):
    from core import device as device_module

    lines: list[str] = []
    monkeypatch.setattr(device_module, "matmul_gflops", lambda dtype, size=512: 1.0 if dtype == torch.bfloat16 else 9.0)
    assert benchmark.bf16_training("tiny", steps=2, repeats=1, log=lines.append) == []
    assert "bf16 training would be slower here" in lines[-1]
    monkeypatch.setattr(device_module, "matmul_gflops", lambda dtype, size=512: 9.0)
    speed, loss = benchmark.bf16_training("tiny", steps=3, repeats=1, log=lines.append)
    assert speed.name == "train_bf16" and speed.ours > 0 and speed.reference > 0
    assert loss.name == "train_bf16_loss" and 0.9 < loss.ratio <= 1.0 and "largest gap" in loss.note
