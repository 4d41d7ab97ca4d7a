"""Tokenization throughput: audio-seconds tokenized per second by ``ray_jobs/tokenize.py`` with 1 and
with 2 Ray workers on the same corpus, in its fused and its split pipeline, against the same
tokenizers in bare processes (the scaling goal: the 2-worker ratio >= 0.95 x the bare ratio).

``musiclm bench tokenize`` prints :func:`run`'s dict as JSON. Each measurement is a real run of the
job (``python ray_jobs/tokenize.py --pipeline fused|split``, its own local Ray, fresh output folder)
on the demo corpus (synthetic beats, 10 s clips), with two tokenizer sets:

* ``test``: the tiny random models of the test suite (EnCodec, MFCC k-means, CLAP, quantizer);
* ``encodec_24khz``: the same, with EnCodec at its real 24 kHz size (``facebook/encodec_24khz``
  config, ~15M parameters, random weights: same compute as the real model, no download).

Reported per run (from the job's JSON summary): ``audio_seconds_per_s`` over the whole pipeline
(decode, tokenize, write; actor start-up included), ``steady_audio_seconds_per_s`` (after each
worker's first group: start-up excluded; the figure that holds for a long job) and
``audio_seconds_per_s_per_worker`` (audio seconds per second of model time in one actor).
Per pipeline: ``speedup`` = steady rate with 2 workers / with 1; ``speedup_wall`` the same on
whole-run rates; ``vs_bare`` = ``speedup`` / the bare ratio; ``meets_goal`` = ``vs_bare`` >= 0.95.

Control (``bare``, measured in the same run right after the model's job runs): the same tokenizers
in plain processes (no Ray: load clips, ``bundle.tokenize`` one clip at a time, 1 torch thread, for
at least ``bare_seconds``), one process alone and then two at once. ``machine_speedup`` is what two
processes gain on this machine at this moment (2.0 on two idle cores; less when other work shares
the cores or the two processes contend for memory bandwidth).

Needs a source checkout (``ray_jobs/`` and ``tests/helpers_models.py`` beside the package).
musiclm does not import Ray or ray_jobs here: the job runs as a subprocess.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
JOB = REPO / "ray_jobs" / "tokenize.py"
HELPERS = REPO / "tests" / "helpers_models.py"
GOAL_VS_BARE = 0.95  # the 2-worker ratio, as a share of what two bare processes gain
PIPELINES = ("fused", "split")


def _helpers():
    if not HELPERS.exists():
        raise FileNotFoundError(f"{HELPERS} not found: the tokenize benchmark needs a source checkout")
    spec = importlib.util.spec_from_file_location("musiclm_bench_helpers_models", HELPERS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _job_env(root: str) -> dict:
    """A local Ray per run (no RAY_ADDRESS), token auth with a token file of our own."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    token = os.path.join(root, "ray_auth_token")
    if not os.path.exists(token):
        with open(token, "w") as f:
            f.write(secrets.token_hex(32))
        os.chmod(token, 0o600)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token, "RAY_USAGE_STATS_ENABLED": "0"})
    return env


