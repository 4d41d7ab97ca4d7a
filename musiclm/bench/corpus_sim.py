"""A paper-size token corpus, simulated (issue 15, item 3): the shard index, the reader and the rank
split exercised at the shape of a 280k-hour corpus, scaled down to what one machine holds.

:func:`simulate` writes a synthetic, schema-valid token corpus of many small shards (random tokens
at the paper's shapes: acoustic int16 [12, 500] = 10 s at 50 Hz, semantic [250], MuLaN float16
[128], cond [3, 12]), locally and on S3 (a moto server on 127.0.0.1), and measures what grows with
the corpus:

- ``index.json``: bytes, bytes per shard record, load time, Python memory of the loaded index;
- reader start-up of one rank: the checks training runs before streaming
  (:func:`musiclm.train.data.checked_shard_urls`: index + one folder listing), then the first
  sample of one DataLoader worker of rank 0 of ``ranks``; memory of the URL list it holds;
- balance: samples per reader for ``ranks`` x ``workers`` readers, from the real
  :class:`musiclm.data.shards.ShardReader` split (max / min per reader and per rank);
- resume deep into an epoch: time to the first batch of a :class:`musiclm.train.data.BatchStream`
  restored at 90 % of a rank's epoch share, against one started at 0 -> the replay rate;
- S3: LIST pages and listing time of the folder, index load, the training checks, the first sample.

:func:`extrapolate` scales each figure to a corpus of ``hours`` (280k: 100.8 M samples of 10 s) at
8 samples per shard (the simulated shape) and at 256 (the shard writer's default); ``render_markdown``
writes the section of ``docs/scaling.md``. Run through ``musiclm bench scaling --set simulate=true``
or ``python -m musiclm.bench.scaling --simulate --write docs/scaling.md``.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
import tracemalloc

import numpy as np

from musiclm.data import storage
from musiclm.lm.stages import PAPER_TOKENS

SIM_TOKENS = PAPER_TOKENS  # the paper's token layout
MULAN_DIM = 128
S3_PAGE = 1000  # keys per ListObjectsV2 page (the S3 maximum)


def _fingerprints() -> dict:
    from musiclm.testing import synthetic_fingerprints

    fps = synthetic_fingerprints(SIM_TOKENS)
    fps["mulan"]["dim"] = MULAN_DIM
    return fps


def _sample_pool(n: int, seconds: float, rng: np.random.Generator) -> list[dict]:
    """``n`` random samples at the paper's shapes (rewritten under new keys: the bench measures the
    index, listing and split, which do not depend on the token values)."""
    t = SIM_TOKENS
    ta, ts = int(round(seconds * t["acoustic_rate"])), int(round(seconds * t["semantic_rate"]))
    return [
        {
            "acoustic.npy": rng.integers(0, t["acoustic_codebook"], (t["acoustic_levels"], ta), dtype=np.int16),
            "semantic.npy": rng.integers(0, t["semantic_vocab"], (ts,), dtype=np.int16),
            "mulan.npy": rng.standard_normal(MULAN_DIM).astype(np.float16),
            "cond.npy": rng.integers(0, t["cond_codebook"], (3, t["cond_levels"]), dtype=np.int16),
        }
        for _ in range(n)
    ]


def write_corpus(directory: str, shards: int, samples_per_shard: int, *, seconds: float = 10.0, seed: int = 0) -> dict:
    """``shards`` train shards of ``samples_per_shard`` samples + index.json; returns timings."""
    from musiclm.data.shards import ShardWriter, write_index

    pool = _sample_pool(64, seconds, np.random.default_rng(seed))
    t0 = time.perf_counter()
    n = shards * samples_per_shard
    with ShardWriter(directory, "train", kind="tokens", max_samples=samples_per_shard) as w:
        for i in range(n):
            clip, seg = divmod(i, 4)  # 4 segments (40 s) per clip
            js = {"clip_id": f"c{clip:09d}", "caption": "synthetic", "source": "sim", "start": seg * seconds,
                  "end": (seg + 1) * seconds, "sample_rate": 24000, "tags": {}}  # fmt: skip
            w.write({"__key__": f"c{clip:09d}__{seg:04d}", **pool[i % len(pool)], "json": js})
    t_shards = time.perf_counter() - t0
    t1 = time.perf_counter()
    write_index(directory, w.shards, kind="tokens", fingerprints=_fingerprints())
    return {
        "shards": len(w.shards),
        "samples": n,
        "bytes": sum(r["bytes"] for r in w.shards),
        "write_s": round(t_shards, 3),
        "write_samples_per_s": round(n / t_shards, 1),
        "index_write_s": round(time.perf_counter() - t1, 4),
    }


def _best(fn, repeats: int = 3) -> tuple[float, object]:
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _python_bytes(fn) -> int:
    """Peak Python allocations while ``fn`` runs and its result is alive (tracemalloc)."""
    tracemalloc.start()
    try:
        out = fn()
        _cur, peak = tracemalloc.get_traced_memory()
        del out
    finally:
        tracemalloc.stop()
    return int(peak)


@contextlib.contextmanager
def _worker_env(worker: int, workers: int):
    """Make webdataset's worker detection see DataLoader worker ``worker`` of ``workers``."""
    from musiclm.testing import environ

    with environ({"WORKER": str(worker), "NUM_WORKERS": str(workers)}):
        yield


