import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from core import checkpoint as checkpoint_module
from core.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_config, save_checkpoint


def test_round_trip_gives_the_same_logits(tiny_model, tiny_checkpoint):
    loaded, document = load_checkpoint(tiny_checkpoint)
    idx = torch.randint(0, 50257, (2, 12))
    torch.testing.assert_close(loaded(idx)[0], tiny_model(idx)[0], rtol=0, atol=0)
    assert loaded.config == tiny_model.config
    assert document["tokenizer"] == "gpt2"
    assert not loaded.training


def test_folder_holds_only_safetensors_and_json(tiny_checkpoint):
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["config.json", "model.safetensors"]
    stored = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert "lm_head.weight" not in stored  # the tied head is stored once, as the token embedding
    assert json.loads((tiny_checkpoint / "config.json").read_text())["model"]["n_layer"] == 2


def test_tied_weights_survive_loading(tiny_checkpoint):
    loaded, _ = load_checkpoint(tiny_checkpoint)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_metadata_is_kept(tiny_model, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "ck", {"step": 7, "run": "abc"})
    _, document = read_checkpoint_config(path)
    assert document["metadata"] == {"step": 7, "run": "abc"}


def test_truncated_weights_are_refused(tiny_checkpoint):
    weights = tiny_checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tiny_checkpoint)


def test_garbage_weights_are_refused(tiny_checkpoint):
    (tiny_checkpoint / "model.safetensors").write_bytes(b"\x80\x04not a safetensors file at all")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_weights_are_refused(tiny_checkpoint, bad):
    weights = tiny_checkpoint / "model.safetensors"
    state = load_file(str(weights))
    state["transformer.h.0.mlp.c_fc.weight"][3, 7] = bad
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(tiny_checkpoint)


def test_mismatched_config_is_refused(tiny_checkpoint):
    config_path = tiny_checkpoint / "config.json"
    document = json.loads(config_path.read_text())
    document["model"]["n_layer"] = 3
    config_path.write_text(json.dumps(document))
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(tiny_checkpoint)


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not valid JSON"), ('{"format": "pytorch"}', "not written by this studio")],
)
def test_foreign_config_is_refused(tiny_checkpoint, content, message):
    (tiny_checkpoint / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tiny_checkpoint)


def test_missing_folder_or_files_are_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    (tiny_checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(tiny_checkpoint)


def test_a_crash_mid_save_keeps_the_previous_checkpoint(tiny_model, tiny_checkpoint, monkeypatch):
    before = (tiny_checkpoint / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_file", crash)
    with torch.no_grad():
        tiny_model.transformer.wpe.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model, tiny_checkpoint)
    assert (tiny_checkpoint / "model.safetensors").read_bytes() == before
    assert [p.name for p in tiny_checkpoint.parent.iterdir() if p.name.startswith(".")] == []
    load_checkpoint(tiny_checkpoint)


def test_saving_over_a_checkpoint_replaces_it(tiny_model, tiny_checkpoint):
    with torch.no_grad():
        tiny_model.transformer.wpe.weight.add_(1.0)
    save_checkpoint(tiny_model, tiny_checkpoint)
    loaded, _ = load_checkpoint(tiny_checkpoint)
    torch.testing.assert_close(loaded.transformer.wpe.weight, tiny_model.transformer.wpe.weight)
