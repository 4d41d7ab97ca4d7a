"""The whole pipeline on a cluster, as one recipe: launch/pipeline.sh end to end on tiny configs.

Everything a user with a cluster has, on this machine: a moto S3 server holding the corpus and every
output (audio shards, tokenizer models, token shards, the package), a private 127.0.0.1 Ray head with
token authentication that runs the Ray jobs through `ray job submit`, and two loopback DeepSpeed
"nodes" (a hostfile, `--no_ssh --node_rank 0|1`): MuLaN and the codec side by side on a node each
(separate node sets), then the three stages side by side on both nodes.
The run folders (checkpoints) are the shared file system. The package is then loaded from S3 and
generates a clip. A rerun skips every finished step.

Also here, fast: ``storage.local_copy`` (how tokenizer models on S3 reach the loaders).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ray_utils, train_utils

CLIPS, EVAL_CLIPS, SECONDS, SAMPLE_RATE = 8, 2, 6.0, 16000
TRAIN = {"max_steps": 2, "warmup_steps": 1, "log_every": 1, "eval_every": 2, "eval_batches": 1, "checkpoint_every": 2}


def test_local_copy_of_s3_files_and_folders(moto_s3, tmp_path, monkeypatch):
    """A remote file or folder is downloaded once per content (size + ETag) into $MUSICLM_CACHE."""
    from musiclm.data import storage

    monkeypatch.setenv("MUSICLM_CACHE", str(tmp_path / "cache"))
    storage.write_bytes_atomic(f"{moto_s3}/m/kmeans.safetensors", b"centroids")
    storage.write_bytes_atomic(f"{moto_s3}/m/mulan/config.json", b"{}")
    storage.write_bytes_atomic(f"{moto_s3}/m/mulan/text/tokenizer.json", b"tok")
    f = storage.local_copy(f"{moto_s3}/m/kmeans.safetensors")
    assert f.startswith(str(tmp_path / "cache")) and os.path.basename(f) == "kmeans.safetensors"
    assert open(f, "rb").read() == b"centroids"
    d = storage.local_copy(f"{moto_s3}/m/mulan/")
    assert os.path.basename(d) == "mulan" and open(os.path.join(d, "text", "tokenizer.json"), "rb").read() == b"tok"
    assert storage.local_copy(f"{moto_s3}/m/mulan") == d  # unchanged: the same copy
    storage.write_bytes_atomic(f"{moto_s3}/m/mulan/config.json", b'{"v": 2}')
    d2 = storage.local_copy(f"{moto_s3}/m/mulan")
    assert d2 != d and open(os.path.join(d2, "config.json"), "rb").read() == b'{"v": 2}'
    assert storage.local_copy(str(tmp_path)) == str(tmp_path)  # local paths stay as they are
    with pytest.raises(FileNotFoundError):
        storage.local_copy(f"{moto_s3}/m/nothing-here")


# ------------------------------------------------------------------------------------------ end to end
def _write_corpus(url: str) -> str:
    """CLIPS demo beats (flac) and their manifest on S3; the last EVAL_CLIPS are the eval split."""
    import soundfile as sf

    from musiclm.data import storage
    from musiclm.data.demo_corpus import make_clip

    lines = []
    for i in range(CLIPS):
        rec, wav = make_clip(0, i, seconds=SECONDS, sample_rate=SAMPLE_RATE)
        buf = io.BytesIO()
        sf.write(buf, wav, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        storage.write_bytes_atomic(f"{url}/audio/{rec['id']}.flac", buf.getvalue())
        split = "eval" if i >= CLIPS - EVAL_CLIPS else "train"
        lines.append(json.dumps({**rec, "audio": f"audio/{rec['id']}.flac", "split": split}))
    storage.write_text_atomic(f"{url}/manifest.jsonl", "\n".join(lines) + "\n")
    return f"{url}/manifest.jsonl"


def _write_configs(d: Path) -> None:
    """Tiny configs: tokenizers (tiny SoundStream 8 kHz / 50 Hz, MFCC k-means, tiny MuLaN 16 kHz,
    2-level quantizer), MuLaN, codec and the three stages (launch/configs/tiny), 2 steps each."""
    d.mkdir(parents=True)
    ds = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "AdamW", "params": {"lr": 2.0e-3}}}
    configs = {
        "tokenizers": {
            "segment_seconds": 4,
            "min_segment_seconds": 1.0,
            "sample_rate": SAMPLE_RATE,
            "audio_segment_seconds": 2,
            "tokenizers": {
                "acoustic": {"type": "soundstream"},
                "semantic": {"features": {"type": "mfcc", "rate": 25}},
                "mulan": {"type": "mulan"},
                "quantizer": {"preset": "default", "levels": 2, "codebook_size": "auto"},
            },
            "fit_kmeans": {"clusters": 16, "frames_per_clip": 50},
        },
        "mulan": {
            "name": "mulan-tiny",
            "stage": "mulan",
            "data": {"shuffle": 16, "prefetch": 2},
            "model": {"preset": "tiny", "text": {"tokenizer_file": str(d / "caption-tokenizer.json")}},
            "train": {**TRAIN, "split_eval_samples": 4},
            "deepspeed": ds,
        },
        "codec": {
            "name": "codec-tiny",
            "stage": "codec",
            "data": {"shuffle": 16, "prefetch": 2},
            "model": {"preset": "tiny"},
            "codec": {"crop_seconds": 1.0, "media_clips": 1},
            "train": {**TRAIN, "split_eval_samples": 4},
            "deepspeed": {**ds, "gradient_clipping": 1.0},
        },
    }
    for stage in ("semantic", "coarse", "fine"):
        configs[stage] = {
            "base": str(REPO / "launch" / "configs" / "tiny" / f"{stage}.yaml"),
            "train": TRAIN,
            "deepspeed": {"train_micro_batch_size_per_gpu": 4},
        }
    for name, cfg in configs.items():
        (d / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))


def _run_pipeline(args: list[str], env: dict, log: Path, timeout: float) -> str:
    """launch/pipeline.sh in its own process group (all of it is stopped on a timeout); its output."""
    with open(log, "wb") as out:
        p = subprocess.Popen(
            ["bash", "launch/pipeline.sh", *args],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = "timeout"
    text = log.read_text(errors="replace")
    assert rc == 0, f"pipeline.sh: {rc}\n{text[-6000:]}"
    return text


@pytest.mark.slow
def test_pipeline_on_s3_ray_job_api_and_two_nodes(moto_s3, moto_server, tmp_path, monkeypatch):
    import ray_utils
    import torch
    import train_utils

    from musiclm.data import storage
    from musiclm.data.shards import list_shards, read_index, verify
    from musiclm.generate import MusicLM

    cache = str(tmp_path / "cache")
    manifest = _write_corpus(f"{moto_s3}/corpus/rap")
    _write_configs(tmp_path / "configs")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    prefix, runs = f"{moto_s3}/musiclm", tmp_path / "runs"
    args = ["--manifest", manifest, "--prefix", prefix, "--runs", str(runs), "--configs", str(tmp_path / "configs")]
    args += ["--tokenizers", str(tmp_path / "configs" / "tokenizers.yaml"), "--hostfile", str(hostfile)]
    # side by side: MuLaN and the codec each on its own node, then the three stages, each on both nodes
    args += ["--launcher", "loopback", "--parallel", "--hosts-mulan", "node0", "--hosts-codec", "node1"]
    args += ["--workers", "1"]

    t0 = time.time()
    # the head holds the S3 credentials (as cluster nodes would); the jobs get only the endpoint
    head = ray_utils.start_head(num_cpus=2, extra_env={**moto_server.env(), "MUSICLM_CACHE": cache})
    try:
        env = head.env(for_jobs_api=True)  # RAY_ADDRESS = the job API, token auth
        env.update({k: v for k, v in train_utils.env().items() if k != "PYTHONPATH"})
        env["MUSICLM_CACHE"] = cache
        text = _run_pipeline(args, env, tmp_path / "pipeline.log", timeout=900)
        took = time.time() - t0
        # a rerun: every step that is complete is skipped, nothing is trained or submitted again
        again = _run_pipeline(
            [*args, "--steps", "audio encoders tokenizers stages"], env, tmp_path / "again.log", timeout=120
        )
    finally:
        ray_utils.cleanup(head)
    print(f"pipeline: {took:.0f} s end to end (Ray head start included)")

    # the Ray jobs went through the job API, training through two launcher "nodes"
    assert text.count("ray job submit --address http://127.0.0.1:") == 4 and text.count("succeeded") >= 4
    assert text.count("--no_ssh --node_rank 0 --master_addr 127.0.0.1") == 5
    assert text.count("--no_ssh --node_rank 1 --master_addr 127.0.0.1") == 3  # the stages
    for name, world in (("mulan", 1), ("codec", 1), ("semantic", 2), ("coarse", 2), ("fine", 2)):
        node0 = (runs / "logs" / f"{name}.node0.log").read_text(errors="replace")
        assert f"world {world}," in node0, node0[-3000:]
    assert (runs / "logs" / "hostfile.codec").read_text().split() == ["node1", "slots=1"]
    commands = [line for line in again.splitlines() if line.startswith("+ ")]
    assert again.count("complete: ") == 8, again[-3000:]
    assert not [c for c in commands if "deepspeed" in c or "ray job" in c or "ray_jobs/" in c], commands

    # every output of the recipe is on S3
    audio = f"{prefix}/shards/rap/audio"
    assert read_index(audio)["clips_ok"] == CLIPS and list_shards(audio)
    tokens = (runs / "tokens.url").read_text().strip()
    assert tokens.startswith(f"{prefix}/shards/rap/tokens-")
    report = verify(tokens)
    assert report["ok"] and report["kind"] == "tokens" and report["samples"] > CLIPS
    for part in ("mulan/config.json", "codec/model.safetensors", "kmeans.safetensors", "quantizer/config.json"):
        assert storage.exists(f"{prefix}/models/{part}"), part
    assert storage.exists(f"{prefix}/config/tokenizers.yaml")

    # each model trained on the two nodes (checkpoints in the shared run folder)
    stage_runs = runs / os.path.basename(tokens)
    for run_dir in (runs / "mulan", runs / "codec", *(stage_runs / s for s in ("semantic", "coarse", "fine"))):
        losses = train_utils.train_losses(str(run_dir))
        assert max(losses) == TRAIN["max_steps"] and all(np.isfinite(v) for v in losses.values()), run_dir

    # the package on S3 loads and generates
    monkeypatch.setenv("MUSICLM_CACHE", cache)
    model = MusicLM.from_pretrained(f"{prefix}/models/package")
    res = model.generate("dark drill beat with bells", duration=1.0, num_samples=1, seed=0, progress=False)
    assert res.sample_rate == 8000 and tuple(res.wavs.shape) == (1, 8000)
    assert torch.isfinite(res.wavs).all()
    trained_on = read_index(tokens)["fingerprints"]
    for part in ("acoustic", "semantic", "quantizer"):  # the tokenizers the stages were trained on
        assert model.config["fingerprints"][part]["weights_sha256"] == trained_on[part]["weights_sha256"], part
