"""Stage batches streamed from shards, split by rank, with a data position for exact resume.

The per-rank stream is a deterministic function of (seed, epoch, rank, world size):

- every epoch reads the split through ``musiclm.data.shards.shard_reader`` with that epoch's
  shuffle; shards are split by rank (``rank, world_size``) when there are at least as many shards
  as ranks, otherwise every rank reads all shards and keeps every world_size-th sample (both done
  by the reader);
- each example is built with a ``numpy`` Generator seeded from (seed, epoch, sample key), so the
  window offset and the conditioning dropout of a sample do not depend on what came before;
- a batch carries the position *after* it: ``{"epoch": e, "offset": n}`` = n raw samples of this
  rank's epoch-e stream consumed. Resuming skips those n samples (read, not built) and continues.

Epochs run forever (each rank moves on independently when its share of the split is exhausted);
training length is set by steps. A background thread builds batches ahead of the training loop
(``prefetch`` batches), which keeps the order deterministic (one producer).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import zlib
from collections.abc import Iterator

import numpy as np
import torch

from musiclm.data import shards as _shards
from musiclm.data import storage

__all__ = [
    "as_list",
    "shard_urls",
    "checked_shard_urls",
    "ShardIntegrityError",
    "SampleError",
    "check_shard_fingerprints",
    "StreamMissing",
    "resolve_shard_dirs",
    "BatchStream",
    "eval_batches",
    "sample_rng",
    "reader_throughput",
]


def as_list(x) -> list[str]:
    if x is None:
        return []
    if isinstance(x, (list, tuple)):
        return [str(v) for v in x]
    return [str(x)]


def shard_urls(dirs, split: str) -> list[str]:
    """Complete shards of ``split`` in one or more shard directories (sorted, concatenated)."""
    urls: list[str] = []
    for d in as_list(dirs):
        urls.extend(_shards.list_shards(d, split))
    return urls


class ShardIntegrityError(ValueError):
    """A shard that ``index.json`` lists is missing or not the size the index records."""

    def __init__(self, shard: str, index: str, reason: str):
        self.shard, self.index, self.reason = shard, index, reason
        super().__init__(
            f"{shard}: {reason} ({index}); the shard folder is incomplete or damaged: "
            f"re-run the tokenize job into it (it redoes only what is missing), or set "
            f"data.on_bad_shard: skip to train on the rest (skipped shards are logged)"
        )


def checked_shard_urls(dirs, split: str, *, on_bad: str = "error") -> tuple[list[str], list[dict]]:
    """The ``split`` shards as each folder's ``index.json`` lists them, each checked against it
    before anything is streamed: present, and exactly the size the index records (one directory
    listing per folder). ``on_bad="error"`` raises ShardIntegrityError naming the shard and the
    index; ``"skip"`` leaves the shard out -> (urls, [{"shard", "index", "reason"}, ...])."""
    urls: list[str] = []
    bad: list[dict] = []
    for d in as_list(dirs):
        index = _shards.read_index(d)
        index_url = storage.join(d, _shards.INDEX_NAME)
        sizes = storage.list_sizes(d)
        for rec in index["shards"]:
            if rec.get("split") != split:
                continue
            name, url = rec["name"], storage.join(d, rec["name"])
            got, want = sizes.get(name), rec.get("bytes")
            if got is None:
                reason = "listed in index.json but missing"
            elif want is not None and got != int(want):
                reason = f"{got} bytes, index.json says {int(want)}"
            else:
                urls.append(url)
                continue
            if on_bad != "skip":
                raise ShardIntegrityError(url, index_url, reason)
            bad.append({"shard": url, "index": index_url, "reason": reason})
    return urls, bad


class SampleError(ValueError):
    """A shard sample the stage cannot use; the message names the shard and the sample key."""


def build_checked(build_example, sample: dict, rng, cfg: dict):
    """``build_example`` with the shard URL and sample key added to any error it raises (e.g. a
    token id out of range), so a bad sample can be found in a corpus of thousands of shards."""
    try:
        return build_example(sample, rng, cfg)
    except Exception as e:
        raise SampleError(
            f"{sample.get('__url__', '?')}: sample {sample.get('__key__', '?')}: {type(e).__name__}: {e}"
        ) from e


class FingerprintHashMismatch(_shards.FingerprintMismatch):
    """The config pins ``fingerprint_hash`` and the shards' fingerprints hash to another value."""

    def __init__(self, where: str, expected: str, found: str, tokenizers: list[str]):
        self.tokenizer, self.field, self.expected, self.found = "all", "fingerprint_hash", expected, found
        ValueError.__init__(
            self,
            f"{where}: fingerprint_hash of the shards' tokenizers ({', '.join(tokenizers)}) is {found}, "
            f"the config pins fingerprint_hash {expected}: these shards were made with other tokenizers; "
            f"re-tokenize or point the config at matching shards",
        )


