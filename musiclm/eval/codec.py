"""``musiclm eval codec``: how well does an acoustic codec reconstruct held-out audio?

For a codec model directory loaded through the acoustic registry (``type: soundstream`` by
default: :func:`musiclm.codec.build_acoustic`) and the held-out split of an AUDIO shard folder
(flac + json per sample, as ``ray_jobs/pack_audio.py`` writes), every sample is decoded, resampled
to the codec's sample rate (everything is measured at that rate), encoded once with all levels and
decoded with the first ``k`` levels for ``k`` in {1, coarse, all} (one model serves every bitrate:
quantizer dropout). Per row of the table, means over the clips of:

* ``si_snr_db``: scale-invariant SNR (:func:`musiclm.codec.losses.si_snr`);
* ``mel_ms``: the multi-scale log-mel L1 of training (:class:`musiclm.codec.losses.MultiScaleMelLoss`);
* ``mel_l1`` / ``mel_l1_below_150hz``: log10-mel L1 at one resolution (2048 at 24 kHz), all bands
  and only the bands below 150 Hz, where kick and 808 live (:func:`musiclm.codec.losses.mel_distance`);
* ``bitrate_bps``: levels x log2(codebook size) x frame rate;
* ``tempo_kept``: where the samples carry a ``bpm`` tag (the demo corpus does), the share of clips
  whose reconstruction's tempo (:func:`musiclm.data.music_analysis.estimate_tempo`, search range
  57-114 BPM, which holds the demo corpus's 60-110) is within 4 % of the tag; octave errors count
  as misses. ``tempo.original_share`` is the same estimator on the original clips (its ceiling).

Baselines, same metrics on the same clips at the codec's rate:

* ``encodec``: transformers' ``EncodecModel`` 24 kHz (``--encodec random``: the real
  configuration with random weights, :func:`musiclm.codec.encodec.random_encodec_24khz`, what
  ``make demo`` tokenized with before our codec; a hub id or a directory with real weights; or
  ``none``), decoded with the number of its levels whose bitrate is nearest to each codec row's
  (75 Hz x 10 bits = 750 bps per level; the row states the bitrate it got). The clip is resampled
  to 24 kHz and the reconstruction back to the codec's rate.
* ``lowpass_4khz`` / ``lowpass_8khz``: the clip itself with everything above the cut-off removed
  (an FFT brick-wall mask): a telephone-band and a narrow-band copy, a reference anyone can hear.
  A cut-off at or above the codec's Nyquist frequency is skipped (listed in ``skipped``).

Writes ``codec_eval.json`` (rows with per-clip values), ``codec_eval.md`` (the table) and
``codec_eval.png`` (log-mel spectrograms of the first clip: original, the codec with all levels,
EnCodec at the nearest bitrate, the 4 kHz low-pass) to ``--out`` and prints the table::

    musiclm eval codec --model models/codec-demo --data shards/rapbeats/audio --out runs/eval_codec
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "add_arguments",
    "clip_metrics",
    "evaluate_codec",
    "format_table",
    "level_counts",
    "load_clips",
    "lowpass",
    "main",
    "require_below",
    "run_from_args",
    "tempo_kept",
]

METRICS = ("si_snr_db", "mel_ms", "mel_l1", "mel_l1_below_150hz")
TEMPO_TOLERANCE = 0.04
ENCODEC_RATE = 24000


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def lowpass(wav: torch.Tensor, sample_rate: int, cutoff_hz: float) -> torch.Tensor:
    """``[..., T]`` with every frequency above ``cutoff_hz`` removed (FFT brick-wall mask)."""
    spec = torch.fft.rfft(wav.double(), dim=-1)
    freqs = torch.fft.rfftfreq(wav.shape[-1], 1.0 / sample_rate)
    spec[..., freqs > float(cutoff_hz)] = 0
    return torch.fft.irfft(spec, n=wav.shape[-1], dim=-1).to(wav.dtype)


def clip_metrics(reference: torch.Tensor, estimate: torch.Tensor, sample_rate: int, mel_loss=None) -> dict:
    """Per-example metrics of ``estimate`` against ``reference`` (``[B, T]``, trimmed to the shorter):
    ``{name: float tensor [B]}`` for the names in :data:`METRICS`."""
    from musiclm.codec.losses import MultiScaleMelLoss, mel_distance, si_snr

    ref, est = torch.atleast_2d(reference).float(), torch.atleast_2d(estimate).float()
    n = min(ref.shape[-1], est.shape[-1])
    ref, est = ref[..., :n], est[..., :n]
    mel_loss = mel_loss if mel_loss is not None else MultiScaleMelLoss(sample_rate)
    return {
        "si_snr_db": si_snr(est, ref),
        "mel_ms": mel_loss.per_example(est, ref),
        "mel_l1": mel_distance(est, ref, sample_rate),
        "mel_l1_below_150hz": mel_distance(est, ref, sample_rate, max_hz=150.0),
    }


def level_counts(levels: int, coarse: int | None) -> list[tuple[str, int]]:
    """``[(name, k)]`` for 1, coarse and all levels; a count already listed is named once
    (``"1=coarse"``, ``"coarse=all"``), so a 1-level model has the one row ``"1=all"``."""
    levels = int(levels)
    coarse = min(max(1, int(coarse if coarse is not None else min(4, levels))), levels)
    out: list[tuple[str, int]] = []
    for name, k in (("1", 1), ("coarse", coarse), ("all", levels)):
        for i, (n, kk) in enumerate(out):
            if kk == k:
                out[i] = (f"{n}={name}", k)
                break
        else:
            out.append((name, k))
    return out


def tempo_kept(wav: np.ndarray, sample_rate: int, bpm: float | None) -> bool | None:
    """Whether the estimated tempo of ``wav`` is within 4 % of ``bpm`` (no octave folding); None
    without a tag."""
    from musiclm.data.music_analysis import estimate_tempo

    if bpm is None or not math.isfinite(float(bpm)):
        return None
    est = estimate_tempo(np.asarray(wav, dtype=np.float32), int(sample_rate))
    return bool(math.isfinite(est) and abs(est - float(bpm)) <= TEMPO_TOLERANCE * float(bpm))


def _bpm_of(js: dict) -> float | None:
    if not isinstance(js, dict):
        return None
    bpm = js.get("bpm", (js.get("tags") or {}).get("bpm"))
    return float(bpm) if isinstance(bpm, (int, float)) else None


def load_clips(
    data: Any,
    split: str = "eval",
    sample_rate: int | None = None,
    max_clips: int | None = None,
    seconds: float | None = None,
) -> list[dict]:
    """Samples of an audio shard folder (or shard URLs): ``{"id", "wav" float32 [T], "sample_rate",
    "bpm"}`` in shard order, resampled to ``sample_rate`` (None: kept), at most ``seconds`` long."""
    from musiclm.audio import decode_bytes, resample
    from musiclm.data.shards import shard_reader

    clips: list[dict] = []
    for s in shard_reader(data, split, shuffle=0, rank=0, world_size=1):
        if max_clips and len(clips) >= int(max_clips):
            break
        key = str(s.get("__key__"))
        if s.get("flac") is None:
            log.warning("eval codec: %s has no flac entry: skipped", key)
            continue
        try:
            wav, sr = decode_bytes(bytes(s["flac"]), f"{key}.flac", None, mono=True, allow_silent=True)
        except Exception as e:  # recorded, not fatal
            log.warning("eval codec: skipping %s: %s", key, e)
            continue
        if seconds:
            wav = wav[: int(round(float(seconds) * sr))]
        if sample_rate and sr != sample_rate:
            wav = resample(wav, int(sr), int(sample_rate))
            sr = int(sample_rate)
        js = s.get("json") or {}
        clips.append({"id": key, "wav": wav.float(), "sample_rate": int(sr), "bpm": _bpm_of(js)})
    return clips


# --------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------


def _load_codec(model: Any, device: str):
    if isinstance(model, (str, os.PathLike)):
        from musiclm.codec import build_acoustic

        return build_acoustic({"type": "soundstream", "model": os.fspath(model)}, device=device)
    return model  # an AcousticTokenizer already built


def _coarse_levels(tok) -> int | None:
    cfg = getattr(getattr(tok, "model", None), "cfg", None)
    if isinstance(cfg, dict) and "coarse_levels" in cfg:
        return int(cfg["coarse_levels"])
    return getattr(tok, "coarse_levels", None)


def _bitrate(frame_rate: float, levels: int, codebook_size: int) -> float:
    from musiclm.codec.soundstream import bitrate

    return bitrate(frame_rate, levels, codebook_size)


def _load_encodec(spec: str | None, tmp: str, needed_levels: int):
    """EncodecTokenizer with a bandwidth covering ``needed_levels`` levels, or None."""
    if not spec or str(spec).lower() == "none":
        return None, None
    from musiclm.codec import build_acoustic
    from musiclm.codec.encodec import random_encodec_24khz

    label = "encodec_random" if spec == "random" else "encodec"
    path = random_encodec_24khz(os.path.join(tmp, "encodec_24khz")) if spec == "random" else spec
    probe = build_acoustic({"type": "encodec", "model": path})
    cfg = probe.hf_config
    per_level = math.log2(cfg.codebook_size) * cfg.frame_rate
    bws = sorted(float(b) for b in cfg.target_bandwidths)
    bw = next((b for b in bws if math.floor(b * 1000 / per_level) >= needed_levels), bws[-1])
    return build_acoustic({"type": "encodec", "model": path, "bandwidth": bw}), label


def _summary(values: dict[str, list[float]], kept: list[bool]) -> dict:
    out = {m: float(np.mean(v)) if v else float("nan") for m, v in values.items()}
    out["tempo_kept"] = float(np.mean(kept)) if kept else None
    out["tempo_clips"] = len(kept)
    return out


def evaluate_codec(
    model: Any,
    data: Any,
    *,
    split: str = "eval",
    max_clips: int | None = None,
    out_dir: str | None = None,
    encodec: str | None = "random",
    lowpass_hz: Sequence[float] = (4000.0, 8000.0),
    seconds: float | None = None,
    device: str = "cpu",
    tempo: bool = True,
    plot: bool = True,
) -> dict:
    """The codec table as a JSON-able dict (see the module docstring); files to ``out_dir``."""
    from musiclm.audio import resample
    from musiclm.codec.losses import MultiScaleMelLoss

    t0 = time.time()
    tok = _load_codec(model, device)
    sr, hop, levels = int(tok.sample_rate), int(tok.hop_length), int(tok.levels)
    counts = level_counts(levels, _coarse_levels(tok))
    clips = load_clips(data, split, sample_rate=sr, max_clips=max_clips, seconds=seconds)
    clips = [c for c in clips if c["wav"].shape[-1] >= hop]
    if not clips:
        raise ValueError(f"{data}: no '{split}' clip of at least one codec frame ({hop} samples at {sr} Hz)")
    mel_loss = MultiScaleMelLoss(sr)
    name = getattr(tok, "name", "codec")

    # rows: (system, level name, k, bitrate)
    rows: list[dict] = [
        {"system": name, "levels": ln, "n_levels": k, "bitrate_bps": _bitrate(tok.frame_rate, k, tok.codebook_size)}
        for ln, k in counts
    ]
    skipped: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="codec_eval_") as tmp:
        enc = enc_label = None
        if encodec and str(encodec).lower() != "none":
            try:
                enc_per_level = 75.0 * 10.0  # EnCodec 24 kHz: 75 Hz x 1024 codes; refined below
                want = [max(1, round(r["bitrate_bps"] / enc_per_level)) for r in rows]
                enc, enc_label = _load_encodec(str(encodec), tmp, max(want))
                enc_per_level = _bitrate(enc.frame_rate, 1, enc.codebook_size)
                for r in list(rows[: len(counts)]):
                    k = int(min(max(1, round(r["bitrate_bps"] / enc_per_level)), enc.levels))
                    rows.append(
                        {
                            "system": enc_label,
                            "levels": f"{k} (~{r['levels']})",
                            "n_levels": k,
                            "bitrate_bps": _bitrate(enc.frame_rate, k, enc.codebook_size),
                            "matches": r["levels"],
                        }
                    )
            except Exception as e:  # a baseline must not stop the codec's own evaluation
                log.warning("eval codec: EnCodec baseline skipped: %s", e)
                skipped.append({"system": "encodec", "reason": f"{type(e).__name__}: {e}"})
                enc = None
        for hz in lowpass_hz:
            if float(hz) >= sr / 2:
                skipped.append({"system": f"lowpass_{hz / 1000:g}khz", "reason": f"cut-off >= Nyquist ({sr / 2:g} Hz)"})
                continue
            rows.append(
                {
                    "system": f"lowpass_{hz / 1000:g}khz",
                    "levels": "-",
                    "n_levels": None,
                    "bitrate_bps": None,
                    "cutoff_hz": float(hz),
                }
            )

        values = [{m: [] for m in METRICS} for _ in rows]
        kept: list[list[bool]] = [[] for _ in rows]
        original_kept: list[bool] = []
        per_clip_ids = []
        code_hist = np.zeros((levels, int(tok.codebook_size)), dtype=np.int64)  # code usage per level
        first: dict[str, torch.Tensor] = {}
        own_vs_other: list[tuple[float, float]] = []  # log-mel L1 with the clip's codes / the previous clip's
        prev_codes = None
        for ci, clip in enumerate(clips):
            wav = clip["wav"][None]
            n = tok.num_frames(wav.shape[-1])
            ref = wav[:, : n * hop]
            outs: list[torch.Tensor | None] = [None] * len(rows)
            codes = tok.encode(ref)
            for q in range(levels):
                code_hist[q] += np.bincount(codes[0, q].reshape(-1).numpy(), minlength=code_hist.shape[1])
            # the same clip decoded from another clip's codes: a decoder that ignores its codes does as
            # well with them as with the clip's own (the all-levels row below)
            other_mel = None
            if prev_codes is not None and prev_codes.shape[-1] >= codes.shape[-1]:
                other = tok.decode(prev_codes[..., : codes.shape[-1]])
                other_mel = float(clip_metrics(ref, other, sr, mel_loss)["mel_l1"][0])
            prev_codes = codes
            enc_codes = None
            for i, r in enumerate(rows):
                if r["system"] == name:
                    outs[i] = tok.decode(codes[:, : r["n_levels"]])
                elif enc is not None and r["system"] == enc_label:
                    if enc_codes is None:
                        enc_codes = enc.encode(resample(ref, sr, ENCODEC_RATE) if sr != ENCODEC_RATE else ref)
                    y = enc.decode(enc_codes[:, : r["n_levels"]])
                    outs[i] = resample(y, ENCODEC_RATE, sr) if sr != ENCODEC_RATE else y
                elif "cutoff_hz" in r:
                    outs[i] = lowpass(ref, sr, r["cutoff_hz"])
            for i, y in enumerate(outs):
                if y is None:
                    continue
                m = clip_metrics(ref, y, sr, mel_loss)
                for k, v in m.items():
                    values[i][k].append(float(v[0]))
                if other_mel is not None and rows[i]["system"] == name and rows[i]["n_levels"] == levels:
                    own_vs_other.append((float(m["mel_l1"][0]), other_mel))
                if tempo and clip["bpm"] is not None:
                    kept[i].append(bool(tempo_kept(y[0].numpy(), sr, clip["bpm"])))
            if tempo and clip["bpm"] is not None:
                original_kept.append(bool(tempo_kept(ref[0].numpy(), sr, clip["bpm"])))
            per_clip_ids.append(clip["id"])
            if ci == 0:
                first = {"original": ref[0]}
                for i, r in enumerate(rows):
                    if outs[i] is None:
                        continue
                    if r["system"] == name and r["n_levels"] == levels:
                        first[f"{name}, {levels} levels ({r['bitrate_bps'] / 1000:.2f} kbps)"] = outs[i][0]
                for i, r in enumerate(rows):
                    if outs[i] is not None and r["system"] == enc_label and r.get("matches") == counts[-1][0]:
                        first[f"{enc_label}, {r['n_levels']} levels ({r['bitrate_bps'] / 1000:.2f} kbps)"] = outs[i][0]
                for i, r in enumerate(rows):
                    if outs[i] is not None and r.get("cutoff_hz") == min(lowpass_hz, default=None):
                        first[r["system"]] = outs[i][0]
            log.info("eval codec: clip %d/%d %s", ci + 1, len(clips), clip["id"])

    for i, r in enumerate(rows):
        r.update(_summary(values[i], kept[i]))
        r["per_clip"] = {m: values[i][m] for m in METRICS}
    result: dict[str, Any] = {
        "eval": "codec",
        "model": os.fspath(model) if isinstance(model, (str, os.PathLike)) else repr(model),
        "data": data if isinstance(data, str) else [os.fspath(d) for d in data],
        "split": split,
        "codec": {
            "type": name,
            "sample_rate": sr,
            "frame_rate": float(tok.frame_rate),
            "hop_length": hop,
            "levels": levels,
            "codebook_size": int(tok.codebook_size),
            "level_counts": dict(counts),
            "params": int(sum(p.numel() for p in tok.model.parameters())) if hasattr(tok, "model") else None,
            "preset": (getattr(getattr(tok, "model", None), "cfg", {}) or {}).get("preset"),
        },
        "code_usage": code_usage(code_hist),
        "codes_matter": _codes_matter(own_vs_other),
        "clips": len(clips),
        "clip_ids": per_clip_ids,
        "audio_seconds": float(sum(c["wav"].shape[-1] for c in clips) / sr),
        "rows": rows,
        "tempo": {
            "clips_with_bpm": len(original_kept),
            "tolerance": TEMPO_TOLERANCE,
            "octave_errors": "miss",
            "original_share": float(np.mean(original_kept)) if original_kept else None,
        },
        "skipped": skipped,
    }
    result["table"] = format_table(result)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        files = {
            "json": os.path.join(out_dir, "codec_eval.json"),
            "markdown": os.path.join(out_dir, "codec_eval.md"),
        }
        if plot and first:
            files["png"] = plot_spectrograms(first, sr, os.path.join(out_dir, "codec_eval.png"), title=per_clip_ids[0])
        result["files"] = files
        result["seconds_taken"] = round(time.time() - t0, 2)
        with open(files["markdown"], "w") as f:
            f.write(result["table"] + "\n")
        with open(files["json"], "w") as f:
            json.dump(result, f, indent=2, default=str)
    result["seconds_taken"] = round(time.time() - t0, 2)
    return result


def _codes_matter(pairs: list[tuple[float, float]]) -> dict:
    """Log-mel L1 of each clip decoded from its own codes and from the previous clip's (all levels):
    ``ratio`` = own / other, about 1 when the decoder ignores its codes."""
    if not pairs:
        return {"clips": 0, "ratio": None}
    own, other = (float(np.mean([p[i] for p in pairs])) for i in (0, 1))
    return {"clips": len(pairs), "own_codes_mel_l1": own, "other_clip_codes_mel_l1": other, "ratio": own / other}


def require_codes_matter(result: dict, max_ratio: float) -> list[str]:
    """Failures unless the clips decode clearly better from their own codes than from another
    clip's (log-mel L1 ratio at most ``max_ratio``)."""
    cm = result.get("codes_matter") or {}
    if cm.get("ratio") is None:
        return ["codes matter: needs at least 2 eval clips of equal length"]
    if cm["ratio"] <= max_ratio:
        return []
    return [
        f"the decoder ignores its codes: log-mel L1 {cm['own_codes_mel_l1']:.3f} from the clips' own codes vs "
        f"{cm['other_clip_codes_mel_l1']:.3f} from another clip's (ratio {cm['ratio']:.2f} > {max_ratio:g}): "
        f"every generation would decode to about the same audio"
    ]


