"""Checkpoints of a run: DeepSpeed engine state + our trainer state, complete or invisible.

Layout under ``runs/<name>/checkpoints/``::

    step_00000200/
        model/                      DeepSpeed save_checkpoint(tag="model") of the main engine
                                    (mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...)
        <other engine>/             extra engines of a custom step (e.g. a discriminator)
        model_universal/            DeepSpeed universal checkpoint, made on demand (world-size change)
        rng/rank<r>.json            RNG states of every rank (python, numpy, torch, cuda)
        trainer_state.json          step, data position of every rank, config, fingerprints
        manifest.json               size and sha256 of every file above; written last
    latest                          name of the newest complete checkpoint, replaced atomically

A checkpoint is written under ``.partial-step_XXXXXXXX`` and renamed to its final name by rank 0
only after every rank has finished writing and ``trainer_state.json`` and ``manifest.json`` are on
disk, then ``latest``
is replaced (write to a temp file + ``os.replace``). A run killed mid-write leaves a
``.partial-*`` folder, which is never loaded (and is removed by the next run).

Resuming at another world size: ZeRO optimizer partitions belong to a world size. When the
checkpoint's world size differs from the current one, rank 0 converts it once with DeepSpeed's
``ds_to_universal`` (into ``<tag>/model_universal``, again via a partial folder), and the engine is
built with ``"checkpoint": {"load_universal": true}``. The checkpoints must be saved with
``client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}`` (they are).

Trust (what a run folder must be): a checkpoint is loaded only if it is the one that was written.

- ``manifest.json`` (size + sha256 of every other file of the checkpoint) is written last, inside
  the ``.partial-`` folder, before the rename that publishes it. ``plan_resume`` checks it before
  anything of the checkpoint is read: a truncated, changed, missing or extra file, or no
  manifest at all, rejects the checkpoint (path and reason logged); ``--resume auto`` then falls
  back to the newest checkpoint that passes, an explicit ``--resume TAG`` stops with the reason.
  Universal folders made later carry their own manifest (re-converted when it does not match).
- A manifest stops corruption, not someone who can write the run folder (they rewrite the
  manifest too). So every ``torch.load`` of a training process is ``weights_only=True``
  (``enforce_weights_only``: ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1``, which overrides DeepSpeed's own
  ``weights_only=False`` calls, with the few DeepSpeed classes its files hold allow-listed); the
  ``ds_to_universal`` converter runs under the same rule. A crafted pickle is refused, not run.
  Our own files are JSON.
- Disk full while saving: checked before writing (size of the previous checkpoint, or a lower
  bound from the parameter count, against the free space; every rank agrees), and a write that
  still fails removes the partial folder and raises ``DiskFull`` naming the folder, the file
  system and the free space. A ``.partial-`` folder left by a killed process is never loaded.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import storage

TAG_RE = re.compile(r"^step_(\d{8,})$")
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
LATEST = "latest"
PARTIAL = ".partial-"
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
MAIN_ENGINE = "model"

__all__ = [
    "tag_for_step",
    "complete_checkpoints",
    "newest_checkpoint",
    "read_state",
    "ResumePlan",
    "plan_resume",
    "save_checkpoint",
    "ensure_universal",
    "rng_state",
    "set_rng_state",
    "remove_partials",
    "write_atomic",
    "write_manifest",
    "verify_checkpoint",
    "enforce_weights_only",
    "CheckpointRejected",
    "DiskFull",
]


class CheckpointRejected(FileNotFoundError):
    """No loadable checkpoint at a path: not complete, or its files do not match its manifest."""


class DiskFull(OSError):
    """A checkpoint did not fit on its file system (nothing of it is left behind)."""

    def __init__(self, msg: str):
        super().__init__(msg)
        self.errno = errno.ENOSPC


def tag_for_step(step: int) -> str:
    return f"step_{int(step):08d}"


def write_atomic(path: str, data: str | bytes) -> None:
    """Write a file so that readers see the old content or the new one, never a part."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_state(tag_dir: str) -> dict | None:
    """trainer_state.json of a checkpoint folder, or None when the checkpoint is not complete."""
    try:
        with open(os.path.join(tag_dir, STATE_FILE)) as f:
            state = json.load(f)
    except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
        return None
    if not state.get("complete"):
        return None
    # every engine listed must have its DeepSpeed files
    for name in state.get("engines", [MAIN_ENGINE]):
        if not os.path.isdir(os.path.join(tag_dir, name)):
            return None
    return state


