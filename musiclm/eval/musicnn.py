"""musicnn in PyTorch: a pretrained music tagger (50 MagnaTagATune tags) and embedding, usable offline.

A port of ``musicnn`` 0.1.0 (Pons & Serra, "musicnn: pre-trained convolutional neural networks for
music audio tagging", ISMIR 2019 LBD; ISC licence, Music Technology Group, Universitat Pompeu Fabra)
that loads the authors' own TF1 checkpoints. The MTT_musicnn weights (792,079 parameters) ship with
this package, converted to safetensors, in ``musiclm/eval/weights/musicnn/`` beside the ISC licence
text; a checkpoint folder of the original package (``MTT_musicnn/``, ``MSD_musicnn/``: ``.index`` +
``.data-00000-of-00001``) loads too, read by the small pure-Python TF checkpoint reader below (no
TensorFlow). ``tests/test_eval_metrics.py`` checks the port against outputs of the original
implementation (``scripts/musicnn_reference.py``, run in a separate TensorFlow environment).

What the original computes, and this port reproduces:

* input: 16 kHz mono (other rates are resampled here with torchaudio's sinc resampler; the original
  uses ``librosa.load``'s), power mel spectrogram as ``librosa.feature.melspectrogram`` defaults it
  (n_fft 512, hop 256, periodic Hann window, ``center=True`` with zero padding as librosa >= 0.10
  pads, 96 Slaney-style mel bands with Slaney area normalisation, 0-8 kHz), rounded to float16 (the
  original stores it so), then ``log10(10000 * mel + 1)`` in float32 (numpy 1.x promotes the float16
  array to float32 there; under numpy 2 the same source line would stay in float16 and overflow to
  inf on loud input);
* patches of 187 frames (3 s: ``librosa.time_to_frames(3) + 1``), non-overlapping from frame 0, the
  remainder dropped; a clip shorter than one patch is repeat-padded (the training config's
  ``pad_short``), where the original would fail;
* front end: batch-norm of the input, two timbral convolutions (7 x 38 and 7 x 67 mel bins, 204
  filters each) and three temporal ones (128/64/32 x 1, 51 filters each), each ReLU + batch-norm +
  max over frequency -> 561 channels per frame; mid end: three 7-frame 1-D convolutions with 64
  filters, residual; back end: max and mean over time of the 753 dense-connected channels,
  batch-norm, dense 200 (ReLU, batch-norm: the "penultimate" layer), dense 50 -> sigmoid.
  Batch-norm in inference mode (epsilon 1e-3, TF's default).

``MusicnnTagger.tags`` averages the per-patch sigmoid over 3-s patches (the taggram's mean, as the
musicnn README tags a song). ``MusicnnTagger.embed`` returns the 200-d penultimate layer per segment
(1 s by default, what FAD is reported on here): it is the last layer before the tag classifier, so it
summarises what the tagger has learned about genre, instrumentation and tempo, it is compact (a
covariance of 200 x 200 is estimable from a few hundred segments, unlike the 753-d pooled features),
and it is the layer musicnn's authors expose as the embedding. ``layer="max_pool"``/``"mean_pool"``
gives the 753-d pooled mid-end features instead.

    from musiclm.eval.musicnn import MusicnnTagger
    tagger = MusicnnTagger.from_pretrained()              # vendored MTT_musicnn
    probs = tagger.tags(wav, sr)                          # [50] tensor, tagger.tag_names
    emb = tagger.embed(wav, sr, segment_seconds=1.0)      # [segments, 200]

    python -m musiclm.eval.musicnn clip.wav               # top tags of a file
    python -m musiclm.eval.musicnn --convert /path/to/musicnn/MSD_musicnn --out MSD_musicnn.safetensors
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import struct
import sys
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SR",
    "N_FFT",
    "HOP",
    "N_MELS",
    "MTT_LABELS",
    "MSD_LABELS",
    "DEFAULT_WEIGHTS",
    "read_tf_checkpoint",
    "mel_filterbank",
    "musicnn_input",
    "frames_for_seconds",
    "Musicnn",
    "state_dict_from_tf",
    "convert_checkpoint",
    "MusicnnTagger",
    "main",
]

SR = 16000
N_FFT = 512
HOP = 256
N_MELS = 96
BN_EPS = 1e-3  # tf.compat.v1.layers.batch_normalization's default

# Label order of the checkpoints, from musicnn/configuration.py (ISC, MTG-UPF).
MTT_LABELS = [
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast", "piano",
    "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male", "singing",
    "vocals", "no vocals", "harpsichord", "loud", "quiet", "flute", "woman", "male vocal", "no vocal", "pop",
    "soft", "sitar", "solo", "man", "classic", "choir", "voice", "new age", "dance", "male voice",
    "female vocal", "beats", "harp", "cello", "no voice", "weird", "country", "metal", "female voice", "choral",
]  # fmt: skip
MSD_LABELS = [
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s", "alternative rock",
    "jazz", "beautiful", "metal", "chillout", "male vocalists", "classic rock", "soul", "indie rock", "Mellow",
    "electronica", "80s", "folk", "90s", "chill", "instrumental", "punk", "oldies", "blues", "hard rock", "ambient",
    "acoustic", "experimental", "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country",
    "easy listening", "sexy", "catchy", "funk", "electro", "heavy metal", "Progressive rock", "60s", "rnb",
    "indie pop", "sad", "House", "happy",
]  # fmt: skip

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "musicnn", "MTT_musicnn.safetensors")

# --------------------------------------------------------------------------------------------
# TF1 checkpoint reader (no TensorFlow): .index is a LevelDB-style SSTable whose values are
# BundleEntryProto messages; .data-00000-of-00001 holds the raw little-endian tensors.
# --------------------------------------------------------------------------------------------

_TABLE_MAGIC = 0xDB4775248B80FB57
_TF_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 9: np.int64, 19: np.float16}


def _varint(b: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        c = b[i]
        i += 1
        result |= (c & 0x7F) << shift
        shift += 7
        if c < 0x80:
            return result, i


def _proto_fields(b: bytes):
    """(field number, value) of a protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(b, i)
        elif wire == 1:
            value, i = b[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(b, i)
            value, i = b[i : i + n], i + n
        elif wire == 5:
            value, i = b[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield key >> 3, value


def _table_block(data: bytes, offset: int, size: int):
    """Key/value pairs of one SSTable block (prefix-compressed keys, restart array at the end)."""
    if data[offset + size] != 0:  # the 5-byte trailer's first byte: 0 = no compression (TF bundles never compress)
        raise ValueError("compressed TF checkpoint index blocks are not supported")
    block = data[offset : offset + size]
    n_restarts = struct.unpack("<I", block[-4:])[0]
    end = len(block) - 4 - 4 * n_restarts
    i, key = 0, b""
    while i < end:
        shared, i = _varint(block, i)
        unshared, i = _varint(block, i)
        vlen, i = _varint(block, i)
        key = key[:shared] + block[i : i + unshared]
        i += unshared
        yield key, block[i : i + vlen]
        i += vlen


def _checkpoint_prefix(path: str) -> str:
    """A TF checkpoint prefix from a folder (musicnn's folders hold ``.index`` with an empty prefix,
    or ``<name>.index``) or from a prefix / ``.index`` path."""
    path = os.fspath(path)
    if path.endswith(".index"):
        return path[: -len(".index")]
    if os.path.isdir(path):
        indexes = sorted(f for f in os.listdir(path) if f.endswith(".index"))
        if len(indexes) != 1:
            raise FileNotFoundError(f"{path}: expected one TF checkpoint .index file, found {indexes or 'none'}")
        return os.path.join(path, indexes[0][: -len(".index")])
    if os.path.isfile(path + ".index"):
        return path
    raise FileNotFoundError(f"{path}: not a TF checkpoint folder, prefix or .index file")


def read_tf_checkpoint(path: str, skip_optimizer: bool = True) -> dict[str, np.ndarray]:
    """Variables of a single-shard TF1/TF2 checkpoint as numpy arrays, keyed by variable name.

    ``skip_optimizer`` drops Adam slots and beta powers (two thirds of musicnn's .data file)."""
    prefix = _checkpoint_prefix(path)
    with open(prefix + ".index", "rb") as f:
        index = f.read()
    if len(index) < 48 or struct.unpack("<Q", index[-8:])[0] != _TABLE_MAGIC:
        raise ValueError(f"{prefix}.index: not a TF checkpoint index (bad SSTable magic)")
    footer = index[-48:]
    _, j = _varint(footer, 0)  # metaindex handle (unused)
    _, j = _varint(footer, j)
    index_off, j = _varint(footer, j)
    index_size, j = _varint(footer, j)
    entries: dict[str, bytes] = {}
    for _, handle in _table_block(index, index_off, index_size):
        off, k = _varint(handle, 0)
        size, _ = _varint(handle, k)
        for key, value in _table_block(index, off, size):
            entries[key.decode()] = value
    out: dict[str, np.ndarray] = {}
    data_files: dict[int, bytes] = {}
    n_shards = 1
    for field, value in _proto_fields(entries.get("", b"")):  # BundleHeaderProto: num_shards = 1
        if field == 1:
            n_shards = value
    for name, entry in entries.items():
        if not name or (skip_optimizer and ("/Adam" in name or name.startswith(("beta1_power", "beta2_power")))):
            continue
        dtype, shape, shard, offset, size = 1, [], 0, 0, 0
        for field, value in _proto_fields(entry):
            if field == 1:
                dtype = value
            elif field == 2:
                for f2, dim in _proto_fields(value):
                    if f2 == 2:
                        shape.append(dict(_proto_fields(dim)).get(1, 0))
            elif field == 3:
                shard = value
            elif field == 4:
                offset = value
            elif field == 5:
                size = value
            elif field == 7:
                raise ValueError(f"{name}: partitioned (sliced) variables are not supported")
        if dtype not in _TF_DTYPES:
            raise ValueError(f"{name}: unsupported TF dtype enum {dtype}")
        if shard not in data_files:
            with open(f"{prefix}.data-{shard:05d}-of-{n_shards:05d}", "rb") as f:
                data_files[shard] = f.read()
        np_dtype = np.dtype(_TF_DTYPES[dtype]).newbyteorder("<")
        if size != int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize:
            raise ValueError(f"{name}: {size} bytes for shape {shape}")
        out[name] = np.frombuffer(data_files[shard], np_dtype, count=size // np_dtype.itemsize, offset=offset).reshape(
            shape
        )
    return out


# --------------------------------------------------------------------------------------------
# input representation
# --------------------------------------------------------------------------------------------


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney's auditory toolbox scale (librosa's default, htk=False): linear below 1 kHz, log above.
    f = np.asanyarray(f, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    logstep = math.log(6.4) / 27.0
    return np.where(f >= min_log_hz, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asanyarray(m, dtype=np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


@functools.lru_cache(maxsize=4)
def mel_filterbank(sr: int = SR, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """[n_mels, n_fft // 2 + 1] float32: ``librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)`` with
    its defaults (fmin 0, fmax sr/2, Slaney mel scale, ``norm="slaney"``: each triangle scaled by
    2 / its width in Hz, so every band has the same area), rounded to float32 as librosa stores it."""
    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = np.subtract.outer(mel_f, fft_freqs)
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return weights.astype(np.float32)


def musicnn_input(wav16k: np.ndarray | torch.Tensor) -> np.ndarray:
    """[T] 16 kHz mono -> [frames, 96] float32: the log-compressed mel musicnn feeds its network
    (frames = T // 256 + 1). STFT and mel in float64 (librosa's STFT runs in float64 too, then
    stores complex64); the float16 rounding and the float32 log reproduce the original exactly."""
    y = wav16k.detach().cpu().numpy() if isinstance(wav16k, torch.Tensor) else np.asarray(wav16k)
    y = np.asarray(y, dtype=np.float32).astype(np.float64)
    if y.ndim != 1:
        raise ValueError(f"musicnn_input expects mono [T] audio, got shape {y.shape}")
    y = np.pad(y, N_FFT // 2)  # center=True, zero padding (librosa >= 0.10's pad_mode="constant")
    n_frames = 1 + (len(y) - N_FFT) // HOP
    frames = np.lib.stride_tricks.as_strided(y, (n_frames, N_FFT), (y.strides[0] * HOP, y.strides[0]))
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic Hann (scipy, fftbins=True)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
    mel = power @ mel_filterbank().astype(np.float64).T
    mel16 = mel.astype(np.float32).astype(np.float16).astype(np.float32)
    return np.log10(np.float32(10000) * mel16 + np.float32(1))


def frames_for_seconds(seconds: float) -> int:
    """Frames per patch as musicnn counts them: ``librosa.time_to_frames(s, sr=16000, n_fft=512,
    hop_length=256) + 1`` (3 s -> 187, 1 s -> 62)."""
    return (int(seconds * SR) - N_FFT // 2) // HOP + 1


def _patches(rep: np.ndarray, n: int) -> np.ndarray:
    """[frames, 96] -> [P, n, 96]: non-overlapping patches from frame 0, remainder dropped; shorter
    input repeat-padded to one patch."""
    if rep.shape[0] < n:
        rep = np.tile(rep, (math.ceil(n / max(1, rep.shape[0])), 1))[:n]
    p = (rep.shape[0] - n) // n + 1
    return np.ascontiguousarray(rep[: p * n].reshape(p, n, rep.shape[1]))


# --------------------------------------------------------------------------------------------
# the network
# --------------------------------------------------------------------------------------------


class Musicnn(nn.Module):
    """musicnn's ``build_musicnn`` (front end "7774timbraltemporal", dense mid end, global-pool back
    end). Input ``[B, frames, n_mels]``; returns a dict of ``logits [B, C]``, ``penultimate [B, U]``,
    ``max_pool`` and ``mean_pool [B, 561 + 3 * midend_filters]``."""

    def __init__(self, n_mels: int = N_MELS, num_classes: int = 50, midend_filters: int = 64, backend_units: int = 200):
        super().__init__()
        timbral_filters, temporal_filters = int(1.6 * 128), int(1.6 * 32)  # num_filt = 1.6 in the original
        self.bn_input = nn.BatchNorm2d(1, eps=BN_EPS)
        self.timbral = nn.ModuleList(
            nn.Conv2d(1, timbral_filters, (7, int(f * n_mels))) for f in (0.4, 0.7)
        )  # 7 x 38, 7 x 67
        self.timbral_bn = nn.ModuleList(nn.BatchNorm2d(timbral_filters, eps=BN_EPS) for _ in range(2))
        self.temporal_kernels = (128, 64, 32)
        self.temporal = nn.ModuleList(nn.Conv2d(1, temporal_filters, (k, 1)) for k in self.temporal_kernels)
        self.temporal_bn = nn.ModuleList(nn.BatchNorm2d(temporal_filters, eps=BN_EPS) for _ in range(3))
        front = 2 * timbral_filters + 3 * temporal_filters  # 561
        self.midend = nn.ModuleList(
            nn.Conv1d(front if i == 0 else midend_filters, midend_filters, 7, padding=3) for i in range(3)
        )
        self.midend_bn = nn.ModuleList(nn.BatchNorm1d(midend_filters, eps=BN_EPS) for _ in range(3))
        self.features = front + 3 * midend_filters  # 753
        self.bn_pool = nn.BatchNorm1d(2 * self.features, eps=BN_EPS)
        self.dense = nn.Linear(2 * self.features, backend_units)
        self.bn_dense = nn.BatchNorm1d(backend_units, eps=BN_EPS)
        self.out = nn.Linear(backend_units, num_classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.bn_input(x.unsqueeze(1))  # [B, 1, T, F]
        front = []
        xt = F.pad(x, (0, 0, 3, 3))  # timbral: 7-frame kernels, time padded 3 + 3 ("valid" after padding)
        for conv, bn in zip(self.timbral, self.timbral_bn):
            front.append(bn(F.relu(conv(xt))).amax(dim=3))  # max over the remaining frequency axis
        for k, conv, bn in zip(self.temporal_kernels, self.temporal, self.temporal_bn):
            # TF "same" padding for an even kernel puts the extra frame after: (k-1)//2 before, k//2 after
            y = conv(F.pad(x, (0, 0, (k - 1) // 2, k // 2)))
            front.append(bn(F.relu(y)).amax(dim=3))
        h = torch.cat(front, dim=1)  # [B, 561, T]
        feats = [h]
        for i, (conv, bn) in enumerate(zip(self.midend, self.midend_bn)):
            y = bn(F.relu(conv(h)))
            h = y if i == 0 else y + h  # residual from the second mid-end layer on
            feats.append(h)
        m = torch.cat(feats, dim=1)  # [B, 753, T]
        max_pool, mean_pool = m.amax(dim=2), m.mean(dim=2)
        # TF concatenates [B, 753, 1] max and mean on the last axis and flattens: max/mean interleaved
        flat = torch.stack([max_pool, mean_pool], dim=2).flatten(1)
        penultimate = self.bn_dense(F.relu(self.dense(self.bn_pool(flat))))
        return {
            "logits": self.out(penultimate),
            "penultimate": penultimate,
            "max_pool": max_pool,
            "mean_pool": mean_pool,
        }


def _tf_to_torch_names() -> list[tuple[str, str, str]]:
    """(TF layer, torch module, kind) in the original's layer-creation order (tf auto-names them)."""
    names = [("batch_normalization", "bn_input", "bn")]
    for i in range(2):
        names += [(f"conv2d{'' if i == 0 else '_1'}", f"timbral.{i}", "conv2d")]
        names += [(f"batch_normalization_{1 + i}", f"timbral_bn.{i}", "bn")]
    for i in range(3):
        names += [
            (f"conv2d_{2 + i}", f"temporal.{i}", "conv2d"),
            (f"batch_normalization_{3 + i}", f"temporal_bn.{i}", "bn"),
        ]
    for i in range(3):
        names += [
            (f"conv2d_{5 + i}", f"midend.{i}", "conv1d"),
            (f"batch_normalization_{6 + i}", f"midend_bn.{i}", "bn"),
        ]
    names += [("batch_normalization_9", "bn_pool", "bn"), ("dense", "dense", "dense")]
    names += [("batch_normalization_10", "bn_dense", "bn"), ("dense_1", "out", "dense")]
    return names


def state_dict_from_tf(variables: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], dict]:
    """A :class:`Musicnn` state dict and its config from the variables of a musicnn TF checkpoint."""
    if "conv2d_5/kernel" not in variables or "dense_1/kernel" not in variables:
        raise ValueError("not a musicnn checkpoint (the VGG baselines MTT_vgg/MSD_vgg are not ported)")
    state: dict[str, torch.Tensor] = {}
    for tf_name, mod, kind in _tf_to_torch_names():
        t = lambda k: torch.from_numpy(np.array(variables[f"{tf_name}/{k}"], dtype=np.float32))  # noqa: B023
        if kind == "bn":
            for tf_k, pt_k in (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean")):
                state[f"{mod}.{pt_k}"] = t(tf_k)
            state[f"{mod}.running_var"] = t("moving_variance")
            state[f"{mod}.num_batches_tracked"] = torch.tensor(0)
        elif kind == "conv2d":  # TF [kh, kw, in, out] -> torch [out, in, kh, kw]
            state[f"{mod}.weight"] = t("kernel").permute(3, 2, 0, 1).contiguous()
            state[f"{mod}.bias"] = t("bias")
        elif kind == "conv1d":  # a [7, C, 1, out] conv over the channel axis as width -> Conv1d [out, C, 7]
            state[f"{mod}.weight"] = t("kernel")[:, :, 0, :].permute(2, 1, 0).contiguous()
            state[f"{mod}.bias"] = t("bias")
        else:  # dense [in, out] -> Linear [out, in]
            state[f"{mod}.weight"] = t("kernel").t().contiguous()
            state[f"{mod}.bias"] = t("bias")
    config = {
        "architecture": "musicnn",
        "num_classes": int(variables["dense_1/kernel"].shape[1]),
        "midend_filters": int(variables["conv2d_5/kernel"].shape[-1]),
        "backend_units": int(variables["dense/kernel"].shape[1]),
    }
    return state, config


def _labels_for(path: str, num_classes: int) -> list[str]:
    name = os.path.basename(os.path.normpath(path))
    labels = MSD_LABELS if "MSD" in name else MTT_LABELS
    return list(labels) if len(labels) == num_classes else [f"tag_{i}" for i in range(num_classes)]


def convert_checkpoint(src: str, out_path: str, name: str | None = None, source: str | None = None) -> str:
    """A musicnn TF checkpoint folder -> ``out_path`` (safetensors + JSON config, musiclm.weights'
    exported format) without the optimizer slots -> the path written. ``source``: provenance noted
    in the config (default: the folder's absolute path)."""
    from musiclm.weights import write_exported

    prefix = _checkpoint_prefix(src)
    state, config = state_dict_from_tf(read_tf_checkpoint(prefix))
    name = name or os.path.basename(os.path.normpath(src if os.path.isdir(src) else os.path.dirname(prefix)))
    config.update(model=name, tag_names=_labels_for(name, config["num_classes"]), source=source or os.path.abspath(src))
    model = Musicnn(num_classes=config["num_classes"], midend_filters=config["midend_filters"])
    model.load_state_dict(state, strict=True)  # the mapping covers every parameter and buffer
    write_exported(state, config, out_path)
    return out_path


# --------------------------------------------------------------------------------------------
# the tagger
# --------------------------------------------------------------------------------------------


class MusicnnTagger:
    """musicnn with its input pipeline: tags and embeddings of waveforms at any sample rate."""

    def __init__(self, model: Musicnn, tag_names: Sequence[str], name: str = "musicnn", device: str = "cpu"):
        self.model = model.to(device).eval()
        self.tag_names = list(tag_names)
        self.name = name
        self.device = device

    @classmethod
    def from_pretrained(cls, path: str | None = None, device: str = "cpu") -> MusicnnTagger:
        """``path``: None (the vendored MTT_musicnn), a ``.safetensors`` written by
        :func:`convert_checkpoint`, or a musicnn TF checkpoint folder (e.g. ``site-packages/musicnn/
        MSD_musicnn`` of a ``pip install musicnn``; tag names from the folder name, MTT or MSD)."""
        path = os.fspath(path) if path is not None else DEFAULT_WEIGHTS
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no musicnn weights there")
        if path.endswith(".safetensors"):
            from musiclm.weights import load_exported

            state, config = load_exported(path)
            labels, name = config["tag_names"], config.get("model", "musicnn")
        else:
            state, config = state_dict_from_tf(read_tf_checkpoint(path))
            labels, name = _labels_for(path, config["num_classes"]), os.path.basename(os.path.normpath(path))
        if config.get("architecture", "musicnn") != "musicnn":
            raise ValueError(f"{path}: architecture {config.get('architecture')!r} is not musicnn")
        model = Musicnn(
            num_classes=config["num_classes"],
            midend_filters=config["midend_filters"],
            backend_units=config["backend_units"],
        )
        model.load_state_dict(state, strict=True)
        return cls(model, labels, name=name, device=device)

    def input_representation(self, wav: np.ndarray | torch.Tensor, sr: int) -> np.ndarray:
        """[T] or [C, T] audio at ``sr`` -> [frames, 96] musicnn input (mono, 16 kHz)."""
        from musiclm.audio import resample, to_mono

        w = wav if isinstance(wav, torch.Tensor) else torch.from_numpy(np.asarray(wav, dtype=np.float32))
        w = resample(to_mono(w.float().cpu()), int(sr), SR)
        return musicnn_input(w)

    @torch.no_grad()
    def _run(self, patches: np.ndarray, batch_size: int = 32) -> dict[str, torch.Tensor]:
        outs: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(patches), batch_size):
            x = torch.from_numpy(patches[i : i + batch_size]).to(self.device)
            for k, v in self.model(x).items():
                outs.setdefault(k, []).append(v.float().cpu())
        return {k: torch.cat(v) for k, v in outs.items()}

    def taggram(self, wav: np.ndarray | torch.Tensor, sr: int, patch_seconds: float = 3.0) -> torch.Tensor:
        """[patches, tags] sigmoid probabilities per non-overlapping patch (3 s: what the model was
        trained on)."""
        rep = self.input_representation(wav, sr)
        return torch.sigmoid(self._run(_patches(rep, frames_for_seconds(patch_seconds)))["logits"])

    def tags(self, wav: np.ndarray | torch.Tensor, sr: int) -> torch.Tensor:
        """[tags] mean over the 3-s patches of the per-patch tag probabilities (``tag_names`` order)."""
        return self.taggram(wav, sr).mean(dim=0)

    def embed(
        self, wav: np.ndarray | torch.Tensor, sr: int, segment_seconds: float = 1.0, layer: str = "penultimate"
    ) -> torch.Tensor:
        """[segments, D] one embedding per non-overlapping segment: ``penultimate`` (D = 200, default),
        ``max_pool`` or ``mean_pool`` (D = 753). Each segment is a separate network input, as the
        original's ``extractor(input_length=segment_seconds)`` computes it."""
        if layer not in ("penultimate", "max_pool", "mean_pool"):
            raise ValueError(f"layer must be penultimate, max_pool or mean_pool, not {layer!r}")
        rep = self.input_representation(wav, sr)
        return self._run(_patches(rep, frames_for_seconds(segment_seconds)))[layer]

    def embed_many(
        self,
        wavs: Sequence[np.ndarray | torch.Tensor],
        sr: int,
        segment_seconds: float = 1.0,
        layer: str = "penultimate",
    ) -> list[torch.Tensor]:
        """:meth:`embed` of every clip (all at ``sr``) -> one ``[segments, D]`` tensor per clip."""
        return [self.embed(w, sr, segment_seconds, layer) for w in wavs]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m musiclm.eval.musicnn", description="musicnn tags of audio files")
    p.add_argument("files", nargs="*", help="audio files to tag")
    p.add_argument("--weights", default=None, help="safetensors or musicnn TF checkpoint folder (default: MTT)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--convert", metavar="TF_DIR", help="convert a musicnn TF checkpoint folder to --out")
    p.add_argument("--out", help="output .safetensors for --convert")
    p.add_argument("--source", help="provenance written into the converted config (default: the folder path)")
    args = p.parse_args(argv)
    if args.convert:
        if not args.out:
            p.error("--convert needs --out")
        print(convert_checkpoint(args.convert, args.out, source=args.source))
        return 0
    from musiclm.audio import load_audio

    tagger = MusicnnTagger.from_pretrained(args.weights)
    for f in args.files:
        wav, sr = load_audio(f)
        probs = tagger.tags(wav, sr)
        top = torch.argsort(probs, descending=True)[: args.top]
        print(f, ", ".join(f"{tagger.tag_names[i]} {probs[i]:.2f}" for i in top.tolist()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
