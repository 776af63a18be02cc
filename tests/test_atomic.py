"""Exports and run files a crash could leave half-written go through write-to-temp-and-rename
(trustee/atomic.py): a process killed mid-export leaves the previous export intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trustee import atomic
from trustee.learn.distributed import write_adapter, write_model

ROOT = Path(__file__).resolve().parents[1]


def _chunks(value: float) -> list[list[tuple[str, torch.Tensor]]]:
    return [[("a.weight", torch.full((4, 4), value))], [("b.weight", torch.full((8,), value))]]


def _loaded(out: Path) -> dict[str, torch.Tensor]:
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index.values())):
        tensors.update(load_file(out / shard))
    assert set(tensors) == set(index)
    return tensors


# The child exports the model with a chunk stream that stalls after its first shard is written
# (the point a crash leaves shards without their index), says so, and waits to be killed.
_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from trustee.learn.distributed import write_model

    out, model, flag = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])

    def chunks():
        yield [("a.weight", torch.full((4, 4), 2.0))]
        flag.write_text("first shard written")
        time.sleep(120)
        yield [("b.weight", torch.full((8,), 2.0))]

    write_model(out, model, chunks())
    """
)


def test_a_killed_export_leaves_the_previous_export_intact(tmp_path, tiny_model_dir):
    out = tmp_path / "run" / "model"
    write_model(out, tiny_model_dir, _chunks(1.0))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    flag = tmp_path / "flag"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(out), str(tiny_model_dir), str(flag)], env=env
    )
    try:
        deadline = time.monotonic() + 120
        while not flag.exists():
            assert child.poll() is None, "the exporting child died before its first shard"
            assert time.monotonic() < deadline, "the exporting child never wrote its first shard"
            time.sleep(0.05)
        partial = [p for p in out.parent.iterdir() if p.name.startswith(".model.tmp-")]
        assert partial and (partial[0] / "model-00001.safetensors").exists()  # killed mid-export
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert all(torch.equal(t, torch.full_like(t, 1.0)) for t in _loaded(out).values())
    # the next export replaces it whole and clears what the killed one left
    write_model(out, tiny_model_dir, _chunks(3.0))
    assert all(torch.equal(t, torch.full_like(t, 3.0)) for t in _loaded(out).values())
    assert [p.name for p in out.parent.iterdir()] == ["model"]


def test_a_failed_adapter_write_keeps_the_previous_adapter(tmp_path):
    path = tmp_path / "adapter"
    write_adapter(path, {"w": torch.ones(2)}, {"r": 1})
    with pytest.raises(TypeError):  # the new weights are written, then the config cannot be
        write_adapter(path, {"w": torch.zeros(2)}, {"r": object()})
    assert json.loads((path / "adapter_config.json").read_text()) == {"r": 1}
    assert torch.equal(load_file(path / "adapter_model.safetensors")["w"], torch.ones(2))
    write_adapter(path, {"w": torch.zeros(2)}, {"r": 3})
    assert json.loads((path / "adapter_config.json").read_text()) == {"r": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_write_text_replaces_whole_or_not_at_all(tmp_path, monkeypatch):
    f = tmp_path / "sub" / "wandb_id"
    atomic.write_text(f, "abc\n")
    assert f.read_text() == "abc\n"

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)  # the new bytes are written, not yet durable
    with pytest.raises(OSError, match="No space"):
        atomic.write_text(f, "a much longer id that never lands\n")
    monkeypatch.undo()
    assert f.read_text() == "abc\n" and sorted(p.name for p in f.parent.iterdir()) == ["wandb_id"]