def complete_checkpoints(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, tag) of the complete checkpoints, oldest first."""
    out = []
    try:
        names = os.listdir(ckpt_root)
    except FileNotFoundError:
        return []
    for name in names:
        m = TAG_RE.match(name)
        if m and read_state(os.path.join(ckpt_root, name)) is not None:
            out.append((int(m.group(1)), name))
    return sorted(out)


def newest_checkpoint(ckpt_root: str) -> str | None:
    """The newest complete checkpoint (the ``latest`` pointer is a hint; completeness decides)."""
    done = complete_checkpoints(ckpt_root)
    return done[-1][1] if done else None


def remove_partials(ckpt_root: str) -> list[str]:
    """Delete folders of checkpoints cut off mid-write (call on rank 0 before training)."""
    removed = []
    try:
        names = os.listdir(ckpt_root)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(PARTIAL) or name.startswith(".old-"):
            shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
            removed.append(name)
    return removed


# -----------------------------------------------------------------------------------------------
# RNG states (JSON, no pickle)


def rng_state() -> dict:
    py = random.getstate()
    np_state = np.random.get_state()
    out = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        out["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return out


def set_rng_state(state: dict) -> None:
    if "python" in state:
        v, s, g = state["python"]
        random.setstate((v, tuple(s), g))
    if "numpy" in state:
        a, k, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((a, np.array(k, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


# -----------------------------------------------------------------------------------------------
# manifest: size + sha256 of every file, written last


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _walk_files(root: str) -> list[str]:
    """Relative paths of everything under ``root`` that is not a directory (symlinks included)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        for d in list(dirnames):
            if os.path.islink(os.path.join(dirpath, d)):  # never followed: reported as a file
                dirnames.remove(d)
                filenames.append(d)
        for name in filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def write_manifest(folder: str) -> dict:
    """Write ``<folder>/manifest.json`` (size and sha256 of every other file) and return it. The
    save calls it last, inside the partial folder. Calling it by hand on a checkpoint is a
    decision to trust that checkpoint's files as they are now."""
    files = {}
    for rel in _walk_files(folder):
        if rel == MANIFEST:
            continue
        path = os.path.join(folder, rel)
        files[rel] = {"size": os.lstat(path).st_size, "sha256": _sha256(path)}
    manifest = {"version": 1, "algorithm": "sha256", "files": files}
    write_atomic(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def _manifest_size(folder: str) -> int | None:
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            return sum(int(v["size"]) for v in json.load(f)["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _made_after(rel: str) -> bool:
    """Entries a checkpoint folder gains after it was published (universal conversions, each with
    its own manifest) and so are not in its manifest."""
    top = rel.split(os.sep, 1)[0]
    if top.endswith("_universal"):  # <engine>_universal/, .partial-<engine>_universal/, latest_universal
        return True
    return top.startswith(".latest_universal.") and top.endswith(".tmp")


def verify_checkpoint(folder: str, *, ignore=None) -> str | None:
    """Check ``folder`` against its manifest before anything in it is read: None when every file is
    there with its recorded size and sha256 and there is no other file (``ignore(rel)``: entries
    allowed besides, e.g. universal folders made later); else the reason, in words."""
    mpath = os.path.join(folder, MANIFEST)
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if manifest.get("algorithm", "sha256") != "sha256" or not isinstance(files, dict):
            return f"{MANIFEST} is not a sha256 manifest"
    except FileNotFoundError:
        return (
            f"no {MANIFEST} (not written completely, or by a version before manifests; "
            f"musiclm.train.checkpoint.write_manifest adopts a checkpoint you trust)"
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} unreadable: {type(e).__name__}: {e}"
    root = os.path.realpath(folder)
    # cheap checks first (a truncated file fails here without hashing the rest)
    for rel, want in files.items():
        path = os.path.join(folder, rel)
        if os.path.isabs(rel) or ".." in rel.split("/") or not os.path.realpath(path).startswith(root + os.sep):
            return f"{MANIFEST} names a path outside the checkpoint: {rel!r}"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return f"{rel} is missing"
        if not stat.S_ISREG(st.st_mode):
            return f"{rel} is not a regular file"
        if st.st_size != int(want["size"]):
            return f"{rel} has {st.st_size} bytes, the manifest says {int(want['size'])} (truncated or changed)"
    extra = [
        rel for rel in _walk_files(folder) if rel != MANIFEST and rel not in files and not (ignore and ignore(rel))
    ]
    if extra:
        return f"{extra[0]} is not in the manifest" + (f" (and {len(extra) - 1} more files)" if len(extra) > 1 else "")
    for rel, want in files.items():
        if _sha256(os.path.join(folder, rel)) != want["sha256"]:
            return f"{rel} does not match its sha256 in the manifest (changed after it was written)"
    return None


def _check(tag_dir: str) -> tuple[dict | None, str | None]:
    """(trainer state, None) for a checkpoint that may be loaded, else (None, reason)."""
    if not os.path.isdir(tag_dir):
        return None, "no such checkpoint folder"
    reason = verify_checkpoint(tag_dir, ignore=_made_after)
    if reason:
        return None, reason
    state = read_state(tag_dir)  # only now: it is one of the verified files
    if state is None:
        return None, f"not complete (no complete {STATE_FILE} or engine folder)"
    return state, None


# -----------------------------------------------------------------------------------------------
# every torch.load of a training process: weights only


def _safe_globals() -> list:
    """The non-tensor classes DeepSpeed 0.19 pickles into its checkpoint files (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` on ZeRO-1/2/3 and universal folders).
    Plain data: their unpickling sets attributes, runs no code of the file's choosing."""
    import argparse

    out = [argparse.Namespace]
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # no deepspeed: nothing of it to allow
        return out
    return out + [LossScaler, DynamicLossScaler, ZeroStageEnum, OffloadDeviceEnum, fragment_address]


def enforce_weights_only() -> None:
    """Make every ``torch.load`` in this process (and the processes it starts) ``weights_only=True``,
    DeepSpeed's included: ``TORCH_FORCE_WEIGHTS_ONLY_LOAD=1`` overrides an explicit
    ``weights_only=False``. A pickle that names anything but tensors, containers and the
    allow-listed DeepSpeed classes fails to load (``UnpicklingError``) instead of running.
    ``plan_resume`` calls it, so it holds before any checkpoint is read."""
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.serialization.add_safe_globals(_safe_globals())


# run a module (the DeepSpeed converter) with weights-only loads: python -c _SAFE_RUN MODULE ARGS...
_SAFE_RUN = (
    "import runpy, sys; from musiclm.train.checkpoint import enforce_weights_only; "
    "enforce_weights_only(); mod = sys.argv.pop(1); sys.argv[0] = mod; "
    "runpy.run_module(mod, run_name='__main__', alter_sys=True)"
)


# -----------------------------------------------------------------------------------------------
# resume


@dataclass
class ResumePlan:
    tag: str | None = None
    tag_dir: str | None = None
    state: dict = field(default_factory=dict)
    universal: bool = False  # world size changed: load through the universal checkpoint

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0)) if self.tag else 0


def _log(msg: str) -> None:
    logging.getLogger("musiclm.train").info("%s", msg)


def plan_resume(ckpt_root: str, resume: str | None, world_size: int, log=_log) -> ResumePlan:
    """``resume``: "auto" (the newest checkpoint that passes its manifest check, if any), "none",
    or a checkpoint folder / tag. Every checkpoint is verified against its manifest before anything
    of it is read. "auto" logs each checkpoint it skips (path and reason) and raises
    ``CheckpointRejected`` when checkpoints exist but none passes; an explicit checkpoint that fails
    raises ``CheckpointRejected`` with the reason. Also turns on weights-only loading for the
    process (``enforce_weights_only``)."""
    enforce_weights_only()
    if not resume or resume == "none":
        return ResumePlan()
    if resume == "auto":
        try:
            names = os.listdir(ckpt_root)
        except FileNotFoundError:
            return ResumePlan()
        tags = sorted((int(m.group(1)), n) for n in names if (m := TAG_RE.match(n)))
        rejected = []
        for _step, tag in reversed(tags):
            tag_dir = os.path.join(ckpt_root, tag)
            state, reason = _check(tag_dir)
            if state is not None:
                return ResumePlan(
                    tag=tag, tag_dir=tag_dir, state=state, universal=int(state["world_size"]) != int(world_size)
                )
            log(f"skipping checkpoint {tag_dir}: {reason}")
            rejected.append(f"{tag}: {reason}")
        if rejected:
            raise CheckpointRejected(
                f"no checkpoint in {ckpt_root} passes its manifest check ({'; '.join(rejected)}); "
                "move them away to start over, or resume one you trust explicitly after fixing it"
            )
        return ResumePlan()
    tag_dir = resume if os.path.isdir(resume) else os.path.join(ckpt_root, resume)
    tag = os.path.basename(os.path.normpath(tag_dir))
    state, reason = _check(tag_dir)
    if state is None:
        raise CheckpointRejected(f"{tag_dir} is not a checkpoint that may be loaded: {reason}")
    return ResumePlan(tag=tag, tag_dir=tag_dir, state=state, universal=int(state["world_size"]) != int(world_size))


def ensure_universal(tag_dir: str, engine_name: str = MAIN_ENGINE, log=print) -> str:
    """Convert ``<tag_dir>/<engine_name>`` to a universal checkpoint once (rank 0 only); returns
    the universal folder's name (the tag to load with ``load_universal``). The folder gets its own
    manifest; one that does not match it is converted again. The converter (a DeepSpeed module
    that unpickles the checkpoint) runs with weights-only loads."""
    out_name = f"{engine_name}_universal"
    out = os.path.join(tag_dir, out_name)
    if os.path.isdir(out):
        reason = verify_checkpoint(out)
        if reason is None:
            return out_name
        log(f"converting again: {out}: {reason}")
    tmp = os.path.join(tag_dir, f"{PARTIAL}{out_name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-c",
        _SAFE_RUN,
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        os.path.join(tag_dir, engine_name),
        "--output_folder",
        tmp,
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (pkg_root, os.environ.get("PYTHONPATH")) if p))
    log(f"converting {os.path.join(tag_dir, engine_name)} to a universal checkpoint (world size changed)")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"ds_to_universal failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    write_manifest(tmp)
    os.replace(tmp, out)
    try:  # the converter points <tag_dir>/latest_universal at its output folder name
        write_atomic(os.path.join(tag_dir, "latest_universal"), out_name)
    except OSError:
        pass
    log(f"universal checkpoint written to {out} in {time.time() - t0:.1f}s")
    return out_name


