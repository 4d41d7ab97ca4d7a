"""Audio in and out: decode, mono, resample, loudness, fixed-length segments, log-mel features.

Decoding goes through soundfile (libsndfile: wav, flac, ogg/vorbis/opus, mp3, aiff, ... at any
sample rate, bit depth and channel count) and, when FFmpeg is installed, through the `ffmpeg`
binary for what soundfile cannot read: the m4a/webm/mp4 files that YouTube downloads really are.
torchaudio is used only for its pure-PyTorch parts (resample, MelSpectrogram): `torchaudio.load`
needs torchcodec + FFmpeg, and the CPU install here has no torchaudio C extension.

Every decoding failure (missing, unreadable, corrupt, empty, silent, format needing FFmpeg) raises
one error type, `AudioError`, whose message names the file and the reason, so a tokenization job
can record "clip failed: why" and move on.

Shapes: mono audio is a float32 tensor [T]; multichannel audio is [C, T].
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import torch

# Containers soundfile (libsndfile) cannot open; these go straight to FFmpeg when it is installed.
FFMPEG_EXTENSIONS = {".m4a", ".mp4", ".webm", ".opus", ".aac", ".mkv", ".mka", ".mov", ".wma"}
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


# ----------------------------------------------------------------------------- FFmpeg

def have_ffmpeg() -> bool:
    """True when both `ffmpeg` and `ffprobe` are on PATH (checked every call: cheap, and patchable in tests)."""
    return shutil.which("ffmpeg") is not None and shutil.which("ffprobe") is not None


def _ffmpeg_hint(ext: str) -> str:
    return (f"decoding {ext or 'this format'} needs FFmpeg, which is not installed: install FFmpeg "
            f"(e.g. `apt-get install ffmpeg` or `conda install ffmpeg`) to read m4a/webm/mp4/aac files")


def _ffprobe(path: str, name: str) -> tuple[int, int, float | None]:
    """(sample_rate, channels, duration or None) of the first audio stream, via ffprobe."""
    cmd = ["ffprobe", "-v", "error", "-select_streams", "a:0",
           "-show_entries", "stream=sample_rate,channels:format=duration", "-of", "json", path]
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AudioError(name, f"unreadable or corrupt audio (ffprobe: {_last_line(proc.stderr)})")
    info = json.loads(proc.stdout or b"{}")
    streams = info.get("streams") or []
    if not streams:
        raise AudioError(name, "no audio stream in the file")
    duration = info.get("format", {}).get("duration")
    return int(streams[0]["sample_rate"]), int(streams[0]["channels"]), (float(duration) if duration else None)


def _last_line(stderr: bytes) -> str:
    lines = [line for line in stderr.decode(errors="replace").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no error message"


def _decode_ffmpeg(path: str, name: str, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    """Decode with the ffmpeg binary at the native rate and channel count -> ([C, T] float32, sr).

    Native rate and channels (from ffprobe) so that downmixing and resampling are the same
    torch code for every format. `-ss` before `-i` seeks without decoding what comes before
    (and ffmpeg trims to the exact sample), so a 30 s segment of an hour-long file is cheap.
    """
    sr, channels, duration = _ffprobe(path, name)
    cmd = ["ffmpeg", "-nostdin", "-v", "error"]
    if start:
        cmd += ["-ss", f"{start:.6f}"]
    cmd += ["-i", path]
    if end is not None:
        cmd += ["-t", f"{end - (start or 0.0):.6f}"]
    cmd += ["-vn", "-f", "f32le", "-acodec", "pcm_f32le", "-ac", str(channels), "-ar", str(sr), "-"]
    proc = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AudioError(name, f"unreadable or corrupt audio (ffmpeg: {_last_line(proc.stderr)})")
    pcm = np.frombuffer(proc.stdout, dtype=np.float32)
    pcm = pcm[: len(pcm) // channels * channels].reshape(-1, channels)
    if duration is not None:
        # AAC decoders emit the encoder's padding past the container's stated duration: drop it,
        # so a decoded clip is as long as duration_seconds() says.
        stop = duration if end is None else min(end, duration)
        pcm = pcm[: max(int(round((stop - (start or 0.0)) * sr)), 0)]
    return pcm.T.copy(), sr


def _with_temp_file(data: bytes, name: str, fn):
    """Run fn(path) on the bytes written to a temporary file: mp4/m4a keep their index at the end
    of the file, so ffmpeg needs a seekable file, not a pipe."""
    suffix = os.path.splitext(name)[1].lower()
    fd, tmp = tempfile.mkstemp(suffix=suffix, prefix="musiclm-audio-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return fn(tmp)
    finally:
        os.unlink(tmp)


# ----------------------------------------------------------------------------- decoding

def _is_url(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def _local_path(source: str) -> str:
    return source[len("file://"):] if source.startswith("file://") else source


def _read_soundfile(file, name: str, start: float | None, end: float | None) -> tuple[np.ndarray, int]:
    """Decode with soundfile, seeking to `start` and reading only up to `end` -> ([C, T] float32, sr)."""
    with sf.SoundFile(file) as f:
        sr = f.samplerate
        first = int(round((start or 0.0) * sr))
        last = None if end is None else int(round(end * sr))
        if f.frames > 0 and first >= f.frames:
            raise AudioError(name, f"segment starts at {start:.3f} s, past the end of the audio "
                                   f"({f.frames / sr:.3f} s): no samples")
        if first > 0:
            if f.seekable():
                f.seek(first)
            else:  # not seekable: read and drop what comes before the segment
                f.read(first, dtype="float32", always_2d=True)
        frames = -1 if last is None else max(last - first, 0)
        data = f.read(frames, dtype="float32", always_2d=True)
    return np.ascontiguousarray(data.T), sr


def _decode(file_or_path, name: str, start: float | None, end: float | None,
            data: bytes | None = None) -> tuple[np.ndarray, int]:
    """Pick the decoder: FFmpeg for the containers soundfile cannot read, soundfile first otherwise,
    FFmpeg as a fallback for anything soundfile rejects (e.g. an .mp4 saved as .mp3)."""
    ext = os.path.splitext(name)[1].lower()

    def ffmpeg():
        if data is not None:
            return _with_temp_file(data, name, lambda p: _decode_ffmpeg(p, name, start, end))
        return _decode_ffmpeg(file_or_path, name, start, end)

    if ext in FFMPEG_EXTENSIONS and have_ffmpeg():
        return ffmpeg()
    try:
        return _read_soundfile(file_or_path, name, start, end)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, ValueError, EOFError, TypeError) as e:
        # Usually "Format not recognised" (another container) or a truncated/corrupt stream.
        if have_ffmpeg():
            if isinstance(file_or_path, io.IOBase):
                file_or_path.seek(0)
            return ffmpeg()
        if ext in FFMPEG_EXTENSIONS:
            raise AudioError(name, _ffmpeg_hint(ext)) from None
        raise AudioError(name, f"unreadable or corrupt audio (soundfile: {e}); if the file is in a "
                               f"format soundfile cannot read (m4a, webm, mp4), install FFmpeg") from None


def _finish(pcm: np.ndarray, sr: int, name: str, sample_rate: int | None, mono: bool,
            start: float | None, loudness_lufs: float | None, allow_silent: bool) -> tuple[torch.Tensor, int]:
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
        raise AudioError(name, f"silent audio: RMS level {rms_db:.1f} dBFS is below the {SILENCE_DB:.0f} dBFS "
                               f"threshold (pass allow_silent=True to keep it)")
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


def load_audio(source: str | os.PathLike, sample_rate: int | None = None, *, mono: bool = True,
               start: float | None = None, end: float | None = None, loudness_lufs: float | None = None,
               allow_silent: bool = False) -> tuple[torch.Tensor, int]:
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
        return decode_bytes(data, source, sample_rate, mono=mono, start=start, end=end,
                            loudness_lufs=loudness_lufs, allow_silent=allow_silent)

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


def decode_bytes(data: bytes, name: str, sample_rate: int | None = None, *, mono: bool = True,
                 start: float | None = None, end: float | None = None, loudness_lufs: float | None = None,
                 allow_silent: bool = False) -> tuple[torch.Tensor, int]:
    """Like load_audio, for an encoded file already in memory (e.g. the flac entry of an audio shard).
    `name` is used in errors and its extension as a format hint."""
    _check_span(name, start, end)
    if not data:
        raise AudioError(name, "empty file (0 bytes)")
    pcm, sr = _decode(io.BytesIO(data), name, start, end, data=data)
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
    """Duration in seconds from the header (soundfile), or ffprobe for FFmpeg formats; nothing decoded."""
    source = os.fspath(source)
    name = source
    ext = os.path.splitext(source)[1].lower()
    if _is_url(source):
        try:
            import fsspec
            with fsspec.open(source, "rb") as f:
                if not (ext in FFMPEG_EXTENSIONS and have_ffmpeg()):
                    try:  # header only: no need to download the whole object
                        return float(sf.info(f).duration)
                    except (sf.LibsndfileError, RuntimeError):
                        f.seek(0)
                data = f.read()
        except FileNotFoundError:
            raise AudioError(source, "file not found") from None
        except Exception as e:
            raise AudioError(source, f"cannot read: {type(e).__name__}: {e}") from None
        return _with_temp_file(data, name, lambda p: _duration_local(p, name, ext))
    path = _local_path(source)
    if not os.path.exists(path):
        raise AudioError(source, "file not found")
    return _duration_local(path, name, ext)


def _duration_local(path: str, name: str, ext: str) -> float:
    if os.path.getsize(path) == 0:
        raise AudioError(name, "empty file (0 bytes)")
    if not (ext in FFMPEG_EXTENSIONS and have_ffmpeg()):
        try:
            return float(sf.info(path).duration)
        except (sf.LibsndfileError, RuntimeError) as e:
            if not have_ffmpeg():
                if ext in FFMPEG_EXTENSIONS:
                    raise AudioError(name, _ffmpeg_hint(ext)) from None
                raise AudioError(name, f"unreadable or corrupt audio (soundfile: {e})") from None
    _, _, duration = _ffprobe(path, name)
    if duration is None:
        raise AudioError(name, "ffprobe reports no duration")
    return duration


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


def normalize_loudness(wav: torch.Tensor, sr: int, target_lufs: float = -23.0,
                       peak_limit: float = PEAK_LIMIT) -> torch.Tensor:
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


def segment(wav: torch.Tensor, sample_rate: int, seconds: float, *,
            min_seconds: float = 1.0) -> list[tuple[float, float, torch.Tensor]]:
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
    return T.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels,
                            f_min=f_min, f_max=f_max, power=2.0).to(device)


def log_mel(wav: torch.Tensor, cfg: MelConfig, *, floor: float = 1e-5) -> torch.Tensor:
    """[T] -> [n_mels, frames] or [B, T] -> [B, n_mels, frames]: natural log of the power mel
    spectrogram, floored at `floor` so silence gives a finite value. frames = T // hop_length + 1."""
    transform = _mel_transform(dataclasses.astuple(cfg), str(wav.device))
    return torch.log(transform(wav.float()).clamp(min=floor))
