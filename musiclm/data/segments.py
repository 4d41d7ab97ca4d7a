"""Clip -> segments and clip groups -> shards: the plain (Ray-free) rules the Ray jobs follow.

* A segment is `segment_seconds` long (the longest stage window: 30 s paper, 10 s demo); the last
  segment of a clip may be shorter. Every segment boundary lies on the time grid common to all
  token streams (a multiple of each stream's frame period), so streams stay aligned.
* Segment keys are `<clip-id>__<seg:04d>` (no dots: WebDataset splits keys at dots).
* Work is planned as deterministic groups: per split, clips sorted by id, cut into runs of
  `clips_per_group`; group i of split s becomes shard `<s>-%06d.tar` (i). A group is processed and
  written as a unit, which gives exactly-once on resume: a group whose record exists is done.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable, Sequence

import numpy as np

KEY_SEPARATOR = "__"
_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-]")

# Error reasons written to errors.jsonl (one per failed clip).
REASONS = ("missing", "unreadable", "corrupt", "empty", "silent", "too_short", "duplicate",
           "tokenize_failed", "encode_failed")


def safe_clip_key(clip_id: str) -> str:
    """Clip id as used in sample keys: anything but [A-Za-z0-9_-] becomes '-' (no dots)."""
    key = _BAD_KEY_CHARS.sub("-", str(clip_id))
    if not key:
        raise ValueError(f"empty clip id {clip_id!r}")
    return key


def segment_key(clip_id: str, index: int) -> str:
    return f"{safe_clip_key(clip_id)}{KEY_SEPARATOR}{index:04d}"


def parse_segment_key(key: str) -> tuple[str, int]:
    clip, _, seg = key.rpartition(KEY_SEPARATOR)
    return clip, int(seg)


def time_grid(frame_rates: Iterable[float]) -> float:
    """Smallest time step (s) that is a whole number of frames of every stream.

    75 Hz and 25 Hz -> 0.04 s; 75 Hz and 50 Hz -> 0.04 s; 50 Hz alone -> 0.02 s."""
    rates = [Fraction(r).limit_denominator(1000) for r in frame_rates if r]
    if not rates:
        return 0.0
    # t * r integer for all r  <=>  t multiple of 1/r for all r  ->  t = lcm(1/r) = 1 / gcd(r)
    num = 0
    den = 1
    for r in rates:
        den = den * r.denominator // math.gcd(den, r.denominator)
    ints = [int(r * den) for r in rates]
    for v in ints:
        num = math.gcd(num, v)
    return float(Fraction(den, num))


def segment_bounds(num_samples: int, sample_rate: int, segment_seconds: float, *,
                   grid_seconds: float = 0.0, min_seconds: float = 1.0) -> list[tuple[int, int]]:
    """[(start, end)) sample ranges of the segments of a clip of `num_samples` samples.

    Full segments are exactly `segment_seconds` long; the last one is the remainder floored to
    the grid, kept if it is at least `min_seconds` long. A clip shorter than `min_seconds` has
    no segment."""
    if segment_seconds <= 0:
        raise ValueError("segment_seconds must be > 0")
    if grid_seconds and not _is_multiple(segment_seconds, grid_seconds):
        raise ValueError(f"segment_seconds={segment_seconds} is not a multiple of the common "
                         f"frame grid {grid_seconds} s")
    seg = int(round(segment_seconds * sample_rate))
    grid = max(1, int(round(grid_seconds * sample_rate))) if grid_seconds else 1
    min_len = max(1, int(math.ceil(min_seconds * sample_rate)))
    bounds = []
    start = 0
    while start < num_samples:
        length = min(seg, num_samples - start)
        if length < seg:
            length = (length // grid) * grid
        if length <= 0 or length < min_len:
            break
        bounds.append((start, start + length))
        start += length
    return bounds


def _is_multiple(value: float, step: float) -> bool:
    q = value / step
    return abs(q - round(q)) < 1e-6


def audio_problem(wav: np.ndarray, *, silence_db: float = -60.0) -> str | None:
    """Why a decoded clip cannot be used ("empty", "corrupt" for NaN/inf, "silent"), or None."""
    wav = np.asarray(wav)
    if wav.size == 0:
        return "empty"
    if not np.all(np.isfinite(wav)):
        return "corrupt"
    peak = float(np.max(np.abs(wav)))
    if peak <= 10 ** (silence_db / 20.0):
        return "silent"
    return None


def to_int16(wav: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] -> int16 PCM (for moving audio between Ray tasks at half size)."""
    return (np.clip(np.asarray(wav, dtype=np.float32), -1.0, 1.0) * 32767.0).round().astype(np.int16)


