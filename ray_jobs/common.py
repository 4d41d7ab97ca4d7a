"""Glue shared by the Ray jobs in this folder.

* Ray: :func:`init_ray` starts a local Ray (embedded default) or joins the cluster named by
  ``--address`` / ``RAY_ADDRESS`` (set for you inside ``ray job submit``).
* Work plan: a manifest becomes deterministic groups of clips (``musiclm.data.segments``), one
  shard per group. Each group is decoded, segmented, processed and written as one unit by Ray Data
  stages; its record (``_groups/<split>-%06d.json``: clip ids, shard written, errors, timings) is
  written after its shard, so a rerun skips exactly the groups that finished: every clip ends up
  exactly once, in a shard or in ``errors.jsonl``.
* Output: ``errors.jsonl`` (one line per failed clip, with its reason) and ``index.json`` written
  last; a one-line JSON summary printed at the end.

Functions that run inside Ray tasks/actors live in this module and are shipped by value
(cloudpickle), so workers need ``musiclm`` importable but not this folder.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python ray_jobs/X.py`: use this checkout's musiclm
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

from musiclm.config import add_set_argument  # noqa: E402
from musiclm.data import segments as S  # noqa: E402
from musiclm.data import storage  # noqa: E402
from musiclm.fingerprint import canonical_hash  # noqa: E402

GROUPS_DIR = "_groups"
PLAN_NAME = "plan.json"
ERRORS_NAME = "errors.jsonl"


def log(msg: str) -> None:
    print(msg, flush=True)


# ============================================================================== arguments
def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--manifest", required=True, help="manifest.jsonl (local path or s3://)")
    p.add_argument("--config", default=None, help="YAML config (launch/configs/tokenizers.yaml)")
    add_set_argument(p)
    p.add_argument("--address", default=None,
                   help="Ray cluster address; default: RAY_ADDRESS if set (inside `ray job submit`), else a local Ray")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray (default: all cores)")
    p.add_argument("--workers", type=int, default=None,
                   help="actors in the model pool (default: one per GPU, else one per CPU)")
    p.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs reserved per actor (default: 1 with GPUs, else what the cores allow)")
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 when the cluster has GPUs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--task-cpus", type=float, default=0.5, help="CPUs per decode / write task")
    p.add_argument("--batch-size", type=int, default=8, help="segments per model call")
    p.add_argument("--max-clips", type=int, default=None, help="use at most this many clips (deterministic sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="also show Ray Data's own progress bars")
    return p


def add_shard_args(p: argparse.ArgumentParser, default_clips: int = 32) -> None:
    p.add_argument("--out", default="shards", help="shard root: a folder or s3://bucket/prefix")
    p.add_argument("--dataset", default=None,
                   help="dataset name under --out (default: the manifest's folder name)")
    p.add_argument("--clips-per-shard", type=int, default=default_clips,
                   help="clips per group; one group = one shard, the unit of work and of resume")
    p.add_argument("--segment-seconds", type=float, default=None,
                   help="segment length (default: config segment_seconds, else 10)")
    p.add_argument("--min-segment-seconds", type=float, default=None,
                   help="shortest last segment kept (default: config min_segment_seconds, else 1)")
    p.add_argument("--overwrite", action="store_true",
                   help="start over when the output folder holds a different plan (else: refuse)")
    p.add_argument("--retry-failed", action="store_true",
                   help="on a rerun, process again the groups that have failed clips (e.g. after a transient "
                        "error); by default finished groups are kept as they are")
    p.add_argument("--test-group-delay", type=float, default=0.0, help=argparse.SUPPRESS)  # tests: kill midway


def load_config(path: str | None, overrides: list[str] | None = None) -> dict:
    """The job's YAML (local or s3://) with `base:` files and --set overrides (musiclm.config)."""
    from musiclm.config import ConfigError
    from musiclm.config import load_config as _load

    try:
        return _load(path, overrides)
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def tokenizers_section(cfg: dict) -> dict:
    """The `tokenizers:` section of a config, or the config itself when it is that section."""
    return dict(cfg.get("tokenizers", cfg))


def dataset_name(args) -> str:
    if args.dataset:
        return args.dataset
    parent = storage.basename(storage.dirname(args.manifest))
    return S.safe_clip_key(parent or "dataset")