def measure_index(directory: str) -> dict:
    from musiclm.data.shards import INDEX_NAME, read_index

    size = storage.size(storage.join(directory, INDEX_NAME))
    load_s, index = _best(lambda: read_index(directory))
    n = len(index["shards"])
    return {
        "bytes": size,
        "shards": n,
        "bytes_per_shard": round(size / max(1, n), 1),
        "load_s": round(load_s, 4),
        "load_s_per_shard": load_s / max(1, n),
        "python_bytes": _python_bytes(lambda: read_index(directory)),
    }


def measure_startup(directory: str, ranks: int, workers: int) -> dict:
    """Rank 0's checks before streaming, then the first sample of its worker 0."""
    from musiclm.data.shards import ShardReader
    from musiclm.train.data import checked_shard_urls

    check_s, (urls, _bad) = _best(lambda: checked_shard_urls(directory, "train"))
    list_s, _ = _best(lambda: storage.list_sizes(directory))
    with _worker_env(0, workers):
        t0 = time.perf_counter()
        reader = ShardReader(urls, shuffle=1000, seed=0, epoch=0, rank=0, world_size=ranks)
        next(iter(reader))
        first_s = time.perf_counter() - t0
    return {
        "check_s": round(check_s, 4),
        "listing_s": round(list_s, 4),
        "first_sample_s": round(first_s, 4),
        "urls": len(urls),
        "check_python_bytes": _python_bytes(lambda: checked_shard_urls(directory, "train")),
        "url_list_python_bytes": _python_bytes(lambda: [str(u) + "" for u in urls]),
    }


def measure_balance(directory: str, ranks: int, workers: int, seed: int = 0) -> dict:
    """Samples per reader (rank x worker) in epoch 0, from the real ShardReader shard split."""
    from musiclm.data.shards import ShardReader, read_index

    index = read_index(directory)
    counts = {storage.join(directory, r["name"]): int(r["samples"]) for r in index["shards"]}
    urls = sorted(counts)
    total = sum(counts.values())
    readers = ranks * workers
    per_reader = []
    t0 = time.perf_counter()
    for rank in range(ranks):
        for w in range(workers):
            with _worker_env(w, workers):
                reader = ShardReader(urls, shuffle=1000, seed=seed, epoch=0, rank=rank, world_size=ranks)
                _me, _n, by_shard = reader._plan()
                mine = list(reader._shard_stream())
            if by_shard:
                per_reader.append(sum(counts[u] for u in mine))
            else:  # fewer shards than readers: every reader streams every shard, keeps every n-th sample
                me = rank * workers + w
                per_reader.append(len(range(me, total, readers)))
    split_s = time.perf_counter() - t0
    per_rank = [sum(per_reader[r * workers : (r + 1) * workers]) for r in range(ranks)]
    return {
        "ranks": ranks,
        "workers": workers,
        "readers": readers,
        "mode": "by_shard" if len(urls) >= readers else "by_sample (every reader streams every shard)",
        "samples": total,
        "reader_min": min(per_reader),
        "reader_max": max(per_reader),
        "reader_max_over_min": round(max(per_reader) / max(1, min(per_reader)), 4),
        "rank_min": min(per_rank),
        "rank_max": max(per_rank),
        "rank_max_over_min": round(max(per_rank) / max(1, min(per_rank)), 4),
        "split_s_per_reader": round(split_s / readers, 6),
    }


