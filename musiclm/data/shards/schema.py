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


def fingerprint_hash(fingerprints: dict) -> str:
    """10 hex characters: sha256 of the canonical JSON (sorted keys, no spaces) of all fingerprints
    (:func:`musiclm.fingerprint.canonical_hash`)."""
    return canonical_hash(fingerprints, n=10)


def token_shard_dir(root: str, dataset: str, fingerprints: dict) -> str:
    return storage.join(root, dataset, f"tokens-{fingerprint_hash(fingerprints)}")


def audio_shard_dir(root: str, dataset: str) -> str:
    return storage.join(root, dataset, "audio")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(clip_id: str, segment: int) -> str:
    return f"{clip_id}__{segment:04d}"