# ============================================================================== Ray
def init_ray(args) -> dict:
    """Join the cluster (``--address`` or ``RAY_ADDRESS``) or start a local Ray; returns
    {"mode", "address", "cpus", "gpus"}."""
    import ray
    import ray.data

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("http"):
        raise SystemExit(f"RAY_ADDRESS={address} is a dashboard URL (for `ray job submit`); "
                         f"submit the job with `ray job submit --working-dir . -- python {sys.argv[0]} ...` "
                         f"or set RAY_ADDRESS to the GCS address (host:6379)")
    kwargs: dict[str, Any] = dict(ignore_reinit_error=True, log_to_driver=True, logging_level="WARNING")
    if address:
        fwd = forwarded_env()
        if fwd:
            kwargs["runtime_env"] = {"env_vars": fwd}
        ray.init(address=address, **kwargs)
        mode = "cluster"
    else:
        # The local Ray's workers inherit this environment: let them import this checkout's musiclm
        # even where it is not pip-installed.
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(REPO_ROOT) not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
        ray.init(num_cpus=int(args.num_cpus) if args.num_cpus else None, include_dashboard=False, **kwargs)
        mode = "local"
    # Ship this module's functions by value: workers then need musiclm, not ray_jobs/ on sys.path.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    res = ray.cluster_resources()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(getattr(args, "progress", False))
    ctx.print_on_execution_start = bool(getattr(args, "progress", False))
    return {"mode": mode, "address": address or "local", "cpus": float(res.get("CPU", 1)),
            "gpus": float(res.get("GPU", 0))}


# Storage settings the workers need to reach s3:// (moto, MinIO...). A local Ray's workers inherit
# the driver's environment; a cluster's do not, so a driver that joins a cluster passes these on.
# Inside `ray job submit` the job's own runtime_env is used as it is (pass them with
# --runtime-env-json '{"env_vars": {...}}').
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")


