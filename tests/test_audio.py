"""musiclm.audio: every input format, start/end, mono/resample/loudness, segments, log-mel, and
one error type for missing, corrupt, empty and silent files. Test audio is synthesised here."""

import io
import os
import pickle
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from musiclm import audio
from musiclm.audio import AudioError, MelConfig


def tone(sr, seconds, channels=1, freq=440.0, amp=0.3):
    """[T, C] float32 sine; channel c has amplitude amp / (c + 1) so channels are distinguishable."""
    t = np.arange(int(round(sr * seconds))) / sr
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.stack([x / (c + 1) for c in range(channels)], axis=1).astype(np.float32)


def dominant_hz(wav, sr):
    spec = np.abs(np.fft.rfft(wav.numpy()))
    return np.argmax(spec) * sr / len(wav)


# ----------------------------------------------------------------------------- soundfile formats

SOUNDFILE_CASES = [
    # (extension, format, subtype, sample rate, channels)
    ("wav", "WAV", "PCM_U8", 8000, 1),
    ("wav", "WAV", "PCM_16", 16000, 2),
    ("wav", "WAV", "PCM_24", 44100, 2),
    ("wav", "WAV", "PCM_32", 22050, 1),
    ("wav", "WAV", "FLOAT", 48000, 6),
    ("wav", "WAV", "DOUBLE", 24000, 1),
    ("flac", "FLAC", "PCM_16", 44100, 2),
    ("flac", "FLAC", "PCM_24", 96000, 1),
    ("ogg", "OGG", "VORBIS", 44100, 2),
    ("ogg", "OGG", "OPUS", 48000, 1),
    ("mp3", "MP3", "MPEG_LAYER_III", 44100, 2),
    ("mp3", "MP3", "MPEG_LAYER_III", 22050, 1),
]


@pytest.mark.parametrize(
    "ext,fmt,subtype,sr,channels", SOUNDFILE_CASES, ids=[f"{c[0]}-{c[2]}-{c[3]}-{c[4]}ch" for c in SOUNDFILE_CASES]
)
def test_soundfile_formats(tmp_path, ext, fmt, subtype, sr, channels):
    path = tmp_path / f"clip.{ext}"
    sf.write(path, tone(sr, 1.0, channels), sr, format=fmt, subtype=subtype)

    wav, out_sr = audio.load_audio(path, 24000)
    assert out_sr == 24000 and wav.dtype == torch.float32 and wav.dim() == 1
    assert abs(wav.shape[0] - 24000) < 24000 * 0.1  # lossy codecs may add/trim a few ms
    assert abs(dominant_hz(wav, 24000) - 440) < 5
    assert audio.duration_seconds(path) == pytest.approx(1.0, abs=0.1)

    multi, native_sr = audio.load_audio(path, mono=False)
    assert native_sr == sr and multi.shape[0] == channels
    if channels > 1:  # channel order and levels survive: channel 1 is half as loud as channel 0
        ratio = multi[1].abs().max() / multi[0].abs().max()
        assert ratio == pytest.approx(0.5, abs=0.1)


def test_start_end_are_sample_exact_and_clipped(tmp_path):
    sr = 8000
    ramp = (np.arange(sr * 4) % 1000 / 1000.0 * 0.5 + 0.1).astype(np.float32)
    path = tmp_path / "ramp.wav"
    sf.write(path, ramp, sr, subtype="FLOAT")
    wav, _ = audio.load_audio(path, start=1.5, end=2.25)
    assert torch.equal(wav, torch.from_numpy(ramp[12000:18000]))
    tail, _ = audio.load_audio(path, start=3.0, end=10.0)  # end past the file: what exists
    assert tail.shape[0] == sr
    with pytest.raises(AudioError, match="past the end"):
        audio.load_audio(path, start=5.0)
    with pytest.raises(ValueError):
        audio.load_audio(path, start=2.0, end=1.0)


