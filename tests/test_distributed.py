"""Multi-process training: batch shards, gradient accumulation, and real ``torchrun`` jobs of 2 CPU processes.

The torchrun tests start the trainer the way a user does (``python -m torch.distributed.run --standalone
--nproc_per_node=2 -m pipelines.train ...``, which is what the ``torchrun`` command runs) and read the result back
through ``MlflowClient``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from core.config import DataConfig, TrainConfig
from core.data import TokenBatches
from core.distributed import SINGLE, DistContext, all_reduce_sum, broadcast_text, init_distributed
from core.trainer import Trainer
from tests.conftest import REPO, TINY, cli_in_process

STEP_METRICS = ("loss", "avg_loss", "best_loss", "lr", "time_per_batch", "tokens_per_sec")


# ---- shards and contexts ----


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_the_shards_of_two_processes_are_the_batches_of_one_process_with_twice_the_batch(order):
    tokens = np.arange(5_000, dtype=np.uint16)
    whole = TokenBatches(tokens, batch_size=6, block_size=16, order=order, seed=3)
    shards = [TokenBatches(tokens, 3, 16, order=order, seed=3, rank=r, world_size=2) for r in range(2)]
    assert shards[0].batches_per_epoch == whole.batches_per_epoch
    for _ in range(whole.batches_per_epoch + 3):  # past the wrap-around too
        x, y = whole.next_batch()
        parts = [shard.next_batch() for shard in shards]
        assert torch.equal(torch.cat([p[0] for p in parts]), x)
        assert torch.equal(torch.cat([p[1] for p in parts]), y)
        assert not torch.equal(parts[0][0], parts[1][0])  # each process reads other rows


def test_a_shard_needs_room_for_the_global_batch():
    with pytest.raises(ValueError, match=r"batch_size=4 × 2 processes"):
        TokenBatches(np.arange(100, dtype=np.uint16), batch_size=4, block_size=16, rank=1, world_size=2)
    TokenBatches(np.arange(100, dtype=np.uint16), batch_size=4, block_size=16)  # one process fits
    with pytest.raises(ValueError, match="rank must be in"):
        TokenBatches(np.arange(100, dtype=np.uint16), batch_size=1, block_size=8, rank=2, world_size=2)


def test_without_torchrun_there_is_one_process_and_no_group(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed("cpu") is SINGLE
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cpu") is SINGLE
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match=r"\$WORLD_SIZE must be an integer"):
        init_distributed("cpu")
    assert all_reduce_sum([1.5, 2.0], SINGLE) == [1.5, 2.0]
    assert broadcast_text("ünïcode", SINGLE) == "ünïcode"
    with pytest.raises(ValueError, match="rank must be in"):
        DistContext(rank=2, world_size=2)


def test_gradient_accumulation_takes_the_same_steps_as_one_big_batch(shakespeare_head):
    """B=2 with 2 accumulated micro-batches and B=4 in one go: the same data, losses and weights."""

    def train(batch_size: int, grad_accum: int) -> tuple[list[float], dict[str, torch.Tensor]]:
        data = DataConfig(source=str(shakespeare_head), batch_size=batch_size, block_size=32)
        config = TrainConfig(
            max_steps=4, target_loss=0, eval_interval=0, sample_interval=0, checkpoint_interval=0,
            grad_accum=grad_accum, device="cpu",
        )  # fmt: skip
        trainer = Trainer(TINY, data, config)
        losses = [trainer._train_step() for _ in range(config.max_steps)]
        return losses, trainer.model.state_dict()

    big_losses, big = train(4, 1)
    accumulated_losses, accumulated = train(2, 2)
    np.testing.assert_allclose(accumulated_losses, big_losses, rtol=1e-5)
    for name, tensor in big.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=1e-4, atol=1e-6)
    assert TrainConfig(grad_accum=3).grad_accum == 3
    with pytest.raises(ValueError, match="grad_accum must be a positive integer"):
        TrainConfig(grad_accum=0)


# ---- a stop that lands on one process only ----

LATE_STOP_RANK = """
import json, sys
import torch.distributed as torch_dist
from core.config import DataConfig, ModelConfig, TrainConfig
from core.distributed import DistContext
from core.callbacks import Callback
from core.trainer import Trainer

