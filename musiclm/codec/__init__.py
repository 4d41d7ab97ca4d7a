"""Acoustic tokenizers: the :class:`AcousticTokenizer` protocol and its implementations.

``EncodecTokenizer`` wraps transformers ``EncodecModel`` (hub id or local directory); our own
SoundStream implements the same protocol. ``build_acoustic(cfg)`` builds one from a config section
such as ``{"type": "encodec", "model": "facebook/encodec_24khz", "bandwidth": 6.0}``: ``type`` names a
builder registered with :func:`register_acoustic` (a new codec adds one entry).
"""

from __future__ import annotations

from typing import Callable

from .base import AcousticTokenizer
from .encodec import EncodecTokenizer, random_encodec_24khz

__all__ = [
    "AcousticTokenizer",
    "EncodecTokenizer",
    "acoustic_types",
    "build_acoustic",
    "random_encodec_24khz",
    "register_acoustic",
]

# type -> builder(cfg without "type", device) -> AcousticTokenizer
_ACOUSTIC: dict[str, Callable[[dict, str], AcousticTokenizer]] = {}


def register_acoustic(name: str):
    """Decorator: ``builder(cfg: dict, device: str) -> AcousticTokenizer`` becomes ``type: name``."""

    def deco(builder: Callable[[dict, str], AcousticTokenizer]) -> Callable[[dict, str], AcousticTokenizer]:
        if name in _ACOUSTIC:
            raise ValueError(f"acoustic tokenizer type {name!r} is already registered")
        _ACOUSTIC[name] = builder
        return builder

    return deco


def acoustic_types() -> tuple[str, ...]:
    """Registered acoustic tokenizer types."""
    return tuple(_ACOUSTIC)


@register_acoustic("encodec")
def _encodec(cfg: dict, device: str) -> AcousticTokenizer:
    model = cfg.pop("model", "facebook/encodec_24khz")
    return EncodecTokenizer(model, device=cfg.pop("device", device), **cfg)


def build_acoustic(cfg: dict, device: str = "cpu") -> AcousticTokenizer:
    """Acoustic tokenizer from a config section (``type`` defaults to ``encodec``)."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "encodec")
    if kind not in _ACOUSTIC:
        raise ValueError(f"unknown acoustic tokenizer type {kind!r} (known: {', '.join(_ACOUSTIC)})")
    return _ACOUSTIC[kind](cfg, device)
