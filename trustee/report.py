"""`python -m trustee.report RUN_DIR [--out FILE] [--episodes N]`: one self-contained HTML page.

Owns the run report: the four-line summary (`trustee.summary`), plots drawn with
matplotlib and embedded as PNG data URIs (reward and episode outcomes; evaluation rewards
and score parts, and episode health, on 0-1 axes; curriculum difficulty; per-aspect success;
throughput and phase times; staleness; sampler/learner log-prob gap; loss, KL, entropy,
gradient norm), and a few episodes with the tokens the policy sampled (and trains on)
highlighted, decoded with the run's tokenizer. Also owns `spans` (consecutive ids with the
same mask), which `tools/view_trajectory.py` shares. Metric keys are documented in
docs/run-dir.md; a plot whose keys a run did not log is replaced by a line saying so. The
page has no external resource: it opens offline. Reads files only; called from the command
line.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import sys
from pathlib import Path
from typing import Any

from trustee import atomic
from trustee.summary import SCORED, RunData, read_run, summarize

# Each plot: title, then lines (metric key, label); a key missing from every step is skipped.
CURVES: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("reward", "Training reward", [("reward_mean", "mean reward (scored episodes)")]),
    (
        "outcomes",
        "Episode outcomes per step",
        [
            ("status/ok", "ok"),
            ("status/truncated", "truncated"),
            ("status/sim_error", "sim_error"),
            ("status/error", "error"),
            ("tasks_failed", "tasks not made"),
        ],
    ),
    (
        "health",
        "Episode health: shares of episodes",
        [
            ("health/malformed_share", "with a malformed call"),
            ("health/truncated_share", "truncated"),
            ("eval/sampled_malformed", "held-out, with a malformed call"),
            ("eval/sampled_truncated", "held-out, truncated"),
        ],
    ),
    ("difficulty", "Curriculum", [("curriculum/difficulty", "difficulty D"), ("curriculum/stage", "stage")]),
    (
        "phases",
        "Phase times per step (s)",
        [
            ("time/rollout_s", "rollout"),
            ("time/learn_s", "learn"),
            ("time/sleep_s", "engine sleep"),
            ("time/sync_s", "weight sync"),
        ],
    ),
    ("throughput", "Learner throughput (tokens/s)", [("learn/tokens_per_s", "learner tokens/s")]),
    (
        "staleness",
        "Staleness (policy versions)",
        [
            ("sched/lag_mean", "mean lag of consumed groups"),
            ("sched/dropped_stale", "groups dropped as stale (cumulative)"),
        ],
    ),
    (
        "logprob_gap",
        "Sampler / learner log-prob gap: exp(learner - sampler)",
        [("learn/is_ratio_min", "min"), ("learn/is_ratio_mean", "mean"), ("learn/is_ratio_max", "max")],
    ),
    (
        "is_fracs",
        "Importance-sampling correction",
        [
            ("learn/is_truncated_frac", "share truncated"),
            ("learn/is_masked_frac", "share masked"),
            ("learn/clip_frac", "share clipped (PPO)"),
        ],
    ),
    ("loss", "Loss", [("learn/loss", "loss")]),
    ("kl_entropy", "KL and entropy", [("learn/kl", "KL to reference"), ("learn/entropy", "entropy")]),
    ("grad", "Gradient norm (before clipping)", [("learn/grad_norm", "grad norm")]),
    (
        "format",
        "Per episode",
        [
            ("tool_calls_mean", "well-formed tool calls"),
            ("health/format_errors_per_episode", "format errors"),
            ("health/turns_mean", "turns"),
        ],
    ),
]
# Plots of shares and rewards in [0, 1]: drawn on a 0-1 axis (widened if a value lies outside,
# e.g. a judge reward of -1), so a rise reads as what it is.
UNIT_AXIS = {"health", "eval", "eval_parts"}


def spans(tokens: list[int], mask: list[int]) -> list[tuple[int, list[int]]]:
    """Consecutive runs of (mask value, ids)."""
    out: list[tuple[int, list[int]]] = []
    for t, m in zip(tokens, mask, strict=True):
        if out and out[-1][0] == m:
            out[-1][1].append(t)
        else:
            out.append((m, [t]))
    return out


# ----------------------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _series(run: RunData, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for m in run.metrics:
        v = m.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(m["step"]))
            ys.append(float(v))
    return xs, ys


def eval_curves(run: RunData) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """The evaluation's two plots: its rewards per mode (`eval/reward_<mode>`), and each score
    part's mean per mode (`eval/<mode>/<part>`: per-aspect success). Counts of episodes are
    not drawn; the shares of malformed and truncated episodes go to the health plot."""
    keys = sorted({k for m in run.metrics for k in m if k.startswith("eval/")})
    rewards = [(k, k.removeprefix("eval/reward_")) for k in keys if k.startswith("eval/reward_")]
    parts = [(k, k.removeprefix("eval/").replace("/", ": ")) for k in keys if k.count("/") == 2]
    return [
        ("eval", "Evaluation during training: held-out reward", rewards),
        ("eval_parts", "Evaluation during training: held-out score parts", parts),
    ]


def curve_plots(run: RunData) -> tuple[dict[str, tuple[str, tuple[float, float]]], list[str]]:
    """PNG (base64) and y-axis limits per plot id, and the titles of plots with no data in
    this run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out, missing = {}, []
    curves = list(CURVES)
    curves[1:1] = eval_curves(run)
    for pid, title, lines in curves:
        data = [(label, *_series(run, key)) for key, label in lines]
        data = [d for d in data if d[1]]
        if not data:
            missing.append(f"{title} ({', '.join(k for k, _ in lines) or 'eval/* keys'})")
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.0))
        for label, xs, ys in data:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        if pid == "reward" and len(data[0][1]) >= 5:
            xs, ys = data[0][1], data[0][2]
            w = max(2, len(ys) // 10)
            smooth = [
                sum(ys[max(0, i - w + 1) : i + 1]) / len(ys[max(0, i - w + 1) : i + 1])
                for i in range(len(ys))
            ]
            ax.plot(xs, smooth, linewidth=2.5, label=f"rolling mean ({w} steps)")
        if pid in UNIT_AXIS:
            values = [y for _, _, ys in data for y in ys]
            ax.set_ylim(min(0.0, *values), max(1.0, *values))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        out[pid] = (_png(fig), tuple(float(y) for y in ax.get_ylim()))
        plt.close(fig)
    return out, missing


def aspect_success(run: RunData, threshold: float) -> dict[str, dict[str, tuple[int, int]]]:
    """aspect -> value -> (episodes, successes): success = reward > threshold, from the
    knobs each scored episode's task was made with."""
    table: dict[str, dict[str, list[int]]] = {}
    for _, t in run.trajectories:
        if t.get("status") not in SCORED:
            continue
        for name, value in (t.get("knobs") or {}).items():
            cell = table.setdefault(name, {}).setdefault(f"{value:g}", [0, 0])
            cell[0] += 1
            cell[1] += int(float(t["reward"]) > threshold)
    return {a: {v: (c[0], c[1]) for v, c in vals.items()} for a, vals in table.items() if len(vals) > 1}


def aspect_plot(table: dict[str, dict[str, tuple[int, int]]], threshold: float) -> str | None:
    if not table:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(table)
    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip([a for row in axes for a in row], names, strict=False):
        vals = sorted(table[name], key=float)
        ax.bar(vals, [table[name][v][1] / table[name][v][0] for v in vals])
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
        ax.tick_params(labelsize=7)
    for ax in [a for row in axes for a in row][len(names) :]:
        ax.axis("off")
    fig.suptitle(f"Success rate (reward > {threshold:g}) per aspect value", fontsize=10)
    fig.tight_layout()
    png = _png(fig)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------- episodes


def pick_episodes(run: RunData, n: int) -> list[tuple[int, dict[str, Any]]]:
    """The best and worst scored episodes of the last step, then the first step's best."""
    if not run.trajectories or n <= 0:
        return []
    last = max(s for s, _ in run.trajectories)
    first = min(s for s, _ in run.trajectories)
    scored = [(s, t) for s, t in run.trajectories if t.get("status") in SCORED]
    pool_last = sorted([x for x in scored if x[0] == last], key=lambda x: -float(x[1]["reward"]))
    pool_first = sorted([x for x in scored if x[0] == first], key=lambda x: -float(x[1]["reward"]))
    picks: list[tuple[int, dict[str, Any]]] = []
    for cand in (pool_last[:1], pool_last[-1:], pool_first[:1], pool_last[1:], run.trajectories):
        for x in cand:
            if len(picks) < n and all(
                x[1]["episode_id"] != p[1]["episode_id"] or x[0] != p[0] for p in picks
            ):
                picks.append(x)
    return picks


def _tokenizer(run: RunData) -> tuple[Any, str]:
    model = run.resolved.get("policy_model", "")
    if not model or not Path(model).exists():
        return None, f"policy model {model or '(not in resolved.json)'} not found here"
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model), ""
    except Exception as e:  # noqa: BLE001 - the report still shows messages without a tokenizer
        return None, f"tokenizer of {model} did not load ({type(e).__name__}: {e})"


