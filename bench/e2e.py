"""End to end by placement mode: the same small run in each mode, and a timing-model
simulation of an 8-GPU workstation.

    python -m bench.e2e [--quick] [--backends hf,vllm] [--out DIR]
    python -m bench.e2e --model-timing-only [--out DIR]

Measured part: `python -m trustee.run configs/cpu-tiny.toml` in each placement mode that the
installed trustee accepts (`sync`, `overlap`, and `colocate` once `placement.mode` offers it;
a mode that does not exist yet is reported as "not available", never approximated), with
the HF engine (and the vLLM CPU build with --backends hf,vllm), the tiny model without SFT
warm-up (throughput only: `grpo.filter_zero_variance = false` so every step trains), each
run in a subprocess with its own run directory under OUT. From the runs' metrics.jsonl:
trained tokens/s (learner tokens of steps 1.. over their wall time; step 0 pays start-up),
rollout and learn phase seconds, the learner's idle fraction (time the loop waited for
episodes), staleness (policy versions a consumed group lagged). `ratios` are each mode's
trained tokens/s over `sync`'s in the same run. On 2 shared CPU cores overlap has little
to gain: engine and learner compete for the same cores.

Simulation (`model_timing` section; always run, it takes seconds): the real training loop
code (`trustee.train.collect` for sync, `trustee.train._train_continuous` with the real
`GroupScheduler` for overlap) and the real `EpisodeRunner`, on a virtual clock (an asyncio
loop whose time jumps to the next timer when nothing is ready, so the orchestrator's own
CPU time counts as zero), with the engines, the simulated environment and the learner
replaced by timing models named as such (`TimingEngine`, `TimingSimEnv`, `TimingLearner`).
Every constant is listed in the JSON with where it comes from; figures derived from
datasheets are labelled as derivations, the rest as assumptions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import heapq
import json
import math
import os
import random
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WANTED_MODES = ("sync", "overlap", "colocate")

# ----------------------------------------------------------------------------- constants

H100 = {
    "hbm_bytes_per_s": 3.35e12,
    "bf16_dense_flops": 989e12,
    "source": "NVIDIA H100 SXM datasheet: 3.35 TB/s HBM3, 989 TFLOPS dense BF16 (not re-checked here)",
}
QWEN3_8B = {
    "params": 8.2e9,
    "layers": 36,
    "kv_heads": 8,
    "head_dim": 128,
    "source": "Qwen3-8B config.json (36 layers, 8 KV heads, head_dim 128, ~8.2B parameters), from memory: ASSUMPTION",
}
ASSUME = {
    "decode_bandwidth_efficiency": (0.6, "ASSUMPTION: share of HBM bandwidth a vLLM decode step achieves"),
    "prefill_mfu": (0.5, "ASSUMPTION: model FLOPs utilisation of prefill"),
    "learner_mfu": (0.4, "ASSUMPTION: model FLOPs utilisation of the learner's forward+backward"),
    "lora_flops_per_param_token": (
        6.0,
        "derivation: forward 2N + activation backward 2N + checkpoint recompute 2N FLOPs per token "
        "(LoRA: no full weight gradients); the 6N rule for full training is Kaplan et al. 2020",
    ),
    "lora_sync_s": (0.5, "ASSUMPTION: load a rank-64 LoRA adapter into vLLM (from disk)"),
    "wake_s": (3.0, "ASSUMPTION: vLLM wake_up after sleep level 1 (weights back from CPU memory)"),
    "sleep_s": (1.0, "ASSUMPTION: vLLM sleep level 1 (weights offloaded to CPU memory)"),
    "colocated_slowdown": (
        0.5,
        "ASSUMPTION: decode rate of the policy replica that shares its GPU with a training learner (overlap)",
    ),
    "tokens_per_turn_median": (
        180,
        "ASSUMPTION: policy tokens per turn (lognormal median; capped by max_tokens_per_turn)",
    ),
    "sim_reply_tokens": (120, "ASSUMPTION: simulator tokens per tool result / user reply"),
    "prompt_tokens": (1500, "ASSUMPTION: system prompt + tools + first query"),
    "turns": ((3, 8), "ASSUMPTION: policy turns per episode, uniform"),
}
ANCHORS = (
    "Published speed-ups of asynchronous over synchronous RL: 2.2x to 2.8x (as given in issue 14; "
    "e.g. AReaL, Fu et al. 2025, reports up to 2.77x). Not re-checked here: no network."
)


def _a(name: str) -> Any:
    return ASSUME[name][0]


def kv_bytes_per_token() -> float:
    m = QWEN3_8B
    return m["layers"] * m["kv_heads"] * m["head_dim"] * 2 * 2  # K and V, bf16


def decode_step_s(batch: int, mean_ctx: float) -> float:
    """One decode step of a replica: read the weights once and every running sequence's KV."""
    bytes_ = QWEN3_8B["params"] * 2 + batch * mean_ctx * kv_bytes_per_token()
    return bytes_ / (H100["hbm_bytes_per_s"] * _a("decode_bandwidth_efficiency"))


