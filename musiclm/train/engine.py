"""The one training loop: DeepSpeed ZeRO 0-3 for every registered stage.

    deepspeed [--num_gpus N | --hostfile H] launch/train.py --stage coarse \\
        --config launch/configs/coarse.yaml --deepspeed_config deepspeed_configs/zero2.json

A stage (``musiclm.train.spec.TrainSpec``) contributes its model, batch layout and objective;
this module does the rest, once, in named steps a reader can find (as torchtitan's trainer):

- ``setup``: distributed init (NCCL on GPU, gloo on CPU with ``DS_ACCELERATOR=cpu``; nothing is
  JIT-compiled on CPU: torch's AdamW is the client optimizer and the shared-memory all-reduce op
  is skipped unless ``train.shm_allreduce``), the resume plan, the model and its DeepSpeed engine
  (micro batch, gradient accumulation, clipping, optimizer and ZeRO stage from the DeepSpeed
  config; the YAML's ``deepspeed:`` section overrides keys of it; ``"bf16": {"enabled": "auto"}``
  turns bf16 on only where the accelerator runs it natively), the learning-rate schedule (linear
  warmup + cosine to ``train.min_lr_ratio`` at ``train.max_steps``; a ``scheduler`` section in the
  DeepSpeed config replaces it), the data streams (shards refused when their tokenizer
  fingerprints do not match the config) and the monitor (TensorBoard + metrics.jsonl + loss.png);
- ``restore``: ``--resume auto`` continues from the newest complete checkpoint (weights,
  optimizer, schedule, RNG, data position), converting it to a universal checkpoint first when
  the world size changed;
- ``train_step``: one optimizer step (gradient accumulation included), or the stage's
  ``custom_step`` (e.g. generator + discriminator engines made with ``make_engine``, each with
  its own schedule and gradient-norm logging);
- ``log_step``: metrics reduced over ranks, perf figures (tokens/s, MFU, memory), tqdm on rank 0;
- ``evaluate``: eval loss every ``train.eval_every`` steps through the stage's ``eval_step`` (its
  loss by default), and whole-split metrics (``eval_outputs``/``eval_summary``) every
  ``train.split_eval_every`` steps and at the end;
- ``checkpoint``: every ``train.checkpoint_every`` steps, at the end, when ``train.max_minutes``
  of training time have passed, and on SIGTERM/SIGINT (the flag is all-reduced so every rank stops
  at the same step boundary, saves, and exits 0).

Start-up (imports, distributed init, engine, first batch) is logged apart from training
(``startup/*`` in TensorBoard and metrics.jsonl, ``startup.json``); ``train.max_minutes`` counts
training time from the first step. The resolved config is printed at the start of every run and
saved as ``<run_dir>/config.yaml``. Config keys: :mod:`musiclm.train.run_config`.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import os
import pickle
import signal
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import ConfigError, add_set_argument, deep_merge, dump_config, load_config
from ..logs import get_logger, setup_logging
from ..net import free_port
from . import checkpoint as ckpt
from . import data as tdata
from .build_locks import clear_stale_build_locks
from .monitor import Monitor, device_peak_flops, peak_memory_gb
from .run_config import check_run_config, load_ds_config
from .schedule import WarmupCosine
from .spec import TrainSpec, get_train_spec

_PROCESS_START = time.time()  # (module import time, close to the process start under the launcher)
_log = get_logger("musiclm.train")

__all__ = ["Trainer", "WarmupCosine", "load_config", "load_ds_config", "train_main"]


def _mix_seed(*parts) -> int:
    return zlib.crc32(json.dumps([int(p) for p in parts]).encode()) & 0x7FFFFFFF


def import_spec_modules(names: list[str] | None) -> None:
    """``imports:`` of a run config: modules (``pkg.mod``) or ``.py`` files that register TrainSpecs."""
    for name in names or []:
        if name.endswith(".py"):
            path = os.path.abspath(name)
            if not os.path.isfile(path):
                raise ConfigError(f"imports: {name} does not exist")
            mod_name = "musiclm_user_spec_" + os.path.splitext(os.path.basename(path))[0]
            if mod_name in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        else:
            importlib.import_module(name)


@dataclass
class StepResult:
    """What one optimizer step (all micro batches of this rank) produced."""

    loss: float
    metrics: dict[str, float]
    tokens: int
    samples: int
    data_wait_s: float
    time_s: float
    grad_norm: float
    lr: float
    extra: dict[str, float] = field(default_factory=dict)  # lr and grad norm of the extra engines


class Trainer:
    """Runs one stage. ``Trainer(spec, cfg, ds_config, run_dir=...).run()`` -> exit code."""

    def __init__(
        self,
        spec: TrainSpec | str,
        cfg: dict,
        ds_config: dict | str | None,
        *,
        run_dir: str | None = None,
        resume: str = "auto",
        stop_after: int | None = None,
        log_prefix: str = "",
        config_path: str | None = None,
    ):
        self.cfg = copy.deepcopy(cfg)
        import_spec_modules(self.cfg.get("imports"))
        self.spec = get_train_spec(spec) if isinstance(spec, str) else spec
        self.cfg.setdefault("stage", self.spec.name)
        where = config_path or "run config"
        self.train, self.data = check_run_config(self.cfg, self.spec.config_keys, where=where)
        self.ds_config = load_ds_config(ds_config, self.cfg)
        self.max_steps = self.train.max_steps
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
        self.device = torch.device("cpu")
        self.timings: dict[str, float] = {}
        # progress, restored from a checkpoint
        self.step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.elapsed_before = 0.0
        self.last_saved = -1

    # -- helpers -------------------------------------------------------------------------------

    def log(self, msg: str, all_ranks: bool = False) -> None:
        """Rank-aware logging: rank 0 only, unless ``all_ranks`` (then prefixed with the rank)."""
        if all_ranks or self.rank == 0:
            rank = f"[rank {self.rank}] " if all_ranks and self.world_size > 1 else ""
            _log.info("%s%s%s", self.log_prefix, rank, msg)

    def log_all(self, msg: str) -> None:
        self.log(msg, all_ranks=True)

    def _on_signal(self, signum, frame):
        if self._signal is None:
            self._signal = signum
            try:
                sys.stderr.write(
                    f"{self.log_prefix}[rank {self.rank}] got {signal.Signals(signum).name}: "
                    "will checkpoint at the next step boundary and exit\n"
                )
            except Exception:
                pass

    def barrier(self):
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if torch.distributed.is_initialized() and self.world_size > 1:
            x = t.to(self.comm_device)
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
        return {
            k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
        }

    # -- engines -------------------------------------------------------------------------------

    def client_optimizer(self, params: list, ds_config: dict) -> tuple[torch.optim.Optimizer | None, dict]:
        """torch's AdamW in place of DeepSpeed's for the config's Adam/AdamW, on CPU by default
        (``train.optimizer: auto``; ``torch`` or ``deepspeed`` force one). DeepSpeed's CPU Adam is
        a C++ op JIT-compiled on first use: 70-150 s per fresh machine or venv, minutes more on a
        loaded one, for no gain at our sizes. The update is the same (decoupled weight decay,
        like DeepSpeed's default ``adam_w_mode``). Returns (optimizer or None, the config to
        initialize with: without the ``optimizer`` section it replaces)."""
        sec = ds_config.get("optimizer") or {}
        kind = str(sec.get("type", "")).lower()
        choice = self.train.optimizer
        use_torch = choice == "torch" or (choice == "auto" and self.device.type == "cpu")
        if not use_torch or kind not in ("adam", "adamw"):
            return None, ds_config
        p = dict(sec.get("params") or {})
        cls = torch.optim.AdamW if p.pop("adam_w_mode", True) or kind == "adamw" else torch.optim.Adam
        opt = cls(
            params,
            lr=float(p.get("lr", 1e-3)),
            betas=tuple(p.get("betas", (0.9, 0.999))),
            eps=float(p.get("eps", 1e-8)),
            weight_decay=float(p.get("weight_decay", 0.0)),
        )
        conf = {k: v for k, v in ds_config.items() if k != "optimizer"}
        conf["zero_allow_untested_optimizer"] = True
        return opt, conf

    def _initialize(self, module, conf: dict, **kw):
        """``deepspeed.initialize`` with the client optimizer and, unless the DeepSpeed config has a
        ``scheduler`` section or the caller passes one, the run's warmup + cosine schedule."""
        import deepspeed

        params = [p for p in module.parameters() if p.requires_grad]
        if "optimizer" not in kw:
            kw["optimizer"], conf = self.client_optimizer(params, conf)
        if "scheduler" not in conf and "lr_scheduler" not in kw:
            sched = WarmupCosine(self.train.warmup_steps, self.max_steps, self.train.min_lr_ratio)
            kw["lr_scheduler"] = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, sched)
        engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=conf, **kw)
        return engine

    def make_engine(self, module, name: str, ds_overrides: dict | None = None, **kw):
        """An extra DeepSpeed engine (custom steps, e.g. a codec's discriminator): its own optimizer
        and learning-rate schedule (the run's warmup + cosine unless ``lr_scheduler`` is passed),
        its lr and gradient norm logged as ``train/lr/<name>`` and ``train/grad_norm/<name>``,
        saved with every checkpoint under ``<tag>/<name>/`` and restored from the resumed
        checkpoint right here. Call it on every rank, in the same order (e.g. from
        ``custom_step`` on its first call)."""
        if name in self.engines:
            return self.engines[name]
        eng = self._initialize(module, deep_merge(self.ds_config, ds_overrides or {}), **kw)
        self.engines[name] = eng
        plan = getattr(self, "plan", None)
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
            os.environ.update(
                {
                    "RANK": "0",
                    "WORLD_SIZE": "1",
                    "LOCAL_RANK": "0",
                    "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                    "MASTER_PORT": os.environ.get("MASTER_PORT", str(free_port())),
                }
            )
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if self.local_rank == 0:  # a killed compile's lock would make any JIT build hang silently
            clear_stale_build_locks(log=self.log_all)
        acc = get_accelerator()
        if acc.device_name() == "cpu":
            self.device = torch.device("cpu")
        else:  # bind the GPU before the process group exists (NCCL)
            acc.set_device(self.local_rank)
            self.device = torch.device(acc.device_name(self.local_rank))
        if acc.device_name() == "cpu" and not self.train.shm_allreduce:
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
        if self.device.type == "cpu" and self.train.shm_allreduce:
            self.barrier()  # every rank has mapped its peers' shared-memory segments by now
            _unlink_shm_buffer(self.rank)

    def check_data(self) -> list[dict]:
        """Refuse shards made by other tokenizers than the config describes (before any DeepSpeed work)."""
        dirs = tdata.as_list(self.data.shards)
        if not dirs:
            raise ValueError("config has no data.shards (a shard folder, a glob, or a list of them)")
        expected = self.spec.expected_fingerprints(self.cfg) if self.spec.expected_fingerprints else None
        streams = self.spec.streams(self.cfg) if self.spec.streams else None  # the token streams it reads
        dirs, indexes = tdata.resolve_shard_dirs(
            dirs, expected, self.cfg.get("fingerprint_hash"), streams=streams, stage=self.spec.name
        )
        self.data.shards = dirs
        self.cfg.setdefault("data", {})["shards"] = dirs if len(dirs) > 1 else dirs[0]
        return indexes

    def _plan_resume(self, indexes: list[dict]) -> None:
        """Which checkpoint to continue from (before the engine exists: a world-size change needs
        the universal loader); every rank loads the one rank 0 picked (a shared file system may
        list lazily). A checkpoint trained on shards of other tokenizers (another vocabulary,
        another conditioning codebook) is refused instead of failing on tensor shapes, or worse,
        continuing on tokens that mean something else."""
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            removed = ckpt.remove_partials(self.ckpt_root)
            if removed:
                self.log(f"removed checkpoints cut off mid-write: {removed}")
        self.barrier()
        if self.resume == "none" and ckpt.complete_checkpoints(self.ckpt_root):
            raise RuntimeError(f"{self.ckpt_root} has checkpoints; use --resume auto or another --run_dir/--name")
        if self.resume == "auto":
            plan = ckpt.plan_resume(self.ckpt_root, "auto", self.world_size) if self.rank == 0 else None
            chosen = self._broadcast_int(plan.step if plan is not None and plan.tag else -1)
            if self.rank != 0:
                plan = (
                    ckpt.plan_resume(self.ckpt_root, ckpt.tag_for_step(chosen), self.world_size)
                    if chosen >= 0
                    else ckpt.ResumePlan()
                )
        else:  # "none" or an explicit checkpoint folder/tag
            plan = ckpt.plan_resume(self.ckpt_root, self.resume, self.world_size)
        old = (plan.state or {}).get("fingerprint_hash") if plan.tag else None
        new = indexes[0].get("fingerprint_hash") if indexes else None
        if old and new and old != new:
            raise tdata.ResumeOnOtherTokens(plan.tag_dir, old, new)
        self.plan = plan
        self.load_tag = ckpt.MAIN_ENGINE
        if plan.tag and plan.universal:
            t = time.time()
            if self.rank == 0:
                ckpt.ensure_universal(plan.tag_dir, ckpt.MAIN_ENGINE, log=self.log)
            self.barrier()
            self.timings["universal_conversion"] = time.time() - t
            self.load_tag = f"{ckpt.MAIN_ENGINE}_universal"
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True

    def _build_engine(self) -> None:
        """The model (same init on every rank) and its DeepSpeed engine."""
        t = time.time()
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)
        model = self.spec.build_model(self.cfg)
        self._init_from(model)
        self.n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        self.flops_per_token = (
            self.spec.flops_per_token(model, self.cfg) if self.spec.flops_per_token else 6.0 * self.n_params
        )
        self.timings["build_model"] = time.time() - t
        t = time.time()
        self.engine = self._initialize(model, self.ds_config)
        self.engines = {ckpt.MAIN_ENGINE: self.engine}
        self.timings["deepspeed_initialize"] = time.time() - t
        if self.train.compile:
            # In place (nn.Module.compile): checkpoint and export keys keep their names. Tracing and
            # code generation happen in the first step (and again for eval's no_grad forward).
            self.engine.compile()
            self.log("train.compile: model compiled with torch.compile; the first step includes the compile")
        if self.device.type != "cpu":
            self.device = self.engine.device
        self.micro = self.engine.train_micro_batch_size_per_gpu()
        self.gas = self.engine.gradient_accumulation_steps()
        self.zero_stage = self.engine.zero_optimization_stage()

    def _init_from(self, model) -> None:
        """``init_from``: exported or packaged weights into the new model, before its engine exists
        (weights only; a checkpoint of this run wins: resuming continues it instead)."""
        src = self.cfg.get("init_from")
        if not src:
            return
        if self.plan.tag:
            self.log(f"init_from {src} ignored: the run resumes from its checkpoint {self.plan.tag_dir}")
            return
        from .init_from import load_init_weights

        tokens = self.cfg.get("tokens") if self.spec.data_kind == "tokens" else None
        info = load_init_weights(model, src, self.spec.name, tokens)
        self.log(
            f"init_from {info['weights']} (exported at step {info['step']}, {info['tensors']} tensors): "
            "weights only; optimizer, schedule and data position start fresh"
        )

    def restore(self) -> list[dict]:
        """Weights, optimizer, schedule, RNG and progress from the planned checkpoint -> this
        rank's data positions (one per loader worker)."""
        t = time.time()
        plan, positions = self.plan, None
        if plan.tag:
            load_path, _client = self.engine.load_checkpoint(
                plan.tag_dir,
                tag=self.load_tag,
                load_module_strict=True,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load {plan.tag_dir}/{self.load_tag}")
            self.step = plan.step
            self.last_saved = plan.step
            positions = plan.state.get("data") or {}
            rng_file = os.path.join(plan.tag_dir, "rng", f"rank{self.rank}.json")
            if not plan.universal and os.path.isfile(rng_file):
                with open(rng_file) as f:
                    ckpt.set_rng_state(json.load(f))
            self.samples_seen = int(plan.state.get("samples_seen", 0))
            self.tokens_seen = int(plan.state.get("tokens_seen", 0))
            self.elapsed_before = float(plan.state.get("elapsed_s", 0.0))
            self.log(
                f"resumed from {plan.tag_dir} at step {self.step}"
                + (
                    f" (world size {plan.state['world_size']} -> {self.world_size}, universal checkpoint)"
                    if plan.universal
                    else ""
                )
            )
        pos = self._start_position(positions)
        self.timings["load_checkpoint"] = time.time() - t
        return pos

    def _build_data(self, positions: list[dict]) -> None:
        dirs, on_bad = self.data.shards, self.data.on_bad_shard
        self.train_urls, bad = tdata.checked_shard_urls(dirs, self.data.train_split, on_bad=on_bad)
        self.eval_urls, bad_eval = tdata.checked_shard_urls(dirs, self.data.eval_split, on_bad=on_bad)
        self.bad_shards = bad + bad_eval
        if self.bad_shards and self.rank == 0:
            for b in self.bad_shards:
                self.log(f"skipping shard {b['shard']}: {b['reason']} (data.on_bad_shard: skip)")
            with open(os.path.join(self.run_dir, "bad_shards.jsonl"), "a") as f:
                for b in self.bad_shards:
                    f.write(json.dumps(b) + "\n")
        if not self.train_urls:
            raise tdata.ShardIntegrityError(str(dirs), "index.json", f"no usable {self.data.train_split!r} shards")
        self.stream = tdata.BatchStream(
            self.train_urls,
            self.data.train_split,
            build_example=self.spec.build_example,
            collate=self.spec.collate,
            cfg=self.cfg,
            batch_size=self.micro,
            rank=self.rank,
            world_size=self.world_size,
            seed=self.seed,
            shuffle=self.data.shuffle,
            position=positions,
            prefetch=self.data.prefetch,
            num_workers=self.data.num_workers,
        )
        self.eval_cfg = copy.deepcopy(self.cfg)
        self.eval_cfg["cond_dropout"] = 0.0

    def _start_monitor(self, indexes: list[dict]) -> None:
        plan = self.plan
        self.monitor = Monitor(
            self.run_dir,
            enabled=self.rank == 0,
            resume_step=self.step if plan.tag else None,
            tensorboard=self.train.tensorboard,
        )
        resolved = {**self.cfg, "train": asdict(self.train), "data": asdict(self.data)}  # every default shown
        text = dump_config(resolved)
        if self.rank == 0:
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(text)
            with open(os.path.join(self.run_dir, "ds_config.json"), "w") as f:
                json.dump(self.ds_config, f, indent=1)
        self.fingerprints = (indexes[0].get("fingerprints") if indexes else None) or {}
        self.fingerprint_hash = indexes[0].get("fingerprint_hash") if indexes else None
        self.peak_flops = device_peak_flops(self.device, self.train.peak_flops)
        self.log("config (resolved; saved as config.yaml):\n" + text.rstrip())
        self.log(
            f"stage {self.spec.name}: {self.n_params / 1e6:.2f}M params, world {self.world_size}, "
            f"ZeRO-{self.zero_stage}, micro batch {self.micro} x grad accum {self.gas}, "
            f"bf16 {self.engine.bfloat16_enabled()}, optimizer {_optimizer_name(self.engine)}, "
            f"{len(self.train_urls)} train / {len(self.eval_urls)} eval shards, run dir {self.run_dir}"
        )
        self.monitor.text("config", "```\n" + text + "\n```", self.step)
        if self.bad_shards:
            self.monitor.log(self.step, {"data/bad_shards": len(self.bad_shards)})

    def setup(self, indexes: list[dict]) -> None:
        t = time.time()
        self._init_distributed()
        self.timings["init_distributed"] = time.time() - t
        self._plan_resume(indexes)
        self._build_engine()
        positions = self.restore()
        self._build_data(positions)
        self._start_monitor(indexes)
        self.timings["process_to_train"] = time.time() - _PROCESS_START
        self.log(
            "setup "
            + ", ".join(f"{k} {v:.1f}s" for k, v in self.timings.items() if k != "process_to_train")
            + f"; process start to training {self.timings['process_to_train']:.1f}s"
        )

    # -- main ----------------------------------------------------------------------------------

    def run(self) -> int:
        t_start = time.time()
        if self.spec.configure:
            self.spec.configure(self.cfg)
        indexes = self.check_data() if self.spec.data_kind in ("tokens", "audio") else []
        self.timings["check_data"] = time.time() - t_start
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.setup(indexes)
            return self.train_loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def train_loop(self) -> int:
        split_every = self.train.split_every if self.spec.eval_outputs is not None else 0
        last_split_eval = last_eval = None
        stop_reason = None
        pbar = self._progress_bar()
        self.perf = {"time": 0.0, "wait": 0.0, "tokens": 0.0, "samples": 0.0}
        self.engine.train()
        self.t_train = time.time()  # train.max_minutes counts from here: start-up is not training time
        first = True
        try:
            while self.step < self.max_steps:
                result = self.train_step()
                self.step += 1
                stop_flags = self.log_step(result, pbar)
                if first:
                    first = False
                    if self.train.compile:  # the first step traced and compiled forward and backward
                        self.timings["compile"] = result.time_s
                    self._log_startup()
                if self.train.eval_every and self.step % self.train.eval_every == 0 and self.eval_urls:
                    self.log_eval(self.evaluate())
                    last_eval = self.step
                if split_every and self.step % split_every == 0 and self.eval_urls:
                    self._split_eval()
                    last_split_eval = self.step
                stop_reason = stop_flags or (
                    "stop_after" if self.stop_after is not None and self.step >= self.stop_after else None
                )
                if (
                    stop_reason
                    or self.step == self.max_steps
                    or (self.train.checkpoint_every and self.step % self.train.checkpoint_every == 0)
                ):
                    self.checkpoint(self.step)
                    self.monitor.flush()
                if stop_reason:
                    self.log(f"stopping at step {self.step} ({stop_reason}); checkpoint saved")
                    break
            if self.last_saved != self.step:
                self.checkpoint(self.step)
            if self.train.eval_every and self.eval_urls and last_eval != self.step and stop_reason != "signal":
                self.log_eval(self.evaluate())  # a run stopped by its budget still ends with an eval
            if split_every and last_split_eval != self.step and self.eval_urls and stop_reason != "signal":
                self._split_eval()
            if self.train.probe_logits and self.eval_urls:
                self.probe_logits()
        finally:
            self.stream.close()
            if pbar is not None:
                pbar.close()
            self.monitor.close(png=True)
        self.barrier()
        self.log(
            f"done: step {self.step}/{self.max_steps}, training {time.time() - self.t_train:.1f}s, "
            f"start-up {self.timings['process_to_train']:.1f}s" + (f" (stopped: {stop_reason})" if stop_reason else "")
        )
        torch.distributed.destroy_process_group()
        return 0

    def _progress_bar(self):
        if self.rank != 0:
            return None
        try:
            from tqdm import tqdm

            return tqdm(
                total=self.max_steps,
                initial=self.step,
                desc=self.spec.name,
                dynamic_ncols=True,
                mininterval=1.0 if sys.stderr.isatty() else 10.0,
                file=sys.stderr,
            )
        except Exception:
            return None

    # -- one step ------------------------------------------------------------------------------

    def train_step(self) -> StepResult:
        """One optimizer step: ``gradient_accumulation_steps`` micro batches through the stage's
        loss (forward, backward, step), or its ``custom_step``."""
        engine = self.engine
        t0 = time.perf_counter()
        torch.manual_seed(_mix_seed(self.seed, self.step, self.rank))
        lr = float(engine.get_lr()[0]) if hasattr(engine, "get_lr") else float("nan")
        losses, mets, wait, n_tok, n_smp = [], [], 0.0, 0, 0
        manual_norm = None
        for micro in range(self.gas):
            tw = time.perf_counter()
            batch, _pos = next(self.stream)
            wait += time.perf_counter() - tw
            n_tok += (
                self.spec.count_tokens(batch)
                if self.spec.count_tokens
                else int(batch["tokens"].numel())
                if "tokens" in batch
                else self.micro
            )
            n_smp += self.micro
            batch = self._to_device(batch)
            if self.spec.custom_step is not None:
                loss, metrics = self.spec.custom_step(self, batch)
            else:
                loss, metrics = self.spec.loss(engine, batch, self.cfg)
                engine.backward(loss)
                if self.zero_stage == 0 and micro == self.gas - 1:
                    manual_norm = _grad_norm(engine)  # DeepSpeed keeps none without ZeRO
                engine.step()
            losses.append(float(loss.detach().float()))
            mets.append(
                {
                    k: float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v)
                    for k, v in (metrics or {}).items()
                    if k not in ("loss", "tokens")
                }
            )
        grad_norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        grad_norm = grad_norm if grad_norm is not None else manual_norm
        keys = sorted(mets[0])
        metrics = {}
        for k in keys:
            vals = [m[k] for m in mets if k in m]
            metrics[k] = sum(vals) / len(vals) if vals else float("nan")
        extra = {}
        for name, eng in self.engines.items():
            if eng is engine:
                continue
            extra[f"lr/{name}"] = _lr_of_last_step(eng)
            g = eng.get_global_grad_norm() if hasattr(eng, "get_global_grad_norm") else None
            extra[f"grad_norm/{name}"] = float(g) if g is not None else float("nan")
        return StepResult(
            loss=sum(losses) / len(losses),
            metrics=metrics,
            tokens=n_tok,
            samples=n_smp,
            data_wait_s=wait,
            time_s=time.perf_counter() - t0,
            grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
            lr=lr,
            extra=extra,
        )

    def log_step(self, r: StepResult, pbar) -> str | None:
        """Reduce the step's metrics and stop flags over the ranks, log them on rank 0 -> the stop
        reason every rank agrees on ("signal", "max_minutes") or None."""
        if not hasattr(self, "metric_keys"):
            self.metric_keys = sorted(r.metrics)
        timed_out = (
            self.train.max_minutes is not None
            and self.rank == 0
            and (time.time() - self.t_train) / 60.0 >= self.train.max_minutes
        )
        local = [r.loss] + [r.metrics.get(k, float("nan")) for k in self.metric_keys]
        flags = [float(r.tokens), float(r.samples), 1.0 if self._signal is not None else 0.0, 1.0 if timed_out else 0.0]
        red = self._all_reduce(torch.tensor(local + flags, dtype=torch.float64))
        values = (red[: len(local)] / self.world_size).tolist()
        g_tok, g_smp, sig_flag, time_flag = red[len(local) :].tolist()
        self.tokens_seen += int(g_tok)
        self.samples_seen += int(g_smp)
        p = self.perf
        p["time"] += r.time_s
        p["wait"] += r.data_wait_s
        p["tokens"] += g_tok
        p["samples"] += g_smp
        if self.rank == 0:
            rec = {"train/loss": values[0], "train/lr": r.lr, "train/grad_norm": r.grad_norm}
            rec.update({f"train/{k}": v for k, v in zip(self.metric_keys, values[1:])})
            rec.update({f"train/{k}": v for k, v in r.extra.items()})
            every = self.train.log_every
            if self.step % every == 0 or self.step == self.max_steps:
                tps = p["tokens"] / p["time"] if p["time"] > 0 else 0.0
                rec.update(
                    {
                        "perf/tokens_per_s": tps,
                        "perf/samples_per_s": p["samples"] / p["time"] if p["time"] > 0 else 0.0,
                        "perf/step_time_s": p["time"] / every,
                        "perf/data_wait_s": p["wait"] / every,
                        "perf/peak_memory_gb": peak_memory_gb(self.device),
                        "perf/mfu": (self.flops_per_token * tps / (self.peak_flops * self.world_size))
                        if self.peak_flops
                        else None,
                        "progress/tokens_seen": self.tokens_seen,
                        "progress/samples_seen": self.samples_seen,
                    }
                )
                self.perf = {"time": 0.0, "wait": 0.0, "tokens": 0.0, "samples": 0.0}
            self.monitor.log(self.step, rec)
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(loss=f"{values[0]:.3f}", lr=f"{r.lr:.2e}", refresh=False)
        if sig_flag > 0:
            return "signal"
        if time_flag > 0:
            return "max_minutes"
        return None

    def _log_startup(self) -> None:
        """Start-up apart from training: each setup phase and process start -> end of the first
        optimizer step, in TensorBoard/metrics.jsonl (``startup/*``) and ``startup.json`` (with the
        wall-clock time of that step's end, so a benchmark can time it from the launcher's start)."""
        now = time.time()
        rec = {f"startup/{k}_s": float(v) for k, v in self.timings.items()}
        rec["startup/process_to_first_step_s"] = now - _PROCESS_START
        if self.rank != 0:
            return
        self.monitor.log(self.step, rec)
        with open(os.path.join(self.run_dir, "startup.json"), "w") as f:
            json.dump(
                {
                    **{k.split("/", 1)[1]: v for k, v in rec.items()},
                    "first_step_end_unix": now,
                    "process_start_unix": _PROCESS_START,
                    "step": self.step,
                    "world_size": self.world_size,
                },
                f,
                indent=1,
            )

    # -- checkpoint ----------------------------------------------------------------------------

    def checkpoint(self, step: int) -> None:
        """Every engine, the data positions of every rank, RNG and progress, published atomically."""
        all_pos = self._gather_positions(self.stream.state())
        state = {
            "spec": self.spec.name,
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
            "data": {"world_size": self.world_size, "positions": all_pos},
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "elapsed_s": self.elapsed_before + (time.time() - self.t_train),
            "config": self.cfg,
            "ds_config": self.ds_config,
            "fingerprints": self.fingerprints,
            "fingerprint_hash": self.fingerprint_hash,
            "model_config": self.spec.model_config(self.cfg) if self.spec.model_config else None,
        }
        ckpt.save_checkpoint(
            self.engines,
            self.ckpt_root,
            step,
            state,
            rank=self.rank,
            barrier=self.barrier,
            keep=self.train.keep_checkpoints,
            log=self.log,
        )
        self.last_saved = step

    # -- data position -------------------------------------------------------------------------

    def _start_position(self, saved: dict | None) -> list[dict]:
        """This rank's data positions (one per loader worker, or one) from a checkpoint: exact at
        the same world size and worker count; otherwise the streams differ and the newest epoch
        continues at the same fraction."""
        n = max(1, self.data.num_workers)
        if not saved:
            return [{"epoch": 0, "offset": 0} for _ in range(n)]
        poss = saved.get("positions") or []
        flat = [p for r in poss for p in (r if isinstance(r, list) else [r])]
        if (
            int(saved.get("world_size", -1)) == self.world_size
            and len(poss) == self.world_size
            and all(len(r if isinstance(r, list) else [r]) == n for r in poss)
        ):
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

    def _eval_batches(self, n_batches: int, *, rank: int | None = None, world_size: int | None = None):
        return tdata.eval_batches(
            self.eval_urls,
            self.data.eval_split,
            build_example=self.spec.build_example,
            collate=self.spec.collate,
            cfg=self.eval_cfg,
            batch_size=self.micro,
            n_batches=n_batches,
            rank=self.rank if rank is None else rank,
            world_size=self.world_size if world_size is None else world_size,
            seed=self.seed,
        )

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean of the stage's ``eval_step`` (default: its loss) over ``train.eval_batches`` eval
        batches per rank -> ``{eval/<name>}``."""
        step_fn = self.spec.eval_step or self.spec.loss
        engine = self.engine
        engine.eval()
        sums: dict[str, float] = {}
        count = 0
        try:
            for batch in self._eval_batches(self.train.eval_batches):
                loss, metrics = step_fn(engine, self._to_device(batch), self.eval_cfg)
                vals = {"loss": float(loss.float())}
                vals.update(
                    {
                        k: float(v.float()) if isinstance(v, torch.Tensor) else float(v)
                        for k, v in (metrics or {}).items()
                        if k not in ("loss", "tokens")
                    }
                )
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

    def log_eval(self, ev: dict) -> None:
        if self.rank == 0 and ev:
            self.monitor.log(self.step, ev)
            self.log(f"step {self.step}: eval loss {ev.get('eval/loss', float('nan')):.4f}")

    @torch.no_grad()
    def split_evaluate(self) -> dict:
        """Whole-split metrics of the spec (``eval_outputs`` on every eval batch, split across the
        ranks; rows gathered in split order; ``eval_summary`` on rank 0). Returns ``{eval/<name>}``
        on rank 0, {} elsewhere."""
        engine = self.engine
        engine.eval()
        rows: list[tuple[int, dict]] = []  # (global batch number, outputs)
        try:
            for j, (batch, real) in enumerate(
                tdata.split_batches(
                    self.eval_urls,
                    self.data.eval_split,
                    build_example=self.spec.build_example,
                    collate=self.spec.collate,
                    cfg=self.eval_cfg,
                    batch_size=self.micro,
                    rank=self.rank,
                    world_size=self.world_size,
                    seed=self.seed,
                    max_samples=self.train.split_eval_samples,
                )
            ):
                out = self.spec.eval_outputs(engine, self._to_device(batch), self.eval_cfg)
                if real:
                    rows.append((j * self.world_size + self.rank, {k: _cpu_rows(v) for k, v in out.items()}))
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

    def _split_eval(self) -> None:
        t0 = time.time()
        ev = self.split_evaluate()
        if self.rank == 0 and ev:
            self.monitor.log(self.step, ev)
            shown = ", ".join(f"{k[5:]} {v:.3g}" for k, v in list(ev.items())[:6])
            self.log(f"step {self.step}: split eval ({time.time() - t0:.1f}s): {shown}")

    @torch.no_grad()
    def probe_logits(self) -> None:
        """Logits of the first eval batch from the live engine -> run_dir/probe_logits.safetensors."""
        batch = next(iter(self._eval_batches(1, rank=0, world_size=1)))
        self.engine.eval()
        logits = self.engine(batch["tokens"].to(self.device))
        self.engine.train()
        if self.rank == 0:
            from safetensors.torch import save_file

            save_file(
                {"tokens": batch["tokens"].contiguous(), "logits": logits.float().cpu().contiguous()},
                os.path.join(self.run_dir, "probe_logits.safetensors"),
            )


def _lr_of_last_step(engine) -> float:
    """The learning rate an engine's last ``step()`` used (its scheduler has already moved on);
    for extra engines, which may be created inside a step, after it."""
    sched = getattr(engine, "lr_scheduler", None)
    if isinstance(sched, torch.optim.lr_scheduler.LambdaLR) and sched.last_epoch >= 1:
        return float(sched.base_lrs[0] * sched.lr_lambdas[0](sched.last_epoch - 1))
    return float(engine.get_lr()[0]) if hasattr(engine, "get_lr") else float("nan")


def _optimizer_name(engine) -> str:
    """The optimizer doing the update (inside DeepSpeed's ZeRO wrapper, if any)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", None)
    return type(opt).__name__ + (f"({type(inner).__name__})" if inner is not None else "")


@torch.no_grad()
def _grad_norm(engine) -> float | None:
    grads = [p.grad.detach().float() for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return None
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def _unlink_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce (``train.shm_allreduce``) creates one 66 MB
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` per rank and never removes
    it: every CPU run leaked RAM until the machine ran out (15 GB after a day of runs here). Once
    all ranks have mapped each other's segments (the barrier after init), the names are not needed:
    unlinking ours frees the memory when the process exits, however it exits (SIGKILL too)."""
    path = os.path.join(
        "/dev/shm",
        f"deepspeed_allreduce_buffer_{os.getuid()}_"
        f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_{rank}",
    )
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
    p.add_argument(
        "--deepspeed_config", "--ds_config", dest="deepspeed_config", help="DeepSpeed JSON (deepspeed_configs/*.json)"
    )
    p.add_argument("--resume", default="auto", help="auto (default) | none | checkpoint folder or tag")
    p.add_argument("--run_dir", help="run folder (default runs/<name>)")
    p.add_argument("--name", help="run name (default: config name)")
    p.add_argument("--shards", nargs="+", help="shard folder(s), replaces data.shards")
    p.add_argument("--max_steps", type=int, help="replaces train.max_steps (the cosine horizon)")
    p.add_argument("--stop_after", type=int, help="checkpoint and stop after this step (schedule unchanged)")
    p.add_argument(
        "--init_from",
        help="start from exported weights (model.safetensors or its folder) or a package folder (its <stage>/ "
        "weights): weights only, fresh optimizer/schedule/data; ignored when the run has a checkpoint",
    )
    add_set_argument(p)
    p.add_argument(
        "--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help="set by the deepspeed launcher"
    )
    return p


def train_main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    setup_logging()
    from musiclm.data.shards import FingerprintMismatch

    from .init_from import InitFromError

    try:
        cfg = load_config(args.config, args.set)
        if args.stage:
            if cfg.get("stage") and cfg["stage"] != args.stage:
                print(
                    f"[musiclm.train] note: --stage {args.stage} replaces the config's stage {cfg['stage']}", flush=True
                )
            cfg["stage"] = args.stage
        if not cfg.get("stage"):
            raise ConfigError(f"{args.config}: no stage: pass --stage or set stage: in the config")
        if args.name:
            cfg["name"] = args.name
        if args.shards:
            cfg.setdefault("data", {})["shards"] = args.shards
        if args.max_steps is not None:
            cfg.setdefault("train", {})["max_steps"] = args.max_steps
        if args.init_from:
            cfg["init_from"] = args.init_from
        where = args.config + (f" (with --set {' '.join(args.set)})" if args.set else "")
        trainer = Trainer(
            cfg["stage"],
            cfg,
            args.deepspeed_config,
            run_dir=args.run_dir,
            resume=args.resume,
            stop_after=args.stop_after,
            config_path=where,
        )
    except (ConfigError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"[musiclm.train] config error: {msg}", file=sys.stderr, flush=True)
        return 2
    try:
        return trainer.run()
    except InitFromError as e:
        print(f"[musiclm.train] {e}", file=sys.stderr, flush=True)
        return 2
    except (FingerprintMismatch, tdata.ShardIntegrityError) as e:
        print(f"[musiclm.train] refusing the shards: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    except (ckpt.CheckpointRejected, ckpt.DiskFull) as e:
        what = "checkpoint not saved" if isinstance(e, ckpt.DiskFull) else "refusing the checkpoint"
        print(f"[musiclm.train] {what}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    except pickle.UnpicklingError as e:
        # torch's weights-only loader refused a pickle that is not plain tensors: say so in one line
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = [ln for ln in lines if "Unsupported global" in ln] or lines[:1]
        print(
            f"[musiclm.train] refusing the checkpoint: a file in it is not plain weights (Weights only load "
            f"failed: {' '.join(why)}); nothing was loaded or run. Resume only from run folders you trust.",
            file=sys.stderr,
            flush=True,
        )
        return 2


if __name__ == "__main__":  # `deepspeed --module musiclm.train.engine ...` works without launch/
    sys.exit(train_main())
