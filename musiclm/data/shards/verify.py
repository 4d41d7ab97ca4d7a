"""``musiclm shards inspect|verify``: a summary from the index, and a full read checked against the
contract and ``index.json`` (names the shard and key at the first problem)."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from typing import Iterator

import numpy as np

from musiclm.data import storage

from .encoding import required_entries, sample_seconds
from .index import list_shards, read_index
from .schema import (EXTRA_EXTENSIONS, INDEX_NAME, KEY_RE, PARTIAL_SUFFIX, REQUIRED, SHARD_RE, TOKEN_ARRAYS,
                     ShardError, fingerprint_hash, index_streams)


def inspect(directory: str) -> dict:
    """Summary from index.json and the folder listing (reads no shard)."""
    directory = os.fspath(directory)
    names = storage.listdir(directory)
    on_disk = sorted(n for n in names if SHARD_RE.match(n))
    partials = sum(1 for n in names if n.endswith(PARTIAL_SUFFIX))
    try:
        index = read_index(directory)
    except ShardError as e:
        return {"directory": directory, "index": None, "error": e.reason, "shards_on_disk": len(on_disk), "partial_files": partials}
    indexed = [r["name"] for r in index["shards"]]
    fps = index.get("fingerprints") or {}
    return {
        "directory": directory,
        "index": storage.join(directory, INDEX_NAME),
        "kind": index.get("kind"),
        "created": index.get("created"),
        "shards": len(indexed),
        "samples": index.get("samples", sum(int(r["samples"]) for r in index["shards"])),
        "hours": index.get("hours"),
        "bytes": index.get("bytes"),
        "tokens": index.get("tokens", {}),
        "splits": index.get("splits", {}),
        "fingerprint_hash": index.get("fingerprint_hash"),
        "streams": list(index_streams(index)) if index.get("kind") == "tokens" else None,
        "fingerprints": {
            k: {f: v.get(f) for f in ("name", "kind", "frame_rate", "levels", "codebook_size", "vocab_size", "dim", "namespaces", "weights_sha256") if f in v}
            for k, v in fps.items()
            if isinstance(v, dict)
        },
        "missing_shards": sorted(set(indexed) - set(on_disk)),
        "unindexed_shards": sorted(set(on_disk) - set(indexed)),
        "partial_files": partials,
    }


class _Expect:
    """Shapes and ranges that the index's fingerprints imply for every token sample."""

    def __init__(self, fps: dict):
        a, s, m, q = (fps.get(k) or {} for k in ("acoustic", "semantic", "mulan", "quantizer"))
        self.levels = a.get("levels")
        self.acoustic_codebook = a.get("codebook_size")
        self.acoustic_rate = a.get("frame_rate")
        self.semantic_vocab = s.get("vocab_size")
        self.semantic_rate = s.get("frame_rate")
        self.mulan_dim = m.get("dim")
        ns = q.get("namespaces")
        self.cond_shape = (len(ns), q.get("levels")) if ns is not None and q.get("levels") is not None else None
        self.cond_codebook = q.get("codebook_size")


def _check_range(arr: np.ndarray, hi, name: str, source: str) -> str | None:
    lo_v, hi_v = int(arr.min()), int(arr.max())
    if lo_v < 0:
        return f"{name} has negative codes (min {lo_v})"
    if hi is not None and hi_v >= int(hi):
        return f"{name} has code {hi_v} >= {source} {hi} of the fingerprint in index.json"
    return None