# -----------------------------------------------------------------------------------------------
# save


def _existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _free_bytes(path: str) -> int | None:
    try:
        st = os.statvfs(_existing(path))
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _mount_point(path: str) -> str:
    path = os.path.realpath(_existing(path))
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _estimate_bytes(engines: dict, ckpt_root: str) -> int:
    """Bytes the next checkpoint needs: the size of the newest one (its manifest), else a lower
    bound: twice the bytes of every engine's parameters (model states + at least an fp32 copy in
    the optimizer states)."""
    for _step, tag in reversed(complete_checkpoints(ckpt_root)):
        size = _manifest_size(os.path.join(ckpt_root, tag))
        if size is not None:
            return size
    total = 0
    for eng in engines.values():
        module = getattr(eng, "module", None)
        if module is None:
            continue
        for p in module.parameters():
            total += int(getattr(p, "ds_numel", p.numel())) * p.element_size()
    return 2 * total


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a collective when distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bool(flag)
    dev = torch.device("cpu")
    if "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


_WRITE_FAILED = (
    "iostream error",
    "file write failed",
    "unexpected pos",
    "PytorchStreamWriter",
    "No space left",
    "Disk quota",
)


def _disk_full(e: BaseException, path: str) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if isinstance(e, RuntimeError) and any(s in str(e) for s in _WRITE_FAILED):  # torch.save's C++ writer
        free = _free_bytes(path)
        return free is not None and free < 2**20
    return False


