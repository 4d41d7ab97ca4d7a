"""Training trusts nothing it reads: shards are checked against index.json before streaming, and a
sample the stage cannot use is reported with its shard and key."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import yaml
from train_utils import TINY_CONFIG, launch, make_tiny_shards, metrics, read_log, train_args

from musiclm.train import data as tdata

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return make_tiny_shards(str(tmp_path_factory.mktemp("checks") / "shards"))


def _copy(good, tmp_path) -> str:
    d = str(tmp_path / "shards")
    shutil.copytree(good, d)
    return d


def _truncate(d: str, name: str) -> None:
    path = os.path.join(d, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def test_index_check_names_the_shard_and_the_index(good, tmp_path):
    urls, bad = tdata.checked_shard_urls(good, "train")
    assert len(urls) == 8 and bad == []
    d = _copy(good, tmp_path)
    _truncate(d, "train-000002.tar")
    with pytest.raises(tdata.ShardIntegrityError) as e:
        tdata.checked_shard_urls(d, "train")
    msg = str(e.value)
    assert "train-000002.tar" in msg and "index.json says" in msg and os.path.join(d, "index.json") in msg
    os.remove(os.path.join(d, "train-000005.tar"))
    urls, bad = tdata.checked_shard_urls(d, "train", on_bad="skip")
    assert len(urls) == 6 and {b["shard"].rsplit("/", 1)[1] for b in bad} == {"train-000002.tar", "train-000005.tar"}
    assert any(b["reason"] == "listed in index.json but missing" for b in bad)


def test_out_of_range_token_names_shard_and_sample(good):
    from musiclm.data.shards import shard_reader
    from musiclm.train.spec import get_train_spec

    # a sample as the reader yields it (with its shard URL and key), its semantic ids out of range
    samples = list(shard_reader(os.path.join(good, "eval-000000.tar"), "eval", shuffle=0))
    cfg = yaml.safe_load(open(TINY_CONFIG))
    spec = get_train_spec("semantic")
    spec.configure(cfg)
    bad_key = samples[3]["__key__"]
    with pytest.raises(tdata.SampleError) as e:
        bad = dict(samples[3], **{"semantic.npy": np.full_like(samples[3]["semantic.npy"], -12)})
        tdata.build_checked(spec.build_example, bad, np.random.default_rng(0), cfg)
    assert bad_key in str(e.value) and "eval-000000.tar" in str(e.value) and "out of range" in str(e.value)


@slow
@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_training_refuses_a_damaged_shard_folder(good, tmp_path, damage):
    d = _copy(good, tmp_path)
    if damage == "truncated":
        _truncate(d, "train-000002.tar")
    else:
        os.remove(os.path.join(d, "train-000002.tar"))
    run_dir = str(tmp_path / "run")
    rc = launch(1, train_args("semantic", run_dir, d, "cpu", ["--set", "train.max_steps=5"]), run_dir + ".log")
    text = read_log(run_dir + ".log")
    assert rc != 0 and "ShardIntegrityError" in text and "train-000002.tar" in text, text[-3000:]
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


@slow
def test_skip_option_trains_on_the_rest_and_records(good, tmp_path):
    d = _copy(good, tmp_path)
    _truncate(d, "train-000002.tar")
    run_dir = str(tmp_path / "run")
    extra = ["--set", "train.max_steps=5", "data.on_bad_shard=skip"]
    rc = launch(1, train_args("semantic", run_dir, d, "cpu", extra), run_dir + ".log")
    text = read_log(run_dir + ".log")
    assert rc == 0, text[-3000:]
    assert "skipping shard" in text and "7 train / 2 eval shards" in text
    rec = [json.loads(line) for line in open(os.path.join(run_dir, "bad_shards.jsonl"))]
    assert [r["shard"].rsplit("/", 1)[1] for r in rec] == ["train-000002.tar"]
    assert any(r.get("data/bad_shards") == 1 for r in metrics(run_dir))


def test_shards_layout_gives_the_tokens_section(good, capsys):
    """`musiclm shards layout DIR` prints the tokens: fields the shards' tokenizers fix, ready for
    --set; with them the stage config matches the shards (make demo passes them)."""
    from musiclm.cli import main
    from musiclm.config import apply_overrides
    from musiclm.train.spec import get_train_spec

    assert main(["shards", "layout", good, "--as-set"]) == 0
    sets = capsys.readouterr().out.split()
    tiny = yaml.safe_load(open(TINY_CONFIG))["tokens"]
    assert (
        f"tokens.cond_levels={tiny['cond_levels']}" in sets
        and f"tokens.semantic_vocab={tiny['semantic_vocab']}" in sets
    )
    cfg = apply_overrides(yaml.safe_load(open(TINY_CONFIG)), sets)
    assert {k: cfg["tokens"][k] for k in tiny if k != "window_seconds"} == {
        k: v for k, v in tiny.items() if k != "window_seconds"
    }
    spec = get_train_spec("coarse")
    tdata.check_shard_fingerprints(good, spec.expected_fingerprints(cfg))  # raises on a mismatch
