import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import soundfile as sf

from musiclm.data import storage
from musiclm.data.shards import (
    FingerprintMismatch,
    ShardError,
    ShardWriter,
    audio_shard_dir,
    check_fingerprints,
    fingerprint_hash,
    inspect,
    list_shards,
    read_index,
    remove_partials,
    shard_reader,
    token_shard_dir,
    verify,
    write_index,
)

FPS = {
    "acoustic": {
        "kind": "acoustic",
        "name": "encodec",
        "config": {"bandwidth": 6.0},
        "weights_sha256": "ab" * 32,
        "sample_rate": 24000,
        "frame_rate": 75,
        "levels": 4,
        "codebook_size": 1024,
    },
    "semantic": {"kind": "semantic", "name": "kmeans-hubert", "frame_rate": 25, "vocab_size": 512},
    "mulan": {"kind": "mulan", "name": "mulan-tiny", "dim": 16},
    "quantizer": {
        "kind": "quantizer",
        "name": "mq",
        "namespaces": ["semantic", "coarse", "fine"],
        "levels": 8,
        "codebook_size": 1024,
    },
}


def make_sample(clip: int, seg: int, seconds: float = 1.0, seed: int = 0) -> dict:
    rng = np.random.default_rng(clip * 100 + seg + seed)
    cid = f"clip{clip:03d}"
    return {
        "__key__": f"{cid}__{seg:04d}",
        "acoustic.npy": rng.integers(0, 1024, (4, int(75 * seconds)), dtype=np.int16),
        "semantic.npy": rng.integers(0, 512, (int(25 * seconds),), dtype=np.int16),
        "mulan.npy": rng.standard_normal(16).astype(np.float16),
        "cond.npy": rng.integers(0, 1024, (3, 8), dtype=np.int16),
        "json": {
            "clip_id": cid,
            "caption": f"beat {clip}",
            "source": f"/data/{cid}.wav",
            "start": seg * seconds,
            "end": (seg + 1) * seconds,
            "sample_rate": 24000,
            "tags": {"bpm": 90},
        },
    }


def write_dataset(root: str, n_clips=12, segs=2, per_shard=4, splits=("train",)) -> tuple[str, list[dict]]:
    d = token_shard_dir(root, "demo", FPS)
    records, samples = [], []
    for split in splits:
        with ShardWriter(d, split, max_samples=per_shard) as w:
            for c in range(n_clips):
                for s in range(segs):
                    x = make_sample(c, s, seed=len(split))
                    x["__key__"] = f"{split}{x['__key__']}"
                    x["json"]["clip_id"] = f"{split}{x['json']['clip_id']}"
                    w.write(x)
                    samples.append(x)
        records += w.shards
    write_index(d, records, kind="tokens", fingerprints=FPS, extra={"dataset": "demo"})
    return d, samples


def keys(reader):
    return [s["__key__"] for s in reader]


def assert_same(got: dict, want: dict):
    for name in ("acoustic.npy", "semantic.npy", "mulan.npy", "cond.npy"):
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name
    assert got["json"] == want["json"]


def test_fingerprint_hash_and_dirs():
    h = fingerprint_hash(FPS)
    assert len(h) == 10 and int(h, 16) >= 0
    assert fingerprint_hash(dict(reversed(list(FPS.items())))) == h
    changed = json.loads(json.dumps(FPS))
    changed["acoustic"]["levels"] = 8
    assert fingerprint_hash(changed) != h
    assert token_shard_dir("s3://b/p", "rap", FPS) == f"s3://b/p/rap/tokens-{h}"
    assert audio_shard_dir("shards", "rap") == os.path.join("shards", "rap", "audio")