def _save_failed(e: BaseException, tag: str, ckpt_root: str, partial: str, full: bool) -> BaseException:
    """The error to raise for a save that failed (its partial folder is already removed; ``full``:
    ``_disk_full`` decided before that, while the partial folder still filled the disk)."""
    if not isinstance(e, Exception):
        return e
    if full:
        free = _free_bytes(ckpt_root)
        quota = isinstance(e, OSError) and e.errno == errno.EDQUOT
        return DiskFull(
            f"{'disk quota exceeded' if quota else 'no space left on device'} while writing checkpoint {tag} "
            f"to {ckpt_root} (file system {_mount_point(ckpt_root)}, {_mb(free or 0)} free after removing "
            f"the partial checkpoint): nothing of {tag} was kept, earlier checkpoints are untouched. "
            f"Free space there or use --run_dir on a larger disk, then resume. ({type(e).__name__}: {e})"
        )
    if isinstance(e, (OSError, RuntimeError)):
        e.add_note(f"while writing checkpoint {tag} to {partial} (removed; earlier checkpoints are untouched)")
    return e


def save_checkpoint(
    engines: dict,
    ckpt_root: str,
    step: int,
    trainer_state: dict,
    *,
    rank: int,
    barrier,
    keep: int | None = None,
    log=print,
) -> str:
    """Save every engine plus our state; collective (every rank calls it). Returns the tag.

    ``engines``: {name: DeepSpeedEngine}, the main one under "model". ``trainer_state`` is written
    by rank 0 (it must already hold every rank's data position). Raises ``DiskFull`` (on every
    rank, before writing) when the checkpoint will not fit, and on the rank whose write failed
    when the disk fills during the save; the partial folder is removed either way."""
    tag = tag_for_step(step)
    partial = os.path.join(ckpt_root, PARTIAL + tag)
    final = os.path.join(ckpt_root, tag)
    need = _estimate_bytes(engines, ckpt_root)
    free = _free_bytes(ckpt_root)
    short = free is not None and free < need
    if _any_rank(short):  # every rank raises the same error before anything is written
        raise DiskFull(
            f"no space left on device for checkpoint {tag} in {ckpt_root} (file system "
            f"{_mount_point(ckpt_root)}): it needs about {_mb(need)}, {_mb(free or 0)} free"
            f"{'' if short else ' here and less where another rank writes'}; nothing was written, earlier "
            f"checkpoints are untouched. Free space there or use --run_dir on a larger disk, then resume."
        )
    try:
        if rank == 0:
            os.makedirs(ckpt_root, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
        barrier()
        client_state = dict(UNIVERSAL_INFO)
        client_state["musiclm"] = {"step": int(step), "tag": tag}
        for name, eng in engines.items():
            eng.save_checkpoint(partial, tag=name, client_state=client_state, save_latest=False)
        write_atomic(os.path.join(partial, "rng", f"rank{rank}.json"), json.dumps(rng_state()))
    except BaseException as e:
        # this rank's write failed: the others stop in DeepSpeed's barrier and the launcher ends them
        full = _disk_full(e, ckpt_root)
        shutil.rmtree(partial, ignore_errors=True)
        raise _save_failed(e, tag, ckpt_root, partial, full) from e
    barrier()
    if rank == 0:
        try:
            st = dict(trainer_state)
            st.update(
                {
                    "complete": True,
                    "tag": tag,
                    "step": int(step),
                    "engines": list(engines),
                    "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
            )
            write_atomic(os.path.join(partial, STATE_FILE), json.dumps(st, indent=1, default=_json_default))
            write_manifest(partial)  # last: the checkpoint is exactly these files
            storage.publish_dir(partial, final)  # re-saving a step (e.g. stopped right after a resume) replaces it
            write_atomic(os.path.join(ckpt_root, LATEST), tag + "\n")
        except BaseException as e:
            full = _disk_full(e, ckpt_root)
            shutil.rmtree(partial, ignore_errors=True)
            raise _save_failed(e, tag, ckpt_root, partial, full) from e
        if keep and keep > 0:
            for _s, old_tag in complete_checkpoints(ckpt_root)[:-keep]:
                if old_tag != tag:
                    shutil.rmtree(os.path.join(ckpt_root, old_tag), ignore_errors=True)
        log(f"checkpoint {final}")
    barrier()
    return tag


def _json_default(o):
    if isinstance(o, (np.generic,)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)
