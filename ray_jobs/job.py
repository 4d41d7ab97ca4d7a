"""``run_job()``: the driver every Ray job in this folder runs.

Parse the common arguments (+ the job's own), set up logging, load the YAML config (``base:``
files, ``--set`` overrides), let the job work out what to compute (``setup``), plan groups of clips
(resuming a shard job's folder), start or join Ray, stream the groups through decode -> the job's
own stages (``stages``; a job whose ``decodes_itself`` says so gets None and reads
``job.pending`` itself) with progress lines, then let the job write its outputs (``complete``)
and print the one-line JSON summary it returns.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from musiclm.logs import get_logger, setup_logging
from musiclm.testing import group_delay_seconds
from ray_jobs import job_args
from ray_jobs.cluster import init_ray, worker_plan
from ray_jobs.output import Progress, errors_url, fit_summary, print_summary, write_errors
from ray_jobs.plan import JobLock, WorkState, make_plan, pending_groups
from ray_jobs.stages import decode_group, groups_dataset, unpack_arrays

log = get_logger(__name__)


@dataclass
class Job:
    """A job's run: what ``setup`` decides, what ``run_job`` plans and runs, what ``complete`` reads."""

    name: str
    args: argparse.Namespace
    cfg: dict
    parser: argparse.ArgumentParser
    t_start: float
    shard_job: bool
    # set by setup()
    sample_rate: int = 24000
    segment_seconds: float = 10.0
    grid_seconds: float = 0.0
    min_seconds: float = 1.0
    params: dict = field(default_factory=dict)  # shard jobs: part of the plan hash
    out_dir: str | None = None  # shard jobs: the shard folder (its _groups/ holds the resume state)
    describe: str = ""  # fitting jobs: what is computed, for the first log line
    data: dict = field(default_factory=dict)  # anything else the job's callbacks share
    # Called once Ray is up: True when the job's own stages decode the groups (tokenize's fused
    # pipeline), so run_job adds no decode tasks and the worker plan reserves no CPUs for them.
    decodes_itself: Callable[[Job], bool] | None = None
    # set by run_job()
    groups: list = field(default_factory=list)
    plan_errors: list = field(default_factory=list)
    plan: dict = field(default_factory=dict)
    state: WorkState | None = None
    lock: JobLock | None = None
    pending: list = field(default_factory=list)
    ray_info: dict = field(default_factory=lambda: {"mode": "none"})
    fused: bool = False  # decodes_itself() said so: ``stages`` gets None and reads ``pending``
    progress: Progress | None = None
    group_delay: float = 0.0
    records: list[dict] = field(default_factory=list)  # fitting jobs: one per group
    arrays: list[dict[str, np.ndarray]] = field(default_factory=list)  # fitting jobs: what each group returned
    _wp: dict | None = None

    def worker_plan(self) -> dict:
        """Actor pool size and resources (computed once, after Ray started)."""
        if self._wp is None:
            self._wp = worker_plan(self.args, self.ray_info, task_slots=0 if self.fused else 2)
        return self._wp

    def decode_kwargs(self) -> dict:
        """What :func:`ray_jobs.stages.decode_group` / ``decode_clips`` take besides the group."""
        return dict(
            sample_rate=self.sample_rate,
            segment_seconds=self.segment_seconds,
            grid_seconds=self.grid_seconds,
            min_seconds=self.min_seconds,
        )

    def fit_summary(self, out: str) -> dict:
        """A fitting job's end: failed clips into ``<out>.errors.jsonl``, then its summary."""
        errors = self.plan_errors + [e for r in self.records for e in r["errors"]]
        errors_file = errors_url(out)
        write_errors(errors_file, errors)
        summary = fit_summary(
            self.name, out, self.records, errors, self.progress, self.worker_plan(), self.ray_info, self.t_start
        )
        summary["errors_file"] = errors_file
        return summary


