"""The one training loop: DeepSpeed ZeRO 0-3 for every registered stage.

    deepspeed [--num_gpus N | --hostfile H] launch/train.py --stage coarse \\
        --config launch/configs/coarse.yaml --deepspeed_config deepspeed_configs/zero2.json

A stage (``musiclm.train.spec.TrainSpec``) contributes its model, batch layout and objective;
this module does the rest, once:

- distributed init (NCCL on GPU, gloo on CPU with ``DS_ACCELERATOR=cpu``), one DeepSpeed engine;
  micro batch, gradient accumulation, clipping, optimizer and ZeRO stage come from the DeepSpeed
  config (the YAML's ``deepspeed:`` section overrides keys of it); ``"bf16": {"enabled": "auto"}``
  turns bf16 on only where the accelerator runs it natively (CUDA with bf16), fp32 elsewhere;
- learning rate: linear warmup + cosine decay to ``min_lr_ratio`` (``train.warmup_steps``,
  ``train.max_steps``), a LambdaLR handed to ``deepspeed.initialize`` (a ``scheduler`` section in
  the DeepSpeed config replaces it);
- data: shards streamed per rank (``musiclm.train.data``), refused when their tokenizer
  fingerprints do not match the config;
- checkpoints every ``train.checkpoint_every`` steps, at the end, and on SIGTERM/SIGINT (the flag
  is all-reduced so every rank stops at the same step boundary, saves, and exits 0);
  ``--resume auto`` continues from the newest complete checkpoint, converting it to a universal
  checkpoint first when the world size changed;
- TensorBoard + metrics.jsonl + loss.png (``musiclm.train.monitor``), tqdm on rank 0;
- eval loss on the held-out split every ``train.eval_every`` steps; for stages with split-level
  metrics (``TrainSpec.eval_outputs``/``eval_summary``, e.g. MuLaN retrieval R@k over every eval
  clip) one pass over the whole eval split every ``train.split_eval_every`` steps and at the end.

Config (YAML) keys used here; the stage reads its own (``tokens``, ``model``, ``cond_dropout``)::

    name: coarse-demo          # run folder runs/<name> (``--run_dir`` overrides)
    runs_root: runs
    seed: 0
    data:
      shards: shards/rapbeats/tokens-<hash>   # folder(s) or s3:// URLs
      train_split: train
      eval_split: eval
      shuffle: 1000
      prefetch: 4              # batches built ahead (by a thread, or per worker)
      num_workers: 0           # DataLoader worker processes per rank (expensive examples, e.g. audio)
    fingerprint_hash: null     # optional: exact hash of the shards' tokenizer fingerprints
    train:
      max_steps: 2000          # also the cosine horizon
      max_minutes: null        # stop (and checkpoint) after this many minutes
      warmup_steps: 100
      min_lr_ratio: 0.1
      log_every: 10
      eval_every: 200
      eval_batches: 4
      split_eval_every: null   # whole-split metrics (stages that define them); default eval_every
      split_eval_samples: 1000 # at most this many eval samples for them
      checkpoint_every: 200
      keep_checkpoints: 3
      peak_flops: null         # FLOP/s of one device for MFU (CPU: set it; known GPUs: detected)
      probe_logits: false      # at the end, save the logits of one eval batch (export tests)
    deepspeed: {}              # overrides merged into --deepspeed_config
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import socket
import sys
import time
import zlib
from typing import Any

import numpy as np
import torch

from . import checkpoint as ckpt
from . import data as tdata
from ..config import add_set_argument, apply_overrides, deep_merge, load_config
from .build_locks import clear_stale_build_locks
from .monitor import Monitor, device_peak_flops, peak_memory_gb
from .spec import TrainSpec, get_train_spec

_PROCESS_START = time.time()  # (module import time, close to the process start under the launcher)

__all__ = ["Trainer", "load_config", "load_ds_config", "apply_overrides", "deep_merge", "train_main"]


# -----------------------------------------------------------------------------------------------
# configs


def _bf16_native() -> bool:
    try:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        if acc.device_name() == "cpu":
            return False
        return bool(acc.is_bf16_supported())
    except Exception:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def load_ds_config(path: str | dict | None, cfg: dict | None = None) -> dict:
    """The DeepSpeed config: the JSON file, the YAML's ``deepspeed:`` overrides, "auto" resolved."""
    if isinstance(path, dict):
        ds = copy.deepcopy(path)
    elif path:
        with open(path) as f:
            ds = json.load(f)
    else:
        ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
              "zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}
    ds = deep_merge(ds, (cfg or {}).get("deepspeed") or {})
    ds.pop("train_batch_size", None) if "train_micro_batch_size_per_gpu" in ds else None
    for key in ("bf16", "fp16"):
        sec = ds.get(key)
        if isinstance(sec, dict) and sec.get("enabled") == "auto":
            sec["enabled"] = _bf16_native() if key == "bf16" else False
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mix_seed(*parts) -> int:
    return zlib.crc32(json.dumps([int(p) for p in parts]).encode()) & 0x7FFFFFFF