def _check_token_sample(key: str, entries: dict[str, bytes], exp: _Expect) -> tuple[str | None, dict]:
    """(reason or None, decoded arrays) for one token sample (the arrays of its folder's streams;
    the caller has checked that exactly those are present)."""
    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, ndim) in TOKEN_ARRAYS.items():
        if name not in entries:
            continue
        try:
            a = np.load(io.BytesIO(entries[name]), allow_pickle=False)
        except Exception as e:
            return f"{name} is not a readable .npy without pickle ({type(e).__name__}: {e})", {}
        if a.dtype != dtype:
            return f"{name} has dtype {a.dtype}, expected {dtype}", {}
        if a.ndim != ndim:
            return f"{name} has shape {list(a.shape)}, expected {ndim} dims", {}
        if a.size == 0:
            return f"{name} is empty {list(a.shape)}", {}
        arrays[name] = a
    ac, se, mu, co = (arrays.get(n) for n in TOKEN_ARRAYS)
    if ac is not None and exp.levels is not None and ac.shape[0] != exp.levels:
        return f"acoustic.npy has {ac.shape[0]} levels, the acoustic fingerprint in index.json says {exp.levels}", {}
    for arr, hi, name, src in (
        (ac, exp.acoustic_codebook, "acoustic.npy", "acoustic codebook_size"),
        (se, exp.semantic_vocab, "semantic.npy", "semantic vocab_size"),
        (co, exp.cond_codebook, "cond.npy", "quantizer codebook_size"),
    ):
        r = _check_range(arr, hi, name, src) if arr is not None else None
        if r:
            return r, {}
    if mu is not None:
        if exp.mulan_dim is not None and mu.shape[0] != exp.mulan_dim:
            return f"mulan.npy has dim {mu.shape[0]}, the mulan fingerprint in index.json says {exp.mulan_dim}", {}
        if not np.isfinite(mu).all():
            return "mulan.npy has non-finite values", {}
    if co is not None and exp.cond_shape is not None and tuple(co.shape) != exp.cond_shape:
        want = list(exp.cond_shape)
        return f"cond.npy has shape {list(co.shape)}, the quantizer fingerprint in index.json says {want}", {}
    if ac is not None and se is not None and exp.acoustic_rate and exp.semantic_rate:
        ta, ts = ac.shape[1] / exp.acoustic_rate, se.shape[0] / exp.semantic_rate
        tol = max(0.1, 2.0 / min(exp.acoustic_rate, exp.semantic_rate))
        if abs(ta - ts) > tol:
            return (
                f"streams not aligned: acoustic {ac.shape[1]} frames = {ta:.3f} s at {exp.acoustic_rate} Hz, "
                f"semantic {se.shape[0]} frames = {ts:.3f} s at {exp.semantic_rate} Hz"
            ), {}
    return None, arrays


_MEMBER_RE = re.compile(r"^((?:.*/|)[^./][^.]*)[.]([^/]+)$")  # webdataset's key/extension split


def _iter_tar(url: str) -> Iterator[tuple[str, str, bytes]]:
    """(key, entry, data) for every member; raises ShardError on a truncated or corrupt tar."""
    opener = storage.open_file(url, "rb", block_size=storage.READ_BLOCK_SIZE) if storage.is_remote(url) else storage.open_file(url, "rb")
    name = storage.basename(url)
    last_key = None
    with opener as f:
        try:
            tf = tarfile.open(fileobj=f, mode="r|")
            for ti in tf:
                if not ti.isreg():
                    raise ShardError(name, last_key, f"member {ti.name!r} is not a regular file")
                m = _MEMBER_RE.match(ti.name)
                if not m:
                    raise ShardError(name, last_key, f"member {ti.name!r} is not named '<key>.<entry>'")
                key, entry = m.group(1), m.group(2)
                data = tf.extractfile(ti).read()
                if len(data) != ti.size:
                    raise ShardError(name, key, f"truncated entry {entry} ({len(data)} of {ti.size} bytes)")
                last_key = key
                yield key, entry.lower(), data
        except ShardError:
            raise
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ShardError(name, last_key, f"truncated or corrupt tar after this key ({type(e).__name__}: {e})") from None


def _tar_tail_ok(url: str, size: int) -> bool:
    """A tar written to completion ends with (at least) two zero blocks."""
    if size < 1024 or size % 512:
        return False
    with storage.open_file(url, "rb") as f:
        f.seek(size - 1024)
        return f.read(1024) == b"\0" * 1024