def prefill_s(tokens: int) -> float:
    return tokens * 2 * QWEN3_8B["params"] / (H100["bf16_dense_flops"] * _a("prefill_mfu"))


def learner_tok_s(gpus: int) -> float:
    flops = _a("lora_flops_per_param_token") * QWEN3_8B["params"]
    return gpus * H100["bf16_dense_flops"] * _a("learner_mfu") / flops


# ----------------------------------------------------------------------------- virtual clock


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop on a virtual clock: when no callback is ready, time jumps to the next
    timer, so awaited sleeps cost no wall time and CPU work costs no virtual time. Relies on
    CPython's BaseEventLoop internals (`_ready`, `_scheduled`, `_run_once`; Lib/asyncio/
    base_events.py, 3.11). No threads or I/O may be involved."""

    def __init__(self) -> None:
        super().__init__()
        self._virtual = 0.0

    def time(self) -> float:
        return self._virtual

    def _run_once(self) -> None:
        while self._scheduled and self._scheduled[0]._cancelled:
            self._timer_cancelled_count -= 1
            handle = heapq.heappop(self._scheduled)
            handle._scheduled = False
        if not self._ready and self._scheduled:
            self._virtual = max(self._virtual, self._scheduled[0]._when)
        super()._run_once()


# ----------------------------------------------------------------------------- timing models


@dataclass
class TimingEngine:
    """Timing model of a vLLM engine with `replicas` data-parallel replicas (one GPU each):
    a request takes prefill(uncached prompt) + n_out decode steps at the step time of its
    replica's batch when it starts (a simplification: the batch is not re-read each step).
    Returns canned ids: filler tokens, then (for the policy) a tool call or an answer, so the
    real runner decodes and parses them. Test double for timing only."""

    tokenizer: Any
    replicas: int
    rng: random.Random
    final_after: tuple[int, int] = (3, 8)
    version: int = 0
    asleep: bool = False
    slow_replica: int | None = None  # replica sharing its GPU with a training learner
    busy_tokens: int = 0
    _active: list[int] = field(default_factory=list)
    _ctx: list[float] = field(default_factory=list)
    _turn: dict[str, tuple[int, int]] = field(default_factory=dict)
    _cached: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        enc = lambda t: self.tokenizer.encode(t, add_special_tokens=False)  # noqa: E731
        self._call = enc(
            '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>'
        )
        self._final = enc("Done.<|im_end|>")
        self._fill = enc(" the")[0]
        self._active = [0] * self.replicas
        self._ctx = [0.0] * self.replicas

    async def generate(self, prompt: list[int], params: Any, *, key: str | None = None) -> Any:
        import anyio

        from trustee.engines.base import Completion

        assert not self.asleep, "generate() while the engine sleeps"
        r = zlib.crc32((key or "").encode()) % self.replicas  # deterministic routing
        k, last = self._turn.get(key, (0, self.rng.randint(*self.final_after)))
        final = k + 1 >= last
        if final:
            self._turn.pop(key, None)
        else:
            self._turn[key] = (k + 1, last)
        tail = self._final if final else self._call
        n = max(
            len(tail),
            min(params.max_tokens, int(self.rng.lognormvariate(math.log(_a("tokens_per_turn_median")), 0.6))),
        )
        cached = self._cached.get(key, 0) if key else 0
        self._active[r] += 1
        self._ctx[r] += len(prompt)
        try:
            step = decode_step_s(self._active[r], self._ctx[r] / self._active[r])
            if self.slow_replica == r:
                step /= _a("colocated_slowdown")
            await anyio.sleep(prefill_s(len(prompt) - cached) + n * step)
        finally:
            self._active[r] -= 1
            self._ctx[r] -= len(prompt)
        if key:
            self._cached[key] = len(prompt) + n
        self.busy_tokens += n
        ids = [self._fill] * (n - len(tail)) + tail
        return Completion(
            token_ids=ids, logprobs=[-0.5] * len(ids), finish_reason="stop", policy_version=self.version
        )

    async def sleep(self, level: int = 1) -> None:
        import anyio

        await anyio.sleep(_a("sleep_s"))
        self.asleep = True

    async def wake(self) -> None:
        import anyio

        await anyio.sleep(_a("wake_s"))
        self.asleep = False

    async def update_weights(self, update: Any) -> None:
        import anyio

        await anyio.sleep(_a("lora_sync_s"))
        self._cached.clear()
        self.version += 1

    def stats(self) -> Any:
        from trustee.engines.base import EngineStats

        return EngineStats(generated_tokens=self.busy_tokens)

    async def close(self) -> None:
        return None


class TimingSimEnv:
    """Timing model of the simulated environment: every tool call and user reply is one
    simulator generation (`TimingEngine` on the simulator GPUs) of `sim_reply_tokens`."""

    name = "timing-sim"

    def __init__(self, sim: TimingEngine):
        from bench.orchestrator import InstantEnv

        self.sim = sim
        self.inner = InstantEnv()

    async def make_task(self, knobs: Any, rng: random.Random) -> Any:
        return await self.inner.make_task(knobs, rng)

    async def start(self, task: Any, episode_id: str, group: Any = None) -> Any:
        st = await self.inner.start(task, episode_id, group)
        return st

    async def step(self, state: Any, action: Any) -> list[Any]:
        from trustee.engines.base import Sampling

        if action.calls:
            await self.sim.generate(
                [0] * _a("prompt_tokens"),
                Sampling(max_tokens=_a("sim_reply_tokens")),
                key=state.episode_id + "/sim",
            )
        return await self.inner.step(state, action)

    async def score(self, state: Any) -> Any:
        return await self.inner.score(state)


@dataclass
class TimingLearner:
    """Timing model of the learner: a step takes trained tokens / learner_tok_s(gpus)."""

    gpus: int
    step_count: int = 0

    async def step(self, tokens: int) -> float:
        import anyio

        t = tokens / learner_tok_s(self.gpus)
        await anyio.sleep(t)
        self.step_count += 1
        return t


class SimRun:
    """What `trustee.train`'s loop bodies read from a run, with timing models inside: the
    real `collect` / `_train_continuous` call `step` after each batch of groups."""

    def __init__(
        self, cfg: Any, engine: TimingEngine, env: Any, runner: Any, learner: TimingLearner, shares: bool
    ):
        from trustee.curriculum import Curriculum

        self.cfg, self.policy_engine, self.env, self.runner, self.learner = cfg, engine, env, runner, learner
        self.curriculum = Curriculum(cfg.curriculum)
        self.rng = random.Random(0)
        self.start = 0
        self.shares = shares
        self.placement = SimPlacement()
        self.records: list[dict[str, float]] = []

    async def step(
        self, step: int, groups: list, knobs: list, t_roll: float, extra: dict | None = None
    ) -> dict:
        import anyio

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tokens = sum(len(t.tokens) for g in groups for t in g.trajectories)
        if self.shares:
            await self.policy_engine.sleep(1)
        else:
            self.policy_engine.slow_replica = 0
        learn = await self.learner.step(tokens)
        if self.shares:
            await self.policy_engine.wake()
        else:
            self.policy_engine.slow_replica = None
        await self.policy_engine.update_weights(None)
        await anyio.lowlevel.checkpoint()
        rec = {
            "step": step,
            "tokens": tokens,
            "rollout_s": t_roll,
            "learn_s": learn,
            "step_end": loop.time(),
            "learn_phase_s": loop.time() - t0,
        }
        rec.update(extra or {})
        self.records.append(rec)
        return rec


class SimGuard:
    """Test double for `interrupt.StopGuard` on the virtual clock: never stops, runs each
    step's trained-state part shielded as the real guard does, snapshots nothing (there is no
    checkpoint to resume in a simulation)."""

    stopping = False

    @contextlib.contextmanager
    def collecting(self) -> Iterator[Any]:
        import anyio

        with anyio.CancelScope() as scope:
            yield scope

    async def run_step(self, fn: Any, step: int, *args: Any, **kw: Any) -> Any:
        import anyio

        with anyio.CancelScope(shield=True):
            return await fn(step, *args, **kw)


class SimPlacement:
    """Test double for the placement object's `running(tg)` (the continuous loop's hook for
    background pushes, which the timing models do inside `SimRun.step`)."""

    @contextlib.asynccontextmanager
    async def running(self, tg: Any) -> AsyncIterator[SimPlacement]:
        yield self


def simulate(mode: str, steps: int, tok: Any) -> dict[str, Any]:
    """One mode on the virtual clock: the real loop code with timing models."""
    from trustee.chat.render import project_template
    from trustee.config import Config
    from trustee.rollout.episode import EpisodeRunner
    from trustee.train import _train_continuous, collect

    cfg = Config()  # defaults: 16 tasks x 8 episodes per step, max_staleness 1, 256 in flight
    cfg = _with(cfg, placement={"mode": mode if mode != "overlap" else "overlap"})
    rng = random.Random(1)
    policy = TimingEngine(tok, replicas=4, rng=rng, final_after=_a("turns"))
    sim = TimingEngine(tok, replicas=4, rng=random.Random(2))
    env = TimingSimEnv(sim)
    runner = EpisodeRunner(
        policy, tok, cfg=cfg.rollout, max_model_len=cfg.model.max_model_len, template=project_template()
    )
    run = SimRun(cfg, policy, env, runner, TimingLearner(gpus=1), shares=mode == "sync")

    async def main() -> None:
        if mode == "sync":
            for step in range(steps):
                t0 = asyncio.get_running_loop().time()
                extra: dict[str, float] = {}
                groups, knobs = await collect(env, runner, run.curriculum, cfg, run.rng, step, extra)
                await run.step(step, groups, knobs, asyncio.get_running_loop().time() - t0, extra)
        else:
            cfg2 = _with(cfg, grpo={"steps": steps})
            run.cfg = cfg2
            await _train_continuous(run, SimGuard())

    import anyio

    w0 = time.perf_counter()
    anyio.run(main, backend_options={"loop_factory": VirtualTimeLoop})
    recs = run.records
    span = recs[-1]["step_end"] - recs[0]["step_end"]  # steps 1.. (step 0 has no overlap yet)
    tokens = sum(r["tokens"] for r in recs[1:])
    learn = sum(r["learn_s"] for r in recs[1:])
    return dict(
        mode=mode,
        steps=steps,
        simulated_s=round(recs[-1]["step_end"], 1),
        trained_tokens_per_s=round(tokens / span, 1),
        step_s=round(span / (len(recs) - 1), 1),
        rollout_wait_s_mean=round(sum(r["rollout_s"] for r in recs[1:]) / (len(recs) - 1), 1),
        learn_s_mean=round(learn / (len(recs) - 1), 1),
        learner_idle_frac=round(1 - learn / span, 3),
        staleness_mean=round(sum(r.get("sched/lag_mean", 0.0) for r in recs[1:]) / (len(recs) - 1), 2),
        wall_s=round(time.perf_counter() - w0, 1),
    )


def _with(cfg: Any, **sections: dict) -> Any:
    import msgspec

    return msgspec.structs.replace(
        cfg, **{k: msgspec.structs.replace(getattr(cfg, k), **v) for k, v in sections.items()}
    )


def model_timing(tok: Any, steps: int) -> dict[str, Any]:
    rows = {}
    for mode in WANTED_MODES:
        if mode not in available_modes():
            rows[mode] = {"mode": mode, "status": "not available: placement.mode does not accept it yet"}
            continue
        if mode == "colocate":
            rows[mode] = {
                "mode": mode,
                "status": "available in config but not simulated by this benchmark yet",
            }
            continue
        rows[mode] = simulate(mode, steps, tok)
        print(
            f"  model-timing {mode}: {rows[mode]['trained_tokens_per_s']:.0f} trained tok/s (virtual), step {rows[mode]['step_s']} s",
            flush=True,
        )
    base = rows["sync"]["trained_tokens_per_s"]
    ratios = {
        m: round(r["trained_tokens_per_s"] / base, 2) for m, r in rows.items() if "trained_tokens_per_s" in r
    }
    return dict(
        what="SIMULATION with timing models (not a measurement): real trustee loop, scheduler and runner code on a virtual clock",
        layout="policy: 4 replicas (GPUs 0-3); simulator: 4 replicas (GPUs 4-7); LoRA learner on GPU 0 (configs/8gpu.toml)",
        constants=dict(
            h100=H100,
            model=QWEN3_8B,
            assumptions={k: {"value": v, "source": s} for k, (v, s) in ASSUME.items()},
        ),
        derived=dict(
            decode_step_s_batch64_ctx4k=round(decode_step_s(64, 4096), 4),
            prefill_s_per_1k_tokens=round(prefill_s(1000), 4),
            learner_tok_s_1gpu=round(learner_tok_s(1), 1),
        ),
        anchors=ANCHORS,
        results=list(rows.values()),
        ratios=ratios,
    )


# ----------------------------------------------------------------------------- measured runs


def available_modes() -> list[str]:
    import msgspec

    from trustee.config import PlacementConfig

    out = []
    for m in WANTED_MODES:
        try:
            msgspec.convert({"mode": m}, PlacementConfig)
            out.append(m)
        except msgspec.ValidationError:
            pass
    return out


def measured_run(mode: str, backend: str, steps: int, out: Path) -> dict[str, Any]:
    """One `trustee.run` in a fresh temporary run directory (an existing one would resume),
    removed after its metrics are read, so nothing but the report lands under OUT."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f"bench-e2e-{backend}-{mode}-"))
    try:
        return _measured_run(mode, backend, steps, tmp / "run")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _measured_run(mode: str, backend: str, steps: int, run_dir: Path) -> dict[str, Any]:
    cmd = [
        sys.executable, "-m", "trustee.run", str(ROOT / "configs" / "cpu-tiny.toml"),
        "--set", f"placement.mode={mode}",
        "--set", f"engines.policy.backend={backend}",
        "--set", f"grpo.steps={steps}",
        "--set", "grpo.tasks_per_step=4",
        "--set", "grpo.group_size=4",
        "--set", "grpo.filter_zero_variance=false",
        "--set", "model.path=.cache/models/tiny-e2e",
        "--set", "model.tiny_sft_steps=0",
        "--set", "checkpoint.every_steps=0",
        "--set", "logging.progress_bar=false",
        "--set", "logging.trajectories=none",
        "--out", str(run_dir),
    ]  # fmt: skip
    load0 = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return dict(
            mode=mode, backend=backend, status=f"failed (rc {done.returncode})", stderr=done.stderr[-2000:]
        )
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    recs = [r for r in recs if "step" in r and "time/rollout_s" in r]
    later = recs[1:]
    span = recs[-1]["elapsed_s"] - recs[0]["elapsed_s"]
    tokens = sum(r.get("learn/tokens", 0) for r in later)
    learn = sum(r.get("time/learn_s", 0.0) for r in later)
    roll = sum(r.get("time/rollout_s", 0.0) for r in later)
    return dict(
        mode=mode,
        backend=backend,
        status="ok",
        steps=len(recs),
        wall_s=round(wall, 1),
        trained_tokens_per_s=round(tokens / span, 1) if span > 0 else None,
        rollout_s_mean=round(roll / len(later), 2),
        learn_s_mean=round(learn / len(later), 2),
        learner_idle_frac=round(roll / span, 3) if span > 0 else None,
        staleness_mean=round(sum(r.get("sched/lag_mean", 0.0) for r in later) / len(later), 2),
        load_avg_before=load0,
        load_avg_after=[round(x, 2) for x in os.getloadavg()],
    )


