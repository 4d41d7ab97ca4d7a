"""Evaluation sets and their generations: held-out captions in, wavs + an index out.

An evaluation set is a list of real clips with captions (and whatever labels they carry: ``bpm``,
``style``, ``mood``):

* :func:`manifest_items`: the held-out split of any manifest (``split`` field, else
  :func:`musiclm.data.manifest.split_for`);
* :func:`musiccaps_items`: MusicCaps as the paper uses it -- the CSV (``ytid,start_s,end_s,
  aspect_list,caption,...``) plus a folder of the user's own downloads; rows without a file are
  listed and skipped, not fatal (the dataset is YouTube ids; many go missing).

:func:`generate_eval_set` generates for each caption ``num_samples`` candidates with a fixed seed
(the same seed for every caption) and writes every candidate in **generation order** (``cand1.wav``
is the un-reranked candidate 1) with the MuLaN scores and the rank order, plus a batch of
unconditional generations, into ``<out>/`` with ``index.json``; metrics are recomputed from these
files without generating again, and a rerun resumes (items whose wavs exist are kept when the model,
duration, candidates and seed are the same). Shuffled-caption generations are not generated
separately: the generation for caption j is a deterministic function of (model, caption j, seed),
so "clip i generated from caption pi(i)" is exactly the saved generation of item pi(i); the index
records the derangement ``shuffle`` used.

    out/index.json
    out/00_<clip id>/cand1.wav ... candN.wav     generation order; index: scores, rank order
    out/unconditional/cand1.wav ...
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from musiclm.logs import get_logger

log = get_logger(__name__)

__all__ = [
    "EvalItem",
    "bpm_from_caption",
    "manifest_items",
    "musiccaps_items",
    "load_real",
    "generate_eval_set",
    "load_index",
    "INDEX_FILE",
]

INDEX_FILE = "index.json"
LABELS = ("bpm", "style", "mood")
_BPM_RE = re.compile(r"(\d{2,3}(?:\.\d+)?)\s*(?:bpm|beats per minute)", re.IGNORECASE)


@dataclass
class EvalItem:
    """One real clip of an evaluation set."""

    id: str
    caption: str
    audio: str
    start: float | None = None
    end: float | None = None
    labels: dict = field(default_factory=dict)  # bpm / style / mood when known


def bpm_from_caption(caption: str) -> float | None:
    """The tempo a caption names ("... 72 BPM ...", "72bpm"), or None."""
    m = _BPM_RE.search(caption or "")
    return float(m.group(1)) if m else None


def _labels(extra: dict, caption: str) -> dict:
    out = {k: extra[k] for k in LABELS if extra.get(k) not in (None, "")}
    if "bpm" in out:
        try:
            out["bpm"] = float(out["bpm"])
        except (TypeError, ValueError):
            out.pop("bpm")
    if "bpm" not in out and bpm_from_caption(caption) is not None:
        out["bpm"] = bpm_from_caption(caption)
    return out


def _items(clips) -> list[EvalItem]:
    return [EvalItem(c.id, c.caption, c.audio, c.start, c.end, _labels(c.extra, c.caption)) for c in clips]


def manifest_items(manifest: str, split: str | None = "eval", limit: int | None = None) -> list[EvalItem]:
    """Clips of ``split`` (None or "all": every clip) in manifest order, at most ``limit``."""
    from musiclm.data.manifest import read_manifest

    clips = [c for c in read_manifest(manifest) if split in (None, "all") or c.split == split]
    return _items(clips[:limit] if limit else clips)


def musiccaps_items(csv_path: str, audio_dir: str, limit: int | None = None) -> tuple[list[EvalItem], list[str]]:
    """(items, missing ytids) of a MusicCaps-style CSV with the clips found under ``audio_dir``
    (``<ytid>.<ext>``, ``<ytid>_...``, yt-dlp's ``<title> [<ytid>].<ext>``; see
    :func:`musiclm.data.manifest.from_csv`). Every row is evaluation data, as in the paper."""
    import tempfile

    from musiclm.data.manifest import from_csv, read_manifest

    stats: dict = {}
    with tempfile.TemporaryDirectory(prefix="musiccaps-") as tmp:
        path = os.path.join(tmp, "manifest.jsonl")
        from_csv(csv_path, path, audio_dir=audio_dir, on_missing="skip", stats=stats)
        clips = read_manifest(path)
    items = _items(clips[:limit] if limit else clips)
    return items, list(stats.get("missing") or [])


def load_real(item: EvalItem | dict, sample_rate: int, seconds: float | None = None) -> torch.Tensor:
    """The real clip, mono at ``sample_rate``, its first ``seconds`` (from ``start``) when longer."""
    from musiclm.audio import load_audio

    d = asdict(item) if isinstance(item, EvalItem) else item
    start, end = d.get("start"), d.get("end")
    wav, _ = load_audio(d["audio"], sample_rate, start=start, end=end, allow_silent=True)
    if seconds:
        wav = wav[..., : int(round(seconds * sample_rate))]
    return wav.float()


def _wav_write(path: str, wav: torch.Tensor, sr: int) -> None:
    import io

    import soundfile as sf

    from musiclm.data import storage

    buf = io.BytesIO()
    sf.write(buf, wav.detach().cpu().float().clamp(-1, 1).numpy(), int(sr), format="WAV", subtype="PCM_16")
    storage.write_bytes_atomic(path, buf.getvalue())


def _slug(i: int, clip_id: str) -> str:
    return f"{i:02d}_" + re.sub(r"[^A-Za-z0-9_-]+", "_", clip_id)[:60]


def load_index(out_dir: str) -> dict | None:
    """The ``index.json`` of a generated evaluation set, or None."""
    import json

    path = os.path.join(out_dir, INDEX_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _settings(model, duration: float, num_samples: int, seed: int) -> dict:
    cfg = getattr(model, "config", {}) or {}
    return {
        "model": getattr(model, "directory", None),
        "fingerprint_hash": cfg.get("fingerprint_hash"),
        "duration": float(duration),
        "num_samples": int(num_samples),
        "seed": int(seed),
    }


def _generate_item(
    model, i: int, item: EvalItem, out_dir: str, num_samples: int, duration: float, seed: int, progress: bool
) -> dict:
    """Generate one caption's candidates into ``out_dir/<slug>/cand<g>.wav``; return its index record."""
    t0 = time.perf_counter()
    res = model.generate(item.caption, duration=duration, num_samples=num_samples, seed=seed, progress=progress)
    sub = _slug(i, item.id)
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    by_gen = {}  # generation index -> (wav, score)
    for r, g in enumerate(res.order):
        by_gen[g] = (res.wavs[r], res.scores[r])
    files = []
    for g in range(num_samples):
        name = f"cand{g + 1}.wav"
        _wav_write(os.path.join(out_dir, sub, name), by_gen[g][0], res.sample_rate)
        files.append(name)
    return {
        "id": item.id,
        "caption": item.caption,
        "labels": item.labels,
        "real": {"audio": item.audio, "start": item.start, "end": item.end},
        "dir": sub,
        "files": files,
        "scores": [by_gen[g][1] for g in range(num_samples)],
        "rank_order": [int(g) for g in res.order],
        "first": files[0],
        "best": files[res.order[0]],
        "sample_rate": res.sample_rate,
        "timings_seconds": res.timings,
        "wall_seconds": round(time.perf_counter() - t0, 2),
    }


