"""Atomic checkpoints of a run, and finding the one to resume from.

Owns the on-disk layout `RUN/checkpoints/step-000012/` holding `state.pt` (torch state dicts:
trainable weights, optimiser, scheduler), `meta.json` (step, curriculum state, RNG seeds,
metrics needed to resume) and a `COMPLETE` marker written last. A checkpoint is first written
to a temporary sibling directory and renamed into place, so a run killed mid-save never leaves
a checkpoint that looks complete. Callers: the training loop (save every N steps, resume at
start). It does not decide what goes into the state: the caller passes it in (trustee/resume.py).
A save that fails (disk full, unwritable) removes its temporary directory and raises OSError;
the checkpoints already there stay complete.

Loading never unpickles Python objects: `state.pt` is read with `torch.load(weights_only=True)`
(tensors, numbers, strings, lists, tuples and dicts; everything trustee saves), so a run
directory someone else supplied cannot run code on resume. A `state.pt` that holds anything
else is refused with `UnsafeCheckpoint`, naming what it holds; `checkpoint_problem` says so
before a run starts, without loading it.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from trustee.atomic import fsync_dir


class UnsafeCheckpoint(ValueError):
    """A checkpoint whose state.pt holds Python objects beyond tensors and plain data."""


_PREFIX = "step-"
_MARKER = "COMPLETE"


def _dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    state: dict[str, Any],
    meta: dict[str, Any],
    keep: int = 2,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint `step` atomically and prune to the newest `keep`. Returns its path.
    write_extra(tmp_dir): called first, for files other processes write into the checkpoint
    (the FSDP learner's DCP shards, which fsync themselves); it may still add to `state`."""
    root = _dir(Path(run_dir))
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save (one run writes a directory)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        if write_extra is not None:
            write_extra(tmp)
        torch.save(state, tmp / "state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1, sort_keys=True))
        (tmp / _MARKER).write_text("ok\n")
        for f in (f for f in tmp.iterdir() if f.is_file()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        # A full or unwritable disk: drop the partial copy; the previous checkpoints are untouched.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary and unmarked directories are ignored)."""
    root = _dir(Path(run_dir))
    if not root.exists():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / _MARKER).exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def _refusal(path: Path, names: list[str]) -> str:
    return (
        f"checkpoint {path} holds Python objects in state.pt ({', '.join(names[:5]) or 'not plain data'}): "
        "loading them would run code from the run directory, and trustee loads resume state as tensors "
        "and plain data only (torch.load with weights_only=True). trustee never writes such a checkpoint; "
        "resume only from a run directory you made, or start a new run with another --out"
    )


def checkpoint_problem(path: str | os.PathLike) -> str:
    """Why checkpoint `path` cannot be loaded safely ('' when it can); reads state.pt's pickle
    opcodes without running them."""
    path = Path(path)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path / "state.pt")
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        return f"checkpoint {path} has an unreadable state.pt ({e})"
    return _refusal(path, names) if names else ""


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a checkpoint directory. Raises UnsafeCheckpoint when state.pt holds
    anything but tensors and plain data (nothing in it is run)."""
    path = Path(path)
    if not (path / _MARKER).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {_MARKER} marker)")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path / "state.pt")
        raise UnsafeCheckpoint(_refusal(path, names)) from None
    meta = json.loads((path / "meta.json").read_text())
    return state, meta
