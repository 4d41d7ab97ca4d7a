"""What the jobs write and print: a group's shard and record, progress lines, ``errors.jsonl``,
``index.json`` (written last) and the one-line JSON summary a job prints at the end."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from musiclm.data import segments as S
from musiclm.data import storage
from musiclm.logs import get_logger
from ray_jobs.plan import ERRORS_NAME, WorkState, write_json

log = get_logger(__name__)


def write_group(
    group: S.Group,
    samples: list[dict],
    errors: list[dict],
    *,
    out_dir: str,
    kind: str,
    timings: dict,
    delay: float = 0.0,
    streams=None,
) -> dict:
    """Write a group's samples as shard `<split>-<index>.tar`, then its record. Returns the record.
    ``streams``: the token streams every sample carries (token shards; default all).

    Clips with no written sample and no error cannot occur: callers turn every dropped clip into
    an error. A group with no sample writes no shard, only its record."""
    from musiclm.data.shards import ShardWriter, shard_name

    if delay:  # MUSICLM_TEST_GROUP_DELAY (musiclm.testing): slow groups down so a test can kill the job midway
        time.sleep(delay)
    t0 = time.time()
    shards: list[dict] = []
    if samples:
        # One shard per group: limits high enough that the writer never rolls over into the
        # next group's shard number.
        with ShardWriter(
            out_dir,
            group.split,
            kind=kind,
            max_samples=1 << 40,
            max_bytes=1 << 60,
            start_shard=group.index,
            streams=streams,
        ) as w:
            for s in samples:
                w.write(s)
        shards = w.shards
    else:  # a rerun (--retry-failed) where every clip failed: no stale shard of an earlier run
        storage.remove(storage.join(out_dir, shard_name(group.split, group.index)))
    ok_clips = sorted({s["json"]["clip_id"] for s in samples})
    failed = sorted({e["clip_id"] for e in errors})
    seconds = sum(float(s["json"]["end"]) - float(s["json"]["start"]) for s in samples)
    record = {
        "group": group.name,
        "split": group.split,
        "index": group.index,
        "clips": [c["id"] for c in group.clips],
        "clips_ok": ok_clips,
        "clips_failed": failed,
        "segments": len(samples),
        "seconds": round(seconds, 3),
        "shards": shards,
        "errors": errors,
        "timings": dict(timings, write_s=round(time.time() - t0, 4)),
        "finished": time.time(),
    }
    missing = set(record["clips"]) - set(ok_clips) - set(failed)
    if missing or set(ok_clips) & set(failed):
        raise RuntimeError(f"group {group.name}: clip accounting broken (missing {sorted(missing)})")
    write_json(WorkState(out_dir).record_url(group.name), record)
    return record


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
            log.info(
                f"[{self.job}] groups {self.done_groups}/{self.groups} | clips ok {self.ok} failed {self.failed}"
                f" of {self.clips} | segments {self.segments} | audio {self.seconds:.0f} s"
                f" | {rate:.1f} audio-s/s | elapsed {el:.0f} s | eta {eta:.0f} s"
            )

    def stop(self) -> None:
        self.t_end = time.time()

    def rates(self, workers: int) -> dict:
        el = (self.t_end or time.time()) - self.t0
        out = {"elapsed_s": round(el, 3), "audio_seconds_per_s": round(self.seconds / el, 3) if el > 0 else 0.0}
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


def finish(
    *,
    job: str,
    out_dir: str,
    kind: str,
    fingerprints: dict,
    groups: list[S.Group],
    plan_errors: list[dict],
    state: WorkState,
    extra: dict,
    progress: Progress | None,
    workers: int,
    ray_info: dict,
    t_start: float,
    streams=None,
) -> dict:
    """All groups done: merge errors into errors.jsonl, write index.json (with the token
    ``streams``, default all, for token shards), return the summary."""
    from musiclm.data.shards import write_index

    done = state.done()
    missing = [g.name for g in groups if g.name not in done]
    if missing:
        raise SystemExit(f"{len(missing)} groups have no record ({missing[:5]}...): rerun the job to finish them")
    records = state.records(g.name for g in groups)
    errors = list(plan_errors) + [e for r in records for e in r["errors"]]
    errors.sort(key=lambda e: (str(e.get("split")), str(e.get("clip_id")), str(e.get("reason"))))
    storage.write_text_atomic(
        storage.join(out_dir, ERRORS_NAME), "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors)
    )
    by_reason: dict[str, int] = {}
    for e in errors:
        by_reason[e["reason"]] = by_reason.get(e["reason"], 0) + 1
    shards = [s for r in records for s in r["shards"]]
    clips_ok = sum(len(r["clips_ok"]) for r in records)
    clips = sum(len(r["clips"]) for r in records) + len(plan_errors)
    segments = sum(r["segments"] for r in records)
    seconds = sum(r["seconds"] for r in records)
    index_extra = dict(
        extra,
        job=job,
        clips=clips,
        clips_ok=clips_ok,
        clips_failed=len(errors),
        failed_by_reason=by_reason,
        errors_file=ERRORS_NAME,
    )
    write_index(out_dir, shards, kind=kind, fingerprints=fingerprints, extra=index_extra, streams=streams)
    summary = {
        "job": job,
        "out_dir": out_dir,
        "clips": clips,
        "clips_ok": clips_ok,
        "clips_failed": len(errors),
        "failed_by_reason": by_reason,
        "segments": segments,
        "shards": len(shards),
        "audio_hours": round(seconds / 3600.0, 6),
        "groups": len(groups),
        "groups_this_run": progress.done_groups if progress else 0,
        "workers": workers,
        "ray": ray_info["mode"],
        "total_s": round(time.time() - t_start, 3),
    }
    if progress is not None and progress.done_groups:
        summary.update(progress.rates(workers))
        summary["audio_seconds_this_run"] = round(progress.seconds, 3)
    else:
        summary["audio_seconds_per_s"] = 0.0
    if errors:
        log.warning(
            f"[{job}] {len(errors)} clip(s) failed ({', '.join(f'{k}: {v}' for k, v in sorted(by_reason.items()))}); "
            f"see {storage.join(out_dir, ERRORS_NAME)}"
        )
    return summary


def print_summary(summary: dict) -> None:
    """The last line a job prints: its summary as one JSON object."""
    print(json.dumps(summary, sort_keys=True), flush=True)


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


def write_errors(url: str, errors: list[dict]) -> None:
    errors = sorted(errors, key=lambda e: (str(e.get("clip_id")), str(e.get("reason"))))
    storage.write_text_atomic(url, "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors))


def errors_url(out: str) -> str:
    """``<out>.errors.jsonl`` beside a fitting job's output (``.safetensors`` file or directory)."""
    base = out[: -len(".safetensors")] if out.endswith(".safetensors") else out.rstrip("/")
    return base + ".errors.jsonl"


