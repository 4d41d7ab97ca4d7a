"""Fingerprints: what identifies a tokenizer, a model or a config, as plain JSON.

Every tokenizer (acoustic, semantic, MuLaN embedder and quantizer) describes itself with a
JSON-serialisable dict: ``kind``, ``name``, ``config``, ``weights_sha256`` and ``sample_rate`` plus
kind-specific fields. Token shards record them in ``index.json`` and training refuses shards whose
fingerprints differ from its config. ``weights_sha256`` hashes the state_dict tensors (name,
dtype, shape and raw bytes) in sorted key order, so it changes when any weight or buffer changes
and is stable otherwise. ``canonical_json`` is the one serialisation every hash here is taken of.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = [
    "canonical_json",
    "canonical_hash",
    "config_sha256",
    "tensor_bytes",
    "state_dict_sha256",
    "make_fingerprint",
    "hf_config_dict",
    "preprocessor_config_dict",
]


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
    torch = sys.modules.get("torch")  # not imported: obj cannot be a torch object (shards need no torch)
    if torch is not None and isinstance(obj, torch.dtype):
        return str(obj).replace("torch.", "")
    if torch is not None and isinstance(obj, torch.Tensor):
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
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def state_dict_sha256(state: torch.nn.Module | Mapping[str, Any] | Iterable[tuple[str, Any]]) -> str:
    """sha256 over ``(name, dtype, shape, bytes)`` of every tensor, keys in sorted order.

    Accepts a module (its ``state_dict()``), a mapping name -> tensor/ndarray, or (name, value) pairs.
    """
    import torch

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
    """Build a JSON-safe fingerprint dict with the common keys every fingerprint has plus ``fields``."""
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


def preprocessor_config_dict(d: Mapping[str, Any]) -> dict:
    """A feature extractor's ``to_dict()`` for fingerprints: without private keys and bulky arrays
    (mel filter banks, windows), as canonical JSON values."""
    out = {}
    for k, v in d.items():
        if k.startswith("_") or k in ("processor_class",):
            continue
        if isinstance(v, np.ndarray) or (isinstance(v, (list, tuple)) and len(v) > 64):
            continue
        out[k] = v
    return json.loads(canonical_json(out))


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
        return {k: _filter_config(v) for k, v in d.items() if k not in _DROP_CONFIG_KEYS and not str(k).startswith("_")}
    return d


def canonical_hash(obj: Any, n: int = 16) -> str:
    """The first ``n`` hex digits of the sha256 of ``canonical_json(obj)``."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:n]
