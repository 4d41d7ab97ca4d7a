"""Manifest -> token shards (acoustic codes, semantic ids, MuLaN embedding + conditioning tokens).

    python ray_jobs/tokenize.py --manifest data/rapbeats/manifest.jsonl --out shards \\
        --config launch/configs/tokenizers.yaml
    ray job submit --working-dir . -- python ray_jobs/tokenize.py --manifest s3://b/m.jsonl \\
        --out s3://b/shards --config launch/configs/tokenizers.yaml

Output: ``<out>/<dataset>/tokens-<hash of the tokenizer fingerprints>/<split>-%06d.tar``,
``errors.jsonl``, ``index.json`` (written last). Other tokenizers -> another folder.

Pipeline (Ray Data): one row per group of clips (sorted clip ids per split; one group = one
shard) -> ``map`` decode + check + segment (CPU tasks) -> ``map_batches`` with an actor pool of
:class:`TokenizeActor` (``concurrency`` = workers, ``num_gpus`` when the cluster has GPUs, batched
inference inside the group) -> ``map`` write the group's shard + its record (CPU tasks). A rerun
with the same arguments skips the groups whose record exists (exactly-once after a kill).
"""

from __future__ import annotations

import os
import sys

# This folder must not be on sys.path: ray_jobs/tokenize.py would shadow the standard library's
# `tokenize` (and Ray would put the folder on its workers' paths too). Import via the repo root.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import json  # noqa: E402
import time  # noqa: E402

from ray_jobs import common as C  # noqa: E402
from musiclm.data import segments as S  # noqa: E402

ENTRIES = ("acoustic.npy", "semantic.npy", "mulan.npy", "cond.npy")


class TokenizeActor:
    """One model replica: builds the tokenizer bundle once, then tokenizes groups of segments."""

    def __init__(self, tok_cfg: dict, device: str, threads: int, batch_size: int, expected_hash: str):
        import torch

        from musiclm.data.shards import fingerprint_hash
        from musiclm.tokenizers import build_tokenizers

        torch.set_num_threads(threads)
        self.device = C.resolve_device(device)
        self.bundle = build_tokenizers(tok_cfg, device=self.device)
        got = fingerprint_hash(self.bundle.fingerprints())
        if got != expected_hash:  # a node whose model files differ from the driver's
            raise RuntimeError(f"tokenizers on this worker fingerprint to {got}, the driver's to {expected_hash}: "
                               f"model files differ between nodes")
        self.batch_size = max(1, int(batch_size))
        self.ready = C.actor_stamp()

    def _tokenize(self, wavs: list) -> list[dict]:
        return self.bundle.tokenize(wavs, sample_rate=self.bundle.sample_rate, entries=list(ENTRIES))

    def __call__(self, batch: dict) -> dict:
        import torch

        out = {"group": [], "tokens": [], "meta": []}
        for group_json, blob, meta_json in zip(batch["group"], batch["audio"], batch["meta"]):
            t0 = time.time()
            meta = json.loads(meta_json)
            audio = C.unpack_arrays(blob)
            segs = meta["segments"]
            group = S.Group.from_json(group_json)
            clips = {c["id"]: c for c in group.clips}
            tokens: dict = {}
            failed: dict[str, str] = {}
            for i in range(0, len(segs), self.batch_size):
                chunk = [s for s in segs[i:i + self.batch_size] if s["clip_id"] not in failed]
                wavs = [torch.from_numpy(S.from_int16(audio[s["key"]])) for s in chunk]
                try:
                    results = self._tokenize(wavs)
                except Exception:
                    results = []
                    for s, w in zip(chunk, wavs):  # find the culprit, keep the rest
                        try:
                            results.append(self._tokenize([w])[0])
                        except Exception as e:
                            failed.setdefault(s["clip_id"], f"{type(e).__name__}: {e}")
                            results.append(None)
                for s, r in zip(chunk, results):
                    if r is not None:
                        for name in ENTRIES:
                            tokens[f"{s['key']}|{name}"] = r[name]
            errors = meta["errors"] + [S.error_record(clips[cid], "tokenize_failed", why, stage="tokenize")
                                       for cid, why in sorted(failed.items())]
            meta = dict(meta, segments=[s for s in segs if s["clip_id"] not in failed], errors=errors,
                        model_s=time.time() - t0, actor=self.ready)
            out["group"].append(group_json)
            out["tokens"].append(C.pack_arrays({k: v for k, v in tokens.items()
                                                if k.split("|")[0].rsplit("__", 1)[0] not in failed}))
            out["meta"].append(json.dumps(meta))
        return out


