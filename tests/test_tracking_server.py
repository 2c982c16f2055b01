"""The studio against a real ``mlflow server`` on loopback: train, register, generate and the app's pages, all
through the server's REST API and artifact proxy, as a team sharing one store would use it.

The server is started the way a user starts it (``mlflow server --backend-store-uri ... --artifacts-destination
...``), once with a SQLite backend store (always) and once with PostgreSQL: a fresh database on the server that
``$STUDIO_TEST_POSTGRES_URI`` names (``postgresql://user:password@host:port/db`` of a role that may create
databases; ``.ci/run`` installs Debian's PostgreSQL, starts it and sets it). Without that variable the PostgreSQL
round is skipped.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from core.config import DataConfig, ModelConfig, SampleConfig, TrackingConfig, TrainConfig
from tests.conftest import REPO, app_page, cli_in_process, store_from

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.name != "posix", reason="uses POSIX process groups")]

MODEL = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
STEPS = 8
STEP_METRICS = ("loss", "avg_loss", "best_loss", "lr", "time_per_batch", "tokens_per_sec")
SERVER_START_S = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def backend_store(kind: str, root: Path, template: Path) -> Iterator[str]:
    """The ``--backend-store-uri`` of a new, empty store of ``kind``, removed afterwards (a PostgreSQL database).
    A SQLite one is a copy of the session's migrated ``template`` (the server then has no migrations to run)."""
    if kind == "sqlite":
        yield store_from(template, root)
        return
    admin_uri = os.environ.get("STUDIO_TEST_POSTGRES_URI")
    if not admin_uri:
        pytest.skip("set STUDIO_TEST_POSTGRES_URI (as .ci/run does) to test a PostgreSQL backend store")
    import psycopg

    database = f"studio_test_{secrets.token_hex(4)}"
    # autocommit: CREATE/DROP DATABASE cannot run inside a transaction
    admin = psycopg.connect(admin_uri, autocommit=True)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {database}")
        try:
            yield admin_uri.rsplit("/", 1)[0] + f"/{database}"
        finally:
            with admin.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
    finally:
        admin.close()


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory, store_template) -> Iterator[str]:
    """A real ``mlflow server`` with a SQLite or PostgreSQL backend and a proxied artifact store, stopped after the
    module's tests have run against it."""
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if mlflow_cli is None:
        pytest.skip("the mlflow command is not installed")
    root = tmp_path_factory.mktemp("server")
    with backend_store(request.param, root, store_template) as store_uri:
        yield from _serve(mlflow_cli, store_uri, root)


def _serve(mlflow_cli: str, store_uri: str, root: Path) -> Iterator[str]:
    port = free_port()
    log = (root / "server.log").open("w")
    command = [
        mlflow_cli,
        "server",
        "--backend-store-uri",
        store_uri,
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def trained(server, tmp_path_factory, shakespeare_head):
    """One tiny training run tracked and registered through the server."""
    from core.experiment import run_training

    work = tmp_path_factory.mktemp("work")
    data = DataConfig(source=str(shakespeare_head), cache_dir=str(work / "data"), batch_size=2, block_size=32)
    train = TrainConfig(
        max_steps=STEPS, eval_interval=4, sample_interval=0, sample_tokens=4, target_loss=0, device="cpu", lr=3e-3
    )
    tracking = TrackingConfig(
        experiment="shared", run_name="via-server", alias="champion", preset="tiny", tracking_uri=server,
        checkpoint_root=str(work / "checkpoints"),
    )  # fmt: skip
    return run_training(MODEL, data, train, tracking)


def test_training_logs_every_step_and_registers_through_the_server(server, trained):
    from core.registry import resolve_model_version
    from core.store import connect

    client = connect(server)
    assert trained.status == "FINISHED" and trained.model_version == "1"
    assert client.get_run(trained.run_id).info.status == "FINISHED"
    for name in STEP_METRICS:
        assert sorted(m.step for m in client.get_metric_history(trained.run_id, name)) == list(range(1, STEPS + 1))
    version = resolve_model_version(client, "shakespeare-gpt@champion")
    assert version.run_id == trained.run_id
    # The artifacts live behind the server's proxy (mlflow-artifacts:), not on a path only this machine sees.
    assert client.get_model_version_download_uri("shakespeare-gpt", "1").startswith("mlflow-artifacts:")


def test_the_registered_model_generates_through_the_server(server, trained, tokenizer):
    from core.registry import clear_model_cache, load_registered_model
    from core.sampling import generate
    from core.store import connect

    clear_model_cache()
    model, version, _ = load_registered_model(connect(server), "shakespeare-gpt/1")
    assert model.config == MODEL and version.version == "1"
    result = generate(model, tokenizer, "ROMEO:", SampleConfig(max_new_tokens=6, seed=3, stop_at_eot=False))
    assert result.samples[0].startswith("ROMEO:") and result.new_tokens == [6]


def test_the_generate_cli_follows_mlflow_tracking_uri(server, trained, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    done = cli_in_process("pipelines.generate", "--prompt", "JULIET:", "--max-new-tokens", "5", "--json")
    assert done.returncode == 0, done.stderr
    assert '"samples"' in done.stdout and "JULIET:" in done.stdout


@pytest.mark.parametrize(
    "page", ["Home.py", "pages/1_Train.py", "pages/2_Compare_Runs.py", "pages/3_Architecture.py", "pages/4_Generate.py"]
)
def test_every_page_loads_against_the_server(server, trained, monkeypatch, shakespeare_path, page):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("SHAKESPEARE_SOURCE", str(shakespeare_path))  # the Train page's default corpus, offline
    if page == "Home.py":
        from streamlit.testing.v1 import AppTest

        app = AppTest.from_file(str(REPO / "app" / "Home.py"), default_timeout=60).run()
    else:
        app = app_page(page).run()
    assert not app.exception, app.exception
    assert not app.error, [e.value for e in app.error]
    assert any(server in c.value for c in app.sidebar.caption)
