"""Saving a sample to the model version that wrote it, and listing what was saved."""

from __future__ import annotations

import pytest

from core.config import SampleConfig
from core.errors import UsageError
from core.registry import RegistryError, log_and_register
from core.saved_samples import list_saved_samples, save_sample
from core.store import connect, ensure_experiment


@pytest.fixture
def version(tmp_path, new_store, tiny_checkpoint):
    client = connect(new_store(tmp_path / "store"))
    run_id = client.create_run(ensure_experiment(client, "saved")).info.run_id
    log_and_register(client, run_id, tiny_checkpoint, name="bard")
    return client, run_id


def test_a_saved_sample_comes_back_with_what_generates_it_again(version):
    client, run_id = version
    settings = SampleConfig(max_new_tokens=20, temperature=0.7, seed=42)
    first = save_sample(client, "bard", 1, prompt="ROMEO:", sample="ROMEO: Wherefore 🎭", settings=settings)
    second = save_sample(client, "bard", 1, prompt="JULIET:", sample="JULIET: O", settings=settings)
    assert first.startswith("saved_samples/bard-v1/") and first.endswith(".json")
    assert {a.path for a in client.list_artifacts(run_id, "saved_samples/bard-v1")} == {first, second}  # the run's
    saved = list_saved_samples(client, "bard", 1)
    assert {s["prompt"] for s in saved} == {"ROMEO:", "JULIET:"}
    romeo = next(s for s in saved if s["prompt"] == "ROMEO:")
    assert romeo["sample"] == "ROMEO: Wherefore 🎭" and romeo["seed"] == 42 and romeo["version"] == 1
    assert SampleConfig.from_dict(romeo["settings"]) == settings and romeo["saved_at"].endswith("+00:00")


def test_bad_saves_are_refused_and_store_nothing(version):
    client, run_id = version
    with pytest.raises(UsageError, match="no text to save"):
        save_sample(client, "bard", 1, prompt="x", sample="  ", settings=SampleConfig(seed=1))
    with pytest.raises(UsageError, match="seed"):
        save_sample(client, "bard", 1, prompt="x", sample="x y", settings=SampleConfig())
    with pytest.raises(RegistryError, match="version 9 no longer exists"):
        save_sample(client, "bard", 9, prompt="x", sample="x y", settings=SampleConfig(seed=1))
    assert list_saved_samples(client, "bard", 1) == []


def test_a_file_that_is_not_a_saved_sample_is_named_not_hidden(version):
    client, run_id = version
    client.log_text(run_id, "not json", "saved_samples/bard-v1/notes.json")
    [entry] = list_saved_samples(client, "bard", 1)
    assert entry["path"] == "saved_samples/bard-v1/notes.json" and entry["error"].startswith("not a saved sample")
