"""Synthetic demo corpus: instrumental hip-hop beats with captions and attribute labels.

A stand-in for a user's corpus of rap instrumentals that we cannot ship. Each clip is a short
beat synthesised in numpy (kick, snare/clap/rim, hi-hats with rolls, 808 or bass on the chord
roots, one melodic layer: Rhodes, piano, pad, pluck, strings or bells) from attributes drawn per
clip: tempo (60-110 BPM), swing, key and mode, chord progression, drum style (boom bap, trap,
lo-fi, drill), mood and instruments. The caption is written from the attributes in varied
wording, and the attributes are stored as manifest fields so evaluation can check them
(e.g. :func:`musiclm.data.music_analysis.estimate_tempo` against ``bpm``).

Trap and drill are labelled at their half-time tempo (a "140 BPM" trap beat is labelled 70 BPM:
clap on beats 2 and 4, hats in 16ths, rolls in 32nds and triplets), so every style lies in
60-110 BPM and one tempo octave.

Everything is deterministic: clip ``i`` of a corpus depends only on ``(seed, i)``.

    python -m musiclm.data.demo_corpus --out data/rapbeats --clips 1000 --seed 0 --workers 2
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import time
from collections import Counter

import numpy as np
from scipy.signal import butter, fftconvolve, sosfilt

from musiclm.data import storage
from musiclm.data.music_analysis import PITCH_CLASSES, SCALES, estimate_tempo, log_mel_spectrogram

__all__ = [
    "STYLES",
    "KEYS",
    "MODES",
    "MOODS",
    "LEADS",
    "sample_attributes",
    "synthesize",
    "caption",
    "clip_id",
    "make_clip",
    "generate_corpus",
    "plot_spectrograms",
    "main",
]

# --------------------------------------------------------------------------------------------
# Attribute vocabulary
# --------------------------------------------------------------------------------------------

STYLES = ("boom bap", "trap", "lo-fi", "drill")
# key names as musicians spell them, per mode (pitch class 0 = C)
KEY_NAMES = {
    "minor": ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B"),
    "major": ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"),
}
KEYS = tuple(sorted(set(KEY_NAMES["minor"]) | set(KEY_NAMES["major"]), key=lambda k: (PITCH_CLASSES[k], k)))
_SHARP_NAMES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
_FLAT_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")


def _spelling(key_pc: int, mode: str) -> tuple:
    major_pc = (key_pc + 3) % 12 if mode == "minor" else key_pc
    return _FLAT_NAMES if major_pc in (0, 5, 10, 3, 8, 1, 6) else _SHARP_NAMES
MODES = ("minor", "major")
MOODS = (
    "dark", "mellow", "melancholic", "chill", "uplifting", "aggressive",
    "dreamy", "nostalgic", "eerie", "triumphant", "warm", "soulful",
)
LEADS = ("rhodes", "piano", "pad", "pluck", "strings", "bells")

_STYLE_BPM = {"boom bap": (80, 110), "lo-fi": (60, 90), "trap": (60, 88), "drill": (62, 76)}
_STYLE_SWING = {"boom bap": (0.12, 0.33), "lo-fi": (0.15, 0.35), "trap": (0.0, 0.06), "drill": (0.0, 0.05)}
_STYLE_MOODS = {
    "boom bap": {"nostalgic": 3, "soulful": 3, "dark": 2, "mellow": 2, "melancholic": 2, "triumphant": 1, "warm": 2},
    "lo-fi": {"mellow": 3, "chill": 3, "dreamy": 2, "nostalgic": 2, "melancholic": 2, "warm": 2},
    "trap": {"dark": 3, "aggressive": 2, "eerie": 2, "melancholic": 2, "triumphant": 1, "uplifting": 1, "dreamy": 1},
    "drill": {"dark": 3, "aggressive": 3, "eerie": 2, "melancholic": 1},
}
_MOOD_MINOR_P = {
    "dark": 1.0, "aggressive": 1.0, "eerie": 1.0, "melancholic": 1.0,
    "uplifting": 0.0, "triumphant": 0.0, "warm": 0.0,
    "mellow": 0.5, "chill": 0.5, "dreamy": 0.5, "nostalgic": 0.6, "soulful": 0.5,
}
_STYLE_LEADS = {
    "boom bap": {"piano": 3, "rhodes": 3, "strings": 2, "pluck": 1},
    "lo-fi": {"rhodes": 4, "piano": 3, "pad": 2, "pluck": 2},
    "trap": {"bells": 3, "pluck": 2, "pad": 2, "piano": 2, "strings": 1},
    "drill": {"strings": 3, "piano": 2, "bells": 2, "pad": 1},
}
_STYLE_808_P = {"boom bap": 0.3, "lo-fi": 0.15, "trap": 1.0, "drill": 1.0}
_STYLE_SNARES = {
    "boom bap": {"snare": 7, "clap": 1.5, "rim": 1.5},
    "lo-fi": {"snare": 4, "rim": 4, "clap": 2},
    "trap": {"clap": 7, "snare": 3},
    "drill": {"snare": 8, "clap": 2},
}
_STYLE_ROLLS_P = {"boom bap": 0.0, "lo-fi": 0.05, "trap": 0.9, "drill": 0.6}
_STYLE_VINYL_P = {"boom bap": 0.35, "lo-fi": 0.85, "trap": 0.0, "drill": 0.0}
_STYLE_SLIDES_P = {"boom bap": 0.0, "lo-fi": 0.0, "trap": 0.4, "drill": 0.85}
# brightness (melodic low-pass cutoff, Hz) and reverb send per mood
_MOOD_CUTOFF = {
    "dark": 1800, "eerie": 2600, "melancholic": 2400, "mellow": 2200, "chill": 2800, "dreamy": 3400,
    "nostalgic": 2600, "aggressive": 5000, "uplifting": 6500, "triumphant": 6000, "warm": 2600, "soulful": 3000,
}
_MOOD_REVERB = {
    "dark": 0.25, "eerie": 0.45, "melancholic": 0.3, "mellow": 0.25, "chill": 0.25, "dreamy": 0.5,
    "nostalgic": 0.3, "aggressive": 0.12, "uplifting": 0.25, "triumphant": 0.3, "warm": 0.2, "soulful": 0.25,
}

# progressions as 0-based scale degrees, one chord per bar
_PROGRESSIONS = {
    "minor": ((0, 5, 2, 6), (0, 3, 5, 4), (0, 6, 5, 6), (0, 3, 0, 4), (0, 5, 3, 4), (0, 0, 5, 5), (0, 3, 6, 2)),
    "major": ((0, 4, 5, 3), (0, 5, 3, 4), (1, 4, 0, 5), (3, 4, 2, 5), (0, 3, 1, 4), (0, 2, 3, 4)),
}
_ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII")
_JAZZY = {"boom bap", "lo-fi"}  # seventh chords


def _weighted(rng: np.random.Generator, table: dict) -> str:
    names = list(table)
    w = np.asarray([table[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=w / w.sum()))]


def _chord_pcs(key_pc: int, mode: str, degree: int, seventh: bool) -> list[int]:
    """Pitch classes (root first) of the diatonic triad or seventh chord on scale `degree`."""
    scale = SCALES[mode]
    n = 4 if seventh else 3
    pcs = [(key_pc + scale[(degree + 2 * j) % 7]) % 12 for j in range(n)]
    return pcs


def _progression_pcs(key_pc: int, mode: str, degrees, seventh: bool) -> list[list[int]]:
    """Chords of a progression; in minor, v becomes V (raised leading tone) before the tonic."""
    chords = [_chord_pcs(key_pc, mode, d, seventh) for d in degrees]
    if mode == "minor":
        for i, d in enumerate(degrees):
            if d == 4 and degrees[(i + 1) % len(degrees)] == 0:
                chords[i] = [(pc + 1) % 12 if j == 1 else pc for j, pc in enumerate(chords[i])]
    return chords


def _chord_quality(pcs: list[int]) -> str:
    third = (pcs[1] - pcs[0]) % 12
    fifth = (pcs[2] - pcs[0]) % 12
    if third == 4:
        q = "maj"
    elif fifth == 6:
        q = "dim"
    else:
        q = "min"
    return q


def _chord_name(pcs: list[int], names: tuple = None) -> str:
    root = (names or _FLAT_NAMES)[pcs[0]]
    q = _chord_quality(pcs)
    if len(pcs) == 3:
        return root + {"maj": "", "min": "m", "dim": "dim"}[q]
    sev = (pcs[3] - pcs[0]) % 12
    if q == "maj":
        return root + ("maj7" if sev == 11 else "7")
    if q == "dim":
        return root + ("m7b5" if sev == 10 else "dim7")
    return root + "m7"


def _roman(degree: int, pcs: list[int]) -> str:
    q = _chord_quality(pcs)
    r = _ROMAN[degree]
    return r if q == "maj" else (r.lower() + ("°" if q == "dim" else ""))


def sample_attributes(rng: np.random.Generator) -> dict:
    """Draw the musical attributes of one clip (JSON-serialisable)."""
    style = STYLES[int(rng.integers(len(STYLES)))]
    mood = _weighted(rng, _STYLE_MOODS[style])
    mode = "minor" if rng.random() < _MOOD_MINOR_P[mood] else "major"
    key_pc = int(rng.integers(12))
    lo, hi = _STYLE_BPM[style]
    bpm = int(rng.integers(lo, hi + 1))
    swing = round(float(rng.uniform(*_STYLE_SWING[style])), 2)
    lead = _weighted(rng, _STYLE_LEADS[style])
    bass = "808" if rng.random() < _STYLE_808_P[style] else "bass"
    snare = _weighted(rng, _STYLE_SNARES[style])
    hat_rolls = bool(rng.random() < _STYLE_ROLLS_P[style])
    vinyl = bool(rng.random() < _STYLE_VINYL_P[style])
    slides = bool(bass == "808" and rng.random() < _STYLE_SLIDES_P[style])
    progs = _PROGRESSIONS[mode]
    degrees = progs[int(rng.integers(len(progs)))]
    seventh = style in _JAZZY
    chords, romans = [], []
    for d, pcs in zip(degrees, _progression_pcs(key_pc, mode, degrees, seventh)):
        chords.append(_chord_name(pcs, _spelling(key_pc, mode)))
        romans.append(_roman(d, pcs))
    instruments = ["kick", snare, "hi-hats", bass, lead] + (["vinyl crackle"] if vinyl else [])
    return {
        "bpm": bpm,
        "key": KEY_NAMES[mode][key_pc],
        "mode": mode,
        "style": style,
        "mood": mood,
        "swing": swing,
        "lead": lead,
        "bass": bass,
        "snare": snare,
        "hat_rolls": hat_rolls,
        "slides": slides,
        "vinyl": vinyl,
        "progression": "-".join(romans),
        "degrees": list(degrees),
        "chords": chords,
        "instruments": instruments,
    }


# --------------------------------------------------------------------------------------------
# DSP helpers (vectorised numpy)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=256)
def _sos(kind: str, freq, sr: int, order: int) -> np.ndarray:
    nyq = sr / 2
    if kind == "bandpass":
        lo, hi = freq
        return butter(order, [lo, min(hi, 0.95 * nyq)], btype="bandpass", fs=sr, output="sos")
    return butter(order, min(freq, 0.95 * nyq), btype=kind, fs=sr, output="sos")


def _filt(x: np.ndarray, kind: str, freq, sr: int, order: int = 2) -> np.ndarray:
    freq = tuple(float(f) for f in freq) if kind == "bandpass" else float(freq)
    return sosfilt(_sos(kind, freq, int(sr), order), x)


def _midi_hz(m):
    return 440.0 * 2.0 ** ((np.asarray(m, dtype=float) - 69.0) / 12.0)


def _saw_blep(freq: np.ndarray | float, n: int, sr: int, phase0: float = 0.0) -> np.ndarray:
    """Band-limited (polyBLEP) sawtooth; `freq` scalar or per-sample array."""
    dt = np.broadcast_to(np.asarray(freq, dtype=np.float32) / np.float32(sr), (n,))
    ph = np.cumsum(dt, dtype=np.float64)
    ph = ((ph + phase0) % 1.0).astype(np.float32)
    y = 2.0 * ph - 1.0
    m = ph < dt
    x = ph[m] / dt[m]
    y[m] -= x + x - x * x - 1.0
    m = ph > 1.0 - dt
    x = (ph[m] - 1.0) / dt[m]
    y[m] -= x * x + x + x + 1.0
    return y


def _release(t: np.ndarray, dur: float, tau: float) -> np.ndarray:
    return np.where(t < dur, 1.0, np.exp(-np.maximum(t - dur, 0.0) / tau))


def _attack(t: np.ndarray, a: float) -> np.ndarray:
    return np.minimum(t / a, 1.0)


def _fade_tail(x: np.ndarray, sr: int, ms: float = 5.0) -> np.ndarray:
    k = min(len(x), int(sr * ms / 1000))
    if k > 1:
        x[-k:] *= np.linspace(1.0, 0.0, k)
    return x


def _add(buf: np.ndarray, x: np.ndarray, start: int) -> None:
    if start >= len(buf):
        return
    if start < 0:
        x = x[-start:]
        start = 0
    end = min(len(buf), start + len(x))
    buf[start:end] += x[: end - start]


# --------------------------------------------------------------------------------------------
# Drum one-shots
# --------------------------------------------------------------------------------------------

def _kick(sr: int, rng: np.random.Generator, style: str) -> np.ndarray:
    decay = {"boom bap": 0.22, "lo-fi": 0.2, "trap": 0.3, "drill": 0.26}[style]
    t = np.arange(int(0.7 * sr)) / sr
    f_end = rng.uniform(45, 58)
    f_start = rng.uniform(150, 230)
    f = f_end + (f_start - f_end) * np.exp(-t / rng.uniform(0.025, 0.045))
    body = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.exp(-t / decay)
    click = _filt(rng.standard_normal(len(t)), "highpass", 1500, sr) * np.exp(-t / 0.004) * 0.25
    x = np.tanh(1.6 * (body + click)) * _attack(t, 0.001)
    return _fade_tail(x / np.abs(x).max(), sr, 20)


def _snare(sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.4 * sr)) / sr
    f0 = rng.uniform(170, 230)
    tone = 0.6 * np.sin(2 * np.pi * f0 * t) * np.exp(-t / 0.05) + 0.3 * np.sin(2 * np.pi * 1.7 * f0 * t) * np.exp(-t / 0.03)
    noise = _filt(rng.standard_normal(len(t)), "bandpass", (1200, 9000), sr) * np.exp(-t / rng.uniform(0.09, 0.15))
    x = (tone + 1.2 * noise) * _attack(t, 0.0008)
    return _fade_tail(x / np.abs(x).max(), sr, 20)


def _clap(sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.45 * sr)) / sr
    env = np.zeros_like(t)
    for k, t0 in enumerate((0.0, 0.011, 0.022)):
        env += np.where(t >= t0, np.exp(-np.maximum(t - t0, 0) / 0.005), 0.0) * (0.8 if k < 2 else 1.0)
    env += np.where(t >= 0.026, np.exp(-np.maximum(t - 0.026, 0) / rng.uniform(0.09, 0.14)), 0.0) * 0.7
    x = _filt(rng.standard_normal(len(t)), "bandpass", (900, 6000), sr) * env
    return _fade_tail(x / np.abs(x).max(), sr, 20)


def _rim(sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.15 * sr)) / sr
    x = np.sin(2 * np.pi * rng.uniform(1600, 1900) * t) * np.exp(-t / 0.015)
    x += 0.8 * _filt(rng.standard_normal(len(t)), "bandpass", (1500, 5000), sr) * np.exp(-t / 0.01)
    x *= _attack(t, 0.0005)
    return _fade_tail(x / np.abs(x).max(), sr)


def _hat(sr: int, rng: np.random.Generator, decay: float, highpass: float = 6500.0) -> np.ndarray:
    t = np.arange(int(min(1.0, 6 * decay) * sr)) / sr
    scale = rng.uniform(1.7, 2.3)
    metal = sum(np.sign(np.sin(2 * np.pi * f * scale * t + rng.uniform(0, 6.28)))
                for f in (205.3, 304.4, 369.6, 522.7, 540.0, 800.0))
    x = 0.5 * metal / 6 + 0.5 * rng.standard_normal(len(t))
    x = _filt(x, "highpass", highpass, sr, order=4) * np.exp(-t / decay) * _attack(t, 0.0005)
    return _fade_tail(x / np.abs(x).max(), sr)


# --------------------------------------------------------------------------------------------
# Melodic voices: each returns one note (onset at index 0) including its release tail
# --------------------------------------------------------------------------------------------

# (release tail seconds, release time constant, attack seconds) per instrument
_VOICE_ENV = {
    "rhodes": (0.3, 0.07, 0.003), "piano": (0.25, 0.06, 0.002), "pad": (0.6, 0.15, 0.25),
    "strings": (0.35, 0.09, 0.12), "pluck": (0.1, 0.03, 0.002), "bells": (0.8, 0.2, 0.002),
}
_MAX_NOTE = 3.0  # decaying instruments are silent enough after this many seconds


def _voice_base(inst: str, f: float, seconds: float, vel: float, sr: int, rng: np.random.Generator,
                fmax: float | None = None) -> np.ndarray:
    """The sustained sound of one note (float32, no attack/release): cached and cut per note.

    Partials above `fmax` (the melodic stem's low-pass) are not rendered.
    """
    nyq = min(sr / 2, fmax or sr / 2)
    n = int(seconds * sr)
    t = np.arange(n, dtype=np.float32) / np.float32(sr)
    if inst == "rhodes":
        index = (0.6 + 1.6 * vel) * np.exp(-t / 0.3)
        x = np.sin(2 * np.pi * f * t + index * np.sin(2 * np.pi * f * t))
        if 7 * f < 0.9 * nyq:
            x += 0.15 * vel * np.sin(2 * np.pi * 7 * f * t) * np.exp(-t / 0.04)
        x *= (1 + 0.12 * np.sin(2 * np.pi * 4.5 * t)) * np.exp(-t / 1.8)
    elif inst == "piano":
        k = np.arange(1, 11)
        fk = f * k * np.sqrt(1 + 0.0004 * k**2)
        keep = fk < 0.9 * nyq
        k, fk = k[keep], fk[keep]
        amp = ((1.0 / k**1.3) * np.exp(-(k - 1) * (0.35 - 0.2 * vel))).astype(np.float32)
        w = (2 * np.pi * fk).astype(np.float32)
        phase = rng.uniform(0, 6.28, len(k)).astype(np.float32)
        # partial k decays with time constant 2.2 / (1 + 0.5 k): exp(-t/2.2) * exp(-t/4.4)^k
        d1, d2 = np.exp(-t / 2.2), np.exp(-t / 4.4)
        x = np.zeros(n, dtype=np.float32)
        dk = d1 * d2
        for j in range(len(k)):
            x += amp[j] * np.sin(w[j] * t + phase[j]) * dk
            dk *= d2
    elif inst in ("pad", "strings"):
        detunes = (-0.09, 0.0, 0.08) if inst == "pad" else (-0.05, 0.06)
        x = np.zeros(n, dtype=np.float32)
        for d in detunes:
            fv = f * 2 ** (d / 12)
            if inst == "strings":
                fv = fv * (1 + 0.004 * np.sin(2 * np.pi * rng.uniform(5, 6) * t + rng.uniform(0, 6.28)))
            x += _saw_blep(fv, n, sr, rng.uniform())
        x /= len(detunes)
    elif inst == "pluck":
        k = np.arange(1, 17)
        k = k[k * f < 0.9 * nyq].astype(np.float32)
        x = (1.0 / k) @ (np.sin((2 * np.pi * f) * k[:, None] * t[None, :])
                         * np.exp(-t[None, :] * (2.5 + 3.0 * k)[:, None]))
    elif inst == "bells":
        ratio = 3.0 if 4.0 * f < nyq else 1.0
        index = (1.0 + 2.0 * vel) * np.exp(-t / 0.25)
        x = np.sin(2 * np.pi * f * t + index * np.sin(2 * np.pi * ratio * f * t))
        x += 0.3 * np.sin(2 * np.pi * 2.0 * f * t) * np.exp(-t / 0.4)
        x *= np.exp(-t / 1.2)
    else:
        raise ValueError(f"unknown instrument {inst!r}")
    return x.astype(np.float32, copy=False)


def _render_notes(inst: str, notes: list[tuple], n: int, seconds: float, sr: int, rng: np.random.Generator,
                  fmax: float) -> np.ndarray:
    """Sum notes (t0, dur, midi, vel) into a buffer; one cached base sound per (pitch, velocity band)."""
    rel, rel_tau, att = _VOICE_ENV[inst]
    decaying = inst not in ("pad", "strings")
    band = lambda v: max(0.2, round(v * 5) / 5)  # noqa: E731
    live = [(t0, min(d, _MAX_NOTE) if decaying else d, m, v) for t0, d, m, v in notes
            if t0 < seconds and t0 + d + rel > 0]
    need: dict = {}
    for _, d, m, v in live:
        key = (m, band(v))
        need[key] = max(need.get(key, 0.0), d + rel)
    bases = {key: _voice_base(inst, float(_midi_hz(key[0])), sec, key[1], sr, rng, fmax)
             for key, sec in sorted(need.items())}
    out = np.zeros(n, dtype=np.float32)
    for t0, d, m, v in live:
        key = (m, band(v))
        length = int((d + rel) * sr)
        t = np.arange(length, dtype=np.float32) / np.float32(sr)
        env = _attack(t, min(att, 0.5 * d + 0.005)) * _release(t, d, rel_tau) * np.float32(v)
        _add(out, _fade_tail(bases[key][:length] * env, sr), int(round(t0 * sr)))
    return out


# --------------------------------------------------------------------------------------------
# Sequencing
# --------------------------------------------------------------------------------------------

class _Grid:
    """Maps (bar, 16th-note position, possibly fractional) to seconds with swing."""

    def __init__(self, bpm: float, swing: float, offset: float):
        self.sixteenth = 60.0 / bpm / 4
        self.swing = swing
        self.offset = offset

    def time(self, bar: int, pos: float) -> float:
        q = bar * 16 + pos
        eighth, frac = divmod(q, 2.0)
        s = self.swing
        # piecewise-linear warp inside each 8th: the off 16th lands `swing` of a 16th late
        w = frac * (1 + s) if frac <= 1.0 else (1 + s) + (frac - 1.0) * (1 - s)
        return (eighth * 2 + w) * self.sixteenth - self.offset


def _chord_voicing(pcs: list[int], low: int = 55) -> list[int]:
    """Closed voicing of the pitch classes inside [low, low + 12): inversions follow by themselves."""
    return sorted(low + ((pc - low) % 12) for pc in pcs)


def _bass_midi(pc: int) -> int:
    return 28 + ((pc - 28) % 12)  # E1 .. D#2


def _osc_line(notes: list[tuple], n: int, sr: int, *, glide: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Continuous-phase mono bass line: notes = (t_on, t_off, midi, vel, slide_in)."""
    if not notes:
        return np.zeros(n)
    kt, kv = [], []
    prev = None
    for t_on, _, midi, _, slide in notes:
        if prev is None:
            kt, kv = [t_on], [midi]
        elif slide:  # portamento from the previous note
            kt += [t_on, t_on + glide]
            kv += [prev, midi]
        else:
            kt += [t_on - 1e-4, t_on]
            kv += [prev, midi]
        prev = midi
    t = np.arange(n) / sr
    midi_t = np.interp(t, kt, kv)
    ph = ((2 * np.pi / sr) * np.cumsum(_midi_hz(midi_t)) % (2 * np.pi)).astype(np.float32)
    env = np.zeros(n, dtype=np.float32)
    for t_on, t_off, _, vel, _ in notes:
        a = max(0, int(t_on * sr))
        rel = 0.05
        b = min(n, int((t_off + 6 * rel) * sr))
        if b <= a:
            continue
        tt = (np.arange(a, b) / sr - t_on).astype(np.float32)
        if kind == "808":
            e = np.exp(-tt / 1.1)
            e *= _attack(np.maximum(tt, 0), 0.004)
        else:
            e = 0.45 + 0.55 * np.exp(-tt / 0.25)
            e *= _attack(np.maximum(tt, 0), 0.008)
        e *= _release(tt, t_off - t_on, rel)
        env[a:b] += vel * e
    if kind == "808":
        x = np.sin(ph) + 0.12 * np.sin(2 * ph)
        drive = rng.uniform(1.3, 2.5)
        x = np.tanh(drive * x * env) / np.tanh(drive)
    else:
        s1, c1 = np.sin(ph), np.cos(ph)
        s2, c2 = 2 * s1 * c1, 1 - 2 * s1 * s1
        x = (s1 + 0.45 * s2 + 0.25 * (s1 * c2 + c1 * s2) + 0.1 * (2 * s2 * c2)) * env
        x = _filt(x, "lowpass", 900, sr)
    return x.astype(np.float64)


def synthesize(attrs: dict, seconds: float = 10.0, sample_rate: int = 24000, seed: int = 0,
               _stems: dict | None = None) -> np.ndarray:
    """Render one beat from its attributes. Returns float32 mono, peak-normalised to -1 dBFS.

    The attributes fix what a caption can name (tempo, swing, key, mode, chords, style, mood,
    instruments); `seed` draws the rest (drum patterns, sound design, melody motif, humanisation
    and where in the loop the clip starts).
    """
    sr = int(sample_rate)
    rng = np.random.default_rng(seed)
    style, bpm, swing = attrs["style"], float(attrs["bpm"]), float(attrs["swing"])
    key_pc = PITCH_CLASSES[attrs["key"]]
    mode = attrs["mode"]
    beat = 60.0 / bpm
    bar_s = 4 * beat
    offset = float(rng.uniform(0, min(bar_s, 2.0)))
    grid = _Grid(bpm, swing, offset)
    n = int(round(seconds * sr))
    n_bars = int(math.ceil((seconds + offset) / bar_s)) + 1
    jitter = {"boom bap": 0.006, "lo-fi": 0.009, "trap": 0.0015, "drill": 0.002}[style]

    def when(bar, pos, humanise=True):
        return grid.time(bar, pos) + (rng.normal(0, jitter) if humanise else 0.0)

    # ---------------- drums ----------------
    kick_s = _kick(sr, rng, style)
    snare_s = {"snare": _snare, "clap": _clap, "rim": _rim}[attrs["snare"]](sr, rng)
    hat_hp = 4500.0 if style == "lo-fi" or attrs["vinyl"] else 6500.0
    hats = [_hat(sr, rng, rng.uniform(0.025, 0.045), hat_hp) for _ in range(2)]
    open_hat = _hat(sr, rng, rng.uniform(0.18, 0.3), hat_hp)
    kick_bus, snare_bus, hat_bus = np.zeros(n), np.zeros(n), np.zeros(n)

    kick_pats = {
        "boom bap": ([0, 10], [0, 7, 10], [0, 3, 10], [0, 10, 13], [0, 6, 9, 10]),
        "lo-fi": ([0, 10], [0, 7, 10], [0, 9], [0, 6, 10]),
        "trap": ([0, 7, 10], [0, 3, 10, 14], [0, 6, 11], [0, 2, 10, 11]),
        "drill": ([0, 10], [0, 7], [0, 11, 14], [0, 3, 10]),
    }[style]
    kick_a = list(kick_pats[int(rng.integers(len(kick_pats)))])
    kick_b = list(kick_pats[int(rng.integers(len(kick_pats)))])  # turnaround every 4th bar
    snare_pos = [4, 12]
    ghost = {"boom bap": [7, 15], "lo-fi": [15], "trap": [], "drill": []}[style]
    ghost_pos = [g for g in ghost if rng.random() < 0.5]
    if style == "drill" and rng.random() < 0.7:  # the syncopated extra drill snare
        ghost_pos = [int(rng.choice([11, 14]))]
    if style in ("boom bap", "lo-fi"):
        hat_pos = list(range(0, 16, 2)) if rng.random() < 0.6 else list(range(16))
    elif style == "trap":
        hat_pos = list(range(16))
    else:  # drill: 3-3-2 skippy pattern in 32nds, per beat
        hat_pos = [b * 4 + p for b in range(4) for p in (0.0, 1.5, 3.0)]
    open_pos = 14 if (style in ("boom bap", "lo-fi") and rng.random() < 0.4) else None

    kick_times = []
    for bar in range(n_bars):
        kp = kick_b if bar % 4 == 3 else kick_a
        for p in kp:
            t = when(bar, p)
            kick_times.append((t, bar, p))
            _add(kick_bus, kick_s * rng.uniform(0.85, 1.0), int(t * sr))
        for p in snare_pos:
            _add(snare_bus, snare_s * rng.uniform(0.9, 1.0), int(when(bar, p) * sr))
        for p in ghost_pos:
            v = rng.uniform(0.6, 0.8) if style == "drill" else rng.uniform(0.2, 0.35)
            _add(snare_bus, snare_s * v, int(when(bar, p) * sr))
        # hats, with rolls replacing some beats
        roll_beats = set()
        if attrs["hat_rolls"]:
            roll_beats = {int(b) for b in rng.choice(4, size=int(rng.integers(1, 3)), replace=False)}
        for p in hat_pos:
            if int(p // 4) in roll_beats or p == open_pos:
                continue
            accent = 1.0 if p % 4 == 0 else (0.75 if p % 2 == 0 else 0.55)
            v = accent * rng.uniform(0.8, 1.0)
            _add(hat_bus, hats[int(rng.integers(2))] * v, int(when(bar, p) * sr))
        for b in roll_beats:
            # half or whole beat rolls in 32nds, 16th triplets or (slow tempos) 64ths
            div = int(rng.choice([8, 6, 16] if bpm < 75 else [8, 6]))
            span = 1.0 if rng.random() < 0.6 else 0.5
            start = 4 * b + (0 if span == 1.0 else 2 * int(rng.integers(2)))
            count = int(div * span)
            ramp = np.linspace(0.45, 1.0, count) if rng.random() < 0.5 else np.linspace(1.0, 0.6, count)
            for j in range(count):
                p = start + 4.0 * j / div
                _add(hat_bus, hats[j % 2] * ramp[j] * 0.8, int(when(bar, p, humanise=False) * sr))
        if open_pos is not None:
            _add(hat_bus, open_hat * 0.6, int(when(bar, open_pos) * sr))

    # ---------------- harmony ----------------
    seventh = style in _JAZZY
    degrees = attrs.get("degrees") or [0, 5, 2, 6]
    chord_pcs = _progression_pcs(key_pc, mode, degrees, seventh)

    def chord_of(bar):
        return chord_pcs[bar % len(chord_pcs)]

    # ---------------- bass / 808 ----------------
    bass_notes = []
    if attrs["bass"] == "808":
        # 808 follows the kick, on the chord root (sometimes the octave), legato until the next hit
        for j, (t, bar, p) in enumerate(kick_times):
            root = _bass_midi(chord_of(bar)[0])
            midi = root + (12 if (p >= 10 and rng.random() < 0.25) else 0)
            t_next = kick_times[j + 1][0] if j + 1 < len(kick_times) else t + bar_s
            slide = bool(attrs["slides"] and j > 0 and rng.random() < 0.5)
            bass_notes.append((t, t_next - 0.01, midi, rng.uniform(0.85, 1.0), slide))
        bass = _osc_line(bass_notes, n, sr, glide=0.07, kind="808", rng=rng)
    else:
        for bar in range(n_bars):
            kp = kick_b if bar % 4 == 3 else kick_a
            pos = sorted(set(kp) | {0, 8})
            root = _bass_midi(chord_of(bar)[0])
            fifth = root + 7 if root + 7 <= 45 else root - 5
            for i, p in enumerate(pos):
                nxt = pos[i + 1] if i + 1 < len(pos) else 16
                midi = root if p in (0, 8) or rng.random() < 0.6 else (fifth if rng.random() < 0.6 else root + 12)
                if nxt == 16 and p >= 12 and rng.random() < 0.5:  # approach the next root by step
                    midi = _bass_midi(chord_of(bar + 1)[0]) + int(rng.choice([-1, 1, 2]))
                t0, t1 = when(bar, p), grid.time(bar, nxt) - 0.03
                bass_notes.append((t0, t0 + max(0.08, min(t1 - t0, 0.8 * (t1 - t0) + 0.05)), midi, rng.uniform(0.7, 1.0), False))
        bass = _osc_line(bass_notes, n, sr, glide=0.05, kind="bass", rng=rng)

    # ---------------- melodic layer ----------------
    lead = attrs["lead"]
    notes = []  # (t, dur, midi, vel)
    if lead in ("rhodes", "piano"):
        comp = ([0], [0, 6], [0, 10], [0, 3, 8], [0, 6, 10], [0, 8])[int(rng.integers(6))]
        for bar in range(n_bars):
            voicing = _chord_voicing(chord_of(bar))
            for i, p in enumerate(comp):
                nxt = comp[i + 1] if i + 1 < len(comp) else 16
                t0 = when(bar, p)
                dur = grid.time(bar, nxt) - grid.time(bar, p) - 0.04
                v = rng.uniform(0.6, 0.9) * (1.0 if p == 0 else 0.8)
                for m in voicing:  # slight strum
                    notes.append((t0 + rng.uniform(0, 0.012), dur, m, v))
                if lead == "piano":  # left-hand root an octave below the voicing
                    notes.append((t0, dur, 40 + (chord_of(bar)[0] - 40) % 12, v * 0.7))
    elif lead in ("pad", "strings"):
        stabs = lead == "strings" and style in ("trap", "drill") and rng.random() < 0.5
        for bar in range(n_bars):
            voicing = _chord_voicing(chord_of(bar), low=55 if lead == "pad" else 57)
            if stabs:
                for p in (0, 3, 6, 10, 12):
                    t0 = when(bar, p, humanise=False)
                    for m in voicing:
                        notes.append((t0, 1.2 * grid.sixteenth, m, 0.8))
            else:
                t0 = grid.time(bar, 0)
                for m in voicing:
                    notes.append((t0, bar_s - 0.02, m, 0.7))
    else:  # pluck / bells: a repeating motif on the chord tones
        k = int(rng.integers(5, 9))
        rhythm = sorted({0} | set(rng.choice(np.arange(1, 16), size=k - 1, replace=False).tolist()))
        steps = [int(rng.integers(0, 4))]
        for _ in range(len(rhythm) - 1):
            steps.append(int(np.clip(steps[-1] + rng.choice([-2, -1, 1, 1, 2]), 0, 6)))
        base = 60 if lead == "pluck" else 72
        for bar in range(n_bars):
            tones = sorted(base + ((pc - base) % 12) for pc in chord_of(bar)[:3])
            tones = tones + [m + 12 for m in tones] + [tones[0] + 24]
            for i, p in enumerate(rhythm):
                nxt = rhythm[i + 1] if i + 1 < len(rhythm) else 16
                t0 = when(bar, p)
                dur = max(0.05, grid.time(bar, nxt) - grid.time(bar, p) - 0.02)
                notes.append((t0, dur, tones[steps[i]], rng.uniform(0.65, 0.95) * (1.0 if p % 4 == 0 else 0.85)))
    cutoff = _MOOD_CUTOFF[attrs["mood"]] * (0.8 if style == "lo-fi" else 1.0)
    mel = _render_notes(lead, notes, n, seconds, sr, rng, fmax=min(0.45 * sr, 1.8 * cutoff)).astype(np.float64)
    if lead in ("pad", "strings"):
        mel = _filt(mel, "lowpass", cutoff, sr)
    else:
        mel = _filt(mel, "lowpass", min(cutoff * 1.6, 0.45 * sr), sr, order=1)
    mel = _filt(mel, "highpass", 150, sr)
    if attrs["vinyl"] or style == "lo-fi":  # tape wow: slow time-varying delay
        t = np.arange(n) / sr
        d = 0.0018 * np.sin(2 * np.pi * rng.uniform(0.3, 0.7) * t) + 0.0004 * np.sin(2 * np.pi * 5.5 * t)
        mel = np.interp(t - d - 0.003, t, mel, left=0.0)

    # bass and melodic stems vary with notes and voicings: set their level by RMS, not by peak
    mel = mel / (np.sqrt(np.mean(mel**2)) + 1e-9)
    bass = bass / (np.sqrt(np.mean(bass**2)) + 1e-9)

    # ---------------- reverb send (melodic + snare) ----------------
    rt = 0.35 + 0.8 * _MOOD_REVERB[attrs["mood"]]
    tir = np.arange(int(rt * 2.5 * sr)) / sr
    ir = _filt(rng.standard_normal(len(tir)), "lowpass", 5000, sr) * np.exp(-tir / (rt / 3))
    ir[: int(0.012 * sr)] = 0.0  # pre-delay
    ir /= np.sqrt((ir**2).sum())
    send = _MOOD_REVERB[attrs["mood"]]
    wet = fftconvolve(((mel + 2.0 * snare_bus) * send).astype(np.float32), ir.astype(np.float32))[:n]

    # ---------------- mix ----------------
    # drums by peak; bass and melodic layer as RMS (kick bus RMS is about 0.15)
    lvl = {
        "boom bap": dict(kick=0.9, snare=0.6, hat=0.32, bass=0.13, mel=0.14),
        "lo-fi": dict(kick=0.8, snare=0.5, hat=0.26, bass=0.12, mel=0.15),
        "trap": dict(kick=0.6, snare=0.55, hat=0.4, bass=0.2, mel=0.13),
        "drill": dict(kick=0.55, snare=0.6, hat=0.4, bass=0.2, mel=0.13),
    }[style]
    drums = lvl["kick"] * kick_bus + lvl["snare"] * snare_bus + lvl["hat"] * hat_bus
    if style == "lo-fi" or attrs["vinyl"]:
        drums = _filt(drums, "lowpass", 9000 if style != "lo-fi" else 7500, sr)
    if lead in ("pad", "strings"):  # sustained layers sit lower than percussive keys
        lvl["mel"] *= 0.8
    mix = drums + lvl["bass"] * bass + lvl["mel"] * mel + 0.5 * lvl["mel"] * wet
    if attrs["vinyl"]:
        crack = np.zeros(n)
        k = rng.poisson(25 * seconds)
        idx = rng.integers(0, n, size=k)
        crack[idx] = rng.standard_normal(k) * rng.uniform(0.2, 1.0, size=k) ** 3
        crack = _filt(crack, "bandpass", (1000, 8000), sr)
        hiss = _filt(rng.standard_normal(n), "bandpass", (2000, 9000), sr) * 0.004
        mix += 0.25 * crack / (np.abs(crack).max() + 1e-9) + hiss
    if _stems is not None:
        _stems.update(kick=lvl["kick"] * kick_bus, snare=lvl["snare"] * snare_bus, hats=lvl["hat"] * hat_bus,
                      bass=lvl["bass"] * bass, melodic=lvl["mel"] * mel, reverb=0.5 * lvl["mel"] * wet)
    mix = _filt(mix, "highpass", 25, sr)  # no DC / subsonics
    # gentle bus compression: soft clip around the 99.5th percentile, then peak-normalise
    ref = np.quantile(np.abs(mix), 0.995) + 1e-9
    mix = np.tanh(mix / (1.4 * ref))
    fade = int(0.01 * sr)
    mix[:fade] *= np.linspace(0.0, 1.0, fade)
    mix[-fade:] *= np.linspace(1.0, 0.0, fade)
    mix *= 10 ** (-1 / 20) / (np.abs(mix).max() + 1e-9)
    return mix.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

_STYLE_WORDS = {
    "boom bap": ["boom bap", "boom-bap", "classic boom bap", "90s boom bap", "old-school boom bap"],
    "lo-fi": ["lo-fi", "lofi", "lo-fi hip hop", "lo-fi", "chillhop-style lo-fi"],
    "trap": ["trap", "modern trap", "hard trap", "southern trap"],
    "drill": ["drill", "UK drill", "drill", "NY drill"],
}
_MOOD_WORDS = {
    "dark": ["dark", "ominous", "dark", "gloomy"],
    "mellow": ["mellow", "smooth", "mellow"],
    "melancholic": ["melancholic", "sad", "melancholy", "wistful"],
    "chill": ["chill", "laid-back", "relaxed"],
    "uplifting": ["uplifting", "bright", "hopeful"],
    "aggressive": ["aggressive", "menacing", "hard-hitting"],
    "dreamy": ["dreamy", "hazy", "floaty"],
    "nostalgic": ["nostalgic", "reminiscent", "nostalgic"],
    "eerie": ["eerie", "haunting", "spooky"],
    "triumphant": ["triumphant", "victorious", "epic"],
    "warm": ["warm", "cozy", "warm"],
    "soulful": ["soulful", "soulful", "heartfelt"],
}
_LEAD_WORDS = {
    "rhodes": ["Rhodes chords", "electric piano chords", "warm Rhodes keys", "mellow Rhodes chords", "jazzy Rhodes"],
    "piano": ["piano chords", "a piano loop", "soft piano", "grand piano chords", "a sampled piano"],
    "pad": ["a synth pad", "airy pads", "lush synth pads", "an ambient pad"],
    "pluck": ["a plucked synth melody", "pluck arpeggios", "a catchy pluck melody", "plucky synth lead"],
    "strings": ["strings", "a string section", "orchestral strings", "cinematic strings"],
    "bells": ["bells", "a bell melody", "glassy bells", "music-box bells"],
}
_BASS_WORDS = {
    "808": ["808s", "a booming 808", "deep 808 bass", "heavy 808s", "a distorted 808"],
    "bass": ["a bassline", "a warm bassline", "round bass", "a deep bass line"],
}
_SNARE_WORDS = {
    "snare": ["a crisp snare", "a punchy snare", "snappy snares", "a fat snare"],
    "clap": ["claps", "a snappy clap", "layered claps"],
    "rim": ["rimshots", "a rimshot", "side-stick rims"],
}
_NOUNS = ["beat", "instrumental", "hip hop beat", "rap instrumental", "instrumental beat", "hip-hop instrumental", "loop"]


def caption(attrs: dict, rng: np.random.Generator) -> str:
    """Write a natural-language caption from the attributes.

    Style, tempo ("84 bpm", "84 beats per minute", ...), key ("D minor") and mood are always
    named; the melodic instrument, bass, drums, swing and vinyl texture in varied words and order.
    """
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    cap1 = lambda x: x[:1].upper() + x[1:]  # noqa: E731
    n = int(attrs["bpm"])
    style = pick(_STYLE_WORDS[attrs["style"]])
    mood = pick(_MOOD_WORDS[attrs["mood"]])
    noun = pick(["beat", "instrumental", "loop"] if "hip hop" in style else _NOUNS)
    bpm = pick([f"{n} bpm", f"{n} BPM", f"{n} beats per minute", f"tempo {n} BPM", f"around {n} bpm", f"{n}bpm"])
    key = f"{attrs['key']} {attrs['mode']}"
    in_key = pick([f"in {key}", f"in the key of {key}", f"in {key}"])
    lead = pick(_LEAD_WORDS[attrs["lead"]])
    bass = pick(_BASS_WORDS[attrs["bass"]])
    if attrs["bass"] == "808" and attrs.get("slides") and rng.random() < 0.6:
        bass = pick(["sliding 808s", "gliding 808s", "808 slides"])
    extras = []
    if attrs.get("hat_rolls"):
        extras.append(pick(["rolling hi-hats", "hi-hat rolls", "skittering hats", "fast hat rolls"]))
    elif rng.random() < 0.3:
        extras.append(pick(["steady hi-hats", "crisp hats", "tight hi-hats"]))
    if rng.random() < 0.5:
        extras.append(pick(_SNARE_WORDS[attrs["snare"]]))
    if float(attrs.get("swing", 0)) >= 0.18 and rng.random() < 0.7:
        extras.append(pick(["a swung groove", "lazy swing", "heavy swing", "a shuffled groove"]))
    if attrs.get("vinyl"):
        extras.append(pick(["vinyl crackle", "dusty vinyl crackle", "tape hiss and crackle"]))
    rng.shuffle(extras)
    parts = [lead, bass] + extras
    if rng.random() < 0.3:
        parts[0], parts[1] = parts[1], parts[0]
    listed = ", ".join(parts[:-1]) + " and " + parts[-1]
    t = int(rng.integers(8))
    if t == 0:
        s = f"{mood} {style} {noun} at {n} {pick(['bpm', 'BPM'])}, {lead} {in_key}"
        if rng.random() < 0.6:
            s += f", {bass}" + (f", {extras[0]}" if extras else "")
    elif t == 1:
        s = f"{style} {noun} {in_key}, {bpm}. {cap1(lead)} over {bass}; {mood} mood"
        if extras:
            s += f", with {', '.join(extras)}"
    elif t == 2:
        s = f"a {mood} {style} {noun} with {listed}. {cap1(bpm)}, {pick([key, 'key of ' + key])}"
    elif t == 3:
        s = f"{n} {pick(['bpm', 'BPM'])} {style} {noun} {in_key} - {mood}, {listed}"
    elif t == 4:
        s = f"{key} {style} {noun}, {bpm}, {mood} vibe: {listed}"
    elif t == 5:
        adj = pick(["moody", "atmospheric", "head-nodding", "gritty", "minimal", "bouncy"])
        s = f"{mood} and {adj} {style} {noun} built on {listed}, {in_key}, {bpm}"
    elif t == 6:
        s = f"{style} {noun}, {mood}, {bpm}, key of {key}. Features {listed}"
    else:
        s = f"{bpm}, {key}, {style}: a {mood} {noun} with {listed}"
    s = re.sub(r"\s+", " ", s).replace(" ,", ",").strip()
    s = re.sub(r"\ba ([aeiou])", r"an \1", s)
    if rng.random() < 0.5:
        s = cap1(s)
    return s


# --------------------------------------------------------------------------------------------
# Corpus generation
# --------------------------------------------------------------------------------------------

def clip_id(i: int) -> str:
    return f"beat-{i:06d}"


def _clip_rngs(seed: int, i: int):
    ss = np.random.SeedSequence([int(seed), int(i)])
    a, c, s = ss.spawn(3)
    return np.random.default_rng(a), np.random.default_rng(c), int(s.generate_state(1)[0])


def make_clip(seed: int, i: int, seconds: float = 10.0, sample_rate: int = 24000) -> tuple[dict, np.ndarray]:
    """Clip `i` of the corpus with `seed`: (manifest record without "audio", waveform)."""
    rng_attr, rng_cap, audio_seed = _clip_rngs(seed, i)
    attrs = sample_attributes(rng_attr)
    cap = caption(attrs, rng_cap)
    wav = synthesize(attrs, seconds=seconds, sample_rate=sample_rate, seed=audio_seed)
    rec = {"id": clip_id(i), "caption": cap, **attrs, "duration": float(seconds), "sample_rate": int(sample_rate)}
    return rec, wav


def _write_clip(args) -> dict:
    import soundfile as sf

    seed, i, seconds, sample_rate, out_dir = args
    rec, wav = make_clip(seed, i, seconds, sample_rate)
    rel = f"audio/{rec['id']}.flac"
    path = os.path.join(out_dir, rel)
    with storage.atomic_path(path, fsync=False) as tmp:
        sf.write(tmp, wav, sample_rate, format="FLAC", subtype="PCM_16")
    return {"id": rec["id"], "audio": rel, **{k: v for k, v in rec.items() if k != "id"}}


def _pool_init():
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def generate_corpus(out_dir: str, clips: int, seed: int = 0, seconds: float = 10.0, sample_rate: int = 24000,
                    workers: int = 1, progress: bool = True) -> dict:
    """Write `clips` beats to `out_dir/audio/beat-XXXXXX.flac` and `out_dir/manifest.jsonl`.

    Clip i depends only on (seed, i): the corpus is identical for any `workers`. Returns a summary
    (clips, hours, seconds taken, counts per style/mode/lead/bass, bpm range, manifest path).
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    jobs = [(seed, i, seconds, sample_rate, out_dir) for i in range(int(clips))]
    bar = tqdm(total=len(jobs), desc="demo corpus", unit="clip", disable=not progress)
    records = []
    if workers and workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=int(workers), mp_context=mp.get_context("spawn"),
                                 initializer=_pool_init) as ex:
            for rec in ex.map(_write_clip, jobs, chunksize=max(1, min(16, len(jobs) // (4 * workers)))):
                records.append(rec)
                bar.update(1)
    else:
        for job in jobs:
            records.append(_write_clip(job))
            bar.update(1)
    bar.close()
    manifest = os.path.join(out_dir, "manifest.jsonl")
    storage.write_text_atomic(manifest, "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records))
    bpms = [r["bpm"] for r in records]
    return {
        "out_dir": out_dir,
        "manifest": manifest,
        "clips": len(records),
        "hours": round(len(records) * seconds / 3600, 4),
        "sample_rate": int(sample_rate),
        "seed": int(seed),
        "seconds_taken": round(time.perf_counter() - t_start, 2),
        "styles": dict(sorted(Counter(r["style"] for r in records).items())),
        "modes": dict(sorted(Counter(r["mode"] for r in records).items())),
        "leads": dict(sorted(Counter(r["lead"] for r in records).items())),
        "bass": dict(sorted(Counter(r["bass"] for r in records).items())),
        "bpm_range": [min(bpms), max(bpms)] if bpms else None,
    }


# --------------------------------------------------------------------------------------------
# Looking at it
# --------------------------------------------------------------------------------------------

def plot_spectrograms(manifest_path: str, out_png: str, n: int = 8) -> str:
    """Grid of log-mel spectrograms of the first `n` clips with their captions as titles."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import soundfile as sf

    root = os.path.dirname(os.path.abspath(manifest_path))
    with open(manifest_path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()][:n]
    cols = 2 if len(recs) > 1 else 1
    rows = int(math.ceil(len(recs) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(9 * cols, 3.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, rec in zip(axes.ravel(), recs):
        wav, sr = sf.read(os.path.join(root, rec["audio"]), dtype="float32")
        hop = 240
        S = 10 * log_mel_spectrogram(wav, sr, hop=hop, n_mels=96)
        ax.axis("on")
        ax.imshow(S, origin="lower", aspect="auto", cmap="magma", vmin=S.max() - 80, vmax=S.max(),
                  extent=(0, len(wav) / sr, 0, S.shape[0]))
        est = estimate_tempo(wav, sr)
        title = f"{rec['id']} [{rec['style']}, {rec['bpm']} bpm (est {est:.1f}), {rec['key']} {rec['mode']}]\n{rec['caption']}"
        ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=7.5)
        ax.set_ylabel("mel bin")
        ax.set_xlabel("s")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description="Synthesise the demo hip-hop beat corpus.")
    p.add_argument("--out", required=True)
    p.add_argument("--clips", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--sample-rate", type=int, default=24000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--plot", default=None, help="also write a spectrogram grid PNG here")
    a = p.parse_args(argv)
    summary = generate_corpus(a.out, a.clips, seed=a.seed, seconds=a.seconds, sample_rate=a.sample_rate,
                              workers=a.workers)
    if a.plot:
        summary["plot"] = plot_spectrograms(summary["manifest"], a.plot)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
