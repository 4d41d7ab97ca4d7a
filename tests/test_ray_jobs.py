"""Ray jobs end to end: pack_audio, fit_kmeans, fit_quantizer, tokenize.

One private Ray head per module (127.0.0.1, token auth, own ports / temp dir / token file; see
tests/ray_utils.py). Jobs run as `python ray_jobs/X.py` drivers joining that head (RAY_ADDRESS),
through `ray job submit --working-dir .` to its dashboard, and once with no RAY_ADDRESS at all
(the embedded local Ray). Shards go to local folders and to a moto S3 server. The corpus has
corrupt, empty, silent and missing files; a tokenize driver is SIGKILLed midway and rerun.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from musiclm.data import segments as S

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ray_utils, helpers_models
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # ray_jobs.output (parse_summary)

BAD = {"bad": "corrupt", "silent": "silent", "empty": "empty", "missing": "missing"}


# ============================================================================ plain helpers (fast)
def test_time_grid_and_segments():
    assert S.time_grid([75, 25]) == pytest.approx(0.04)
    assert S.time_grid([50]) == pytest.approx(0.02)
    sr = 24000
    b = S.segment_bounds(int(25.03 * sr), sr, 10, grid_seconds=0.04)
    assert b[:2] == [(0, 240000), (240000, 480000)]
    assert (b[2][1] - b[2][0]) % 960 == 0 and b[2][1] <= int(25.03 * sr)
    assert S.segment_bounds(int(0.5 * sr), sr, 10, min_seconds=1.0) == []
    assert S.segment_bounds(int(10.5 * sr), sr, 10, min_seconds=1.0) == [(0, 240000)]
    with pytest.raises(ValueError):
        S.segment_bounds(100, sr, 10.01, grid_seconds=0.04)
    assert S.segment_key("clip_1", 3) == "clip_1__0003"
    assert S.parse_segment_key("a__b__0012") == ("a__b", 12)


def test_plan_groups_deterministic():
    clips = [
        {"id": f"c{i:02d}", "audio": f"/x/{i}.wav", "split": "eval" if i % 4 == 0 else "train"}
        for i in (7, 3, 0, 1, 4, 9, 2, 8, 5, 6)
    ]
    groups, errors = S.plan_groups(clips, 3)
    again, _ = S.plan_groups(list(reversed(clips)), 3)
    assert (
        [g.name for g in groups]
        == [g.name for g in again]
        == ["eval-000000", "train-000000", "train-000001", "train-000002"]
    )
    assert [[c["id"] for c in g.clips] for g in groups] == [[c["id"] for c in g.clips] for g in again]
    assert groups[1].clips[0]["id"] == "c01" and not errors
    dup, errs = S.plan_groups(clips + [dict(clips[0])], 3)
    assert len(errs) == 1 and errs[0]["reason"] == "duplicate"
    assert S.sample_clips(clips, 4, seed=1) == S.sample_clips(list(reversed(clips)), 4, seed=1)
    assert S.Group.from_json(groups[2].to_json()) == groups[2]


# ============================================================================ fixtures
def _write_corpus(root: Path, n_good: int, seed: int = 0) -> Path:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n_good):
        sr = (16000, 24000, 22050)[i % 3]
        sec = (2.3, 3.5, 5.2, 1.4)[i % 4]
        t = np.arange(int(sec * sr)) / sr
        x = 0.3 * np.sin(2 * np.pi * (110 * 2 ** (i / 7)) * t) + 0.02 * rng.standard_normal(len(t))
        stereo = np.stack([x, 0.5 * x], 1) if i % 2 else x
        sf.write(root / "audio" / f"c{i:03d}.{'flac' if i % 3 == 1 else 'wav'}", stereo.astype(np.float32), sr)
        lines.append(
            {
                "id": f"c{i:03d}",
                "audio": f"audio/c{i:03d}.{'flac' if i % 3 == 1 else 'wav'}",
                "caption": f"test clip {i}",
                "bpm": 80 + i,
            }
        )
    (root / "audio" / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" * 20)
    sf.write(root / "audio" / "silent.wav", np.zeros(24000 * 2, np.float32), 24000)
    (root / "audio" / "empty.wav").write_bytes(b"")
    for cid in BAD:
        lines.append({"id": cid, "audio": f"audio/{cid if cid != 'missing' else 'not_there'}.wav", "caption": "x"})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return manifest


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny models, two tokenizer configs, a corpus, and a private Ray head."""
    import ray_utils
    import yaml
    from helpers_models import make_tiny_tokenizer_config

    root = tmp_path_factory.mktemp("rayjobs")
    tok = make_tiny_tokenizer_config(root / "models")
    cfg = {"segment_seconds": 2.0, "min_segment_seconds": 1.0, "tokenizers": tok}
    (root / "tok.yaml").write_text(yaml.safe_dump(cfg))
    other = json.loads(json.dumps(cfg))
    other["tokenizers"]["acoustic"]["bandwidth"] = 3.0  # 4 levels instead of 8: other tokenizers
    (root / "tok_other.yaml").write_text(yaml.safe_dump(other))
    manifest = _write_corpus(root / "corpus", n_good=8)
    head = ray_utils.start_head(num_cpus=2)
    try:
        yield {
            "root": root,
            "manifest": str(manifest),
            "config": str(root / "tok.yaml"),
            "other_config": str(root / "tok_other.yaml"),
            "head": head,
            "tok": tok,
        }
    finally:
        ray_utils.cleanup(head)


