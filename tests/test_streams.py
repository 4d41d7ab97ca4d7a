"""A stage needs only the token streams it reads (issue 15, item 2).

A token-shard folder carries all four streams (acoustic, semantic, mulan, cond) or a subset that
its index.json names (``ray_jobs/tokenize.py --streams``). The semantic stage trains on
semantic + cond; the coarse and fine stages refuse such a folder naming the stage, the stream and
the folder. A subset is fingerprinted as such: its folder hash covers its tokenizers and the
stream list, so it never "resumes" into (or is mistaken for) a full folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from train_utils import TINY_CONFIG, launch, metrics, read_log, tiny_tokens, train_args

from musiclm.data import shards as S
from musiclm.testing import make_synthetic_token_shards, synthetic_fingerprints
from musiclm.train import data as tdata

REPO = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One dataset with a full folder and a semantic + cond folder, named as tokenize.py names them."""
    root = tmp_path_factory.mktemp("streams")
    tokens = tiny_tokens()
    fps = synthetic_fingerprints(tokens)
    sub = ("semantic", "cond")
    sub_fps = {k: v for k, v in fps.items() if k in S.stream_tokenizers(sub)}
    full = S.token_shard_dir(str(root), "toy", fps)
    semantic = S.token_shard_dir(str(root), "toy", sub_fps, sub)
    make_synthetic_token_shards(full, tokens, n_train=64, n_eval=16, seconds=4.0, samples_per_shard=16)
    make_synthetic_token_shards(semantic, tokens, n_train=64, n_eval=16, seconds=4.0, samples_per_shard=16, streams=sub)
    return {"root": str(root), "full": full, "semantic": semantic}


def _cfg() -> dict:
    return yaml.safe_load(open(TINY_CONFIG))


def _spec(stage: str, cfg: dict):
    from musiclm.train.spec import get_train_spec

    spec = get_train_spec(stage)
    spec.configure(cfg)
    return spec


def _resolve(stage: str, dirs, cfg: dict | None = None, pin: str | None = None):
    cfg = cfg or _cfg()
    spec = _spec(stage, cfg)
    return tdata.resolve_shard_dirs(dirs, spec.expected_fingerprints(cfg), pin, streams=spec.streams(cfg), stage=stage)


# ---------------------------------------------------------------------------------- the schema


def test_stream_names_and_folder_hash():
    assert S.parse_streams("cond, semantic") == ("semantic", "cond")  # canonical order
    assert S.parse_streams(None) == S.ALL_STREAMS == ("acoustic", "semantic", "mulan", "cond")
    assert S.stream_entries("semantic,cond") == ("semantic.npy", "cond.npy")
    assert S.stream_tokenizers("semantic,cond") == ("semantic", "mulan", "quantizer")
    assert S.stream_tokenizers("acoustic") == ("acoustic",)
    for bad in ("semantic,codes", "", " , "):
        with pytest.raises(ValueError, match="acoustic, semantic, mulan, cond"):
            S.parse_streams(bad)
    fps = synthetic_fingerprints(tiny_tokens())
    full = S.fingerprint_hash(fps)
    assert S.fingerprint_hash(fps, S.ALL_STREAMS) == full  # full folders keep their names
    # the same four tokenizers, fewer streams: another folder (a subset never resumes into a full one)
    assert S.fingerprint_hash(fps, "acoustic,semantic,cond") != full
    assert S.fingerprint_hash(fps, "semantic,cond") != S.fingerprint_hash(fps, "semantic,mulan,cond")
    # the stage table: every stage reads the conditioning tokens, none the MuLaN embedding itself
    from musiclm.lm.stages import STAGE_STREAMS, get_stage

    for name, need in STAGE_STREAMS.items():
        st = get_stage(name, tiny_tokens())
        assert st.streams == need and "cond" in need and "mulan" not in need
        assert ("semantic" in need) == st.uses_semantic and ("acoustic" in need) == st.uses_acoustic


