"""Ray: join a cluster (``--address`` / ``RAY_ADDRESS``, set inside ``ray job submit``) or start a
local Ray (the embedded default); size the actor pool to the cluster."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any

from musiclm.logs import get_logger

REPO_ROOT = Path(__file__).resolve().parents[1]
log = get_logger(__name__)


def init_ray(args) -> dict:
    """Join the cluster (``--address`` or ``RAY_ADDRESS``) or start a local Ray; returns
    {"mode", "address", "cpus", "gpus"}."""
    import ray
    import ray.data

    address = args.address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith("http"):
        raise SystemExit(
            f"RAY_ADDRESS={address} is a dashboard URL (for `ray job submit`); "
            f"submit the job with `ray job submit --working-dir . -- python {sys.argv[0]} ...` "
            f"or set RAY_ADDRESS to the GCS address (host:6379)"
        )
    kwargs: dict[str, Any] = dict(ignore_reinit_error=True, log_to_driver=True, logging_level="WARNING")
    if address:
        fwd = forwarded_env()
        if fwd:
            kwargs["runtime_env"] = {"env_vars": fwd}
        ray.init(address=address, **kwargs)
        mode = "cluster"
    else:
        # The local Ray's workers inherit this environment: let them import this checkout's musiclm
        # even where it is not pip-installed.
        paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(REPO_ROOT) not in paths:
            os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
        ray.init(num_cpus=int(args.num_cpus) if args.num_cpus else None, include_dashboard=False, **kwargs)
        mode = "local"
    # Ship the ray_jobs modules' functions by value: workers then need musiclm, not ray_jobs/ on sys.path.
    for name, module in list(sys.modules.items()):
        if name.startswith("ray_jobs.") and module is not None:
            ray.cloudpickle.register_pickle_by_value(module)
    res = ray.cluster_resources()
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(getattr(args, "progress", False))
    ctx.print_on_execution_start = bool(getattr(args, "progress", False))
    return {
        "mode": mode,
        "address": address or "local",
        "cpus": float(res.get("CPU", 1)),
        "gpus": float(res.get("GPU", 0)),
    }


# Storage settings the workers need to reach s3:// (moto, MinIO...). A local Ray's workers inherit
# the driver's environment; a cluster's do not, so a driver that joins a cluster passes these on.
# Inside `ray job submit` the job's own runtime_env is used as it is (pass them with
# --runtime-env-json '{"env_vars": {...}}').
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
)


def forwarded_env() -> dict:
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:  # inside a submitted job
        return {}
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def uses_gpus(args, ray_info: dict) -> bool:
    """Whether the model actors get GPUs: the cluster has some and ``--device`` / ``--gpus-per-worker``
    do not say otherwise."""
    if args.device == "cuda" and ray_info["gpus"] == 0:
        raise SystemExit("--device cuda but the Ray cluster has no GPU")
    return args.device != "cpu" and ray_info["gpus"] > 0 and args.gpus_per_worker != 0


def worker_plan(args, ray_info: dict, task_slots: int = 2) -> dict:
    """Actor pool size and resources: one actor per GPU when the cluster has GPUs, else actors
    sized so that the pool leaves room for ``task_slots`` CPU tasks of ``--task-cpus`` each (the
    decode and write tasks of a split pipeline: no deadlock; 0 when the actors do all the work)."""
    cpus, gpus = ray_info["cpus"], ray_info["gpus"]
    reserve = task_slots * args.task_cpus
    if uses_gpus(args, ray_info):
        gpus_per = args.gpus_per_worker or 1.0
        workers = args.workers or max(1, int(gpus // gpus_per))
        cpus_per = args.cpus_per_worker or 1.0
        device = "cuda"
    else:
        gpus_per = 0.0
        workers = args.workers or max(1, int(cpus))
        cpus_per = args.cpus_per_worker or min(1.0, max(0.1, (cpus - reserve) / workers))
        device = "cpu"
    if workers * cpus_per + reserve > cpus + 1e-6:
        log.warning(
            f"{workers} workers x {cpus_per} CPUs + {reserve} for tasks > {cpus} CPUs in the cluster: "
            f"the pool may wait for resources"
        )
    return {
        "workers": int(workers),
        "cpus_per_worker": float(cpus_per),
        "gpus_per_worker": float(gpus_per),
        "device": device,
        "threads": max(1, int(math.floor(cpus_per + 1e-9))),
    }


def resolve_device(device: str) -> str:
    import torch

    if device in ("auto", "cuda"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
