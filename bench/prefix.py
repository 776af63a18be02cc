"""How much of each simulator prompt repeats a prefix the simulator has already seen.

    python -m bench.prefix [--engine fake|hf] [--tasks 8] [--group 8] [--model DIR]

Runs tasks x group simulated episodes (default 8 x 8 = 64) and records every prompt sent to
each simulator role (task generator, user, tool, judge). For each prompt, the repeated part
is its longest common token prefix with any earlier prompt of the same role in the same GRPO
group (which covers the same episode): what a prefix cache keyed on token blocks can reuse.
Reports, per role and overall, the share of prompt tokens that repeat (target >= 0.8).

The policy is a scripted double (`ScriptedToolPolicy`): each episode makes the task's
expected calls (a different subset per episode, so the tool memo is exercised), asks the
user one question, then answers. The simulator is `FakeJsonEngine` (schema-valid random JSON,
fast) or the real HF engine on a tiny random-weight model (`--engine hf`, slow on CPU): the
prompt layout, not the model, decides the figure. Writes bench/results/prefix.json and
bench/results/prefix.md.
"""

from __future__ import annotations

import argparse
import json
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


class PrefixRecorder:
    """Collects (role, group, prompt ids) and computes the repeated-prefix shares."""

    def __init__(self) -> None:
        self.seen: dict[tuple[str, str], list[list[int]]] = defaultdict(list)
        self.total: dict[str, int] = defaultdict(int)
        self.repeated: dict[str, int] = defaultdict(int)
        self.prompts: dict[str, int] = defaultdict(int)
        self.repeated_any: dict[str, int] = defaultdict(int)

    def __call__(self, role: str, key: str, ids: list[int]) -> None:
        earlier = self.seen[(role, key)]
        best = max((_lcp(ids, e) for e in earlier), default=0)
        anywhere = max((_lcp(ids, e) for (r, _), ps in self.seen.items() if r == role for e in ps), default=0)
        earlier.append(list(ids))
        self.total[role] += len(ids)
        self.repeated[role] += best
        self.repeated_any[role] += anywhere
        self.prompts[role] += 1

    def table(self) -> dict[str, dict[str, float]]:
        rows = {
            r: self._row(self.prompts[r], self.total[r], self.repeated[r], self.repeated_any[r])
            for r in sorted(self.total)
        }
        rows["overall"] = self._row(
            sum(self.prompts.values()),
            sum(self.total.values()),
            sum(self.repeated.values()),
            sum(self.repeated_any.values()),
        )
        return rows

    @staticmethod
    def _row(prompts: int, tokens: int, repeated: int, repeated_any: int) -> dict[str, float]:
        """`share`: within the same group (the target); `share_any_group`: any earlier
        prompt of the role (what a shared prefix cache also reuses across groups)."""
        return {
            "prompts": prompts,
            "tokens": tokens,
            "repeated": repeated,
            "share": repeated / tokens if tokens else 0.0,
            "share_any_group": repeated_any / tokens if tokens else 0.0,
        }


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


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


async def run(args) -> dict:
    from transformers import AutoTokenizer

    from trustee.tiny import build_tiny_model

    model = Path(args.model) if args.model else build_tiny_model(ROOT / ".cache" / "tiny-test", size="test")
    tok = AutoTokenizer.from_pretrained(model)
    if args.engine == "hf":
        from trustee.engines.hf import HFEngine

        sim = HFEngine.from_pretrained(model, max_batch=64, seed=1)
    else:
        sim = FakeJsonEngine(tok, seed=0)
    rec = PrefixRecorder()
    client = SimClient(sim, tok, max_tokens=512, recorder=rec)
    env = SimulatedEnv(client, max_user_turns=2, task_max_tokens=1536)
    cur = Curriculum(CurriculumConfig(start_difficulty=args.difficulty))
    tasks = {}
    policy = ScriptedToolPolicy(tok, tasks)
    runner = EpisodeRunner(policy, tok, cfg=RolloutConfig(max_turns=4), max_model_len=4096)
    statuses: dict[str, int] = defaultdict(int)
    rng = random.Random(args.seed)

    async def one(i: int) -> None:
        task = await env.make_task(cur.sample(rng), random.Random(args.seed * 1000 + i))
        tasks[task.id] = task
        for t in await run_group(env, task, args.group, runner):
            statuses[t.status] += 1

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(args.tasks):
            tg.start_soon(one, i)
    wall = time.perf_counter() - t0
    if args.engine == "hf":
        await sim.close()
    return {"roles": rec.table(), "episodes": dict(statuses), "wall_s": wall, "sim_stats": vars(client.stats)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["fake", "hf"], default="fake")
    p.add_argument("--model", default="", help="simulator model dir (default: the tiny test model)")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--difficulty", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    result = anyio.run(run, args)
    import torch
    import transformers

    record = {
        "bench": "prefix",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu": platform.processor(),
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "config": vars(args),
        **result,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prefix.json").write_text(json.dumps(record, indent=1, default=str))
    lines = [
        f"Shared-prefix share of simulator prompts ({args.tasks} tasks x {args.group} episodes, engine {args.engine})",
        "",
        "| role | prompts | prompt tokens | repeated-prefix tokens (same group) | share (same group) | share (any group) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for role, r in result["roles"].items():
        lines.append(
            f"| {role} | {r['prompts']} | {r['tokens']} | {r['repeated']} | {r['share']:.3f} | {r['share_any_group']:.3f} |"
        )
    (out / "prefix.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"episodes: {result['episodes']}  wall {result['wall_s']:.1f}s")


if __name__ == "__main__":
    main()
