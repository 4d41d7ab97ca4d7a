"""Small tensor helpers shared by the tokenizers and models: audio batches and dtype names."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["as_batch", "as_codes", "resolve_torch_dtype", "dtype_name"]


def as_batch(wav: Any) -> torch.Tensor:
    """float32 ``[B, T]`` tensor from ``[T]``, ``[B, T]`` or ``[B, 1, T]`` (tensor or ndarray)."""
    if isinstance(wav, np.ndarray):
        wav = torch.from_numpy(np.ascontiguousarray(wav))
    if not isinstance(wav, torch.Tensor):
        wav = torch.as_tensor(wav)
    if wav.dim() == 1:
        wav = wav[None]
    elif wav.dim() == 3:
        if wav.shape[1] != 1:
            raise ValueError(f"expected mono audio [B, 1, T], got {tuple(wav.shape)}")
        wav = wav[:, 0]
    elif wav.dim() != 2:
        raise ValueError(f"expected audio [B, T], got {tuple(wav.shape)}")
    return wav.float()


def resolve_torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = aliases.get(name, name)
    out = getattr(torch, name, None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def as_codes(codes: Any) -> torch.Tensor:
    """int64 ``[B, Q, T]`` codes from ``[Q, T]`` or ``[B, Q, T]`` (tensor or ndarray)."""
    if isinstance(codes, np.ndarray):
        codes = torch.from_numpy(codes.astype(np.int64))
    codes = torch.as_tensor(codes).long()
    return codes[None] if codes.dim() == 2 else codes
