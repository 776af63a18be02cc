#!/usr/bin/env bash
# The learner on a GPU, checked against the CPU, on the tiny offline model: a pass/fail smoke for
# one GPU in under 9 minutes with nothing downloaded. One command:
#   tools/gpu_check.sh            every point this machine can run (CUDA rows need a GPU)
#   tools/gpu_check.sh --cpu-only the CPU rows only (what runs on a machine without a GPU)
# Uses the machine's own torch (with CUDA for the GPU rows). Packages it lacks (msgspec,
# jsonschema, xgrammar, ...) come from .whl/ when that folder is here: tools/gpu_wheels.sh
# prepares it on a machine with the package registry; they are installed with --no-index
# --no-deps, so torch, transformers and peft are left as they are. Optional: flash_attn (packed
# flash row), bitsandbytes (QLoRA row), a second GPU (two NCCL ranks), vLLM (its signatures).
# Prints one row per point: ok / FAIL / skipped (why), each with its stated bound
# (tools/gpu_check.py's docstring lists them); exit status 1 if a row FAILs, 124 if the inner
# timeout (540 s, below a device command's 600 s, so the partial table still prints) is reached.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import msgspec, jsonschema, xgrammar, anyio" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing the wheels in .whl/ (--no-index --no-deps)"
        "$PY" -m pip install --quiet --no-index --no-deps --find-links .whl .whl/*.whl
    else
        echo "missing packages and no .whl/ folder: run tools/gpu_wheels.sh where the registry is reachable" >&2
    fi
fi
"$PY" - <<'PYEOF'
import torch
print(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}; GPUs: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
PYEOF
exec timeout --kill-after=10 540 "$PY" -u tools/gpu_check.py "$@"
