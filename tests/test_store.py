"""Where the tracking store lives, and how an unusable one is reported."""

from __future__ import annotations

import http.server
import os
import threading
import time

import pytest

from core import store
from core.store import StoreError


def test_the_default_store_is_sqlite_under_mlruns(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = store.tracking_uri()
    assert uri == f"sqlite:///{store.REPO_ROOT / 'mlruns' / 'mlflow.db'}"
    assert store.sqlite_path(uri) == store.REPO_ROOT / "mlruns" / "mlflow.db"
    assert store.artifact_root(uri) == (store.REPO_ROOT / "mlruns" / "artifacts").as_uri()
    assert store.ui_command(uri).startswith(f"mlflow ui --backend-store-uri {uri} ")


def test_the_environment_overrides_the_store(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/other.db")
    assert store.tracking_uri() == f"sqlite:///{tmp_path}/other.db"
    client = store.connect()
    assert (tmp_path / "other.db").is_file()
    experiment_id = store.ensure_experiment(client, "x")
    assert store.ensure_experiment(client, "x") == experiment_id  # idempotent
    assert client.get_experiment(experiment_id).artifact_location == (tmp_path / "artifacts").as_uri()


def test_connecting_to_another_store_leaves_the_users_store_alone(monkeypatch, tmp_path):
    users = f"sqlite:///{tmp_path / 'user' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", users)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    other = store.connect(f"sqlite:///{tmp_path / 'scratch' / 'mlflow.db'}")  # e.g. the benchmark's scratch store
    assert other.tracking_uri.endswith("scratch/mlflow.db")
    assert store.tracking_uri() == users and store.connect().tracking_uri == users
    assert "MLFLOW_REGISTRY_URI" not in os.environ


def test_an_unreachable_server_is_reported_at_once():
    started = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach the MLflow tracking server at http://127.0.0.1:9"):
        store.connect("http://127.0.0.1:9")
    assert time.monotonic() - started < store.SERVER_CHECK_TIMEOUT_S + 1


@pytest.mark.parametrize(("status", "ok"), [(200, True), (403, True), (404, False)])
def test_a_server_is_checked_through_its_health_endpoint(status, ok):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's hook
            seen.append(self.path)
            self.send_response(status)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}"
        if ok:
            store.check_server(uri)
        else:
            with pytest.raises(StoreError, match="answered 404"):
                store.check_server(uri)
    finally:
        server.shutdown()
    assert seen == ["/health"]


@pytest.mark.parametrize("make_client", [store.client, store.connect])
def test_a_client_for_another_store_changes_no_global_uri(tmp_path, new_store, make_client):
    import mlflow

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    other = new_store(tmp_path / "other")
    client = make_client(other)
    client.create_experiment("elsewhere")
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before
    assert client.tracking_uri == other
    with pytest.raises(StoreError, match="cannot reach the MLflow tracking server"):
        store.client("http://127.0.0.1:9")


def test_all_pages_follows_the_page_tokens():
    class Page(list):
        def __init__(self, items, token):
            super().__init__(items)
            self.token = token

    pages = {None: Page([1, 2], "a"), "a": Page([3], "b"), "b": Page([4], None)}
    calls = []

    def search(page_token=None, **kwargs):
        calls.append((page_token, kwargs))
        return pages[page_token]

    assert store.all_pages(search, max_results=2) == [1, 2, 3, 4]
    assert calls == [(None, {"max_results": 2}), ("a", {"max_results": 2}), ("b", {"max_results": 2})]


def test_the_fluent_uri_is_the_blocks_and_afterwards_mlflow_follows_the_environment_again(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/first.db")
    with store.fluent_tracking_uri(f"sqlite:///{tmp_path}/block.db"):
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/block.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/first.db"
    # Not pinned to the store of that moment: a later change of the variable is followed, as before the block.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/second.db")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/second.db"


def test_quiet_artifacts_turns_the_progress_bar_off_for_the_block_only(monkeypatch):
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    with store.quiet_artifacts():
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "true"
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    with store.quiet_artifacts():
        pass
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
