#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded default (one machine, local Ray, DeepSpeed on CPU).
#   DEMO_SCALE=small (200 clips, default) or full (1,000 clips: the first user's corpus size)
#   DEMO_MINUTES=N   wall-clock training budget of every model (train.max_minutes; default: 3 for
#                    MuLaN and the codec, side by side, and 2.5 for each stage LM, so that the whole
#                    demo fits 20 minutes on 2 cores); DEMO_STAGE_MINUTES=N sets the stage LMs' alone,
#                    DEMO_SEMANTIC_MINUTES / DEMO_COARSE_MINUTES / DEMO_FINE_MINUTES one stage's
#   DEMO_GEN_SECONDS=N  seconds generated per held-out caption at the end (default 5)
#   DEMO_EVAL_CAPTIONS=N held-out captions generated and evaluated at the end (default 8)
#   DEMO_UNTIL=N     stop after step N (e.g. 3: the trained MuLaN and codec); rerun to go on
#   DEMO_CHAIN=0|1   end with `musiclm eval chain` (style and tempo at each link, BPM sweep,
#                    temperature x cond_scale grid; ~10 min): default 1 at full scale, 0 at small
# Every step is resumable: rerunning skips finished shards and resumes training from checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}

case "${DEMO_SCALE:-small}" in
  # CODEC_STEPS: the codec's cosine horizon (train.max_steps). At 1,000 clips the budget is set so
  # that MuLaN (300 steps, launch/configs/mulan.yaml) and the codec stop at their step caps, not
  # at the wall clock: a rerun then resumes instead of training another budget on top
  small) CLIPS=200 CODEC_STEPS=1000 CHAIN=${DEMO_CHAIN:-0} ;;
  full)  CLIPS=1000 CODEC_STEPS=2800 CHAIN=${DEMO_CHAIN:-1} ;;
  *) echo "DEMO_SCALE must be small or full, got '${DEMO_SCALE}'" >&2; exit 2 ;;
esac
MINUTES=${DEMO_MINUTES:-3}
STAGE_MINUTES=${DEMO_STAGE_MINUTES:-${DEMO_MINUTES:-2.5}}
DATA=data/rapbeats
MODELS=models/demo
TOK=launch/configs/demo/tokenizers.yaml
PACKAGE=models/rapbeats-demo                # what `musiclm generate --model` loads
GEN_SECONDS=${DEMO_GEN_SECONDS:-5}
EVAL_CAPTIONS=${DEMO_EVAL_CAPTIONS:-8}
SECONDS=0
TIMES=runs/demo/timings.tsv  # wall time of every step, for the table at the end
mkdir -p runs/demo && : > "$TIMES"
CURRENT="" T0=0
close_step() { [ -z "$CURRENT" ] || printf '%s\t%d\n' "${CURRENT%%:*}" $((SECONDS - T0)) >> "$TIMES"; }
step() {
  close_step
  if [ -n "${DEMO_UNTIL:-}" ] && [ -n "$CURRENT" ] && [ "${CURRENT%%.*}" -ge "$DEMO_UNTIL" ]; then
    printf '\n=== [%4ds] stopped after step %s (DEMO_UNTIL); rerun without it to go on\n' "$SECONDS" "$DEMO_UNTIL"
    exit 0
  fi
  CURRENT="$*" T0=$SECONDS; printf '\n=== [%4ds] %s\n' "$SECONDS" "$*"; }
train() {  # train STAGE CONFIG NPROC RUN_DIR MINUTES [ARGS...]: the real deepspeed launcher
  local stage=$1 config=$2 nproc=$3 run_dir=$4 minutes=$5; shift 5
  deepspeed --num_gpus "$nproc" --master_port $((29500 + RANDOM % 1000)) launch/train.py \
    --stage "$stage" --config "$config" --deepspeed_config deepspeed_configs/cpu.json \
    --run_dir "$run_dir" --resume auto --set train.max_minutes="$minutes" "$@"
}

