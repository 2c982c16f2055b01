"""A tracked training run: the trainer wired to an MLflow run, ending in a registered model version.

:func:`run_training` checks every input before it creates anything in the store, so a refused request leaves the
store unchanged. The run ends FINISHED (and registers its model), KILLED when stopped by SIGTERM/SIGINT (after
saving a checkpoint), or FAILED on an error.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from core.config import DataConfig, ModelConfig, TrackingConfig, TrainConfig
from core.store import DEFAULT_STORE_DIR, connect, ensure_experiment
from core.tracking import MlflowLogger, log_params, run_tags
from core.trainer import Callback, Trainer, TrainResult


@dataclass
class TrainingOutcome:
    """What :func:`run_training` produced."""

    run_id: str
    """The MLflow run."""
    status: str
    """FINISHED or KILLED."""
    result: TrainResult
    """The trainer's result (steps, stop reason, checkpoints)."""
    model_name: str | None
    """Registered model name (None when the run was stopped before finishing)."""
    model_version: str | None
    """Registered version number."""


def run_params(model: ModelConfig, data: DataConfig, train: TrainConfig, tracking: TrackingConfig) -> dict:
    """Every hyperparameter and model-config field, flat. The model's block_size is logged as ``context``."""
    params: dict[str, object] = {"preset": tracking.preset}
    params.update({("context" if k == "block_size" else k): v for k, v in model.to_dict().items()})
    params.update({("data_source" if k == "source" else k): v for k, v in dataclasses.asdict(data).items()})
    params.pop("cache_dir")
    params["data_seed"] = params.pop("seed")
    params.update(train.to_dict())
    params.update(
        {"register_as": tracking.register_as, "alias": tracking.alias, "register_best": tracking.register_best}
    )
    return params


@contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGTERM and SIGINT ask the trainer to stop after its current step (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        trainer.request_stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_training(
    model_config: ModelConfig,
    data_config: DataConfig,
    train_config: TrainConfig,
    tracking: TrackingConfig,
    callbacks: Iterable[Callback] = (),
    *,
    on_run_created=None,
) -> TrainingOutcome:
    """Train with every step logged to MLflow and register the resulting checkpoint.

    ``on_run_created(run_id)`` is called as soon as the run exists (e.g. to record a background job's run id).
    """
    from core.registry import log_and_register

    trainer = Trainer(model_config, data_config, train_config)  # validates device, corpus and shapes first
    client = connect(tracking.tracking_uri)
    experiment_id = ensure_experiment(client, tracking.experiment)
    summary_tags = run_tags(
        tracking.preset, trainer.corpus.meta["name"], trainer.corpus.meta["sha256"], str(trainer.device)
    )
    tags = {t.key: t.value for t in summary_tags}
    if train_config.init_from is not None:
        tags["init_from"] = train_config.init_from
    run = client.create_run(experiment_id, run_name=tracking.run_name, tags=tags)
    run_id = run.info.run_id
    if on_run_created is not None:
        on_run_created(run_id)
    logger = MlflowLogger(client, run_id)
    trainer.callbacks = [logger, *callbacks]
    checkpoint_root = Path(tracking.checkpoint_root) if tracking.checkpoint_root else DEFAULT_STORE_DIR / "checkpoints"
    try:
        log_params(client, run_id, run_params(model_config, data_config, train_config, tracking))
        with _stop_on_signals(trainer):
            result = trainer.fit(checkpoint_root / run_id)
        logger.close()
        if result.stop_reason.startswith("stopped"):
            client.set_tag(run_id, "stop_reason", result.stop_reason)
            client.set_terminated(run_id, "KILLED")
            return TrainingOutcome(run_id, "KILLED", result, None, None)
        checkpoint = result.best_checkpoint if tracking.register_best and result.best_checkpoint else None
        checkpoint = checkpoint or result.final_checkpoint
        version = log_and_register(client, run_id, checkpoint, name=tracking.register_as, alias=tracking.alias)
        client.set_tag(run_id, "stop_reason", result.stop_reason)
        client.set_tag(run_id, "registered_model", f"{version.name}/{version.version}")
        client.set_terminated(run_id, "FINISHED")
        return TrainingOutcome(run_id, "FINISHED", result, version.name, str(version.version))
    except BaseException as exc:
        try:
            logger.close()  # keep every point logged before the failure
        finally:
            client.set_tag(run_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
            client.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
