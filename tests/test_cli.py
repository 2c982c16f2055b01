"""The command-line entry points, run as real subprocesses the way a user runs them; the many one-line refusals of
bad flags run in this process (:func:`cli_in_process`: the same parser, checks and exit codes, without the few
seconds each new Python process spends importing torch)."""

import json
import os
import subprocess
import sys

import pytest

from core.config import TrainConfig
from tests.conftest import REPO, assert_usage_error, cli_in_process

pytestmark = pytest.mark.slow


def cli(*args: str, timeout: int = 180, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=os.environ.copy() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("module", ["pipelines.prepare_data", "pipelines.inspect", "pipelines.generate"])
def test_help(module):
    result = cli(module, "--help")
    assert result.returncode == 0
    assert "usage:" in result.stdout


def test_inspect_gpt2_json():
    result = cli_in_process("pipelines.inspect", "--preset", "gpt2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["total_params"] == 124_439_808
    assert report["trainable_params"] == 124_439_808
    assert f"{report['size_mb']:.2f}" == "474.70"
    assert {c["group"] for c in report["components"]} >= {"token_embedding", "attention", "mlp", "lm_head"}


def test_inspect_table_and_checkpoint(tiny_checkpoint):
    table = cli_in_process("pipelines.inspect", "--preset", "gpt2")
    assert table.returncode == 0 and "124,439,808" in table.stdout and "474.70 MB" in table.stdout
    checkpoint = cli_in_process("pipelines.inspect", "--checkpoint", str(tiny_checkpoint), "--json")
    from_checkpoint = json.loads(checkpoint.stdout)
    assert from_checkpoint["config"]["n_layer"] == 2


def test_prepare_data_reports_the_reference_split(shakespeare_path, tmp_path):
    result = cli_in_process("pipelines.prepare_data", "--source", str(shakespeare_path), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "301,966" in result.stdout and "36,059" in result.stdout
    assert len(list(tmp_path.glob("*/train.bin"))) == 1


def test_generate_writes_k_samples(tiny_checkpoint):
    result = cli_in_process(
        "pipelines.generate",
        "--checkpoint",
        str(tiny_checkpoint),
        "--prompt",
        "ROMEO:",
        "--num-samples",
        "3",
        "--max-new-tokens",
        "8",
        "--seed",
        "1",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("──── sample") == 3
    assert result.stdout.count("ROMEO:") == 3
    assert "tokens/s" in result.stderr


def test_generate_json_is_reproducible(tiny_checkpoint):
    """The same samples from a new process as from this one: the seed is the whole of the randomness."""
    args = (
        "pipelines.generate",
        "--checkpoint",
        str(tiny_checkpoint),
        "--prompt",
        "ROMEO:",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "8",
        "--seed",
        "7",
        "--json",
    )
    first, second = json.loads(cli(*args).stdout), json.loads(cli_in_process(*args).stdout)
    assert len(first["samples"]) == 2
    assert all(s.startswith("ROMEO:") for s in first["samples"])
    assert first["tokens_per_sec"] > 0
    assert first["samples"] == second["samples"]


def test_generate_measures_how_much_each_sample_copies(tiny_checkpoint, tmp_path, tokenizer, monkeypatch):
    from core.config import DataConfig
    from core.data import prepare_corpus
    from core.memorization import index_for

    base = ("pipelines.generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "ROMEO:", "--seed", "3")
    base += ("--num-samples", "2", "--max-new-tokens", "24")
    first = json.loads(cli_in_process(*base, "--no-memorization", "--json").stdout)
    assert first["memorization"] is None and first["memorization_corpus"] is None
    # A training split that holds the samples' own continuations: the meter must find them there.
    corpus_path = tmp_path / "corpus.txt"
    continuations = [sample.removeprefix("ROMEO:") for sample in first["samples"]]
    corpus_path.write_text("\n\n".join(continuations) + "\n\nJULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n" * 30)
    measured = cli_in_process(*base, "--data", str(corpus_path), "--json")
    assert measured.returncode == 0, measured.stderr
    document = json.loads(measured.stdout)
    assert document["samples"] == first["samples"]
    corpus = prepare_corpus(DataConfig(source=str(corpus_path), cache_dir=str(REPO / "data")), tokenizer)
    assert document["memorization_corpus"]["sha256"] == corpus.meta["sha256"]
    expected = [index_for(corpus).report_text(text, tokenizer) for text in continuations]
    assert document["memorization"] == [report.to_dict() for report in expected]
    assert max(report["copied_share"] for report in document["memorization"]) > 0.5
    human = cli_in_process(*base, "--data", str(corpus_path))
    assert [line for line in human.stdout.splitlines() if line.startswith("(copied:")] == [
        f"({report.summary()})" for report in expected
    ]
    assert_usage_error(cli_in_process(*base, "--data", str(tmp_path / "missing.txt")), "corpus file not found")
    # The default corpus out of reach (here: missing) is one line; the samples still come.
    monkeypatch.setenv("SHAKESPEARE_SOURCE", str(tmp_path / "missing.txt"))
    unmeasured = cli_in_process(*base, "--json")
    assert unmeasured.returncode == 0 and json.loads(unmeasured.stdout)["memorization"] is None
    assert [line for line in unmeasured.stderr.splitlines() if "memorisation not measured" in line] == [
        next(line for line in unmeasured.stderr.splitlines() if "corpus file not found" in line)
    ]


def test_generate_int8_streams_and_prints_only_the_text(tiny_checkpoint):
    args = ("pipelines.generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "ROMEO:", "--quantize", "int8")
    result = cli_in_process(*args, "--max-new-tokens", "8", "--seed", "2", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["new_tokens"] == [8] and document["samples"][0].startswith("ROMEO:")
    assert "Warning" not in result.stderr  # torch's deprecation notices about quantized tensors are kept out
    streamed = cli_in_process(*args, "--max-new-tokens", "4")
    assert streamed.returncode == 0 and streamed.stdout.startswith("ROMEO:")
    assert streamed.stderr.strip().splitlines()[-1].startswith("4 new tokens at")


def test_generate_streams_one_sample_and_notices_cropping(tiny_checkpoint):
    prompt = "Now is the winter of our discontent. " * 20
    result = cli_in_process(
        "pipelines.generate",
        "--checkpoint",
        str(tiny_checkpoint),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "5",
        "--seed",
        "3",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt)
    assert "notice: the prompt is longer" in result.stderr


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--prompt", "   "], "prompt is empty"),
        (["--prompt", "a", "--max-new-tokens", "0"], "max_new_tokens"),
        (["--prompt", "a", "--max-new-tokens", "999999"], "max_new_tokens"),
        (["--prompt", "a", "--num-samples", "0"], "num_samples"),
        (["--prompt", "a", "--num-samples", "64"], "num_samples"),
        (["--prompt", "a", "--temperature", "-1"], "temperature"),
        (["--prompt", "a", "--temperature", "inf"], "temperature"),
        (["--prompt", "a", "--top-k", "0"], "top_k"),
        (["--prompt", "a", "--top-k", "-3"], "top_k"),
        (["--prompt", "a", "--top-p", "0"], "top_p"),
        (["--prompt", "a", "--top-p", "-0.5"], "top_p"),
        (["--prompt", "a", "--top-p", "1.5"], "top_p"),
        (["--prompt", "a", "--max-new-tokens", "lots"], "invalid int value"),
        (["--prompt", "a", "--device", "tpu"], "unknown device"),
        (["--prompt", "a", "--quantize", "int3"], "invalid choice"),
        (["--prompt", "a", "--quantize", "int4", "--device", "cuda"], "cuda"),
        (["--prompt", "a", "--quantize", "int8", "--device", "cuda"], "cuda"),  # CPU only, and no GPU here
    ],
)
def test_generate_bad_input_is_one_line_and_exit_2(tiny_checkpoint, extra, fragment):
    assert_usage_error(cli_in_process("pipelines.generate", "--checkpoint", str(tiny_checkpoint), *extra), fragment)


def test_generate_bad_checkpoints(tmp_path, tiny_checkpoint):
    assert_usage_error(
        cli_in_process("pipelines.generate", "--checkpoint", str(tmp_path / "none"), "--prompt", "a"), "not found"
    )
    weights = tiny_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    assert_usage_error(
        cli_in_process("pipelines.generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a"), "corrupt"
    )


def test_prepare_data_bad_sources(tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)))
    assert_usage_error(
        cli_in_process("pipelines.prepare_data", "--source", str(binary), "--out", str(tmp_path)), "binary"
    )
    for content, fragment in ((b" \n\t", "empty"), ("Ç'est la vie".encode("latin-1"), "not UTF-8")):
        bad = tmp_path / "bad.txt"
        bad.write_bytes(content)
        assert_usage_error(
            cli_in_process("pipelines.prepare_data", "--source", str(bad), "--out", str(tmp_path)), fragment
        )
    assert not list(tmp_path.glob("*/meta.json"))  # nothing prepared
    assert_usage_error(
        cli_in_process("pipelines.prepare_data", "--source", str(tmp_path / "x.txt"), "--out", str(tmp_path)),
        "not found",
    )
    assert_usage_error(cli_in_process("pipelines.prepare_data", "--val-fraction", "2"), "val_fraction")


def test_inspect_bad_input():
    assert_usage_error(cli_in_process("pipelines.inspect", "--preset", "huge"), "invalid choice")
    assert_usage_error(cli_in_process("pipelines.inspect", "--preset", "tiny", "--n-head", "3"), "divisible")
    assert_usage_error(cli_in_process("pipelines.inspect", "--preset", "tiny", "--n-layer", "-1"), "positive integer")


def test_generate_from_the_registry_by_name_version_and_alias(tiny_checkpoint, tmp_path, monkeypatch):
    from core.registry import log_and_register
    from core.store import connect, ensure_experiment

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    client = connect(uri)
    run = client.create_run(ensure_experiment(client, "cli"))
    log_and_register(client, run.info.run_id, tiny_checkpoint, name="bard", alias="champion")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for ref in ("bard/1", "models:/bard@champion"):  # every form of reference is resolved in test_registry
        result = cli_in_process(
            "pipelines.generate", "--model", ref, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--json"
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["samples"][0].startswith("ROMEO:")
        assert "model: bard/1" in result.stderr
    assert_usage_error(
        cli_in_process("pipelines.generate", "--model", "nosuch", "--prompt", "x"), "registered models: bard"
    )
    assert_usage_error(cli_in_process("pipelines.generate", "--model", "bard/7", "--prompt", "x"), "has no version 7")
    assert_usage_error(
        cli_in_process("pipelines.generate", "--model", "bard@prod", "--prompt", "x"), "@champion (version 1)"
    )
    # With nothing given, the default name is looked up and its absence is explained.
    assert_usage_error(cli_in_process("pipelines.generate", "--prompt", "x"), "registered models: bard")
    both = cli_in_process(
        "pipelines.generate", "--model", "bard", "--checkpoint", str(tiny_checkpoint), "--prompt", "x"
    )
    assert_usage_error(both, "not allowed with argument")


def test_generate_with_an_empty_store_says_how_to_get_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert_usage_error(cli("pipelines.generate", "--prompt", "x"), "no model is registered yet")  # a new process


def test_an_unreachable_tracking_server_is_one_line(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert_usage_error(cli_in_process("pipelines.generate", "--prompt", "x"), "cannot reach the MLflow tracking server")


# ---- training flags of the GPU path: --pad-vocab, --compile, --peak-tflops ----


def train_configs(*argv: str):
    from pipelines.train import build_configs, build_parser

    return build_configs(build_parser().parse_args(["--device", "cpu", *argv]))


def test_train_gpu_flags_reach_the_configs():
    model, _, train, _ = train_configs()
    assert (model.pad_vocab_multiple, train.compile, train.peak_tflops) == (1, False, None)
    model, _, train, _ = train_configs("--pad-vocab", "64", "--compile", "--peak-tflops", "312")
    assert model.pad_vocab_multiple == 64 and model.padded_vocab_size == 50_304
    assert (model.n_layer, model.n_embd) == (4, 128)  # the rest of the preset is untouched
    assert train.compile is True and train.peak_tflops == 312


def test_pad_vocab_applies_to_init_from_and_the_weights_load_padded(tmp_path, tiny_model, shakespeare_path):
    import dataclasses

    import torch

    from core.hf import export_hf
    from core.trainer import Trainer

    folder = tmp_path / "hf"
    export_hf(tiny_model, folder)
    corpus = tmp_path / "head.txt"
    corpus.write_text(shakespeare_path.read_text()[:20_000])
    argv = ["--init-from", str(folder), "--data", str(corpus), "--block-size", "16", "--batch-size", "2"]
    unpadded, *_ = train_configs(*argv)
    assert unpadded.pad_vocab_multiple == 1
    # The shape comes from the checkpoint; the padding is the studio's own layout, so it still applies.
    model_config, data_config, train_config, _ = train_configs(*argv, "--pad-vocab", "64")
    assert model_config == dataclasses.replace(unpadded, pad_vocab_multiple=64)
    data_config = dataclasses.replace(data_config, cache_dir=str(tmp_path / "data"))
    trainer = Trainer(model_config, data_config, train_config)
    wte = trainer.model.transformer.wte.weight
    assert wte.shape == (50_304, 32)
    torch.testing.assert_close(wte[:50_257], tiny_model.transformer.wte.weight, rtol=0, atol=0)
    assert not wte[50_257:].any()  # the padding rows start at zero and are never predicted


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--peak-tflops", "0"], "peak_tflops must be a number of TFLOP/s"),
        (["--peak-tflops", "9.89e14"], "e.g. 989 for an H100 SXM"),
        (["--peak-tflops", "fast"], "invalid float value"),
        (["--pad-vocab", "0"], "expected a positive integer"),
        (["--pad-vocab", "2048"], "pad_vocab_multiple must be an integer in 1..1024"),
        (["--alias", "latest"], "reserved by MLflow"),  # refused before training, not by the registry after it
        (["--time-budget", "0"], "a duration must be longer than zero, got '0'"),
        (["--time-budget", "-5m"], "a duration must be longer than zero, got '-5m'"),
        (["--time-budget", "ten"], "a duration looks like 90s, 10m or 1h, got 'ten'"),
        (["--time-budget", "5s"], "time_budget must be at least 10 seconds"),
    ],
)
def test_train_bad_gpu_flags_are_one_line_and_exit_2(extra, fragment):
    assert_usage_error(cli_in_process("pipelines.train", "--device", "cpu", *extra), fragment)


# ---- resumable training: SIGTERM, then --resume in a new process ----


def test_train_stopped_by_sigterm_resumes_in_a_new_process_as_the_same_run(tmp_path, shakespeare_path):
    import signal
    import time

    from mlflow import MlflowClient

    corpus = tmp_path / "head.txt"
    corpus.write_text(shakespeare_path.read_text()[:20_000])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    steps = 60  # a few hundred milliseconds of margin after the first checkpoint, even on a fast machine
    argv = [
        "--preset", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context", "32",
        "--block-size", "32", "--batch-size", "4", "--max-steps", str(steps), "--target-loss", "0",
        "--eval-interval", "50", "--sample-interval", "0", "--device", "cpu", "--data", str(corpus),
        "--experiment", "resume-cli", "--checkpoint-root", str(tmp_path / "checkpoints"),
        "--checkpoint-interval", "5", "--log-interval", "1000",
    ]  # fmt: skip
    first = subprocess.Popen(
        [sys.executable, "-m", "pipelines.train", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        run_id = next((line.split()[-1] for line in first.stdout if line.startswith("mlflow run: ")), None)
        assert run_id is not None, "the training printed no run id"
        pointer = tmp_path / "checkpoints" / run_id / "resume" / "latest.json"
        deadline = time.monotonic() + 120
        while not pointer.exists():  # the first periodic checkpoint: training is under way
            assert first.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
        output = first.stdout.read()
        assert first.wait(timeout=120) == 130, output
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        first.stdout.close()

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["stop_reason"] == "stopped: SIGTERM"
    stopped_at = max(m.step for m in client.get_metric_history(run_id, "loss"))
    assert 5 <= stopped_at < steps
    assert json.loads(pointer.read_text())["step"] == stopped_at  # the stop wrote a checkpoint of its last step

    # No --checkpoint-root: the run's checkpoint_dir tag says where its checkpoints are.
    second = cli("pipelines.train", "--resume", run_id, env=env, timeout=300)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming run {run_id} after step {stopped_at} of {steps}" in second.stdout
    assert f"run {run_id} ended FINISHED" in second.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == str(stopped_at)
    for name in ("loss", "avg_loss", "best_loss", "lr", "time_per_batch", "tokens_per_sec"):
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == list(range(1, steps + 1)), name


def test_a_training_spec_is_the_whole_setting_and_a_bad_one_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert_usage_error(cli_in_process("pipelines.train", "--spec", str(tmp_path / "none.json")), "no such file")
    spec = tmp_path / "spec.json"
    spec.write_text("{not json")
    assert_usage_error(cli_in_process("pipelines.train", "--spec", str(spec)), "not a readable JSON file")
    spec.write_text('{"kind": "sweep"}')
    assert_usage_error(cli_in_process("pipelines.train", "--spec", str(spec)), "not a training job's spec")
    spec.write_text('{"kind": "train", "resume": "abc"}')
    assert_usage_error(cli_in_process("pipelines.train", "--spec", str(spec), "--lr", "1"), "drop --lr")
    assert not (tmp_path / "mlflow.db").exists()


def test_train_help_is_the_config_fields_docstrings_with_their_defaults():
    from pipelines.cli import field_docs
    from pipelines.train import build_parser

    text = " ".join(build_parser().format_help().split())
    assert field_docs(TrainConfig)["weight_decay"] in text and "(default 0.1)" in text
    assert "Hard limit on optimizer steps; also the length of the OneCycle schedule. (default 20,000)" in text
    assert "--tie-unused-tokens, --no-tie-unused-tokens" in text
    assert "(default: the model's context)" in text  # a default the entry point derives, said in words


def test_train_resume_errors_are_one_line_and_change_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert_usage_error(cli_in_process("pipelines.train", "--resume", "a" * 32), "the tracking store")
    assert not (tmp_path / "mlflow.db").exists()
    assert_usage_error(cli_in_process("pipelines.train", "--resume", "a" * 32, "--lr", "1"), "drop --lr")
    assert_usage_error(cli_in_process("pipelines.train", "--checkpoint-interval", "-1"), "checkpoint_interval")
    assert_usage_error(cli_in_process("pipelines.train", "--keep-checkpoints", "0"), "positive integer")


# ---- bad input everywhere: the generate CLI's prompt, caps and weights; the training CLI's corpus and block size ----


def test_generate_help_states_the_caps():
    from core.config import MAX_NEW_TOKENS_CAP, NUM_SAMPLES_CAP

    result = cli("pipelines.generate", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps the help text
    assert f"new tokens per sample, 1..{MAX_NEW_TOKENS_CAP}" in text
    assert f"run as one batch, 1..{NUM_SAMPLES_CAP}" in text


def test_generate_flags_are_the_sampling_configs_fields():
    import dataclasses

    from core.config import SampleConfig
    from pipelines.cli import field_docs
    from pipelines.generate import build_parser, sample_config

    parser = build_parser()
    assert sample_config(parser.parse_args(["--prompt", "x"])) == SampleConfig()  # the defaults are the config's
    given = parser.parse_args(["--prompt", "x", "--top-k", "5", "--seed", "3", "--no-eot-stop", "--temperature", "0"])
    expected = dataclasses.replace(SampleConfig(), top_k=5, seed=3, stop_at_eot=False, temperature=0)
    assert sample_config(given) == expected
    text = " ".join(parser.format_help().split())
    assert field_docs(SampleConfig)["top_p"] in text and "(default 0.8)" in text


def test_generate_takes_emoji_cjk_and_control_characters(tiny_checkpoint):
    prompt = "Emoji 🎭👑 中文：生存还是毁灭 \x07\x1b[31mred\x1b[0m\ttab"  # no \r: text=True reads it back as \n
    base = ("pipelines.generate", "--checkpoint", str(tiny_checkpoint), "--prompt", prompt, "--max-new-tokens", "6")
    result = cli_in_process(*base, "--num-samples", "2", "--seed", "5", "--json")
    assert result.returncode == 0, result.stderr
    samples = json.loads(result.stdout)["samples"]
    assert len(samples) == 2 and all(sample.startswith(prompt) for sample in samples)
    streamed = cli(*base, "--seed", "5")  # one sample streams to the terminal as text
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout.startswith(prompt)


def test_generate_refuses_a_prompt_that_is_not_utf8(tiny_checkpoint):
    # A terminal in another encoding passes bytes that are not UTF-8; Python carries them as lone surrogates.
    argv = [sys.executable, "-m", "pipelines.generate", "--checkpoint", str(tiny_checkpoint), "--prompt"]
    env = {**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"}
    result = subprocess.run(
        [os.fsencode(a) for a in argv] + [b"caf\xe9"], cwd=REPO, env=env, capture_output=True, timeout=180
    )
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2 and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and "lone surrogate" in stderr


def test_generate_refuses_nan_weights(tiny_checkpoint):
    from safetensors.torch import load_file, save_file

    weights = tiny_checkpoint / "model.safetensors"
    state = load_file(str(weights))
    state["transformer.h.0.attn.c_attn.weight"][0, 0] = float("nan")
    save_file(state, str(weights))
    assert_usage_error(
        cli_in_process("pipelines.generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a"), "NaN"
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "empty"),
        (bytes(range(256)), "binary"),
        ("Ç'est la vie".encode("latin-1"), "not UTF-8"),
    ],
)
def test_train_refuses_an_unusable_corpus_before_any_run(tmp_path, monkeypatch, content, fragment):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    result = cli_in_process("pipelines.train", "--device", "cpu", "--data", str(corpus), "--max-steps", "1")
    assert_usage_error(result, fragment)
    assert not (tmp_path / "mlflow.db").exists()  # refused before any run was created


def test_train_refuses_a_block_size_above_the_context(tmp_path, monkeypatch, shakespeare_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    result = cli_in_process(
        "pipelines.train", "--device", "cpu", "--preset", "tiny", "--block-size", "256", "--data", str(shakespeare_path)
    )
    assert_usage_error(result, "block size 256 is above the model's context of 128; use --block-size 128 or less")


def test_several_models_write_side_by_side_what_each_writes_alone(tmp_path, monkeypatch, tiny_checkpoint, tiny_model):
    import torch

    from core.checkpoint import save_checkpoint
    from core.leaderboard import DECODE_SPEED_TAG
    from core.model import GPT
    from core.registry import log_and_register
    from core.store import connect, ensure_experiment

    torch.manual_seed(9)
    other = save_checkpoint(GPT(tiny_model.config).eval(), tmp_path / "other")
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    client = connect(uri)
    for checkpoint in (tiny_checkpoint, other):
        log_and_register(client, client.create_run(ensure_experiment(client, "cli")).info.run_id, checkpoint, "bard")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    base = ("pipelines.generate", "--prompt", "ROMEO:", "--max-new-tokens", "10", "--no-memorization", "--json")
    both = cli_in_process(*base, "--model", "bard/1", "--model", "bard/2", "--seed", "5")
    assert both.returncode == 0, both.stderr
    document = json.loads(both.stdout)
    assert (document["prompt"], document["seed"]) == ("ROMEO:", 5)
    assert [m["model"] for m in document["models"]] == ["bard/1", "bard/2"]
    for entry in document["models"]:
        alone = json.loads(cli_in_process(*base, "--model", entry["model"], "--seed", "5").stdout)
        assert entry["samples"] == alone["samples"] and entry["tokens_per_sec"] > 0
    assert document["models"][0]["samples"] != document["models"][1]["samples"]  # two different models
    # The measured speed is kept on each version for the Models page.
    assert client.get_model_version("bard", "2").tags[DECODE_SPEED_TAG].endswith("(cpu, fp32, 1 × 10 tokens)")
    unseeded = json.loads(cli_in_process(*base, "--model", "bard/1", "--model", "bard/2").stdout)
    assert {m["seed"] for m in unseeded["models"]} == {unseeded["seed"]}  # one seed drawn for all
    human = cli_in_process(*base[:-1], "--model", "bard/1", "--model", "bard/2")
    assert human.stdout.count("════ bard/") == 2 and human.stdout.count("──── sample 1/1") == 2
    assert_usage_error(cli_in_process(*base, *["--model", "bard/1"] * 2), "named twice")
    five = [arg for v in range(1, 6) for arg in ("--model", f"bard/{v}")]
    assert_usage_error(cli_in_process(*base, *five), "at most 4 models write side by side, got 5")
