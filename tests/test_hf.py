"""Hugging Face interop: export to GPT2LMHeadModel, load HF GPT-2 folders, the export CLI and --init-from."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from core.config import DataConfig, ModelConfig, SampleConfig, TrainConfig
from core.errors import UsageError
from core.hf import (
    HFFormatError,
    export_hf,
    from_hf_state_dict,
    hf_config_dict,
    load_hf_checkpoint,
    read_hf_config,
    to_hf_state_dict,
)
from core.model import GPT
from core.sampling import encode_prompt, stream_tokens
from pipelines.cli import run
from tests.conftest import REPO, TINY

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # keep its load reports and progress bars out of the test output
transformers.logging.disable_progress_bar()


def hf_folder(path, **config):
    """A randomly initialised transformers GPT-2 saved as Hugging Face does it (safetensors)."""
    torch.manual_seed(1)
    fields = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, **config}
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields))
    model.save_pretrained(path, safe_serialization=True)
    return path


def lively(model: GPT) -> GPT:
    """``model`` with weights perturbed to O(0.1), so activations reach the range where GELU variants differ.

    (GPT-2's 0.02 init keeps every pre-activation so close to 0 that even an erf-vs-tanh GELU mix-up would pass.)
    """
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def same_weights(a: GPT, b: GPT) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- export: the same model in transformers ----


def test_export_gives_the_same_logits_and_greedy_text_in_transformers(tmp_path, tiny_model, tokenizer):
    tiny_model = lively(tiny_model)
    written = export_hf(tiny_model, tmp_path / "hf")
    assert sorted(written) == ["config.json", "generation_config.json", "model.safetensors"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.activation_function == "gelu_new" and hf.config.tie_word_embeddings
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()

    idx = torch.randint(0, 50257, (3, TINY.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, _ = tiny_model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    prompt, _ = encode_prompt(tokenizer, "ROMEO:", TINY.block_size)
    config = SampleConfig(max_new_tokens=20, temperature=0, top_k=None)
    studio = [int(tokens[0]) for tokens, _ in stream_tokens(tiny_model, prompt, config, eot_token=tokenizer.eot)]
    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
            max_new_tokens=20,
        )  # fmt: skip
    assert out[0, len(prompt) :].tolist() == studio
    assert len(studio) == 20 or studio[-1] == tokenizer.eot


def test_config_document_matches_the_model(tiny_config):
    document = hf_config_dict(dataclasses.replace(tiny_config, dropout=0.2))
    assert document["model_type"] == "gpt2" and document["architectures"] == ["GPT2LMHeadModel"]
    assert (document["n_positions"], document["n_layer"], document["n_head"], document["n_embd"]) == (32, 2, 2, 32)
    assert document["resid_pdrop"] == document["embd_pdrop"] == document["attn_pdrop"] == 0.2
    assert document["layer_norm_epsilon"] == 1e-5 and document["bos_token_id"] == document["eos_token_id"] == 50256
    transformers.GPT2Config(**document)  # accepted as is
    with pytest.raises(HFFormatError, match="50257"):
        hf_config_dict(dataclasses.replace(tiny_config, vocab_size=50304))


def test_conv1d_weights_are_transposed_and_buffers_left_out(tiny_model):
    state = to_hf_state_dict(tiny_model)
    assert "lm_head.weight" not in state and not any(k.endswith(".attn.bias") for k in state)
    linear = tiny_model.transformer.h[0].attn.c_attn.weight
    assert torch.equal(state["transformer.h.0.attn.c_attn.weight"], linear.t())
    assert torch.equal(state["transformer.h.1.mlp.c_proj.weight"], tiny_model.transformer.h[1].mlp.c_proj.weight.t())


def test_a_model_without_biases_exports_zero_biases(tmp_path):
    torch.manual_seed(0)
    model = lively(GPT(dataclasses.replace(TINY, bias=False)))
    export_hf(model, tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert not hf.transformer.h[0].attn.c_attn.bias.any()
    idx = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


# ---- loading Hugging Face folders ----


def test_export_then_load_round_trips_the_weights(tmp_path, tiny_model):
    export_hf(tiny_model, tmp_path / "hf")
    loaded = load_hf_checkpoint(tmp_path / "hf")
    assert loaded.config == tiny_model.config and not loaded.training
    assert same_weights(loaded, tiny_model)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_vocabulary_padding_is_left_out_of_exports_and_added_on_import(tiny_model, tiny_config):
    padded_config = dataclasses.replace(tiny_config, pad_vocab_multiple=64)
    padded = GPT(padded_config)
    padded.load_state_dict(from_hf_state_dict(to_hf_state_dict(tiny_model), padded_config))
    wte = padded.transformer.wte.weight
    assert wte.shape == (padded_config.padded_vocab_size, tiny_config.n_embd)
    assert torch.equal(wte[: tiny_config.vocab_size], tiny_model.transformer.wte.weight)
    assert not wte[tiny_config.vocab_size :].any()
    exported = to_hf_state_dict(padded)
    assert exported["transformer.wte.weight"].shape == (tiny_config.vocab_size, tiny_config.n_embd)
    idx = torch.randint(0, tiny_config.vocab_size, (1, 8))
    torch.testing.assert_close(padded.eval()(idx)[0], tiny_model(idx)[0])


def test_a_folder_saved_by_transformers_loads_with_the_same_logits(tmp_path):
    folder = hf_folder(tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    model = load_hf_checkpoint(folder, block_size=48)  # context cropped from 64
    assert model.config.block_size == 48 and model.config.dropout == 0.1  # resid_pdrop
    assert torch.equal(model.transformer.wpe.weight, hf.transformer.wpe.weight[:48])
    idx = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, atol=1e-5, rtol=0)


def test_sharded_folders_and_unprefixed_keys_with_mask_buffers_load(tmp_path, tiny_model):
    sharded = tmp_path / "sharded"
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64))
    model.save_pretrained(sharded, max_shard_size="400KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    loaded = load_hf_checkpoint(sharded)
    assert torch.equal(loaded.transformer.h[1].mlp.c_fc.weight, model.transformer.h[1].mlp.c_fc.weight.t())

    # The layout of older files (e.g. the hub's gpt2): no "transformer." prefix, causal-mask buffers, tied head.
    export_hf(tiny_model, tmp_path / "old")
    weights = tmp_path / "old" / "model.safetensors"
    state = {k.removeprefix("transformer."): v for k, v in load_file(weights).items()}
    state.update({f"h.{i}.attn.bias": torch.ones(1, 1, 32, 32) for i in range(2)})
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"].clone()
    save_file(state, str(weights), metadata={"format": "pt"})
    assert same_weights(load_hf_checkpoint(tmp_path / "old"), tiny_model)


class _Boom:
    """Unpickling this would create a folder: proof that the loader opened the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_pickled_checkpoint_is_refused_without_unpickling(tmp_path, monkeypatch):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2}))
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))

    def forbidden(*args, **kwargs):
        raise AssertionError("the loader must never unpickle")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    with pytest.raises(HFFormatError, match="convert it to safetensors first") as caught:
        load_hf_checkpoint(folder)
    assert "pytorch_model.bin" in str(caught.value) and "\n" not in str(caught.value)
    assert not marker.exists()


