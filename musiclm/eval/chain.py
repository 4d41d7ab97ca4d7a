"""``musiclm eval chain``: where along the chain caption -> music is the caption lost?

Conditioning reaches the stage LMs only as MuLaN text embedding -> quantizer tokens; nothing reads
numbers or words out of the caption. This measures what survives of the caption's **style** and
**tempo** at each link, on the held-out split of a token-shard folder and a packaged model:

1. **MuLaN and the quantizer** (``link1``): probes fitted on the training split and read on the
   held-out one -- a style classifier (standardised multinomial logistic regression,
   :func:`musiclm.eval.style.train_classifier`) and a BPM ridge regression -- on the audio
   embedding (``mulan.npy``), the caption's text embedding, and both quantized (one-hot of the
   semantic namespace's tokens). ``training -> inference`` rows fit on what the stage LMs trained
   on (the shards' ``cond.npy``: audio or caption tokens, ``quantizer.source``) and read the
   held-out captions' tokens (what generation feeds them); the token agreement of text and audio.
2. **conditioning tokens -> semantic tokens** (``link2``): semantic tokens sampled by the semantic
   stage from the held-out captions' tokens, from other captions' (the held-out list rotated by
   half) and unconditionally (``cond_scale`` 0); style from a classifier on token histograms
   (fitted on the true training tokens), tempo from the token novelty curve
   (:func:`musiclm.eval.tempo.estimate_token_tempo`), next to the same on the true tokens (the
   ceiling). Also a **BPM sweep** (captions that differ only in the BPM number, within two
   styles) and a **temperature x cond_scale grid**.
3. **semantic -> acoustic -> audio** (``link3``): the ``musiclm eval report`` figures on decoded
   audio (``--report``) and, with ``--audio-sweep-samples``, the BPM sweep generated to audio.

Every rate carries a 95 % bootstrap interval; Spearman correlations are pooled within a style
(ranks within each style) with the interval from resampling prompts. Writes ``chain.json``,
``chain.md`` and ``chain.png`` to ``--out``.

    musiclm eval chain --model models/rapbeats-demo --shards shards/rapbeats/tokens-<hash> \\
        --report runs/demo/report/report.json --out runs/demo/chain
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "SWEEP_CAPTIONS",
    "within_style_spearman",
    "style_probe",
    "bpm_probe",
    "one_hot_tokens",
    "token_histograms",
    "evaluate_chain",
    "render_markdown",
    "add_arguments",
    "run_from_args",
    "main",
]

# Captions that differ only in the BPM number, within one style (the demo corpus's ranges: trap
# 60-88 BPM, boom bap 80-110).
SWEEP_CAPTIONS: dict[str, tuple[str, list[int]]] = {
    "trap": ("dark trap beat with 808s, hi-hat rolls and bells, {bpm} BPM", [60, 66, 72, 78, 84, 88]),
    "boom bap": ("dusty boom bap beat with vinyl crackle and piano chords, {bpm} BPM", [80, 86, 92, 98, 104, 110]),
}


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------


def _within_style_rho(pred: np.ndarray, true: np.ndarray, styles: np.ndarray) -> float:
    """Spearman of ``pred`` and ``true`` after ranking within each style (pooled)."""
    from musiclm.eval.audio_tempo import _ranks

    ok = np.isfinite(pred) & np.isfinite(true)
    rp, rt = [], []
    for s in np.unique(styles[ok]):
        m = ok & (styles == s)
        if m.sum() >= 3 and np.ptp(pred[m]) > 0 and np.ptp(true[m]) > 0:
            rp.append(_ranks(pred[m]) / m.sum())
            rt.append(_ranks(true[m]) / m.sum())
    if not rp:
        return float("nan")
    a, b = np.concatenate(rp), np.concatenate(rt)
    return float(np.corrcoef(a - a.mean(), b - b.mean())[0, 1])


def within_style_spearman(
    pred: Sequence[float], true: Sequence[float], styles: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> dict:
    """Spearman of predicted and asked BPM within styles (ranks taken per style, then pooled), with
    a 95 % bootstrap interval over items, and the per-style values."""
    from musiclm.eval.audio_tempo import spearman
    from musiclm.eval.stats import bootstrap_ci

    p, t = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    s = np.asarray([str(x) for x in styles])
    idx = np.arange(len(p))
    ci = bootstrap_ci(lambda i: _within_style_rho(p[i], t[i], s[i]), idx, n_boot=n_boot, seed=seed)
    per = {}
    for st in sorted(set(s.tolist())):
        m = (s == st) & np.isfinite(p) & np.isfinite(t)
        per[st] = round(spearman(p[m], t[m]), 3) if m.sum() >= 3 else None
    return {"value": ci["value"], "ci95": ci["ci95"], "n": int(np.isfinite(p).sum()), "per_style": per}


def _accuracy(pred: Sequence[str], want: Sequence[str], n_boot: int, seed: int) -> dict:
    from musiclm.eval.style import label_accuracy

    return label_accuracy(pred, want, n_boot, seed)


def style_probe(xtr, ytr, xev, yev, n_boot: int = 1000, seed: int = 0) -> tuple[dict, Any]:
    """Style classifier fitted on ``(xtr, ytr)``, accuracy on ``(xev, yev)``; returns (result, clf)."""
    from musiclm.eval.style import train_classifier

    clf = train_classifier(np.asarray(xtr), list(ytr), "style", seed=seed)
    res = _accuracy(clf.predict(np.asarray(xev)), list(yev), n_boot, seed)
    res["chance"] = 1.0 / len(clf.classes)
    return res, clf


def bpm_probe(xtr, btr, xev, bev, styles_ev, n_boot: int = 1000, seed: int = 0) -> tuple[dict, Any]:
    """Ridge regression features -> BPM (alpha by CV), read on the held-out rows: MAE next to the
    training-mean predictor's, and the within-style Spearman of prediction and true BPM."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))
    model.fit(np.asarray(xtr, np.float64), np.asarray(btr, np.float64))
    pred = model.predict(np.asarray(xev, np.float64))
    bev = np.asarray(bev, np.float64)
    res = {
        "mae_bpm": round(float(np.abs(pred - bev).mean()), 3),
        "mean_predictor_mae_bpm": round(float(np.abs(np.mean(btr) - bev).mean()), 3),
        "spearman_within_style": within_style_spearman(pred, bev, styles_ev, n_boot, seed),
    }
    return res, model


