#!/usr/bin/env bash
# Wheels of the project's dependencies for a GPU machine that reaches no package registry
# (scripts/gpu_check.sh installs them there, each only where that machine lacks it).
#
#   scripts/gpu_wheels.sh                      # the packages gpu_check needs -> build/gpu_wheels
#   scripts/gpu_wheels.sh --set all            # every runtime dependency (to see the size)
#   scripts/gpu_wheels.sh --have have.txt      # leave out what the GPU machine has
#                                              #   (have.txt: `python3 -m pip list --format freeze` there)
#   scripts/gpu_wheels.sh --have none          # leave out nothing
#
# Always left out: torch, torchaudio (built for one torch), triton and the CUDA libraries (nvidia-*,
# cuda-*): the GPU machine's own CUDA PyTorch stays. Wheels are for --python-version (3.12) on
# manylinux x86_64, pinned to requirements.lock; deepspeed (an sdist) is built here as a pure wheel.
# ray's wheel (77 MB, more than a 64 MiB carry alone) loses its Java jars, RLlib, Serve and the LLM
# library, which nothing here uses (46 MB left). Prints the folder's size against the 64 MiB carry
# limit and the biggest wheels; exit 0 even when over (the report says so).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

OUT_DIR=build/gpu_wheels
SET=check
PYVER=3.12
HAVE=default
LIMIT_MIB=64
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --set) SET="$2"; shift 2 ;;
    --python-version) PYVER="$2"; shift 2 ;;
    --have) HAVE="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-$ROOT/.venv/bin/python}"
UV="${UV:-$ROOT/.venv/bin/uv}"
[ -x "$UV" ] || { echo "uv not found at $UV (make venv installs it)" >&2; exit 2; }
WORK="$(mktemp -d -t musiclm-gpu-wheels-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

# The packages gpu_check imports at run time (training, the tokenize job with Ray, generation);
# `--set all` takes the whole of pyproject.toml instead. ray[data], not ray[default]: the job's local
# Ray runs without a dashboard, and the dashboard's extras (virtualenv, py-spy, opencensus, ...) add
# 15 MiB that would not fit.
if [ "$SET" = check ]; then
  cat > "$WORK/in.txt" <<'EOF'
deepspeed
ray[data]
webdataset
soundfile
pyyaml
tqdm
numpy
scipy
scikit-learn
safetensors
transformers
tokenizers
fsspec
EOF
  SRC="$WORK/in.txt"
elif [ "$SET" = all ]; then
  SRC=pyproject.toml
else
  echo "--set must be check or all" >&2; exit 2
fi

# What the GPU machine already has. Default: the image of the GPU machines lent to this project's
# sessions (a CUDA PyTorch image, read 2026-11); --have FILE for another (pip list --format freeze).
if [ "$HAVE" = default ]; then
  cat > "$WORK/have.txt" <<'EOF'
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
charset-normalizer click cloudpickle contourpy cycler einops filelock fonttools frozenlist fsspec grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub idna jinja2 joblib kiwisolver markdown markdown-it-py
markupsafe matplotlib mdurl mpmath msgpack multidict networkx ninja numpy nvidia-ml-py packaging pandas
pillow pip prometheus-client propcache protobuf psutil py-cpuinfo pyarrow pygments pyparsing
python-dateutil pyyaml regex requests rich safetensors scikit-learn scipy sentencepiece setuptools
shellingham six sympy tensorboard tensorboard-data-server threadpoolctl tokenizers torch torchaudio tqdm
transformers triton typer typing-extensions urllib3 werkzeug wheel wrapt yarl zipp
EOF
elif [ "$HAVE" = none ]; then
  : > "$WORK/have.txt"
else
  cp "$HAVE" "$WORK/have.txt"
fi

echo "[gpu_wheels] resolving ($SET) for Python $PYVER, manylinux x86_64, pinned by requirements.lock"
"$UV" pip compile "$SRC" --python-version "$PYVER" --python-platform x86_64-manylinux_2_28 \
  -c requirements.lock --no-header --quiet -o "$WORK/resolved.txt"

# name==version, less the GPU machine's own torch stack and what --have lists
"$PY" - "$WORK/resolved.txt" "$WORK/have.txt" > "$WORK/pins.txt" <<'EOF'
import re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
have = {norm(re.split(r"[=<> ]", w, maxsplit=1)[0]) for w in open(sys.argv[2]).read().split() if w}
skip = re.compile(r"^(torch|torchaudio|torchvision|triton|nvidia-.*|cuda-.*)$")
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if "==" not in line:
        continue
    name, ver = line.split("==", 1)
    if skip.match(norm(name)) or norm(name) in have:
        continue
    print(f"{name.strip()}=={ver.strip().split(';')[0].strip()}")
EOF
echo "[gpu_wheels] $(wc -l < "$WORK/pins.txt") packages to carry"

rm -rf "$OUT_DIR"
mkdir -p "$OUT_DIR"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
while read -r pin; do
  if ! "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version "$PYVER" --implementation cp "${PLAT[@]}" -d "$OUT_DIR" "$pin" >/dev/null 2>&1; then
    # no binary wheel (deepspeed is an sdist): build a pure one here against the local torch
    echo "[gpu_wheels] building $pin"
    "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$OUT_DIR" "$pin"
  fi
done < "$WORK/pins.txt"

# ray without the parts nothing here uses (a wheel is a zip: rewrite it without them)
for whl in "$OUT_DIR"/ray-*.whl; do
  [ -e "$whl" ] || continue
  "$PY" - "$whl" <<'EOF'
import os, sys, zipfile
src = sys.argv[1]
drop = ("ray/jars/", "ray/rllib/", "ray/serve/", "ray/llm/")
tmp = src + ".slim"
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    for item in zin.infolist():
        if item.filename.startswith(drop):
            continue
        if item.filename.endswith(".dist-info/RECORD"):  # list only what is left
            keep = [l for l in zin.read(item).decode().splitlines() if not l.startswith(drop)]
            zout.writestr(item, "\n".join(keep) + "\n")
        else:
            zout.writestr(item, zin.read(item))
before = os.path.getsize(src)
os.replace(tmp, src)
print(f"[gpu_wheels] ray slimmed (no {', '.join(d.rstrip('/') for d in drop)}): "
      f"{before / 2**20:.1f} -> {os.path.getsize(src) / 2**20:.1f} MiB")
EOF
done

# the working tree travels with the wheels: tracked files plus untracked ones git does not ignore
TREE_BYTES=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
"$PY" - "$OUT_DIR" "$LIMIT_MIB" "${TREE_BYTES:-0}" <<'EOF'
import os, sys
d, limit, tree = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]) / 2**20
files = sorted(((os.path.getsize(os.path.join(d, f)), f) for f in os.listdir(d)), reverse=True)
total = sum(s for s, _ in files) / 2**20
verdict = "fits" if total + tree < limit else "OVER"
print(f"[gpu_wheels] {len(files)} wheels, {total:.1f} MiB in {d}; with the working tree ({tree:.1f} MiB) "
      f"{total + tree:.1f} MiB against the {limit:g} MiB carry limit: {verdict}")
for s, f in files[:8]:
    print(f"    {s / 2**20:7.1f} MiB  {f}")
EOF
