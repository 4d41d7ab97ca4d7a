"""Semantic tokenizer: frame features of a self-supervised audio model (or MFCC / log-mel) + k-means.

Features (:class:`SemanticFeatures`):

* ``type="hf"``: one hidden layer of a transformers audio model (w2v-BERT 2.0 =
  ``facebook/w2v-bert-2.0``, HuBERT, MERT with ``trust_remote_code``), hub id or local directory,
  preprocessed by the model's own feature extractor when it has one. ``layer=k`` is the output of
  the k-th transformer block (1-based); blocks after it are dropped at load time (they cannot change
  the features), which saves their compute. Native frames (50 Hz for HuBERT / w2v-BERT) are
  average-pooled to ``rate`` Hz.
* ``type="mfcc"`` / ``"logmel"``: ``torchaudio.transforms`` at 16 kHz, 25 ms windows, 10 ms hop,
  average-pooled to ``rate`` Hz. No weights needed.
* ``type="mulan"``: one encoder block of OUR trained MuLaN's audio tower
  (:class:`musiclm.mulan.model.SpectrogramTransformer`, a ViT over (mel x frame) patches), from a
  :func:`~musiclm.mulan.checkpoint.save_mulan` directory or a ``musiclm export`` ``X.safetensors``
  (``model=``), ``layer=k`` (1-based; blocks after it, the final norm, the projection and the
  text tower are dropped at load time). Input rate = the MuLaN's ``audio.sample_rate``. The
  output tokens of one time column (``n_mels / patch[0]`` frequency patches) are concatenated
  (``freq="concat"``, default: dim = freq_patches x d_model; keeps which band -- kick, snare,
  hats -- carries the change) or averaged (``freq="mean"``: dim = d_model). The native rate is
  one vector per time patch: ``patch[1] * hop_length / sample_rate`` seconds (0.32 s = 3.125 Hz
  for the demo MuLaN: patch 16 frames x 20 ms), far coarser than a 16th note; each ``rate`` Hz
  output frame takes the patch covering it (overlap-weighted average on the time axis, so the
  grid is not stretched by the last, partly padded patch). Audio longer than the tower's window
  (``audio.seconds``) is processed in windows of whole time patches, concatenated in time.
  ``kind: ast`` MuLaNs are not supported (a clear error).

Frame alignment: for ``T`` input samples at ``sample_rate`` there are exactly
``T_s = T * rate // sample_rate`` frames (whole seconds -> ``seconds * rate``), whatever the model's
native frame count; the native frames are adaptive-average-pooled onto that grid. 25 Hz on 16 kHz
is a 640-sample hop, so semantic frames share the 40 ms grid with 75 Hz acoustic frames.

:class:`SemanticTokenizer` maps each frame to its nearest k-means centroid;
:func:`fit_kmeans` fits the centroids (sklearn ``MiniBatchKMeans``) on a stream of feature arrays;
centroids are stored as safetensors (:func:`save_centroids` / :func:`load_centroids`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .data import storage
from .fingerprint import (
    canonical_json,
    config_sha256,
    hf_config_dict,
    make_fingerprint,
    preprocessor_config_dict,
    state_dict_sha256,
)
from .kmeans import fit_kmeans
from .registry import Registry
from .tensors import as_batch, dtype_name, resolve_torch_dtype

__all__ = [
    "FEATURE_TYPES",
    "HFLayerFeatures",
    "LogMelFeatures",
    "MFCCFeatures",
    "MuLaNLayerFeatures",
    "SemanticFeatures",
    "SemanticTokenizer",
    "build_semantic",
    "feature_types",
    "fit_kmeans",
    "load_centroids",
    "pool_frames",
    "register_features",
    "save_centroids",
]


def pool_frames(frames: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Average-pool ``[B, N, C]`` native frames to ``[B, num_frames, C]`` (adaptive windows; with
    fewer native frames than targets each target takes its nearest frames)."""
    b, n, c = frames.shape
    if num_frames == 0:
        return frames.new_zeros(b, 0, c)
    if n == 0:
        raise ValueError("no native frames to pool (input too short for the feature model)")
    if n == num_frames:
        return frames
    x = frames.transpose(1, 2).float()
    x = torch.nn.functional.adaptive_avg_pool1d(x, num_frames)
    return x.transpose(1, 2).to(frames.dtype)


