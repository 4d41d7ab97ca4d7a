#!/usr/bin/env bash
# Is this project ready for a GPU? bf16, ZeRO-2/3, NCCL, a GPU Ray actor and generation speed,
# measured in at most ~5 minutes with the machine's own CUDA PyTorch; one JSON file.
#
#   scripts/gpu_check.sh [--out FILE] [--wheels DIR] [--budget SECONDS] [-- extra options of
#                        `python -m musiclm.bench.gpu_check run`, e.g. --preset small --zero 2]
#
# --out     the JSON (default: $OUT/gpu_check.json where $OUT is set, else build/gpu_check.json)
# --wheels  wheels of the other dependencies, for a machine that reaches no registry
#           (default build/gpu_wheels, made by scripts/gpu_wheels.sh); each is installed into a
#           scratch folder only where this Python lacks its package: torch and the rest stay
# --budget  seconds for everything (default 280); each part also has a limit of its own
# PYTHON    the interpreter with CUDA PyTorch (default python3)
#
# Exit codes: 0 every part ok; 1 some part failed (the JSON says which and why); 3 no CUDA GPU
# (nothing run; the JSON says {"gpu": false, ...}); 2 bad arguments or no Python.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [ -n "${OUT:-}" ]; then OUT_FILE="$OUT/gpu_check.json"; else OUT_FILE="$ROOT/build/gpu_check.json"; fi
WHEELS="$ROOT/build/gpu_wheels"
BUDGET=280
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_FILE="$2"; shift 2 ;;
    --wheels) WHEELS="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
mkdir -p "$(dirname "$OUT_FILE")"

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: no Python ($PY)" >&2
  printf '{"gpu": false, "reason": "no Python interpreter %s"}\n' "$PY" > "$OUT_FILE"
  exit 2
fi

# the checkout's musiclm, without installing it
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
WHEEL_ARGS=()
[ -d "$WHEELS" ] && WHEEL_ARGS=(--wheels "$WHEELS")

# The budget is the Python side's; `timeout` is the backstop if a part ignores its own limit
# (the JSON is rewritten after every part, so what finished is kept).
timeout --kill-after=10 "$((BUDGET + 20))" \
  "$PY" -m musiclm.bench.gpu_check run --out "$OUT_FILE" --budget "$BUDGET" \
  ${WHEEL_ARGS[@]+"${WHEEL_ARGS[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
rc=$?
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
  echo "gpu_check: stopped at the hard limit of $((BUDGET + 20)) s; $OUT_FILE holds the parts that finished" >&2
fi
exit "$rc"
