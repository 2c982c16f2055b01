"""A tracked training run: the trainer wired to an MLflow run, ending in a registered model version.

:func:`run_training` checks every input before it creates anything in the store, so a refused request leaves the
store unchanged. The run ends FINISHED (and registers its model), KILLED when stopped by SIGTERM/SIGINT (after
saving a checkpoint), or FAILED on an error. Its checkpoints go to ``<checkpoint root>/<run id>/`` (recorded in the
run's ``checkpoint_dir`` tag): ``final``, ``best``, and the resumable ones under ``resume``.

A run may be nested under another (``TrackingConfig.parent_run_id``: a sweep's trial under its sweep) and may skip
registering (``TrackingConfig.register``). A caller's own stop rule (a sweep's pruner) stops the trainer with a
reason it names in ``stop_rules``: such a run ends FINISHED with that ``stop_reason``, not KILLED.

A KILLED or FAILED run continues with :func:`find_resume_point`, then :func:`resume_training`: the same MLflow run,
set back to RUNNING, trains on from its latest resumable checkpoint with the configs stored in that checkpoint
(checked against the run's logged params). Metric points continue at the next step; a step the stopped process had
already logged (it may have got past its last checkpoint before dying) is not logged again, so every step keeps
exactly one point. Every refusal (unknown run, a FINISHED or RUNNING run, no checkpoint, a corrupt or foreign one)
happens before anything in the store changes.

In a torchrun job (``dist``, see :mod:`core.distributed`) every process trains, but only rank 0 talks to MLflow: it
creates the one run of the job (with ``world_size`` among its params), logs, writes the checkpoints and registers
the model; it sends the run id to the other ranks, which train silently beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import signal
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import RunTag
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from core.callbacks import Callback, TrainResult
from core.checkpoint import CheckpointError, latest_resumable_checkpoint, read_training_state
from core.config import DataConfig, ModelConfig, TrackingConfig, TrainConfig
from core.distributed import SINGLE, DistContext, broadcast_text, watch_launcher
from core.errors import UsageError
from core.run_samples import logged_samples
from core.store import DEFAULT_STORE_DIR, connect, ensure_experiment, existing_run
from core.store import tracking_uri as current_tracking_uri
from core.tracking import MlflowLogger, log_params, process_tags, run_tags
from core.trainer import Trainer

CHECKPOINT_DIR_TAG = "checkpoint_dir"
"""Run tag holding the run's checkpoint folder, so a resume finds it without being told the checkpoint root."""
RESUMABLE_STATUSES = ("KILLED", "FAILED")
"""Run states :func:`find_resume_point` accepts: stopped before the end."""
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


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


def run_params(
    model: ModelConfig, data: DataConfig, train: TrainConfig, tracking: TrackingConfig, world_size: int = 1
) -> dict:
    """Every hyperparameter and model-config field, flat. The model's block_size is logged as ``context``;
    ``batch_size`` is per process, ``global_batch_size`` = batch_size × grad_accum × ``world_size``."""
    params: dict[str, object] = {"preset": tracking.preset}
    params.update({("context" if k == "block_size" else k): v for k, v in model.to_dict().items()})
    params.update({("data_source" if k == "source" else k): v for k, v in dataclasses.asdict(data).items()})
    params.pop("cache_dir")
    params["data_seed"] = params.pop("seed")
    params.update(train.to_dict())
    params.update(
        {"register_as": tracking.register_as, "alias": tracking.alias, "register_best": tracking.register_best}
    )
    params["world_size"] = world_size
    params["global_batch_size"] = data.batch_size * train.grad_accum * world_size
    return params


@contextmanager
def _stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """SIGTERM and SIGINT ask the trainer to stop after its current step (main thread only); so does the end of
    the torchrun launcher of a multi-process job (see :func:`core.distributed.watch_launcher`)."""
    stop_watching = watch_launcher(trainer.request_stop) if trainer.dist.enabled else None
    try:
        if threading.current_thread() is not threading.main_thread():
            yield
        else:
            with _signal_handlers(trainer):
                yield
    finally:
        if stop_watching is not None:
            stop_watching()


