#!/usr/bin/env bash
# The whole pipeline on a cluster, as one recipe: corpus on S3 -> audio shards -> MuLaN + codec ->
# tokenizers -> token shards -> semantic, coarse, fine -> a package on S3.
#
#   launch/pipeline.sh --manifest s3://bucket/corpus/manifest.jsonl --prefix s3://bucket/musiclm \
#       [--hostfile launch/hostfile] [--runs /shared/musiclm-runs] [options] [-- extra launch/train.py args]
#
# Steps, in this order (--steps "a b ..." runs a subset; STEPS):
#   audio       ray job: ray_jobs/pack_audio.py    the corpus -> PREFIX/shards/DATASET/audio
#   encoders    deepspeed: MuLaN and the SoundStream codec on the audio shards (--parallel: side by side),
#               exported to PREFIX/models/mulan/ and PREFIX/models/codec/
#   tokenizers  ray jobs: ray_jobs/fit_kmeans.py, ray_jobs/fit_quantizer.py
#               -> PREFIX/models/kmeans.safetensors, PREFIX/models/quantizer/
#   tokens      ray job: ray_jobs/tokenize.py      -> PREFIX/shards/DATASET/tokens-<hash of the tokenizers>
#   stages      deepspeed: semantic, coarse, fine on the token shards (--parallel: side by side, each on
#               its own node set with --hosts-<stage>)
#   package     musiclm package -> PREFIX/models/package (--out), loadable from S3 by
#               MusicLM.from_pretrained / `musiclm generate --model s3://...`
#
# Where things live:
#   * S3 (or any s3:// store; AWS_ENDPOINT_URL for MinIO/Ceph): the manifest and audio (input), the audio
#     shards, the token shards, the tokenizer models (codec, MuLaN, k-means, quantizer: loaders copy them
#     into $MUSICLM_CACHE on each machine), the tokenizers config the jobs read, the package.
#   * A shared file system (--runs, default runs/pipeline; the same path on every training node): the
#     DeepSpeed run folders with their checkpoints, TensorBoard logs and the launcher logs. DeepSpeed
#     writes and resumes checkpoints through file paths and `launch/train.py --run_dir` takes no s3:// URL.
#
# Options (environment variables in brackets):
#   --manifest URL      the corpus manifest, local or s3:// (MANIFEST; required for audio, tokenizers, tokens)
#   --prefix URL        where everything this recipe writes goes: s3://bucket/prefix (PREFIX; required)
#   --dataset NAME      folder name under PREFIX/shards (DATASET; default: the manifest's folder name)
#   --runs DIR          shared run folder (RUNS; default runs/pipeline)
#   --configs DIR       mulan.yaml codec.yaml semantic.yaml coarse.yaml fine.yaml (CONFIGS; default launch/configs)
#   --tokenizers FILE   tokenizers config (TOKENIZERS; default launch/configs/demo/tokenizers.yaml): its
#                       acoustic and mulan sections become our codec and MuLaN, its model paths PREFIX/models/...
#   --hostfile FILE     DeepSpeed hostfile: train on its nodes (HOSTFILE); without one, --num_gpus processes here
#   --launcher ssh|loopback  ssh (default): the deepspeed launcher reaches the nodes by ssh/pdsh. loopback:
#                       every hostfile node is started on this machine (--no_ssh --node_rank i, master
#                       127.0.0.1): the multi-node code path on one machine, for tests (LAUNCHER)
#   --hosts-NAME A@B    node set of one trained model (mulan, codec, semantic, coarse, fine), DeepSpeed
#                       --include syntax; with --parallel the models train side by side on their sets
#   --num_gpus N        processes per model without a hostfile (NUM_GPUS; default 1 on CPU)
#   --ds FILE           DeepSpeed config (DS_CONFIG; default deepspeed_configs/zero2.json, cpu.json without a GPU)
#   --workers N         model replicas of each Ray job (WORKERS; default: the job's, one per GPU or CPU)
#   --out URL           the package (OUT; default PREFIX/models/package)
#   --parallel          encoders side by side, stages side by side
#   RAY_ADDRESS         the Ray head's job API, e.g. http://127.0.0.1:8265 through `ssh -L 8265:127.0.0.1:8265 head`;
#                       with token auth also RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (a 0600 file). Unset: the
#                       jobs run here on a local Ray (python ray_jobs/X.py).
#
# Credentials stay out of the jobs' runtime env: only AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION and
# AWS_REGION are handed to each job. Ray nodes and training nodes need their own credentials (an instance role, or
# AWS_* in the environment they were started with; the deepspeed ssh launcher exports the lines of ~/.deepspeed_env).
#
# Resumable: rerunning skips what is complete (the audio shards' index.json, the exported encoders and fitted
# tokenizers on S3, a stage run's .pipeline-done marker) and continues the rest: the Ray jobs skip the shards
# they already wrote, training resumes from its newest checkpoint (--resume auto). Delete an output to redo it.
# Every command is printed before it runs (lines starting with "+").
set -euo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."

