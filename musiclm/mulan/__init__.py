"""MuLaN: the joint audio-text embedding and its conditioning-token quantizer.

* :class:`AudioTextEmbedder` -- the interface (``embed_audio``, ``embed_text``, ``dim``,
  ``sample_rate``, ``fingerprint``); :class:`ClapEmbedder` (transformers ``ClapModel``) is the first
  implementation, our own MuLaN model comes later behind the same interface.
* :class:`MuLaNEmbedQuantizer` (defined in :mod:`musiclm.quantize`) -- residual VQ stacks per
  namespace turning embeddings into the ``cond.npy`` tokens.
* ``build_embedder(cfg)`` -- an embedder from a config section such as
  ``{"type": "clap", "model": "laion/clap-htsat-unfused"}`` or ``{"type": "mulan", "model": DIR}``.
"""

from __future__ import annotations

from ..quantize import MuLaNEmbedQuantizer, ResidualVQ
from .clap import ClapEmbedder
from .embedder import AudioTextEmbedder, window_spans

__all__ = [
    "AudioTextEmbedder",
    "ClapEmbedder",
    "MuLaNEmbedQuantizer",
    "ResidualVQ",
    "build_embedder",
    "window_spans",
]


def build_embedder(cfg: dict, device: str = "cpu") -> AudioTextEmbedder:
    """Embedder from a config section: ``{"type": "clap", "model": hub id or dir, ...}`` (default
    type) or ``{"type": "mulan", "model": dir}`` for our own trained MuLaN."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "clap")
    device = cfg.pop("device", device)
    if kind == "clap":
        model = cfg.pop("model", "laion/clap-htsat-unfused")
        return ClapEmbedder(model, device=device, **cfg)
    if kind == "mulan":
        from .ours import MuLaNEmbedder

        if "model" not in cfg:
            raise ValueError("a MuLaN embedder config needs model: <directory>")
        return MuLaNEmbedder(cfg.pop("model"), device=device, **cfg)
    raise ValueError(f"unknown MuLaN embedder type {kind!r} (known: clap, mulan)")
