"""EnCodec (transformers ``EncodecModel``) as the acoustic tokenizer.

``EncodecTokenizer("facebook/encodec_24khz", bandwidth=6.0)`` loads a hub id, or a local directory
written by ``save_pretrained``, through the same ``from_pretrained`` call. The 24 kHz model runs at
75 Hz (hop 320); the bandwidth sets the number of RVQ levels: ``floor(bw * 1000 / (75 * 10))``, i.e.
1.5 kbps -> 2, 3 -> 4, 6 -> 8, 12 -> 16, 24 -> 32 levels of 1024 codes.

Frames: ``T_frames = T // hop_length``. The input is trimmed to ``T_frames * hop_length`` samples
before encoding (EnCodec itself would pad the last partial frame and return ``ceil(T / hop)``
frames), so the codes never depend on trailing samples and streams stay on the common grid.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch

from ..fingerprint import hf_config_dict
from ..tensors import as_batch, as_codes, dtype_name, resolve_torch_dtype
from .base import acoustic_fingerprint

__all__ = ["EncodecTokenizer", "random_encodec_24khz", "randomize_codebooks"]


class EncodecTokenizer:
    """Acoustic tokenizer over transformers ``EncodecModel`` (lazy: nothing loads until used).

    Args:
        model: hub id (``facebook/encodec_24khz``) or a local ``save_pretrained`` directory.
        bandwidth: target bandwidth in kbps; must be one of ``config.target_bandwidths``.
        device: torch device for inference.
        dtype: model dtype (``float32`` default; ``float16``/``bfloat16`` on GPUs).
        max_batch: split larger batches into chunks of this many clips (bounds memory); None = all.
    """

    name = "encodec"
    kind = "acoustic"

    def __init__(
        self,
        model: str | os.PathLike,
        bandwidth: float = 6.0,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        max_batch: int | None = None,
    ):
        self.model_id = os.fspath(model)
        self.bandwidth = float(bandwidth)
        self.device = torch.device(device)
        self.dtype = resolve_torch_dtype(dtype)
        self.max_batch = max_batch
        self._config = None
        self._model = None
        self._weights_sha: str | None = None

    # ------------------------------------------------------------------ config (cheap)
    @property
    def hf_config(self):
        if self._config is None:
            if self._model is not None:
                self._config = self._model.config
            else:
                from transformers import EncodecConfig

                self._config = EncodecConfig.from_pretrained(self.model_id)
            self._check_config(self._config)
        return self._config

    def _check_config(self, cfg) -> None:
        if cfg.chunk_length_s is not None:
            raise NotImplementedError(
                f"EnCodec models with chunked encoding (chunk_length_s={cfg.chunk_length_s}, e.g. the 48 kHz "
                "model) are not supported as acoustic tokenizer; use a non-chunked model such as "
                "facebook/encodec_24khz"
            )
        if self.bandwidth not in [float(b) for b in cfg.target_bandwidths]:
            raise ValueError(
                f"bandwidth {self.bandwidth} not supported by {self.model_id}: choose one of "
                f"{list(cfg.target_bandwidths)}"
            )
        if cfg.sampling_rate % cfg.hop_length:
            warnings.warn(
                f"EnCodec sampling_rate {cfg.sampling_rate} is not a multiple of hop {cfg.hop_length}: "
                "frame_rate is not an integer",
                stacklevel=3,
            )
        if cfg.normalize:
            warnings.warn(
                "this EnCodec model normalises its input (config.normalize=True); the scale is not kept "
                "with the codes, so decode() returns audio at unit RMS",
                stacklevel=3,
            )

    @property
    def sample_rate(self) -> int:
        return int(self.hf_config.sampling_rate)

    @property
    def hop_length(self) -> int:
        return int(self.hf_config.hop_length)

    @property
    def frame_rate(self) -> float:
        fr = self.sample_rate / self.hop_length
        return int(fr) if float(fr).is_integer() else fr

    @property
    def codebook_size(self) -> int:
        return int(self.hf_config.codebook_size)

    @property
    def levels(self) -> int:
        cfg = self.hf_config
        bw_per_q = math.log2(cfg.codebook_size) * cfg.frame_rate
        return int(max(1, math.floor(self.bandwidth * 1000 / bw_per_q)))

    def num_frames(self, num_samples: int) -> int:
        return int(num_samples) // self.hop_length

    # ------------------------------------------------------------------ model (lazy)
    @property
    def model(self):
        if self._model is None:
            from transformers import EncodecModel

            model = EncodecModel.from_pretrained(self.model_id, dtype=self.dtype)
            model.eval().requires_grad_(False).to(self.device)
            self._model = model
            self._config = model.config
            self._check_config(self._config)
        return self._model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        self.model.save_pretrained(os.fspath(directory))

    # ------------------------------------------------------------------ coding
    @torch.inference_mode()
    def encode(self, wav: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float ``[B, T]`` at ``sample_rate`` -> int64 codes ``[B, levels, T // hop_length]`` (on CPU)."""
        wav = as_batch(wav)
        b, t = wav.shape
        n = self.num_frames(t)
        if n == 0 or b == 0:
            self.model  # noqa: B018 - validate the model even for empty input
            return torch.zeros(b, self.levels, n, dtype=torch.long)
        wav = wav[:, : n * self.hop_length]
        step = self.max_batch or b
        out = [self._encode_chunk(wav[i : i + step], n) for i in range(0, b, step)]
        return torch.cat(out, 0)

    def _encode_chunk(self, wav: torch.Tensor, n: int) -> torch.Tensor:
        model = self.model
        x = wav.to(self.device, self.dtype)[:, None, :]
        if model.config.audio_channels == 2:
            x = x.expand(-1, 2, -1)
        enc = model.encode(x, bandwidth=self.bandwidth, return_dict=True)
        codes = enc.audio_codes  # [chunks=1, B, Q, frames]
        codes = codes[0, :, : self.levels, :n]
        if codes.shape[-1] != n:  # pragma: no cover - defensive
            raise RuntimeError(f"EnCodec returned {codes.shape[-1]} frames, expected {n}")
        return codes.long().cpu()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor | np.ndarray) -> torch.Tensor:
        """int codes ``[B, Q', T_frames]`` (Q' <= levels, first levels) -> float32 ``[B, T_frames * hop]`` (CPU)."""
        codes = as_codes(codes)
        b, q, n = codes.shape
        if q > self.levels or q < 1:
            raise ValueError(f"decode expects 1..{self.levels} levels, got {q}")
        if n == 0 or b == 0:
            return torch.zeros(b, 0)
        step = self.max_batch or b
        outs = []
        for i in range(0, b, step):
            c = codes[i : i + step].to(self.device)
            audio = self.model.decode(c[None], [None], return_dict=True).audio_values  # [B, C, T]
            audio = audio.float().mean(1)
            want = n * self.hop_length
            if audio.shape[-1] >= want:
                audio = audio[..., :want]
            else:  # pragma: no cover - defensive
                audio = torch.nn.functional.pad(audio, (0, want - audio.shape[-1]))
            outs.append(audio.cpu())
        return torch.cat(outs, 0)

    # ------------------------------------------------------------------ fingerprint
    def config(self) -> dict:
        return {
            "type": "encodec",
            "bandwidth": self.bandwidth,
            "dtype": dtype_name(self.dtype),
            "model_config": hf_config_dict(self.hf_config),
        }

    def fingerprint(self) -> dict:
        return acoustic_fingerprint(self)

    def __repr__(self) -> str:
        return f"EncodecTokenizer({self.model_id!r}, bandwidth={self.bandwidth})"


def randomize_codebooks(model, seed: int, scale: float = 1.0) -> None:
    """EnCodec initialises codebooks to zeros (every code would be 0): fill them with noise."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.quantizer.layers:
            cb = layer.codebook
            emb = torch.randn(cb.embed.shape, generator=g) * scale
            cb.embed.copy_(emb)
            cb.embed_avg.copy_(emb)
            cb.cluster_size.fill_(1.0)


def random_encodec_24khz(directory: str | os.PathLike, seed: int = 0) -> str:
    """Save an ``EncodecModel`` with the real ``facebook/encodec_24khz`` configuration (the
    ``EncodecConfig`` defaults: 24 kHz, hop 320 = 75 Hz, 32 levels x 1024 codes, bandwidths
    1.5-24 kbps, ~15M parameters) and random weights, for benchmarks at the real size without
    network. Returns the directory."""
    from transformers import EncodecConfig, EncodecModel

    torch.manual_seed(seed)
    config = EncodecConfig()  # defaults == facebook/encodec_24khz config.json
    model = EncodecModel(config).eval()
    randomize_codebooks(model, seed)
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return directory
