"""Placement: the refused plans, the memory plan, and each mode's choreography around learning.

The choreography is checked against named fakes (`FakeEngine`, `FakeMemory`) that record every
call in one shared log, so the order (sleep, learn, free the learner's cache, wake, push) is what
is asserted; the real engines run it in test_train.py (HF) and test_cpu_vllm.py (vLLM CPU)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from trustee import memory
from trustee import placement as pl
from trustee.config import ConfigError, load_config, resolve
from trustee.engines.base import EngineStats

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- fakes


class FakeEngine:
    """Records sleep / wake / update_weights into a shared log; stats are set by the test."""

    def __init__(self, role: str, calls: list[str]):
        self.role, self.calls = role, calls
        self.version = 0
        self.asleep = 0
        self.counters = EngineStats()
        self.push_gate: anyio.Event | None = None

    async def sleep(self, level: int = 1) -> None:
        self.calls.append(f"sleep {self.role} {level}")
        self.asleep = level

    async def wake(self) -> None:
        self.calls.append(f"wake {self.role}")
        self.asleep = 0

    async def update_weights(self, update) -> None:
        assert not self.asleep, "update while asleep"
        if self.push_gate is not None:
            await self.push_gate.wait()
        self.calls.append(f"push {self.role} {update}")
        self.version += 1

    def stats(self) -> EngineStats:
        return self.counters

    async def close(self) -> None:
        self.calls.append(f"close {self.role}")


class FakeMemory:
    """The learner's device: records when its cache is released."""

    on_device = False

    def __init__(self, calls: list[str], free_gib: float = 10.0):
        self.calls, self.free = calls, free_gib

    def release(self) -> None:
        self.calls.append("release learner cache")

    def offload(self) -> None:
        self.calls.append("offload learner state")

    def reload(self) -> None:
        self.calls.append("reload learner state")

    def free_bytes(self) -> int:
        return int(self.free * 2**30)


def _placement(overrides, calls, monkeypatch, roles=("policy", "simulator")):
    cfg = load_config(
        None, ["environment.kind=simulated", "engines.simulator.enable_sleep_mode=true", *overrides]
    )
    res = resolve(cfg, "runs/x")
    monkeypatch.setattr(pl, "weight_update", lambda learner, *_: f"v{learner}")
    engines = {r: FakeEngine(r, calls) for r in roles}
    return pl.MODES[cfg.placement.mode](cfg, res, engines, FakeMemory(calls)), engines


def _learn_once(p, calls, learner="1"):
    async def go():
        await p.before_learn()
        calls.append("learn")
        await p.after_learn(learner)

    anyio.run(go)


# ----------------------------------------------------------------------------- modes


def test_colocate_lora_sleeps_both_at_level_1_and_frees_the_learner_cache_before_waking(monkeypatch):
    calls: list[str] = []
    p, engines = _placement(["placement.mode=colocate"], calls, monkeypatch)
    _learn_once(p, calls)
    assert calls == [
        "sleep policy 1",
        "sleep simulator 1",
        "learn",
        "release learner cache",
        "wake simulator",
        "wake policy",
        "push policy v1",
    ]
    m = p.step_metrics()
    for k in ("time/sleep_s", "time/wake_s", "time/sync_s", "time/sleep_simulator_s", "time/wake_policy_s"):
        assert k in m and m[k] >= 0.0
    assert m["memory/free_at_wake_gib"] == pytest.approx(10.0)
    assert m["engine/policy/version"] == 1.0 and engines["simulator"].version == 0


