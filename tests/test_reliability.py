"""Training trusts nothing it reads (issue 16): checkpoints, disk full, the Ray head, manifests.

- checkpoints carry a sha256 manifest written last; ``--resume auto`` skips one that does not
  match (path + reason logged) and resumes the newest that does, with the same losses;
- a crafted pickle with a matching manifest is refused by ``weights_only=True`` loads (DeepSpeed's
  included), not run; the universal (world-size change) path runs under the same rule;
- disk full while saving: a clear error naming the folder, nothing half-written left (real
  launcher on a small tmpfs where mounting one is allowed, a simulated ENOSPC otherwise);
- the test Ray head listens on 127.0.0.1 only;
- ``musiclm manifest check`` exits 1 on unreadable audio; an ``s3://`` manifest without
  credentials or endpoint fails fast with one line.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from train_utils import launch, make_tiny_shards, read_log, train_args, train_losses

slow = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="module")
def shards(work):
    return make_tiny_shards(str(work / "shards"))


def _ck(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def _no_leftovers(run_dir: str) -> list[str]:
    """Half-written things under a run folder: partial checkpoints and temp files."""
    bad = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        for n in dirnames + filenames:
            if n.startswith(".partial-") or n.startswith(".old-") or ".tmp" in n:
                bad.append(os.path.relpath(os.path.join(dirpath, n), run_dir))
    return bad


# -----------------------------------------------------------------------------------------------
# A. checkpoints: manifest, fallback, weights-only loads


def test_manifest_rejects_changes(tmp_path):
    from musiclm.train import checkpoint as ckpt

    root = tmp_path / "checkpoints"
    good, bad = root / "step_00000010", root / "step_00000020"
    for d, step in ((good, 10), (bad, 20)):
        (d / "model").mkdir(parents=True)
        (d / "model" / "states.pt").write_bytes(os.urandom(4096))
        (d / ckpt.STATE_FILE).write_text(
            json.dumps({"complete": True, "step": step, "world_size": 1, "engines": ["model"]})
        )
        ckpt.write_manifest(str(d))
    assert ckpt.verify_checkpoint(str(bad)) is None
    logged = []

    # same size, one byte changed
    data = bytearray((bad / "model" / "states.pt").read_bytes())
    data[100] ^= 1
    (bad / "model" / "states.pt").write_bytes(bytes(data))
    plan = ckpt.plan_resume(str(root), "auto", 1, log=logged.append)
    assert plan.tag == "step_00000010" and plan.step == 10
    assert logged == [
        f"skipping checkpoint {bad}: model/states.pt does not match its sha256 in the manifest "
        "(changed after it was written)"
    ]
    with pytest.raises(ckpt.CheckpointRejected, match="does not match its sha256"):
        ckpt.plan_resume(str(root), "step_00000020", 1)

    # truncated, extra file, missing manifest, a manifest naming a path outside the folder
    (bad / "model" / "states.pt").write_bytes(bytes(data[:10]))
    assert "has 10 bytes, the manifest says 4096 (truncated or changed)" in ckpt.verify_checkpoint(str(bad))
    ckpt.write_manifest(str(bad))
    (bad / "model" / "zero_pp_rank_9_optim_states.pt").write_bytes(b"x")
    assert ckpt.verify_checkpoint(str(bad)) == "model/zero_pp_rank_9_optim_states.pt is not in the manifest"
    os.unlink(bad / "model" / "zero_pp_rank_9_optim_states.pt")
    m = json.loads((bad / ckpt.MANIFEST).read_text())
    m["files"]["../step_00000010/trainer_state.json"] = m["files"].pop(ckpt.STATE_FILE)
    (bad / ckpt.MANIFEST).write_text(json.dumps(m))
    assert "names a path outside the checkpoint" in ckpt.verify_checkpoint(str(bad))
    os.unlink(bad / ckpt.MANIFEST)
    assert ckpt.verify_checkpoint(str(bad)).startswith("no manifest.json")
    # universal folders made after publication are not part of the checkpoint's manifest
    ckpt.write_manifest(str(bad))
    (bad / "model_universal").mkdir()
    (bad / "model_universal" / "x.pt").write_bytes(b"x")
    (bad / "latest_universal").write_text("model_universal")
    assert ckpt.plan_resume(str(root), "auto", 1).tag == "step_00000020"

    # nothing passes: auto refuses instead of silently starting over
    os.unlink(bad / ckpt.MANIFEST)
    os.unlink(good / ckpt.MANIFEST)
    with pytest.raises(ckpt.CheckpointRejected, match="no checkpoint in .* passes its manifest check"):
        ckpt.plan_resume(str(root), "auto", 1, log=logged.append)


def _payload_pickle(path: str, marker: str) -> None:
    """Add an object whose unpickling writes ``marker`` to a DeepSpeed model-states file."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd["payload"] = _Payload(marker)
    torch.save(sd, path)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code from the checkpoint ran')",))


