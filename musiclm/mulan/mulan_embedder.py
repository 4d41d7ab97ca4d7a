"""Our trained MuLaN behind the :class:`~musiclm.mulan.embedder.AudioTextEmbedder` interface
(``{"type": "mulan", "model": DIR}`` in a tokenizer config); directories are read and written by
:mod:`musiclm.mulan.checkpoint`."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from musiclm.mulan.checkpoint import load_mulan, save_mulan
from musiclm.mulan.embedder import AudioTextEmbedder
from musiclm.mulan.model import MuLaN
from musiclm.tensors import as_batch

__all__ = ["MuLaNEmbedder"]


class MuLaNEmbedder(AudioTextEmbedder):
    """Our MuLaN behind the :class:`AudioTextEmbedder` interface (``dim`` = 128 by default).

    ``MuLaNEmbedder(directory)`` loads a directory written by :func:`save_mulan` (or a training
    export); ``MuLaNEmbedder(model)`` wraps a live :class:`MuLaN` (e.g. during training). The
    window is the model's ``audio.seconds``; longer audio is averaged over windows by
    :meth:`AudioTextEmbedder.embed_audio`."""

    name = "mulan"

    def __init__(
        self, model_or_dir: MuLaN | str | os.PathLike, *, device: str | torch.device = "cpu", max_batch: int | None = 32
    ):
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
        wav = as_batch(wav).cpu()
        out = []
        step = self.max_batch or max(1, wav.shape[0])
        for s in range(0, wav.shape[0], step):
            feats = [self.frontend(w) for w in wav[s : s + step]]
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
            batch = self.tokenizer(texts[s : s + step])
            emb = self.model(**{k: v.to(self.device) for k, v in batch.items()})["text"]
            out.append(emb.float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)

    def config(self) -> dict:
        return {
            "type": "mulan",
            "window_seconds": self.window_seconds,
            "min_window_seconds": self.min_window_seconds,
            "model": self.model.config,
        }

    def fingerprint(self) -> dict:
        if self._fingerprint is None:
            from musiclm.fingerprint import make_fingerprint, state_dict_sha256

            self._fingerprint = make_fingerprint(
                "mulan", self.name, self.config(), state_dict_sha256(self.model), self.sample_rate, dim=self.dim
            )
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
