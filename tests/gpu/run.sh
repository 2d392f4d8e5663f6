#!/usr/bin/env bash
# The GPU suite in one call: installs what it needs, then runs every test marked `gpu` (tests/gpu/).
#
# Usage (from anywhere, on a machine with a CUDA GPU and a CUDA build of torch):
#   tests/gpu/run.sh [PYTEST ARGS...]
#
# What it runs (within 8 minutes on one H200, after the install):
#   - TransformerEngine's layer spec with the rollout IS loss hook, bf16 forward + backward, against
#     megatron's local spec on the same weights (and both against the local spec in fp32);
#   - ShardedRolloutIS on CUDA tensors with NCCL groups against gloo on the CPU and the float64 oracle
#     (one rank; the two-rank NCCL test runs only with two GPUs or more);
#   - vocab-parallel token log-probs on CUDA: peak memory of forward + backward <= 1.25 fp32 copies of
#     the logits, values against float64;
#   - benchmarks/run.py on CUDA, a ~1B-parameter demo model included; its tables (IS share of a step
#     against the 1% goal) are printed, nothing timed is asserted.
#
# What it installs (skipped when already importable): this package with its `test` extra (megatron-core
# among them), and TransformerEngine for the CUDA major version torch was built with
# (transformer-engine[pytorch,core_cu12|core_cu13] in megatron-core 0.16.1's tested range). TE's torch
# extension is compiled from source against the installed torch: the first install takes several
# minutes and needs nvcc.
#
# Environment (defaults in brackets):
#   PYTHON          interpreter with a CUDA build of torch [python3]
#   TE_SPEC         TransformerEngine version range [>=2.9,<2.12]
#   NVTE_CUDA_ARCHS GPU architectures TE is compiled for [the visible GPU's, e.g. 90 on Hopper]
#   MAX_JOBS        parallel compile jobs for TE [the CPU count]
#   WHEELHOUSE      a folder of wheels to install from, without any index (machines with no network)
#   SKIP_INSTALL=1  install nothing; run the tests with what is there
#   SUITE_TIMEOUT   seconds the tests may take before they are stopped [480]
#   BENCHMARK_OUT   where benchmarks/run.py writes its JSON [a temporary folder]
set -euo pipefail

die() {
    echo "gpu/run.sh: error: $*" >&2
    exit 2
}

cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
command -v "$PYTHON" >/dev/null 2>&1 || die "PYTHON=$PYTHON: no such interpreter."

torch_cuda=$("$PYTHON" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null) ||
    die "$PYTHON cannot import torch; install a CUDA build of torch first."
[[ -n "$torch_cuda" ]] || die "$PYTHON's torch is a CPU build (torch.version.cuda is None); install a CUDA build."
"$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
    die "torch $torch_cuda sees no GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES)."

pip_install() {
    local -a options=(--quiet --no-build-isolation)
    if [[ -n "${WHEELHOUSE:-}" ]]; then
        options+=(--no-index --find-links "$WHEELHOUSE")
    fi
    "$PYTHON" -m pip install "${options[@]}" "$@"
}

importable() {
    "$PYTHON" -c "import $1" >/dev/null 2>&1
}

if [[ "${SKIP_INSTALL:-0}" != 1 ]]; then
    if ! importable megatron.core || ! importable pytest; then
        pip_install -e ".[test]"
    fi
    if ! importable transformer_engine.pytorch; then
        archs=$("$PYTHON" -c 'import torch; major, minor = torch.cuda.get_device_capability(); print(f"{major}{minor}")')
        core="core_cu${torch_cuda%%.*}"
        echo "gpu/run.sh: building TransformerEngine ($core, sm_${NVTE_CUDA_ARCHS:-$archs}) against torch" \
            "$("$PYTHON" -c 'import torch; print(torch.__version__)'); this takes several minutes" >&2
        NVTE_FRAMEWORK=pytorch NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS:-$archs} MAX_JOBS=${MAX_JOBS:-$(nproc)} \
            pip_install "transformer-engine[pytorch,$core]${TE_SPEC:->=2.9,<2.12}"
    fi
fi
importable transformer_engine.pytorch ||
    die "transformer_engine.pytorch does not import; the TE layer-spec test needs it (unset SKIP_INSTALL)."

"$PYTHON" - <<'EOF'
import torch
import transformer_engine
import megatron.core

print(f"gpu/run.sh: {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"TransformerEngine {transformer_engine.__version__}, megatron-core {megatron.core.__version__}", flush=True)
EOF
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
timeout "${SUITE_TIMEOUT:-480}" "$PYTHON" -m pytest -m gpu tests/gpu -v -s -rA -p no:cacheprovider "$@" || status=$?
if ((status == 124)); then
    echo "gpu/run.sh: error: the suite did not finish within SUITE_TIMEOUT=${SUITE_TIMEOUT:-480} s" >&2
fi
exit "$status"
