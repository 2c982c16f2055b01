"""Choosing a precision by measurement: every precision's speed and held-out loss on this machine, the fastest within
1% of fp32, kept per version and machine, and `--quantize auto` using it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.model import GPT
from core.precision import (
    PRECISION_TAG,
    PrecisionMeasurement,
    choice_tag,
    choose_precision,
    machine_fingerprint,
    measure_precisions,
    stored_choice,
)
from tests.conftest import TINY, cli_in_process


def test_the_fastest_precision_within_the_tolerance_wins():
    measured = [
        PrecisionMeasurement("fp32", 40.0, 2.000),
        PrecisionMeasurement("bf16", None, None, "no units"),
        PrecisionMeasurement("int8", 90.0, 2.015),
        PrecisionMeasurement("int4", 120.0, 2.100),  # fastest, but 5% worse
    ]
    assert choose_precision(measured) == "int8"
    assert choose_precision(measured, tolerance=0.06) == "int4"
    assert choose_precision(measured, tolerance=0.001) == "fp32"
    with pytest.raises(ValueError, match="fp32"):
        choose_precision(measured[1:])


def test_a_stored_choice_counts_only_on_the_machine_that_measured_it():
    measured = [PrecisionMeasurement("fp32", 40.0, 2.0), PrecisionMeasurement("int8", 90.0, 2.01)]
    tag = choice_tag("int8", measured)
    assert stored_choice({PRECISION_TAG: tag}) == ("int8", measured)
    elsewhere = json.loads(tag) | {"machine": "another CPU"}
    assert stored_choice({PRECISION_TAG: json.dumps(elsewhere)}) is None
    assert stored_choice({PRECISION_TAG: "{not json"}) is None and stored_choice({}) is None
    assert machine_fingerprint() in tag and len(tag) < 8000  # an MLflow tag value holds 8,000 characters


def test_every_precision_is_measured_on_held_out_tokens():
    torch.manual_seed(0)
    model = GPT(TINY).eval()
    val = np.random.default_rng(0).integers(0, 2000, 4 * 32 * 2 + 1).astype(np.uint16)
    measured = measure_precisions(model, val, new_tokens=4)
    assert [m.precision for m in measured] == ["fp32", "bf16", "f16", "int8", "int4"]
    assert all(m.tokens_per_sec > 0 and m.val_loss > 0 for m in measured if not m.note)
    fp32 = measured[0].val_loss
    assert all(abs(m.val_loss - fp32) < 0.05 * fp32 for m in measured if not m.note)
    assert choose_precision(measured) in {m.precision for m in measured}


def test_generate_auto_measures_once_per_version_and_machine(tiny_checkpoint, tmp_path, monkeypatch, shakespeare_head):
    from core.registry import log_and_register
    from core.store import connect, ensure_experiment

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    client = connect(uri)
    run = client.create_run(ensure_experiment(client, "cli"))
    log_and_register(client, run.info.run_id, tiny_checkpoint, name="bard")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    args = ("pipelines.generate", "--model", "bard/1", "--prompt", "ROMEO:", "--quantize", "auto")
    first = cli_in_process(*args, "--max-new-tokens", "6", "--seed", "1", "--data", str(shakespeare_head), "--json")
    assert first.returncode == 0, first.stderr
    assert "measuring each precision's decoding speed and held-out loss" in first.stderr
    chosen, measured = stored_choice(client.get_model_version("bard", "1").tags)
    assert f"precision: {chosen}" in first.stderr and {m.precision for m in measured} >= {"fp32", "int8", "int4"}
    second = cli_in_process(*args, "--max-new-tokens", "6", "--seed", "1", "--data", str(shakespeare_head), "--json")
    assert second.returncode == 0 and "measured on this machine before" in second.stderr
    assert json.loads(second.stdout)["samples"] == json.loads(first.stdout)["samples"]
