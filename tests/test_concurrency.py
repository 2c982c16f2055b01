"""Concurrency: several training processes writing one SQLite store while it is read, and threads sharing a model."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow import MlflowClient

from core.runs import TRAIN_METRICS, list_runs, metric_histories
from core.store import connect, ensure_experiment
from tests.conftest import REPO

EXPERIMENT = "concurrency-test"
STEPS = 25
TRAINERS = 3


@pytest.fixture
def small_corpus(tmp_path, shakespeare_path):
    """The first 20,000 characters of Tiny Shakespeare: ~5,000 tokens, prepared in a blink."""
    path = tmp_path / "corpus.txt"
    path.write_text(shakespeare_path.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


@pytest.mark.slow
def test_three_trainers_share_one_sqlite_store_while_it_is_read(tmp_path, small_corpus):
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    # The schema is created (and migrated) here, once: the trainers only open it.
    experiment_id = ensure_experiment(connect(uri), EXPERIMENT)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    logs = [tmp_path / f"trainer-{i}.log" for i in range(TRAINERS)]
    processes = []
    for i, log in enumerate(logs):
        argv = [
            sys.executable, "-m", "pipelines.train", "--preset", "tiny", "--n-layer", "1", "--n-embd", "32",
            "--n-head", "2", "--block-size", "16", "--batch-size", "2", "--max-steps", str(STEPS),
            "--target-loss", "0", "--eval-interval", "10", "--sample-interval", "0", "--device", "cpu",
            "--data", str(small_corpus), "--experiment", EXPERIMENT, "--run-name", f"concurrent-{i}",
            "--checkpoint-root", str(tmp_path / "checkpoints"), "--seed", str(i),
        ]  # fmt: skip
        with open(log, "wb") as out:  # cwd is tmp_path: the token cache (data/) goes there, not into the repo
            processes.append(subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT))

    reads = 0
    try:
        client = connect(uri)
        deadline = time.monotonic() + 300
        while any(p.poll() is None for p in processes):
            assert time.monotonic() < deadline, "the trainers did not finish in 5 minutes"
            # What the Compare Runs page does while runs are live: list them, read every history.
            runs = list_runs(client, [experiment_id])
            if len(runs):
                metric_histories(client, list(runs["run_id"]), TRAIN_METRICS)
            reads += 1
            # Several reads while the trainers write, without the reader taking a core from them (2 cores here).
            time.sleep(0.5)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()

    outputs = [log.read_text(encoding="utf-8", errors="replace") for log in logs]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-3000:]
        assert "database is locked" not in output
    assert reads >= 1
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([experiment_id])
    assert len(runs) == TRAINERS
    assert {run.info.status for run in runs} == {"FINISHED"}
    for run in runs:
        for metric in TRAIN_METRICS:
            steps = sorted(point.step for point in client.get_metric_history(run.info.run_id, metric))
            assert steps == list(range(1, STEPS + 1)), (run.info.run_name, metric)
    assert sorted(int(v.version) for v in client.search_model_versions()) == [1, 2, 3]


@pytest.mark.slow  # registering the version takes a few seconds
def test_threads_loading_one_version_at_once_share_one_model_and_generate_together(
    tmp_path, monkeypatch, tiny_checkpoint, tokenizer
):
    from core import registry
    from core.checkpoint import load_checkpoint
    from core.config import SampleConfig
    from core.registry import load_registered_model, log_and_register
    from core.sampling import generate

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = connect(uri)
    run_id = client.create_run(ensure_experiment(client, "threads")).info.run_id
    log_and_register(client, run_id, tiny_checkpoint, name="threaded")
    registry.clear_model_cache()

    loads = []
    barrier = threading.Barrier(6)

    def counting_load(*args, **kwargs):
        loads.append(threading.get_ident())
        time.sleep(0.2)  # a slow load: without a per-version lock every thread would start its own
        return load_checkpoint(*args, **kwargs)

    monkeypatch.setattr(registry, "load_checkpoint", counting_load)
    config = SampleConfig(max_new_tokens=8, num_samples=2, seed=1, stop_at_eot=False)

    def load_and_generate(_):
        barrier.wait()
        model, version, _ = load_registered_model(client, "threaded/1")
        return model, generate(model, tokenizer, "ROMEO:", config)

    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(load_and_generate, range(6)))
    finally:
        registry.clear_model_cache()
    assert len(loads) == 1
    models = {id(model) for model, _ in results}
    assert len(models) == 1
    # The same seed on the same model gives the same samples in every thread: no thread disturbed another.
    assert len({tuple(g.samples) for _, g in results}) == 1
    assert all(g.new_tokens == [8, 8] for _, g in results)


def test_the_model_cache_loads_a_key_once_for_concurrent_callers_and_retries_after_a_failure():
    from core.registry import _ModelCache

    cache = _ModelCache(size=2)
    calls = []
    barrier = threading.Barrier(8)

    def slow_load():
        calls.append(1)
        time.sleep(0.1)
        return object(), {}

    def ask(key):
        barrier.wait()
        return cache.get_or_load(key, slow_load)

    with ThreadPoolExecutor(max_workers=8) as pool:
        values = list(pool.map(ask, ["a"] * 6 + ["b"] * 2))
    assert len(calls) == 2  # one load per key
    assert len({id(v) for v in values[:6]}) == 1 and values[6] is values[7] and values[0] is not values[6]
    assert cache._loading == {}  # no lock is left behind

    def failing_load():
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        cache.get_or_load("c", failing_load)
    assert cache.get("c") is None
    assert cache.get_or_load("c", slow_load)[1] == {}  # the next caller loads again
