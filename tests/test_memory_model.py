"""The memory model (trustee/memory.py) and the learner's memory as it is really held.

Pure checks: the 8gpu plan counts the learner as its ranks hold it and leaves 5% of every card
free; one module owns the model shapes; QLoRA's upcast is undone and budgeted.

Two real gloo ranks (the FSDP2 learner on the CPU, on a model built here: 6M parameters, so
the learner's bytes stand clear of a process's own noise). Two learners are started in all:
- full fine-tuning with a KL reference, updates_per_batch = 2, mini_batches = 2 and one NaN
  advantage: equal to the single-process learner (weights, skipped updates, step count);
  gradients freed after the step; `release` answered by every rank; only rank 0 read the
  weight files (its own count and the kernel's read counter of each process); each rank's
  host peak while building, beyond its own shards (which on the CPU live in host memory), below
  one copy of the weights; the step's peak inside the plan's band;
- LoRA: the same build bound; the step's peak inside the plan's band.
The peak is of live allocations (`trustee/learn/hostmem.py`, the CPU counterpart of CUDA's
max_memory_allocated), checked by `test_live_peak_sees_an_allocation_that_rss_would_hide`.
On 2 shared cores each start takes about 20 s idle, minutes under load.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from learn_samples import make_groups, random_qwen3, rank_spec_for

from trustee import memory
from trustee.config import Config, GrpoConfig, LearnerConfig, PlacementConfig, load_config, resolve
from trustee.learn.distributed import DistributedLearner
from trustee.learn.fsdp_rank import RankSpec
from trustee.learn.learner import Learner, update_plan
from trustee.learn.policy import load_policy
from trustee.types import Group

ROOT = Path(__file__).resolve().parents[1]
WEIGHT_RTOL = 1e-4  # after AdamW steps (see test_learn_distributed.py for why not 1e-5)
# The band: a rank's measured peak of live allocations (the CPU counterpart of CUDA's
# max_memory_allocated: `hostmem.live_bytes`, sampled during the step, above its value before
# the build) against the plan's resident + working bytes. The plan is an estimate per item
# (activations, gathered groups, reduce-scatter buffers); 0.5x-1.5x is the tolerance the issue
# holds it to, for full fine-tuning and LoRA alike. Peak RSS is not the measure: it also counts
# ~25 MiB of libtorch code paged in by the first step and the allocator's free lists (see
# trustee/learn/hostmem.py), which made a LoRA rank look 2.2x its plan.
BAND = (0.5, 1.5)
# Ranks run with glibc's mmap threshold fixed at 64 KiB, so a freed tensor leaves the resident
# set at once: the build's peak RSS (the one-copy check) is then not inflated by freed blocks.
LIVE_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


# ----------------------------------------------------------------------------- the plan


def test_8gpu_plan_holds_the_learner_as_its_ranks_do_and_leaves_5_percent_free():
    cfg = load_config(ROOT / "configs" / "8gpu.toml")
    res = resolve(cfg, "runs/x")
    shape = memory.KNOWN_SHAPES["Qwen3-8B"]
    d = memory.learner_dtypes("full", "bfloat16", sharded=True, on_gpu=True)
    assert (d.master, d.grads, d.moments, d.compute, d.reference) == (
        "float32",
        "float32",
        "float32",
        "bfloat16",
        "bfloat16",
    )
    rank = memory.rank_memory(cfg, res)
    # Between updates: fp32 master (4) + fp32 AdamW m, v (8) + bf16 reference (2) bytes a parameter, / 8.
    weights = sum(i.gib for i in rank.resident)
    assert weights == pytest.approx(14 * shape.params / 8 / 2**30, rel=1e-6)
    grads = [i for i in rank.working if i.what.startswith("learner gradients")]
    assert grads and grads[0].gib == pytest.approx(4 * shape.params / 8 / 2**30, rel=1e-6)
    plan = memory.memory_plan(cfg, res)
    assert memory.check_memory(plan) == []
    for dev in plan.devices:
        if dev.capacity_gib:
            for items in (dev.rollout, dev.learning):
                assert sum(i.gib for i in items) <= 0.95 * dev.capacity_gib
    # The config as first shipped (0.38 per engine) no longer fits once the learner is counted.
    old = load_config(
        ROOT / "configs" / "8gpu.toml",
        ["engines.policy.gpu_memory_utilization=0.38", "engines.simulator.gpu_memory_utilization=0.38"],
    )
    problems = memory.check_memory(memory.memory_plan(old, resolve(old, "runs/x")))
    assert problems and "during rollout" in problems[0].message


def test_one_module_owns_model_shapes_and_memory():
    for path in (ROOT / "trustee").rglob("*.py"):
        if path.name == "memory.py":
            continue
        src = path.read_text()
        for old in (
            "KNOWN_MODELS",
            "KNOWN_SHAPES =",
            "learner_memory_plan",
            "class ModelDims",
            "class ModelShape",
        ):
            assert old not in src, (path, old)


def test_single_process_full_learner_trains_in_its_dtype():
    d = memory.learner_dtypes("full", "bfloat16", sharded=False, on_gpu=True)
    assert (d.master, d.moments, d.grads) == ("bfloat16",) * 3
    lora = memory.learner_dtypes("lora", "bfloat16", sharded=True, on_gpu=True)
    assert (lora.master, lora.frozen) == ("float32", "bfloat16")


def test_qlora_upcast_is_undone_and_the_plan_counts_what_stays(tiny_model_dir):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    from trustee.learn.policy import undo_kbit_upcast

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    emb = model.get_input_embeddings().weight
    assert emb.dtype == torch.float32  # peft upcast every non-4-bit parameter
    freed = undo_kbit_upcast(model, torch.bfloat16)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert freed >= emb.numel() * 2
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.dim() == 1)  # norms stay fp32
    cfg = load_config(ROOT / "configs" / "1gpu-qlora.toml")
    shape = memory.KNOWN_SHAPES["Qwen3-4B"]
    kept = memory.learner_items(cfg, shape, "bfloat16", on_gpu=True).resident[0].gib
    upcast = memory.learner_items(cfg, shape, "bfloat16", on_gpu=True, qlora_upcast=True).resident[0].gib
    rest = shape.params - shape.num_hidden_layers * shape.linear_params  # embeddings + norms
    assert upcast - kept == pytest.approx(rest * 2 / 2**30, rel=1e-6)


def test_update_plan_is_shared_and_seeded_by_the_step():
    a = update_plan(10, 3, 2, 2)
    assert a == update_plan(10, 3, 2, 2) and a != update_plan(10, 4, 2, 2)
    assert len(a) == 4 and sorted(a[0] + a[1]) == list(range(10)) == sorted(a[2] + a[3])
    assert update_plan(5, 0, 1, 1) == [[0, 1, 2, 3, 4]]


def test_live_peak_counts_what_is_allocated_and_forgets_what_is_freed():
    import platform
    import time

    from trustee.learn.hostmem import LivePeak, live_bytes

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("live_bytes reads glibc's mallinfo2")
    start = live_bytes()
    assert start is not None and start > 0
    size = 64 * 2**20
    with LivePeak() as meter:
        x = torch.ones(size // 4)  # 64 MiB, written (so also resident)
        time.sleep(0.02)  # the sampler runs meanwhile
        del x
        time.sleep(0.005)
    assert meter.peak is not None and meter.peak - start >= 0.99 * size
    after = live_bytes()
    assert after is not None and after - start < size / 8  # freed bytes leave the count at once
    with LivePeak() as quiet:
        time.sleep(0.005)
    assert quiet.peak is not None and quiet.peak - after < size / 8


def test_offload_round_trip_is_bit_exact_and_empties_the_storages(tiny_model_dir):
    from trustee.learn.offload import offload_targets

    grpo = GrpoConfig(beta=0.01, loss_type="grpo")

    def learner():
        torch.manual_seed(0)
        return Learner(
            load_policy(tiny_model_dir, _learner_cfg("full"), need_reference=True),
            grpo,
            _learner_cfg("full"),
            total_steps=10,
        )

    moved, kept = learner(), learner()
    for lr in (moved, kept):
        lr.step(_groups(5, n=2))
    targets = offload_targets(moved.optimizer, moved.policy.ref_model)
    assert len(targets) > 3 * sum(
        1 for p in moved.model.parameters() if p.requires_grad
    )  # moments + steps + reference
    before = [t.clone() for t in targets]
    nbytes = sum(t.untyped_storage().nbytes() for t in targets)
    assert moved.offload() == nbytes
    assert all(t.untyped_storage().nbytes() == 0 for t in targets)  # the memory where it trains is freed
    moved.reload()
    assert all(torch.equal(a, b) for a, b in zip(targets, before, strict=True))
    moved.offload()  # the next step brings the state back by itself
    for lr in (moved, kept):
        lr.step(_groups(6, n=2))
    for (n, a), b in zip(moved.model.state_dict().items(), kept.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), n  # AdamW continued from the reloaded moments, bit for bit


# ----------------------------------------------------------------------------- two gloo ranks


@pytest.fixture(scope="module")
def band_model(tmp_path_factory) -> Path:
    """A 6M-parameter random Qwen3 (4 layers, untied 4k vocabulary: the largest tensor is 17%
    of the weights) in float32, 24 MB."""
    out = tmp_path_factory.mktemp("band-model")
    return random_qwen3(out, vocab=4096, hidden=256, layers=4, heads=4, tied=False, seed=1)


def _groups(seed: int, n: int = 8, nan_group: int | None = None) -> list[Group]:
    return make_groups(seed, n, nan_group=nan_group)


def _learner_cfg(mode: str) -> LearnerConfig:
    return LearnerConfig(
        mode=mode,
        lr=1e-3,
        micro_batch_tokens=64,
        logprob_chunk=16,
        lora_rank=4,
        lora_alpha=8.0,
        gradient_checkpointing=True,
    )


def _spec(path: Path, mode: str, grpo: GrpoConfig) -> RankSpec:
    return rank_spec_for(path, _learner_cfg(mode), grpo)


def _plan_gib(mode: str, grpo: GrpoConfig, path: Path) -> float:
    cfg = Config(learner=_learner_cfg(mode), grpo=grpo, placement=PlacementConfig(learner_ranks=2))
    shape = memory.model_shape(path)
    assert shape is not None and 5e6 < shape.params < 7e6
    return memory.learner_items(cfg, shape, "float32", on_gpu=False).peak_gib


def _plan_resident_bytes(mode: str, grpo: GrpoConfig, path: Path) -> float:
    """A rank's weight shards right after the build (no AdamW moments yet), per the plan."""
    cfg = Config(learner=_learner_cfg(mode), grpo=grpo, placement=PlacementConfig(learner_ranks=2))
    rank = memory.learner_items(cfg, memory.model_shape(path), "float32", on_gpu=False)
    return sum(i.gib for i in rank.resident if "moments" not in i.what) * 2**30


