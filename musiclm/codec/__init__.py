"""Acoustic tokenizers: the :class:`AcousticTokenizer` protocol and its implementations.

``EncodecTokenizer`` wraps transformers ``EncodecModel`` (hub id or local directory); our own
SoundStream (``type: soundstream``, ``model: <dir>``) implements the same protocol.
``build_acoustic(cfg)`` builds one from a config section such as
``{"type": "encodec", "model": "facebook/encodec_24khz", "bandwidth": 6.0}``: ``type`` names a
builder registered with :func:`register_acoustic` (a new codec adds one entry).
"""

from __future__ import annotations

from collections.abc import Callable

from ..registry import Registry
from .base import AcousticTokenizer
from .encodec import EncodecTokenizer, random_encodec_24khz
from .soundstream import SoundStream, SoundStreamTokenizer

__all__ = [
    "AcousticTokenizer",
    "EncodecTokenizer",
    "SoundStream",
    "SoundStreamTokenizer",
    "acoustic_types",
    "build_acoustic",
    "random_encodec_24khz",
    "register_acoustic",
]

# type -> builder(cfg without "type", device) -> AcousticTokenizer
ACOUSTIC: Registry[Callable[[dict, str], AcousticTokenizer]] = Registry("acoustic tokenizer")


def register_acoustic(name: str):
    """Decorator: ``builder(cfg: dict, device: str) -> AcousticTokenizer`` becomes ``type: name``."""
    return ACOUSTIC.register(name)


def acoustic_types() -> tuple[str, ...]:
    """Registered acoustic tokenizer types."""
    return ACOUSTIC.names()


@register_acoustic("encodec")
def _encodec(cfg: dict, device: str) -> AcousticTokenizer:
    model = cfg.pop("model", "facebook/encodec_24khz")
    return EncodecTokenizer(model, device=cfg.pop("device", device), **cfg)


@register_acoustic("soundstream")
def _soundstream(cfg: dict, device: str) -> AcousticTokenizer:
    if not cfg.get("model"):
        raise ValueError("tokenizers.acoustic: type soundstream needs model: <directory of a trained SoundStream>")
    model = cfg.pop("model")
    return SoundStreamTokenizer(model, device=cfg.pop("device", device), **cfg)


def build_acoustic(cfg: dict, device: str = "cpu") -> AcousticTokenizer:
    """Acoustic tokenizer from a config section (``type`` defaults to ``encodec``)."""
    cfg = dict(cfg)
    kind = cfg.pop("type", "encodec")
    return ACOUSTIC.get(kind)(cfg, device)
