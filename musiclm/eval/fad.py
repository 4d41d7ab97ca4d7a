"""``musiclm eval fad``: Fréchet Audio Distance and Kernel Inception Distance between two sets of audio.

Both compare the distribution of per-segment embeddings of generated audio with that of real
(held-out) audio; lower is closer. The embedding is the pretrained musicnn tagger's 200-d
penultimate layer on 1-s segments (:mod:`musiclm.eval.musicnn`), a network independent of the MuLaN
that reranks generations. Every figure comes with the number of clips and segments it rests on.

* FAD (Kilgour et al. 2019): fit a Gaussian to each set, ``|mu_r - mu_g|^2 + tr(S_r) + tr(S_g) -
  2 tr((S_r^1/2 S_g S_r^1/2)^1/2)``. The matrix square roots come from symmetric eigen-decompositions
  (negative eigenvalues of rounding clipped to 0), which stays finite for the singular covariances of
  sets with fewer segments than dimensions, where ``scipy.linalg.sqrtm(S_r S_g)`` returns complex
  noise. FAD is biased upwards for small sets (it shrinks as N grows): compare figures at equal N.
* KID (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimate of the squared MMD with
  the polynomial kernel ``k(x, y) = (x.y / d + 1)^3``. Unbiased at any size, so it is the figure to
  read for small sets. Sets of at most ``subset_size`` segments are compared whole (one estimate);
  larger ones through ``subsets`` random subsets of ``subset_size`` segments each (mean, and the std
  over subsets as the KID paper reports). Its expectation is 0 for identical distributions, so a
  small negative value is noise, not an error.
* 95 % intervals over *clips* (a clip's segments stay together): KID's by percentile bootstrap
  (:func:`musiclm.eval.stats.bootstrap_ci`), FAD's by delete-a-group jackknife
  (:func:`musiclm.eval.stats.jackknife_ci`: a bootstrap resample repeats clips, which raises FAD as
  a smaller set does, so its percentile interval would lie above the figure); and ``floor``: FAD/KID
  between two halves of the real clips, what the metrics read for two samples of one distribution
  at half the size (FAD's floor is higher than at full size for the same reason).

    musiclm eval fad --real data/demo/manifest.jsonl --generated runs/generate --out runs/eval_fad
    musiclm eval fad --real DIR_OF_WAVS --generated DIR_OF_WAVS --weights /path/to/musicnn/MSD_musicnn
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from musiclm.eval.stats import bootstrap_ci, jackknife_ci
from musiclm.logs import get_logger

log = get_logger(__name__)

__all__ = [
    "gaussian_stats",
    "frechet_distance",
    "fad_score",
    "kid_score",
    "embedding_metrics",
    "list_audio",
    "evaluate_fad",
    "add_arguments",
    "run_from_args",
    "main",
]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif", ".m4a", ".opus", ".webm")
Clips = Sequence[np.ndarray]  # one [segments, D] array per clip


def _stack(clips: Clips | np.ndarray) -> np.ndarray:
    """[N, D] float64 from a [N, D] array or a list of [segments, D] arrays (one per clip)."""
    if isinstance(clips, np.ndarray):
        x = clips
    else:
        arrays = [np.asarray(c, dtype=np.float64).reshape(-1, np.shape(c)[-1]) for c in clips]
        if not arrays:
            raise ValueError("no embeddings: the set is empty")
        x = np.concatenate(arrays)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be [N, D] with N > 0, got shape {x.shape}")
    return x


def gaussian_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (N - 1 normalisation) of [N, D] embeddings, float64."""
    x = _stack(x)
    if len(x) < 2:
        raise ValueError("a covariance needs at least 2 embeddings")
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2), squared, as FID/FAD
    define it. ``tr((S1 S2)^1/2)`` as ``sum sqrt(eig(S1^1/2 S2 S1^1/2))`` (a symmetric PSD matrix with
    the same eigenvalues as S1 S2). Rounding below 0 is clipped to 0."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shapes differ: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    r1 = _psd_sqrt(sigma1)
    m = r1 @ sigma2 @ r1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    return max(d, 0.0)