def _tamper(folder, **changes):
    document = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**document, **changes}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "llama"}, "only GPT-2"),
        ({"vocab_size": 50304}, "50257"),
        ({"activation_function": "relu"}, "activation_function"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
        ({"n_inner": 100}, "n_inner"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings"),
        ({"n_layer": 3}, "missing ['h.2.ln_1.weight'"),
        ({"n_embd": 64}, "has shape"),
    ],
)
def test_folders_the_studio_cannot_reproduce_are_refused_in_one_line(tmp_path, tiny_model, change, message):
    export_hf(tiny_model, tmp_path / "hf")
    _tamper(tmp_path / "hf", **change)
    with pytest.raises(HFFormatError, match=message.replace("[", r"\[")) as caught:
        load_hf_checkpoint(tmp_path / "hf")
    assert "\n" not in str(caught.value)


def test_missing_corrupt_or_untied_weights_are_refused(tmp_path, tiny_model):
    export_hf(tiny_model, tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    state = load_file(weights)
    with pytest.raises(HFFormatError, match="missing"):
        from_hf_state_dict({k: v for k, v in state.items() if "ln_f" not in k}, TINY)
    with pytest.raises(HFFormatError, match="unexpected"):
        from_hf_state_dict({**state, "score.weight": torch.zeros(2, 32)}, TINY)
    with pytest.raises(HFFormatError, match="tied LM head"):
        from_hf_state_dict({**state, "lm_head.weight": torch.zeros(50257, 32)}, TINY)
    with pytest.raises(HFFormatError, match="NaN"):
        from_hf_state_dict({**state, "transformer.ln_f.bias": torch.full((32,), float("nan"))}, TINY)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(HFFormatError, match="truncated or corrupt"):
        load_hf_checkpoint(tmp_path / "hf")
    with pytest.raises(HFFormatError, match="not found"):
        load_hf_checkpoint(tmp_path / "nowhere")
    with pytest.raises(HFFormatError, match="longer than"):
        read_hf_config(tmp_path / "hf", block_size=64)


# ---- the export CLI ----


def cli_run(main, argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        run(main, argv)
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


def test_cli_exports_a_registered_model_and_refuses_a_non_empty_out(studio_store, tmp_path, tiny_model, capsys):
    from pipelines.export import main

    out = tmp_path / "exports" / "champion"
    code, stdout, stderr = cli_run(main, ["--model", "shakespeare-gpt@champion", "--out", str(out)], capsys)
    assert code == 0, stderr
    assert "exported shakespeare-gpt/1" in stdout and "GPT2LMHeadModel.from_pretrained(" in stdout
    assert same_weights(load_hf_checkpoint(out), tiny_model)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert [p.name for p in out.parent.iterdir()] == ["champion"]  # no staging folder left behind

    code, _, stderr = cli_run(main, ["--out", str(out)], capsys)  # default: latest shakespeare-gpt
    assert code == 2 and stderr.count("\n") == 1 and "not empty" in stderr and "--force" in stderr

    code, stdout, stderr = cli_run(main, ["--out", str(out), "--force", "--format", "hf"], capsys)
    assert code == 0, stderr

    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "todo.txt").write_text("keep me")
    code, _, stderr = cli_run(main, ["--out", str(unrelated), "--force"], capsys)
    assert code == 2 and "refusing to replace it" in stderr and (unrelated / "todo.txt").is_file()

    code, _, stderr = cli_run(main, ["--model", "nope", "--out", str(tmp_path / "x")], capsys)
    assert code == 2 and stderr.count("\n") == 1 and not (tmp_path / "x").exists()


def test_cli_exports_a_checkpoint_folder_and_verifies_it(tiny_checkpoint, tmp_path, tiny_model, capsys):
    from pipelines.export import main

    out = tmp_path / "hf"
    code, stdout, stderr = cli_run(main, ["--checkpoint", str(tiny_checkpoint), "--out", str(out), "--verify"], capsys)
    assert code == 0, stderr
    assert "verified with transformers" in stdout
    assert same_weights(load_hf_checkpoint(out), tiny_model)


def test_a_failed_export_leaves_nothing_behind(tmp_path, tiny_model, monkeypatch):
    import core.hf

    def failing_verify(model, folder):
        assert (folder / "model.safetensors").is_file()  # checked before it is moved into place
        raise HFFormatError("logits differ")

    monkeypatch.setattr(core.hf, "verify_hf_export", failing_verify)
    with pytest.raises(HFFormatError, match="logits differ"):
        export_hf(tiny_model, tmp_path / "out" / "hf", verify=True)
    assert list((tmp_path / "out").iterdir()) == []


def test_verify_without_transformers_is_a_usage_error(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(UsageError, match="needs the transformers package: pip install transformers"):
        export_hf(tiny_model, tmp_path / "hf", verify=True)
    assert not (tmp_path / "hf").exists()
    export_hf(tiny_model, tmp_path / "hf")  # the export itself does not need it


@pytest.mark.slow
def test_export_cli_as_a_subprocess(tiny_checkpoint, tmp_path):
    def cli(*args):
        command = [sys.executable, "-m", "pipelines.export", *args]
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)

    assert cli("--help").returncode == 0
    done = cli("--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    again = cli("--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "hf"))
    assert again.returncode == 2 and "Traceback" not in again.stderr and len(again.stderr.splitlines()) == 1


