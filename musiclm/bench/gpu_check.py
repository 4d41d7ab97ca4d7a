"""GPU readiness check: bf16, ZeRO-2/3, NCCL, a GPU Ray actor and generation speed on one machine.

``scripts/gpu_check.sh`` runs ``python -m musiclm.bench.gpu_check run`` with the machine's own
CUDA PyTorch; the project's other dependencies come as wheels built elsewhere
(``scripts/gpu_wheels.sh``), installed into a folder of their own, and only those the machine
lacks (its torch, numpy, ... stay as they are). Everything lands in one JSON file, written again
after every part, so that a part that hangs or a hard time limit still leaves the others' figures:

- ``device``: name, count, capability, torch / CUDA / NCCL versions, bf16 support, the dense bf16
  peak from :data:`musiclm.train.monitor` 's table ("unknown" for a device not in it);
- ``matmul``: an 8192^3 bf16 matrix product, TFLOP/s and its fraction of the table peak;
- ``nccl``: an all-reduce over 2 processes (1 process where there is one GPU), its result checked;
- ``train/<stage>/zero<2|3>``: each stage (semantic, coarse, fine, codec) for a few steps through
  the real ``deepspeed`` launcher on 1 GPU with bf16: tokens/s, MFU (the engine's and one computed
  here from FLOPs per token and the peak), peak GPU memory;
- ``tokenize``: ``ray_jobs/tokenize.py`` with one Ray actor holding one GPU, on a tiny generated corpus;
- ``generate``: real-time factor of random demo-size parts on the GPU, fp32 and bf16 autocast.

Each part runs in a child process with its own timeout (a crash or a hang loses that part only)
and takes its turn against an overall budget; parts left when the budget is spent are recorded as
skipped. On a machine without a CUDA GPU nothing runs: the JSON says ``"gpu": false`` and the
command exits with :data:`NO_GPU_EXIT`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NO_GPU_EXIT = 3
NO_GPU_LINE = "no CUDA GPU: gpu_check measures bf16/NCCL/MFU on a GPU; nothing run"
LM_STAGES = ("semantic", "coarse", "fine")
TRAIN_STAGES = (*LM_STAGES, "codec")


# ----------------------------------------------------------------------------------------- pure parts


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 tensor-core peak (FLOP/s) of a GPU by its name, from the engine's own table
    (``musiclm.train.monitor``, the figure its ``perf/mfu`` divides by); None when not listed."""
    from musiclm.train.monitor import _GPU_PEAKS  # one table for the engine and this check

    for key, peak in _GPU_PEAKS:
        if key in device_name:
            return float(peak)
    return None


def mfu(tokens_per_s: float | None, flops_per_token: float | None, peak_flops: float | None, devices: int = 1):
    """Model FLOPs utilisation: achieved training FLOP/s over the peak of ``devices`` GPUs.
    ``"unknown"`` when the peak is not known; None when there is no throughput to divide."""
    if not peak_flops:
        return "unknown"
    if not tokens_per_s or not flops_per_token:
        return None
    return float(tokens_per_s) * float(flops_per_token) / (float(peak_flops) * devices)


def wheel_distribution(filename: str) -> str:
    """The normalised distribution name of a wheel file (``Foo_Bar-1.0-py3-none-any.whl`` -> ``foo-bar``)."""
    return re.sub(r"[-_.]+", "-", os.path.basename(filename).split("-", 1)[0]).lower()


# ------------------------------------------------------------------------------------------- detection


def detect() -> dict:
    """What this Python sees: ``{"gpu": bool, ...}``; never raises (no torch counts as no GPU)."""
    info: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    try:
        import torch
    except Exception as e:  # no torch at all: nothing to check
        return {**info, "gpu": False, "reason": f"torch does not import: {type(e).__name__}: {e}"}
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    if not torch.cuda.is_available():
        return {**info, "gpu": False, "reason": "torch.cuda.is_available() is False"}
    name = torch.cuda.get_device_name(0)
    peak = peak_bf16_flops(name)
    props = torch.cuda.get_device_properties(0)
    try:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as e:
        nccl = f"unavailable: {e}"
    info.update(
        gpu=True,
        device_name=name,
        device_count=torch.cuda.device_count(),
        capability=".".join(map(str, torch.cuda.get_device_capability(0))),
        memory_gib=round(props.total_memory / 2**30, 1),
        multiprocessors=props.multi_processor_count,
        bf16_supported=bool(torch.cuda.is_bf16_supported()),
        nccl=nccl,
        peak_bf16_tflops=peak / 1e12 if peak else "unknown",
    )
    return info


