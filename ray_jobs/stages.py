"""Ray Data stages shared by the jobs, and what moves between them.

Rows carry a group (``{"group": Group JSON}``), then its decoded audio (``"audio"``: npz of int16
segments, ``"meta"``: JSON); a job adds its own stages (an actor pool, a writer). An actor that
does it all (tokenize's fused pipeline) calls :func:`decode_clips` itself on the undecoded group
and nothing crosses the object store but the group and its record. The functions
here run inside Ray tasks and actors and are shipped by value (:func:`ray_jobs.cluster.init_ray`)."""

from __future__ import annotations

import io
import json
import time

import numpy as np

from musiclm.data import segments as S


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """dict of arrays -> .npz bytes (no pickle), for moving data between Ray stages."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(bytes(blob)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def reason_of(e: Exception) -> str:
    """The errors.jsonl reason of a decoding error."""
    msg = str(getattr(e, "reason", e)).lower()
    for needle, reason in (
        ("not found", "missing"),
        ("no such file", "missing"),
        ("silent", "silent"),
        ("empty", "empty"),
        ("no samples", "empty"),
        ("cannot read", "unreadable"),
        ("permission", "unreadable"),
        ("directory", "unreadable"),
        ("corrupt", "corrupt"),
        ("unreadable", "corrupt"),
    ):
        if needle in msg:
            return reason
    return "unreadable"


def decode_clips(
    group: S.Group, *, sample_rate: int, segment_seconds: float, grid_seconds: float, min_seconds: float
) -> tuple[dict[str, np.ndarray], dict]:
    """Decode, check and segment every clip of a group, in this process.

    Returns (int16 segments keyed by sample key, meta: segments [{key, clip_id, index, start, end}],
    errors, sample_rate, decode_s). Every clip ends up with segments or with an error record."""
    from musiclm.audio import AudioError, load_audio

    t0 = time.time()
    arrays: dict[str, np.ndarray] = {}
    segs, errors = [], []
    for clip in group.clips:
        try:
            wav, sr = load_audio(clip["audio"], sample_rate, mono=True, start=clip.get("start"), end=clip.get("end"))
            wav = wav.numpy()
        except AudioError as e:
            errors.append(S.error_record(clip, reason_of(e), str(e)))
            continue
        except Exception as e:  # a bad span, a codec crash...: this clip only
            errors.append(S.error_record(clip, "unreadable", f"{type(e).__name__}: {e}"))
            continue
        problem = S.audio_problem(wav)
        if problem:
            errors.append(S.error_record(clip, problem, f"{clip['audio']}: {problem} audio after decoding"))
            continue
        bounds = S.segment_bounds(
            len(wav), sample_rate, segment_seconds, grid_seconds=grid_seconds, min_seconds=min_seconds
        )
        if not bounds:
            errors.append(
                S.error_record(
                    clip,
                    "too_short",
                    f"{len(wav) / sample_rate:.2f} s is shorter than the {min_seconds} s minimum segment",
                )
            )
            continue
        offset = float(clip.get("start") or 0.0)
        for i, (a, b) in enumerate(bounds):
            key = S.segment_key(clip["id"], i)
            arrays[key] = S.to_int16(wav[a:b])
            segs.append(
                {
                    "key": key,
                    "clip_id": clip["id"],
                    "index": i,
                    "start": round(offset + a / sample_rate, 6),
                    "end": round(offset + b / sample_rate, 6),
                }
            )
    meta = {"segments": segs, "errors": errors, "sample_rate": sample_rate, "decode_s": time.time() - t0}
    return arrays, meta


def decode_group(
    row: dict, *, sample_rate: int, segment_seconds: float, grid_seconds: float, min_seconds: float
) -> dict:
    """Ray Data `map` (CPU task): :func:`decode_clips` on the row's group.

    In: {"group": Group JSON}. Out: + "audio" (npz of int16 segments keyed by sample key) and
    "meta" (JSON: segments, errors, timings)."""
    import torch

    torch.set_num_threads(1)
    arrays, meta = decode_clips(
        S.Group.from_json(row["group"]),
        sample_rate=sample_rate,
        segment_seconds=segment_seconds,
        grid_seconds=grid_seconds,
        min_seconds=min_seconds,
    )
    return {"group": row["group"], "audio": pack_arrays(arrays), "meta": json.dumps(meta)}


def sample_json(clip: dict, seg: dict, sample_rate: int) -> dict:
    return {
        "clip_id": clip["id"],
        "caption": clip.get("caption"),
        "source": clip.get("audio"),
        "start": seg["start"],
        "end": seg["end"],
        "segment": seg["index"],
        "sample_rate": sample_rate,
        "split": clip.get("split"),
        "tags": clip.get("extra") or {},
    }


def groups_dataset(pending: list[S.Group]):
    """One row (and one block) per pending group, so groups run in parallel."""
    import ray

    items = [{"group": g.to_json()} for g in pending]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def actor_stage(ds, cls, wp: dict, constructor_kwargs: dict):
    """`map_batches` through a fixed pool of `wp["workers"]` actors of `cls`, one group per call."""
    import ray

    return ds.map_batches(
        cls,
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=wp["workers"]),
        num_cpus=wp["cpus_per_worker"],
        num_gpus=wp["gpus_per_worker"] or None,
        fn_constructor_kwargs=constructor_kwargs,
    )


def actor_pool_rows(cls, wp: dict, constructor_kwargs: dict, items: list, method: str, in_flight: int = 2):
    """Plain Ray actors, no Ray Data: ``wp["workers"]`` actors of ``cls``, each given one item per
    call of ``method`` (``in_flight`` queued per actor; the next item goes to the actor that
    finished one). Yields what the calls return, in the order they finish; an error raises.

    For actors that do a whole unit of work per call (tokenize's fused pipeline): the driver then
    does one ``ray.wait`` per item instead of Ray Data's per-block bookkeeping, which on a small
    machine takes CPU from the actors (measured: README section 4)."""
    import ray

    remote_cls = ray.remote(num_cpus=wp["cpus_per_worker"], num_gpus=wp["gpus_per_worker"])(cls)
    actors = [remote_cls.remote(**constructor_kwargs) for _ in range(wp["workers"])]
    queue = list(reversed(items))  # pop() from the end: items in their order
    running: dict = {}  # call -> actor

    def submit(actor) -> None:
        running[getattr(actor, method).remote(queue.pop())] = actor

    try:
        for _ in range(in_flight):
            for actor in actors:
                if queue:
                    submit(actor)
        while running:
            (done,), _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(done)
            if queue:
                submit(actor)
            yield ray.get(done)
    finally:
        for actor in actors:
            ray.kill(actor)


def segment_batches(segs: list[dict], audio: dict, batch_size: int):
    """Yield (segments, float tensor [B, T]) with equal-length segments batched together."""
    import torch

    by_len: dict[int, list[dict]] = {}
    for s in segs:
        by_len.setdefault(int(audio[s["key"]].shape[-1]), []).append(s)
    for _, same in sorted(by_len.items(), reverse=True):
        for i in range(0, len(same), batch_size):
            chunk = same[i : i + batch_size]
            yield chunk, torch.from_numpy(np.stack([S.from_int16(audio[s["key"]]) for s in chunk]))


def fit_record(
    group: S.Group, meta: dict, used_clips: set[str], errors: list[dict], seconds: float, timings: dict
) -> dict:
    """Per-group record of the fitting jobs (same fields Progress reads)."""
    return {
        "group": group.name,
        "clips": [c["id"] for c in group.clips],
        "clips_ok": sorted(used_clips),
        "clips_failed": sorted({e["clip_id"] for e in errors}),
        "segments": len(meta["segments"]),
        "seconds": round(seconds, 3),
        "errors": errors,
        "timings": timings,
        "finished": time.time(),
    }


def actor_stamp() -> dict:
    """Identity and ready time of an actor (after its model loaded), carried in group records."""
    import uuid

    return {"id": uuid.uuid4().hex[:12], "ready": time.time()}
