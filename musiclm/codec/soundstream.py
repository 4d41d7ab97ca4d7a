"""SoundStream: our own acoustic codec (SEANet-style causal conv encoder/decoder + residual VQ).

:class:`SoundStream` is the ``nn.Module`` that ``--stage codec`` trains (musiclm/train/codec_stage.py);
:class:`SoundStreamTokenizer` puts a trained one behind :class:`~musiclm.codec.base.AcousticTokenizer`
(registered as ``type: soundstream``), so ``tokenizers: acoustic: {type: soundstream, model: DIR}``
works in every Ray job and new weights give a new ``tokens-<hash>`` shard folder.

Architecture (Zeghidour et al. 2021, SoundStream; the SEANet layout as in EnCodec):

* encoder: causal conv (k=7, ``channels``) -> per stride ``s``: 3 residual units (ELU, dilated
  causal conv k=``residual_kernel`` with dilations 1/3/9, ELU, 1x1 conv, skip) then ELU + a causal
  conv of kernel ``2s`` and stride ``s`` that doubles the channels -> ELU, causal conv k=3 to
  ``dim``;
* residual VQ (:class:`musiclm.quantize.ResidualVQ`: EMA codebooks, k-means init from the first
  batches, dead-code restart, quantizer dropout);
* decoder: the mirror image with transposed convolutions (kernel ``2s``, right-trimmed: causal).

Every convolution is weight-normalised. ``hop_length = prod(strides)``; the frame count follows
the protocol's convention: ``T_frames = T // hop_length`` (trailing samples dropped before
encoding) and ``decode`` returns ``T_frames * hop_length`` samples.

Presets (``SOUNDSTREAM_PRESETS``):

* ``tiny``: 8 kHz, strides (4, 5, 8) = hop 160 = 50 Hz, 4 channels, 4 levels x 64 codes (tests);
* ``demo``: 24 kHz, strides (2, 4, 5, 8) = hop 320 = 75 Hz (EnCodec's rate), 8 channels,
  8 levels x 256 codes, dead-code threshold 0.05 (trains on 2 CPU cores; with the batch of
  launch/configs/codec.yaml, 4 x 0.5 s = 150 vectors a step or ~0.6 per code, a threshold of 2
  restarted most codes every step), EMA decay 0.9 (at 0.99 the codebooks lag the encoder's
  early moves and level 1 collapsed to 1-2 codes within 10 steps, perplexity 1.3 of 256 at step 60;
  at 0.9 it recovers to 19 by step 60, same mel loss);
* ``paper``: 24 kHz, strides (2, 4, 6, 10) = hop 480 = 50 Hz, 32 channels, 12 levels x 1024 codes
  (MusicLM: coarse = levels 1-4). ``strides: [2, 4, 5, 8]`` gives 75 Hz.

A model directory is ``model.safetensors`` + ``config.json`` (:meth:`SoundStreamTokenizer.save`);
a directory written by ``musiclm export RUN --out DIR/model.safetensors`` (``model.json`` beside
the weights, with the codec config under ``"model"``) loads the same way.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from ..quantize import ResidualVQ
from ..tensors import as_batch, as_codes
from .base import acoustic_fingerprint

__all__ = ["SOUNDSTREAM_PRESETS", "SoundStream", "SoundStreamTokenizer", "resolve_soundstream_config"]

_BASE = {
    "sample_rate": 24000,
    "channels": 16,
    "dim": 64,
    "strides": [2, 4, 5, 8],
    "residual_kernel": 7,
    "dilations": [1, 3, 9],
    "levels": 8,
    "codebook_size": 256,
    "coarse_levels": 4,
    "ema_decay": 0.99,
    "kmeans_init": True,
    "kmeans_init_batches": 1,
    "kmeans_iters": 20,
    "dead_code_threshold": 2.0,
    "quantizer_dropout": 0.5,
}

SOUNDSTREAM_PRESETS: dict[str, dict] = {
    "tiny": {
        "sample_rate": 8000,
        "channels": 4,
        "dim": 16,
        "strides": [4, 5, 8],
        "residual_kernel": 3,
        "levels": 4,
        "codebook_size": 64,
        "coarse_levels": 2,
        "dead_code_threshold": 0.5,
        "kmeans_iters": 10,
    },
    "demo": {"channels": 8, "dead_code_threshold": 0.05, "ema_decay": 0.9},
    "paper": {
        "channels": 32,
        "dim": 128,
        "strides": [2, 4, 6, 10],
        "levels": 12,
        "codebook_size": 1024,
        "coarse_levels": 4,
        "kmeans_init_batches": 4,
    },
}


def resolve_soundstream_config(cfg: dict | None = None) -> dict:
    """``{"preset": name, **overrides}`` -> the full config (unknown keys refused)."""
    cfg = dict(cfg or {})
    preset = cfg.pop("preset", "demo")
    if preset not in SOUNDSTREAM_PRESETS:
        raise ValueError(f"unknown soundstream preset {preset!r} (known: {', '.join(SOUNDSTREAM_PRESETS)})")
    out = copy.deepcopy(_BASE)
    out.update(copy.deepcopy(SOUNDSTREAM_PRESETS[preset]))
    unknown = sorted(set(cfg) - set(out))
    if unknown:
        raise ValueError(f"unknown soundstream config keys {unknown} (known: {sorted(out)})")
    out.update(cfg)
    out["preset"] = preset
    out["strides"] = [int(s) for s in out["strides"]]
    out["dilations"] = [int(d) for d in out["dilations"]]
    hop = int(np.prod(out["strides"]))
    if out["sample_rate"] % hop:
        raise ValueError(
            f"sample_rate {out['sample_rate']} is not a multiple of the hop {hop} (strides "
            f"{out['strides']}): the frame rate must be an integer"
        )
    if not 1 <= int(out["coarse_levels"]) <= int(out["levels"]):
        raise ValueError("coarse_levels must be in 1..levels")
    return out


# ---------------------------------------------------------------------------------------------- layers


class CausalConv1d(nn.Module):
    """Weight-normalised conv, left-padded so output ``t`` sees inputs ``<= t``; a strided conv of
    kernel ``2s`` maps ``T`` samples to ``T / s`` frames exactly (``T`` a multiple of ``s``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(cin, cout, kernel, stride=stride, dilation=dilation))
        self.pad = (kernel - 1) * dilation - (stride - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.pad, 0)))