def write_tokens(row: dict, *, out_dir: str, delay: float = 0.0) -> dict:
    """Ray Data `map` (CPU task): the group's token samples -> its shard and record."""
    group = S.Group.from_json(row["group"])
    meta = json.loads(row["meta"])
    arrays = C.unpack_arrays(row["tokens"])
    clips = {c["id"]: c for c in group.clips}
    sr = int(meta["sample_rate"])
    samples = []
    for seg in meta["segments"]:
        s = {"__key__": seg["key"], "json": C.sample_json(clips[seg["clip_id"]], seg, sr)}
        for name in ENTRIES:
            s[name] = arrays[f"{seg['key']}|{name}"]
        samples.append(s)
    timings = {"decode_s": round(meta["decode_s"], 4), "model_s": round(meta.get("model_s", 0.0), 4),
               "actor": meta.get("actor")}
    record = C.write_group(group, samples, meta["errors"], out_dir=out_dir, kind="tokens", timings=timings,
                           delay=delay)
    return {"record": json.dumps(record)}


def build_bundle(tok_cfg: dict):
    """The driver's bundle: fingerprints (the output folder name) and frame rates."""
    from musiclm.tokenizers import build_tokenizers

    bundle = build_tokenizers(tok_cfg, device="cpu")
    missing = [e for e in ENTRIES if e not in bundle.available()]
    if missing:
        hints = {"semantic.npy": "semantic k-means (ray_jobs/fit_kmeans.py)",
                 "cond.npy": "MuLaN quantizer (ray_jobs/fit_quantizer.py)",
                 "mulan.npy": "a `mulan:` section", "acoustic.npy": "an `acoustic:` section"}
        raise SystemExit("the tokenizer config cannot produce " + ", ".join(missing) + ": it needs "
                         + "; ".join(hints[m] for m in missing))
    return bundle


def main(argv: list[str] | None = None) -> dict:
    from musiclm.data.shards import fingerprint_hash, token_shard_dir

    p = C.base_parser(__doc__.split("\n\n")[0])
    C.add_shard_args(p, default_clips=32)
    args = p.parse_args(argv)
    if not args.config:
        p.error("--config is required (the tokenizers: section, e.g. launch/configs/tokenizers.yaml)")
    t_start = time.time()
    cfg = C.load_config(args.config, args.set)
    tok_cfg = C.tokenizers_section(cfg)
    bundle = build_bundle(tok_cfg)
    fingerprints = bundle.fingerprints()
    rates = bundle.frame_rates()
    grid = S.time_grid(rates.values())
    sample_rate = int(bundle.sample_rate)
    segment_seconds = float(args.segment_seconds or cfg.get("segment_seconds") or 10.0)
    min_seconds = float(args.min_segment_seconds if args.min_segment_seconds is not None
                        else cfg.get("min_segment_seconds", 1.0))
    S.segment_bounds(0, sample_rate, segment_seconds, grid_seconds=grid)  # validates the length vs the grid
    out_dir = token_shard_dir(args.out, C.dataset_name(args), fingerprints)
    params = {"sample_rate": sample_rate, "segment_seconds": segment_seconds, "min_segment_seconds": min_seconds,
              "grid_seconds": grid}
    groups, plan_errors, plan = C.make_plan(args, "tokenize", params, clips_per_group=args.clips_per_shard)
    state = C.WorkState(out_dir)
    resumed = state.check_plan(plan, args.overwrite)
    pending = C.pending_groups(groups, state, retry_failed=args.retry_failed)
    C.log(f"[tokenize] {plan['clips']} clips in {len(groups)} groups -> {out_dir}"
          + (f" (resuming: {len(groups) - len(pending)} groups already done)" if resumed else ""))

    ray_info, workers, progress = {"mode": "none"}, 0, None
    if pending:
        ray_info = C.init_ray(args)
        wp = C.worker_plan(args, ray_info)
        workers = wp["workers"]
        C.log(f"[tokenize] ray {ray_info['mode']} ({ray_info['cpus']:g} CPU, {ray_info['gpus']:g} GPU): "
              f"{workers} tokenizer worker(s) x {wp['cpus_per_worker']:g} CPU x {wp['gpus_per_worker']:g} GPU "
              f"on {wp['device']}, batch {args.batch_size}")
        progress = C.Progress("tokenize", len(pending), sum(len(g.clips) for g in pending))
        ds = C.groups_dataset(pending)
        ds = ds.map(C.decode_group, num_cpus=args.task_cpus,
                    fn_kwargs=dict(sample_rate=sample_rate, segment_seconds=segment_seconds, grid_seconds=grid,
                                   min_seconds=min_seconds))
        ds = C.actor_stage(ds, TokenizeActor, wp,
                           dict(tok_cfg=tok_cfg, device=wp["device"], threads=wp["threads"],
                                batch_size=args.batch_size,
                                expected_hash=fingerprint_hash(fingerprints)))
        ds = ds.map(write_tokens, num_cpus=args.task_cpus, fn_kwargs=dict(out_dir=out_dir, delay=args.test_group_delay))
        C.run_pipeline(ds, progress)
    summary = C.finish(job="tokenize", out_dir=out_dir, kind="tokens", fingerprints=fingerprints,
                       groups=groups, plan_errors=plan_errors, state=state,
                       extra={"manifest": args.manifest, "sample_rate": sample_rate, "params": params,
                              "frame_rates": rates},
                       progress=progress, workers=workers, ray_info=ray_info, t_start=t_start)
    C.print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
