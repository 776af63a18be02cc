"""Files and directories that a crash can never leave half-written.

Owns write-to-temporary-then-rename: `write_bytes` / `write_text` for one file, `directory` for
a directory of files (an export: shards and their index, an adapter and its config). The data
goes to a temporary sibling (same file system, so the rename is atomic), is fsynced, and only
then takes the final name; a reader sees the previous version or the new one, never a part.
A write that fails or is killed leaves the previous version in place and, at worst, a hidden
temporary sibling (`.NAME.tmp-PID`) that the next write of the same path removes.

Callers: every writer of a file a run, an export or a report depends on (resume's exports, the
distributed learner's model and adapter directories, the W&B id, the run's config files, the
report page, evaluation reports). Checkpoints have their own (`trustee/checkpoint.py`: a
directory with a COMPLETE marker). It decides nothing about what is written.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}")


def _stale(path: Path) -> list[Path]:
    """Temporary siblings of `path` left by writers that were killed."""
    return [p for p in path.parent.glob(f".{path.name}.*-*") if p.name.rsplit("-", 1)[-1].isdigit()]


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace file `path` with `data` atomically (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Replace file `path` with `text` (UTF-8) atomically."""
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def directory(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling and, when the block ends without an error, put
    it at `path` (replacing what was there). On an error the temporary copy is removed and the
    previous `path` is untouched.

        with atomic.directory(out) as tmp:
            save_file(..., tmp / "model-00001.safetensors")
            (tmp / "model.safetensors.index.json").write_text(...)

    An existing `path` is moved aside, the new one renamed in, the old one removed: two renames,
    so a crash between them (microseconds) leaves the previous version complete beside the
    path as `.NAME.old-PID`, never a partial one at it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in _stale(path):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    tmp = _tmp(path, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        for f in (f for f in tmp.rglob("*") if f.is_file()):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        old = _tmp(path, "old")
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
