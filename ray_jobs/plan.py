"""The work plan and its resume state.

A manifest becomes deterministic groups of clips (``musiclm.data.segments``), one shard per group.
Each group is decoded, segmented, processed and written as one unit by Ray Data stages; its record
(``_groups/<split>-%06d.json``: clip ids, shard written, errors, timings) is written after its
shard, so a rerun skips exactly the groups that finished: every clip ends up exactly once, in a
shard or in ``errors.jsonl``."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from musiclm.data import segments as S
from musiclm.data import storage

GROUPS_DIR = "_groups"
PLAN_NAME = "plan.json"
ERRORS_NAME = "errors.jsonl"


def write_json(url: str, obj: Any) -> None:
    storage.write_text_atomic(url, json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")


def read_json(url: str) -> Any:
    return json.loads(storage.read_bytes(url))


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
    from musiclm.fingerprint import canonical_hash

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


def pending_groups(groups: list[S.Group], state: WorkState, retry_failed: bool = False) -> list[S.Group]:
    """Groups without a record (and, with `retry_failed`, finished groups that have failed clips)."""
    done = state.done()
    pending = [g for g in groups if g.name not in done]
    if retry_failed:
        finished = [g for g in groups if g.name in done]
        pending += [g for g, r in zip(finished, state.records(g.name for g in finished)) if r["clips_failed"]]
        pending.sort(key=lambda g: (g.split, g.index))
    return pending
