import math

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from core import runs
from core.errors import UsageError
from core.runs import downsample, list_experiments, list_runs, metric_histories, params_table, smooth
from core.store import connect, ensure_experiment
from tests.conftest import store_from

T0 = 1_700_000_000_000  # ms, the first run's start


def log_series(client, run_id, key, points):
    """Log ``points`` — (step, value, timestamp ms) — as metric ``key``, at most 1000 per request."""
    metrics = [Metric(key, value, timestamp, step) for step, value, timestamp in points]
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start : start + 1000])


def make_run(client, experiment_id, name, start, params=None, tags=None, status=None, end=None):
    run = client.create_run(experiment_id, start_time=start, run_name=name, tags=tags or {})
    if params:
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    if status is not None:
        client.set_terminated(run.info.run_id, status, end_time=end)
    return run.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory, store_template):
    """One store with two experiments, runs in every status, a deleted run and a deleted experiment.

    Returns (client, ids) with ids mapping names to run and experiment ids. Tests only read it.
    """
    client = connect(store_from(store_template, tmp_path_factory.mktemp("store")))
    a = ensure_experiment(client, "runs-a")
    b = ensure_experiment(client, "runs-b")
    ids = {"a": a, "b": b}
    ids["alpha"] = make_run(
        client,
        a,
        "alpha",
        T0,
        params={"preset": "tiny", "n_layer": 4, "n_embd": 128, "lr": 0.001, "batch_size": 8, "seed": 1},
        tags={"preset": "tiny", "device": "cpu"},
        status="FINISHED",
        end=T0 + 90_500,
    )
    # Logged out of order: MLflow's "latest" value is the one at the highest step, and histories come back sorted.
    log_series(client, ids["alpha"], "loss", [(s, 10.0 / s, T0 + 1000 * s) for s in (5, 1, 3, 2, 4)])
    log_series(client, ids["alpha"], "lr", [(s, 1e-3 / 3 * s, T0 + 1000 * s) for s in range(1, 6)])
    log_series(client, ids["alpha"], "val_loss", [(2, 4.25, T0 + 2500), (4, 3.125, T0 + 4500)])
    ids["beta"] = make_run(
        client,
        a,
        "beta",
        T0 + 10_000,
        params={"preset": "small", "n_layer": 6, "n_embd": 384, "lr": 0.001, "batch_size": 8, "dropout": 0.1},
        tags={"preset": "small"},
        status="FAILED",
        end=T0 + 12_000,
    )
    log_series(client, ids["beta"], "loss", [(1, 9.5, T0 + 11_000), (2, math.nan, T0 + 11_200)])
    ids["gamma"] = make_run(
        client, a, "gamma", T0 + 20_000, params={"preset": "tiny"}, status="KILLED", end=T0 + 20_001
    )
    ids["delta"] = make_run(client, a, "delta", T0 + 30_000, params={"preset": "tiny"})  # still RUNNING
    ids["epsilon"] = make_run(client, b, "epsilon", T0 + 5_000, status="FINISHED", end=T0 + 6_000)
    ids["zeta"] = make_run(client, a, "zeta", T0 + 40_000, status="FINISHED", end=T0 + 41_000)
    client.delete_run(ids["zeta"])
    gone = ensure_experiment(client, "gone")
    make_run(client, gone, "in-gone", T0 + 50_000)
    client.delete_experiment(gone)
    return client, ids


@pytest.fixture
def fresh(tmp_path, new_store):
    return connect(new_store(tmp_path))


# --- list_runs ---------------------------------------------------------------------------------------------


def test_empty_store_gives_empty_frames_with_the_base_columns(fresh):
    frame = list_runs(fresh)
    assert frame.empty
    assert list(frame.columns) == runs.RUN_COLUMNS
    assert str(frame["start_time"].dtype).startswith("datetime64")
    assert list_runs(fresh, experiment_ids=[]).empty
    history = metric_histories(fresh, [], ["loss"])
    assert history.empty and list(history.columns) == runs.HISTORY_COLUMNS


