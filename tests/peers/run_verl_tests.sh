#!/usr/bin/env bash
# Runs verl's OWN tests against this project's drop-ins, or checks the float64 oracles against
# verl's real code. verl's files are never copied into the project: the tests are extracted from a
# verl git mirror (or a verl checkout) into a temporary directory, next to tests/peers/verl_conftest.py.
#
#   bash tests/peers/run_verl_tests.sh 0.6.0 [--self-check] [--verl-src DIR] [-- PYTEST_ARGS...]
#       verl 0.6.0 tests/trainer/ppo/test_rollout_is.py, test_rollout_is_integration.py against
#       megatron_rollout_is.compute_rollout_importance_weights / compute_mismatch_metrics
#   bash tests/peers/run_verl_tests.sh head [--self-check] [--verl-src DIR] [-- PYTEST_ARGS...]
#       verl HEAD tests/trainer/ppo/test_rollout_corr.py, test_rollout_corr_integration.py against
#       compute_rollout_correction_and_rejection_mask, compute_offpolicy_metrics, compute_is_metrics,
#       SUPPORTED_ROLLOUT_RS_OPTIONS and RolloutCorrectionConfig of megatron_rollout_is
#   bash tests/peers/run_verl_tests.sh compare-head|compare-0.6.0 [ARGS...]
#       tests/peers/compare_oracle_with_verl.py (oracle vs verl's real helper)
#
# --self-check runs the same tests against verl's own helper (nothing swapped): all should pass.
# --verl-src DIR takes the tests from a verl checkout instead of the mirror.
# Environment: PEER_PROJECT (the checkout under test; default this script's repository, put on
# PYTHONPATH, not installed), PEER_VENV (default /tmp/verl-peer-venv, created on first use: torch
# 2.13.0 CPU and verl's light imports), VERL_WHEELS (default /tmp/wheels: verl-0.6.0 and verl-0.9.1
# wheels; else pip downloads them), VERL_MIRROR (default /work/.mirror/verl-project+verl/repo),
# VERL_HEAD_REF (default HEAD; verl 1dda039b carries the helper of the 0.9.1 wheel).
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PROJECT=${PEER_PROJECT:-$REPO}
PEER_VENV=${PEER_VENV:-/tmp/verl-peer-venv}
VERL_WHEELS=${VERL_WHEELS:-/tmp/wheels}
VERL_MIRROR=${VERL_MIRROR:-/work/.mirror/verl-project+verl/repo}
VERL_HEAD_REF=${VERL_HEAD_REF:-HEAD}

usage() {
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
}

[ $# -ge 1 ] || usage
TARGET=$1
shift
case "$TARGET" in
    0.6.0) WHEEL_VERSION=0.6.0 REF=v0.6.0 TESTS=(test_rollout_is.py test_rollout_is_integration.py) ;;
    head) WHEEL_VERSION=0.9.1 REF=$VERL_HEAD_REF TESTS=(test_rollout_corr.py test_rollout_corr_integration.py) ;;
    compare-head) WHEEL_VERSION=0.9.1 ;;
    compare-0.6.0) WHEEL_VERSION=0.6.0 ;;
    *) usage ;;
esac

SELF_CHECK=0
VERL_SRC=
PYTEST_ARGS=()
if [[ $TARGET != compare-* ]]; then
    while [ $# -gt 0 ]; do
        case "$1" in
            --self-check) SELF_CHECK=1 ;;
            --verl-src) VERL_SRC=${2:?--verl-src needs a directory}; shift ;;
            --) shift; PYTEST_ARGS=("$@"); break ;;
            *) echo "unknown argument: $1" >&2; usage ;;
        esac
        shift
    done
fi

# The environment: one venv for both verl versions; each verl wheel in its own --target folder.
if [ ! -x "$PEER_VENV/bin/python" ]; then
    echo "creating $PEER_VENV (torch 2.13.0 CPU and verl's light imports; takes a few minutes)" >&2
    python3 -m venv "$PEER_VENV"
    "$PEER_VENV/bin/pip" install -q torch==2.13.0 numpy pytest packaging tensordict omegaconf ray \
        codetiming orjson "transformers<5"  # verl 0.6.0 imports a class transformers 5 removed
fi
VERL_DIR="$PEER_VENV/verl-$WHEEL_VERSION"
if [ ! -d "$VERL_DIR/verl" ]; then
    "$PEER_VENV/bin/pip" install -q --no-deps --target "$VERL_DIR" --find-links "$VERL_WHEELS" "verl==$WHEEL_VERSION"
fi
export PYTHONPATH="$PROJECT:$VERL_DIR"

if [[ $TARGET == compare-* ]]; then
    exec "$PEER_VENV/bin/python" "$REPO/tests/peers/compare_oracle_with_verl.py" "${TARGET#compare-}" "$@"
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/verl-peer-tests.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
for name in "${TESTS[@]}"; do
    if [ -n "$VERL_SRC" ]; then
        cp "$VERL_SRC/tests/trainer/ppo/$name" "$WORK/$name"
    else
        git -C "$VERL_MIRROR" show "$REF:tests/trainer/ppo/$name" > "$WORK/$name"
    fi
done
cp "$REPO/tests/peers/verl_conftest.py" "$WORK/conftest.py"
printf '[pytest]\n' > "$WORK/pytest.ini"

echo "verl $TARGET tests ($([ -n "$VERL_SRC" ] && echo "$VERL_SRC" || echo "$VERL_MIRROR @ $REF")), self-check=$SELF_CHECK" >&2
cd "$WORK"
status=0
# pytest prints the pass/fail counts on its last line.
PEER_VERL=$TARGET PEER_SELF_CHECK=$SELF_CHECK "$PEER_VENV/bin/python" -m pytest -c "$WORK/pytest.ini" \
    --rootdir "$WORK" -p no:cacheprovider -q -rfE ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"} "${TESTS[@]}" || status=$?
exit "$status"