def test_local_round_trip_inspect_verify(tmp_path):
    d, samples = write_dataset(str(tmp_path), splits=("train", "eval"))
    names = sorted(os.listdir(d))
    assert names == [
        "eval-000000.tar",
        "eval-000001.tar",
        "eval-000002.tar",
        "eval-000003.tar",
        "eval-000004.tar",
        "eval-000005.tar",
        "index.json",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "train-000003.tar",
        "train-000004.tar",
        "train-000005.tar",
    ]
    assert len(list_shards(d, "train")) == 6 and len(list_shards(d)) == 12
    got = {s["__key__"]: s for s in shard_reader(d, "train", seed=3)}
    want = {s["__key__"]: s for s in samples if s["__key__"].startswith("train")}
    assert got.keys() == want.keys()
    for k in want:
        assert_same(got[k], want[k])
        assert got[k]["__url__"].endswith(".tar")
    index = read_index(d)
    assert index["dataset"] == "demo" and index["fingerprint_hash"] == fingerprint_hash(FPS)
    assert index["splits"]["eval"]["samples"] == 24 and index["tokens"]["acoustic"] == 48 * 4 * 75
    info = inspect(d)
    assert info["shards"] == 12 and info["samples"] == 48 and info["hours"] == pytest.approx(48 / 3600, abs=1e-5)
    assert info["tokens"] == {"acoustic": 48 * 300, "semantic": 48 * 25}
    assert info["fingerprints"]["acoustic"]["levels"] == 4 and info["missing_shards"] == []
    v = verify(d)
    assert v["ok"] and v["samples"] == 48 and v["splits"] == {"eval": 24, "train": 24}
    check_fingerprints(d, {"acoustic": {"levels": 4, "frame_rate": 75.0}, "mulan": {"dim": 16}})
    check_fingerprints(d, FPS)
    with pytest.raises(FingerprintMismatch, match="acoustic tokenizer fingerprint field 'levels' is 4, expected 8"):
        check_fingerprints(d, {"acoustic": {"levels": 8}})
    with pytest.raises(FingerprintMismatch, match="field 'config.bandwidth' is 6.0, expected 3.0"):
        check_fingerprints(index, {"acoustic": {"config": {"bandwidth": 3.0}}})
    with pytest.raises(FingerprintMismatch, match="no fingerprint for the codec tokenizer"):
        check_fingerprints(index, {"codec": {"levels": 4}})