class WarmupCosine:
    """lr multiplier: linear warmup over ``warmup`` steps, cosine to ``min_ratio`` at ``total``."""

    def __init__(self, warmup: int, total: int, min_ratio: float):
        self.warmup, self.total, self.min_ratio = int(warmup), int(total), float(min_ratio)

    def __call__(self, step: int) -> float:
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        p = min(1.0, max(0.0, (step - self.warmup) / span))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


# -----------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Runs one stage. ``Trainer(spec, cfg, ds_config, run_dir=...).run()`` -> exit code."""

    def __init__(self, spec: TrainSpec | str, cfg: dict, ds_config: dict | str | None, *, run_dir: str | None = None,
                 resume: str = "auto", stop_after: int | None = None, log_prefix: str = "[musiclm.train]"):
        self.spec = get_train_spec(spec) if isinstance(spec, str) else spec
        self.cfg = copy.deepcopy(cfg)
        self.cfg.setdefault("stage", self.spec.name)
        self.ds_config = load_ds_config(ds_config, self.cfg)
        tr = self.cfg.setdefault("train", {})
        self.tcfg = tr
        self.max_steps = int(tr.get("max_steps", 1000))
        name = self.cfg.get("name") or self.spec.name
        self.run_dir = run_dir or os.path.join(self.cfg.get("runs_root", "runs"), name)
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        self.cfg["run_dir"] = self.run_dir  # stages may write run files (e.g. skipped samples)
        self.resume = resume
        self.stop_after = stop_after
        self.seed = int(self.cfg.get("seed", 0))
        self.log_prefix = log_prefix
        self.engines: dict[str, Any] = {}
        self._signal: int | None = None
        self.rank, self.world_size, self.local_rank = 0, 1, 0

    # -- helpers -------------------------------------------------------------------------------

    def log(self, msg: str, all_ranks: bool = False) -> None:
        if all_ranks or self.rank == 0:
            print(f"{self.log_prefix} {msg}" if self.world_size == 1 or not all_ranks
                  else f"{self.log_prefix}[rank {self.rank}] {msg}", flush=True)

    def log_all(self, msg: str) -> None:
        self.log(msg, all_ranks=True)

    def _on_signal(self, signum, frame):
        if self._signal is None:
            self._signal = signum
            try:
                sys.stderr.write(f"{self.log_prefix}[rank {self.rank}] got {signal.Signals(signum).name}: "
                                 "will checkpoint at the next step boundary and exit\n")
            except Exception:
                pass

    def barrier(self):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if torch.distributed.is_initialized() and self.world_size > 1:
            dev = self.comm_device
            x = t.to(dev)
            torch.distributed.all_reduce(x, op=op or torch.distributed.ReduceOp.SUM)
            return x.cpu()
        return t

    def _broadcast_int(self, value: int) -> int:
        if torch.distributed.is_initialized() and self.world_size > 1:
            t = torch.tensor([int(value)], dtype=torch.int64).to(self.comm_device)
            torch.distributed.broadcast(t, src=0)
            return int(t.item())
        return int(value)

    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}

    def client_optimizer(self, params: list, ds_config: dict) -> tuple[torch.optim.Optimizer | None, dict]:
        """torch's AdamW in place of DeepSpeed's for the config's Adam/AdamW, on CPU by default
        (``train.optimizer: auto``; ``torch`` or ``deepspeed`` force one). DeepSpeed's CPU Adam is
        a C++ op JIT-compiled on first use: 70-150 s per fresh machine or venv, minutes more on a
        loaded one, for no gain at our sizes. The update is the same (decoupled weight decay,
        like DeepSpeed's default ``adam_w_mode``). Returns (optimizer or None, the config to
        initialize with: without the ``optimizer`` section it replaces)."""
        choice = str(self.tcfg.get("optimizer", "auto"))
        if choice not in ("auto", "torch", "deepspeed"):
            raise ValueError(f"train.optimizer must be auto, torch or deepspeed, got {choice!r}")
        sec = ds_config.get("optimizer") or {}
        kind = str(sec.get("type", "")).lower()
        use_torch = choice == "torch" or (choice == "auto" and self.device.type == "cpu")
        if not use_torch or kind not in ("adam", "adamw"):
            return None, ds_config
        p = dict(sec.get("params") or {})
        cls = torch.optim.AdamW if p.pop("adam_w_mode", True) or kind == "adamw" else torch.optim.Adam
        opt = cls(params, lr=float(p.get("lr", 1e-3)), betas=tuple(p.get("betas", (0.9, 0.999))),
                  eps=float(p.get("eps", 1e-8)), weight_decay=float(p.get("weight_decay", 0.0)))
        conf = {k: v for k, v in ds_config.items() if k != "optimizer"}
        conf["zero_allow_untested_optimizer"] = True
        return opt, conf

    def make_engine(self, module, name: str, ds_overrides: dict | None = None, **kw):
        """An extra DeepSpeed engine (custom steps, e.g. a codec's discriminator): saved with every
        checkpoint under ``<tag>/<name>/`` and restored from the resumed checkpoint right here.
        Call it on every rank, in the same order (e.g. from ``custom_step`` on its first call)."""
        import deepspeed

        if name in self.engines:
            return self.engines[name]
        conf = deep_merge(self.ds_config, ds_overrides or {})
        params = [p for p in module.parameters() if p.requires_grad]
        if "optimizer" not in kw:
            kw["optimizer"], conf = self.client_optimizer(params, conf)
        eng, *_ = deepspeed.initialize(model=module, model_parameters=params, config=conf, **kw)
        self.engines[name] = eng
        plan = getattr(self, "_plan", None)
        if plan is not None and plan.tag and os.path.isdir(os.path.join(plan.tag_dir, name)):
            tag = name
            if plan.universal:
                if self.rank == 0:
                    ckpt.ensure_universal(plan.tag_dir, name, log=self.log)
                self.barrier()
                tag = f"{name}_universal"
            path, _ = eng.load_checkpoint(plan.tag_dir, tag=tag)
            if path is None:
                raise RuntimeError(f"DeepSpeed could not load {plan.tag_dir}/{tag}")
        return eng

    # -- setup ---------------------------------------------------------------------------------

    def _init_distributed(self):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:  # plain `python train.py`
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                               "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                               "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.local_rank == 0:  # a killed compile's lock would make any JIT build hang silently
            clear_stale_build_locks(log=self.log_all)
        acc = get_accelerator()
        if acc.device_name() == "cpu":
            self.device = torch.device("cpu")
        else:  # bind the GPU before the process group exists (NCCL)
            acc.set_device(self.local_rank)
            self.device = torch.device(acc.device_name(self.local_rank))
        if acc.device_name() == "cpu" and not self.tcfg.get("shm_allreduce", False):
            # DeepSpeed's comm backend probes every op it knows (compiler subprocesses) and
            # JIT-compiles a shared-memory all-reduce for CPU ranks (65-380 s on a fresh machine).
            # gloo all-reduces what our models need in milliseconds: skip both unless asked.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}
        deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()
        backend = torch.distributed.get_backend()
        self.comm_device = self.device if backend == "nccl" else torch.device("cpu")
        if self.device.type == "cpu" and self.tcfg.get("shm_allreduce", False):
            self.barrier()  # every rank has mapped its peers' shared-memory segments by now
            _unlink_shm_buffer(self.rank)

    def _data_dirs(self) -> list[str]:
        return tdata.as_list((self.cfg.get("data") or {}).get("shards"))

    def check_data(self) -> list[dict]:
        """Refuse shards made by other tokenizers than the config describes (before any DeepSpeed work)."""
        dirs = self._data_dirs()
        if not dirs:
            raise ValueError("config has no data.shards (a shard folder, a glob, or a list of them)")
        expected = self.spec.expected_fingerprints(self.cfg) if self.spec.expected_fingerprints else None
        dirs, indexes = tdata.resolve_shard_dirs(dirs, expected, self.cfg.get("fingerprint_hash"))
        self.cfg.setdefault("data", {})["shards"] = dirs if len(dirs) > 1 else dirs[0]
        return indexes

    def _check_resume_tokens(self, plan, indexes: list[dict]) -> None:
        """A checkpoint trained on shards of other tokenizers (another vocabulary, another
        conditioning codebook) must not be resumed on these: say so instead of failing on tensor
        shapes, or worse, continuing on tokens that mean something else."""
        old = (plan.state or {}).get("fingerprint_hash") if plan.tag else None
        new = indexes[0].get("fingerprint_hash") if indexes else None
        if old and new and old != new:
            raise tdata.ResumeOnOtherTokens(plan.tag_dir, old, new)

    # -- main ----------------------------------------------------------------------------------

    def run(self) -> int:
        t_start = time.time()
        if self.spec.configure:
            self.spec.configure(self.cfg)
        indexes = self.check_data() if self.spec.data_kind in ("tokens", "audio") else []
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._run(t_start, indexes)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _run(self, t_start: float, indexes: list[dict]) -> int:
        timings = {"check_data": time.time() - t_start}
        t1 = time.time()
        self._init_distributed()
        import deepspeed

        timings["init_distributed"] = time.time() - t1

        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            removed = ckpt.remove_partials(self.ckpt_root)
            if removed:
                self.log(f"removed checkpoints cut off mid-write: {removed}")
        self.barrier()

        # resume plan (before the engine exists: a world-size change needs the universal loader)
        if self.resume == "none" and ckpt.complete_checkpoints(self.ckpt_root):
            raise RuntimeError(f"{self.ckpt_root} has checkpoints; use --resume auto or another --run_dir/--name")
        if self.resume == "auto":
            # every rank loads the checkpoint rank 0 picked (a shared file system may list lazily)
            plan = ckpt.plan_resume(self.ckpt_root, "auto", self.world_size) if self.rank == 0 else None
            chosen = self._broadcast_int(plan.step if plan is not None and plan.tag else -1)
            if self.rank != 0:
                plan = (ckpt.plan_resume(self.ckpt_root, ckpt.tag_for_step(chosen), self.world_size)
                        if chosen >= 0 else ckpt.ResumePlan())
        else:  # "none" or an explicit checkpoint folder/tag
            plan = ckpt.plan_resume(self.ckpt_root, self.resume, self.world_size)
        self._check_resume_tokens(plan, indexes)
        load_tag = ckpt.MAIN_ENGINE
        if plan.tag and plan.universal:
            t2 = time.time()
            if self.rank == 0:
                load_tag = ckpt.ensure_universal(plan.tag_dir, ckpt.MAIN_ENGINE, log=self.log)
            self.barrier()
            timings["universal_conversion"] = time.time() - t2
            load_tag = f"{ckpt.MAIN_ENGINE}_universal"
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True

        self._plan = plan

        # model (same init on every rank), engine
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)
        model = self.spec.build_model(self.cfg)
        n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        fpt = (self.spec.flops_per_token(model, self.cfg) if self.spec.flops_per_token else 6.0 * n_params)
        timings["build_model"] = time.time() - t1 - timings["init_distributed"] - timings.get("universal_conversion", 0.0)
        t1 = time.time()
        kw = {}
        if "scheduler" not in self.ds_config:
            sched = WarmupCosine(int(self.tcfg.get("warmup_steps", 0)), self.max_steps,
                                 float(self.tcfg.get("min_lr_ratio", 0.1)))
            kw["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched)
        params = [p for p in model.parameters() if p.requires_grad]
        kw["optimizer"], conf = self.client_optimizer(params, self.ds_config)
        engine, _opt, _, _sched = deepspeed.initialize(model=model, model_parameters=params, config=conf, **kw)
        self.engine = engine
        self.engines = {ckpt.MAIN_ENGINE: engine}
        timings["deepspeed_initialize"] = time.time() - t1
        t1 = time.time()
        self.device = engine.device if self.device.type != "cpu" else self.device
        micro = engine.train_micro_batch_size_per_gpu()
        gas = engine.gradient_accumulation_steps()
        zero_stage = engine.zero_optimization_stage()

        # restore
        step = 0
        positions = None
        if plan.tag:
            load_path, _client = engine.load_checkpoint(plan.tag_dir, tag=load_tag, load_module_strict=True,
                                                        load_optimizer_states=True, load_lr_scheduler_states=True)
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {plan.tag_dir}/{load_tag}")
            step = plan.step
            positions = plan.state.get("data") or {}
            rng_file = os.path.join(plan.tag_dir, "rng", f"rank{self.rank}.json")
            if not plan.universal and os.path.isfile(rng_file):
                with open(rng_file) as f:
                    ckpt.set_rng_state(json.load(f))
            self.log(f"resumed from {plan.tag_dir} at step {step}"
                     + (f" (world size {plan.state['world_size']} -> {self.world_size}, universal checkpoint)"
                        if plan.universal else ""))
        pos = self._start_position(positions)
        timings["load_checkpoint"] = time.time() - t1
        prev = plan.state if plan.tag else {}
        samples_seen = int(prev.get("samples_seen", 0))
        tokens_seen = int(prev.get("tokens_seen", 0))
        elapsed_before = float(prev.get("elapsed_s", 0.0))

        # data
        dcfg = self.cfg.get("data") or {}
        dirs = self._data_dirs()
        train_urls = tdata.shard_urls(dirs, dcfg.get("train_split", "train"))
        eval_urls = tdata.shard_urls(dirs, dcfg.get("eval_split", "eval"))
        stream = tdata.BatchStream(
            train_urls, dcfg.get("train_split", "train"), build_example=self.spec.build_example,
            collate=self.spec.collate, cfg=self.cfg, batch_size=micro, rank=self.rank, world_size=self.world_size,
            seed=self.seed, shuffle=int(dcfg.get("shuffle", 1000)), position=pos, prefetch=int(dcfg.get("prefetch", 4)),
            num_workers=int(dcfg.get("num_workers", 0)))
        self.eval_cfg = copy.deepcopy(self.cfg)
        self.eval_cfg["cond_dropout"] = 0.0

        # run folder, monitor
        monitor = Monitor(self.run_dir, enabled=self.rank == 0, resume_step=step if plan.tag else None,
                          tensorboard=bool(self.tcfg.get("tensorboard", True)))
        if self.rank == 0:
            import yaml

            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                yaml.safe_dump(self.cfg, f, sort_keys=False)
            with open(os.path.join(self.run_dir, "ds_config.json"), "w") as f:
                json.dump(self.ds_config, f, indent=1)
        fps = (indexes[0].get("fingerprints") if indexes else None) or {}
        fp_hash = indexes[0].get("fingerprint_hash") if indexes else None
        peak = device_peak_flops(self.device, self.tcfg.get("peak_flops"))
        self.log(f"stage {self.spec.name}: {n_params / 1e6:.2f}M params, world {self.world_size}, ZeRO-{zero_stage}, "
                 f"micro batch {micro} x grad accum {gas}, bf16 {engine.bfloat16_enabled()}, "
                 f"{len(train_urls)} train / {len(eval_urls)} eval shards, run dir {self.run_dir}")
        monitor.text("config", "```\n" + json.dumps(self.cfg, indent=1, default=str) + "\n```", step)
        timings["process_to_train"] = time.time() - _PROCESS_START
        self.log("setup " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "process_to_train")
                 + f"; process start to training {timings['process_to_train']:.1f}s")

        log_every = max(1, int(self.tcfg.get("log_every", 10)))
        eval_every = int(self.tcfg.get("eval_every", 0) or 0)
        split_every = 0
        if self.spec.eval_outputs is not None:
            split_every = int(self.tcfg.get("split_eval_every") or eval_every or 0)
        last_split_eval = None
        ckpt_every = int(self.tcfg.get("checkpoint_every", 0) or 0)
        keep = self.tcfg.get("keep_checkpoints", 3)
        max_minutes = self.tcfg.get("max_minutes")
        metric_keys: list[str] | None = None
        acc_time = acc_wait = 0.0
        acc_tokens = acc_samples = 0.0
        last_saved = step if plan.tag else -1
        stop_reason = None

        pbar = None
        if self.rank == 0:
            try:
                from tqdm import tqdm

                pbar = tqdm(total=self.max_steps, initial=step, desc=self.spec.name, dynamic_ncols=True,
                            mininterval=1.0 if sys.stderr.isatty() else 10.0, file=sys.stderr)
            except Exception:
                pbar = None

        def save(at_step):
            nonlocal last_saved
            all_pos = self._gather_positions(stream.state())
            state = {
                "spec": self.spec.name, "world_size": self.world_size, "zero_stage": zero_stage,
                "data": {"world_size": self.world_size, "positions": all_pos},
                "samples_seen": samples_seen, "tokens_seen": tokens_seen,
                "elapsed_s": elapsed_before + (time.time() - t_start),
                "config": self.cfg, "ds_config": self.ds_config,
                "fingerprints": fps, "fingerprint_hash": fp_hash,
                "model_config": self.spec.model_config(self.cfg) if self.spec.model_config else None,
            }
            ckpt.save_checkpoint(self.engines, self.ckpt_root, at_step, state, rank=self.rank, barrier=self.barrier,
                                 keep=keep, log=self.log)
            last_saved = at_step

        engine.train()
        t_train = time.time()  # train.max_minutes counts from here: start-up is not training time
        first_step_done = False
        try:
            while step < self.max_steps:
                t0 = time.perf_counter()
                torch.manual_seed(_mix_seed(self.seed, step, self.rank))
                lr = float(engine.get_lr()[0]) if hasattr(engine, "get_lr") else float("nan")
                losses, mets, wait, n_tok, n_smp = [], [], 0.0, 0, 0
                manual_norm = None
                for _micro in range(gas):
                    tw = time.perf_counter()
                    batch, _pos = next(stream)
                    wait += time.perf_counter() - tw
                    n_tok += (self.spec.count_tokens(batch) if self.spec.count_tokens
                              else int(batch["tokens"].numel()) if "tokens" in batch else micro)
                    n_smp += micro
                    batch = self._to_device(batch)
                    if self.spec.custom_step is not None:
                        loss, metrics = self.spec.custom_step(self, batch)
                    else:
                        loss, metrics = self.spec.loss(engine, batch)
                        engine.backward(loss)
                        if zero_stage == 0 and _micro == gas - 1:
                            manual_norm = self._grad_norm(engine)  # DeepSpeed keeps none without ZeRO
                        engine.step()
                    losses.append(float(loss.detach().float()))
                    mets.append({k: float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v)
                                 for k, v in (metrics or {}).items() if k not in ("loss", "tokens")})
                step += 1
                grad_norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
                grad_norm = grad_norm if grad_norm is not None else manual_norm
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
                if metric_keys is None:
                    metric_keys = sorted(mets[0])
                local = [sum(losses) / len(losses)]
                for k in metric_keys:
                    vals = [m[k] for m in mets if k in m]
                    local.append(sum(vals) / len(vals) if vals else float("nan"))
                step_time = time.perf_counter() - t0
                timed_out = bool(max_minutes) and self.rank == 0 and (time.time() - t_train) / 60.0 >= float(max_minutes)
                flags = [float(n_tok), float(n_smp), 1.0 if self._signal is not None else 0.0, 1.0 if timed_out else 0.0]
                red = self._all_reduce(torch.tensor(local + flags, dtype=torch.float64))
                red_metrics = (red[:len(local)] / self.world_size).tolist()
                g_tok, g_smp, sig_flag, time_flag = red[len(local):].tolist()
                tokens_seen += int(g_tok)
                samples_seen += int(g_smp)
                acc_time += step_time
                acc_wait += wait
                acc_tokens += g_tok
                acc_samples += g_smp

                if not first_step_done:
                    first_step_done = True
                    self._log_startup(timings, monitor, step)
                if self.rank == 0:
                    rec = {"train/loss": red_metrics[0], "train/lr": lr, "train/grad_norm": grad_norm}
                    for k, v in zip(metric_keys, red_metrics[1:]):
                        rec[f"train/{k}"] = v
                    if step % log_every == 0 or step == self.max_steps:
                        tps = acc_tokens / acc_time if acc_time > 0 else 0.0
                        rec.update({
                            "perf/tokens_per_s": tps,
                            "perf/samples_per_s": acc_samples / acc_time if acc_time > 0 else 0.0,
                            "perf/step_time_s": acc_time / max(1, log_every),
                            "perf/data_wait_s": acc_wait / max(1, log_every),
                            "perf/peak_memory_gb": peak_memory_gb(self.device),
                            "perf/mfu": (fpt * tps / (peak * self.world_size)) if peak else None,
                            "progress/tokens_seen": tokens_seen, "progress/samples_seen": samples_seen,
                        })
                        acc_time = acc_wait = acc_tokens = acc_samples = 0.0
                    monitor.log(step, rec)
                    if pbar is not None:
                        pbar.update(1)
                        pbar.set_postfix(loss=f"{red_metrics[0]:.3f}", lr=f"{lr:.2e}", refresh=False)

                if eval_every and step % eval_every == 0 and eval_urls:
                    ev = self.evaluate(eval_urls, micro)
                    if self.rank == 0 and ev:
                        monitor.log(step, ev)
                        self.log(f"step {step}: eval loss {ev.get('eval/loss', float('nan')):.4f}")
                if split_every and step % split_every == 0 and eval_urls:
                    self._split_eval(step, eval_urls, micro, monitor)
                    last_split_eval = step

                if sig_flag > 0:
                    stop_reason = "signal"
                elif time_flag > 0:
                    stop_reason = "max_minutes"
                elif self.stop_after is not None and step >= self.stop_after:
                    stop_reason = "stop_after"
                if stop_reason or step == self.max_steps or (ckpt_every and step % ckpt_every == 0):
                    save(step)
                    monitor.flush()
                if stop_reason:
                    self.log(f"stopping at step {step} ({stop_reason}); checkpoint saved")
                    break
            if last_saved != step:
                save(step)
            if split_every and last_split_eval != step and eval_urls and stop_reason != "signal":
                self._split_eval(step, eval_urls, micro, monitor)
            if self.tcfg.get("probe_logits") and eval_urls:
                self.probe_logits(eval_urls, micro)
        finally:
            stream.close()
            if pbar is not None:
                pbar.close()
            monitor.close(png=True)
        self.barrier()
        self.log(f"done: step {step}/{self.max_steps}, training {time.time() - t_train:.1f}s, "
                 f"start-up {timings['process_to_train']:.1f}s" + (f" (stopped: {stop_reason})" if stop_reason else ""))
        torch.distributed.destroy_process_group()
        return 0

    def _log_startup(self, timings: dict, monitor, step: int) -> None:
        """Start-up apart from training: each setup phase and process start -> end of the first
        optimizer step, in TensorBoard/metrics.jsonl (``startup/*``) and ``startup.json`` (with the
        wall-clock time of that step's end, so a benchmark can time it from the launcher's start)."""
        now = time.time()
        rec = {f"startup/{k}_s": float(v) for k, v in timings.items()}
        rec["startup/process_to_first_step_s"] = now - _PROCESS_START
        if self.rank != 0:
            return
        monitor.log(step, rec)
        with open(os.path.join(self.run_dir, "startup.json"), "w") as f:
            json.dump({**{k.split("/", 1)[1]: v for k, v in rec.items()}, "first_step_end_unix": now,
                       "process_start_unix": _PROCESS_START, "step": step, "world_size": self.world_size}, f, indent=1)

    @staticmethod
    @torch.no_grad()
    def _grad_norm(engine) -> float | None:
        grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
        if not grads:
            return None
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    # -- data position -------------------------------------------------------------------------

    def _start_position(self, saved: dict | None) -> list[dict]:
        """This rank's data positions (one per loader worker, or one) from a checkpoint: exact at
        the same world size and worker count; otherwise the streams differ and the newest epoch
        continues at the same fraction."""
        n = max(1, int((self.cfg.get("data") or {}).get("num_workers", 0)))
        if not saved:
            return [{"epoch": 0, "offset": 0} for _ in range(n)]
        poss = saved.get("positions") or []
        flat = [p for r in poss for p in (r if isinstance(r, list) else [r])]
        if (int(saved.get("world_size", -1)) == self.world_size and len(poss) == self.world_size
                and all(len(r if isinstance(r, list) else [r]) == n for r in poss)):
            mine = poss[self.rank]
            return [dict(p) for p in (mine if isinstance(mine, list) else [mine])]
        emax = max(int(p["epoch"]) for p in flat)
        done = sum(int(p["offset"]) for p in flat if int(p["epoch"]) == emax)
        return [{"epoch": emax, "offset": done // (self.world_size * n), "next": 0} for _ in range(n)]

    def _gather_positions(self, state: list[dict]) -> list[list[dict]]:
        """Every rank's stream positions (rank-major), for rank 0 to save."""
        t = torch.tensor([[int(p["epoch"]), int(p["offset"]), int(p.get("next", 0))] for p in state], dtype=torch.int64)
        if torch.distributed.is_initialized() and self.world_size > 1:
            out = [torch.zeros_like(t).to(self.comm_device) for _ in range(self.world_size)]
            torch.distributed.all_gather(out, t.to(self.comm_device))
        else:
            out = [t]
        return [[{"epoch": int(row[0]), "offset": int(row[1]), "next": int(row[2])} for row in o.cpu()] for o in out]

    # -- eval ----------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, eval_urls: list[str], batch_size: int) -> dict:
        n = int(self.tcfg.get("eval_batches", 4))
        split = (self.cfg.get("data") or {}).get("eval_split", "eval")
        engine = self.engine
        engine.eval()
        sums: dict[str, float] = {}
        count = 0
        try:
            for batch in tdata.eval_batches(eval_urls, split, build_example=self.spec.build_example,
                                            collate=self.spec.collate, cfg=self.eval_cfg, batch_size=batch_size,
                                            n_batches=n, rank=self.rank, world_size=self.world_size, seed=self.seed):
                loss, metrics = self.spec.loss(engine, self._to_device(batch))
                vals = {"loss": float(loss.float())}
                vals.update({k: float(v.float()) if isinstance(v, torch.Tensor) else float(v)
                             for k, v in (metrics or {}).items() if k not in ("loss", "tokens")})
                for k, v in vals.items():
                    sums[k] = sums.get(k, 0.0) + v
                count += 1
        finally:
            engine.train()
        if count == 0:
            return {}
        keys = sorted(sums)
        red = self._all_reduce(torch.tensor([sums[k] / count for k in keys], dtype=torch.float64))
        return {f"eval/{k}": float(v) / self.world_size for k, v in zip(keys, red.tolist())}

    @torch.no_grad()
    def split_evaluate(self, eval_urls: list[str], batch_size: int) -> dict:
        """Whole-split metrics of the spec (``eval_outputs`` on every eval batch, split across the
        ranks; rows gathered in split order; ``eval_summary`` on rank 0). Returns ``{eval/<name>}``
        on rank 0, {} elsewhere."""
        split = (self.cfg.get("data") or {}).get("eval_split", "eval")
        engine = self.engine
        engine.eval()
        rows: list[tuple[int, dict]] = []  # (global batch number, outputs)
        try:
            for j, (batch, real) in enumerate(tdata.split_batches(
                    eval_urls, split, build_example=self.spec.build_example, collate=self.spec.collate,
                    cfg=self.eval_cfg, batch_size=batch_size, rank=self.rank, world_size=self.world_size,
                    seed=self.seed, max_samples=int(self.tcfg.get("split_eval_samples", 1000) or 0))):
                out = self.spec.eval_outputs(engine, self._to_device(batch))
                if real:
                    rows.append((j * self.world_size + self.rank,
                                 {k: _cpu_rows(v) for k, v in out.items()}))
        finally:
            engine.train()
        if torch.distributed.is_initialized() and self.world_size > 1:
            gathered: list = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if self.rank != 0 or not rows:
            return {}
        rows.sort(key=lambda r: r[0])
        outputs = {k: torch.cat([r[1][k] for r in rows]) for k in rows[0][1]}
        summary = self.spec.eval_summary(outputs, self.cfg)
        return {f"eval/{k}": float(v) for k, v in summary.items()}

    def _split_eval(self, step: int, eval_urls: list[str], batch_size: int, monitor) -> None:
        t0 = time.time()
        ev = self.split_evaluate(eval_urls, batch_size)
        if self.rank == 0 and ev:
            monitor.log(step, ev)
            shown = ", ".join(f"{k[5:]} {v:.3g}" for k, v in list(ev.items())[:6])
            self.log(f"step {step}: split eval ({time.time() - t0:.1f}s): {shown}")

    @torch.no_grad()
    def probe_logits(self, eval_urls: list[str], batch_size: int) -> None:
        """Logits of the first eval batch from the live engine -> run_dir/probe_logits.safetensors."""
        split = (self.cfg.get("data") or {}).get("eval_split", "eval")
        batch = next(iter(tdata.eval_batches(eval_urls, split, build_example=self.spec.build_example,
                                             collate=self.spec.collate, cfg=self.eval_cfg, batch_size=batch_size,
                                             n_batches=1, rank=0, world_size=1, seed=self.seed)))
        self.engine.eval()
        logits = self.engine(batch["tokens"].to(self.device))
        self.engine.train()
        if self.rank == 0:
            from safetensors.torch import save_file

            save_file({"tokens": batch["tokens"].contiguous(), "logits": logits.float().cpu().contiguous()},
                      os.path.join(self.run_dir, "probe_logits.safetensors"))


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce (all ranks on one machine) creates one 66 MB
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank and never removes
    it: every CPU run leaked RAM until the machine ran out (15 GB after a day of runs here). Once
    all ranks have mapped each other's segments (the barrier after init), the names are not needed:
    unlinking ours frees the memory when the process exits, however it exits (SIGKILL too)."""
    path = os.path.join("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_"
                        f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}")
    try:
        os.unlink(path)
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        pass


def _cpu_rows(v) -> torch.Tensor:
    """An eval output on the CPU: floating point as float32, integers (ids) unchanged."""
    t = v.detach() if isinstance(v, torch.Tensor) else torch.as_tensor(v)
    return (t.float() if t.is_floating_point() else t).cpu()


# -----------------------------------------------------------------------------------------------
# command line (launch/train.py calls this)


def build_arg_parser():
    import argparse

    p = argparse.ArgumentParser(description="Train one MusicLM stage with DeepSpeed (run under the deepspeed launcher)")
    p.add_argument("--stage", help="registered TrainSpec name (semantic, coarse, fine, ...); default: config's stage")
    p.add_argument("--config", required=True, help="YAML run config (launch/configs/*.yaml)")
    p.add_argument("--deepspeed_config", "--ds_config", dest="deepspeed_config",
                   help="DeepSpeed JSON (deepspeed_configs/*.json)")
    p.add_argument("--resume", default="auto", help="auto (default) | none | checkpoint folder or tag")
    p.add_argument("--run_dir", help="run folder (default runs/<name>)")
    p.add_argument("--name", help="run name (default: config name)")
    p.add_argument("--shards", nargs="+", help="shard folder(s), replaces data.shards")
    p.add_argument("--max_steps", type=int, help="replaces train.max_steps (the cosine horizon)")
    p.add_argument("--stop_after", type=int, help="checkpoint and stop after this step (schedule unchanged)")
    # extend: `--set a=1 b=2` and `--set a=1 --set b=2` both apply every override
    add_set_argument(p)
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    return p


def train_main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    cfg = load_config(args.config, args.set)
    if args.stage:
        if cfg.get("stage") and cfg["stage"] != args.stage:
            print(f"[musiclm.train] note: --stage {args.stage} replaces the config's stage {cfg['stage']}", flush=True)
        cfg["stage"] = args.stage
    if not cfg.get("stage"):
        raise SystemExit("no stage: pass --stage or set stage: in the config")
    if args.name:
        cfg["name"] = args.name
    if args.shards:
        cfg.setdefault("data", {})["shards"] = args.shards
    if args.max_steps is not None:
        cfg.setdefault("train", {})["max_steps"] = args.max_steps
    trainer = Trainer(cfg["stage"], cfg, args.deepspeed_config, run_dir=args.run_dir, resume=args.resume,
                      stop_after=args.stop_after)
    from musiclm.data.shards import FingerprintMismatch

    try:
        return trainer.run()
    except FingerprintMismatch as e:
        print(f"[musiclm.train] refusing the shards: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":  # `deepspeed --module musiclm.train.engine ...` works without launch/
    sys.exit(train_main())