# ----------------------------------------------------------------------------------------- wheels


def install_missing_wheels(wheel_dir: str, target: str) -> dict:
    """Install the wheels of ``wheel_dir`` whose distribution this Python lacks into ``target``
    (``pip --no-index --no-deps``): the machine's torch and everything else it has stays."""
    from importlib import metadata

    wheels = sorted(str(p) for p in Path(wheel_dir).glob("*.whl")) if os.path.isdir(wheel_dir) else []
    present, missing = [], []
    for w in wheels:
        try:
            metadata.distribution(wheel_distribution(w))
            present.append(wheel_distribution(w))
        except metadata.PackageNotFoundError:
            missing.append(w)
    res: dict = {"wheel_dir": wheel_dir, "wheels": len(wheels), "already_installed": present, "target": target}
    if not missing:
        res.update(ok=True, installed=[])
        return res
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index"]
    cmd += ["--no-deps", "--target", target, "--find-links", wheel_dir, *missing]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    res.update(
        ok=proc.returncode == 0,
        installed=[wheel_distribution(w) for w in missing],
        seconds=round(time.time() - t0, 1),
    )
    if proc.returncode != 0:
        res["error"] = (proc.stdout + proc.stderr)[-3000:]
    return res


# ------------------------------------------------------------------------------------------ parts
# Each part runs in its own child process (`python -m musiclm.bench.gpu_check part NAME ...`) and
# returns a JSON-able dict. On a machine without a GPU they run only in a dry run (`run --allow_cpu`,
# DS_ACCELERATOR=cpu, gloo): that checks this module's own plumbing, and its figures mean nothing.


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _peak_here() -> float | None:
    import torch

    return peak_bf16_flops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None


def _bf16_supported() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def part_matmul(_args) -> dict:
    import torch

    device = _device()
    n = 8192 if device == "cuda" else 256
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync()
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync()
    seconds = (time.perf_counter() - t0) / reps
    tflops = 2 * n**3 / seconds / 1e12
    peak = _peak_here()
    return {"n": n, "tflops": tflops, "fraction_of_peak": tflops * 1e12 / peak if peak else "unknown"}


def _nccl_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    device = _device()
    if device == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    x = torch.full((1024,), float(rank + 1), device=device)
    dist.all_reduce(x)
    expected = world * (world + 1) / 2
    correct = bool(torch.all(x == expected).item())
    big = torch.ones(64 * 2**20 if device == "cuda" else 2**16, device=device)  # 256 MiB of fp32 on a GPU
    for _ in range(2):
        dist.all_reduce(big)
    _sync()
    t0 = time.perf_counter()
    reps = 5
    for _ in range(reps):
        dist.all_reduce(big)
    _sync()
    seconds = (time.perf_counter() - t0) / reps
    dist.barrier()
    dist.destroy_process_group()
    algbw = big.numel() * 4 / seconds / 1e9
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"correct": correct, "algbw_gb_s": algbw, "busbw_gb_s": algbw * 2 * (world - 1) / world}, f)


def part_nccl(_args) -> dict:
    import torch
    import torch.multiprocessing as mp

    # by its module name: run as `python -m`, this file is __main__, which spawned children re-import
    from musiclm.bench.gpu_check import _nccl_worker as worker
    from musiclm.net import free_port

    gpu = torch.cuda.is_available()
    world = 2 if torch.cuda.device_count() >= 2 or not gpu else 1
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(world, free_port(), tmp), nprocs=world, join=True)
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(world)]
    note = "one GPU: process-group init and a 1-rank all-reduce only" if world == 1 else f"{world} ranks"
    return {
        "world_size": world,
        "backend": "nccl" if gpu else "gloo (dry run)",
        "note": note,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpu else None,
        "all_reduce_correct": all(r["correct"] for r in ranks),
        "algbw_gb_s": ranks[0]["algbw_gb_s"],
        "busbw_gb_s": ranks[0]["busbw_gb_s"],
    }


