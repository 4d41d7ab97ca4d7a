"""Shard schema: names, entries and dtypes, folder layout, and the errors that name a breach."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from musiclm.data import storage
from musiclm.fingerprint import canonical_hash

KEY_RE = re.compile(r"^(?!__)[A-Za-z0-9_-]+$")
SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9][A-Za-z0-9_-]*)-(?P<num>\d{6})\.tar$")
PARTIAL_SUFFIX = ".partial"
INDEX_NAME = "index.json"
MAX_TAR_NAME = 100  # ustar name field: "<key>.<entry>" must fit

# entry -> (dtype, ndim)
TOKEN_ARRAYS: dict[str, tuple[np.dtype, int]] = {
    "acoustic.npy": (np.dtype(np.int16), 2),
    "semantic.npy": (np.dtype(np.int16), 1),
    "mulan.npy": (np.dtype(np.float16), 1),
    "cond.npy": (np.dtype(np.int16), 2),
}
REQUIRED = {
    "tokens": ("acoustic.npy", "semantic.npy", "mulan.npy", "cond.npy", "json"),
    "audio": ("flac", "json"),
}
EXTRA_EXTENSIONS = ("npy", "json", "txt")

# The token streams a token shard may carry: stream -> (its entry, the tokenizers it is made by).
# A folder carries all four (the default) or a subset (``ray_jobs/tokenize.py --streams``), named in
# index.json's "streams"; every sample of the folder has exactly those entries plus ``json``.
STREAMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "acoustic": ("acoustic.npy", ("acoustic",)),  # codec codes
    "semantic": ("semantic.npy", ("semantic",)),  # k-means ids of the semantic features
    "mulan": ("mulan.npy", ("mulan",)),  # the MuLaN audio embedding
    "cond": ("cond.npy", ("mulan", "quantizer")),  # conditioning tokens: the embedding, quantized
}
ALL_STREAMS = tuple(STREAMS)


class ShardError(ValueError):
    """A shard (or index) breaks the contract; names the shard and, when known, the key."""

    def __init__(self, shard: str, key: str | None, reason: str):
        self.shard, self.key, self.reason = shard, key, reason
        where = f"{shard}" + (f", key {key!r}" if key is not None else "")
        super().__init__(f"{where}: {reason}")


class FingerprintMismatch(ValueError):
    """Shards were made by tokenizers other than the ones a config expects."""

    def __init__(self, tokenizer: str, field: str | None, expected: Any, found: Any, where: str = "index.json"):
        self.tokenizer, self.field, self.expected, self.found = tokenizer, field, expected, found
        if field is None:
            msg = f"{where}: no fingerprint for the {tokenizer} tokenizer (expected {expected!r})"
        else:
            msg = (
                f"{where}: {tokenizer} tokenizer fingerprint field '{field}' is {found!r}, "
                f"expected {expected!r}: these shards were made with a different {tokenizer} tokenizer; "
                f"re-tokenize or point the config at matching shards"
            )
        super().__init__(msg)


def json_default(o: Any):
    """``json.dumps(default=...)`` for the numpy values and sets samples and indexes may hold."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def parse_streams(streams: str | list | tuple | None) -> tuple[str, ...]:
    """Stream names (``"semantic,cond"`` or a list; None: all) -> a tuple in canonical order
    (acoustic, semantic, mulan, cond). Unknown or no names raise ValueError."""
    if streams is None:
        return ALL_STREAMS
    names = [n.strip() for n in streams.split(",")] if isinstance(streams, str) else [str(n).strip() for n in streams]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in STREAMS]
    if unknown:
        raise ValueError(f"unknown token stream(s) {unknown}: choose from {', '.join(ALL_STREAMS)}")
    if not names:
        raise ValueError(f"no token stream named: choose from {', '.join(ALL_STREAMS)}")
    return tuple(n for n in ALL_STREAMS if n in names)


def stream_entries(streams) -> tuple[str, ...]:
    """Shard entries of these streams (``("semantic.npy", "cond.npy")``)."""
    return tuple(STREAMS[n][0] for n in parse_streams(streams))


def stream_tokenizers(streams) -> tuple[str, ...]:
    """Tokenizers whose fingerprints these streams depend on (``cond`` -> mulan + quantizer)."""
    out: list[str] = []
    for n in parse_streams(streams):
        out += [t for t in STREAMS[n][1] if t not in out]
    return tuple(out)


def index_streams(index: dict) -> tuple[str, ...]:
    """The streams a token-shard index says its samples carry (indexes written before subsets
    existed have no "streams": they carry all four)."""
    return parse_streams(index.get("streams"))


def fingerprint_hash(fingerprints: dict, streams=None) -> str:
    """10 hex characters: sha256 of the canonical JSON (sorted keys, no spaces) of all fingerprints
    (:func:`musiclm.fingerprint.canonical_hash`). A subset of the streams hashes the fingerprints
    together with the stream list, so e.g. semantic + cond and acoustic + semantic + cond shards made
    by the same four tokenizers land in different folders; all four streams hash the fingerprints
    alone (the folder names of full shards are unchanged)."""
    streams = parse_streams(streams)
    if streams == ALL_STREAMS:
        return canonical_hash(fingerprints, n=10)
    return canonical_hash({"fingerprints": fingerprints, "streams": list(streams)}, n=10)


def token_shard_dir(root: str, dataset: str, fingerprints: dict, streams=None) -> str:
    return storage.join(root, dataset, f"tokens-{fingerprint_hash(fingerprints, streams)}")


def audio_shard_dir(root: str, dataset: str) -> str:
    return storage.join(root, dataset, "audio")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(clip_id: str, segment: int) -> str:
    return f"{clip_id}__{segment:04d}"


