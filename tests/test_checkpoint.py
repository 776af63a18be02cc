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


class _Payload:
    """Pickles as a call to os.system: what a hostile state.pt would hold."""

    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.sentinel}",))


def test_resume_state_is_never_unpickled(tmp_path):
    """state.pt loads with weights_only=True: a checkpoint holding a Python object is refused
    with the reason, before a run starts (plan_resume) and at load, and nothing in it runs."""
    from trustee.checkpoint import UnsafeCheckpoint, checkpoint_problem
    from trustee.config import load_config
    from trustee.resume import ResumeRefused, plan_resume

    sentinel = tmp_path / "pwned"
    run = tmp_path / "run"
    ckpt = save_checkpoint(run, 0, {"w": torch.zeros(1), "x": _Payload(sentinel)}, {})
    assert "posix.system" in checkpoint_problem(ckpt) or "os.system" in checkpoint_problem(ckpt)
    with pytest.raises(UnsafeCheckpoint, match="weights_only=True"):
        load_checkpoint(ckpt)
    cfg = load_config("configs/cpu-tiny.toml")
    with pytest.raises(ResumeRefused, match="holds Python objects in state.pt"):
        plan_resume(cfg, run)
    assert not sentinel.exists()
    # what trustee saves is plain data: tensors, a Python RNG state (tuples of ints), an
    # optimiser's and a scheduler's state dicts
    import random

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    state = {
        "rng": random.Random(0).getstate(),
        "torch_rng": torch.get_rng_state(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
    }
    ok = save_checkpoint(tmp_path / "ok", 1, state, {})
    assert checkpoint_problem(ok) == ""
    back, _ = load_checkpoint(ok)
    assert back["rng"] == state["rng"] and torch.equal(
        back["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"]
    )


def test_learner_dcp_metadata_is_read_without_running_code(tmp_path):
    """The FSDP learner's DCP checkpoint: its `.metadata` pickle is read by an unpickler that
    builds only DCP's records. A real checkpoint loads; one whose metadata names anything else
    is refused and nothing in it runs."""
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from trustee.learn.fsdp_rank import load_dcp_into

    def model_and_opt(seed):
        torch.manual_seed(seed)
        m = torch.nn.Linear(3, 2)
        opt = torch.optim.AdamW(m.parameters())
        m(torch.ones(1, 3)).sum().backward()
        opt.step()
        return m, opt

    a, opt_a = model_and_opt(0)
    sd, osd = get_state_dict(a, opt_a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving in a single process"
        dcp.save({"model": sd, "optim": osd}, checkpoint_id=str(tmp_path / "dcp"))
        b, opt_b = model_and_opt(1)
        load_dcp_into(b, opt_b, str(tmp_path / "dcp"), full=True)
    assert torch.equal(b.weight, a.weight)
    sentinel = tmp_path / "pwned"
    (tmp_path / "dcp" / ".metadata").write_bytes(pickle.dumps(_Payload(sentinel)))
    with pytest.raises(pickle.UnpicklingError, match="refused rather than imported"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_dcp_into(b, opt_b, str(tmp_path / "dcp"), full=True)
    assert not sentinel.exists()