def test_runs_come_newest_first_with_statuses_and_exact_times(store):
    client, ids = store
    frame = list_runs(client)
    # zeta (deleted) and the run of the deleted experiment are not listed.
    assert list(frame["run_name"]) == ["delta", "gamma", "beta", "epsilon", "alpha"]
    assert list(frame.columns[: len(runs.RUN_COLUMNS)]) == runs.RUN_COLUMNS
    by_name = frame.set_index("run_name")
    assert list(by_name.loc[["alpha", "beta", "gamma", "delta"], "status"]) == [
        "FINISHED",
        "FAILED",
        "KILLED",
        "RUNNING",
    ]
    assert by_name.loc["alpha", "run_id"] == ids["alpha"]
    assert by_name.loc["epsilon", "experiment_id"] == ids["b"]
    assert by_name.loc["alpha", "start_time"] == pd.Timestamp(T0, unit="ms", tz="UTC")
    assert by_name.loc["alpha", "end_time"] == pd.Timestamp(T0 + 90_500, unit="ms", tz="UTC")
    assert by_name.loc["alpha", "duration_s"] == 90.5
    assert by_name.loc["gamma", "duration_s"] == 0.001
    assert pd.isna(by_name.loc["delta", "end_time"]) and math.isnan(by_name.loc["delta", "duration_s"])


def test_runs_carry_params_final_metrics_and_tags(store):
    client, _ = store
    by_name = list_runs(client).set_index("run_name")
    assert by_name.loc["alpha", "params.n_layer"] == "4"  # params are strings, as MLflow stores them
    assert by_name.loc["alpha", "params.lr"] == "0.001"
    assert by_name.loc["beta", "params.dropout"] == "0.1"
    assert pd.isna(by_name.loc["alpha", "params.dropout"])
    assert by_name.loc["alpha", "metrics.loss"] == 2.0  # the value at the highest step, though logged first
    assert by_name.loc["alpha", "metrics.val_loss"] == 3.125
    assert math.isnan(by_name.loc["beta", "metrics.loss"])
    assert math.isnan(by_name.loc["gamma", "metrics.loss"])  # never logged
    assert by_name.loc["alpha", "tags.device"] == "cpu"
    assert by_name.loc["beta", "tags.mlflow.runName"] == "beta"
    params = [c for c in by_name.columns if c.startswith("params.")]
    assert params == sorted(params)


def test_runs_can_be_limited_to_experiments_and_counted(store, monkeypatch):
    client, ids = store
    assert list(list_runs(client, experiment_ids=[ids["b"]])["run_name"]) == ["epsilon"]
    assert list(list_runs(client, max_results=2)["run_name"]) == ["delta", "gamma"]
    # Small pages: the pages are stitched together, in order, and stop at max_results.
    monkeypatch.setattr(runs, "_PAGE_SIZE", 2)
    assert list(list_runs(client, experiment_ids=[ids["a"]])["run_name"]) == ["delta", "gamma", "beta", "alpha"]
    assert list(list_runs(client, max_results=3)["run_name"]) == ["delta", "gamma", "beta"]
    with pytest.raises(UsageError):
        list_runs(client, max_results=0)


# --- list_experiments --------------------------------------------------------------------------------------


def test_experiments_are_active_ones_with_run_counts(store, monkeypatch):
    client, ids = store
    monkeypatch.setattr(runs, "_PAGE_SIZE", 2)
    frame = list_experiments(client)
    assert list(frame.columns) == runs.EXPERIMENT_COLUMNS
    assert "gone" not in set(frame["name"])
    by_name = frame.set_index("name")
    assert by_name.loc["runs-a", "experiment_id"] == ids["a"]
    assert by_name.loc["runs-a", "run_count"] == 4  # the deleted run is not counted
    assert by_name.loc["runs-b", "run_count"] == 1
    assert by_name.loc["Default", "run_count"] == 0
    # The last activity is the latest run start or end (alpha ends at T0 + 90.5 s), at least.
    assert by_name.loc["runs-a", "last_update"] >= pd.Timestamp(T0 + 90_500, unit="ms", tz="UTC")
    assert frame["last_update"].is_monotonic_decreasing