def _train_config(stage: str, work: str, args) -> dict:
    """A run config of the stage at a size a GPU notices (``--preset``), synthetic shards."""
    from musiclm.bench.train import DEMO_TOKENS
    from musiclm.lm.stages import DEMO_WINDOWS

    train = {
        "max_steps": args.steps,
        "warmup_steps": 1,
        "min_lr_ratio": 0.1,
        "log_every": args.log_every,
        "eval_every": 0,
        "checkpoint_every": 0,
        "keep_checkpoints": 1,
        "tensorboard": False,
    }
    # torch_adam: DeepSpeed's own FusedAdam would be JIT-compiled with nvcc first (minutes)
    optimizer = {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "torch_adam": True}}
    ds = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_clipping": 1.0, "optimizer": optimizer}
    if stage == "codec":
        return {
            "name": "gpu-check-codec",
            "stage": "codec",
            "seed": 0,
            "data": {"shards": os.path.join(work, "audio"), "shuffle": 16, "prefetch": 4},
            "model": {"preset": args.codec_preset},
            "codec": {"crop_seconds": 1.0, "adversarial": False, "media_clips": 0},
            "train": {**train, "split_eval_every": 0},
            "deepspeed": ds,
        }
    return {
        "name": f"gpu-check-{stage}",
        "stage": stage,
        "seed": 0,
        "data": {"shards": os.path.join(work, "tokens"), "shuffle": 64, "prefetch": 4},
        "tokens": {**DEMO_TOKENS, "window_seconds": dict(DEMO_WINDOWS)},
        "model": {"preset": args.preset},
        "cond_dropout": 0.1,
        "train": train,
        "deepspeed": ds,
    }


def _flops_per_token(cfg: dict) -> tuple[float | None, int | None]:
    """FLOPs per token (per audio sample for the codec) and parameters, as the engine counts them."""
    from musiclm.train.spec import get_train_spec

    spec = get_train_spec(cfg["stage"])
    if spec.configure:
        spec.configure(cfg)
    model = spec.build_model(cfg)
    n = sum(p.numel() for p in model.parameters())
    fpt = spec.flops_per_token(model, cfg) if spec.flops_per_token else 6.0 * n
    return float(fpt), int(n)


def prepare_shards(work: str) -> dict:
    """Synthetic token shards (demo layout) and 24 kHz audio shards for the codec, once."""
    from musiclm.bench.train import DEMO_TOKENS
    from musiclm.lm.stages import DEMO_WINDOWS
    from musiclm.testing import make_synthetic_audio_shards, make_synthetic_token_shards

    t0 = time.time()
    if not os.path.exists(os.path.join(work, "tokens", "index.json")):
        tokens = {**DEMO_TOKENS, "window_seconds": dict(DEMO_WINDOWS)}
        make_synthetic_token_shards(
            os.path.join(work, "tokens"), tokens, n_train=256, n_eval=8, seconds=12.0, samples_per_shard=32
        )
    if not os.path.exists(os.path.join(work, "audio", "index.json")):
        make_synthetic_audio_shards(os.path.join(work, "audio"), n_train=32, n_eval=4, seconds=2.0, sample_rate=24000)
    return {"seconds": round(time.time() - t0, 1)}


