"""MLflow as a consumer of the trainer's reports: an asynchronous, batched metric logger and run metadata.

:class:`MlflowLogger` implements the logger interface ``log(metrics, step)`` and the trainer's callbacks. A step
costs the trainer one list append; a background thread sends the points with ``log_batch`` (up to 1000 a call)
every ``flush_interval`` seconds (:data:`FLUSH_INTERVAL_S` by default). :meth:`MlflowLogger.close` sends everything
left, so no point is lost when a run ends, and re-raises any error the background thread met instead of hiding it.
A logger continuing a resumed run is given the samples and the last step of each metric the run already has, so
nothing is lost or logged twice.

Every training run is created with :func:`run_tags`, which include :func:`process_tags`: the host, pid and start
time of the process that trains it. They let ``python -m pipelines.jobs reap`` (:func:`core.jobs.reap`) find a run
left RUNNING by a process that died on this machine, and never mistake a live process that reused the pid for it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable

import psutil
import torch
from mlflow.entities import Metric, Param, RunTag

from core.callbacks import Callback, TrainResult
from core.store import REPO_ROOT

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
MAX_PARAMS_PER_BATCH = 100

FLUSH_INTERVAL_S = 5.0
"""Seconds between the background thread's sends. A ``log_batch`` to SQLite costs about 5 ms of CPU on a 2-core
laptop whatever its size, so sending every second cost a sub-second step about 0.8% of the machine, every 5 s
about 0.3% (``pipelines.benchmark --only log_overhead``). The app's live view reads the job's progress file, not
MLflow, so nothing the user watches waits for it; checkpoints and the end of a run flush first."""

HOST_TAG = "studio.host"
"""Tag: the host name of the machine whose process trains the run."""
PID_TAG = "studio.pid"
"""Tag: the pid of the process that trains the run."""
PROCESS_START_TAG = "studio.process_start"
"""Tag: that process's start time (Unix seconds, as ``psutil.Process.create_time`` gives it)."""


class MlflowLogger(Callback):
    """Logs every step's metrics, evaluations, samples and the run summary to the MLflow run ``run_id``.

    With ``asynchronous=False`` each ``log`` call sends its points before returning (used to measure the overhead
    the asynchronous mode saves). ``samples`` are the (step, text) samples already in the run's ``samples.txt``,
    kept at the top of it; ``logged_through`` maps a metric to the last step the run already has for it, and points
    at or before that step are dropped (a resumed run re-taking steps its stopped process had logged).
    """

    def __init__(
        self,
        client,
        run_id: str,
        *,
        asynchronous: bool = True,
        flush_interval: float = FLUSH_INTERVAL_S,
        samples: list[tuple[int, str]] | None = None,
        logged_through: dict[str, int] | None = None,
    ):
        self.client = client
        self.run_id = run_id
        self.asynchronous = asynchronous
        self.flush_interval = flush_interval
        self.samples: list[tuple[int, str]] = list(samples or [])
        self.logged_through = dict(logged_through or {})
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
        points = [
            (key, float(value), now, step) for key, value in metrics.items() if step > self.logged_through.get(key, 0)
        ]
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
        document = format_samples(self.samples)
        self._submit(lambda: self.client.log_text(self.run_id, document, "samples.txt"))

    def on_sample_report(self, step: int, metrics: dict[str, float]) -> None:
        # sample_copied_share and sample_longest_copy_chars, as metrics at the sample's step
        self.log(metrics, step)

    def before_checkpoint(self, step: int) -> None:
        # Blocking: once the checkpoint exists, a resumed run never logs these steps again.
        self.flush()

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


_SAMPLE_HEADER = re.compile(r"^=== step (\d+) ===\n", re.MULTILINE)


def format_samples(samples: list[tuple[int, str]]) -> str:
    """The ``samples.txt`` document of (step, text) samples: a ``=== step N ===`` header line before each."""
    return "".join(f"=== step {s} ===\n{t}\n\n" for s, t in samples)


def parse_samples(document: str) -> list[tuple[int, str]]:
    """The (step, text) samples of a :func:`format_samples` document (a sample's text never holds a header line)."""
    parts = _SAMPLE_HEADER.split(document)
    return [(int(step), text.removesuffix("\n\n")) for step, text in zip(parts[1::2], parts[2::2], strict=True)]


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


def process_tags() -> dict[str, str]:
    """:data:`HOST_TAG`, :data:`PID_TAG` and :data:`PROCESS_START_TAG` of this process."""
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        PROCESS_START_TAG: repr(psutil.Process().create_time()),
    }


def run_tags(preset: str, dataset_name: str, dataset_sha256: str, device: str) -> list[RunTag]:
    """The tags every training run carries, :func:`process_tags` included (the run is created by the process that
    trains it)."""
    tags = {
        "preset": preset,
        "dataset_name": dataset_name,
        "dataset_sha256": dataset_sha256,
        "device": device,
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        **process_tags(),
    }
    return [RunTag(k, v) for k, v in tags.items()]
