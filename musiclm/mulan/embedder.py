"""The joint audio-text embedding interface (MuLaN): CLAP now, our own MuLaN later.

An :class:`AudioTextEmbedder` maps audio at ``sample_rate`` and captions into one ``dim``-d space,
L2-normalised. Training conditions on the audio embedding, generation on the text embedding, and
reranking compares the two.

Long audio: the model sees windows of ``window_seconds`` (10 s for MuLaN and CLAP).
``embed_audio`` cuts ``[B, T]`` into consecutive windows, embeds each (a last partial window
shorter than ``min_window_seconds`` is dropped unless it is the only one), averages the window
embeddings weighted by their duration and L2-normalises the mean: the ``mulan.npy`` entry of a
token shard sample (``shards/README.md``).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence

import numpy as np
import torch

from ..tensors import as_batch

__all__ = ["AudioTextEmbedder", "window_spans"]


def window_spans(num_samples: int, window: int, min_last: int) -> list[tuple[int, int]]:
    """``(start, end)`` of consecutive windows of ``window`` samples covering ``num_samples``; a last
    partial window shorter than ``min_last`` is dropped unless it is the only one."""
    if num_samples <= 0:
        return []
    if num_samples <= window:
        return [(0, num_samples)]
    spans = []
    for start in range(0, num_samples, window):
        end = min(start + window, num_samples)
        if end - start < min_last and spans:
            break
        spans.append((start, end))
    return spans


class AudioTextEmbedder(abc.ABC):
    """Audio/text embedder in a shared, L2-normalised space.

    Implementations define :meth:`embed_windows` (audio no longer than one window),
    :meth:`embed_text`, ``sample_rate``, ``dim``, ``window_seconds`` and :meth:`fingerprint`.
    """

    kind = "mulan"
    name = "embedder"
    min_window_seconds: float = 1.0

    @property
    @abc.abstractmethod
    def sample_rate(self) -> int: ...

    @property
    @abc.abstractmethod
    def dim(self) -> int: ...

    @property
    @abc.abstractmethod
    def window_seconds(self) -> float: ...

    @abc.abstractmethod
    def embed_windows(self, wav: torch.Tensor) -> torch.Tensor:
        """float ``[N, T]`` (``T`` <= one window) at ``sample_rate`` -> float32 ``[N, dim]`` L2-normalised."""

    @abc.abstractmethod
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """captions -> float32 ``[len(texts), dim]`` L2-normalised (CPU)."""

    @abc.abstractmethod
    def fingerprint(self) -> dict: ...

    @torch.inference_mode()
    def embed_audio(self, wav: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float ``[B, T]`` at ``sample_rate`` -> float32 ``[B, dim]`` L2-normalised (CPU); audio
        longer than one window is the duration-weighted mean over windows, renormalised."""
        wav = as_batch(wav)
        b, t = wav.shape
        if b == 0:
            return torch.zeros(0, self.dim)
        if t == 0:
            raise ValueError("cannot embed empty audio")
        win = int(round(self.window_seconds * self.sample_rate))
        spans = window_spans(t, win, int(math.ceil(self.min_window_seconds * self.sample_rate)))
        full = [s for s in spans if s[1] - s[0] == spans[0][1] - spans[0][0]]
        rest = [s for s in spans if s not in full]
        total = torch.zeros(b, self.dim)
        weight = 0.0
        if full:
            length = full[0][1] - full[0][0]
            chunks = torch.stack([wav[:, s:e] for s, e in full], 1).reshape(-1, length)  # [B*n, L]
            emb = self.embed_windows(chunks).float().cpu().reshape(b, len(full), -1)
            total += emb.sum(1) * length
            weight += length * len(full)
        for s, e in rest:
            emb = self.embed_windows(wav[:, s:e]).float().cpu()
            total += emb * (e - s)
            weight += e - s
        return torch.nn.functional.normalize(total / weight, dim=-1)
