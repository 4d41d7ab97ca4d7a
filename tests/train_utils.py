"""Helpers for the training tests: tiny token shards and the real `deepspeed` launcher on CPU.

make_tiny_shards(dir)            synthetic shards (learnable structure) for launch/configs/tiny/tiny.yaml
launch(...)                      `deepspeed --num_gpus N launch/train.py ...` (DS_ACCELERATOR=cpu, gloo,
                                 OMP_NUM_THREADS=1, a free master port), in its own process group
launch_two_nodes(...)            two launcher calls with a hostfile, --no_ssh --node_rank 0|1
unigram_entropy(shards, stage)   entropy (nats) of a stage's target tokens in the train split
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

import numpy as np
import yaml

from musiclm.net import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(ROOT, "launch", "configs", "tiny", "tiny.yaml")
DS_CONFIGS = os.path.join(ROOT, "deepspeed_configs")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")


def tiny_tokens() -> dict:
    with open(TINY_CONFIG) as f:
        return yaml.safe_load(f)["tokens"]


def make_tiny_shards(directory: str, *, n_train: int = 128, n_eval: int = 32, seed: int = 0) -> str:
    from musiclm.testing import make_synthetic_token_shards

    make_synthetic_token_shards(
        directory, tiny_tokens(), n_train=n_train, n_eval=n_eval, seconds=4.0, samples_per_shard=16, seed=seed
    )
    return directory


def unigram_entropy(shard_dir: str, stage: str) -> float:
    """Entropy in nats of the unigram distribution of the stage's target tokens (train split)."""
    from musiclm.data.shards import shard_reader

    t = tiny_tokens()
    qc, q = t["coarse_levels"], t["acoustic_levels"]
    counts: Counter = Counter()
    for s in shard_reader(shard_dir, "train", shuffle=0, rank=0, world_size=1):
        if stage == "semantic":
            counts.update(int(x) for x in s["semantic.npy"])
        else:
            ac = s["acoustic.npy"]
            levels = range(qc) if stage == "coarse" else range(qc, q)
            for lv in levels:
                counts.update((lv, int(x)) for x in ac[lv])
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values())


# Every launcher run of the suite builds JIT ops (if it needed any) here, not in a cache shared with
# earlier runs: a newcomer's machine has none, and tests assert this folder stays empty.
TORCH_EXTENSIONS_DIR = tempfile.mkdtemp(prefix="musiclm-torch-ext-")


def env() -> dict:
    e = dict(os.environ)
    e.update(
        {
            "OMP_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            "PYTHONUNBUFFERED": "1",
            "TORCH_EXTENSIONS_DIR": TORCH_EXTENSIONS_DIR,
            "PYTHONPATH": ROOT + os.pathsep + e.get("PYTHONPATH", ""),
        }
    )
    return e


def compiled_ops() -> list[str]:
    """JIT-compiled extension folders the suite's launcher runs created (should be none)."""
    out = []
    for root, _dirs, files in os.walk(TORCH_EXTENSIONS_DIR):
        out += [os.path.join(root, f) for f in files if f.endswith((".so", ".o", "build.ninja"))]
    return out


def train_args(stage: str, run_dir: str, shards: str, ds: str = "zero2", extra: list[str] | None = None) -> list[str]:
    return [
        "launch/train.py",
        "--stage",
        stage,
        "--config",
        TINY_CONFIG,
        "--deepspeed_config",
        os.path.join(DS_CONFIGS, f"{ds}.json"),
        "--shards",
        shards,
        "--run_dir",
        run_dir,
        *(extra or []),
    ]


def start(nprocs: int, args: list[str], log_path: str, *, launcher_args: list[str] | None = None) -> subprocess.Popen:
    cmd = [DEEPSPEED, *(launcher_args or ["--num_gpus", str(nprocs), "--master_port", str(free_port())]), *args]
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def launch(nprocs: int, args: list[str], log_path: str, timeout: float = 240) -> int:
    p = start(nprocs, args, log_path)
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise


def launch_two_nodes(args: list[str], run_dir: str, log_prefix: str, timeout: float = 240) -> tuple[int, int]:
    """Two 'nodes' on this machine: hostfile node0/node1 slots=1, --no_ssh, --node_rank 0 and 1."""
    hostfile = os.path.join(run_dir + "-hostfile")
    with open(hostfile, "w") as f:
        f.write("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    procs = []
    for node in (0, 1):
        la = [
            "--hostfile",
            hostfile,
            "--no_ssh",
            "--node_rank",
            str(node),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
        ]
        procs.append(start(1, args, f"{log_prefix}.node{node}.log", launcher_args=la))
    rcs = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            rcs.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                os.killpg(q.pid, signal.SIGKILL)
            raise
    return rcs[0], rcs[1]


def _live_members(pgid: int) -> list[int]:
    """Processes of a group that are not zombies (Linux /proc; kill(0) where /proc is missing)."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(int(name))
    return out


def wait_group(pgid: int, timeout: float = 120) -> None:
    """Wait until every process of a process group has exited (the `deepspeed` runner dies at once
    on SIGTERM; the training processes under it finish their checkpoint first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not _live_members(pgid):
            return
        time.sleep(0.1)
    os.killpg(pgid, signal.SIGKILL)
    raise TimeoutError(f"process group {pgid} still alive after {timeout}s")


def read_log(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "replace")


def metrics(run_dir: str) -> list[dict]:
    from musiclm.train.monitor import read_metrics

    return read_metrics(os.path.join(run_dir, "metrics.jsonl"))


def train_losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run_dir) if "train/loss" in r}


def eval_losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["eval/loss"] for r in metrics(run_dir) if "eval/loss" in r}


def wait_for_step(run_dir: str, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"run ended (rc {proc.returncode}) before step {step}")
        if any(s >= step for s in train_losses(run_dir)):
            return
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached in {timeout}s")


def mean(xs) -> float:
    xs = list(xs)
    return float(np.mean(xs)) if xs else float("nan")