def test_a_fresh_store_lists_only_the_default_experiment(fresh):
    frame = list_experiments(fresh)
    assert list(frame["name"]) == ["Default"]
    assert list(frame["run_count"]) == [0]


# --- metric_histories --------------------------------------------------------------------------------------


def test_histories_read_back_exactly_in_long_format(store):
    client, ids = store
    history = metric_histories(client, [ids["alpha"], ids["beta"]], ["loss", "val_loss"])
    assert list(history.columns) == runs.HISTORY_COLUMNS
    keys = list(zip(history["run_id"], history["metric"], strict=True))
    assert keys == [(ids["alpha"], "loss")] * 5 + [(ids["alpha"], "val_loss")] * 2 + [(ids["beta"], "loss")] * 2
    alpha_loss = history[(history["run_id"] == ids["alpha"]) & (history["metric"] == "loss")]
    assert list(alpha_loss["step"]) == [1, 2, 3, 4, 5]  # sorted, though logged out of order
    assert list(alpha_loss["value"]) == [10.0, 5.0, 10.0 / 3, 2.5, 2.0]
    assert list(alpha_loss["timestamp"]) == [T0 + 1000 * s for s in range(1, 6)]
    assert list(alpha_loss["elapsed_s"]) == [0.0, 1.0, 2.0, 3.0, 4.0]
    val = history[history["metric"] == "val_loss"]
    assert list(val["value"]) == [4.25, 3.125]
    assert list(val["elapsed_s"]) == [1.5, 3.5]  # on the run's clock, from its first point of any metric
    beta = history[history["run_id"] == ids["beta"]]
    assert beta["value"].iloc[0] == 9.5 and math.isnan(beta["value"].iloc[1])
    assert list(beta["elapsed_s"]) == [0.0, 0.2]
    assert history["step"].dtype == np.int64 and history["timestamp"].dtype == np.int64


def test_missing_metrics_are_absent_and_duplicates_fetched_once(store):
    client, ids = store
    history = metric_histories(client, [ids["gamma"], ids["alpha"], ids["alpha"]], ["val_bpc", "lr", "lr"])
    assert set(history["run_id"]) == {ids["alpha"]}
    assert list(history["metric"]) == ["lr"] * 5
    assert list(history["value"]) == [1e-3 / 3 * s for s in range(1, 6)]
    assert metric_histories(client, [ids["gamma"]], ["loss"]).empty


def test_an_unknown_run_is_an_error_not_an_empty_result(store):
    client, ids = store
    with pytest.raises(MlflowException):
        metric_histories(client, [ids["alpha"], "0" * 32], ["loss"])


class PublicOnlyClient:
    """A client offering only MLflow's public history call, as a remote tracking server's client is read."""

    def __init__(self, client):
        self._client = client

    def get_run(self, run_id):
        return self._client.get_run(run_id)

    def get_metric_history(self, run_id, key):
        return self._client.get_metric_history(run_id, key)


def test_the_public_api_path_reads_the_same_points(fresh):
    experiment = ensure_experiment(fresh, "paths")
    run_id = make_run(fresh, experiment, "r", T0)
    # Two values at one step, a NaN, an infinity (MLflow stores it as the largest float) and a gap.
    points = [(1, 1.5, T0 + 10), (1, 1.25, T0 + 20), (2, math.nan, T0 + 30), (4, math.inf, T0 + 40), (5, -2.0, T0)]
    log_series(fresh, run_id, "loss", points)
    fast = metric_histories(fresh, [run_id], ["loss", "lr"])
    public = metric_histories(PublicOnlyClient(fresh), [run_id], ["loss", "lr"])
    pd.testing.assert_frame_equal(fast, public)
    assert list(fast["step"]) == [1, 1, 2, 4, 5]
    assert list(fast["timestamp"]) == [T0 + 10, T0 + 20, T0 + 30, T0 + 40, T0]
    assert list(fast["elapsed_s"]) == [0.01, 0.02, 0.03, 0.04, 0.0]
    assert fast["value"].iloc[0] == 1.5 and math.isnan(fast["value"].iloc[2]) and fast["value"].iloc[3] > 1e308


