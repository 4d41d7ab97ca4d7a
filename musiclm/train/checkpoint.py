"""Checkpoints of a run: DeepSpeed engine state + our trainer state, complete or invisible.

Layout under ``runs/<name>/checkpoints/``::

    step_00000200/
        model/                      DeepSpeed save_checkpoint(tag="model") of the main engine
                                    (mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt ...)
        <other engine>/             extra engines of a custom step (e.g. a discriminator)
        model_universal/            DeepSpeed universal checkpoint, made on demand (world-size change)
        rng/rank<r>.json            RNG states of every rank (python, numpy, torch, cuda)
        trainer_state.json          step, data position of every rank, config, fingerprints;
                                    written last: its presence marks the checkpoint complete
    latest                          name of the newest complete checkpoint, replaced atomically

A checkpoint is written under ``.partial-step_XXXXXXXX`` and renamed to its final name by rank 0
only after every rank has finished writing and ``trainer_state.json`` is on disk, then ``latest``
is replaced (write to a temp file + ``os.replace``). A run killed mid-write leaves a
``.partial-*`` folder, which is never loaded (and is removed by the next run).

Resuming at another world size: ZeRO optimizer partitions belong to a world size. When the
checkpoint's world size differs from the current one, rank 0 converts it once with DeepSpeed's
``ds_to_universal`` (into ``<tag>/model_universal``, again via a partial folder), and the engine is
built with ``"checkpoint": {"load_universal": true}``. The checkpoints must be saved with
``client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}`` (they are).

Nothing here unpickles data from outside: our own files are JSON; DeepSpeed reads its own files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from musiclm.data import storage

TAG_RE = re.compile(r"^step_(\d{8,})$")
STATE_FILE = "trainer_state.json"
LATEST = "latest"
PARTIAL = ".partial-"
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
MAIN_ENGINE = "model"

__all__ = [
    "tag_for_step", "complete_checkpoints", "newest_checkpoint", "read_state", "ResumePlan", "plan_resume",
    "save_checkpoint", "ensure_universal", "rng_state", "set_rng_state", "remove_partials", "write_atomic",
]


def tag_for_step(step: int) -> str:
    return f"step_{int(step):08d}"


def write_atomic(path: str, data: str | bytes) -> None:
    """Write a file so that readers see the old content or the new one, never a part."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(d, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def plan_resume(ckpt_root: str, resume: str | None, world_size: int) -> ResumePlan:
    """``resume``: "auto" (newest complete checkpoint, if any), "none", or a checkpoint folder /
    tag. Raises if an explicit checkpoint is not complete."""
    if not resume or resume == "none":
        return ResumePlan()
    if resume == "auto":
        tag = newest_checkpoint(ckpt_root)
        if tag is None:
            return ResumePlan()
        tag_dir = os.path.join(ckpt_root, tag)
    else:
        tag_dir = resume if os.path.isdir(resume) else os.path.join(ckpt_root, resume)
        tag = os.path.basename(os.path.normpath(tag_dir))
    state = read_state(tag_dir)
    if state is None:
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint (no complete {STATE_FILE})")
    return ResumePlan(tag=tag, tag_dir=tag_dir, state=state, universal=int(state["world_size"]) != int(world_size))


def ensure_universal(tag_dir: str, engine_name: str = MAIN_ENGINE, log=print) -> str:
    """Convert ``<tag_dir>/<engine_name>`` to a universal checkpoint once (rank 0 only); returns
    the universal folder's name (the tag to load with ``load_universal``)."""
    out_name = f"{engine_name}_universal"
    out = os.path.join(tag_dir, out_name)
    if os.path.isfile(os.path.join(out, ".complete")):
        return out_name
    tmp = os.path.join(tag_dir, f"{PARTIAL}{out_name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           os.path.join(tag_dir, engine_name), "--output_folder", tmp, "--num_extract_workers", "1",
           "--num_merge_workers", "1"]
    log(f"converting {os.path.join(tag_dir, engine_name)} to a universal checkpoint (world size changed)")
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ds_to_universal failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(tmp, ".complete"), "w") as f:
        f.write("ok\n")
    os.replace(tmp, out)
    try:  # the converter points <tag_dir>/latest_universal at its output folder name
        write_atomic(os.path.join(tag_dir, "latest_universal"), out_name)
    except OSError:
        pass
    log(f"universal checkpoint written to {out} in {time.time() - t0:.1f}s")
    return out_name


# -----------------------------------------------------------------------------------------------
# save


def save_checkpoint(engines: dict, ckpt_root: str, step: int, trainer_state: dict, *, rank: int,
                    barrier, keep: int | None = None, log=print) -> str:
    """Save every engine plus our state; collective (every rank calls it). Returns the tag.

    ``engines``: {name: DeepSpeedEngine}, the main one under "model". ``trainer_state`` is written
    by rank 0 (it must already hold every rank's data position)."""
    tag = tag_for_step(step)
    partial = os.path.join(ckpt_root, PARTIAL + tag)
    final = os.path.join(ckpt_root, tag)
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(os.path.join(partial, "rng"), exist_ok=True)
    barrier()
    client_state = dict(UNIVERSAL_INFO)
    client_state["musiclm"] = {"step": int(step), "tag": tag}
    for name, eng in engines.items():
        eng.save_checkpoint(partial, tag=name, client_state=client_state, save_latest=False)
    with open(os.path.join(partial, "rng", f"rank{rank}.json"), "w") as f:
        json.dump(rng_state(), f)
    barrier()
    if rank == 0:
        st = dict(trainer_state)
        st.update({"complete": True, "tag": tag, "step": int(step), "engines": list(engines),
                   "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
        write_atomic(os.path.join(partial, STATE_FILE), json.dumps(st, indent=1, default=_json_default))
        storage.publish_dir(partial, final)  # re-saving a step (e.g. stopped right after a resume) replaces it
        write_atomic(os.path.join(ckpt_root, LATEST), tag + "\n")
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