def from_int16(pcm: np.ndarray) -> np.ndarray:
    return np.asarray(pcm, dtype=np.float32) / 32767.0


# ----------------------------------------------------------------------------- planning
def clip_record(clip: Any) -> dict:
    """Manifest Clip (dataclass or mapping) -> plain JSON-able dict."""
    if dataclasses.is_dataclass(clip):
        rec = dataclasses.asdict(clip)
    elif isinstance(clip, dict):
        rec = dict(clip)
    else:
        rec = {k: getattr(clip, k) for k in ("id", "audio", "caption", "start", "end", "split", "extra")
               if hasattr(clip, k)}
    rec["id"] = str(rec["id"])
    rec["audio"] = str(rec.get("audio"))
    return json.loads(json.dumps(rec, default=str))


@dataclass
class Group:
    split: str
    index: int
    clips: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}"

    def to_json(self) -> str:
        return json.dumps({"split": self.split, "index": self.index, "clips": self.clips}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Group":
        d = json.loads(text)
        return cls(split=d["split"], index=int(d["index"]), clips=list(d["clips"]))


def plan_groups(clips: Sequence[dict], clips_per_group: int, split_of=None) -> tuple[list[Group], list[dict]]:
    """Deterministic groups: per split, clips sorted by id, `clips_per_group` each.

    Returns (groups, errors): a clip id seen twice is kept once (first in manifest order) and
    the repeats are returned as "duplicate" errors. Clips whose keys collide after
    `safe_clip_key` are duplicates too (their sample keys would clash)."""
    if clips_per_group < 1:
        raise ValueError("clips_per_group must be >= 1")
    seen: dict[str, str] = {}
    errors = []
    by_split: dict[str, list[dict]] = {}
    for rec in clips:
        key = safe_clip_key(rec["id"])
        if key in seen:
            errors.append(error_record(rec, "duplicate", f"clip id {rec['id']!r} already used by "
                                       f"{seen[key]!r}", stage="plan"))
            continue
        seen[key] = rec["id"]
        split = rec.get("split") or (split_of(rec["id"]) if split_of else "train")
        rec = dict(rec, split=split)
        by_split.setdefault(split, []).append(rec)
    groups = []
    for split in sorted(by_split):
        items = sorted(by_split[split], key=lambda r: r["id"])
        for i in range(0, len(items), clips_per_group):
            groups.append(Group(split=split, index=i // clips_per_group, clips=items[i:i + clips_per_group]))
    return groups, errors


def error_record(clip: dict, reason: str, detail: str = "", *, stage: str = "decode") -> dict:
    return {"clip_id": clip.get("id"), "audio": clip.get("audio"), "split": clip.get("split"),
            "stage": stage, "reason": reason, "detail": str(detail)[:500]}


def sample_clips(clips: Sequence[dict], max_clips: int | None, seed: int = 0) -> list[dict]:
    """A deterministic sample (by hash of id and seed) of at most `max_clips` clips."""
    if not max_clips or len(clips) <= max_clips:
        return list(clips)
    ranked = sorted(clips, key=lambda r: hashlib.sha256(f"{seed}:{r['id']}".encode()).hexdigest())
    return sorted(ranked[:max_clips], key=lambda r: r["id"])
