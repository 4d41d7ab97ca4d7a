"""The paper-size corpus simulation of ``musiclm bench scaling`` (musiclm/bench/corpus_sim.py) at a
reduced size, locally and on moto S3, and the lazy decode a resume relies on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from musiclm.bench import corpus_sim


def test_simulation_runs_small(tmp_path):
    sim = corpus_sim.simulate(
        shards=24, samples_per_shard=4, ranks=4, workers=2, resume_world=2, s3_shards=0, workdir=str(tmp_path)
    )
    assert sim["write"]["shards"] == 24 and sim["write"]["samples"] == 96
    idx = sim["index"]
    assert idx["shards"] == 24 and idx["bytes"] > 24 * 100 and idx["python_bytes"] > 0
    assert sim["startup"]["urls"] == 24 and sim["startup"]["first_sample_s"] > 0
    bal = sim["balance"]
    # 24 shards of 4 samples over 8 readers: 3 shards each, the split is exact
    assert bal["mode"] == "by_shard" and bal["readers"] == 8
    assert bal["reader_min"] == bal["reader_max"] == 12 and bal["rank_max_over_min"] == 1.0
    res = sim["resume"]
    assert res["rank_share_samples"] == 48 and res["offset"] == 43 and res["replay_samples_per_s"] > 0
    assert "s3" not in sim
    assert list(tmp_path.iterdir()) == []  # the corpus is removed afterwards

    rows = corpus_sim.extrapolate(sim, hours=280_000, ranks=512, workers=4)
    assert [r["samples_per_shard"] for r in rows] == [4, 256]
    assert rows[0]["samples"] == pytest.approx(100.8e6) and rows[0]["shards"] == pytest.approx(25.2e6)
    assert rows[1]["list_pages"] == math.ceil(100.8e6 / 256 / 1000)
    assert rows[0]["index_bytes"] == pytest.approx(idx["bytes"] * 25.2e6 / 24)
    md = corpus_sim.render_markdown(sim)
    assert "## A paper-size corpus, simulated" in md and "| 256 |" in md


@pytest.mark.slow
def test_simulation_on_moto_s3():
    """The S3 part starts its own moto server (the real S3 protocol on 127.0.0.1)."""
    s3 = corpus_sim.measure_s3(shards=6, samples_per_shard=4, ranks=4, workers=2)
    assert s3["shards"] == 6 and s3["objects"] == 7 and s3["list_pages"] == 1
    assert s3["index_load_s"] > 0 and s3["check_s"] > 0 and s3["first_sample_s"] > 0


def test_fewer_shards_than_readers_is_reported(tmp_path):
    d = str(tmp_path / "tokens-sim")
    corpus_sim.write_corpus(d, shards=3, samples_per_shard=5)
    bal = corpus_sim.measure_balance(d, ranks=2, workers=2)
    assert bal["mode"].startswith("by_sample") and bal["samples"] == 15
    assert (bal["reader_min"], bal["reader_max"]) == (3, 4) and bal["rank_min"] + bal["rank_max"] == 15


def test_reader_can_leave_samples_undecoded(tmp_path):
    from musiclm.data.shards import decode_sample, shard_reader

    d = str(tmp_path / "tokens-sim")
    corpus_sim.write_corpus(d, shards=2, samples_per_shard=3)
    raw = list(shard_reader(d, "train", shuffle=0, decode=False))
    dec = list(shard_reader(d, "train", shuffle=0))
    assert len(raw) == len(dec) == 6 and isinstance(raw[0]["semantic.npy"], bytes)
    again = decode_sample(raw[4])
    assert again["__key__"] == dec[4]["__key__"] and np.array_equal(again["acoustic.npy"], dec[4]["acoustic.npy"])
    assert again["acoustic.npy"].shape == (12, 500) and again["json"] == dec[4]["json"]
