import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from core import checkpoint as checkpoint_module
from core.atomic import restore_interrupted as restore_interrupted_save
from core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from tests.conftest import REPO


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


KILLED_BETWEEN_THE_RENAMES = """
import os, signal, sys
import torch
from core.checkpoint import load_checkpoint, save_checkpoint

model, _ = load_checkpoint(sys.argv[1])
with torch.no_grad():
    model.transformer.wpe.weight.add_(1.0)
real_replace, renames = os.replace, []


def replace(src, dst):
    renames.append(dst)
    if len(renames) == 2:  # the old folder is retired; the new one is about to take its name
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)


os.replace = replace
save_checkpoint(model, sys.argv[1])
"""


def test_a_save_killed_between_its_renames_leaves_the_previous_checkpoint_readable(tiny_checkpoint):
    before = (tiny_checkpoint / "model.safetensors").read_bytes()
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BETWEEN_THE_RENAMES, str(tiny_checkpoint)], cwd=REPO, capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert not tiny_checkpoint.exists()  # the moment the kill caught: only the hidden retired folder is left

    load_checkpoint(tiny_checkpoint)  # the first reader puts the previous version back
    assert (tiny_checkpoint / "model.safetensors").read_bytes() == before
    assert not list(tiny_checkpoint.parent.glob(".tiny-checkpoint.old-*"))


def test_a_save_still_under_way_is_left_alone(tiny_checkpoint):
    # Retired by this (live) process: its save renames the new folder in a moment, so readers must not interfere.
    retired = tiny_checkpoint.parent / f".{tiny_checkpoint.name}.old-{os.getpid()}"
    os.replace(tiny_checkpoint, retired)
    assert restore_interrupted_save(tiny_checkpoint) is False
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        load_checkpoint(tiny_checkpoint)
    assert retired.is_dir()


def test_saving_over_a_checkpoint_replaces_it(tiny_model, tiny_checkpoint):
    with torch.no_grad():
        tiny_model.transformer.wpe.weight.add_(1.0)
    save_checkpoint(tiny_model, tiny_checkpoint)
    loaded, _ = load_checkpoint(tiny_checkpoint)
    torch.testing.assert_close(loaded.transformer.wpe.weight, tiny_model.transformer.wpe.weight)


# ---- resumable checkpoints: the folder layout, the latest pointer, pruning, crash safety ----


def save_resumable(model, out_dir, step, keep=3):
    from core.checkpoint import save_resumable_checkpoint

    state = {"trainer": {"window": [1.5, 1.25]}}
    tensors = {
        "optimizer": {"exp_avg/transformer.wpe.weight": torch.full((4, 2), float(step))},
        "rng": {"torch": torch.get_rng_state()},
    }
    return save_resumable_checkpoint(model, out_dir, step, state, tensors, keep=keep)


def test_a_resumable_checkpoint_reads_back_what_was_saved(tiny_model, tmp_path):
    from core.checkpoint import latest_resumable_checkpoint, load_resumable_checkpoint

    folder = save_resumable(tiny_model, tmp_path, 7)
    assert folder == tmp_path / "resume" / "step-00000007"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "rng.safetensors",
        "training_state.json",
    ]
    assert json.loads((tmp_path / "resume" / "latest.json").read_text()) == {"checkpoint": folder.name, "step": 7}
    assert latest_resumable_checkpoint(tmp_path) == folder
    loaded = load_resumable_checkpoint(folder)
    assert loaded.step == 7 and loaded.state["trainer"] == {"window": [1.5, 1.25]}
    assert torch.equal(loaded.tensors["optimizer"]["exp_avg/transformer.wpe.weight"], torch.full((4, 2), 7.0))
    assert torch.equal(loaded.tensors["rng"]["torch"], torch.get_rng_state())
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_only_the_newest_k_resumable_checkpoints_are_kept(tiny_model, tmp_path):
    from core.checkpoint import latest_resumable_checkpoint, list_resumable_checkpoints

    for step in (3, 6, 9, 12):
        save_resumable(tiny_model, tmp_path, step, keep=2)
    assert [p.name for p in list_resumable_checkpoints(tmp_path)] == ["step-00000009", "step-00000012"]
    assert latest_resumable_checkpoint(tmp_path).name == "step-00000012"
    assert [p.name for p in (tmp_path / "resume").iterdir() if p.name.startswith(".")] == []


def test_a_crash_mid_resumable_save_keeps_the_previous_checkpoint_and_pointer(tiny_model, tmp_path, monkeypatch):
    from core.checkpoint import latest_resumable_checkpoint, list_resumable_checkpoints, load_resumable_checkpoint

    previous = save_resumable(tiny_model, tmp_path, 5)
    real_save_file = checkpoint_module.save_file
    written = []

    def crash_after_the_weights(tensors, path, *args, **kwargs):
        if written:  # the weights went to disk; the optimizer state does not
            raise OSError("disk full")
        written.append(path)
        real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", crash_after_the_weights)
    with pytest.raises(OSError, match="disk full"):
        save_resumable(tiny_model, tmp_path, 10)
    assert written and written[0].endswith("model.safetensors")  # the save did get half-way
    assert latest_resumable_checkpoint(tmp_path) == previous
    assert list_resumable_checkpoints(tmp_path) == [previous]
    assert [p.name for p in (tmp_path / "resume").iterdir() if p.name.startswith(".")] == []
    assert load_resumable_checkpoint(previous).step == 5


def test_a_crash_between_the_save_and_the_pointer_keeps_the_previous_checkpoint(tiny_model, tmp_path, monkeypatch):
    from core.checkpoint import latest_resumable_checkpoint, load_resumable_checkpoint

    previous = save_resumable(tiny_model, tmp_path, 5)

    def crash(*args):
        raise OSError("power cut")

    monkeypatch.setattr(checkpoint_module, "_write_json_atomic", crash)
    with pytest.raises(OSError, match="power cut"):
        save_resumable(tiny_model, tmp_path, 10)
    assert latest_resumable_checkpoint(tmp_path) == previous  # the complete step-10 folder is not named
    assert load_resumable_checkpoint(previous).step == 5


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: (folder / "optimizer.safetensors").write_bytes(b"\x00" * 10), "truncated or corrupt"),
        (lambda folder: (folder / "rng.safetensors").unlink(), "rng.safetensors is missing"),
        (lambda folder: (folder / "training_state.json").write_text("{"), "not valid JSON"),
        (lambda folder: (folder / "model.safetensors").unlink(), "model.safetensors is missing"),
    ],
)
def test_a_damaged_resumable_checkpoint_is_refused(tiny_model, tmp_path, damage, message):
    from core.checkpoint import load_resumable_checkpoint

    folder = save_resumable(tiny_model, tmp_path, 4)
    damage(folder)
    with pytest.raises(CheckpointError, match=message):
        load_resumable_checkpoint(folder)


def test_a_missing_or_broken_pointer_is_refused(tiny_model, tmp_path):
    from core.checkpoint import latest_resumable_checkpoint

    with pytest.raises(CheckpointError, match="no resumable checkpoint"):
        latest_resumable_checkpoint(tmp_path)
    save_resumable(tiny_model, tmp_path, 4)
    pointer = tmp_path / "resume" / "latest.json"
    pointer.write_text('{"checkpoint": "../../elsewhere"}')
    with pytest.raises(CheckpointError, match="not a step-\\* folder"):
        latest_resumable_checkpoint(tmp_path)
    pointer.write_text('{"checkpoint": "step-00000099"}')
    with pytest.raises(CheckpointError, match="missing"):
        latest_resumable_checkpoint(tmp_path)