def test_colocate_offload_moves_the_learner_state_out_before_the_wake_and_back_after_sleep(monkeypatch):
    calls: list[str] = []
    p, _ = _placement(
        ["placement.mode=colocate", "learner.mode=full", "learner.offload=true"], calls, monkeypatch
    )
    _learn_once(p, calls)
    _learn_once(p, calls, "2")
    step = [
        "sleep policy 2",
        "sleep simulator 1",
        "reload learner state",
        "learn",
        "offload learner state",
        "release learner cache",
        "wake simulator",
        "wake policy",
    ]
    assert calls == [*step, "push policy v1", *step, "push policy v2"]
    # The plan moves the same items: the rollout phase holds no AdamW moments or reference.
    cfg = load_config(ROOT / "configs" / "8gpu.toml", ["learner.offload=true"])
    plan = memory.memory_plan(cfg, resolve(cfg, "runs/x"))
    gpu, host = plan.devices[0], plan.devices[-1]
    assert not [i for i in gpu.rollout if i.what.startswith(memory.OFFLOADED)]
    assert len([i for i in host.rollout if i.what.endswith("(offloaded)")]) == 2 * 8
    assert [i.what for i in gpu.learning if i.what.startswith(memory.OFFLOADED)]


def test_colocate_full_update_drops_the_policy_weights_but_keeps_the_simulators(monkeypatch):
    calls: list[str] = []
    p, _ = _placement(["placement.mode=colocate", "learner.mode=full"], calls, monkeypatch)
    _learn_once(p, calls)
    assert calls[:2] == ["sleep policy 2", "sleep simulator 1"]


def test_sync_keeps_engines_awake_and_pushes(monkeypatch):
    calls: list[str] = []
    p, _ = _placement(["placement.mode=sync"], calls, monkeypatch)
    _learn_once(p, calls)
    assert calls == ["learn", "push policy v1"]
    assert not p.continuous


def test_overlap_is_continuous_and_never_sleeps(monkeypatch):
    calls: list[str] = []
    p, _ = _placement(["placement.mode=overlap"], calls, monkeypatch)
    _learn_once(p, calls)
    assert calls == ["learn", "push policy v1"] and p.continuous


def test_split_pushes_in_the_background_and_waits_only_before_the_next_update(monkeypatch):
    calls: list[str] = []
    p, engines = _placement(
        ["placement.mode=split", "placement.policy_gpus=[0]", "placement.learner_gpus=[1]"],
        calls,
        monkeypatch,
        roles=("policy",),
    )
    engines["policy"].push_gate = gate = anyio.Event()

    async def go():
        async with anyio.create_task_group() as tg:
            p._tg = tg
            await p.after_learn("1")  # returns while the push is held at the gate
            calls.append("collect next step")
            assert engines["policy"].version == 0
            with anyio.move_on_after(0.2) as scope:
                await p.before_learn()  # the learner waits for the push in flight
            assert scope.cancelled_caught
            gate.set()
            await p.before_learn()
            calls.append("learn")

    anyio.run(go)
    assert calls == ["collect next step", "push policy v1", "learn"]
    assert "time/sync_wait_s" in p.step_metrics()


def test_step_metrics_report_each_steps_prefix_hit_rate_from_engine_counters(monkeypatch):
    calls: list[str] = []
    p, engines = _placement(["placement.mode=sync"], calls, monkeypatch)
    engines["simulator"].counters = EngineStats(prefix_queries=100, prefix_hits=25, requests=4)
    assert p.step_metrics()["engine/simulator/prefix_hit_rate"] == 0.25
    engines["simulator"].counters = EngineStats(prefix_queries=300, prefix_hits=225, requests=10)
    m = p.step_metrics()
    assert m["engine/simulator/prefix_hit_rate"] == 1.0  # (225 - 25) / (300 - 100): this step only
    assert m["engine/simulator/requests"] == 6.0