def pool_frames_by_time(frames: torch.Tensor, frame_seconds: float, num_frames: int, rate: float) -> torch.Tensor:
    """Map ``[B, N, C]`` native frames (frame ``i`` covers ``[i, i + 1) * frame_seconds``) onto
    ``num_frames`` output frames of ``1 / rate`` s by overlap-weighted averaging on the time axis.
    Unlike :func:`pool_frames` the native grid is not stretched to the output length: output
    frames beyond the last native frame take the last one."""
    b, n, c = frames.shape
    if num_frames == 0:
        return frames.new_zeros(b, 0, c)
    if n == 0:
        raise ValueError("no native frames to pool (input too short for the feature model)")
    step = 1.0 / float(rate)
    lo = torch.arange(num_frames, dtype=torch.float64) * step  # output frame bounds, seconds
    hi = lo + step
    nlo = torch.arange(n, dtype=torch.float64) * float(frame_seconds)
    nhi = nlo + float(frame_seconds)
    nhi[-1] = max(float(nhi[-1]), float(hi[-1]))  # the last native frame covers the tail
    w = (torch.minimum(hi[:, None], nhi[None, :]) - torch.maximum(lo[:, None], nlo[None, :])).clamp_min(0.0)
    empty = w.sum(1) <= 0
    if bool(empty.any()):  # cannot happen with the tail rule; keep it total anyway
        w[empty, -1] = 1.0
    w = (w / w.sum(1, keepdim=True)).to(torch.float32)  # [num_frames, N]
    return torch.einsum("tn,bnc->btc", w, frames.float()).to(frames.dtype)


FEATURES: Registry[type[SemanticFeatures]] = Registry("semantic feature")


def register_features(name: str):
    """Class decorator: make a :class:`SemanticFeatures` subclass the ``type: name`` of the config."""
    return FEATURES.register(name)


def feature_types() -> tuple[str, ...]:
    """Registered feature types, in registration order."""
    return FEATURES.names()