def test_histories_are_downsampled_per_series_on_request(fresh):
    experiment = ensure_experiment(fresh, "long")
    run_id = make_run(fresh, experiment, "r", T0)
    values = [5.0 - s / 1000 for s in range(1, 3001)]
    values[1234] = 99.0  # a spike must survive
    log_series(fresh, run_id, "loss", [(s, values[s - 1], T0 + 100 * s) for s in range(1, 3001)])
    log_series(fresh, run_id, "val_loss", [(s, 3.0, T0 + 100 * s + 50) for s in (1000, 2000, 3000)])
    full = metric_histories(fresh, [run_id], ["loss", "val_loss"])
    small = metric_histories(fresh, [run_id], ["loss", "val_loss"], max_points=100)
    loss = small[small["metric"] == "loss"]
    assert 90 <= len(loss) <= 100
    assert loss["step"].iloc[0] == 1 and loss["step"].iloc[-1] == 3000
    assert loss["step"].is_monotonic_increasing
    assert loss["value"].max() == 99.0 and loss["value"].min() == values[-1]
    assert len(small[small["metric"] == "val_loss"]) == 3  # short series are kept whole
    # Every kept row is a real row, elapsed_s included (it is computed before sampling).
    merged = small.merge(full, on=["run_id", "metric", "step"], suffixes=("", "_full"))
    assert len(merged) == len(small)
    assert (merged["value"] == merged["value_full"]).all() and (merged["elapsed_s"] == merged["elapsed_s_full"]).all()
    with pytest.raises(UsageError):
        metric_histories(fresh, [run_id], ["loss"], max_points=1)


# --- downsample --------------------------------------------------------------------------------------------


def series_frame(values, run_id="r", metric="m"):
    n = len(values)
    return pd.DataFrame(
        {
            "run_id": run_id,
            "metric": metric,
            "step": np.arange(1, n + 1),
            "value": np.asarray(values, dtype=float),
            "timestamp": np.arange(n) * 10,
            "elapsed_s": np.arange(n) / 100,
        }
    )


def test_downsample_keeps_ends_and_each_buckets_extremes():
    # 10 points, max 6: first and last, then the 8 interior points in 2 buckets of 4, each keeping min and max.
    values = [0, 5, 1, 7, 2, 3, 9, 8, -1, 4]
    result = downsample(series_frame(values), 6)
    # Interior buckets [5, 1, 7, 2] and [3, 9, 8, -1] keep 1 and 7, then 9 and -1.
    assert list(result["step"]) == [1, 3, 4, 7, 9, 10]
    assert list(result["value"]) == [0, 1, 7, 9, -1, 4]


def test_downsample_bounds_every_size():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 10, 11, 99, 100, 101, 1000, 1001, 4999):
        values = rng.normal(size=n).cumsum()
        frame = series_frame(values)
        for max_points in (2, 3, 4, 5, 10, 99, 100, 1000):
            result = downsample(frame, max_points)
            if n <= max_points:
                assert len(result) == n
            else:
                assert len(result) <= max_points
                assert len(result) >= 2 + (max_points - 2) // 2  # the ends, and each bucket at least once
            assert result["step"].iloc[0] == 1 and result["step"].iloc[-1] == n
            assert result["step"].is_monotonic_increasing and result["step"].is_unique
            if n <= max_points:
                pd.testing.assert_frame_equal(result, frame)
            elif max_points >= 4:
                # Every bucket keeps its extremes, so the series' global min and max always survive.
                assert result["value"].min() == values.min() and result["value"].max() == values.max()


