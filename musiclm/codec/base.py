"""The acoustic tokenizer interface and the fingerprint helpers every tokenizer uses.

An acoustic tokenizer turns mono audio at its ``sample_rate`` into ``levels`` parallel streams of
integer codes at ``frame_rate`` Hz (residual VQ levels, coarse first) and back. EnCodec
(:class:`musiclm.codec.encodec.EncodecTokenizer`) is the first implementation; our own SoundStream
implements the same protocol.

Frame count convention (every implementation): ``T_frames = T // hop_length`` where
``hop_length = sample_rate // frame_rate`` (an integer). Trailing samples that do not fill a whole
frame are dropped, so whole-second input at 24 kHz / 75 Hz gives exactly ``75 * seconds`` frames and
``decode`` returns ``T_frames * hop_length`` samples.

Fingerprints (see contracts "Tokenizer fingerprints") are plain JSON-serialisable dicts with
``kind``, ``name``, ``config``, ``weights_sha256`` and ``sample_rate`` plus kind-specific fields.
``weights_sha256`` hashes the state_dict tensors (name, dtype, shape and raw bytes) in sorted key
order, so it changes when any weight or buffer changes and is stable otherwise.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "AcousticTokenizer",
    "as_batch",
    "canonical_json",
    "config_sha256",
    "make_fingerprint",
    "state_dict_sha256",
    "tensor_bytes",
]


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


# --------------------------------------------------------------------------------------------
# Fingerprint helpers
# --------------------------------------------------------------------------------------------


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def canonical_json(obj: Any) -> str:
    """Deterministic JSON (sorted keys, no whitespace) of ``obj`` after making it JSON-safe."""
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_sha256(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw bytes of a tensor (any dtype, bf16 included), on CPU, contiguous."""
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def state_dict_sha256(state: torch.nn.Module | Mapping[str, Any] | Iterable[tuple[str, Any]]) -> str:
    """sha256 over ``(name, dtype, shape, bytes)`` of every tensor, keys in sorted order.

    Accepts a module (its ``state_dict()``), a mapping name -> tensor/ndarray, or (name, value) pairs.
    """
    if isinstance(state, torch.nn.Module):
        items = state.state_dict().items()
    elif isinstance(state, Mapping):
        items = state.items()
    else:
        items = list(state)
    h = hashlib.sha256()
    for name, value in sorted(items, key=lambda kv: kv[0]):
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            continue
        h.update(name.encode())
        h.update(b"\0")
        h.update(str(value.dtype).encode())
        h.update(b"\0")
        h.update(json.dumps(list(value.shape)).encode())
        h.update(b"\0")
        h.update(tensor_bytes(value))
    return h.hexdigest()


def make_fingerprint(
    kind: str,
    name: str,
    config: Mapping[str, Any],
    weights_sha256: str | None,
    sample_rate: int | None,
    **fields: Any,
) -> dict:
    """Build a JSON-safe fingerprint dict with the common keys of the contract plus ``fields``."""
    out = {
        "kind": kind,
        "name": name,
        "config": dict(config),
        "weights_sha256": weights_sha256,
        "sample_rate": sample_rate,
    }
    out.update(fields)
    return _jsonable(out)


def hf_config_dict(config: Any) -> dict:
    """A stable dict of a transformers config for fingerprints: its diff against the base config,
    without version, dtype and private bookkeeping keys (they do not change the tokens)."""
    try:
        d = config.to_diff_dict()
    except Exception:  # pragma: no cover - very old configs
        d = config.to_dict()
    return _filter_config(d)


_DROP_CONFIG_KEYS = {
    "transformers_version",
    "dtype",
    "torch_dtype",
    "output_hidden_states",
    "return_dict",
    "architectures",  # save_pretrained rewrites it to the loading class
}


def _filter_config(d: Any) -> Any:
    if isinstance(d, Mapping):
        return {
            k: _filter_config(v) for k, v in d.items() if k not in _DROP_CONFIG_KEYS and not str(k).startswith("_")
        }
    return d


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
