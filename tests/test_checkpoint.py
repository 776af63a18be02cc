"""Checkpoints: atomic, pruned, and a half-written one is never resumed from."""

from __future__ import annotations

import pytest
import torch

from trustee.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def test_round_trip_and_pruning(tmp_path):
    for step in (5, 10, 15):
        save_checkpoint(
            tmp_path, step, {"w": torch.full((2,), float(step))}, {"difficulty": step * 2.0}, keep=2
        )
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["step-000010", "step-000015"]
    state, meta = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(state["w"], torch.full((2,), 15.0))
    assert meta == {"step": 15, "difficulty": 30.0}


def test_interrupted_save_is_invisible(tmp_path):
    save_checkpoint(tmp_path, 1, {"w": torch.zeros(1)}, {})
    # A save killed before its rename leaves only a temporary directory behind...
    partial = tmp_path / "checkpoints" / ".tmp-step-000002-123"
    partial.mkdir()
    (partial / "state.pt").write_bytes(b"garbage")
    # ...and one killed between writing files and the marker leaves an unmarked directory.
    unmarked = tmp_path / "checkpoints" / "step-000003"
    unmarked.mkdir()
    assert latest_checkpoint(tmp_path).name == "step-000001"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(unmarked)


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None and list_checkpoints(tmp_path) == []
