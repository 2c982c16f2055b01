"""Checking a sweep before it runs: a new one (:func:`plan_sweep`) or a stopped one resumed (:func:`plan_resume`).
Nothing is created by either."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from core.config import DataConfig, ModelConfig, TrackingConfig, TrainConfig
from core.errors import UsageError
from core.sweep.settings import SweepSettings, default_storage, existing_study_id
from core.sweep.space import SHAPE_FIELDS, check_space


@dataclass
class SweepPlan:
    """A validated sweep, ready for :func:`run_sweep`; making one creates nothing."""

    settings: SweepSettings
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    """The base configs every trial starts from (``train.time_budget`` is the trial budget)."""
    tracking: TrackingConfig
    """Experiment, registered model name and alias, store and checkpoint root; ``run_name`` names the parent run."""
    storage: str
    """The Optuna storage URL of the study."""
    parent_run_id: str | None = None
    """The parent run of a sweep being resumed; None for a new sweep."""


def plan_sweep(
    settings: SweepSettings,
    model: ModelConfig,
    data: DataConfig,
    train: TrainConfig,
    tracking: TrackingConfig,
    *,
    storage: str | None = None,
) -> SweepPlan:
    """Check a new sweep: the space against the configs (:func:`check_space`), that the metric gets logged, that a
    local corpus exists and that no study of that name exists in ``storage`` (default: :func:`default_storage` of
    the tracking store). Raises :class:`UsageError` (one line); creates nothing."""
    from core.data import is_url, prepare_corpus
    from core.tokenizer import get_tokenizer

    if train.eval_interval == 0:
        raise UsageError(
            f"--metric {settings.metric} is never logged: --eval-interval 0 turns validation off; give an interval"
        )
    if not is_url(data.source) and not Path(data.source).is_file():
        raise UsageError(f"corpus file not found: {data.source}")
    # Prepared (downloaded and tokenised, cached) before anything is created: a corpus every trial would fail on
    # stops the sweep here, with the corpus's own message, instead of leaving a study of failed trials.
    prepare_corpus(data, get_tokenizer())
    shaped = [spec.text for spec in settings.space if set(spec.targets) & SHAPE_FIELDS]
    if train.init_from is not None and shaped:
        raise UsageError(f"--param {shaped[0]}: with --init-from the model's shape comes from the checkpoint")
    train = dataclasses.replace(train, time_budget=settings.trial_budget)
    check_space(settings.space, model, data, train)
    storage = storage or default_storage(tracking.tracking_uri)
    _, study_id = existing_study_id(storage, settings.name)
    if study_id is not None:
        raise UsageError(
            f"a sweep named {settings.name!r} already exists in {storage}; continue it with --resume {settings.name}, "
            "or choose another --name"
        )
    return SweepPlan(settings, model, data, train, tracking, storage)


def plan_resume(
    name: str,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    n_trials: int | None = None,
    time_budget: float | None = None,
) -> SweepPlan:
    """Check that sweep ``name`` can go on, with its stored settings (``n_trials`` and ``time_budget``, when given,
    replace the stored ones). Refused (:class:`UsageError`): no such study, a finished sweep, or one whose process
    still runs. Creates and changes nothing."""

    from core.store import existing_run
    from core.store import tracking_uri as current_tracking_uri
    from core.tracking import HOST_TAG, PID_TAG

    uri = tracking_uri or current_tracking_uri()
    storage = storage or default_storage(uri)
    opened, study_id = existing_study_id(storage, name)
    if study_id is None:
        raise UsageError(f"no sweep named {name!r} in {storage}")
    attrs = opened.get_study_user_attrs(study_id)
    try:
        stored = attrs["sweep"]
        settings = SweepSettings.from_dict(stored["settings"])
        model = ModelConfig.from_dict(stored["model"])
        data, train = DataConfig(**stored["data"]), TrainConfig(**stored["train"])
        tracking = TrackingConfig(**{**stored["tracking"], "tracking_uri": uri})
        parent_run_id = attrs["parent_run_id"]
    except (KeyError, TypeError, ValueError) as exc:
        raise UsageError(f"study {name!r} in {storage} was not made by pipelines.sweep ({exc})") from None
    changes = {k: v for k, v in (("n_trials", n_trials), ("time_budget", time_budget)) if v is not None}
    settings = dataclasses.replace(settings, **changes)
    _, parent = existing_run(
        uri,
        parent_run_id,
        no_store=f"sweep {name!r} has its runs in another tracking store: {uri} does not exist",
        no_run=f"sweep {name!r}: its parent run {parent_run_id} is not in {uri}",
    )
    status = parent.info.status
    if parent.info.lifecycle_stage == "deleted":
        raise UsageError(f"sweep {name!r}: its parent run {parent_run_id} is deleted; restore it to resume")
    if status == "FINISHED":
        raise UsageError(f"sweep {name!r} is finished (run {parent_run_id}); start another with a new --name")
    if status == "RUNNING" and _owner_alive(parent.data.tags):
        tags = parent.data.tags
        raise UsageError(
            f"sweep {name!r} is running (process {tags.get(PID_TAG)} on {tags.get(HOST_TAG)}); cancel it before "
            "resuming"
        )
    return SweepPlan(settings, model, data, train, tracking, storage, parent_run_id)


def _owner_alive(tags: dict[str, str]) -> bool:
    """Whether the process named by a run's process tags (:func:`core.tracking.process_tags`) runs on this machine
    (same pid *and* start time); a run of another machine counts as alive: it cannot be checked from here."""
    import socket

    import psutil

    from core.tracking import HOST_TAG, PID_TAG, PROCESS_START_TAG

    if tags.get(HOST_TAG) != socket.gethostname():
        return HOST_TAG in tags
    try:
        process = psutil.Process(int(tags[PID_TAG]))
        return abs(process.create_time() - float(tags[PROCESS_START_TAG])) < 1.0
    except (KeyError, ValueError, psutil.NoSuchProcess, psutil.AccessDenied):
        return False
