#!/usr/bin/env bash
# `make demo`: the whole pipeline on the embedded default (one machine, local Ray, DeepSpeed on CPU).
# DEMO_SCALE=small (200 clips, default) or full (1,000 clips: the first user's corpus size).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

case "${DEMO_SCALE:-small}" in
  small) CLIPS=200 ;;
  full)  CLIPS=1000 ;;
  *) echo "DEMO_SCALE must be small or full, got '${DEMO_SCALE}'" >&2; exit 2 ;;
esac
DATA=data/rapbeats
SECONDS=0

step() { printf '\n=== [%4ds] %s\n' "$SECONDS" "$*"; }

step "1. demo corpus: $CLIPS synthetic rap instrumentals (10 s, 24 kHz) -> $DATA"
if [ -f "$DATA/manifest.jsonl" ] && [ "$(wc -l < "$DATA/manifest.jsonl")" -eq "$CLIPS" ]; then
  echo "already there ($CLIPS clips); remove $DATA to regenerate"
else
  musiclm demo-corpus --out "$DATA" --clips "$CLIPS" --seed 0 --workers 2 \
    --spectrograms "$DATA/spectrograms.png"
fi
musiclm manifest check "$DATA/manifest.jsonl"

step "done in ${SECONDS}s"
