"""Acoustic tokenizers: the :class:`AcousticTokenizer` protocol and its implementations.

``EncodecTokenizer`` wraps transformers ``EncodecModel`` (hub id or local directory); our own
SoundStream implements the same protocol. ``build_acoustic(cfg)`` builds one from a config section
such as ``{"type": "encodec", "model": "facebook/encodec_24khz", "bandwidth": 6.0}``.
"""

from __future__ import annotations

from .base import AcousticTokenizer
from .encodec import EncodecTokenizer, random_encodec_24khz

__all__ = [
    "AcousticTokenizer",
    "EncodecTokenizer",
    "build_acoustic",
    "random_encodec_24khz",
]


def build_acoustic(cfg: dict, device: str = "cpu") -> AcousticTokenizer:
    """Acoustic tokenizer from a config section (``type`` defaults to ``encodec``)."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "encodec")
    if kind == "encodec":
        model = cfg.pop("model", "facebook/encodec_24khz")
        return EncodecTokenizer(model, device=cfg.pop("device", device), **cfg)
    raise ValueError(f"unknown acoustic tokenizer type {kind!r} (known: encodec)")
