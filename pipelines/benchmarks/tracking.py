"""Tracking overheads: what MLflow logging costs a training step, and how fast long histories are read back."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from core.callbacks import Callback
from core.config import DataConfig, ModelConfig, TrainConfig
from core.trainer import Trainer
from pipelines.benchmarks.rows import Row, lower_is_better


class _TimedLogger(Callback):
    """Forwards the step and eval reports to ``logger`` and adds up the time those calls take on the training
    thread, and the steps' own time (the trainer's ``time_per_batch``, which leaves callbacks out)."""

    def __init__(self, logger: Callback) -> None:
        self.logger = logger
        self.foreground_seconds = 0.0
        self.step_seconds: list[float] = []

    def _timed(self, hook: str, step: int, metrics: dict[str, float]) -> None:
        started = time.perf_counter()
        getattr(self.logger, hook)(step, metrics)
        self.foreground_seconds += time.perf_counter() - started

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.step_seconds.append(metrics["time_per_batch"])
        self._timed("on_step", step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._timed("on_eval", step, metrics)


def _tiny_trainer(corpus: str, steps: int, callbacks: list[Callback]) -> Trainer:
    """The tiny preset at its default batch (2,048 tokens), with no evaluation, periodic samples or resumable
    checkpoints."""
    model = ModelConfig.from_preset("tiny")
    data = DataConfig(source=corpus, batch_size=16, block_size=model.block_size)
    train = TrainConfig(
        max_steps=steps, target_loss=0, eval_interval=0, sample_interval=0, sample_tokens=1, checkpoint_interval=0
    )
    return Trainer(model, data, train, callbacks)


def logging_overhead(corpus: str, steps: int = 30, repeats: int = 3, log: Callable[[str], None] = print) -> Row:
    """MLflow logging cost as a percentage of the tiny preset's step time: the asynchronous batched
    :class:`core.tracking.MlflowLogger` (ours) against one synchronous ``log_batch`` per step (reference).

    Each repeat trains ``steps`` steps once per mode against a fresh SQLite store and adds up everything the
    logger costs: the time its calls take on the training thread, the CPU time of its background thread (which
    competes with training for the cores), and the final flush. Overhead = that cost / the steps' own time. Direct
    accounting rather than a difference of two noisy wall times: on a busy 2-core machine step times wander by
    more than the 2% being measured. Reported: the median over repeats.
    """
    from core.store import connect, ensure_experiment
    from core.tracking import MlflowLogger

    overheads: dict[str, list[float]] = {"async": [], "sync": []}
    with tempfile.TemporaryDirectory(prefix="studio-bench-") as scratch:
        client = connect(f"sqlite:///{Path(scratch) / 'mlflow.db'}")
        experiment_id = ensure_experiment(client, "benchmark")
        for repeat in range(repeats):
            step_ms = {}
            for mode in ("async", "sync"):
                run_id = client.create_run(experiment_id, run_name=f"{mode}-{repeat}").info.run_id
                logger = MlflowLogger(client, run_id, asynchronous=mode == "async")
                timed = _TimedLogger(logger)
                _tiny_trainer(corpus, steps, [timed]).fit(Path(scratch) / f"{mode}-{repeat}")
                started = time.perf_counter()
                logger.close()
                cost = timed.foreground_seconds + logger.background_cpu_seconds + time.perf_counter() - started
                overheads[mode].append(100 * cost / sum(timed.step_seconds))
                step_ms[mode] = 1000 * statistics.median(timed.step_seconds)
                stored = client.get_metric_history(run_id, "loss")
                if len(stored) != steps:
                    raise RuntimeError(f"{mode} logging stored {len(stored)} of {steps} loss points")
            log(
                f"  repeat {repeat + 1}/{repeats}: median step {step_ms['async']:.0f} ms; logging overhead "
                f"async {overheads['async'][-1]:.3f}%, sync {overheads['sync'][-1]:.3f}%"
            )
    return lower_is_better(
        "log_overhead",
        statistics.median(overheads["async"]),
        statistics.median(overheads["sync"]),
        "% of step time",
        "tiny preset B=16 T=128: async batched logger vs a synchronous log_batch per step",
    )


def _fill_long_runs(uri: str, client, experiment_id: str, runs: int, steps: int, metrics: list[str]) -> list[str]:
    """``runs`` finished runs with ``steps`` points of each metric. Fixture data only: the runs are made through the
    API, and their points are bulk-inserted into the tables of MLflow's own SQLAlchemy models (its ``log_batch``
    takes 0.3 s per 1,000 points, minutes for a million), then read back through the API like any run."""
    import numpy as np
    import sqlalchemy
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric

    run_ids = [client.create_run(experiment_id, run_name=f"long-{r}").info.run_id for r in range(runs)]
    step_numbers = np.arange(1, steps + 1)
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.begin() as connection:
            for r, run_id in enumerate(run_ids):
                for k, key in enumerate(metrics):
                    values = (k + 1) * 10.0 / (1 + step_numbers / (100 * (r + 1)))
                    points = [
                        {"key": key, "value": float(v), "timestamp": 1_790_000_000_000 + 50 * int(s)}
                        | {"step": int(s), "is_nan": False, "run_uuid": run_id}
                        for s, v in zip(step_numbers, values, strict=True)
                    ]
                    connection.execute(sqlalchemy.insert(SqlMetric.__table__), points)
                    connection.execute(sqlalchemy.insert(SqlLatestMetric.__table__), [points[-1]])
    finally:
        engine.dispose()
    for run_id in run_ids:
        client.set_terminated(run_id, "FINISHED")
    return run_ids


def compare_fetch(runs: int = 10, steps: int = 20_000, repeats: int = 3, log: Callable[[str], None] = print) -> Row:
    """Seconds for the Compare Runs page's data work on ``runs`` × ``steps`` steps of its 6 charted metrics:
    fetch every history, downsample each curve to 1,000 points and build the plotly figures (ours, via
    :func:`core.runs.metric_histories`), against fetching the same histories one by one with
    ``MlflowClient.get_metric_history`` and plotting every point (reference). Median of ``repeats``."""
    import plotly.graph_objects as go

    from core.runs import metric_histories
    from core.store import connect, ensure_experiment

    charted = ["loss", "avg_loss", "best_loss", "lr", "time_per_batch", "val_loss"]

    def figures(frame) -> int:
        built = 0
        for _, data in frame.groupby("metric", sort=False):
            figure = go.Figure()
            for run_id, series in data.groupby("run_id", sort=False):
                figure.add_trace(go.Scatter(x=series["step"], y=series["value"], mode="lines", name=run_id[:8]))
            figure.to_json()  # what Streamlit sends to the browser
            built += 1
        return built

    with tempfile.TemporaryDirectory(prefix="studio-bench-") as scratch:
        uri = f"sqlite:///{Path(scratch) / 'mlflow.db'}"
        client = connect(uri)
        run_ids = _fill_long_runs(uri, client, ensure_experiment(client, "long"), runs, steps, charted)
        ours, reference = [], []
        for repeat in range(repeats):
            started = time.perf_counter()
            assert figures(metric_histories(client, run_ids, charted, max_points=1000)) == len(charted)
            ours.append(time.perf_counter() - started)

            import pandas as pd

            started = time.perf_counter()
            rows = [
                {"run_id": run_id, "metric": key, "step": m.step, "value": m.value}
                for run_id in run_ids
                for key in charted
                for m in client.get_metric_history(run_id, key)
            ]
            figures(pd.DataFrame(rows))
            reference.append(time.perf_counter() - started)
            if len(rows) != runs * steps * len(charted):  # the fixture, read back through MLflow's API, is whole
                raise RuntimeError(f"MLflow returned {len(rows)} of {runs * steps * len(charted)} fixture points")
            log(f"  repeat {repeat + 1}/{repeats}: ours {ours[-1]:.2f} s, reference {reference[-1]:.2f} s")
    return lower_is_better(
        "compare_fetch",
        statistics.median(ours),
        statistics.median(reference),
        "s",
        f"{runs} runs × {steps:,} steps × {len(charted)} charts: fetch, downsample, build figures",
    )


# -- against Hugging Face transformers' GPT2LMHeadModel ------------------------------------------------------------