def _generate_unconditional(model, a: int, b: int, out_dir: str, duration: float, seed: int, progress: bool) -> dict:
    """Unconditional candidates a..b-1 (one batch, seed + a) into ``out_dir/unconditional/``."""
    t0 = time.perf_counter()
    res = model.generate(unconditional=True, duration=duration, num_samples=b - a, seed=seed + a, progress=progress)
    os.makedirs(os.path.join(out_dir, "unconditional"), exist_ok=True)
    for r, g in enumerate(res.order):
        _wav_write(os.path.join(out_dir, f"unconditional/cand{a + g + 1}.wav"), res.wavs[r], res.sample_rate)
    files = [f"unconditional/cand{a + g + 1}.wav" for g in range(b - a)]
    wall = round(time.perf_counter() - t0, 2)
    return {"files": files, "timings": res.timings, "sample_rate": res.sample_rate, "wall_seconds": wall}


# Worker processes of generate_eval_set(workers > 1): each loads the package once.
_WORKER_MODEL = None


def _worker_init(model_dir: str, threads: int) -> None:
    global _WORKER_MODEL
    from musiclm.generate import MusicLM

    torch.set_num_threads(threads)
    _WORKER_MODEL = MusicLM.from_pretrained(model_dir)


def _run_task(model, task: tuple) -> tuple:
    """("item" | "uncond", key, args) -> (kind, key, its result) with ``model``."""
    kind, key, args = task
    fn = _generate_item if kind == "item" else _generate_unconditional
    return kind, key, fn(model, *args)


def _worker_run(task: tuple) -> tuple:
    return _run_task(_WORKER_MODEL, task)