MANIFEST=${MANIFEST:-}
PREFIX=${PREFIX:-}
DATASET=${DATASET:-}
RUNS=${RUNS:-runs/pipeline}
CONFIGS=${CONFIGS:-launch/configs}
TOKENIZERS=${TOKENIZERS:-launch/configs/demo/tokenizers.yaml}
HOSTFILE=${HOSTFILE:-}
LAUNCHER=${LAUNCHER:-ssh}
NUM_GPUS=${NUM_GPUS:-}
DS_CONFIG=${DS_CONFIG:-}
WORKERS=${WORKERS:-}
OUT=${OUT:-}
STEPS=${STEPS:-"audio encoders tokenizers tokens stages package"}
PARALLEL=0
declare -A HOSTS=()
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --manifest) MANIFEST=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --dataset) DATASET=$2; shift 2 ;;
    --runs) RUNS=$2; shift 2 ;;
    --configs) CONFIGS=$2; shift 2 ;;
    --tokenizers) TOKENIZERS=$2; shift 2 ;;
    --hostfile) HOSTFILE=$2; shift 2 ;;
    --launcher) LAUNCHER=$2; shift 2 ;;
    --hosts-mulan | --hosts-codec | --hosts-semantic | --hosts-coarse | --hosts-fine) HOSTS[${1#--hosts-}]=$2; shift 2 ;;
    --num_gpus) NUM_GPUS=$2; shift 2 ;;
    --ds) DS_CONFIG=$2; shift 2 ;;
    --workers) WORKERS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --parallel) PARALLEL=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

