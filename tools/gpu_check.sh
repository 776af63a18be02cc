#!/usr/bin/env bash
# The learner on a GPU, checked against the CPU, on the tiny offline model. One command:
#   tools/gpu_check.sh            every point this machine can run (CUDA rows need a GPU)
#   tools/gpu_check.sh --cpu-only the CPU rows only (what runs on a machine without a GPU)
# Needs: this repo installed (tools/install.sh), torch with CUDA for the GPU rows; optional:
# flash_attn (packed flash path), bitsandbytes (QLoRA row and its sampler gap), a second GPU
# (two NCCL ranks). No network: the tiny model is built locally. Budget: a few minutes on one
# H200 (most of it process start-up: the FSDP rows spawn their ranks).
# Prints one row per point: ok / FAIL / skipped (why), the gradient error against the CPU
# float32 reference, tokens/s and peak memory of one step. Exit status 1 if a row FAILs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" - <<'PYEOF'
import torch
print(f"torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}; GPUs: {torch.cuda.device_count()}")
for i in range(torch.cuda.device_count()):
    print(f"  cuda:{i} {torch.cuda.get_device_name(i)}")
PYEOF
exec timeout 600 "$PY" tools/gpu_check.py "$@"