def code_usage(hist: np.ndarray) -> dict:
    """Per level, from a [levels, codebook] histogram of codes: perplexity (exp of the entropy; 1 =
    one code for everything, the collapse that decodes every frame alike) and the share of the most
    frequent code."""
    perplexity, top = [], []
    for h in np.asarray(hist, dtype=np.float64):
        total = h.sum()
        p = h[h > 0] / total if total else np.ones(1)
        perplexity.append(float(np.exp(-(p * np.log(p)).sum())))
        top.append(float(p.max()))
    return {"perplexity": perplexity, "top_share": top}


def require_codes_used(result: dict, min_perplexity: float) -> list[str]:
    """Failures (empty if none) of the collapse check: every coarse level's code perplexity on the
    eval clips at least ``min_perplexity`` (the coarse stage learns those levels)."""
    counts = result["codec"]["level_counts"]  # e.g. {"1": 1, "coarse": 4, "all": 8} or {"1=coarse": 1, ...}
    coarse = next((int(k) for n, k in counts.items() if "coarse" in n.split("=")), int(result["codec"]["levels"]))
    u = result.get("code_usage") or {}
    return [
        f"level {q + 1}: code perplexity {p:.2f} < {min_perplexity:g} (the codebook collapsed: "
        f"one code on {u['top_share'][q]:.0%} of frames)"
        for q, p in enumerate((u.get("perplexity") or [])[:coarse])
        if p < min_perplexity
    ]


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def format_table(result: dict) -> str:
    """The markdown table of :func:`evaluate_codec`'s rows, with a line of context under it."""
    c = result["codec"]
    lines = [
        f"Codec eval: {result['model']} ({c['type']}, {c.get('preset') or ''} {c['sample_rate']} Hz, "
        f"{c['frame_rate']:g} Hz frames, {c['levels']} levels x {c['codebook_size']} codes) on "
        f"{result['clips']} '{result['split']}' clips ({result['audio_seconds']:.0f} s) of {result['data']}",
        "",
        "| system | levels | kbps | SI-SNR dB | multi-scale mel | log-mel L1 | log-mel L1 < 150 Hz | tempo kept |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        kbps = None if r.get("bitrate_bps") is None else r["bitrate_bps"] / 1000
        tempo = "-" if r.get("tempo_kept") is None else f"{r['tempo_kept']:.0%} of {r['tempo_clips']}"
        lines.append(
            f"| {r['system']} | {r['levels']} | {_fmt(kbps, '.2f')} | {_fmt(r.get('si_snr_db'), '.2f')} | "
            f"{_fmt(r.get('mel_ms'), '.3f')} | {_fmt(r.get('mel_l1'), '.3f')} | "
            f"{_fmt(r.get('mel_l1_below_150hz'), '.3f')} | {tempo} |"
        )
    t = result.get("tempo") or {}
    lines.append("")
    u = result.get("code_usage")
    if u:
        lines.append(
            f"Codes used on these clips (perplexity per level, of {c['codebook_size']}): "
            + " / ".join(f"{p:.1f}" for p in u["perplexity"])
            + f"; the most frequent code per level covers {' / '.join(f'{x:.0%}' for x in u['top_share'])} of frames."
        )
    if t.get("clips_with_bpm"):
        lines.append(
            f"Tempo: estimate_tempo within {t['tolerance']:.0%} of the bpm tag (octave errors are misses); "
            f"the original clips: {t['original_share']:.0%} of {t['clips_with_bpm']}."
        )
    else:
        lines.append("Tempo: no bpm tags on these samples.")
    for s in result.get("skipped") or []:
        lines.append(f"Skipped {s['system']}: {s['reason']}.")
    return "\n".join(lines)


def plot_spectrograms(wavs: dict[str, torch.Tensor], sample_rate: int, path: str, title: str = "") -> str:
    """One log-mel panel per entry (original first), stacked vertically, to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from musiclm.codec.losses import _mel_fb, log_mel

    n_fft = 2 ** int(round(math.log2(1024 * sample_rate / 24000)))
    fb = _mel_fb(sample_rate, n_fft, 80)
    specs = {k: log_mel(v.float()[None], fb, n_fft, n_fft // 4)[0].numpy() for k, v in wavs.items()}
    top = max(float(s.max()) for s in specs.values())
    fig, axes = plt.subplots(len(specs), 1, figsize=(10, 2.2 * len(specs)), squeeze=False)
    for ax, (k, s) in zip(axes[:, 0], specs.items()):
        dur = s.shape[1] * (n_fft // 4) / sample_rate
        ax.imshow(
            s, origin="lower", aspect="auto", vmin=top - 6.0, vmax=top, extent=(0, dur, 0, s.shape[0]), cmap="magma"
        )
        ax.set_title(k, fontsize=9)
        ax.set_ylabel("mel band")
    axes[-1, 0].set_xlabel("seconds")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


GATED_METRICS = ("mel_l1", "mel_l1_below_150hz")


def require_below(result: dict, baseline: str, metrics: Sequence[str] = GATED_METRICS) -> list[str]:
    """Failures (empty = pass) of the codec with all its levels against ``baseline``.

    ``baseline`` is ``encodec`` (the EnCodec row matched to the codec's full bitrate) or a system
    name such as ``lowpass_4khz``; every metric in ``metrics`` (lower is better) must be strictly
    below the baseline's. ``make demo`` uses it so a codec that lost to the random-weight EnCodec
    stops the pipeline before tokenization instead of feeding meaningless tokens to the stages.
    """
    rows = result["rows"]
    name, levels = result["codec"]["type"], result["codec"]["levels"]
    ours = next((r for r in rows if r["system"] == name and r["n_levels"] == levels), None)
    full = ours["levels"] if ours else None
    if baseline == "encodec":
        base = next((r for r in rows if r.get("matches") == full), None)
    else:
        base = next((r for r in rows if r["system"] == baseline), None)
    if ours is None or base is None:
        have = sorted({r["system"] for r in rows})
        return [f"no '{baseline}' row to compare with (rows: {', '.join(have)}; see 'skipped')"]
    failures = []
    for m in metrics:
        a, b = ours.get(m), base.get(m)
        if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or not a < b:
            failures.append(
                f"{m}: {name} ({full} levels) {_fmt(a, '.3f')} is not below {base['system']} {_fmt(b, '.3f')}"
            )
    return failures


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="codec model directory (a trained SoundStream: musiclm export ...)")
    p.add_argument("--data", required=True, help="audio shard folder (flac + json), a shard .tar or s3:// URL")
    p.add_argument("--split", default="eval")
    p.add_argument("--max-clips", type=int, default=None, help="evaluate the first N samples of the split")
    p.add_argument("--seconds", type=float, default=None, help="cut each sample to its first N seconds")
    p.add_argument("--out", default="runs/eval_codec", help="directory for codec_eval.json/.md/.png")
    p.add_argument(
        "--encodec",
        default="random",
        help="EnCodec baseline: 'random' (real 24 kHz config, random weights), a hub id or directory, or 'none'",
    )
    p.add_argument(
        "--lowpass", default="4000,8000", help="comma-separated low-pass baseline cut-offs in Hz ('' = none)"
    )
    p.add_argument("--no-tempo", action="store_true", help="skip the tempo estimates")
    p.add_argument(
        "--require-below",
        default=None,
        metavar="SYSTEM",
        help="exit 1 unless the codec (all levels) has a lower log-mel L1, overall and below 150 Hz, than "
        "SYSTEM: 'encodec' (the bitrate-matched EnCodec row) or a row name such as lowpass_4khz",
    )
    p.add_argument(
        "--min-perplexity",
        type=float,
        default=None,
        metavar="P",
        help="exit 1 unless the code perplexity of every coarse level on the eval clips is at least P "
        "(catches a collapsed codebook, which can still beat a random codec's mel distance)",
    )
    p.add_argument(
        "--max-codes-ratio",
        type=float,
        default=None,
        metavar="R",
        help="exit 1 unless log-mel L1 from the clips' own codes is at most R x that from another clip's codes "
        "(catches a decoder that ignores its codes: ratio about 1)",
    )
    p.add_argument("--device", default="cpu")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    res = evaluate_codec(
        args.model,
        args.data,
        split=args.split,
        max_clips=args.max_clips,
        out_dir=args.out,
        encodec=args.encodec,
        lowpass_hz=[float(x) for x in str(args.lowpass).split(",") if x.strip()],
        seconds=args.seconds,
        device=args.device,
        tempo=not args.no_tempo,
    )
    print(res["table"])
    if res.get("files"):
        print("\nwritten: " + ", ".join(res["files"].values()))
    failures = []
    if args.require_below:
        failures += require_below(res, args.require_below)
        if not failures:
            print(f"\ncodec below {args.require_below} on {', '.join(GATED_METRICS)}: ok")
    if args.min_perplexity is not None:
        used = require_codes_used(res, args.min_perplexity)
        failures += used
        if not used:
            print(f"codes used: every coarse level's perplexity >= {args.min_perplexity:g}: ok")
    cm = res.get("codes_matter") or {}
    if cm.get("ratio") is not None:
        print(
            f"codes matter: log-mel L1 {cm['own_codes_mel_l1']:.3f} from own codes vs "
            f"{cm['other_clip_codes_mel_l1']:.3f} from another clip's (ratio {cm['ratio']:.2f})"
        )
    if args.max_codes_ratio is not None:
        failures += require_codes_matter(res, args.max_codes_ratio)
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="musiclm eval codec", description=__doc__.splitlines()[0]))
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