def _parse_summary(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"job"' in line:
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_job(
    manifest: str,
    config: str,
    out: str,
    workers: int,
    *,
    clips_per_shard: int = 1,
    batch_size: int = 4,
    num_cpus: float | None = None,
    env: dict | None = None,
    timeout: float = 900,
    pipeline: str | None = None,
) -> dict:
    """One tokenize job as a subprocess -> its JSON summary (raises with the log tail on failure)."""
    cmd = [
        sys.executable,
        str(JOB),
        "--manifest",
        manifest,
        "--config",
        config,
        "--out",
        out,
        "--dataset",
        "bench",
        "--workers",
        str(workers),
        "--clips-per-shard",
        str(clips_per_shard),
        "--batch-size",
        str(batch_size),
    ]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    if pipeline:
        cmd += ["--pipeline", pipeline]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout)
    summary = _parse_summary(proc.stdout)
    if proc.returncode != 0 or summary is None:
        raise RuntimeError(f"tokenize job failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    summary["process_s"] = round(time.time() - t0, 3)
    return summary


_BARE = r"""
import json, sys, time, glob
import torch, soundfile as sf, yaml
torch.set_num_threads(1)
from musiclm.tokenizers import build_tokenizers
cfg = yaml.safe_load(open(sys.argv[1]))["tokenizers"]
bundle = build_tokenizers(cfg)
bundle.fingerprints()  # load every model before timing
files = sorted(glob.glob(sys.argv[2] + "/audio/*.flac"))[: int(sys.argv[3])]
clips = [torch.from_numpy(sf.read(f, dtype="float32")[0]) for f in files]
min_s = float(sys.argv[4])
bundle.tokenize([clips[0]], sample_rate=24000)  # warm-up
t0 = time.time()
n = samples = 0
while n < len(clips) or time.time() - t0 < min_s:  # every clip once, then round again until min_s
    c = clips[n % len(clips)]
    bundle.tokenize([c], sample_rate=24000)
    n += 1
    samples += len(c)
dt = time.time() - t0
print(json.dumps({"audio_seconds": samples / 24000, "seconds": dt, "clips": n}))
"""


def bare_scaling(
    config: str, corpus_dir: str, clips: int = 6, env: dict | None = None, min_seconds: float = 8.0
) -> dict:
    """Tokenize `clips` clips (cycled for at least `min_seconds`) in one plain process, then in two
    at once: the machine's own scaling."""
    cmd = [sys.executable, "-c", _BARE, config, corpus_dir, str(clips), str(min_seconds)]

    def parse(out: str) -> float:
        d = json.loads(out.strip().splitlines()[-1])
        return d["audio_seconds"] / d["seconds"]

    solo = parse(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, cwd=str(REPO)).stdout)
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=str(REPO))
        for _ in range(2)
    ]
    pair = sum(parse(p.communicate()[0]) for p in procs)
    return {
        "one_process_audio_seconds_per_s": round(solo, 3),
        "two_processes_audio_seconds_per_s": round(pair, 3),
        "machine_speedup": _ratio(pair, solo),
    }


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


RUN_KEYS = (
    "pipeline",
    "workers",
    "audio_seconds_per_s",
    "steady_audio_seconds_per_s",
    "audio_seconds_per_s_per_worker",
    "elapsed_s",
    "total_s",
    "process_s",
    "clips_ok",
    "clips_failed",
    "segments",
    "audio_hours",
)