def test_downsample_works_per_series_and_keeps_columns_and_order():
    a = series_frame(np.arange(50.0), run_id="r1", metric="loss")
    b = series_frame(np.arange(3.0), run_id="r1", metric="lr")
    c = series_frame(-np.arange(50.0), run_id="r0", metric="loss")
    shuffled = pd.concat([a, b, c], ignore_index=True).sample(frac=1, random_state=1)
    result = downsample(shuffled, 10)
    assert list(result.columns) == list(a.columns)
    assert list(result.index) == list(range(len(result)))
    groups = [(k, len(g)) for k, g in result.groupby(["run_id", "metric"], sort=False)]
    # Series in first-appearance order of the input; each within bounds; the short one whole.
    first_seen = list(dict.fromkeys(zip(shuffled["run_id"], shuffled["metric"], strict=True)))
    assert [k for k, _ in groups] == first_seen
    assert dict(groups)[("r1", "lr")] == 3
    assert all(size <= 10 for _, size in groups)
    row = result[(result["run_id"] == "r0") & (result["step"] == 50)].iloc[0]
    assert row["value"] == -49.0 and row["timestamp"] == 490 and row["elapsed_s"] == 0.49


def test_downsample_keeps_nan_so_divergence_shows():
    values = np.linspace(3, 1, 200)
    values[150] = np.nan
    result = downsample(series_frame(values), 20)
    assert result["value"].isna().sum() == 1
    assert 151 in set(result["step"])


def test_downsample_refuses_fewer_than_two_points():
    with pytest.raises(UsageError):
        downsample(series_frame([1.0, 2.0, 3.0]), 1)


# --- smooth ------------------------------------------------------------------------------------------------


def tensorboard_smooth(values, weight):
    """TensorBoard's loop, transcribed, for reference."""
    last, count, out = 0.0, 0, []
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        count += 1
        out.append(last / (1 - weight**count))
    return out


def test_smooth_is_the_debiased_ema():
    # By hand, weight 0.5: 1; (0.25 + 0)/0.75 = 1/3; (0.125 + 0.5*4=2.125)/0.875 = 17/7.
    result = smooth(np.array([1.0, 0.0, 4.0]), 0.5)
    np.testing.assert_allclose(result, [1.0, 1 / 3, 17 / 7], rtol=1e-12)
    rng = np.random.default_rng(0)
    values = rng.normal(size=500).cumsum()
    values[[10, 200]] = [np.nan, np.inf]
    for weight in (0.0, 0.3, 0.6, 0.9, 0.999):
        np.testing.assert_allclose(smooth(values, weight), tensorboard_smooth(values, weight), rtol=1e-9)


def test_smooth_keeps_the_input_shape_and_refuses_bad_weights():
    series = pd.Series([2.0, 4.0, np.nan, 8.0], index=[10, 20, 30, 40], name="loss")
    result = smooth(series, 0.0)
    pd.testing.assert_series_equal(result, series)
    smoothed = smooth(series, 0.6)
    assert list(smoothed.index) == [10, 20, 30, 40] and smoothed.name == "loss"
    assert smoothed.iloc[0] == 2.0 and math.isnan(smoothed.iloc[2])
    assert isinstance(smooth([1, 2, 3], 0.5), np.ndarray)
    assert len(smooth([], 0.5)) == 0
    for weight in (-0.1, 1.0, 1.5):
        with pytest.raises(UsageError):
            smooth(series, weight)


# --- params_table ------------------------------------------------------------------------------------------


def test_params_table_lists_params_by_run(store):
    client, _ = store
    selected = list_runs(client).set_index("run_name").loc[["alpha", "beta"]].reset_index()
    table = params_table(selected, only_differing=False)
    assert list(table.columns) == ["alpha", "beta"]
    # Key params first in their fixed order, then the rest alphabetically.
    assert list(table.index) == ["preset", "n_layer", "n_embd", "batch_size", "lr", "dropout", "seed"]
    assert table.loc["n_embd", "beta"] == "384"
    assert table.loc["dropout", "alpha"] is None
    differing = params_table(selected, only_differing=True)
    assert list(differing.index) == ["preset", "n_layer", "n_embd", "dropout", "seed"]  # lr and batch_size agree


def test_params_table_leaves_out_params_no_selected_run_has(store):
    client, _ = store
    selected = list_runs(client).set_index("run_name").loc[["gamma", "delta"]].reset_index()
    table = params_table(selected, only_differing=False)
    assert list(table.index) == ["preset"]
    assert params_table(selected, only_differing=True).empty
    assert params_table(selected.iloc[:1], only_differing=True).empty  # one run: nothing differs


