#!/usr/bin/env bash
# Train the three stage LMs (semantic, coarse, fine) on the same token shards.
#
#   launch/run_stages.sh [options] [-- extra launch/train.py args]
#
# Options (environment variables work too):
#   --ds FILE          DeepSpeed config (DS_CONFIG; default deepspeed_configs/zero2.json on GPU,
#                      deepspeed_configs/cpu.json without one)
#   --shards DIR|GLOB  token shards (SHARDS; default: each config's data.shards)
#   --configs DIR      folder with semantic.yaml coarse.yaml fine.yaml (CONFIGS; default launch/configs)
#   --num_gpus N       processes per stage on this machine (NUM_GPUS; CPU default 2)
#   --hostfile H       multi-node: run on the nodes of H (HOSTFILE)
#   --parallel         train the stages side by side instead of one after another: each stage on its
#                      own node set (--hosts-semantic/-coarse/-fine "node-a@node-b", DeepSpeed --include
#                      syntax, with --hostfile), or on this machine split between the stages
#   --stages "a b c"   which stages (STAGES; default "semantic coarse fine")
#
# Every stage resumes from its newest complete checkpoint (--resume auto), so re-running the script
# after a preemption continues where each stage stopped, at any world size (universal checkpoints).
# On a machine without a GPU, DS_ACCELERATOR=cpu and OMP_NUM_THREADS=1 are set (gloo backend).
set -euo pipefail
cd "$(dirname "$0")/.."

DS_CONFIG=${DS_CONFIG:-}
SHARDS=${SHARDS:-}
CONFIGS=${CONFIGS:-launch/configs}
NUM_GPUS=${NUM_GPUS:-}
HOSTFILE=${HOSTFILE:-}
STAGES=${STAGES:-"semantic coarse fine"}
PARALLEL=0
declare -A HOSTS=()
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ds) DS_CONFIG=$2; shift 2 ;;
    --shards) SHARDS=$2; shift 2 ;;
    --configs) CONFIGS=$2; shift 2 ;;
    --num_gpus) NUM_GPUS=$2; shift 2 ;;
    --hostfile) HOSTFILE=$2; shift 2 ;;
    --parallel) PARALLEL=1; shift ;;
    --stages) STAGES=$2; shift 2 ;;
    --hosts-semantic) HOSTS[semantic]=$2; shift 2 ;;
    --hosts-coarse) HOSTS[coarse]=$2; shift 2 ;;
    --hosts-fine) HOSTS[fine]=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python}
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
DEEPSPEED=${DEEPSPEED:-deepspeed}
[[ -x .venv/bin/deepspeed ]] && DEEPSPEED=.venv/bin/deepspeed

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  DS_CONFIG=${DS_CONFIG:-deepspeed_configs/cpu.json}
  NUM_GPUS=${NUM_GPUS:-2}
else
  DS_CONFIG=${DS_CONFIG:-deepspeed_configs/zero2.json}
fi

port_for() { echo $((29500 + $(printf '%s' "$1" | cksum | cut -d' ' -f1) % 400)); }

launch_stage() {
  local stage=$1 procs=$2 include=${3:-}
  local args=(--master_port "$(port_for "$stage")")
  if [[ -n "$HOSTFILE" ]]; then
    args+=(--hostfile "$HOSTFILE")
    [[ -n "${HOSTS[$stage]:-}" ]] && args+=(--include "${HOSTS[$stage]}")
  elif [[ -n "$include" ]]; then
    args+=(--include "$include")
  elif [[ -n "$procs" ]]; then
    args+=(--num_gpus "$procs")
  fi
  local train=(launch/train.py --stage "$stage" --config "$CONFIGS/$stage.yaml" --deepspeed_config "$DS_CONFIG" --resume auto)
  [[ -n "$SHARDS" ]] && train+=(--shards "$SHARDS")
  echo "== $stage: $DEEPSPEED ${args[*]} ${train[*]} ${EXTRA[*]}"
  "$DEEPSPEED" "${args[@]}" "${train[@]}" "${EXTRA[@]}"
}

if [[ $PARALLEL == 0 ]]; then
  for stage in $STAGES; do launch_stage "$stage" "$NUM_GPUS"; done
else
  # side by side: separate node sets with a hostfile (--hosts-<stage>), else this machine's GPUs
  # split evenly between the stages (--include localhost:<ids>); on CPU each stage gets NUM_GPUS/n processes
  mkdir -p runs
  read -r -a stage_list <<<"$STAGES"
  n_stages=${#stage_list[@]}
  if [[ -z "${DS_ACCELERATOR:-}" || "${DS_ACCELERATOR}" != cpu ]]; then
    total=${NUM_GPUS:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}
  else
    total=${NUM_GPUS}
  fi
  per=$(( total / n_stages > 0 ? total / n_stages : 1 ))
  pids=()
  i=0
  for stage in "${stage_list[@]}"; do
    include=""
    if [[ -z "$HOSTFILE" && "${DS_ACCELERATOR:-}" != cpu ]]; then
      include="localhost:$(seq -s, $((i * per)) $((i * per + per - 1)))"
    fi
    launch_stage "$stage" "$per" "$include" > "runs/run_stages.$stage.log" 2>&1 &
    pids+=($!)
    echo "$stage: pid ${pids[-1]}, log runs/run_stages.$stage.log"
    i=$((i + 1))
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  exit $status
fi
