"""The work plan and its resume state.

A manifest becomes deterministic groups of clips (``musiclm.data.segments``), one shard per group.
Each group is decoded, segmented, processed and written as one unit by Ray Data stages; its record
(``_groups/<split>-%06d.json``: clip ids, shard written, errors, timings) is written after its
shard, so a rerun skips exactly the groups that finished: every clip ends up exactly once, in a
shard or in ``errors.jsonl``."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from musiclm.data import segments as S
from musiclm.data import storage

GROUPS_DIR = "_groups"
PLAN_NAME = "plan.json"
ERRORS_NAME = "errors.jsonl"


def write_json(url: str, obj: Any) -> None:
    storage.write_text_atomic(url, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def read_json(url: str) -> Any:
    return json.loads(storage.read_bytes(url))


LOCK_NAME = "job.lock"
# A lock on object storage (no flock there) counts as held while its heartbeat is younger than this.
REMOTE_LOCK_STALE_S = 120.0


class JobLock:
    """One job at a time per output folder: ``<out_dir>/_groups/job.lock``.

    Two jobs with the same plan into one ``--out`` would both redo every group (each sees the other's
    groups as pending) and race on ``plan.json``. Locally the lock is an ``flock`` held by the job's
    process for its lifetime (released by the kernel however the job ends, SIGKILL included); on
    object storage, where there is no flock, it is an object with the owner and a heartbeat rewritten
    every 30 s, and one whose heartbeat is older than ``REMOTE_LOCK_STALE_S`` counts as abandoned.
    A second job refuses at once, naming the owner."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.url = storage.join(out_dir, GROUPS_DIR, LOCK_NAME)
        self._fd = None
        self._stop = None

    def _owner(self) -> dict:
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "heartbeat": time.time()}

    def _refuse(self, owner: dict | None) -> None:
        who = (
            (
                f"pid {owner.get('pid')} on {owner.get('host')}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(owner.get('started', 0)))}"
            )
            if owner
            else "another job"
        )
        raise SystemExit(
            f"{self.out_dir} is being written by another job ({who}); wait for it to finish "
            f"(rerunning afterwards resumes), or write to another --out/--dataset"
        )

    def acquire(self) -> JobLock:
        storage.makedirs(storage.join(self.out_dir, GROUPS_DIR))
        if not storage.is_remote(self.url):
            import fcntl

            fd = os.open(self.url, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    owner = json.loads(os.pread(fd, 4096, 0) or b"null")
                except ValueError:
                    owner = None
                os.close(fd)
                self._refuse(owner)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(self._owner()).encode(), 0)
            self._fd = fd
            return self
        try:
            owner = read_json(self.url)
        except (FileNotFoundError, ValueError):
            owner = None
        if owner and time.time() - float(owner.get("heartbeat", 0)) < REMOTE_LOCK_STALE_S:
            self._refuse(owner)
        me = self._owner()
        write_json(self.url, me)
        self._stop = threading.Event()

        def beat():
            while not self._stop.wait(30.0):
                me["heartbeat"] = time.time()
                try:
                    write_json(self.url, me)
                except Exception:  # a missed heartbeat only shortens how long others wait
                    pass

        threading.Thread(target=beat, daemon=True, name="job-lock-heartbeat").start()
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the flock goes with it; the file stays (harmless, reused)
            self._fd = None
        if self._stop is not None:
            self._stop.set()
            self._stop = None
            storage.remove(self.url)


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
                    f"Use a new --out/--dataset, or --overwrite to start this folder over."
                )
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
            if name != LOCK_NAME:  # held by this job
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
    from musiclm.fingerprint import canonical_hash

    clips = [S.clip_record(c) for c in read_manifest(args.manifest)]
    if args.max_clips:
        clips = S.sample_clips(clips, args.max_clips, seed=args.seed)
    groups, errors = S.plan_groups(clips, clips_per_group, split_of=split_for)
    body = {
        "job": job,
        "params": params,
        "clips_per_group": clips_per_group,
        "groups": [[g.name, [c["id"] for c in g.clips]] for g in groups],
        "clips": canonical_hash(
            [
                [c["id"], c["audio"], c.get("start"), c.get("end"), c.get("caption"), c.get("split")]
                for g in groups
                for c in g.clips
            ]
        ),
    }
    plan = {
        "job": job,
        "manifest": args.manifest,
        "plan_hash": canonical_hash(body),
        "params": params,
        "clips_per_group": clips_per_group,
        "groups": len(groups),
        "clips": sum(len(g.clips) for g in groups),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return groups, errors, plan


def pending_groups(groups: list[S.Group], state: WorkState, retry_failed: bool = False) -> list[S.Group]:
    """Groups without a record (and, with `retry_failed`, finished groups that have failed clips)."""
    done = state.done()
    pending = [g for g in groups if g.name not in done]
    if retry_failed:
        finished = [g for g in groups if g.name in done]
        pending += [g for g, r in zip(finished, state.records(g.name for g in finished)) if r["clips_failed"]]
        pending.sort(key=lambda g: (g.split, g.index))
    return pending