@contextmanager
def _signal_handlers(trainer: Trainer) -> Iterator[None]:
    """SIGTERM and SIGINT call ``trainer.request_stop``; the previous handlers come back afterwards."""

    def handler(signum, _frame):
        trainer.request_stop(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def default_checkpoint_root() -> Path:
    """Where checkpoints go when no root is given: ``mlruns/checkpoints`` beside the default store."""
    return DEFAULT_STORE_DIR / "checkpoints"


def run_training(
    model_config: ModelConfig,
    data_config: DataConfig,
    train_config: TrainConfig,
    tracking: TrackingConfig,
    callbacks: Iterable[Callback] = (),
    *,
    on_run_created=None,
    dist: DistContext = SINGLE,
    on_trainer: Callable[[Trainer], None] | None = None,
    stop_rules: Collection[str] = (),
    handle_signals: bool = True,
) -> TrainingOutcome:
    """Train with every step logged to MLflow and register the resulting checkpoint.

    ``on_run_created(run_id)`` is called as soon as the run exists (e.g. to record a background job's run id).
    ``on_trainer(trainer)`` is called once the trainer exists, before the run is created, so that the caller can
    stop it (``trainer.request_stop(why)``). A stop whose ``why`` is one of ``stop_rules`` is the caller's stop rule
    (e.g. a pruned sweep trial): the run ends FINISHED with ``stop_reason`` = ``why`` and registers its model as
    a finished run does (if ``tracking.register``); any other stop request ends it KILLED. With ``handle_signals``
    False, SIGTERM and SIGINT are left to the caller's handlers (which then stop the trainer themselves).
    On ranks other than 0 of a torchrun job, nothing is logged and ``callbacks`` and ``on_run_created`` are unused.
    """
    # Validates device, corpus and shapes first (on every rank, so a bad input stops every process alike).
    trainer = Trainer(model_config, data_config, train_config, dist=dist)
    if on_trainer is not None:
        on_trainer(trainer)
    if not dist.is_main:
        return _follow(trainer, tracking)
    client = connect(tracking.tracking_uri)
    experiment_id = ensure_experiment(client, tracking.experiment)
    summary_tags = run_tags(
        tracking.preset, trainer.corpus.meta["name"], trainer.corpus.meta["sha256"], str(trainer.device)
    )
    tags = {t.key: t.value for t in summary_tags}
    if train_config.init_from is not None:
        tags["init_from"] = train_config.init_from
    if tracking.parent_run_id is not None:
        tags[MLFLOW_PARENT_RUN_ID] = tracking.parent_run_id  # what the MLflow UI nests runs by
    run = client.create_run(experiment_id, run_name=tracking.run_name, tags=tags)
    run_id = run.info.run_id
    if on_run_created is not None:
        on_run_created(run_id)
    logger = MlflowLogger(client, run_id)
    out_dir = _checkpoint_root(tracking) / run_id
    if dist.enabled:
        broadcast_text(run_id, dist)  # the other ranks wait for it before their first step

    def start() -> None:
        client.set_tag(run_id, CHECKPOINT_DIR_TAG, str(out_dir.resolve()))
        log_params(client, run_id, run_params(model_config, data_config, train_config, tracking, dist.world_size))

    return _train_and_end(
        client,
        run_id,
        trainer,
        tracking,
        [logger, *callbacks],
        out_dir,
        start,
        stop_rules=stop_rules,
        handle_signals=handle_signals,
    )


def _checkpoint_root(tracking: TrackingConfig) -> Path:
    return Path(tracking.checkpoint_root) if tracking.checkpoint_root else default_checkpoint_root()


def _follow(trainer: Trainer, tracking: TrackingConfig, run_id: str | None = None) -> TrainingOutcome:
    """A rank other than 0: take the run id from rank 0 (unless known), then train beside it, logging nothing."""
    run_id = broadcast_text(None, trainer.dist) if run_id is None else run_id
    trainer.callbacks = []
    with _stop_on_signals(trainer):
        result = trainer.fit(_checkpoint_root(tracking) / run_id)
    status = "KILLED" if result.stop_reason.startswith("stopped") else "FINISHED"
    return TrainingOutcome(run_id, status, result, None, None)


def _train_and_end(
    client,
    run_id: str,
    trainer: Trainer,
    tracking: TrackingConfig,
    callbacks: list[Callback],
    out_dir: Path,
    start: Callable[[], None] | None = None,
    *,
    stop_rules: Collection[str] = (),
    handle_signals: bool = True,
) -> TrainingOutcome:
    """Run ``start()`` (if given), fit ``trainer`` into ``out_dir`` with ``callbacks`` (the first is the run's
    :class:`MlflowLogger`), then end run ``run_id``: FINISHED with a registered version (none when
    ``tracking.register`` is False), KILLED when stopped (unless by one of ``stop_rules``, see
    :func:`run_training`), FAILED (and re-raise) on an error, ``start`` failing included."""
    from core.registry import log_and_register

    logger = callbacks[0]
    trainer.callbacks = list(callbacks)
    try:
        if start is not None:
            start()
        with _stop_on_signals(trainer) if handle_signals else contextlib.nullcontext():
            result = trainer.fit(out_dir)
        logger.close()
        rule = result.stop_reason.removeprefix("stopped: ")
        if result.stop_reason.startswith("stopped: ") and rule in stop_rules:
            result.stop_reason = rule  # the caller's stop rule, as "patience" is the trainer's own
        if result.stop_reason.startswith("stopped"):
            client.set_tag(run_id, "stop_reason", result.stop_reason)
            client.set_terminated(run_id, "KILLED")
            return TrainingOutcome(run_id, "KILLED", result, None, None)
        if result.planned_steps is not None:  # a finished time-budget run: the steps its plan settled on
            log_params(client, run_id, {"budget_steps": result.planned_steps})
        if not tracking.register:
            client.set_tag(run_id, "stop_reason", result.stop_reason)
            client.set_terminated(run_id, "FINISHED")
            return TrainingOutcome(run_id, "FINISHED", result, None, None)
        # A budget run's last steps are not always its best on held-out text: it registers its best evaluation.
        best_wanted = tracking.register_best or trainer.config.time_budget is not None
        checkpoint = result.best_checkpoint if best_wanted and result.best_checkpoint else None
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


@dataclass
class ResumePoint:
    """A stopped run and the checkpoint it continues from, checked by :func:`find_resume_point`."""

    run_id: str
    """The MLflow run to continue."""
    checkpoint: Path
    """The resumable checkpoint folder (``.../resume/step-*``)."""
    step: int
    """The checkpoint's step: training continues at ``step + 1``."""
    model_config: ModelConfig
    """The run's model shape, from the checkpoint."""
    data_config: DataConfig
    """The run's data and batches, from the checkpoint."""
    train_config: TrainConfig
    """The run's optimisation and stop rules, from the checkpoint."""
    tracking: TrackingConfig
    """The run's experiment, name and registration settings (from its params), with the store and checkpoint root."""
    logged_through: dict[str, int]
    """For each metric the run has, the last step logged: the resumed run logs only later points."""


def find_resume_point(
    run_id: str,
    *,
    tracking_uri: str | None = None,
    checkpoint_root: str | Path | None = None,
    world_size: int = 1,
) -> ResumePoint:
    """Check that run ``run_id`` can be resumed and find its latest resumable checkpoint. Changes nothing.

    The checkpoint is looked for under ``checkpoint_root/<run_id>/resume``; without a root, in the folder of the
    run's ``checkpoint_dir`` tag, else under ``mlruns/checkpoints``. Raises :class:`UsageError` for a malformed or
    unknown run id (or a tracking store that does not exist), and for a run that is not KILLED or FAILED;
    :class:`CheckpointError` for a run with no resumable checkpoint, or one that is corrupt or does not match the
    run's logged params (``world_size`` processes included: a run resumes with as many as it was started with).
    """

    if not isinstance(run_id, str) or _RUN_ID.fullmatch(run_id) is None:
        raise UsageError(f"invalid run id {run_id!r}: expected the id MLflow printed, e.g. 0123456789abcdef…")
    uri = tracking_uri or current_tracking_uri()
    client, run = existing_run(
        uri,
        run_id,
        no_store=f"no MLflow run {run_id}: the tracking store {uri} does not exist",
        no_run=f"no MLflow run {run_id} in {uri}",
    )
    status = run.info.status
    if run.info.lifecycle_stage == "deleted":
        raise UsageError(f"run {run_id} is deleted; restore it before resuming")
    if status == "FINISHED":
        raise UsageError(f"run {run_id} is FINISHED: there is nothing to resume")
    if status not in RESUMABLE_STATUSES:
        raise UsageError(
            f"run {run_id} is {status}: another process may still be training it (if that process died, "
            "`python -m pipelines.jobs reap` ends the run KILLED; then resume it)"
        )
    if checkpoint_root is not None:
        out_dir = Path(checkpoint_root) / run_id
    elif CHECKPOINT_DIR_TAG in run.data.tags:
        out_dir = Path(run.data.tags[CHECKPOINT_DIR_TAG])
    else:
        out_dir = default_checkpoint_root() / run_id
    try:
        checkpoint = latest_resumable_checkpoint(out_dir)
    except CheckpointError as exc:
        if (out_dir / "resume").exists():
            raise
        raise CheckpointError(
            f"run {run_id} has no resumable checkpoint in {out_dir / 'resume'} (trained with --checkpoint-interval 0, "
            "or with another --checkpoint-root?)"
        ) from exc
    step, model_config, data_config, train_config = _checkpoint_configs(checkpoint)
    params = run.data.params
    missing = [k for k in ("preset", "register_as", "alias", "register_best") if k not in params]
    if missing:
        raise UsageError(f"run {run_id} was not started by pipelines.train: it has no {', '.join(missing)} param")
    tracking = TrackingConfig(
        experiment=client.get_experiment(run.info.experiment_id).name,
        run_name=run.info.run_name,
        register_as=params["register_as"],
        alias=None if params["alias"] == "None" else params["alias"],
        register_best=params["register_best"] == "True",
        preset=params["preset"],
        tracking_uri=uri,
        checkpoint_root=str(out_dir.parent),
    )
    started_with = int(params.get("world_size", 1))
    if started_with != world_size:  # each process's shard of the batches depends on their number
        launcher = (
            f"torchrun --nproc_per_node={started_with} -m pipelines.train"
            if started_with > 1
            else "python -m pipelines.train"
        )
        raise UsageError(
            f"run {run_id} was trained by {started_with} process(es), not {world_size}; resume it with "
            f"`{launcher} --resume {run_id}`"
        )
    for key, value in run_params(model_config, data_config, train_config, tracking, world_size).items():
        if key not in params and key in _PARAMS_SINCE_DDP and world_size == 1 and train_config.grad_accum == 1:
            continue  # a run from before multi-process training: one process, no accumulation
        if params.get(key) != str(value):
            raise CheckpointError(
                f"{checkpoint} does not belong to run {run_id}: its {key} is {value}, the run's is {params.get(key)}"
            )
    logged_through = {}
    for key in run.data.metrics:
        history = client.get_metric_history(run_id, key)
        logged_through[key] = max((m.step for m in history), default=0)
    return ResumePoint(run_id, checkpoint, step, model_config, data_config, train_config, tracking, logged_through)


_PARAMS_SINCE_DDP = ("world_size", "global_batch_size", "grad_accum")


def _checkpoint_configs(checkpoint: Path) -> tuple[int, ModelConfig, DataConfig, TrainConfig]:
    """The step and the configs stored in a resumable checkpoint."""
    state = read_training_state(checkpoint)
    try:
        configs = state["config"]
        model_config = ModelConfig.from_dict(configs["model"])
        data_config = DataConfig(**configs["data"])
        train_config = TrainConfig(**configs["train"])
        return int(state["step"]), model_config, data_config, train_config
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{checkpoint} holds invalid configs: {exc}") from exc


def share_resume_point(point: ResumePoint | None, dist: DistContext) -> ResumePoint:
    """Rank 0's resume point on every rank of a torchrun job (rank 0 passes it, the others None).

    Only the run id and the checkpoint folder travel; the other ranks read the configs from the checkpoint itself.
    Their point carries no tracking store: they never touch it.
    """
    text = broadcast_text(None if point is None else json.dumps([point.run_id, str(point.checkpoint)]), dist)
    if point is not None:
        return point
    run_id, checkpoint = json.loads(text)
    checkpoint = Path(checkpoint)
    step, model_config, data_config, train_config = _checkpoint_configs(checkpoint)
    tracking = TrackingConfig(checkpoint_root=str(checkpoint.parents[2]))
    return ResumePoint(run_id, checkpoint, step, model_config, data_config, train_config, tracking, {})


def resume_training(
    point: ResumePoint, callbacks: Iterable[Callback] = (), *, on_run_created=None, dist: DistContext = SINGLE
) -> TrainingOutcome:
    """Continue the run of ``point`` from its checkpoint until a stop rule fires, ending it as
    :func:`run_training` does (FINISHED and registered, KILLED, or FAILED).

    The whole checkpoint is loaded and checked (:meth:`Trainer.load_training_state`) before the run is touched: a
    corrupt one raises :class:`CheckpointError` with the run still as it was. Then the run gets this process's
    tags and ``resumed_from_step``, loses its ``error`` and ``stop_reason`` tags, is set back to RUNNING, and
    ``on_run_created(run_id)`` is called. The samples artifact keeps the samples up to the checkpoint's step.
    """
    trainer = Trainer(point.model_config, point.data_config, point.train_config, dist=dist)
    trainer.load_training_state(point.checkpoint)
    if not dist.is_main:
        return _follow(trainer, point.tracking, point.run_id)
    client = connect(point.tracking.tracking_uri)
    run_id = point.run_id
    run = client.get_run(run_id)
    if run.info.status not in RESUMABLE_STATUSES:  # changed since find_resume_point looked
        raise UsageError(f"run {run_id} is {run.info.status} now; it can no longer be resumed")
    samples = [(step, text) for step, text in logged_samples(client, run_id) if step <= point.step]
    # This process trains the run now: its process tags first, so that nothing looking for RUNNING runs whose
    # process died (core.jobs) ever sees the run RUNNING with the stopped process's pid.
    tags = {**process_tags(), "resumed_from_step": str(point.step)}
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])
    for key in ("error", "stop_reason"):  # they described how the previous process ended
        if key in run.data.tags:
            client.delete_tag(run_id, key)
    client.update_run(run_id, status="RUNNING")
    if on_run_created is not None:
        on_run_created(run_id)
    logger = MlflowLogger(client, run_id, samples=samples, logged_through=point.logged_through)
    return _train_and_end(client, run_id, trainer, point.tracking, [logger, *callbacks], point.checkpoint.parents[1])