@slow
@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_resume_skips_corrupt_checkpoint_and_refuses_pickles(work, shards, ds):
    """Real launcher, 2 processes: checkpoints at 2 and 4; the newest truncated -> auto resumes from
    2 with the same losses; then a payload with a matching manifest does not run (ZeRO-2 also goes
    through the universal converter at world size 1)."""
    from musiclm.train import checkpoint as ckpt

    stage = "semantic" if ds == "zero2" else "coarse"
    run_dir = str(work / f"resume_{ds}")
    log = run_dir + ".log"
    every = ["--set", "train.checkpoint_every=2"]
    rc = launch(2, train_args(stage, run_dir, shards, ds, ["--stop_after", "4", *every]), log)
    assert rc == 0, read_log(log)[-4000:]
    ref = train_losses(run_dir)
    assert sorted(ref) == [1, 2, 3, 4]
    for step in (2, 4):
        assert ckpt.verify_checkpoint(_ck(run_dir, step)) is None
        assert os.path.isfile(os.path.join(_ck(run_dir, step), "manifest.json"))

    # the newest checkpoint truncated, as by a crash of the storage under it
    victim = sorted(f for f in os.listdir(os.path.join(_ck(run_dir, 4), "model")) if "optim_states" in f)[0]
    with open(os.path.join(_ck(run_dir, 4), "model", victim), "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.truncate(size // 2)
    rc = launch(2, train_args(stage, run_dir, shards, ds, ["--stop_after", "4", *every]), log)
    text = read_log(log)
    assert rc == 0, text[-4000:]
    assert (
        f"skipping checkpoint {_ck(run_dir, 4)}: model/{victim} has {size // 2} bytes, the manifest says "
        f"{size} (truncated or changed)"
    ) in text
    assert f"resumed from {_ck(run_dir, 2)} at step 2" in text
    got = train_losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in (3, 4)] == pytest.approx([ref[s] for s in (3, 4)], rel=1e-5, abs=1e-6)
    assert ckpt.verify_checkpoint(_ck(run_dir, 4)) is None  # re-saved whole
    if ds == "zero3":
        return

    # the universal path (2 -> 1 process) converts under weights-only loads, with its own manifest
    rc = launch(1, train_args(stage, run_dir, shards, ds, ["--stop_after", "6", *every]), log)
    text = read_log(log)
    assert rc == 0, text[-4000:]
    assert "world size 2 -> 1, universal checkpoint" in text
    assert ckpt.verify_checkpoint(os.path.join(_ck(run_dir, 4), "model_universal")) is None
    assert max(train_losses(run_dir)) == 6

    # someone who can write the run folder plants code and rewrites the manifest to match
    marker = str(work / "PAYLOAD_RAN")
    target = os.path.join(_ck(run_dir, 6), "model", "mp_rank_00_model_states.pt")
    _payload_pickle(target, marker)
    ckpt.write_manifest(_ck(run_dir, 6))
    rc = launch(1, train_args(stage, run_dir, shards, ds, ["--stop_after", "8", *every]), log)
    text = read_log(log)
    assert rc != 0
    assert not os.path.exists(marker), "a pickle in a checkpoint ran code on resume"
    assert "Weights only load failed" in text and "Unsupported global: GLOBAL exec" in text, text[-3000:]
    # the payload is live: a plain unpickling would have run it
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, torch; sys.path.insert(0, sys.argv[2]); torch.load(sys.argv[1], weights_only=False)",
            target,
            os.path.dirname(__file__),
        ],
        capture_output=True,
        env={k: v for k, v in os.environ.items() if "WEIGHTS_ONLY" not in k},
    )
    assert os.path.exists(marker)