def run(
    clips: int = 24,
    seconds: float = 10.0,
    workers: tuple[int, ...] = (1, 2),
    models: tuple[str, ...] = ("test", "encodec_24khz"),
    pipelines: tuple[str, ...] = PIPELINES,
    clips_per_shard: int = 1,
    batch_size: int = 4,
    num_cpus: float | None = None,
    seed: int = 0,
    keep: str | None = None,
    bare_clips: int = 6,
    bare_seconds: float = 8.0,
    model_clips: dict | None = None,
) -> dict:
    """Benchmark the tokenize job; returns a JSON-able dict (see the module docstring).

    ``model_clips``: clips per tokenizer set where it differs from ``clips`` (the first ``n`` of
    the corpus; e.g. more for the tiny models, whose runs are short)."""
    import yaml

    from musiclm.codec.encodec import random_encodec_24khz
    from musiclm.data.demo_corpus import generate_corpus

    workers, models, pipelines = tuple(workers), tuple(models), tuple(pipelines)
    model_clips = dict(model_clips or {})
    root = keep or tempfile.mkdtemp(prefix="musiclm-bench-tokenize-")
    os.makedirs(root, exist_ok=True)
    try:
        t0 = time.time()
        n_corpus = max([clips, *model_clips.values()])
        corpus = generate_corpus(os.path.join(root, "corpus"), n_corpus, seed=seed, seconds=seconds, progress=False)
        full_manifest = os.path.join(root, "corpus", "manifest.jsonl")
        with open(full_manifest) as f:
            lines = f.readlines()
        tiny = _helpers().make_tiny_tokenizer_config(os.path.join(root, "models"), seed=seed)
        configs = {"test": tiny}
        if "encodec_24khz" in models:
            big = json.loads(json.dumps(tiny))
            big["acoustic"] = {
                "type": "encodec",
                "model": random_encodec_24khz(os.path.join(root, "encodec_24khz")),
                "bandwidth": 6.0,
            }
            configs["encodec_24khz"] = big
        setup_s = time.time() - t0
        env = _job_env(root)
        results: dict = {}
        for name in models:
            n_clips = int(model_clips.get(name, clips))
            manifest = os.path.join(root, "corpus", f"manifest-{n_clips}.jsonl")
            with open(manifest, "w") as f:  # same folder: the manifest's relative audio paths hold
                f.writelines(lines[:n_clips])
            cfg_path = os.path.join(root, f"tokenizers-{name}.yaml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump({"segment_seconds": 10.0, "tokenizers": configs[name]}, f)
            entry: dict = {"clips": n_clips}
            for pipeline in pipelines:
                runs: dict = {}
                for w in workers:
                    s = run_job(
                        manifest,
                        cfg_path,
                        os.path.join(root, f"shards-{name}-{pipeline}-w{w}"),
                        w,
                        clips_per_shard=clips_per_shard,
                        batch_size=batch_size,
                        num_cpus=num_cpus,
                        env=env,
                        pipeline=pipeline,
                    )
                    runs[f"workers_{w}"] = {k: s.get(k) for k in RUN_KEYS}
                if 1 in workers and 2 in workers:
                    one, two = runs["workers_1"], runs["workers_2"]
                    runs["speedup"] = _ratio(two["steady_audio_seconds_per_s"], one["steady_audio_seconds_per_s"])
                    runs["speedup_wall"] = _ratio(two["audio_seconds_per_s"], one["audio_seconds_per_s"])
                entry[pipeline] = runs
            if bare_clips:
                entry["bare"] = bare_scaling(
                    cfg_path, os.path.join(root, "corpus"), bare_clips, env=env, min_seconds=bare_seconds
                )
                ms = entry["bare"]["machine_speedup"]
                for pipeline in pipelines:
                    runs = entry[pipeline]
                    if runs.get("speedup"):
                        runs["vs_bare"] = _ratio(runs["speedup"], ms)
                        runs["meets_goal"] = bool(runs["vs_bare"] and runs["vs_bare"] >= GOAL_VS_BARE)
            results[name] = entry
        return {
            "bench": "tokenize",
            "cpu_count": os.cpu_count(),
            "corpus": {
                "clips": clips,
                "model_clips": model_clips,
                "seconds_per_clip": seconds,
                "audio_hours": corpus.get("hours"),
                "clips_per_shard": clips_per_shard,
                "batch_size": batch_size,
            },
            "goal_vs_bare": GOAL_VS_BARE,
            "load_average": list(os.getloadavg()),
            "setup_s": round(setup_s, 3),
            "total_s": round(time.time() - t0, 3),
            "results": results,
        }
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=24)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--models", default="test,encodec_24khz")
    p.add_argument("--workers", default="1,2")
    p.add_argument("--pipelines", default=",".join(PIPELINES))
    p.add_argument("--clips-per-shard", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--keep", default=None, help="keep corpus, models and shards in this folder")
    p.add_argument("--bare-clips", type=int, default=6, help="clips per process of the no-Ray control (0: skip)")
    p.add_argument("--bare-seconds", type=float, default=8.0, help="least seconds each control process tokenizes")
    a = p.parse_args(argv)
    out = run(
        clips=a.clips,
        seconds=a.seconds,
        workers=tuple(int(w) for w in a.workers.split(",")),
        models=tuple(a.models.split(",")),
        pipelines=tuple(a.pipelines.split(",")),
        clips_per_shard=a.clips_per_shard,
        batch_size=a.batch_size,
        keep=a.keep,
        bare_clips=a.bare_clips,
        bare_seconds=a.bare_seconds,
    )
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