def _plan_offloaded_bytes(grpo: GrpoConfig, path: Path) -> float:
    """A full fine-tuning rank's AdamW moments and KL reference shards, per the plan."""
    cfg = Config(learner=_learner_cfg("full"), grpo=grpo, placement=PlacementConfig(learner_ranks=2))
    rank = memory.learner_items(cfg, memory.model_shape(path), "float32", on_gpu=False)
    return sum(i.gib for i in rank.resident if i.what.startswith(memory.OFFLOADED)) * 2**30


def _in_band(dl: DistributedLearner, plan_gib: float) -> list[float]:
    ratios = []
    for ready, share in zip(dl.ready, dl.last_rank_steps, strict=True):
        assert ready.host_live_before > 0 and share.peak_live_bytes > ready.host_live_before
        measured = (share.peak_live_bytes - ready.host_live_before) / 2**30
        ratios.append(measured / plan_gib)
    assert all(BAND[0] <= r <= BAND[1] for r in ratios), (ratios, plan_gib)
    return ratios


def _rchar(pid: int) -> int:
    """Bytes the kernel counted as read by the process (read(2) and friends)."""
    text = Path(f"/proc/{pid}/io").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith("rchar:")))


GRPO_FULL = GrpoConfig(beta=0.01, loss_type="grpo", updates_per_batch=2, mini_batches=2)


