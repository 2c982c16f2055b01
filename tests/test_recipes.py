"""How a user's choices become a run's configs (core.recipes): one rule for the CLI's flags and the Train page."""

from __future__ import annotations

import json

import pytest

from core.config import DataConfig, ModelConfig, TrainConfig
from core.errors import UsageError
from core.recipes import (
    BUDGET_PRESET,
    DEFAULT_PRESET,
    DEFAULT_TOKENS_PER_BATCH,
    RunConfigs,
    recipe_defaults,
    resolve_run_configs,
)


def test_nothing_chosen_is_the_reference():
    configs = resolve_run_configs({"data": "corpus.txt"})
    assert configs.tracking.preset == DEFAULT_PRESET
    assert configs.model == ModelConfig.from_preset(DEFAULT_PRESET)
    assert configs.data.block_size == configs.model.block_size
    assert configs.data.batch_size * configs.data.block_size == DEFAULT_TOKENS_PER_BATCH
    reference = TrainConfig()
    assert (configs.train.max_steps, configs.train.target_loss, configs.train.lr) == (
        reference.max_steps,
        reference.target_loss,
        reference.lr,
    )


def test_a_time_budget_picks_the_budget_recipe_and_a_choice_beats_it():
    configs = resolve_run_configs({"data": "c.txt", "time_budget": 600.0})
    recipe = recipe_defaults(BUDGET_PRESET, 600.0)
    assert configs.tracking.preset == BUDGET_PRESET and configs.train.time_budget == 600.0
    assert configs.train.lr == recipe["lr"] and configs.data.order == recipe["order"]
    assert configs.train.tie_unused_tokens is True
    chosen = resolve_run_configs({"data": "c.txt", "time_budget": 600.0, "lr": 1e-3, "batch_size": 3})
    assert chosen.train.lr == 1e-3 and chosen.data.batch_size == 3
    long = resolve_run_configs({"data": "c.txt", "time_budget": 3600.0})
    assert long.model.dropout == recipe_defaults(BUDGET_PRESET, 3600.0)["dropout"] > 0


def test_none_means_not_chosen_and_unknown_settings_are_refused():
    assert resolve_run_configs({"data": "c.txt", "lr": None}) == resolve_run_configs({"data": "c.txt"})
    with pytest.raises(ValueError, match="unknown setting"):
        resolve_run_configs({"data": "c.txt", "learning_rate": 1e-3})
    with pytest.raises(ValueError, match="dropout"):
        resolve_run_configs({"data": "c.txt", "dropout": 1.5})


def test_the_cli_and_the_form_resolve_the_same_choices_to_the_same_configs():
    from pipelines.train import build_configs, build_parser

    argv = ["--preset", "tiny", "--block-size", "16", "--batch-size", "2", "--data", "c.txt", "--lr", "0.001"]
    from_flags = RunConfigs(*build_configs(build_parser().parse_args(argv)))
    from_form = resolve_run_configs(
        {"preset": "tiny", "block_size": 16, "batch_size": 2, "data": "c.txt", "lr": 1e-3, "register_best": False}
    )
    assert from_flags == from_form


def test_run_configs_round_trip_through_json_and_refuse_what_is_not_theirs():
    configs = resolve_run_configs({"data": "c.txt", "time_budget": 120.0, "alias": "champion"})
    assert RunConfigs.from_dict(json.loads(json.dumps(configs.to_dict()))) == configs
    broken = configs.to_dict()
    broken["data"]["batch"] = 3
    with pytest.raises(ValueError, match="data config: unknown field"):
        RunConfigs.from_dict(broken)
    with pytest.raises(ValueError, match="missing tracking"):
        RunConfigs.from_dict({k: v for k, v in configs.to_dict().items() if k != "tracking"})
    bad = configs.to_dict()
    bad["data"]["batch_size"] = 0
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        RunConfigs.from_dict(bad)
    assert DataConfig.from_dict(configs.data.to_dict()) == configs.data


def test_a_shape_that_contradicts_init_from_is_refused(tmp_path, tiny_model):
    from core.hf import export_hf

    export_hf(tiny_model, tmp_path / "hf")
    folder = tmp_path / "hf"
    configs = resolve_run_configs({"data": "c.txt", "init_from": str(folder), "context": 16})
    assert configs.model.n_layer == tiny_model.config.n_layer and configs.model.block_size == 16
    assert configs.tracking.preset == "custom"
    with pytest.raises(UsageError, match="--n-layer 5 asks for n_layer 5"):
        resolve_run_configs({"data": "c.txt", "init_from": str(folder), "n_layer": 5})
