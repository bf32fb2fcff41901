#!/usr/bin/env bash
# bench/gpu_check.sh DIR [--cpu]: the GPU check of issue 14 (bench/gpu_check.py), under 8 minutes
# on one GPU; --cpu is its dry run on the CPU at tiny sizes (~45 s on 2 idle cores; its budget,
# 330 s, leaves room for a busy machine).
#
# Needs only a python3 with PyTorch (CUDA build on a GPU) and the project's light dependencies
# (numpy, pandas, pyarrow, PyYAML). What is missing of pydantic and DeepSpeed (and theirs) is
# installed from the wheels in .whl/ into a temporary target dir, with no registry: see README,
# "GPU check". Writes DIR/log.txt (everything) and DIR/figures.txt (name=value lines).
# Exit status: that of bench/gpu_check.py (1: a section failed), 124 if it ran out of time.
set -uo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: bench/gpu_check.sh DIR [--cpu] [bench/gpu_check.py options]" >&2
    exit 2
fi
DIR=$1
shift
MODE=gpu
if [[ ${1:-} == --cpu ]]; then
    MODE=cpu
    shift
fi
EXTRA=("$@")  # passed on to bench/gpu_check.py (--sections, --trial-counts, --trial-epochs, --budget-s)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
LOG=$DIR/log.txt
: >"$LOG"
: >"$DIR/figures.txt"
cd "$ROOT" || exit 2

say() { echo "$*" | tee -a "$LOG"; }

missing() {  # the imports this python lacks, of those the check needs
    "$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("torch", "numpy", "pandas", "pyarrow", "yaml", "pydantic", "deepspeed", "hjson")
               if importlib.util.find_spec(m) is None))
EOF
}

NEED=$(missing)
if [[ -n $NEED ]]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        SITE=${MSA_SITE:-/tmp/msa-site}
        say "missing: $NEED; installing .whl/*.whl into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            .whl/*.whl 2>&1 | tee -a "$LOG"
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        NEED=$(missing)
    fi
    if [[ -n $NEED ]]; then
        say "bench/gpu_check.sh: $PY lacks: $NEED (put their wheels in .whl/, see README 'GPU check')"
        exit 2
    fi
fi

"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import sys
from importlib.metadata import version
print(f"python {sys.version.split()[0]} at {sys.executable}")
for name in ("torch", "numpy", "pandas", "pyarrow", "PyYAML", "pydantic", "pydantic-core", "typing-extensions",
             "deepspeed", "hjson"):
    print(f"{name} {version(name)}")
EOF

if [[ $MODE == cpu ]]; then
    LIMIT=345
    ARGS=(--cpu)
else
    LIMIT=450
    ARGS=()
fi
say "bench/gpu_check.py --out $DIR ${ARGS[*]} (limit ${LIMIT} s)"
timeout -k 10 "$LIMIT" "$PY" -u bench/gpu_check.py --out "$DIR" "${ARGS[@]}" "${EXTRA[@]}" 2>&1 | tee -a "$LOG"
RC=${PIPESTATUS[0]}
say "bench/gpu_check.py exited with $RC; figures in $DIR/figures.txt"
exit "$RC"
