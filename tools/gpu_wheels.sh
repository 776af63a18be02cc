#!/usr/bin/env bash
# The Python 3.12 wheels the GPU machine lacks, into .whl/ (run here, where the package registry
# is reachable; nothing can be downloaded on the GPU machine). tools/gpu_check.sh installs them
# there with `pip install --no-index --no-deps`, so that machine's own torch, transformers, peft
# and accelerate are kept.
#   tools/gpu_wheels.sh              GPU machine: CPython 3.12, x86_64 manylinux
#   GPU_PYTHON=3.11 tools/gpu_wheels.sh   another Python
# Versions are pinned to this machine's venv (a set that works together: pydantic and
# pydantic-core, jsonschema and its referencing stack). Refuses a folder of 64 MiB or more (what
# a device command may carry). Not included: bitsandbytes and flash-attn (CUDA builds; the QLoRA
# and flash rows of gpu_check.sh say "skipped" without them) and vLLM (far over the limit).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
VER="${GPU_PYTHON:-3.12}"
OUT=.whl
LIMIT_MIB=64
# What `import trustee` and tools/gpu_check.py need beyond torch / transformers / peft / accelerate.
PKGS=(msgspec jsonschema attrs jsonschema-specifications referencing rpds-py xgrammar apache-tvm-ffi
      pydantic pydantic-core annotated-types typing-inspection anyio idna)
# shellcheck disable=SC2207
pins=($("$PY" - "${PKGS[@]}" <<'PYEOF'
import importlib.metadata as md
import sys

for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        sys.exit(f"gpu_wheels: {name} is not installed here to pin it; run tools/install.sh --dev")
PYEOF
))
rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$VER" \
    --implementation cp --abi "cp${VER/./}" --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$OUT" "${pins[@]}"
size_kib=$(du -sk "$OUT" | cut -f1)
{
    echo "# wheels for CPython $VER x86_64 (tools/gpu_wheels.sh), $(date -u +%Y-%m-%dT%H:%MZ); KiB name"
    (cd "$OUT" && du -k ./*.whl | sed 's#\./##')
    echo "# total ${size_kib} KiB"
} > "$OUT/CONTENTS.txt"
cat "$OUT/CONTENTS.txt"
if [ "$size_kib" -ge $((LIMIT_MIB * 1024)) ]; then
    echo "gpu_wheels: $OUT is ${size_kib} KiB, over ${LIMIT_MIB} MiB: a device command cannot carry it" >&2
    exit 1
fi