# -----------------------------------------------------------------------------------------------
# A. disk full while saving


class _WritingEngine:
    """Stand-in for an engine's save (the contract save_checkpoint relies on): writes some bytes,
    then the file system reports it is full."""

    module = torch.nn.Linear(4, 4)

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_simulated_leaves_nothing(tmp_path, monkeypatch):
    from musiclm.train import checkpoint as ckpt
    from musiclm.train import monitor

    root = str(tmp_path / "run" / "checkpoints")
    with pytest.raises(ckpt.DiskFull) as ei:
        ckpt.save_checkpoint({"model": _WritingEngine()}, root, 2, {"world_size": 1}, rank=0, barrier=lambda: None)
    msg = str(ei.value)
    assert msg.startswith(f"no space left on device while writing checkpoint step_00000002 to {root} (file system ")
    assert ei.value.errno == errno.ENOSPC
    assert os.listdir(root) == []

    # torch.save's C++ writer says only "unexpected pos": the disk is judged full while the partial
    # checkpoint still fills it, not after its removal freed the space
    class TorchWriterEngine(_WritingEngine):
        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    partial = os.path.join(root, ".partial-step_00000002")
    monkeypatch.setattr(ckpt, "_free_bytes", lambda path: 4096 if os.path.exists(partial) else 10**12)
    with pytest.raises(ckpt.DiskFull, match="no space left on device while writing checkpoint step_00000002"):
        ckpt.save_checkpoint({"model": TorchWriterEngine()}, root, 2, {"world_size": 1}, rank=0, barrier=lambda: None)
    assert os.listdir(root) == []
    monkeypatch.setattr(ckpt, "_free_bytes", lambda path: 10**12)  # plenty of space: not "disk full"
    with pytest.raises(RuntimeError, match="unexpected pos") as ei:
        ckpt.save_checkpoint({"model": TorchWriterEngine()}, root, 2, {"world_size": 1}, rank=0, barrier=lambda: None)
    assert not isinstance(ei.value, ckpt.DiskFull) and os.listdir(root) == []

    # before writing: the checkpoint will not fit
    monkeypatch.setattr(ckpt, "_free_bytes", lambda path: 10)
    with pytest.raises(
        ckpt.DiskFull, match=r"no space left on device for checkpoint step_00000002 in .*nothing was written"
    ):
        ckpt.save_checkpoint({"model": _WritingEngine()}, root, 2, {"world_size": 1}, rank=0, barrier=lambda: None)
    assert os.listdir(root) == []

    # the loss plot: no 0-byte temp file when its write fails
    mpath = tmp_path / "run" / "metrics.jsonl"
    mpath.write_text("".join(json.dumps({"step": s, "train/loss": 1.0 / s}) + "\n" for s in range(1, 5)))
    import matplotlib.figure

    def full(self, fname, **kw):
        open(fname, "wb").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    with pytest.raises(OSError):
        monitor.plot_losses(str(mpath), str(tmp_path / "run" / "loss.png"))
    assert _no_leftovers(str(tmp_path / "run")) == []