def test_release_goes_through_the_learner_in_its_own_processes(monkeypatch):
    """The orchestrator's own empty_cache frees nothing in a rank; the choreography releases
    through the learner (every rank: tests/test_memory_model.py), and refuses a wake that the
    measured free memory cannot hold."""
    from trustee.learn.fsdp_rank import RankMemory

    calls: list[str] = []

    class RanksDouble:  # test double of DistributedLearner.release (the real one: test_memory_model.py)
        free = 40.0

        def release(self):
            calls.append("release ranks")
            return [
                RankMemory(rank=r, pid=r, grads_held=0, free_bytes=int(self.free * 2**30), held_bytes=0)
                for r in range(2)
            ]

    p, _ = _placement(["placement.mode=colocate"], calls, monkeypatch)
    ranks = RanksDouble()
    p.memory = pl.LearnerMemory(ranks, on_device=True)
    p.budgets = {"policy": 20.0, "simulator": 10.0}
    anyio.run(p.before_learn)
    anyio.run(p.wake)
    assert calls[-3:] == ["release ranks", "wake simulator", "wake policy"]
    assert p.step_metrics()["memory/free_at_wake_gib"] == 40.0
    anyio.run(p.before_learn)
    ranks.free = 25.0  # less than the two engines' 30 GiB: refused before any wake, with the figures
    with pytest.raises(pl.MemoryRefused, match="25.00 GiB free but the next phase needs 30.00 GiB"):
        anyio.run(p.wake)
    assert calls[-1] == "release ranks"


# ----------------------------------------------------------------------------- refused plans


