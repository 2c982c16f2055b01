"""Side-by-side measurements for ``python -m pipelines.benchmark``: each row pits the studio against a reference
measured in the same process, on the same machine, with warm-up and repeats, and reports medians.

A row is ``{"name", "ours", "reference", "unit", "ratio"}``. ``ratio`` is oriented so that above 1 means the studio
is better: ours / reference for throughputs, reference / ours for costs (seconds, percent).
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from core.config import DataConfig, ModelConfig, TrainConfig
from core.trainer import Callback, Trainer


@dataclass(frozen=True)
class Row:
    """One benchmark result: the studio's figure, the reference's, and how they compare."""

    name: str
    """Stable identifier, e.g. ``log_overhead``."""
    ours: float
    """The studio's median."""
    reference: float
    """The reference's median, measured in the same run."""
    unit: str
    """Unit of ``ours`` and ``reference``."""
    ratio: float
    """Above 1 means the studio is better (see the module docstring)."""
    note: str = ""
    """What was measured, in a few words."""

    def to_dict(self) -> dict:
        return asdict(self)


def higher_is_better(name: str, ours: float, reference: float, unit: str, note: str = "") -> Row:
    """A throughput row: ratio = ours / reference."""
    return Row(name, ours, reference, unit, ours / reference if reference else math.inf, note)


def lower_is_better(name: str, ours: float, reference: float, unit: str, note: str = "") -> Row:
    """A cost row: ratio = reference / ours."""
    return Row(name, ours, reference, unit, reference / ours if ours else math.inf, note)


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
    """The tiny preset at its default batch (2,048 tokens), with no evaluation and no periodic samples."""
    model = ModelConfig.from_preset("tiny")
    data = DataConfig(source=corpus, batch_size=16, block_size=model.block_size)
    train = TrainConfig(max_steps=steps, target_loss=0, eval_interval=0, sample_interval=0, sample_tokens=1)
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
