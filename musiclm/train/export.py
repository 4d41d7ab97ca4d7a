"""Consolidated weights from a training run: ``musiclm export RUN_DIR --out model.safetensors``.

Reads the newest complete checkpoint of ``RUN_DIR`` (or ``tag``), gathers the fp32 weights from
any ZeRO stage with DeepSpeed's ``zero_to_fp32`` (ZeRO 1/2/3; the plain module state for stage 0)
and writes

- ``model.safetensors``: the state dict (fp32, every tensor its own storage; a tied output
  projection is written under both names), with the config JSON also in the metadata
  (``"musiclm_config"``);
- ``model.json`` (same stem): the model config for loaders, e.g. for a stage LM
  ``{"kind": "musiclm.stage_lm", "stage", "model": TransformerConfig, "tokens", "window_seconds",
  "layout", "step", "fingerprints", "fingerprint_hash", "source"}``.

The format (write and read) lives in the neutral :mod:`musiclm.weights`, so models, MuLaN, codec,
eval and generation load exported weights without importing this package (or DeepSpeed).
"""

from __future__ import annotations

import glob
import os

import torch

from musiclm.weights import load_exported, write_exported

from . import checkpoint as ckpt

__all__ = ["export", "load_exported", "consolidated_state_dict"]  # load_exported: from musiclm.weights


def consolidated_state_dict(tag_dir: str, engine_name: str = ckpt.MAIN_ENGINE) -> dict[str, torch.Tensor]:
    """fp32 state dict of one engine of a checkpoint folder, whatever its ZeRO stage. The folder is
    checked against its manifest first, and every file is read weights-only (DeepSpeed's
    ``zero_to_fp32`` included), so a crafted pickle in a run folder never runs."""
    problem = ckpt.verify_checkpoint(tag_dir)
    if problem:
        raise ckpt.CheckpointRejected(f"{tag_dir}: {problem}")
    ckpt.enforce_weights_only()
    ds_dir = os.path.join(tag_dir, engine_name)
    if glob.glob(os.path.join(ds_dir, "*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(tag_dir, tag=engine_name)
    # ZeRO stage 0: the module state dict is in the model-states file
    path = os.path.join(ds_dir, "mp_rank_00_model_states.pt")
    try:  # never unpickle arbitrary objects, even from our own runs
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"{path}: cannot be read with weights_only=True ({err})") from err
    return {k: v.float() for k, v in sd["module"].items()}


def export(run_dir: str, out_path: str, tag: str | None = None) -> dict:
    ckpt_root = os.path.join(run_dir, "checkpoints")
    tag = tag or ckpt.newest_checkpoint(ckpt_root)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_root}")
    tag_dir = os.path.join(ckpt_root, tag)
    state = ckpt.read_state(tag_dir)
    if state is None:
        raise FileNotFoundError(f"{tag_dir} is not a complete checkpoint")
    sd = consolidated_state_dict(tag_dir)
    # every tensor its own contiguous storage (safetensors refuses shared tensors, e.g. tied embeddings)
    tensors = {k: v.detach().to(torch.float32).contiguous().clone() for k, v in sd.items()}
    meta = dict(state.get("model_config") or {})
    meta.update(
        {
            "stage": state.get("spec"),
            "step": state.get("step"),
            "fingerprints": state.get("fingerprints"),
            "fingerprint_hash": state.get("fingerprint_hash"),
            "source": {
                "run_dir": os.path.abspath(run_dir),
                "tag": tag,
                "zero_stage": state.get("zero_stage"),
                "world_size": state.get("world_size"),
            },
            "num_params": int(
                sum(
                    t.numel()
                    for k, t in tensors.items()
                    if not (
                        k == "lm_head.weight"
                        and "tok_emb.weight" in tensors
                        and (meta.get("model") or {}).get("tie_embeddings")
                    )
                )
            ),
        }
    )
    out_path = os.fspath(out_path)
    cfg_path = write_exported(tensors, meta, out_path)
    return {
        "weights": out_path,
        "config": cfg_path,
        "tag": tag,
        "step": state.get("step"),
        "tensors": len(tensors),
        "num_params": meta["num_params"],
    }