def test_start_end_on_compressed(tmp_path):
    path = tmp_path / "c.ogg"
    sf.write(path, tone(44100, 3.0, 2), 44100, format="OGG", subtype="VORBIS")
    wav, sr = audio.load_audio(path, 16000, start=1.0, end=2.5)
    assert sr == 16000 and abs(wav.shape[0] - 24000) <= 16


def test_fsspec_url_and_decode_bytes(tmp_path):
    import fsspec

    data = audio.encode_flac(torch.from_numpy(tone(16000, 1.0)[:, 0]), 16000)
    with fsspec.open("memory://bucket/clip.flac", "wb") as f:
        f.write(data)
    wav, sr = audio.load_audio("memory://bucket/clip.flac", start=0.5)
    assert sr == 16000 and wav.shape[0] == 8000
    assert audio.duration_seconds("memory://bucket/clip.flac") == pytest.approx(1.0)
    with pytest.raises(AudioError, match="not found"):
        audio.load_audio("memory://bucket/nope.flac")


def test_encode_flac_roundtrip_and_clamp():
    x = torch.from_numpy(tone(24000, 0.5)[:, 0])
    x[0], x[1] = 1.7, -1.7  # out of range must clamp, not wrap around
    data = audio.encode_flac(x, 24000)
    info = sf.info(io.BytesIO(data))
    assert info.format == "FLAC" and info.subtype == "PCM_16" and info.samplerate == 24000
    y, sr = audio.decode_bytes(data, "shard/000001.flac")
    assert sr == 24000 and y.shape == x.shape
    assert y[0] > 0.99 and y[1] < -0.99
    assert (y[2:] - x[2:]).abs().max() < 1.0 / 32768 + 1e-6


# ----------------------------------------------------------------------------- YouTube containers (PyAV)

CONTAINER_CASES = [("m4a", "aac"), ("webm", "libopus"), ("mp4", "aac")]


def encode_container(path, x: np.ndarray, sr: int, codec: str) -> None:
    """[T, C] float32 -> an AAC/Opus file written with PyAV (the FFmpeg libraries its wheel carries)."""
    import av

    layout = {1: "mono", 2: "stereo"}[x.shape[1]]
    rate = 48000 if codec == "libopus" else sr  # Opus runs at 48 kHz; PyAV resamples on encode
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x.T), format="fltp", layout=layout)
        frame.rate = sr
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


@pytest.fixture(scope="module")
def container_files(tmp_path_factory):
    """What YouTube downloads really are: AAC in m4a/mp4, Opus in webm (stereo, 3 s)."""
    d = tmp_path_factory.mktemp("containers")
    files = {}
    for ext, codec in CONTAINER_CASES:
        files[ext] = d / f"clip.{ext}"
        encode_container(files[ext], tone(44100, 3.0, 2), 44100, codec)
    return files


def test_no_ffmpeg_binary_on_path():
    # The suite runs as on a fresh machine (.ci/run hides ffmpeg/ffprobe): decoding must not need them.
    assert shutil.which("ffmpeg") is None and shutil.which("ffprobe") is None, (
        "run the tests with ffmpeg/ffprobe hidden from PATH (see .ci/run)"
    )