@pytest.fixture
def small_disk(tmp_path):
    """A small tmpfs: a real file system that fills up (ENOSPC from the kernel, not a mock).

    Mounting needs root. `.ci/run` sets MUSICLM_REQUIRE_TMPFS=1 (CI runs as root), and then a tmpfs
    that cannot be mounted fails the test instead of skipping it, so CI never passes without these
    tests having run. A hand run without root skips them, saying why."""
    mounted = []
    required = os.environ.get("MUSICLM_REQUIRE_TMPFS") == "1"
    give_up = pytest.fail if required else pytest.skip

    def make(size_kb: int) -> str:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        if os.geteuid() != 0 or not shutil.which("mount"):
            give_up("mounting a tmpfs needs root (MUSICLM_REQUIRE_TMPFS=1 makes this a failure)")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            give_up(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(str(d))
        return str(d)

    yield make
    for d in mounted:
        if subprocess.run(["umount", d], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", d], capture_output=True)


@slow
def test_disk_full_during_save_real_launcher(small_disk, shards):
    """1 process (no other rank to race its cleanup): the first checkpoint (~1.7 MiB) passes the
    lower-bound check on a 1.3 MiB tmpfs and fills it mid-write."""
    disk = small_disk(1300)
    run_dir = os.path.join(disk, "run")
    log = disk + ".log"
    rc = launch(1, train_args("semantic", run_dir, shards, "zero2", ["--stop_after", "2"]), log)
    text = read_log(log)
    assert rc != 0
    ck = os.path.join(run_dir, "checkpoints")
    assert (
        f"DiskFull: no space left on device while writing checkpoint step_00000002 to {ck} (file system {disk}, "
    ) in text, text[-4000:]
    assert os.listdir(ck) == []
    assert _no_leftovers(run_dir) == []


@slow
def test_disk_full_before_save_every_rank_agrees(small_disk, shards):
    """2 processes, a 3 MiB tmpfs: the step-2 checkpoint fits, the step-4 one (same size) does not:
    every rank refuses before writing, step 2 stays intact."""
    from musiclm.train import checkpoint as ckpt

    disk = small_disk(3072)
    run_dir = os.path.join(disk, "run")
    log = disk + ".log"
    rc = launch(
        2,
        train_args("semantic", run_dir, shards, "zero2", ["--stop_after", "4", "--set", "train.checkpoint_every=2"]),
        log,
    )
    text = read_log(log)
    assert rc != 0
    ck = os.path.join(run_dir, "checkpoints")
    line = (
        f"DiskFull: no space left on device for checkpoint step_00000004 in {ck} (file system {disk}): it needs about"
    )
    assert text.count(line) >= 1, text[-4000:]
    assert "nothing was written, earlier checkpoints are untouched" in text
    assert sorted(os.listdir(ck)) == ["latest", "step_00000002"]
    assert ckpt.verify_checkpoint(_ck(run_dir, 2)) is None
    assert _no_leftovers(run_dir) == []


# -----------------------------------------------------------------------------------------------
# B. the test Ray head listens on 127.0.0.1 only


@slow
def test_ray_head_listens_on_loopback_only():
    import urllib.request

    import ray_utils

    head = ray_utils.start_head(num_cpus=1)
    try:
        expected = {
            head.gcs_port: "GCS",
            head.dashboard_port: "dashboard",
            head.agent_port: "dashboard agent",
            head.metrics_port: "metrics export",
        }
        deadline = time.time() + 60
        while True:  # the agents come up after the dashboard answers
            pids = set(head.own_pids()) | {head.proc.pid}
            socks = ray_utils.listening_sockets(pids)
            if set(expected) <= {port for _pid, _ip, port in socks} or time.time() > deadline:
                break
            time.sleep(0.5)
        ports = {port for _pid, _ip, port in socks}
        assert set(expected) <= ports, f"not listening: {[expected[p] for p in set(expected) - ports]}; {socks}"
        assert len(socks) >= 6  # GCS, raylet x2, dashboard, agent, metrics, ...
        exposed = [(pid, ip, port) for pid, ip, port in socks if ip != "127.0.0.1"]
        assert not exposed, f"listening beyond 127.0.0.1: {exposed}"
        # the node registered itself under 127.0.0.1 (state API, with the token)
        token = open(head.token_path).read().strip()
        req = urllib.request.Request(head.dashboard_url + "/api/v0/nodes", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            nodes = json.load(r)["data"]["result"]["result"]
        assert [n["node_ip"] for n in nodes] == ["127.0.0.1"], nodes
    finally:
        ray_utils.cleanup(head)


# -----------------------------------------------------------------------------------------------
# C. manifests: unreadable audio fails the check; S3 problems in one line, fast

MUSICLM = os.path.join(os.path.dirname(sys.executable), "musiclm")


def _wav(path, seconds=0.5, sr=16000):
    import numpy as np
    import soundfile as sf

    sf.write(str(path), np.zeros(int(seconds * sr), dtype="float32"), sr)


@pytest.mark.parametrize(
    "bad, reason",
    [
        (b"", "empty file (0 bytes)"),
        (b"id,caption\nnot,audio\n", "unreadable or corrupt audio"),
    ],
)
def test_manifest_check_exits_1_on_unreadable_audio(tmp_path, capsys, bad, reason):
    from musiclm.cli import main

    _wav(tmp_path / "ok.wav")
    (tmp_path / "bad.wav").write_bytes(bad)
    m = tmp_path / "manifest.jsonl"
    # a duration in the manifest does not spare the file from being opened
    m.write_text(
        json.dumps({"id": "ok", "audio": "ok.wav", "caption": "fine"})
        + "\n"
        + json.dumps({"id": "bad", "audio": "bad.wav", "caption": "renamed", "duration": 3.0})
        + "\n"
    )
    assert main(["manifest", "check", str(m)]) == 1
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["ok"] is False and report["unreadable_audio"] == 1 and report["missing_audio"] == 0
    assert report["unreadable"][0]["id"] == "bad" and reason in report["unreadable"][0]["reason"]
    assert err.startswith(
        f"manifest check failed: {m}: 0 missing and 1 unreadable audio files (first unreadable: "
        f"{tmp_path / 'bad.wav'}: {reason}"
    )
    (tmp_path / "bad.wav").unlink()
    _wav(tmp_path / "bad.wav")
    assert main(["manifest", "check", str(m)]) == 0


def _check_s3(url: str, env: dict) -> tuple[int, str, float]:
    t = time.time()
    p = subprocess.run([MUSICLM, "manifest", "check", url], capture_output=True, text=True, env=env, timeout=120)
    return p.returncode, p.stderr, time.time() - t


def _aws_env(**kw) -> dict:
    """This process's environment without any AWS setting (no shared files, no instance metadata)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    env.update(kw)
    return env


def test_s3_manifest_without_credentials_one_line(moto_s3):
    from musiclm.data.manifest import Clip, write_manifest

    url = f"{moto_s3}/corpus/manifest.jsonl"
    write_manifest([Clip(id="a", audio=f"{moto_s3}/corpus/a.wav", caption="c", split="train")], url)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    rc, err, secs = _check_s3(url, _aws_env(AWS_ENDPOINT_URL=endpoint))
    assert rc == 1
    assert err.strip() == (
        f"manifest check failed: {url}: no S3 credentials: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
    )
    assert secs < 20, secs  # interpreter start included; no retries
    # neither credentials nor endpoint: both named
    rc, err, _ = _check_s3(url, _aws_env())
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "no S3 credentials" in err and "AWS_ENDPOINT_URL for an S3-compatible store" in err
    # with them, the same manifest reads (missing audio is the only complaint)
    rc, err, _ = _check_s3(url, dict(os.environ))
    assert rc == 1 and "1 missing and 0 unreadable" in err


def test_s3_manifest_endpoint_unreachable_one_line_fast():
    from train_utils import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    url = "s3://bucket/corpus/manifest.jsonl"
    rc, err, secs = _check_s3(
        url,
        _aws_env(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="fake",
            AWS_SECRET_ACCESS_KEY="fake",
            AWS_DEFAULT_REGION="us-east-1",
        ),
    )
    assert rc == 1
    assert err.strip() == (
        f"manifest check failed: {url}: cannot connect to the endpoint {endpoint}: check that "
        "the server is up and AWS_ENDPOINT_URL is right"
    )
    assert secs < 20, secs