def markdown(rep: dict[str, Any]) -> str:
    lines = [
        "# End to end by placement mode",
        "",
        f"`{rep['command']}`; load average before {rep['load_avg_before']}, after {rep['machine']['load_avg_1_5_15']} "
        f"(shared 2-core machine). Modes the installed trustee accepts: {rep['available_modes']}.",
        "",
        "## Measured on CPU (tiny model, HF engine unless noted)",
        "",
        "| backend | mode | status | trained tok/s | rollout s/step | learn s/step | learner idle | staleness | vs sync |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rep["measured"]:
        if r.get("status") != "ok":
            lines.append(f"| {r.get('backend', '-')} | {r['mode']} | {r['status']} | | | | | | |")
            continue
        ratio = rep["ratios"].get(f"{r['backend']}/{r['mode']}")
        lines.append(
            f"| {r['backend']} | {r['mode']} | ok | {r['trained_tokens_per_s']} | {r['rollout_s_mean']} | {r['learn_s_mean']} | "
            f"{r['learner_idle_frac']:.0%} | {r['staleness_mean']} | {ratio if ratio is not None else '-'} |"
        )
    if not rep["measured"]:
        lines.append("| - | - | not run in this invocation (--model-timing-only) | | | | | | |")
    mt = rep["model_timing"]
    lines += [
        "",
        "## Model-timing SIMULATION (8 GPUs; timing models, not measurements)",
        "",
        f"{mt['layout']}. Constants and their sources are in the JSON (`model_timing.constants`). {mt['anchors']}",
        "",
        "| mode | trained tok/s (virtual) | step s | learn s | learner idle | staleness | vs sync |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in mt["results"]:
        if "trained_tokens_per_s" not in r:
            lines.append(f"| {r['mode']} | {r['status']} | | | | | |")
            continue
        lines.append(
            f"| {r['mode']} | {r['trained_tokens_per_s']:.0f} | {r['step_s']} | {r['learn_s_mean']} | "
            f"{r['learner_idle_frac']:.0%} | {r['staleness_mean']} | {mt['ratios'][r['mode']]} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from bench.common import add_out_arg, load_avg, machine, plot_bars, write_report

    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick", action="store_true", help="3 steps per measured run (default 5), sim 6 steps (default 12)"
    )
    ap.add_argument(
        "--backends", default="hf", help="engines for the measured runs: hf and/or vllm (comma-separated)"
    )
    ap.add_argument("--model-timing-only", action="store_true", help="only the 8-GPU timing-model simulation")
    add_out_arg(ap)
    a = ap.parse_args(argv)
    out = Path(a.out)
    before = load_avg()
    from transformers import AutoTokenizer

    from trustee.models.tiny import build_tiny_model

    tok = AutoTokenizer.from_pretrained(build_tiny_model(ROOT / ".cache" / "tiny-test", size="test", seed=0))
    modes = available_modes()
    measured: list[dict[str, Any]] = []
    if not a.model_timing_only:
        for backend in a.backends.split(","):
            if backend == "vllm":
                try:
                    import vllm  # noqa: F401
                except ImportError as e:
                    measured.append(dict(mode="-", backend="vllm", status=f"not available: {e}"))
                    continue
            for mode in WANTED_MODES:
                if mode not in modes:
                    measured.append(
                        dict(
                            mode=mode,
                            backend=backend,
                            status="not available: placement.mode does not accept it yet",
                        )
                    )
                    continue
                r = measured_run(mode, backend, 3 if a.quick else 5, out)
                print(
                    f"  {backend} {mode}: {r.get('status')} {r.get('trained_tokens_per_s')} trained tok/s",
                    flush=True,
                )
                measured.append(r)
    ratios: dict[str, float] = {}
    for r in measured:
        base = next(
            (
                x
                for x in measured
                if x.get("backend") == r.get("backend") and x["mode"] == "sync" and x.get("status") == "ok"
            ),
            None,
        )
        if r.get("status") == "ok" and base and base["trained_tokens_per_s"]:
            ratios[f"{r['backend']}/{r['mode']}"] = round(
                r["trained_tokens_per_s"] / base["trained_tokens_per_s"], 3
            )
    mt = model_timing(tok, 6 if a.quick else 12)
    rep = dict(
        bench="e2e",
        command="python -m bench.e2e"
        + (" --quick" if a.quick else "")
        + (f" --backends {a.backends}" if a.backends != "hf" else ""),
        machine=machine(),
        load_avg_before=before,
        available_modes=modes,
        measured=measured,
        ratios=ratios,
        model_timing=mt,
    )
    path = write_report(out, "e2e", rep, markdown(rep))
    sims = [r for r in mt["results"] if "trained_tokens_per_s" in r]
    why = plot_bars(
        path.with_suffix(".png"),
        [r["mode"] for r in sims],
        [r["trained_tokens_per_s"] for r in sims],
        title="8-GPU timing-model simulation: trained tokens/s by placement",
        ylabel="trained tokens / s (virtual clock)",
    )
    if why:
        print(why)
    print(markdown(rep))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
