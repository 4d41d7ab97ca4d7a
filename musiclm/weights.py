"""Exported weights, the format every trained part ships in: ``model.safetensors`` + ``model.json``.

``musiclm export RUN --out DIR/model.safetensors`` (musiclm/train/export.py) writes it from a training
run; everything that uses trained weights (the stage LMs, MuLaN, the codec, eval, generation) reads it
here, without importing the training engine or DeepSpeed:

- ``model.safetensors``: the state dict (every tensor its own storage), with the config JSON in the
  metadata (``"musiclm_config"``);
- ``model.json`` (same stem): the config loaders build the model from.
"""

from __future__ import annotations

import json
import os

import torch

from musiclm.data import storage

__all__ = ["write_exported", "load_exported"]


def write_exported(tensors: dict[str, torch.Tensor], meta: dict, out_path: str) -> str:
    """Write ``out_path`` (safetensors, atomically) and its config JSON beside it -> the JSON's path."""
    from safetensors.torch import save_file

    with storage.atomic_path(out_path) as tmp:
        save_file(tensors, tmp, metadata={"musiclm_config": json.dumps(meta, default=str), "format": "pt"})
    cfg_path = os.path.splitext(out_path)[0] + ".json"
    storage.write_json_atomic(cfg_path, meta, indent=1, default=str)
    return cfg_path


def load_exported(weights: str, config: dict | str | None = None) -> tuple[dict, dict]:
    """(state dict, config dict) from exported weights. safetensors, or a ``.pt``/``.bin`` read with
    ``torch.load(weights_only=True)``. The config: ``config`` (dict or JSON path), else the JSON
    beside the weights, else the safetensors metadata."""
    weights = os.fspath(weights)
    meta: dict | None = None
    if weights.endswith(".safetensors"):
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(weights)
        with safe_open(weights, "pt") as f:
            md = f.metadata() or {}
        if "musiclm_config" in md:
            meta = json.loads(md["musiclm_config"])
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(config, dict):
        meta = config
    elif isinstance(config, str):
        with open(config) as f:
            meta = json.load(f)
    elif os.path.isfile(os.path.splitext(weights)[0] + ".json"):
        with open(os.path.splitext(weights)[0] + ".json") as f:
            meta = json.load(f)
    if meta is None:
        raise FileNotFoundError(
            f"no config for {weights}: pass config= or put {os.path.splitext(weights)[0]}.json beside it"
        )
    return state, meta