@pytest.mark.parametrize(
    ("overrides", "path", "words"),
    [
        (
            ["engines.policy.tensor_parallel_size=2"],
            "engines.policy.tensor_parallel_size",
            "backend 'hf' cannot",
        ),
        (["engines.policy.kv_cache_gib=2"], "engines.policy.kv_cache_gib", "cannot honour"),
        (
            [
                "environment.kind=simulated",
                "engines.simulator.backend=openai",
                "engines.simulator.base_url='http://x/v1'",
                "engines.simulator.tensor_parallel_size=2",
            ],
            "engines.simulator.tensor_parallel_size",
            "backend 'openai'",
        ),
        (
            ["environment.kind=simulated", "placement.mode=colocate"],
            "engines.simulator.enable_sleep_mode",
            "must sleep",
        ),
        (["placement.mode=split"], "placement.learner_gpus", "no engine uses"),
        (
            [
                "engines.policy.backend=vllm",
                "placement.mode=sync",
                "placement.policy_gpus=[0]",
                "placement.learner_gpus=[0]",
            ],
            "placement.learner_gpus",
            "out of memory",
        ),
        (
            [
                "engines.policy.backend=vllm",
                "placement.mode=colocate",
                "placement.policy_gpus=[0]",
                "placement.learner_gpus=[1]",
            ],
            "placement.learner_gpus",
            "run no engine",
        ),
        (
            [
                "environment.kind=simulated",
                "engines.policy.backend=vllm",
                "engines.simulator.backend=vllm",
                "placement.policy_gpus=[0]",
                "placement.simulator_gpus=[0]",
                "placement.learner_gpus=[1]",
                "placement.mode=split",
                "engines.policy.gpu_memory_utilization=0.6",
                "engines.simulator.gpu_memory_utilization=0.5",
            ],
            "engines.simulator.gpu_memory_utilization",
            "1.10 > 1",
        ),
    ],
)
def test_impossible_plans_are_refused_with_the_field_and_a_fix(overrides, path, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    hits = [p for p in e.value.problems if p.path == path]
    assert hits, e.value
    assert words in hits[0].message


def test_the_weight_push_peak_is_in_the_rollout_phase():
    """A full learner's push to the awake engines: one gathered weight in the export dtype and,
    on the shared route, its bucket and the worker's copy (Qwen3-8B: the bf16 embedding, 1.16
    GiB each); on the bytes route the worker's copy of a chunk; nothing for LoRA."""

    def push(overrides):
        cfg = load_config(ROOT / "configs" / "8gpu.toml", overrides)
        plan = memory.memory_plan(cfg, resolve(cfg, "runs/x"))
        gpu = plan.devices[0]
        assert not [i for i in gpu.learning if i.what.startswith("weight push")]
        return {i.what: round(i.gib, 2) for i in gpu.rollout if i.what.startswith("weight push")}

    emb = 151936 * 4096 * 2 / 2**30
    shared = push([])
    assert list(shared.values()) == [round(emb, 2)] * 3 and "weight push: its bucket" in shared
    by_bytes = push(["learner.weight_transport=bytes"])
    assert list(by_bytes) == [
        "weight push: one gathered weight (bfloat16)",
        "weight push: the engine worker's copy of a chunk",
    ]
    assert sum(by_bytes.values()) < sum(shared.values())
    assert push(["learner.mode=lora", "engines.policy.max_lora_rank=16"]) == {}  # an adapter of a few MB


def test_every_shipped_config_has_a_plan_that_fits():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        cfg = load_config(path)
        plan = memory.memory_plan(cfg, resolve(cfg, "runs/x"))
        assert memory.check_memory(plan) == [], path.name  # every GPU phase leaves 5% free


def _dry(*args):
    return subprocess.run(
        [sys.executable, "-m", "trustee.run", *args, "--dry-run"], capture_output=True, text=True, cwd=ROOT
    )


def test_dry_run_prints_the_plan_per_phase_with_the_budget_in_the_config_comment():
    for name, cap, figures in (
        ("8gpu.toml", 79, ("74.30", "45.54")),
        ("1gpu-qlora.toml", 23.5, ("19.56", "10.66")),
        ("1gpu-trustee.toml", 23.5, ("19.56", "10.66")),
    ):
        r = _dry(f"configs/{name}")
        assert r.returncode == 0, r.stderr
        rows = [x for x in r.stdout.splitlines() if x.strip().startswith(("GPU", "host"))]
        assert any(" rollout " in x for x in rows) and any(" learning " in x for x in rows)
        totals = [
            float(x.split()[x.split().index(ph) + 1])
            for x in rows
            if "GPU" in x
            for ph in ("rollout", "learning")
            if f" {ph} " in x
        ]
        assert totals and max(totals) < cap
        comment = (ROOT / "configs" / name).read_text().split("\nname =")[0]
        for f in figures:  # the opening comment carries the same budget the plan computes
            assert f in r.stdout and f"{float(f):.1f}" in comment, (name, f)


def test_dry_run_refuses_a_full_8b_learner_on_one_shared_gpu():
    r = _dry("configs/8gpu.toml", "--set", "placement.learner_gpus=[4]")
    assert r.returncode == 2 and "placement.learner_ranks = 8" in r.stderr  # 8 ranks cannot share one GPU
    r = _dry("configs/8gpu.toml", "--set", "placement.learner_gpus=[4]", "--set", "placement.learner_ranks=1")
    assert r.returncode == 2
    assert (
        "GPU 4" in r.stderr and "placement.gpu_memory_gib = 79.0" in r.stderr and "Traceback" not in r.stderr
    )


def test_learner_ranks_come_from_the_config():
    cfg = load_config(ROOT / "configs" / "8gpu.toml")
    assert memory.learner_ranks(cfg) == 8
    one = load_config(
        ROOT / "configs" / "8gpu.toml", ["placement.learner_gpus=[0, 1]", "placement.learner_ranks=2"]
    )
    # A quarter of the ranks: each holds four times the shard.
    shape = memory.KNOWN_SHAPES["Qwen3-8B"]
    w8 = memory.learner_items(cfg, shape, "bfloat16", on_gpu=True).resident[0].gib
    w2 = memory.learner_items(one, shape, "bfloat16", on_gpu=True).resident[0].gib
    assert w2 == pytest.approx(4 * w8)
    assert shape.params == pytest.approx(8.19e9, rel=0.01)
    assert memory.KNOWN_SHAPES["Qwen3-4B"].params == pytest.approx(4.02e9, rel=0.01)


def test_train_loop_has_no_placement_or_update_kind_branches():
    import re

    src = (ROOT / "trustee" / "train.py").read_text()
    for needle in (
        r"placement\.mode\b",
        r"learner\.mode\b",
        r"policy\.mode\b",
        '"lora"',
        '"full"',
        r"sleep\(",
        r"wake\(",
    ):
        assert not re.search(needle, src), needle
    # The loop's shape comes from the mode object too: collect-then-train or continuous.
    assert (
        "placement.before_learn()" in src
        and "placement.after_learn(" in src
        and "placement.continuous" in src
    )
