"""Reference outputs of the ORIGINAL musicnn (TensorFlow) for tests/test_eval_metrics.py.

The PyTorch port in :mod:`musiclm.eval.musicnn` is checked against what the original package computes
on a few deterministic synthetic clips. The original needs TensorFlow 1.x-style graph code and an old
numpy, so it runs in its own virtual environment, never in the project's:

    python3.11 -m venv /tmp/tfenv
    /tmp/tfenv/bin/pip install "tensorflow-cpu==2.15.*" "librosa==0.10.*"   # numpy 1.26 comes with TF 2.15
    /tmp/tfenv/bin/pip install --no-deps musicnn==0.1.0                    # the package + its TF1 checkpoints
    /tmp/tfenv/bin/python scripts/musicnn_reference.py --out tests/data/musicnn_reference

(verified with tensorflow-cpu 2.15.1, librosa 0.10.2.post1, numpy 1.26.4, Python 3.11.7). Nothing in
the musicnn package is edited: its ``extractor`` already runs through ``tf.compat.v1`` with eager
execution disabled, which TF 2.15 still supports (TF >= 2.16 ships Keras 3, whose ``tf.compat.v1.layers``
no longer works). The script writes each clip as 16 kHz PCM-16 wav (so ``librosa.load`` does not
resample) and calls ``musicnn.extractor.extractor`` on it twice (with ``configuration.BATCH_SIZE``
raised so that one session call sees every patch, see ``main``): 3-s patches (the taggram, ``max_pool``
and ``penultimate`` features) and 1-s patches (``penultimate`` per second, what FAD uses). For the first
clip it also stores the original's input representation (``batch_data``'s log-compressed mel).

``make_clips`` uses numpy only, so the test imports it from this file and regenerates the same clips;
the SHA-256 of each clip's PCM is stored beside its outputs to catch a generator that drifted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import wave

import numpy as np

SR = 16000


def _pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def make_clips() -> dict[str, np.ndarray]:
    """Deterministic 16 kHz int16 test clips: name -> PCM. The first three are at moderate level;
    ``loud_sine`` is a full-scale 220 Hz tone whose mel power (~460) is far above what float16 can
    hold after the original's ``10000 *`` (65504): it checks that the port promotes to float32 there
    as numpy 1.x does."""
    clips = {}
    # click track at 90 BPM, 7 s: 5 ms decaying 2 kHz clicks, accents on the bar
    n = 7 * SR
    t = np.arange(n) / SR
    x = np.zeros(n)
    click = np.sin(2 * np.pi * 2000 * np.arange(int(0.03 * SR)) / SR) * np.exp(
        -np.arange(int(0.03 * SR)) / (0.005 * SR)
    )
    for k, start in enumerate(np.arange(0, 7, 60 / 90)):
        i = int(round(start * SR))
        seg = click[: n - i] * (0.5 if k % 4 == 0 else 0.25)
        x[i : i + len(seg)] += seg
    clips["click_90bpm"] = _pcm16(x)
    # chord pad, 7 s: C major then A minor, 4 harmonics per note, slow attack
    x = np.zeros(n)
    env = np.minimum(1.0, t / 0.5) * np.minimum(1.0, (7 - t) / 0.5)
    for lo, hi, notes in ((0.0, 3.5, (261.63, 329.63, 392.0)), (3.5, 7.0, (220.0, 261.63, 329.63))):
        m = (t >= lo) & (t < hi)
        for f in notes:
            for h in range(1, 5):
                x[m] += np.sin(2 * np.pi * f * h * t[m]) / (h * h)
    clips["chord_pad"] = _pcm16(0.08 * x * env)
    # noise bursts, 7 s: 120 ms bursts of low-passed white noise at seeded positions
    rng = np.random.default_rng(1234)
    x = np.zeros(n)
    for start in np.sort(rng.uniform(0, 6.8, 14)):
        i = int(start * SR)
        burst = rng.standard_normal(int(0.12 * SR))
        burst = np.convolve(burst, np.ones(4) / 4, mode="same") * np.exp(-np.arange(len(burst)) / (0.04 * SR))
        x[i : i + len(burst)] += 0.3 * burst[: n - i]
    clips["noise_bursts"] = _pcm16(x)
    # full-scale tone, 3.5 s (one patch): the log compression's float16 -> float32 promotion
    t = np.arange(int(3.5 * SR)) / SR
    clips["loud_sine"] = _pcm16(0.95 * np.sin(2 * np.pi * 220 * t))
    return clips


def pcm_sha256(pcm: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pcm, dtype="<i2").tobytes()).hexdigest()


def _write_wav(path: str, pcm: np.ndarray) -> None:
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SR)
        w.writeframes(np.ascontiguousarray(pcm, dtype="<i2").tobytes())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="tests/data/musicnn_reference")
    p.add_argument("--model", default="MTT_musicnn")
    args = p.parse_args(argv)

    import librosa
    import musicnn
    import tensorflow as tf
    from musicnn import configuration as config
    from musicnn.extractor import batch_data, extractor

    # extractor() runs config.BATCH_SIZE patches per session call and, for every call after the
    # first, appends the FIRST call's penultimate/cnn1-3 arrays again (a bug upstream: it unpacks
    # into backend_/midend*_ but concatenates penultimate_/cnn*_). One call for all patches of a
    # clip avoids it; inference batch-norm makes the batch size irrelevant to the outputs.
    config.BATCH_SIZE = 10_000

    os.makedirs(args.out, exist_ok=True)
    clips = make_clips()
    n3 = librosa.time_to_frames(3, sr=config.SR, n_fft=config.FFT_SIZE, hop_length=config.FFT_HOP) + 1
    meta = {
        "model": args.model,
        "tensorflow": tf.__version__,
        "librosa": librosa.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
        "musicnn_dir": os.path.dirname(musicnn.__file__),
        "clips": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, pcm) in enumerate(clips.items()):
            path = os.path.join(tmp, f"{name}.wav")
            _write_wav(path, pcm)
            with np.errstate(over="ignore", invalid="ignore"):
                taggram, labels, feats = extractor(path, model=args.model, input_length=3, extract_features=True)
                _, _, feats1 = extractor(path, model=args.model, input_length=1, extract_features=True)
            out = {
                "pcm_sha256": np.array(pcm_sha256(pcm)),
                "taggram": taggram.astype(np.float32),
                "tags_mean": taggram.mean(axis=0).astype(np.float32),
                "max_pool": np.asarray(feats["max_pool"], np.float32),
                "penultimate": np.asarray(feats["penultimate"], np.float32),
                "penultimate_1s": np.asarray(feats1["penultimate"], np.float32),
            }
            if i == 0:
                with np.errstate(over="ignore"):
                    _, rep = batch_data(path, n3, n3)
                out["input_mel"] = rep  # [frames, 96] float32 log10(10000 * float16(mel) + 1), as the original feeds it
            np.savez_compressed(os.path.join(args.out, f"{name}.npz"), **out)
            meta["clips"][name] = {
                "samples": len(pcm),
                "patches_3s": int(taggram.shape[0]),
                "segments_1s": int(out["penultimate_1s"].shape[0]),
                "finite": bool(np.isfinite(taggram).all()),
                "top_tags": [labels[j] for j in np.argsort(-out["tags_mean"])[:5]]
                if np.isfinite(taggram).all()
                else [],
            }
            print(name, meta["clips"][name], flush=True)
    meta["tag_names"] = list(labels)
    with open(os.path.join(args.out, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
