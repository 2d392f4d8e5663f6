#!/usr/bin/env bash
# One-node (or manually multi-node) torchrun launcher for the rollout IS GRPO demo, Megatron style.
#
# Usage:
#   launch/torchrun.sh [FLAGS...]
#   TP=2 CP=2 NPROC_PER_NODE=4 launch/torchrun.sh --rollout-is --rollout-is-threshold 2.0 --train-iters 50
#   ENTRYPOINT=path/to/train.py launch/torchrun.sh [ITS FLAGS...]
#
# Every FLAG is passed through to the entry point (Megatron-style flags, --rollout-is-* included).
# Environment (defaults in brackets):
#   ENTRYPOINT      a Python module name or a path to a .py file [megatron_rollout_is.demo]
#   PYTHON          interpreter that has torch and this package [python3]
#   NPROC_PER_NODE  processes on this node [the visible GPUs: nvidia-smi's, narrowed by
#                   CUDA_VISIBLE_DEVICES when set; on CPU, TP*PP*CP]
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT   torchrun rendezvous [1, 0, localhost, 6000]
#   TP, PP, CP      tensor/pipeline/context-parallel sizes, passed as --tensor-model-parallel-size,
#                   --pipeline-model-parallel-size, --context-parallel-size [1]; the same flags among
#                   FLAGS win
#   DRY_RUN=1       print the command instead of running it
# On GPU it exports CUDA_DEVICE_MAX_CONNECTIONS=1 (Megatron's requirement for overlapping TP/CP
# communication); on CPU the entry point picks gloo and OMP_NUM_THREADS defaults to 1.
# User errors (a flag without its value, a world size that TP*PP*CP does not divide) stop here,
# with exit code 2, before any process starts.
set -euo pipefail

die() {
    echo "torchrun.sh: error: $*" >&2
    exit 2
}

positive_int() {
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'."
}

# Flags that take a value: one without it is caught here rather than in every launched process.
takes_value() {
    case "$1" in
        --tensor-model-parallel-size | --pipeline-model-parallel-size | --context-parallel-size | \
            --micro-batch-size | --global-batch-size | --train-iters | --output-dir | \
            --rollout-is-threshold | --rollout-is-threshold-lower | --rollout-is-level | \
            --rollout-is-mode | --rollout-is-veto-threshold | --rollout-is-config | --rollout-is-dump-dir)
            return 0
            ;;
    esac
    return 1
}

TP=${TP:-1}
PP=${PP:-1}
CP=${CP:-1}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    flag=${args[i]}
    value=""
    case "$flag" in
        --*=*)
            value=${flag#*=}
            flag=${flag%%=*}
            [[ -n "$value" ]] || die "flag $flag needs a value (got '$flag=')."
            ;;
        --*)
            if takes_value "$flag"; then
                next=${args[i + 1]:-}
                if [[ -z "$next" || "$next" == --* ]]; then
                    die "flag $flag needs a value, e.g. '$flag 2'${next:+ (it is followed by $next)}."
                fi
                value=$next
                i=$((i + 1))
            fi
            ;;
    esac
    case "$flag" in
        --tensor-model-parallel-size) TP=$value ;;
        --pipeline-model-parallel-size) PP=$value ;;
        --context-parallel-size) CP=$value ;;
    esac
done
positive_int "the tensor-parallel size (TP / --tensor-model-parallel-size)" "$TP"
positive_int "the pipeline-parallel size (PP / --pipeline-model-parallel-size)" "$PP"
positive_int "the context-parallel size (CP / --context-parallel-size)" "$CP"
MODEL_PARALLEL=$((TP * PP * CP))

# The GPUs this node's processes can use. nvidia-smi lists every GPU of the machine; a set
# CUDA_VISIBLE_DEVICES narrows that to its entries up to the first invalid one, as CUDA does (set
# but empty: none, and the entry point then runs on CPU with gloo).
visible_gpus() {
    local listed=0 visible=0 entry
    local -a entries
    if command -v nvidia-smi >/dev/null 2>&1; then
        listed=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
    fi
    if [[ -z "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        echo "$listed"
        return
    fi
    IFS=',' read -r -a entries <<<"$CUDA_VISIBLE_DEVICES"
    for entry in "${entries[@]}"; do
        [[ "$entry" =~ ^[[:space:]]*([0-9]+|GPU-.+|MIG-.+)[[:space:]]*$ ]] || break
        visible=$((visible + 1))
    done
    echo $((visible < listed ? visible : listed))
}

GPUS=$(visible_gpus)
if ((GPUS > 0)); then
    export CUDA_DEVICE_MAX_CONNECTIONS=1
    NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS}
    device="GPU (NCCL), $GPUS visible"
    # NCCL refuses two ranks on one GPU; stop here rather than in every launched process.
    if [[ "$NPROC_PER_NODE" =~ ^[0-9]+$ ]] && ((NPROC_PER_NODE > GPUS)); then
        die "NPROC_PER_NODE=$NPROC_PER_NODE but this node has $GPUS visible GPU(s); NCCL needs one GPU per" \
            "process: launch at most $GPUS per node (or hide the GPUs with CUDA_VISIBLE_DEVICES= to run on CPU)."
    fi
else
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    NPROC_PER_NODE=${NPROC_PER_NODE:-$MODEL_PARALLEL}
    device="CPU (gloo)"
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
positive_int "NPROC_PER_NODE" "$NPROC_PER_NODE"
positive_int "NNODES" "$NNODES"
if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || ((NODE_RANK >= NNODES)); then
    die "NODE_RANK must be in [0, NNODES=$NNODES), got '$NODE_RANK'."
fi

WORLD_SIZE=$((NPROC_PER_NODE * NNODES))
if ((WORLD_SIZE % MODEL_PARALLEL != 0)); then
    die "world size $WORLD_SIZE (NNODES=$NNODES x NPROC_PER_NODE=$NPROC_PER_NODE) is not divisible by" \
        "TP x PP x CP = $TP x $PP x $CP = $MODEL_PARALLEL; launch a multiple of $MODEL_PARALLEL processes" \
        "or change the parallel sizes."
fi

ENTRYPOINT=${ENTRYPOINT:-megatron_rollout_is.demo}
if [[ "$ENTRYPOINT" == *.py ]]; then
    [[ -f "$ENTRYPOINT" ]] || die "ENTRYPOINT=$ENTRYPOINT: no such file."
    target=("$ENTRYPOINT")
else
    target=(-m "$ENTRYPOINT")
fi

DISTRIBUTED_ARGS=(
    --nproc-per-node "$NPROC_PER_NODE"
    --nnodes "$NNODES"
    --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR"
    --master-port "$MASTER_PORT"
)
PARALLEL_ARGS=(
    --tensor-model-parallel-size "$TP"
    --pipeline-model-parallel-size "$PP"
    --context-parallel-size "$CP"
)
command=("${PYTHON:-python3}" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" "${target[@]}" "${PARALLEL_ARGS[@]}" "$@")

echo "torchrun.sh: $device, world size $WORLD_SIZE = DP $((WORLD_SIZE / MODEL_PARALLEL)) x TP $TP x PP $PP x CP $CP" >&2
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
echo "torchrun.sh: ${command[*]}" >&2
exec "${command[@]}"