die() { echo "pipeline: $*" >&2; exit 2; }
# paths given relative to the caller's folder (the script runs from the repository root)
abspath() { case "$1" in "" | /* | *://*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }
RUNS=$(abspath "$RUNS") CONFIGS=$(abspath "$CONFIGS") TOKENIZERS=$(abspath "$TOKENIZERS")
HOSTFILE=$(abspath "$HOSTFILE") DS_CONFIG=$(abspath "$DS_CONFIG") MANIFEST=$(abspath "$MANIFEST")
[[ $PREFIX == s3://* ]] || die "--prefix must be an s3:// URL (got '${PREFIX}')"
PREFIX=${PREFIX%/}
[[ $LAUNCHER == ssh || $LAUNCHER == loopback ]] || die "--launcher is ssh or loopback, got '$LAUNCHER'"
[[ -z $HOSTFILE || -f $HOSTFILE ]] || die "no hostfile $HOSTFILE"
for step in $STEPS; do
  case $step in audio | encoders | tokenizers | tokens | stages | package) ;; *) die "unknown step '$step'" ;; esac
done
wants() { [[ " $STEPS " == *" $1 "* ]]; }

PY=${PYTHON:-python}
[[ -x .venv/bin/python ]] && PY=.venv/bin/python
bin() { if [[ -x .venv/bin/$1 ]]; then echo ".venv/bin/$1"; else echo "$1"; fi; }
DEEPSPEED=$(bin deepspeed) RAY=$(bin ray) MUSICLM=$(bin musiclm)
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  DS_CONFIG=${DS_CONFIG:-deepspeed_configs/cpu.json}
  NUM_GPUS=${NUM_GPUS:-1}
else
  DS_CONFIG=${DS_CONFIG:-deepspeed_configs/zero2.json}
  NUM_GPUS=${NUM_GPUS:-$("$PY" -c "import torch; print(torch.cuda.device_count())")}
fi

DATASET=${DATASET:-$(basename "$(dirname "${MANIFEST:-/dataset/x}")")}
SHARDS=$PREFIX/shards
AUDIO=$SHARDS/$DATASET/audio
MODELS=$PREFIX/models
OUT=${OUT:-$MODELS/package}
TOK_LOCAL=$RUNS/tokenizers.yaml       # the package step reads it here
TOK_URL=$PREFIX/config/tokenizers.yaml # the Ray jobs read it here
LOGS=$RUNS/logs
mkdir -p "$LOGS"

# --------------------------------------------------------------------------------------------- helpers
exec 3>&2  # commands are printed here, also from models training in the background (--parallel)
run() { echo "+ $*" >&3; "$@"; }
step() { printf '\n=== [%4ds] %s\n' "$SECONDS" "$*"; }
skip() { echo "complete: $* (delete it to redo this step)"; }
exists() { "$PY" -c "import sys; from musiclm.data import storage; sys.exit(0 if storage.exists(sys.argv[1]) else 1)" "$1"; }
free_port() { "$PY" -c "from musiclm.net import free_port; print(free_port())"; }
need_manifest() { [[ -n $MANIFEST ]] || die "step $1 needs --manifest"; }

# job SCRIPT ARGS...: a Ray job through the job API (RAY_ADDRESS), else a local Ray driver here
RUNTIME_ENV=$("$PY" -c "import json, os; print(json.dumps({'env_vars': {k: os.environ[k] for k in \
('AWS_ENDPOINT_URL', 'AWS_ENDPOINT_URL_S3', 'AWS_DEFAULT_REGION', 'AWS_REGION') if os.environ.get(k)}}))")
job() {
  local script=$1; shift
  local args=("$@")
  [[ -n $WORKERS ]] && args+=(--workers "$WORKERS")
  if [[ -n ${RAY_ADDRESS:-} ]]; then
    run "$RAY" job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$RUNTIME_ENV" \
      -- python "ray_jobs/$script" "${args[@]}"
  else
    run "$PY" "ray_jobs/$script" "${args[@]}"
  fi
}

# train NAME CONFIG RUN_DIR [launch/train.py args]: the deepspeed launcher, on the hostfile's nodes
NODE_PIDS=()  # the loopback launchers running now
stop_nodes() {  # stop_nodes PID...: launchers this script started, and their children
  local pid
  for pid in "$@"; do
    pkill -TERM -P "$pid" 2>/dev/null || true
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap 'stop_nodes "${NODE_PIDS[@]}"; exit 130' INT TERM
train() {
  local name=$1 config=$2 run_dir=$3; shift 3
  local args=(launch/train.py --stage "$name" --config "$config" --deepspeed_config "$DS_CONFIG"
    --run_dir "$run_dir" --resume auto "$@" "${EXTRA[@]}")
  mkdir -p "$run_dir"
  if [[ -z $HOSTFILE ]]; then
    run "$DEEPSPEED" --num_gpus "$NUM_GPUS" --master_port "$(free_port)" "${args[@]}"
  elif [[ $LAUNCHER == ssh ]]; then
    local include=()
    [[ -n ${HOSTS[$name]:-} ]] && include=(--include "${HOSTS[$name]}")
    # the port must be free on the first node: one per model, as launch/run_stages.sh does
    local port=$((29500 + $(printf '%s' "$name" | cksum | cut -d' ' -f1) % 400))
    run "$DEEPSPEED" --hostfile "$HOSTFILE" "${include[@]}" --master_port "$port" "${args[@]}"
  else
    loopback_nodes "$name" "${args[@]}"
  fi
}
loopback_nodes() {  # every node of the hostfile (or of --hosts-NAME) as a launcher on this machine
  local name=$1; shift
  local hostfile=$LOGS/hostfile.$name port pids=() i n status=0
  port=$(free_port)
  if [[ -n ${HOSTS[$name]:-} ]]; then
    local host pattern=""
    for host in ${HOSTS[$name]//@/ }; do pattern+="${pattern:+|}${host%%:*}"; done  # node names only
    grep -E "^[[:space:]]*(${pattern})[[:space:]]" "$HOSTFILE" > "$hostfile" || true
  else
    grep -vE '^[[:space:]]*(#|$)' "$HOSTFILE" > "$hostfile"
  fi
  n=$(wc -l < "$hostfile")
  ((n > 0)) || die "$name: no nodes in $hostfile"
  for ((i = 0; i < n; i++)); do
    local cmd=("$DEEPSPEED" --hostfile "$hostfile" --no_ssh --node_rank "$i" --master_addr 127.0.0.1
      --master_port "$port" "$@")
    echo "+ ${cmd[*]} > $LOGS/$name.node$i.log" >&3
    "${cmd[@]}" > "$LOGS/$name.node$i.log" 2>&1 &
    pids+=($!)
    NODE_PIDS+=($!)
  done
  for ((i = 0; i < n; i++)); do
    if ! wait -n "${pids[@]}"; then status=1; break; fi
  done
  if ((status)); then  # one node failed: the others would wait for it until the collective times out
    stop_nodes "${pids[@]}"
    for ((i = 0; i < n; i++)); do echo "--- $LOGS/$name.node$i.log" >&2; tail -n 25 "$LOGS/$name.node$i.log" >&2; done
    echo "pipeline: $name training failed" >&2
    return 1
  fi
  NODE_PIDS=()
  tail -n 2 "$LOGS/$name.node0.log"
}
# train_all "NAME CONFIG RUN_DIR [args]"...: one after another, or all at once with --parallel
train_all() {
  local spec pids=() names=() status=0
  for spec in "$@"; do
    read -r -a parts <<< "$spec"
    if ((PARALLEL)); then
      train "${parts[@]}" > "$LOGS/${parts[0]}.log" 2>&1 &
      pids+=($!) names+=("${parts[0]}")
      echo "${parts[0]}: training in the background, log $LOGS/${parts[0]}.log"
    else
      train "${parts[@]}"
    fi
  done
  local i
  for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
      status=1; tail -n 30 "$LOGS/${names[$i]}.log" >&2; echo "pipeline: ${names[$i]} training failed" >&2
    fi
  done
  return $status
}

# ----------------------------------------------------------------------------- the tokenizers config
# The user's config with every model path set to PREFIX/models/...: written to the run folder (for the
# package step) and to S3 (for the Ray jobs, which may run where the run folder is not mounted).
step "tokenizers config: $TOKENIZERS -> $TOK_URL"
run "$PY" - "$TOKENIZERS" "$MODELS" "$TOK_LOCAL" "$TOK_URL" <<'EOF'
import sys

import yaml

from musiclm.config import load_config
from musiclm.data import storage

src, models, local, url = sys.argv[1:5]
cfg = load_config(src)
tok = cfg.setdefault("tokenizers", {})
tok["acoustic"] = {**(tok.get("acoustic") or {}), "type": "soundstream", "model": f"{models}/codec"}
tok["mulan"] = {**(tok.get("mulan") or {}), "type": "mulan", "model": f"{models}/mulan"}
tok.setdefault("semantic", {})["kmeans"] = f"{models}/kmeans.safetensors"
quantizer = tok.get("quantizer")
quantizer = {"path": quantizer} if isinstance(quantizer, str) else dict(quantizer or {})
tok["quantizer"] = {**quantizer, "path": f"{models}/quantizer"}
text = yaml.safe_dump(cfg, sort_keys=False)
with open(local, "w") as f:
    f.write(text)
storage.write_text_atomic(url, text)
print(yaml.safe_dump({"tokenizers": tok}, sort_keys=False).rstrip())
EOF

# ----------------------------------------------------------------------------------------- the steps
if wants audio; then
  need_manifest audio
  step "audio: $MANIFEST -> $AUDIO (ray job)"
  if exists "$AUDIO/index.json"; then
    skip "$AUDIO/index.json"
  else
    job pack_audio.py --manifest "$MANIFEST" --config "$TOK_URL" --out "$SHARDS" --dataset "$DATASET"
  fi
fi

if wants encoders; then
  step "encoders: MuLaN and the SoundStream codec on $AUDIO (deepspeed) -> $MODELS/{mulan,codec}"
  specs=()
  if exists "$MODELS/mulan/config.json"; then skip "$MODELS/mulan"; else
    specs+=("mulan $CONFIGS/mulan.yaml $RUNS/mulan --shards $AUDIO"); fi
  if exists "$MODELS/codec/model.json"; then skip "$MODELS/codec"; else
    specs+=("codec $CONFIGS/codec.yaml $RUNS/codec --shards $AUDIO"); fi
  train_all "${specs[@]}"
  for spec in "${specs[@]}"; do
    case ${spec%% *} in
      mulan)  # a self-contained MuLaN folder (weights + text tower files), config.json uploaded last
        run "$MUSICLM" export "$RUNS/mulan" --out "$RUNS/mulan/export/mulan.safetensors" > /dev/null
        run "$PY" - "$RUNS/mulan/export" "$MODELS/mulan" <<'EOF'
import os
import sys

from musiclm.data import storage
from musiclm.mulan.checkpoint import load_mulan, save_mulan

export_dir, url = sys.argv[1:3]
local = save_mulan(load_mulan(os.path.join(export_dir, "mulan.safetensors")), os.path.join(export_dir, "mulan"))
files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, names in os.walk(local) for f in names)
for rel in sorted(files, key=lambda rel: rel == "config.json"):
    storage.put_file(os.path.join(local, rel), storage.join(url, *rel.split(os.sep)))
print(f"{url}: {len(files)} files")
EOF
        ;;
      codec)  # model.safetensors, then model.json (written last)
        run "$MUSICLM" export "$RUNS/codec" --out "$MODELS/codec/model.safetensors" > /dev/null ;;
    esac
  done
fi

if wants tokenizers; then
  need_manifest tokenizers
  step "tokenizers: semantic k-means and the MuLaN quantizer (ray jobs) -> $MODELS"
  if exists "$MODELS/kmeans.safetensors"; then skip "$MODELS/kmeans.safetensors"; else
    job fit_kmeans.py --manifest "$MANIFEST" --config "$TOK_URL"; fi
  if exists "$MODELS/quantizer/config.json" && exists "$MODELS/quantizer/quantizer.safetensors"; then
    skip "$MODELS/quantizer"; else
    job fit_quantizer.py --manifest "$MANIFEST" --config "$TOK_URL"; fi
fi

if wants tokens; then
  need_manifest tokens
  step "tokens: $MANIFEST -> $SHARDS/$DATASET/tokens-<hash> (ray job; resumes the shards already written)"
  job tokenize.py --manifest "$MANIFEST" --config "$TOK_URL" --out "$SHARDS" --dataset "$DATASET" \
    | tee "$LOGS/tokenize.log"
  # the folder the job wrote, from its one-line JSON summary: the stages train on it
  "$PY" -c "import sys; sys.path.insert(0, '.'); from ray_jobs.output import parse_summary; \
print(parse_summary(open(sys.argv[1]).read())['out_dir'])" "$LOGS/tokenize.log" > "$RUNS/tokens.url"
fi

TOKENS=""
if wants stages || wants package; then
  [[ -f $RUNS/tokens.url ]] || die "no $RUNS/tokens.url: run the tokens step first"
  TOKENS=$(cat "$RUNS/tokens.url")
  # one run folder per token folder: refitted tokenizers start new runs instead of resuming others
  STAGE_RUNS=$RUNS/$(basename "$TOKENS")
fi

if wants stages; then
  step "stages: semantic, coarse, fine on $TOKENS (deepspeed)"
  # the token layout the shards' tokenizers fix (vocabularies, levels, frame rates)
  layout=$(run "$MUSICLM" shards layout "$TOKENS" --as-set)
  read -r -a LAYOUT <<< "$layout"
  echo "token layout: ${LAYOUT[*]}"
  specs=()
  for stage in semantic coarse fine; do
    if [[ -f $STAGE_RUNS/$stage/.pipeline-done ]]; then skip "$STAGE_RUNS/$stage/.pipeline-done"; else
      specs+=("$stage $CONFIGS/$stage.yaml $STAGE_RUNS/$stage --shards $TOKENS ${LAYOUT[*]:+--set ${LAYOUT[*]}}"); fi
  done
  train_all "${specs[@]}"
  for spec in "${specs[@]}"; do touch "$STAGE_RUNS/${spec%% *}/.pipeline-done"; done
fi

if wants package; then
  step "package: $STAGE_RUNS/{semantic,coarse,fine} + tokenizers -> $OUT"
  run "$MUSICLM" package --semantic "$STAGE_RUNS/semantic" --coarse "$STAGE_RUNS/coarse" --fine "$STAGE_RUNS/fine" \
    --tokenizers "$TOK_LOCAL" --tokens "$TOKENS" --out "$OUT" --name "$DATASET"
fi

printf '\n=== [%4ds] done\n' "$SECONDS"
echo "try: musiclm generate \"a caption\" --model $OUT --duration 10 --out out/"