class ResumeOnOtherTokens(_shards.FingerprintMismatch):
    """``--resume`` found a checkpoint trained on shards of other tokenizers."""

    def __init__(self, checkpoint: str, trained_on: str, shards: str):
        self.tokenizer, self.field, self.expected, self.found = "all", "fingerprint_hash", trained_on, shards
        ValueError.__init__(
            self,
            f"{checkpoint}: this checkpoint was trained on shards whose tokenizer fingerprint_hash is "
            f"{trained_on}; the shards now configured hash to {shards} (the tokenizers changed: other "
            f"vocabulary, codebooks or weights). Start a new run (another --run_dir) instead of resuming",
        )


class NoMatchingShards(_shards.FingerprintMismatch):
    """No folder matching a glob was made by the tokenizers the config describes."""

    def __init__(self, pattern: str, errors: list):
        self.tokenizer, self.field, self.expected, self.found = "all", None, pattern, None
        self.errors = errors
        ValueError.__init__(
            self,
            f"no shard folder matching {pattern} was made by the config's tokenizers:\n"
            + "\n".join(f"  - {e}" for e in errors),
        )


class StreamMissing(_shards.FingerprintMismatch):
    """A stage reads a token stream that a shard folder does not carry (e.g. the coarse stage on
    shards tokenized with ``--streams semantic,cond``)."""

    def __init__(self, stage: str, stream: str, folder: str, present: tuple[str, ...]):
        self.stage, self.stream, self.folder, self.present = stage, stream, folder, present
        self.tokenizer, self.field, self.expected, self.found = stream, "streams", stream, list(present)
        ValueError.__init__(
            self,
            f"{folder}: stage {stage} reads the {stream} stream ({_shards.STREAMS[stream][0]}), but these shards "
            f"carry only {', '.join(present)} (index.json streams); tokenize with --streams including {stream}, "
            f"or point data.shards at a folder that has it",
        )


def check_shard_fingerprints(
    dirs,
    expected: dict | None,
    expected_hash: str | None = None,
    *,
    streams=None,
    stage: str | None = None,
) -> list[dict]:
    """Refuse shard directories whose tokenizer fingerprints do not match the config.

    ``expected``: fields per tokenizer (``{"acoustic": {"frame_rate": 75, ...}}``, from the
    config's ``tokens:`` section through the stage), checked with
    ``musiclm.data.shards.check_fingerprints``; ``expected_hash`` (optional): the exact
    ``fingerprint_hash`` of the folder (its fingerprints and streams). Raises ``FingerprintMismatch``
    naming the index, the tokenizer and the field.

    ``streams`` (optional): the token streams the ``stage`` reads. A folder without one of them is
    refused with :class:`StreamMissing` (stage, stream and folder named); a folder with only those
    streams is accepted, and the expected fields of tokenizers that the folder was not made with
    and the stage does not need (the acoustic codec for semantic-only shards) are not asked for.
    Without ``streams`` every expected tokenizer must be in the index. Returns the indexes read,
    without their ``shards`` records."""
    indexes = []
    for d in as_list(dirs):
        index = _shards.read_index(d)
        where = f"{d}/index.json"
        want = expected
        if streams is not None:
            present = _shards.index_streams(index)
            for stream in _shards.parse_streams(streams):
                if stream not in present:
                    raise StreamMissing(stage or "?", stream, d, present)
            if want:
                needed = set(_shards.stream_tokenizers(streams))
                found = index.get("fingerprints") or {}
                want = {t: f for t, f in want.items() if t in found or t in needed}
        if want:  # the index already read (a paper-size index takes seconds to parse)
            _shards.check_fingerprints(index, want, where=storage.join(d, _shards.INDEX_NAME))
        if expected_hash:
            got = _shards.fingerprint_hash(index.get("fingerprints") or {}, _shards.index_streams(index))
            if str(got) != str(expected_hash):
                raise FingerprintHashMismatch(where, str(expected_hash), got, sorted(index.get("fingerprints") or {}))
        # without its per-shard records: training keeps what this returns for the whole run, and at
        # a paper-size corpus the records are hundreds of MB of Python objects on every rank
        # (checked_shard_urls reads them again when it needs them)
        indexes.append({k: v for k, v in index.items() if k != "shards"})
    return indexes


