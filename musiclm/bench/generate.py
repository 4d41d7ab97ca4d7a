"""`musiclm bench generate`: how fast generation is, and whether long pieces hold together.

    musiclm bench generate                                   # random demo-size models (says so)
    musiclm bench generate --set model=models/rapbeats-demo --set duration=10
    musiclm bench generate --set long_duration=300           # the 5-minute check of issue 12

Reports (JSON):

* ``rtf``: wall seconds per second of audio, per stage (semantic, coarse, fine, decode, rerank)
  and in total, for ``num_samples`` candidates of ``duration`` seconds generated as one batch;
* ``kv_cache``: the same generation without the KV cache (every prefix recomputed at every step)
  and the speed-up (goal >= 5x at 10 s);
* ``batching``: ``num_samples`` candidates in one batch vs one at a time (goal >= 2x);
* ``long_piece``: one candidate of ``long_duration`` seconds: per stage, the mean log-mel distance
  between consecutive 10 ms frames across the starts of its windows (where newly sampled tokens
  follow the forced context) vs everywhere else (goal: the worst stage's ratio <= 1.2), the
  longest exact repeat of semantic tokens
  (goal: no longer than one semantic window), and each window's RMS level and MuLaN cosine to the
  caption (tiling one window, or silence, is not a long piece).

Without ``model`` the parts are random (``random_parts``): the stage LMs of the ``small`` preset
(the demo's size) with the demo windows (10 / 5 / 2 s), a random demo SoundStream (24 kHz, 75 Hz,
8 levels), MFCC semantic tokens with random centroids and a tiny MuLaN. Speed figures hold for a
trained model of the same size; the long-piece figures of random models say nothing about music.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
import warnings

import numpy as np
import torch

from musiclm.lm.stages import DEMO_WINDOWS

CAPTION = "hard-hitting trap beat at 70 bpm with dark piano"

# Token layouts of the random parts. "tiny": tests (seconds on a CPU); "demo": the demo's sizes.
RANDOM_PRESETS = {
    "tiny": {
        "lm": "tiny",
        "codec": {"preset": "tiny"},  # 8 kHz, 50 Hz, 4 levels x 64, coarse 2
        "tokens": dict(
            acoustic_levels=4,
            acoustic_codebook=64,
            acoustic_rate=50,
            coarse_levels=2,
            semantic_vocab=16,
            semantic_rate=25,
            cond_levels=2,
            cond_codebook=16,
        ),
        "windows": {"semantic": 1.0, "coarse": 0.4, "fine": 0.2},
    },
    "demo": {
        "lm": "small",
        "codec": {"preset": "demo"},  # 24 kHz, 75 Hz, 8 levels x 256, coarse 4
        "tokens": dict(
            acoustic_levels=8,
            acoustic_codebook=256,
            acoustic_rate=75,
            coarse_levels=4,
            semantic_vocab=512,
            semantic_rate=25,
            cond_levels=8,
            cond_codebook=64,
        ),
        "windows": DEMO_WINDOWS,
    },
}

_CAPTIONS = [
    CAPTION,
    "lofi hip hop beat with dusty drums and mellow keys",
    "boom bap instrumental at 90 bpm with a jazzy sample",
    "dark drill beat with sliding 808 bass",
    "calm piano intro",
    "drums come in",
]


def random_parts(preset: str = "tiny", workdir: str | None = None, seed: int = 0) -> dict:
    """Random-weight parts of a MusicLM model, in memory: ``{"stages": {name: (Stage,
    Transformer)}, "tokenizers": TokenizerBundle, "config": {...}}`` (pass them to
    ``musiclm.generate.MusicLM(**parts)``). ``workdir`` holds the MuLaN caption tokenizer file."""
    from musiclm.codec import SoundStream, SoundStreamTokenizer
    from musiclm.lm import Transformer, get_stage
    from musiclm.mulan.model import MuLaN, train_caption_tokenizer
    from musiclm.mulan.mulan_embedder import MuLaNEmbedder
    from musiclm.quantize import MuLaNEmbedQuantizer
    from musiclm.semantic import SemanticFeatures, SemanticTokenizer
    from musiclm.tokenizers import TokenizerBundle

    p = RANDOM_PRESETS[preset]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    workdir = workdir or tempfile.mkdtemp(prefix="musiclm-random-")
    tokens = {**p["tokens"], "window_seconds": dict(p["windows"])}

    stages = {}
    for name in ("semantic", "coarse", "fine"):
        st = get_stage(name, tokens)
        stages[name] = (st, Transformer(st.model_config(p["lm"])).eval())

    codec_model = SoundStream(p["codec"]).eval()
    with torch.no_grad():  # random codebooks of unit scale, so that different codes sound different
        codec_model.quantizer.codebooks.normal_(generator=g)
    codec = SoundStreamTokenizer(model=codec_model)

    feats = SemanticFeatures.from_config({"type": "mfcc", "rate": p["tokens"]["semantic_rate"]})
    centroids = torch.randn(p["tokens"]["semantic_vocab"], feats.dim, generator=g) * 20
    semantic = SemanticTokenizer(feats, centroids)

    tok_file = train_caption_tokenizer(_CAPTIONS, os.path.join(workdir, "tokenizer.json"), vocab_size=200)
    mulan = MuLaN({"preset": "tiny", "text": {"tokenizer_file": tok_file}}).eval()
    embedder = MuLaNEmbedder(mulan)
    quant = MuLaNEmbedQuantizer(
        embedder.dim, levels=p["tokens"]["cond_levels"], codebook_size=p["tokens"]["cond_codebook"]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer vectors than codes: clipped, and it says so
        emb = torch.randn(4 * p["tokens"]["cond_codebook"], embedder.dim, generator=g)
        emb = torch.nn.functional.normalize(emb, dim=-1)
        quant.fit(emb, seed=seed)

    bundle = TokenizerBundle(
        acoustic=codec,
        semantic=semantic,
        embedder=embedder,
        quantizer=quant,
        semantic_features=feats,
        config={  # what bundle.save needs to write a loadable tokenizers.json
            "acoustic": {"type": "soundstream"},
            "semantic": {"features": {"type": "mfcc", "rate": p["tokens"]["semantic_rate"]}},
            "mulan": {"type": "mulan"},
            "quantizer": {"levels": p["tokens"]["cond_levels"], "codebook_size": p["tokens"]["cond_codebook"]},
        },
    )
    return {"stages": stages, "tokenizers": bundle, "config": {"tokens": tokens, "windows": dict(p["windows"])}}


# ------------------------------------------------------------------------------------------ long piece


def long_piece_report(model, result, caption: str) -> dict:
    """Figures of one long candidate (issue 12's goal for a long piece)."""
    from musiclm.audio import MelConfig, log_mel
    from musiclm.generate import score_candidates

    wav, sr = result.wavs[0], result.sample_rate
    hop = max(1, sr // 100)
    mel = log_mel(wav, MelConfig(sample_rate=sr, n_fft=1024, hop_length=hop, n_mels=80))  # [M, F]
    d = (mel[:, 1:] - mel[:, :-1]).abs().mean(0).numpy()  # distance between frame f and f + 1
    # per stage: the frame pairs around the starts of its windows' sampled spans vs all other pairs
    bounds, ratios = {}, {}
    for name in ("semantic", "coarse", "fine"):
        bounds[name] = [w["sampled_from"] for w in result.windows[name][1:]]
        edge = np.zeros(len(d), dtype=bool)
        for t in bounds[name]:
            f = int(round(t * sr / hop))
            edge[max(0, f - 1) : min(len(d), f + 1)] = True
        across = float(d[edge].mean()) if edge.any() else float("nan")
        inside = float(d[~edge].mean())
        ratios[name] = {
            "across": across,
            "inside": inside,
            "ratio": across / inside,
            "boundaries": int(len(bounds[name])),
        }
    sem = result.tokens["semantic"][0]
    sem_window = int(model.stages["semantic"][0].semantic_frames)
    rms, cos = [], []
    starts = [0.0] + bounds["semantic"] + [result.duration]
    for a, b in zip(starts, starts[1:]):
        seg = wav[int(a * sr) : int(b * sr)]
        rms.append(float(20 * np.log10(max(float(seg.pow(2).mean().sqrt()), 1e-9))))
        cos.append(float(score_candidates(model.tokenizers.embedder, seg[None], sr, [caption])[0]))
    longest = longest_repeat(sem)
    return {
        "seconds": result.duration,
        "semantic_windows": len(result.windows["semantic"]),
        "mel_distance_per_stage": ratios,  # mean |log-mel| step across window starts vs inside windows
        "boundary_ratio": max(r["ratio"] for r in ratios.values() if r["boundaries"])
        if any(r["boundaries"] for r in ratios.values())
        else float("nan"),
        "boundary_ratio_goal": 1.2,
        "longest_exact_semantic_repeat_tokens": longest,
        "semantic_window_tokens": sem_window,
        "repeat_goal_met": longest <= sem_window,
        "window_rms_db": rms,
        "window_mulan_cosine": cos,
    }


def longest_repeat(seq: np.ndarray) -> int:
    """Length of the longest run of tokens that occurs twice (possibly overlapping) in ``seq``
    (binary search on the length with a set of hashed windows; O(n log n))."""
    seq = np.asarray(seq).reshape(-1)
    n = len(seq)

    def has_repeat(k: int) -> bool:
        seen = set()
        for i in range(n - k + 1):
            key = seq[i : i + k].tobytes()
            if key in seen:
                return True
            seen.add(key)
        return False

    lo, hi = 0, n - 1  # lo: a repeat of this length exists
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if has_repeat(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


# ------------------------------------------------------------------------------------------ run


def _timed(model, **kw) -> tuple[float, object]:
    t = time.perf_counter()
    res = model.generate(CAPTION, progress=False, **kw)
    return time.perf_counter() - t, res


def run(
    model: str | None = None,
    preset: str = "demo",
    duration: float = 10.0,
    num_samples: int = 4,
    cache_duration: float | None = None,
    long_duration: float = 0.0,
    threads: int | None = None,
    seed: int = 0,
    skip: str | list | None = None,
) -> dict:
    """All figures as one dict (see the module docstring). ``model``: a ``musiclm package``
    directory; without it random parts of ``preset`` ("demo" or "tiny"). ``cache_duration``:
    seconds for the cache and batching comparisons (default ``duration``). ``long_duration`` > 0
    adds the long-piece check (300 for issue 12's five minutes). ``skip``: measurements left out
    (comma-separated or a list of ``rtf``, ``kv_cache``, ``batching``)."""
    from musiclm.generate import MusicLM

    if threads:
        torch.set_num_threads(int(threads))
    out: dict = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "caption": CAPTION,
    }
    if model:
        lm = MusicLM.from_pretrained(model)
        out["model"] = model
    else:
        with tempfile.TemporaryDirectory() as tmp:
            lm = MusicLM(**random_parts(preset, tmp, seed=seed))
        out["model"] = f"random {preset}-size parts (no model given): speed figures only"
    out["stages"] = {
        k: {"window_seconds": st.window_seconds, "params": m.num_params(), "preset_d_model": m.cfg.d_model}
        for k, (st, m) in lm.stages.items()
    }

    skip = set(skip.split(",") if isinstance(skip, str) else skip or ())
    unknown = skip - {"rtf", "kv_cache", "batching"}
    if unknown:
        raise ValueError(f"skip: unknown measurements {sorted(unknown)} (rtf, kv_cache, batching)")
    if "rtf" not in skip:
        out["rtf"] = _rtf(lm, duration, num_samples, seed)
    cd = float(cache_duration or duration)
    if "kv_cache" not in skip:
        out["kv_cache"] = _kv_cache(lm, cd, seed)
    if "batching" not in skip:
        out["batching"] = _batching(lm, cd, num_samples, seed)
    if long_duration and long_duration > 0:
        t, cpu = time.perf_counter(), time.process_time()
        res = lm.generate(CAPTION, duration=float(long_duration), num_samples=1, seed=seed, progress=False)
        out["long_piece"] = {
            "wall_seconds": time.perf_counter() - t,
            "cpu_seconds": time.process_time() - cpu,
            **long_piece_report(lm, res, CAPTION),
        }
    return out


def _rtf(lm, duration: float, num_samples: int, seed: int) -> dict:
    cpu = time.process_time()
    wall, res = _timed(lm, duration=duration, num_samples=num_samples, seed=seed)
    cpu = time.process_time() - cpu
    return {
        "duration": duration,
        "num_samples": num_samples,
        "wall_seconds": wall,
        "cpu_seconds": cpu,  # this process's CPU time: on a shared machine wall time also counts waiting
        "rtf_cpu": cpu / duration,
        "per_stage": {k: v / duration for k, v in res.timings.items() if k != "total"},
        "total": res.rtf,
        "sampling": res.request["sampling"],
    }


def _kv_cache(lm, cd: float, seed: int) -> dict:
    t_cache, _ = _timed(lm, duration=cd, num_samples=1, seed=seed)
    t_nocache, _ = _timed(lm, duration=cd, num_samples=1, seed=seed, use_cache=False)
    return {
        "duration": cd,
        "num_samples": 1,
        "cached_seconds": t_cache,
        "uncached_seconds": t_nocache,
        "speedup": t_nocache / t_cache,
        "goal": 5.0,
    }


def _batching(lm, cd: float, num_samples: int, seed: int) -> dict:
    t_batch, _ = _timed(lm, duration=cd, num_samples=num_samples, seed=seed)
    t_seq = sum(_timed(lm, duration=cd, num_samples=1, seed=seed + i)[0] for i in range(num_samples))
    return {
        "duration": cd,
        "num_samples": num_samples,
        "one_batch_seconds": t_batch,
        "sequential_seconds": t_seq,
        "speedup": t_seq / t_batch,
        "goal": 2.0,
    }


if __name__ == "__main__":
    import json
    import sys

    kw = dict(a.split("=", 1) for a in sys.argv[1:])
    print(json.dumps(run(**{k: (float(v) if v.replace(".", "", 1).isdigit() else v) for k, v in kw.items()}), indent=2))