def _verify_shard(url: str, kind: str, exp: _Expect, seen_keys: dict[str, str], streams=None) -> dict:
    name = storage.basename(url)
    required = set(required_entries(kind, streams))
    counted = [s for s in ("acoustic", "semantic") if f"{s}.npy" in required]
    stats = {"samples": 0, "seconds": 0.0, "tokens": {s: 0 for s in counted}}

    def finish(key: str, entries: dict[str, bytes]) -> None:
        missing = required - set(entries)
        if missing:
            raise ShardError(name, key, f"missing entr{'y' if len(missing) == 1 else 'ies'} {', '.join(sorted(missing))}")
        for e in entries:
            if e not in required and e in TOKEN_ARRAYS and kind == "tokens":
                listed = ", ".join(streams)
                raise ShardError(name, key, f"entry {e} is not one of the streams index.json names ({listed})")
            if e not in required and e.rsplit(".", 1)[-1] not in EXTRA_EXTENSIONS:
                raise ShardError(name, key, f"unexpected entry {e!r}")
        if not KEY_RE.match(key):
            raise ShardError(name, key, "key is not '<clip-id>__<segment>' of letters, digits, '_' and '-'")
        if key in seen_keys:
            raise ShardError(name, key, f"duplicate key (also in {seen_keys[key]})")
        seen_keys[key] = name
        try:
            js = json.loads(entries["json"])
        except Exception as e:
            raise ShardError(name, key, f"json entry is not valid JSON ({e})") from None
        if not isinstance(js, dict) or not isinstance(js.get("clip_id"), str):
            raise ShardError(name, key, "json entry needs a string 'clip_id'")
        if not key.startswith(js["clip_id"] + "__"):
            raise ShardError(name, key, f"key does not start with clip_id {js['clip_id']!r} + '__'")
        secs = sample_seconds(js)
        if kind == "tokens":
            reason, arrays = _check_token_sample(key, entries, exp)
            if reason:
                raise ShardError(name, key, reason)
            for stream, rate in (("acoustic", exp.acoustic_rate), ("semantic", exp.semantic_rate)):
                if secs is not None and rate and f"{stream}.npy" in arrays:
                    t = arrays[f"{stream}.npy"].shape[-1] / rate
                    if abs(t - secs) > max(0.1, 2.0 / rate):
                        why = f"json says {secs:.3f} s but {stream}.npy holds {t:.3f} s at {rate} Hz"
                        raise ShardError(name, key, why)
            for stream in counted:
                stats["tokens"][stream] += int(arrays[f"{stream}.npy"].size)
        else:
            try:
                import soundfile as sf

                info = sf.info(io.BytesIO(entries["flac"]))
            except Exception as e:
                raise ShardError(name, key, f"flac entry does not decode ({e})") from None
            if info.channels != 1:
                raise ShardError(name, key, f"flac has {info.channels} channels, expected mono")
            if js.get("sample_rate") is not None and int(js["sample_rate"]) != info.samplerate:
                raise ShardError(name, key, f"flac is {info.samplerate} Hz, json says {js['sample_rate']}")
            if secs is None:
                secs = info.frames / float(info.samplerate)
        stats["samples"] += 1
        stats["seconds"] += secs or 0.0

    cur_key, cur = None, {}
    for key, entry, data in _iter_tar(url):
        if key != cur_key:
            if cur_key is not None:
                finish(cur_key, cur)
            cur_key, cur = key, {}
        if entry in cur:
            raise ShardError(name, key, f"duplicate entry {entry}")
        cur[entry] = data
    if cur_key is not None:
        finish(cur_key, cur)
    return stats


