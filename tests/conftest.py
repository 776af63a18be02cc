"""Shared fixtures: tiny offline models built once per test session, GPU auto-skip, and a run
root of the session's own ($TRUSTEE_RUNS_DIR), so no test reads or writes the user's `runs/`
(the README has the user run the main job, which fills runs/cpu-tiny, before the tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("TRUSTEE_TEST_CACHE", ROOT / ".cache"))


@pytest.fixture(scope="session", autouse=True)
def _own_run_root(tmp_path_factory):
    """Default run directories (`runs/<name>`) and eval reports of every test, in-process or in
    a subprocess (which inherits the environment), go under a temporary directory."""
    from trustee.paths import RUNS_ENV

    old = os.environ.get(RUNS_ENV)
    os.environ[RUNS_ENV] = str(tmp_path_factory.mktemp("runs"))
    yield Path(os.environ[RUNS_ENV])
    if old is None:
        os.environ.pop(RUNS_ENV, None)
    else:
        os.environ[RUNS_ENV] = old


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA (gpu marker)")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A random-weight tiny Qwen3 model + tokenizer (size 'test'), built once and cached."""
    from trustee.models.tiny import build_tiny_model

    return build_tiny_model(CACHE / "tiny-test", size="test", seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)
