"""``index.json`` beside the shards: writing, reading, listing, and fingerprint checks."""

from __future__ import annotations

import json
import math
import time
from typing import Any, Iterable

from musiclm.data import storage
from musiclm.fingerprint import canonical_json

from .schema import (INDEX_NAME, REQUIRED, SHARD_RE, FingerprintMismatch, ShardError, fingerprint_hash, json_default,
                     parse_streams)


def _sum_tokens(records: Iterable[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        for k, v in (r.get("tokens") or {}).items():
            out[k] = out.get(k, 0) + int(v)
    return out


def write_index(
    directory: str,
    shards: list[dict],
    *,
    kind: str,
    fingerprints: dict,
    extra: dict | None = None,
    streams=None,
) -> dict:
    """Write ``<directory>/index.json`` atomically from writer records; returns the index.

    ``{"format": "musiclm-shards", "version": 1, "kind", "created", "fingerprints",
    "fingerprint_hash", "shards": [records sorted by name], "splits": {split: {"shards",
    "samples", "hours", "bytes", "tokens"}}, "samples", "hours", "bytes", "tokens", **extra}``;
    token indexes also ``"streams"`` (default all four), which ``fingerprint_hash`` covers."""
    if kind not in REQUIRED:
        raise ValueError(f"kind must be 'tokens' or 'audio', got {kind!r}")
    by_name: dict[str, dict] = {}
    for r in shards:
        if not SHARD_RE.match(r.get("name", "")):
            raise ValueError(f"shard record with a bad name: {r!r}")
        if r["name"] in by_name and by_name[r["name"]] != r:
            raise ValueError(f"two different records for shard {r['name']}")
        by_name[r["name"]] = dict(r)
    records = [by_name[n] for n in sorted(by_name)]
    splits: dict[str, dict] = {}
    for r in records:
        s = splits.setdefault(r["split"], {"shards": 0, "samples": 0, "seconds": 0.0, "bytes": 0, "records": []})
        s["shards"] += 1
        s["samples"] += int(r["samples"])
        s["seconds"] += float(r.get("seconds", 0.0))
        s["bytes"] += int(r.get("bytes", 0))
        s["records"].append(r)
    split_summary = {
        name: {
            "shards": s["shards"],
            "samples": s["samples"],
            "hours": round(s["seconds"] / 3600.0, 6),
            "bytes": s["bytes"],
            "tokens": _sum_tokens(s["records"]),
        }
        for name, s in sorted(splits.items())
    }
    fingerprints = json.loads(canonical_json(fingerprints or {}))
    stream_list = parse_streams(streams) if kind == "tokens" else None
    index: dict[str, Any] = {
        "format": "musiclm-shards",
        "version": 1,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprints": fingerprints,
        "fingerprint_hash": fingerprint_hash(fingerprints, stream_list),
        "shards": records,
        "splits": split_summary,
        "samples": sum(s["samples"] for s in split_summary.values()),
        "hours": round(sum(float(r.get("seconds", 0.0)) for r in records) / 3600.0, 6),
        "bytes": sum(s["bytes"] for s in split_summary.values()),
        "tokens": _sum_tokens(records),
    }
    if stream_list is not None:
        index["streams"] = list(stream_list)
    for k, v in (extra or {}).items():
        if k in index:
            raise ValueError(f"extra index field {k!r} would replace a standard field")
        index[k] = v
    data = json.dumps(index, indent=1, default=json_default).encode("utf-8")
    storage.makedirs(directory)
    storage.write_bytes_atomic(storage.join(directory, INDEX_NAME), data)
    return index


def read_index(directory: str) -> dict:
    url = storage.join(directory, INDEX_NAME)
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError:
        raise ShardError(url, None, "no index.json (the writing job has not finished, or this is not a shard folder)") from None
    try:
        index = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ShardError(url, None, f"invalid JSON: {e}") from None
    if not isinstance(index, dict) or "shards" not in index or "kind" not in index:
        raise ShardError(url, None, "not a musiclm shard index (needs 'kind' and 'shards')")
    return index


def list_shards(directory: str, split: str | None = None) -> list[str]:
    """URLs of the complete shards in ``directory`` (of one split, or all), sorted by name."""
    out = []
    for name in storage.listdir(directory):
        m = SHARD_RE.match(name)
        if m and (split is None or m.group("split") == split):
            out.append(storage.join(directory, name))
    return out


def _compare(expected: Any, found: Any, path: str, tokenizer: str, where: str) -> None:
    if isinstance(expected, dict):
        if not isinstance(found, dict):
            raise FingerprintMismatch(tokenizer, path or None, expected, found, where)
        for k, v in expected.items():
            sub = f"{path}.{k}" if path else k
            if k not in found:
                raise FingerprintMismatch(tokenizer, sub, v, None, where)
            _compare(v, found[k], sub, tokenizer, where)
        return
    if isinstance(expected, float) or isinstance(found, float):
        if isinstance(expected, (int, float)) and isinstance(found, (int, float)) and math.isclose(expected, found, rel_tol=1e-9):
            return
    if expected != found:
        raise FingerprintMismatch(tokenizer, path or None, expected, found, where)


def check_fingerprints(directory_or_index: str | dict, expected: dict, where: str | None = None) -> None:
    """Raise :class:`FingerprintMismatch` unless every field in ``expected`` (a full fingerprint
    dict or a subset, e.g. ``{"acoustic": {"levels": 8}}``) equals the index's value. ``where``
    names an index passed as a dict in the message (default "index.json")."""
    if isinstance(directory_or_index, dict):
        index, where = directory_or_index, where or "index.json"
    else:
        index, where = read_index(directory_or_index), storage.join(directory_or_index, INDEX_NAME)
    found = index.get("fingerprints") or {}
    expected = json.loads(canonical_json(expected))
    for tokenizer, fields in expected.items():
        if tokenizer not in found:
            raise FingerprintMismatch(tokenizer, None, fields, None, where)
        _compare(fields, found[tokenizer], "", tokenizer, where)


