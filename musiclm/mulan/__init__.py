"""MuLaN: the joint audio-text embedding and its conditioning-token quantizer.

* :class:`AudioTextEmbedder` -- the interface (``embed_audio``, ``embed_text``, ``dim``,
  ``sample_rate``, ``fingerprint``); :class:`ClapEmbedder` (transformers ``ClapModel``) and
  :class:`~musiclm.mulan.mulan_embedder.MuLaNEmbedder` (our trained MuLaN, :mod:`musiclm.mulan.model`,
  saved and loaded by :mod:`musiclm.mulan.checkpoint`) implement it.
* :class:`MuLaNEmbedQuantizer` (defined in :mod:`musiclm.quantize`) -- residual VQ stacks per
  namespace turning embeddings into the ``cond.npy`` tokens.
* ``build_embedder(cfg)`` -- an embedder from a config section such as
  ``{"type": "clap", "model": "laion/clap-htsat-unfused"}`` or ``{"type": "mulan", "model": DIR}``;
  ``type`` names a builder registered with :func:`register_embedder`.
"""

from __future__ import annotations

from collections.abc import Callable

from ..data import storage
from ..quantize import MuLaNEmbedQuantizer, ResidualVQ
from ..registry import Registry
from .clap import ClapEmbedder
from .embedder import AudioTextEmbedder, window_spans

__all__ = [
    "AudioTextEmbedder",
    "ClapEmbedder",
    "MuLaNEmbedQuantizer",
    "ResidualVQ",
    "build_embedder",
    "embedder_types",
    "register_embedder",
    "window_spans",
]

# type -> builder(cfg without "type" and "device", device) -> AudioTextEmbedder
EMBEDDERS: Registry[Callable[[dict, str], AudioTextEmbedder]] = Registry("MuLaN embedder")


def register_embedder(name: str):
    """Decorator: ``builder(cfg: dict, device: str) -> AudioTextEmbedder`` becomes ``type: name``."""
    return EMBEDDERS.register(name)


def embedder_types() -> tuple[str, ...]:
    """Registered audio/text embedder types."""
    return EMBEDDERS.names()


@register_embedder("clap")
def _clap(cfg: dict, device: str) -> AudioTextEmbedder:
    model = cfg.pop("model", "laion/clap-htsat-unfused")
    return ClapEmbedder(model, device=device, **cfg)


@register_embedder("mulan")
def _mulan(cfg: dict, device: str) -> AudioTextEmbedder:
    from .mulan_embedder import MuLaNEmbedder

    if "model" not in cfg:
        raise ValueError("a MuLaN embedder config needs model: <directory>")
    return MuLaNEmbedder(cfg.pop("model"), device=device, **cfg)


def build_embedder(cfg: dict, device: str = "cpu") -> AudioTextEmbedder:
    """Embedder from a config section: ``{"type": "clap", "model": hub id or dir, ...}`` (default
    type) or ``{"type": "mulan", "model": dir}`` for our own trained MuLaN."""
    cfg = dict(cfg)
    if isinstance(cfg.get("model"), str) and storage.is_remote(cfg["model"]):
        cfg["model"] = storage.local_copy(cfg["model"])  # an s3:// model folder: loaders open local paths
    kind = cfg.pop("type", "clap")
    device = cfg.pop("device", device)
    return EMBEDDERS.get(kind)(cfg, device)
