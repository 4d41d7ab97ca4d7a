"""Audio in and out: decode, mono, resample, loudness, fixed-length segments, log-mel features.

Decoding goes through soundfile (libsndfile: wav, flac, ogg/vorbis/opus, mp3, aiff, ... at any
sample rate, bit depth and channel count) and through PyAV (`av` on PyPI, whose wheels carry
FFmpeg's libraries) for what soundfile cannot read: the m4a/webm/mp4 files that YouTube downloads
really are. Both decode in-process, so the same file gives the same samples and the same error on
every machine; no `ffmpeg` binary is needed. torchaudio is used only for its pure-PyTorch parts
(resample, MelSpectrogram): `torchaudio.load` needs torchcodec + FFmpeg, and the CPU install here
has no torchaudio C extension.

Every decoding failure (missing, unreadable, corrupt, empty, silent) raises one error type,
`AudioError`, whose message names the file and the reason, so a tokenization job can record
"clip failed: why" and move on.

Shapes: mono audio is a float32 tensor [T]; multichannel audio is [C, T].
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch

# Containers soundfile (libsndfile) cannot open: these go straight to PyAV (FFmpeg's libraries).
CONTAINER_EXTENSIONS = {".m4a", ".mp4", ".webm", ".opus", ".aac", ".mkv", ".mka", ".mov", ".wma"}
# RMS level (dBFS) under which a clip counts as silent: digital silence and dither noise, not quiet music.
SILENCE_DB = -60.0
# Loudness normalisation never pushes a sample peak above this (a simple gain limit, not a compressor).
PEAK_LIMIT = 0.99


class AudioError(Exception):
    """A file that cannot be used as audio. `str(e)` is "<path>: <reason>"."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # keeps the two-argument constructor picklable (Ray ships errors between processes)
        return (AudioError, (self.path, self.reason))


# ----------------------------------------------------------------------------- PyAV (FFmpeg's libraries)

# Sample formats as PyAV names them -> (numpy dtype of to_ndarray(), scale to [-1, 1], offset).
_AV_SCALE = {
    "u8": (128.0, 128.0),
    "s16": (32768.0, 0.0),
    "s32": (2147483648.0, 0.0),
    "s64": (9223372036854775808.0, 0.0),
    "flt": (1.0, 0.0),
    "dbl": (1.0, 0.0),
}


# Seconds decoded before a seek target so lossy decoders have warmed up by the first kept sample.
_AV_PREROLL_S = 0.25


def _frame_to_float(frame) -> np.ndarray:
    """A decoded av.AudioFrame -> [C, n] float32, whatever its sample format (planar or packed)."""
    arr = frame.to_ndarray()
    name = frame.format.name.rstrip("p")
    scale, offset = _AV_SCALE.get(name, (1.0, 0.0))
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:  # packed: [1, n * C], samples interleaved
        arr = arr.reshape(-1, channels).T
    out = arr.astype(np.float32)
    if offset or scale != 1.0:
        out = (out - offset) / scale
    return out


def _av_error(name: str, e: Exception) -> AudioError:
    return AudioError(name, f"unreadable or corrupt audio (PyAV/FFmpeg: {type(e).__name__}: {e})")


