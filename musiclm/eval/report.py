"""``musiclm eval report``: the evaluation a researcher reads, in one folder.

    musiclm eval report --model models/rapbeats-demo --manifest data/rapbeats/manifest.jsonl \\
        --captions 8 --num-samples 4 --duration 5 --out runs/demo/report \\
        [--codec-eval runs/demo/codec/eval/codec_eval.json] [--retrieval runs/demo/mulan/eval/retrieval.json] \\
        [--memorization runs/demo/memorization/memorization.json] [--runs RUN ...]
    musiclm eval report --model DIR --musiccaps musiccaps-public.csv --audio-dir ~/musiccaps --captions 100 ...

It writes ``report.md`` (and ``report.json``, PNGs, TensorBoard scalars + audio in ``tb/``):

1. **Does each model beat its trivial baseline?** (pass/fail) -- every stage's final eval loss
   (``eval/loss`` of its run's ``metrics.jsonl``) below the unigram entropy of its targets (computed
   from the train split of its token shards, per acoustic level: the model always knows which level
   comes next, so the trivial predictor is that level's unigram); MuLaN text->audio Recall@1 above
   chance (from ``--retrieval`` JSON, else recomputed on the report's held-out real clips); the
   codec's log-mel L1 (all and below 150 Hz) below the random-weight EnCodec's (``--codec-eval``
   JSON of ``musiclm eval codec``).
2. Generated vs real: N held-out captions (:mod:`musiclm.eval.generated`), ``--num-samples``
   candidates each, fixed seed; every metric for candidate 1 in generation order (**not reranked**)
   and for the reranked best, beside real clips, shuffled-caption generations and unconditional
   generations, each with its N and a 95 % interval (:mod:`musiclm.eval.stats`):
   MCC (:mod:`musiclm.eval.mcc`), tag KL (:mod:`musiclm.eval.tagkl`), style / mood accuracy
   (:mod:`musiclm.eval.style`), tempo (:mod:`musiclm.eval.audio_tempo`), FAD / KID
   (:mod:`musiclm.eval.fad`), memorization (``--memorization``: the JSON of ``musiclm eval
   memorization``), and the paper's MusicCaps figures as context.

Real clips are cut to their first ``--duration`` seconds, so real and generated audio are compared at
one length. The networks that grade are independent of the MuLaN that reranks, except MCC, which is
MuLaN by definition (hence graded un-reranked).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from musiclm.logs import get_logger

log = get_logger(__name__)

__all__ = [
    "PAPER_MUSICCAPS",
    "unigram_entropy",
    "stage_checks",
    "retrieval_check",
    "codec_check",
    "evaluate_report",
    "render_markdown",
    "memorization_table",
    "add_arguments",
    "run_from_args",
    "main",
]

STAGE_NAMES = ("semantic", "coarse", "fine")

# MusicLM paper (arXiv 2301.11325), Table 1, MusicCaps, as reported there (other embedding networks
# and tagger than ours: context for the scale of the numbers, not comparable figures).
PAPER_MUSICCAPS = {
    "source": "MusicLM (Agostinelli et al. 2023, arXiv 2301.11325), Table 1, MusicCaps, as reported",
    "MusicLM": {"FAD_Trill": 0.44, "FAD_VGG": 4.0, "KL": 1.01, "MCC": 0.51},
    "Mubert": {"FAD_Trill": 0.45, "FAD_VGG": 9.6, "KL": 1.58, "MCC": 0.32},
    "Riffusion": {"FAD_Trill": 0.76, "FAD_VGG": 13.4, "KL": 1.19, "MCC": 0.34},
}

SYSTEMS = {
    "real": "real clips (own caption)",
    "real_shuffled": "real clips, another clip's caption",
    "first": "generated, candidate 1 (not reranked)",
    "best": "generated, reranked best of N",
    "shuffled": "generated from another caption",
    "unconditional": "unconditional generation",
}


# --------------------------------------------------------------------------------------------
# 1. trivial baselines
# --------------------------------------------------------------------------------------------


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


def unigram_entropy(
    shard_dir: str,
    stage: str,
    *,
    coarse_levels: int,
    acoustic_levels: int,
    split: str = "train",
    max_samples: int | None = None,
) -> dict:
    """Unigram entropy (nats) of a stage's target tokens in ``split`` of a token-shard folder.

    ``nats``: semantic ids' entropy; for the acoustic stages the mean over the stage's levels of each
    level's code entropy (the model knows which level every position holds, so the trivial predictor
    is that level's unigram; levels have equal counts). ``joint_nats``: the entropy of (level, code)
    pairs, which is ``nats`` + log(levels) -- the looser baseline ``tests/train_utils.py`` uses."""
    from musiclm.data.shards import shard_reader

    if stage == "semantic":
        levels = None
    elif stage == "coarse":
        levels = list(range(coarse_levels))
    elif stage == "fine":
        levels = list(range(coarse_levels, acoustic_levels))
    else:
        raise ValueError(f"unknown stage {stage!r}")
    counts: dict[Any, Counter] = {}
    samples = 0
    for s in shard_reader(shard_dir, split, shuffle=0, rank=0, world_size=1):
        if levels is None:
            counts.setdefault("semantic", Counter()).update(np.asarray(s["semantic.npy"]).astype(np.int64).tolist())
        else:
            ac = np.asarray(s["acoustic.npy"]).astype(np.int64)
            for lv in levels:
                counts.setdefault(lv, Counter()).update(ac[lv].tolist())
        samples += 1
        if max_samples and samples >= max_samples:
            break
    if not samples:
        raise ValueError(f"{shard_dir}: no {split!r} samples")
    per = {k: _entropy(np.asarray(list(c.values()))) for k, c in counts.items()}
    joint = Counter({(k, code): n for k, c in counts.items() for code, n in c.items()})
    tokens = int(sum(sum(c.values()) for c in counts.values()))
    return {
        "nats": float(np.mean(list(per.values()))),
        "per_level": {str(k): round(v, 4) for k, v in per.items()},
        "joint_nats": _entropy(np.asarray(list(joint.values()))),
        "samples": samples,
        "tokens": tokens,
        "split": split,
        "shards": shard_dir,
    }


def _read_yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _run_stage(run_dir: str) -> str | None:
    cfg = _read_yaml(os.path.join(run_dir, "config.yaml"))
    stage = cfg.get("stage") or os.path.basename(os.path.normpath(run_dir))
    return stage if stage in STAGE_NAMES else None


def _resolve(path: str | None, roots: Sequence[str]) -> str | None:
    if not path:
        return None
    if os.path.isabs(path) or path.startswith(("s3://", "gs://")):
        return path if path.startswith(("s3://", "gs://")) or os.path.exists(path) else None
    for r in roots:
        p = os.path.join(r, path)
        if os.path.exists(p):
            return p
    return None


def stage_checks(
    package_config: dict, runs: Sequence[str] | None = None, shards: str | None = None, max_samples: int | None = None
) -> list[dict]:
    """One row per stage: its final ``eval/loss`` against the unigram entropy of its targets.

    Run folders: ``runs`` (stage from each run's ``config.yaml``), else the package's
    ``stages.<name>.run_dir``. Token shards: ``shards``, else the run's ``data.shards``, else the
    package's ``data.shards`` (relative paths against the working directory and the run folder)."""
    from musiclm.package import final_metrics

    tokens = package_config.get("tokens") or {}
    by_stage: dict[str, str] = {}
    for rd in runs or []:
        st = _run_stage(rd)
        if st is None:
            raise ValueError(
                f"--runs {rd}: cannot tell its stage (no 'stage:' in config.yaml, folder name not a stage)"
            )
        by_stage[st] = rd
    rows = []
    for name in STAGE_NAMES:
        meta = (package_config.get("stages") or {}).get(name) or {}
        run_dir = by_stage.get(name) or meta.get("run_dir")
        row: dict[str, Any] = {"model": f"{name} stage", "run": run_dir, "check": "eval loss < unigram entropy"}
        m = final_metrics(run_dir) if run_dir and os.path.isdir(run_dir) else {}
        loss = (m.get("eval/loss") or {}).get("value")
        row["value"] = loss
        row["step"] = (m.get("eval/loss") or {}).get("step")
        cfg = _read_yaml(os.path.join(run_dir, "config.yaml")) if run_dir else {}
        candidates = [shards] if shards else []
        candidates += list((cfg.get("data") or {}).get("shards") or [])
        candidates += list((package_config.get("data") or {}).get("shards") or [])
        roots = [os.getcwd()] + ([run_dir] if run_dir else [])
        shard_dir = next((p for p in (_resolve(c, roots) for c in candidates) if p), None)
        row["shards"] = shard_dir
        if shard_dir is not None:
            try:
                ent = unigram_entropy(
                    shard_dir,
                    name,
                    coarse_levels=int(tokens.get("coarse_levels", 4)),
                    acoustic_levels=int(tokens.get("acoustic_levels", 8)),
                    max_samples=max_samples,
                )
                row["baseline"] = ent["nats"]
                row["baseline_detail"] = ent
            except Exception as e:  # reported in the table, not fatal
                row["baseline"] = None
                row["why_not"] = f"unigram entropy: {e}"
        else:
            row["baseline"] = None
            row["why_not"] = "no token shards found (give --shards)"
        if loss is None:
            row["why_not"] = row.get("why_not") or f"no eval/loss in {run_dir}/metrics.jsonl (give --runs)"
        row["passed"] = None if loss is None or row.get("baseline") is None else bool(loss < row["baseline"])
        levels = (row.get("baseline_detail") or {}).get("per_level") or {}
        if name != "semantic" and levels:  # eval/loss/level_N of the run beside each level's entropy
            row["per_level"] = {
                lv: {"loss": (m.get(f"eval/loss/level_{lv}") or {}).get("value"), "entropy": h}
                for lv, h in levels.items()
            }
        rows.append(row)
    return rows


def retrieval_check(result: dict, source: str) -> dict:
    """MuLaN text->audio Recall@1 against chance (1/N) from a ``musiclm eval retrieval`` result."""
    t2a, chance = result.get("text_to_audio") or {}, result.get("chance") or {}
    r1, c1 = t2a.get("R@1"), chance.get("R@1")
    return {
        "model": "MuLaN",
        "check": f"text->audio Recall@1 > chance (N = {result.get('n')})",
        "value": r1,
        "baseline": c1,
        "median_rank": t2a.get("median_rank"),
        "chance_median_rank": chance.get("median_rank"),
        "source": source,
        "passed": None if r1 is None or c1 is None else bool(r1 > c1),
    }


def codec_check(result: dict, source: str) -> dict:
    """The codec (all levels) against the random-weight EnCodec at the matching bitrate on log-mel L1
    (all and below 150 Hz), :func:`musiclm.eval.codec.require_below`."""
    from musiclm.eval.codec import GATED_METRICS, require_below

    failures = require_below(result, "encodec")
    rows = result.get("rows") or []
    name, levels = (result.get("codec") or {}).get("type"), (result.get("codec") or {}).get("levels")
    ours = next((r for r in rows if r.get("system") == name and r.get("n_levels") == levels), {})
    base = next((r for r in rows if r.get("matches") == ours.get("levels")), {})
    return {
        "model": f"codec ({name})",
        "check": "log-mel L1 (all / < 150 Hz) < random EnCodec",
        "value": [ours.get(m) for m in GATED_METRICS],
        "baseline": [base.get(m) for m in GATED_METRICS],
        "source": source,
        "failures": failures,
        "passed": not failures,
    }


CODES_RATIO_MAX = 0.95  # log-mel L1 from own codes / from another clip's codes above this: codes ignored


def codec_codes_check(result: dict, source: str) -> dict | None:
    """The codec's decoder uses its codes: each eval clip decoded from its own codes beats the same
    clip decoded from another clip's (``codes_matter`` of ``musiclm eval codec``; the trivial
    baseline, a decoder that ignores its codes, scores 1)."""
    from musiclm.eval.codec import require_codes_matter

    cm = result.get("codes_matter") or {}
    if cm.get("ratio") is None:
        return None
    failures = require_codes_matter(result, CODES_RATIO_MAX)
    return {
        "model": f"codec ({(result.get('codec') or {}).get('type')})",
        "check": f"log-mel L1 own codes / another clip's codes < {CODES_RATIO_MAX:g}",
        "value": cm["ratio"],
        "baseline": 1.0,
        "source": source,
        "failures": failures,
        "passed": not failures,
    }


# --------------------------------------------------------------------------------------------
# 2. features of every clip
# --------------------------------------------------------------------------------------------


class _Features:
    """musicnn tags + 1-s penultimate embeddings, MuLaN audio embedding and two tempo estimates."""

    def __init__(self, tagger, embedder):
        self.tagger, self.embedder = tagger, embedder

    def __call__(self, wav, sr: int, mulan: bool = True) -> dict:
        import torch

        from musiclm.audio import resample
        from musiclm.data.music_analysis import estimate_tempo
        from musiclm.eval.audio_tempo import fourier_tempo

        w = torch.as_tensor(np.asarray(wav, dtype=np.float32))
        out = {
            "tags": self.tagger.tags(w, sr).numpy(),
            "segments": self.tagger.embed(w, sr, segment_seconds=1.0).numpy(),
            "tempo_project": estimate_tempo(w.numpy(), sr),
            "tempo_fourier": fourier_tempo(w.numpy(), sr),
        }
        if mulan:
            x = resample(w[None], sr, int(self.embedder.sample_rate))
            with torch.inference_mode():
                out["mulan"] = self.embedder.embed_audio(x)[0].float().numpy()
        return out


def _train_features(tagger, items, duration: float, cache_path: str) -> tuple[np.ndarray, list]:
    """Style-classifier features of training clips (mean/std of musicnn 1-s embeddings), cached."""
    import hashlib

    from musiclm.eval.generated import load_real
    from musiclm.eval.musicnn import SR
    from musiclm.eval.style import clip_features

    key = hashlib.sha1(json.dumps([[it.id, it.audio, it.start, it.end] for it in items] + [duration]).encode())
    key = key.hexdigest()[:16]
    if os.path.isfile(cache_path):
        z = np.load(cache_path, allow_pickle=False)
        if str(z["key"]) == key:
            return z["x"], [str(i) for i in z["ids"]]
    feats, ids = [], []
    for it in items:
        try:
            wav = load_real(it, SR, duration)
        except Exception as e:  # listed, not fatal
            log.warning("report: skipping training clip %s: %s", it.id, e)
            continue
        feats.append(clip_features(tagger.embed(wav, SR, segment_seconds=1.0)))
        ids.append(it.id)
    x = np.stack(feats) if feats else np.zeros((0, 400))
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    np.savez(cache_path, x=x, ids=np.asarray(ids), key=np.asarray(key))
    return x, ids


# --------------------------------------------------------------------------------------------
# 3. the report
# --------------------------------------------------------------------------------------------


def _perm_pairs(n_items: int, perm: Sequence[int]) -> list[int]:
    return [int(perm[i]) for i in range(n_items)]


def evaluate_report(
    model: str,
    out: str,
    *,
    manifest: str | None = None,
    musiccaps: str | None = None,
    audio_dir: str | None = None,
    split: str = "eval",
    captions: int = 8,
    num_samples: int = 4,
    duration: float = 5.0,
    seed: int = 0,
    unconditional: int | None = None,
    runs: Sequence[str] | None = None,
    shards: str | None = None,
    retrieval: str | None = None,
    codec_eval: str | None = None,
    memorization: str | None = None,
    classifier_clips: int | None = None,
    classifier_seed: int = 1234,
    real_clips: int | None = 200,
    tagger_weights: str | None = None,
    n_boot: int = 1000,
    tensorboard: bool = True,
    progress: bool = False,
    workers: int = 1,
) -> dict:
    """Generate (or reuse) the evaluation set, compute every metric, write ``out/report.md`` and
    ``out/report.json`` (+ PNGs, ``out/tb``). Returns the report dict."""
    from musiclm.eval import generated as gen
    from musiclm.eval.audio_tempo import tempo_agreement
    from musiclm.eval.fad import embedding_metrics
    from musiclm.eval.mcc import derangement, mcc
    from musiclm.eval.musicnn import SR as TAGGER_SR
    from musiclm.eval.musicnn import MusicnnTagger
    from musiclm.eval.style import clip_features, label_accuracy, train_classifier
    from musiclm.eval.tagkl import paired_tag_kl
    from musiclm.generate import MusicLM

    if (manifest is None) == (musiccaps is None):
        raise ValueError("give one evaluation set: --manifest or --musiccaps (with --audio-dir)")
    t_all = time.perf_counter()
    timings: dict[str, float] = {}
    os.makedirs(out, exist_ok=True)

    # -- evaluation set
    missing: list[str] = []
    if manifest is not None:
        real_items = gen.manifest_items(manifest, split)
        if not real_items:
            raise ValueError(f"{manifest}: no clips in split {split!r}")
        source = {"kind": "manifest", "path": manifest, "split": split}
    else:
        if not audio_dir:
            raise ValueError("--musiccaps needs --audio-dir (the folder of downloaded clips)")
        real_items, missing = gen.musiccaps_items(musiccaps, audio_dir)
        source = {"kind": "musiccaps", "csv": musiccaps, "audio_dir": audio_dir, "missing": missing}
    items = real_items[:captions]
    if real_clips:
        real_items = real_items[: max(int(real_clips), len(items))]

    # -- generation (or the saved set)
    t0 = time.perf_counter()
    lm = MusicLM.from_pretrained(model)
    timings["load_model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = gen.generate_eval_set(
        lm,
        items,
        os.path.join(out, "generated"),
        num_samples=num_samples,
        duration=duration,
        seed=seed,
        unconditional=unconditional,
        progress=progress,
        workers=workers,
    )
    timings["generate"] = time.perf_counter() - t0
    gen_dir = os.path.join(out, "generated")
    recs = index["items"]
    n = len(recs)
    perm = index["shuffle"]

    # -- features
    t0 = time.perf_counter()
    tagger = MusicnnTagger.from_pretrained(tagger_weights)
    embedder = lm.tokenizers.embedder
    feat = _Features(tagger, embedder)
    real_feats, real_used, skipped = [], [], []
    for it in real_items:
        try:
            wav = gen.load_real(it, TAGGER_SR, duration)
        except Exception as e:  # listed, not fatal
            skipped.append({"id": it.id, "reason": str(e)})
            continue
        real_feats.append(feat(wav.numpy(), TAGGER_SR))
        real_used.append(it)
    if not real_used:
        raise ValueError("no readable real clip in the evaluation set")
    real_by_id = {it.id: f for it, f in zip(real_used, real_feats)}

    def gfeat(rel: str) -> dict:
        wav, sr = gen.read_wav(os.path.join(gen_dir, rel))
        return feat(wav, sr)

    first = [gfeat(os.path.join(r["dir"], r["first"])) for r in recs]
    best = [
        first[i] if r["best"] == r["first"] else gfeat(os.path.join(r["dir"], r["best"])) for i, r in enumerate(recs)
    ]
    uncond_files = (index.get("unconditional") or {}).get("files") or []
    uncond = [gfeat(f) for f in uncond_files]
    timings["features"] = time.perf_counter() - t0

    import torch

    with torch.inference_mode():
        text_all = embedder.embed_text([it.caption for it in real_used]).float().numpy()
        text_gen = embedder.embed_text([r["caption"] for r in recs]).float().numpy() if recs else np.zeros((0, 1))
    audio_real = np.stack([f["mulan"] for f in real_feats])

    metrics: dict[str, Any] = {}
    sh = [int(perm[i]) for i in range(n)]  # generated from another caption: item i gets item sh[i]'s audio
    pr = derangement(len(real_used), seed)  # real clips with another clip's caption

    # -- MCC
    m: dict[str, Any] = {
        "real": mcc(text_all, audio_real, n_boot, seed),
        "real_shuffled": mcc(text_all, audio_real[pr], n_boot, seed),
    }
    if n:
        m["first"] = mcc(text_gen, np.stack([f["mulan"] for f in first]), n_boot, seed)
        m["best"] = mcc(text_gen, np.stack([f["mulan"] for f in best]), n_boot, seed)
        if n >= 2:
            m["shuffled"] = mcc(text_gen, np.stack([first[j]["mulan"] for j in sh]), n_boot, seed)
        k = min(n, len(uncond))
        if k:
            m["unconditional"] = mcc(text_gen[:k], np.stack([u["mulan"] for u in uncond[:k]]), n_boot, seed)
    metrics["mcc"] = m

    # -- tag KL against the real clip of the same caption
    kl: dict[str, Any] = {}
    pairs_real = [real_by_id.get(r["id"]) for r in recs]
    ok = [i for i, p in enumerate(pairs_real) if p is not None]
    if ok:
        rt = np.stack([pairs_real[i]["tags"] for i in ok])
        kl["first"] = paired_tag_kl(rt, np.stack([first[i]["tags"] for i in ok]), n_boot, seed)
        kl["best"] = paired_tag_kl(rt, np.stack([best[i]["tags"] for i in ok]), n_boot, seed)
        if n >= 2:
            kl["shuffled"] = paired_tag_kl(rt, np.stack([first[sh[i]]["tags"] for i in ok]), n_boot, seed)
        ku = [i for i in ok if i < len(uncond)]
        if ku:
            kl["unconditional"] = paired_tag_kl(
                np.stack([pairs_real[i]["tags"] for i in ku]), np.stack([uncond[i]["tags"] for i in ku]), n_boot, seed
            )
    if len(real_feats) >= 2:
        rtags = np.stack([f["tags"] for f in real_feats])
        kl["real_shuffled"] = paired_tag_kl(rtags, rtags[pr], n_boot, seed)
    metrics["kl"] = kl

    # -- style / mood classifiers trained on the real training clips
    t0 = time.perf_counter()
    labels_present = [f for f in ("style", "mood") if any(f in r["labels"] for r in recs)]
    classifiers: dict[str, Any] = {}
    if labels_present and manifest is not None:
        train_items = gen.manifest_items(manifest, "train")
        if classifier_clips:
            train_items = train_items[: int(classifier_clips)]
        x_train, train_ids = _train_features(
            tagger, train_items, duration, os.path.join(out, "cache", "classifier_features.npz")
        )
        train_by_id = {it.id: it for it in train_items}
        for fld in labels_present:
            rows = [i for i, cid in enumerate(train_ids) if fld in train_by_id[cid].labels]
            if len({train_by_id[train_ids[i]].labels[fld] for i in rows}) < 2:
                classifiers[fld] = {"skipped": f"fewer than 2 {fld} classes among the training clips"}
                continue
            clf = train_classifier(
                x_train[rows], [train_by_id[train_ids[i]].labels[fld] for i in rows], fld, seed=classifier_seed
            )
            res: dict[str, Any] = {"classifier": clf.describe()}

            def acc(feats: list[dict], wanted: list, clf=clf) -> dict:
                keep = [j for j, w in enumerate(wanted) if w is not None]
                if not keep:
                    return {"value": None, "ci95": None, "n": 0}
                pred = clf.predict(np.stack([clip_features(feats[j]["segments"]) for j in keep]))
                return label_accuracy(pred, [wanted[j] for j in keep], n_boot, seed)

            real_lab = [it.labels.get(fld) for it in real_used]
            res["real"] = acc(real_feats, real_lab)
            want = [r["labels"].get(fld) for r in recs]
            if n:
                res["first"] = acc(first, want)
                res["best"] = acc(best, want)
                if n >= 2:
                    res["shuffled"] = acc([first[j] for j in sh], want)
                k = min(n, len(uncond))
                if k:
                    res["unconditional"] = acc(uncond[:k], want[:k])
            res["chance"] = 1.0 / len(clf.classes)
            classifiers[fld] = res
    elif labels_present:
        classifiers = {f: {"skipped": "no training manifest (MusicCaps set)"} for f in labels_present}
    metrics["classifiers"] = classifiers
    timings["classifiers"] = time.perf_counter() - t0

    # -- tempo
    tempo: dict[str, Any] = {}
    bpm_real = [it.labels.get("bpm") for it in real_used]
    bpm_gen = [r["labels"].get("bpm") for r in recs]
    if any(b is not None for b in bpm_real + bpm_gen):
        for est in ("project", "fourier"):
            key = f"tempo_{est}"
            t: dict[str, Any] = {"real": tempo_agreement([f[key] for f in real_feats], _nan(bpm_real), n_boot, seed)}
            if n:
                t["first"] = tempo_agreement([f[key] for f in first], _nan(bpm_gen), n_boot, seed)
                t["best"] = tempo_agreement([f[key] for f in best], _nan(bpm_gen), n_boot, seed)
                if n >= 2:
                    t["shuffled"] = tempo_agreement([first[j][key] for j in sh], _nan(bpm_gen), n_boot, seed)
                k = min(n, len(uncond))
                if k:
                    t["unconditional"] = tempo_agreement([u[key] for u in uncond[:k]], _nan(bpm_gen[:k]), n_boot, seed)
            t["estimates"] = {
                "real": [f[key] for f in real_feats],
                "first": [f[key] for f in first],
                "best": [f[key] for f in best],
                "unconditional": [u[key] for u in uncond],
            }
            tempo[est] = t
        tempo["bpm"] = {"real": bpm_real, "generated": bpm_gen}
    metrics["tempo"] = tempo

    # -- FAD / KID against the held-out real clips
    t0 = time.perf_counter()
    fad: dict[str, Any] = {}
    real_seg = [f["segments"] for f in real_feats]
    for name, fs in (("first", first), ("best", best), ("unconditional", uncond)):
        if len(fs) >= 2 and len(real_seg) >= 2:
            fad[name] = embedding_metrics(
                real_seg, [f["segments"] for f in fs], n_boot=min(n_boot, 200), seed=seed, floor=name == "first"
            )
    metrics["fad"] = fad
    metrics["fad_by_style"] = fad_by_style(
        real_seg, [it.labels.get("style") for it in real_used], first, [r["labels"].get("style") for r in recs], seed
    )
    timings["fad"] = time.perf_counter() - t0

    # -- first table: trivial baselines
    t0 = time.perf_counter()
    checks = stage_checks(lm.config, runs=runs, shards=shards)
    if retrieval:
        with open(retrieval) as f:
            checks.append(retrieval_check(json.load(f), retrieval))
    else:
        from musiclm.eval.retrieval import retrieval_metrics

        checks.append(
            retrieval_check(
                retrieval_metrics(text_all, audio_real),
                f"recomputed on {len(real_used)} held-out real clips (first {duration:g} s)",
            )
        )
    if codec_eval:
        with open(codec_eval) as f:
            codec_result = json.load(f)
        checks.append(codec_check(codec_result, codec_eval))
        codes = codec_codes_check(codec_result, codec_eval)
        if codes is not None:
            checks.append(codes)
    else:
        checks.append(
            {
                "model": "codec",
                "check": "log-mel L1 < random EnCodec",
                "passed": None,
                "why_not": "no --codec-eval JSON; `musiclm eval codec --out DIR` writes DIR/codec_eval.json",
            }
        )
    if len(first) >= 2:
        checks.append(spread_check([f["segments"] for f in real_feats], [f["segments"] for f in first]))
    timings["baselines"] = time.perf_counter() - t0

    mem = None
    if memorization:
        with open(memorization) as f:
            mem = json.load(f)

    report: dict[str, Any] = {
        "model": model,
        "package": {
            "name": lm.config.get("name"),
            "fingerprint_hash": lm.config.get("fingerprint_hash"),
            "steps": {k: (v or {}).get("step") for k, v in (lm.config.get("stages") or {}).items()},
        },
        "eval_set": {
            **source,
            "captions": n,
            "real_clips": len(real_used),
            "skipped_real": skipped,
            "num_samples": num_samples,
            "duration": duration,
            "seed": seed,
            "unconditional": len(uncond),
            "shuffle": sh,
            "index": os.path.join(gen_dir, gen.INDEX_FILE),
        },
        "checks": checks,
        "metrics": metrics,
        "memorization": mem,
        "memorization_source": memorization,
        "paper": PAPER_MUSICCAPS,
        "tagger": {"name": tagger.name, "tags": len(tagger.tag_names)},
        "mulan": getattr(embedder, "name", type(embedder).__name__),
    }
    t0 = time.perf_counter()
    pngs = _plots(out, report, index, gen_dir, real_used, duration)
    report["files"] = {"pngs": pngs}
    timings["plots"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_all
    report["seconds"] = {k: round(v, 1) for k, v in timings.items()}
    from musiclm.data import storage

    md = render_markdown(report)
    storage.write_bytes_atomic(os.path.join(out, "report.md"), md.encode())
    if tensorboard:
        report["files"]["tensorboard"] = _tensorboard(os.path.join(out, "tb"), report, index, gen_dir, md)
    report["files"].update(markdown=os.path.join(out, "report.md"), json=os.path.join(out, "report.json"))
    storage.write_json_atomic(os.path.join(out, "report.json"), _jsonable(report), indent=1)
    return report


SPREAD_MIN = 0.1  # generated spread / real spread below this: every caption decodes to nearly the same audio


def spread_check(real_segments: list, gen_segments: list) -> dict:
    """Do the generations differ from one another as real clips do? The spread of a set is the
    mean standard deviation over clips of its clip features (musicnn mean/std over 1-s segments),
    standardised by the real clips' statistics, so real clips have about 1 and a set of one clip
    repeated 0 (the trivial baseline: a decoder that ignores its codes). Passes above
    :data:`SPREAD_MIN` x the real spread."""
    from musiclm.eval.style import clip_features

    real = np.stack([clip_features(x) for x in real_segments])
    gen = np.stack([clip_features(x) for x in gen_segments])
    mu, sd = real.mean(0), real.std(0) + 1e-8
    spread_real = float(((real - mu) / sd).std(0).mean())
    spread_gen = float(((gen - mu) / sd).std(0).mean())
    ratio = spread_gen / max(spread_real, 1e-12)
    return {
        "model": "generation (stages + codec)",
        "check": f"spread of generated clips / of real clips > {SPREAD_MIN:g} (musicnn)",
        "value": ratio,
        "baseline": 0.0,
        "detail": {"generated": spread_gen, "real": spread_real, "generated_clips": len(gen), "real_clips": len(real)},
        "passed": bool(ratio > SPREAD_MIN),
    }


def fad_by_style(real_seg: list, real_style: list, gen_feats: list[dict], gen_style: list, seed: int = 0) -> dict:
    """FAD of the generations for captions of a style against the real clips of that style, next
    to as many generations for captions of other styles against the same real clips (equal N: FAD
    falls as sets grow). Below it = the caption's style reached the audio. Per style and the mean."""
    from musiclm.eval.fad import fad_score

    rng = np.random.default_rng(seed)
    per: dict[str, Any] = {}
    for s in sorted({x for x in real_style if x is not None}):
        rs = [real_seg[i] for i, x in enumerate(real_style) if x == s]
        gm = [gen_feats[i]["segments"] for i, x in enumerate(gen_style) if x == s]
        go = [gen_feats[i]["segments"] for i, x in enumerate(gen_style) if x is not None and x != s]
        if len(rs) < 2 or len(gm) < 2 or len(go) < len(gm):
            continue
        go = [go[i] for i in sorted(rng.choice(len(go), len(gm), replace=False))]
        per[s] = {
            "matched": round(fad_score(rs, gm), 3),
            "other_style": round(fad_score(rs, go), 3),
            "real_clips": len(rs),
            "generated_clips": len(gm),
        }
    if not per:
        return {}
    return {
        "per_style": per,
        "matched_mean": round(float(np.mean([v["matched"] for v in per.values()])), 3),
        "other_style_mean": round(float(np.mean([v["other_style"] for v in per.values()])), 3),
        "styles_below": int(sum(v["matched"] < v["other_style"] for v in per.values())),
    }


def _nan(values: Sequence) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


# --------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------


def _f(v, fmt: str = ".3f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, (list, tuple)):
        return " / ".join(_f(x, fmt) for x in v)
    return format(v, fmt)


def _ci_cell(d: dict | None, fmt: str = ".3f") -> str:
    if not d or d.get("value") is None:
        return "–"
    ci = d.get("ci95")
    s = _f(d["value"], fmt)
    if ci:
        s += f" [{_f(ci[0], fmt)}, {_f(ci[1], fmt)}]"
    return s


def _pass(p) -> str:
    return {True: "**pass**", False: "**FAIL**", None: "not checked"}[p]


def _system_table(title: str, rows: dict, cols: list[tuple[str, Any]], order=tuple(SYSTEMS)) -> list[str]:
    lines = [title, "", "| | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for key in order:
        if key not in rows:
            continue
        lines.append(f"| {SYSTEMS.get(key, key)} | " + " | ".join(fn(rows[key]) for _, fn in cols) + " |")
    return lines + [""]


def render_markdown(r: dict) -> str:
    """``report.md`` from the report dict."""
    es = r["eval_set"]
    pkg = r["package"]
    lines = [
        f"# Evaluation report: {pkg.get('name') or r['model']}",
        "",
        f"Model `{r['model']}` (tokenizer fingerprint {pkg.get('fingerprint_hash')}, steps "
        + ", ".join(f"{k} {v}" for k, v in (pkg.get("steps") or {}).items())
        + f"). Evaluation set: {es['captions']} held-out captions of "
        + (f"`{es['path']}` (split {es['split']})" if es["kind"] == "manifest" else f"MusicCaps CSV `{es['csv']}`")
        + f", {es['num_samples']} candidates each, {es['duration']:g} s, seed {es['seed']}; "
        f"{es['unconditional']} unconditional generations; {es['real_clips']} held-out real clips "
        f"(first {es['duration']:g} s of each) as the real reference.",
        "",
    ]
    if es.get("missing"):
        lines += [
            f"MusicCaps rows without a downloaded clip ({len(es['missing'])}, skipped): "
            + ", ".join(es["missing"][:20])
            + (" ..." if len(es["missing"]) > 20 else ""),
            "",
        ]
    if es.get("skipped_real"):
        lines += [f"Unreadable real clips (skipped): {', '.join(s['id'] for s in es['skipped_real'])}", ""]

    lines += [
        "## Does each model beat its trivial baseline?",
        "",
        "| model | check | figure | trivial baseline | result |",
        "|---|---|---:|---:|---|",
    ]
    for c in r["checks"]:
        val, base = c.get("value"), c.get("baseline")
        result = _pass(c.get("passed"))
        if c.get("passed") is None and c.get("why_not"):
            result += f" ({c['why_not']})"
        lines.append(f"| {c['model']} | {c['check']} | {_f(val)} | {_f(base)} | {result} |")
    per_level = [
        f"{c['model']}: "
        + ", ".join(f"level {lv} {_f(d['loss'])} vs {_f(d['entropy'])}" for lv, d in c["per_level"].items())
        for c in r["checks"]
        if c.get("per_level") and any(d["loss"] is not None for d in c["per_level"].values())
    ]
    if per_level:
        lines += ["", "Per acoustic level (eval loss vs that level's unigram entropy): " + "; ".join(per_level) + "."]
    lines += [
        "",
        "Stage losses are the last `eval/loss` (nats per target token) of each run's metrics.jsonl; the baseline is "
        "the unigram entropy of the stage's targets on the train split of its token shards (per acoustic level, "
        "averaged: the position fixes the level). MuLaN: Recall@1 of the caption's clip among N, chance 1/N. "
        "Codec: `musiclm eval codec` rows, all levels against the random-weight EnCodec at the matching bitrate.",
        "",
        "## Generated audio against real audio",
        "",
        "Intervals are 95 % bootstrap intervals over captions (clips), FAD's a jackknife interval over clips. "
        "*Candidate 1* is the first candidate in generation order (what the model gives without reranking); "
        "*reranked* is the best of N by MuLaN text-audio cosine. *From another caption* pairs item i with the "
        "generation for caption shuffle[i] (a derangement; same model, seed).",
        "",
    ]
    met = r["metrics"]
    lines += _system_table(
        "### MuLaN cycle consistency (cosine of caption and audio in MuLaN space; higher = closer)",
        met.get("mcc", {}),
        [("MCC [95 % CI]", _ci_cell), ("N", lambda d: str(d.get("n")))],
    )
    lines += [
        "Graded on candidate 1: reranking picks the candidate with the highest MCC, so the reranked row is "
        "what reranking buys, not an independent grade.",
        "",
    ]
    lines += _system_table(
        "### KL divergence of musicnn tag posteriors from the real clip of the same caption (lower = closer)",
        met.get("kl", {}),
        [
            ("KL per tag (Bernoulli, nats) [95 % CI]", lambda d: _ci_cell(d.get("bernoulli"), ".4f")),
            ("KL of normalised tags (nats) [95 % CI]", lambda d: _ci_cell(d.get("normalized"), ".4f")),
            ("N", lambda d: str(d.get("n"))),
        ],
    )
    lines += [
        "musicnn's 50 outputs are independent sigmoids: the first column averages the KL of each tag's "
        "Bernoulli distribution (real clip as P), the second normalises the 50 probabilities to one "
        "distribution, as the KL of multi-label taggers is usually computed. *Real clips, another clip's "
        "caption* here is the KL between two different real clips.",
        "",
    ]
    for fld, res in (met.get("classifiers") or {}).items():
        if "skipped" in res:
            lines += [f"### {fld.capitalize()} accuracy", "", f"Skipped: {res['skipped']}.", ""]
            continue
        clf = res["classifier"]
        lines += _system_table(
            f"### {fld.capitalize()} accuracy (classified {fld} = the caption's; chance {_f(res['chance'], '.3f')})",
            {k: v for k, v in res.items() if isinstance(v, dict) and "value" in v},
            [("accuracy [95 % CI]", _ci_cell), ("N", lambda d: str(d.get("n")))],
        )
        lines += [
            f"Classifier: {clf['model']} (C = {clf['C']:g}, seed {clf['seed']}) on musicnn penultimate "
            f"mean/std features of {clf['train_clips']} real training clips, {len(clf['classes'])} classes "
            f"({', '.join(clf['classes'])}); majority class {_f(clf['majority_share'], '.2f')}. "
            "The real row is its held-out accuracy: the ceiling.",
            "",
        ]
    tempo = met.get("tempo") or {}
    for est, title in (
        ("project", "project estimator (`estimate_tempo`: mel flux, autocorrelation comb, one octave 57-114 BPM)"),
        (
            "fourier",
            "independent estimator (`fourier_tempo`: band-energy novelty, Fourier tempogram, 40-240 BPM, no folding)",
        ),
    ):
        if est not in tempo:
            continue
        lines += _system_table(
            f"### Tempo against the caption's BPM: {title}",
            {k: v for k, v in tempo[est].items() if k != "estimates"},
            [
                ("Spearman [95 % CI]", lambda d: _ci_cell(d.get("spearman"), ".2f")),
                ("within 4 %", lambda d: _ci_cell(d.get("within_4pct"), ".2f")),
                ("within 8 %", lambda d: _ci_cell(d.get("within_8pct"), ".2f")),
                ("octave errors", lambda d: _ci_cell(d.get("octave_errors"), ".2f")),
                ("N", lambda d: str(d.get("n"))),
            ],
        )
    fad = met.get("fad") or {}
    if fad:
        lines += [
            "### FAD and KID against the held-out real clips (musicnn 1-s penultimate embeddings; lower = closer)",
            "",
            "| | FAD [95 % jackknife] | KID [95 % bootstrap] | real clips / segments | generated clips / segments |",
            "|---|---:|---:|---:|---:|",
        ]
        for key, d in fad.items():
            lines.append(
                f"| {SYSTEMS.get(key, key)} | {_ci_cell(d['fad'], '.2f')} | {_ci_cell(d['kid'], '.4f')} | "
                f"{d['real']['clips']} / {d['real']['segments']} | {d['generated']['clips']} / "
                f"{d['generated']['segments']} |"
            )
        fl = (fad.get("first") or {}).get("floor")
        if fl:
            lines.append(
                f"| floor: two halves of the real clips | {_f(fl['fad'], '.2f')} | {_f(fl['kid'], '.4f')} | "
                f"{fl['halves'][0]['clips']} / {fl['halves'][0]['segments']} | "
                f"{fl['halves'][1]['clips']} / {fl['halves'][1]['segments']} |"
            )
        lines += ["", "FAD grows as sets shrink: compare rows at equal N, read KID for small sets.", ""]
    fs = met.get("fad_by_style") or {}
    if fs:
        lines += [
            "FAD within a style: generations for captions of the style vs as many for captions of other styles, "
            "both against the real clips of the style (lower = closer):",
            "",
            "| style | captions of the style | captions of other styles | real / generated clips |",
            "|---|---:|---:|---:|",
        ]
        for s, d in fs["per_style"].items():
            lines.append(
                f"| {s} | {d['matched']:.2f} | {d['other_style']:.2f} | {d['real_clips']} / {d['generated_clips']} |"
            )
        lines += [
            f"| mean | {fs['matched_mean']:.2f} | {fs['other_style_mean']:.2f} | "
            f"{fs['styles_below']} of {len(fs['per_style'])} styles below |",
            "",
        ]
    lines += ["### Memorization", ""]
    if r.get("memorization"):
        lines += memorization_table(r["memorization"]) + ["", f"From `{r.get('memorization_source')}`.", ""]
    else:
        lines += [
            "Not included: pass `--memorization PATH` (the memorization.json of `musiclm eval memorization`).",
            "",
        ]
    p = r["paper"]
    lines += [
        "### Context: the paper's MusicCaps figures",
        "",
        f"{p['source']}; other networks (FAD on Trill / VGGish embeddings, KL with a LEAF AudioSet tagger, "
        "MCC with the paper's MuLaN) and another dataset: they give the scale, not a comparison.",
        "",
        "| system | FAD_Trill | FAD_VGG | KL | MCC |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ("MusicLM", "Mubert", "Riffusion"):
        v = p[name]
        lines.append(f"| {name} | {v['FAD_Trill']} | {v['FAD_VGG']} | {v['KL']} | {v['MCC']} |")
    lines += [""]
    files = (r.get("files") or {}).get("pngs") or {}
    if files:
        lines += ["## Figures", ""] + [f"![{k}]({os.path.basename(v)})" for k, v in files.items()] + [""]
    lines += ["## Time", "", "| step | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in (r.get("seconds") or {}).items()]
    return "\n".join(lines) + "\n"


def _share_cell(value, ci) -> str:
    return _ci_cell({"value": value, "ci95": ci})


def _match_cell(m) -> str:
    if isinstance(m, dict):
        if "seconds" in m:
            return f"{_f(m.get('seconds'), '.2f')} s ({m.get('tokens')} tokens)"
        return _ci_cell(m)
    return _f(m, "g")


def memorization_table(mem: dict) -> list[str]:
    """Markdown rows of a memorization JSON: the flat form ``{"exact_share", "approx_share",
    "longest_exact_match", "n"}`` (values or ``{"value", "ci95"}``), or ``musiclm eval memorization``'s
    (``greedy`` / ``sampled`` sections with ``ci95`` per share, ``longest_exact_match`` in tokens and s)."""
    rows = [d for d in ("greedy", "sampled") if isinstance(mem.get(d), dict) and "exact_share" in mem[d]]
    if not rows:
        keys = [k for k in ("exact_share", "approx_share", "longest_exact_match", "n") if k in mem]
        return [
            "| " + " | ".join(keys) + " |",
            "|" + "---:|" * len(keys),
            "| " + " | ".join(_match_cell(mem[k]) for k in keys) + " |",
        ]
    lines = [
        "| decoding | exact copies [95 % CI] | approximate copies [95 % CI] | chance (other clip's target) | N |",
        "|---|---:|---:|---:|---:|",
    ]
    for d in rows:
        sec = mem[d]
        ci = sec.get("ci95") or {}
        lines.append(
            f"| {d} | {_share_cell(sec['exact_share'], ci.get('exact_share'))} | "
            f"{_share_cell(sec.get('approx_share'), ci.get('approx_share'))} | "
            f"{_f(sec.get('negative_match_share'))} | {mem.get('n')} |"
        )
    extra = []
    if "longest_exact_match" in mem:
        extra.append(
            f"longest generated run found verbatim in the training shards: {_match_cell(mem['longest_exact_match'])}"
        )
    if isinstance(mem.get("longest_exact_match_other_clip"), dict):
        extra.append(f"in a clip other than the prompt's: {_match_cell(mem['longest_exact_match_other_clip'])}")
    ref = (mem.get("reference") or {}).get("match_length_seconds")
    if isinstance(ref, dict) and ref.get("max") is not None:
        extra.append(f"held-out real continuations (chance): longest {_f(ref.get('max'), '.2f')} s")
    if mem.get("prompt_seconds") is not None:
        extra.append(f"prompt {mem['prompt_seconds']} s, continuation {mem.get('continuation_seconds')} s")
    return lines + ([""] + ["; ".join(extra) + "."] if extra else [])


# --------------------------------------------------------------------------------------------
# figures and TensorBoard
# --------------------------------------------------------------------------------------------


def _plots(out: str, report: dict, index: dict, gen_dir: str, real_items, duration: float) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from musiclm.data.music_analysis import log_mel_spectrogram
    from musiclm.eval import generated as gen

    files: dict[str, str] = {}
    recs = index["items"][:4]
    real_by_id = {it.id: it for it in real_items}
    if recs:
        cols = ["real", "candidate 1", "reranked best", "unconditional"]
        fig, axes = plt.subplots(len(recs), len(cols), figsize=(3.2 * len(cols), 2.0 * len(recs) + 0.5), squeeze=False)
        uncond = (index.get("unconditional") or {}).get("files") or []
        for i, rec in enumerate(recs):
            clips = []
            it = real_by_id.get(rec["id"])
            try:
                clips.append(gen.load_real(it, 16000, duration).numpy() if it else None)
            except Exception:
                clips.append(None)
            for f in (os.path.join(rec["dir"], rec["first"]), os.path.join(rec["dir"], rec["best"])):
                clips.append(gen.read_wav(os.path.join(gen_dir, f))[0])
            clips.append(gen.read_wav(os.path.join(gen_dir, uncond[i]))[0] if i < len(uncond) else None)
            srs = [16000, index["sample_rate"], index["sample_rate"], index["sample_rate"]]
            for j, (x, sr) in enumerate(zip(clips, srs)):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if x is None or len(x) < 1024:
                    ax.set_axis_off()
                    continue
                mel = log_mel_spectrogram(x, sr, n_fft=1024, hop=max(1, sr // 100), n_mels=64) * 10
                ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", vmin=mel.max() - 80, vmax=mel.max())
                if i == 0:
                    ax.set_title(cols[j], fontsize=9)
            axes[i, 0].set_ylabel(rec["caption"][:28] + ("…" if len(rec["caption"]) > 28 else ""), fontsize=6)
        fig.suptitle("log-mel spectrograms (64 bands, 80 dB range)", fontsize=10)
        fig.tight_layout()
        files["spectrograms"] = os.path.join(out, "spectrograms.png")
        fig.savefig(files["spectrograms"], dpi=80)
        plt.close(fig)

    met = report["metrics"]
    panels = [("MCC", met.get("mcc") or {}, lambda d: d)]
    panels.append(("tag KL (Bernoulli, nats)", met.get("kl") or {}, lambda d: d.get("bernoulli")))
    for fld, res in (met.get("classifiers") or {}).items():
        if "skipped" not in res:
            panels.append(
                (f"{fld} accuracy", {k: v for k, v in res.items() if isinstance(v, dict) and "value" in v}, lambda d: d)
            )
    if "fourier" in (met.get("tempo") or {}):
        panels.append(
            (
                "tempo within 8 % (fourier)",
                {k: v for k, v in met["tempo"]["fourier"].items() if k != "estimates"},
                lambda d: d.get("within_8pct"),
            )
        )
    if met.get("fad"):
        panels.append(("KID", met["fad"], lambda d: d.get("kid")))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.6), squeeze=False)
    for ax, (title, rows, get) in zip(axes[0], panels):
        keys = [k for k in SYSTEMS if k in rows and (get(rows[k]) or {}).get("value") is not None]
        vals = [get(rows[k])["value"] for k in keys]
        los = [v - ((get(rows[k]).get("ci95") or [v, v])[0]) for k, v in zip(keys, vals)]
        his = [((get(rows[k]).get("ci95") or [v, v])[1]) - v for k, v in zip(keys, vals)]
        ax.bar(
            range(len(keys)),
            vals,
            yerr=[np.maximum(los, 0), np.maximum(his, 0)],
            capsize=3,
            color=["#888888" if k.startswith("real") else "#3a7dc9" for k in keys],
        )
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=45, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle("metrics with 95 % intervals", fontsize=10)
    fig.tight_layout()
    files["metrics"] = os.path.join(out, "metrics.png")
    fig.savefig(files["metrics"], dpi=80)
    plt.close(fig)

    tempo = met.get("tempo") or {}
    if "project" in tempo:
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.8), squeeze=False)
        bpm = tempo["bpm"]
        for ax, est in zip(axes[0], ("project", "fourier")):
            e = tempo[est]["estimates"]
            ax.scatter(_nan(bpm["real"]), e["real"], s=12, c="#888888", label="real")
            ax.scatter(_nan(bpm["generated"]), e["first"], s=16, c="#3a7dc9", label="candidate 1")
            lo, hi = 40, 200
            ax.plot([lo, hi], [lo, hi], "k-", lw=0.5)
            ax.plot([lo, hi], [2 * lo, 2 * hi], "k:", lw=0.5)
            ax.plot([lo, hi], [lo / 2, hi / 2], "k:", lw=0.5)
            ax.set_xlim(lo, hi)
            ax.set_ylim(20, 250)
            ax.set_xlabel("caption BPM")
            ax.set_ylabel("estimated BPM")
            ax.set_title(est, fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        files["tempo"] = os.path.join(out, "tempo.png")
        fig.savefig(files["tempo"], dpi=80)
        plt.close(fig)
    return files


def _scalars(report: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    met = report["metrics"]
    for k, d in (met.get("mcc") or {}).items():
        out[f"mcc/{k}"] = d["value"]
    for k, d in (met.get("kl") or {}).items():
        out[f"kl_bernoulli/{k}"] = d["bernoulli"]["value"]
        out[f"kl_normalized/{k}"] = d["normalized"]["value"]
    for fld, res in (met.get("classifiers") or {}).items():
        for k, d in res.items():
            if isinstance(d, dict) and d.get("value") is not None and "n" in d:
                out[f"{fld}_accuracy/{k}"] = d["value"]
    for est in ("project", "fourier"):
        for k, d in ((met.get("tempo") or {}).get(est) or {}).items():
            if k != "estimates":
                for m in ("spearman", "within_4pct", "within_8pct", "octave_errors"):
                    if (d.get(m) or {}).get("value") is not None:
                        out[f"tempo_{est}_{m}/{k}"] = d[m]["value"]
    for k, d in (met.get("fad") or {}).items():
        out[f"fad/{k}"] = d["fad"]["value"]
        out[f"kid/{k}"] = d["kid"]["value"]
    for c in report["checks"]:
        if c.get("passed") is not None:
            out[f"baseline_pass/{c['model'].replace(' ', '_')}"] = float(c["passed"])
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}


def _tensorboard(tb_dir: str, report: dict, index: dict, gen_dir: str, md: str) -> str:
    import torch
    from torch.utils.tensorboard import SummaryWriter

    from musiclm.eval import generated as gen

    step = int(max([v or 0 for v in (report["package"].get("steps") or {}).values()] or [0]))
    w = SummaryWriter(tb_dir)
    try:
        for k, v in _scalars(report).items():
            w.add_scalar(f"eval_report/{k}", v, step)
        for i, rec in enumerate(index["items"]):
            for tag, f in (("candidate1", rec["first"]), ("reranked", rec["best"])):
                x, sr = gen.read_wav(os.path.join(gen_dir, rec["dir"], f))
                w.add_audio(f"eval_report/{i:02d}_{tag}", torch.from_numpy(x)[None], step, sample_rate=sr)
        for i, f in enumerate((index.get("unconditional") or {}).get("files") or []):
            x, sr = gen.read_wav(os.path.join(gen_dir, f))
            w.add_audio(f"eval_report/unconditional_{i:02d}", torch.from_numpy(x)[None], step, sample_rate=sr)
        w.add_text("eval_report/report", md, step)
    finally:
        w.close()
    return tb_dir


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="a `musiclm package` directory")
    p.add_argument("--manifest", default=None, help="evaluation manifest (.jsonl): its --split is the eval set")
    p.add_argument("--split", default="eval")
    p.add_argument("--musiccaps", default=None, help="MusicCaps-style CSV (ytid,start_s,end_s,aspect_list,caption)")
    p.add_argument("--audio-dir", default=None, help="folder of the downloaded MusicCaps clips")
    p.add_argument("--captions", type=int, default=8, help="held-out captions to generate for")
    p.add_argument("--num-samples", type=int, default=4, help="candidates per caption (reranked by MuLaN)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per generation (real clips cut to it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unconditional", type=int, default=None, help="unconditional generations (default: --captions)")
    p.add_argument("--out", required=True, help="report folder (report.md, report.json, PNGs, generated/, tb/)")
    p.add_argument("--runs", nargs="+", default=None, metavar="RUN", help="stage run folders (default: the package's)")
    p.add_argument("--shards", default=None, help="token shard folder for the unigram entropies (default: the runs')")
    p.add_argument("--retrieval", default=None, help="retrieval.json of `musiclm eval retrieval` (else recomputed)")
    p.add_argument("--codec-eval", default=None, help="codec_eval.json of `musiclm eval codec`")
    p.add_argument("--memorization", default=None, help="memorization.json of `musiclm eval memorization`")
    p.add_argument("--real-clips", type=int, default=200, help="held-out real clips as the real reference (at most)")
    p.add_argument("--classifier-clips", type=int, default=None, help="training clips for the style classifier")
    p.add_argument("--classifier-seed", type=int, default=1234)
    p.add_argument("--tagger-weights", default=None, help="musicnn weights (default: the vendored MTT_musicnn)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="torch and BLAS threads (0 = their defaults)")
    p.add_argument("--no-tensorboard", action="store_true")
    p.add_argument("--progress", action="store_true", help="progress bars while generating")
    p.add_argument(
        "--workers", type=int, default=1, help="generation processes, each with --threads threads (e.g. 2 on 2 cores)"
    )
    return p


def run_from_args(args: argparse.Namespace) -> int:
    from musiclm.eval.stats import limit_threads

    limit_threads(args.threads)
    try:
        r = evaluate_report(
            args.model,
            args.out,
            manifest=args.manifest,
            musiccaps=args.musiccaps,
            audio_dir=args.audio_dir,
            split=args.split,
            captions=args.captions,
            num_samples=args.num_samples,
            duration=args.duration,
            seed=args.seed,
            unconditional=args.unconditional,
            runs=args.runs,
            shards=args.shards,
            retrieval=args.retrieval,
            codec_eval=args.codec_eval,
            memorization=args.memorization,
            classifier_clips=args.classifier_clips,
            classifier_seed=args.classifier_seed,
            real_clips=args.real_clips,
            tagger_weights=args.tagger_weights,
            n_boot=args.n_boot,
            tensorboard=not args.no_tensorboard,
            progress=args.progress,
            workers=args.workers,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"eval report: {err}", file=sys.stderr)
        return 2
    first = [ln for ln in render_markdown(r).splitlines() if ln.startswith("|")][:12]
    print("\n".join(first))
    print(json.dumps({"report": r["files"]["markdown"], "json": r["files"]["json"], "seconds": r["seconds"]}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_from_args(add_arguments(argparse.ArgumentParser(prog="python -m musiclm.eval.report")).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
