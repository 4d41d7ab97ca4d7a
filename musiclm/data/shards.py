"""WebDataset shards: the contract between the Ray jobs that tokenize audio and training.

Layout (see ``shards/README.md`` for the full schema)::

    <root>/<dataset>/tokens-<fingerprint hash>/<split>-000000.tar ... index.json
    <root>/<dataset>/audio/<split>-000000.tar ... index.json

``<root>`` is a local folder or an ``s3://bucket/prefix`` URL. One sample = one segment of one
clip, key ``<clip-id>__<segment:04d>`` (no dots). Token samples hold ``acoustic.npy`` (int16
[Q, T_a]), ``semantic.npy`` (int16 [T_s]), ``mulan.npy`` (float16 [D]), ``cond.npy`` (int16
[namespaces, K]) and ``json``; audio samples hold ``flac`` (mono) and ``json``.

Atomic visibility: a shard is written to a hidden temp file (``.<name>.<random>.partial``, in the
shard folder locally, in the system temp folder for S3) and only then appears under its final
name: ``os.replace`` locally; for S3 the finished file is uploaded with one PUT (a multipart
upload above s3fs's chunk size), and S3 makes an object visible only when its upload completes.
A writer that raises, is garbage-collected unclosed, or is killed leaves no file that
:func:`list_shards` (or a reader) would pick up.

Readers decode only ``.npy`` (``allow_pickle=False``), ``.json`` and ``.txt``; other entries
(``flac``) are returned as raw bytes. Nothing from a shard is ever unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import re
import tarfile
import tempfile
import time
import weakref
from typing import Any, Iterable, Iterator

import numpy as np
import webdataset as wds
from webdataset.filters import _shuffle as _wds_shuffle
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_iterator
from webdataset.utils import pytorch_worker_info

from . import storage

# ------------------------------------------------------------------------------------------
# schema

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


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_json_default)


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


def fingerprint_hash(fingerprints: dict) -> str:
    """10 hex characters: sha256 of the canonical JSON (sorted keys, no spaces) of all fingerprints."""
    return hashlib.sha256(_canonical(fingerprints).encode("utf-8")).hexdigest()[:10]


def token_shard_dir(root: str, dataset: str, fingerprints: dict) -> str:
    return storage.join(root, dataset, f"tokens-{fingerprint_hash(fingerprints)}")


def audio_shard_dir(root: str, dataset: str) -> str:
    return storage.join(root, dataset, "audio")


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


def sample_key(clip_id: str, segment: int) -> str:
    return f"{clip_id}__{segment:04d}"


# ------------------------------------------------------------------------------------------
# validation and encoding


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _sample_seconds(js: dict) -> float | None:
    s, e = js.get("start"), js.get("end")
    if isinstance(s, (int, float)) and isinstance(e, (int, float)) and not isinstance(s, bool):
        return float(e) - float(s)
    return None


def validate_sample(sample: dict, kind: str) -> None:
    """Raise ValueError if a writer input breaks the contract (entries, dtypes, ndim, key)."""
    key = sample.get("__key__")
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(
            f"sample key {key!r}: must be letters, digits, '_' and '-' only, not starting with '__' (no dots: "
            f"webdataset splits entry names at the first dot), e.g. '<clip-id>__0003'"
        )
    for name in REQUIRED[kind]:
        if name not in sample:
            raise ValueError(f"sample {key!r}: missing entry {name!r} (a {kind} sample needs {', '.join(REQUIRED[kind])})")
    longest = max(len(k) for k in sample if k != "__key__")
    if len(key) + 1 + longest > MAX_TAR_NAME:
        raise ValueError(f"sample key {key!r} is too long (entry names must fit {MAX_TAR_NAME} characters)")
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        if kind == "tokens" and name in TOKEN_ARRAYS:
            dtype, ndim = TOKEN_ARRAYS[name]
            if not isinstance(value, np.ndarray):
                raise ValueError(f"sample {key!r}: {name} must be a numpy array, got {type(value).__name__}")
            if value.dtype != dtype or value.ndim != ndim:
                raise ValueError(
                    f"sample {key!r}: {name} must be {dtype} with {ndim} dims, got {value.dtype} {list(value.shape)}"
                )
            if value.size == 0:
                raise ValueError(f"sample {key!r}: {name} is empty {list(value.shape)}")
        elif name == "flac" and kind == "audio":
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"sample {key!r}: flac must be bytes (an encoded FLAC file)")
        elif name == "json":
            if not isinstance(value, dict):
                raise ValueError(f"sample {key!r}: json must be a dict, got {type(value).__name__}")
            if "clip_id" not in value:
                raise ValueError(f"sample {key!r}: json needs 'clip_id'")
        else:
            ext = name.rsplit(".", 1)[-1]
            if "." in name.rstrip(".") and ext in EXTRA_EXTENSIONS:
                ok = {
                    "npy": isinstance(value, np.ndarray) and value.dtype.kind in "biuf",
                    "json": isinstance(value, (dict, list)),
                    "txt": isinstance(value, str),
                }[ext]
                if ok:
                    continue
                raise ValueError(f"sample {key!r}: extra entry {name} has the wrong type {type(value).__name__}")
            raise ValueError(
                f"sample {key!r}: unexpected entry {name!r} (extra entries must end in .npy, .json or .txt)"
            )


def encode_sample(sample: dict) -> dict[str, bytes]:
    """Entry name -> bytes (npy without pickle, json UTF-8, txt UTF-8, bytes as they are)."""
    out: dict[str, bytes] = {}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        if isinstance(value, np.ndarray):
            out[name] = _npy_bytes(value)
        elif isinstance(value, (dict, list)):
            out[name] = json.dumps(value, ensure_ascii=False, default=_json_default).encode("utf-8")
        elif isinstance(value, str):
            out[name] = value.encode("utf-8")
        else:
            out[name] = bytes(value)
    return out


# ------------------------------------------------------------------------------------------
# writer


def _cleanup_tmp(path: str | None, fileobj, tar) -> None:
    try:
        # an unfinished tar must not flush its buffer into a closed file when collected
        tar.closed = True
        tar.fileobj.closed = True
    except Exception:
        pass
    try:
        if fileobj is not None and not fileobj.closed:
            fileobj.close()
    except Exception:
        pass
    if path:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


class _OpenShard:
    def __init__(self, final_url: str, tmp_path: str):
        self.final_url = final_url
        self.tmp_path = tmp_path
        self.file = open(tmp_path, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w|", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self.seconds = 0.0
        self.tokens = {"acoustic": 0, "semantic": 0}
        self.finalizer = weakref.finalize(self, _cleanup_tmp, tmp_path, self.file, self.tar)

    def add(self, key: str, entries: dict[str, bytes]) -> None:
        now = time.time()
        for name in sorted(entries):
            data = entries[name]
            ti = tarfile.TarInfo(f"{key}.{name}")
            ti.size = len(data)
            ti.mtime = now
            ti.mode = 0o444
            ti.uname = ti.gname = "musiclm"
            self.tar.addfile(ti, io.BytesIO(data))

    @property
    def bytes(self) -> int:
        return self.file.tell()


class ShardWriter:
    """Write samples into ``<directory>/<split>-%06d.tar`` shards, each visible only when complete.

    A new shard starts when the current one holds ``max_samples`` samples or ``max_bytes`` bytes.
    ``close()`` finishes the last shard and returns one record per shard written:
    ``{"name", "split", "samples", "seconds", "tokens": {"acoustic", "semantic"}, "bytes"}``
    (acoustic tokens count every code, Q x T_a; seconds sum each sample's json end - start),
    which :func:`write_index` takes. As a context manager, an exception discards the shard in
    progress (completed shards stay, listed in ``.shards``). An existing shard with the same name
    is replaced: give parallel writers disjoint ``start_shard`` ranges.
    """

    def __init__(
        self,
        directory: str,
        split: str,
        *,
        kind: str = "tokens",
        max_samples: int = 256,
        max_bytes: int = 256 * 2**20,
        start_shard: int = 0,
    ):
        if kind not in REQUIRED:
            raise ValueError(f"kind must be 'tokens' or 'audio', got {kind!r}")
        if not SPLIT_RE.match(split):
            raise ValueError(f"split {split!r}: letters, digits, '_' and '-' only")
        if max_samples < 1 or max_bytes < 1:
            raise ValueError("max_samples and max_bytes must be positive")
        self.directory = os.fspath(directory)
        self.split = split
        self.kind = kind
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.next_shard = start_shard
        self.shards: list[dict] = []
        self._cur: _OpenShard | None = None
        self._closed = False
        self._remote = storage.is_remote(self.directory)
        storage.makedirs(self.directory)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self) -> _OpenShard:
        name = shard_name(self.split, self.next_shard)
        self.next_shard += 1
        tmp_dir = None if self._remote else self.directory
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=PARTIAL_SUFFIX, dir=tmp_dir)
        os.fchmod(fd, storage.file_mode())  # mkstemp makes 0600; a published shard follows the umask
        os.close(fd)
        return _OpenShard(storage.join(self.directory, name), tmp)

    def write(self, sample: dict) -> None:
        """Validate and append one sample (see the module docstring for entries and dtypes)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        validate_sample(sample, self.kind)
        entries = encode_sample(sample)
        if self._cur is not None and (self._cur.samples >= self.max_samples or self._cur.bytes >= self.max_bytes):
            self._finish()
        if self._cur is None:
            self._cur = self._open()
        cur = self._cur
        cur.add(sample["__key__"], entries)
        cur.samples += 1
        secs = _sample_seconds(sample["json"])
        if secs is None and self.kind == "audio":
            secs = _flac_seconds(entries["flac"])
        cur.seconds += secs or 0.0
        if self.kind == "tokens":
            cur.tokens["acoustic"] += int(sample["acoustic.npy"].size)
            cur.tokens["semantic"] += int(sample["semantic.npy"].size)

    def _finish(self) -> None:
        cur, self._cur = self._cur, None
        if cur is None:
            return
        try:
            cur.tar.close()  # end-of-archive blocks; does not close the file object
            cur.file.flush()
            os.fsync(cur.file.fileno())
            cur.file.close()
            nbytes = os.path.getsize(cur.tmp_path)
            storage.put_file(cur.tmp_path, cur.final_url)  # local: os.replace; S3: one upload
        except BaseException:
            cur.finalizer()
            raise
        cur.finalizer()  # removes the temp file if it is still there (S3)
        rec = {
            "name": storage.basename(cur.final_url),
            "split": self.split,
            "samples": cur.samples,
            "seconds": round(cur.seconds, 3),
            "bytes": nbytes,
        }
        if self.kind == "tokens":
            rec["tokens"] = dict(cur.tokens)
        self.shards.append(rec)

    def close(self) -> list[dict]:
        """Finish the shard in progress; return the records of all shards this writer wrote."""
        if not self._closed:
            self._closed = True
            if self._cur is not None and self._cur.samples == 0:
                self.abort()
            else:
                self._finish()
        return list(self.shards)

    def abort(self) -> None:
        """Discard the shard in progress (nothing appears under its final name)."""
        self._closed = True
        cur, self._cur = self._cur, None
        if cur is not None:
            cur.finalizer()


def _flac_seconds(data: bytes) -> float | None:
    try:
        import soundfile as sf

        info = sf.info(io.BytesIO(data))
        return info.frames / float(info.samplerate)
    except Exception:
        return None


def remove_partials(directory: str) -> int:
    """Delete temp files left in a local shard folder by killed writers; returns how many."""
    if storage.is_remote(directory):
        return 0
    n = 0
    for name in storage.listdir(directory):
        if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
            storage.remove(storage.join(directory, name))
            n += 1
    return n


# ------------------------------------------------------------------------------------------
# index


def _sum_tokens(records: Iterable[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        for k, v in (r.get("tokens") or {}).items():
            out[k] = out.get(k, 0) + int(v)
    return out


def write_index(directory: str, shards: list[dict], *, kind: str, fingerprints: dict, extra: dict | None = None) -> dict:
    """Write ``<directory>/index.json`` atomically from writer records; returns the index.

    ``{"format": "musiclm-shards", "version": 1, "kind", "created", "fingerprints",
    "fingerprint_hash", "shards": [records sorted by name], "splits": {split: {"shards",
    "samples", "hours", "bytes", "tokens"}}, "samples", "hours", "bytes", "tokens", **extra}``."""
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
    fingerprints = json.loads(_canonical(fingerprints or {}))
    index: dict[str, Any] = {
        "format": "musiclm-shards",
        "version": 1,
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprints": fingerprints,
        "fingerprint_hash": fingerprint_hash(fingerprints),
        "shards": records,
        "splits": split_summary,
        "samples": sum(s["samples"] for s in split_summary.values()),
        "hours": round(sum(float(r.get("seconds", 0.0)) for r in records) / 3600.0, 6),
        "bytes": sum(s["bytes"] for s in split_summary.values()),
        "tokens": _sum_tokens(records),
    }
    for k, v in (extra or {}).items():
        if k in index:
            raise ValueError(f"extra index field {k!r} would replace a standard field")
        index[k] = v
    data = json.dumps(index, indent=1, default=_json_default).encode("utf-8")
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


def check_fingerprints(directory_or_index: str | dict, expected: dict) -> None:
    """Raise :class:`FingerprintMismatch` unless every field in ``expected`` (a full fingerprint
    dict or a subset, e.g. ``{"acoustic": {"levels": 8}}``) equals the index's value."""
    if isinstance(directory_or_index, dict):
        index, where = directory_or_index, "index.json"
    else:
        index, where = read_index(directory_or_index), storage.join(directory_or_index, INDEX_NAME)
    found = index.get("fingerprints") or {}
    expected = json.loads(_canonical(expected))
    for tokenizer, fields in expected.items():
        if tokenizer not in found:
            raise FingerprintMismatch(tokenizer, None, fields, None, where)
        _compare(fields, found[tokenizer], "", tokenizer, where)


# ------------------------------------------------------------------------------------------
# reader


def decode_sample(sample: dict) -> dict:
    """Decode entries by extension: .npy -> ndarray (allow_pickle=False), .json -> dict, .txt -> str;
    anything else (flac, ...) stays bytes. Never unpickles."""
    out = {}
    for k, v in sample.items():
        if k.startswith("__"):
            out[k] = v
            continue
        ext = k.rsplit(".", 1)[-1]
        if ext == "npy":
            out[k] = np.load(io.BytesIO(v), allow_pickle=False)
        elif ext == "json":
            out[k] = json.loads(v)
        elif ext == "txt":
            out[k] = v.decode("utf-8")
        else:
            out[k] = v
    return out


def _worker_info(rank: int | None, world_size: int | None) -> tuple[int, int, int, int]:
    r, w, worker, nworkers = pytorch_worker_info()
    if rank is not None or world_size is not None:
        r = 0 if rank is None else int(rank)
        w = 1 if world_size is None else int(world_size)
    if not 0 <= r < w:
        raise ValueError(f"rank {r} outside world_size {w}")
    return r, w, worker, nworkers


class ShardReader(wds.DataPipeline):
    """Decoded samples from token/audio shards: a webdataset pipeline (torch IterableDataset).

    Per epoch the shard list is shuffled with ``(seed, epoch)`` (the same order on every rank),
    then split: shard ``i`` goes to reader ``i % (world_size * num_workers)`` where reader =
    ``rank * num_workers + worker``. With fewer shards than readers every reader streams all
    shards and keeps every n-th sample instead. Samples are then shuffled in a buffer of
    ``shuffle`` samples seeded by ``(seed, epoch, reader)``: the stream is a function of (seed,
    epoch, rank, world_size, num_workers). ``repeat=True`` streams forever, epoch after epoch;
    ``set_epoch`` changes the epoch of the next iteration (DataLoader workers pick it up when they
    are restarted, i.e. without ``persistent_workers``).
    """

    def __init__(self, urls, *, shuffle=1000, seed=0, epoch=0, rank=None, world_size=None, repeat=False, handler=None):
        super().__init__()
        self.urls = list(urls)
        self.shuffle_buffer = int(shuffle or 0)
        self.seed = seed
        self.epoch = int(epoch)
        self.rank = rank
        self.world_size = world_size
        self.repeat = repeat
        self.handler = handler or reraise_exception
        self.append(self._shard_stream)
        self.append(self._expand)
        self.append(self._split_samples)
        self.append(self._shuffle)
        self.append(self._decode)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _plan(self) -> tuple[int, int, bool]:
        rank, world, worker, nworkers = _worker_info(self.rank, self.world_size)
        readers = world * nworkers
        return rank * nworkers + worker, readers, len(self.urls) >= readers

    def _shard_stream(self):
        if any(storage.is_remote(u) for u in self.urls):
            storage.register_s3_gopen()
        reader, readers, by_shard = self._plan()
        epoch = self.epoch
        while True:
            urls = list(self.urls)
            if self.shuffle_buffer > 0:
                random.Random(f"shards:{self.seed}:{epoch}").shuffle(urls)
            if by_shard:
                urls = urls[reader::readers]
            for u in urls:
                yield u
            if not self.repeat:
                return
            epoch += 1

    def _expand(self, urls):
        for url in urls:
            try:
                with wds.gopen(url, "rb") as stream:
                    files = tar_file_iterator(stream, handler=self.handler)
                    yield from group_by_keys(_with_url(files, url), handler=self.handler)
            except Exception as exn:
                exn.args = tuple(exn.args) + (f"shard {url}",)
                if self.handler(exn):
                    continue
                raise

    def _split_samples(self, src):
        reader, readers, by_shard = self._plan()
        if by_shard or readers == 1:
            yield from src
            return
        for i, sample in enumerate(src):
            if i % readers == reader:
                yield sample

    def _shuffle(self, src):
        if self.shuffle_buffer <= 1:
            yield from src
            return
        reader, readers, _ = self._plan()
        rng = random.Random(f"samples:{self.seed}:{self.epoch}:{reader}/{readers}")
        yield from _wds_shuffle(src, self.shuffle_buffer, min(self.shuffle_buffer, 100), rng)

    def _decode(self, src):
        for sample in src:
            yield decode_sample(sample)


def _with_url(files, url):
    for f in files:
        f["__url__"] = url
        yield f


def shard_reader(
    source: str | list[str],
    split: str = "train",
    *,
    shuffle: int = 1000,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    repeat: bool = False,
    handler=None,
):
    """A webdataset pipeline of decoded samples from a shard folder (its complete ``split``
    shards), one ``.tar`` URL, or a list of shard URLs; local or ``s3://``.

    ``rank``/``world_size`` default to torch.distributed (or RANK/WORLD_SIZE); DataLoader workers
    are detected inside each worker. ``shuffle`` is the sample buffer size (0: no shuffling of
    shards or samples). Errors are raised (``handler`` may be a webdataset handler such as
    ``webdataset.warn_and_continue`` to skip bad shards). Samples: ``{"__key__", "__url__",
    "acoustic.npy", ..., "json"}`` with arrays and dicts decoded."""
    if isinstance(source, (list, tuple)):
        urls = [os.fspath(u) for u in source]
    else:
        source = os.fspath(source)
        if source.endswith(".tar"):
            urls = [source]
        else:
            urls = list_shards(source, split)
            if not urls:
                raise ShardError(source, None, f"no complete '{split}' shards")
    if not urls:
        raise ValueError("shard_reader: empty shard list")
    return ShardReader(
        urls, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size, repeat=repeat, handler=handler
    )


# ------------------------------------------------------------------------------------------
# inspect / verify


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
    """(reason or None, decoded arrays) for one token sample."""
    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, ndim) in TOKEN_ARRAYS.items():
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
    ac, se, mu, co = (arrays[n] for n in TOKEN_ARRAYS)
    if exp.levels is not None and ac.shape[0] != exp.levels:
        return f"acoustic.npy has {ac.shape[0]} levels, the acoustic fingerprint in index.json says {exp.levels}", {}
    for arr, hi, name, src in (
        (ac, exp.acoustic_codebook, "acoustic.npy", "acoustic codebook_size"),
        (se, exp.semantic_vocab, "semantic.npy", "semantic vocab_size"),
        (co, exp.cond_codebook, "cond.npy", "quantizer codebook_size"),
    ):
        r = _check_range(arr, hi, name, src)
        if r:
            return r, {}
    if exp.mulan_dim is not None and mu.shape[0] != exp.mulan_dim:
        return f"mulan.npy has dim {mu.shape[0]}, the mulan fingerprint in index.json says {exp.mulan_dim}", {}
    if not np.isfinite(mu).all():
        return "mulan.npy has non-finite values", {}
    if exp.cond_shape is not None and tuple(co.shape) != exp.cond_shape:
        return f"cond.npy has shape {list(co.shape)}, the quantizer fingerprint in index.json says {list(exp.cond_shape)}", {}
    if exp.acoustic_rate and exp.semantic_rate:
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


def _verify_shard(url: str, kind: str, exp: _Expect, seen_keys: dict[str, str]) -> dict:
    name = storage.basename(url)
    required = set(REQUIRED[kind])
    stats = {"samples": 0, "seconds": 0.0, "tokens": {"acoustic": 0, "semantic": 0}}

    def finish(key: str, entries: dict[str, bytes]) -> None:
        missing = required - set(entries)
        if missing:
            raise ShardError(name, key, f"missing entr{'y' if len(missing) == 1 else 'ies'} {', '.join(sorted(missing))}")
        for e in entries:
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
        secs = _sample_seconds(js)
        if kind == "tokens":
            reason, arrays = _check_token_sample(key, entries, exp)
            if reason:
                raise ShardError(name, key, reason)
            if secs is not None and exp.acoustic_rate:
                t = arrays["acoustic.npy"].shape[1] / exp.acoustic_rate
                if abs(t - secs) > max(0.1, 2.0 / exp.acoustic_rate):
                    raise ShardError(name, key, f"json says {secs:.3f} s but acoustic.npy holds {t:.3f} s at {exp.acoustic_rate} Hz")
            stats["tokens"]["acoustic"] += int(arrays["acoustic.npy"].size)
            stats["tokens"]["semantic"] += int(arrays["semantic.npy"].size)
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
    folder = storage.basename(directory)
    if folder.startswith("tokens-"):
        want = fingerprint_hash(fps)
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
    totals = {"samples": 0, "seconds": 0.0, "tokens": {"acoustic": 0, "semantic": 0}, "bytes": 0}
    splits: dict[str, int] = {}
    for n in sorted(records):
        rec, url = records[n], on_disk[n]
        nbytes = storage.size(url)
        size_bad = rec.get("bytes") is not None and int(rec["bytes"]) != nbytes
        if size_bad or not _tar_tail_ok(url, nbytes):
            # read it first: a tar cut inside an entry gets the more precise message (shard + key)
            _verify_shard(url, kind, exp, dict(seen))
            if size_bad:
                raise ShardError(n, None, f"{nbytes} bytes, index.json says {rec['bytes']} (truncated or replaced)")
            raise ShardError(n, None, "no end-of-archive marker: the tar is truncated")
        st = _verify_shard(url, kind, exp, seen)
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
            totals["tokens"][k] += v
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
    }


__all__ = [
    "ShardError",
    "FingerprintMismatch",
    "ShardWriter",
    "fingerprint_hash",
    "token_shard_dir",
    "audio_shard_dir",
    "shard_name",
    "sample_key",
    "validate_sample",
    "encode_sample",
    "decode_sample",
    "write_index",
    "read_index",
    "list_shards",
    "check_fingerprints",
    "shard_reader",
    "ShardReader",
    "remove_partials",
    "inspect",
    "verify",
]