class CausalConvTranspose1d(nn.Module):
    """Weight-normalised transposed conv (kernel ``2s``, stride ``s``): ``T`` frames -> ``T * s``
    samples, the tail that would depend on future frames trimmed."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv = weight_norm(nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride))
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y[..., : x.shape[-1] * self.stride]


class ResidualUnit(nn.Module):
    def __init__(self, channels: int, kernel: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.ELU(),
            CausalConv1d(channels, channels, kernel, dilation=dilation),
            nn.ELU(),
            CausalConv1d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        c = int(cfg["channels"])
        layers: list[nn.Module] = [CausalConv1d(1, c, 7)]
        for s in cfg["strides"]:
            layers += [ResidualUnit(c, cfg["residual_kernel"], d) for d in cfg["dilations"]]
            layers += [nn.ELU(), CausalConv1d(c, 2 * c, 2 * s, stride=s)]
            c *= 2
        layers += [nn.ELU(), CausalConv1d(c, int(cfg["dim"]), 3)]
        self.net = nn.Sequential(*layers)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, D, T // hop]
        return self.net(wav[:, None, :])


class Decoder(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        c = int(cfg["channels"]) * 2 ** len(cfg["strides"])
        layers: list[nn.Module] = [CausalConv1d(int(cfg["dim"]), c, 7)]
        for s in reversed(cfg["strides"]):
            layers += [nn.ELU(), CausalConvTranspose1d(c, c // 2, s)]
            c //= 2
            layers += [ResidualUnit(c, cfg["residual_kernel"], d) for d in cfg["dilations"]]
        layers += [nn.ELU(), CausalConv1d(c, 1, 7)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # [B, D, F] -> [B, F * hop]
        return self.net(z)[:, 0, :]


# ---------------------------------------------------------------------------------------------- model


class SoundStream(nn.Module):
    """Encoder -> residual VQ -> decoder. ``forward(wav [B, T], n_quantizers=None)`` is the training
    path (``{"recon" [B, T'], "codes" [B, Q, F], "commit_loss", "wav" (input trimmed to T')}``);
    ``encode``/``decode`` are the tokenizer's (eval mode, no gradients)."""

    def __init__(self, cfg: dict | None = None):
        super().__init__()
        self.cfg = resolve_soundstream_config(cfg)
        c = self.cfg
        self.sample_rate = int(c["sample_rate"])
        self.hop_length = int(np.prod(c["strides"]))
        self.frame_rate = self.sample_rate // self.hop_length
        self.levels = int(c["levels"])
        self.codebook_size = int(c["codebook_size"])
        self.encoder = Encoder(c)
        self.quantizer = ResidualVQ(
            int(c["dim"]),
            self.levels,
            self.codebook_size,
            ema_decay=c["ema_decay"],
            kmeans_init=bool(c["kmeans_init"]),
            kmeans_init_batches=int(c["kmeans_init_batches"]),
            kmeans_iters=int(c["kmeans_iters"]),
            dead_code_threshold=float(c["dead_code_threshold"]),
            quantizer_dropout=float(c["quantizer_dropout"]),
        )
        self.decoder = Decoder(c)

    def num_frames(self, num_samples: int) -> int:
        return int(num_samples) // self.hop_length

    def _trim(self, wav: torch.Tensor) -> torch.Tensor:
        return wav[..., : self.num_frames(wav.shape[-1]) * self.hop_length]

    def forward(self, wav: torch.Tensor, n_quantizers: int | torch.Tensor | None = None) -> dict:
        wav = self._trim(wav)
        z = self.encoder(wav).transpose(1, 2)  # [B, F, D]
        q, codes, commit = self.quantizer(z, n_quantizers)
        recon = self.decoder(q.transpose(1, 2))
        return {"recon": recon, "codes": codes.transpose(1, 2), "commit_loss": commit, "wav": wav}

    @torch.no_grad()
    def encode(self, wav: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        wav = self._trim(wav)
        z = self.encoder(wav).transpose(1, 2)
        return self.quantizer.encode(z, levels).transpose(1, 2)  # [B, Q, F]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        q = self.quantizer.decode(codes.transpose(1, 2))  # [B, F, D]
        return self.decoder(q.transpose(1, 2))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------- tokenizer


class SoundStreamTokenizer:
    """A trained :class:`SoundStream` behind the ``AcousticTokenizer`` protocol.

    ``SoundStreamTokenizer(DIR)`` loads ``DIR/model.safetensors`` with ``DIR/config.json`` (or an
    exported run's ``model.json``); ``SoundStreamTokenizer(model=SoundStream(...))`` wraps a live
    module. ``levels`` (optional) encodes only the first levels (a lower bitrate of the same model).
    """

    name = "soundstream"
    kind = "acoustic"
    WEIGHTS = "model.safetensors"
    CONFIG = "config.json"

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        model: SoundStream | None = None,
        device: str | torch.device = "cpu",
        levels: int | None = None,
        max_batch: int | None = None,
    ):
        if (path is None) == (model is None):
            raise ValueError("pass a model directory or model=")
        self.model_dir = os.fspath(path) if path is not None else None
        self.device = torch.device(device)
        self.model = (model if model is not None else load_soundstream(self.model_dir)).to(self.device).eval()
        self.model.requires_grad_(False)
        self.sample_rate = self.model.sample_rate
        self.frame_rate = self.model.frame_rate
        self.codebook_size = self.model.codebook_size
        self.levels = int(levels or self.model.levels)
        if not 1 <= self.levels <= self.model.levels:
            raise ValueError(f"levels must be in 1..{self.model.levels}")
        self.max_batch = max_batch
        self._weights_sha: str | None = None

    @property
    def hop_length(self) -> int:
        return self.model.hop_length

    def num_frames(self, num_samples: int) -> int:
        return int(num_samples) // self.hop_length

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float ``[B, T]`` -> int64 ``[B, levels, T // hop_length]`` (CPU)."""
        wav = as_batch(wav).float()
        b, t = wav.shape
        n = self.num_frames(t)
        if n == 0 or b == 0:
            return torch.zeros(b, self.levels, n, dtype=torch.long)
        step = self.max_batch or b
        out = [self.model.encode(wav[i : i + step].to(self.device), self.levels).cpu() for i in range(0, b, step)]
        return torch.cat(out).long()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """int ``[B, Q', F]`` (Q' <= levels, coarse first) -> float32 ``[B, F * hop_length]`` (CPU)."""
        codes = as_codes(codes)
        b, q, n = codes.shape
        if not 1 <= q <= self.model.levels:
            raise ValueError(f"decode expects 1..{self.model.levels} levels, got {q}")
        if n == 0 or b == 0:
            return torch.zeros(b, 0)
        step = self.max_batch or b
        return torch.cat(
            [self.model.decode(codes[i : i + step].to(self.device)).float().cpu() for i in range(0, b, step)]
        )

    def config(self) -> dict:
        return {"type": "soundstream", "levels": self.levels, "model_config": _public_config(self.model.cfg)}

    def fingerprint(self) -> dict:
        return acoustic_fingerprint(self)

    def save(self, directory: str | os.PathLike) -> str:
        return save_soundstream(self.model, directory)

    def save_pretrained(self, directory: str | os.PathLike) -> str:
        """Same as :meth:`save` (the name ``TokenizerBundle.save`` and transformers models use)."""
        return save_soundstream(self.model, directory)

    def __repr__(self) -> str:
        return f"SoundStreamTokenizer({self.model_dir!r}, levels={self.levels})"


def _public_config(cfg: dict) -> dict:
    return {k: cfg[k] for k in sorted(cfg)}


def save_soundstream(model: SoundStream, directory: str | os.PathLike, extra: dict | None = None) -> str:
    """``directory/model.safetensors`` + ``directory/config.json``; returns the directory."""
    from safetensors.torch import save_file

    from ..data import storage

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"kind": "musiclm.soundstream", "model": _public_config(model.cfg), **(extra or {})}
    with storage.atomic_path(os.path.join(directory, SoundStreamTokenizer.WEIGHTS)) as tmp:
        save_file(state, tmp, metadata={"musiclm_config": json.dumps(meta)})
    storage.write_json_atomic(os.path.join(directory, SoundStreamTokenizer.CONFIG), meta, indent=1, sort_keys=True)
    return directory


