"""``musiclm eval retrieval``: text<->audio retrieval and a tempo probe for any AudioTextEmbedder.

On a held-out split (audio shards or a manifest) every clip is embedded once as audio (the whole
clip: windows averaged by ``AudioTextEmbedder.embed_audio``) and once as its caption. With the
similarity matrix ``S[i, j] = text_i . audio_j``:

* text->audio: rank of audio ``i`` among all audios for text ``i``; audio->text likewise.
  ``rank = 1 + #{others scored strictly higher}`` (ties count for the query: identical captions
  are not punished). Recall@1/5/10, median and mean rank; chance Recall@K = K/N.
* a PNG of ``S`` for 32 eval pairs (diagonal = true pairs).
* optionally (``--quantizer DIR|fit``) the MuLaNEmbedQuantizer's reconstruction cosine on eval
  audio and text embeddings and how often text and audio of the same clip share tokens.
* a tempo probe: ridge regression (``RidgeCV`` over a grid of alphas, features standardised) from
  the audio embedding to BPM with K-fold cross-validation; MAE in BPM next to the MAE of always
  predicting the training folds' mean BPM. BPM comes from the item's attributes (``bpm`` in the
  manifest record or in the shard json / json ``tags``).

    musiclm eval retrieval --embedder models/mulan --data shards/rapbeats/audio --out runs/eval
    python -m musiclm.eval.retrieval --embedder clap:laion/clap-htsat-unfused --data data/rapbeats/manifest.jsonl

``--embedder``: a MuLaN directory (``save_mulan``), an exported ``X.safetensors`` of a mulan run,
``mulan:DIR``, ``clap:ID_OR_DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from musiclm.logs import get_logger

log = get_logger(__name__)

__all__ = [
    "load_embedder",
    "load_items",
    "retrieval_metrics",
    "tempo_probe",
    "quantizer_report",
    "plot_similarity",
    "evaluate_retrieval",
    "add_arguments",
    "run_from_args",
    "main",
]


# --------------------------------------------------------------------------------------------
# embedders and data
# --------------------------------------------------------------------------------------------


def load_embedder(spec: Any, device: str = "cpu"):
    """An AudioTextEmbedder from ``spec``: an embedder instance, ``mulan:DIR``, ``clap:ID``, a
    directory holding a MuLaN (``config.json`` with format musiclm-mulan) or a CLAP model."""
    from musiclm.mulan.embedder import AudioTextEmbedder

    if isinstance(spec, AudioTextEmbedder):
        return spec
    if isinstance(spec, dict):
        d = dict(spec)
        if d.get("type") == "mulan":
            from musiclm.mulan.mulan_embedder import MuLaNEmbedder

            return MuLaNEmbedder(d["model"], device=d.get("device", device))
        from musiclm.mulan import build_embedder

        return build_embedder(d, device=device)
    spec = os.fspath(spec)
    if spec.endswith(".safetensors") and os.path.isfile(spec):  # `musiclm export` output
        from musiclm.mulan.mulan_embedder import MuLaNEmbedder

        return MuLaNEmbedder(spec, device=device)
    kind, _, rest = spec.partition(":")
    if kind in ("mulan", "clap") and rest and not os.path.exists(spec):
        target = rest
    else:
        kind, target = None, spec
    if kind is None and os.path.isdir(target):
        cfg_path = os.path.join(target, "config.json")
        if os.path.exists(cfg_path):
            with open(cfg_path) as f:
                meta = json.load(f)
            kind = "mulan" if meta.get("format") == "musiclm-mulan" or "mulan" in str(meta.get("kind", "")) else "clap"
    if kind == "mulan":
        from musiclm.mulan.mulan_embedder import MuLaNEmbedder

        return MuLaNEmbedder(target, device=device)
    from musiclm.mulan.clap import ClapEmbedder

    return ClapEmbedder(target, device=device)


def tag_of(record: dict, name: str) -> Any:
    """Field ``name`` of a manifest record / shard json: top level, else ``tags``, else ``attributes``."""
    for src in (record, record.get("tags") or {}, record.get("attributes") or {}):
        if isinstance(src, dict) and src.get(name) is not None:
            return src[name]
    return None


def bpm_of(record: dict) -> float | None:
    """The ``bpm`` of a manifest record / shard json, when it is a finite number."""
    v = tag_of(record, "bpm")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def _items_from_manifest(path: str, split: str | None, sample_rate: int) -> list[dict]:
    from musiclm.audio import load_audio
    from musiclm.data.manifest import read_manifest

    items = []
    for clip in read_manifest(path):
        if split and clip.split != split:
            continue
        try:
            wav, _ = load_audio(clip.audio, sample_rate, start=clip.start, end=clip.end, allow_silent=True)
        except Exception as e:  # recorded, not fatal
            log.warning("retrieval: skipping %s: %s", clip.id, e)
            continue
        rec = dict(clip.extra)
        items.append({"id": clip.id, "caption": clip.caption, "wav": wav.float(), "bpm": bpm_of(rec)})
    return items


def _items_from_shards(source: Any, split: str | None, sample_rate: int) -> list[dict]:
    """Audio-shard samples grouped by clip (segments concatenated in time order)."""
    from musiclm.audio import decode_bytes
    from musiclm.data.shards import shard_reader

    clips: OrderedDict[str, dict] = OrderedDict()
    for s in shard_reader(source, split or "eval", shuffle=0, rank=0, world_size=1):
        js = s.get("json") or {}
        cid = str(js.get("clip_id") or s["__key__"].split("__")[0])
        try:
            wav, _ = decode_bytes(s["flac"], f"{s['__key__']}.flac", sample_rate, allow_silent=True)
        except Exception as e:
            log.warning("retrieval: skipping %s: %s", s.get("__key__"), e)
            continue
        c = clips.setdefault(cid, {"id": cid, "caption": js.get("caption"), "parts": [], "bpm": bpm_of(js)})
        c["parts"].append((float(js.get("start") or 0.0), wav.float()))
    items = []
    for c in clips.values():
        if not isinstance(c["caption"], str):
            continue
        parts = [w for _, w in sorted(c.pop("parts"), key=lambda p: p[0])]
        c["wav"] = torch.cat(parts)
        items.append(c)
    return items


def load_items(
    data: Any, split: str | None = "eval", sample_rate: int = 16000, max_items: int | None = None
) -> list[dict]:
    """Eval items ``{"id", "caption", "wav" (float32 [T] at sample_rate), "bpm" (or None)}`` from
    a manifest (``.jsonl``), an audio shard directory, a shard URL or a list of shard URLs."""
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], dict):
        items = list(data)
    elif isinstance(data, str) and (data.endswith(".jsonl") or data.endswith(".json")):
        items = _items_from_manifest(data, split, sample_rate)
    else:
        items = _items_from_shards(data, split, sample_rate)
    if max_items:
        items = items[: int(max_items)]
    return items


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _ranks(sim: np.ndarray) -> np.ndarray:
    """1-based rank of the diagonal entry in each row (ties in the query's favour)."""
    diag = np.diag(sim)[:, None]
    return 1 + (sim > diag).sum(axis=1)


def retrieval_metrics(text_emb: np.ndarray, audio_emb: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@K, median/mean rank in both directions for paired rows of text/audio embeddings."""
    t = np.asarray(text_emb, np.float64)
    a = np.asarray(audio_emb, np.float64)
    sim = t @ a.T
    n = sim.shape[0]
    out: dict[str, Any] = {"n": int(n)}
    for name, s in (("text_to_audio", sim), ("audio_to_text", sim.T)):
        r = _ranks(s)
        d = {f"R@{k}": float((r <= k).mean()) for k in ks}
        d["median_rank"] = float(np.median(r))
        d["mean_rank"] = float(r.mean())
        out[name] = d
    out["chance"] = {f"R@{k}": min(1.0, k / n) for k in ks}
    out["chance"]["median_rank"] = (n + 1) / 2
    k = 10 if 10 in ks else max(ks)
    out[f"text_to_audio_R@{k}_over_chance"] = out["text_to_audio"][f"R@{k}"] / min(1.0, k / n)
    out["mean_positive_similarity"] = float(np.diag(sim).mean())
    out["mean_negative_similarity"] = float((sim.sum() - np.trace(sim)) / max(1, n * n - n))
    return out


def tempo_probe(audio_emb: np.ndarray, bpm: Sequence[float], folds: int = 5, seed: int = 0) -> dict:
    """Cross-validated ridge regression embedding -> BPM. Returns MAE (BPM), the mean-predictor
    baseline MAE, R^2 and the chosen alphas."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(audio_emb, np.float64)
    y = np.asarray(bpm, np.float64)
    n = len(y)
    folds = int(min(folds, n))
    if n < 4 or folds < 2:
        return {"n": int(n), "error": "too few items with a bpm for a cross-validated probe"}
    pred = np.zeros(n)
    base = np.zeros(n)
    alphas = []
    for tr, te in KFold(folds, shuffle=True, random_state=seed).split(X):
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))
        model.fit(X[tr], y[tr])
        pred[te] = model.predict(X[te])
        base[te] = y[tr].mean()
        alphas.append(float(model[-1].alpha_))
    mae = float(np.abs(pred - y).mean())
    ss_res = float(((pred - y) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    return {
        "n": int(n),
        "folds": folds,
        "mae_bpm": mae,
        "baseline_mae_bpm": float(np.abs(base - y).mean()),
        "r2": 1.0 - ss_res / ss_tot,
        "alphas": alphas,
        "bpm_range": [float(y.min()), float(y.max())],
    }


def quantizer_report(quantizer, audio_emb: np.ndarray, text_emb: np.ndarray) -> dict:
    """How the MuLaNEmbedQuantizer treats eval embeddings: reconstruction cosine of the audio
    embeddings (what it was fitted on) and of the text embeddings (what generation feeds it), and
    how often the text and the audio embedding of the same clip get the same token, per
    namespace: at level 1, averaged over levels, and the whole namespace's tokens."""
    a = torch.as_tensor(np.asarray(audio_emb, np.float32))
    t = torch.as_tensor(np.asarray(text_emb, np.float32))
    ca, ct = quantizer.encode(a).long(), quantizer.encode(t).long()  # [N, ns, L]
    same = (ca == ct).float()
    out: dict[str, Any] = {
        "reconstruction_cosine_audio": quantizer.reconstruction_cosine(a),
        "reconstruction_cosine_text": quantizer.reconstruction_cosine(t),
        "shared_tokens": {},
        "config": quantizer.config(),
        "fitted_on": int(getattr(quantizer, "fitted_on", 0)),
    }
    for i, ns in enumerate(quantizer.namespaces):
        out["shared_tokens"][ns] = {
            "level_1": float(same[:, i, 0].mean()),
            "all_levels_mean": float(same[:, i].mean()),
            "whole_namespace": float(same[:, i].all(dim=-1).float().mean()),
        }
    out["shared_tokens"]["mean_level_1"] = float(same[:, :, 0].mean())
    out["shared_tokens"]["mean_all_levels"] = float(same.mean())
    # what chance would give at level 1: the probability two random clips share it
    perm = torch.roll(torch.arange(ca.shape[0]), 1)
    out["shared_tokens"]["level_1_between_different_clips"] = float((ca[:, :, 0] == ct[perm][:, :, 0]).float().mean())
    return out


def _load_or_fit_quantizer(
    quantizer: Any, emb, data: Any, split_train: str, max_items: int | None, codebook_size: int | None
):
    from musiclm.quantize import MuLaNEmbedQuantizer

    if isinstance(quantizer, MuLaNEmbedQuantizer):
        return quantizer, None
    if isinstance(quantizer, str) and quantizer != "fit":
        return MuLaNEmbedQuantizer.load(quantizer), None
    # fit on the audio embeddings of the training split, as the tokenization job does
    items = load_items(data, split_train, emb.sample_rate, max_items)
    audio, _ = _embed(emb, items, with_text=False)
    from musiclm.quantize import auto_codebook_size

    size = int(codebook_size) if codebook_size else auto_codebook_size(len(audio))
    q = MuLaNEmbedQuantizer.from_preset(emb.dim, codebook_size=size).fit(audio)
    return q, len(items)


def plot_similarity(sim: np.ndarray, captions: Sequence[str], path: str, title: str = "") -> str:
    """Heatmap of a text x audio similarity matrix with caption labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = sim.shape[0]
    fig, ax = plt.subplots(figsize=(4 + 0.32 * n, 2 + 0.3 * n))
    im = ax.imshow(sim, cmap="viridis", aspect="auto")
    best = sim.argmax(axis=1)
    ax.scatter(best, np.arange(n), marker="x", color="red", s=14, label="best audio per text")
    ax.scatter(np.arange(n), np.arange(n), marker="o", facecolors="none", edgecolors="white", s=22, label="true pair")
    labels = [(c[:60] + "...") if len(c) > 63 else c for c in captions]
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=6)
    ax.set_xticks(range(n))
    ax.set_xticklabels([str(i) for i in range(n)], fontsize=6)
    ax.set_xlabel("audio (eval clip index)")
    ax.set_ylabel("caption")
    ax.set_title(title or "text x audio cosine similarity", fontsize=9)
    ax.legend(loc="upper right", fontsize=6, framealpha=0.6)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------


def _embed(
    embedder, items: list[dict], batch: int = 16, with_text: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """Audio and text embeddings of the items (audio of equal length batched together)."""
    audio = [None] * len(items)
    by_len: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_len.setdefault(int(it["wav"].shape[-1]), []).append(i)
    for idx in by_len.values():
        for s in range(0, len(idx), batch):
            chunk = idx[s : s + batch]
            wav = torch.stack([torch.as_tensor(items[i]["wav"]).float() for i in chunk])
            emb = embedder.embed_audio(wav)
            for j, i in enumerate(chunk):
                audio[i] = np.asarray(emb[j], np.float32)
    if not with_text:
        return np.stack(audio), None
    text = np.asarray(embedder.embed_text([it["caption"] for it in items]), np.float32)
    return np.stack(audio), text


def evaluate_retrieval(
    embedder: Any,
    data: Any,
    *,
    split: str | None = "eval",
    out_dir: str | None = None,
    max_items: int | None = None,
    plot_pairs: int = 32,
    probe_folds: int = 5,
    seed: int = 0,
    device: str = "cpu",
    quantizer: Any = None,
    train_split: str = "train",
    quantizer_codebook: int | None = None,
    probe_splits: Sequence[str] | None = None,
) -> dict:
    """Retrieval metrics + tempo probe of ``embedder`` on ``data``'s ``split``.

    Writes ``retrieval.json`` and ``similarity.png`` (``plot_pairs`` eval pairs) to ``out_dir``
    when given. Returns the results dict: ``text_to_audio`` / ``audio_to_text`` (R@1/5/10,
    median_rank, mean_rank), ``chance``, ``text_to_audio_R@10_over_chance``, ``tempo_probe``
    (mae_bpm, baseline_mae_bpm, r2), ``embedder`` (fingerprint name/dim), timings.

    ``quantizer``: a MuLaNEmbedQuantizer, its directory, or ``"fit"`` (fit one on the audio
    embeddings of ``train_split``, codebook ``quantizer_codebook`` or sized to the number of
    embeddings, :func:`musiclm.quantize.auto_codebook_size`) adds
    ``quantizer``: reconstruction cosine of eval audio and text embeddings and how often text and
    audio of the same clip share tokens (:func:`quantizer_report`)."""
    t0 = time.perf_counter()
    emb = load_embedder(embedder, device=device)
    items = load_items(data, split, emb.sample_rate, max_items)
    if len(items) < 2:
        raise ValueError(f"retrieval needs at least 2 items, got {len(items)} from {data!r} split {split!r}")
    t_load = time.perf_counter() - t0
    audio, text = _embed(emb, items)
    t_embed = time.perf_counter() - t0 - t_load
    res = retrieval_metrics(text, audio)
    p_audio, p_bpm = (
        [audio[i] for i, it in enumerate(items) if it.get("bpm") is not None],
        [it["bpm"] for it in items if it.get("bpm") is not None],
    )
    for other in [sp for sp in (probe_splits or []) if sp != split]:
        extra = [it for it in load_items(data, other, emb.sample_rate) if it.get("bpm") is not None]
        if extra:
            ea, _ = _embed(emb, extra, with_text=False)
            p_audio += list(ea)
            p_bpm += [it["bpm"] for it in extra]
    if p_bpm:
        res["tempo_probe"] = tempo_probe(np.stack(p_audio), p_bpm, folds=probe_folds, seed=seed)
        res["tempo_probe"]["splits"] = sorted({split, *(probe_splits or [])} - {None})
    else:
        res["tempo_probe"] = {"n": 0, "error": "no bpm attribute on the eval items"}
    if quantizer is not None:
        q, fitted_items = _load_or_fit_quantizer(quantizer, emb, data, train_split, None, quantizer_codebook)
        res["quantizer"] = quantizer_report(q, audio, text)
        if fitted_items is not None:
            res["quantizer"]["fitted_on_split"] = {"split": train_split, "items": fitted_items}
    caps = [it["caption"] for it in items]
    res["duplicate_captions"] = len(caps) - len(set(caps))
    fp = {}
    try:
        fp = emb.fingerprint()
    except Exception as e:  # pragma: no cover
        fp = {"error": str(e)}
    res["embedder"] = {
        "name": getattr(emb, "name", type(emb).__name__),
        "dim": int(emb.dim),
        "sample_rate": int(emb.sample_rate),
        "weights_sha256": fp.get("weights_sha256"),
        "repr": repr(emb),
    }
    res["data"] = {"source": str(data) if not isinstance(data, list) else "items", "split": split, "items": len(items)}
    res["seconds"] = {"load": round(t_load, 2), "embed": round(t_embed, 2), "total": round(time.perf_counter() - t0, 2)}
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        n = min(int(plot_pairs), len(items))
        sel = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
        sim = text[sel] @ audio[sel].T
        png = plot_similarity(
            sim,
            [caps[i] for i in sel],
            os.path.join(out_dir, "similarity.png"),
            title=f"{res['embedder']['name']}: text x audio similarity, "
            f"{n} {split} pairs (R@10 t->a over all {len(items)}: "
            f"{res['text_to_audio']['R@10']:.2f})",
        )
        res["similarity_png"] = png
        res["plot_items"] = [items[i]["id"] for i in sel]
        with open(os.path.join(out_dir, "retrieval.json"), "w") as f:
            json.dump(res, f, indent=2)
    return res


# --------------------------------------------------------------------------------------------
# command line (the lead wires `musiclm eval retrieval` to add_arguments/run_from_args)
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--embedder", required=True, help="MuLaN directory, mulan:DIR or clap:ID_OR_DIR")
    p.add_argument("--data", required=True, help="audio shard directory (or shard URLs) or a manifest.jsonl")
    p.add_argument("--split", default="eval")
    p.add_argument("--out", default=None, help="directory for retrieval.json and similarity.png")
    p.add_argument("--max-items", type=int, default=None)
    p.add_argument("--plot-pairs", type=int, default=32)
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of the tempo probe")
    p.add_argument(
        "--probe-splits", default=None, help="comma-separated splits for the tempo probe (default: --split only)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--quantizer",
        default=None,
        help="MuLaNEmbedQuantizer directory, or 'fit' (fit on the train split's audio "
        "embeddings): adds reconstruction cosine and text/audio shared tokens",
    )
    p.add_argument("--train-split", default="train", help="split the 'fit' quantizer is fitted on")
    p.add_argument(
        "--quantizer-codebook",
        type=int,
        default=None,
        help="codebook size of a fitted quantizer (default: sized to the train split, "
        "musiclm.quantize.auto_codebook_size: 64 for ~1,000 clips, at most 1024)",
    )
    return p


def run_from_args(args: argparse.Namespace) -> int:
    res = evaluate_retrieval(
        args.embedder,
        args.data,
        split=args.split,
        out_dir=args.out,
        max_items=args.max_items,
        plot_pairs=args.plot_pairs,
        probe_folds=args.folds,
        seed=args.seed,
        device=args.device,
        quantizer=args.quantizer,
        train_split=args.train_split,
        quantizer_codebook=args.quantizer_codebook,
        probe_splits=args.probe_splits.split(",") if args.probe_splits else None,
    )
    print(json.dumps(res, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_arguments(argparse.ArgumentParser(prog="musiclm eval retrieval", description=__doc__.splitlines()[0]))
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
