"""Build a tiny offline tokenizer + Qwen3-architecture model directory.

    python tools/make_tiny_model.py --out .cache/tiny-test [--size test|demo] [--seed 0]

The directory loads with AutoTokenizer / AutoModelForCausalLM.from_pretrained (and vLLM)
with no network. Same size and seed, same files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trustee.tiny import SIZES, build_tiny_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--size", default="test", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if the directory is up to date")
    a = p.parse_args()
    path = build_tiny_model(a.out, size=a.size, seed=a.seed, force=a.force)
    import torch
    from transformers import AutoModelForCausalLM

    n = sum(x.numel() for x in AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).parameters())
    print(f"tiny model ({a.size}, seed {a.seed}, {n:,} parameters) in {path}")


if __name__ == "__main__":
    main()
