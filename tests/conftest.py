"""Shared fixtures: offline tokenizer cache, tiny model configs and checkpoints, and the real corpus."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# Tests run offline: use the GPT-2 BPE files beside the checkout unless the caller chose a cache.
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")

from core.config import ModelConfig  # noqa: E402
from core.model import GPT  # noqa: E402


def _share_the_cores() -> None:
    """Under pytest-xdist each worker takes its share of the cores, and so do the processes it starts (they inherit
    OMP_NUM_THREADS): N workers each running torch on every core would oversubscribe the machine, where OpenMP's
    waiting threads spin and the whole suite takes longer."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


_share_the_cores()

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)
"""A model small enough to run anything in milliseconds, with the real GPT-2 vocabulary."""


@pytest.fixture
def tiny_config() -> ModelConfig:
    return TINY


@pytest.fixture
def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(TINY).eval()


@pytest.fixture
def tokenizer():
    from core.tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model) -> Path:
    from core.checkpoint import save_checkpoint

    return save_checkpoint(tiny_model, tmp_path / "tiny-checkpoint")


@pytest.fixture(scope="session")
def shakespeare_path() -> Path:
    """The real Tiny Shakespeare file: $SHAKESPEARE_SOURCE (a path, or a URL already downloaded into data/), or
    the copy in ../shared."""
    from core.data import is_url, read_corpus

    source = os.environ.get("SHAKESPEARE_SOURCE")
    if source and is_url(source):
        _, _, path = read_corpus(source, REPO / "data")
        return path
    if source:
        return Path(source)
    candidate = SHARED / "data" / "tinyshakespeare" / "input.txt"
    if candidate.is_file():
        return candidate
    pytest.skip("Tiny Shakespeare not found: run `make data` or set SHAKESPEARE_SOURCE")


@pytest.fixture(scope="session")
def shakespeare_head(tmp_path_factory, shakespeare_path) -> Path:
    """The first 100,000 characters of Tiny Shakespeare: real text for tests that train as a user does but assert
    nothing about the whole corpus. Its validation split (10,000 characters) evaluates in a blink, where the whole
    corpus's 33,000 validation tokens take most of a tiny run's time."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare-head.txt"
    path.write_text(shakespeare_path.read_text(encoding="utf-8")[:100_000], encoding="utf-8")
    return path


# The app's pages import their shared module as `studio_ui`, as `streamlit run app/Home.py` makes possible.
if str(REPO / "app") not in sys.path:
    sys.path.insert(0, str(REPO / "app"))

APP = REPO / "app"
"""The Streamlit app's folder; pages live in APP / "pages"."""


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its schema made, once per session: MLflow's migrations take about 3 s, so
    every test that needs a new store starts from a copy of this one (:func:`store_from`)."""
    from core.store import connect

    path = tmp_path_factory.mktemp("store-template") / "mlflow.db"
    connect(f"sqlite:///{path}").search_experiments()  # creates and migrates the schema
    return path


def store_from(template: Path, folder: Path) -> str:
    """The URI of a new, empty SQLite store ``folder/mlflow.db``, a copy of ``template`` (see store_template)."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def new_store(store_template):
    """``new_store(folder)``: the URI of a new, empty SQLite store in ``folder`` (made in milliseconds)."""
    return lambda folder: store_from(store_template, Path(folder))


@pytest.fixture
def studio_store(tmp_path, monkeypatch, tiny_checkpoint, new_store) -> str:
    """A temporary tracking store, made the current one, holding two finished runs with per-step metrics and a
    tiny registered model ``shakespeare-gpt`` (version 1, alias ``champion``, linked to the second run)."""
    from mlflow.entities import Metric, Param

    from core.registry import log_and_register
    from core.store import connect, ensure_experiment

    uri = new_store(tmp_path / "store")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    client = connect(uri)
    experiment_id = ensure_experiment(client, "shakespeare-gpt")
    now = 1_790_000_000_000
    for index, lr in enumerate(("6e-4", "3e-4")):
        run_id = client.create_run(experiment_id, run_name=f"run-{index}", start_time=now + index).info.run_id
        params = {"preset": "tiny", "lr": lr, "batch_size": "4", "block_size": "32", "max_steps": "50"}
        metrics = []
        for step in range(1, 51):
            loss = 10.0 / (1 + step * (index + 1) / 10)
            stamp = now + step * 1000
            metrics += [Metric("loss", loss, stamp, step), Metric("avg_loss", loss * 1.1, stamp, step)]
            metrics += [Metric("best_loss", loss, stamp, step), Metric("lr", 6e-4, stamp, step)]
            metrics += [Metric("time_per_batch", 0.05, stamp, step), Metric("tokens_per_sec", 2560.0, stamp, step)]
        metrics += [Metric("val_loss", 5.0 - index, now + 50_000, 50), Metric("val_bpc", 2.0, now + 50_000, 50)]
        client.log_batch(run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
        client.set_tag(run_id, "device", "cpu")
        client.set_terminated(run_id, "FINISHED", end_time=now + 60_000)
    log_and_register(client, run_id, tiny_checkpoint, name="shakespeare-gpt", alias="champion")
    return uri


@pytest.fixture
def empty_store(tmp_path, monkeypatch, new_store) -> str:
    """A temporary, empty tracking store, made the current one."""
    uri = new_store(tmp_path / "empty")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def app_page(page: str, timeout: float = 60):
    """An AppTest of ``page`` ("pages/4_Generate.py", ...) in the real multipage app: entered through Home.py, as
    the sidebar does, so links between pages resolve. Not yet run."""
    from streamlit.testing.v1 import AppTest

    app = AppTest.from_file(str(APP / "Home.py"), default_timeout=timeout)
    app.switch_page(page)
    return app


def cli_in_process(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` run here through its ``main`` and :func:`pipelines.cli.run` (what ``__main__``
    runs): the exit code and what it printed. An exception other than a refusal propagates (a traceback is a bug)."""
    from pipelines.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
        run(importlib.import_module(module).main, list(args))
    code = exited.value.code if isinstance(exited.value.code, int) else 1
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def assert_usage_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]


def require_llama_cpp():
    """``llama_cpp``; where llama-cpp-python is not installed the test is skipped with the reason, except in CI
    (``CI`` set), where .ci/run installs it and a missing package is a failure, never a skip."""
    try:
        import llama_cpp
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("llama-cpp-python is not installed, and CI must run the llama.cpp tests (.ci/run installs it)")
        pytest.skip("llama-cpp-python is not installed: pip install -r requirements-llamacpp.txt (builds llama.cpp)")
    return llama_cpp