def verify(directory: str) -> dict:
    """Read every sample of every shard and check it against the contract and index.json.

    Raises :class:`ShardError` naming the shard and key at the first problem: truncated or
    corrupt tar, missing/unexpected entry, wrong dtype/shape, codes outside the fingerprint's
    codebook/vocab, levels/dims/cond shape different from the fingerprints, misaligned streams,
    duplicate keys, a folder hash different from the index's fingerprints, shards missing from
    the folder or from the index, and sample/token/byte counts different from the index.
    Returns a summary (``ok``, shards, samples, hours, tokens, splits)."""
    directory = os.fspath(directory)
    index = read_index(directory)
    kind = index["kind"]
    if kind not in REQUIRED:
        raise ShardError(INDEX_NAME, None, f"unknown kind {kind!r}")
    fps = index.get("fingerprints") or {}
    try:
        streams = index_streams(index) if kind == "tokens" else None
    except ValueError as e:
        raise ShardError(INDEX_NAME, None, f"streams: {e}") from None
    folder = storage.basename(directory)
    if folder.startswith("tokens-"):
        want = fingerprint_hash(fps, streams)
        if folder[len("tokens-"):] != want:
            raise ShardError(
                INDEX_NAME, None,
                f"fingerprints in index.json hash to {want}, but the folder is {folder}: "
                f"shards and index come from different tokenizers",
            )
        if index.get("fingerprint_hash") not in (None, want):
            raise ShardError(INDEX_NAME, None, f"fingerprint_hash {index['fingerprint_hash']} != hash of fingerprints {want}")
    on_disk = {storage.basename(u): u for u in list_shards(directory)}
    records = {r["name"]: r for r in index["shards"]}
    for n in sorted(records):
        if n not in on_disk:
            raise ShardError(n, None, "listed in index.json but missing from the folder")
    for n in sorted(on_disk):
        if n not in records:
            raise ShardError(n, None, "in the folder but not in index.json")
    exp = _Expect(fps)
    seen: dict[str, str] = {}
    counted = [s for s in ("acoustic", "semantic") if s in (streams or ())]
    totals = {"samples": 0, "seconds": 0.0, "tokens": {s: 0 for s in counted}, "bytes": 0}
    splits: dict[str, int] = {}
    for n in sorted(records):
        rec, url = records[n], on_disk[n]
        nbytes = storage.size(url)
        size_bad = rec.get("bytes") is not None and int(rec["bytes"]) != nbytes
        if size_bad or not _tar_tail_ok(url, nbytes):
            # read it first: a tar cut inside an entry gets the more precise message (shard + key)
            _verify_shard(url, kind, exp, dict(seen), streams)
            if size_bad:
                raise ShardError(n, None, f"{nbytes} bytes, index.json says {rec['bytes']} (truncated or replaced)")
            raise ShardError(n, None, "no end-of-archive marker: the tar is truncated")
        st = _verify_shard(url, kind, exp, seen, streams)
        if int(rec["samples"]) != st["samples"]:
            raise ShardError(n, None, f"{st['samples']} samples, index.json says {rec['samples']}")
        if kind == "tokens" and rec.get("tokens") is not None:
            for stream, count in st["tokens"].items():
                if int(rec["tokens"].get(stream, -1)) != count:
                    raise ShardError(n, None, f"{count} {stream} tokens, index.json says {rec['tokens'].get(stream)}")
        if rec.get("split") is not None and SHARD_RE.match(n).group("split") != rec["split"]:
            raise ShardError(n, None, f"index.json puts it in split {rec['split']!r}")
        totals["samples"] += st["samples"]
        totals["seconds"] += st["seconds"]
        totals["bytes"] += nbytes
        for k, v in st["tokens"].items():
            totals["tokens"][k] = totals["tokens"].get(k, 0) + v
        splits[rec["split"]] = splits.get(rec["split"], 0) + st["samples"]
    return {
        "ok": True,
        "directory": directory,
        "kind": kind,
        "shards": len(records),
        "samples": totals["samples"],
        "hours": round(totals["seconds"] / 3600.0, 6),
        "bytes": totals["bytes"],
        "tokens": totals["tokens"] if kind == "tokens" else {},
        "splits": dict(sorted(splits.items())),
        "fingerprint_hash": index.get("fingerprint_hash"),
        "streams": list(streams) if streams is not None else None,
    }
