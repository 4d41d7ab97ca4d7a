"""Training engine benchmark: DeepSpeed overhead and input-pipeline headroom.

``musiclm bench train`` prints :func:`run`'s dict as JSON:

- tokens/s of the engine (``deepspeed --module musiclm.train.engine``, the same code as
  ``launch/train.py``) for each ZeRO stage and process count, against a plain PyTorch loop
  (``torch.optim.AdamW``, same model, same batches, same clipping and schedule) in one process;
  ``overhead`` = 1 - engine / plain at 1 process (target <= 10 %);
- the shard reader's samples/s (read + decode + build examples + collate, one thread) divided by
  the fastest training consumption per process (target >= 10x: the trainer never waits).

Synthetic token shards shaped like the demo's (EnCodec 75 Hz x 8 levels, 25 Hz semantic ids,
8 conditioning tokens per namespace); the window is short by default so that a run takes seconds
on a CPU. Timings skip the first ``log_every`` steps (warmup); each figure is the best of the
later intervals (interference on a shared machine only slows a run down); the median is
reported beside it. This module does not import deepspeed (it runs the launcher).
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

__all__ = ["run", "DEMO_TOKENS"]

DEMO_TOKENS = {
    "acoustic_levels": 8,
    "acoustic_codebook": 1024,
    "acoustic_rate": 75,
    "coarse_levels": 4,
    "semantic_vocab": 1024,
    "semantic_rate": 25,
    "cond_namespaces": ["semantic", "coarse", "fine"],
    "cond_levels": 8,
    "cond_codebook": 1024,
}


def _deepspeed_bin() -> str:
    cand = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return cand if os.path.exists(cand) else "deepspeed"


def _after_warmup(recs: list[dict], key: str, how: str = "best") -> float | None:
    """The best (max; min for times) of the logged intervals after the first, or their median.
    On a shared machine interference only slows a run down, so the best interval is the figure
    least disturbed by other work."""
    vals = [r[key] for r in recs if key in r and r[key] is not None]
    vals = vals[1:] if len(vals) > 1 else vals
    if not vals:
        return None
    if how == "median":
        return float(statistics.median(vals))
    return float(min(vals) if key.endswith("_s") and not key.endswith("per_s") else max(vals))


def _plain_loop(cfg: dict, shards: str, micro_batch: int, steps: int, log_every: int, lr: float, threads: int) -> dict:
    """The reference: the same model and batches through a plain PyTorch loop, one process."""
    import torch

    from musiclm.train import data as tdata
    from musiclm.train.engine import WarmupCosine
    from musiclm.train.spec import get_train_spec

    torch.set_num_threads(threads)
    spec = get_train_spec(cfg["stage"])
    spec.configure(cfg)
    torch.manual_seed(cfg.get("seed", 0))
    model = spec.build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    t = cfg["train"]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(t["warmup_steps"], steps, t["min_lr_ratio"]))
    stream = tdata.BatchStream(
        tdata.shard_urls(shards, "train"),
        "train",
        build_example=spec.build_example,
        collate=spec.collate,
        cfg=cfg,
        batch_size=micro_batch,
        seed=cfg.get("seed", 0),
        shuffle=cfg["data"]["shuffle"],
        prefetch=cfg["data"]["prefetch"],
    )
    rates, acc_t, acc_tok = [], 0.0, 0
    try:
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            batch, _ = next(stream)
            acc_tok += spec.count_tokens(batch)
            loss, _m = spec.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            acc_t += time.perf_counter() - t0
            if step % log_every == 0:
                rates.append(acc_tok / acc_t)
                acc_t, acc_tok = 0.0, 0
    finally:
        stream.close()
    rates = rates[1:] if len(rates) > 1 else rates
    return {
        "tokens_per_s": float(max(rates)) if rates else None,
        "tokens_per_s_median": float(statistics.median(rates)) if rates else None,
        "final_loss": float(loss.detach()),
    }


def run(
    stage: str = "coarse",
    preset: str = "small",
    zero_stages=(0, 1, 2, 3),
    procs=(1, 2),
    steps: int = 20,
    log_every: int = 2,
    micro_batch: int = 2,
    window_seconds: float = 1.0,
    threads: int = 1,
    peak_flops: float = 1.0e11,
    reader_seconds: float = 3.0,
    out_dir: str | None = None,
    keep: bool = False,
    timeout: float = 600,
) -> dict:
    """Benchmark the engine against a plain loop (see the module docstring). ``threads``: torch
    threads per process (OMP_NUM_THREADS); ``peak_flops``: FLOP/s of one process for MFU."""
    import yaml

    from musiclm.testing import make_synthetic_token_shards
    from musiclm.train import data as tdata
    from musiclm.train.spec import get_train_spec

    work = out_dir or tempfile.mkdtemp(prefix="musiclm-bench-train-")
    os.makedirs(work, exist_ok=True)
    shards = os.path.join(work, "shards")
    lr = 1e-3
    cfg = {
        "name": "bench",
        "stage": stage,
        "seed": 0,
        "data": {"shards": shards, "train_split": "train", "eval_split": "eval", "shuffle": 256, "prefetch": 4},
        "tokens": {**DEMO_TOKENS, "window_seconds": {stage: window_seconds}},
        "model": {"preset": preset},
        "cond_dropout": 0.1,
        "train": {
            "max_steps": steps,
            "warmup_steps": max(1, steps // 10),
            "min_lr_ratio": 0.1,
            "log_every": log_every,
            "eval_every": 0,
            "checkpoint_every": 0,
            "keep_checkpoints": 1,
            "peak_flops": peak_flops,
            "tensorboard": False,
        },
        "deepspeed": {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0,
            "bf16": {"enabled": "auto"},
            "optimizer": {
                "type": "AdamW",
                "params": {"lr": lr, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1},
            },
        },
    }
    seconds = max(2.0 * window_seconds, 2.0)
    if not os.path.exists(os.path.join(shards, "index.json")):
        make_synthetic_token_shards(shards, cfg["tokens"], n_train=256, n_eval=8, seconds=seconds, samples_per_shard=32)
    spec = get_train_spec(stage)
    spec.configure(cfg)
    model = spec.build_model(cfg)
    from musiclm.train.lm_stages import stage_for

    st = stage_for(stage, cfg)
    result: dict = {
        "stage": stage,
        "preset": preset,
        "params": int(model.num_params()),
        "seq_len": st.seq_len,
        "vocab_size": st.vocab_size,
        "micro_batch": micro_batch,
        "steps": steps,
        "threads_per_process": threads,
        "flops_per_token": float(model.flops_per_token(st.seq_len)),
        "peak_flops_per_process": peak_flops,
    }
    del model

    # the input pipeline alone
    reader = tdata.reader_throughput(
        tdata.shard_urls(shards, "train"),
        "train",
        build_example=spec.build_example,
        collate=spec.collate,
        cfg=cfg,
        batch_size=micro_batch,
        seconds=reader_seconds,
    )
    result["reader"] = reader

    # plain PyTorch
    result["plain"] = _plain_loop(cfg, shards, micro_batch, steps, log_every, lr, threads)

    # the engine under the launcher
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    try:
        import torch

        if not torch.cuda.is_available():
            env.setdefault("DS_ACCELERATOR", "cpu")
    except Exception:
        env.setdefault("DS_ACCELERATOR", "cpu")
    runs = []
    for z in zero_stages:
        for p in procs:
            name = f"zero{z}_p{p}"
            run_dir = os.path.join(work, "runs", name)
            shutil.rmtree(run_dir, ignore_errors=True)
            c = json.loads(json.dumps(cfg))
            c["deepspeed"]["zero_optimization"] = {"stage": int(z)}
            cfg_path = os.path.join(work, f"{name}.yaml")
            with open(cfg_path, "w") as f:
                yaml.safe_dump(c, f)
            cmd = [
                _deepspeed_bin(),
                "--num_gpus",
                str(p),
                "--master_port",
                str(free_port()),
                "--module",
                "musiclm.train.engine",
                "--config",
                cfg_path,
                "--run_dir",
                run_dir,
                "--resume",
                "none",
            ]
            t0 = time.time()
            log_path = run_dir + ".log"
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            with open(log_path, "wb") as log:
                proc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
            entry = {"zero": int(z), "procs": int(p), "rc": proc.returncode, "wall_s": round(time.time() - t0, 1)}
            if proc.returncode == 0:
                from musiclm.train.monitor import read_metrics

                recs = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
                entry.update(
                    {
                        "tokens_per_s": _after_warmup(recs, "perf/tokens_per_s"),
                        "tokens_per_s_median": _after_warmup(recs, "perf/tokens_per_s", "median"),
                        "samples_per_s": _after_warmup(recs, "perf/samples_per_s"),
                        "mfu": _after_warmup(recs, "perf/mfu"),
                        "data_wait_s": _after_warmup(recs, "perf/data_wait_s"),
                        "step_time_s": _after_warmup(recs, "perf/step_time_s"),
                        "final_loss": next((r["train/loss"] for r in reversed(recs) if "train/loss" in r), None),
                    }
                )
                if p == 1 and result["plain"]["tokens_per_s"] and entry["tokens_per_s"]:
                    entry["overhead_vs_plain"] = 1.0 - entry["tokens_per_s"] / result["plain"]["tokens_per_s"]
            else:
                with open(log_path, "rb") as f:
                    entry["log_tail"] = f.read()[-2000:].decode("utf-8", "replace")
            runs.append(entry)
    result["deepspeed"] = runs
    ok = [r for r in runs if r.get("samples_per_s")]
    if ok:
        per_proc = max(r["samples_per_s"] / r["procs"] for r in ok)
        result["reader_over_training"] = reader["samples_per_s"] / per_proc
    one = [r["overhead_vs_plain"] for r in runs if "overhead_vs_plain" in r]
    result["checks"] = {
        "max_overhead_1proc": max(one) if one else None,
        "overhead_le_10pct_1proc": (max(one) <= 0.10) if one else None,
        "reader_ge_10x": (result.get("reader_over_training", 0) >= 10.0) if ok else None,
    }
    if not keep and out_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        result["work_dir"] = work
    return result


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", default="coarse")
    p.add_argument("--preset", default="small")
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--window_seconds", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--peak_flops", type=float, default=1.0e11)
    p.add_argument("--out_dir")
    a = p.parse_args(argv)
    res = run(
        stage=a.stage,
        preset=a.preset,
        zero_stages=a.zero,
        procs=a.procs,
        steps=a.steps,
        micro_batch=a.micro_batch,
        window_seconds=a.window_seconds,
        threads=a.threads,
        peak_flops=a.peak_flops,
        out_dir=a.out_dir,
    )
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