# ---- fine-tuning from a Hugging Face folder ----


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, shakespeare_path):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare-head.txt"
    path.write_text(shakespeare_path.read_text()[:20_000])
    return path


def train_args(hf_dir, corpus, *extra):
    from pipelines.train import build_parser

    argv = ["--init-from", str(hf_dir), "--data", str(corpus), "--max-steps", "2", "--batch-size", "2"]
    argv += ["--block-size", "16", "--eval-interval", "0", "--sample-interval", "0", "--target-loss", "0"]
    return build_parser().parse_args([*argv, "--device", "cpu", *extra])


def test_init_from_starts_training_from_the_hf_weights(tmp_path, small_corpus):
    from core.callbacks import Callback
    from core.data import TokenBatches
    from core.trainer import Trainer
    from pipelines.train import build_configs

    folder = hf_folder(tmp_path / "gpt2-tiny")
    model_config, data_config, train_config, tracking = build_configs(
        train_args(folder, small_corpus, "--context", "32", "--dropout", "0")
    )
    assert model_config == ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=0.0)
    assert train_config.init_from == str(folder.resolve()) and tracking.preset == "custom"
    data_config = dataclasses.replace(data_config, cache_dir=str(tmp_path / "data"))

    losses = []

    class Losses(Callback):
        def on_step(self, step, metrics):
            losses.append(metrics["loss"])

    trainer = Trainer(model_config, data_config, train_config, [Losses()])
    x, y = TokenBatches(
        trainer.corpus.tokens("train"), 2, 16, order=data_config.order, seed=data_config.seed
    ).next_batch()
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        logits = hf(x).logits
    hf_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)).item()
    result = trainer.fit(tmp_path / "out")
    assert result.steps == 2 and result.final_checkpoint.is_dir()
    assert losses[0] == pytest.approx(hf_loss, abs=1e-5)
    assert abs(hf_loss - 10.82) < 0.5  # near ln(50257): small random init, so a loose sanity bound only