def one_hot_tokens(codes: np.ndarray, codebook: int) -> np.ndarray:
    """``[N, L]`` token ids -> ``[N, L * codebook]`` one-hot features."""
    codes = np.asarray(codes, np.int64)
    n, levels = codes.shape
    out = np.zeros((n, levels * codebook), np.float32)
    out[np.arange(n)[:, None], np.arange(levels)[None] * codebook + codes] = 1.0
    return out


def token_histograms(seqs: Sequence[np.ndarray], vocab: int) -> np.ndarray:
    """Normalised unigram counts ``[N, vocab]`` of semantic token sequences."""
    out = np.zeros((len(seqs), vocab), np.float32)
    for i, s in enumerate(seqs):
        out[i] = np.bincount(np.asarray(s, np.int64), minlength=vocab)[:vocab] / max(1, len(s))
    return out


# --------------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------------


def _load_items(shards: str, split: str, max_items: int | None = None) -> list[dict]:
    from musiclm.eval.tempo import load_token_items

    items = [it for it in load_token_items(shards, split, with_mulan=True) if it["style"] is not None]
    items = [it for it in items if it["caption"] and math.isfinite(it["bpm"])]
    return items[: int(max_items)] if max_items else items


def _token_row(seqs, bpm, styles, est, n_boot, seed, classifier, vocab) -> tuple[dict, np.ndarray]:
    """Tempo (vs the caption's BPM) and style (token-histogram classifier) of semantic token sequences."""
    from musiclm.eval.tempo import summarize

    pred = np.array([est(s) for s in seqs])
    row: dict[str, Any] = {
        "tempo": summarize(pred, bpm),
        "tempo_spearman_within_style": within_style_spearman(pred, bpm, styles, n_boot, seed),
        "style": _accuracy(classifier.predict(token_histograms(seqs, vocab)), styles, n_boot, seed),
    }
    return row, pred