def generate_eval_set(
    model,
    items: Sequence[EvalItem],
    out_dir: str,
    *,
    num_samples: int = 4,
    duration: float = 10.0,
    seed: int = 0,
    unconditional: int | None = None,
    progress: bool = False,
    workers: int = 1,
) -> dict:
    """Generate the set (see the module docstring) and return its index (also ``out_dir/index.json``).

    ``model`` is a :class:`musiclm.generate.MusicLM`; ``unconditional`` clips (default: one per item)
    come in batches of ``num_samples``. Items already in an index of the same settings with their
    wavs on disk are not generated again. ``workers > 1`` generates in that many processes, each
    loading ``model.directory`` once with this process's torch thread count (on a CPU, one thread per
    process over all cores beats one process with several threads at these model sizes); every
    generation depends only on (model, caption, seed), so the files are the same for any ``workers``."""
    from musiclm.data import storage
    from musiclm.eval.mcc import derangement

    os.makedirs(out_dir, exist_ok=True)
    settings = _settings(model, duration, num_samples, seed)
    old = load_index(out_dir)
    done: dict[str, dict] = {}
    old_uncond = None
    if old is not None:
        if {k: old.get(k) for k in settings} == settings:
            done = {
                it["id"]: it
                for it in old.get("items", [])
                if all(os.path.isfile(os.path.join(out_dir, it["dir"], f)) for f in it["files"])
            }
            u = old.get("unconditional") or {}
            if u.get("files") and all(os.path.isfile(os.path.join(out_dir, f)) for f in u["files"]):
                old_uncond = u
        else:
            log.warning("%s: index of other settings (%s); generating again", out_dir, settings)
    index = {
        "format": "musiclm-eval-set",
        "version": 1,
        **settings,
        "sampling": {k: v.to_dict() for k, v in model.default_sampling.items()},
        "sample_rate": None,
        "items": [],
        "unconditional": None,
        "shuffle": derangement(len(items), seed).tolist(),
        "shuffle_note": "the shuffled-caption generation for item i is the generation of item shuffle[i]: "
        "same model, caption and seed give the same audio",
    }
    recs: dict[int, dict] = {}

    def save() -> None:
        index["items"] = [recs[i] for i in sorted(recs)]
        storage.write_json_atomic(os.path.join(out_dir, INDEX_FILE), index, indent=1)

    tasks: list[tuple] = []
    for i, item in enumerate(items):
        rec = done.get(item.id)
        if rec is not None and rec.get("caption") == item.caption:
            recs[i] = rec
            index["sample_rate"] = index["sample_rate"] or rec.get("sample_rate")
        else:
            tasks.append(("item", i, (i, item, out_dir, num_samples, duration, seed, progress)))
    n_uncond = len(items) if unconditional is None else int(unconditional)
    uncond_parts: dict[int, dict] = {}
    if n_uncond > 0:
        if old_uncond is not None and len(old_uncond["files"]) == n_uncond:
            index["unconditional"] = old_uncond
        else:
            step = max(1, min(64, num_samples))  # MusicLM.generate takes at most 64 candidates per call
            for a in range(0, n_uncond, step):
                tasks.append(("uncond", a, (a, min(n_uncond, a + step), out_dir, duration, seed, progress)))

    def collect(kind: str, key: int, out: dict) -> None:
        index["sample_rate"] = out["sample_rate"]
        if kind == "uncond":
            uncond_parts[key] = out
            return
        recs[key] = out
        save()
        log.info("eval set: %d/%d %s (%.1f s)", len(recs), len(items), out["id"], out["wall_seconds"])

    if workers > 1 and len(tasks) > 1:
        import multiprocessing

        if not getattr(model, "directory", None):
            raise ValueError("generate_eval_set(workers > 1) needs a model loaded from a package directory")
        from concurrent.futures import ProcessPoolExecutor, as_completed

        n = min(int(workers), len(tasks))
        log.info("eval set: %d generations in %d worker processes", len(tasks), n)
        with ProcessPoolExecutor(
            n,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(model.directory, torch.get_num_threads()),
        ) as pool:
            for fut in as_completed([pool.submit(_worker_run, t) for t in tasks]):
                collect(*fut.result())
    else:
        for task in tasks:
            collect(*_run_task(model, task))
    if uncond_parts:
        parts = [uncond_parts[a] for a in sorted(uncond_parts)]
        index["unconditional"] = {
            "files": [f for p in parts for f in p["files"]],
            "timings_seconds": [p["timings"] for p in parts],
            "wall_seconds": round(sum(p["wall_seconds"] for p in parts), 2),
        }
    save()
    return index


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """float32 mono samples and rate of a wav written here."""
    import soundfile as sf

    x, sr = sf.read(path, dtype="float32", always_2d=False)
    if x.ndim == 2:
        x = x.mean(axis=1)
    return x, int(sr)
