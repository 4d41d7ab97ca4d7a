"""The acoustic tokenizer interface.

An acoustic tokenizer turns mono audio at its ``sample_rate`` into ``levels`` parallel streams of
integer codes at ``frame_rate`` Hz (residual VQ levels, coarse first) and back. EnCodec
(:class:`musiclm.codec.encodec.EncodecTokenizer`) is the first implementation; our own SoundStream
implements the same protocol.

Frame count convention (every implementation): ``T_frames = T // hop_length`` where
``hop_length = sample_rate // frame_rate`` (an integer). Trailing samples that do not fill a whole
frame are dropped, so whole-second input at 24 kHz / 75 Hz gives exactly ``75 * seconds`` frames and
``decode`` returns ``T_frames * hop_length`` samples.

A tokenizer's ``fingerprint()`` is built with :mod:`musiclm.fingerprint`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["AcousticTokenizer", "acoustic_fingerprint"]


@runtime_checkable
class AcousticTokenizer(Protocol):
    """Audio codec used as the acoustic tokenizer.

    Attributes:
        sample_rate: input/output sample rate in Hz (24 000 for EnCodec 24 kHz).
        frame_rate: code frames per second (75 for EnCodec 24 kHz); ``sample_rate / frame_rate``
            is the integer ``hop_length``.
        levels: number of residual VQ levels Q produced by ``encode``.
        codebook_size: codes per level (ids are in ``[0, codebook_size)``).
    """

    sample_rate: int
    frame_rate: float
    levels: int
    codebook_size: int

    @property
    def hop_length(self) -> int: ...

    def num_frames(self, num_samples: int) -> int:
        """``num_samples // hop_length``."""
        ...

    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """``wav`` float ``[B, T]`` at ``sample_rate`` -> int64 codes ``[B, Q, T // hop_length]``."""
        ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """int codes ``[B, Q', T_frames]`` (Q' <= Q, coarse levels first) -> float ``[B, T_frames * hop]``."""
        ...

    def fingerprint(self) -> dict: ...


def acoustic_fingerprint(tokenizer) -> dict:
    """The fingerprint of an acoustic tokenizer with a ``model`` (nn.Module), ``name`` and
    ``config()``: its weights' sha256 (computed once), config, rates and vocabulary."""
    from musiclm.fingerprint import make_fingerprint, state_dict_sha256

    if getattr(tokenizer, "_weights_sha", None) is None:
        tokenizer._weights_sha = state_dict_sha256(tokenizer.model)
    return make_fingerprint(
        "acoustic",
        tokenizer.name,
        tokenizer.config(),
        tokenizer._weights_sha,
        tokenizer.sample_rate,
        frame_rate=tokenizer.frame_rate,
        levels=tokenizer.levels,
        codebook_size=tokenizer.codebook_size,
    )
