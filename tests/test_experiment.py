"""A tracked training run end to end: real corpus, real SQLite MLflow store, real registry."""

import pytest

from core.config import DataConfig, ModelConfig, SampleConfig, TrackingConfig, TrainConfig
from core.experiment import run_training
from core.registry import load_registered_model, resolve_model_version
from core.sampling import generate
from core.store import connect

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


def test_a_short_run_logs_every_step_and_registers_a_model(tmp_path, shakespeare_path, tokenizer):
    outcome, client = train(tmp_path, shakespeare_path)
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

    version = resolve_model_version(client, "shakespeare-gpt@champion")
    assert version.run_id == outcome.run_id
    assert str(version.version) == outcome.model_version
    model, _, _ = load_registered_model(client, "shakespeare-gpt@champion")
    assert params["total_params"] == str(sum(p.numel() for p in model.parameters()))
    text = generate(model, tokenizer, "ROMEO:", SampleConfig(max_new_tokens=10, seed=0)).samples[0]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_a_high_target_loss_stops_the_run_early(tmp_path, shakespeare_path):
    outcome, client = train(tmp_path, shakespeare_path, steps=50, target_loss=100.0)
    assert outcome.result.stop_reason == "target_loss"
    assert len(client.get_metric_history(outcome.run_id, "loss")) == 1
    assert client.get_run(outcome.run_id).data.tags["stop_reason"] == "target_loss"


def test_a_failure_ends_the_run_failed(tmp_path, shakespeare_path, monkeypatch):
    from core import trainer as trainer_module

    def explode(self, out_dir):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer_module.Trainer, "fit", explode)
    with pytest.raises(RuntimeError, match="boom"):
        train(tmp_path, shakespeare_path)
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