def forwarded_env() -> dict:
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # inside a submitted job
        return {}
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def worker_plan(args, ray_info: dict) -> dict:
    """Actor pool size and resources: one actor per GPU when the cluster has GPUs, else actors
    sized so that the pool leaves room for the decode and write tasks (no deadlock)."""
    cpus, gpus = ray_info["cpus"], ray_info["gpus"]
    use_gpu = args.device != "cpu" and gpus > 0 and args.gpus_per_worker != 0
    if args.device == "cuda" and gpus == 0:
        raise SystemExit("--device cuda but the Ray cluster has no GPU")
    reserve = 2 * args.task_cpus
    if use_gpu:
        gpus_per = args.gpus_per_worker or 1.0
        workers = args.workers or max(1, int(gpus // gpus_per))
        cpus_per = args.cpus_per_worker or 1.0
        device = "cuda"
    else:
        gpus_per = 0.0
        workers = args.workers or max(1, int(cpus))
        cpus_per = args.cpus_per_worker or min(1.0, max(0.1, (cpus - reserve) / workers))
        device = "cpu"
    if workers * cpus_per + reserve > cpus + 1e-6:
        log(f"[warn] {workers} workers x {cpus_per} CPUs + {reserve} for tasks > {cpus} CPUs in the cluster: "
            f"the pool may wait for resources")
    return {"workers": int(workers), "cpus_per_worker": float(cpus_per), "gpus_per_worker": float(gpus_per),
            "device": device, "threads": max(1, int(math.floor(cpus_per + 1e-9)))}


# ============================================================================== small storage helpers
def write_json(url: str, obj: Any) -> None:
    storage.write_bytes_atomic(url, (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode())


def read_json(url: str) -> Any:
    return json.loads(storage.read_bytes(url))


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """dict of arrays -> .npz bytes (no pickle), for moving data between Ray stages."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(bytes(blob)), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ============================================================================== plan and resume
class WorkState:
    """Resume bookkeeping in ``<out_dir>/_groups/``: ``plan.json`` and one record per finished group."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.dir = storage.join(out_dir, GROUPS_DIR)

    def record_url(self, name: str) -> str:
        return storage.join(self.dir, f"{name}.json")

    def check_plan(self, plan: dict, overwrite: bool) -> bool:
        """Write the plan, or check it against the one already there. Returns True when resuming."""
        url = storage.join(self.dir, PLAN_NAME)
        if storage.exists(url):
            old = read_json(url)
            if old.get("plan_hash") == plan["plan_hash"]:
                return True
            if not overwrite:
                raise SystemExit(
                    f"{self.out_dir} holds the output of a different plan (manifest, clips per shard or "
                    f"segment length changed: {old.get('plan_hash')} != {plan['plan_hash']}). "
                    f"Use a new --out/--dataset, or --overwrite to start this folder over.")
            self.clear()
        storage.makedirs(self.dir)
        write_json(url, plan)
        return False

    def clear(self) -> None:
        from musiclm.data.shards import INDEX_NAME, SHARD_RE

        for name in storage.listdir(self.out_dir):
            if SHARD_RE.match(name) or name in (INDEX_NAME, ERRORS_NAME):
                storage.remove(storage.join(self.out_dir, name))
        for name in storage.listdir(self.dir):
            storage.remove(storage.join(self.dir, name))

    def done(self) -> set[str]:
        return {n[:-5] for n in storage.listdir(self.dir) if n.endswith(".json") and n != PLAN_NAME}

    def records(self, names: Iterable[str]) -> list[dict]:
        """Group records, read in parallel (object stores: one GET each)."""
        from concurrent.futures import ThreadPoolExecutor

        urls = [self.record_url(n) for n in names]
        if len(urls) < 8 or not storage.is_remote(self.out_dir):
            return [read_json(u) for u in urls]
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(read_json, urls))


def make_plan(args, job: str, params: dict, *, clips_per_group: int) -> tuple[list[S.Group], list[dict], dict]:
    """Manifest -> (groups, plan errors, plan dict with its hash)."""
    from musiclm.data.manifest import read_manifest, split_for

    clips = [S.clip_record(c) for c in read_manifest(args.manifest)]
    if args.max_clips:
        clips = S.sample_clips(clips, args.max_clips, seed=args.seed)
    groups, errors = S.plan_groups(clips, clips_per_group, split_of=split_for)
    body = {"job": job, "params": params, "clips_per_group": clips_per_group,
            "groups": [[g.name, [c["id"] for c in g.clips]] for g in groups],
            "clips": canonical_hash([[c["id"], c["audio"], c.get("start"), c.get("end"), c.get("caption"),
                                        c.get("split")] for g in groups for c in g.clips])}
    plan = {"job": job, "manifest": args.manifest, "plan_hash": canonical_hash(body), "params": params,
            "clips_per_group": clips_per_group, "groups": len(groups),
            "clips": sum(len(g.clips) for g in groups), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return groups, errors, plan


# ============================================================================== Ray stages
def _reason_of(e: Exception) -> str:
    msg = str(getattr(e, "reason", e)).lower()
    for needle, reason in (("not found", "missing"), ("no such file", "missing"), ("silent", "silent"),
                           ("empty", "empty"), ("no samples", "empty"), ("cannot read", "unreadable"),
                           ("permission", "unreadable"), ("directory", "unreadable"),
                           ("corrupt", "corrupt"), ("unreadable", "corrupt")):
        if needle in msg:
            return reason
    return "unreadable"


def decode_group(row: dict, *, sample_rate: int, segment_seconds: float, grid_seconds: float,
                 min_seconds: float) -> dict:
    """Ray Data `map` (CPU task): decode, check and segment every clip of a group.

    In: {"group": Group JSON}. Out: + "audio" (npz of int16 segments keyed by sample key) and
    "meta" (JSON: segments [{key, clip_id, index, start, end}], errors, timings)."""
    import torch

    from musiclm.audio import AudioError, load_audio

    torch.set_num_threads(1)
    t0 = time.time()
    group = S.Group.from_json(row["group"])
    arrays: dict[str, np.ndarray] = {}
    segs, errors = [], []
    for clip in group.clips:
        try:
            wav, sr = load_audio(clip["audio"], sample_rate, mono=True, start=clip.get("start"), end=clip.get("end"))
            wav = wav.numpy()
        except AudioError as e:
            errors.append(S.error_record(clip, _reason_of(e), str(e)))
            continue
        except Exception as e:  # a bad span, a codec crash...: this clip only
            errors.append(S.error_record(clip, "unreadable", f"{type(e).__name__}: {e}"))
            continue
        problem = S.audio_problem(wav)
        if problem:
            errors.append(S.error_record(clip, problem, f"{clip['audio']}: {problem} audio after decoding"))
            continue
        bounds = S.segment_bounds(len(wav), sample_rate, segment_seconds, grid_seconds=grid_seconds,
                                  min_seconds=min_seconds)
        if not bounds:
            errors.append(S.error_record(clip, "too_short", f"{len(wav) / sample_rate:.2f} s is shorter than "
                                                            f"the {min_seconds} s minimum segment"))
            continue
        offset = float(clip.get("start") or 0.0)
        for i, (a, b) in enumerate(bounds):
            key = S.segment_key(clip["id"], i)
            arrays[key] = S.to_int16(wav[a:b])
            segs.append({"key": key, "clip_id": clip["id"], "index": i,
                         "start": round(offset + a / sample_rate, 6), "end": round(offset + b / sample_rate, 6)})
    meta = {"segments": segs, "errors": errors, "sample_rate": sample_rate, "decode_s": time.time() - t0}
    return {"group": row["group"], "audio": pack_arrays(arrays), "meta": json.dumps(meta)}


def sample_json(clip: dict, seg: dict, sample_rate: int) -> dict:
    return {"clip_id": clip["id"], "caption": clip.get("caption"), "source": clip.get("audio"),
            "start": seg["start"], "end": seg["end"], "segment": seg["index"], "sample_rate": sample_rate,
            "split": clip.get("split"), "tags": clip.get("extra") or {}}


def write_group(group: S.Group, samples: list[dict], errors: list[dict], *, out_dir: str, kind: str,
                timings: dict, delay: float = 0.0) -> dict:
    """Write a group's samples as shard `<split>-<index>.tar`, then its record. Returns the record.

    Clips with no written sample and no error cannot occur: callers turn every dropped clip into
    an error. A group with no sample writes no shard, only its record."""
    from musiclm.data.shards import ShardWriter, shard_name

    if delay:  # --test-group-delay: slow groups down so a test can kill the job midway
        time.sleep(delay)
    t0 = time.time()
    shards: list[dict] = []
    if samples:
        # One shard per group: limits high enough that the writer never rolls over into the
        # next group's shard number.
        with ShardWriter(out_dir, group.split, kind=kind, max_samples=1 << 40, max_bytes=1 << 60,
                         start_shard=group.index) as w:
            for s in samples:
                w.write(s)
        shards = w.shards
    else:  # a rerun (--retry-failed) where every clip failed: no stale shard of an earlier run
        storage.remove(storage.join(out_dir, shard_name(group.split, group.index)))
    ok_clips = sorted({s["json"]["clip_id"] for s in samples})
    failed = sorted({e["clip_id"] for e in errors})
    seconds = sum(float(s["json"]["end"]) - float(s["json"]["start"]) for s in samples)
    record = {"group": group.name, "split": group.split, "index": group.index,
              "clips": [c["id"] for c in group.clips], "clips_ok": ok_clips, "clips_failed": failed,
              "segments": len(samples), "seconds": round(seconds, 3), "shards": shards, "errors": errors,
              "timings": dict(timings, write_s=round(time.time() - t0, 4)), "finished": time.time()}
    missing = set(record["clips"]) - set(ok_clips) - set(failed)
    if missing or set(ok_clips) & set(failed):
        raise RuntimeError(f"group {group.name}: clip accounting broken (missing {sorted(missing)})")
    write_json(WorkState(out_dir).record_url(group.name), record)
    return record


# ============================================================================== driving and finishing
class Progress:
    """Progress lines while groups finish: groups, clips, audio seconds, audio-seconds/s, ETA."""

    def __init__(self, job: str, groups: int, clips: int, every_s: float = 2.0):
        self.job, self.groups, self.clips, self.every_s = job, groups, clips, every_s
        self.t0 = time.time()
        self.t_end: float | None = None
        self.done_groups = self.ok = self.failed = self.segments = 0
        self.seconds = 0.0
        self.busy_s = 0.0
        self._last = 0.0
        self.group_times: list[tuple[float, float]] = []  # (finished at, audio seconds)
        self.actors: dict[str, float] = {}  # actor -> time its model was loaded

    def update(self, rec: dict) -> None:
        now = time.time()
        self.done_groups += 1
        self.ok += len(rec["clips_ok"])
        self.failed += len(rec["clips_failed"])
        self.segments += rec["segments"]
        self.seconds += rec["seconds"]
        self.busy_s += float(rec.get("timings", {}).get("model_s", 0.0))
        self.group_times.append((float(rec.get("finished", now)), rec["seconds"]))
        actor = rec.get("timings", {}).get("actor")
        if actor:
            self.actors[actor["id"]] = float(actor["ready"])
        if now - self._last >= self.every_s or self.done_groups == self.groups:
            self._last = now
            el = now - self.t0
            rate = self.seconds / el if el > 0 else 0.0
            eta = (self.groups - self.done_groups) * el / self.done_groups if self.done_groups else float("nan")
            log(f"[{self.job}] groups {self.done_groups}/{self.groups} | clips ok {self.ok} failed {self.failed}"
                f" of {self.clips} | segments {self.segments} | audio {self.seconds:.0f} s"
                f" | {rate:.1f} audio-s/s | elapsed {el:.0f} s | eta {eta:.0f} s")

    def stop(self) -> None:
        self.t_end = time.time()

    def rates(self, workers: int) -> dict:
        el = (self.t_end or time.time()) - self.t0
        out = {"elapsed_s": round(el, 3),
               "audio_seconds_per_s": round(self.seconds / el, 3) if el > 0 else 0.0}
        # Steady state: from the moment every worker had its model loaded to the last group, the
        # audio of the groups finished in that span (actor start-up excluded; what a long job sees).
        if self.actors and len(self.actors) >= min(workers, len(self.group_times)):
            t_ready = max(self.actors.values())
            after = [(t, s) for t, s in self.group_times if t > t_ready]
            dt = max(t for t, _ in after) - t_ready if after else 0.0
            if dt > 0:
                out["steady_audio_seconds_per_s"] = round(sum(s for _, s in after) / dt, 3)
                out["steady_groups"] = len(after)
        if self.busy_s > 0:
            out["audio_seconds_per_s_per_worker"] = round(self.seconds / self.busy_s, 3)
        return out


def run_pipeline(ds, progress: Progress) -> None:
    """Stream the final stage's rows ({"record": JSON}) and report progress."""
    for row in ds.iter_rows():
        progress.update(json.loads(row["record"]))
    progress.stop()


def finish(*, job: str, out_dir: str, kind: str, fingerprints: dict, groups: list[S.Group],
           plan_errors: list[dict], state: WorkState, extra: dict, progress: Progress | None,
           workers: int, ray_info: dict, t_start: float) -> dict:
    """All groups done: merge errors into errors.jsonl, write index.json, return the summary."""
    from musiclm.data.shards import write_index

    done = state.done()
    missing = [g.name for g in groups if g.name not in done]
    if missing:
        raise SystemExit(f"{len(missing)} groups have no record ({missing[:5]}...): rerun the job to finish them")
    records = state.records(g.name for g in groups)
    errors = list(plan_errors) + [e for r in records for e in r["errors"]]
    errors.sort(key=lambda e: (str(e.get("split")), str(e.get("clip_id")), str(e.get("reason"))))
    storage.write_bytes_atomic(storage.join(out_dir, ERRORS_NAME),
                               "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    by_reason: dict[str, int] = {}
    for e in errors:
        by_reason[e["reason"]] = by_reason.get(e["reason"], 0) + 1
    shards = [s for r in records for s in r["shards"]]
    clips_ok = sum(len(r["clips_ok"]) for r in records)
    clips = sum(len(r["clips"]) for r in records) + len(plan_errors)
    segments = sum(r["segments"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    index_extra = dict(extra, job=job, clips=clips, clips_ok=clips_ok, clips_failed=len(errors),
                       failed_by_reason=by_reason, errors_file=ERRORS_NAME)
    write_index(out_dir, shards, kind=kind, fingerprints=fingerprints, extra=index_extra)
    summary = {"job": job, "out_dir": out_dir, "clips": clips, "clips_ok": clips_ok, "clips_failed": len(errors),
               "failed_by_reason": by_reason, "segments": segments, "shards": len(shards),
               "audio_hours": round(seconds / 3600.0, 6), "groups": len(groups),
               "groups_this_run": progress.done_groups if progress else 0,
               "workers": workers, "ray": ray_info["mode"], "total_s": round(time.time() - t_start, 3)}
    if progress is not None and progress.done_groups:
        summary.update(progress.rates(workers))
        summary["audio_seconds_this_run"] = round(progress.seconds, 3)
    else:
        summary["audio_seconds_per_s"] = 0.0
    if errors:
        log(f"[{job}] {len(errors)} clip(s) failed ({', '.join(f'{k}: {v}' for k, v in sorted(by_reason.items()))}); "
            f"see {storage.join(out_dir, ERRORS_NAME)}")
    return summary


def print_summary(summary: dict) -> None:
    """The last line a job prints: its summary as one JSON object."""
    log(json.dumps(summary, sort_keys=True))


def parse_summary(text: str) -> dict | None:
    """The summary dict from a job's output (the last line that is a JSON object with "job")."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"job"' in line:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict) and "job" in obj:
                return obj
    return None


def pending_groups(groups: list[S.Group], state: WorkState, retry_failed: bool = False) -> list[S.Group]:
    """Groups without a record (and, with `retry_failed`, finished groups that have failed clips)."""
    done = state.done()
    pending = [g for g in groups if g.name not in done]
    if retry_failed:
        finished = [g for g in groups if g.name in done]
        pending += [g for g, r in zip(finished, state.records(g.name for g in finished)) if r["clips_failed"]]
        pending.sort(key=lambda g: (g.split, g.index))
    return pending


def groups_dataset(pending: list[S.Group]):
    """One row (and one block) per pending group, so groups run in parallel."""
    import ray

    items = [{"group": g.to_json()} for g in pending]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items)))


def actor_stage(ds, cls, wp: dict, constructor_kwargs: dict):
    """`map_batches` through a fixed pool of `wp["workers"]` actors of `cls`, one group per call."""
    import ray

    return ds.map_batches(
        cls, batch_size=1, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=wp["workers"]),
        num_cpus=wp["cpus_per_worker"], num_gpus=wp["gpus_per_worker"] or None,
        fn_constructor_kwargs=constructor_kwargs)


def segment_batches(segs: list[dict], audio: dict, batch_size: int):
    """Yield (segments, float tensor [B, T]) with equal-length segments batched together."""
    import torch

    by_len: dict[int, list[dict]] = {}
    for s in segs:
        by_len.setdefault(int(audio[s["key"]].shape[-1]), []).append(s)
    for _, same in sorted(by_len.items(), reverse=True):
        for i in range(0, len(same), batch_size):
            chunk = same[i:i + batch_size]
            yield chunk, torch.from_numpy(np.stack([S.from_int16(audio[s["key"]]) for s in chunk]))


def fit_record(group: S.Group, meta: dict, used_clips: set[str], errors: list[dict], seconds: float,
               timings: dict) -> dict:
    """Per-group record of the fitting jobs (same fields Progress reads)."""
    return {"group": group.name, "clips": [c["id"] for c in group.clips], "clips_ok": sorted(used_clips),
            "clips_failed": sorted({e["clip_id"] for e in errors}), "segments": len(meta["segments"]),
            "seconds": round(seconds, 3), "errors": errors, "timings": timings, "finished": time.time()}


def collect_groups(ds, progress: Progress) -> tuple[list[dict], list[dict[str, np.ndarray]]]:
    """Stream rows {"record": JSON, "arrays": npz} of a fitting pipeline -> (records, arrays)."""
    records, arrays = [], []
    for row in ds.iter_rows():
        rec = json.loads(row["record"])
        progress.update(rec)
        records.append(rec)
        arrays.append(unpack_arrays(row["arrays"]))
    progress.stop()
    return records, arrays


def write_errors(url: str, errors: list[dict]) -> None:
    errors = sorted(errors, key=lambda e: (str(e.get("clip_id")), str(e.get("reason"))))
    storage.write_bytes_atomic(url, "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())


def actor_stamp() -> dict:
    """Identity and ready time of an actor (after its model loaded), carried in group records."""
    import uuid

    return {"id": uuid.uuid4().hex[:12], "ready": time.time()}


def resolve_device(device: str) -> str:
    import torch

    if device in ("auto", "cuda"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def run_actor_over_groups(args, job: str, actor_cls, actor_kwargs: dict, *, sample_rate: int,
                          segment_seconds: float, describe: str):
    """The fitting jobs' shared pipeline: plan groups of clips, decode + segment them in CPU tasks,
    run ``actor_cls`` (a model replica per worker) over them, collect what each group returns.

    Returns (records, arrays, plan_errors, progress, worker plan, ray info)."""
    groups, plan_errors, plan = make_plan(args, job, {}, clips_per_group=args.clips_per_task)
    log(f"[{job}] {plan['clips']} clips ({len(groups)} tasks), {describe}")
    ray_info = init_ray(args)
    wp = worker_plan(args, ray_info)
    progress = Progress(job, len(groups), plan["clips"])
    ds = groups_dataset(groups).map(
        decode_group, num_cpus=args.task_cpus,
        fn_kwargs=dict(sample_rate=sample_rate, segment_seconds=segment_seconds, grid_seconds=0.0, min_seconds=1.0))
    ds = actor_stage(ds, actor_cls, wp, dict(actor_kwargs, device=wp["device"], threads=wp["threads"],
                                             batch_size=args.batch_size))
    records, arrays = collect_groups(ds, progress)
    return records, arrays, plan_errors, progress, wp, ray_info
