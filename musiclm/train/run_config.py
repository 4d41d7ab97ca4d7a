"""The training run's configuration: typed ``train:`` and ``data:`` sections, the DeepSpeed JSON,
and the checks that run before any work.

A run config is YAML (``launch/configs/*.yaml``, loaded by :func:`musiclm.config.load_config` with
``base:`` files and ``--set`` overrides). The engine owns these top-level keys::

    name: coarse-demo          # run folder runs/<name> (``--run_dir`` overrides)
    runs_root: runs
    stage: coarse              # the registered TrainSpec (``--stage`` overrides)
    seed: 0
    imports: []                # modules or .py files that register extra TrainSpecs
    fingerprint_hash: null     # optional: exact hash of the shards' tokenizer fingerprints
    data: {...}                # DataConfig below
    train: {...}               # TrainConfig below
    deepspeed: {}              # overrides merged into --deepspeed_config

and the stage declares its own (``TrainSpec.config_keys``: ``tokens``, ``model``,
``cond_dropout`` for the stage LMs; ``model``, ``mulan`` for MuLaN). Any other key is refused
before the engine starts, with the file, the key and the closest valid name; values are checked
against their types and ranges (learning rate > 0, steps >= 1, probabilities in [0, 1], micro
batch >= 1), in the YAML and in the DeepSpeed keys we read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, check_keys, deep_merge, load_json, require, section

__all__ = ["TrainConfig", "DataConfig", "ENGINE_KEYS", "check_run_config", "load_ds_config", "check_ds_config"]

ENGINE_KEYS = (
    "name",
    "runs_root",
    "stage",
    "seed",
    "imports",
    "fingerprint_hash",
    "data",
    "train",
    "deepspeed",
    "run_dir",
    "init_from",  # exported/packaged weights to start from (launch/train.py --init_from)
)


@dataclass
class TrainConfig:
    """``train:`` — schedule, logging, evaluation and checkpoint cadence."""

    max_steps: int = 1000  # also the cosine horizon
    max_minutes: float | None = None  # training time budget, counted from the first step
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    log_every: int = 10
    eval_every: int = 0  # eval loss on eval_batches batches; 0 = never
    eval_batches: int = 4
    split_eval_every: int | None = None  # whole-split metrics (stages that define them); None = eval_every
    split_eval_samples: int = 1000  # at most this many eval samples for them
    checkpoint_every: int = 0  # 0 = only at the end / on a signal
    keep_checkpoints: int | None = 3  # None keeps every checkpoint
    peak_flops: float | None = None  # FLOP/s of one device for MFU (CPU: set it; known GPUs: detected)
    probe_logits: bool = False  # at the end, save the logits of one eval batch (export tests)
    tensorboard: bool = True
    optimizer: str = "auto"  # auto: torch AdamW on CPU (no JIT-compiled op), DeepSpeed's on GPU
    shm_allreduce: bool = False  # CPU: DeepSpeed's shared-memory all-reduce (a JIT-compiled op)
    compile: bool = False  # torch.compile the main model (DeepSpeed engine.compile); the first step pays for it

    def check(self, where: str) -> None:
        require(self.max_steps >= 1, f"{where}.max_steps", f"must be >= 1, got {self.max_steps}")
        require(
            self.max_minutes is None or self.max_minutes > 0,
            f"{where}.max_minutes",
            f"must be > 0 (or null for no limit), got {self.max_minutes}",
        )
        require(self.warmup_steps >= 0, f"{where}.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"{where}.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.log_every >= 1, f"{where}.log_every", f"must be >= 1, got {self.log_every}")
        for k in ("eval_every", "eval_batches", "split_eval_samples", "checkpoint_every"):
            v = getattr(self, k)
            require(v >= 0, f"{where}.{k}", f"must be >= 0, got {v}")
        require(
            self.split_eval_every is None or self.split_eval_every >= 0,
            f"{where}.split_eval_every",
            f"must be >= 0, got {self.split_eval_every}",
        )
        require(
            self.keep_checkpoints is None or self.keep_checkpoints >= 1,
            f"{where}.keep_checkpoints",
            f"must be >= 1 (or null to keep all), got {self.keep_checkpoints}",
        )
        require(
            self.peak_flops is None or self.peak_flops > 0, f"{where}.peak_flops", f"must be > 0, got {self.peak_flops}"
        )
        require(
            self.optimizer in ("auto", "torch", "deepspeed"),
            f"{where}.optimizer",
            f"must be auto, torch or deepspeed, got {self.optimizer!r}",
        )

    @property
    def split_every(self) -> int:
        return int(self.split_eval_every if self.split_eval_every is not None else self.eval_every)


@dataclass
class DataConfig:
    """``data:`` — where the shards are and how they stream."""

    shards: Any = None  # folder(s), glob(s) or s3:// URLs (str or list)
    train_split: str = "train"
    eval_split: str = "eval"
    shuffle: int = 1000  # shuffle buffer (samples)
    prefetch: int = 4  # batches built ahead (by a thread, or per worker)
    num_workers: int = 0  # DataLoader worker processes per rank (expensive examples, e.g. audio)
    on_bad_shard: str = "error"  # a shard missing or not the size index.json records: error | skip

    def check(self, where: str) -> None:
        require(
            self.shards is None or isinstance(self.shards, (str, list)),
            f"{where}.shards",
            f"expected a folder, URL or list of them, got {self.shards!r}",
        )
        for k in ("shuffle", "prefetch", "num_workers"):
            require(getattr(self, k) >= 0, f"{where}.{k}", f"must be >= 0, got {getattr(self, k)}")
        require(
            self.on_bad_shard in ("error", "skip"),
            f"{where}.on_bad_shard",
            f"must be error or skip, got {self.on_bad_shard!r}",
        )


def check_run_config(cfg: dict, stage_keys: tuple[str, ...], *, where: str) -> tuple[TrainConfig, DataConfig]:
    """Refuse unknown top-level keys (engine's + the stage's), type/range-check ``train``/``data``."""
    check_keys(cfg, tuple(ENGINE_KEYS) + tuple(stage_keys), where=where)
    train = section(TrainConfig, cfg.get("train"), where=f"{where}: train")
    data = section(DataConfig, cfg.get("data"), where=f"{where}: data")
    return train, data


def _bf16_native() -> bool:
    try:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        if acc.device_name() == "cpu":
            return False
        return bool(acc.is_bf16_supported())
    except Exception:
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


DEFAULT_DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
    "zero_optimization": {"stage": 2},
    "bf16": {"enabled": "auto"},
}


def load_ds_config(path: str | dict | None, cfg: dict | None = None) -> dict:
    """The DeepSpeed config: the JSON file, the YAML's ``deepspeed:`` overrides, "auto" resolved, checked."""
    where = "deepspeed config"
    if isinstance(path, dict):
        ds = copy.deepcopy(path)
    elif path:
        where = str(path)
        ds = load_json(path)
    else:
        ds = copy.deepcopy(DEFAULT_DS_CONFIG)
    overrides = (cfg or {}).get("deepspeed") or {}
    if overrides:
        where = f"{where} + the run config's deepspeed: section"
    ds = deep_merge(ds, overrides)
    if "train_micro_batch_size_per_gpu" in ds:
        ds.pop("train_batch_size", None)
    for key in ("bf16", "fp16"):
        sec = ds.get(key)
        if isinstance(sec, dict) and sec.get("enabled") == "auto":
            sec["enabled"] = _bf16_native() if key == "bf16" else False
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    check_ds_config(ds, where=where)
    return ds


