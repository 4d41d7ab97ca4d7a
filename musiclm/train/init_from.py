"""``launch/train.py --init_from SRC``: start a run from exported or packaged weights (fine-tuning).

Weights only: the optimizer, learning-rate schedule and data position start fresh, as in a new
run. ``SRC`` is

- exported weights: ``X/model.safetensors`` (``musiclm export``) or the folder holding it;
- a package (``musiclm package``): the folder with ``package.json``; the run's stage picks
  ``<stage>/model.safetensors`` inside it.

The weights are loaded strictly into the freshly built model before the DeepSpeed engine exists
(so every ZeRO stage partitions the loaded values). A missing, unexpected or differently shaped
tensor is refused in one line naming it; so are weights whose ``tokens:`` layout gives the same
shapes another meaning (e.g. a swapped conditioning codebook). When the run already has a
checkpoint, resuming wins and ``init_from`` is ignored (logged).
"""

from __future__ import annotations

import json
import os

import torch

__all__ = ["InitFromError", "resolve_init_weights", "load_init_weights"]


class InitFromError(ValueError):
    """``init_from`` names weights that cannot start this run (one line, naming file and tensor)."""


def resolve_init_weights(source: str, stage: str) -> str:
    """The weights file ``source`` names for ``stage`` (see the module docstring)."""
    source = os.fspath(source)
    if os.path.isfile(source):
        return source
    if not os.path.isdir(source):
        raise InitFromError(f"init_from {source}: no such file or folder")
    pkg = os.path.join(source, "package.json")
    if os.path.isfile(pkg):
        with open(pkg) as f:
            stages = json.load(f).get("stages") or {}
        if stage not in stages:
            raise InitFromError(f"init_from {source}: the package has no {stage!r} stage (it has {sorted(stages)})")
        path = os.path.join(source, stages[stage].get("weights", f"{stage}/model.safetensors"))
        if not os.path.isfile(path):
            raise InitFromError(f"init_from {source}: {path} is missing")
        return path
    path = os.path.join(source, "model.safetensors")
    if os.path.isfile(path):
        return path
    raise InitFromError(f"init_from {source}: neither model.safetensors nor package.json in the folder")


def load_init_weights(model: torch.nn.Module, source: str, stage: str, tokens: dict | None = None) -> dict:
    """Copy the weights ``source`` names into ``model`` (strict) -> what was loaded (for the log).

    ``tokens``: the run's ``tokens:`` section; when the weights' config carries one, the layout
    fields must agree (ids would mean other things otherwise, even with equal shapes)."""
    from musiclm.weights import load_exported

    path = resolve_init_weights(source, stage)
    try:
        state, meta = load_exported(path)
    except FileNotFoundError:  # a bare state dict without its config: shapes are still checked
        from safetensors.torch import load_file

        state = load_file(path) if path.endswith(".safetensors") else torch.load(path, weights_only=True)
        meta = {}
    if meta.get("stage") and meta["stage"] != stage:
        raise InitFromError(f"init_from {path}: weights of the {meta['stage']!r} stage, this run trains {stage!r}")
    if tokens is not None and meta.get("tokens") is not None:
        from musiclm.lm.stages import TokenLayout

        a, b = TokenLayout.from_config(meta["tokens"]), TokenLayout.from_config(tokens)
        diff = [
            f"{k} {getattr(a, k)!r} != {getattr(b, k)!r}"
            for k in a.__dataclass_fields__
            if getattr(a, k) != getattr(b, k)
        ]
        if diff:
            raise InitFromError(f"init_from {path}: tokens: layout differs from the run's ({'; '.join(diff)})")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing:
        raise InitFromError(f"init_from {path}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise InitFromError(
            f"init_from {path}: tensor {unexpected[0]!r} is not in the model ({len(unexpected)} in all)"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise InitFromError(
                f"init_from {path}: tensor {k!r} has shape {list(state[k].shape)}, the model needs {list(v.shape)}"
            )
    with torch.no_grad():
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)
    return {"weights": os.path.abspath(path), "step": meta.get("step"), "tensors": len(state)}
