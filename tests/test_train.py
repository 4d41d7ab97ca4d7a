"""The DeepSpeed training engine through the real `deepspeed` launcher on CPU (gloo, 2 processes).

Runs are shared between tests (module fixtures) to keep the file at a few minutes:

- ``run_a``: semantic stage, ZeRO-2, 2 processes (2 loader workers each), 100 steps: the
  uninterrupted reference;
- ``run_z3``: coarse stage, ZeRO-3, 2 processes, with the final logits probed for the export test;
- two "nodes" (hostfile + --no_ssh --node_rank 0/1) train the fine stage with ZeRO-3;
- a run killed with SIGTERM and resumed is compared step by step with ``run_a``;
- ``run_a``'s step-50 checkpoint resumed with 1 process, then again with 2 (universal checkpoints).

The first DeepSpeed run on a machine JIT-compiles two ops (~70 s, once per machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from train_utils import (
    DS_CONFIGS,
    TINY_CONFIG,
    eval_losses,
    launch,
    launch_two_nodes,
    make_tiny_shards,
    mean,
    metrics,
    read_log,
    start,
    train_args,
    train_losses,
    unigram_entropy,
    wait_for_step,
    wait_group,
)

slow = pytest.mark.slow  # launches DeepSpeed processes

# run_a and the run killed and resumed read through 2 DataLoader workers per rank
WORKERS = ["--set", "data.num_workers=2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def shards(work):
    return make_tiny_shards(str(work / "shards"))


def _assert_learned(run_dir: str, shards: str, stage: str):
    losses = train_losses(run_dir)
    assert max(losses) == 100, sorted(losses)[-3:]
    h = unigram_entropy(shards, stage)
    final = mean(losses[s] for s in range(91, 101))
    first = losses[1]
    ev = eval_losses(run_dir)
    assert final < h - 0.3, f"{stage}: final train loss {final:.3f} not below unigram entropy {h:.3f}"
    assert ev[100] < h - 0.3, f"{stage}: eval loss {ev[100]:.3f} not below unigram entropy {h:.3f}"
    assert final < first / 2


@pytest.fixture(scope="module")
def run_a(work, shards):
    run_dir = str(work / "run_a")
    log = run_dir + ".log"
    rc = launch(2, train_args("semantic", run_dir, shards, "zero2", WORKERS), log)
    assert rc == 0, read_log(log)[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def run_z3(work, shards):
    run_dir = str(work / "run_z3")
    log = run_dir + ".log"
    rc = launch(2, train_args("coarse", run_dir, shards, "zero3", ["--set", "train.probe_logits=true"]), log)
    assert rc == 0, read_log(log)[-4000:]
    return run_dir


@slow
def test_zero2_semantic_learns(run_a, shards):
    _assert_learned(run_a, shards, "semantic")
    ck = os.path.join(run_a, "checkpoints")
    assert open(os.path.join(ck, "latest")).read().strip() == "step_00000100"
    state = json.load(open(os.path.join(ck, "step_00000100", "trainer_state.json")))
    assert state["complete"] and state["world_size"] == 2 and state["zero_stage"] == 2
    assert len(state["data"]["positions"]) == 2
    assert state["fingerprints"]["semantic"]["vocab_size"] == 32
    assert os.path.isfile(os.path.join(run_a, "loss.png")) and os.path.isfile(os.path.join(run_a, "config.yaml"))


@slow
def test_zero3_coarse_learns_and_tensorboard(run_z3, shards):
    _assert_learned(run_z3, shards, "coarse")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_z3, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    want = {
        "train/loss",
        "train/accuracy",
        "train/loss/level_0",
        "train/loss/level_1",
        "train/lr",
        "train/grad_norm",
        "perf/tokens_per_s",
        "perf/samples_per_s",
        "perf/mfu",
        "perf/peak_memory_gb",
        "eval/loss",
        "eval/accuracy",
    }
    assert want <= tags, want - tags
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 101))
    assert all(e.value > 0 for e in acc.Scalars("perf/tokens_per_s"))
    assert 0 < acc.Scalars("perf/mfu")[-1].value < 1
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert lr[0] < lr[9] and lr[-1] < lr[20]  # warmup, then cosine decay


@slow
def test_zero3_export_matches_live_logits(run_z3, tmp_path):
    from safetensors.torch import load_file

    from musiclm.lm import load_stage_model
    from musiclm.train.export import export

    out = tmp_path / "coarse.safetensors"
    info = export(run_z3, str(out))
    assert info["step"] == 100 and os.path.isfile(info["config"])
    cfg = json.load(open(info["config"]))
    assert cfg["stage"] == "coarse" and cfg["model"]["n_layer"] == 2 and cfg["fingerprint_hash"]
    model = load_stage_model(str(out)).eval()
    probe = load_file(os.path.join(run_z3, "probe_logits.safetensors"))
    with torch.no_grad():
        logits = model(probe["tokens"])
    torch.testing.assert_close(logits, probe["logits"], rtol=1e-4, atol=1e-4)
    # plain torch.load(weights_only=True) path of the loader too
    sd = load_file(str(out))
    pt = tmp_path / "coarse.pt"
    torch.save(sd, pt)  # the config JSON beside it (coarse.json) is shared with the safetensors file
    m2 = load_stage_model(str(pt)).eval()
    with torch.no_grad():
        torch.testing.assert_close(m2(probe["tokens"]), probe["logits"], rtol=1e-4, atol=1e-4)


@slow
def test_two_nodes_train_fine_stage(work, shards):
    run_dir = str(work / "run_nodes")
    # with gradient accumulation (2 micro batches per step) on top
    args = train_args("fine", run_dir, shards, "zero3", ["--set", "deepspeed.gradient_accumulation_steps=2"])
    rc0, rc1 = launch_two_nodes(args, run_dir, run_dir)
    logs = read_log(run_dir + ".node0.log") + read_log(run_dir + ".node1.log")
    assert (rc0, rc1) == (0, 0), logs[-4000:]
    assert "world 2, ZeRO-3, micro batch 8 x grad accum 2" in logs
    _assert_learned(run_dir, shards, "fine")


@slow
def test_sigterm_resume_matches_uninterrupted(run_a, work, shards):
    run_dir = str(work / "run_kill")
    log = run_dir + ".log"
    p = start(2, train_args("semantic", run_dir, shards, "zero2", WORKERS), log)
    try:
        wait_for_step(run_dir, 30, p)
        os.killpg(p.pid, signal.SIGTERM)  # like a scheduler: every process of the job gets it
        p.wait(timeout=120)
        wait_group(p.pid)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = read_log(log)
    assert "stopping at step" in text, text[-4000:]
    ck = os.path.join(run_dir, "checkpoints")
    stopped = max(train_losses(run_dir))
    assert 30 <= stopped < 100
    tag = f"step_{stopped:08d}"
    assert open(os.path.join(ck, "latest")).read().strip() == tag
    assert json.load(open(os.path.join(ck, tag, "trainer_state.json")))["step"] == stopped

    # checkpoints cut off mid-write: a partial folder and a newer folder without trainer_state.json
    os.makedirs(os.path.join(ck, ".partial-step_00000099", "model"))
    shutil.copytree(os.path.join(ck, tag, "model"), os.path.join(ck, "step_00000098", "model"))
    with open(os.path.join(ck, "step_00000098", "model", "mp_rank_00_model_states.pt"), "r+b") as f:
        f.truncate(100)

    rc = launch(2, train_args("semantic", run_dir, shards, "zero2", ["--resume", "auto", *WORKERS]), log)
    text = read_log(log)
    assert rc == 0, text[-4000:]
    assert f"resumed from {os.path.join(ck, tag)} at step {stopped}" in text
    assert not os.path.exists(os.path.join(ck, ".partial-step_00000099"))

    ref, got = train_losses(run_a), train_losses(run_dir)
    assert sorted(got) == list(range(1, 101))
    steps = list(range(stopped + 1, 101))
    np.testing.assert_allclose([got[s] for s in steps], [ref[s] for s in steps], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        [got[s] for s in range(1, stopped + 1)], [ref[s] for s in range(1, stopped + 1)], rtol=1e-5, atol=1e-6
    )
    assert eval_losses(run_dir)[100] == pytest.approx(eval_losses(run_a)[100], rel=1e-5)


@slow
def test_world_size_change_through_universal_checkpoint(run_a, work, shards):
    run_dir = str(work / "run_resize")
    ck = os.path.join(run_dir, "checkpoints")
    os.makedirs(ck)
    shutil.copytree(os.path.join(run_a, "checkpoints", "step_00000050"), os.path.join(ck, "step_00000050"))
    ref = train_losses(run_a)
    log = run_dir + ".log"

    # 2 -> 1 process
    rc = launch(1, train_args("semantic", run_dir, shards, "zero2", ["--stop_after", "70"]), log)
    text = read_log(log)
    assert rc == 0, text[-4000:]
    assert "world size 2 -> 1, universal checkpoint" in text
    got = train_losses(run_dir)
    assert min(got) == 51 and max(got) == 70
    # the loss continues where it was (not from the untrained level), and keeps falling
    assert mean(got[s] for s in range(51, 56)) < 1.5 * mean(ref[s] for s in range(46, 51)) + 0.05
    assert mean(got[s] for s in range(66, 71)) < mean(ref[s] for s in range(46, 51))

    # 1 -> 2 processes
    rc = launch(2, train_args("semantic", run_dir, shards, "zero2"), log)
    text = read_log(log)
    assert rc == 0, text[-4000:]
    assert "world size 1 -> 2, universal checkpoint" in text
    got = train_losses(run_dir)
    assert max(got) == 100
    assert mean(got[s] for s in range(71, 76)) < 1.5 * mean(got[s] for s in range(66, 71)) + 0.05
    assert mean(got[s] for s in range(96, 101)) < unigram_entropy(shards, "semantic") - 0.3


@pytest.mark.parametrize(
    "override, needle",
    [
        ("tokens.acoustic_levels=8", "acoustic tokenizer fingerprint field 'levels' is 4, expected 8"),
        ("fingerprint_hash=deadbeef00", "the config pins fingerprint_hash deadbeef00"),
    ],
)
def test_fingerprint_mismatch_refused(work, shards, override, needle, capsys):
    # launch/train.py's main, in this process: the check runs before any distributed/DeepSpeed work
    from musiclm.train.engine import train_main

    run_dir = str(work / "run_fp")
    rc = train_main(train_args("coarse", run_dir, shards, "zero2", ["--set", override])[1:])
    err = capsys.readouterr().err
    assert rc == 2
    assert "refusing the shards" in err and needle in err, err
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


@slow
def test_resume_on_retokenized_shards_refused(run_a, shards, tmp_path):
    """Shards re-made by other tokenizers (same layout, other weights -> other fingerprint_hash):
    `--resume auto` on the old run refuses with the reason instead of loading the checkpoint."""
    import shutil

    from musiclm.data.shards import fingerprint_hash

    other = str(tmp_path / "shards")
    shutil.copytree(shards, other)
    index_path = os.path.join(other, "index.json")
    index = json.load(open(index_path))
    index["fingerprints"]["semantic"]["weights_sha256"] = "f" * 64  # e.g. a refitted k-means
    old_hash, index["fingerprint_hash"] = index["fingerprint_hash"], fingerprint_hash(index["fingerprints"])
    assert index["fingerprint_hash"] != old_hash
    json.dump(index, open(index_path, "w"))
    run_dir = str(tmp_path / "run")
    shutil.copytree(run_a, run_dir)
    log = str(tmp_path / "resume.log")
    rc = launch(1, train_args("semantic", run_dir, other, "zero2"), log)
    text = read_log(log)
    assert rc != 0, text[-3000:]
    assert "ResumeOnOtherTokens" in text and "Start a new run" in text, text[-3000:]
    assert index["fingerprint_hash"] in text


@slow
def test_no_shared_memory_left_behind(run_a):
    """DeepSpeed's CPU shm all-reduce segments (66 MB per rank) are unlinked by the engine: a
    finished 2-process run leaves nothing in /dev/shm (they used to pile up until RAM ran out)."""
    import glob
    import re

    ports = set(re.findall(r"--master_port[= ](\d+)", read_log(run_a + ".log")))
    assert ports
    for port in ports:
        assert glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*") == []


@slow
def test_metrics_cover_every_step(run_a):
    recs = metrics(run_a)
    perf = [r for r in recs if "perf/tokens_per_s" in r]
    assert [r["step"] for r in perf] == list(range(10, 101, 10))
    assert all(r["perf/samples_per_s"] > 0 and r["perf/peak_memory_gb"] > 0 for r in perf)
    assert TINY_CONFIG


# -- fast, in-process ------------------------------------------------------------------------------


def _stream_kwargs(shards, stage="coarse"):
    import yaml

    from musiclm.train.spec import get_train_spec

    cfg = yaml.safe_load(open(TINY_CONFIG))
    cfg["stage"] = stage
    spec = get_train_spec(stage)
    spec.configure(cfg)
    return dict(build_example=spec.build_example, collate=spec.collate, cfg=cfg, batch_size=4, seed=0, shuffle=64)


@pytest.mark.parametrize("workers", [0, 2])
def test_batch_stream_resumes_exactly(shards, workers):
    from musiclm.train import data as tdata

    urls = tdata.shard_urls(shards, "train")
    kw = _stream_kwargs(shards)
    for rank in (0, 1):
        s = tdata.BatchStream(urls, "train", rank=rank, world_size=2, num_workers=workers, **kw)
        ref = [next(s)[0]["tokens"] for _ in range(40)]  # crosses epochs (64 samples per rank)
        s.close()
        s = tdata.BatchStream(urls, "train", rank=rank, world_size=2, num_workers=workers, **kw)
        head = [next(s)[0]["tokens"] for _ in range(17)]
        state = s.state()
        s.close()
        s = tdata.BatchStream(urls, "train", rank=rank, world_size=2, num_workers=workers, position=state, **kw)
        tail = [next(s)[0]["tokens"] for _ in range(23)]
        s.close()
        assert all(torch.equal(a, b) for a, b in zip(head + tail, ref))
    # the two ranks read different samples
    a = tdata.BatchStream(urls, "train", rank=0, world_size=2, prefetch=0, **kw)
    b = tdata.BatchStream(urls, "train", rank=1, world_size=2, prefetch=0, **kw)
    assert not torch.equal(next(a)[0]["tokens"], next(b)[0]["tokens"])


def test_eval_batches_same_count_on_every_rank(shards):
    from musiclm.train import data as tdata

    urls = tdata.shard_urls(shards, "eval")
    kw = _stream_kwargs(shards)
    kw.pop("shuffle")
    for world in (1, 2, 3):
        got = [
            list(tdata.eval_batches(urls, "eval", n_batches=5, rank=r, world_size=world, **kw)) for r in range(world)
        ]
        assert [len(g) for g in got] == [5] * world
    again = list(tdata.eval_batches(urls, "eval", n_batches=5, rank=1, world_size=3, **kw))
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(got[1], again))


def test_split_batches_cover_the_split_once(shards):
    """Whole-split eval: every sample exactly once over the ranks, the same number of forwards on
    every rank, and a batch whose examples were all skipped becomes a stand-in marked not real."""
    from musiclm.data.shards import shard_reader
    from musiclm.train import data as tdata

    urls = tdata.shard_urls(shards, "eval")
    kw = _stream_kwargs(shards)
    kw.pop("shuffle")
    keys = [s["__key__"] for s in shard_reader(urls, "eval", shuffle=0, rank=0, world_size=1, repeat=False)]
    build, base_collate = kw.pop("build_example"), kw.pop("collate")

    def keyed(sample, rng, cfg):  # carry the key through collate
        ex = build(sample, rng, cfg)
        ex["key"] = sample["__key__"]
        return ex

    def collate(exs):
        out = base_collate([{k: v for k, v in e.items() if k != "key"} for e in exs])
        out["keys"] = [e["key"] for e in exs]
        return out

    kw.update(build_example=keyed, collate=collate)
    for world in (1, 2, 3):
        got = [list(tdata.split_batches(urls, "eval", rank=r, world_size=world, **kw)) for r in range(world)]
        assert len({len(g) for g in got}) == 1  # same number of forwards everywhere
        seen = [k for g in got for b, real in g if real for k in b["keys"]]
        assert sorted(seen) == sorted(keys)  # each sample exactly once
    # max_samples caps the pass
    capped = list(tdata.split_batches(urls, "eval", rank=0, world_size=1, max_samples=6, **kw))
    assert [k for b, _ in capped for k in b["keys"]] == keys[:6]
    # a batch that loses every example -> stand-in, not real; the other batches stay real
    drop = set(keys[4:8])
    kw["build_example"] = lambda s, rng, cfg: None if s["__key__"] in drop else keyed(s, rng, cfg)
    got = list(tdata.split_batches(urls, "eval", rank=0, world_size=1, **kw))
    flags = [real for _, real in got]
    assert flags[1] is False and all(flags[:1] + flags[2:])
    assert sorted(k for b, real in got if real for k in b["keys"]) == sorted(set(keys) - drop)


def test_checkpoint_completeness_and_atomic_latest(tmp_path):
    from musiclm.train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    for step, complete in ((10, True), (20, True), (30, False)):
        d = root / ckpt.tag_for_step(step)
        (d / "model").mkdir(parents=True)
        if complete:
            (d / ckpt.STATE_FILE).write_text(
                json.dumps({"complete": True, "step": step, "world_size": 2, "engines": ["model"]})
            )
            ckpt.write_manifest(str(d))
    (root / ".partial-step_00000040" / "model").mkdir(parents=True)
    assert ckpt.newest_checkpoint(str(root)) == "step_00000020"
    plan = ckpt.plan_resume(str(root), "auto", world_size=1)
    assert plan.step == 20 and plan.universal
    assert ckpt.plan_resume(str(root), "auto", world_size=2).universal is False
    with pytest.raises(FileNotFoundError):
        ckpt.plan_resume(str(root), "step_00000030", world_size=2)
    assert ckpt.remove_partials(str(root)) == [".partial-step_00000040"]
    ckpt.write_atomic(str(root / "latest"), "step_00000020\n")
    assert (root / "latest").read_text() == "step_00000020\n"
    assert not [p for p in os.listdir(root) if p.endswith(".tmp")]


def test_config_overrides_and_schedule():
    from musiclm.config import apply_overrides, load_config
    from musiclm.train.engine import WarmupCosine, load_ds_config

    cfg = load_config(
        os.path.join(os.path.dirname(TINY_CONFIG), "coarse.yaml"),
        ["train.max_steps=7", "deepspeed.zero_optimization.stage=3"],
    )
    assert cfg["stage"] == "coarse" and cfg["model"]["preset"] == "tiny" and cfg["train"]["max_steps"] == 7
    ds = load_ds_config(os.path.join(DS_CONFIGS, "zero2.json"), cfg)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["bf16"]["enabled"] in (True, False)  # "auto" resolved
    assert apply_overrides({}, ["a.b=[1, 2]"]) == {"a": {"b": [1, 2]}}
    # the command line: repeated --set flags all apply (a `make demo` run passes several)
    from musiclm.train.engine import build_arg_parser

    args = build_arg_parser().parse_args(["--config", "c.yaml", "--set", "a=1", "b.c=2", "--set", "d=x"])
    assert apply_overrides({}, args.set) == {"a": 1, "b": {"c": 2}, "d": "x"}
    f = WarmupCosine(10, 110, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(110) == pytest.approx(0.1)
    assert f(60) == pytest.approx(0.55)


# ----------------------------------------------------------------------------- two engines (toy GAN)

TOY_SPEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_gan_spec.py")


def _toy_config(work, shards) -> str:
    import yaml

    cfg = {
        "name": "toy",
        "stage": "toy_gan",
        "seed": 0,
        "imports": [TOY_SPEC],
        "data": {"shards": shards, "shuffle": 32, "prefetch": 2},
        "toy": {"dim": 8, "d_lr_scale": 2.0},
        "train": {
            "max_steps": 12,
            "warmup_steps": 2,
            "log_every": 1,
            "eval_every": 6,
            "eval_batches": 1,
            "checkpoint_every": 6,
        },
        "deepspeed": {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.5, 0.9]}},
            "zero_optimization": {"stage": 2},
        },
    }
    path = str(work / "toy.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


@slow
def test_two_engine_spec_trains_checkpoints_and_resumes(work, shards):
    """A generator and a discriminator (tests/toy_gan_spec.py, loaded through ``imports:``) as two
    DeepSpeed engines in the one loop, 2 processes: each engine gets its own schedule and grad-norm
    logging, both are checkpointed, and a run stopped at step 6 and resumed reproduces the
    uninterrupted losses of both engines."""
    config = _toy_config(work, shards)
    ds = os.path.join(DS_CONFIGS, "cpu.json")
    full, part = str(work / "toy_full"), str(work / "toy_part")

    def args(run_dir, extra=()):
        return ["launch/train.py", "--config", config, "--deepspeed_config", ds, "--run_dir", run_dir, *extra]

    assert launch(2, args(full), full + ".log") == 0, read_log(full + ".log")[-4000:]
    assert launch(2, args(part, ["--stop_after", "6"]), part + ".log") == 0, read_log(part + ".log")[-4000:]
    assert max(train_losses(part)) == 6
    assert launch(2, args(part), part + ".resume.log") == 0, read_log(part + ".resume.log")[-4000:]
    assert "resumed from" in read_log(part + ".resume.log")

    recs_full = {r["step"]: r for r in metrics(full) if "train/loss" in r}
    recs_part = {r["step"]: r for r in metrics(part) if "train/loss" in r}
    assert sorted(recs_full) == list(range(1, 13)) and sorted(recs_part) == list(range(1, 13))
    for step in range(1, 13):
        for key in ("train/loss", "train/d_loss", "train/grad_norm", "train/grad_norm/disc", "train/lr/disc"):
            assert recs_part[step][key] == pytest.approx(recs_full[step][key], rel=1e-5, abs=1e-7), (step, key)
    # the discriminator's schedule is its own (its lr is 2x the generator's, same warmup + cosine)
    for step in (1, 2, 7):
        assert recs_full[step]["train/lr/disc"] == pytest.approx(2 * recs_full[step]["train/lr"], rel=1e-6)
    assert recs_full[3]["train/lr"] > recs_full[12]["train/lr"]
    # both engines are in every checkpoint; eval went through the spec's eval_step
    tag = os.path.join(part, "checkpoints", "step_00000012")
    assert os.path.isdir(os.path.join(tag, "model")) and os.path.isdir(os.path.join(tag, "disc"))
    ev = [r for r in metrics(full) if "eval/loss" in r]
    assert [r["step"] for r in ev] == [6, 12] and all("eval/fake_std" in r for r in ev)
    assert "train/d_accuracy" in recs_full[12]


def test_config_typos_and_bad_values_are_refused(tmp_path):
    """Unknown keys and bad values stop a run before any work, naming the file, the key and the
    closest valid name."""
    import yaml

    from musiclm.config import ConfigError
    from musiclm.train.engine import Trainer

    base = yaml.safe_load(open(TINY_CONFIG))
    base["stage"] = "semantic"

    def refused(cfg, ds=None) -> str:
        with pytest.raises(ConfigError) as e:
            Trainer(
                "semantic",
                cfg,
                ds or os.path.join(DS_CONFIGS, "cpu.json"),
                run_dir=str(tmp_path / "r"),
                config_path="tiny.yaml",
            )
        return str(e.value)

    msg = refused({**base, "trian": {"max_steps": 3}})
    assert "tiny.yaml" in msg and "'trian'" in msg and "did you mean 'train'" in msg
    msg = refused({**base, "train": {**base["train"], "chekpoint_every": 5}})
    assert "tiny.yaml: train" in msg and "did you mean 'checkpoint_every'" in msg
    msg = refused({**base, "train": {**base["train"], "warmup_steps": "ten"}})
    assert "train.warmup_steps" in msg and "expected an integer" in msg and "'ten'" in msg
    msg = refused({**base, "train": {**base["train"], "max_steps": 0}})
    assert "train.max_steps" in msg and ">= 1" in msg
    msg = refused({**base, "deepspeed": {"optimizer": {"type": "AdamW", "params": {"lr": -3e-3}}}})
    assert "optimizer.params.lr must be > 0" in msg
    msg = refused({**base, "deepspeed": {"train_micro_batch_size_per_gpu": 0}})
    assert "train_micro_batch_size_per_gpu" in msg
    msg = refused({**base, "data": {**base["data"], "shufle": 10}})
    assert "did you mean 'shuffle'" in msg


@slow
def test_config_typo_on_the_command_line_stops_the_launcher(tmp_path, shards):
    run_dir = str(tmp_path / "typo")
    rc = launch(1, train_args("semantic", run_dir, shards, "cpu", ["--set", "train.max_stpes=3"]), run_dir + ".log")
    text = read_log(run_dir + ".log")
    assert rc != 0 and "unknown key 'max_stpes'" in text and "did you mean 'max_steps'" in text, text[-3000:]
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


@slow
def test_budget_counts_training_time_and_nothing_is_compiled(tmp_path, shards):
    """train.max_minutes is training time from the first step (start-up, seconds here, is logged
    apart), and a CPU run JIT-compiles nothing (the suite's TORCH_EXTENSIONS_DIR stays empty)."""
    from train_utils import compiled_ops

    run_dir = str(tmp_path / "budget")
    extra = [
        "--set",
        "train.max_minutes=0.1",
        "train.max_steps=100000",
        "train.eval_every=0",
        "train.checkpoint_every=0",
    ]
    rc = launch(1, train_args("semantic", run_dir, shards, "cpu", extra), run_dir + ".log")
    text = read_log(run_dir + ".log")
    assert rc == 0, text[-3000:]
    assert "stopped: max_minutes" in text
    recs = metrics(run_dir)
    startup = next(r for r in recs if "startup/process_to_first_step_s" in r)
    steps = [r for r in recs if "train/loss" in r]
    # 6 s of training: far more than the one step a budget counted from process start allowed
    assert len(steps) >= 20, len(steps)
    assert steps[-1]["time"] - steps[0]["time"] == pytest.approx(6.0, abs=3.0)
    assert startup["startup/process_to_first_step_s"] > 0 and "startup/deepspeed_initialize_s" in startup
    info = json.load(open(os.path.join(run_dir, "startup.json")))
    assert info["first_step_end_unix"] > info["process_start_unix"]
    assert "Building extension" not in text and compiled_ops() == [], compiled_ops()
    assert "optimizer DeepSpeedZeroOptimizer(AdamW)" in text
