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

from musiclm.data import segments as S  # noqa: E402
from ray_jobs.job import Job, run_job  # noqa: E402
from ray_jobs.output import finish, write_group  # noqa: E402
from ray_jobs.stages import sample_json, unpack_arrays  # noqa: E402


def encode_and_write(row: dict, *, out_dir: str, delay: float = 0.0) -> dict:
    """Ray Data `map` (CPU task): FLAC-encode the decoded segments of a group and write its shard."""
    import torch

    from musiclm.audio import encode_flac

    torch.set_num_threads(1)
    t0 = time.time()
    group = S.Group.from_json(row["group"])
    meta = json.loads(row["meta"])
    audio = unpack_arrays(row["audio"])
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
            errors.append(
                S.error_record(clips[seg["clip_id"]], "encode_failed", f"{type(e).__name__}: {e}", stage="encode")
            )
            continue
        samples.append({"__key__": seg["key"], "flac": flac, "json": sample_json(clips[seg["clip_id"]], seg, sr)})
    samples = [s for s in samples if s["json"]["clip_id"] not in bad]
    timings = {"decode_s": round(meta["decode_s"], 4), "encode_s": round(time.time() - t0, 4)}
    record = write_group(group, samples, errors, out_dir=out_dir, kind="audio", timings=timings, delay=delay)
    return {"record": json.dumps(record)}


def _add_arguments(p) -> None:
    p.add_argument(
        "--sample-rate", type=int, default=None, help="corpus sample rate (default: config sample_rate, else 24000)"
    )


def _setup(job: Job) -> None:
    from musiclm.data.shards import audio_shard_dir
    from ray_jobs.job_args import dataset_name

    args, cfg = job.args, job.cfg
    job.sample_rate = int(args.sample_rate or cfg.get("sample_rate", 24000))
    job.segment_seconds = float(
        args.segment_seconds or cfg.get("audio_segment_seconds") or cfg.get("segment_seconds") or 10.0
    )
    job.min_seconds = float(
        args.min_segment_seconds if args.min_segment_seconds is not None else cfg.get("min_segment_seconds", 1.0)
    )
    job.grid_seconds = float(cfg.get("grid_seconds", 0.04))
    job.out_dir = audio_shard_dir(args.out, dataset_name(args))
    job.params = {
        "sample_rate": job.sample_rate,
        "segment_seconds": job.segment_seconds,
        "min_segment_seconds": job.min_seconds,
        "grid_seconds": job.grid_seconds,
    }


def _stages(job: Job, ds):
    return ds.map(
        encode_and_write, num_cpus=job.args.task_cpus, fn_kwargs=dict(out_dir=job.out_dir, delay=job.group_delay)
    )


def _complete(job: Job) -> dict:
    return finish(
        job="pack_audio",
        out_dir=job.out_dir,
        kind="audio",
        fingerprints={},
        groups=job.groups,
        plan_errors=job.plan_errors,
        state=job.state,
        extra={"manifest": job.args.manifest, "sample_rate": job.sample_rate, "params": job.params},
        progress=job.progress,
        workers=1,
        ray_info=job.ray_info,
        t_start=job.t_start,
    )


def main(argv: list[str] | None = None) -> dict:
    return run_job(
        "pack_audio",
        __doc__,
        argv,
        setup=_setup,
        stages=_stages,
        complete=_complete,
        add_arguments=_add_arguments,
        shard_clips=16,
    )


if __name__ == "__main__":
    main()
