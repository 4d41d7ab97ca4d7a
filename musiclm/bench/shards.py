"""Shard streaming benchmark: samples/s and tokens/s the shard reader delivers to one process,
from local shards and from S3 (a moto server on a free 127.0.0.1 port, started here).

``musiclm bench shards`` prints :func:`run`'s dict as JSON. Samples are synthetic but shaped
like demo token shards: 10 s segments with acoustic int16 [8, 750] (EnCodec 6 kbps, 75 Hz),
semantic [250] (25 Hz), MuLaN float16 [512] (CLAP-sized) and cond [3, 8].
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

from musiclm.testing import MotoServer, environ

FINGERPRINTS = {
    "acoustic": {"kind": "acoustic", "name": "bench", "frame_rate": 75, "levels": 8, "codebook_size": 1024},
    "semantic": {"kind": "semantic", "name": "bench", "frame_rate": 25, "vocab_size": 1024},
    "mulan": {"kind": "mulan", "name": "bench", "dim": 512},
    "quantizer": {
        "kind": "quantizer",
        "name": "bench",
        "namespaces": ["semantic", "coarse", "fine"],
        "levels": 8,
        "codebook_size": 1024,
    },
}


def synth_sample(
    i: int,
    rng: np.random.Generator,
    *,
    seconds: float = 10.0,
    levels: int = 8,
    acoustic_rate: int = 75,
    semantic_rate: int = 25,
    mulan_dim: int = 512,
) -> dict:
    clip, seg = divmod(i, 3)
    ta, ts = int(round(seconds * acoustic_rate)), int(round(seconds * semantic_rate))
    return {
        "__key__": f"clip{clip:06d}__{seg:04d}",
        "acoustic.npy": rng.integers(0, 1024, (levels, ta), dtype=np.int16),
        "semantic.npy": rng.integers(0, 1024, (ts,), dtype=np.int16),
        "mulan.npy": rng.standard_normal(mulan_dim).astype(np.float16),
        "cond.npy": rng.integers(0, 1024, (3, 8), dtype=np.int16),
        "json": {
            "clip_id": f"clip{clip:06d}",
            "caption": "a synthetic boom bap beat with dusty drums",
            "source": f"bench/{clip}.wav",
            "start": seg * seconds,
            "end": (seg + 1) * seconds,
            "sample_rate": 24000,
            "tags": {"bpm": 90},
        },
    }


def _write(directory: str, samples: list[dict], shard_samples: int) -> dict:
    from musiclm.data.shards import ShardWriter, write_index

    t0 = time.perf_counter()
    with ShardWriter(directory, "train", kind="tokens", max_samples=shard_samples) as w:
        for s in samples:
            w.write(s)
    records = w.shards
    write_index(directory, records, kind="tokens", fingerprints=FINGERPRINTS)
    dt = time.perf_counter() - t0
    return {
        "seconds": round(dt, 3),
        "samples_per_s": round(len(samples) / dt, 1),
        "shards": len(records),
        "bytes": sum(r["bytes"] for r in records),
    }


def _read(directory: str, shuffle: int, repeats: int) -> dict:
    from musiclm.data.shards import shard_reader

    best = None
    for r in range(repeats):
        reader = shard_reader(directory, "train", shuffle=shuffle, seed=0, epoch=r, rank=0, world_size=1)
        n = acoustic = semantic = 0
        t0 = time.perf_counter()
        first = None
        for s in reader:
            if first is None:
                first = time.perf_counter() - t0
            n += 1
            acoustic += s["acoustic.npy"].size
            semantic += s["semantic.npy"].size
        dt = time.perf_counter() - t0
        res = {
            "seconds": round(dt, 3),
            "samples": n,
            "samples_per_s": round(n / dt, 1),
            "acoustic_tokens_per_s": round(acoustic / dt),
            "semantic_tokens_per_s": round(semantic / dt),
            "tokens_per_s": round((acoustic + semantic) / dt),
            "first_sample_s": round(first or 0.0, 4),
        }
        if best is None or res["samples_per_s"] > best["samples_per_s"]:
            best = res
    return best


def run(
    samples: int = 2000,
    *,
    shard_samples: int = 256,
    shuffle: int = 1000,
    s3: bool = True,
    repeats: int = 2,
    seed: int = 0,
    workdir: str | None = None,
) -> dict:
    """Write ``samples`` synthetic token samples to local shards (and to moto S3 when ``s3``), then
    stream them back with :func:`musiclm.data.shards.shard_reader` in this process (no DataLoader
    workers) and report samples/s and tokens/s (best of ``repeats`` passes)."""
    import platform

    rng = np.random.default_rng(seed)
    data = [synth_sample(i, rng) for i in range(samples)]
    goal = 50_000
    out: dict = {
        "bench": "shards",
        "samples": samples,
        "shard_samples": shard_samples,
        "shuffle_buffer": shuffle,
        "sample_shapes": {k: list(v.shape) for k, v in data[0].items() if k.endswith(".npy")},
        "acoustic_tokens_per_sample": int(data[0]["acoustic.npy"].size),
        "goal_acoustic_tokens_per_s": goal,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    tmp = tempfile.mkdtemp(prefix="musiclm-bench-shards-", dir=workdir)
    try:
        local = os.path.join(tmp, "tokens")
        out["local"] = {"write": _write(local, data, shard_samples), "read": _read(local, shuffle, repeats)}
        if s3:
            with MotoServer() as server, environ(server.env()):
                bucket = server.create_bucket()
                remote = f"{bucket}/bench/tokens"
                out["s3"] = {
                    "endpoint": "moto_server (local, in-memory)",
                    "write": _write(remote, data, shard_samples),
                    "read": _read(remote, shuffle, repeats),
                }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    reads = [out[k]["read"]["acoustic_tokens_per_s"] for k in ("local", "s3") if k in out]
    out["meets_goal"] = all(r >= goal for r in reads)
    return out


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
