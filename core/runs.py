"""Read the MLflow tracking store for the studio: experiments, runs, metric histories, and tables built from them.

Every reader takes an ``MlflowClient`` (from :func:`core.store.connect`) and goes through MLflow's API, so a remote
tracking server works the same as the embedded SQLite store. One exception, for speed: metric histories of a local
SQLite store are read from MLflow's ``metrics`` table directly, read-only (see :func:`metric_histories`). The table
helpers (:func:`downsample`, :func:`smooth`, :func:`params_table`) are pure functions of their inputs.

MLflow errors (an unknown run id, an unreachable server) propagate as ``MlflowException``; a bad argument raises
:class:`core.errors.UsageError`. Nothing here turns a failure into an empty result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import UsageError
from core.store import all_pages

RUN_COLUMNS = ["run_id", "run_name", "experiment_id", "status", "start_time", "end_time", "duration_s"]
"""The columns :func:`list_runs` always returns, before the ``params.*``, ``metrics.*`` and ``tags.*`` ones."""

EXPERIMENT_COLUMNS = ["experiment_id", "name", "run_count", "last_update"]
"""The columns of :func:`list_experiments`."""

HISTORY_COLUMNS = ["run_id", "metric", "step", "value", "timestamp", "elapsed_s"]
"""The columns of :func:`metric_histories` (and of the frame :func:`downsample` expects)."""

KEY_PARAMS = ["preset", "n_layer", "n_head", "n_embd", "block_size", "batch_size", "lr", "max_steps"]
"""Params :func:`params_table` lists first, in this order, because they are what tells runs apart at a glance."""

TRAIN_METRICS = ["loss", "avg_loss", "best_loss", "lr", "time_per_batch", "tokens_per_sec"]
"""The per-step metrics a training run logs."""

EVAL_METRICS = ["val_loss", "val_bpc"]
"""The metrics a training run logs at each evaluation."""

_PAGE_SIZE = 1000  # runs/experiments per search request: MLflow's default page, accepted by every store
_MAX_WORKERS = 8  # concurrent history requests: hides a tracking server's latency without flooding it
_ALL_POINTS = 2**31 - 1  # a sample size no history reaches, so a sampled query returns every point


def list_experiments(client) -> pd.DataFrame:
    """The active experiments, most recently updated first.

    Columns: ``experiment_id`` (str), ``name``, ``run_count`` (active runs), ``last_update`` (UTC datetime: the
    latest of the experiment's own update time and its runs' start and end times, so logging a run counts as
    activity). An empty store gives an empty frame with these columns.
    """
    from mlflow.entities import ViewType

    experiments = all_pages(client.search_experiments, view_type=ViewType.ACTIVE_ONLY)
    if not experiments:
        return _empty(EXPERIMENT_COLUMNS, last_update="datetime64[ms, UTC]", run_count="int64")
    counts = dict.fromkeys((e.experiment_id for e in experiments), 0)
    latest = {e.experiment_id: e.last_update_time or e.creation_time or 0 for e in experiments}
    # One search over every experiment: the run count and the last activity both need the runs themselves,
    # and MLflow has no cheaper "count" call.
    for run in _search_runs(client, list(counts), max_results=None):
        info = run.info
        counts[info.experiment_id] += 1
        latest[info.experiment_id] = max(latest[info.experiment_id], info.start_time or 0, info.end_time or 0)
    frame = pd.DataFrame(
        {
            "experiment_id": [e.experiment_id for e in experiments],
            "name": [e.name for e in experiments],
            "run_count": [counts[e.experiment_id] for e in experiments],
            "last_update": _datetimes([latest[e.experiment_id] or None for e in experiments]),
        }
    )
    return frame.sort_values("last_update", ascending=False, kind="stable", na_position="last").reset_index(drop=True)


def list_runs(client, experiment_ids: list[str] | None = None, max_results: int = 1000) -> pd.DataFrame:
    """One row per active run of ``experiment_ids`` (default: every active experiment), newest first.

    Columns: :data:`RUN_COLUMNS` — ``run_id``, ``run_name``, ``experiment_id``, ``status`` (``RUNNING``,
    ``FINISHED``, ``FAILED``, ``KILLED``, ``SCHEDULED``), ``start_time`` and ``end_time`` (UTC datetimes, ``NaT``
    while a run has not ended), ``duration_s`` (float, NaN without an end time) — then ``params.<name>`` (strings,
    as MLflow stores them), ``metrics.<name>`` (the latest value MLflow keeps for each metric: the one at the
    highest step; ``metrics.best_val_loss`` and ``metrics.best_val_bpc``, the lowest validation values, are filled
    from the history for runs that did not log them) and ``tags.<name>`` (MLflow's own ``mlflow.*`` tags
    included), each group sorted by name. A value
    a run lacks is missing (None/NaN). At most ``max_results`` runs; an empty store or ``experiment_ids=[]`` gives
    an empty frame with the base columns.
    """
    if max_results < 1:
        raise UsageError(f"max_results must be at least 1, got {max_results}")
    if experiment_ids is None:
        from mlflow.entities import ViewType

        experiment_ids = [e.experiment_id for e in all_pages(client.search_experiments, view_type=ViewType.ACTIVE_ONLY)]
    experiment_ids = [str(e) for e in experiment_ids]
    runs = _search_runs(client, experiment_ids, max_results=max_results) if experiment_ids else []
    if not runs:
        return _empty(
            RUN_COLUMNS,
            start_time="datetime64[ms, UTC]",
            end_time="datetime64[ms, UTC]",
            duration_s="float64",
        )
    starts = [run.info.start_time for run in runs]
    ends = [run.info.end_time for run in runs]
    base = pd.DataFrame(
        {
            "run_id": [run.info.run_id for run in runs],
            "run_name": [run.info.run_name for run in runs],
            "experiment_id": [run.info.experiment_id for run in runs],
            "status": [run.info.status for run in runs],
            "start_time": _datetimes(starts),
            "end_time": _datetimes(ends),
            # From the integer milliseconds, not the datetimes, so the value is exact.
            "duration_s": [
                (end - start) / 1000.0 if start is not None and end is not None else np.nan
                for start, end in zip(starts, ends, strict=True)
            ],
        }
    )
    extra = {}
    for prefix, attribute in (("params", "params"), ("metrics", "metrics"), ("tags", "tags")):
        names = sorted({name for run in runs for name in getattr(run.data, attribute)})
        for name in names:
            extra[f"{prefix}.{name}"] = [getattr(run.data, attribute).get(name) for run in runs]
    frame = pd.concat([base, pd.DataFrame(extra, index=base.index)], axis=1) if extra else base
    frame = _with_best_validation(client, frame)
    # MLflow already orders by start time, newest first; sorting again keeps the contract for any store.
    return frame.sort_values("start_time", ascending=False, kind="stable", na_position="last").reset_index(drop=True)


BEST_OF = {"metrics.best_val_loss": "val_loss", "metrics.best_val_bpc": "val_bpc"}
"""Best-so-far metrics the trainer logs with every evaluation, and the metric each is the minimum of."""


def _with_best_validation(client, frame: pd.DataFrame) -> pd.DataFrame:
    """Fill ``metrics.best_val_loss`` / ``metrics.best_val_bpc`` for runs that logged validation metrics but not
    their best (runs trained before the trainer logged it): the minimum of their history, read in one query."""
    for best, metric in BEST_OF.items():
        last = f"metrics.{metric}"
        if last not in frame:
            continue
        if best not in frame:
            frame[best] = np.nan
        missing = frame[best].isna() & frame[last].notna()
        if not missing.any():
            continue
        history = metric_histories(client, frame.loc[missing, "run_id"].tolist(), [metric])
        lowest = history.groupby("run_id")["value"].min()
        frame.loc[missing, best] = frame.loc[missing, "run_id"].map(lowest).to_numpy()
    base = [c for c in frame.columns if "." not in c]
    grouped = [sorted(c for c in frame.columns if c.startswith(f"{group}.")) for group in ("params", "metrics", "tags")]
    return frame[base + grouped[0] + grouped[1] + grouped[2]]


def metric_histories(
    client, run_ids: Sequence[str], metrics: Sequence[str], max_points: int | None = None
) -> pd.DataFrame:
    """Every logged point of ``metrics`` for ``run_ids``, in long format.

    Columns: :data:`HISTORY_COLUMNS` — ``run_id``, ``metric``, ``step`` (int64), ``value`` (float64; NaN where NaN
    was logged, ±1.797e308 where ±inf was: MLflow's SQL stores cannot hold infinity), ``timestamp`` (int64 ms),
    ``elapsed_s`` (float64: seconds since the run's earliest point among the requested metrics, so curves of one
    run share a clock). Rows are grouped by run (in ``run_ids`` order), then metric (in ``metrics`` order), then
    ordered by step and timestamp. A metric a run never logged is simply absent, but an unknown run id raises
    ``MlflowException``. Duplicate ids or names are fetched once.

    With ``max_points`` (>= 2), each (run, metric) series is reduced by :func:`downsample` to at most that many
    points, first and last kept; ``elapsed_s`` is computed before, so it does not depend on ``max_points``.

    On a local SQLite store every point is read with one read-only query of MLflow's ``metrics`` table (about ten
    times faster than the API for a million points). Any other store (a tracking server, another database) is read
    concurrently: a SQLAlchemy store through its sampled-interval query with a sample size larger than any history
    (every point, as plain rows), a server with ``MlflowClient.get_metric_history``.
    """
    if max_points is not None and max_points < 2:
        raise UsageError(f"max_points must be at least 2 (the first and last points are kept), got {max_points}")
    run_ids = list(dict.fromkeys(run_ids))
    metrics = list(dict.fromkeys(metrics))
    tasks = [(run_id, key) for run_id in run_ids for key in metrics]
    if not tasks:
        return _empty_history()
    database = _sqlite_database(client)
    if database is not None:
        # Read straight from MLflow's metrics table: a million points in about a second, where the per-series API
        # calls take over ten (measured by `python -m pipelines.benchmark --only compare_fetch`).
        for run_id in run_ids:
            client.get_run(run_id)  # an unknown run is an error, not a missing curve
        series = _read_sqlite_series(database, tasks)
    else:
        fetch = _history_fetcher(client)
        with ThreadPoolExecutor(max_workers=min(_MAX_WORKERS, len(tasks))) as pool:
            # MLflow answers an unknown run's history with an empty list; get_run makes that an error instead of a
            # silently missing curve (a stale selection, a deleted store). list() re-raises the first failure.
            list(pool.map(client.get_run, run_ids))
            series = list(pool.map(lambda task: _series_arrays(fetch(*task)), tasks))
    found = [(task, arrays) for task, arrays in zip(tasks, series, strict=True) if len(arrays[0])]
    if not found:
        return _empty_history()
    # Each run's clock starts at its earliest point among all requested metrics, before any point is dropped.
    first: dict[str, int] = {}
    for (run_id, _), (_, _, stamps) in found:
        first[run_id] = min(first.get(run_id, stamps[0]), int(stamps.min()))
    if max_points is not None:
        # Downsampled per series on the arrays, so a million points never become DataFrame rows.
        found = [
            (task, tuple(a[keep] for a in arrays))
            for task, arrays in found
            for keep in [_minmax_indices(arrays[1], max_points)]
        ]
    counts = [len(arrays[0]) for _, arrays in found]
    stamps = np.concatenate([arrays[2] for _, arrays in found])
    run_column = np.repeat(np.array([task[0] for task, _ in found], dtype=object), counts)
    return pd.DataFrame(
        {
            "run_id": run_column,
            "metric": np.repeat(np.array([task[1] for task, _ in found], dtype=object), counts),
            "step": np.concatenate([arrays[0] for _, arrays in found]),
            "value": np.concatenate([arrays[1] for _, arrays in found]),
            "timestamp": stamps,
            "elapsed_s": (stamps - np.repeat([first[task[0]] for task, _ in found], counts)) / 1000.0,
        }
    )


def downsample(history: pd.DataFrame, max_points: int) -> pd.DataFrame:
    """``history`` with each (run_id, metric) series reduced to at most ``max_points`` rows (``max_points`` >= 2).

    A series of at most ``max_points`` points is kept whole. A longer one keeps its first and last points, and its
    interior is cut into ``(max_points - 2) // 2`` consecutive buckets of nearly equal size, each contributing its
    lowest and its highest value (one row if they coincide), so spikes and dips survive at any zoom. A NaN sorts
    above every number, so a bucket holding one keeps it: a diverged run stays visible. Rows keep their columns and
    come back ordered by run, metric (first-appearance order), step and timestamp, with a fresh index. Pure.
    """
    if max_points < 2:
        raise UsageError(f"max_points must be at least 2 (the first and last points are kept), got {max_points}")
    missing = {"run_id", "metric", "step", "value"} - set(history.columns)
    if missing:
        raise UsageError(f"history lacks column(s) {sorted(missing)}")
    if history.empty:
        return history.reset_index(drop=True)
    ordered = _order_series(history)
    values = ordered["value"].to_numpy(dtype=np.float64)
    keep = []
    for positions in ordered.groupby(["run_id", "metric"], sort=False).indices.values():
        keep.append(positions[_minmax_indices(values[positions], max_points)])
    return ordered.iloc[np.sort(np.concatenate(keep))].reset_index(drop=True)


def smooth(values, weight: float):
    """TensorBoard's smoothing: a debiased exponential moving average with ``weight`` in [0, 1) (0 = unchanged).

    ``s[i] = m[i] / (1 - weight**k)`` with ``m[i] = weight * m[i-1] + (1 - weight) * v[i]``, ``m = 0`` before the
    first value and ``k`` the number of finite values so far; NaN and ±inf pass through unchanged and do not enter
    the average. The debiasing keeps the start of the curve at the data's level instead of pulling it towards 0.
    Returns the same kind as given: a Series (same index and name) for a Series, else a float64 numpy array.
    """
    if not 0 <= weight < 1:
        raise UsageError(f"smoothing weight must be in [0, 1), got {weight}")
    is_series = isinstance(values, pd.Series)
    data = np.asarray(values.to_numpy() if is_series else values, dtype=np.float64)
    if data.ndim != 1:
        raise UsageError(f"smooth takes a one-dimensional series, got shape {data.shape}")
    out = data.copy()
    finite = np.isfinite(data)
    if weight > 0 and finite.any():
        # pandas' adjusted EWM is exactly the debiased average: sum(w^j v[i-j]) / sum(w^j), j over finite values.
        out[finite] = pd.Series(data[finite]).ewm(alpha=1.0 - weight, adjust=True).mean().to_numpy()
    return pd.Series(out, index=values.index, name=values.name) if is_series else out


def params_table(runs: pd.DataFrame, only_differing: bool = False) -> pd.DataFrame:
    """A params-by-run table for the runs in ``runs`` (a frame from :func:`list_runs`, filtered to the selection).

    Rows are param names (without the ``params.`` prefix): :data:`KEY_PARAMS` first, in that order, then the
    others alphabetically; a param no selected run has is left out. Columns are the runs, in ``runs`` order, named
    by run name; a missing name, or one shared by several runs, becomes ``"<name> (<first 8 of run_id>)"`` so
    every column is distinct. Cells are the params' strings, None where a run lacks the param. With
    ``only_differing``, only params whose values are not all equal are kept (present vs missing counts as a
    difference), so a single run gives an empty table.
    """
    missing = {"run_id", "run_name"} - set(runs.columns)
    if missing:
        raise UsageError(f"runs lacks column(s) {sorted(missing)}")
    columns = [c for c in runs.columns if c.startswith("params.")]
    names = [c[len("params.") :] for c in columns]
    labels = _run_labels(runs)
    table = pd.DataFrame(
        [[_cell(v) for v in runs[c]] for c in columns],
        index=pd.Index(names, name="param"),
        columns=labels,
        dtype=object,
    )
    if not table.empty:
        table = table[table.notna().any(axis=1)]
    if only_differing:
        table = table[[len({repr(v) for v in row}) > 1 for row in table.itertuples(index=False)]]
    order = [p for p in KEY_PARAMS if p in table.index] + sorted(p for p in table.index if p not in KEY_PARAMS)
    return table.loc[order]


# --- helpers -------------------------------------------------------------------------------------------------


def _search_runs(client, experiment_ids: list[str], max_results: int | None) -> list:
    """Up to ``max_results`` (None: all) active runs of ``experiment_ids``, newest first."""
    from mlflow.entities import ViewType

    runs, token = [], None
    while max_results is None or len(runs) < max_results:
        size = _PAGE_SIZE if max_results is None else min(_PAGE_SIZE, max_results - len(runs))
        page = client.search_runs(
            experiment_ids,
            run_view_type=ViewType.ACTIVE_ONLY,
            max_results=size,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def _datetimes(millis: Iterable[int | None]) -> pd.Series:
    # Through nullable integers: a float64 detour would round milliseconds in the nanosecond conversion.
    return pd.Series(pd.to_datetime(pd.array(list(millis), dtype="Int64"), unit="ms", utc=True))


def _empty(columns: list[str], **dtypes: str) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, object)) for c in columns})


def _empty_history() -> pd.DataFrame:
    return _empty(HISTORY_COLUMNS, step="int64", value="float64", timestamp="int64", elapsed_s="float64").astype(
        {"run_id": object, "metric": object}
    )


def _history_fetcher(client) -> Callable[[str, str], list]:
    """A function ``(run_id, key) -> list of Metric`` with every logged point, for this client's store."""
    # MlflowClient keeps its store private; a client without one (or a future layout) takes the public path.
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    if store is not None:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        if isinstance(store, SqlAlchemyStore):
            # The sampled-interval query returns every row when asked for more samples than exist (one NTILE
            # bucket per row), and selects plain columns; get_metric_history builds an ORM object per row first.
            def fetch(run_id: str, key: str) -> list:
                return store.get_metric_history_bulk_interval([run_id], key, _ALL_POINTS, None, None)

            return fetch
    return client.get_metric_history


