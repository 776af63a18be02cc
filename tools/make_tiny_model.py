"""Build a tiny offline tokenizer + Qwen3-architecture model directory.

    python tools/make_tiny_model.py --out .cache/tiny-test [--size test|demo] [--seed 0] [--sft N]

`--sft N` then warms the model for N steps on the toy environment's reference conversations
(trustee/models/sft.py) and prints the well-formed tool-call rate; use a directory of its own, not
the test fixtures' cache (the build stamp does not record the warm-up).

The directory loads with AutoTokenizer / AutoModelForCausalLM.from_pretrained (and vLLM)
with no network. Same size and seed, same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trustee.models.tiny import SIZES, build_tiny_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", default="test", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if the directory is up to date")
    p.add_argument(
        "--sft", type=int, default=0, metavar="N", help="then SFT-warm it for N steps on toy tool calls"
    )
    a = p.parse_args()
    path = build_tiny_model(a.out, size=a.size, seed=a.seed, force=a.force)
    if a.sft:
        from trustee.models.sft import sft_warm

        r = sft_warm(path, a.sft, seed=a.seed)
        print(
            f"SFT {r.steps} steps in {r.wall_s:.0f}s: loss {r.loss_first:.2f} -> {r.loss_last:.2f}, "
            f"well-formed tool-call rate {r.well_formed_rate:.0%}, any tool-call block {r.attempt_rate:.0%} "
            f"({r.eval_samples} samples at temperature 1)"
        )
    import torch
    from transformers import AutoModelForCausalLM

    n = sum(x.numel() for x in AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).parameters())
    print(f"tiny model ({a.size}, seed {a.seed}, {n:,} parameters) in {path}")


if __name__ == "__main__":
    main()