def episode_html(step: int, t: dict[str, Any], tok: Any) -> str:
    c = t.get("counters", {})
    head = (
        f"<h3>step {step} &middot; {html.escape(t['episode_id'])} &middot; status {html.escape(t['status'])} "
        f"&middot; reward {float(t['reward']):.3g}</h3><p class=meta>parts {html.escape(str(t.get('parts', {})))}; "
        f"turns {c.get('turns', '?')}, tool calls {c.get('tool_calls', '?')}, format errors {c.get('format_errors', '?')}, "
        f"tokens {len(t['tokens'])}, sampled {sum(t['loss_mask'])}</p>"
    )
    if t.get("error"):
        head += f"<p class=meta>error: {html.escape(t['error'])}</p>"
    if tok is not None:
        body = "".join(
            f"<span class=s>{html.escape(tok.decode(ids, skip_special_tokens=False))}</span>"
            if m
            else html.escape(tok.decode(ids, skip_special_tokens=False))
            for m, ids in spans(t["tokens"], t["loss_mask"])
        )
    else:
        body = "".join(
            (
                f"<span class=s>[{m['role']}] {html.escape(m.get('content', ''))}"
                + "".join(
                    html.escape(f"\n  call {c['name']} {c.get('arguments', {})}")
                    for c in m.get("tool_calls", [])
                )
                + "</span>\n"
            )
            if m["role"] == "assistant"
            else f"[{m['role']}] {html.escape(m.get('content', ''))}\n"
            for m in t.get("messages", [])
        )
    return f"<div class=episode>{head}<pre>{body}</pre></div>"


