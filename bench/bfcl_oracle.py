"""Full-data reference run of the BFCL environment and checkers (no model).

Run:  python -m bench.bfcl_oracle [--quick] [--out DIR]   (--quick: the first 20 entries per category)

For every entry of the four multi-turn categories (800): the oracle (ground-truth calls
replayed as keyword tool calls) through `BfclEnv` and BFCL's own `multi_turn_checker`; the
silent policy (never calls a tool); and three perturbed oracles (one wrong argument, one
missing call, one extra state-changing call, each at the first turn with ground truth),
recording whether the environment's per-turn verdicts agree with BFCL's checker on every
prefix of the conversation. For every single-turn AST entry: the oracle through
`eval/ast_checker.py`. Writes OUT/bfcl_oracle.json and .md (machine, versions, load
average, figures, wall time per category).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from importlib.metadata import version

from trustee.envs.bfcl import BfclEnv
from trustee.envs.bfcl_data import AST_CATEGORIES, MULTI_TURN_CATEGORIES, load_ast, load_multi_turn
from trustee.envs.bfcl_exec import bfcl_multi_turn_check, oracle_calls
from trustee.envs.bfcl_scripted import (
    ScriptedBfclPolicy,
    extra_call,
    missing_call,
    play,
    silent_policy,
    wrong_argument,
)
from trustee.eval.ast_checker import check_ast, oracle_calls_ast

PERTURB = {
    "wrong_argument": lambda inst, calls, k: wrong_argument(calls, k),
    "missing_call": lambda inst, calls, k: missing_call(calls, k),
    "extra_call": extra_call,
}


def _agrees(env: BfclEnv, inst, state) -> bool:
    """Env 'all scored turns so far pass' == BFCL's checker on each prefix."""
    v, steps, ok = env.verdicts(state), env.checker_steps(state), True
    for k, gt in enumerate(inst.ground_truth):
        if gt:
            ok = ok and bool(v[k])
        if ok != bfcl_multi_turn_check(inst, steps, turns=k + 1)["valid"]:
            return False
    return True


async def multi_turn(category: str, limit: int | None = None) -> dict:
    env = BfclEnv(split="all", miss_turn_warning=False)
    t0 = time.perf_counter()
    row = {
        "category": f"multi_turn_{category}",
        "n": 0,
        "oracle_env": 0,
        "oracle_bfcl": 0,
        "silent_turns_passed": 0,
    }
    row.update({f"{k}_{m}": 0 for k in PERTURB for m in ("n", "failed_turn", "agree")})
    for inst in load_multi_turn(category)[:limit]:
        row["n"] += 1
        calls = oracle_calls(inst)
        st = await play(env, env.task_for(inst), ScriptedBfclPolicy(calls), inst.id)
        row["oracle_env"] += all(v is not False for v in env.verdicts(st))
        row["oracle_bfcl"] += bfcl_multi_turn_check(inst, env.checker_steps(st))["valid"]
        silent = await play(env, env.task_for(inst), silent_policy(), inst.id + "/s")
        row["silent_turns_passed"] += sum(bool(v) for v in env.verdicts(silent))
        k = next(i for i, gt in enumerate(inst.ground_truth) if gt)
        for kind, make in PERTURB.items():
            bad = make(inst, calls, k)
            if bad is None:
                continue
            st = await play(env, env.task_for(inst), ScriptedBfclPolicy(bad), f"{inst.id}/{kind}")
            row[f"{kind}_n"] += 1
            row[f"{kind}_failed_turn"] += env.verdicts(st)[k] is False
            row[f"{kind}_agree"] += _agrees(env, inst, st)
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def single_turn(category: str, limit: int | None = None) -> dict:
    t0 = time.perf_counter()
    rows = load_ast(category)[:limit]
    bad = [
        e.id
        for e in rows
        if not check_ast(
            e.functions, oracle_calls_ast(e.functions, e.ground_truth), e.ground_truth, e.category
        ).valid
    ]
    return {
        "category": category,
        "n": len(rows),
        "oracle_pass": len(rows) - len(bad),
        "oracle_fail_ids": bad,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def markdown(mt: list[dict], st: list[dict]) -> str:
    lines = [
        "| category | n | oracle (env) | oracle (BFCL checker) | silent: turns passed | wrong arg: failed / agree | missing call: failed / agree | extra call: failed / agree | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in mt:
        per = " | ".join(
            f"{r[k + '_failed_turn']}/{r[k + '_n']} / {r[k + '_agree']}/{r[k + '_n']}" for k in PERTURB
        )
        lines.append(
            f"| {r['category']} | {r['n']} | {r['oracle_env']} | {r['oracle_bfcl']} | {r['silent_turns_passed']} | {per} | {r['wall_s']} |"
        )
    lines += [
        "",
        "| category | n | oracle passes | unsatisfiable entries (BFCL ground truth breaks BFCL's rules) |",
        "|---|---:|---:|---|",
    ]
    for r in st:
        lines.append(
            f"| {r['category']} | {r['n']} | {r['oracle_pass']} | {', '.join(r['oracle_fail_ids']) or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from bench.common import add_out_arg, machine, write_report

    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="only the first 20 entries of each category")
    add_out_arg(ap)
    a = ap.parse_args(argv)
    limit = 20 if a.quick else None
    t0 = time.perf_counter()
    mt = [asyncio.run(multi_turn(c, limit)) for c in MULTI_TURN_CATEGORIES]
    st = [single_turn(c, limit) for c in AST_CATEGORIES]
    out = {
        "bench": "bfcl_oracle",
        "command": "python -m bench.bfcl_oracle" + (" --quick" if a.quick else ""),
        "machine": machine(),
        "versions": {p: version(p) for p in ("bfcl-eval", "msgspec")},
        "config": {
            "split": "all",
            "miss_turn_warning": False,
            "perturbation_turn": "first turn with ground truth",
            "limit_per_category": limit,
        },
        "multi_turn": mt,
        "single_turn": st,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    md = markdown(mt, st)
    path = write_report(a.out, "bfcl_oracle", out, md)
    print(md)
    print(f"wall {out['wall_s']}s -> {path}")


if __name__ == "__main__":
    main()