def load_soundstream(path: str | os.PathLike) -> SoundStream:
    """A :class:`SoundStream` from a directory (``model.safetensors`` + ``config.json`` or the
    ``model.json`` of ``musiclm export``) or from the ``.safetensors`` file itself."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    weights = path if path.endswith(".safetensors") else os.path.join(path, SoundStreamTokenizer.WEIGHTS)
    folder = os.path.dirname(weights)
    meta: Any = None
    for name in (SoundStreamTokenizer.CONFIG, os.path.splitext(os.path.basename(weights))[0] + ".json"):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            with open(p) as f:
                meta = json.load(f)
            break
    if meta is None:
        from safetensors import safe_open

        with safe_open(weights, "pt") as f:
            md = f.metadata() or {}
        if "musiclm_config" not in md:
            raise FileNotFoundError(f"{folder}: no config.json / model.json for the SoundStream weights")
        meta = json.loads(md["musiclm_config"])
    if meta.get("kind") not in ("musiclm.soundstream", None) or "model" not in meta:
        raise ValueError(f"{folder}: not a SoundStream model directory (kind {meta.get('kind')!r})")
    cfg = dict(meta["model"])
    model = SoundStream(cfg)
    state = load_file(weights)
    model.load_state_dict(state, strict=True)
    return model.eval()


def bitrate(frame_rate: float, levels: int, codebook_size: int) -> float:
    """Bits per second of ``levels`` levels of codes."""
    return float(frame_rate) * int(levels) * math.log2(int(codebook_size))
