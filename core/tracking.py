"""MLflow as a consumer of the trainer's reports: an asynchronous, batched metric logger and run metadata.

:class:`MlflowLogger` implements the logger interface ``log(metrics, step)`` and the trainer's callbacks. A step
costs the trainer one list append; a background thread sends the points with ``log_batch`` (up to 1000 a call)
every ``flush_interval`` seconds. :meth:`MlflowLogger.close` sends everything left, so no point is lost when a run
ends, and re-raises any error the background thread met instead of hiding it.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable

import torch
from mlflow.entities import Metric, Param, RunTag

from core.store import REPO_ROOT
from core.trainer import Callback, TrainResult

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_BATCH = 100


class MlflowLogger(Callback):
    """Logs every step's metrics, evaluations, samples and the run summary to the MLflow run ``run_id``.

    With ``asynchronous=False`` each ``log`` call sends its points before returning (used to measure the overhead
    the asynchronous mode saves).
    """

    def __init__(self, client, run_id: str, *, asynchronous: bool = True, flush_interval: float = 1.0):
        self.client = client
        self.run_id = run_id
        self.asynchronous = asynchronous
        self.flush_interval = flush_interval
        self.samples: list[tuple[int, str]] = []
        self._pending: list[tuple[str, float, int, int]] = []  # (key, value, timestamp ms, step)
        self._jobs: list[Callable[[], None]] = []  # artifact uploads, run in the background thread too
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()  # one sender at a time keeps samples.txt versions in order
        self._wake = threading.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.background_cpu_seconds = 0.0
        """CPU time the background thread has spent sending (what it takes from the training's cores)."""
        if asynchronous:
            self._thread = threading.Thread(target=self._worker, name="mlflow-logger", daemon=True)
            self._thread.start()

    # -- the logger interface -------------------------------------------------------------------------------------

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Record ``metrics`` at ``step`` (timestamped now)."""
        self._raise_worker_error()
        now = int(time.time() * 1000)
        points = [(key, float(value), now, step) for key, value in metrics.items()]
        if not self.asynchronous:
            self._send(points)
            return
        with self._lock:
            self._pending.extend(points)

    def flush(self) -> None:
        """Send every recorded point and finished job now (blocking)."""
        with self._send_lock:
            with self._lock:
                points, self._pending = self._pending, []
                jobs, self._jobs = self._jobs, []
            self._send(points)
            for job in jobs:
                job()

    def close(self) -> None:
        """Stop the background thread after sending everything; raises the first error the thread met."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._wake.set()
            self._thread.join()
        self._raise_worker_error()
        try:
            self.flush()
        except Exception as exc:
            raise RuntimeError(f"logging to MLflow failed: {exc}") from exc

    # -- trainer callbacks ----------------------------------------------------------------------------------------

    def on_train_start(self, summary: dict) -> None:
        params = {
            "total_params": summary["total_params"],
            "trainable_params": summary["trainable_params"],
            "size_mb": summary["size_mb"],
            "tokens_loaded": summary["tokens_loaded"],
            "batches_per_epoch": summary["batches_per_epoch"],
            "tokens_per_batch": summary["tokens_per_batch"],
        }
        self.client.log_batch(self.run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self.client.set_tag(self.run_id, "device", summary["device"])
        self.client.set_tag(self.run_id, "threads", str(summary["threads"]))
        self.client.log_text(self.run_id, json.dumps(summary, indent=2), "run_summary.json")

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.log(metrics, step)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.log(metrics, step)

    def on_sample(self, step: int, text: str) -> None:
        self.samples.append((step, text))
        document = "".join(f"=== step {s} ===\n{t}\n\n" for s, t in self.samples)
        self._submit(lambda: self.client.log_text(self.run_id, document, "samples.txt"))

    def on_train_end(self, result: TrainResult) -> None:
        self.flush()

    # -- internals ------------------------------------------------------------------------------------------------

    def _submit(self, job: Callable[[], None]) -> None:
        if not self.asynchronous:
            job()
            return
        with self._lock:
            self._jobs.append(job)

    def _send(self, points: list[tuple[str, float, int, int]]) -> None:
        for i in range(0, len(points), MAX_METRICS_PER_BATCH):
            chunk = points[i : i + MAX_METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in chunk])

    def _worker(self) -> None:
        while not self._closed:
            self._wake.wait(self.flush_interval)
            if self._closed:
                return  # close() does the final flush from the caller's thread
            started = time.thread_time()
            try:
                self.flush()
            except Exception as exc:  # surfaced by the next log() or by close(), never dropped
                self._error = exc
                return
            finally:
                self.background_cpu_seconds += time.thread_time() - started

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"logging to MLflow failed: {error}") from error


def log_params(client, run_id: str, params: dict[str, object]) -> None:
    """Log ``params`` in batches of MLflow's maximum size."""
    items = [Param(key, str(value)) for key, value in params.items()]  # None stays visible as 'None'
    for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + MAX_PARAMS_PER_BATCH])


def git_commit() -> str:
    """The checkout's commit hash (with ``-dirty`` if it has local changes), or ``unknown`` outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def run_tags(preset: str, dataset_name: str, dataset_sha256: str, device: str) -> list[RunTag]:
    """The tags every training run carries."""
    tags = {
        "preset": preset,
        "dataset_name": dataset_name,
        "dataset_sha256": dataset_sha256,
        "device": device,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
    }
    return [RunTag(k, v) for k, v in tags.items()]
