"""Manifest -> audio shards (for the parts trained on audio: codec and MuLaN).

    python ray_jobs/pack_audio.py --manifest data/rapbeats/manifest.jsonl --out shards
    ray job submit --working-dir . -- python ray_jobs/pack_audio.py --manifest M --out s3://bucket/shards

Writes ``<out>/<dataset>/audio/<split>-%06d.tar`` (one sample = one segment: ``flac`` mono at the
corpus sample rate + ``json``), ``errors.jsonl`` and ``index.json``. Ray Data runs one task per
group of clips (decode, check, segment, FLAC-encode, write the group's shard); a rerun with the
same arguments skips finished groups, so a killed job finishes with every clip exactly once.
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


def encode_and_write(row: dict, *, out_dir: str, delay: float = 0.0) -> dict:
    """Ray Data `map` (CPU task): FLAC-encode the decoded segments of a group and write its shard."""
    import torch

    from musiclm.audio import encode_flac

    torch.set_num_threads(1)
    t0 = time.time()
    group = S.Group.from_json(row["group"])
    meta = json.loads(row["meta"])
    audio = C.unpack_arrays(row["audio"])
    clips = {c["id"]: c for c in group.clips}
    sr = int(meta["sample_rate"])
    samples, errors, bad = [], list(meta["errors"]), set()
    for seg in meta["segments"]:
        if seg["clip_id"] in bad:
            continue
        try:
            flac = encode_flac(torch.from_numpy(S.from_int16(audio[seg["key"]])), sr)
        except Exception as e:
            bad.add(seg["clip_id"])
            errors.append(S.error_record(clips[seg["clip_id"]], "encode_failed", f"{type(e).__name__}: {e}",
                                         stage="encode"))
            continue
        samples.append({"__key__": seg["key"], "flac": flac, "json": C.sample_json(clips[seg["clip_id"]], seg, sr)})
    samples = [s for s in samples if s["json"]["clip_id"] not in bad]
    timings = {"decode_s": round(meta["decode_s"], 4), "encode_s": round(time.time() - t0, 4)}
    record = C.write_group(group, samples, errors, out_dir=out_dir, kind="audio", timings=timings,
                           delay=delay)
    return {"record": json.dumps(record)}


def main(argv: list[str] | None = None) -> dict:
    from musiclm.data.shards import audio_shard_dir

    p = C.base_parser(__doc__.split("\n\n")[0])
    C.add_shard_args(p, default_clips=16)
    p.add_argument("--sample-rate", type=int, default=None, help="corpus sample rate (default: config sample_rate, else 24000)")
    args = p.parse_args(argv)
    t_start = time.time()
    cfg = C.load_config(args.config, args.set)
    sample_rate = int(args.sample_rate or cfg.get("sample_rate", 24000))
    segment_seconds = float(args.segment_seconds or cfg.get("audio_segment_seconds") or cfg.get("segment_seconds") or 10.0)
    min_seconds = float(args.min_segment_seconds if args.min_segment_seconds is not None
                        else cfg.get("min_segment_seconds", 1.0))
    grid = float(cfg.get("grid_seconds", 0.04))
    out_dir = audio_shard_dir(args.out, C.dataset_name(args))
    params = {"sample_rate": sample_rate, "segment_seconds": segment_seconds, "min_segment_seconds": min_seconds,
              "grid_seconds": grid}
    groups, plan_errors, plan = C.make_plan(args, "pack_audio", params, clips_per_group=args.clips_per_shard)
    state = C.WorkState(out_dir)
    resumed = state.check_plan(plan, args.overwrite)
    pending = C.pending_groups(groups, state, retry_failed=args.retry_failed)
    C.log(f"[pack_audio] {plan['clips']} clips in {len(groups)} groups -> {out_dir}"
          + (f" (resuming: {len(groups) - len(pending)} groups already done)" if resumed else ""))

    ray_info = {"mode": "none"}
    progress = None
    if pending:
        ray_info = C.init_ray(args)
        progress = C.Progress("pack_audio", len(pending), sum(len(g.clips) for g in pending))
        ds = C.groups_dataset(pending)
        ds = ds.map(C.decode_group, num_cpus=args.task_cpus,
                    fn_kwargs=dict(sample_rate=sample_rate, segment_seconds=segment_seconds, grid_seconds=grid,
                                   min_seconds=min_seconds))
        ds = ds.map(encode_and_write, num_cpus=args.task_cpus, fn_kwargs=dict(out_dir=out_dir, delay=args.test_group_delay))
        C.run_pipeline(ds, progress)
    summary = C.finish(job="pack_audio", out_dir=out_dir, kind="audio", fingerprints={},
                       groups=groups, plan_errors=plan_errors, state=state,
                       extra={"manifest": args.manifest, "sample_rate": sample_rate, "params": params},
                       progress=progress, workers=1, ray_info=ray_info, t_start=t_start)
    C.print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