def _driver(
    env, script: str, *args: str, use_head: bool = True, extra_env: dict | None = None, timeout: float = 240
) -> dict:
    """`python ray_jobs/<script> ...` as a driver of the module's head (or a local Ray); returns the summary."""
    from ray_jobs.output import parse_summary

    e = env["head"].env() if use_head else _local_env(env)
    e.update(extra_env or {})
    proc = subprocess.run(
        [sys.executable, f"ray_jobs/{script}", *args], cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = parse_summary(proc.stdout)
    assert summary is not None, out[-3000:]
    return summary


def _local_env(env) -> dict:
    import ray_utils

    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    e.update(ray_utils.token_env(env["head"].token_path))  # our token file: nothing written to ~/.ray
    e["RAY_USAGE_STATS_ENABLED"] = "0"
    return e


def _submit(env, script: str, *args: str, extra_env: dict | None = None) -> dict:
    import ray_utils

    from ray_jobs.output import parse_summary

    proc = ray_utils.job_submit(env["head"], [f"ray_jobs/{script}", *args], timeout=300, env_vars=extra_env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out
    summary = parse_summary(proc.stdout)
    assert summary is not None, out[-3000:]
    return summary


def _read_shards(directory: str) -> list[tuple[str, dict, set[str]]]:
    """(key, json, entry names) of every sample of every listed shard."""
    from musiclm.data import storage
    from musiclm.data.shards import list_shards

    out = []
    for url in list_shards(directory):
        with storage.open_file(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            samples: dict[str, dict] = {}
            for m in tar:
                key, _, entry = m.name.partition(".")
                d = samples.setdefault(key, {"entries": set()})
                d["entries"].add(entry)
                if entry == "json":
                    d["json"] = json.loads(tar.extractfile(m).read())
            out += [(k, v["json"], v["entries"]) for k, v in samples.items()]
    return out


def _check_exactly_once(
    directory: str, manifest: str, kind: str, bad: dict | None = None
) -> list[tuple[str, dict, set[str]]]:
    """Every manifest clip is in the shards or in errors.jsonl, never both; keys unique; verify() passes."""
    from musiclm.data import storage
    from musiclm.data.manifest import read_manifest
    from musiclm.data.shards import verify

    samples = _read_shards(directory)
    keys = [k for k, _, _ in samples]
    assert len(keys) == len(set(keys)), "duplicate sample keys"
    ok = {j["clip_id"] for _, j, _ in samples}
    errors = [
        json.loads(line) for line in storage.read_bytes(storage.join(directory, "errors.jsonl")).decode().splitlines()
    ]
    failed = [e["clip_id"] for e in errors]
    assert len(failed) == len(set(failed))
    assert {e["clip_id"]: e["reason"] for e in errors} == (BAD if bad is None else bad)
    assert not ok & set(failed)
    assert ok | set(failed) == {c.id for c in read_manifest(manifest)}
    for cid in ok:  # a clip's segments are 0..n-1, consecutive, in one split
        segs = sorted(j["segment"] for _, j, _ in samples if j["clip_id"] == cid)
        assert segs == list(range(len(segs)))
        assert len({j["split"] for _, j, _ in samples if j["clip_id"] == cid}) == 1
    report = verify(directory)
    assert report["ok"] and report["samples"] == len(samples) and report["kind"] == kind
    return samples


# ============================================================================ jobs
@pytest.mark.slow
def test_pack_audio_job_submit_s3_to_s3(env, moto_s3, moto_server):
    """Manifest and audio read from S3, audio shards written to S3, through `ray job submit`."""
    from musiclm.data import storage
    from musiclm.data.shards import read_index

    corpus = Path(env["manifest"]).parent
    for path in corpus.rglob("*"):
        if path.is_file():
            storage.write_bytes_atomic(f"{moto_s3}/corpus/{path.relative_to(corpus).as_posix()}", path.read_bytes())
    out = f"{moto_s3}/shards"
    summary = _submit(
        env,
        "pack_audio.py",
        "--manifest",
        f"{moto_s3}/corpus/manifest.jsonl",
        "--out",
        out,
        "--dataset",
        "toy",
        "--clips-per-shard",
        "3",
        "--segment-seconds",
        "2",
        extra_env=moto_server.env(),
    )
    directory = f"{out}/toy/audio"
    assert summary["out_dir"] == directory and summary["clips_ok"] == 8 and summary["clips_failed"] == 4
    assert summary["failed_by_reason"] == {"corrupt": 1, "empty": 1, "missing": 1, "silent": 1}
    samples = _check_exactly_once(directory, env["manifest"], "audio")
    assert all(entries == {"flac", "json"} for _, _, entries in samples)
    assert all(j["source"].startswith(f"{moto_s3}/corpus/audio/") for _, j, _ in samples)
    assert all(j["sample_rate"] == 24000 and j["end"] - j["start"] <= 2.0 + 1e-6 for _, j, _ in samples)
    index = read_index(directory)
    assert index["clips_failed"] == 4 and index["hours"] > 0 and index["samples"] == summary["segments"]


@pytest.mark.slow
def test_fit_kmeans_and_quantizer(env, tmp_path):
    from musiclm.quantize import MuLaNEmbedQuantizer
    from musiclm.semantic import load_centroids

    km = _driver(
        env,
        "fit_kmeans.py",
        "--manifest",
        env["manifest"],
        "--config",
        env["config"],
        "--out",
        str(tmp_path / "km.safetensors"),
        "--clusters",
        "12",
        "--workers",
        "1",
    )
    c = load_centroids(tmp_path / "km.safetensors")
    assert c.shape == (12, km["dim"]) and km["clips_ok"] == 8 and km["clips_failed"] == 4 and km["frames"] > 12
    assert (tmp_path / "km.errors.jsonl").read_text().count("\n") == 4
    # codebook_size: auto sizes the codebooks to the handful of embeddings (the minimum, 16)
    import yaml

    cfg = yaml.safe_load(open(env["config"]))
    cfg["tokenizers"]["quantizer"] = {"path": str(tmp_path / "quant"), "preset": "default", "codebook_size": "auto"}
    (tmp_path / "tok_auto.yaml").write_text(yaml.safe_dump(cfg))
    q = _driver(
        env,
        "fit_quantizer.py",
        "--manifest",
        env["manifest"],
        "--config",
        str(tmp_path / "tok_auto.yaml"),
        "--workers",
        "1",
    )
    quant = MuLaNEmbedQuantizer.load(str(tmp_path / "quant"))
    assert q["embeddings"] == q["segments"] > 8 and q["dim"] == quant.dim
    assert q["codebook_size"] == quant.codebook_size == 16 and q["levels"] == quant.levels == 8
    assert q["reconstruction_cosine"]["mean"] > 0.9


@pytest.mark.slow
def test_tokenize_job_submit_to_s3(env, moto_s3, moto_server):
    from musiclm.data.shards import check_fingerprints, read_index, shard_reader
    from musiclm.tokenizers import build_tokenizers

    out = f"{moto_s3}/shards"
    summary = _submit(
        env,
        "tokenize.py",
        "--manifest",
        env["manifest"],
        "--out",
        out,
        "--dataset",
        "toy",
        "--config",
        env["config"],
        "--clips-per-shard",
        "4",
        "--workers",
        "1",
        extra_env=moto_server.env(),
    )
    fps = build_tokenizers(env["tok"]).fingerprints()
    assert summary["out_dir"].startswith(f"{out}/toy/tokens-")
    assert summary["clips_ok"] == 8 and summary["clips_failed"] == 4 and summary["audio_seconds_per_s"] > 0
    samples = _check_exactly_once(summary["out_dir"], env["manifest"], "tokens")
    assert all(e == {"acoustic.npy", "semantic.npy", "mulan.npy", "cond.npy", "json"} for _, _, e in samples)
    index = read_index(summary["out_dir"])
    check_fingerprints(index, fps)
    assert index["clips_ok"] == 8
    n = 0
    for split in index["splits"]:
        for s in shard_reader(summary["out_dir"], split, shuffle=0):
            a, sem = s["acoustic.npy"], s["semantic.npy"]
            assert a.dtype == np.int16 and a.shape[0] == 8 and a.shape[1] == 3 * sem.shape[0]  # 75 Hz vs 25 Hz
            assert s["mulan.npy"].dtype == np.float16 and s["cond.npy"].dtype == np.int16
            n += 1
    assert n == len(samples)


def _kill_tokenize_midway(env, args: list[str], out: str) -> tuple[str, int]:
    """Start `python <args>` (a tokenize driver of the module's head, each group slowed down by
    1 s), SIGKILL it once at least 2 groups are recorded. Returns (shard folder, groups recorded)."""
    from musiclm.testing import GROUP_DELAY_ENV

    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env={**env["head"].env(), GROUP_DELAY_ENV: "1.0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    groups_dir = None
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            found = list(Path(out).glob("toy/tokens-*/_groups"))
            if found:
                groups_dir = found[0]
                if len([p for p in groups_dir.glob("*.json") if p.name != "plan.json"]) >= 2:
                    break
            time.sleep(0.2)
        assert proc.poll() is None, "job finished before it could be killed:\n" + proc.stdout.read()[-3000:]
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
    done_before = len([p for p in groups_dir.glob("*.json") if p.name != "plan.json"])
    assert 2 <= done_before < 12 and not (groups_dir.parent / "index.json").exists()
    return str(groups_dir.parent), done_before


@pytest.mark.slow
def test_tokenize_kill_resume_and_new_tokenizers(env, tmp_path):
    from musiclm.data import storage
    from musiclm.data.shards import read_index

    out = str(tmp_path / "shards")
    args = [
        "ray_jobs/tokenize.py",
        "--manifest",
        env["manifest"],
        "--out",
        out,
        "--dataset",
        "toy",
        "--config",
        env["config"],
        "--clips-per-shard",
        "1",
        "--workers",
        "1",
        "--pipeline",
        "split",
    ]
    directory, done_before = _kill_tokenize_midway(env, args, out)

    summary = _driver(env, "tokenize.py", *args[1:])  # same arguments: resume
    assert summary["out_dir"] == directory
    assert summary["groups"] == 12 and summary["groups_this_run"] <= 12 - done_before + 1
    _check_exactly_once(directory, env["manifest"], "tokens")
    assert summary["clips_ok"] == 8 and summary["clips_failed"] == 4

    # while another job holds the folder (its lock, taken here as a concurrent job would), a job with
    # the same plan into the same folder refuses at once, naming the holder, instead of redoing groups
    from ray_jobs.plan import JobLock

    holder = JobLock(directory).acquire()
    try:
        second = subprocess.run(
            [sys.executable, *args], cwd=REPO, env=env["head"].env(), capture_output=True, text=True, timeout=180
        )
    finally:
        holder.release()
    assert second.returncode != 0, second.stderr[-2000:]
    assert f"is being written by another job (pid {os.getpid()} on" in second.stderr, second.stderr[-2000:]

    again = _driver(env, "tokenize.py", *args[1:])  # nothing left to do (and the lock is free again)
    assert again["groups_this_run"] == 0 and again["clips_ok"] == 8

    # --retry-failed: the groups with failed clips run again; the missing file now exists.
    missing = Path(env["manifest"]).parent / "audio" / "not_there.wav"
    shutil.copy(Path(env["manifest"]).parent / "audio" / "c000.wav", missing)
    try:
        retry = _driver(env, "tokenize.py", *args[1:], "--retry-failed")
    finally:
        missing.unlink()
    assert retry["groups_this_run"] == 4 and retry["clips_ok"] == 9 and retry["clips_failed"] == 3
    _check_exactly_once(directory, env["manifest"], "tokens", bad={k: v for k, v in BAD.items() if k != "missing"})

    # Same folder, another plan (clips per shard): refused before any work.
    proc = subprocess.run(
        [sys.executable, *args, "--clips-per-shard", "2"],
        cwd=REPO,
        env=env["head"].env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "different plan" in proc.stdout + proc.stderr

    # Different tokenizers -> a new folder, the first one untouched. No RAY_ADDRESS: this run
    # starts its own local Ray (the embedded default).
    before = sorted(storage.listdir(directory))
    other = _driver(
        env,
        "tokenize.py",
        *[a if a != env["config"] else env["other_config"] for a in args[1:]],
        "--clips-per-shard",
        "6",
        use_head=False,
    )
    assert other["ray"] == "local"
    assert other["out_dir"] != directory and other["out_dir"].startswith(str(Path(out) / "toy" / "tokens-"))
    assert sorted(storage.listdir(directory)) == before
    assert read_index(other["out_dir"])["fingerprints"]["acoustic"]["levels"] == 4
    samples = _check_exactly_once(other["out_dir"], env["manifest"], "tokens")
    assert len(samples) == summary["segments"]


@pytest.mark.slow
def test_tokenize_fused_kill_resume(env, tmp_path):
    """The fused pipeline (decode, tokenize and write a group in one actor call; what `auto` picks
    on this CPU-only head), two actors: SIGKILLed midway and rerun, every clip ends up exactly
    once, in a shard or in errors.jsonl, and the shards equal the split pipeline's."""
    out = str(tmp_path / "shards")
    args = [
        "ray_jobs/tokenize.py",
        "--manifest",
        env["manifest"],
        "--out",
        out,
        "--dataset",
        "toy",
        "--config",
        env["config"],
        "--clips-per-shard",
        "1",
        "--workers",
        "2",
    ]
    directory, done_before = _kill_tokenize_midway(env, args, out)

    summary = _driver(env, "tokenize.py", *args[1:])  # same arguments: resume
    assert summary["pipeline"] == "fused" and summary["workers"] == 2
    assert summary["out_dir"] == directory
    assert summary["groups"] == 12 and summary["groups_this_run"] <= 12 - done_before + 2  # two actors
    fused = _check_exactly_once(directory, env["manifest"], "tokens")
    assert summary["clips_ok"] == 8 and summary["clips_failed"] == 4

    split = _driver(env, "tokenize.py", *args[1:], "--out", str(tmp_path / "split"), "--pipeline", "split")
    assert split["pipeline"] == "split" and split["segments"] == summary["segments"]
    assert sorted((k, json.dumps(j, sort_keys=True)) for k, j, _ in fused) == sorted(
        (k, json.dumps(j, sort_keys=True))
        for k, j, _ in _check_exactly_once(split["out_dir"], env["manifest"], "tokens")
    )


def test_text_sourced_conditioning_jobs(env, tmp_path):
    """quantizer.source: text end to end: fit_quantizer fits on the captions' MuLaN text embeddings
    and tokenize.py writes cond.npy = quantized caption embedding (mulan.npy: still the audio's), in
    a folder of its own (the source is part of the fingerprint)."""
    import torch
    import yaml

    from musiclm.data import storage
    from musiclm.data.shards import shard_reader
    from musiclm.tokenizers import build_tokenizers

    cfg = yaml.safe_load(open(env["config"]))
    cfg["tokenizers"]["quantizer"] = {"path": str(tmp_path / "quant_text"), "codebook_size": "auto", "source": "text"}
    config = str(tmp_path / "tok_text.yaml")
    (tmp_path / "tok_text.yaml").write_text(yaml.safe_dump(cfg))
    fit = _driver(env, "fit_quantizer.py", "--manifest", env["manifest"], "--config", config, "--workers", "1")
    assert fit["source"] == "text" and fit["embeddings"] == fit["segments"] > 8
    out = str(tmp_path / "shards")
    summary = _driver(
        env, "tokenize.py", "--manifest", env["manifest"], "--out", out, "--dataset", "toy", "--config", config
    )
    assert summary["clips_ok"] == 8
    bundle = build_tokenizers(cfg["tokenizers"])
    samples = list(shard_reader(summary["out_dir"], "train", shuffle=0, rank=0, world_size=1))
    samples += list(shard_reader(summary["out_dir"], "eval", shuffle=0, rank=0, world_size=1))
    assert len(samples) == summary["segments"]
    with torch.inference_mode():
        text = bundle.embedder.embed_text([s["json"]["caption"] for s in samples]).float().to(torch.float16).float()
    got, want = np.stack([s["cond.npy"] for s in samples]), bundle.quantizer.encode(text).numpy()
    audio = bundle.quantizer.encode(torch.as_tensor(np.stack([s["mulan.npy"] for s in samples])).float()).numpy()
    # batched text embeddings differ from these in the last bits, which can flip a near-tied code
    assert (got == want).mean() > 0.95 and (got == want).all(axis=(1, 2)).mean() >= 0.75
    assert (got == audio).mean() < 0.9  # not the audio embedding's tokens
    index = json.loads(storage.read_bytes(storage.join(summary["out_dir"], "index.json")))
    assert index["fingerprints"]["quantizer"]["source"] == "text"


def test_disk_full_names_the_output_folder():
    """A write that fails with ENOSPC inside a Ray task reaches the driver wrapped (RayTaskError
    keeps the text): the job's last line names the folder that ran out of space."""
    import errno

    from ray_jobs.job import _disk_full

    inner = OSError(errno.ENOSPC, "No space left on device", "/data/shards/x/train-000003.tar")
    try:
        try:
            raise inner
        except OSError as e:
            raise RuntimeError("ray::write_group() (pid=1, ip=127.0.0.1)") from e
    except RuntimeError as wrapped:
        assert "No space left on device" in _disk_full(wrapped)
    assert _disk_full(RuntimeError("ray task failed: [Errno 28] No space left on device")) is not None
    assert _disk_full(ValueError("corrupt audio")) is None