def save_file_output(out: str, save: Callable[[str], None]) -> None:
    """Save one file through ``save(local_path)``; a remote ``out`` is written locally, then uploaded."""
    if not storage.is_remote(out):
        save(out)
        return
    with storage.atomic_path(out) as local:
        save(local)


def save_dir_output(out: str, save: Callable[[str], None]) -> None:
    """``save(local_dir)``; a remote ``out`` is written to a temp dir, then every file uploaded."""
    if not storage.is_remote(out):
        save(out)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        for root, _, files in os.walk(tmp):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), tmp)
                storage.put_file(os.path.join(root, f), storage.join(out, *rel.split(os.sep)))


def fit_summary(
    job: str, out: str, records: list[dict], errors: list[dict], progress, wp: dict, ray_info: dict, t_start: float
) -> dict:
    """Summary of a fitting job (clips, failures by reason, audio hours, rates)."""
    by_reason: dict[str, int] = {}
    for e in errors:
        by_reason[e["reason"]] = by_reason.get(e["reason"], 0) + 1
    summary = {
        "job": job,
        "out": out,
        "clips": sum(len(r["clips"]) for r in records),
        "clips_ok": sum(len(r["clips_ok"]) for r in records),
        "clips_failed": len(errors),
        "failed_by_reason": by_reason,
        "segments": sum(r["segments"] for r in records),
        "audio_hours": round(sum(r["seconds"] for r in records) / 3600, 6),
        "workers": wp["workers"],
        "ray": ray_info["mode"],
        "total_s": round(time.time() - t_start, 3),
    }
    summary.update(progress.rates(wp["workers"]))
    if errors:
        log.warning(
            f"[{job}] {len(errors)} clip(s) failed ({', '.join(f'{k}: {v}' for k, v in sorted(by_reason.items()))})"
        )
    return summary
