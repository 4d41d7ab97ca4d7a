"""Reading shards: :func:`shard_reader` / :class:`ShardReader` (a webdataset pipeline), split by rank
and DataLoader worker, shuffled per epoch, decoding only ``.npy`` (no pickle), ``.json`` and ``.txt``."""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
import webdataset as wds
from webdataset.filters import shuffle as wds_shuffle
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_iterator
from webdataset.utils import pytorch_worker_info

from musiclm.data import storage

from .index import list_shards
from .schema import ShardError


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

    def __init__(
        self,
        urls,
        *,
        shuffle=1000,
        seed=0,
        epoch=0,
        rank=None,
        world_size=None,
        repeat=False,
        handler=None,
        decode=True,
    ):
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
        if decode:  # decode=False: raw entry bytes, for callers that decode only what they use
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
        yield from wds_shuffle(self.shuffle_buffer, min(self.shuffle_buffer, 100), rng=rng)(src)

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
    decode: bool = True,
):
    """A webdataset pipeline of decoded samples from a shard folder (its complete ``split``
    shards), one ``.tar`` URL, or a list of shard URLs; local or ``s3://``.

    ``rank``/``world_size`` default to torch.distributed (or RANK/WORLD_SIZE); DataLoader workers
    are detected inside each worker. ``shuffle`` is the sample buffer size (0: no shuffling of
    shards or samples). Errors are raised (``handler`` may be a webdataset handler such as
    ``webdataset.warn_and_continue`` to skip bad shards). Samples: ``{"__key__", "__url__",
    "acoustic.npy", ..., "json"}`` with arrays and dicts decoded (``decode=False``: entry bytes, for
    :func:`decode_sample` later; a resume skips samples without decoding them)."""
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
        urls,
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        repeat=repeat,
        handler=handler,
        decode=decode,
    )