def test_s3_round_trip(moto_s3):
    d, samples = write_dataset(f"{moto_s3}/shards", n_clips=5, per_shard=3)
    assert d.startswith("s3://")
    assert storage.listdir(d) == [
        "index.json",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "train-000003.tar",
    ]
    got = {s["__key__"]: s for s in shard_reader(d, "train", seed=1)}
    assert got.keys() == {s["__key__"] for s in samples}
    for s in samples:
        assert_same(got[s["__key__"]], s)
    # the rank split holds on S3 too
    parts = [keys(shard_reader(d, "train", rank=r, world_size=2)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(got)
    assert verify(d)["samples"] == 10 and inspect(d)["shards"] == 4


def test_writer_validates_samples(tmp_path):
    with ShardWriter(str(tmp_path), "train") as w:
        for mutate, words in [
            (lambda s: s.update({"__key__": "clip.v2__0000"}), "no dots"),
            (lambda s: s.update({"acoustic.npy": s["acoustic.npy"].astype(np.int32)}), "must be int16"),
            (lambda s: s.update({"mulan.npy": s["mulan.npy"].astype(np.float32)}), "must be float16"),
            (lambda s: s.update({"semantic.npy": s["semantic.npy"][None]}), "with 1 dims"),
            (lambda s: s.pop("cond.npy"), "missing entry 'cond.npy'"),
            (lambda s: s.update({"extra.pkl": b"x"}), "unexpected entry 'extra.pkl'"),
            (lambda s: s.update({"json": {"caption": "no id"}}), "needs 'clip_id'"),
        ]:
            s = make_sample(0, 0)
            mutate(s)
            with pytest.raises(ValueError, match=words):
                w.write(s)
        w.write(make_sample(0, 0) | {"notes.txt": "ok", "pitch.npy": np.zeros(3, np.float32)})
    [s] = list(shard_reader(str(tmp_path / "train-000000.tar"), shuffle=0))
    assert s["notes.txt"] == "ok" and s["pitch.npy"].dtype == np.float32


def test_exception_or_gc_leaves_no_partial_shard(tmp_path):
    d = str(tmp_path)
    with pytest.raises(RuntimeError):
        with ShardWriter(d, "train", max_samples=3) as w:
            for i in range(5):
                w.write(make_sample(i, 0))
            raise RuntimeError("tokenizer crashed")
    assert os.listdir(d) == ["train-000000.tar"]  # the complete first shard only, no temp file
    assert [r["samples"] for r in w.shards] == [3]
    w2 = ShardWriter(d, "eval")
    w2.write(make_sample(0, 0))
    assert any(n.endswith(".partial") for n in os.listdir(d))
    del w2  # never closed: the shard in progress is dropped, not published
    assert os.listdir(d) == ["train-000000.tar"]


def test_exception_on_s3_publishes_nothing(moto_s3):
    d = f"{moto_s3}/t"
    with pytest.raises(RuntimeError):
        with ShardWriter(d, "train", max_samples=10) as w:
            w.write(make_sample(0, 0))
            raise RuntimeError("boom")
    assert storage.listdir(d) == [] and list_shards(d) == []


def test_sigkill_mid_shard_leaves_no_complete_looking_shard(tmp_path):
    d = str(tmp_path / "shards")
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_shards import make_sample
        from musiclm.data.shards import ShardWriter
        w = ShardWriter({d!r}, "train", max_samples=2)
        for i in range(3):
            w.write(make_sample(i, 0))
        print("READY", flush=True)
        time.sleep(60)
        """
    )
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "READY"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    names = sorted(os.listdir(d))
    assert names[1] == "train-000000.tar" and len(names) == 2  # complete first shard + hidden temp
    assert names[0].startswith(".train-000001.tar.") and names[0].endswith(".partial")
    assert [os.path.basename(u) for u in list_shards(d)] == ["train-000000.tar"]
    assert len(keys(shard_reader(d, "train"))) == 2
    assert remove_partials(d) == 1 and os.listdir(d) == ["train-000000.tar"]


# --- verify failures -------------------------------------------------------------------------


def _members(path):
    with tarfile.open(path) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def _rewrite(d, shard, members, fix_index=True):
    path = os.path.join(d, shard)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    if fix_index:  # keep the index's byte count right so the sample check is what fails
        index = read_index(d)
        for r in index["shards"]:
            if r["name"] == shard:
                r["bytes"] = os.path.getsize(path)
        storage.write_bytes_atomic(os.path.join(d, "index.json"), json.dumps(index).encode())


def _npy(a):
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=True)
    return buf.getvalue()


@pytest.fixture
def small(tmp_path):
    d, _ = write_dataset(str(tmp_path), n_clips=4, segs=2, per_shard=4)
    return d


def test_verify_truncated_tar(small):
    path = os.path.join(small, "train-000001.tar")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2 + 100])
    with pytest.raises(ShardError) as ei:
        verify(small)
    assert ei.value.shard == "train-000001.tar" and ei.value.key.startswith("trainclip")
    assert "truncated" in str(ei.value)


def test_verify_tar_cut_at_member_boundary(small):
    members = _members(os.path.join(small, "train-000000.tar"))
    path = os.path.join(small, "train-000000.tar")
    data = open(path, "rb").read()
    # the size of the tar without its last sample's entries and the end-of-archive blocks
    with tarfile.open(path) as tf:
        last = tf.getmembers()[-5]
        cut = last.offset
    open(path, "wb").write(data[:cut])
    with pytest.raises(ShardError, match=r"train-000000.tar: .*(bytes, index.json says|truncated)"):
        verify(small)
    assert len(members) == 20


def test_verify_missing_entry(small):
    shard = "train-000000.tar"
    members = [m for m in _members(os.path.join(small, shard)) if m[0] != "trainclip001__0000.cond.npy"]
    _rewrite(small, shard, members)
    with pytest.raises(ShardError) as ei:
        verify(small)
    assert (ei.value.shard, ei.value.key) == (shard, "trainclip001__0000")
    assert "missing entry cond.npy" in str(ei.value)


def test_verify_wrong_dtype_and_pickled_npy(small):
    shard = "train-000001.tar"
    members = _members(os.path.join(small, shard))
    name0 = members[0][0]
    key = name0.split(".")[0]
    bad = [(n, _npy(np.zeros((4, 75), np.int32)) if n == f"{key}.acoustic.npy" else d) for n, d in members]
    _rewrite(small, shard, bad)
    with pytest.raises(ShardError, match=rf"{shard}, key '{key}': acoustic.npy has dtype int32, expected int16"):
        verify(small)
    pickled = [(n, _npy(np.array([{"evil": 1}], dtype=object)) if n == f"{key}.mulan.npy" else d) for n, d in members]
    _rewrite(small, shard, pickled)
    with pytest.raises(ShardError, match="mulan.npy is not a readable .npy without pickle"):
        verify(small)
    with pytest.raises(ValueError, match="allow_pickle"):
        list(shard_reader(os.path.join(small, shard), shuffle=0))


def test_verify_fingerprint_and_count_disagreements(small):
    verify(small)
    index = read_index(small)
    ipath = os.path.join(small, "index.json")
    # index fingerprints changed: no longer the folder's hash
    bad = json.loads(json.dumps(index))
    bad["fingerprints"]["acoustic"]["levels"] = 8
    storage.write_bytes_atomic(ipath, json.dumps(bad).encode())
    with pytest.raises(ShardError, match="hash to .* but the folder is tokens-"):
        verify(small)
    # content that the declared tokenizers cannot have produced
    for field, value, words in [
        (("acoustic", "codebook_size"), 512, "acoustic.npy has code .* >= acoustic codebook_size 512"),
        (("semantic", "frame_rate"), 50, "streams not aligned"),
        (("mulan", "dim"), 128, "mulan.npy has dim 16"),
        (("quantizer", "levels"), 12, r"cond.npy has shape \[3, 8\]"),
    ]:
        other = json.loads(json.dumps(index))
        other["fingerprints"][field[0]][field[1]] = value
        other["fingerprint_hash"] = fingerprint_hash(other["fingerprints"])
        moved = os.path.join(os.path.dirname(small), f"tokens-{fingerprint_hash(other['fingerprints'])}")
        os.rename(small, moved)
        storage.write_bytes_atomic(os.path.join(moved, "index.json"), json.dumps(other).encode())
        with pytest.raises(ShardError, match=words):
            verify(moved)
        os.rename(moved, small)
    # sample counts
    wrong = json.loads(json.dumps(index))
    wrong["shards"][0]["samples"] += 1
    storage.write_bytes_atomic(ipath, json.dumps(wrong).encode())
    with pytest.raises(ShardError, match="train-000000.tar: 4 samples, index.json says 5"):
        verify(small)
    # shard missing from the folder / not in the index
    storage.write_bytes_atomic(ipath, json.dumps(index).encode())
    os.rename(os.path.join(small, "train-000001.tar"), os.path.join(small, "train-000009.tar"))
    with pytest.raises(ShardError, match="train-000001.tar: listed in index.json but missing"):
        verify(small)
    assert inspect(small)["unindexed_shards"] == ["train-000009.tar"]


# --- reader: splitting and determinism -------------------------------------------------------


def test_reader_splits_by_rank_without_loss_or_duplicates(small):
    all_keys = sorted(keys(shard_reader(small, "train", shuffle=0)))
    assert len(all_keys) == 8
    for world in (2, 3):  # 2 shards: shard split for 2 ranks, sample split for 3
        parts = [keys(shard_reader(small, "train", rank=r, world_size=world, seed=5)) for r in range(world)]
        flat = [k for p in parts for k in p]
        assert sorted(flat) == all_keys and all(parts)


def test_reader_splits_across_ranks_and_dataloader_workers(tmp_path):
    import torch

    d, samples = write_dataset(str(tmp_path), n_clips=12, segs=2, per_shard=3)  # 8 shards
    seen = []
    for rank in range(2):
        reader = shard_reader(d, "train", rank=rank, world_size=2, seed=0)
        loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=2)
        seen += [s["__key__"] for s in loader]
    assert len(seen) == len(samples) and sorted(seen) == sorted(s["__key__"] for s in samples)


def test_reader_deterministic_per_seed_and_epoch(small):
    a = keys(shard_reader(small, "train", seed=7, epoch=1, shuffle=100))
    assert a == keys(shard_reader(small, "train", seed=7, epoch=1, shuffle=100))
    assert a != keys(shard_reader(small, "train", seed=7, epoch=2, shuffle=100))
    assert sorted(a) == sorted(keys(shard_reader(small, "train", shuffle=0)))
    r = shard_reader(small, "train", seed=7, epoch=0, shuffle=100)
    r.set_epoch(1)
    assert keys(r) == a
    # no shuffling: shard order, then write order
    assert keys(shard_reader(small, "train", shuffle=0)) == sorted(a)
    # repeat: an endless stream, each epoch a full pass
    stream = list(itertools.islice(shard_reader(small, "train", repeat=True, shuffle=0), 24))
    assert sorted(s["__key__"] for s in stream) == sorted(a * 3)


# --- audio shards ----------------------------------------------------------------------------


def test_audio_shards_round_trip_and_verify(tmp_path):
    d = audio_shard_dir(str(tmp_path), "demo")

    def flac(channels=1):
        buf = io.BytesIO()
        sf.write(buf, np.zeros((8000, channels), np.float32), 16000, format="FLAC")
        return buf.getvalue()

    with ShardWriter(d, "train", kind="audio") as w:
        for i in range(3):
            w.write(
                {
                    "__key__": f"c{i}__0000",
                    "flac": flac(),
                    "json": {"clip_id": f"c{i}", "caption": "x", "sample_rate": 16000, "tags": {}},
                }
            )
    write_index(d, w.shards, kind="audio", fingerprints={}, extra={"sample_rate": 16000})
    assert w.shards[0]["seconds"] == pytest.approx(1.5)  # from the flac when json has no start/end
    [s0, *_] = list(shard_reader(d, "train", shuffle=0))
    assert isinstance(s0["flac"], bytes) and sf.info(io.BytesIO(s0["flac"])).samplerate == 16000
    assert verify(d)["samples"] == 3
    members = _members(os.path.join(d, "train-000000.tar"))
    _rewrite(d, "train-000000.tar", [(n, flac(2) if n == "c1__0000.flac" else b) for n, b in members])
    with pytest.raises(ShardError, match="key 'c1__0000': flac has 2 channels"):
        verify(d)
