"""A tracked training run end to end: real corpus, real SQLite MLflow store, real registry."""

import os
import signal
from pathlib import Path

import pytest

from core.callbacks import Callback
from core.checkpoint import CheckpointError
from core.config import DataConfig, ModelConfig, SampleConfig, TrackingConfig, TrainConfig
from core.errors import UsageError
from core.experiment import find_resume_point, resume_training, run_training
from core.registry import load_registered_model, resolve_model_version
from core.sampling import generate
from core.store import connect
from core.tracking import parse_samples
from tests.conftest import store_from

MODEL = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
STEP_METRICS = ("loss", "avg_loss", "best_loss", "lr", "time_per_batch", "tokens_per_sec")


def train(tmp_path, shakespeare_path, steps=12, **fields):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    data = DataConfig(source=str(shakespeare_path), cache_dir=str(tmp_path / "data"), batch_size=4, block_size=32)
    train_config = TrainConfig(
        **{
            "max_steps": steps,
            "eval_interval": 5,
            "sample_interval": 10,
            "sample_tokens": 8,
            "device": "cpu",
            "lr": 3e-3,
            "target_loss": 0,
            **fields,
        }
    )
    tracking = TrackingConfig(
        experiment="e2e",
        run_name="tiny-e2e",
        alias="champion",
        preset="tiny",
        tracking_uri=uri,
        checkpoint_root=str(tmp_path / "checkpoints"),
    )
    return run_training(MODEL, data, train_config, tracking), connect(uri)


def test_a_short_run_logs_every_step_and_registers_a_model(tmp_path, shakespeare_path, tokenizer, new_store):
    new_store(tmp_path)
    # The whole corpus (its facts are asserted below); 8 validation batches per evaluation, not all 280.
    outcome, client = train(tmp_path, shakespeare_path, eval_batches=8)
    assert outcome.status == "FINISHED"
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    for name in STEP_METRICS:
        history = client.get_metric_history(outcome.run_id, name)
        assert sorted(m.step for m in history) == list(range(1, 13)), name
    losses = [m.value for m in sorted(client.get_metric_history(outcome.run_id, "loss"), key=lambda m: m.step)]
    assert sum(losses[-3:]) / 3 < losses[0]
    assert [m.step for m in client.get_metric_history(outcome.run_id, "val_loss")] == [5, 10, 12]
    assert len(client.get_metric_history(outcome.run_id, "val_bpc")) == 3

    params = run.data.params
    assert params["n_layer"] == "2" and params["n_embd"] == "32" and params["context"] == "32"
    assert params["batch_size"] == "4" and params["block_size"] == "32" and params["grad_clip"] == "0.5"
    assert params["max_steps"] == "12" and params["lr"] == "0.003" and params["preset"] == "tiny"
    assert params["tokens_loaded"] == "301966"
    tags = run.data.tags
    assert tags["preset"] == "tiny" and tags["device"] == "cpu"
    assert tags["dataset_sha256"].startswith("86c4e6aa")
    assert tags["dataset_name"] == "input" and tags["torch_version"] and tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id)}
    assert {"samples.txt", "run_summary.json"} <= artifacts
    # Each sample's memorisation figures are metrics at its step, as the meter computes them for its continuation.
    from core.data import prepare_corpus
    from core.memorization import index_for

    document = Path(client.download_artifacts(outcome.run_id, "samples.txt", str(tmp_path))).read_text()
    data = DataConfig(source=str(shakespeare_path), cache_dir=str(tmp_path / "data"))
    index = index_for(prepare_corpus(data, tokenizer))
    logged = {
        name: [(m.step, m.value) for m in client.get_metric_history(outcome.run_id, name)]
        for name in ("sample_copied_share", "sample_longest_copy_chars")
    }
    assert sorted(step for step, _ in logged["sample_longest_copy_chars"]) == [10, 12]
    for step, text in parse_samples(document):
        for name, value in index.report_text(text.removeprefix("ROMEO:"), tokenizer).metrics().items():
            assert (step, value) in logged[name]

    version = resolve_model_version(client, "shakespeare-gpt@champion")
    assert version.run_id == outcome.run_id
    assert str(version.version) == outcome.model_version
    model, _, _ = load_registered_model(client, "shakespeare-gpt@champion")
    assert params["total_params"] == str(sum(p.numel() for p in model.parameters()))
    text = generate(model, tokenizer, "ROMEO:", SampleConfig(max_new_tokens=10, seed=0)).samples[0]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_a_high_target_loss_stops_the_run_early(tmp_path, shakespeare_head, new_store):
    new_store(tmp_path)
    outcome, client = train(tmp_path, shakespeare_head, steps=50, target_loss=100.0)
    assert outcome.result.stop_reason == "target_loss"
    assert len(client.get_metric_history(outcome.run_id, "loss")) == 1
    assert client.get_run(outcome.run_id).data.tags["stop_reason"] == "target_loss"