@pytest.mark.parametrize("ext", [c[0] for c in CONTAINER_CASES])
def test_container_formats(container_files, ext):
    path = container_files[ext]
    wav, sr = audio.load_audio(path, 24000)
    assert sr == 24000 and wav.dim() == 1
    # PyAV's muxer writes no edit list, so the AAC encoder's 1024 priming samples count as audio
    # (23 ms); files written by the ffmpeg CLI or YouTube mark them and they are skipped.
    assert wav.shape[0] == pytest.approx(72000, abs=24000 * 0.03)
    assert abs(dominant_hz(wav, 24000) - 440) < 5
    assert audio.duration_seconds(path) == pytest.approx(3.0, abs=0.05)

    seg, native = audio.load_audio(path, mono=False, start=1.0, end=2.0)
    assert seg.shape[0] == 2 and seg.shape[1] == pytest.approx(native, abs=native * 0.01)
    # the segment is the same samples as the middle of the whole decode (seek + trim by timestamp,
    # exact to the container's time base: 1 ms in webm)
    whole, _ = audio.load_audio(path, mono=False)
    mid = seg[:, native // 10 : native // 10 * 9]
    tol = native // 1000
    errors = {
        k: float((whole[:, native + native // 10 + k :][:, : mid.shape[1]] - mid).abs().max())
        for k in range(-tol, tol + 1)
    }
    assert min(errors.values()) < 1e-4
    # the channels survive (right channel at half the amplitude of the left)
    assert float(seg[1].abs().max()) == pytest.approx(float(seg[0].abs().max()) / 2, rel=0.1)

    # The same bytes from memory (e.g. read from S3).
    wav2, _ = audio.decode_bytes(path.read_bytes(), path.name, 24000)
    assert torch.allclose(wav, wav2)


def test_container_fallback_for_misnamed_file(container_files, tmp_path):
    # A user's download saved as .mp3 that is really AAC-in-mp4: soundfile rejects it, PyAV reads it.
    path = tmp_path / "really_m4a.mp3"
    path.write_bytes(container_files["m4a"].read_bytes())
    wav, sr = audio.load_audio(path)
    assert sr == 44100 and wav.shape[0] == pytest.approx(3 * 44100, abs=2000)
    assert audio.duration_seconds(path) == pytest.approx(3.0, abs=0.05)


@pytest.mark.parametrize("name", ["broken.m4a", "broken.webm", "broken.mp3"])
def test_corrupt_container(tmp_path, name):
    # The same reason on every machine: nothing depends on an ffmpeg binary being installed.
    path = tmp_path / name
    path.write_bytes(b"\x00\x00\x00\x20ftypM4A " + os.urandom(2000))
    with pytest.raises(AudioError) as e:
        audio.load_audio(path)
    assert e.value.path == str(path) and "unreadable or corrupt" in e.value.reason
    with pytest.raises(AudioError, match="corrupt"):
        audio.decode_bytes(path.read_bytes(), name)
    with pytest.raises(AudioError, match="corrupt"):
        audio.duration_seconds(path)


# ----------------------------------------------------------------------------- errors


def test_error_type_names_file_and_reason(tmp_path):
    e = AudioError(tmp_path / "x.wav", "silent audio")
    assert str(e) == f"{tmp_path / 'x.wav'}: silent audio" and e.reason == "silent audio"
    e2 = pickle.loads(pickle.dumps(e))  # crosses Ray process boundaries
    assert (e2.path, e2.reason) == (e.path, e.reason)


def test_missing_file(tmp_path):
    path = tmp_path / "missing.wav"
    with pytest.raises(AudioError, match="not found") as e:
        audio.load_audio(path)
    assert e.value.path == str(path)
    with pytest.raises(AudioError, match="not found"):
        audio.duration_seconds(path)
    with pytest.raises(AudioError, match="directory"):
        audio.load_audio(tmp_path)


@pytest.mark.parametrize("name", ["noise.wav", "noise.flac", "noise.mp3", "noise.ogg"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AudioError) as e:
        audio.load_audio(path)
    assert str(path) in str(e.value)


def test_truncated_header(tmp_path):
    good = tmp_path / "good.flac"
    sf.write(good, tone(16000, 1.0), 16000)
    bad = tmp_path / "bad.flac"
    bad.write_bytes(good.read_bytes()[:30])
    with pytest.raises(AudioError):
        audio.load_audio(bad)


def test_empty_files(tmp_path):
    zero_bytes = tmp_path / "zero.wav"
    zero_bytes.write_bytes(b"")
    with pytest.raises(AudioError, match="empty"):
        audio.load_audio(zero_bytes)
    with pytest.raises(AudioError, match="empty"):
        audio.decode_bytes(b"", "x.flac")
    no_samples = tmp_path / "nosamples.wav"
    sf.write(no_samples, np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(AudioError, match="no samples"):
        audio.load_audio(no_samples)


def test_silent_file(tmp_path):
    path = tmp_path / "silence.flac"
    sf.write(path, np.zeros(16000, np.float32), 16000)
    with pytest.raises(AudioError, match="silent") as e:
        audio.load_audio(path)
    assert e.value.path == str(path)
    wav, _ = audio.load_audio(path, allow_silent=True, loudness_lufs=-23.0)  # opt-out; no division by zero
    assert wav.abs().max() == 0
    quiet = torch.from_numpy(tone(16000, 1.0, amp=1e-4)[:, 0])
    assert audio.is_silent(quiet) and not audio.is_silent(quiet * 1000)


# ----------------------------------------------------------------------------- transforms


def test_mono_and_resample():
    stereo = torch.stack([torch.ones(100), torch.zeros(100)])
    assert torch.allclose(audio.to_mono(stereo), torch.full((100,), 0.5))
    left = stereo[0]
    assert audio.to_mono(left) is left
    x = torch.from_numpy(tone(44100, 1.0)[:, 0])
    assert audio.resample(x, 44100, 44100) is x
    y = audio.resample(x, 44100, 24000)
    assert y.shape == (24000,) and abs(dominant_hz(y, 24000) - 440) < 2


def test_loudness_matches_torchaudio_and_normalizes():
    import torchaudio.functional as AF

    sr = 8000  # small, because torchaudio's filter is a Python loop without its C extension
    x = torch.from_numpy(tone(sr, 0.6, 2, freq=300, amp=0.2).T.copy())
    assert audio.loudness(x, sr) == pytest.approx(AF.loudness(x, sr).item(), abs=0.05)

    y = audio.normalize_loudness(x, sr, -23.0)
    assert audio.loudness(y, sr) == pytest.approx(-23.0, abs=0.01)
    loud = audio.normalize_loudness(x, sr, 0.0)  # would clip: the peak limit holds it back
    assert loud.abs().max() <= audio.PEAK_LIMIT + 1e-6
    short = torch.from_numpy(tone(sr, 0.1, amp=0.1)[:, 0])  # shorter than one 400 ms block
    assert audio.loudness(audio.normalize_loudness(short, sr, -20.0), sr) == pytest.approx(-20.0, abs=0.01)


def test_load_with_loudness(tmp_path):
    path = tmp_path / "x.wav"
    sf.write(path, tone(24000, 2.0, amp=0.02), 24000)
    wav, sr = audio.load_audio(path, loudness_lufs=-14.0)
    assert audio.loudness(wav, sr) == pytest.approx(-14.0, abs=0.05)


def test_segment():
    sr = 100
    wav = torch.arange(1050, dtype=torch.float32)  # 10.5 s
    segs = audio.segment(wav, sr, 3.0)
    assert [(a, b) for a, b, _ in segs] == [(0.0, 3.0), (3.0, 6.0), (6.0, 9.0), (9.0, 10.5)]
    assert torch.equal(segs[1][2], wav[300:600])
    assert len(audio.segment(wav, sr, 3.0, min_seconds=2.0)) == 3  # 1.5 s tail dropped
    assert audio.segment(wav[:50], sr, 3.0) == []  # 0.5 s clip < min_seconds
    stereo = torch.zeros(2, 650)
    assert [s.shape for _, _, s in audio.segment(stereo, sr, 3.0)] == [(2, 300), (2, 300)]  # 0.5 s tail dropped


def test_log_mel():
    cfg = MelConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=40)
    x = torch.from_numpy(tone(16000, 1.0)[:, 0])
    m = audio.log_mel(x, cfg)
    assert m.shape == (40, 16000 // 160 + 1) and torch.isfinite(m).all()
    batch = audio.log_mel(torch.stack([x, torch.zeros_like(x)]), cfg)
    assert batch.shape == (2, 40, 101)
    assert torch.allclose(batch[0], m, atol=1e-4)
    assert torch.isfinite(batch[1]).all() and batch[1].max() == pytest.approx(np.log(1e-5))
    # the transform is built once per config
    audio.log_mel(x, MelConfig(sample_rate=16000, n_fft=512, hop_length=160, n_mels=40))
    assert audio._mel_transform.cache_info().hits >= 2
    assert audio.log_mel(torch.zeros(24000), MelConfig()).shape == (128, 101)
