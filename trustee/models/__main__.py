"""`python -m trustee.models get NAME [--out DIR]`: write a packaged model as a model directory.

`python -m trustee.models list` names the models trustee can take from installed packages.
"""

from __future__ import annotations

import argparse
import sys
import time

from trustee.models.packaged import PACKAGED, PackageMissing, default_dir, get


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trustee.models", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("get", help="write a packaged model as a safetensors model directory")
    g.add_argument("name", choices=sorted(PACKAGED))
    g.add_argument("--out", help="directory to write (default .cache/models/<model>)")
    g.add_argument("--force", action="store_true", help="rewrite even if the directory is up to date")
    sub.add_parser("list", help="the packaged models and the packages they come from")
    args = ap.parse_args(argv)
    if args.cmd == "list":
        for spec in PACKAGED.values():
            print(f"{spec.name}: package {spec.distribution}, {spec.licence}; {spec.note}")
        return 0
    t0 = time.perf_counter()
    try:
        out = get(args.name, args.out or default_dir(args.name), force=args.force, progress=True)
    except PackageMissing as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.name}: {out} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
