"""Music analysis of audio in numpy: log-mel spectrogram, onset strength and tempo, chroma and
scale fit; the pitch-class and scale tables the demo corpus synthesiser (``demo_corpus``) shares.

The demo corpus tests use it to check that labels are audible (:func:`estimate_tempo` within
2 BPM of ``bpm``, the labelled scale holding most of the chroma energy).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "PITCH_CLASSES",
    "SCALES",
    "chroma",
    "estimate_tempo",
    "log_mel_spectrogram",
    "scale_fit",
    "scale_share",
    "tempo_error",
]

# note name -> pitch class (C = 0), sharps and flats
PITCH_CLASSES = {"C": 0, "C#": 1, "Db": 1, "D": 2, "D#": 3, "Eb": 3, "E": 4, "F": 5, "F#": 6, "Gb": 6, "G": 7,
                 "G#": 8, "Ab": 8, "A": 9, "A#": 10, "Bb": 10, "B": 11}
# semitones above the tonic, per mode
SCALES = {"minor": (0, 2, 3, 5, 7, 8, 10), "major": (0, 2, 4, 5, 7, 9, 11)}



def _mel_filterbank(sr: int, n_fft: int, n_mels: int, fmin: float = 20.0, fmax: float | None = None) -> np.ndarray:
    fmax = fmax or sr / 2
    mel = lambda f: 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)  # noqa: E731
    imel = lambda m: 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)  # noqa: E731
    pts = imel(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, ce, hi = pts[:-2, None], pts[1:-1, None], pts[2:, None]
    fb = np.maximum(0.0, np.minimum((freqs - lo) / (ce - lo), (hi - freqs) / (hi - ce)))
    return fb


def _stft_mag(wav: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    x = np.asarray(wav, dtype=np.float64)
    if x.ndim > 1:
        x = x.mean(axis=0) if x.shape[0] < x.shape[-1] else x.mean(axis=1)
    x = np.pad(x, (n_fft // 2, n_fft // 2))
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    return np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)).T  # [freq, time]


def log_mel_spectrogram(wav: np.ndarray, sr: int, n_fft: int = 1024, hop: int = 240, n_mels: int = 80) -> np.ndarray:
    """log10 mel power spectrogram [n_mels, frames] (numpy only)."""
    mag = _stft_mag(wav, n_fft, hop)
    return np.log10(_mel_filterbank(sr, n_fft, n_mels) @ mag**2 + 1e-10)


def _onset_strength(wav: np.ndarray, sr: int, fps: float = 200.0) -> tuple[np.ndarray, float]:
    hop = max(1, int(round(sr / fps)))
    n_fft = 1 << int(round(math.log2(sr * 0.04)))
    mag = _stft_mag(wav, n_fft, hop)
    mel = np.log1p(1000.0 * (_mel_filterbank(sr, n_fft, 48) @ mag) / (mag.max() + 1e-12))
    flux = np.maximum(np.diff(mel, axis=1), 0.0).mean(axis=0)
    flux = np.concatenate([[0.0], flux])
    # remove the slowly varying part (local mean over ~0.4 s), keep the peaks
    k = max(3, int(0.4 * sr / hop) | 1)
    local = np.convolve(flux, np.ones(k) / k, mode="same")
    return np.maximum(flux - local, 0.0), sr / hop


def estimate_tempo(wav: np.ndarray, sr: int, min_bpm: float = 57.0, max_bpm: float | None = None) -> float:
    """Tempo in BPM from onset strength (spectral flux) and a comb over its autocorrelation.

    Each candidate tempo b in [min_bpm, max_bpm) is scored by the onset envelope's
    autocorrelation at lags of 1, 2, 3 and 4 beats (fractional lags interpolated). Patterns that
    repeat per beat or per bar peak at all of them, while subdivisions that mislead a single-lag
    pick (hats in 16ths or 32nds, 3-3-2 drill hats, triplet rolls) only line up with a few. The
    search spans one tempo octave (max_bpm defaults to 2 * min_bpm), which removes octave errors
    by construction: the answer is folded into that octave (double-time trap hats do not double
    the tempo). Compare with a label using :func:`tempo_error`, which also allows half/double.
    """
    max_bpm = 2.0 * min_bpm if max_bpm is None else max_bpm
    env, fps = _onset_strength(wav, sr)
    if env.size < 8 or not np.any(env > 0):
        return float("nan")
    # smooth a little (10 ms) so humanised onsets still line up, then autocorrelate via FFT
    g = np.exp(-0.5 * (np.arange(-4, 5) / (0.01 * fps)) ** 2)
    env = np.convolve(env, g / g.sum(), mode="same")
    env = env - env.mean()
    n = len(env)
    spec = np.fft.rfft(env, 2 * n)
    acf = np.fft.irfft(spec * np.conj(spec))[:n]
    acf = acf / (n - np.arange(n))  # unbiased
    acf = acf / (acf[0] + 1e-12)

    def score(bpms: np.ndarray) -> np.ndarray:
        period = 60.0 * fps / bpms
        total = np.zeros_like(bpms)
        for k in (1, 2, 3, 4):
            lag = k * period
            ok = lag < 0.75 * n
            total += np.where(ok, np.interp(lag, np.arange(n), acf), 0.0)
        return total

    coarse = np.arange(min_bpm, max_bpm, 0.1)
    best = coarse[int(np.argmax(score(coarse)))]
    fine = np.arange(max(min_bpm, best - 0.2), min(max_bpm, best + 0.2), 0.01)
    if len(fine):
        best = fine[int(np.argmax(score(fine)))]
    return float(best)


def chroma(wav: np.ndarray, sr: int, fmin: float = 130.0, fmax: float = 2000.0) -> np.ndarray:
    """Mean 12-bin pitch-class profile (C first) of the tonal part of a clip.

    STFT with ~6 Hz bins; a median over neighbouring frames keeps sustained partials and drops
    drum hits, and only spectral peaks count, each on its nearest pitch class.
    """
    n_fft = 1 << int(round(math.log2(sr * 0.17)))
    hop = n_fft // 4
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    band = np.flatnonzero((freqs >= fmin * 0.9) & (freqs <= fmax * 1.1))
    mag = _stft_mag(wav, n_fft, hop)[band[0] - 1: band[-1] + 2]
    freqs = freqs[band[0] - 1: band[-1] + 2]
    k = 5
    if mag.shape[1] >= k:  # median over time = harmonic part (HPSS-style)
        win = np.lib.stride_tricks.sliding_window_view(np.pad(mag, ((0, 0), (k // 2, k // 2)), mode="edge"), k, axis=1)
        mag = np.median(win, axis=-1)
    peak = (mag[1:-1] > mag[:-2]) & (mag[1:-1] >= mag[2:])
    m = np.zeros_like(mag)
    m[1:-1] = np.where(peak, mag[1:-1], 0.0)
    keep = (freqs >= fmin) & (freqs <= fmax)
    pcs = (np.round(12 * np.log2(freqs[keep] / 440.0)).astype(int) + 9) % 12
    prof = np.zeros(12)
    np.add.at(prof, pcs, m[keep].sum(axis=1))
    return prof / (prof.sum() + 1e-12)


def scale_fit(wav: np.ndarray, sr: int, key: str, mode: str) -> float:
    """Share of the clip's tonal chroma that lies in the scale of `key` `mode` (0..1).

    Relative keys (D minor / F major) share a scale and score alike; a clip in the labelled key
    scores about 0.8-1 and above nearly every other transposition.
    """
    return scale_share(chroma(wav, sr), key, mode)


def scale_share(chroma_12: np.ndarray, key: str, mode: str) -> float:
    """Share of a 12-bin chroma (C first) in the scale of `key` `mode`."""
    pc = PITCH_CLASSES[key]
    return float(np.asarray(chroma_12)[[(pc + d) % 12 for d in SCALES[mode]]].sum())


def tempo_error(estimate: float, reference: float, octave: bool = True) -> float:
    """Absolute BPM error; with `octave`, the smallest over estimate x {1/2, 1, 2}."""
    factors = (0.5, 1.0, 2.0) if octave else (1.0,)
    return float(min(abs(estimate * f - reference) for f in factors))
