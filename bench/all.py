"""Every benchmark's quick (or full) form, one after another, into one output directory.

    python -m bench.all [--quick] [--out DIR] [--skip name,name]

Runs each `bench.<name>` module as a subprocess with `--out DIR` (and `--quick`), so every
figure of one invocation is taken under the same conditions, and writes DIR/all.json with
each benchmark's exit status, wall time and the load average around it. To refresh the
committed figures on a quiet machine: `python -m bench.all --out bench/results`.
`bench.prefix` keeps its own flags (fake engine by default).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> extra arguments in quick mode (all take --out; these also take --quick unless noted)
BENCHES = {
    "orchestrator": ["--quick"],
    "learner": ["--quick"],
    "e2e": ["--quick"],
    "vs_trl": ["--quick"],
    "engine": ["--quick"],
    "prefix": [],
    "bfcl_oracle": ["--quick"],
    "mcp": ["--quick"],
}


def main(argv: list[str] | None = None) -> None:
    from bench.common import add_out_arg, load_avg, machine

    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="each benchmark's quick form (target: under 20 min on 2 cores)")
    ap.add_argument("--skip", default="", help="benchmarks to leave out, comma-separated")
    add_out_arg(ap)
    a = ap.parse_args(argv)
    skip = {s for s in a.skip.split(",") if s}
    rows = []
    t_all = time.perf_counter()
    for name, quick_args in BENCHES.items():
        if name in skip:
            continue
        cmd = [sys.executable, "-m", f"bench.{name}", "--out", a.out] + (quick_args if a.quick else [])
        before = load_avg()
        t0 = time.perf_counter()
        print(f"== {' '.join(cmd[1:])}", flush=True)
        done = subprocess.run(cmd, cwd=ROOT, check=False, env=dict(os.environ))
        rows.append(
            dict(
                bench=name,
                command=" ".join(["python"] + cmd[1:]),
                returncode=done.returncode,
                wall_s=round(time.perf_counter() - t0, 1),
                load_avg_before=before,
                load_avg_after=load_avg(),
            )
        )
    rep = dict(bench="all", quick=a.quick, machine=machine(), runs=rows, wall_s=round(time.perf_counter() - t_all, 1))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "all.json").write_text(json.dumps(rep, indent=2) + "\n")
    for r in rows:
        print(f"{r['bench']:13s} rc={r['returncode']} {r['wall_s']:7.1f} s  load {r['load_avg_after']}")
    print(f"total {rep['wall_s']} s -> {out / 'all.json'}")
    if any(r["returncode"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