step "1. demo corpus: $CLIPS synthetic rap instrumentals (10 s, 24 kHz) -> $DATA"
if [ -f "$DATA/manifest.jsonl" ] && [ "$(wc -l < "$DATA/manifest.jsonl")" -eq "$CLIPS" ]; then
  echo "already there ($CLIPS clips); remove $DATA to regenerate"
else
  rm -rf "$DATA"
  musiclm demo-corpus --out "$DATA" --clips "$CLIPS" --seed 0 --workers 2 \
    --spectrograms "$DATA/spectrograms.png"
fi
musiclm manifest check "$DATA/manifest.jsonl"

step "2. audio shards (Ray): shards/rapbeats/audio"
python ray_jobs/pack_audio.py --manifest "$DATA/manifest.jsonl" --config "$TOK" --out shards

step "3. MuLaN and the SoundStream codec, side by side on the audio shards (deepspeed, ${MINUTES} min budget each)"
# one process each (OMP_NUM_THREADS=1): on two cores the two models train at the same time
mkdir -p runs/demo/codec
train codec launch/configs/codec.yaml 1 runs/demo/codec "$MINUTES" --set train.max_steps="$CODEC_STEPS" > runs/demo/codec/train.log 2>&1 &
CODEC_PID=$!
train mulan launch/configs/mulan.yaml 1 runs/demo/mulan "$MINUTES"
if ! wait "$CODEC_PID"; then
  tail -n 30 runs/demo/codec/train.log >&2; echo "codec training failed: runs/demo/codec/train.log" >&2; exit 1
fi
tail -n 3 runs/demo/codec/train.log
# MuLaN's export + retrieval eval and the codec's export + eval are independent: one core each
(
  musiclm export runs/demo/mulan --out runs/demo/mulan/export/mulan.safetensors
  python -c "from musiclm.mulan.checkpoint import load_mulan, save_mulan; \
save_mulan(load_mulan('runs/demo/mulan/export/mulan.safetensors'), '$MODELS/mulan')"  # self-contained dir
  musiclm eval retrieval --embedder "$MODELS/mulan" --data shards/rapbeats/audio --split eval \
    --out runs/demo/mulan/eval --quantizer fit --probe-splits train,eval
) > runs/demo/mulan/eval.log 2>&1 &
MULAN_EVAL_PID=$!
musiclm export runs/demo/codec --out "$MODELS/codec/model.safetensors"
# the codec must beat the random-weight EnCodec the demo used before it (log-mel L1 overall and
# below 150 Hz, where kick and 808 live), and its coarse levels must use more than a handful of
# codes (a collapsed codebook decodes every frame alike yet can beat a random codec): otherwise
# every acoustic token below is noise
musiclm eval codec --model "$MODELS/codec" --data shards/rapbeats/audio --split eval --max-clips 8 \
  --lowpass 4000 --out runs/demo/codec/eval --encodec random --require-below encodec --min-perplexity 4
if ! wait "$MULAN_EVAL_PID"; then
  tail -n 30 runs/demo/mulan/eval.log >&2; echo "MuLaN export/eval failed: runs/demo/mulan/eval.log" >&2; exit 1
fi
tail -n 40 runs/demo/mulan/eval.log

step "4. tokenizers: our SoundStream (step 3), MFCC k-means, MuLaN quantizer"
python ray_jobs/fit_kmeans.py    --manifest "$DATA/manifest.jsonl" --config "$TOK"
python ray_jobs/fit_quantizer.py --manifest "$DATA/manifest.jsonl" --config "$TOK"

step "5. token shards (Ray): shards/rapbeats/tokens-<fingerprint>"
python ray_jobs/tokenize.py --manifest "$DATA/manifest.jsonl" --config "$TOK" --out shards
TOKENS=$(ls -td shards/rapbeats/tokens-*/ | head -n 1); TOKENS=${TOKENS%/}  # the newest: this run's tokenizers
musiclm shards verify "$TOKENS" | head -n 30

