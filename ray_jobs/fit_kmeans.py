"""Fit the semantic tokenizer's k-means on features of a sample of the corpus.

    python ray_jobs/fit_kmeans.py --manifest data/rapbeats/manifest.jsonl --config launch/configs/tokenizers.yaml
    ray job submit --working-dir . -- \
        python ray_jobs/fit_kmeans.py --manifest M --config C --out /shared/kmeans.safetensors

Ray Data decodes and segments a deterministic sample of clips (``--max-clips``) in CPU tasks; an
actor pool of the configured feature model (``tokenizers.semantic.features``: w2v-BERT / HuBERT /
MERT layer, or MFCC / log-mel) computes frame features and keeps ``--frames-per-clip`` random
frames per clip; the driver fits scikit-learn ``MiniBatchKMeans`` and saves the centroids as
safetensors (default: the ``tokenizers.semantic.kmeans`` path of the config, which
``tokenize.py`` then loads). Failed clips are skipped and listed in ``<out>.errors.jsonl``.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import hashlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from musiclm.data import segments as S  # noqa: E402
from ray_jobs.cluster import resolve_device  # noqa: E402
from ray_jobs.job import Job, run_job  # noqa: E402
from ray_jobs.job_args import tokenizers_section  # noqa: E402
from ray_jobs.output import save_file_output  # noqa: E402
from ray_jobs.stages import actor_stage, actor_stamp, fit_record, pack_arrays, segment_batches, unpack_arrays  # noqa: E402


def _clip_rng(seed: int, clip_id: str) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.sha256(f"{seed}:{clip_id}".encode()).digest()[:8], "big"))


class FeatureActor:
    """Semantic feature model replica: group of segments -> sampled feature frames [N, D]."""

    def __init__(self, feats_cfg: dict, device: str, threads: int, batch_size: int, frames_per_clip: int, seed: int):
        import torch

        from musiclm.semantic import SemanticFeatures

        torch.set_num_threads(threads)
        self.feats = SemanticFeatures.from_config(feats_cfg, device=resolve_device(device))
        self.batch_size, self.frames_per_clip, self.seed = max(1, batch_size), frames_per_clip, seed
        self.ready = actor_stamp()

    def __call__(self, batch: dict) -> dict:
        out = {"record": [], "arrays": []}
        for group_json, blob, meta_json in zip(batch["group"], batch["audio"], batch["meta"]):
            t0 = time.time()
            group, meta, audio = S.Group.from_json(group_json), json.loads(meta_json), unpack_arrays(blob)
            clips = {c["id"]: c for c in group.clips}
            per_clip: dict[str, list[np.ndarray]] = {}
            errors = list(meta["errors"])
            seconds = 0.0
            for chunk, wav in segment_batches(meta["segments"], audio, self.batch_size):
                try:
                    feats = self.feats(wav).numpy()  # [B, T_s, D]
                except Exception as e:
                    for s in chunk:
                        errors.append(
                            S.error_record(
                                clips[s["clip_id"]], "tokenize_failed", f"{type(e).__name__}: {e}", stage="features"
                            )
                        )
                    continue
                for s, f in zip(chunk, feats):
                    per_clip.setdefault(s["clip_id"], []).append(f)
                    seconds += s["end"] - s["start"]
            failed = {e["clip_id"] for e in errors}
            rows = []
            for cid in sorted(per_clip):
                if cid in failed:
                    continue
                x = np.concatenate(per_clip[cid])
                if self.frames_per_clip and len(x) > self.frames_per_clip:
                    x = x[np.sort(_clip_rng(self.seed, cid).choice(len(x), self.frames_per_clip, replace=False))]
                rows.append(x.astype(np.float32))
            used = set(per_clip) - failed
            dim = rows[0].shape[-1] if rows else 0
            frames = np.concatenate(rows) if rows else np.zeros((0, dim), np.float32)
            rec = fit_record(
                group,
                meta,
                used,
                errors,
                seconds,
                {"decode_s": round(meta["decode_s"], 4), "model_s": round(time.time() - t0, 4), "actor": self.ready},
            )
            rec["frames"] = int(len(frames))
            out["record"].append(json.dumps(rec))
            out["arrays"].append(pack_arrays({"frames": frames}))
        return out


def _add_arguments(p) -> None:
    p.add_argument("--out", default=None, help="centroids file (default: tokenizers.semantic.kmeans of the config)")
    p.add_argument("--clusters", type=int, default=None, help="k (default: config fit_kmeans.clusters, else 1024)")
    p.add_argument("--frames-per-clip", type=int, default=None, help="random frames kept per clip (default 250)")
    p.add_argument("--max-frames", type=int, default=None, help="frames fitted at most (default 500000)")


def _setup(job: Job) -> None:
    from musiclm.semantic import SemanticFeatures

    args, cfg = job.args, job.cfg
    fit = dict(cfg.get("fit_kmeans") or {})
    sem = dict(tokenizers_section(cfg).get("semantic") or {})
    feats_cfg = dict(sem.get("features") or {"type": "mfcc", "rate": 25})
    out = args.out or sem.get("kmeans")
    if not out:
        job.parser.error("--out is required when the config has no tokenizers.semantic.kmeans path")
    clusters = int(args.clusters or fit.get("clusters", 1024))
    if args.max_clips is None and fit.get("max_clips"):
        args.max_clips = int(fit["max_clips"])
    feats = SemanticFeatures.from_config(feats_cfg)  # lazy: only the feature extractor for the rate
    job.sample_rate = int(feats.sample_rate)
    job.segment_seconds = float(args.segment_seconds or cfg.get("segment_seconds") or 10.0)
    job.describe = f"features {feats!r} at {job.sample_rate} Hz, k={clusters} -> {out}"
    job.data.update(
        out=out,
        clusters=clusters,
        feats=feats,
        feats_cfg=feats_cfg,
        frames_per_clip=int(args.frames_per_clip or fit.get("frames_per_clip", 250)),
        max_frames=int(args.max_frames or fit.get("max_frames", 500_000)),
    )


def _stages(job: Job, ds):
    wp = job.worker_plan()
    return actor_stage(
        ds,
        FeatureActor,
        wp,
        dict(
            feats_cfg=job.data["feats_cfg"],
            frames_per_clip=job.data["frames_per_clip"],
            seed=job.args.seed,
            device=wp["device"],
            threads=wp["threads"],
            batch_size=job.args.batch_size,
        ),
    )


def _complete(job: Job) -> dict:
    from musiclm.semantic import fit_kmeans, save_centroids

    args, out = job.args, job.data["out"]
    frames = [a["frames"] for a in job.arrays if len(a["frames"])]
    if not frames:
        raise SystemExit("[fit_kmeans] no features: every clip failed (see the errors above)")
    x = np.concatenate(frames)
    if len(x) > job.data["max_frames"]:
        x = x[np.sort(np.random.default_rng(args.seed).choice(len(x), job.data["max_frames"], replace=False))]
    t_fit = time.time()
    centroids = fit_kmeans([x], n_clusters=job.data["clusters"], seed=args.seed)
    fit_s = time.time() - t_fit
    save_file_output(out, lambda path: save_centroids(path, centroids, job.data["feats"].config()))
    summary = job.fit_summary(out)
    summary.update(
        frames=int(len(x)), clusters=int(centroids.shape[0]), dim=int(centroids.shape[1]), fit_s=round(fit_s, 3)
    )
    return summary


def main(argv: list[str] | None = None) -> dict:
    return run_job(
        "fit_kmeans", __doc__, argv, setup=_setup, stages=_stages, complete=_complete, add_arguments=_add_arguments
    )


if __name__ == "__main__":
    main()