def test_a_failure_ends_the_run_failed(tmp_path, shakespeare_head, monkeypatch, new_store):
    new_store(tmp_path)
    from core import trainer as trainer_module

    def explode(self, out_dir):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer_module.Trainer, "fit", explode)
    with pytest.raises(RuntimeError, match="boom"):
        train(tmp_path, shakespeare_head)
    client = connect(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "boom" in runs[0].data.tags["error"]


def test_bad_input_creates_no_run(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   ")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ValueError, match="empty"):
        run_training(
            MODEL,
            DataConfig(source=str(empty), cache_dir=str(tmp_path / "data"), batch_size=2, block_size=16),
            TrainConfig(device="cpu"),
            TrackingConfig(tracking_uri=uri),
        )
    assert not (tmp_path / "mlflow.db").exists()


# ---- resuming a stopped run: same run, same training, one point per step ----

RESUME_STEPS = 12


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, shakespeare_path):
    path = tmp_path_factory.mktemp("corpus") / "shakespeare-head.txt"
    path.write_text(shakespeare_path.read_text()[:40_000])
    return path


class SignalAt(Callback):
    """Sends this process SIGTERM at a step, as `kill` or a job's cancel does."""

    def __init__(self, step):
        self.step = step

    def on_step(self, step, metrics):
        if step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class CrashAt(Callback):
    """Fails at a step, after the step's metrics went to the logger (a crash past the latest checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step(self, step, metrics):
        if step == self.step:
            raise RuntimeError("lost the GPU")


def tracked(store, corpus, callbacks=(), **fields):
    """A tracked tiny run in the store folder ``store`` (checkpoints beside it), 12 steps, checkpoint every 4."""
    data = DataConfig(source=str(corpus), cache_dir=str(store.parent / "data"), batch_size=4, block_size=32)
    train_config = TrainConfig(
        **{
            "max_steps": RESUME_STEPS,
            "eval_interval": 5,
            "sample_interval": 4,
            "sample_tokens": 4,
            "checkpoint_interval": 4,
            "device": "cpu",
            "lr": 3e-3,
            "target_loss": 0,
            **fields,
        }
    )
    tracking = TrackingConfig(
        experiment="resume",
        preset="tiny",
        tracking_uri=f"sqlite:///{store}/mlflow.db",
        checkpoint_root=str(store / "checkpoints"),
    )
    return run_training(MODEL, data, train_config, tracking, callbacks)


def histories(client, run_id):
    """Every metric of the run as {name: [(step, value), ...]} in step order."""
    names = client.get_run(run_id).data.metrics
    return {n: sorted((m.step, m.value) for m in client.get_metric_history(run_id, n)) for n in names}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, small_corpus, store_template):
    """The uninterrupted run the resumed ones must reproduce: (store URI, run id, metric histories)."""
    store = tmp_path_factory.mktemp("straight")
    store_from(store_template, store)
    outcome = tracked(store, small_corpus)
    client = connect(f"sqlite:///{store}/mlflow.db")
    return f"sqlite:///{store}/mlflow.db", outcome.run_id, histories(client, outcome.run_id)


DETERMINISTIC = ("loss", "avg_loss", "best_loss", "lr")  # the timings differ from run to run


def assert_one_point_per_step_and_the_straight_values(resumed, straight_histories):
    for name in STEP_METRICS:
        assert [s for s, _ in resumed[name]] == list(range(1, RESUME_STEPS + 1)), name
    for name in DETERMINISTIC:
        assert [s for s, _ in resumed[name]] == [s for s, _ in straight_histories[name]], name
        values, expected = [v for _, v in resumed[name]], [v for _, v in straight_histories[name]]
        assert values == pytest.approx(expected, abs=1e-6), name


@pytest.mark.slow
def test_a_run_stopped_by_sigterm_resumes_as_the_same_run_and_matches_a_straight_run(
    tmp_path, small_corpus, straight, new_store
):
    _, _, expected = straight
    new_store(tmp_path)
    stopped = tracked(tmp_path, small_corpus, [SignalAt(7)])
    assert stopped.status == "KILLED" and stopped.result.steps == 7
    client = connect(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(stopped.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["checkpoint_dir"] == str((tmp_path / "checkpoints" / stopped.run_id).resolve())

    point = find_resume_point(stopped.run_id, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert point.step == 7 and point.checkpoint.name == "step-00000007"  # written at the stop
    assert point.train_config.max_steps == RESUME_STEPS and point.tracking.preset == "tiny"
    outcome = resume_training(point)

    assert outcome.run_id == stopped.run_id and outcome.status == "FINISHED" and outcome.result.steps == RESUME_STEPS
    assert len(client.search_runs([run.info.experiment_id])) == 1  # no new run
    run = client.get_run(stopped.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["resumed_from_step"] == "7" and run.data.tags["stop_reason"] == "max_steps"
    assert resolve_model_version(client, f"shakespeare-gpt/{outcome.model_version}").run_id == stopped.run_id
    resumed = histories(client, stopped.run_id)
    assert_one_point_per_step_and_the_straight_values(resumed, expected)
    # The stopped process's final evaluation at step 7 stays; every other one is the straight run's.
    assert [s for s, _ in resumed["val_loss"]] == [5, 7, 10, 12]
    values = [v for s, v in resumed["val_loss"] if s != 7]
    assert values == pytest.approx([v for _, v in expected["val_loss"]], abs=1e-6)
    document = Path(client.download_artifacts(stopped.run_id, "samples.txt", str(tmp_path))).read_text()
    samples = parse_samples(document)
    assert [s for s, _ in samples] == [4, 7, 8, 12]


@pytest.mark.slow
def test_a_failed_run_resumes_from_its_last_checkpoint_without_logging_a_step_twice(
    tmp_path, small_corpus, straight, new_store
):
    _, _, expected = straight
    new_store(tmp_path)
    with pytest.raises(RuntimeError, match="lost the GPU"):
        tracked(tmp_path, small_corpus, [CrashAt(6)])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = connect(uri)
    [run] = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert run.info.status == "FAILED" and "lost the GPU" in run.data.tags["error"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5, 6]

    point = find_resume_point(run.info.run_id, tracking_uri=uri)
    assert point.step == 4 and point.logged_through["loss"] == 6  # steps 5 and 6 are taken again, not logged again
    outcome = resume_training(point)
    assert outcome.status == "FINISHED"
    assert "error" not in client.get_run(run.info.run_id).data.tags
    assert_one_point_per_step_and_the_straight_values(histories(client, run.info.run_id), expected)


@pytest.mark.slow
def test_runs_that_cannot_be_resumed_are_refused_and_left_as_they_were(tmp_path, small_corpus, straight):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    finished_uri, finished_id, _ = straight
    with pytest.raises(UsageError, match=f"run {finished_id} is FINISHED: there is nothing to resume"):
        find_resume_point(finished_id, tracking_uri=finished_uri)
    with pytest.raises(UsageError, match="the tracking store .* does not exist"):
        find_resume_point("0" * 32, tracking_uri=uri)
    assert not (tmp_path / "mlflow.db").exists()  # looking did not create a store
    with pytest.raises(UsageError, match="invalid run id"):
        find_resume_point("../etc", tracking_uri=finished_uri)

    no_checkpoints = tracked(tmp_path, small_corpus, [SignalAt(2)], checkpoint_interval=0)
    assert no_checkpoints.status == "KILLED"
    with pytest.raises(UsageError, match=f"no MLflow run {'0' * 32} in"):
        find_resume_point("0" * 32, tracking_uri=uri)
    with pytest.raises(CheckpointError, match="has no resumable checkpoint in .*checkpoint-interval 0"):
        find_resume_point(no_checkpoints.run_id, tracking_uri=uri)

    client = connect(uri)
    running = client.create_run(client.get_experiment_by_name("resume").experiment_id).info.run_id
    with pytest.raises(UsageError, match="is RUNNING: another process may still be training it"):
        find_resume_point(running, tracking_uri=uri)

    corrupt = tracked(tmp_path, small_corpus, [SignalAt(5)])
    before = client.get_run(corrupt.run_id)
    checkpoint = tmp_path / "checkpoints" / corrupt.run_id / "resume" / "step-00000005"
    weights = checkpoint / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    point = find_resume_point(corrupt.run_id, tracking_uri=uri)  # reads only the JSON
    with pytest.raises(CheckpointError, match="optimizer.safetensors is truncated or corrupt"):
        resume_training(point)
    after = client.get_run(corrupt.run_id)
    assert after.info.status == "KILLED" and after.info.end_time == before.info.end_time
    assert after.data.tags == before.data.tags and after.data.metrics == before.data.metrics


def test_the_train_cli_refuses_flags_that_would_change_a_resumed_run(tmp_path, monkeypatch, capsys):
    from core.store import ensure_experiment
    from pipelines.cli import run
    from pipelines.train import main

    finished_uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = connect(finished_uri)
    finished_id = client.create_run(ensure_experiment(client, "cli")).info.run_id
    client.set_terminated(finished_id, "FINISHED")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", finished_uri)

    def cli_error(*argv):
        with pytest.raises(SystemExit) as exited:
            run(main, list(argv))
        assert exited.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        return lines[0]

    # --max-steps is refused even at its default value: it would silently not apply.
    message = cli_error("--resume", finished_id, "--lr", "0.1", "--max-steps", "20000", "--compile")
    assert message.endswith("with the settings it was started with; drop --lr, --max-steps, --compile")
    assert "FINISHED: there is nothing to resume" in cli_error("--resume", finished_id, "--log-interval", "5")
    assert "no MLflow run" in cli_error("--resume", "f" * 32)
