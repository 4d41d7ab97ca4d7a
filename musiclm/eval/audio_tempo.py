"""Tempo of audio against the BPM a caption asks for: a second, independent estimator and the scores.

The project's estimator, :func:`musiclm.data.music_analysis.estimate_tempo`, takes a log-mel
spectral-flux onset envelope, scores each tempo by its *autocorrelation* at lags of 1-4 beats and
folds the answer into one octave (57-114 BPM by default, so it cannot make octave errors there).
:func:`fourier_tempo` differs in every part, so agreement between the two is not one method twice:

* onset envelope: half-wave rectified first difference of **log energy in six octave bands**
  (Scheirer 1998's band split: < 200 Hz, 200-400, 400-800, 800-1600, 1600-3200, > 3200 Hz) at
  100 frames/s, summed over bands (no mel filterbank, no spectral flux per bin);
* periodicity: a **Fourier tempogram** (Grosche & Müller 2011) of the whole clip: the magnitude of
  the Hann-windowed envelope's DTFT at each candidate tempo (a zero-padded FFT read at a 0.1 BPM
  grid, so short clips still give a precise peak), with harmonic summation
  ``|X(b)| + |X(2b)|/2 + |X(3b)|/3 + |X(4b)|/4`` so the beat wins over its subdivisions;
* range: 40-240 BPM, **not folded**: half/double-time answers happen and are counted apart as
  octave errors.

:func:`tempo_agreement` scores estimates against caption BPMs the way the report prints them:
Spearman rank correlation, the share within 4 % and 8 % of the caption BPM (no octave folding),
and the share of octave errors (off by more than 4 %, but within 4 % of twice or half the BPM).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["band_onset_envelope", "fourier_tempo", "spearman", "tempo_agreement", "click_track"]

BAND_EDGES_HZ = (0.0, 200.0, 400.0, 800.0, 1600.0, 3200.0)  # six bands: the last runs to Nyquist


def _mono(wav) -> np.ndarray:
    x = np.asarray(wav.detach().cpu().numpy() if hasattr(wav, "detach") else wav, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0) if x.shape[0] < x.shape[1] else x.mean(axis=1)
    return x.reshape(-1)


def band_onset_envelope(wav, sr: int, fps: float = 100.0, window_seconds: float = 0.032) -> tuple[np.ndarray, float]:
    """(envelope [frames], frames per second): summed half-wave rectified log band-energy increases."""
    x = _mono(wav)
    hop = max(1, int(round(sr / fps)))
    n_fft = 1 << int(np.ceil(np.log2(max(16, window_seconds * sr))))
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    power = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)) ** 2  # [frames, bins]
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sr)
    edges = list(BAND_EDGES_HZ) + [sr / 2 + 1.0]
    bands = np.stack(
        [power[:, (freqs >= lo) & (freqs < hi)].sum(axis=1) for lo, hi in zip(edges[:-1], edges[1:])], axis=1
    )
    log_e = np.log1p(1e4 * bands / (bands.max() + 1e-12))
    env = np.maximum(np.diff(log_e, axis=0), 0.0).sum(axis=1)
    return np.concatenate([[0.0], env]), sr / hop


def fourier_tempo(
    wav, sr: int, min_bpm: float = 40.0, max_bpm: float = 240.0, harmonics: int = 4, step_bpm: float = 0.1
) -> float:
    """Tempo in BPM from the harmonic-summed Fourier tempogram of the band onset envelope (NaN for
    silence or clips shorter than 1 s). See the module docstring for how it differs from
    :func:`~musiclm.data.music_analysis.estimate_tempo`."""
    env, fps = band_onset_envelope(wav, sr)
    if len(env) < fps or not np.any(env > 0):
        return float("nan")
    env = (env - env.mean()) * np.hanning(len(env))
    # the DTFT on a fine frequency grid: a zero-padded FFT (bins of at most 0.05 BPM), read off by
    # linear interpolation at each candidate tempo and its harmonics
    n_fft = 1 << int(np.ceil(np.log2(max(len(env), fps * 60.0 / 0.05))))
    spectrum = np.abs(np.fft.rfft(env, n_fft))
    bin_bpm = fps * 60.0 / n_fft
    grid = np.arange(min_bpm, max_bpm + 1e-9, step_bpm)

    def magnitude(bpm: np.ndarray) -> np.ndarray:
        return np.interp(bpm / bin_bpm, np.arange(len(spectrum)), spectrum, right=0.0)

    score = sum(magnitude(grid * h) / h for h in range(1, harmonics + 1))
    i = int(np.argmax(score))
    best = grid[i]
    if 0 < i < len(grid) - 1:  # parabolic refinement around the grid maximum
        a, b, c = score[i - 1], score[i], score[i + 1]
        den = a - 2 * b + c
        if den < 0:
            best = grid[i] + step_bpm * 0.5 * (a - c) / den
    return float(best)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties averaged."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        m = x == v
        if m.sum() > 1:
            ranks[m] = ranks[m].mean()
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties averaged); NaN when fewer than 3 pairs or a constant side."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def _scores(pairs: np.ndarray, tol: float) -> dict:
    p, t = pairs[:, 0], pairs[:, 1]
    rel = np.abs(p - t) / t
    octave = np.minimum(np.abs(p - 2 * t) / (2 * t), np.abs(p - t / 2) / (t / 2))
    return {"rel": rel, "octave": (rel > tol) & (octave <= tol)}


def tempo_agreement(
    pred: Sequence[float], true: Sequence[float], n_boot: int = 1000, seed: int = 0, tolerances=(0.04, 0.08)
) -> dict:
    """Estimates ``pred`` against caption BPMs ``true`` (pairs with a NaN on either side are left out
    and counted): ``spearman``, ``within_4pct`` / ``within_8pct`` (share with ``|pred - bpm| <= tol *
    bpm``, no octave folding), ``octave_errors`` (share off by more than 4 % but within 4 % of twice
    or half the BPM), each ``{"value", "ci95"}`` with a bootstrap interval over pairs, and ``n``."""
    from musiclm.eval.stats import bootstrap_ci

    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    ok = np.isfinite(pred) & np.isfinite(true) & (true > 0)
    pairs = np.stack([pred[ok], true[ok]], axis=1)
    out: dict = {"n": int(ok.sum()), "missing": int((~ok).sum())}
    if not len(pairs):
        return out

    def share(tol: float):
        return lambda x: float(np.mean(_scores(x, tol)["rel"] <= tol))

    out["spearman"] = _ci(bootstrap_ci(lambda x: spearman(x[:, 0], x[:, 1]), pairs, n_boot=n_boot, seed=seed))
    for tol in tolerances:
        out[f"within_{round(tol * 100)}pct"] = _ci(bootstrap_ci(share(tol), pairs, n_boot=n_boot, seed=seed))
    out["octave_errors"] = _ci(
        bootstrap_ci(lambda x: float(np.mean(_scores(x, 0.04)["octave"])), pairs, n_boot=n_boot, seed=seed)
    )
    out["mean_abs_error_bpm"] = float(np.mean(np.abs(pairs[:, 0] - pairs[:, 1])))
    return out


def _ci(b: dict) -> dict:
    return {"value": b["value"], "ci95": b["ci95"], "n": b["n"][0]}


def click_track(bpm: float, seconds: float, sr: int = 16000, click_ms: float = 10.0, seed: int = 0) -> np.ndarray:
    """A test signal: a decaying noise click on every beat at ``bpm`` (float32 [seconds * sr])."""
    rng = np.random.default_rng(seed)
    x = np.zeros(int(round(seconds * sr)), dtype=np.float32)
    n = int(click_ms * 1e-3 * sr)
    click = (rng.standard_normal(n) * np.exp(-np.arange(n) / (n / 5))).astype(np.float32)
    period = 60.0 / bpm * sr
    k = 0
    while int(round(k * period)) < len(x):
        a = int(round(k * period))
        seg = click[: len(x) - a]
        x[a : a + len(seg)] += 0.5 * seg
        k += 1
    return x