def run_job(
    name: str,
    doc: str,
    argv: list[str] | None,
    *,
    setup: Callable[[Job], None],
    stages: Callable[[Job, Any], Any],
    complete: Callable[[Job], dict],
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    shard_clips: int | None = None,
) -> dict:
    """Run a job (see the module docstring); returns the summary it printed.

    ``shard_clips`` set: a shard job (``--out`` root, ``--clips-per-shard`` defaulting to it, resume
    from the folder ``setup`` puts in ``job.out_dir``; ``stages`` ends with rows ``{"record"}``).
    Otherwise a fitting job (``--clips-per-task``; ``stages`` ends with rows ``{"record", "arrays"}``
    collected into ``job.records`` / ``job.arrays``)."""
    p = job_args.base_parser(doc.split("\n\n")[0])
    if shard_clips is not None:
        job_args.add_shard_args(p, default_clips=shard_clips)
    else:
        job_args.add_fit_args(p)
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args(argv)
    setup_logging()
    job = Job(
        name=name,
        args=args,
        cfg={},
        parser=p,
        t_start=time.time(),
        shard_job=shard_clips is not None,
        group_delay=group_delay_seconds(),
    )
    job.cfg = job_args.load_config(args.config, args.set)
    setup(job)

    try:
        per_group = args.clips_per_shard if job.shard_job else args.clips_per_task
        job.groups, job.plan_errors, job.plan = make_plan(args, name, job.params, clips_per_group=per_group)
        if job.shard_job:
            job.lock = JobLock(job.out_dir).acquire()  # before the plan check: one job per output folder
            job.state = WorkState(job.out_dir)
            resumed = job.state.check_plan(job.plan, args.overwrite)
            job.pending = pending_groups(job.groups, job.state, retry_failed=args.retry_failed)
            log.info(
                f"[{name}] {job.plan['clips']} clips in {len(job.groups)} groups -> {job.out_dir}"
                + (f" (resuming: {len(job.groups) - len(job.pending)} groups already done)" if resumed else "")
            )
        else:
            job.pending = list(job.groups)
            log.info(f"[{name}] {job.plan['clips']} clips ({len(job.groups)} tasks), {job.describe}")

        if job.pending or not job.shard_job:  # a fitting job always runs (an empty plan fails in complete)
            job.ray_info = init_ray(args)
            job.progress = Progress(name, len(job.pending), sum(len(g.clips) for g in job.pending))
            job.fused = bool(job.decodes_itself and job.decodes_itself(job))
            ds = None  # a job that decodes itself reads job.pending
            if not job.fused:
                ds = groups_dataset(job.pending).map(
                    decode_group, num_cpus=args.task_cpus, fn_kwargs=job.decode_kwargs()
                )
            ds = stages(job, ds)
            if job.shard_job:
                run_pipeline(ds, job.progress)
            else:
                job.records, job.arrays = collect_groups(ds, job.progress)
        summary = complete(job)
    except Exception as e:
        full = _disk_full(e)
        if full is None:
            raise
        raise SystemExit(
            f"[{name}] no space left on the device while writing into "
            f"{job.out_dir or getattr(args, 'out', None) or 'the output folder'}"
            f" ({full}); free space there and rerun the same command: finished groups are kept "
            f"and the job resumes"
        ) from None
    finally:
        if job.lock is not None:
            job.lock.release()
    print_summary(summary)
    return summary


def _disk_full(e: BaseException) -> str | None:
    """The ENOSPC error in an exception's chain (Ray wraps a task's OSError in RayTaskError and
    keeps its text), or None."""
    import errno

    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return str(e)
        text = str(e)
        if "No space left on device" in text or "[Errno 28]" in text:
            return "No space left on device"
        e = e.__cause__ or e.__context__ or getattr(e, "cause", None)
        seen += 1
    return None


def run_pipeline(ds, progress: Progress) -> None:
    """Stream the final stage's rows ({"record": JSON}: a Ray Dataset, or an iterable of rows) and
    report progress."""
    for row in ds.iter_rows() if hasattr(ds, "iter_rows") else ds:
        progress.update(json.loads(row["record"]))
    progress.stop()


def collect_groups(ds, progress: Progress) -> tuple[list[dict], list[dict[str, np.ndarray]]]:
    """Stream rows {"record": JSON, "arrays": npz} of a fitting pipeline -> (records, arrays)."""
    records, arrays = [], []
    for row in ds.iter_rows():
        rec = json.loads(row["record"])
        progress.update(rec)
        records.append(rec)
        arrays.append(unpack_arrays(row["arrays"]))
    progress.stop()
    return records, arrays