def test_params_table_gives_every_run_its_own_column():
    frame = pd.DataFrame(
        {
            "run_id": ["aaaaaaaa1111", "bbbbbbbb2222", "cccccccc3333"],
            "run_name": ["same", "same", None],
            "params.lr": ["0.1", "0.2", "0.1"],
        }
    )
    table = params_table(frame, only_differing=True)
    assert list(table.columns) == ["same (aaaaaaaa)", "same (bbbbbbbb)", "run (cccccccc)"]
    assert list(table.loc["lr"]) == ["0.1", "0.2", "0.1"]


# --- scale -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_histories_of_several_long_runs(fresh):
    """4 runs x 2,500 steps x 6 metrics (60,000 points) come back whole, and downsampled. The time for 10 runs x
    20,000 steps is measured by `python -m pipelines.benchmark` (row compare_fetch), not here."""
    experiment = ensure_experiment(fresh, "scale")
    steps, run_ids, count = 2_500, [], 4
    for r in range(count):
        run_id = make_run(fresh, experiment, f"run-{r}", T0 + r * 1000)
        batch = []
        for step in range(1, steps + 1):
            for k, key in enumerate(runs.TRAIN_METRICS):
                batch.append(Metric(key, k + r + 1.0 / step, T0 + r * 1000 + 50 * step, step))
                if len(batch) == 1000:
                    fresh.log_batch(run_id, metrics=batch)
                    batch = []
        fresh.log_batch(run_id, metrics=batch, tags=[RunTag("preset", "tiny")])
        fresh.set_terminated(run_id, "FINISHED")
        run_ids.append(run_id)

    history = metric_histories(fresh, run_ids, runs.TRAIN_METRICS)
    assert len(history) == count * 6 * steps
    sizes = history.groupby(["run_id", "metric"]).size()
    assert len(sizes) == count * 6 and (sizes == steps).all()
    last = history[(history["run_id"] == run_ids[-1]) & (history["metric"] == "tokens_per_sec")]
    assert last["value"].iloc[-1] == 5 + (count - 1) + 1.0 / steps
    assert last["elapsed_s"].iloc[-1] == pytest.approx((steps - 1) * 0.05)

    small = metric_histories(fresh, run_ids, runs.TRAIN_METRICS, max_points=500)
    sizes = small.groupby(["run_id", "metric"]).size()
    assert len(sizes) == count * 6 and (sizes <= 500).all() and (sizes >= 400).all()


def test_the_runs_table_has_each_runs_best_validation_not_only_its_last(fresh):
    client = fresh
    experiment = ensure_experiment(client, "best")
    old = make_run(client, experiment, "before-best-was-logged", T0)
    log_series(client, old, "val_bpc", [(100, 3.0, T0 + 1), (200, 2.5, T0 + 2), (300, 2.7, T0 + 3)])
    log_series(client, old, "val_loss", [(100, 6.4, T0 + 1), (200, 5.4, T0 + 2), (300, 5.8, T0 + 3)])
    new = make_run(client, experiment, "logs-its-best", T0 + 10)
    log_series(client, new, "val_bpc", [(100, 2.4, T0 + 11), (200, 2.6, T0 + 12)])
    log_series(client, new, "best_val_bpc", [(100, 2.4, T0 + 11), (200, 2.4, T0 + 12)])
    plain = make_run(client, experiment, "never-evaluated", T0 + 20)
    frame = list_runs(client, [experiment]).set_index("run_name")
    assert frame.loc["before-best-was-logged", "metrics.val_bpc"] == 2.7  # the last value...
    assert frame.loc["before-best-was-logged", "metrics.best_val_bpc"] == 2.5  # ...and the best, from the history
    assert frame.loc["before-best-was-logged", "metrics.best_val_loss"] == 5.4
    assert frame.loc["logs-its-best", "metrics.best_val_bpc"] == 2.4
    assert math.isnan(frame.loc["never-evaluated", "metrics.best_val_bpc"])
    metric_columns = [c for c in frame.columns if c.startswith("metrics.")]
    assert metric_columns == sorted(metric_columns) and plain