# ----------------------------------------------------------------------------- page

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
pre{white-space:pre-wrap;background:#f6f6f6;padding:.8em;border-radius:4px;font-size:12px}
.summary{background:#eef5ff;padding:.6em 1em;border-radius:4px;font-family:monospace;white-space:pre-wrap}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0}
img.plot{max-width:100%;border:1px solid #ddd}
.s{background:#c8f7c5}.meta{color:#555;font-size:13px;margin:.2em 0}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
"""

# Records, once the page has loaded, how many plots the browser decoded (read by the test).
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img.plot'), ok = 0;
  imgs.forEach(function (i) { i.dataset.width = i.naturalWidth; if (i.naturalWidth > 0) ok++; });
  document.body.dataset.plotsLoaded = ok;
  document.body.dataset.plots = imgs.length;
});
"""


def _success_threshold(cfg: dict) -> float:
    """The curriculum's `high` (a task counts as a success above it): as configured, or
    derived from the reward's range as the run derived it (trustee.config.curriculum_thresholds)."""
    from trustee.config import REWARD_RANGES

    high = cfg.get("curriculum", {}).get("high")
    if high is not None:
        return float(high)
    lo, hi = REWARD_RANGES.get(cfg.get("environment", {}).get("reward", ""), (-1.0, 1.0))
    return lo + 0.75 * (hi - lo)


def build_page(run: RunData, *, episodes: int = 4) -> str:
    cfg, res = run.config, run.resolved
    name = cfg.get("name", run.path.name)
    plots, missing = curve_plots(run)
    threshold = _success_threshold(cfg)
    aspects = aspect_plot(aspect_success(run, threshold), threshold)
    tok, tok_note = _tokenizer(run)
    parts = [
        f"<!doctype html><html><head><meta charset=utf-8><title>trustee report: {html.escape(name)}</title>",
        f"<style>{CSS}</style><script>{SCRIPT}</script></head><body>",
        f"<h1>trustee run report: {html.escape(name)}</h1>",
        f"<p class=meta>{html.escape(str(run.path.resolve()))} &middot; {len(run.metrics)} steps logged &middot; "
        f"{len(run.trajectories)} episodes saved</p>",
        "<h2>Did training help?</h2>",
        f"<div class=summary>{html.escape(chr(10).join(summarize(run)))}</div>",
        "<h2>Plan</h2><table>",
    ]
    for k in ("policy_model", "engines", "learner", "device", "dtype", "episodes_per_step", "total_episodes"):
        if k in res:
            parts.append(f"<tr><th>{k}</th><td>{html.escape(str(res[k]))}</td></tr>")
    env = cfg.get("environment", {})
    parts.append(
        f"<tr><th>environment</th><td>{html.escape(str(env.get('kind')))}, reward {html.escape(str(env.get('reward')))}</td></tr></table>"
    )
    parts.append("<h2>Curves</h2><div class=grid>")
    for pid, (png, (y0, y1)) in plots.items():
        parts.append(
            f"<figure><img class=plot id=plot-{pid} alt='{pid}' data-ymin='{y0:g}' data-ymax='{y1:g}' "
            f"src='data:image/png;base64,{png}'></figure>"
        )
    if aspects:
        parts.append(
            f"<figure><img class=plot id=plot-aspects alt=aspects src='data:image/png;base64,{aspects}'></figure>"
        )
    parts.append("</div>")
    if missing or not aspects:
        notes = missing + (
            [] if aspects else ["Per-aspect success (no saved episodes with varied curriculum aspects)"]
        )
        parts.append("<p class=meta>Not logged by this run: " + html.escape("; ".join(notes)) + ".</p>")
    parts.append("<h2>Episodes</h2>")
    parts.append(
        "<p class=meta>Highlighted: tokens the policy sampled (loss mask 1, trained on); the rest is "
        "environment text rendered by the chat template."
        + (f" Shown as messages: {html.escape(tok_note)}." if tok is None else "")
        + "</p>"
    )
    for step, t in pick_episodes(run, episodes):
        parts.append(episode_html(step, t, tok))
    if not run.trajectories:
        parts.append("<p>No trajectories.jsonl (logging.trajectories = 'none').</p>")
    parts.append("<p class=meta>Metric keys: docs/run-dir.md.</p></body></html>")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m trustee.report", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a run directory (runs/<name>)")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN_DIR/report.html)")
    p.add_argument("--episodes", type=int, default=4, help="episodes to show (default 4)")
    a = p.parse_args(argv)
    try:
        run = read_run(a.run_dir)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        print(
            "error: the report draws its plots with matplotlib: pip install -e '.[report]'", file=sys.stderr
        )
        return 2
    out = Path(a.out) if a.out else run.path / "report.html"
    atomic.write_text(out, build_page(run, episodes=a.episodes))  # a reader never sees half a page
    print(f"report: {out}")
    print("\n".join(summarize(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