def fad_score(real: Clips | np.ndarray, generated: Clips | np.ndarray) -> float:
    """FAD between two embedding sets (arrays [N, D] or lists of per-clip [segments, D])."""
    return frechet_distance(*gaussian_stats(_stack(real)), *gaussian_stats(_stack(generated)))


def _poly_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> np.ndarray:
    return (x @ y.T * gamma + coef0) ** degree


def _mmd2_from_kernels(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased squared MMD: off-diagonal means within each set minus twice the cross mean."""
    m, n = len(kxx), len(kyy)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    )


def _poly_mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree: int, gamma: float, coef0: float) -> float:
    k = lambda a, b: _poly_kernel(a, b, degree, gamma, coef0)
    return _mmd2_from_kernels(k(x, x), k(y, y), k(x, y))


def kid_score(
    real: Clips | np.ndarray,
    generated: Clips | np.ndarray,
    *,
    subset_size: int = 1000,
    subsets: int = 100,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int = 0,
) -> dict:
    """Unbiased KID: ``{"value", "std", "subsets", "subset_size"}``. Both sets whole when neither has
    more than ``subset_size`` embeddings (``std`` None), else the mean over ``subsets`` subsets of
    ``min(subset_size, N_real, N_generated)`` drawn without replacement from each set."""
    x, y = _stack(real), _stack(generated)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"embedding sizes differ: {x.shape[1]} vs {y.shape[1]}")
    if len(x) < 2 or len(y) < 2:
        raise ValueError("KID needs at least 2 embeddings per set")
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    if max(len(x), len(y)) <= subset_size:
        return {
            "value": _poly_mmd2_unbiased(x, y, degree, gamma, coef0),
            "std": None,
            "subsets": 1,
            "subset_size": None,
        }
    size = min(subset_size, len(x), len(y))
    rng = np.random.default_rng(seed)
    vals = [
        _poly_mmd2_unbiased(
            x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)], degree, gamma, coef0
        )
        for _ in range(subsets)
    ]
    return {"value": float(np.mean(vals)), "std": float(np.std(vals)), "subsets": subsets, "subset_size": size}


def _counts(clips: Clips) -> dict:
    return {"clips": len(clips), "segments": int(sum(len(c) for c in clips))}


# Up to this many segments in both sets together, the bootstrap of KID reuses one precomputed kernel
# matrix (8 * 4000^2 bytes = 128 MB); above it every resample draws one subset of 1000 per set.
_KERNEL_CACHE_SEGMENTS = 4000


def _kid_bootstrap_statistic(real: list[np.ndarray], generated: list[np.ndarray], seed: int):
    """(statistic, real clip ids, generated clip ids) for :func:`bootstrap_ci`: the whole-set KID of
    resampled clips. A resample repeats clips; pairs of segments from two copies of one clip are left
    out of the within-set means (they would pair a segment with itself, or with its own clip more
    often than the data does), so on a resample without repeats it is exactly the unbiased KID."""
    z = np.concatenate([_stack(real), _stack(generated)])
    lens = [len(c) for c in real] + [len(c) for c in generated]
    offsets = np.cumsum([0] + lens)
    gamma = 1.0 / z.shape[1]
    rng = np.random.default_rng(seed)
    cache = _poly_kernel(z, z, 3, gamma, 1.0) if len(z) <= _KERNEL_CACHE_SEGMENTS else None

    def kern(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return cache[np.ix_(a, b)] if cache is not None else _poly_kernel(z[a], z[b], 3, gamma, 1.0)

    def expand(clip_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        seg = np.concatenate([np.arange(offsets[c], offsets[c + 1]) for c in clip_ids])
        clip = np.repeat(clip_ids, [lens[c] for c in clip_ids])
        inst = np.repeat(np.arange(len(clip_ids)), [lens[c] for c in clip_ids])
        if len(seg) > 1000:  # large sets: one random subset of 1000 segments per resample
            keep = rng.choice(len(seg), 1000, replace=False)
            seg, clip, inst = seg[keep], clip[keep], inst[keep]
        return seg, clip, inst

    def within(seg: np.ndarray, clip: np.ndarray, inst: np.ndarray) -> float:
        same_copy = inst[:, None] == inst[None, :]
        valid = (clip[:, None] != clip[None, :]) | (same_copy & (seg[:, None] != seg[None, :]))
        return float(kern(seg, seg)[valid].mean()) if valid.any() else float("nan")

    def stat(r: np.ndarray, g: np.ndarray) -> float:
        (rs, rc, ri), (gs, gc, gi) = expand(r), expand(g + len(real))
        return within(rs, rc, ri) + within(gs, gc, gi) - 2 * float(kern(rs, gs).mean())

    return stat, np.arange(len(real)), np.arange(len(generated))


def embedding_metrics(
    real: Clips, generated: Clips, *, n_boot: int = 200, jackknife_groups: int = 50, seed: int = 0, floor: bool = True
) -> dict:
    """FAD and KID between per-clip embedding lists, each with a 95 % interval over clips and the
    clip/segment counts; ``floor``: the same between two halves of the real clips (>= 4 clips).

    KID: percentile bootstrap over clips of the whole-set unbiased estimate (one random subset of
    1000 segments per set when the sets are large; same expectation as the subset mean), pairs from
    two copies of one clip left out. FAD: delete-a-group jackknife over clips (normal interval),
    because FAD grows as the number of distinct clips shrinks and a bootstrap resample repeats clips
    (its percentile interval lies above the figure). FAD depends on N: compare systems at equal N."""
    real, generated = [np.asarray(c) for c in real], [np.asarray(c) for c in generated]
    if not real or not generated:
        raise ValueError(f"empty set: {len(real)} real clips, {len(generated)} generated clips")
    t0 = time.perf_counter()
    fad = jackknife_ci(fad_score, real, generated, groups=jackknife_groups)
    kid = kid_score(real, generated, seed=seed)
    kid_stat, r_units, g_units = _kid_bootstrap_statistic(real, generated, seed)
    kid_ci = bootstrap_ci(kid_stat, r_units, g_units, n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {
        "fad": {"value": fad["value"], "ci95": fad["ci95"], "se": fad["se"], "jackknife_groups": fad["groups"]},
        "kid": {**kid, "ci95": kid_ci["ci95"], "n_boot": kid_ci["n_boot"]},
        "real": _counts(real),
        "generated": _counts(generated),
        "dim": int(real[0].shape[-1]),
    }
    if floor and len(real) >= 4:
        order = np.random.default_rng(seed).permutation(len(real))
        a, b = [real[i] for i in order[: len(real) // 2]], [real[i] for i in order[len(real) // 2 :]]
        out["floor"] = {
            "what": "real clips split in two halves at random",
            "fad": fad_score(a, b),
            "kid": kid_score(a, b, seed=seed)["value"],
            "halves": [_counts(a), _counts(b)],
        }
    out["metric_seconds"] = round(time.perf_counter() - t0, 3)
    return out


# --------------------------------------------------------------------------------------------
# audio sets
# --------------------------------------------------------------------------------------------


def list_audio(source: str, split: str | None = "eval") -> list[dict]:
    """Clips of a folder (audio files below it, sorted) or a manifest (``.jsonl``; only ``split``
    unless it is None/"all") -> ``[{"id", "audio", "start", "end"}]``."""
    if os.path.isdir(source):
        files = sorted(
            os.path.join(d, f) for d, _, fs in os.walk(source) for f in fs if f.lower().endswith(AUDIO_EXTENSIONS)
        )
        return [{"id": os.path.relpath(f, source), "audio": f, "start": None, "end": None} for f in files]
    if not os.path.isfile(source):
        raise FileNotFoundError(f"{source}: neither an audio folder nor a manifest")
    from musiclm.data.manifest import read_manifest

    return [
        {"id": c.id, "audio": c.audio, "start": c.start, "end": c.end}
        for c in read_manifest(source)
        if split in (None, "all") or c.split == split
    ]


def _embed_set(tagger, items: list[dict], segment_seconds: float, layer: str) -> tuple[list[np.ndarray], list]:
    from musiclm.audio import load_audio
    from musiclm.eval.musicnn import SR

    clips, skipped = [], []
    for it in items:
        try:
            wav, _ = load_audio(it["audio"], SR, start=it["start"], end=it["end"], allow_silent=True)
        except Exception as e:  # a broken file is listed, not fatal
            skipped.append({"id": it["id"], "reason": str(e)})
            continue
        clips.append(tagger.embed(wav, SR, segment_seconds=segment_seconds, layer=layer).numpy())
    return clips, skipped


def evaluate_fad(
    real: str,
    generated: str,
    *,
    weights: str | None = None,
    split: str | None = "eval",
    segment_seconds: float = 1.0,
    layer: str = "penultimate",
    n_boot: int = 200,
    seed: int = 0,
    out: str | None = None,
) -> dict:
    """FAD/KID of the audio in ``generated`` (a folder) against ``real`` (a folder or a manifest's
    ``split``) on musicnn segment embeddings -> a JSON-able dict (also ``out/fad.json``)."""
    from musiclm.eval.musicnn import MusicnnTagger

    t0 = time.perf_counter()
    tagger = MusicnnTagger.from_pretrained(weights)
    sets = {}
    skipped = {}
    for name, source, sp in (("real", real, split), ("generated", generated, None)):
        items = list_audio(source, sp)
        if not items:
            raise ValueError(f"{name} set {source}: no audio" + (f" in split {sp!r}" if sp else ""))
        sets[name], skipped[name] = _embed_set(tagger, items, segment_seconds, layer)
        log.info("fad: %s %d clips embedded (%d skipped)", name, len(sets[name]), len(skipped[name]))
    embed_seconds = time.perf_counter() - t0
    result = embedding_metrics(sets["real"], sets["generated"], n_boot=n_boot, seed=seed)
    result["real"]["source"] = real
    result["generated"]["source"] = generated
    result["embedding"] = {
        "model": tagger.name,
        "layer": layer,
        "dim": result["dim"],
        "segment_seconds": segment_seconds,
    }
    result["skipped"] = skipped
    result["seconds"] = {"embed": round(embed_seconds, 2), "total": round(time.perf_counter() - t0, 2)}
    if out:
        from musiclm.data import storage

        storage.makedirs(out)
        storage.write_json_atomic(storage.join(out, "fad.json"), result, indent=1)
    return result


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--real", required=True, help="real audio: a folder, or a manifest (.jsonl; see --split)")
    p.add_argument("--generated", required=True, help="generated audio: a folder (searched recursively)")
    p.add_argument("--split", default="eval", help="manifest split for --real ('all' for every clip)")
    p.add_argument("--weights", default=None, help="musicnn safetensors or TF checkpoint folder (default: MTT)")
    p.add_argument("--segment-seconds", type=float, default=1.0)
    p.add_argument("--layer", default="penultimate", choices=["penultimate", "max_pool", "mean_pool"])
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for KID's 95 %% interval")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch and BLAS threads (0 = their defaults)")
    p.add_argument("--out", default=None, help="folder for fad.json")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    from musiclm.eval.stats import limit_threads

    limit_threads(args.threads)
    try:
        result = evaluate_fad(
            args.real,
            args.generated,
            weights=args.weights,
            split=args.split,
            segment_seconds=args.segment_seconds,
            layer=args.layer,
            n_boot=args.n_boot,
            seed=args.seed,
            out=args.out,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"eval fad: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(add_arguments(argparse.ArgumentParser(prog="python -m musiclm.eval.fad")).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
