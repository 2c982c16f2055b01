"""Where the MLflow tracking store and registry live.

By default the store is SQLite at ``<repo>/mlruns/mlflow.db`` with artifacts in ``<repo>/mlruns/artifacts``:
embedded, nothing to start. ``MLFLOW_TRACKING_URI`` overrides it (another SQLite file, or an ``http(s)://``
tracking server, which then decides where artifacts go).
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from core.errors import StudioError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STORE_DIR = REPO_ROOT / "mlruns"
DEFAULT_EXPERIMENT = "shakespeare-gpt"
DEFAULT_MODEL_NAME = "shakespeare-gpt"
SERVER_CHECK_TIMEOUT_S = 5.0
"""How long :func:`connect` waits for a tracking server's health check (MLflow's own client retries for minutes)."""


class StoreError(StudioError):
    """The tracking store cannot be used as configured (an unreachable server, a bad URI)."""


def default_tracking_uri() -> str:
    """The embedded SQLite store under the project's ``mlruns/``."""
    return f"sqlite:///{DEFAULT_STORE_DIR / 'mlflow.db'}"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme != "sqlite":
        return None
    return Path(uri[len("sqlite:///") :])


def artifact_root(uri: str) -> str | None:
    """Artifact location for new experiments: beside a SQLite file, or None to let a server decide."""
    db = sqlite_path(uri)
    return (db.parent / "artifacts").resolve().as_uri() if db is not None else None


def ui_command(uri: str | None = None) -> str:
    """The shell command that opens ``uri`` (default: the current store) in the MLflow UI."""
    uri = uri or tracking_uri()
    db = sqlite_path(uri)
    if db is None:
        return f"open {uri} in a browser (the tracking server serves the UI)"
    return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {artifact_root(uri)} --port 5000"


def check_server(uri: str, timeout: float = SERVER_CHECK_TIMEOUT_S) -> None:
    """Raise :class:`StoreError` unless the ``http(s)://`` tracking server at ``uri`` answers its health check.

    Without this, MLflow's client retries an unreachable server with backoff for minutes before failing.
    """
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:  # noqa: S310 - the user's own server
            response.read(64)
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # an authenticating server: it is there; MLflow's client sends the credentials
            return
        raise StoreError(f"the MLflow tracking server at {uri} answered {exc.code} to {health}; is it MLflow?") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise StoreError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}); start it, or unset MLFLOW_TRACKING_URI "
            "to use the local store under mlruns/"
        ) from exc


def connect(uri: str | None = None):
    """An ``MlflowClient`` for store ``uri`` (default: :func:`tracking_uri`), creating a SQLite store's folder if
    needed. Changes no global state: MLflow's fluent URIs and ``MLFLOW_TRACKING_URI`` stay as they were, so one
    process can work on several stores (the code that needs the fluent API sets it for one block, see
    :func:`core.registry.log_and_register`).

    Raises :class:`StoreError` for a tracking server that does not answer within :data:`SERVER_CHECK_TIMEOUT_S`.
    """
    db = sqlite_path(uri or tracking_uri())
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        # MLflow announces creating and migrating the tables at INFO on every first use; not news to a user.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    return client(uri)


def ensure_experiment(client, name: str = DEFAULT_EXPERIMENT) -> str:
    """The id of experiment ``name``, created (with artifacts beside a SQLite store) if it does not exist."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))


def client(uri: str | None = None):
    """An ``MlflowClient`` for store ``uri`` (default: :func:`tracking_uri`) that creates nothing: for code that works
    on a store that must already exist (reconciling a job's run, reaping). A tracking server gets the quick health
    check first (:class:`StoreError` when it does not answer)."""
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    if urllib.parse.urlparse(uri).scheme in ("http", "https"):
        check_server(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextmanager
def quiet_artifacts() -> Iterator[None]:
    """Artifact uploads and downloads in the block draw no progress bar: MLflow draws one on the terminal for every
    transfer, even of one small file, which would break into the trainer's and the CLIs' output."""
    switch = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(switch)
    os.environ[switch] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(switch, None)
        else:
            os.environ[switch] = previous


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at ``uri`` for the block, then put back exactly what was there.

    For the few MLflow calls that only use the global URI (``Model.log`` creates its logged model through it): the
    block works on the caller's store, and the process's other clients are unaffected after it.
    """
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # The URI set explicitly (None when MLflow follows MLFLOW_TRACKING_URI): restoring get_tracking_uri()'s value
    # instead would pin the process to this moment's store. MLflow's setter also exports the variable: restored too.
    previous = getattr(tracking_utils, "_tracking_uri", None)
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def all_pages(search, **kwargs) -> list:
    """Every result of a paged MLflow search call (``search(page_token=..., **kwargs)`` returns a PagedList)."""
    results, token = [], None
    while True:
        page = search(page_token=token, **kwargs)
        results.extend(page)
        token = page.token
        if not token:
            return results


def existing_run(uri: str, run_id: str, *, no_store: str, no_run: str):
    """``(client, run)`` for run ``run_id`` of store ``uri``, never creating a store: a SQLite store that does not
    exist raises ``UsageError(no_store)`` and an unknown run ``UsageError(no_run)`` (the caller says what the run was
    for); any other MLflow error is the store's and propagates."""
    from mlflow.exceptions import MlflowException

    from core.errors import UsageError

    db = sqlite_path(uri)
    if db is not None and not db.is_file():  # connecting would create an empty store: say so instead
        raise UsageError(no_store)
    client = connect(uri)
    try:
        return client, client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise UsageError(no_run) from None