def evaluate_chain(
    model: str,
    shards: str,
    out: str | None = None,
    *,
    semantic: str | None = None,
    quantizer: str | None = None,
    report: str | None = None,
    split: str = "eval",
    train_split: str = "train",
    max_items: int | None = 96,
    grid_items: int = 48,
    grid_temperatures: Sequence[float] = (0.8, 1.0, 1.2),
    grid_cond_scales: Sequence[float] = (1.0, 3.0, 6.0),
    sweep_samples: int = 4,
    audio_sweep_samples: int = 0,
    audio_seconds: float = 8.0,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 32,
) -> dict:
    """The three links (module docstring) as a JSON-able dict; files under ``out`` when given.

    ``semantic`` (an exported semantic-stage ``.safetensors``) and ``quantizer`` (a directory)
    replace the package's, e.g. to measure a stage LM trained on other conditioning tokens."""
    import torch

    from musiclm.data.shards import read_index
    from musiclm.eval.retrieval import quantizer_report
    from musiclm.eval.tempo import estimate_token_tempo, following_gain, generate_semantic
    from musiclm.generate import MusicLM

    t_all = time.perf_counter()
    lm = MusicLM.from_pretrained(model)
    stage, sem_model = lm.stages["semantic"]
    if semantic:  # its own token layout (e.g. another conditioning codebook), from its metadata
        from musiclm.lm.model import load_stage_model
        from musiclm.lm.stages import get_stage
        from musiclm.weights import load_exported

        _, meta = load_exported(semantic)
        stage = get_stage("semantic", meta.get("tokens") or {}, meta.get("window_seconds"))
        sem_model = load_stage_model(semantic).eval()
    quant = lm.tokenizers.quantizer
    if quantizer:
        from musiclm.quantize import MuLaNEmbedQuantizer

        quant = MuLaNEmbedQuantizer.load(quantizer)
    embedder = lm.tokenizers.embedder
    sampling = lm.default_sampling["semantic"]
    ns, levels = stage.namespace_index, stage.layout.cond_levels
    vocab = stage.layout.semantic_vocab
    centroids = None
    if getattr(lm.tokenizers, "semantic", None) is not None:
        centroids = lm.tokenizers.semantic.centroids.numpy()
    rate = float(lm.tokenizers.semantic.frame_rate) if lm.tokenizers.semantic is not None else 25.0

    def est(toks):
        return estimate_token_tempo(toks, rate, centroids)

    train = _load_items(shards, train_split)
    items = _load_items(shards, split, max_items)
    if len(train) < 8 or len(items) < 4:
        raise ValueError(
            f"{shards}: need labelled (caption, style, bpm) samples: {len(train)} train, {len(items)} {split}"
        )
    styles_tr = [str(it["style"]) for it in train]
    styles = [str(it["style"]) for it in items]
    bpm_tr = np.array([it["bpm"] for it in train])
    bpm = np.array([it["bpm"] for it in items])

    def embed_text(captions: Sequence[str]) -> np.ndarray:
        with torch.inference_mode():
            return np.concatenate(
                [embedder.embed_text(list(captions[i : i + 64])).float().numpy() for i in range(0, len(captions), 64)]
            )

    def tokens(emb: np.ndarray) -> np.ndarray:
        return quant.encode(torch.as_tensor(emb, dtype=torch.float32)).numpy()[:, ns, :levels]

    # -- link 1: MuLaN embeddings and conditioning tokens
    t0 = time.perf_counter()
    a_tr = np.stack([it["mulan"] for it in train]).astype(np.float32)
    a_ev = np.stack([it["mulan"] for it in items]).astype(np.float32)
    t_tr = embed_text([it["caption"] for it in train])
    t_ev = embed_text([it["caption"] for it in items])
    k = int(quant.codebook_size)
    oh = lambda codes: one_hot_tokens(codes, k)  # noqa: E731
    cond_tr = np.stack([it["cond"][ns, :levels] for it in train])
    rows = [
        ("audio embedding", a_tr, a_ev),
        ("text embedding", t_tr, t_ev),
        ("audio embedding -> text embedding", a_tr, t_ev),
        ("audio tokens", oh(tokens(a_tr)), oh(tokens(a_ev))),
        ("text tokens", oh(tokens(t_tr)), oh(tokens(t_ev))),
        ("training tokens (shards) -> text tokens", oh(cond_tr), oh(tokens(t_ev))),
    ]
    link1: dict[str, Any] = {"rows": {}}
    for name, xtr, xev in rows:
        st, _ = style_probe(xtr, styles_tr, xev, styles, n_boot, seed)
        bp, _ = bpm_probe(xtr, bpm_tr, xev, bpm, styles, n_boot, seed)
        link1["rows"][name] = {"style": st, "bpm": bp}
    link1["token_agreement"] = quantizer_report(quant, a_ev, t_ev)["shared_tokens"]
    link1["training_tokens_equal_text_tokens"] = round(float((cond_tr == tokens(t_tr)).mean()), 4)
    link1["seconds"] = round(time.perf_counter() - t0, 1)

    # -- link 2: semantic tokens
    t0 = time.perf_counter()
    n_new = min(stage.semantic_frames, min(len(it["semantic"]) for it in items))
    from musiclm.eval.style import train_classifier

    clf_tok = train_classifier(token_histograms([it["semantic"] for it in train], vocab), styles_tr, "style", seed=seed)
    link2: dict[str, Any] = {
        "sampling": {"temperature": sampling.temperature, "cond_scale": sampling.cond_scale, "top_k": sampling.top_k},
        "generated_frames": n_new,
        "rows": {},
    }
    text_codes = tokens(t_ev)
    shift = max(1, len(items) // 2)

    def gen(conds, temperature=sampling.temperature, cond_scale=sampling.cond_scale, reps=1, s=seed):
        return generate_semantic(
            sem_model,
            stage,
            np.repeat(conds, reps, axis=0),
            n_new,
            cond_scale=cond_scale,
            temperature=temperature,
            top_k=sampling.top_k,
            seed=s,
            batch_size=batch_size,
        )

    true_seqs = [it["semantic"][:n_new] for it in items]
    link2["rows"]["true tokens (ceiling)"], _ = _token_row(true_seqs, bpm, styles, est, n_boot, seed, clf_tok, vocab)
    runs = {
        "caption": text_codes,
        "other caption": np.roll(text_codes, shift, axis=0),
        "unconditional": None,
    }
    preds = {}
    for name, conds in runs.items():
        seqs = gen(text_codes, cond_scale=0.0) if conds is None else gen(conds)
        row, preds[name] = _token_row(seqs, bpm, styles, est, n_boot, seed, clf_tok, vocab)
        link2["rows"][f"generated, {name}"] = row
    link2["tempo_following_gain_folded_bpm"] = following_gain(
        {"pred": preds["caption"].tolist(), "true": bpm.tolist()},
        {"pred": preds["other caption"].tolist(), "true": bpm.tolist()},
        1,
        seed=seed,
        n_boot=n_boot,
    )

    # BPM sweep on semantic tokens: captions that differ only in the number
    sweep_caps, sweep_bpm, sweep_style = [], [], []
    for style, (template, bpms) in SWEEP_CAPTIONS.items():
        for b in bpms:
            sweep_caps.append(template.format(bpm=b))
            sweep_bpm.append(float(b))
            sweep_style.append(style)
    sweep_codes = tokens(embed_text(sweep_caps))
    seqs = gen(sweep_codes, reps=sweep_samples)
    sp = np.repeat(np.array(sweep_bpm), sweep_samples)
    ss = np.repeat(np.array(sweep_style), sweep_samples)
    pred = np.array([est(s) for s in seqs])
    link2["bpm_sweep"] = {
        "captions": sweep_caps,
        "samples_per_caption": sweep_samples,
        "distinct_token_prompts": int(len({tuple(c) for c in sweep_codes.tolist()})),
        "spearman_within_style": within_style_spearman(pred, sp, ss, n_boot, seed),
        "style": _accuracy(clf_tok.predict(token_histograms(seqs, vocab)), ss.tolist(), n_boot, seed),
        "measured": [None if not math.isfinite(v) else round(float(v), 2) for v in pred],
        "asked": sp.tolist(),
        "styles": ss.tolist(),
    }

    # temperature x cond_scale grid (semantic stage: where the caption enters first)
    g_items = min(int(grid_items), len(items))
    grid = []
    for temp in grid_temperatures:
        for cs in grid_cond_scales:
            seqs = gen(text_codes[:g_items], temperature=float(temp), cond_scale=float(cs))
            row, _ = _token_row(seqs, bpm[:g_items], styles[:g_items], est, n_boot, seed, clf_tok, vocab)
            grid.append({"temperature": float(temp), "cond_scale": float(cs), **row})
    link2["grid"] = {"items": g_items, "cells": grid}
    link2["seconds"] = round(time.perf_counter() - t0, 1)

    # -- link 3: decoded audio
    t0 = time.perf_counter()
    link3: dict[str, Any] = {}
    if report:
        with open(report) as f:
            met = json.load(f).get("metrics") or {}
        link3["report"] = report
        link3["style"] = (met.get("classifiers") or {}).get("style")
        link3["mcc"] = {k: {kk: v.get(kk) for kk in ("value", "ci95", "n")} for k, v in (met.get("mcc") or {}).items()}
        link3["fad"] = met.get("fad_by_style")
        tempo = (met.get("tempo") or {}).get("fourier") or {}
        link3["tempo_fourier"] = {k: v for k, v in tempo.items() if k != "estimates"}
    if audio_sweep_samples:
        from musiclm.data.music_analysis import estimate_tempo
        from musiclm.eval.audio_tempo import fourier_tempo

        pa, pf = [], []
        for i, cap in enumerate(sweep_caps):
            res = lm.generate(
                cap, duration=audio_seconds, num_samples=audio_sweep_samples, seed=seed + i, progress=False
            )
            for j in range(res.wavs.shape[0]):
                w = res.wavs[j].float().numpy().reshape(-1)
                pa.append(estimate_tempo(w, res.sample_rate))
                pf.append(fourier_tempo(w, res.sample_rate))
        sp = np.repeat(np.array(sweep_bpm), audio_sweep_samples)
        ss = np.repeat(np.array(sweep_style), audio_sweep_samples)
        link3["bpm_sweep_audio"] = {
            "seconds_per_clip": audio_seconds,
            "samples_per_caption": audio_sweep_samples,
            "project": within_style_spearman(pa, sp, ss, n_boot, seed),
            "fourier": within_style_spearman(pf, sp, ss, n_boot, seed),
            "measured_project": [round(float(v), 2) for v in pa],
            "measured_fourier": [round(float(v), 2) for v in pf],
            "asked": sp.tolist(),
            "styles": ss.tolist(),
        }
    link3["seconds"] = round(time.perf_counter() - t0, 1)

    result = {
        "model": os.path.abspath(model),
        "semantic_model": os.path.abspath(semantic) if semantic else "package",
        "quantizer": os.path.abspath(quantizer) if quantizer else "package",
        "shards": os.path.abspath(shards),
        # what the shards' conditioning tokens quantize (the quantizer fingerprint; absent = audio)
        "cond_source": ((read_index(shards).get("fingerprints") or {}).get("quantizer") or {}).get("source", "audio"),
        "split": split,
        "items": len(items),
        "train_items": len(train),
        "chance": 1.0 / len(set(styles_tr)),
        "link1": link1,
        "link2": link2,
        "link3": link3,
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    if out:
        from musiclm.data import storage

        os.makedirs(out, exist_ok=True)
        result["png"] = plot_chain(result, os.path.join(out, "chain.png"))
        storage.write_json_atomic(os.path.join(out, "chain.json"), result, indent=1)
        storage.write_bytes_atomic(os.path.join(out, "chain.md"), render_markdown(result).encode())
    return result


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _ci(d: dict | None, fmt: str = ".2f") -> str:
    if not d or d.get("value") is None or (isinstance(d.get("value"), float) and not math.isfinite(d["value"])):
        return "n/a"
    ci = d.get("ci95")
    return f"{d['value']:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def render_markdown(r: dict) -> str:
    """chain.json -> the tables of chain.md."""
    chance = r["chance"]
    out = [
        "# Where the caption is lost: style and tempo along the chain",
        "",
        f"{r['items']} held-out samples ({r['split']}), probes fitted on {r['train_items']} training samples; "
        f"the shards' conditioning tokens from the {r['cond_source']} embedding; chance style accuracy {chance:.2f}. "
        "95 % bootstrap intervals in brackets; tempo Spearman within styles.",
        "",
        "## 1. MuLaN embedding -> conditioning tokens (probes)",
        "",
        "| features (fit -> read) | style accuracy | BPM MAE (mean predictor) | BPM Spearman |",
        "|---|---|---|---|",
    ]
    for name, row in r["link1"]["rows"].items():
        b = row["bpm"]
        out.append(
            f"| {name} | {_ci(row['style'])} | {b['mae_bpm']:.2f} ({b['mean_predictor_mae_bpm']:.2f}) | "
            f"{_ci(b['spearman_within_style'])} |"
        )
    ag = r["link1"]["token_agreement"]
    out += [
        "",
        f"Text and audio embedding of one clip share the level-1 token {ag['mean_level_1']:.2f} of the time "
        f"(different clips: {ag['level_1_between_different_clips']:.2f}) and {ag['mean_all_levels']:.2f} of all "
        f"tokens; the stage LMs' training tokens equal the captions' text tokens "
        f"{r['link1']['training_tokens_equal_text_tokens']:.2f} of the time.",
        "",
        "## 2. Conditioning tokens -> semantic tokens (semantic stage)",
        "",
        f"Sampling: {r['link2']['sampling']}; {r['link2']['generated_frames']} frames.",
        "",
        "| semantic tokens | style accuracy | tempo MAE folded (BPM) | tempo Spearman |",
        "|---|---|---|---|",
    ]
    for name, row in r["link2"]["rows"].items():
        out.append(
            f"| {name} | {_ci(row.get('style'))} | {row['tempo'].get('mae_octave_folded', float('nan')):.2f} | "
            f"{_ci(row['tempo_spearman_within_style'])} |"
        )
    g = r["link2"]["tempo_following_gain_folded_bpm"]
    sw = r["link2"]["bpm_sweep"]
    out += [
        "",
        f"Tempo error with another caption minus with the own caption (folded, BPM): {g.get('mean')} {g.get('ci95')}.",
        "",
        f"BPM sweep ({len(sw['captions'])} captions differing only in the number, {sw['samples_per_caption']} samples "
        f"each; {sw['distinct_token_prompts']} distinct token prompts): Spearman asked vs measured "
        f"{_ci(sw['spearman_within_style'])} (per style {sw['spearman_within_style']['per_style']}); style accuracy "
        f"{_ci(sw['style'])}.",
        "",
        f"### temperature x cond_scale ({r['link2']['grid']['items']} captions)",
        "",
        "| temperature | cond_scale | style accuracy | tempo MAE folded | tempo Spearman |",
        "|---|---|---|---|---|",
    ]
    for c in r["link2"]["grid"]["cells"]:
        out.append(
            f"| {c['temperature']:g} | {c['cond_scale']:g} | {_ci(c.get('style'))} | "
            f"{c['tempo'].get('mae_octave_folded', float('nan')):.2f} | {_ci(c['tempo_spearman_within_style'])} |"
        )
    l3 = r["link3"]
    out += ["", "## 3. Semantic -> acoustic -> audio", ""]
    if l3.get("style"):
        s = l3["style"]
        out.append(
            f"Style accuracy on decoded audio (musicnn classifier): generated {_ci(s.get('first'))}, other caption "
            f"{_ci(s.get('shuffled'))}, unconditional {_ci(s.get('unconditional'))}, real clips {_ci(s.get('real'))}."
        )
    if l3.get("mcc"):
        m = l3["mcc"]
        out.append(
            f"MCC: generated {_ci(m.get('first'), '.3f')}, other caption {_ci(m.get('shuffled'), '.3f')}, "
            f"real {_ci(m.get('real'), '.3f')}, real shuffled {_ci(m.get('real_shuffled'), '.3f')}."
        )
    if l3.get("fad"):
        f = l3["fad"]
        out.append(
            f"FAD within a style (musicnn): captions of the style {f['matched_mean']:.2f}, captions of other styles "
            f"{f['other_style_mean']:.2f} ({f['styles_below']} of {len(f['per_style'])} styles below)."
        )
    if l3.get("bpm_sweep_audio"):
        a = l3["bpm_sweep_audio"]
        out.append(
            f"BPM sweep on audio ({a['samples_per_caption']} x {a['seconds_per_clip']:g} s per caption): Spearman "
            f"project {_ci(a['project'])}, fourier {_ci(a['fourier'])}."
        )
    out.append("")
    return "\n".join(out)


def plot_chain(r: dict, path: str) -> str:
    """Style accuracy per link (bars with intervals) and the BPM sweep (asked vs measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    bars = [(f"L1 {k}", v["style"]) for k, v in r["link1"]["rows"].items()]
    bars += [(f"L2 {k}", v.get("style")) for k, v in r["link2"]["rows"].items()]
    st = (r["link3"].get("style") or {}) if r.get("link3") else {}
    bars += [(f"L3 audio {k}", st.get(k)) for k in ("real", "first", "shuffled", "unconditional") if st.get(k)]
    names = [b[0] for b in bars]
    vals = [b[1]["value"] if b[1] and b[1].get("value") is not None else 0.0 for b in bars]
    lo = [v - (b[1]["ci95"][0] if b[1] and b[1].get("ci95") else v) for v, b in zip(vals, bars)]
    hi = [(b[1]["ci95"][1] if b[1] and b[1].get("ci95") else v) - v for v, b in zip(vals, bars)]
    ax = axes[0]
    ax.barh(range(len(vals)), vals, xerr=[lo, hi], color="tab:blue", alpha=0.8)
    ax.axvline(r["chance"], color="k", ls="--", lw=1, label="chance")
    ax.set_yticks(range(len(vals)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("style accuracy")
    ax.legend(fontsize=8)
    ax = axes[1]
    sw = r["link2"]["bpm_sweep"]
    for style in sorted(set(sw["styles"])):
        m = [i for i, s in enumerate(sw["styles"]) if s == style]
        ax.scatter([sw["asked"][i] for i in m], [sw["measured"][i] for i in m], s=12, label=f"{style} (tokens)")
    a = (r["link3"] or {}).get("bpm_sweep_audio")
    if a:
        for style in sorted(set(a["styles"])):
            m = [i for i, s in enumerate(a["styles"]) if s == style]
            ax.scatter(
                [a["asked"][i] for i in m],
                [a["measured_fourier"][i] for i in m],
                marker="x",
                s=16,
                label=f"{style} (audio, fourier)",
            )
    lim = [55, 185]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set_xlabel("BPM in the caption")
    ax.set_ylabel("measured BPM")
    ax.set_title("BPM sweep: captions that differ only in the number")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="a `musiclm package` directory")
    p.add_argument("--shards", required=True, help="the token-shard folder the stage LMs trained on")
    p.add_argument("--out", required=True, help="folder for chain.json, chain.md, chain.png")
    p.add_argument("--semantic", default=None, help="an exported semantic-stage .safetensors instead of the package's")
    p.add_argument("--quantizer", default=None, help="a quantizer directory instead of the package's")
    p.add_argument("--report", default=None, help="report.json of `musiclm eval report` (link 3)")
    p.add_argument("--split", default="eval")
    p.add_argument("--max-items", type=int, default=96, help="held-out samples (default 96)")
    p.add_argument("--grid-items", type=int, default=48, help="captions per temperature x cond_scale cell")
    p.add_argument("--temperatures", default="0.8,1.0,1.2")
    p.add_argument("--cond-scales", default="1,3,6")
    p.add_argument("--sweep-samples", type=int, default=4, help="semantic samples per BPM-sweep caption")
    p.add_argument("--audio-sweep-samples", type=int, default=0, help="audio clips per BPM-sweep caption (0: none)")
    p.add_argument("--audio-seconds", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    return p


def run_from_args(args: argparse.Namespace) -> int:
    if args.threads:
        import torch

        torch.set_num_threads(int(args.threads))
    res = evaluate_chain(
        args.model,
        args.shards,
        args.out,
        semantic=args.semantic,
        quantizer=args.quantizer,
        report=args.report,
        split=args.split,
        max_items=args.max_items,
        grid_items=args.grid_items,
        grid_temperatures=[float(x) for x in args.temperatures.split(",") if x],
        grid_cond_scales=[float(x) for x in args.cond_scales.split(",") if x],
        sweep_samples=args.sweep_samples,
        audio_sweep_samples=args.audio_sweep_samples,
        audio_seconds=args.audio_seconds,
        seed=args.seed,
    )
    print(render_markdown(res))
    print(f"chain: {os.path.join(args.out, 'chain.json')} ({res['seconds']} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="musiclm eval chain", description=__doc__.split("\n\n")[0])
    return run_from_args(add_arguments(p).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