def part_train(args) -> dict:
    """One stage, a few bf16 steps, through ``deepspeed --num_gpus 1 launch/train.py``."""
    import yaml

    from musiclm.bench.train import _after_warmup
    from musiclm.net import free_port
    from musiclm.train.monitor import read_metrics

    stage, zero = args.stage, args.zero
    cfg = _train_config(stage, args.work, args)
    name = f"{stage}-zero{zero}"
    cfg_path = os.path.join(args.work, f"{name}.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    run_dir = os.path.join(args.work, "runs", name)
    shutil.rmtree(run_dir, ignore_errors=True)
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    # the launcher as `deepspeed` runs it, by module: a --target install has no bin/ on PATH
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port())]
    cmd += [str(REPO / "launch" / "train.py"), "--config", cfg_path, "--run_dir", run_dir, "--resume", "none"]
    cmd += ["--deepspeed_config", str(REPO / "deepspeed_configs" / f"zero{zero}.json")]
    env = dict(os.environ, PYTHONUNBUFFERED="1", TORCH_EXTENSIONS_DIR=os.path.join(args.work, "torch_extensions"))
    log_path = run_dir + ".log"
    t0 = time.time()
    with open(log_path, "wb") as log:
        proc = subprocess.run(cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    text = Path(log_path).read_text(errors="replace")
    res: dict = {"stage": stage, "zero": zero, "rc": proc.returncode, "wall_s": round(time.time() - t0, 1)}
    m = re.search(r"([\d.]+)M params, world (\d+), ZeRO-(\d), micro batch (\d+).*?bf16 (\w+), optimizer (\S+)", text)
    if m:
        res.update(
            params_m=float(m[1]), world=int(m[2]), zero_engine=int(m[3]), micro_batch=int(m[4]), bf16=m[5] == "True"
        )
        res["optimizer"] = m[6].rstrip(",")
    recs = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    tps = _after_warmup(recs, "perf/tokens_per_s")
    res.update(
        steps=args.steps,
        tokens_per_s=tps,
        step_time_s=_after_warmup(recs, "perf/step_time_s"),
        peak_memory_gb=max((r["perf/peak_memory_gb"] for r in recs if r.get("perf/peak_memory_gb")), default=None),
        mfu_engine=_after_warmup(recs, "perf/mfu"),
        final_loss=next((r["train/loss"] for r in reversed(recs) if "train/loss" in r), None),
    )
    try:
        fpt, _n = _flops_per_token(cfg)
        res["flops_per_token"] = fpt
        res["mfu"] = mfu(tps, fpt, _peak_here())
    except Exception as e:
        res["mfu"] = f"not computed: {type(e).__name__}: {e}"
    if proc.returncode != 0 or tps is None:
        res["error"] = f"launcher rc {proc.returncode}, {len(recs)} metric records"
    elif _device() == "cuda" and _bf16_supported() and res.get("bf16") is not True:
        res["error"] = "the engine did not run in bf16 on a GPU that supports it (its setup line says so)"
    if "error" in res:
        res["log_tail"] = text[-3000:]
    return res


def part_tokenize(args) -> dict:
    """``ray_jobs/tokenize.py`` with one Ray actor on one GPU (a local Ray with token auth)."""
    import yaml

    from musiclm.bench import tokenize as tb
    from musiclm.codec.encodec import random_encodec_24khz
    from musiclm.data.demo_corpus import generate_corpus

    root = os.path.join(args.work, "tokenize")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    generate_corpus(os.path.join(root, "corpus"), args.clips, seed=0, seconds=10.0, progress=False)
    tok_cfg = tb._helpers().make_tiny_tokenizer_config(os.path.join(root, "models"), seed=0)
    # EnCodec at its real 24 kHz size (random weights): the compute of the real model, no download
    tok_cfg["acoustic"] = {
        "type": "encodec",
        "model": random_encodec_24khz(os.path.join(root, "enc")),
        "bandwidth": 6.0,
    }
    cfg_path = os.path.join(root, "tokenizers.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump({"segment_seconds": 10.0, "tokenizers": tok_cfg}, f)
    cmd = [sys.executable, str(tb.JOB), "--manifest", os.path.join(root, "corpus", "manifest.jsonl")]
    cmd += ["--config", cfg_path, "--out", os.path.join(root, "shards"), "--dataset", "gpu-check"]
    gpu = _device() == "cuda"
    cmd += ["--workers", "1", "--gpus-per-worker", "1" if gpu else "0", "--device", _device(), "--batch-size", "8"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=str(REPO), env=tb._job_env(root), capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    summary = tb._parse_summary(proc.stdout) or {}
    plan = next((ln.strip() for ln in text.splitlines() if "[tokenize] ray" in ln), None)
    res: dict = {
        "rc": proc.returncode,
        "process_s": round(time.time() - t0, 1),
        "worker_plan": plan,
        "actor_on_gpu": bool(plan and " on cuda" in plan and "x 1 GPU" in plan),
        "clips": args.clips,
        **{
            k: summary.get(k)
            for k in ("clips_ok", "clips_failed", "audio_seconds_per_s", "steady_audio_seconds_per_s", "elapsed_s")
        },
    }
    if proc.returncode != 0 or not summary or (gpu and not res["actor_on_gpu"]):
        res["error"] = "tokenize job failed or did not run its actor on the GPU"
        res["log_tail"] = text[-3000:]
    return res


def part_generate(args) -> dict:
    """Real-time factor of random demo-size parts with the stage LMs and the codec on the GPU."""
    import torch

    from musiclm.bench.generate import CAPTION, random_parts
    from musiclm.generate import MusicLM

    device = _device()
    with tempfile.TemporaryDirectory() as tmp:
        parts = random_parts(args.gen_preset, tmp, seed=0)
    for _stage, model in parts["stages"].values():
        model.to(device)
    codec = parts["tokenizers"].acoustic  # MuLaN (captions, reranking) stays on the CPU
    codec.model.to(device)
    codec.device = torch.device(device)
    lm = MusicLM(**parts)
    lm.generate(CAPTION, duration=1.0, num_samples=1, seed=0, progress=False)  # warm-up (kernels, allocator)
    out: dict = {
        "duration_s": args.duration,
        "num_samples": args.num_samples,
        "parts": f"random {args.gen_preset}-size",
        "device": str(lm.device),
    }
    for label, ctx in (("fp32", None), ("bf16_autocast", torch.bfloat16)):
        try:
            _sync()
            t0 = time.perf_counter()
            if ctx is None:
                res = lm.generate(CAPTION, duration=args.duration, num_samples=args.num_samples, seed=0, progress=False)
            else:
                with torch.autocast(device, dtype=ctx):
                    res = lm.generate(
                        CAPTION, duration=args.duration, num_samples=args.num_samples, seed=0, progress=False
                    )
            _sync()
            wall = time.perf_counter() - t0
            out[label] = {
                "rtf": wall / args.duration,
                "per_stage_rtf": {k: v / args.duration for k, v in res.timings.items() if k != "total"},
                "wall_s": wall,
            }
        except Exception as e:
            out[label] = {"error": f"{type(e).__name__}: {e}"}
    out["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return out


PARTS = {
    "matmul": part_matmul,
    "nccl": part_nccl,
    "train": part_train,
    "tokenize": part_tokenize,
    "generate": part_generate,
}


# ------------------------------------------------------------------------------------- orchestration


class Report:
    """The one JSON file, rewritten after every change."""

    def __init__(self, path: str, doc: dict):
        self.path, self.doc = path, doc
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.save()

    def save(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=2, default=str)
        os.replace(tmp, self.path)


def _run_part(key: str, argv: list[str], timeout: float, env: dict, work: str) -> dict:
    """One part in a child process, killed (its whole process group) at ``timeout``."""
    out = os.path.join(work, re.sub(r"\W", "_", key) + ".json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, "-m", "musiclm.bench.gpu_check", "part", *argv, "--work", work, "--result", out]
    t0 = time.time()
    log_path = out[:-5] + ".log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc = None
    seconds = round(time.time() - t0, 1)
    if os.path.exists(out):
        with open(out) as f:
            res = json.load(f)
    else:
        tail = Path(log_path).read_text(errors="replace")[-3000:]
        res = {
            "ok": False,
            "error": f"timed out after {timeout:.0f} s" if rc is None else f"exit {rc}",
            "log_tail": tail,
        }
    res["seconds"] = seconds
    return res


def plan(args) -> list[tuple[str, list[str], float]]:
    """(key, part argv, its own timeout) in order of importance: what matters most runs first."""
    t = [("matmul", ["matmul"], 60.0), ("nccl", ["nccl"], 60.0)]
    common = ["--steps", str(args.steps), "--log_every", str(args.log_every), "--micro_batch", str(args.micro_batch)]
    common += ["--preset", args.preset, "--codec_preset", args.codec_preset]
    stages = [s for s in TRAIN_STAGES if s in args.stages.split(",")]
    zeros = [int(z) for z in args.zero.split(",")]
    first, rest = zeros[:1], zeros[1:]
    for z in first:
        t += [(f"train/{s}/zero{z}", ["train", "--stage", s, "--zero", str(z), *common], 120.0) for s in stages]
    gen = ["generate", "--duration", str(args.duration), "--num_samples", "4", "--gen_preset", args.gen_preset]
    t.append(("generate", gen, 90.0))
    t.append(("tokenize", ["tokenize", "--clips", str(args.clips)], 150.0))
    for z in rest:
        t += [(f"train/{s}/zero{z}", ["train", "--stage", s, "--zero", str(z), *common], 120.0) for s in stages]
    return t


def run(args) -> int:
    t_start = time.time()
    info = detect()
    doc = {"gpu": info["gpu"], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": info}
    if not info["gpu"] and not args.allow_cpu:
        doc["message"] = NO_GPU_LINE
        Report(args.out, doc)
        print(NO_GPU_LINE, flush=True)
        return NO_GPU_EXIT
    doc.update(budget_s=args.budget, parts={})
    if not info["gpu"]:
        doc["dry_run"] = "--allow_cpu: the parts ran on the CPU to check this script; figures mean nothing"
    report = Report(args.out, doc)
    work = args.work or tempfile.mkdtemp(prefix="musiclm-gpu-check-")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ)
    site = os.path.join(work, "site")
    if args.wheels:
        inst = install_missing_wheels(args.wheels, site)
        doc["wheels"] = inst
        report.save()
        print(f"[gpu_check] wheels: {len(inst.get('installed', []))} installed, ok={inst['ok']}", flush=True)
    paths = [site, str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not info["gpu"]:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    deadline = t_start + args.budget
    prep_left = deadline - time.time()
    doc["parts"]["shards"] = _run_part("shards", ["shards"], min(90.0, prep_left), env, work)
    report.save()
    for key, argv, own in plan(args):
        left = deadline - time.time()
        if left < 15:
            doc["parts"][key] = {"ok": False, "skipped": f"out of time (budget {args.budget:.0f} s)"}
            report.save()
            continue
        print(f"[gpu_check] {key} (limit {min(own, left):.0f} s)", flush=True)
        res = _run_part(key, argv, min(own, left), env, work)
        doc["parts"][key] = res
        report.save()
        print(f"[gpu_check] {key}: {'ok' if res.get('ok') else 'FAILED: ' + str(res.get('error'))[:200]}", flush=True)
    doc["total_s"] = round(time.time() - t_start, 1)
    doc["ok"] = all(p.get("ok") for p in doc["parts"].values())
    report.save()
    print(f"[gpu_check] done in {doc['total_s']} s, all ok: {doc['ok']}; JSON: {args.out}", flush=True)
    return 0 if doc["ok"] else 1


def run_part(args) -> int:
    """Child side: run one part, write ``{"ok": ..., ...}`` to ``--result``."""
    try:
        if args.part == "shards":
            res = prepare_shards(args.work)
        else:
            res = PARTS[args.part](args)
        res.setdefault("ok", "error" not in res)
    except Exception as e:
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    with open(args.result, "w") as f:
        json.dump(res, f, indent=2, default=str)
    return 0 if res["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="every part, one JSON")
    r.add_argument("--out", required=True, help="the JSON file")
    r.add_argument("--wheels", default=None, help="folder of wheels to install where this Python lacks them")
    r.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    r.add_argument("--budget", type=float, default=280.0, help="seconds for everything (each part has its own limit)")
    r.add_argument("--stages", default=",".join(TRAIN_STAGES))
    r.add_argument("--zero", default="2,3", help="ZeRO stages, the first one for every stage before the rest")
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--log_every", type=int, default=5)
    r.add_argument("--micro_batch", type=int, default=16)
    r.add_argument("--preset", default="base", help="LM preset of the stage models (tiny|small|base|paper)")
    r.add_argument("--codec_preset", default="paper", help="SoundStream preset (tiny|demo|paper)")
    r.add_argument("--duration", type=float, default=10.0, help="seconds of audio per generated candidate")
    r.add_argument("--clips", type=int, default=8, help="10 s clips of the tokenization corpus")
    r.add_argument("--gen_preset", default="demo", help="random generation parts (demo|tiny)")
    r.add_argument(
        "--allow_cpu", action="store_true", help="dry run without a GPU (checks this script; figures mean nothing)"
    )
    d = sub.add_parser("detect", help="print what this Python sees (JSON)")
    d.add_argument("--out", default=None)
    q = sub.add_parser("part", help="one part (used by run)")
    q.add_argument("part", choices=["shards", *PARTS])
    q.add_argument("--work", required=True)
    q.add_argument("--result", required=True)
    q.add_argument("--stage", default="coarse")
    q.add_argument("--zero", type=int, default=2)
    q.add_argument("--steps", type=int, default=30)
    q.add_argument("--log_every", type=int, default=5)
    q.add_argument("--micro_batch", type=int, default=16)
    q.add_argument("--preset", default="base")
    q.add_argument("--codec_preset", default="paper")
    q.add_argument("--duration", type=float, default=10.0)
    q.add_argument("--num_samples", type=int, default=4)
    q.add_argument("--clips", type=int, default=8)
    q.add_argument("--gen_preset", default="demo")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "run":
        return run(args)
    if args.cmd == "part":
        return run_part(args)
    info = detect()
    print(json.dumps(info, indent=2))
    if args.out:
        Report(args.out, info)
    return 0 if info["gpu"] else NO_GPU_EXIT


if __name__ == "__main__":
    sys.exit(main())
