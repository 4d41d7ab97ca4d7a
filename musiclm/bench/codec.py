"""`musiclm bench codec`: encode/decode speed of our SoundStream presets against EnCodec on CPU.

Every model gets the same input: a demo-corpus clip of ``seconds`` (10 s default) synthesised at
24 kHz (resampled for a preset at another rate), one process, ``torch.set_num_threads(threads)``
(1 by default), float32, inference mode, batch 1. SoundStream presets (``demo``, ``paper``; random
weights: the speed does not depend on them) run through :class:`SoundStreamTokenizer` with all their
levels; transformers' ``EncodecModel`` 24 kHz at its real size (``random_encodec_24khz``: the
``facebook/encodec_24khz`` configuration, random weights) through :class:`EncodecTokenizer` at
``encodec_bandwidth`` (6 kbps = 8 levels by default, the paper preset's 6 kbps). The models are
timed in turn, ``warmup`` + ``repeats`` rounds, the order rotated every round so that all see the
same machine conditions; the median (and the best) round is reported.

Per model (``MODEL_KEYS``): ``params``, ``sample_rate``, ``frame_rate``, ``levels``,
``codebook_size``, ``bitrate_bps``, ``encode_s`` / ``decode_s`` (median seconds for the whole
input), ``encode_best_s`` / ``decode_best_s``, ``encode_rtf`` / ``decode_rtf`` (seconds of compute
per second of audio: below 1 is faster than real time) and ``encode_x_realtime`` /
``decode_x_realtime`` (the inverse). ``ratios``: per SoundStream preset against EnCodec, ``params``,
``encode_time`` and ``decode_time`` (ours / EnCodec's: below 1 = ours smaller or faster).

    musiclm bench codec                                    # demo + paper vs EnCodec, 10 s, 1 thread
    musiclm bench codec --set presets=[demo] seconds=5 repeats=5 --out bench_codec.json
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from collections.abc import Sequence

import torch

__all__ = ["MODEL_KEYS", "run"]

MODEL_KEYS = (
    "params",
    "sample_rate",
    "frame_rate",
    "levels",
    "codebook_size",
    "bitrate_bps",
    "encode_s",
    "decode_s",
    "encode_best_s",
    "decode_best_s",
    "encode_rtf",
    "decode_rtf",
    "encode_x_realtime",
    "decode_x_realtime",
)


def _input(seconds: float, sample_rate: int = 24000) -> torch.Tensor:
    from musiclm.data.demo_corpus import make_clip

    return torch.from_numpy(make_clip(0, 0, seconds=float(seconds), sample_rate=sample_rate)[1]).float()[None]


def run(
    presets: Sequence[str] = ("demo", "paper"),
    seconds: float = 10.0,
    repeats: int = 3,
    warmup: int = 1,
    threads: int | None = 1,
    include_encodec: bool = True,
    encodec_bandwidth: float = 6.0,
    seed: int = 0,
) -> dict:
    """Encode and decode timings of each model on the same ``seconds`` of audio (see the module doc)."""
    from musiclm.audio import resample
    from musiclm.codec import build_acoustic
    from musiclm.codec.encodec import random_encodec_24khz
    from musiclm.codec.soundstream import SoundStream, SoundStreamTokenizer, bitrate

    if threads:
        torch.set_num_threads(int(threads))
    if isinstance(presets, str):
        presets = [presets]
    base = _input(seconds, 24000)
    models: dict[str, dict] = {}
    tokenizers: dict[str, object] = {}
    inputs: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="bench_codec_") as tmp:
        for preset in presets:
            torch.manual_seed(seed)
            model = SoundStream({"preset": preset}).eval()
            tok = SoundStreamTokenizer(model=model)
            name = f"soundstream_{preset}"
            tokenizers[name] = tok
            inputs[name] = resample(base, 24000, tok.sample_rate)
            models[name] = {"params": model.num_params()}
        if include_encodec:
            enc = build_acoustic(
                {
                    "type": "encodec",
                    "model": random_encodec_24khz(f"{tmp}/encodec", seed=seed),
                    "bandwidth": encodec_bandwidth,
                }
            )
            tokenizers["encodec_24khz"] = enc
            inputs["encodec_24khz"] = base
            models["encodec_24khz"] = {"params": sum(p.numel() for p in enc.model.parameters())}
        for name, tok in tokenizers.items():
            models[name].update(
                sample_rate=int(tok.sample_rate),
                frame_rate=tok.frame_rate,
                levels=int(tok.levels),
                codebook_size=int(tok.codebook_size),
                bitrate_bps=bitrate(tok.frame_rate, tok.levels, tok.codebook_size),
            )
        times: dict[str, dict[str, list[float]]] = {n: {"encode": [], "decode": []} for n in tokenizers}
        names = list(tokenizers)
        for i in range(int(warmup) + int(repeats)):
            order = names[i % len(names) :] + names[: i % len(names)]  # rotate who goes first
            for name in order:
                tok, x = tokenizers[name], inputs[name]
                t0 = time.perf_counter()
                codes = tok.encode(x)
                t1 = time.perf_counter()
                y = tok.decode(codes)
                t2 = time.perf_counter()
                assert y.shape[-1] <= x.shape[-1]
                if i >= warmup:
                    times[name]["encode"].append(t1 - t0)
                    times[name]["decode"].append(t2 - t1)
    for name, m in models.items():
        for part in ("encode", "decode"):
            med = statistics.median(times[name][part])
            m[f"{part}_s"] = med
            m[f"{part}_best_s"] = min(times[name][part])
            m[f"{part}_rtf"] = med / float(seconds)
            m[f"{part}_x_realtime"] = float(seconds) / med
    ratios: dict[str, dict] = {}
    if "encodec_24khz" in models:
        e = models["encodec_24khz"]
        for name, m in models.items():
            if name == "encodec_24khz":
                continue
            ratios[f"{name}/encodec_24khz"] = {
                "params": m["params"] / e["params"],
                "encode_time": m["encode_s"] / e["encode_s"],
                "decode_time": m["decode_s"] / e["decode_s"],
                "bitrate": m["bitrate_bps"] / e["bitrate_bps"],
            }
    return {
        "bench": "codec",
        "config": {
            "presets": list(presets),
            "input_seconds": float(seconds),
            "input": "demo-corpus clip 0 (seed 0), synthesised at 24 kHz, batch 1",
            "repeats": int(repeats),
            "warmup": int(warmup),
            "threads": torch.get_num_threads(),
            "encodec_bandwidth_kbps": float(encodec_bandwidth) if include_encodec else None,
            "dtype": "float32",
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
        },
        "models": models,
        "ratios": ratios,
    }