def measure_resume(directory: str, world: int, depth: float = 0.9, batch_size: int = 8) -> dict:
    """Time to the first batch of rank 0 of ``world`` restored ``depth`` into its epoch share, and
    the rate at which the skipped samples are replayed (read, not built)."""
    import torch

    from musiclm.data.shards import decode_sample, shard_reader
    from musiclm.train.data import BatchStream, checked_shard_urls

    urls, _ = checked_shard_urls(directory, "train")
    share = sum(1 for _ in shard_reader(urls, "train", shuffle=0, rank=0, world_size=world, decode=False))
    offset = int(share * depth)

    def first_batch(position):
        stream = BatchStream(
            urls,
            "train",
            build_example=lambda s, rng, cfg: {"n": torch.tensor(s["semantic.npy"].shape[0])},
            collate=lambda xs: {"n": torch.stack([x["n"] for x in xs])},
            cfg={},
            batch_size=batch_size,
            rank=0,
            world_size=world,
            position=position,
            prefetch=0,
        )
        t0 = time.perf_counter()
        next(stream)
        dt = time.perf_counter() - t0
        stream.close()
        return dt

    fresh = min(first_batch(None) for _ in range(2))
    deep = first_batch({"epoch": 0, "offset": offset})
    # what the replay costs when the skipped samples are decoded too (as before the lazy decode),
    # over at most 5,000 samples
    n_dec = min(offset, 5000)
    rates = {}
    for decode in (False, True):
        t0 = time.perf_counter()
        for i, s in enumerate(shard_reader(urls, "train", shuffle=1000, rank=0, world_size=world, decode=False)):
            if i >= n_dec:
                break
            if decode:
                decode_sample(s)
        rates[decode] = n_dec / max(1e-9, time.perf_counter() - t0)
    replay = max(1e-9, deep - fresh)
    return {
        "world": world,
        "rank_share_samples": share,
        "offset": offset,
        "first_batch_fresh_s": round(fresh, 4),
        "first_batch_resumed_s": round(deep, 4),
        "replay_samples_per_s": round(offset / replay, 1),
        "read_samples_per_s": round(rates[False], 1),
        "read_and_decode_samples_per_s": round(rates[True], 1),
    }


