#!/usr/bin/env bash
# Installs vLLM's output classes (vllm.outputs, vllm.logprobs) for tests/test_vllm_adapter.py
# into the active Python environment without touching torch.
#
# vllm's wheel pins a CUDA torch, so it goes in with --no-deps; the light packages that
# `import vllm.outputs` needs follow with torch held at the version already installed.
# Idempotent: a second run finds everything satisfied. Run it inside the project's venv
# (or set PYTHON=/path/to/python).
set -euo pipefail

PYTHON="${PYTHON:-python}"
VLLM_VERSION="${VLLM_VERSION:-0.33.0}"

torch_version="$("$PYTHON" -c 'import torch; print(torch.__version__)')"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==${torch_version}" > "$constraints"

"$PYTHON" -m pip install -q --no-deps "vllm==${VLLM_VERSION}"
"$PYTHON" -m pip install -q -c "$constraints" \
    numpy packaging msgspec pydantic regex cbor2 psutil pyzmq urllib3 \
    'transformers>=5.16.1,<5.21' aiohttp requests openai-harmony openai prometheus_client \
    pillow pybase64 cachetools

"$PYTHON" - "$torch_version" <<'PY'
import sys

import torch
import vllm.logprobs
import vllm.outputs

if torch.__version__ != sys.argv[1]:
    sys.exit(f"torch changed from {sys.argv[1]} to {torch.__version__}")
print(f"vllm output classes importable; torch {torch.__version__} untouched")
PY