def resolve_shard_dirs(
    dirs,
    expected: dict | None,
    expected_hash: str | None = None,
    *,
    streams=None,
    stage: str | None = None,
) -> tuple[list[str], list[dict]]:
    """Shard folders of ``data.shards`` checked against the config; a local glob such as
    ``shards/rapbeats/tokens-*`` resolves to the folder whose fingerprints match (the folder name
    carries a hash of the tokenizers, unknown before tokenization) and that carries the streams the
    ``stage`` reads (``streams``, see :func:`check_shard_fingerprints`). Several matching folders
    are an error unless ``fingerprint_hash`` picks one. Returns (folders, their indexes)."""
    check = dict(streams=streams, stage=stage)
    import glob as _glob

    out, indexes = [], []
    for d in as_list(dirs):
        if any(c in d for c in "*?[") and "://" not in d:
            cands = [m for m in sorted(_glob.glob(d)) if os.path.isfile(os.path.join(m, _shards.INDEX_NAME))]
            if not cands:
                raise FileNotFoundError(f"no shard folder (with index.json) matches {d}")
            good, errors = [], []
            for m in cands:
                try:
                    indexes_m = check_shard_fingerprints(m, expected, expected_hash, **check)
                except _shards.FingerprintMismatch as e:
                    errors.append(e)
                    continue
                good.append((m, indexes_m[0]))
            if not good:
                if len(errors) == 1:
                    raise errors[0]
                raise NoMatchingShards(d, errors)
            if len(good) > 1:
                raise ValueError(
                    f"{len(good)} shard folders match {d} and the config's tokens: "
                    f"{[g[0] for g in good]}; set fingerprint_hash or name one folder"
                )
            out.append(good[0][0])
            indexes.append(good[0][1])
        else:
            indexes.extend(check_shard_fingerprints(d, expected, expected_hash, **check))
            out.append(d)
    return out, indexes