def _sqlite_database(client) -> Path | None:
    """The database file of a client on a local SQLite store, else None."""
    from core.store import sqlite_path

    path = sqlite_path(getattr(client, "tracking_uri", "") or "")
    return path if path is not None and path.is_file() else None


_SERIES_QUERY = (
    "SELECT step, value, timestamp, is_nan FROM metrics WHERE key = ? AND run_uuid = ? ORDER BY step, timestamp"
)


def _read_sqlite_series(database: Path, tasks: list[tuple[str, str]]) -> list[tuple[np.ndarray, ...]]:
    """(steps, values, timestamps) of each (run_id, metric) in ``tasks`` from MLflow's ``metrics`` table (its schema
    since MLflow 1.x), opened read-only, ordered by step then timestamp. NaN points (stored as 0 with ``is_nan``)
    come back as NaN, as MLflow's API returns them."""
    import sqlite3

    series = []
    connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        for run_id, key in tasks:
            rows = connection.execute(_SERIES_QUERY, (key, run_id)).fetchall()
            table = np.array(rows, dtype=np.float64).reshape(len(rows), 4)  # exact: steps and ms stamps < 2**53
            values = np.where(table[:, 3] != 0, np.nan, table[:, 1])
            series.append((table[:, 0].astype(np.int64), values, table[:, 2].astype(np.int64)))
    finally:
        connection.close()
    return series


