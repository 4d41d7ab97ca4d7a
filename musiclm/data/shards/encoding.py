"""Validation and encoding of writer inputs: a sample dict -> entry name -> bytes."""

from __future__ import annotations

import io
import json

import numpy as np

from .schema import EXTRA_EXTENSIONS, KEY_RE, MAX_TAR_NAME, REQUIRED, TOKEN_ARRAYS, json_default, stream_entries


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def sample_seconds(js: dict) -> float | None:
    """``end - start`` of a sample's json, or None when it does not say."""
    s, e = js.get("start"), js.get("end")
    if isinstance(s, (int, float)) and isinstance(e, (int, float)) and not isinstance(s, bool):
        return float(e) - float(s)
    return None


def required_entries(kind: str, streams=None) -> tuple[str, ...]:
    """Entries every sample of a folder has: audio ``flac`` + ``json``; tokens the entries of its
    streams (all four by default) + ``json``."""
    if kind == "tokens":
        return stream_entries(streams) + ("json",)
    return REQUIRED[kind]


def validate_sample(sample: dict, kind: str, streams=None) -> None:
    """Raise ValueError if a writer input breaks the contract (entries, dtypes, ndim, key).
    ``streams`` (tokens): the folder's streams; a token entry of another stream is refused."""
    key = sample.get("__key__")
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(
            f"sample key {key!r}: must be letters, digits, '_' and '-' only, not starting with '__' (no dots: "
            f"webdataset splits entry names at the first dot), e.g. '<clip-id>__0003'"
        )
    required = required_entries(kind, streams)
    for name in required:
        if name not in sample:
            raise ValueError(f"sample {key!r}: missing entry {name!r} (a {kind} sample needs {', '.join(required)})")
    longest = max(len(k) for k in sample if k != "__key__")
    if len(key) + 1 + longest > MAX_TAR_NAME:
        raise ValueError(f"sample key {key!r} is too long (entry names must fit {MAX_TAR_NAME} characters)")
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        if kind == "tokens" and name in TOKEN_ARRAYS:
            if name not in required:
                raise ValueError(
                    f"sample {key!r}: {name} is not one of this folder's streams ({', '.join(required[:-1])})"
                )
            dtype, ndim = TOKEN_ARRAYS[name]
            if not isinstance(value, np.ndarray):
                raise ValueError(f"sample {key!r}: {name} must be a numpy array, got {type(value).__name__}")
            if value.dtype != dtype or value.ndim != ndim:
                raise ValueError(
                    f"sample {key!r}: {name} must be {dtype} with {ndim} dims, got {value.dtype} {list(value.shape)}"
                )
            if value.size == 0:
                raise ValueError(f"sample {key!r}: {name} is empty {list(value.shape)}")
        elif name == "flac" and kind == "audio":
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise ValueError(f"sample {key!r}: flac must be bytes (an encoded FLAC file)")
        elif name == "json":
            if not isinstance(value, dict):
                raise ValueError(f"sample {key!r}: json must be a dict, got {type(value).__name__}")
            if "clip_id" not in value:
                raise ValueError(f"sample {key!r}: json needs 'clip_id'")
        else:
            ext = name.rsplit(".", 1)[-1]
            if "." in name.rstrip(".") and ext in EXTRA_EXTENSIONS:
                ok = {
                    "npy": isinstance(value, np.ndarray) and value.dtype.kind in "biuf",
                    "json": isinstance(value, (dict, list)),
                    "txt": isinstance(value, str),
                }[ext]
                if ok:
                    continue
                raise ValueError(f"sample {key!r}: extra entry {name} has the wrong type {type(value).__name__}")
            raise ValueError(
                f"sample {key!r}: unexpected entry {name!r} (extra entries must end in .npy, .json or .txt)"
            )


def encode_sample(sample: dict) -> dict[str, bytes]:
    """Entry name -> bytes (npy without pickle, json UTF-8, txt UTF-8, bytes as they are)."""
    out: dict[str, bytes] = {}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        if isinstance(value, np.ndarray):
            out[name] = npy_bytes(value)
        elif isinstance(value, (dict, list)):
            out[name] = json.dumps(value, ensure_ascii=False, default=json_default).encode("utf-8")
        elif isinstance(value, str):
            out[name] = value.encode("utf-8")
        else:
            out[name] = bytes(value)
    return out