rank, store_file, corpus, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
torch_dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
data = DataConfig(source=corpus, batch_size=2, block_size=32)
config = TrainConfig(
    max_steps=20, target_loss=0, eval_interval=0, sample_interval=0, checkpoint_interval=0, device="cpu"
)
model = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
trainer = Trainer(model, data, config, dist=DistContext(rank=rank, world_size=2))


class LateStop(Callback):
    # on_step runs after the step's collective: the moment a signal torchrun forwards to one worker can land.
    def on_step(self, step, metrics):
        if rank == 1 and step == 3:
            trainer.request_stop("SIGTERM")


trainer.callbacks.append(LateStop())
result = trainer.fit(f"{out}/checkpoints")
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"steps": result.steps, "stop_reason": result.stop_reason}, f)
torch_dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_stop_that_lands_on_one_rank_after_the_collective_ends_every_rank_after_the_same_step(
    tmp_path, shakespeare_head
):
    """Two processes of a gloo group; rank 1 is asked to stop after step 3's collective. The stop is carried by the
    next step's collective: both ranks leave after step 4. Leaving at step 3 on rank 1 alone would leave rank 0
    waiting in step 4's gradient all-reduce (a cancelled job that never ends)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    paths = [str(tmp_path / "store"), str(shakespeare_head), str(tmp_path)]
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    ranks = [
        subprocess.Popen([sys.executable, "-c", LATE_STOP_RANK, str(rank), *paths], cwd=REPO, env=env, **output)
        for rank in range(2)
    ]
    try:
        outputs = [process.communicate(timeout=120)[0] for process in ranks]
    except subprocess.TimeoutExpired:
        pytest.fail("the two ranks deadlocked: one left the training loop a step before the other")
    finally:
        for process in ranks:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert [process.returncode for process in ranks] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["steps"] for r in results] == [4, 4]
    assert results[1]["stop_reason"] == "stopped: SIGTERM"
    assert results[0]["stop_reason"] == "stopped: another process of the job was stopped"


# ---- real torchrun jobs ----

SMALL_MODEL = ["--preset", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--context", "32"]


def train_argv(corpus, tmp_path, experiment: str, *extra: str) -> list[str]:
    return [
        *SMALL_MODEL, "--block-size", "32", "--device", "cpu", "--data", str(corpus), "--target-loss", "0",
        "--eval-interval", "4", "--sample-interval", "0", "--experiment", experiment,
        "--checkpoint-root", str(tmp_path / "checkpoints"), "--log-interval", "1", *extra,
    ]  # fmt: skip


def torchrun(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "pipelines.train", *argv]  # fmt: skip


def run_command(command: list[str], env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@contextmanager
def background_job(command: list[str], env: dict) -> Iterator[subprocess.Popen]:
    """A torchrun job in its own process group, its output on a pipe; SIGKILLed (group) if still running after."""
    job = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        yield job
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        job.stdout.close()


def histories(client, run_id: str, names=STEP_METRICS + ("val_loss",)) -> dict[str, list[tuple[int, float]]]:
    return {n: sorted((m.step, m.value) for m in client.get_metric_history(run_id, n)) for n in names}


def only_run(client, experiment: str):
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"{len(runs)} runs in {experiment}"
    return runs[0]


@pytest.mark.slow
@pytest.mark.parametrize("vocabulary", [[], ["--tie-unused-tokens"]], ids=["full-vocabulary", "shared-rows"])
def test_torchrun_with_two_processes_is_one_run_on_the_trajectory_of_one_process(
    tmp_path, shakespeare_head, vocabulary, new_store, monkeypatch
):
    from mlflow import MlflowClient

    uri = new_store(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    steps = 8
    common = ["--max-steps", str(steps), *vocabulary]
    ddp = run_command(torchrun(2, train_argv(shakespeare_head, tmp_path, "ddp", *common, "--batch-size", "2")), env)
    # The one-process reference is the same entry point run in this process (its own process would only add the
    # seconds of importing torch and MLflow): its trajectory is what the two processes must follow.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    single = cli_in_process(
        "pipelines.train", *train_argv(shakespeare_head, tmp_path, "single", *common, "--batch-size", "4")
    )
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not the global registry URI an earlier test set
    ddp_run, single_run = only_run(client, "ddp"), only_run(client, "single")
    assert ddp.stdout.count("mlflow run: ") == 1  # rank 1 printed nothing of its own
    assert "2 processes" in ddp.stdout
    assert ddp_run.info.status == "FINISHED"
    params = ddp_run.data.params
    assert (params["world_size"], params["batch_size"], params["global_batch_size"]) == ("2", "2", "4")
    assert single_run.data.params["world_size"] == "1"

    ddp_history, single_history = histories(client, ddp_run.info.run_id), histories(client, single_run.info.run_id)
    for name in STEP_METRICS:
        assert [s for s, _ in ddp_history[name]] == list(range(1, steps + 1)), name  # one point per step
    for name in ("loss", "avg_loss", "best_loss", "lr", "val_loss"):
        expected = [v for _, v in single_history[name]]
        assert [s for s, _ in ddp_history[name]] == [s for s, _ in single_history[name]], name
        np.testing.assert_allclose([v for _, v in ddp_history[name]], expected, rtol=1e-4, err_msg=name)
    losses = [v for _, v in ddp_history["loss"]]
    assert losses[-1] < losses[0]

    # Rank 0 alone registered the model: one version, from this run.
    versions = client.search_model_versions(f"run_id = '{ddp_run.info.run_id}'")
    assert len(versions) == 1
    # The registered version loads whole (the shared rows expanded into the full embedding) and writes.
    from core.config import SampleConfig
    from core.registry import load_registered_model
    from core.sampling import generate
    from core.tokenizer import get_tokenizer

    model, _, _ = load_registered_model(client, f"shakespeare-gpt/{versions[0].version}")
    text = generate(model, get_tokenizer(), "ROMEO:", SampleConfig(max_new_tokens=5, seed=1)).samples[0]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


@pytest.mark.slow
def test_ctrl_c_stops_every_process_and_the_job_resumes_with_two_processes(
    tmp_path, shakespeare_head, new_store, monkeypatch
):
    """SIGINT to the launcher's process group, as Ctrl-C in a terminal sends it (the workers, in sessions of their
    own, hear of it from the launcher): the run ends KILLED with a checkpoint. Resuming with one process is refused;
    ``--resume`` under torchrun finishes the run, with one point per step, and registers it."""
    from mlflow import MlflowClient

    uri = new_store(tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONUNBUFFERED": "1"}
    steps = 100  # seconds of margin after the first checkpoint, and a short resumed job
    argv = train_argv(shakespeare_head, tmp_path, "ddp-stop", "--max-steps", str(steps), "--batch-size", "2",
                      "--checkpoint-interval", "3", "--eval-interval", "0", "--log-interval", "1000")  # fmt: skip
    with background_job(torchrun(2, argv), env) as job:
        run_id = next((line.split()[-1] for line in job.stdout if line.startswith("mlflow run: ")), None)
        assert run_id is not None, "the job printed no run id"
        pointer = tmp_path / "checkpoints" / run_id / "resume" / "latest.json"
        deadline = time.monotonic() + 120
        while not pointer.exists():
            assert job.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
        os.killpg(job.pid, signal.SIGINT)
        output = job.stdout.read()
        job.wait(timeout=120)

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)  # not the global registry URI an earlier test set
    run = client.get_run(run_id)
    assert run.info.status == "KILLED", output[-3000:]
    assert run.data.tags["stop_reason"].startswith("stopped: "), run.data.tags
    stopped_at = max(m.step for m in client.get_metric_history(run_id, "loss"))
    assert 3 <= stopped_at < steps
    assert json.loads(pointer.read_text())["step"] == stopped_at

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    refused = cli_in_process("pipelines.train", "--resume", run_id)  # one process: a refusal, run here
    assert refused.returncode == 2 and "torchrun --nproc_per_node=2" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert client.get_run(run_id).info.status == "KILLED"  # the refusal changed nothing

    resumed = run_command(torchrun(2, ["--resume", run_id, "--log-interval", "1000"]), env)
    assert f"resuming run {run_id} after step {stopped_at:,}" in resumed.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_from_step"] == str(stopped_at)
    assert len(client.search_model_versions(f"run_id = '{run_id}'")) == 1  # rank 0 registered the resumed run
    for name in STEP_METRICS:  # no gap and no repeat across the stop and the resume
        assert sorted(m.step for m in client.get_metric_history(run_id, name)) == list(range(1, steps + 1)), name