def measure_s3(shards: int, samples_per_shard: int, ranks: int, workers: int, seed: int = 0) -> dict:
    """The same corpus shape on moto S3: writing, listing pages and time, index load, the training
    checks and the first sample of one reader."""
    from musiclm.testing import MotoServer, environ

    with MotoServer() as server, environ(server.env()):
        bucket = server.create_bucket()
        d = f"{bucket}/sim/tokens-sim"
        wrote = write_corpus(d, shards, samples_per_shard, seed=seed)
        list_s, sizes = _best(lambda: storage.list_sizes(d))
        n_objects = len(sizes)
        idx = measure_index(d)
        # with at least one shard per reader (the normal case) ...
        fit = max(1, min(ranks, wrote["shards"] // workers))
        start = measure_startup(d, fit, workers)
        # ... and with fewer shards than readers, where every reader streams every shard
        crowded = measure_startup(d, ranks, workers) if fit < ranks else None
    pages = math.ceil(n_objects / S3_PAGE)
    return {
        "shards": wrote["shards"],
        "write_s": wrote["write_s"],
        "objects": n_objects,
        "list_pages": pages,
        "listing_s": round(list_s, 4),
        "listing_s_per_page": round(list_s / pages, 4),
        "index_bytes": idx["bytes"],
        "index_load_s": idx["load_s"],
        "check_s": start["check_s"],
        "first_sample_ranks": fit,
        "first_sample_s": start["first_sample_s"],
        "first_sample_s_all_ranks_streaming_every_shard": crowded["first_sample_s"] if crowded else None,
    }


def simulate(
    shards: int = 4096,
    samples_per_shard: int = 8,
    seconds: float = 10.0,
    ranks: int = 512,
    workers: int = 4,
    resume_world: int = 4,
    s3_shards: int = 1024,
    seed: int = 0,
    workdir: str | None = None,
) -> dict:
    """Write the corpus (``shards`` x ``samples_per_shard`` locally, ``s3_shards`` on moto S3; 0
    skips S3) and measure it (see the module docstring). Returns the figures as a dict."""
    t_all = time.perf_counter()
    root = tempfile.mkdtemp(prefix="musiclm-sim-", dir=workdir)
    try:
        d = os.path.join(root, "sim", "tokens-sim")
        out = {
            "shards": shards,
            "samples_per_shard": samples_per_shard,
            "sample_seconds": seconds,
            "tokens": SIM_TOKENS,
            "write": write_corpus(d, shards, samples_per_shard, seconds=seconds, seed=seed),
        }
        out["bytes_per_sample"] = round(out["write"]["bytes"] / out["write"]["samples"], 1)
        out["index"] = measure_index(d)
        out["startup"] = measure_startup(d, ranks, workers)
        out["balance"] = measure_balance(d, ranks, workers, seed=seed)
        out["resume"] = measure_resume(d, resume_world)
        if s3_shards:
            out["s3"] = measure_s3(s3_shards, samples_per_shard, ranks, workers, seed=seed)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out["total_s"] = round(time.perf_counter() - t_all, 1)
    return out


def extrapolate(sim: dict, hours: float = 280_000, ranks: int = 512, workers: int = 4) -> list[dict]:
    """Each simulated figure scaled to ``hours`` of ``sim["sample_seconds"]`` samples, at the
    simulated samples per shard and at 256 per shard. Linear in the number of shards (index,
    listing, memory) or in a rank's epoch share (resume)."""
    samples = hours * 3600.0 / sim["sample_seconds"]
    rows = []
    for per_shard in sorted({sim["samples_per_shard"], 256}):
        n = samples / per_shard
        idx, st, res = sim["index"], sim["startup"], sim["resume"]
        k = n / idx["shards"]
        share = samples / ranks
        row = {
            "samples": samples,
            "samples_per_shard": per_shard,
            "shards": n,
            "index_bytes": idx["bytes"] * k,
            "index_load_s": idx["load_s"] * k,
            "index_python_bytes": idx["python_bytes"] * k,
            "url_list_python_bytes": st["url_list_python_bytes"] * k,
            "check_s": st["check_s"] * k,
            "readers": ranks * workers,
            "shards_per_reader": n / (ranks * workers),
            "reader_max_over_min": math.ceil(n / (ranks * workers)) / max(1, math.floor(n / (ranks * workers))),
            "rank_share_samples": share,
            "split_s_per_reader": sim["balance"]["split_s_per_reader"] * k,
            "resume_worst_s": share / res["replay_samples_per_s"],
            "resume_worst_s_per_worker": share / workers / res["replay_samples_per_s"],
            "list_pages": math.ceil(n / S3_PAGE),
            "list_pages_all_ranks": ranks * math.ceil(n / S3_PAGE),
        }
        if "s3" in sim:
            row["s3_listing_s"] = math.ceil(n / S3_PAGE) * sim["s3"]["listing_s_per_page"]
        rows.append(row)
    return rows


def _size(b: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= f:
            return f"{b / f:.3g} {unit}"
    return f"{b:.0f} B"


def _dur(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.3g} h"
    if s >= 60:
        return f"{s / 60:.3g} min"
    if s >= 1:
        return f"{s:.3g} s"
    return f"{s * 1000:.3g} ms"


def render_markdown(sim: dict, hours: float = 280_000, ranks: int = 512, workers: int = 4) -> str:
    w, idx, st, bal, res = sim["write"], sim["index"], sim["startup"], sim["balance"], sim["resume"]
    ext = extrapolate(sim, hours, ranks, workers)
    lines = [
        "## A paper-size corpus, simulated",
        "",
        f"`musiclm bench scaling --set simulate=true sim_shards={w['shards']}"
        + (f" sim_s3_shards={sim['s3']['shards']}" if "s3" in sim else " sim_s3_shards=0")
        + f"` wrote {w['shards']:,} token shards x "
        f"{sim['samples_per_shard']} samples ({w['samples']:,} samples of {sim['sample_seconds']:g} s, random "
        f"tokens at the paper's shapes, {sim['bytes_per_sample']:,.0f} bytes per sample, {_size(w['bytes'])}) "
        f"to local disk in {_dur(w['write_s'])}"
        + (f" and {sim['s3']['shards']:,} shards to moto S3" if "s3" in sim else "")
        + f", and measured the index, the reader and the rank split ({sim.get('total_s', 0):g} s in all, on the "
        "shared 2-core machine; times are indicative to within a factor of about 2).",
        "",
        "| measured | value |",
        "|---|---|",
        f"| `index.json` | {_size(idx['bytes'])} for {idx['shards']:,} shards ({idx['bytes_per_shard']:g} B per "
        f"shard record); load {_dur(idx['load_s'])}; {_size(idx['python_bytes'])} of Python objects |",
        f"| training's checks before streaming, one rank (index + one listing, `checked_shard_urls`) | "
        f"{_dur(st['check_s'])} (the listing alone {_dur(st['listing_s'])}); peak {_size(st['check_python_bytes'])} |",
        f"| first sample of worker 0 of rank 0 of {bal['ranks']} | {_dur(st['first_sample_s'])} |",
        f"| URL list a rank (and each of its loader workers) holds | {_size(st['url_list_python_bytes'])} |",
        f"| balance over {bal['ranks']} ranks x {bal['workers']} workers ({bal['readers']:,} readers, "
        f"{bal['mode']}) | samples per reader {bal['reader_min']}-{bal['reader_max']} "
        f"(max/min {bal['reader_max_over_min']:g}); per rank {bal['rank_min']}-{bal['rank_max']} "
        f"(max/min {bal['rank_max_over_min']:g}) |",
        f"| resume at {res['offset']:,} of a rank's {res['rank_share_samples']:,} samples (world {res['world']}) | "
        f"first batch {_dur(res['first_batch_resumed_s'])} vs {_dur(res['first_batch_fresh_s'])} from the start: "
        f"replay {res['replay_samples_per_s']:,.0f} samples/s. Reading alone {res['read_samples_per_s']:,.0f} "
        f"samples/s, reading and decoding {res['read_and_decode_samples_per_s']:,.0f}: the replay skips decoding "
        "since this change |",
    ]
    if "s3" in sim:
        s3 = sim["s3"]
        lines.append(
            f"| moto S3, {s3['objects']:,} objects | listing {_dur(s3['listing_s'])} in {s3['list_pages']} LIST "
            f"page(s) ({_dur(s3['listing_s_per_page'])} per page); index load {_dur(s3['index_load_s'])}; "
            f"training's checks {_dur(s3['check_s'])}; first sample of worker 0 of rank 0 of "
            f"{s3.get('first_sample_ranks', bal['ranks'])} {_dur(s3['first_sample_s'])}"
            + (
                f"; of rank 0 of {bal['ranks']} ({bal['readers']:,} readers > {s3['shards']:,} shards: every reader "
                f"streams every shard and keeps every {bal['readers']:,}th sample) "
                f"{_dur(s3['first_sample_s_all_ranks_streaming_every_shard'])}"
                if s3.get("first_sample_s_all_ranks_streaming_every_shard")
                else ""
            )
            + " |"
        )
    lines += [
        "",
        f"### Extrapolated to {hours:,.0f} hours ({ext[0]['samples'] / 1e6:.1f} M samples of "
        f"{sim['sample_seconds']:g} s), {ranks} ranks x {workers} workers",
        "",
        "Linear in the number of shards (index, listing, memory) or in a rank's share of an epoch "
        "(resume). The local times come from this machine's disk; moto answered a LIST page in "
        f"{_dur(sim['s3']['listing_s_per_page']) if 's3' in sim else '-'} on the loaded machine, far "
        "slower than S3 itself, so for S3 only the request counts extrapolate.",
        "",
        "| samples per shard | shards | index.json | index load per rank | index in memory per rank "
        "| checks per rank | shards per reader (max/min) | shuffle + split per reader and epoch "
        "| LIST pages per rank / all ranks | resume, worst case per rank |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in ext:
        lines.append(
            f"| {e['samples_per_shard']} | {e['shards'] / 1e6:.3g} M | {_size(e['index_bytes'])} | "
            f"{_dur(e['index_load_s'])} | {_size(e['index_python_bytes'])} | {_dur(e['check_s'])} | "
            f"{e['shards_per_reader']:,.0f} ({e['reader_max_over_min']:.4g}) | {_dur(e['split_s_per_reader'])} | "
            f"{e['list_pages']:,} / {e['list_pages_all_ranks']:,} | "
            f"{_dur(e['resume_worst_s'])} ({_dur(e['resume_worst_s_per_worker'])} with {workers} workers) |"
        )
    lines += ["", *_verdict(sim, ext, ranks, workers), ""]
    return "\n".join(lines)


def _verdict(sim: dict, ext: list[dict], ranks: int, workers: int) -> list[str]:
    """What holds at the extrapolated size, what does not, what was fixed and what is left."""
    small, big = ext[0], ext[-1]
    res = sim["resume"]
    readers = ranks * workers
    return [
        "### What holds at that size and what does not",
        "",
        f"- **Rank balance holds.** Every epoch the shard list is shuffled and dealt out round-robin, so with "
        f"equal shards the readers differ by at most one shard: {small['shards_per_reader']:,.0f} shards per reader "
        f"at {small['samples_per_shard']} samples per shard (max/min {small['reader_max_over_min']:.4f}), "
        f"{big['shards_per_reader']:,.0f} at {big['samples_per_shard']} ({big['reader_max_over_min']:.4f}). Real "
        "shards differ in size (one tokenize group of clips each), which skews a reader's share by the spread of "
        "shard sizes over ~200 shards; the engine does not need equal shares (each rank starts its next epoch on "
        "its own). It needs at least ranks x workers shards per split "
        f"({readers:,} here): below that every reader streams every shard and keeps every {readers:,}th sample, "
        "reading the split once per reader (the S3 row above shows the cost). Not changed.",
        f"- **An index every rank reads whole does not hold at {small['samples_per_shard']} samples per shard**: "
        f"{_size(small['index_bytes'])} of index.json, {_dur(small['index_load_s'])} to parse and "
        f"{_size(small['index_python_bytes'])} of Python objects on each of {ranks} ranks, and training reads it "
        "three times at start-up (the stage's fingerprint check, then the train and the eval shard checks; four "
        "before this change). At "
        f"{big['samples_per_shard']} samples per shard it is {_size(big['index_bytes'])}, "
        f"{_dur(big['index_load_s'])} and {_size(big['index_python_bytes'])}: workable. Shards of a few hundred "
        "samples are what `tokenize.py` writes for songs (one shard per group of `--clips-per-shard` 32 clips: 32 "
        "three-minute songs = 576 samples of 10 s). Fixed here: training no longer keeps the per-shard records "
        "of every index for the whole run (`check_shard_fingerprints` returns the index without them). Left: "
        "the three reads per rank (one read shared by the checks would cut the start-up checks about 3x), and an "
        "index split by shard range, or read once and broadcast, for corpora of many small shards.",
        f"- **A listing per rank.** The shard checks list the folder on every rank, twice (train and eval): "
        f"{big['list_pages']:,} LIST pages per rank, {2 * big['list_pages_all_ranks']:,} requests per start of "
        f"{ranks} ranks at {big['samples_per_shard']} samples per shard "
        f"({2 * small['list_pages_all_ranks']:,} at {small['samples_per_shard']}). That is paid per S3 request "
        "and counts against S3's request rate per prefix; tolerable at a few hundred samples per shard, not at "
        "8. Not changed (one rank listing and broadcasting needs the engine).",
        f"- **Resume replays the rank's epoch up to the saved position**: the shuffle buffer makes the order "
        "depend on every sample read before, so an exact resume reads (and until this change decoded) every "
        f"skipped sample. Measured {res['replay_samples_per_s']:,.0f} samples/s replayed on local disk under "
        f"load: a resume at the end of a {big['rank_share_samples']:,.0f}-sample rank share takes "
        f"{_dur(big['resume_worst_s'])} ({_dur(big['resume_worst_s_per_worker'])} with {workers} loader workers, "
        "each replaying its own share), more on S3 where every skipped byte crosses the network. Fixed here: "
        f"skipped samples are no longer decoded (reading alone {res['read_samples_per_s']:,.0f} samples/s, "
        f"reading and decoding {res['read_and_decode_samples_per_s']:,.0f}). Left: a resume at shard granularity "
        "(restart at the next shard of the saved epoch order, giving up exactness for the samples in the "
        "shuffle buffer) would take seconds instead of minutes.",
        f"- **Per-epoch shuffle and split of the shard list** costs each reader {_dur(big['split_s_per_reader'])} "
        f"per epoch at {big['samples_per_shard']} samples per shard ({_dur(small['split_s_per_reader'])} at "
        f"{small['samples_per_shard']}), and every rank and loader worker holds the URL list "
        f"({_size(big['url_list_python_bytes'])} / {_size(small['url_list_python_bytes'])}): holds.",
    ]


__all__ = ["simulate", "extrapolate", "render_markdown", "write_corpus"]
