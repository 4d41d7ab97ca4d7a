"""Start-up benchmark: from the `deepspeed` launcher's start to the end of the first optimizer step.

``musiclm bench startup`` prints :func:`run`'s dict as JSON. For every model ``make demo`` trains
(MuLaN on one process; semantic, coarse and fine on two, as the demo runs them) it launches the
real ``deepspeed`` launcher with the demo's own config (``launch/configs/<stage>.yaml``,
``deepspeed_configs/cpu.json``) on synthetic shards of the demo's shapes, ``repeats`` times, and
times from outside the process: the clock starts before the launcher is spawned and stops at the
wall-clock time the engine writes in ``startup.json`` when its first optimizer step ends. The
figure is the median over repeats (goal: <= 15 s for every model on an idle machine).

Each launch gets an empty ``TORCH_EXTENSIONS_DIR`` (``fresh_extensions=True``): a run that needed
a JIT-compiled DeepSpeed op would compile it here and show it, as on a newcomer's machine. The
engine's own split of the start-up (imports, init_distributed, build_model, deepspeed_initialize,
...) is reported beside it. This module does not import deepspeed (it runs the launcher).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from musiclm.net import free_port

__all__ = ["run"]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (stage, processes) as scripts/demo.sh trains them
DEMO_MODELS = (("mulan", 1), ("semantic", 2), ("coarse", 2), ("fine", 2))


def _deepspeed_bin() -> str:
    cand = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return cand if os.path.exists(cand) else "deepspeed"


def _demo_tokens() -> dict:
    from musiclm.config import load_config

    return load_config(os.path.join(ROOT, "launch", "configs", "semantic.yaml"))["tokens"]


def _launch(stage: str, procs: int, shards: str, run_dir: str, env: dict, timeout: float) -> dict:
    cmd = [
        _deepspeed_bin(),
        "--num_gpus",
        str(procs),
        "--master_port",
        str(free_port()),
        "launch/train.py",
        "--stage",
        stage,
        "--config",
        os.path.join("launch", "configs", f"{stage}.yaml"),
        "--deepspeed_config",
        os.path.join("deepspeed_configs", "cpu.json"),
        "--run_dir",
        run_dir,
        "--resume",
        "none",
        "--shards",
        shards,
        "--set",
        "train.max_steps=1",
        "train.eval_every=0",
        "train.split_eval_every=0",
        "train.checkpoint_every=0",
        "train.tensorboard=false",
    ]
    log_path = run_dir + ".log"
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    wall = time.time() - t0
    entry: dict = {"rc": proc.returncode, "process_wall_s": round(wall, 2)}
    info_path = os.path.join(run_dir, "startup.json")
    if proc.returncode == 0 and os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        entry["launch_to_first_step_s"] = round(info["first_step_end_unix"] - t0, 2)
        entry["launcher_overhead_s"] = round(info["process_start_unix"] - t0, 2)
        entry["engine"] = {k: round(v, 2) for k, v in info.items() if k.endswith("_s") and isinstance(v, (int, float))}
    else:
        with open(log_path, "rb") as f:
            entry["log_tail"] = f.read()[-3000:].decode("utf-8", "replace")
    with open(log_path, "rb") as f:  # anything compiled shows up in the launcher's output
        entry["compiled_ops"] = "Building extension module" in f.read().decode("utf-8", "replace")
    return entry


def run(
    models: list[str] | None = None,
    repeats: int = 3,
    fresh_extensions: bool = True,
    out_dir: str | None = None,
    threads: int = 1,
    timeout: float = 600,
    goal_s: float = 15.0,
) -> dict:
    """Launch-to-first-step seconds per demo model (see the module docstring)."""
    from musiclm.testing import make_synthetic_audio_shards, make_synthetic_token_shards

    wanted = models or [m for m, _ in DEMO_MODELS]
    unknown = sorted(set(wanted) - {m for m, _ in DEMO_MODELS})
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; choose from {[m for m, _ in DEMO_MODELS]}")
    work = out_dir or tempfile.mkdtemp(prefix="musiclm-bench-startup-")
    os.makedirs(work, exist_ok=True)
    tokens_dir, audio_dir = os.path.join(work, "tokens"), os.path.join(work, "audio")
    if not os.path.exists(os.path.join(tokens_dir, "index.json")):
        make_synthetic_token_shards(
            tokens_dir, _demo_tokens(), n_train=32, n_eval=8, seconds=10.0, samples_per_shard=16
        )
    if "mulan" in wanted and not os.path.exists(os.path.join(audio_dir, "index.json")):
        make_synthetic_audio_shards(audio_dir)

    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    result: dict = {"repeats": repeats, "fresh_extensions": fresh_extensions, "goal_s": goal_s, "models": {}}
    for stage, procs in DEMO_MODELS:
        if stage not in wanted:
            continue
        runs = []
        for r in range(repeats):
            run_dir = os.path.join(work, "runs", f"{stage}_{r}")
            shutil.rmtree(run_dir, ignore_errors=True)
            ext_dir = tempfile.mkdtemp(prefix="torch-ext-", dir=work) if fresh_extensions else None
            e = dict(env, TORCH_EXTENSIONS_DIR=ext_dir) if ext_dir else env
            runs.append(_launch(stage, procs, audio_dir if stage == "mulan" else tokens_dir, run_dir, e, timeout))
            if ext_dir:
                shutil.rmtree(ext_dir, ignore_errors=True)
        times = [x["launch_to_first_step_s"] for x in runs if "launch_to_first_step_s" in x]
        result["models"][stage] = {
            "processes": procs,
            "launch_to_first_step_s": round(statistics.median(times), 2) if times else None,
            "all_s": times,
            "runs": runs,
        }
    meds = [m["launch_to_first_step_s"] for m in result["models"].values()]
    result["max_median_s"] = max(meds) if meds and None not in meds else None
    result["meets_goal"] = result["max_median_s"] is not None and result["max_median_s"] <= goal_s
    result["compiled_anything"] = any(x.get("compiled_ops") for m in result["models"].values() for x in m["runs"])
    if out_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return result