def test_init_from_shape_overrides_must_agree(tmp_path, small_corpus, capsys):
    from pipelines.train import build_configs, main

    folder = hf_folder(tmp_path / "hf")
    model_config, *_ = build_configs(train_args(folder, small_corpus))
    assert model_config.block_size == 64 and model_config.dropout == 0.1  # n_positions and resid_pdrop
    build_configs(train_args(folder, small_corpus, "--n-layer", "2", "--n-embd", "32"))  # agreeing is fine

    for extra, fragment in [
        (["--preset", "tiny"], "--preset tiny asks for n_layer 4, but --init-from"),
        (["--n-head", "4"], "--n-head 4 asks for n_head 4"),
        (["--context", "128"], "longer than the checkpoint's n_positions 64"),
    ]:
        with pytest.raises(UsageError, match=fragment):
            build_configs(train_args(folder, small_corpus, *extra))
    argv = ["--init-from", str(folder), "--preset", "gpt2", "--data", str(small_corpus)]
    code, _, stderr = cli_run(main, argv, capsys)
    assert code == 2 and stderr.count("\n") == 1 and "--preset gpt2 asks for n_layer 12" in stderr

    with pytest.raises(ValueError, match="init_from must be an existing folder"):
        TrainConfig(init_from=str(tmp_path / "missing"))
    other = tmp_path / "other"
    export_hf(GPT(dataclasses.replace(TINY, n_layer=1)), other)
    with pytest.raises(HFFormatError, match="n_layer 1, but the model is configured with 2"):
        from core.trainer import Trainer

        data = DataConfig(source=str(small_corpus), cache_dir=str(tmp_path / "data"), batch_size=2, block_size=16)
        Trainer(TINY, data, TrainConfig(init_from=str(other), device="cpu"))


@pytest.mark.slow
def test_run_training_records_init_from(tmp_path, small_corpus):
    from core.experiment import run_training
    from core.store import connect
    from pipelines.train import build_configs

    folder = hf_folder(tmp_path / "hf")
    args = train_args(folder, small_corpus, "--context", "32", "--experiment", "hf", "--checkpoint-root", str(tmp_path))
    model_config, data_config, train_config, tracking = build_configs(args)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = dataclasses.replace(tracking, tracking_uri=uri)
    data_config = dataclasses.replace(data_config, cache_dir=str(tmp_path / "data"))
    outcome = run_training(model_config, data_config, train_config, tracking)
    assert outcome.status == "FINISHED"
    run_data = connect(uri).get_run(outcome.run_id).data
    assert run_data.tags["init_from"] == run_data.params["init_from"] == str(folder.resolve())
    assert run_data.params["n_layer"] == "2" and run_data.params["context"] == "32"
