from pathlib import Path

import pytest

from core.store import connect, ensure_experiment
from core.tracking import MlflowLogger, git_commit, log_params


@pytest.fixture
def client_and_run(tmp_path, new_store):
    client = connect(new_store(tmp_path))
    experiment_id = ensure_experiment(client, "tracking-test")
    run = client.create_run(experiment_id)
    return client, run.info.run_id


@pytest.mark.parametrize("asynchronous", [True, False])
def test_no_point_is_lost(client_and_run, asynchronous):
    client, run_id = client_and_run
    logger = MlflowLogger(client, run_id, asynchronous=asynchronous, flush_interval=0.05)
    # Asynchronous: more than one log_batch of 1000 points. Synchronous: one request per step, so fewer steps.
    steps = 2500 if asynchronous else 500
    for step in range(1, steps + 1):
        logger.on_step(step, {"loss": 10.0 / step, "lr": 1e-3})
        if step % 500 == 0:
            logger.on_eval(step, {"val_loss": 5.0 / step})
    logger.close()
    loss = client.get_metric_history(run_id, "loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == list(range(1, steps + 1))
    assert sorted(loss, key=lambda m: m.step)[9].value == pytest.approx(1.0)
    assert len(client.get_metric_history(run_id, "lr")) == steps
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == list(range(500, steps + 1, 500))


def test_samples_and_summary_become_artifacts(client_and_run, tmp_path):
    client, run_id = client_and_run
    logger = MlflowLogger(client, run_id, flush_interval=0.05)
    summary = {
        "total_params": 10,
        "trainable_params": 10,
        "size_mb": 0.0,
        "tokens_loaded": 100,
        "batches_per_epoch": 3,
        "tokens_per_batch": 32,
        "device": "cpu",
        "threads": 2,
        "size_by_component": {"wte": 0.0},
    }
    logger.on_train_start(summary)
    logger.on_sample(10, "ROMEO: first")
    logger.on_sample(20, "ROMEO: second")
    logger.close()
    run = client.get_run(run_id)
    assert run.data.params["total_params"] == "10"
    assert run.data.params["batches_per_epoch"] == "3"
    assert run.data.tags["device"] == "cpu"
    samples = client.download_artifacts(run_id, "samples.txt", str(tmp_path))
    text = Path(samples).read_text()
    assert "=== step 10 ===\nROMEO: first" in text and "=== step 20 ===\nROMEO: second" in text
    assert "run_summary.json" in [f.path for f in client.list_artifacts(run_id)]


def test_a_logging_failure_is_raised_not_swallowed(client_and_run):
    client, run_id = client_and_run
    logger = MlflowLogger(client, "no-such-run", flush_interval=0.01)
    logger.log({"loss": 1.0}, 1)
    with pytest.raises(RuntimeError, match="logging to MLflow failed"):
        logger.close()


def test_params_are_logged_in_batches(client_and_run):
    client, run_id = client_and_run
    log_params(client, run_id, {f"p{i}": i for i in range(250)} | {"alias": None})
    params = client.get_run(run_id).data.params
    assert len(params) == 251
    assert params["p249"] == "249" and params["alias"] == "None"


def test_git_commit_is_a_hash():
    commit = git_commit()
    assert commit == "unknown" or len(commit.removesuffix("-dirty")) == 40


def test_a_resumed_runs_logger_keeps_the_samples_and_skips_steps_already_logged(client_and_run):
    from core.tracking import format_samples, parse_samples

    client, run_id = client_and_run
    first = MlflowLogger(client, run_id, asynchronous=False)
    for step in range(1, 7):
        first.on_step(step, {"loss": float(step)})
    first.on_sample(4, "ROMEO: one\n\nand two")
    first.close()

    # Resumed from a checkpoint at step 4 after the first process had logged through step 6.
    samples = parse_samples(format_samples(first.samples))
    assert samples == [(4, "ROMEO: one\n\nand two")]
    resumed = MlflowLogger(client, run_id, asynchronous=False, samples=samples, logged_through={"loss": 6})
    for step in range(5, 9):
        resumed.on_step(step, {"loss": 100.0 + step, "lr": 1e-3})
    resumed.on_sample(8, "JULIET: three")
    resumed.close()
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert loss == [(s, float(s)) for s in range(1, 7)] + [(7, 107.0), (8, 108.0)]
    assert sorted(m.step for m in client.get_metric_history(run_id, "lr")) == [5, 6, 7, 8]  # new to the run
    assert resumed.samples == [(4, "ROMEO: one\n\nand two"), (8, "JULIET: three")]


def test_points_are_stored_before_a_checkpoint_is_written(client_and_run):
    """A resumed run never logs the steps up to its checkpoint again, so they must be stored before it exists."""
    client, run_id = client_and_run
    logger = MlflowLogger(client, run_id, flush_interval=3600)  # the background thread would not flush in time
    for step in range(1, 6):
        logger.on_step(step, {"loss": 10.0 - step})
    logger.before_checkpoint(5)
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [1, 2, 3, 4, 5]
    logger.close()
