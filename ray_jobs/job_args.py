"""Command-line arguments and configuration shared by the Ray jobs."""

from __future__ import annotations

import argparse

from musiclm.config import add_set_argument
from musiclm.data import segments as S
from musiclm.data import storage


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--manifest", required=True, help="manifest.jsonl (local path or s3://)")
    p.add_argument("--config", default=None, help="YAML config (launch/configs/tokenizers.yaml)")
    add_set_argument(p)
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address; default: RAY_ADDRESS if set (inside `ray job submit`), else a local Ray",
    )
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs of the local Ray (default: all cores)")
    p.add_argument(
        "--workers", type=int, default=None, help="actors in the model pool (default: one per GPU, else one per CPU)"
    )
    p.add_argument(
        "--cpus-per-worker",
        type=float,
        default=None,
        help="CPUs reserved per actor (default: 1 with GPUs, else what the cores allow)",
    )
    p.add_argument("--gpus-per-worker", type=float, default=None, help="default: 1 when the cluster has GPUs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--task-cpus", type=float, default=0.5, help="CPUs per decode / write task")
    p.add_argument("--batch-size", type=int, default=8, help="segments per model call")
    p.add_argument("--max-clips", type=int, default=None, help="use at most this many clips (deterministic sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true", help="also show Ray Data's own progress bars")
    return p


def add_shard_args(p: argparse.ArgumentParser, default_clips: int = 32) -> None:
    p.add_argument("--out", default="shards", help="shard root: a folder or s3://bucket/prefix")
    p.add_argument("--dataset", default=None, help="dataset name under --out (default: the manifest's folder name)")
    p.add_argument(
        "--clips-per-shard",
        type=int,
        default=default_clips,
        help="clips per group; one group = one shard, the unit of work and of resume",
    )
    p.add_argument(
        "--segment-seconds", type=float, default=None, help="segment length (default: config segment_seconds, else 10)"
    )
    p.add_argument(
        "--min-segment-seconds",
        type=float,
        default=None,
        help="shortest last segment kept (default: config min_segment_seconds, else 1)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over when the output folder holds a different plan (else: refuse)",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="on a rerun, process again the groups that have failed clips (e.g. after a transient "
        "error); by default finished groups are kept as they are",
    )


def add_fit_args(p: argparse.ArgumentParser) -> None:
    """Arguments of the fitting jobs (fit_kmeans, fit_quantizer)."""
    p.add_argument("--clips-per-task", type=int, default=8, help="clips per Ray task / actor call")
    p.add_argument("--segment-seconds", type=float, default=None, help="default: config segment_seconds, else 10")


def load_config(path: str | None, overrides: list[str] | None = None) -> dict:
    """The job's YAML (local or s3://) with `base:` files and --set overrides (musiclm.config)."""
    from musiclm import config

    try:
        return config.load_config(path, overrides)
    except config.ConfigError as e:
        raise SystemExit(str(e)) from None


def tokenizers_section(cfg: dict) -> dict:
    """The `tokenizers:` section of a config, or the config itself when it is that section."""
    return dict(cfg.get("tokenizers", cfg))


def dataset_name(args) -> str:
    if args.dataset:
        return args.dataset
    parent = storage.basename(storage.dirname(args.manifest))
    return S.safe_clip_key(parent or "dataset")
