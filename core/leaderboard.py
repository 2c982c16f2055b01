"""Which run, and which registered model, writes best: each metric's best value and its step beside the last one,
every registered version as a row of one leaderboard, and moving an alias (``champion``) to a version.

Everything goes through MLflow's API (and :func:`core.runs.metric_histories`), so what the studio shows is what the
MLflow UI shows; registry changes are MLflow's own calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from core.names import check_alias
from core.registry import READY, RegistryError, list_registered_models
from core.runs import metric_histories

LOWER_IS_BETTER = ("loss", "avg_loss", "val_loss", "val_bpc")
"""The metrics whose best value is their lowest (losses and bits per character)."""

BEST_COLUMNS = ["run_id", "metric", "best", "best_step", "last", "last_step"]
"""The columns of :func:`best_points`."""

LEADERBOARD_COLUMNS = [
    "name",
    "version",
    "aliases",
    "run_id",
    "run_name",
    "preset",
    "shape",
    "parameters",
    "training_tokens",
    "training_s",
    "best_val_bpc",
    "best_val_loss",
    "best_val_step",
    "decode_tokens_per_sec",
    "copied_share",
    "registered",
    "status",
]
"""The columns of :func:`versions_leaderboard`, in display order."""

DECODE_SPEED_TAG = "decode_tokens_per_sec"
"""Model-version tag holding the decoding speed last measured for the version (tokens/s, with where it ran)."""


def best_points(client, run_ids: Sequence[str], metrics: Sequence[str] = LOWER_IS_BETTER) -> pd.DataFrame:
    """Each (run, metric)'s lowest value and the step where it was first reached, beside its last value and step.

    Columns: :data:`BEST_COLUMNS`. A metric a run never logged has no row; NaN points never count as best. Reads
    every point of the series once (:func:`core.runs.metric_histories`), so an unknown run id raises.
    """
    history = metric_histories(client, run_ids, metrics)
    if history.empty:
        return pd.DataFrame(columns=BEST_COLUMNS).astype({"best_step": "int64", "last_step": "int64"})
    keys = ["run_id", "metric"]
    last = history.groupby(keys, sort=False).tail(1)[[*keys, "value", "step"]]  # rows come ordered by step
    finite = history.dropna(subset=["value"])
    best = finite.loc[finite.groupby(keys, sort=False)["value"].idxmin(), [*keys, "value", "step"]]  # first minimum
    frame = last.rename(columns={"value": "last", "step": "last_step"}).merge(
        best.rename(columns={"value": "best", "step": "best_step"}), on=keys, how="left"
    )
    frame["best_step"] = frame["best_step"].astype("Int64")
    return frame[BEST_COLUMNS].reset_index(drop=True)


def versions_leaderboard(client) -> pd.DataFrame:
    """Every registered version of every model as one row, best held-out bits per character first.

    Columns: :data:`LEADERBOARD_COLUMNS`. ``shape`` is ``<blocks>×<width>, context <T>``; ``parameters``,
    ``training_tokens`` (optimizer steps × tokens per step) and ``training_s`` (the run's wall time) come from the
    version's run; ``best_val_bpc``/``best_val_loss`` and ``best_val_step`` are the run's lowest held-out values
    (None when it never evaluated); ``decode_tokens_per_sec`` is the :data:`DECODE_SPEED_TAG` tag where a
    generation measured it; ``copied_share`` is the share of the run's last periodic sample found verbatim in the
    training split (the memorisation meter). A version whose run is gone keeps its registry columns only.
    """
    versions = list_registered_models(client)
    if versions.empty:
        return pd.DataFrame(columns=LEADERBOARD_COLUMNS)
    run_ids = sorted({r for r in versions["run_id"] if r})
    runs = {run.info.run_id: run for run in _runs_by_id(client, run_ids)}
    found = [r for r in run_ids if r in runs]
    points = best_points(client, found, ("loss", "val_loss", "val_bpc"))
    by_key = {(row.run_id, row.metric): row for row in points.itertuples(index=False)}
    rows = []
    for version in versions.itertuples(index=False):
        run = runs.get(version.run_id)
        params = dict(run.data.params) if run else {}
        metrics = dict(run.data.metrics) if run else {}
        loss, bpc, val = (by_key.get((version.run_id, m)) for m in ("loss", "val_bpc", "val_loss"))
        steps = loss.last_step if loss is not None else None
        tokens_per_step = _number(params.get("tokens_per_batch"))
        rows.append(
            {
                "name": version.name,
                "version": int(version.version),
                "aliases": version.aliases,
                "run_id": version.run_id,
                "run_name": run.info.run_name if run else None,
                "preset": params.get("preset"),
                "shape": _shape(params),
                "parameters": _number(params.get("total_params")),
                "training_tokens": steps * tokens_per_step if steps is not None and tokens_per_step else None,
                "training_s": _duration(run),
                "best_val_bpc": _best(bpc, metrics.get("best_val_bpc")),
                "best_val_loss": _best(val, metrics.get("best_val_loss")),
                "best_val_step": int(bpc.best_step) if bpc is not None and not pd.isna(bpc.best_step) else None,
                "decode_tokens_per_sec": _number(version.tags.get(DECODE_SPEED_TAG, "").split(" ")[0]),
                "copied_share": metrics.get("sample_copied_share"),
                "registered": version.created,
                "status": version.status,
            }
        )
    frame = pd.DataFrame(rows, columns=LEADERBOARD_COLUMNS)
    return frame.sort_values(
        ["best_val_bpc", "registered"], ascending=[True, False], na_position="last", kind="stable"
    ).reset_index(drop=True)


def set_alias(client, name: str, version: int, alias: str) -> int | None:
    """Point ``alias`` of registered model ``name`` at ``version`` (MLflow moves it from any other version); returns
    the version that held it before (None when none did, or when it was this one).

    Raises :class:`core.errors.UsageError` for an alias MLflow reserves or refuses, and :class:`RegistryError` for a
    version that does not exist (e.g. deleted in the MLflow UI) or is not READY; nothing changes then.
    """
    from mlflow.exceptions import MlflowException

    alias = check_alias(alias)
    try:
        target = client.get_model_version(name, str(version))
        held = client.get_registered_model(name).aliases or {}
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise RegistryError(f"{name} version {version} no longer exists (deleted in the MLflow UI?)") from None
    if target.status != READY:
        raise RegistryError(f"{name} version {version} is {target.status}, not READY; it cannot take an alias")
    previous = held.get(alias)
    client.set_registered_model_alias(name, alias, str(version))
    return None if previous is None or int(previous) == int(version) else int(previous)


def record_decode_speed(
    client, name: str, version: int, tokens_per_sec: float, samples: int, tokens: int, where: str
) -> str:
    """Keep a measured decoding speed of version ``name``/``version`` as its :data:`DECODE_SPEED_TAG` tag, e.g.
    ``"41.3 tokens/s (cpu, fp32, 1 × 200 tokens)"`` (``samples`` in the batch, ``tokens`` new tokens each, ``where``
    the device and precision), where the leaderboard shows it; returns the tag."""
    tag = f"{tokens_per_sec:.1f} tokens/s ({where}, {samples} × {tokens} tokens)"
    client.set_model_version_tag(name, str(version), DECODE_SPEED_TAG, tag)
    return tag


def _runs_by_id(client, run_ids: list[str]) -> list:
    """The runs ``run_ids`` (deleted ones too) in a few searches instead of one request per run."""
    from mlflow.entities import ViewType

    from core.store import all_pages

    if not run_ids:
        return []
    experiments = [e.experiment_id for e in all_pages(client.search_experiments, view_type=ViewType.ALL)]
    runs = []
    for start in range(0, len(run_ids), 100):  # a filter of a few thousand characters, well within MLflow's limits
        chunk = ", ".join(f"'{run_id}'" for run_id in run_ids[start : start + 100])
        runs += all_pages(
            client.search_runs,
            experiment_ids=experiments,
            filter_string=f"attributes.run_id IN ({chunk})",
            run_view_type=ViewType.ALL,
        )
    return runs


def _shape(params: dict[str, str]) -> str | None:
    if not {"n_layer", "n_embd"} <= params.keys():
        return None
    context = params.get("context") or params.get("block_size")
    return f"{params['n_layer']}×{params['n_embd']}" + (f", context {context}" if context else "")


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


def _duration(run) -> float | None:
    if run is None or run.info.start_time is None or run.info.end_time is None:
        return None
    return (run.info.end_time - run.info.start_time) / 1000.0


def _best(point, logged: float | None) -> float | None:
    """The lowest value of the history; the logged best-so-far metric when the history is not there."""
    if point is not None and not pd.isna(point.best):
        return float(point.best)
    return float(logged) if logged is not None and np.isfinite(logged) else None
