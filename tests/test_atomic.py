"""One atomic write for the studio (core.atomic): readers see the old version or the new one, never a mixture."""

from __future__ import annotations

import json
import os

import pytest

from core.atomic import atomic_folder, restore_interrupted, write_bytes, write_json


def test_write_json_replaces_the_file_whole_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "deep" / "state.json"
    write_json(target, {"step": 1})
    write_json(target, {"step": 2, "text": "ünïcode"})
    assert json.loads(target.read_text(encoding="utf-8")) == {"step": 2, "text": "ünïcode"}
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "weights.bin"
    write_bytes(target, b"old")

    def crash(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_a_folder_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "export"
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("1")
        assert not target.exists()  # nothing visible until the block ends
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_folder(target) as staging:
        (staging / "a.txt").write_text("2")
        raise RuntimeError("the export failed half-way")
    assert (target / "a.txt").read_text() == "1"  # the previous version, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging folder left


def test_a_swap_killed_between_its_renames_is_undone_by_the_next_writer(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_folder(target) as staging:
        (staging / "a.txt").write_text("old")
    # What a process killed between the two renames leaves: the old version aside, under a dead pid, no target.
    target.rename(tmp_path / ".checkpoint.old-999999999")
    assert restore_interrupted(target) is True
    assert (target / "a.txt").read_text() == "old"
    assert restore_interrupted(target) is False  # nothing left to undo