def sample_rng(seed: int, epoch: int, key: str, salt: int = 0) -> np.random.Generator:
    """Per-sample generator: the same sample in the same epoch always gets the same window/dropout."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), zlib.crc32(str(key).encode()), int(salt)])


def _raw_stream(urls, split, *, seed, epoch, rank, world_size, shuffle):
    """(index in this rank's epoch stream, undecoded sample) for one epoch. shard_reader splits
    shards by rank (or samples, when there are fewer shards than ranks) and shuffles with (seed,
    epoch). Samples come undecoded: a resume skips its samples without decoding them."""
    it = _shards.shard_reader(
        urls,
        split,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        repeat=False,
        decode=False,
    )
    yield from enumerate(it)


def _epoch_batches(
    urls,
    split,
    *,
    build_example,
    collate,
    cfg,
    batch_size,
    rank,
    world_size,
    seed,
    shuffle,
    start: dict | None,
    stop: threading.Event | None = None,
) -> Iterator[tuple[dict, dict]]:
    """(batch, position after it) forever, epoch after epoch, from ``start`` = {"epoch", "offset"}.

    Inside a DataLoader worker, shard_reader also splits by worker (reader = rank * workers + worker)."""
    start = start or {}
    epoch, skip = int(start.get("epoch", 0)), int(start.get("offset", 0))
    while stop is None or not stop.is_set():
        buf, n = [], 0
        for i, sample in _raw_stream(
            urls, split, seed=seed, epoch=epoch, rank=rank, world_size=world_size, shuffle=shuffle
        ):
            n = i + 1
            if i < skip:
                continue  # resume: read (not decoded, not built) up to the saved position
            sample = _shards.decode_sample(sample)
            ex = build_checked(build_example, sample, sample_rng(seed, epoch, sample.get("__key__", i)), cfg)
            if ex is None:
                continue
            buf.append(ex)
            if len(buf) == batch_size:
                yield collate(buf), {"epoch": epoch, "offset": n}
                buf = []
            if stop is not None and stop.is_set():
                return
        if n == 0:
            raise RuntimeError(f"rank {rank}/{world_size} got no samples from split {split!r} ({len(urls)} shards)")
        # a partial batch at the end of an epoch is dropped (every batch has batch_size examples)
        epoch, skip = epoch + 1, 0


class _WorkerBatches:
    """IterableDataset body for DataLoader workers: each worker resumes at its own position."""

    def __init__(self, kwargs: dict, starts: list[dict]):
        self.kwargs, self.starts = kwargs, starts

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        start = self.starts[wid] if wid < len(self.starts) else None
        for batch, pos in _epoch_batches(**self.kwargs, start=start):
            yield batch, {**pos, "worker": wid}


class BatchStream:
    """Infinite iterator of ``(batch, position)`` for one rank.

    ``build_example(sample, rng, cfg)`` and ``collate(list)`` come from the TrainSpec.

    ``num_workers=0`` (default): one producer thread builds ``prefetch`` batches ahead; the stream
    is one deterministic sequence and resume is exact. ``num_workers=W``: W DataLoader worker
    processes, the rank's shards split between them (for expensive examples, e.g. audio decoding);
    each worker resumes exactly at its own position, and batches are handed out in the same
    worker rotation as before the resume, so the sequence is the same too. ``state()`` is the list
    of stream positions (one per worker, or one) of the batches consumed so far, each with the
    worker whose batch comes next (``"next"``); ``position`` restores it."""

    def __init__(
        self,
        urls: list[str],
        split: str,
        *,
        build_example,
        collate,
        cfg: dict,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: int = 1000,
        position: dict | list[dict] | None = None,
        prefetch: int = 4,
        num_workers: int = 0,
    ):
        if not urls:
            raise FileNotFoundError(f"no complete shards for split {split!r}")
        self.split, self.num_workers, self.prefetch = split, int(num_workers), int(prefetch)
        self.kwargs = dict(
            urls=list(urls),
            split=split,
            build_example=build_example,
            collate=collate,
            cfg=cfg,
            batch_size=int(batch_size),
            rank=int(rank),
            world_size=int(world_size),
            seed=int(seed),
            shuffle=int(shuffle),
        )
        n = max(1, self.num_workers)
        if isinstance(position, dict):
            position = [position]
        position = list(position or [])
        self.positions = [dict(position[i]) if i < len(position) else {"epoch": 0, "offset": 0} for i in range(n)]
        self.next_worker = int(position[0].get("next", 0)) % n if position else 0
        for p in self.positions:
            p.pop("next", None)
        self._starts = [dict(p) for p in self.positions]
        self._held: dict[int, list] = {}
        self._thread = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._it = None

    def state(self) -> list[dict]:
        return [{**p, "next": self.next_worker} for p in self.positions]

    # -- producers ------------------------------------------------------------------------------

    def _produce(self):
        try:
            for item in _epoch_batches(**self.kwargs, start=self._starts[0], stop=self._stop):
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # hand the error to the consumer
            self._queue.put(e)

    def _start(self):
        if self.num_workers > 0:
            loader = torch.utils.data.DataLoader(
                _IterableWrapper(_WorkerBatches(self.kwargs, self._starts)),
                batch_size=None,
                num_workers=self.num_workers,
                prefetch_factor=max(1, self.prefetch),
                persistent_workers=False,
                worker_init_fn=_worker_init,
            )
            self._it = iter(loader)
        elif self.prefetch > 0:
            self._queue = queue.Queue(maxsize=self.prefetch)
            self._thread = threading.Thread(target=self._produce, name="musiclm-batches", daemon=True)
            self._thread.start()
            self._it = self._from_queue()
        else:
            self._it = _epoch_batches(**self.kwargs, start=self._starts[0], stop=self._stop)

    def _from_queue(self):
        while True:
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, dict]:
        if self._it is None:
            self._start()
        if self.num_workers > 0:
            # the DataLoader restarts its rotation at worker 0; hand batches out in the saved rotation
            want = self.next_worker
            while not self._held.get(want):
                batch, pos = next(self._it)
                self._held.setdefault(int(pos["worker"]), []).append((batch, pos))
            batch, pos = self._held[want].pop(0)
            self.next_worker = (want + 1) % self.num_workers
        else:
            batch, pos = next(self._it)
        w = int(pos.get("worker", 0))
        self.positions[w] = {"epoch": int(pos["epoch"]), "offset": int(pos["offset"])}
        return batch, pos

    def close(self):
        self._stop.set()
        if self._thread is not None:
            try:
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=5)
        if self.num_workers > 0 and self._it is not None:
            shutdown = getattr(self._it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        self._it = None


def _worker_init(_worker_id: int) -> None:
    # A scheduler's SIGTERM reaches every process of the job, loader workers included. A dead
    # worker would fail the trainer while it writes its SIGTERM checkpoint, so workers ignore
    # SIGTERM/SIGINT and are shut down by the trainer (or SIGKILLed by the launcher).
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


class _IterableWrapper(torch.utils.data.IterableDataset):
    def __init__(self, body):
        super().__init__()
        self.body = body

    def __iter__(self):
        return iter(self.body)


def eval_batches(
    urls: list[str],
    split: str,
    *,
    build_example,
    collate,
    cfg: dict,
    batch_size: int,
    n_batches: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> Iterator[dict]:
    """The same held-out batches at every evaluation: every rank reads the split in order (no
    shuffle), batch g of the (cycled) sequence of the split's batches goes to rank g % world_size.
    Yields exactly ``n_batches`` batches per rank (none when the split is empty), so every rank
    runs the same number of forwards (ZeRO-3). A split smaller than one batch is one batch."""
    if not urls or n_batches <= 0:
        return
    produced, g = 0, 0
    while True:
        buf, full = [], 0
        reader = _shards.shard_reader(urls, split, shuffle=0, seed=seed, epoch=0, rank=0, world_size=1, repeat=False)
        for i, sample in enumerate(reader):
            ex = build_checked(build_example, sample, sample_rng(seed, 0, sample.get("__key__", i), salt=1), cfg)
            if ex is None:
                continue
            buf.append(ex)
            if len(buf) == batch_size:
                full += 1
                if g % world_size == rank:
                    yield collate(buf)
                    produced += 1
                    if produced >= n_batches:
                        return
                g, buf = g + 1, []
        if full == 0:
            if not buf:
                return
            if g % world_size == rank:
                yield collate(buf)
                produced += 1
                if produced >= n_batches:
                    return
            g += 1


def split_batches(
    urls: list[str],
    split: str,
    *,
    build_example,
    collate,
    cfg: dict,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    max_samples: int | None = None,
) -> Iterator[tuple[dict, bool]]:
    """One pass over (the first ``max_samples`` samples of) a split, for metrics that need the
    whole split at once (e.g. retrieval over every eval clip).

    Sample ``i`` belongs to batch ``i // batch_size`` and batch ``b`` to rank ``b % world_size``, so
    the ranks together see every sample exactly once. Yields ``(batch, real)``: every rank yields
    the same number of batches (ZeRO-3 needs the same number of forwards on every rank); a rank with
    fewer real batches, or whose batch lost every example to ``build_example`` returning None, gets
    a stand-in batch with ``real=False`` whose outputs the caller drops."""
    if not urls:
        return
    limit = None if max_samples is None or int(max_samples) <= 0 else int(max_samples)
    mine: list[list[tuple[int, dict]]] = []
    fallback: list[tuple[int, dict]] = []  # the split's first samples: a stand-in for empty batches
    n = 0
    reader = _shards.shard_reader(urls, split, shuffle=0, seed=seed, epoch=0, rank=0, world_size=1, repeat=False)
    for i, sample in enumerate(reader):
        if limit is not None and i >= limit:
            break
        n = i + 1
        if len(fallback) < batch_size:
            fallback.append((i, sample))
        b = i // batch_size
        if b % world_size == rank:
            if not mine or mine[-1][0][0] // batch_size != b:
                mine.append([])
            mine[-1].append((i, sample))
    if n == 0:
        return
    per_rank = math.ceil(math.ceil(n / batch_size) / world_size)

    def build(group):
        exs = [build_checked(build_example, s, sample_rng(seed, 0, s.get("__key__", i), salt=1), cfg) for i, s in group]
        exs = [e for e in exs if e is not None]
        return collate(exs) if exs else None

    stand_in = None
    for j in range(per_rank):
        batch = build(mine[j]) if j < len(mine) else None
        if batch is not None:
            yield batch, True
            continue
        if stand_in is None:
            stand_in = build(fallback)
            if stand_in is None:
                raise ValueError(f"split {split!r}: no sample of its first {len(fallback)} builds an example")
        yield stand_in, False


def reader_throughput(
    urls: list[str],
    split: str,
    *,
    build_example,
    collate,
    cfg: dict,
    batch_size: int,
    seconds: float = 5.0,
    seed: int = 0,
) -> dict:
    """Samples/s of the input pipeline alone (read + decode + build + collate), one rank."""
    import time

    stream = BatchStream(
        urls, split, build_example=build_example, collate=collate, cfg=cfg, batch_size=batch_size, seed=seed, prefetch=0
    )
    n, t0 = 0, time.perf_counter()
    for _batch, _pos in stream:
        n += batch_size
        if time.perf_counter() - t0 >= seconds:
            break
    dt = time.perf_counter() - t0
    return {"samples": n, "seconds": dt, "samples_per_s": n / dt if dt > 0 else 0.0}
