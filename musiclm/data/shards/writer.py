"""ShardWriter: samples -> ``<split>-%06d.tar`` shards, each visible under its name only when complete."""

from __future__ import annotations

import io
import os
import tarfile
import tempfile
import time
import weakref

from musiclm.data import storage

from .encoding import encode_sample, sample_seconds, validate_sample
from .schema import PARTIAL_SUFFIX, REQUIRED, SPLIT_RE, parse_streams, shard_name


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
    def __init__(self, final_url: str, tmp_path: str, counted: tuple[str, ...]):
        self.final_url = final_url
        self.tmp_path = tmp_path
        self.file = open(tmp_path, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w|", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self.seconds = 0.0
        self.tokens = {s: 0 for s in counted}
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
    which :func:`write_index` takes. ``streams`` (token shards): the streams every sample carries
    (default all four: acoustic, semantic, mulan, cond; see ``schema.STREAMS``); token counts are
    kept for the acoustic and semantic streams among them. As a context manager, an exception discards the shard in
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
        streams=None,
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
        self.streams = parse_streams(streams) if kind == "tokens" else None
        self._counted = tuple(s for s in ("acoustic", "semantic") if s in (self.streams or ()))
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
        return _OpenShard(storage.join(self.directory, name), tmp, self._counted)

    def write(self, sample: dict) -> None:
        """Validate and append one sample (see the module docstring for entries and dtypes)."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        validate_sample(sample, self.kind, self.streams)
        entries = encode_sample(sample)
        if self._cur is not None and (self._cur.samples >= self.max_samples or self._cur.bytes >= self.max_bytes):
            self._finish()
        if self._cur is None:
            self._cur = self._open()
        cur = self._cur
        cur.add(sample["__key__"], entries)
        cur.samples += 1
        secs = sample_seconds(sample["json"])
        if secs is None and self.kind == "audio":
            secs = _flac_seconds(entries["flac"])
        cur.seconds += secs or 0.0
        for stream in self._counted:
            cur.tokens[stream] += int(sample[f"{stream}.npy"].size)

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