def _series_arrays(points: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, values, timestamps) of one series, ordered by step then timestamp."""
    n = len(points)
    steps = np.fromiter((p.step for p in points), dtype=np.int64, count=n)
    values = np.fromiter((p.value for p in points), dtype=np.float64, count=n)
    stamps = np.fromiter((p.timestamp for p in points), dtype=np.int64, count=n)
    order = np.lexsort((stamps, steps))
    return steps[order], values[order], stamps[order]


def _order_series(history: pd.DataFrame) -> pd.DataFrame:
    """``history`` grouped by run then metric (first-appearance order), each series by step then timestamp."""
    run_rank = pd.factorize(history["run_id"])[0]
    metric_rank = pd.factorize(history["metric"])[0]
    tie = history["timestamp"].to_numpy() if "timestamp" in history.columns else np.zeros(len(history))
    order = np.lexsort((tie, history["step"].to_numpy(), metric_rank, run_rank))
    return history.iloc[order].reset_index(drop=True)


def _minmax_indices(values: np.ndarray, max_points: int) -> np.ndarray:
    """Sorted positions to keep of one series: all of it, or its ends plus each interior bucket's min and max."""
    n = len(values)
    if n <= max_points:
        return np.arange(n)
    buckets = (max_points - 2) // 2
    if buckets == 0:
        return np.array([0, n - 1])
    interior = values[1:-1]
    # n > max_points >= 2 * buckets + 2, so every bucket holds at least one point.
    bucket = np.arange(n - 2) * buckets // (n - 2)
    order = np.lexsort((interior, bucket))  # by bucket, then value; numpy sorts NaN after every number
    sorted_bucket = bucket[order]
    starts = np.flatnonzero(np.r_[True, sorted_bucket[1:] != sorted_bucket[:-1]])
    ends = np.r_[starts[1:], n - 2] - 1
    return np.unique(np.concatenate(([0, n - 1], order[starts] + 1, order[ends] + 1)))


def _run_labels(runs: pd.DataFrame) -> list[str]:
    names = [name if isinstance(name, str) and name else None for name in runs["run_name"]]
    counts = pd.Series([n for n in names if n is not None]).value_counts()
    return [
        name if name is not None and counts[name] == 1 else f"{name or 'run'} ({str(run_id)[:8]})"
        for name, run_id in zip(names, runs["run_id"], strict=True)
    ]


def _cell(value):
    """A param cell: the string, or None for a missing value (NaN/None/NA, whichever pandas used)."""
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else value