def test_subset_folder_writes_verifies_and_inspects(folders, capsys):
    from musiclm.cli import main

    d = folders["semantic"]
    index = S.read_index(d)
    assert index["streams"] == ["semantic", "cond"] and sorted(index["fingerprints"]) == [
        "mulan",
        "quantizer",
        "semantic",
    ]
    assert S.read_index(folders["full"])["streams"] == list(S.ALL_STREAMS)
    assert os.path.basename(d) == f"tokens-{index['fingerprint_hash']}" != os.path.basename(folders["full"])
    assert index["tokens"] == {"semantic": 80 * 20}  # 4 s at 5 Hz; no acoustic count for a folder without it
    samples = list(S.shard_reader(d, "train", shuffle=0))
    assert len(samples) == 64 and all(
        set(s) - {"__key__", "__url__"} == {"semantic.npy", "cond.npy", "json"} for s in samples
    )
    report = S.verify(d)
    assert report["ok"] and report["samples"] == 80 and report["streams"] == ["semantic", "cond"]
    assert report["tokens"] == {"semantic": 1600}

    assert main(["shards", "inspect", d]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["streams"] == ["semantic", "cond"] and info["stages"] == ["semantic"]
    assert main(["shards", "inspect", folders["full"]]) == 0
    assert json.loads(capsys.readouterr().out)["stages"] == ["semantic", "coarse", "fine"]
    assert main(["shards", "layout", d]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# streams: semantic, cond (stages: semantic)")
    fields = yaml.safe_load(out)["tokens"]
    assert fields["semantic_vocab"] == 32 and "acoustic_levels" not in fields and fields["cond_levels"] == 2

    # the writer keeps a folder to its streams, both ways
    w = S.ShardWriter(str(Path(d).parent / "scratch"), "train", streams="semantic,cond")
    full_sample = next(iter(S.shard_reader(folders["full"], "train", shuffle=0)))
    full_sample = {k: v for k, v in full_sample.items() if k != "__url__"}
    with pytest.raises(ValueError, match="acoustic.npy is not one of this folder's streams"):
        w.write(full_sample)
    with pytest.raises(ValueError, match="missing entry 'cond.npy'"):
        w.write({k: v for k, v in full_sample.items() if k not in ("acoustic.npy", "mulan.npy", "cond.npy")})
    w.abort()


def test_verify_refuses_a_subset_that_lies(folders, tmp_path):
    """index.json's streams are checked against every sample and against the folder hash."""
    import shutil

    d = str(tmp_path / os.path.basename(folders["semantic"]))
    shutil.copytree(folders["semantic"], d)
    path = os.path.join(d, "index.json")
    index = json.load(open(path))
    index["streams"] = ["acoustic", "semantic", "cond"]
    json.dump(index, open(path, "w"))
    with pytest.raises(S.ShardError, match="hash to .* but the folder is"):
        S.verify(d)  # the stream list is part of the folder hash
    index["fingerprint_hash"] = S.fingerprint_hash(index["fingerprints"], index["streams"])
    json.dump(index, open(path, "w"))
    renamed = str(tmp_path / f"tokens-{index['fingerprint_hash']}")
    os.rename(d, renamed)
    with pytest.raises(S.ShardError, match="missing entry acoustic.npy"):
        S.verify(renamed)


# ---------------------------------------------------------------------------------- training checks


def test_semantic_stage_accepts_and_streams_semantic_only_shards(folders):
    cfg = _cfg()
    dirs, indexes = _resolve("semantic", folders["semantic"], cfg)
    assert dirs == [folders["semantic"]] and indexes[0]["streams"] == ["semantic", "cond"]
    assert "shards" not in indexes[0]  # what training keeps all run long: no per-shard records
    spec = _spec("semantic", cfg)
    urls, bad = tdata.checked_shard_urls(dirs, "train")
    assert len(urls) == 4 and not bad
    stream = tdata.BatchStream(
        urls, "train", build_example=spec.build_example, collate=spec.collate, cfg=cfg, batch_size=8, prefetch=0
    )
    try:
        for _ in range(10):  # past the end of the first epoch (64 samples = 8 batches)
            batch, pos = next(stream)
            assert batch["tokens"].shape[0] == 8 and batch["loss_mask"].any()
    finally:
        stream.close()
    assert pos["epoch"] == 1
    # a pinned fingerprint_hash is the subset's own (the one inspect prints)
    _resolve("semantic", folders["semantic"], cfg, pin=indexes[0]["fingerprint_hash"])
    with pytest.raises(tdata.FingerprintHashMismatch):
        _resolve("semantic", folders["semantic"], cfg, pin=S.read_index(folders["full"])["fingerprint_hash"])
    # the tokenizers it does carry are still checked
    bad_cfg = _cfg()
    bad_cfg["tokens"]["semantic_vocab"] = 64
    with pytest.raises(S.FingerprintMismatch, match="semantic tokenizer fingerprint field 'vocab_size' is 32"):
        _resolve("semantic", folders["semantic"], bad_cfg)


@pytest.mark.parametrize("stage", ["coarse", "fine"])
def test_acoustic_stages_refuse_naming_stage_stream_and_folder(folders, stage, capsys):
    # launch/train.py's main in this process: the check runs before any distributed/DeepSpeed work
    from musiclm.train.engine import train_main

    d = folders["semantic"]
    with pytest.raises(tdata.StreamMissing) as e:
        _resolve(stage, d)
    assert (e.value.stage, e.value.stream, e.value.folder) == (stage, "acoustic", d)
    run_dir = os.path.join(folders["root"], f"run_refused_{stage}")
    rc = train_main(train_args(stage, run_dir, d, "cpu")[1:])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    line = err[-1]
    assert line.startswith("[musiclm.train] refusing the shards: StreamMissing: ")
    assert f"stage {stage} reads the acoustic stream (acoustic.npy)" in line and d in line
    assert "carry only semantic, cond" in line
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


def test_glob_picks_the_folder_with_the_streams(folders):
    pattern = os.path.join(folders["root"], "toy", "tokens-*")
    assert _resolve("coarse", pattern)[0] == [folders["full"]]  # the subset lacks acoustic
    assert _resolve("fine", pattern)[0] == [folders["full"]]
    with pytest.raises(ValueError, match="2 shard folders match"):
        _resolve("semantic", pattern)  # both carry semantic + cond: pin one
    pin = S.read_index(folders["semantic"])["fingerprint_hash"]
    assert _resolve("semantic", pattern, pin=pin)[0] == [folders["semantic"]]


@slow
def test_semantic_stage_trains_on_semantic_only_shards(folders, tmp_path):
    """Through the real deepspeed launcher, one CPU process, a few steps and one evaluation."""
    run_dir = str(tmp_path / "run")
    extra = ["--set", "train.max_steps=6", "train.eval_every=6", "train.checkpoint_every=6", "train.log_every=1"]
    rc = launch(1, train_args("semantic", run_dir, folders["semantic"], "cpu", extra), run_dir + ".log")
    text = read_log(run_dir + ".log")
    assert rc == 0, text[-3000:]
    rows = metrics(run_dir)
    steps = sorted({r["step"] for r in rows if "train/loss" in r})
    assert steps[-1] == 6 and all(np.isfinite(r["train/loss"]) for r in rows if "train/loss" in r)
    assert any("eval/loss" in r for r in rows)
    state = json.load(open(os.path.join(run_dir, "checkpoints", "step_00000006", "trainer_state.json")))
    assert state["fingerprint_hash"] == S.read_index(folders["semantic"])["fingerprint_hash"]


# ---------------------------------------------------------------------------------- tokenize.py --streams


@slow
def test_tokenize_streams_subset(tmp_path):
    """`tokenize.py --streams semantic,cond` on a private Ray head: only those entries, only their
    tokenizers loaded (the codec's model path does not exist), a folder of its own."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import ray_utils
    from helpers_models import make_tiny_tokenizer_config
    from test_ray_jobs import _write_corpus

    from musiclm.tokenizers import build_tokenizers
    from ray_jobs.output import parse_summary

    tok = make_tiny_tokenizer_config(tmp_path / "models")
    full_fps = build_tokenizers(tok).fingerprints()
    tok_no_codec = dict(tok, acoustic={"type": "encodec", "model": str(tmp_path / "no_such_codec"), "bandwidth": 6.0})
    config = tmp_path / "tok.yaml"
    config.write_text(yaml.safe_dump({"segment_seconds": 2.0, "min_segment_seconds": 1.0, "tokenizers": tok_no_codec}))
    manifest = _write_corpus(tmp_path / "corpus", n_good=4)
    out = str(tmp_path / "shards")
    head = ray_utils.start_head(num_cpus=2)
    try:
        proc = subprocess.run(
            [sys.executable, "ray_jobs/tokenize.py", "--manifest", str(manifest), "--out", out, "--dataset", "toy",
             "--config", str(config), "--clips-per-shard", "2", "--workers", "1", "--streams", "cond,semantic"],
            cwd=REPO, env=head.env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        ray_utils.cleanup(head)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = parse_summary(proc.stdout)
    assert summary["streams"] == ["semantic", "cond"] and summary["clips_ok"] == 4 and summary["clips_failed"] == 4

    sub_fps = {k: v for k, v in full_fps.items() if k in ("semantic", "mulan", "quantizer")}
    assert summary["out_dir"] == S.token_shard_dir(out, "toy", sub_fps, ("semantic", "cond"))
    assert summary["out_dir"] != S.token_shard_dir(out, "toy", full_fps)  # where a full run writes
    index = S.read_index(summary["out_dir"])
    assert index["streams"] == ["semantic", "cond"] and index["fingerprints"] == json.loads(json.dumps(sub_fps))
    assert set(index["tokens"]) == {"semantic"}
    report = S.verify(summary["out_dir"])
    n = 0
    for split in index["splits"]:
        for s in S.shard_reader(summary["out_dir"], split, shuffle=0):
            assert set(s) - {"__key__", "__url__"} == {"semantic.npy", "cond.npy", "json"}
            assert s["semantic.npy"].dtype == np.int16 and s["cond.npy"].shape == (3, 4)
            n += 1
    assert n == report["samples"] == summary["segments"] > 0