def test_full_two_ranks_equal_one_process_with_updates_nan_and_hold_memory_as_planned(
    band_model, monkeypatch
):
    for k, v in LIVE_MEMORY_ENV.items():
        monkeypatch.setenv(k, v)  # inherited by the spawned ranks
    weights = (band_model / "model.safetensors").stat().st_size
    torch.manual_seed(0)
    single = Learner(
        load_policy(band_model, _learner_cfg("full"), need_reference=True),
        GRPO_FULL,
        _learner_cfg("full"),
        total_steps=10,
    )
    with DistributedLearner(_spec(band_model, "full", GRPO_FULL)) as dl:
        # One reader: rank 0 read the weights once, rank 1 nothing (its own count and the kernel's).
        assert [r.read_bytes for r in dl.ready] == [pytest.approx(weights, rel=0.01), 0]
        if Path(f"/proc/{dl.pids[0]}/io").exists():
            assert _rchar(dl.pids[0]) - _rchar(dl.pids[1]) > 0.9 * weights
        # Host memory while building: beyond its own shards (policy + reference, half a copy each
        # here), below one copy of the weights on every rank (each rank used to load two copies).
        shards = _plan_resident_bytes("full", GRPO_FULL, band_model)
        excess = [(r.host_build_peak - r.host_rss_before - shards) / weights for r in dl.ready]
        print("full: build peak beyond own shards, in copies of the weights", [f"{x:.2f}" for x in excess])
        assert all(x < 1.0 for x in excess), excess
        # 2 passes x 2 mini-batches; the NaN sample poisons one mini-batch of each pass.
        gs = _groups(0, nan_group=2)
        got, want = dl.step(gs), single.step(gs)
        assert got.skipped_nonfinite == want.skipped_nonfinite == 1
        assert got.optimizer_steps == want.optimizer_steps == 2
        assert dl.step_count == single.step_count == 1
        assert all(s.grads_held == 0 for s in dl.last_rank_steps)  # gradients freed after the step
        assert all(p.grad is None for p in single.model.parameters())
        state = single.model.state_dict()
        ours = {n: t for chunk in dl.export_full().chunks for n, t in chunk}
        num = sum(float((ours[n] - state[n]).norm()) ** 2 for n in ours) ** 0.5
        den = sum(float(state[n].norm()) ** 2 for n in ours) ** 0.5
        assert all(math.isfinite(float(t.sum())) for t in ours.values())
        assert num / den < WEIGHT_RTOL, num / den
        ratios = _in_band(dl, _plan_gib("full", GRPO_FULL, band_model))
        reports = dl.release()
        assert [m.rank for m in reports] == [0, 1] and [m.pid for m in reports] == dl.pids
        assert all(m.grads_held == 0 and m.free_bytes > 0 for m in reports)
        # Offload on every rank: its AdamW moments and reference shards, back bit for bit.
        out = dl.offload()
        planned = _plan_offloaded_bytes(GRPO_FULL, band_model)
        assert all(0.9 * planned <= moved <= 1.1 * planned for moved, _ in out), (out, planned)
        assert dl.reload() == [d for _, d in out]
    print("full: measured / planned peak per rank", [f"{r:.2f}" for r in ratios])


def test_lora_two_ranks_hold_memory_as_planned(band_model, monkeypatch):
    for k, v in LIVE_MEMORY_ENV.items():
        monkeypatch.setenv(k, v)
    grpo = GrpoConfig(beta=0.0, loss_type="grpo")
    weights = (band_model / "model.safetensors").stat().st_size
    with DistributedLearner(_spec(band_model, "lora", grpo)) as dl:
        shards = _plan_resident_bytes("lora", grpo, band_model)
        excess = [(r.host_build_peak - r.host_rss_before - shards) / weights for r in dl.ready]
        print("lora: build peak beyond own shards, in copies of the weights", [f"{x:.2f}" for x in excess])
        assert all(x < 1.0 for x in excess), excess
        dl.step(_groups(3))
        ratios = _in_band(dl, _plan_gib("lora", grpo, band_model))
        assert all(s.grads_held == 0 for s in dl.last_rank_steps)
    print("lora: measured / planned peak per rank", [f"{r:.2f}" for r in ratios])