def _number(ds: dict, path: str, where: str) -> float | None:
    node: Any = ds
    for p in path.split("."):
        if not isinstance(node, dict) or p not in node:
            return None
        node = node[p]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        raise ConfigError(f"{where}: {path} must be a number, got {node!r}")
    return float(node)


def check_ds_config(ds: dict, *, where: str) -> None:
    """Types and ranges of the DeepSpeed keys the engine relies on (DeepSpeed itself would train
    100 steps of gradient ascent on a negative learning rate without a word)."""
    checks = (
        ("train_micro_batch_size_per_gpu", lambda v: v >= 1 and v == int(v), "must be an integer >= 1"),
        ("gradient_accumulation_steps", lambda v: v >= 1 and v == int(v), "must be an integer >= 1"),
        ("gradient_clipping", lambda v: v >= 0, "must be >= 0"),
        ("optimizer.params.lr", lambda v: v > 0, "must be > 0"),
        ("optimizer.params.weight_decay", lambda v: v >= 0, "must be >= 0"),
        ("optimizer.params.eps", lambda v: v > 0, "must be > 0"),
        ("zero_optimization.stage", lambda v: v in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
    )
    for path, ok, msg in checks:
        v = _number(ds, path, where)
        if v is not None and not ok(v):
            raise ConfigError(f"{where}: {path} {msg}, got {v:g}")
    betas = ((ds.get("optimizer") or {}).get("params") or {}).get("betas")
    if betas is not None and not (
        isinstance(betas, (list, tuple))
        and len(betas) == 2
        and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)
    ):
        raise ConfigError(f"{where}: optimizer.params.betas must be two numbers in [0, 1), got {betas!r}")
