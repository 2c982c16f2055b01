"""Best values beside last ones, the registered versions' leaderboard, and moving an alias through MLflow."""

from __future__ import annotations

import math

import pytest
from mlflow.entities import Metric, Param

from core.errors import UsageError
from core.leaderboard import BEST_COLUMNS, DECODE_SPEED_TAG, best_points, set_alias, versions_leaderboard
from core.registry import RegistryError, log_and_register
from core.store import connect, ensure_experiment

T0 = 1_790_000_000_000


def log_series(client, run_id: str, key: str, points: list[tuple[int, float]]) -> None:
    client.log_batch(run_id, metrics=[Metric(key, value, T0 + step, step) for step, value in points])


def test_the_best_point_is_the_first_lowest_and_nan_never_wins(tmp_path, new_store):
    client = connect(new_store(tmp_path))
    run_id = client.create_run(ensure_experiment(client, "best")).info.run_id
    log_series(client, run_id, "loss", [(1, 5.0), (2, 3.0), (3, float("nan")), (4, 3.0), (5, 4.0)])
    log_series(client, run_id, "val_bpc", [(2, 2.9), (4, 2.4)])
    frame = best_points(client, [run_id])
    assert list(frame.columns) == BEST_COLUMNS
    rows = {row.metric: row for row in frame.itertuples(index=False)}
    assert set(rows) == {"loss", "val_bpc"}  # what the run never logged has no row
    assert (rows["loss"].best, rows["loss"].best_step, rows["loss"].last, rows["loss"].last_step) == (3.0, 2, 4.0, 5)
    assert (rows["val_bpc"].best, rows["val_bpc"].best_step) == (2.4, 4)
    assert best_points(client, []).empty


def trained_run(client, experiment_id: str, name: str, bpcs: list[tuple[int, float]], steps: int) -> str:
    run_id = client.create_run(experiment_id, run_name=name, start_time=T0).info.run_id
    params = {"preset": "tiny", "n_layer": "2", "n_embd": "32", "context": "32", "total_params": "1650000"}
    params["tokens_per_batch"] = "64"
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    log_series(client, run_id, "loss", [(s, 10.0 / s) for s in range(1, steps + 1)])
    log_series(client, run_id, "val_bpc", bpcs)
    log_series(client, run_id, "val_loss", [(s, b * 1.2) for s, b in bpcs])
    client.log_metric(run_id, "sample_copied_share", 0.125, T0, steps)
    client.set_terminated(run_id, "FINISHED", end_time=T0 + 90_000)
    return run_id


@pytest.fixture
def two_versions(tmp_path, new_store, tiny_checkpoint):
    """Versions 1 (best val_bpc 2.5) and 2 (best 2.2) of shakespeare-gpt, version 1 holding @champion."""
    client = connect(new_store(tmp_path / "store"))
    experiment_id = ensure_experiment(client, "board")
    first = trained_run(client, experiment_id, "first", [(5, 2.5), (10, 2.7)], 10)
    second = trained_run(client, experiment_id, "second", [(5, 2.6), (8, 2.2)], 8)
    log_and_register(client, first, tiny_checkpoint, alias="champion")
    log_and_register(client, second, tiny_checkpoint)
    return client


def test_every_version_is_a_row_with_its_runs_figures_best_bpc_first(two_versions):
    client = two_versions
    client.set_model_version_tag("shakespeare-gpt", "2", DECODE_SPEED_TAG, "123.4 (cpu, fp32)")
    board = versions_leaderboard(client)
    assert list(board["version"]) == [2, 1]  # 2.2 bits per character beats 2.5
    best, other = board.iloc[0], board.iloc[1]
    assert (best["best_val_bpc"], best["best_val_step"], best["run_name"]) == (2.2, 8, "second")
    assert best["best_val_loss"] == pytest.approx(2.2 * 1.2)
    assert (other["best_val_bpc"], other["best_val_step"], other["aliases"]) == (2.5, 5, "champion")
    assert best["shape"] == "2×32, context 32" and best["parameters"] == 1_650_000 and best["preset"] == "tiny"
    assert best["training_tokens"] == 8 * 64 and other["training_tokens"] == 10 * 64
    assert best["training_s"] == 90.0 and best["copied_share"] == 0.125
    assert best["decode_tokens_per_sec"] == pytest.approx(123.4) and math.isnan(other["decode_tokens_per_sec"])


def test_moving_an_alias_goes_through_mlflow_and_bad_requests_change_nothing(two_versions):
    client = two_versions
    assert set_alias(client, "shakespeare-gpt", 2, "champion") == 1  # moved from version 1
    assert client.get_registered_model("shakespeare-gpt").aliases == {"champion": 2}
    assert set_alias(client, "shakespeare-gpt", 2, "champion") is None  # already there
    with pytest.raises(UsageError, match="reserved by MLflow"):
        set_alias(client, "shakespeare-gpt", 1, "latest")
    with pytest.raises(UsageError, match="invalid alias"):
        set_alias(client, "shakespeare-gpt", 1, "no spaces")
    client.delete_model_version("shakespeare-gpt", "1")  # as the MLflow UI does
    with pytest.raises(RegistryError, match="version 1 no longer exists"):
        set_alias(client, "shakespeare-gpt", 1, "old")
    assert client.get_registered_model("shakespeare-gpt").aliases == {"champion": 2}
    assert list(versions_leaderboard(client)["version"]) == [2]


def test_an_empty_registry_is_an_empty_board(tmp_path, new_store):
    board = versions_leaderboard(connect(new_store(tmp_path)))
    assert board.empty and "best_val_bpc" in board.columns