step "6. stage transformers: semantic, coarse, fine (deepspeed, 2 processes, \
${DEMO_SEMANTIC_MINUTES:-$STAGE_MINUTES} / ${DEMO_COARSE_MINUTES:-$STAGE_MINUTES} / ${DEMO_FINE_MINUTES:-$STAGE_MINUTES} min)"
# the token layout the shards' tokenizers fix (e.g. the conditioning vocabulary is the fitted
# quantizer's: codebook_size: auto in $TOK)
read -r -a LAYOUT <<< "$(musiclm shards layout "$TOKENS" --as-set)"
echo "token layout of $TOKENS: ${LAYOUT[*]}"
# one run folder per token folder: refitted tokenizers (new shards) start new runs instead of
# resuming checkpoints trained on other tokens (the engine refuses that)
RUNS=runs/demo/$(basename "$TOKENS")
for stage in semantic coarse fine; do
  budget_var="DEMO_${stage^^}_MINUTES"
  train "$stage" "launch/configs/$stage.yaml" 2 "$RUNS/$stage" "${!budget_var:-$STAGE_MINUTES}" --shards "$TOKENS" --set "${LAYOUT[@]}"
  echo "loss curves: $RUNS/$stage/loss.png"
done

step "7. package: stages + codec + tokenizers + model card -> $PACKAGE"
musiclm package --semantic "$RUNS/semantic" --coarse "$RUNS/coarse" --fine "$RUNS/fine" \
  --tokenizers "$TOK" --codec "$MODELS/codec" --tokens "$TOKENS" --out "$PACKAGE" --name rapbeats-demo \
  | tail -n 20

step "8. generate and evaluate: ${EVAL_CAPTIONS} held-out captions x 4 candidates x ${GEN_SECONDS} s -> runs/demo/report/report.md"
# The semantic stage prompted with training clips: does it copy them? (the paper's memorization analysis)
musiclm eval memorization --model "$PACKAGE" --shards "$TOKENS" --clips 64 --prompt-seconds 2 \
  --continuation-seconds 3 --threads 1 --out runs/demo/eval/memorization | tail -n 5
# Generation for held-out captions (runs/demo/report/generated/: every candidate in generation order,
# scores and rerank order in index.json; reruns reuse them), then the report: first the trivial
# baselines every model must beat, then MCC, tag KL, style, tempo, FAD/KID and memorization, each
# with its N and a 95 % interval, against real clips, other-caption and unconditional generations.
# Two generation processes with one torch thread each: on two cores that beats one process with two
# threads (the demo's models are too small for intra-op parallelism to pay).
musiclm eval report --model "$PACKAGE" --manifest "$DATA/manifest.jsonl" --captions "$EVAL_CAPTIONS" \
  --num-samples 4 --duration "$GEN_SECONDS" --out runs/demo/report --workers 2 \
  --codec-eval runs/demo/codec/eval/codec_eval.json --retrieval runs/demo/mulan/eval/retrieval.json \
  --memorization runs/demo/eval/memorization/memorization.json --threads 1 | tail -n 40
if [ "$CHAIN" = 1 ]; then
  # Where along caption -> MuLaN -> conditioning tokens -> semantic tokens -> audio is the caption lost?
  musiclm eval chain --model "$PACKAGE" --shards "$TOKENS" --report runs/demo/report/report.json \
    --out runs/demo/chain --audio-sweep-samples 2 --audio-seconds 6 --threads 1 | tail -n 60
fi

close_step
printf '\n=== [%4ds] done: wall time and steps per model\n' "$SECONDS"
python -m musiclm.train.report --timings "$TIMES" runs/demo/mulan runs/demo/codec "$RUNS/semantic" "$RUNS/coarse" "$RUNS/fine" \
  | tee runs/demo/summary.md
echo "tensorboard --logdir runs/demo"
echo "report: runs/demo/report/report.md; music: runs/demo/report/generated/ (index.json: scores, rerank order); try:"
echo "  musiclm generate \"dark trap beat with 808s and bells, 70 BPM\" --model $PACKAGE --duration 20 --out out/"
