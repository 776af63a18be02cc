"""How much of the simulator's prompt tokens a prefix cache serves, per role.

    python -m bench.prefix [--engine fake|hf|vllm] [--tasks 16] [--group 8] [--model DIR]

Runs tasks x group simulated episodes (default 16 x 8 = 128) and reports, per role (task
generator, user, tool, judge) and overall:

- `engine_hit_rate` (`--engine vllm` only): measured by vLLM itself. Overall from the
  engine's prefix-cache counters (`scheduler_stats.prefix_cache_stats` queries / hits, in
  tokens, summed by trustee's stat logger: `EngineStats.prefix_queries/prefix_hits`); per
  role from each request's `num_cached_tokens` (`Completion.prompt_cached_tokens`).
- `token_prefix`: each prompt's longest token prefix already seen in an earlier prompt or
  output of the run (what an ideal, unbounded prefix cache keyed on single tokens reuses).
- `block_model`: the same with vLLM's rule that only full blocks of `--block-size` tokens are
  cached (`sim/metrics.py` `BlockPrefixMeter`; the figure training logs as
  `sim/prefix_share_est`).
- `same_group`: `token_prefix` counting only sequences of the same GRPO group.

The policy is a scripted double (`ScriptedToolPolicy`): each episode makes the task's
expected calls (a different subset per episode, so the tool memo is exercised), asks the
user one question, then answers. The simulator is `FakeJsonEngine` (schema-valid random JSON,
fast), the HF engine or vLLM on the tiny random-weight model (slow on CPU; the prompt
layout, not the model, decides the figure). Writes bench/results/prefix[-ENGINE].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trustee.config import CurriculumConfig, RolloutConfig  # noqa: E402
from trustee.curriculum import Curriculum  # noqa: E402
from trustee.engines.base import Completion  # noqa: E402
from trustee.envs.simulated import SimulatedEnv  # noqa: E402
from trustee.rollout.episode import EpisodeRunner, run_group  # noqa: E402
from trustee.sim.client import SimClient  # noqa: E402
from trustee.sim.fakes import FakeJsonEngine  # noqa: E402
from trustee.sim.metrics import BlockPrefixMeter  # noqa: E402


class PrefixRecorder:
    """Collects every simulator request and computes the reuse figures per role."""

    def __init__(self, block: int) -> None:
        self.token = BlockPrefixMeter(block=1)
        self.block = BlockPrefixMeter(block=block)
        self.groups: dict[str, BlockPrefixMeter] = defaultdict(lambda: BlockPrefixMeter(block=1))
        self.same_group: dict[str, int] = defaultdict(int)
        self.prompts: dict[str, int] = defaultdict(int)
        self.cached: dict[str, int] = defaultdict(int)

    def __call__(self, role: str, key: str, ids: list[int], out: Completion) -> None:
        output = list(out.token_ids)
        self.token.record(role, ids, output)
        self.block.record(role, ids, output)
        self.same_group[role] += self.groups[key].record(role, ids, output)
        self.prompts[role] += 1
        self.cached[role] += out.prompt_cached_tokens or 0

    def table(self, engine_measured: bool) -> dict[str, dict[str, float]]:
        rows = {}
        for role in sorted(self.prompts) + ["overall"]:
            r = None if role == "overall" else role
            tokens = self.token.queries.get(role, 0) if r else sum(self.token.queries.values())
            cached = self.cached.get(role, 0) if r else sum(self.cached.values())
            same = self.same_group.get(role, 0) if r else sum(self.same_group.values())
            row = {
                "prompts": self.prompts.get(role, 0) if r else sum(self.prompts.values()),
                "tokens": tokens,
                "token_prefix": self.token.rate(r),
                "block_model": self.block.rate(r),
                "same_group": same / tokens if tokens else 0.0,
            }
            if engine_measured:
                row["engine_hit_rate"] = cached / tokens if tokens else 0.0
            rows[role] = row
        return rows


class ScriptedToolPolicy:
    """Policy double for the benchmark: per episode, the expected calls (a subset chosen by
    the episode index), then a question to the user, then an answer."""

    version = 0

    def __init__(self, tokenizer, tasks):
        self.tok, self.tasks = tokenizer, tasks
        self.turn: dict[str, int] = {}

    def _script(self, key: str) -> list[str]:
        task_id, idx = key.rsplit("/", 1)
        calls = self.tasks[task_id].expected_calls
        keep = [c for j, c in enumerate(calls) if (int(idx) >> j) & 1 == 0] or calls[:1]
        text = "\n".join(
            "<tool_call>\n" + json.dumps({"name": c.name, "arguments": c.arguments}) + "\n</tool_call>"
            for c in keep
        )
        return [text, "Could you confirm the details, please?", "All done: here is the result."]

    async def generate(self, prompt, params, *, key=None):
        i = self.turn.get(key, 0)
        self.turn[key] = i + 1
        script = self._script(key)
        ids = self.tok.encode(script[min(i, len(script) - 1)], add_special_tokens=False)
        ids.append(self.tok.convert_tokens_to_ids("<|im_end|>"))
        return Completion(token_ids=ids, logprobs=[0.0] * len(ids), finish_reason="stop", policy_version=0)


def _engine(args, model: Path, tok):
    if args.engine == "hf":
        from trustee.engines.hf import HFEngine

        return HFEngine.from_pretrained(model, max_batch=64, seed=1)
    if args.engine == "vllm":
        from trustee.engines.vllm import VLLMEngine

        return VLLMEngine.from_pretrained(
            model,
            max_model_len=args.max_model_len,
            max_num_seqs=64,
            kv_cache_gib=args.kv_cache_gib,
            enable_sleep_mode=False,
            block_size=args.block_size,
            seed=1,
        )
    return FakeJsonEngine(tok, seed=0)


async def run(args) -> dict:
    from transformers import AutoTokenizer

    from trustee.models.tiny import build_tiny_model

    model = Path(args.model) if args.model else build_tiny_model(ROOT / ".cache" / "tiny-test", size="test")
    tok = AutoTokenizer.from_pretrained(model)
    sim = await anyio.to_thread.run_sync(_engine, args, model, tok)
    rec = PrefixRecorder(args.block_size)
    client = SimClient(sim, tok, max_tokens=512, recorder=rec, max_model_len=args.max_model_len)
    env = SimulatedEnv(client, max_user_turns=2, task_max_tokens=3072)
    cur = Curriculum(CurriculumConfig(start_difficulty=args.difficulty))
    tasks = {}
    policy = ScriptedToolPolicy(tok, tasks)
    runner = EpisodeRunner(policy, tok, cfg=RolloutConfig(max_turns=4), max_model_len=args.max_model_len)
    statuses: dict[str, int] = defaultdict(int)
    failed: list[str] = []
    rng = random.Random(args.seed)

    async def one(i: int) -> None:
        knobs = cur.sample(rng)
        for attempt in range(3):
            try:
                task = await env.make_task(knobs, random.Random(args.seed * 1000 + i * 10 + attempt))
                break
            except Exception as e:  # noqa: BLE001 - counted and reported
                failed.append(f"{type(e).__name__}: {e}"[:300])
        else:
            return
        tasks[task.id] = task
        for t in await run_group(env, task, args.group, runner):
            statuses[t.status] += 1

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(args.tasks):
            tg.start_soon(one, i)
    wall = time.perf_counter() - t0
    es = sim.stats()
    engine_hit_rate = es.prefix_hits / es.prefix_queries if es.prefix_queries else None
    if args.engine != "fake":
        await sim.close()
    st = client.stats
    return {
        "roles": rec.table(args.engine == "vllm"),
        "engine_hit_rate": engine_hit_rate,
        "engine_prefix_queries": es.prefix_queries,
        "engine_prefix_hits": es.prefix_hits,
        "episodes": dict(statuses),
        "tasks_failed": failed,
        "wall_s": wall,
        "load_avg": os.getloadavg(),
        "sim_stats": {
            "calls": st.calls,
            "retries": st.retries,
            "failures": st.failures,
            "refused": st.refused,
            "cut": {r: s.cut for r, s in st.roles.items()},
            "recent_problems": st.recent_problems[-5:],
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["fake", "hf", "vllm"], default="fake")
    p.add_argument("--model", default="", help="simulator model dir (default: the tiny test model)")
    p.add_argument("--tasks", type=int, default=16)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--difficulty", type=float, default=30.0)
    p.add_argument(
        "--block-size",
        type=int,
        default=None,
        help="KV block size of vLLM and of the block model (default: 32 with --engine vllm, whose CPU "
        "attention needs a multiple of 32; else 16)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        default=4096,
        help="simulator context in tokens (default 4096: the tiny model's positions; vLLM refuses more)",
    )
    p.add_argument("--kv-cache-gib", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    from bench.common import add_out_arg

    add_out_arg(p)
    args = p.parse_args()
    if args.block_size is None:
        args.block_size = 32 if args.engine == "vllm" else 16
    result = anyio.run(run, args)
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if args.engine == "vllm":
        import vllm

        versions["vllm"] = vllm.__version__
    record = {
        "bench": "prefix",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu": platform.processor(),
            "cores": os.cpu_count(),
        },
        "versions": versions,
        "config": vars(args),
        **result,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "prefix" if args.engine == "fake" else f"prefix-{args.engine}"
    (out / f"{stem}.json").write_text(json.dumps(record, indent=1, default=str))
    engine_col = args.engine == "vllm"
    head = "| role | prompts | prompt tokens | token prefix | block model | same group |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if engine_col:
        head += " vLLM-measured |"
        rule += "---:|"
    lines = [
        f"Prefix reuse of simulator prompts ({args.tasks} tasks x {args.group} episodes, engine {args.engine}, "
        f"block {args.block_size}, load avg {record['load_avg'][0]:.1f})",
        "",
        head,
        rule,
    ]
    for role, r in result["roles"].items():
        line = (
            f"| {role} | {r['prompts']} | {r['tokens']} | {r['token_prefix']:.3f} | {r['block_model']:.3f} "
            f"| {r['same_group']:.3f} |"
        )
        if engine_col:
            line += f" {r['engine_hit_rate']:.3f} |"
        lines.append(line)
    if result["engine_hit_rate"] is not None:
        lines += [
            "",
            f"vLLM prefix-cache counters: hit rate {result['engine_hit_rate']:.3f} "
            f"({result['engine_prefix_hits']} / {result['engine_prefix_queries']} tokens)",
        ]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(
        f"episodes: {result['episodes']}  tasks failed: {len(result['tasks_failed'])}  wall {result['wall_s']:.1f}s"
    )


if __name__ == "__main__":
    main()