class SemanticFeatures:
    """Frame features at ``rate`` Hz for the semantic tokenizer (lazy: loads on first use).

    ``SemanticFeatures(type=..., ...)`` returns the registered class of that type
    (:func:`register_features`): :class:`HFLayerFeatures` (``"hf"``), :class:`MFCCFeatures`
    (``"mfcc"``), :class:`LogMelFeatures` (``"logmel"``), :class:`MuLaNLayerFeatures` (``"mulan"``).

    Args:
        type: ``"hf"`` (transformers model), ``"mfcc"``, ``"logmel"`` or ``"mulan"`` (our MuLaN's
            audio tower).
        model: hub id or local directory (``type="hf"``); a ``save_mulan`` directory or an
            exported ``X.safetensors`` (``type="mulan"``).
        layer: transformer block whose output is used (1-based, ``type="hf"`` / ``"mulan"``).
        freq: ``"concat"`` (default) or ``"mean"``: how the frequency patches of one time column
            of the MuLaN tower become one vector (``type="mulan"``).
        rate: output frame rate in Hz (25 default).
        sample_rate: input rate; for ``hf`` it comes from the model's feature extractor (16 kHz
            default when it has none); 16 kHz for MFCC / log-mel unless given.
        n_mfcc, n_mels: MFCC coefficients / mel bands for the torchaudio features.
        dtype, device: for the HF model.
        trust_remote_code: passed to transformers (MERT needs it).
    """

    kind = "semantic_features"
    needs_model = False  # hf / mulan: a model id or directory is required

    def __new__(cls, type: str = "mfcc", *args: Any, **kwargs: Any) -> SemanticFeatures:
        if cls is SemanticFeatures:
            if type not in FEATURES:
                raise ValueError(f"semantic feature type must be one of {feature_types()}, got {type!r}")
            cls = FEATURES.get(type)
        return super().__new__(cls)

    def __init__(
        self,
        type: str = "mfcc",
        model: str | os.PathLike | None = None,
        layer: int = 6,
        rate: int = 25,
        sample_rate: int | None = None,
        n_mfcc: int = 20,
        n_mels: int = 64,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "float32",
        trust_remote_code: bool = False,
        freq: str = "concat",
    ):
        if self.needs_model and not model:
            raise ValueError(f"semantic features of type {type!r} need a model id or directory")
        if freq not in ("concat", "mean"):
            raise ValueError(f"freq must be 'concat' or 'mean', got {freq!r}")
        self.freq = freq
        self.type = type
        self.model_id = os.fspath(model) if model else None
        self.layer = int(layer)
        self.rate = int(rate)
        self._sample_rate = int(sample_rate) if sample_rate else None
        self.n_mfcc = int(n_mfcc)
        self.n_mels = int(n_mels)
        self.device = torch.device(device)
        self.dtype = resolve_torch_dtype(dtype)
        self.trust_remote_code = bool(trust_remote_code)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], device: str | torch.device = "cpu") -> SemanticFeatures:
        cfg = dict(cfg)
        cfg.setdefault("device", device)
        return cls(**cfg)

    # ------------------------------------------------------------------ rates
    @property
    def sample_rate(self) -> int:
        return self._sample_rate or 16_000

    @property
    def frame_rate(self) -> int:
        return self.rate

    def num_frames(self, num_samples: int) -> int:
        """``num_samples * rate // sample_rate``: exact for whole seconds."""
        return int(num_samples) * self.rate // self.sample_rate

    @property
    def dim(self) -> int:
        raise NotImplementedError

    # ------------------------------------------------------------------ what only some types have
    @property
    def feature_extractor(self):
        return None

    @property
    def model(self):
        return None

    @property
    def mulan(self) -> dict:
        raise AttributeError("only type='mulan' features have a MuLaN")

    @property
    def native_frame_seconds(self) -> float | None:
        """Seconds per native feature vector (``type="mulan"``: one time patch; else None)."""
        return None

    # ------------------------------------------------------------------ features
    @torch.inference_mode()
    def __call__(self, wav: torch.Tensor | np.ndarray) -> torch.Tensor:
        """float ``[B, T]`` at ``sample_rate`` -> float32 ``[B, T * rate // sample_rate, dim]`` (CPU)."""
        wav = as_batch(wav)
        return self._features(wav, self.num_frames(wav.shape[1]))

    extract = __call__

    def _features(self, wav: torch.Tensor, n_out: int) -> torch.Tensor:
        """``[B, T]`` -> ``[B, n_out, dim]`` float32 on the CPU."""
        raise NotImplementedError

    # ------------------------------------------------------------------ fingerprint
    def config(self) -> dict:
        return {"type": self.type, "rate": self.rate, "sample_rate": self.sample_rate}

    def weights_sha256(self) -> str | None:
        """sha256 of the weights the features depend on (HF: the truncated model; MuLaN: patch
        projection, positions and blocks 1..layer of the audio tower); None without weights."""
        return None

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the (truncated) HF model and its feature extractor (``type="hf"`` only)."""
        raise ValueError("only HF semantic features have weights to save")

    def __repr__(self) -> str:
        extra = f", model={self.model_id!r}, layer={self.layer}" if self.needs_model else ""
        return f"SemanticFeatures(type={self.type!r}{extra}, rate={self.rate})"


@register_features("hf")
class HFLayerFeatures(SemanticFeatures):
    """One hidden layer of a transformers audio model (w2v-BERT 2.0, HuBERT, MERT), pooled to ``rate``."""

    needs_model = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._model = None
        self._fe = None
        self._fe_loaded = False
        self._captured: list[torch.Tensor] = []
        self._use_hook = False
        self._weights_sha: str | None = None

    @property
    def sample_rate(self) -> int:
        fe = self.feature_extractor
        if fe is not None and getattr(fe, "sampling_rate", None):
            return int(fe.sampling_rate)
        return self._sample_rate or 16_000

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def feature_extractor(self):
        if not self._fe_loaded:
            from transformers import AutoFeatureExtractor

            try:
                self._fe = AutoFeatureExtractor.from_pretrained(self.model_id, trust_remote_code=self.trust_remote_code)
            except (OSError, ValueError, KeyError, TypeError):
                self._fe = None  # raw waveform as input_values
            self._fe_loaded = True
        return self._fe

    @property
    def model(self):
        if self._model is None:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(self.model_id, dtype=self.dtype, trust_remote_code=self.trust_remote_code)
            model.eval().requires_grad_(False)
            self._truncate(model)
            self._model = model.to(self.device)
        return self._model

    def _truncate(self, model) -> None:
        """Keep blocks 1..layer, capture block ``layer``'s output with a forward hook."""
        n_layers = getattr(model.config, "num_hidden_layers", None)
        if n_layers is not None and not 1 <= self.layer <= n_layers:
            raise ValueError(f"layer {self.layer} out of range 1..{n_layers} for {self.model_id}")
        parent = None
        enc = getattr(model, "encoder", None)
        if enc is not None and isinstance(getattr(enc, "layers", None), torch.nn.ModuleList):
            parent = enc
        else:
            for mod in model.modules():
                lst = getattr(mod, "layers", None)
                if isinstance(lst, torch.nn.ModuleList) and len(lst) == n_layers:
                    parent = mod
                    break
        if parent is None:  # fall back to output_hidden_states
            self._use_hook = False
            return
        layers = parent.layers
        if len(layers) > self.layer:
            parent.layers = torch.nn.ModuleList(list(layers)[: self.layer])
            model.config.num_hidden_layers = self.layer

        def hook(_module, _inputs, output):
            self._captured.append(output[0] if isinstance(output, (tuple, list)) else output)

        parent.layers[self.layer - 1].register_forward_hook(hook)
        self._use_hook = True

    def _features(self, wav: torch.Tensor, n_out: int) -> torch.Tensor:
        return pool_frames(self._hf_frames(wav).float(), n_out).cpu()

    def _hf_frames(self, wav: torch.Tensor) -> torch.Tensor:
        model = self.model
        min_len = self.sample_rate // 10  # the conv front-ends need a few hundred samples
        if wav.shape[1] < min_len:
            wav = torch.nn.functional.pad(wav, (0, min_len - wav.shape[1]))
        fe = self.feature_extractor
        if fe is not None:
            inputs = fe([w.numpy() for w in wav], sampling_rate=self.sample_rate, return_tensors="pt", padding=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        else:
            inputs = {model.main_input_name: wav}
        inputs = {k: (v.to(self.dtype) if v.is_floating_point() else v).to(self.device) for k, v in inputs.items()}
        self._captured.clear()
        try:
            if self._use_hook:
                model(**inputs)
                if not self._captured:
                    raise RuntimeError("layer hook did not fire")
                hidden = self._captured[-1]
            else:
                out = model(**inputs, output_hidden_states=True)
                hidden = out.hidden_states[self.layer]
        finally:
            self._captured.clear()
        return hidden

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(layer=self.layer, dtype=dtype_name(self.dtype))
        cfg["model_config"] = hf_config_dict(self.model.config)
        fe = self.feature_extractor
        cfg["feature_extractor"] = preprocessor_config_dict(fe.to_dict()) if fe is not None else None
        return cfg

    def weights_sha256(self) -> str | None:
        if self._weights_sha is None:
            self._weights_sha = state_dict_sha256(self.model)
        return self._weights_sha

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = os.fspath(directory)
        self.model.save_pretrained(directory)
        if self.feature_extractor is not None:
            self.feature_extractor.save_pretrained(directory)


class _TorchaudioFeatures(SemanticFeatures):
    """``torchaudio.transforms`` at 16 kHz, 25 ms windows, 10 ms hop, average-pooled to ``rate``."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._transform = None

    def _make_transform(self, mel: dict):
        raise NotImplementedError

    def _torchaudio_transform(self):
        if self._transform is None:
            self._transform = self._make_transform(
                dict(n_fft=400, win_length=400, hop_length=160, n_mels=self.n_mels, center=True)
            )
        return self._transform

    def _frames(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)

    def _features(self, wav: torch.Tensor, n_out: int) -> torch.Tensor:
        x = self._torchaudio_transform()(wav)  # [B, C, N]
        return pool_frames(self._frames(x).float(), n_out).cpu()


@register_features("mfcc")
class MFCCFeatures(_TorchaudioFeatures):
    """MFCC (``n_mfcc`` coefficients of ``n_mels`` log-mel bands)."""

    @property
    def dim(self) -> int:
        return self.n_mfcc

    def _make_transform(self, mel: dict):
        import torchaudio

        return torchaudio.transforms.MFCC(
            sample_rate=self.sample_rate, n_mfcc=self.n_mfcc, log_mels=True, melkwargs=mel
        )

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(n_mfcc=self.n_mfcc, n_mels=self.n_mels, n_fft=400, hop_length=160)
        return cfg


@register_features("logmel")
class LogMelFeatures(_TorchaudioFeatures):
    """log(mel power + 1e-5), ``n_mels`` bands."""

    @property
    def dim(self) -> int:
        return self.n_mels

    def _make_transform(self, mel: dict):
        import torchaudio

        return torchaudio.transforms.MelSpectrogram(sample_rate=self.sample_rate, **mel)

    def _frames(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(x + 1e-5).transpose(1, 2)

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(n_mels=self.n_mels, n_fft=400, hop_length=160)
        return cfg


@register_features("mulan")
class MuLaNLayerFeatures(SemanticFeatures):
    """One encoder block of our trained MuLaN's audio tower (see the module docstring)."""

    needs_model = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._weights_sha: str | None = None
        self._mulan: dict | None = None  # tower parts, frontend, configs

    @property
    def sample_rate(self) -> int:
        return int(self.mulan["audio_config"]["sample_rate"])

    @property
    def dim(self) -> int:
        m = self.mulan
        return m["width"] * (m["freq_patches"] if self.freq == "concat" else 1)

    @property
    def mulan(self) -> dict:
        """The truncated audio tower and what runs it (loaded once)."""
        if self._mulan is None:
            self._mulan = _load_mulan_tower(self.model_id, self.layer, self.device)
        return self._mulan

    @property
    def native_frame_seconds(self) -> float | None:
        return self.mulan["patch_seconds"]

    def _features(self, wav: torch.Tensor, n_out: int) -> torch.Tensor:
        frames = self._mulan_frames(wav)
        return pool_frames_by_time(frames.float(), self.mulan["patch_seconds"], n_out, self.rate).cpu()

    def _mulan_frames(self, wav: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` -> ``[B, N, dim]``: one vector per time patch, windows concatenated in time.

        Window ``w`` starts at sample ``w * window_samples`` (a whole number of patches) and holds
        ``window_samples - hop`` samples: ``1 + (window_samples - hop) / hop`` mel frames = exactly
        ``window_patches`` whole patches, so the patch grid runs on without a seam. The last window
        is whatever is left (its last patch partly padded, as for a training crop); a sliver
        shorter than ``min_samples`` after a full window is covered by the patch before it."""
        m = self.mulan
        tower, frontend = m["tower"], m["frontend"]
        b, t = wav.shape
        win, hop = m["window_samples"], m["hop"]
        pieces = []
        for s in range(0, max(t, 1), win):
            full = s + win - hop < t
            chunk = wav[:, s : s + win - hop] if full else wav[:, s:]
            if chunk.shape[1] < m["min_samples"]:
                if s > 0:
                    break
                chunk = torch.nn.functional.pad(chunk, (0, m["min_samples"] - chunk.shape[1]))
            mel = torch.stack([frontend(w) for w in chunk.float().cpu()]).to(self.device)  # [B, M, frames]
            x = _tower_tokens(tower, mel, self.layer)  # [B, Fp, Tp, d]
            x = x.permute(0, 2, 1, 3)  # [B, Tp, Fp, d]
            x = x.reshape(b, x.shape[1], -1) if self.freq == "concat" else x.mean(dim=2)
            pieces.append(x.float())
            if not full:
                break
        return torch.cat(pieces, dim=1)

    def config(self) -> dict:
        cfg = super().config()
        m = self.mulan
        cfg.update(
            layer=self.layer,
            freq=self.freq,
            dim=self.dim,
            mulan_audio_config=m["audio_config"],
            mulan_dim=m["mulan_dim"],
            native_frame_seconds=m["patch_seconds"],
            window_patches=m["window_patches"],
            pooling="time-overlap",
        )
        return cfg

    def weights_sha256(self) -> str | None:
        if self._weights_sha is None:
            self._weights_sha = state_dict_sha256(self.mulan["tower"])
        return self._weights_sha


FEATURE_TYPES = feature_types()


def _load_mulan_tower(path: str, layer: int, device: torch.device) -> dict:
    """Our MuLaN's audio tower cut after block ``layer`` + its frontend and window geometry."""
    import copy
    import math

    from .mulan.checkpoint import load_mulan
    from .mulan.model import SpectrogramTransformer

    model = load_mulan(path)
    acfg = dict(model.config["audio"])
    tower = model.audio_tower
    if acfg.get("kind") != "spectrogram" or not isinstance(tower, SpectrogramTransformer):
        raise ValueError(
            f"semantic features of type 'mulan' need a MuLaN with audio.kind 'spectrogram' (our ViT tower); "
            f"{path} has audio.kind {acfg.get('kind')!r} (an ASTModel tower is not supported: use "
            f"type 'hf' on the AST directory instead)"
        )
    n_layers = len(tower.encoder.layers)
    if not 1 <= int(layer) <= n_layers:
        raise ValueError(f"layer {layer} out of range 1..{n_layers} for the MuLaN audio tower in {path}")
    tower = copy.deepcopy(tower)
    tower.encoder.layers = torch.nn.ModuleList(list(tower.encoder.layers)[: int(layer)])
    tower.encoder.num_layers = int(layer)
    tower.norm = torch.nn.Identity()  # the features are the block's output, before the final norm
    tower = tower.eval().requires_grad_(False).to(device)
    frontend = model.audio_frontend()
    sr, hop = int(acfg["sample_rate"]), int(acfg["hop_length"])
    pf, pt = tower.patch
    # a window of W = max_time_patches whole patches (W * pt mel frames, the tower's maximum)
    window_patches = int(tower.max_time_patches)
    mulan_dim = int(model.dim)
    del model
    return {
        "tower": tower,
        "frontend": frontend,
        "audio_config": json.loads(canonical_json(acfg)),
        "mulan_dim": mulan_dim,
        "hop": hop,
        "width": int(tower.width),
        "freq_patches": int(tower.freq_patches),
        "patch_seconds": pt * hop / sr,
        "window_patches": window_patches,
        "window_samples": window_patches * pt * hop,
        "min_samples": max(hop, int(math.ceil(0.05 * sr))),
    }


def _tower_tokens(tower, mel: torch.Tensor, layer: int) -> torch.Tensor:
    """Run the (truncated) SpectrogramTransformer on ``mel [B, M, T]``; returns the output of
    block ``layer`` as ``[B, freq_patches, time_patches, d]`` (no padding mask: every patch of
    the window is real audio, the last one possibly partly padded, as in training)."""
    import math

    b, _, t = mel.shape
    pf, pt = tower.patch
    tp = math.ceil(t / pt)
    if tp > tower.max_time_patches:
        raise ValueError(f"{t} mel frames > the {tower.max_time_patches * pt} the MuLaN tower was built for")
    if t % pt:
        mel = torch.nn.functional.pad(mel, (0, tp * pt - t))
    x = tower.proj(mel.unsqueeze(1))  # [B, d, Fp, Tp]
    x = x + tower.freq_pos.t()[None, :, :, None] + tower.time_pos[:tp].t()[None, :, None, :]
    x = x.flatten(2).transpose(1, 2)  # [B, Fp*Tp, d], frequency-major
    for blk in list(tower.encoder.layers)[:layer]:
        x = blk(x)
    return x.reshape(b, tower.freq_patches, tp, -1)


# ---------------------------------------------------------------------------------------------
# k-means centroids (fitted by musiclm.kmeans.fit_kmeans)
# ---------------------------------------------------------------------------------------------


def save_centroids(
    path: str | os.PathLike, centroids: np.ndarray | torch.Tensor, features_config: Mapping | None = None
) -> str:
    """Write centroids ``[K, D]`` (+ the features config as metadata) to a safetensors file."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    if isinstance(centroids, torch.Tensor):
        centroids = centroids.detach().cpu().numpy()
    c = np.ascontiguousarray(np.asarray(centroids, dtype=np.float32))
    if c.ndim != 2:
        raise ValueError(f"centroids must be [K, D], got {c.shape}")
    meta = {"format": "musiclm-kmeans", "n_clusters": str(c.shape[0]), "dim": str(c.shape[1])}
    if features_config is not None:
        meta["features"] = canonical_json(features_config)
    with storage.atomic_path(path) as tmp:
        save_file({"centroids": c}, tmp, metadata=meta)
    return path


def load_centroids(path: str | os.PathLike, with_metadata: bool = False):
    """Centroids ``[K, D]`` float32 from :func:`save_centroids` (optionally with its metadata)."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="numpy") as f:
        c = f.get_tensor("centroids").astype(np.float32)
        meta = dict(f.metadata() or {})
    if with_metadata:
        if "features" in meta:
            meta["features"] = json.loads(meta["features"])
        return c, meta
    return c


class SemanticTokenizer:
    """Nearest-centroid ids of :class:`SemanticFeatures` frames.

    ``encode(wav [B, T] at sample_rate) -> int64 [B, T * rate // sample_rate]`` in
    ``[0, vocab_size)``.
    """

    name = "kmeans"
    kind = "semantic"

    def __init__(self, features: SemanticFeatures, kmeans_centroids: np.ndarray | torch.Tensor | str | os.PathLike):
        self.features = features
        if isinstance(kmeans_centroids, (str, os.PathLike)):
            kmeans_centroids = load_centroids(kmeans_centroids)
        if isinstance(kmeans_centroids, np.ndarray):
            kmeans_centroids = torch.from_numpy(np.ascontiguousarray(kmeans_centroids))
        self.centroids = kmeans_centroids.detach().float().cpu()
        if self.centroids.dim() != 2:
            raise ValueError(f"centroids must be [K, D], got {tuple(self.centroids.shape)}")
        self._c_norm = (self.centroids**2).sum(-1)

    @property
    def sample_rate(self) -> int:
        return self.features.sample_rate

    @property
    def frame_rate(self) -> int:
        return self.features.rate

    @property
    def vocab_size(self) -> int:
        return int(self.centroids.shape[0])

    def num_frames(self, num_samples: int) -> int:
        return self.features.num_frames(num_samples)

    @torch.inference_mode()
    def ids_from_features(self, feats: torch.Tensor) -> torch.Tensor:
        """``[..., D]`` features -> int64 ``[...]`` nearest-centroid ids."""
        feats = torch.as_tensor(feats).float().cpu()
        if feats.shape[-1] != self.centroids.shape[1]:
            raise ValueError(
                f"features have dim {feats.shape[-1]} but the k-means centroids have dim {self.centroids.shape[1]}"
            )
        flat = feats.reshape(-1, feats.shape[-1])
        d = self._c_norm[None, :] - 2.0 * flat @ self.centroids.T
        return d.argmin(-1).reshape(feats.shape[:-1])

    def encode(self, wav: torch.Tensor | np.ndarray) -> torch.Tensor:
        return self.ids_from_features(self.features(wav))

    def fingerprint(self) -> dict:
        cfg = {"features": self.features.config(), "n_clusters": self.vocab_size, "dim": int(self.centroids.shape[1])}
        w = {"centroids": self.centroids}
        fsha = self.features.weights_sha256()
        weights = config_sha256({"centroids": state_dict_sha256(w), "features": fsha})
        return make_fingerprint(
            "semantic",
            f"{self.features.type}-kmeans",
            cfg,
            weights,
            self.sample_rate,
            frame_rate=self.frame_rate,
            vocab_size=self.vocab_size,
        )

    def __repr__(self) -> str:
        return f"SemanticTokenizer({self.features!r}, vocab_size={self.vocab_size})"


def build_semantic(cfg: Mapping[str, Any], device: str = "cpu") -> tuple[SemanticFeatures, SemanticTokenizer | None]:
    """``{"features": {...}, "kmeans": path}`` -> (features, tokenizer or None when no k-means yet)."""
    feats = SemanticFeatures.from_config(cfg.get("features", {"type": "mfcc"}), device=device)
    km = cfg.get("kmeans")
    if km and os.path.exists(os.fspath(km)):
        return feats, SemanticTokenizer(feats, km)
    if km:
        warnings.warn(f"semantic k-means centroids {km} not found: semantic tokenizer unavailable", stacklevel=2)
    return feats, None