def _decode_av(file, name: str, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with PyAV at its native rate and channel count -> ([C, T] float32, sr).

    Native rate and channels so that downmixing and resampling are the same torch code for every
    format. A `start` seeks (to the keyframe before it) instead of decoding what comes before, and
    samples are then cut exactly by their timestamps, so a 30 s segment of an hour-long file is cheap.
    Decoding stops at the container's stated duration: AAC decoders emit the encoder's padding
    past it, and a decoded clip should be as long as duration_seconds() says.
    """
    import av

    try:
        container = av.open(file, mode="r")
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise _av_error(name, e) from None
    try:
        if not container.streams.audio:
            raise AudioError(name, "no audio stream in the file")
        stream = container.streams.audio[0]
        sr = int(stream.codec_context.sample_rate or stream.rate or 0)
        if sr <= 0:
            raise AudioError(name, "no sample rate in the audio stream")
        duration = _container_duration(container, stream)
        first = int(round((start or 0.0) * sr))
        stop = None if end is None else int(round(end * sr))
        if duration is not None:
            total = int(round(duration * sr))
            stop = total if stop is None else min(stop, total)
        # time 0 of the clip: the stream's first timestamp (Opus in webm starts a few ms in);
        # encoder priming marked with negative timestamps falls before it and is dropped
        origin = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        origin = max(origin, 0.0)
        if start and start > _AV_PREROLL_S:
            # a decoder started cold needs a few frames of pre-roll (MDCT overlap: AAC 2 frames,
            # Opus 80 ms): seek that far before the segment and drop what comes before it
            target = int((start - _AV_PREROLL_S + origin) / stream.time_base)
            container.seek(target, stream=stream, backward=True, any_frame=False)
        chunks: list[np.ndarray] = []
        pos = None  # sample index of the next decoded sample
        for frame in container.decode(stream):
            if frame.time is not None and (pos is None or start):
                pos = int(round((frame.time - origin) * sr))  # exact after a seek
            elif pos is None:
                pos = 0
            data = _frame_to_float(frame)
            n = data.shape[1]
            a, b = max(first - pos, 0), n if stop is None else min(n, stop - pos)
            if b > a:
                chunks.append(data[:, a:b])
            pos += n
            if stop is not None and pos >= stop:
                break
    except AudioError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise _av_error(name, e) from None
    finally:
        container.close()
    if not chunks:
        if first > 0:
            raise AudioError(name, f"segment starts at {start:.3f} s, past the end of the audio: no samples")
        return np.zeros((1, 0), np.float32), sr
    return np.ascontiguousarray(np.concatenate(chunks, axis=1)), sr


def _container_duration(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _duration_av(file, name: str) -> float:
    import av

    try:
        with av.open(file, mode="r") as container:
            if not container.streams.audio:
                raise AudioError(name, "no audio stream in the file")
            duration = _container_duration(container, container.streams.audio[0])
    except AudioError:
        raise
    except (av.error.FFmpegError, ValueError, OSError) as e:
        raise _av_error(name, e) from None
    if duration is None:
        raise AudioError(name, "the container states no duration")
    return duration


# ----------------------------------------------------------------------------- decoding


def _is_url(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def _local_path(source: str) -> str:
    return source[len("file://") :] if source.startswith("file://") else source


def _read_soundfile(file, name: str, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    """Decode with soundfile, seeking to `start` and reading only up to `end` -> ([C, T] float32, sr)."""
    with sf.SoundFile(file) as f:
        sr = f.samplerate
        first = int(round((start or 0.0) * sr))
        last = None if end is None else int(round(end * sr))
        if f.frames > 0 and first >= f.frames:
            raise AudioError(
                name, f"segment starts at {start:.3f} s, past the end of the audio ({f.frames / sr:.3f} s): no samples"
            )
        if first > 0:
            if f.seekable():
                f.seek(first)
            else:  # not seekable: read and drop what comes before the segment
                f.read(first, dtype="float32", always_2d=True)
        frames = -1 if last is None else max(last - first, 0)
        data = f.read(frames, dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), sr


_SOUNDFILE_ERRORS = (sf.LibsndfileError, RuntimeError, ValueError, EOFError, TypeError)


def _decode(file, name: str, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    """Pick the decoder: PyAV for the containers soundfile cannot read, soundfile first otherwise,
    PyAV as the fallback for anything soundfile rejects (e.g. an .mp4 saved as .mp3). A file both
    reject is "unreadable or corrupt" on every machine."""
    ext = os.path.splitext(name)[1].lower()
    if ext in CONTAINER_EXTENSIONS:
        return _decode_av(file, name, start, end)
    try:
        return _read_soundfile(file, name, start, end)
    except AudioError:
        raise
    except _SOUNDFILE_ERRORS:  # usually "Format not recognised" (another container) or a damaged stream
        if isinstance(file, io.IOBase):
            file.seek(0)
        return _decode_av(file, name, start, end)


def _finish(
    pcm: np.ndarray,
    sr: int,
    name: str,
    sample_rate: int | None,
    mono: bool,
    start: float | None,
    loudness_lufs: float | None,
    allow_silent: bool,
) -> tuple[torch.Tensor, int]:
    """Shared tail of load_audio/decode_bytes: checks, mono, resample, loudness."""
    if pcm.size == 0 or pcm.shape[-1] == 0:
        if start:
            raise AudioError(name, f"segment starting at {start:.3f} s is past the end of the audio: no samples")
        raise AudioError(name, "empty audio: no samples")
    if not np.isfinite(pcm).all():
        raise AudioError(name, "corrupt audio: contains NaN or infinite samples")
    wav = torch.from_numpy(pcm)
    if not allow_silent and is_silent(wav):
        rms_db = _rms_db(wav)
        raise AudioError(
            name,
            f"silent audio: RMS level {rms_db:.1f} dBFS is below the {SILENCE_DB:.0f} dBFS "
            f"threshold (pass allow_silent=True to keep it)",
        )
    if mono:
        wav = to_mono(wav)
    if sample_rate is not None and sample_rate != sr:
        wav = resample(wav, sr, sample_rate)
        sr = sample_rate
    if loudness_lufs is not None:
        wav = normalize_loudness(wav, sr, loudness_lufs)
    return wav.contiguous(), sr


def _check_span(name: str, start: float | None, end: float | None) -> None:
    # A bad span is the caller's bug, not the file's: ValueError, not AudioError.
    if start is not None and start < 0:
        raise ValueError(f"{name}: start must be >= 0, got {start}")
    if end is not None and end <= (start or 0.0):
        raise ValueError(f"{name}: end ({end}) must be greater than start ({start or 0.0})")


def load_audio(
    source: str | os.PathLike,
    sample_rate: int | None = None,
    *,
    mono: bool = True,
    start: float | None = None,
    end: float | None = None,
    loudness_lufs: float | None = None,
    allow_silent: bool = False,
) -> tuple[torch.Tensor, int]:
    """Decode a local file or an fsspec URL (s3://bucket/key, ...) -> (float32 [T] or [C, T], sample_rate).

    sample_rate: resample to this rate (None keeps the file's). start/end: seconds; only that span
    is decoded where the format allows seeking. loudness_lufs: normalise to this integrated
    loudness (e.g. -23.0). Raises AudioError for missing, unreadable, corrupt, empty or silent input.
    """
    source = os.fspath(source)
    _check_span(source, start, end)
    if _is_url(source):
        # Remote objects are read whole: clips are minutes at most, and it keeps one decoding path.
        try:
            import fsspec

            with fsspec.open(source, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise AudioError(source, "file not found") from None
        except Exception as e:  # network, credentials, bucket: the reason is in the message
            raise AudioError(source, f"cannot read: {type(e).__name__}: {e}") from None
        return decode_bytes(
            data,
            source,
            sample_rate,
            mono=mono,
            start=start,
            end=end,
            loudness_lufs=loudness_lufs,
            allow_silent=allow_silent,
        )

    path = _local_path(source)
    if not os.path.exists(path):
        raise AudioError(source, "file not found")
    if os.path.isdir(path):
        raise AudioError(source, "is a directory, not an audio file")
    try:
        if os.path.getsize(path) == 0:
            raise AudioError(source, "empty file (0 bytes)")
        with open(path, "rb"):  # surface permission errors as such, not as "corrupt"
            pass
    except OSError as e:
        raise AudioError(source, f"cannot read: {e.strerror or e}") from None
    pcm, sr = _decode(path, source, start, end)
    return _finish(pcm, sr, source, sample_rate, mono, start, loudness_lufs, allow_silent)


def decode_bytes(
    data: bytes,
    name: str,
    sample_rate: int | None = None,
    *,
    mono: bool = True,
    start: float | None = None,
    end: float | None = None,
    loudness_lufs: float | None = None,
    allow_silent: bool = False,
) -> tuple[torch.Tensor, int]:
    """Like load_audio, for an encoded file already in memory (e.g. the flac entry of an audio shard).
    `name` is used in errors and its extension as a format hint."""
    _check_span(name, start, end)
    if not data:
        raise AudioError(name, "empty file (0 bytes)")
    pcm, sr = _decode(io.BytesIO(data), name, start, end)
    return _finish(pcm, sr, name, sample_rate, mono, start, loudness_lufs, allow_silent)


def encode_flac(wav: torch.Tensor, sample_rate: int) -> bytes:
    """[T] or [C, T] float audio -> 16-bit PCM FLAC bytes (the audio-shard entry format)."""
    x = wav.detach().to("cpu", torch.float32)
    x = x.unsqueeze(0) if x.dim() == 1 else x
    # Clamp first: libsndfile's float->int conversion does not clip, it wraps around.
    pcm = x.clamp(-1.0, 1.0).T.contiguous().numpy()
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def duration_seconds(source: str | os.PathLike) -> float:
    """Duration in seconds from the header (soundfile) or the container (PyAV); nothing decoded."""
    source = os.fspath(source)
    ext = os.path.splitext(source)[1].lower()
    if _is_url(source):
        try:
            import fsspec

            with fsspec.open(source, "rb") as f:
                if ext not in CONTAINER_EXTENSIONS:
                    try:  # header only: no need to download the whole object
                        return float(sf.info(f).duration)
                    except _SOUNDFILE_ERRORS:
                        f.seek(0)
                data = f.read()
        except FileNotFoundError:
            raise AudioError(source, "file not found") from None
        except Exception as e:
            raise AudioError(source, f"cannot read: {type(e).__name__}: {e}") from None
        if not data:
            raise AudioError(source, "empty file (0 bytes)")
        return _duration_av(io.BytesIO(data), source)
    path = _local_path(source)
    if not os.path.exists(path):
        raise AudioError(source, "file not found")
    if os.path.getsize(path) == 0:
        raise AudioError(source, "empty file (0 bytes)")
    if ext not in CONTAINER_EXTENSIONS:
        try:
            return float(sf.info(path).duration)
        except _SOUNDFILE_ERRORS:
            pass
    return _duration_av(path, source)


# ----------------------------------------------------------------------------- transforms


def to_mono(wav: torch.Tensor) -> torch.Tensor:
    """[C, T] -> [T] by averaging channels (a [T] input is returned as is)."""
    return wav if wav.dim() == 1 else wav.mean(dim=0)


def resample(wav: torch.Tensor, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Band-limited sinc resampling along the last axis (torchaudio); no-op when the rates are equal."""
    if orig_sr == new_sr:
        return wav
    import torchaudio.functional as AF

    return AF.resample(wav, orig_sr, new_sr)


def _rms_db(wav: torch.Tensor) -> float:
    rms = wav.double().square().mean().sqrt().item()
    return 20 * math.log10(rms) if rms > 0 else float("-inf")


def is_silent(wav: torch.Tensor, threshold_db: float = SILENCE_DB) -> bool:
    """True when the RMS level over all samples and channels is below threshold_db dBFS."""
    return wav.numel() == 0 or _rms_db(wav) < threshold_db


def _kweight_coefficients(sr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The two BS.1770 K-weighting biquads (high shelf +4 dB at 1.5 kHz, high-pass at 38 Hz),
    with the same formulas (audio-EQ cookbook) as torchaudio.functional.loudness."""
    w0 = 2 * math.pi * 1500.0 / sr
    alpha = math.sin(w0) / 2 / (1 / math.sqrt(2))
    A = 10 ** (4.0 / 40)
    t1, t2, t3 = 2 * math.sqrt(A) * alpha, (A - 1) * math.cos(w0), (A + 1) * math.cos(w0)
    b_shelf = np.array([A * ((A + 1) + t2 + t1), -2 * A * ((A - 1) + t3), A * ((A + 1) + t2 - t1)])
    a_shelf = np.array([(A + 1) - t2 + t1, 2 * ((A - 1) - t3), (A + 1) - t2 - t1])
    w0 = 2 * math.pi * 38.0 / sr
    alpha = math.sin(w0) / 2 / 0.5
    b_hp = np.array([(1 + math.cos(w0)) / 2, -1 - math.cos(w0), (1 + math.cos(w0)) / 2])
    a_hp = np.array([1 + alpha, -2 * math.cos(w0), 1 - alpha])
    return b_shelf, a_shelf, b_hp, a_hp


def loudness(wav: torch.Tensor, sample_rate: int) -> float:
    """Integrated loudness in LUFS (ITU-R BS.1770-4: K-weighting, 400 ms blocks, -70 LUFS absolute
    and -10 LU relative gates) of [T] or [C, T] audio; -inf for silence.

    Same algorithm as torchaudio.functional.loudness, but its IIR filter runs as a Python loop
    without torchaudio's C extension (22 s for 30 s of audio); scipy's lfilter takes milliseconds.
    Clips shorter than one 400 ms block are measured as one block.
    """
    from scipy.signal import lfilter

    x = wav.detach().to("cpu", torch.float64)
    x = x.unsqueeze(0) if x.dim() == 1 else x
    if x.shape[0] > 5:  # BS.1770 weights cover up to 5.0 channels; measure bigger layouts on their mix
        x = x.mean(dim=0, keepdim=True)
    b1, a1, b2, a2 = _kweight_coefficients(sample_rate)
    y = lfilter(b2, a2, lfilter(b1, a1, x.numpy(), axis=-1), axis=-1)
    block = int(round(0.4 * sample_rate))
    step = int(round(block * 0.25))
    y = torch.from_numpy(y)
    if y.shape[-1] < block:
        energy = y.square().mean(dim=-1, keepdim=True)  # [C, 1]
    else:
        energy = y.square().unfold(-1, block, step).mean(dim=-1)  # [C, blocks]
    g = torch.tensor([1.0, 1.0, 1.0, 1.41, 1.41], dtype=energy.dtype)[: energy.shape[0], None]
    block_lufs = -0.691 + 10 * torch.log10((g * energy).sum(dim=0))
    gated = block_lufs > -70.0
    if not gated.any():
        return float("-inf")
    relative = -0.691 + 10 * math.log10((g * energy[:, gated]).sum(dim=0).mean().item()) - 10.0
    gated &= block_lufs > relative
    return -0.691 + 10 * math.log10((g * energy[:, gated]).sum(dim=0).mean().item())


def normalize_loudness(
    wav: torch.Tensor, sr: int, target_lufs: float = -23.0, peak_limit: float = PEAK_LIMIT
) -> torch.Tensor:
    """Scale to target_lufs integrated loudness, then scale down if a sample peak would exceed
    peak_limit (so loud targets cannot clip). Silent input is returned unchanged."""
    measured = loudness(wav, sr)
    if not math.isfinite(measured):
        return wav
    out = wav * (10 ** ((target_lufs - measured) / 20))
    peak = out.abs().max().item()
    if peak > peak_limit:
        out = out * (peak_limit / peak)
    return out


def segment(
    wav: torch.Tensor, sample_rate: int, seconds: float, *, min_seconds: float = 1.0
) -> list[tuple[float, float, torch.Tensor]]:
    """Cut [T] or [C, T] audio into consecutive `seconds`-long pieces -> [(start_s, end_s, wav), ...].

    The last piece may be shorter and is kept only when it is at least min_seconds long (so a clip
    shorter than min_seconds yields no segments). The pieces are views of `wav`, not copies.
    """
    if seconds <= 0:
        raise ValueError(f"segment length must be > 0 seconds, got {seconds}")
    total = wav.shape[-1]
    n = int(round(seconds * sample_rate))
    min_n = int(math.ceil(min_seconds * sample_rate - 1e-6))
    out = []
    for a in range(0, total, n):
        b = min(a + n, total)
        if b - a < n and b - a < min_n:
            break
        out.append((a / sample_rate, b / sample_rate, wav[..., a:b]))
    return out


# ----------------------------------------------------------------------------- features


@dataclass
class MelConfig:
    """Log-mel spectrogram settings; defaults give 100 frames/s at 24 kHz."""

    sample_rate: int = 24000
    n_fft: int = 1024
    hop_length: int = 240
    n_mels: int = 128
    f_min: float = 0.0
    f_max: float | None = None  # None = sample_rate / 2


@functools.lru_cache(maxsize=16)
def _mel_transform(cfg_key: tuple, device: str):
    # Built once per (config, device): the mel filterbank and window are the costly part of a call.
    import torchaudio.transforms as T

    sample_rate, n_fft, hop_length, n_mels, f_min, f_max = cfg_key
    return T.MelSpectrogram(
        sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels, f_min=f_min, f_max=f_max, power=2.0
    ).to(device)


def log_mel(wav: torch.Tensor, cfg: MelConfig, *, floor: float = 1e-5) -> torch.Tensor:
    """[T] -> [n_mels, frames] or [B, T] -> [B, n_mels, frames]: natural log of the power mel
    spectrogram, floored at `floor` so silence gives a finite value. frames = T // hop_length + 1."""
    transform = _mel_transform(dataclasses.astuple(cfg), str(wav.device))
    return torch.log(transform(wav.float()).clamp(min=floor))
