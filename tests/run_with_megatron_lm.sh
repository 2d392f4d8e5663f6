#!/usr/bin/env bash
# Runs the test suite against the megatron/core of a Megatron-LM checkout instead of the
# installed megatron-core: the checkout goes on PYTHONPATH ahead of site-packages (subprocesses
# and spawned ranks inherit it).
#
#   tests/run_with_megatron_lm.sh CHECKOUT [PYTEST_ARGS...]
#   e.g. tests/run_with_megatron_lm.sh ../Megatron-LM -q -x tests/test_gpt_parallel.py
#
# PYTHON (default .venv/bin/python, else python3) needs the project's test dependencies
# (pip install -e '.[test]'); megatron-core 0.20 also needs triton (pip install triton), which its
# pipeline_parallel package imports unconditionally. Megatron-LM main declares Python >= 3.12;
# its megatron/core imports on 3.11 too.
set -euo pipefail

usage="usage: $0 MEGATRON_LM_CHECKOUT [PYTEST_ARGS...]"
if [[ $# -lt 1 ]]; then
    echo "$usage" >&2
    exit 2
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
if [[ ! -f "$1/megatron/core/__init__.py" ]]; then
    echo "error: $1 has no megatron/core/__init__.py; pass the root of a Megatron-LM checkout." >&2
    echo "$usage" >&2
    exit 2
fi
checkout="$(cd "$1" && pwd)"
shift
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$checkout:$repo${PYTHONPATH:+:$PYTHONPATH}"

# Fail here, with the fix, rather than in every test: megatron.core must import (with its
# pipeline schedules) and come from the checkout.
"$PYTHON" - "$checkout" <<'PY'
import os
import sys
import warnings

warnings.simplefilter("ignore")
try:
    import megatron.core
    import megatron.core.pipeline_parallel  # noqa: F401
except ModuleNotFoundError as error:
    sys.exit(f"error: megatron.core needs the module {error.name!r} in {sys.executable}: pip install {error.name}")
location = os.path.realpath(megatron.core.__file__)
if not location.startswith(os.path.realpath(sys.argv[1]) + os.sep):
    sys.exit(f"error: megatron.core imports from {location}, not from the checkout {sys.argv[1]}.")
print(f"megatron-core {megatron.core.__version__} from {os.path.dirname(location)}")
PY

cd "$repo"
exec "$PYTHON" -m pytest "$@"
