"""CLAP (transformers ``ClapModel``) as the MuLaN embedder.

``ClapEmbedder("laion/clap-htsat-unfused")`` (hub id) or a local directory with the model and its
processor (``ClapProcessor`` = ``ClapFeatureExtractor`` + RoBERTa tokenizer). Audio at the
feature extractor's rate (48 kHz), windows of its ``max_length_s`` (10 s), 512-d projections
L2-normalised.

Determinism: windows never exceed ``max_length_s``, so the feature extractor never takes its
random crops, and ``is_longer`` is forced to False (the extractor would otherwise flag a random
clip of a batch for fused models).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..fingerprint import hf_config_dict, make_fingerprint, preprocessor_config_dict, state_dict_sha256
from ..tensors import dtype_name, resolve_torch_dtype
from .embedder import AudioTextEmbedder

__all__ = ["ClapEmbedder"]


def _pooled(out: Any) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4.x) or an output with ``pooler_output`` (5.x)."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "pooler_output", None) is not None:
        return out.pooler_output
    return out[0]


class ClapEmbedder(AudioTextEmbedder):
    """Args:
    model: hub id or local directory (model + processor files).
    device, dtype: inference device / model dtype (float32 default).
    window_seconds: audio window; defaults to the feature extractor's ``max_length_s`` and
        cannot exceed it.
    max_batch: windows per forward pass (bounds memory); None = all.
    """

    name = "clap"

    def __init__(
        self,
        model: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        window_seconds: float | None = None,
        max_batch: int | None = 32,
    ):
        self.model_id = os.fspath(model)
        self.device = torch.device(device)
        self.dtype = resolve_torch_dtype(dtype)
        self._window_seconds = window_seconds
        self.max_batch = max_batch
        self._model = None
        self._fe = None
        self._tokenizer = None
        self._processor = None
        self._weights_sha: str | None = None

    # ------------------------------------------------------------------ lazy loading
    def _load_processor(self) -> None:
        if self._fe is not None:
            return
        from transformers import AutoProcessor

        try:
            proc = AutoProcessor.from_pretrained(self.model_id)
            fe, tok = proc.feature_extractor, proc.tokenizer
            self._processor = proc
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            from transformers import AutoFeatureExtractor, AutoTokenizer

            fe = AutoFeatureExtractor.from_pretrained(self.model_id)
            tok = AutoTokenizer.from_pretrained(self.model_id)
        self._fe, self._tokenizer = fe, tok
        if self._window_seconds is not None and self._window_seconds > fe.max_length_s:
            raise ValueError(
                f"window_seconds={self._window_seconds} exceeds the CLAP feature extractor's max_length_s="
                f"{fe.max_length_s}"
            )

    @property
    def feature_extractor(self):
        self._load_processor()
        return self._fe

    @property
    def tokenizer(self):
        self._load_processor()
        return self._tokenizer

    @property
    def model(self):
        if self._model is None:
            from transformers import ClapModel

            model = ClapModel.from_pretrained(self.model_id, dtype=self.dtype)
            self._model = model.eval().requires_grad_(False).to(self.device)
        return self._model

    # ------------------------------------------------------------------ properties
    @property
    def sample_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    @property
    def window_seconds(self) -> float:
        if self._window_seconds is not None:
            return float(self._window_seconds)
        return float(self.feature_extractor.max_length_s)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    # ------------------------------------------------------------------ embedding
    @torch.inference_mode()
    def embed_windows(self, wav: torch.Tensor) -> torch.Tensor:
        wav = torch.as_tensor(wav).float()
        if wav.dim() == 1:
            wav = wav[None]
        fe = self.feature_extractor
        if wav.shape[-1] > fe.nb_max_samples:
            raise ValueError(f"window of {wav.shape[-1]} samples exceeds CLAP's {fe.nb_max_samples}")
        step = self.max_batch or wav.shape[0]
        outs = []
        for i in range(0, wav.shape[0], step):
            chunk = wav[i : i + step]
            inputs = fe([w.numpy() for w in chunk.cpu()], sampling_rate=fe.sampling_rate, return_tensors="pt")
            feats = inputs["input_features"].to(self.device, self.dtype)
            is_longer = torch.zeros(feats.shape[0], 1, dtype=torch.bool, device=self.device)
            emb = _pooled(self.model.get_audio_features(input_features=feats, is_longer=is_longer))
            outs.append(torch.nn.functional.normalize(emb.float(), dim=-1).cpu())
        return torch.cat(outs, 0)

    @torch.inference_mode()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        tok = self.tokenizer
        max_len = getattr(tok, "model_max_length", None)
        if max_len is None or max_len > 100_000:
            max_len = int(self.model.config.text_config.max_position_embeddings) - 2
        inputs = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        emb = _pooled(self.model.get_text_features(**inputs))
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu()

    # ------------------------------------------------------------------ persistence / fingerprint
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = os.fspath(directory)
        self.model.save_pretrained(directory)
        if self._processor is not None or self._fe is None:
            self._load_processor()
        if self._processor is not None:
            self._processor.save_pretrained(directory)
        else:
            self._fe.save_pretrained(directory)
            self._tokenizer.save_pretrained(directory)

    def config(self) -> dict:
        fe = self.feature_extractor
        return {
            "type": "clap",
            "window_seconds": self.window_seconds,
            "min_window_seconds": self.min_window_seconds,
            "dtype": dtype_name(self.dtype),
            "model_config": hf_config_dict(self.model.config),
            "feature_extractor": preprocessor_config_dict(fe.to_dict()),
            "tokenizer": {"class": type(self.tokenizer).__name__, "vocab_size": len(self.tokenizer)},
        }

    def fingerprint(self) -> dict:
        if self._weights_sha is None:
            self._weights_sha = state_dict_sha256(self.model)
        return make_fingerprint("mulan", self.name, self.config(), self._weights_sha, self.sample_rate, dim=self.dim)

    def __repr__(self) -> str:
        return f"ClapEmbedder({self.model_id!r})"
